//! Per-care-system admission control: a concurrency limit and a token-bucket rate limit, so one
//! busy care system cannot take the gateway's (or its store's) capacity from the others.
//!
//! Invariants:
//! - Admission never waits: a request over either limit is refused at once (the caller answers
//!   429 with `Retry-After`), so a flood queues nowhere inside the gateway.
//! - A [`Permit`] holds one concurrency slot until it is dropped, i.e. until the response body
//!   has been streamed (or the client went away), whatever path the request takes.
//! - The limiter of a care system outlives changes to its routing entry (members, endpoint,
//!   readiness), so a CareSystem update does not reset its budget.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits applied to each care system separately.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body forwarded, in bytes; larger ones get 413.
    pub max_body_bytes: u64,
    /// Requests in flight at once per care system; more get 429.
    pub max_concurrent_requests: u32,
    /// Sustained requests per second per care system; 0 turns the rate limit off.
    pub requests_per_second: u32,
    /// Requests per care system that may arrive at once above the sustained rate.
    pub burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            max_concurrent_requests: 512,
            requests_per_second: 2_000,
            burst: 4_000,
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The care system already has `max_concurrent_requests` in flight.
    Concurrency,
    /// The care system is over its rate; retry after this long.
    Rate { retry_after: Duration },
}

impl Refusal {
    /// Whole seconds for `Retry-After` (at least 1).
    pub fn retry_after_secs(self) -> u64 {
        match self {
            Refusal::Concurrency => 1,
            Refusal::Rate { retry_after } => retry_after.as_secs_f64().ceil().max(1.0) as u64,
        }
    }

    /// A label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Concurrency => "concurrency",
            Refusal::Rate { .. } => "rate",
        }
    }
}

/// One admitted request's concurrency slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
}

/// The limiter of one care system.
#[derive(Debug)]
pub struct CareSystemLimiter {
    slots: Arc<Semaphore>,
    bucket: Option<Mutex<TokenBucket>>,
}

impl CareSystemLimiter {
    pub fn new(config: &LimitsConfig) -> Self {
        let bucket = (config.requests_per_second > 0).then(|| {
            Mutex::new(TokenBucket::new(
                f64::from(config.requests_per_second),
                f64::from(config.burst.max(1)),
            ))
        });
        Self {
            slots: Arc::new(Semaphore::new(
                config.max_concurrent_requests.max(1) as usize
            )),
            bucket,
        }
    }

    /// Admits one request now, or says why not.
    pub fn admit(&self) -> Result<Permit, Refusal> {
        if let Some(bucket) = &self.bucket {
            // A panic cannot leave the bucket half-updated (two plain stores), so a poisoned
            // lock is still a consistent bucket.
            let mut bucket = bucket.lock().unwrap_or_else(PoisonError::into_inner);
            bucket.take(Instant::now())?;
        }
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Concurrency)?;
        Ok(Permit { _slot: slot })
    }
}

/// The classic token bucket: `rate` tokens a second up to `capacity`; each request takes one.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, capacity: f64) -> Self {
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> Result<(), Refusal> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err(Refusal::Rate {
                retry_after: Duration::from_secs_f64(missing / self.rate),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3.0);
        bucket.last = start;
        for _ in 0..3 {
            assert!(bucket.take(start).is_ok());
        }
        let refused = bucket.take(start).expect_err("burst spent");
        assert_eq!(refused.retry_after_secs(), 1);
        assert!(bucket.take(start + Duration::from_millis(100)).is_ok());
        assert!(bucket.take(start + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn concurrency_slots_come_back_when_permits_drop() {
        let limiter = CareSystemLimiter::new(&LimitsConfig {
            max_concurrent_requests: 2,
            requests_per_second: 0,
            ..LimitsConfig::default()
        });
        let a = limiter.admit().expect("first");
        let _b = limiter.admit().expect("second");
        assert_eq!(limiter.admit().expect_err("full"), Refusal::Concurrency);
        drop(a);
        assert!(limiter.admit().is_ok());
    }
}
