//! Where a care system's bytes live: S3, a local directory (the embedded default), or memory.
//!
//! This module builds the *raw* object store; the caller wraps it in the encrypting store before
//! SlateDB sees it. Everything of one care system lives under one prefix of its bucket.
//!
//! Invariants:
//! - S3 conditional writes use `If-None-Match`/`If-Match` (SlateDB's manifest and fencing depend
//!   on them), never a lock table;
//! - the local filesystem store supports `PutMode::Update` (SlateDB's garbage collector needs it,
//!   `LocalFileSystem` refuses it) by comparing e-tags under a process-wide lock; this is sound
//!   because a local directory is only ever written by the one `shcr` process that owns it.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, UpdateVersion,
};
use tokio::sync::Mutex;

/// An access key pair (for S3-compatible servers outside AWS, and tests).
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// The object storage of one care system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectStorage {
    S3 {
        bucket: String,
        /// Key prefix under which this care system's objects live (may be empty).
        prefix: String,
        region: String,
        /// A non-AWS endpoint (an S3-compatible server); `None` for AWS.
        endpoint: Option<String>,
        /// Explicit credentials; `None` takes them from the standard AWS environment.
        credentials: Option<StaticCredentials>,
    },
    /// A directory on local disk (the embedded default of `shcr dev`).
    LocalDir(PathBuf),
    /// Process memory (unit tests).
    Memory,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open object storage {target}: {source}")]
pub struct StorageError {
    target: String,
    #[source]
    source: object_store::Error,
}

impl ObjectStorage {
    /// Opens the raw (not yet encrypting) object store. S3 credentials come from the standard
    /// AWS environment (`AWS_ACCESS_KEY_ID`, web identity, instance profile …).
    pub fn open(&self) -> Result<Arc<dyn ObjectStore>, StorageError> {
        let err = |source| StorageError {
            target: self.to_string(),
            source,
        };
        Ok(match self {
            Self::S3 {
                bucket,
                prefix,
                region,
                endpoint,
                credentials,
            } => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_conditional_put(S3ConditionalPut::ETagMatch);
                if let Some(c) = credentials {
                    builder = builder
                        .with_access_key_id(&c.access_key_id)
                        .with_secret_access_key(&c.secret_access_key);
                }
                if let Some(endpoint) = endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                let s3: Arc<dyn ObjectStore> = Arc::new(builder.build().map_err(err)?);
                if prefix.is_empty() {
                    s3
                } else {
                    Arc::new(PrefixStore::new(s3, prefix.as_str()))
                }
            }
            Self::LocalDir(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    err(object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: Box::new(e),
                    })
                })?;
                let local = LocalFileSystem::new_with_prefix(dir).map_err(err)?;
                Arc::new(LocalWithUpdate {
                    inner: local,
                    update_lock: Mutex::new(()),
                })
            }
            Self::Memory => Arc::new(InMemory::new()),
        })
    }
}

impl fmt::Display for ObjectStorage {
    /// Names the location without credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::S3 {
                bucket,
                prefix,
                endpoint,
                ..
            } => {
                write!(f, "s3://{bucket}/{prefix}")?;
                if let Some(e) = endpoint {
                    write!(f, " via {e}")?;
                }
                Ok(())
            }
            Self::LocalDir(dir) => write!(f, "file://{}", dir.display()),
            Self::Memory => write!(f, "memory"),
        }
    }
}

/// `LocalFileSystem` with `PutMode::Update` (see the module comment).
#[derive(Debug)]
struct LocalWithUpdate {
    inner: LocalFileSystem,
    update_lock: Mutex<()>,
}

impl fmt::Display for LocalWithUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

#[async_trait]
impl ObjectStore for LocalWithUpdate {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let PutMode::Update(UpdateVersion { e_tag, .. }) = &opts.mode else {
            return self.inner.put_opts(location, payload, opts).await;
        };
        let expected = e_tag.clone();
        let _guard = self.update_lock.lock().await;
        let current = match self.inner.head(location).await {
            Ok(meta) => meta.e_tag,
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        if current.is_none() || current != expected {
            return Err(object_store::Error::Precondition {
                path: location.to_string(),
                source: format!("e-tag {current:?} does not match expected {expected:?}").into(),
            });
        }
        let opts = PutOptions {
            mode: PutMode::Overwrite,
            ..opts
        };
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
