//! Spool: the outbox on disk, so an agent restart loses no window that had closed.
//!
//! Layout of the spool directory:
//! - `boot-id`: the sequence space's id. It is created once and kept, so windows resent
//!   after a restart carry the (agent id, boot id, sequence) the collector may already have
//!   seen, and its dedup drops them. Delete the directory to start a new sequence space.
//! - `segment-<first sequence>.log`: append-only records `[len u32 LE][crc32 u32 LE]
//!   [protobuf LatencyWindow]` (`trazor_proto::record`), in sequence order. A new segment starts when the active one
//!   passes an eighth of the size limit.
//! - `acked`: the highest acknowledged sequence (written to a temporary file and renamed,
//!   at most once a second, and whenever a segment is deleted). A stale cursor only makes
//!   the agent resend windows the collector already has, which it drops.
//!
//! fsync policy: every batch of closed windows (one per window length, e.g. every 10 s) is
//! synced before it can be sent, so nothing the collector acknowledged is missing from the
//! spool after a crash; the cursor is not synced (see above: stale is safe).
//!
//! Bounds: fully acknowledged segments are deleted; when the spool passes `max_bytes` the
//! oldest segment is deleted even if unacknowledged, and its windows are counted in
//! `trazor_agent_spool_dropped_total`. A torn or corrupt record (a crash mid-write, a bad
//! disk) ends its segment: the rest is truncated and counted, never a panic.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use prost::Message as _;
use trazor_proto::{record, v1::LatencyWindow};

use crate::ship::ShipperStats;

/// How often the ack cursor is written at most (besides when segments are deleted).
const CURSOR_INTERVAL: Duration = Duration::from_secs(1);

/// Where the spool lives and how big it may grow.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// What a spool held when opened.
#[derive(Debug, Default)]
pub struct Recovered {
    pub boot_id: String,
    /// Sequence for the next window: after every one ever spooled.
    pub next_sequence: u64,
    pub acked_through: u64,
    /// Unacknowledged windows, in sequence order.
    pub windows: Vec<LatencyWindow>,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    last_sequence: u64,
    windows: u64,
    bytes: u64,
}

/// The on-disk outbox (see the module docs).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segments: VecDeque<Segment>,
    active: Option<File>,
    acked: u64,
    cursor_written: Option<Instant>,
    stats: Arc<ShipperStats>,
}

fn segment_path(dir: &Path, first_sequence: u64) -> PathBuf {
    dir.join(format!("segment-{first_sequence:020}.log"))
}

/// Reads a segment's intact records; returns them and the intact length.
fn read_segment(bytes: &[u8]) -> (Vec<LatencyWindow>, usize) {
    let mut windows = Vec::new();
    let mut intact = 0;
    let mut reader = record::records(bytes);
    while let Some(payload) = reader.next() {
        let Ok(window) = LatencyWindow::decode(payload) else {
            break;
        };
        windows.push(window);
        intact = reader.position();
    }
    (windows, intact)
}

impl Spool {
    /// Opens (creating) the spool and reads back the unacknowledged windows.
    pub fn open(
        config: &SpoolConfig,
        stats: Arc<ShipperStats>,
    ) -> std::io::Result<(Self, Recovered)> {
        let dir = &config.dir;
        std::fs::create_dir_all(dir)?;
        let boot_path = dir.join("boot-id");
        let boot_id = match std::fs::read_to_string(&boot_path) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => {
                let id = format!("{:032x}", rand::random::<u128>());
                let mut file = File::create(&boot_path)?;
                file.write_all(id.as_bytes())?;
                file.sync_all()?;
                id
            }
        };
        let acked = std::fs::read_to_string(dir.join("acked"))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let mut paths: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let first = entry
                    .file_name()
                    .to_str()?
                    .strip_prefix("segment-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()?;
                Some((first, entry.path()))
            })
            .collect();
        paths.sort_unstable();
        let mut segments = VecDeque::new();
        let mut unacked = Vec::new();
        let mut highest = acked;
        for (_, path) in paths {
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            let (windows, intact) = read_segment(&bytes);
            if intact < bytes.len() {
                stats.spool_truncated.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    segment = %path.display(), kept_bytes = intact,
                    dropped_bytes = bytes.len() - intact,
                    "spool segment has a torn or corrupt record; truncating it there"
                );
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(intact as u64)?;
            }
            let last_sequence = windows.last().map_or(0, |window| window.sequence);
            highest = highest.max(last_sequence);
            if last_sequence <= acked {
                std::fs::remove_file(&path)?;
                continue;
            }
            segments.push_back(Segment {
                path,
                last_sequence,
                windows: windows.len() as u64,
                bytes: intact as u64,
            });
            unacked.extend(windows.into_iter().filter(|window| window.sequence > acked));
        }
        let spool = Self {
            dir: dir.clone(),
            max_bytes: config.max_bytes.max(64 * 1024),
            segments,
            active: None,
            acked,
            cursor_written: None,
            stats,
        };
        let recovered = Recovered {
            boot_id,
            next_sequence: highest + 1,
            acked_through: acked,
            windows: unacked,
        };
        Ok((spool, recovered))
    }

    fn segment_limit(&self) -> u64 {
        self.max_bytes / 8
    }

    /// Appends numbered windows and syncs them to disk.
    pub fn append(&mut self, windows: &[LatencyWindow]) -> std::io::Result<()> {
        let (Some(first), Some(last)) = (windows.first(), windows.last()) else {
            return Ok(());
        };
        let mut buffer = Vec::with_capacity(windows.len() * 512);
        for window in windows {
            record::frame(&mut buffer, |payload| {
                // Encoding into a Vec cannot fail.
                let _ = window.encode(payload);
            });
        }
        let full = self
            .segments
            .back()
            .is_none_or(|segment| segment.bytes >= self.segment_limit());
        if self.active.is_none() || full {
            let path = segment_path(&self.dir, first.sequence);
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            let bytes = file.metadata()?.len();
            self.active = Some(file);
            self.segments.push_back(Segment {
                path,
                last_sequence: 0,
                windows: 0,
                bytes,
            });
        }
        let (Some(file), Some(segment)) = (self.active.as_mut(), self.segments.back_mut()) else {
            return Ok(());
        };
        file.write_all(&buffer)?;
        file.sync_data()?;
        segment.bytes += buffer.len() as u64;
        segment.windows += windows.len() as u64;
        segment.last_sequence = last.sequence;
        self.enforce_limit()
    }

    /// Deletes the oldest segments while the spool is over its limit (never the active one).
    fn enforce_limit(&mut self) -> std::io::Result<()> {
        while self.segments.len() > 1
            && self
                .segments
                .iter()
                .map(|segment| segment.bytes)
                .sum::<u64>()
                > self.max_bytes
        {
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            std::fs::remove_file(&oldest.path)?;
            if oldest.last_sequence > self.acked {
                self.stats
                    .spool_dropped
                    .fetch_add(oldest.windows, Ordering::Relaxed);
                tracing::warn!(
                    windows = oldest.windows,
                    "spool full: deleted its oldest segment before the collector acknowledged it"
                );
            }
        }
        Ok(())
    }

    /// Records that every window up to `sequence` is acknowledged.
    pub fn ack(&mut self, sequence: u64) -> std::io::Result<()> {
        if sequence <= self.acked {
            return Ok(());
        }
        self.acked = sequence;
        let mut deleted = false;
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|segment| segment.last_sequence <= sequence)
        {
            if let Some(segment) = self.segments.pop_front() {
                // Cursor first: if we crash between the two, the segment is filtered out.
                self.write_cursor()?;
                std::fs::remove_file(&segment.path)?;
                deleted = true;
            }
        }
        let due = self
            .cursor_written
            .is_none_or(|written| written.elapsed() >= CURSOR_INTERVAL);
        if due && !deleted {
            self.write_cursor()?;
        }
        Ok(())
    }

    fn write_cursor(&mut self) -> std::io::Result<()> {
        let temporary = self.dir.join("acked.tmp");
        std::fs::write(&temporary, self.acked.to_string())?;
        std::fs::rename(&temporary, self.dir.join("acked"))?;
        self.cursor_written = Some(Instant::now());
        Ok(())
    }

    /// Bytes on disk in segments.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|segment| segment.bytes).sum()
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // Best effort: a stale cursor is safe, this only saves some resending.
        let _ = self.write_cursor();
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

    fn numbered(from: u64, to: u64) -> Vec<LatencyWindow> {
        (from..=to)
            .map(|sequence| LatencyWindow {
                sequence,
                profile: "x".repeat(100),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn restart_recovers_unacked_windows_under_the_same_boot_id() {
        let dir = temp_dir("recover");
        let config = SpoolConfig {
            dir: dir.clone(),
            max_bytes: 1 << 20,
        };
        let (mut spool, recovered) = Spool::open(&config, Arc::default()).unwrap();
        assert_eq!(recovered.next_sequence, 1);
        spool.append(&numbered(1, 5)).unwrap();
        spool.ack(3).unwrap();
        drop(spool);
        let (_, again) = Spool::open(&config, Arc::default()).unwrap();
        assert_eq!(again.boot_id, recovered.boot_id);
        assert_eq!(again.acked_through, 3);
        assert_eq!(again.next_sequence, 6);
        let sequences: Vec<u64> = again.windows.iter().map(|w| w.sequence).collect();
        assert_eq!(sequences, vec![4, 5]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_tail_is_truncated_and_counted() {
        let dir = temp_dir("corrupt");
        let config = SpoolConfig {
            dir: dir.clone(),
            max_bytes: 1 << 20,
        };
        let (mut spool, _) = Spool::open(&config, Arc::default()).unwrap();
        spool.append(&numbered(1, 3)).unwrap();
        drop(spool);
        let path = segment_path(&dir, 1);
        let length = std::fs::metadata(&path).unwrap().len();
        // Flip a byte in the last record's payload, then add a torn header.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[length as usize - 3] ^= 0xff;
        bytes.extend_from_slice(&[9, 9, 9]);
        std::fs::write(&path, &bytes).unwrap();
        let stats = Arc::new(ShipperStats::default());
        let (_, recovered) = Spool::open(&config, stats.clone()).unwrap();
        let sequences: Vec<u64> = recovered.windows.iter().map(|w| w.sequence).collect();
        assert_eq!(sequences, vec![1, 2]);
        assert_eq!(stats.spool_truncated.load(Ordering::Relaxed), 1);
        assert!(std::fs::metadata(&path).unwrap().len() < length);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn size_is_bounded_and_drops_are_counted() {
        let dir = temp_dir("bounded");
        let config = SpoolConfig {
            dir: dir.clone(),
            max_bytes: 64 * 1024,
        };
        let stats = Arc::new(ShipperStats::default());
        let (mut spool, _) = Spool::open(&config, stats.clone()).unwrap();
        for batch in 0..100 {
            spool
                .append(&numbered(batch * 10 + 1, batch * 10 + 10))
                .unwrap();
        }
        assert!(spool.bytes() <= 64 * 1024 + 8 * 1024, "{}", spool.bytes());
        assert!(stats.spool_dropped.load(Ordering::Relaxed) > 0);
        spool.ack(1_000).unwrap();
        assert_eq!(spool.segments.len(), 1, "acked segments are deleted");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
