//! A care system's tenant root keys (TRKs), one per key epoch.
//!
//! Each TRK is a data key from the [`KeyProvider`], stored wrapped in the care system's
//! bucket at `keys/trk-<epoch>.wrapped` (through the raw, non-encrypting store: the
//! wrapped key is already ciphertext, and it must be readable before any key is).
//! The first writer creates it with `PutMode::Create`; a writer that loses that race
//! reads and uses the winner's key, so every pod of a care system agrees on its TRK.
//!
//! Invariants:
//! - an epoch's TRK is created only for writing ([`EnvelopeKeyring::current_key`]);
//!   reading an object that names a missing epoch is an error, never a new key;
//! - unwrapped keys are held in memory only (zeroized on drop) and only for the
//!   configured TTL; after it, the next use unwraps again through the provider, so a
//!   disabled or revoked KMS key makes the care system fail closed within one TTL, and
//!   re-enabling it recovers without a restart;
//! - loads are serialised, so a TTL expiry under load costs one provider call, not one
//!   per request.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio::time::Instant;

use super::key_provider::{
    EncryptionContext, KeyProvider, KeyProviderError, KeyPurpose, WrappedKey,
};
use super::secret_key::{KeyEpoch, SecretKey};
use crate::care_system::CareSystemName;

/// Folder of the bucket (in the raw store) holding wrapped tenant root keys. Keep the
/// encrypting store's objects under a different prefix.
pub const KEYS_PREFIX: &str = "keys";

/// Where the wrapped TRK of `epoch` lives in the raw store.
pub fn wrapped_key_path(epoch: KeyEpoch) -> Path {
    Path::from(format!("{KEYS_PREFIX}/trk-{epoch}.wrapped"))
}

/// How the keyring behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyringConfig {
    /// The epoch new objects are encrypted under; raise it to rotate the TRK.
    pub current_epoch: KeyEpoch,
    /// How long an unwrapped TRK may be used before the provider is asked again; bounds
    /// how long a disabled KMS key goes unnoticed.
    pub key_ttl: Duration,
}

impl Default for KeyringConfig {
    fn default() -> Self {
        Self {
            current_epoch: KeyEpoch::FIRST,
            key_ttl: Duration::from_secs(5 * 60),
        }
    }
}

/// Why a tenant root key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The key provider refused or failed.
    #[error(transparent)]
    Provider(#[from] KeyProviderError),
    /// An object names an epoch whose wrapped key does not exist.
    #[error(
        "care system {care_system} has no tenant root key for epoch {epoch} (no {path} in the \
         bucket): the object was not written by this care system, or its key was deleted"
    )]
    UnknownEpoch {
        /// The care system.
        care_system: CareSystemName,
        /// The epoch asked for.
        epoch: KeyEpoch,
        /// Where the wrapped key was looked for.
        path: Path,
    },
    /// The wrapped key could not be read from or written to the bucket.
    #[error("cannot access wrapped tenant root key {path}: {source}")]
    Storage {
        /// The wrapped key's path.
        path: Path,
        /// The object store's error.
        source: object_store::Error,
    },
}

impl KeyringError {
    /// Whether the KMS key (or local master key) refuses service: the store is
    /// unavailable (503) until an operator acts.
    pub fn is_key_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Provider(KeyProviderError::KeyUnavailable { .. })
        )
    }

    /// Whether trying again later may succeed without anyone acting.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Provider(e) => e.is_transient(),
            Self::UnknownEpoch { .. } => false,
            Self::Storage { source, .. } => slatedb_common::retry::should_retry(source),
        }
    }
}

struct CachedKey {
    key: SecretKey,
    expires: Instant,
}

/// The tenant root keys of one care system.
pub struct EnvelopeKeyring {
    care_system: CareSystemName,
    context: EncryptionContext,
    provider: Arc<dyn KeyProvider>,
    raw_store: Arc<dyn ObjectStore>,
    config: KeyringConfig,
    cache: Mutex<HashMap<KeyEpoch, CachedKey>>,
    loading: tokio::sync::Mutex<()>,
}

impl fmt::Debug for EnvelopeKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvelopeKeyring")
            .field("care_system", &self.care_system)
            .field("provider", &self.provider)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EnvelopeKeyring {
    /// A keyring for `care_system`, storing wrapped keys in `raw_store` (the bucket
    /// prefix, without encryption) and wrapping them with `provider`.
    pub fn new(
        care_system: CareSystemName,
        provider: Arc<dyn KeyProvider>,
        raw_store: Arc<dyn ObjectStore>,
        config: KeyringConfig,
    ) -> Self {
        Self {
            context: EncryptionContext::new(care_system.clone(), KeyPurpose::TenantRootKey),
            care_system,
            provider,
            raw_store,
            config,
            cache: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// The care system whose keys these are.
    pub fn care_system(&self) -> &CareSystemName {
        &self.care_system
    }

    /// The epoch new objects are written under.
    pub fn current_epoch(&self) -> KeyEpoch {
        self.config.current_epoch
    }

    /// The TRK new objects are encrypted under, created on first use.
    pub async fn current_key(&self) -> Result<(KeyEpoch, SecretKey), KeyringError> {
        let epoch = self.config.current_epoch;
        Ok((epoch, self.key(epoch, true).await?))
    }

    /// The TRK of `epoch`, for reading objects that name it. Never creates one.
    pub async fn key_for_epoch(&self, epoch: KeyEpoch) -> Result<SecretKey, KeyringError> {
        self.key(epoch, false).await
    }

    /// Drops every unwrapped key now (they are zeroized once no operation holds them).
    pub fn forget_keys(&self) {
        self.lock_cache().clear();
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<KeyEpoch, CachedKey>> {
        // The map stays consistent even if a holder panicked: entries are inserted and
        // removed whole.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self, epoch: KeyEpoch) -> Option<SecretKey> {
        let mut cache = self.lock_cache();
        match cache.get(&epoch) {
            Some(entry) if entry.expires > Instant::now() => Some(entry.key.clone()),
            Some(_) => {
                cache.remove(&epoch);
                None
            }
            None => None,
        }
    }

    async fn key(&self, epoch: KeyEpoch, create: bool) -> Result<SecretKey, KeyringError> {
        if let Some(key) = self.cached(epoch) {
            return Ok(key);
        }
        let _loading = self.loading.lock().await;
        if let Some(key) = self.cached(epoch) {
            return Ok(key);
        }
        let key = self.load(epoch, create).await?;
        self.lock_cache().insert(
            epoch,
            CachedKey {
                key: key.clone(),
                expires: Instant::now() + self.config.key_ttl,
            },
        );
        Ok(key)
    }

    async fn load(&self, epoch: KeyEpoch, create: bool) -> Result<SecretKey, KeyringError> {
        let path = wrapped_key_path(epoch);
        if let Some(wrapped) = self.read_wrapped(&path).await? {
            return Ok(self
                .provider
                .decrypt_data_key(&wrapped, &self.context)
                .await?);
        }
        if !create {
            return Err(KeyringError::UnknownEpoch {
                care_system: self.care_system.clone(),
                epoch,
                path,
            });
        }
        let data_key = self.provider.generate_data_key(&self.context).await?;
        let put = self
            .raw_store
            .put_opts(
                &path,
                PutPayload::from(data_key.wrapped.as_bytes().to_vec()),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match put {
            Ok(_) => {
                tracing::info!(
                    care_system = %self.care_system,
                    %epoch,
                    "created tenant root key"
                );
                Ok(data_key.plaintext)
            }
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                // Another pod created it first; its key is the one every object uses.
                let wrapped =
                    self.read_wrapped(&path)
                        .await?
                        .ok_or_else(|| KeyringError::Storage {
                            path: path.clone(),
                            source: object_store::Error::NotFound {
                                path: path.to_string(),
                                source: "wrapped key vanished after a concurrent create".into(),
                            },
                        })?;
                Ok(self
                    .provider
                    .decrypt_data_key(&wrapped, &self.context)
                    .await?)
            }
            Err(source) => Err(KeyringError::Storage { path, source }),
        }
    }

    async fn read_wrapped(&self, path: &Path) -> Result<Option<WrappedKey>, KeyringError> {
        let storage = |source| KeyringError::Storage {
            path: path.clone(),
            source,
        };
        match self.raw_store.get(path).await {
            Ok(result) => {
                let bytes = result.bytes().await.map_err(storage)?;
                Ok(Some(WrappedKey::new(bytes.to_vec())))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(storage(source)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::envelope::key_provider::DataKey;
    use crate::envelope::local_key_provider::LocalKeyProvider;
    use async_trait::async_trait;
    use object_store::memory::InMemory;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A local provider that can be "disabled" like a KMS key, and counts calls.
    #[derive(Debug)]
    pub(crate) struct SwitchableProvider {
        inner: LocalKeyProvider,
        pub(crate) enabled: AtomicBool,
        pub(crate) calls: AtomicUsize,
        _dir: tempfile::TempDir,
    }

    impl SwitchableProvider {
        pub(crate) async fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            Self {
                inner: LocalKeyProvider::open(dir.path()).await.unwrap(),
                enabled: AtomicBool::new(true),
                calls: AtomicUsize::new(0),
                _dir: dir,
            }
        }

        fn check(&self, context: &EncryptionContext) -> Result<(), KeyProviderError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.enabled.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(KeyProviderError::KeyUnavailable {
                    context: context.clone(),
                    reason: "KMS DisabledException: test".to_owned(),
                })
            }
        }
    }

    #[async_trait]
    impl KeyProvider for SwitchableProvider {
        async fn generate_data_key(
            &self,
            context: &EncryptionContext,
        ) -> Result<DataKey, KeyProviderError> {
            self.check(context)?;
            self.inner.generate_data_key(context).await
        }

        async fn decrypt_data_key(
            &self,
            wrapped: &WrappedKey,
            context: &EncryptionContext,
        ) -> Result<SecretKey, KeyProviderError> {
            self.check(context)?;
            self.inner.decrypt_data_key(wrapped, context).await
        }
    }

    fn care_system() -> CareSystemName {
        CareSystemName::parse("nw-london").unwrap()
    }

    fn keyring(
        provider: Arc<SwitchableProvider>,
        raw: Arc<InMemory>,
        config: KeyringConfig,
    ) -> EnvelopeKeyring {
        EnvelopeKeyring::new(care_system(), provider, raw, config)
    }

    #[tokio::test]
    async fn creates_the_current_key_once_and_stores_it_wrapped() {
        let provider = Arc::new(SwitchableProvider::new().await);
        let raw = Arc::new(InMemory::new());
        let ring = keyring(provider.clone(), raw.clone(), KeyringConfig::default());
        let (epoch, key) = ring.current_key().await.unwrap();
        assert_eq!(epoch, KeyEpoch::FIRST);
        let stored = raw
            .get(&wrapped_key_path(epoch))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(!stored.windows(32).any(|w| w == key.expose()));

        // A second pod (a fresh keyring) reads the same key rather than making another.
        let other = keyring(provider, raw, KeyringConfig::default());
        let (_, again) = other.current_key().await.unwrap();
        assert_eq!(again.expose(), key.expose());
    }

    #[tokio::test]
    async fn concurrent_pods_agree_on_one_key() {
        let provider = Arc::new(SwitchableProvider::new().await);
        let raw = Arc::new(InMemory::new());
        let rings: Vec<_> = (0..8)
            .map(|_| {
                Arc::new(keyring(
                    provider.clone(),
                    raw.clone(),
                    KeyringConfig::default(),
                ))
            })
            .collect();
        let keys = futures::future::try_join_all(rings.iter().map(|r| r.current_key()))
            .await
            .unwrap();
        for (_, key) in &keys {
            assert_eq!(key.expose(), keys[0].1.expose());
        }
    }

    #[tokio::test]
    async fn reading_an_unknown_epoch_fails_and_creates_nothing() {
        let provider = Arc::new(SwitchableProvider::new().await);
        let raw = Arc::new(InMemory::new());
        let ring = keyring(provider, raw.clone(), KeyringConfig::default());
        let err = ring.key_for_epoch(KeyEpoch::new(7)).await.unwrap_err();
        assert!(matches!(err, KeyringError::UnknownEpoch { .. }), "{err}");
        assert!(!err.is_transient());
        assert!(raw.head(&wrapped_key_path(KeyEpoch::new(7))).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_key_fails_closed_after_the_ttl_and_recovers() {
        let provider = Arc::new(SwitchableProvider::new().await);
        let raw = Arc::new(InMemory::new());
        let config = KeyringConfig {
            key_ttl: Duration::from_secs(60),
            ..KeyringConfig::default()
        };
        let ring = keyring(provider.clone(), raw, config);
        let (epoch, key) = ring.current_key().await.unwrap();

        provider.enabled.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(30)).await;
        // Within the TTL the cached key still serves.
        assert_eq!(
            ring.key_for_epoch(epoch).await.unwrap().expose(),
            key.expose()
        );

        tokio::time::advance(Duration::from_secs(31)).await;
        let err = ring.key_for_epoch(epoch).await.unwrap_err();
        assert!(err.is_key_unavailable(), "{err}");
        assert!(ring.current_key().await.unwrap_err().is_key_unavailable());

        provider.enabled.store(true, Ordering::SeqCst);
        assert_eq!(
            ring.key_for_epoch(epoch).await.unwrap().expose(),
            key.expose()
        );
    }

    #[tokio::test]
    async fn cached_keys_spare_the_provider() {
        let provider = Arc::new(SwitchableProvider::new().await);
        let raw = Arc::new(InMemory::new());
        let ring = keyring(provider.clone(), raw, KeyringConfig::default());
        ring.current_key().await.unwrap();
        let calls = provider.calls.load(Ordering::SeqCst);
        for _ in 0..100 {
            ring.key_for_epoch(KeyEpoch::FIRST).await.unwrap();
        }
        assert_eq!(provider.calls.load(Ordering::SeqCst), calls);
        ring.forget_keys();
        ring.key_for_epoch(KeyEpoch::FIRST).await.unwrap();
        assert_eq!(provider.calls.load(Ordering::SeqCst), calls + 1);
    }

    #[tokio::test]
    async fn rotation_keeps_old_epochs_readable() {
        let provider = Arc::new(SwitchableProvider::new().await);
        let raw = Arc::new(InMemory::new());
        let first = keyring(provider.clone(), raw.clone(), KeyringConfig::default());
        let (_, old) = first.current_key().await.unwrap();
        let rotated = keyring(
            provider,
            raw,
            KeyringConfig {
                current_epoch: KeyEpoch::new(2),
                ..KeyringConfig::default()
            },
        );
        let (epoch, new) = rotated.current_key().await.unwrap();
        assert_eq!(epoch, KeyEpoch::new(2));
        assert_ne!(new.expose(), old.expose());
        assert_eq!(
            rotated
                .key_for_epoch(KeyEpoch::FIRST)
                .await
                .unwrap()
                .expose(),
            old.expose()
        );
    }
}
