//! Exactly-once: windows are identified by (agent id, boot id, sequence).
//!
//! An agent sends its windows in sequence order on a stream and, after a reconnect, resends
//! from the first unacknowledged one, so anything at or below the highest sequence already
//! seen from that (agent, boot) is a duplicate. A stream looks its (agent, boot) up once,
//! at its hello, and then checks each window against that entry without touching the map.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

/// Entries beyond which marks that no stream holds are forgotten (oldest boots first go
/// with them; a boot id unseen for that long will not resend).
const MAX_IDLE_MARKS: usize = 65_536;

/// The highest sequence accepted for one (agent id, boot id).
#[derive(Debug, Default)]
pub struct SequenceMark {
    highest: Mutex<u64>,
}

impl SequenceMark {
    /// Locks the mark: hold it while deciding and recording a batch, so two streams of the
    /// same (agent, boot) cannot both accept one window.
    pub fn lock(&self) -> MutexGuard<'_, u64> {
        self.highest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn highest(&self) -> u64 {
        *self.lock()
    }
}

/// Highest sequence seen per (agent id, boot id).
#[derive(Debug, Default)]
pub struct Deduplicator {
    marks: Mutex<HashMap<(String, String), Arc<SequenceMark>>>,
}

impl Deduplicator {
    /// The mark of (agent, boot), created at 0 (nothing seen) the first time.
    pub fn mark(&self, agent_id: &str, boot_id: &str) -> Arc<SequenceMark> {
        let mut marks = self
            .marks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if marks.len() > MAX_IDLE_MARKS {
            marks.retain(|_, mark| Arc::strong_count(mark) > 1);
        }
        marks
            .entry((agent_id.to_owned(), boot_id.to_owned()))
            .or_default()
            .clone()
    }

    /// True the first time a window is seen, false for every repeat.
    pub fn first_sighting(&self, agent_id: &str, boot_id: &str, sequence: u64) -> bool {
        let mark = self.mark(agent_id, boot_id);
        let mut highest = mark.lock();
        if sequence <= *highest {
            return false;
        }
        *highest = sequence;
        true
    }

    /// Every (agent id, boot id, highest sequence) known, for a journal snapshot.
    pub fn snapshot(&self) -> Vec<(String, String, u64)> {
        let marks = self
            .marks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        marks
            .iter()
            .map(|((agent, boot), mark)| (agent.clone(), boot.clone(), mark.highest()))
            .collect()
    }

    /// (agent, boot) pairs known.
    pub fn len(&self) -> usize {
        self.marks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_and_replays_are_duplicates_per_boot() {
        let dedup = Deduplicator::default();
        assert!(dedup.first_sighting("a", "b1", 1));
        assert!(dedup.first_sighting("a", "b1", 2));
        assert!(!dedup.first_sighting("a", "b1", 2));
        assert!(!dedup.first_sighting("a", "b1", 1));
        // A restarted agent (new boot id) starts again at 1; another agent is separate.
        assert!(dedup.first_sighting("a", "b2", 1));
        assert!(dedup.first_sighting("c", "b1", 1));
        // A gap (windows the agent dropped) does not block later ones.
        assert!(dedup.first_sighting("a", "b1", 9));
        assert_eq!(dedup.mark("a", "b1").highest(), 9);
        assert_eq!(dedup.len(), 3);
    }
}
