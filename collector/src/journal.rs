//! Journal: the collector's on-disk record of every window it accepted (`--state-dir`), so
//! a collector that is killed and restarted neither loses a window nor publishes one twice.
//!
//! A window is acknowledged only after its record is written, and the record is written
//! before the window is published. On start the collector replays the journal: the dedup
//! marks come back (a resent window is recognised as a duplicate), and so do the feed
//! history and the open aggregates. Without a state dir all of this lives in memory: a
//! collector crash may then re-publish the windows it had published but not yet
//! acknowledged (each feed document carries agent id, boot id and sequence, so a consumer
//! can drop them).
//!
//! Format: segment files `journal-<n>.log` of records `[len u32 LE][crc32 u32 LE][payload]`
//! (`trazor_proto::record`);
//! payload kind 1 is a window (agent id, boot id, protobuf `LatencyWindow`), kind 2 a dedup
//! mark (agent id, boot id, highest sequence). A new segment starts with a mark for every
//! (agent, boot) known, so old segments can be deleted without forgetting what was seen;
//! `keep_segments` are kept. A torn or corrupt record (a crash mid-write, a bad disk) ends
//! the segment there: the rest is truncated and counted, never a panic.
//!
//! Durability: records are written with one `write` per batch, which survives a killed
//! process (the page cache keeps it). `fsync: true` also syncs each batch before the ack,
//! which survives a node crash, at the cost of a disk flush per batch.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use prost::Message as _;
use trazor_proto::{
    record::{frame, records},
    v1::LatencyWindow,
};

use crate::dedup::Deduplicator;

const WINDOW: u8 = 1;
const MARK: u8 = 2;

/// Journal sizing and durability.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// Bytes per segment before a new one starts.
    pub segment_bytes: u64,
    /// Segments kept (the newest); older ones are deleted.
    pub keep_segments: usize,
    /// Sync every batch to disk before acknowledging it.
    pub fsync: bool,
}

/// What a journal held when opened.
#[derive(Debug, Default)]
pub struct Replay {
    /// Windows in the order they were accepted: (agent id, boot id, window).
    pub windows: Vec<(String, String, LatencyWindow)>,
    /// Dedup marks from segment snapshots.
    pub marks: Vec<(String, String, u64)>,
    /// Corrupt or torn records found (each ended its segment there).
    pub truncated: u64,
}

#[derive(Debug)]
pub struct Journal {
    config: JournalConfig,
    active: Mutex<Active>,
}

#[derive(Debug)]
struct Active {
    file: File,
    index: u64,
    written: u64,
}

fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("journal-{index:010}.log"))
}

fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut indexes: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_prefix("journal-")?
                .strip_suffix(".log")?
                .parse()
                .ok()
        })
        .collect();
    indexes.sort_unstable();
    Ok(indexes)
}

fn put_str(buffer: &mut Vec<u8>, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
    buffer.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    buffer.extend_from_slice(bytes);
}

fn take_str<'a>(payload: &mut &'a [u8]) -> Option<&'a str> {
    let (length, rest) = payload.split_first_chunk::<2>()?;
    let length = u16::from_le_bytes(*length) as usize;
    let text = rest.get(..length)?;
    *payload = &rest[length..];
    std::str::from_utf8(text).ok()
}

fn mark_record(buffer: &mut Vec<u8>, agent: &str, boot: &str, highest: u64) {
    frame(buffer, |payload| {
        payload.push(MARK);
        put_str(payload, agent);
        put_str(payload, boot);
        payload.extend_from_slice(&highest.to_le_bytes());
    });
}

/// Reads one segment into `replay`; returns the length of its intact prefix.
fn replay_segment(bytes: &[u8], replay: &mut Replay) -> usize {
    let mut intact = 0;
    let mut reader = records(bytes);
    while let Some(payload) = reader.next() {
        if !decode_record(payload, replay) {
            break;
        }
        intact = reader.position();
    }
    intact
}

fn decode_record(payload: &[u8], replay: &mut Replay) -> bool {
    let Some((&kind, mut rest)) = payload.split_first() else {
        return false;
    };
    let (Some(agent), Some(boot)) = (take_str(&mut rest), take_str(&mut rest)) else {
        return false;
    };
    match kind {
        WINDOW => match LatencyWindow::decode(rest) {
            Ok(window) => {
                replay
                    .windows
                    .push((agent.to_owned(), boot.to_owned(), window));
                true
            }
            Err(_) => false,
        },
        MARK => match rest.first_chunk::<8>() {
            Some(highest) => {
                replay.marks.push((
                    agent.to_owned(),
                    boot.to_owned(),
                    u64::from_le_bytes(*highest),
                ));
                true
            }
            None => false,
        },
        _ => false,
    }
}

impl Journal {
    /// Opens (creating) the journal in `config.dir` and reads back what it holds.
    pub fn open(config: JournalConfig) -> std::io::Result<(Self, Replay)> {
        std::fs::create_dir_all(&config.dir)?;
        let mut replay = Replay::default();
        let indexes = segments(&config.dir)?;
        for &index in &indexes {
            let path = segment_path(&config.dir, index);
            let mut bytes = Vec::new();
            File::open(&path)?.read_to_end(&mut bytes)?;
            let intact = replay_segment(&bytes, &mut replay);
            if intact < bytes.len() {
                replay.truncated += 1;
                tracing::warn!(
                    segment = %path.display(),
                    kept_bytes = intact,
                    dropped_bytes = bytes.len() - intact,
                    "journal segment has a torn or corrupt record; truncating it there"
                );
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(intact as u64)?;
            }
        }
        let index = indexes.last().copied().unwrap_or(1);
        let path = segment_path(&config.dir, index);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok((
            Self {
                config,
                active: Mutex::new(Active {
                    file,
                    index,
                    written,
                }),
            },
            replay,
        ))
    }

    /// Records accepted windows of (agent, boot): returns once they are written (and
    /// synced, with `fsync`).
    pub fn append(
        &self,
        agent: &str,
        boot: &str,
        windows: &[LatencyWindow],
    ) -> std::io::Result<()> {
        if windows.is_empty() {
            return Ok(());
        }
        let mut buffer = Vec::with_capacity(windows.len() * 512);
        for window in windows {
            frame(&mut buffer, |payload| {
                payload.push(WINDOW);
                put_str(payload, agent);
                put_str(payload, boot);
                // Encoding into a Vec cannot fail.
                let _ = window.encode(payload);
            });
        }
        let mut active = self
            .active
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        active.file.write_all(&buffer)?;
        if self.config.fsync {
            active.file.sync_data()?;
        }
        active.written += buffer.len() as u64;
        Ok(())
    }

    /// Starts a new segment when the active one is full: it opens with every dedup mark,
    /// then the oldest segments beyond `keep_segments` are deleted.
    pub fn rotate_if_full(&self, dedup: &Deduplicator) -> std::io::Result<()> {
        let mut active = self
            .active
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if active.written < self.config.segment_bytes {
            return Ok(());
        }
        let index = active.index + 1;
        let mut buffer = Vec::new();
        for (agent, boot, highest) in dedup.snapshot() {
            mark_record(&mut buffer, &agent, &boot, highest);
        }
        let path = segment_path(&self.config.dir, index);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        file.write_all(&buffer)?;
        file.sync_data()?;
        *active = Active {
            file,
            index,
            written: buffer.len() as u64,
        };
        for old in segments(&self.config.dir)? {
            if old + (self.config.keep_segments.max(1) as u64) <= index {
                std::fs::remove_file(segment_path(&self.config.dir, old))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("trazor-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn config(dir: &Path) -> JournalConfig {
        JournalConfig {
            dir: dir.to_owned(),
            segment_bytes: 1_000,
            keep_segments: 2,
            fsync: false,
        }
    }

    fn window(sequence: u64) -> LatencyWindow {
        LatencyWindow {
            sequence,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            ..Default::default()
        }
    }

    #[test]
    fn replays_windows_and_truncates_a_torn_tail() {
        let dir = temp_dir("torn");
        let (journal, replay) = Journal::open(config(&dir)).unwrap();
        assert!(replay.windows.is_empty());
        journal.append("a", "b", &[window(1), window(2)]).unwrap();
        drop(journal);
        // A crash mid-write: half a record at the end.
        let path = segment_path(&dir, 1);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[40, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(file);
        let (journal, replay) = Journal::open(config(&dir)).unwrap();
        assert_eq!(replay.truncated, 1);
        let sequences: Vec<u64> = replay.windows.iter().map(|(_, _, w)| w.sequence).collect();
        assert_eq!(sequences, vec![1, 2]);
        journal.append("a", "b", &[window(3)]).unwrap();
        drop(journal);
        let (_, replay) = Journal::open(config(&dir)).unwrap();
        assert_eq!(
            replay.truncated, 0,
            "the tail was cut, later appends are intact"
        );
        assert_eq!(replay.windows.len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotation_keeps_marks_and_bounds_the_disk() {
        let dir = temp_dir("rotate");
        let dedup = Deduplicator::default();
        let (journal, _) = Journal::open(config(&dir)).unwrap();
        for sequence in 1..=200 {
            assert!(dedup.first_sighting("a", "b", sequence));
            journal.append("a", "b", &[window(sequence)]).unwrap();
            journal.rotate_if_full(&dedup).unwrap();
        }
        drop(journal);
        assert!(segments(&dir).unwrap().len() <= 2);
        let (_, replay) = Journal::open(config(&dir)).unwrap();
        let highest_mark = replay.marks.iter().map(|(_, _, h)| *h).max().unwrap();
        let last = replay.windows.last().unwrap().2.sequence;
        assert_eq!(last, 200);
        assert!(highest_mark < 200 && highest_mark > 100, "{highest_mark}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
