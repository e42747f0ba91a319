//! A circuit breaker around the store: after repeated failures the request path skips Redis
//! entirely, lets one request through now and then as a probe, and closes when Redis
//! answers again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The state of the circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Redis is used.
    Closed,
    /// Redis is skipped: lookups are misses at once, writes are not attempted.
    Open,
    /// One request is probing Redis; the others skip it.
    HalfOpen,
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half-open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// How many consecutive failures open the breaker.
pub(crate) const FAILURES_TO_OPEN: u32 = 3;
/// How long the breaker stays open before a probe.
pub(crate) const OPEN_FOR: Duration = Duration::from_millis(250);
/// How long a probe may go without reporting before another caller probes.
pub(crate) const PROBE_STALE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct Breaker {
    state: AtomicU8,
    failures: AtomicU32,
    /// When the breaker last opened, in microseconds since `epoch`.
    opened_at: AtomicU64,
    epoch: Instant,
    /// Whether Redis ever answered (to tell "never connected" from "lost").
    ever_up: AtomicBool,
    /// Transitions, for counters.
    pub(crate) opened: AtomicU64,
}

impl Breaker {
    pub(crate) fn new() -> Self {
        Breaker {
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            epoch: Instant::now(),
            ever_up: AtomicBool::new(false),
            opened: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    pub(crate) fn ever_up(&self) -> bool {
        self.ever_up.load(Ordering::Relaxed)
    }

    /// Whether a request-path command may go to Redis now. While open, one caller per
    /// `OPEN_FOR` becomes the probe.
    pub(crate) fn allow(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            OPEN => {
                let now = self.now_us();
                let since = now.saturating_sub(self.opened_at.load(Ordering::Acquire));
                let opened = self.opened_at.load(Ordering::Acquire);
                // Claim the probe by moving `opened_at` first (one caller wins), then turn
                // half-open; the timestamp is the probe's start, so a probe that never
                // reports is replaced later.
                since >= OPEN_FOR.as_micros() as u64
                    && self
                        .opened_at
                        .compare_exchange(opened, now, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    && self
                        .state
                        .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
            }
            _ => {
                // A probe whose request was dropped before Redis answered never reports:
                // after `PROBE_STALE`, the next caller probes instead.
                let now = self.now_us();
                let started = self.opened_at.load(Ordering::Acquire);
                now.saturating_sub(started) >= PROBE_STALE.as_micros() as u64
                    && self
                        .opened_at
                        .compare_exchange(started, now, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
            }
        }
    }

    /// Redis answered.
    pub(crate) fn success(&self) {
        // Called on every command: read first, so a healthy Redis costs no shared writes.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if !self.ever_up.load(Ordering::Relaxed) {
            self.ever_up.store(true, Ordering::Relaxed);
        }
        if self.state.load(Ordering::Acquire) != CLOSED
            && self.state.swap(CLOSED, Ordering::AcqRel) != CLOSED
        {
            tracing::info!("redis is available again; circuit breaker closed, caching resumed");
        }
    }

    /// Redis did not answer (or could not be reached). Opens after `FAILURES_TO_OPEN` in a
    /// row; a failed probe re-opens at once.
    pub(crate) fn failure(&self, op: &'static str, error: &str) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let state = self.state.load(Ordering::Acquire);
        if state == HALF_OPEN {
            self.open();
            tracing::debug!(op, error, "redis probe failed; circuit breaker stays open");
        } else if state == CLOSED && failures >= FAILURES_TO_OPEN {
            // The time first, so that no caller sees the new state with an old time.
            self.opened_at.store(self.now_us(), Ordering::Release);
            if self
                .state
                .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.opened.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    op,
                    error,
                    "redis is unavailable; circuit breaker open, serving uncached until it answers again"
                );
            }
        } else {
            tracing::debug!(op, error, failures, "redis command failed");
        }
    }

    /// Opens at once (connection known to be down).
    pub(crate) fn open_now(&self, op: &'static str, error: &str) {
        self.failures.store(FAILURES_TO_OPEN, Ordering::Relaxed);
        self.opened_at.store(self.now_us(), Ordering::Release);
        if self.state.swap(OPEN, Ordering::AcqRel) == CLOSED {
            self.opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                op,
                error,
                "redis is unavailable; circuit breaker open, serving uncached until it answers again"
            );
        }
    }

    fn open(&self) {
        self.opened_at.store(self.now_us(), Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_failures_and_probes_one_at_a_time() {
        let b = Breaker::new();
        assert!(b.allow());
        b.failure("get", "timeout");
        b.failure("get", "timeout");
        assert_eq!(b.state(), BreakerState::Closed);
        b.success();
        b.failure("get", "timeout");
        b.failure("get", "timeout");
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success resets the count"
        );
        b.failure("get", "timeout");
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(), "open: skip Redis");
        std::thread::sleep(OPEN_FOR + Duration::from_millis(20));
        assert!(b.allow(), "the first caller after the pause probes");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allow(), "only one probe at a time");
        b.failure("get", "timeout");
        assert_eq!(b.state(), BreakerState::Open, "a failed probe re-opens");
        assert!(!b.allow());
        std::thread::sleep(OPEN_FOR + Duration::from_millis(20));
        assert!(b.allow());
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow());
        assert_eq!(b.opened.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced() {
        let b = Breaker::new();
        b.open_now("connect", "refused");
        std::thread::sleep(OPEN_FOR + Duration::from_millis(20));
        assert!(b.allow(), "probe");
        // Its request is dropped: no success, no failure.
        assert!(!b.allow());
        std::thread::sleep(PROBE_STALE + Duration::from_millis(20));
        assert!(b.allow(), "a new probe after the stale one");
        assert!(!b.allow());
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
