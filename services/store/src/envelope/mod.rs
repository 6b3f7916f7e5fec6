//! Envelope encryption at rest: everything a care system's store writes to its bucket
//! is ciphertext, under keys the care system owns.
//!
//! - [`format`]: the segmented streaming AEAD every object is stored in;
//! - [`key_provider`]: the [`KeyProvider`] trait, with [`LocalKeyProvider`] (a master key
//!   file, for `shcr dev`) and [`KmsKeyProvider`] (AWS KMS);
//! - [`keyring`]: [`EnvelopeKeyring`], a care system's tenant root keys, stored wrapped
//!   in its bucket and cached unwrapped for a bounded time;
//! - [`encrypting_store`]: [`EncryptingObjectStore`], the `ObjectStore` wrapper SlateDB
//!   writes through.
//!
//! Wiring: the raw bucket store (prefixed to the care system) backs the keyring; the
//! encrypting store wraps a sub-prefix of it that excludes `keys/`.

pub mod encrypting_store;
pub mod format;
pub mod key_provider;
pub mod keyring;
pub mod kms_key_provider;
pub mod local_key_provider;
pub mod secret_key;

pub use encrypting_store::{EncryptingObjectStore, EnvelopeError};
pub use key_provider::{
    DataKey, EncryptionContext, KeyProvider, KeyProviderError, KeyPurpose, WrappedKey,
};
pub use keyring::{EnvelopeKeyring, KeyringConfig, KeyringError};
pub use kms_key_provider::KmsKeyProvider;
pub use local_key_provider::{LocalKeyProvider, MasterKeyFileError};
pub use secret_key::{KeyEpoch, SecretKey};
