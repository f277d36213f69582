//! Per-agent limits: how many streams one agent id may hold open, and how many windows per
//! second it may send.
//!
//! The rate limit slows a fast agent down instead of refusing it: the stream stops reading
//! until the agent's token bucket refills, so HTTP/2 flow control pushes back on the agent
//! and nothing is lost (the agent keeps the windows in its outbox). Other agents' streams
//! are unaffected: each has its own bucket.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// Limits applied to every agent id.
#[derive(Clone, Copy, Debug)]
pub struct AgentLimitConfig {
    /// Streams one agent id may have open at once (a reconnecting agent briefly has two).
    pub max_streams: usize,
    /// Sustained windows per second per agent; 0 disables the rate limit.
    pub windows_per_second: u32,
    /// Windows an agent may send at once above the rate (a backlog after an outage).
    pub burst: u32,
}

impl Default for AgentLimitConfig {
    fn default() -> Self {
        Self {
            max_streams: 4,
            // 200 pods with 1 s windows is 200/s; this leaves room for catching up.
            windows_per_second: 20_000,
            // A ten-minute backlog of 200 pods at 1 s windows.
            burst: 120_000,
        }
    }
}

#[derive(Debug)]
struct AgentState {
    open_streams: AtomicUsize,
    bucket: Mutex<TokenBucket>,
}

#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

/// The limits of every agent seen.
#[derive(Debug)]
pub struct AgentLimits {
    config: AgentLimitConfig,
    agents: Mutex<HashMap<String, Arc<AgentState>>>,
}

/// An open stream's claim on its agent's stream count; released on drop.
#[derive(Debug)]
pub struct StreamLease {
    agent: Arc<AgentState>,
    config: AgentLimitConfig,
}

impl AgentLimits {
    pub fn new(config: AgentLimitConfig) -> Self {
        Self {
            config,
            agents: Mutex::new(HashMap::new()),
        }
    }

    /// Claims one stream for `agent_id`, or says how many it already has open.
    pub fn open_stream(&self, agent_id: &str) -> Result<StreamLease, usize> {
        let mut agents = self
            .agents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Forget agents with no stream open, so the map stays as big as the fleet.
        if agents.len() > 4_096 {
            agents.retain(|_, state| Arc::strong_count(state) > 1);
        }
        let state = agents
            .entry(agent_id.to_owned())
            .or_insert_with(|| {
                Arc::new(AgentState {
                    open_streams: AtomicUsize::new(0),
                    bucket: Mutex::new(TokenBucket {
                        tokens: f64::from(self.config.burst),
                        refilled: Instant::now(),
                    }),
                })
            })
            .clone();
        let open = state.open_streams.fetch_add(1, Ordering::AcqRel);
        if open >= self.config.max_streams {
            state.open_streams.fetch_sub(1, Ordering::AcqRel);
            return Err(open);
        }
        Ok(StreamLease {
            agent: state,
            config: self.config,
        })
    }

    pub fn max_streams(&self) -> usize {
        self.config.max_streams
    }
}

impl StreamLease {
    /// Takes `windows` tokens and says how long to wait before reading more; zero when the
    /// agent is within its rate.
    pub fn take(&self, windows: usize) -> Duration {
        let rate = f64::from(self.config.windows_per_second);
        if rate == 0.0 {
            return Duration::ZERO;
        }
        let mut bucket = self
            .agent
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.refilled = now;
        bucket.tokens = (bucket.tokens + elapsed * rate).min(f64::from(self.config.burst));
        bucket.tokens -= windows as f64;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / rate)
        }
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.agent.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_per_agent_are_capped_and_released() {
        let limits = AgentLimits::new(AgentLimitConfig {
            max_streams: 2,
            ..Default::default()
        });
        let first = limits.open_stream("a").unwrap();
        let _second = limits.open_stream("a").unwrap();
        assert_eq!(limits.open_stream("a").unwrap_err(), 2);
        assert!(limits.open_stream("b").is_ok(), "other agents are separate");
        drop(first);
        assert!(limits.open_stream("a").is_ok());
    }

    #[test]
    fn rate_is_a_token_bucket_with_burst() {
        let limits = AgentLimits::new(AgentLimitConfig {
            max_streams: 1,
            windows_per_second: 100,
            burst: 10,
        });
        let lease = limits.open_stream("a").unwrap();
        assert_eq!(lease.take(10), Duration::ZERO);
        let wait = lease.take(50);
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        let unlimited = AgentLimits::new(AgentLimitConfig {
            windows_per_second: 0,
            ..Default::default()
        });
        assert_eq!(
            unlimited.open_stream("a").unwrap().take(1_000_000),
            Duration::ZERO
        );
    }
}
