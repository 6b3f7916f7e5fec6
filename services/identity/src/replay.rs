//! The replay cache: the `jti`s of assertions a store has accepted, each remembered until the
//! assertion could no longer be accepted anyway (its `exp` plus the clock skew).
//!
//! Invariants:
//! - a `jti` is accepted at most once while it is remembered, and it is remembered for as long
//!   as [`crate::AssertionVerifier`] would accept the assertion carrying it;
//! - memory is bounded: at most `capacity` entries of 16 bytes of digest plus an expiry each.
//!   When the cache is full of live entries a new `jti` is refused
//!   ([`AssertionError::ReplayCacheFull`]), never accepted unremembered (fail closed).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use aws_lc_rs::digest::{SHA256, digest};

use crate::assertion::{AssertionError, CLOCK_SKEW, MAX_LIFETIME, unix_now};

/// Entries remembered by default: about a million, ~50 MB at worst, enough for 3,000 requests a
/// second at the longest assertion lifetime.
pub const DEFAULT_REPLAY_CAPACITY: usize = 1 << 20;

/// The `jti`s seen, by digest (fixed-size keys whatever the `jti`).
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    inner: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// jti digest → the unix second after which it can be forgotten.
    until: HashMap<[u8; 16], u64>,
    /// The same entries in the order they were accepted, to forget expired ones cheaply.
    order: VecDeque<(u64, [u8; 16])>,
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::new(DEFAULT_REPLAY_CAPACITY)
    }
}

impl ReplayCache {
    /// A cache remembering at most `capacity` live `jti`s.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Seen::default()),
        }
    }

    /// Accepts `jti` (of an assertion expiring at unix second `expires_at`) if it was not seen.
    pub fn accept_once(&self, jti: &str, expires_at: u64) -> Result<(), AssertionError> {
        self.accept_at(jti, expires_at, unix_now())
    }

    fn accept_at(&self, jti: &str, expires_at: u64, now: u64) -> Result<(), AssertionError> {
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest(&SHA256, jti.as_bytes()).as_ref()[..16]);
        // Never forget sooner than the verifier would stop accepting the assertion.
        let until = expires_at
            .min(now + MAX_LIFETIME.as_secs() + CLOCK_SKEW.as_secs())
            .saturating_add(CLOCK_SKEW.as_secs() + 1);
        let mut seen = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.until.get(&key).is_some_and(|&u| u >= now) {
            return Err(AssertionError::Replayed);
        }
        seen.forget_expired(now);
        if seen.until.len() >= self.capacity {
            return Err(AssertionError::ReplayCacheFull);
        }
        seen.until.insert(key, until);
        seen.order.push_back((until, key));
        Ok(())
    }

    /// How many `jti`s are remembered.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .until
            .len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Seen {
    fn forget_expired(&mut self, now: u64) {
        while let Some(&(until, key)) = self.order.front() {
            if until >= now {
                break;
            }
            self.order.pop_front();
            if self.until.get(&key) == Some(&until) {
                self.until.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jti_is_accepted_once_while_its_assertion_lives() {
        let cache = ReplayCache::new(10);
        cache.accept_at("a", 1_060, 1_000).expect("first use");
        assert!(matches!(
            cache.accept_at("a", 1_060, 1_030),
            Err(AssertionError::Replayed)
        ));
        // Past expiry plus skew the verifier refuses it anyway, so it may be forgotten.
        cache.accept_at("b", 1_200, 1_100).expect("another jti");
        assert_eq!(cache.len(), 1, "the expired entry was forgotten");
    }

    #[test]
    fn a_full_cache_refuses_instead_of_forgetting_live_entries() {
        let cache = ReplayCache::new(2);
        cache.accept_at("a", 1_060, 1_000).expect("a");
        cache.accept_at("b", 1_060, 1_000).expect("b");
        assert!(matches!(
            cache.accept_at("c", 1_060, 1_001),
            Err(AssertionError::ReplayCacheFull)
        ));
        assert!(matches!(
            cache.accept_at("a", 1_060, 1_001),
            Err(AssertionError::Replayed)
        ));
        // Once the live entries expire there is room again.
        cache.accept_at("c", 1_200, 1_100).expect("room again");
    }
}
