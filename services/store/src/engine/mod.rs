//! The record engine: one SlateDB database per care system, behind a small typed API.
//!
//! The FHIR layer builds on this without knowing SlateDB: atomic multi-key commits (a resource
//! version, its current pointer, its index entries and its audit event in one batch), point
//! reads, ordered scans by key prefix, and health.
//!
//! Invariants:
//! - [`RecordEngine::commit`] returns only once the batch is durable in the object store (the
//!   WAL object is written). Concurrent commits share WAL flushes — SlateDB batches every write
//!   that arrives within one flush interval into one WAL object — which is the group commit;
//! - a batch is applied entirely or not at all;
//! - one writer per database: opening a second writer fences the first (SlateDB bumps the writer
//!   epoch in the manifest); the fenced engine reports [`EngineHealth::Fenced`] and refuses
//!   every write from then on — it never reopens by itself, which would fence the new writer;
//! - the object store handed in is the encrypting one: SlateDB's own disk cache is never
//!   enabled (it would sit above the encryption and hold plaintext); only the in-memory block,
//!   index and filter cache is used.

pub mod keyspace;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::ObjectStore;
use slatedb::{CloseReason, Db, ErrorKind, WriteBatch};
use tokio::sync::watch;

pub use keyspace::{Element, Family, Key, KeyDecodeError, prefix_end};

/// Tuning of the engine. Defaults favour latency: a short WAL flush interval keeps commit
/// latency low while still batching concurrent writers into one object.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How long SlateDB gathers writes before flushing a WAL object (the group-commit window).
    pub flush_interval: Duration,
    /// Retries of a failed object-store call before the error surfaces. Bounded: SlateDB's
    /// default retries forever, which turns an outage into a hang.
    pub object_store_max_retries: u32,
    /// Size of an in-memory table before it is flushed to an L0 SST.
    pub l0_sst_size_bytes: usize,
    /// zstd-compress SST blocks (before encryption; ciphertext does not compress).
    pub compress: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(5),
            object_store_max_retries: 5,
            l0_sst_size_bytes: 16 * 1024 * 1024,
            compress: true,
        }
    }
}

/// Whether the engine can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineHealth {
    /// Open and the writer.
    Open,
    /// Another writer opened the same database; this one must not write again.
    Fenced,
    /// Closed (shut down, or failed in the background).
    Closed,
}

/// What a caller of the engine can get wrong or run into.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "this store is no longer the writer of its database: another store instance opened it \
         (writes refused to keep one writer)"
    )]
    Fenced,
    #[error("the record database is closed")]
    Closed,
    #[error("object storage is unavailable: {0}")]
    Unavailable(String),
    #[error("stored data failed its integrity check or could not be read: {0}")]
    Data(String),
    #[error("the care system's encryption key is unavailable: {0}")]
    KeyUnavailable(String),
    #[error("record engine error: {0}")]
    Internal(String),
    #[error("malformed key in the database: {0}")]
    Key(#[from] KeyDecodeError),
}

impl From<slatedb::Error> for EngineError {
    fn from(e: slatedb::Error) -> Self {
        // SlateDB reports our wrapper's failures as generic storage errors; the typed cause
        // is in the source chain.
        if let Some(envelope) = crate::envelope::EnvelopeError::find(&e) {
            if envelope.is_integrity_failure() {
                return Self::Data(envelope.to_string());
            }
            if envelope.is_key_unavailable() {
                return Self::KeyUnavailable(envelope.to_string());
            }
        }
        match e.kind() {
            ErrorKind::Closed(CloseReason::Fenced) => Self::Fenced,
            ErrorKind::Closed(_) => Self::Closed,
            ErrorKind::Unavailable => Self::Unavailable(e.to_string()),
            ErrorKind::Data => Self::Data(e.to_string()),
            _ => Self::Internal(e.to_string()),
        }
    }
}

/// One atomic set of changes.
#[derive(Default)]
pub struct Commit {
    batch: WriteBatch,
    len: usize,
}

impl Commit {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, key: &Key, value: impl Into<Bytes>) -> &mut Self {
        self.batch.put(key.encode(), value.into());
        self.len += 1;
        self
    }

    pub fn delete(&mut self, key: &Key) -> &mut Self {
        self.batch.delete(key.encode());
        self.len += 1;
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The record database of one care system.
pub struct RecordEngine {
    db: Db,
    health: watch::Receiver<slatedb::DbStatus>,
}

impl RecordEngine {
    /// Opens (or creates) the database at `path` in `store`, becoming its only writer.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        path: &str,
        config: &EngineConfig,
    ) -> Result<Self, EngineError> {
        let settings = slatedb::config::Settings {
            flush_interval: Some(config.flush_interval),
            object_store_max_retries: Some(config.object_store_max_retries),
            l0_sst_size_bytes: config.l0_sst_size_bytes,
            compression_codec: config
                .compress
                .then_some(slatedb::config::CompressionCodec::Zstd),
            ..Default::default()
        };
        let db = Db::builder(path, store)
            .with_settings(settings)
            .build()
            .await?;
        let health = db.subscribe();
        Ok(Self { db, health })
    }

    pub fn health(&self) -> EngineHealth {
        match self.health.borrow().close_reason {
            None => EngineHealth::Open,
            Some(CloseReason::Fenced) => EngineHealth::Fenced,
            Some(_) => EngineHealth::Closed,
        }
    }

    /// Applies `commit` atomically and returns once it is durable in the object store.
    pub async fn commit(&self, commit: Commit) -> Result<(), EngineError> {
        if commit.is_empty() {
            return Ok(());
        }
        let handle = self.db.write(commit.batch).await?;
        handle.await_durable().await?;
        Ok(())
    }

    pub async fn get(&self, key: &Key) -> Result<Option<Bytes>, EngineError> {
        Ok(self.db.get(key.encode()).await?)
    }

    /// Up to `limit` entries whose keys start with `prefix`, in key order, starting after
    /// `after` (an encoded key from a previous page) when given.
    pub async fn scan_prefix(
        &self,
        prefix: &Key,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Key, Bytes)>, EngineError> {
        let start = prefix.encode();
        let end = prefix_end(&start);
        self.scan_encoded(start, end, after, limit).await
    }

    /// Up to `limit` entries with `start <= key < end` (encoded keys), in key order.
    pub async fn scan_encoded(
        &self,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Key, Bytes)>, EngineError> {
        use std::ops::Bound;
        let lower = match after {
            Some(a) if a >= start.as_slice() => Bound::Excluded(a.to_vec()),
            _ => Bound::Included(start),
        };
        let upper = match end {
            Some(e) => Bound::Excluded(e),
            None => Bound::Unbounded,
        };
        // Scans keep the data blocks they fetch in the block cache (SlateDB's default does
        // not): search and `$everything` are index-prefix scans that repeat, and without the
        // cache every one refetched and decrypted its blocks from the bucket (~90 ms per
        // NHS-number search on moto). One block is fetched at a time: prefix scans are short.
        let options = slatedb::config::ScanOptions {
            cache_blocks: true,
            ..Default::default()
        };
        let mut iter = self.db.scan_with_options((lower, upper), &options).await?;
        let mut out = Vec::new();
        while out.len() < limit {
            match iter.next().await? {
                Some(kv) => out.push((Key::decode(&kv.key)?, kv.value)),
                None => break,
            }
        }
        Ok(out)
    }

    /// How many L0 SSTs and compacted sorted runs the database has now: every scan merges one
    /// iterator per L0 SST and per run, so this is what a scan costs (for benchmarks and
    /// diagnostics).
    pub fn layout(&self) -> (usize, usize) {
        let manifest = self.db.manifest();
        (manifest.l0().len(), manifest.compacted().len())
    }

    /// Flushes and closes the database (on shutdown).
    pub async fn close(&self) -> Result<(), EngineError> {
        Ok(self.db.close().await?)
    }
}
