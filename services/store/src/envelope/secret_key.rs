//! Key material and key epochs.
//!
//! Invariants: plaintext key bytes live only inside [`SecretKey`], which zeroizes them
//! when the last handle drops and never prints them (its `Debug` is redacted). Handles
//! are cheap clones of one shared allocation, so a cached key is zeroized once the cache
//! and every in-flight operation that borrowed it have let go.

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

/// Length in bytes of every key this module handles (AES-256).
pub const KEY_LEN: usize = 32;

/// A 256-bit secret key (a tenant root key or a provider's master key).
#[derive(Clone)]
pub struct SecretKey(Arc<Zeroizing<[u8; KEY_LEN]>>);

impl SecretKey {
    /// Takes ownership of key bytes; the caller's copy should itself be zeroized.
    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self(Arc::new(bytes))
    }

    /// Copies key bytes out of a slice, which must be exactly [`KEY_LEN`] long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return None;
        }
        key.copy_from_slice(bytes);
        Some(Self::from_bytes(key))
    }

    /// Fresh random key bytes from the system CSPRNG.
    pub fn generate() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        aws_lc_rs::rand::fill(key.as_mut())?;
        Ok(Self::from_bytes(key))
    }

    /// The key bytes, for handing to a cipher.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Which tenant root key an object was encrypted under. Epochs start at 1; rotating
/// the root key moves new writes to the next epoch while old objects keep naming theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyEpoch(u32);

impl KeyEpoch {
    /// The first epoch of every care system.
    pub const FIRST: Self = Self(1);

    /// An epoch number as stored in object headers.
    pub const fn new(epoch: u32) -> Self {
        Self(epoch)
    }

    /// The epoch number as stored in object headers.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl Default for KeyEpoch {
    fn default() -> Self {
        Self::FIRST
    }
}

impl fmt::Display for KeyEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
