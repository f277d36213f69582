//! The export spool (`--state-dir`): every OTLP batch is on disk from the moment it is
//! queued until the receiver has accepted it (or it was dropped for good, counted), so a
//! collector killed with batches queued or in flight sends them after its restart:
//! at-least-once delivery (a batch accepted just before the kill is sent again).
//!
//! Layout, in `{state dir}/otlp/`: one file per batch, `batch-<id>.otlp` (ids increase,
//! so the order of the files is the order of the batches), holding one record framed as
//! the journal's are (`trazor_proto::record`: length, CRC-32, payload), written to a
//! `.tmp` file and renamed into place, so a kill mid-write leaves no half batch under a
//! batch's name; a file whose record does not check (a bad disk) is deleted and counted.
//! One file per batch makes "accepted" a delete: no log to compact, no acknowledgement
//! records.
//!
//! Bounds: a batch is at most `max_batch_bytes` encoded (the exporter splits bigger ones
//! before they get here); the spool holds at most `max_bytes`, and a batch that would go
//! over is refused, so the exporter drops and counts it.
//!
//! `closed-through` holds the time up to which the collector had closed (and spooled) its
//! aggregates: on restart, a journaled window whose aggregate was still open is merged
//! again and exported, even if its grace ran out while the collector was down.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use trazor_proto::record::{frame, records};

/// Where and how much.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Bytes on disk at most, every batch file together.
    pub max_bytes: u64,
    /// Sync each batch file (and the directory) before the batch is queued: survives a
    /// node crash, not only a killed process.
    pub fsync: bool,
}

/// Why a batch was not spooled.
#[derive(Debug)]
pub enum PutError {
    /// The spool is at `max_bytes`.
    Full,
    Io(std::io::Error),
}

/// What the spool held when opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// `(id, payload)` of each intact batch, oldest first.
    pub batches: Vec<(u64, Vec<u8>)>,
    /// Batch files that failed their checksum (deleted).
    pub corrupt: u64,
}

#[derive(Debug)]
pub struct Spool {
    config: SpoolConfig,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// Size of each batch file on disk.
    sizes: BTreeMap<u64, u64>,
    bytes: u64,
}

const CLOSED_THROUGH: &str = "closed-through";

fn batch_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("batch-{id:020}.otlp"))
}

impl Spool {
    /// Opens (creating) the spool and reads back the batches it holds; leftover `.tmp`
    /// files (a kill mid-write: those batches were never queued) are deleted.
    pub fn open(config: SpoolConfig) -> std::io::Result<(Self, Recovered)> {
        std::fs::create_dir_all(&config.dir)?;
        let mut recovered = Recovered::default();
        let mut state = State::default();
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&config.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                std::fs::remove_file(entry.path())?;
                continue;
            }
            if let Some(id) = name
                .strip_prefix("batch-")
                .and_then(|rest| rest.strip_suffix(".otlp"))
                .and_then(|id| id.parse::<u64>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        for id in ids {
            let path = batch_path(&config.dir, id);
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            let mut reader = records(&bytes);
            match reader.next() {
                Some(payload) if reader.position() == bytes.len() => {
                    recovered.batches.push((id, payload.to_vec()));
                    state.sizes.insert(id, bytes.len() as u64);
                    state.bytes += bytes.len() as u64;
                }
                _ => {
                    tracing::warn!(file = %path.display(), "OTLP spool: a batch file is corrupt; deleting it");
                    recovered.corrupt += 1;
                    std::fs::remove_file(&path)?;
                }
            }
            state.next_id = state.next_id.max(id + 1);
        }
        Ok((
            Self {
                config,
                state: Mutex::new(state),
            },
            recovered,
        ))
    }

    /// Writes one batch; returns its id once it is on disk.
    pub fn put(&self, payload: &[u8]) -> Result<u64, PutError> {
        let mut record = Vec::with_capacity(payload.len() + 8);
        frame(&mut record, |buffer| buffer.extend_from_slice(payload));
        let size = record.len() as u64;
        let id = {
            let mut state = self.lock();
            if state.bytes + size > self.config.max_bytes {
                return Err(PutError::Full);
            }
            // Reserved now, so concurrent puts stay under the bound.
            let id = state.next_id;
            state.next_id += 1;
            state.bytes += size;
            state.sizes.insert(id, size);
            id
        };
        match self.write(id, &record) {
            Ok(()) => Ok(id),
            Err(error) => {
                self.forget(id);
                let _ =
                    std::fs::remove_file(batch_path(&self.config.dir, id).with_extension("tmp"));
                Err(PutError::Io(error))
            }
        }
    }

    fn write(&self, id: u64, record: &[u8]) -> std::io::Result<()> {
        let path = batch_path(&self.config.dir, id);
        let temporary = path.with_extension("tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        file.write_all(record)?;
        if self.config.fsync {
            file.sync_data()?;
        }
        std::fs::rename(&temporary, &path)?;
        if self.config.fsync {
            File::open(&self.config.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Deletes a batch the receiver accepted (or that was dropped for good).
    pub fn remove(&self, id: u64) -> std::io::Result<()> {
        self.forget(id);
        match std::fs::remove_file(batch_path(&self.config.dir, id)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    fn forget(&self, id: u64) {
        let mut state = self.lock();
        if let Some(size) = state.sizes.remove(&id) {
            state.bytes -= size;
        }
    }

    /// Batches and bytes on disk now.
    pub fn usage(&self) -> (u64, u64) {
        let state = self.lock();
        (state.sizes.len() as u64, state.bytes)
    }

    /// Records that aggregates closing up to `unix_nanos` are closed and spooled.
    pub fn set_closed_through(&self, unix_nanos: u64) -> std::io::Result<()> {
        let path = self.config.dir.join(CLOSED_THROUGH);
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, unix_nanos.to_string())?;
        std::fs::rename(&temporary, &path)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The time up to which aggregates were closed and spooled before a restart, if the spool
/// in `dir` recorded one.
pub fn closed_through(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join(CLOSED_THROUGH))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Deletes the `closed-through` mark of the spool in `dir`: a collector that exports no
/// metrics records no closings, so a mark left by an earlier run would be stale by the
/// next run that exports (it would merge again windows whose aggregates were published).
pub fn forget_closed_through(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(CLOSED_THROUGH)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("trazor-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn config(dir: &Path, max_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_owned(),
            max_bytes,
            fsync: false,
        }
    }

    #[test]
    fn batches_come_back_in_order_until_removed() {
        let dir = temp_dir("order");
        let (spool, recovered) = Spool::open(config(&dir, 1 << 20)).unwrap();
        assert!(recovered.batches.is_empty());
        let ids: Vec<u64> = (0..5u8).map(|n| spool.put(&[n; 100]).unwrap()).collect();
        spool.remove(ids[1]).unwrap();
        assert_eq!(spool.usage(), (4, 4 * 108));
        drop(spool);
        let (spool, recovered) = Spool::open(config(&dir, 1 << 20)).unwrap();
        let back: Vec<(u64, u8)> = recovered
            .batches
            .iter()
            .map(|(id, payload)| (*id, payload[0]))
            .collect();
        assert_eq!(
            back,
            vec![(ids[0], 0), (ids[2], 2), (ids[3], 3), (ids[4], 4)]
        );
        // New ids follow the recovered ones.
        assert!(spool.put(b"x").unwrap() > ids[4]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_total_is_bounded_and_space_comes_back_on_remove() {
        let dir = temp_dir("full");
        let (spool, _) = Spool::open(config(&dir, 250)).unwrap();
        let first = spool.put(&[1; 100]).unwrap();
        spool.put(&[2; 100]).unwrap();
        assert!(matches!(spool.put(&[3; 100]), Err(PutError::Full)));
        spool.remove(first).unwrap();
        spool.put(&[3; 100]).unwrap();
        assert_eq!(spool.usage(), (2, 216));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_and_half_written_files_are_deleted_and_counted() {
        let dir = temp_dir("corrupt");
        let (spool, _) = Spool::open(config(&dir, 1 << 20)).unwrap();
        let good = spool.put(b"good").unwrap();
        let bad = spool.put(b"bad!").unwrap();
        drop(spool);
        // A flipped byte, and a kill mid-write.
        let path = batch_path(&dir, bad);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        std::fs::write(batch_path(&dir, 99).with_extension("tmp"), b"half").unwrap();
        let (spool, recovered) = Spool::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!(recovered.batches, vec![(good, b"good".to_vec())]);
        assert_eq!(recovered.corrupt, 1);
        assert_eq!(spool.usage().0, 1);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn closed_through_survives_a_restart() {
        let dir = temp_dir("closed");
        let (spool, _) = Spool::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!(closed_through(&dir), None);
        spool.set_closed_through(1_234).unwrap();
        spool.set_closed_through(5_678).unwrap();
        assert_eq!(closed_through(&dir), Some(5_678));
        forget_closed_through(&dir).unwrap();
        assert_eq!(closed_through(&dir), None);
        forget_closed_through(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
