//! Exactly-once: windows are identified by (agent id, boot id, sequence).
//!
//! An agent sends its windows in sequence order on a stream and, after a reconnect, resends
//! from the first unacknowledged one, so anything at or below the highest sequence already
//! seen from that (agent, boot) is a duplicate.

use std::{collections::HashMap, sync::Mutex};

/// Highest sequence seen per (agent id, boot id).
#[derive(Debug, Default)]
pub struct Deduplicator {
    highest: Mutex<HashMap<(String, String), u64>>,
}

impl Deduplicator {
    /// True the first time a window is seen, false for every repeat.
    pub fn first_sighting(&self, agent_id: &str, boot_id: &str, sequence: u64) -> bool {
        let mut highest = self
            .highest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match highest.get_mut(&(agent_id.to_owned(), boot_id.to_owned())) {
            Some(seen) if sequence <= *seen => false,
            Some(seen) => {
                *seen = sequence;
                true
            }
            None => {
                highest.insert((agent_id.to_owned(), boot_id.to_owned()), sequence);
                true
            }
        }
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
    }
}
