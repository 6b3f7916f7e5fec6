//! A care system's database, opened: raw storage → keyring → encrypting store → record engine.
//!
//! Layout under the care system's bucket prefix:
//! - `keys/trk-<epoch>.wrapped` — tenant root keys, wrapped by the key provider (KMS), written
//!   create-only. The only objects not encrypted by the store (they are KMS ciphertext).
//! - `data/db/…` — the SlateDB database (WAL, SSTs, manifests), every object encrypted;
//! - `data/exports/…` — bulk export files, encrypted.
//!
//! Invariants:
//! - every read and write first obtains the current tenant root key from the keyring (cached for
//!   its TTL); when the key provider refuses (KMS key disabled or deleted), the operation fails
//!   with [`TenantError::KeyUnavailable`] before touching the database — fail closed;
//! - one writer: opening fences any earlier writer of the same database.

use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStore;
use object_store::prefix::PrefixStore;

use crate::care_system::CareSystemName;
use crate::engine::{
    Commit, EngineConfig, EngineError, EngineHealth, Key, RecordEngine, storage::ObjectStorage,
    storage::StorageError,
};
use crate::envelope::{
    EncryptingObjectStore, EnvelopeKeyring, KeyProvider, KeyringConfig, KeyringError,
};

/// Path of the database inside the encrypted part of the bucket prefix.
pub const DATABASE_PATH: &str = "db";
/// Prefix (inside the care system's prefix) of everything the store encrypts.
pub const ENCRYPTED_PREFIX: &str = "data";

/// Everything needed to open one care system's database.
pub struct TenantConfig {
    pub care_system: CareSystemName,
    pub storage: ObjectStorage,
    pub key_provider: Arc<dyn KeyProvider>,
    pub keyring: KeyringConfig,
    pub engine: EngineConfig,
}

/// Why a tenant operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error(
        "the care system's encryption key is unavailable (disabled, deleted or access denied); \
         records cannot be read or written until it is usable again: {0}"
    )]
    KeyUnavailable(KeyringError),
    #[error("the key provider failed: {0}")]
    Keyring(KeyringError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<KeyringError> for TenantError {
    fn from(e: KeyringError) -> Self {
        if e.is_key_unavailable() {
            Self::KeyUnavailable(e)
        } else {
            Self::Keyring(e)
        }
    }
}

/// Whether the tenant can serve, for readiness probes and 503s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantHealth {
    Ready,
    Fenced,
    KeyUnavailable,
    Closed,
}

/// One care system's open, encrypted record database.
pub struct TenantDatabase {
    care_system: CareSystemName,
    keyring: Arc<EnvelopeKeyring>,
    encrypted: Arc<dyn ObjectStore>,
    engine: RecordEngine,
}

impl TenantDatabase {
    /// Opens (creating on first use) the care system's keys and database.
    pub async fn open(config: TenantConfig) -> Result<Self, TenantError> {
        let raw = config.storage.open()?;
        let keyring = Arc::new(EnvelopeKeyring::new(
            config.care_system.clone(),
            config.key_provider,
            raw.clone(),
            config.keyring,
        ));
        // Create or unwrap the root key first: a bad key fails here, with a clear error,
        // rather than deep inside SlateDB's first manifest write.
        keyring.current_key().await?;
        let data: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(raw, ENCRYPTED_PREFIX));
        let encrypted: Arc<dyn ObjectStore> =
            Arc::new(EncryptingObjectStore::new(data, keyring.clone()));
        let engine = RecordEngine::open(encrypted.clone(), DATABASE_PATH, &config.engine).await?;
        Ok(Self {
            care_system: config.care_system,
            keyring,
            encrypted,
            engine,
        })
    }

    /// Like [`Self::open`] but with the database's objects written in the clear: for benchmarks
    /// only (`examples/store_bench.rs` measures what encryption costs against it). The key
    /// provider and keyring are used exactly as in [`Self::open`] (key checks, health), so the
    /// difference is the envelope encryption of every object. Never used by the `shcr` binary.
    #[doc(hidden)]
    pub async fn open_unencrypted_for_benchmarks(
        config: TenantConfig,
    ) -> Result<Self, TenantError> {
        let raw = config.storage.open()?;
        let keyring = Arc::new(EnvelopeKeyring::new(
            config.care_system.clone(),
            config.key_provider,
            raw.clone(),
            config.keyring,
        ));
        keyring.current_key().await?;
        let data: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(raw, ENCRYPTED_PREFIX));
        let engine = RecordEngine::open(data.clone(), DATABASE_PATH, &config.engine).await?;
        Ok(Self {
            care_system: config.care_system,
            keyring,
            encrypted: data,
            engine,
        })
    }

    pub fn care_system(&self) -> &CareSystemName {
        &self.care_system
    }

    /// The encrypting object store (for export files and other non-database objects).
    pub fn encrypted_store(&self) -> Arc<dyn ObjectStore> {
        self.encrypted.clone()
    }

    /// Current health; consults the key provider only through the keyring's cache.
    pub async fn health(&self) -> TenantHealth {
        match self.engine.health() {
            EngineHealth::Fenced => return TenantHealth::Fenced,
            EngineHealth::Closed => return TenantHealth::Closed,
            EngineHealth::Open => {}
        }
        match self.keyring.current_key().await {
            Ok(_) => TenantHealth::Ready,
            Err(_) => TenantHealth::KeyUnavailable,
        }
    }

    async fn check_key(&self) -> Result<(), TenantError> {
        self.keyring.current_key().await?;
        Ok(())
    }

    /// Applies `commit` atomically; returns once durable in the bucket.
    pub async fn commit(&self, commit: Commit) -> Result<(), TenantError> {
        self.check_key().await?;
        Ok(self.engine.commit(commit).await?)
    }

    pub async fn get(&self, key: &Key) -> Result<Option<Bytes>, TenantError> {
        self.check_key().await?;
        Ok(self.engine.get(key).await?)
    }

    pub async fn scan_prefix(
        &self,
        prefix: &Key,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Key, Bytes)>, TenantError> {
        self.check_key().await?;
        Ok(self.engine.scan_prefix(prefix, after, limit).await?)
    }

    pub async fn scan_encoded(
        &self,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Key, Bytes)>, TenantError> {
        self.check_key().await?;
        Ok(self.engine.scan_encoded(start, end, after, limit).await?)
    }

    /// L0 SSTs and sorted runs of the database (see [`RecordEngine::layout`]).
    pub fn storage_layout(&self) -> (usize, usize) {
        self.engine.layout()
    }

    /// Flushes and closes the database.
    pub async fn close(&self) -> Result<(), TenantError> {
        Ok(self.engine.close().await?)
    }
}
