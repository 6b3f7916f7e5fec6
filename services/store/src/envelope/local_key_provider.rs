//! The local key provider for `shcr dev`: a master key in a file in the data directory.
//!
//! Stands in for KMS where there is no cloud. The master key file holds 32 random bytes;
//! data keys are wrapped with AES-256-GCM under it, with the encryption context as AAD.
//!
//! Invariants:
//! - the master key file is created complete or not at all (written to a private
//!   temporary file, then hard-linked into place, which fails if another process won),
//!   with mode 0600 inside a directory created 0700;
//! - the provider refuses to start when the file is readable or writable by group or
//!   others, naming the file and the fix, rather than run with an exposed key;
//! - losing the file makes every wrapped key, and so every object, unreadable: it is
//!   never regenerated over an existing file.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

use super::key_provider::{DataKey, EncryptionContext, KeyProvider, KeyProviderError, WrappedKey};
use super::secret_key::{KEY_LEN, SecretKey};

/// File name of the master key inside the data directory.
pub const MASTER_KEY_FILE_NAME: &str = "master.key";

/// Version byte at the start of every wrapped key this provider writes.
const WRAP_VERSION: u8 = 1;
const WRAP_DOMAIN: &[u8] = b"shcr-local-wrap-v1";
const WRAPPED_LEN: usize = 1 + NONCE_LEN + KEY_LEN + 16;

/// Why the master key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyFileError {
    /// Group or others may read or write the key.
    #[error(
        "master key file {} is accessible by group or others (mode {mode:03o}); run \
         `chmod 600 {}` and restart",
        path.display(),
        path.display()
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold exactly one key.
    #[error(
        "master key file {} holds {len} bytes, not {KEY_LEN}: restore it from backup (a new key \
         cannot read data written under the old one)",
        path.display()
    )]
    WrongLength {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The path exists but is not a regular file.
    #[error("master key path {} is not a regular file", path.display())]
    NotAFile {
        /// The key path.
        path: PathBuf,
    },
    /// The file or its directory could not be read or created.
    #[error("cannot use master key file {}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O failure.
        source: io::Error,
    },
    /// Local cryptography failed (a broken random source).
    #[error("could not generate or load a master key: local cryptography failed")]
    Crypto,
}

/// Wraps data keys under a master key kept in a 0600 file.
pub struct LocalKeyProvider {
    key_file: PathBuf,
    master: LessSafeKey,
}

impl std::fmt::Debug for LocalKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyProvider")
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl LocalKeyProvider {
    /// Opens the master key in `data_dir`, creating the directory (0700) and the key
    /// (0600) if missing. File I/O runs on the blocking pool.
    pub async fn open(data_dir: impl Into<PathBuf>) -> Result<Self, MasterKeyFileError> {
        let data_dir = data_dir.into();
        let join = tokio::task::spawn_blocking(move || Self::open_blocking(&data_dir)).await;
        join.map_err(|e| MasterKeyFileError::Io {
            path: PathBuf::from(MASTER_KEY_FILE_NAME),
            source: io::Error::other(e),
        })?
    }

    /// [`open`](Self::open) for callers outside an async runtime.
    pub fn open_blocking(data_dir: &Path) -> Result<Self, MasterKeyFileError> {
        let key_file = data_dir.join(MASTER_KEY_FILE_NAME);
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| MasterKeyFileError::Io { path, source }
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(io_err(data_dir))?;

        let file = match File::open(&key_file) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_key_file(data_dir, &key_file)?;
                File::open(&key_file).map_err(io_err(&key_file))?
            }
            Err(e) => return Err(io_err(&key_file)(e)),
        };
        let master = read_key_file(file, &key_file)?;
        let key = UnboundKey::new(&AES_256_GCM, master.as_ref())
            .map_err(|_| MasterKeyFileError::Crypto)?;
        Ok(Self {
            key_file,
            master: LessSafeKey::new(key),
        })
    }

    /// Where the master key lives.
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    fn aad(context: &EncryptionContext) -> Vec<u8> {
        let mut aad = WRAP_DOMAIN.to_vec();
        aad.extend_from_slice(&context.to_aad());
        aad
    }

    fn wrap(
        &self,
        key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KeyProviderError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| KeyProviderError::Crypto("drawing a nonce"))?;
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.push(WRAP_VERSION);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(key.expose());
        let tag = self
            .master
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(context)),
                &mut out[start..],
            )
            .map_err(|_| KeyProviderError::Crypto("wrapping a data key"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(WrappedKey::new(out))
    }
}

/// Writes a fresh key to a private temporary file, then links it into place so the key
/// file appears complete or not at all. Losing the race to another process is fine.
fn create_key_file(dir: &Path, key_file: &Path) -> Result<(), MasterKeyFileError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    aws_lc_rs::rand::fill(key.as_mut()).map_err(|_| MasterKeyFileError::Crypto)?;
    let mut suffix = [0u8; 8];
    aws_lc_rs::rand::fill(&mut suffix).map_err(|_| MasterKeyFileError::Crypto)?;
    let tmp = dir.join(format!(
        ".{MASTER_KEY_FILE_NAME}.{:016x}.tmp",
        u64::from_be_bytes(suffix)
    ));
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| MasterKeyFileError::Io { path, source }
    };
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(key.as_ref())?;
            file.sync_all()
        });
    let linked = written.and_then(|()| match fs::hard_link(&tmp, key_file) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    });
    // The temporary name is only ever a second link to the key (or a partial write);
    // removing it cannot lose the key file.
    let removed = fs::remove_file(&tmp);
    linked.map_err(io_err(key_file))?;
    removed.map_err(io_err(&tmp))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    tracing::info!(key_file = %key_file.display(), "created local master key");
    Ok(())
}

fn read_key_file(
    mut file: File,
    path: &Path,
) -> Result<Zeroizing<[u8; KEY_LEN]>, MasterKeyFileError> {
    let meta = file.metadata().map_err(|source| MasterKeyFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(MasterKeyFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(MasterKeyFileError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() != KEY_LEN as u64 {
        return Err(MasterKeyFileError::WrongLength {
            path: path.to_owned(),
            len: meta.len(),
        });
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    file.read_exact(key.as_mut())
        .map_err(|source| MasterKeyFileError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(key)
}

#[async_trait]
impl KeyProvider for LocalKeyProvider {
    async fn generate_data_key(
        &self,
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyProviderError> {
        let plaintext =
            SecretKey::generate().map_err(|_| KeyProviderError::Crypto("generating a data key"))?;
        let wrapped = self.wrap(&plaintext, context)?;
        Ok(DataKey { plaintext, wrapped })
    }

    async fn decrypt_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &EncryptionContext,
    ) -> Result<SecretKey, KeyProviderError> {
        let rejected = |reason: &str| KeyProviderError::WrappedKeyRejected {
            context: context.clone(),
            reason: reason.to_owned(),
        };
        let bytes = wrapped.as_bytes();
        if bytes.len() != WRAPPED_LEN {
            return Err(rejected("wrong length for a locally wrapped key"));
        }
        if bytes[0] != WRAP_VERSION {
            return Err(rejected("unknown local wrapping version"));
        }
        let (nonce, sealed) = bytes[1..].split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| rejected("malformed nonce"))?;
        let mut buffer = Zeroizing::new(sealed.to_vec());
        let key = self
            .master
            .open_in_place(nonce, Aad::from(Self::aad(context)), buffer.as_mut_slice())
            .map_err(|_| rejected("authentication failed"))?;
        SecretKey::from_slice(key).ok_or_else(|| rejected("unwrapped key has the wrong length"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::care_system::CareSystemName;
    use crate::envelope::key_provider::KeyPurpose;

    fn context(name: &str) -> EncryptionContext {
        EncryptionContext::new(
            CareSystemName::parse(name).unwrap(),
            KeyPurpose::TenantRootKey,
        )
    }

    #[tokio::test]
    async fn creates_a_private_key_file_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let provider = LocalKeyProvider::open(&data_dir).await.unwrap();
        let meta = fs::metadata(provider.key_file()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        assert_eq!(
            fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let data_key = provider.generate_data_key(&context("a")).await.unwrap();
        let unwrapped = provider
            .decrypt_data_key(&data_key.wrapped, &context("a"))
            .await
            .unwrap();
        assert_eq!(unwrapped.expose(), data_key.plaintext.expose());
        assert!(
            !data_key
                .wrapped
                .as_bytes()
                .windows(KEY_LEN)
                .any(|w| w == data_key.plaintext.expose())
        );

        // Reopening reads the same master key.
        let reopened = LocalKeyProvider::open(&data_dir).await.unwrap();
        let again = reopened
            .decrypt_data_key(&data_key.wrapped, &context("a"))
            .await
            .unwrap();
        assert_eq!(again.expose(), data_key.plaintext.expose());
    }

    #[tokio::test]
    async fn refuses_a_group_or_world_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let provider = LocalKeyProvider::open(dir.path()).await.unwrap();
        let key_file = provider.key_file().to_owned();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&key_file, fs::Permissions::from_mode(mode)).unwrap();
            let err = LocalKeyProvider::open(dir.path()).await.unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, MasterKeyFileError::TooOpen { .. }),
                "{message}"
            );
            assert!(
                message.contains(&key_file.display().to_string()),
                "{message}"
            );
            assert!(message.contains("chmod 600"), "{message}");
        }
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
        LocalKeyProvider::open(dir.path()).await.unwrap();
    }

    #[tokio::test]
    async fn refuses_a_damaged_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join(MASTER_KEY_FILE_NAME);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .unwrap()
            .write_all(b"short")
            .unwrap();
        let err = LocalKeyProvider::open(dir.path()).await.unwrap_err();
        assert!(
            matches!(err, MasterKeyFileError::WrongLength { len: 5, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn wrapped_keys_are_bound_to_their_context_and_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let provider = LocalKeyProvider::open(dir.path()).await.unwrap();
        let data_key = provider.generate_data_key(&context("a")).await.unwrap();

        let err = provider
            .decrypt_data_key(&data_key.wrapped, &context("b"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, KeyProviderError::WrappedKeyRejected { .. }),
            "{err}"
        );

        let mut tampered = data_key.wrapped.as_bytes().to_vec();
        tampered[20] ^= 1;
        let err = provider
            .decrypt_data_key(&WrappedKey::new(tampered), &context("a"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, KeyProviderError::WrappedKeyRejected { .. }),
            "{err}"
        );

        let other_dir = tempfile::tempdir().unwrap();
        let other = LocalKeyProvider::open(other_dir.path()).await.unwrap();
        let err = other
            .decrypt_data_key(&data_key.wrapped, &context("a"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, KeyProviderError::WrappedKeyRejected { .. }),
            "{err}"
        );
    }
}
