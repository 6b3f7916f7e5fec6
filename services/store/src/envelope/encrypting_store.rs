//! An `ObjectStore` that encrypts every object it writes and authenticates every byte
//! it reads.
//!
//! [`EncryptingObjectStore`] sits between SlateDB (and anything else the store writes)
//! and the real store, so the bucket holds only ciphertext in the [`format`](super::format)
//! of this crate, each object bound to its path and care system. Callers see plaintext
//! objects: sizes from `head`, `list` and `get` are plaintext sizes, ranges are plaintext
//! ranges, and every range read returns exactly the bytes asked for.
//!
//! Invariants:
//! - nothing unauthenticated is returned: a full read decrypts every segment; a range
//!   read decrypts the covering segments and, the first time a given version (path,
//!   e_tag/version, size) is read, also authenticates its last segment, so a cut-off
//!   tail is noticed even when only early segments are read;
//! - integrity failures, ranges past the end, and refused keys are returned as
//!   `Generic` errors wrapping [`slatedb_common::retry::NonRetryable`], so SlateDB fails
//!   instead of retrying forever; [`EnvelopeError::find`] recovers the typed error;
//! - error variants SlateDB relies on (`NotFound`, `AlreadyExists`, `Precondition`,
//!   `NotModified`, `NotImplemented`) pass through unchanged, as do put modes;
//! - attributes are stored in plaintext by the backing store, so only SlateDB's random
//!   `slatedbputid` passes through; any other attribute or tag is `NotImplemented`;
//! - copies and renames decrypt and re-encrypt for the new path (a server-side copy
//!   would not decrypt at its new path);
//! - multipart uploads encrypt as they stream and send parts of exactly
//!   [`MULTIPART_PART_SIZE`] (S3's minimum) except the last;
//! - wrapped key files (`keys/`, see [`keyring`](super::keyring)) are not objects of
//!   this store: give it a prefix of the bucket that excludes them.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, CopyMode, CopyOptions, GetOptions, GetRange, GetResult,
    GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use slatedb_common::retry::NonRetryable;

use super::format::{
    self, FormatError, HEADER_LEN, Header, IntegrityError, ObjectBinding, ObjectEncryptor,
    RangeNotSatisfiable, SEGMENT_SIZE, SegmentSpan,
};
use super::keyring::{EnvelopeKeyring, KeyringError};
use super::secret_key::SecretKey;
use crate::care_system::CareSystemName;

/// The only attribute allowed through: SlateDB's random put id (not PHI).
pub const SLATEDB_PUT_ID_ATTRIBUTE: &str = "slatedbputid";
/// Size of every multipart part but the last: S3's minimum.
pub const MULTIPART_PART_SIZE: usize = 5 * 1024 * 1024;
/// Objects at least this large are encrypted or decrypted on the blocking pool.
const BLOCKING_THRESHOLD: usize = 256 * 1024;
/// How many object versions' headers to remember as authenticated.
const VERIFIED_CAPACITY: usize = 16 * 1024;
const STORE: &str = "EncryptingObjectStore";

/// What went wrong in the encrypting layer, inside an `object_store::Error::Generic`.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The stored object is not the genuine ciphertext of this path.
    #[error("object {path} failed its integrity check: {source}")]
    Integrity {
        /// The object.
        path: Path,
        /// What failed.
        source: IntegrityError,
    },
    /// A range read starts at or past the end of the object.
    #[error("cannot read object {path}: {source}")]
    RangeNotSatisfiable {
        /// The object.
        path: Path,
        /// The range and the object's plaintext length.
        source: RangeNotSatisfiable,
    },
    /// The object's tenant root key is unavailable.
    #[error("cannot get the key for object {path}: {source}")]
    Key {
        /// The object.
        path: Path,
        /// Why the keyring failed.
        source: KeyringError,
    },
    /// Encryption failed (object too large, or local cryptography failed).
    #[error("cannot encrypt object {path}: {source}")]
    Encryption {
        /// The object.
        path: Path,
        /// Why.
        source: FormatError,
    },
    /// A range read asked for no bytes (start at or after end).
    #[error("cannot read object {path}: byte range {}..{} is empty", range.start, range.end)]
    EmptyRange {
        /// The object.
        path: Path,
        /// The range asked for.
        range: Range<u64>,
    },
    /// The object was replaced between two reads of one request.
    #[error(
        "object {path} changed while it was being read; reading again will see the new version"
    )]
    ChangedDuringRead {
        /// The object.
        path: Path,
    },
    /// A multipart upload was used after it completed or failed.
    #[error("multipart upload of {path} was used after it completed or failed")]
    UploadFinished {
        /// The object.
        path: Path,
    },
}

impl EnvelopeError {
    /// Finds an envelope error in `err` or its sources (looking inside `io::Error`s too,
    /// as SlateDB's writers wrap object store errors in them).
    pub fn find<'a>(mut err: &'a (dyn StdError + 'static)) -> Option<&'a Self> {
        loop {
            if let Some(found) = err.downcast_ref::<Self>() {
                return Some(found);
            }
            err = match err.downcast_ref::<std::io::Error>() {
                Some(io) => io.get_ref()?,
                None => err.source()?,
            };
        }
    }

    /// Whether stored data failed authentication (tampered, truncated, swapped, or
    /// written under an unknown key epoch).
    pub fn is_integrity_failure(&self) -> bool {
        match self {
            // SlateDB reads only ranges it knows exist, so a range past the end means the
            // object was cut short or replaced.
            Self::Integrity { .. } | Self::RangeNotSatisfiable { .. } => true,
            Self::Key { source, .. } => matches!(
                source,
                KeyringError::UnknownEpoch { .. }
                    | KeyringError::Provider(
                        super::key_provider::KeyProviderError::WrappedKeyRejected { .. }
                    )
            ),
            _ => false,
        }
    }

    /// Whether the care system's key refuses service (the store should answer 503).
    pub fn is_key_unavailable(&self) -> bool {
        matches!(self, Self::Key { source, .. } if source.is_key_unavailable())
    }

    /// Whether retrying the operation may succeed without anyone acting.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Key { source, .. } => source.is_transient(),
            Self::ChangedDuringRead { .. } => true,
            _ => false,
        }
    }
}

impl From<EnvelopeError> for object_store::Error {
    fn from(err: EnvelopeError) -> Self {
        let source: Box<dyn StdError + Send + Sync> = if err.is_transient() {
            Box::new(err)
        } else {
            Box::new(NonRetryable(Box::new(err)))
        };
        object_store::Error::Generic {
            store: STORE,
            source,
        }
    }
}

fn integrity(path: &Path, source: IntegrityError) -> object_store::Error {
    EnvelopeError::Integrity {
        path: path.clone(),
        source,
    }
    .into()
}

fn format_error(path: &Path, err: FormatError) -> object_store::Error {
    match err {
        FormatError::Integrity(source) => integrity(path, source),
        other => EnvelopeError::Encryption {
            path: path.clone(),
            source: other,
        }
        .into(),
    }
}

fn key_error(path: &Path, source: KeyringError) -> object_store::Error {
    EnvelopeError::Key {
        path: path.clone(),
        source,
    }
    .into()
}

fn range_error(path: &Path, source: RangeNotSatisfiable) -> object_store::Error {
    EnvelopeError::RangeNotSatisfiable {
        path: path.clone(),
        source,
    }
    .into()
}

/// Refuses attributes and tags other than SlateDB's put id: the backing store keeps
/// them in plaintext. SlateDB retries without its put id on `NotImplemented`.
fn check_metadata(
    attributes: &Attributes,
    tags: &object_store::TagSet,
) -> object_store::Result<()> {
    let refuse = |what: String| object_store::Error::NotImplemented {
        operation: format!(
            "{what} (stored in plaintext, so only {SLATEDB_PUT_ID_ATTRIBUTE} is passed through)"
        ),
        implementer: STORE.to_owned(),
    };
    if !tags.is_empty() {
        return Err(refuse("object tags".to_owned()));
    }
    for (key, _) in attributes {
        match key {
            Attribute::Metadata(name) if name == SLATEDB_PUT_ID_ATTRIBUTE => {}
            other => return Err(refuse(format!("attribute {other:?}"))),
        }
    }
    Ok(())
}

/// The attributes of a stored object that may be shown to callers.
fn visible_attributes(attributes: &Attributes) -> Attributes {
    attributes
        .iter()
        .filter(
            |(key, _)| matches!(key, Attribute::Metadata(name) if name == SLATEDB_PUT_ID_ATTRIBUTE),
        )
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// The metadata of a stored object as callers see it: plaintext size.
fn plaintext_meta(mut meta: ObjectMeta) -> object_store::Result<ObjectMeta> {
    meta.size = format::plaintext_len(meta.size).map_err(|e| integrity(&meta.location, e))?;
    Ok(meta)
}

/// Identifies one stored version of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VersionTag {
    e_tag: Option<String>,
    version: Option<String>,
    size: u64,
}

impl VersionTag {
    /// `None` when the store names no version, so nothing can be pinned or remembered.
    fn of(meta: &ObjectMeta) -> Option<Self> {
        (meta.e_tag.is_some() || meta.version.is_some()).then(|| Self {
            e_tag: meta.e_tag.clone(),
            version: meta.version.clone(),
            size: meta.size,
        })
    }

    /// Options that read exactly this version, or fail.
    fn pin(&self) -> GetOptions {
        GetOptions {
            if_match: self.e_tag.clone(),
            version: self.version.clone(),
            ..GetOptions::default()
        }
    }
}

/// Object versions whose header and last segment have been authenticated, so later
/// range reads need only their covering segments. One entry per path (its latest
/// version seen), evicted first-in first-out. Holds headers only (public bytes).
#[derive(Default)]
struct VerifiedVersions {
    entries: HashMap<Path, (VersionTag, Header)>,
    order: std::collections::VecDeque<Path>,
}

impl VerifiedVersions {
    fn get(&self, path: &Path, tag: &VersionTag) -> Option<Header> {
        self.entries
            .get(path)
            .filter(|(known, _)| known == tag)
            .map(|(_, header)| header.clone())
    }

    fn insert(&mut self, path: Path, tag: VersionTag, header: Header) {
        if self.entries.insert(path.clone(), (tag, header)).is_none() {
            self.order.push_back(path);
            while self.entries.len() > VERIFIED_CAPACITY {
                match self.order.pop_front() {
                    Some(old) => {
                        self.entries.remove(&old);
                    }
                    None => break,
                }
            }
        }
    }

    fn forget(&mut self, path: &Path) {
        if self.entries.remove(path).is_some() {
            self.order.retain(|p| p != path);
        }
    }
}

/// Encrypts everything written to `S`; see the module documentation.
pub struct EncryptingObjectStore<S: ObjectStore> {
    inner: Arc<S>,
    keyring: Arc<EnvelopeKeyring>,
    verified: Arc<Mutex<VerifiedVersions>>,
}

impl<S: ObjectStore> fmt::Debug for EncryptingObjectStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptingObjectStore")
            .field("inner", &self.inner)
            .field("keyring", &self.keyring)
            .finish_non_exhaustive()
    }
}

impl<S: ObjectStore> fmt::Display for EncryptingObjectStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE}({}, {})", self.keyring.care_system(), self.inner)
    }
}

/// A plaintext range request before the object's length is known.
enum PlainRange {
    Bounded(Range<u64>),
    Offset(u64),
}

impl<S: ObjectStore> EncryptingObjectStore<S> {
    /// Wraps `inner`, encrypting under `keyring`'s care system and keys.
    pub fn new(inner: S, keyring: Arc<EnvelopeKeyring>) -> Self {
        Self::from_arc(Arc::new(inner), keyring)
    }

    /// Wraps a shared `inner`.
    pub fn from_arc(inner: Arc<S>, keyring: Arc<EnvelopeKeyring>) -> Self {
        Self {
            inner,
            keyring,
            verified: Arc::new(Mutex::new(VerifiedVersions::default())),
        }
    }

    /// The store holding the ciphertext.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// The keyring objects are encrypted with.
    pub fn keyring(&self) -> &Arc<EnvelopeKeyring> {
        &self.keyring
    }

    fn care_system(&self) -> &CareSystemName {
        self.keyring.care_system()
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, VerifiedVersions> {
        // Entries are inserted and removed whole; a panic elsewhere cannot leave one
        // half-written.
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn key_for(&self, path: &Path, header: &Header) -> object_store::Result<SecretKey> {
        self.keyring
            .key_for_epoch(header.epoch())
            .await
            .map_err(|e| key_error(path, e))
    }

    /// Encrypts `payload` for `location` under the current epoch.
    async fn encrypt(
        &self,
        location: &Path,
        payload: PutPayload,
    ) -> object_store::Result<PutPayload> {
        let (epoch, key) = self
            .keyring
            .current_key()
            .await
            .map_err(|e| key_error(location, e))?;
        let care_system = self.care_system().clone();
        let path = location.clone();
        run_cpu(payload.content_length(), move || {
            let binding = ObjectBinding::new(&care_system, path.as_ref());
            let len = payload.content_length() as u64;
            let capacity = format::ciphertext_len(len)
                .and_then(|c| usize::try_from(c).ok())
                .ok_or_else(|| format_error(&path, FormatError::TooLarge(len)))?;
            let mut out = Vec::with_capacity(capacity);
            let mut encryptor = ObjectEncryptor::start(&key, epoch, &binding, &mut out)
                .map_err(|e| format_error(&path, e))?;
            for chunk in payload.iter() {
                encryptor
                    .push(chunk, &mut out)
                    .map_err(|e| format_error(&path, e))?;
            }
            encryptor
                .finish(&mut out)
                .map_err(|e| format_error(&path, e))?;
            Ok(PutPayload::from(out))
        })
        .await
    }

    /// `head`: inner metadata with the plaintext size. Sizes are not authenticated here;
    /// the first range read of the version authenticates its length.
    async fn head_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let options = GetOptions {
            head: true,
            range: None,
            ..options
        };
        let result = self.inner.get_opts(location, options).await?;
        let meta = plaintext_meta(result.meta)?;
        Ok(GetResult {
            payload: GetResultPayload::Stream(stream::empty().boxed()),
            range: 0..meta.size,
            meta,
            attributes: visible_attributes(&result.attributes),
            extensions: result.extensions,
        })
    }

    async fn get_whole(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let result = self.inner.get_opts(location, options).await?;
        let mut meta = result.meta.clone();
        let attributes = visible_attributes(&result.attributes);
        let extensions = result.extensions.clone();
        let ciphertext = result.bytes().await?;
        let header = Header::parse(&ciphertext).map_err(|e| integrity(location, e))?;
        let key = self.key_for(location, &header).await?;
        let care_system = self.care_system().clone();
        let path = location.clone();
        let plaintext = run_cpu(ciphertext.len(), move || {
            let binding = ObjectBinding::new(&care_system, path.as_ref());
            format::decrypt_object(&key, &binding, &ciphertext).map_err(|e| format_error(&path, e))
        })
        .await?;
        if let Some(tag) = VersionTag::of(&meta) {
            self.verified().insert(location.clone(), tag, header);
        }
        meta.size = plaintext.len() as u64;
        Ok(GetResult {
            payload: GetResultPayload::Stream(stream::once(async move { Ok(plaintext) }).boxed()),
            range: 0..meta.size,
            meta,
            attributes,
            extensions,
        })
    }

    async fn get_plaintext_range(
        &self,
        location: &Path,
        mut options: GetOptions,
        range: GetRange,
    ) -> object_store::Result<GetResult> {
        // Set when this method pins the version itself (for a suffix read), so that a
        // failed pin means "replaced meanwhile", not the caller's precondition.
        let mut pinned_here = false;
        let request = match range {
            GetRange::Bounded(r) => PlainRange::Bounded(r),
            GetRange::Offset(offset) => PlainRange::Offset(offset),
            GetRange::Suffix(n) => {
                // The start depends on the length: learn it, then read that version.
                let meta = self.head_opts(location, options.clone()).await?.meta;
                if let Some(tag) = VersionTag::of(&meta) {
                    pinned_here = options.if_match.is_none() && options.version.is_none();
                    options.if_match = options.if_match.or(tag.e_tag);
                    options.version = options.version.or(tag.version);
                }
                let start = meta.size.saturating_sub(n);
                if start == meta.size {
                    return Ok(GetResult {
                        payload: GetResultPayload::Stream(stream::empty().boxed()),
                        range: start..start,
                        meta,
                        attributes: Attributes::new(),
                        extensions: Default::default(),
                    });
                }
                PlainRange::Bounded(start..meta.size)
            }
        };
        let (start, covering) = match &request {
            PlainRange::Bounded(r) => {
                if r.start >= r.end {
                    return Err(EnvelopeError::EmptyRange {
                        path: location.clone(),
                        range: r.clone(),
                    }
                    .into());
                }
                (
                    r.start,
                    GetRange::Bounded(format::covering_ciphertext_range(r)),
                )
            }
            PlainRange::Offset(offset) => {
                let segment_start =
                    format::covering_ciphertext_range(&(*offset..offset.saturating_add(1))).start;
                (*offset, GetRange::Offset(segment_start))
            }
        };
        let inner_options = GetOptions {
            range: Some(covering),
            ..options.clone()
        };
        let result = match self.inner.get_opts(location, inner_options).await {
            Ok(result) => result,
            Err(object_store::Error::Precondition { .. }) if pinned_here => {
                return Err(EnvelopeError::ChangedDuringRead {
                    path: location.clone(),
                }
                .into());
            }
            Err(err) => return Err(self.explain_range_failure(location, start, err).await),
        };

        let meta = result.meta.clone();
        let plaintext_len = format::plaintext_len(meta.size).map_err(|e| integrity(location, e))?;
        let wanted = match request {
            PlainRange::Bounded(r) => r,
            PlainRange::Offset(offset) => offset..plaintext_len.max(offset.saturating_add(1)),
        };
        let span = SegmentSpan::new(wanted, plaintext_len).map_err(|e| range_error(location, e))?;
        if result.range != span.ciphertext() {
            return Err(integrity(
                location,
                IntegrityError::UnexpectedCiphertextLength {
                    expected: span.ciphertext().end - span.ciphertext().start,
                    actual: result.range.end.saturating_sub(result.range.start),
                },
            ));
        }
        let attributes = visible_attributes(&result.attributes);
        let extensions = result.extensions.clone();
        let segments = result.bytes().await?;

        let tag = VersionTag::of(&meta);
        let known = tag
            .as_ref()
            .and_then(|tag| self.verified().get(location, tag));
        let header = match known {
            Some(header) => header,
            None => {
                self.authenticate_version(location, tag.as_ref(), plaintext_len, &span)
                    .await?
            }
        };
        let key = self.key_for(location, &header).await?;
        let care_system = self.care_system().clone();
        let path = location.clone();
        let decrypt_header = header.clone();
        let decrypt_span = span.clone();
        let plaintext = run_cpu(segments.len(), move || {
            let binding = ObjectBinding::new(&care_system, path.as_ref());
            format::decrypt_range(&key, &binding, &decrypt_header, &decrypt_span, &segments)
                .map_err(|e| format_error(&path, e))
        })
        .await?;
        if let Some(tag) = tag {
            // Only now is the header authenticated (it is in every segment's AAD).
            self.verified().insert(location.clone(), tag, header);
        }
        Ok(GetResult {
            payload: GetResultPayload::Stream(stream::once(async move { Ok(plaintext) }).boxed()),
            range: span.plaintext(),
            meta: ObjectMeta {
                size: plaintext_len,
                ..meta
            },
            attributes,
            extensions,
        })
    }

    /// First read of a version: fetches its header and, unless the requested span
    /// already covers it, authenticates its last segment, so a truncated object fails
    /// even when only its beginning is read.
    async fn authenticate_version(
        &self,
        location: &Path,
        tag: Option<&VersionTag>,
        plaintext_len: u64,
        span: &SegmentSpan,
    ) -> object_store::Result<Header> {
        let pin = tag.map(VersionTag::pin).unwrap_or_default();
        let last = SegmentSpan::last_segment(plaintext_len);
        let header_read = self.read_exact(location, &pin, 0..HEADER_LEN as u64);
        let header_bytes = if span.includes_last_segment() {
            header_read.await?
        } else {
            let (header_bytes, tail) = futures::try_join!(
                header_read,
                self.read_exact(location, &pin, last.ciphertext())
            )?;
            let header = Header::parse(&header_bytes).map_err(|e| integrity(location, e))?;
            let key = self.key_for(location, &header).await?;
            let binding = ObjectBinding::new(self.care_system(), location.as_ref());
            format::decrypt_range(&key, &binding, &header, &last, &tail)
                .map_err(|e| format_error(location, e))?;
            header_bytes
        };
        Header::parse(&header_bytes).map_err(|e| integrity(location, e))
    }

    /// Reads exactly `range` of the version `pin` names.
    async fn read_exact(
        &self,
        location: &Path,
        pin: &GetOptions,
        range: Range<u64>,
    ) -> object_store::Result<Bytes> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..pin.clone()
        };
        let changed = || -> object_store::Error {
            EnvelopeError::ChangedDuringRead {
                path: location.clone(),
            }
            .into()
        };
        let result = match self.inner.get_opts(location, options).await {
            Ok(result) => result,
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotModified { .. },
            ) => {
                return Err(changed());
            }
            Err(err) => return Err(err),
        };
        let bytes = result.bytes().await?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(integrity(
                location,
                IntegrityError::UnexpectedCiphertextLength {
                    expected: range.end - range.start,
                    actual: bytes.len() as u64,
                },
            ));
        }
        Ok(bytes)
    }

    /// A range read failed in the backing store. If the object is shorter than the
    /// range's start (a truncated or swapped object, or a caller error), say so with a
    /// non-retryable error; backing stores report it as a retryable `Generic` error.
    async fn explain_range_failure(
        &self,
        location: &Path,
        start: u64,
        err: object_store::Error,
    ) -> object_store::Error {
        if !matches!(err, object_store::Error::Generic { .. }) {
            return err;
        }
        let head = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match self.inner.get_opts(location, head).await {
            Ok(result) => match format::plaintext_len(result.meta.size) {
                Ok(len) if start >= len => range_error(
                    location,
                    RangeNotSatisfiable {
                        start,
                        end: start.saturating_add(1),
                        len,
                    },
                ),
                Ok(_) => err,
                Err(e) => integrity(location, e),
            },
            Err(_) => err,
        }
    }
}

/// Runs CPU-heavy crypto on the blocking pool when `len` is large, inline otherwise.
async fn run_cpu<T, F>(len: usize, work: F) -> object_store::Result<T>
where
    F: FnOnce() -> object_store::Result<T> + Send + 'static,
    T: Send + 'static,
{
    if len < BLOCKING_THRESHOLD {
        return work();
    }
    tokio::task::spawn_blocking(work).await?
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for EncryptingObjectStore<S> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        check_metadata(&opts.attributes, &opts.tags)?;
        let ciphertext = self.encrypt(location, payload).await?;
        self.verified().forget(location);
        self.inner.put_opts(location, ciphertext, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        check_metadata(&opts.attributes, &opts.tags)?;
        let (epoch, key) = self
            .keyring
            .current_key()
            .await
            .map_err(|e| key_error(location, e))?;
        let mut pending = Vec::with_capacity(MULTIPART_PART_SIZE + SEGMENT_SIZE);
        let binding = ObjectBinding::new(self.care_system(), location.as_ref());
        let encryptor = ObjectEncryptor::start(&key, epoch, &binding, &mut pending)
            .map_err(|e| format_error(location, e))?;
        self.verified().forget(location);
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(EncryptingUpload {
            inner,
            encryptor: Some(encryptor),
            pending,
            location: location.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.head {
            return self.head_opts(location, options).await;
        }
        match options.range.clone() {
            None => self.get_whole(location, options).await,
            Some(range) => self.get_plaintext_range(location, options, range).await,
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let verified = Arc::clone(&self.verified);
        self.inner
            .delete_stream(locations)
            .map(move |deleted| {
                if let Ok(path) = &deleted {
                    verified
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .forget(path);
                }
                deleted
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner
            .list(prefix)
            .map(|meta| meta.and_then(plaintext_meta))
            .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner
            .list_with_offset(prefix, offset)
            .map(|meta| meta.and_then(plaintext_meta))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let listed = self.inner.list_with_delimiter(prefix).await?;
        Ok(ListResult {
            common_prefixes: listed.common_prefixes,
            objects: listed
                .objects
                .into_iter()
                .map(plaintext_meta)
                .collect::<object_store::Result<_>>()?,
            extensions: listed.extensions,
        })
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let plaintext = self
            .get_whole(from, GetOptions::default())
            .await?
            .bytes()
            .await?;
        let mode = match options.mode {
            CopyMode::Overwrite => PutMode::Overwrite,
            CopyMode::Create => PutMode::Create,
        };
        let put = PutOptions {
            mode,
            extensions: options.extensions,
            ..PutOptions::default()
        };
        self.put_opts(to, PutPayload::from(plaintext), put).await?;
        Ok(())
    }
}

/// A multipart upload that encrypts as parts stream in and re-chunks the ciphertext
/// into parts of exactly [`MULTIPART_PART_SIZE`] (the last may be smaller).
struct EncryptingUpload {
    inner: Box<dyn MultipartUpload>,
    /// `None` once completed or failed.
    encryptor: Option<ObjectEncryptor>,
    /// Ciphertext not yet sent (always less than one part between calls).
    pending: Vec<u8>,
    location: Path,
}

impl fmt::Debug for EncryptingUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptingUpload")
            .field("location", &self.location)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl EncryptingUpload {
    /// Sends every full part of pending ciphertext (and the rest too if `last`).
    fn send_parts(&mut self, last: bool) -> Vec<UploadPart> {
        let mut parts = Vec::new();
        if self.pending.len() < MULTIPART_PART_SIZE && !last {
            return parts;
        }
        let all = Bytes::from(std::mem::take(&mut self.pending));
        let mut offset = 0;
        while all.len() - offset >= MULTIPART_PART_SIZE {
            let part = all.slice(offset..offset + MULTIPART_PART_SIZE);
            parts.push(self.inner.put_part(PutPayload::from(part)));
            offset += MULTIPART_PART_SIZE;
        }
        if last {
            if offset < all.len() {
                parts.push(self.inner.put_part(PutPayload::from(all.slice(offset..))));
            }
        } else {
            self.pending.extend_from_slice(&all[offset..]);
        }
        parts
    }

    fn finished(&self) -> object_store::Error {
        EnvelopeError::UploadFinished {
            path: self.location.clone(),
        }
        .into()
    }
}

#[async_trait]
impl MultipartUpload for EncryptingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let Some(encryptor) = self.encryptor.as_mut() else {
            let err = self.finished();
            return Box::pin(async move { Err(err) });
        };
        for chunk in data.iter() {
            if let Err(e) = encryptor.push(chunk, &mut self.pending) {
                self.encryptor = None;
                let err = format_error(&self.location, e);
                return Box::pin(async move { Err(err) });
            }
        }
        let parts = self.send_parts(false);
        Box::pin(async move {
            futures::future::try_join_all(parts).await?;
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let encryptor = self.encryptor.take().ok_or_else(|| self.finished())?;
        encryptor
            .finish(&mut self.pending)
            .map_err(|e| format_error(&self.location, e))?;
        futures::future::try_join_all(self.send_parts(true)).await?;
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.encryptor = None;
        self.pending = Vec::new();
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::keyring::tests::SwitchableProvider;
    use crate::envelope::keyring::{KeyringConfig, wrapped_key_path};
    use crate::envelope::secret_key::KeyEpoch;
    use futures::TryStreamExt;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, WriteMultipart};
    use std::borrow::Cow;
    use std::sync::atomic::Ordering;

    const MARKER: &[u8] = b"NHS-9434765919-Jane-Doe-SW1A-1AA";

    struct Fixture {
        store: EncryptingObjectStore<InMemory>,
        raw: Arc<InMemory>,
        keys: Arc<InMemory>,
        provider: Arc<SwitchableProvider>,
    }

    async fn fixture() -> Fixture {
        let raw = Arc::new(InMemory::new());
        let provider = Arc::new(SwitchableProvider::new().await);
        let keys = Arc::new(InMemory::new());
        let keyring = Arc::new(EnvelopeKeyring::new(
            CareSystemName::parse("nw-london").unwrap(),
            provider.clone(),
            keys.clone(),
            KeyringConfig::default(),
        ));
        Fixture {
            store: EncryptingObjectStore::from_arc(raw.clone(), keyring),
            raw,
            keys,
            provider,
        }
    }

    /// Plaintext with the marker every 1000 bytes.
    fn records(len: usize) -> Vec<u8> {
        let mut data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut at = 0;
        while at + MARKER.len() <= len {
            data[at..at + MARKER.len()].copy_from_slice(MARKER);
            at += 1000;
        }
        data
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    async fn raw_bytes(raw: &InMemory, path: &Path) -> Bytes {
        raw.get(path).await.unwrap().bytes().await.unwrap()
    }

    fn assert_integrity(err: object_store::Error) {
        assert!(
            !slatedb_common::retry::should_retry(&err),
            "integrity error would be retried: {err}"
        );
        let envelope =
            EnvelopeError::find(&err).unwrap_or_else(|| panic!("not an envelope error: {err}"));
        assert!(envelope.is_integrity_failure(), "{envelope}");
    }

    #[tokio::test]
    async fn put_get_range_and_sizes_are_plaintext() {
        let f = fixture().await;
        let path = Path::from("db/compacted/01.sst");
        let data = records(10_000);
        f.store.put(&path, data.clone().into()).await.unwrap();

        let got = f.store.get(&path).await.unwrap();
        assert_eq!(got.meta.size, 10_000);
        assert_eq!(got.range, 0..10_000);
        assert_eq!(got.bytes().await.unwrap(), data);
        assert_eq!(f.store.head(&path).await.unwrap().size, 10_000);

        for range in [0..1, 4095..4097, 5000..10_000, 9999..10_000, 100..8192] {
            let bytes = f.store.get_range(&path, range.clone()).await.unwrap();
            assert_eq!(bytes, &data[range.start as usize..range.end as usize]);
        }
        // A bounded range past the end is clamped, as object stores do.
        let tail = f.store.get_range(&path, 9000..20_000).await.unwrap();
        assert_eq!(tail, &data[9000..]);
        let opts = GetOptions::new().with_range(Some(GetRange::Offset(7000)));
        let got = f.store.get_opts(&path, opts).await.unwrap();
        assert_eq!(got.range, 7000..10_000);
        assert_eq!(got.meta.size, 10_000);
        assert_eq!(got.bytes().await.unwrap(), &data[7000..]);
        let opts = GetOptions::new().with_range(Some(GetRange::Suffix(300)));
        let got = f.store.get_opts(&path, opts).await.unwrap();
        assert_eq!(got.bytes().await.unwrap(), &data[9700..]);
        let ranges = f
            .store
            .get_ranges(&path, &[0..10, 6000..6100])
            .await
            .unwrap();
        assert_eq!(ranges[0], &data[0..10]);
        assert_eq!(ranges[1], &data[6000..6100]);

        let listed: Vec<_> = f
            .store
            .list(Some(&Path::from("db")))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].size, 10_000);
        let listed = f
            .store
            .list_with_delimiter(Some(&Path::from("db/compacted")))
            .await
            .unwrap();
        assert_eq!(listed.objects[0].size, 10_000);
        // The backing store holds the longer ciphertext.
        assert_eq!(
            f.raw.head(&path).await.unwrap().size,
            format::ciphertext_len(10_000).unwrap()
        );
    }

    #[tokio::test]
    async fn empty_objects_round_trip() {
        let f = fixture().await;
        let path = Path::from("empty");
        f.store.put(&path, PutPayload::default()).await.unwrap();
        let got = f.store.get(&path).await.unwrap();
        assert_eq!(got.meta.size, 0);
        assert!(got.bytes().await.unwrap().is_empty());
        let err = f.store.get_range(&path, 0..1).await.unwrap_err();
        assert!(!slatedb_common::retry::should_retry(&err), "{err}");
    }

    #[tokio::test]
    async fn ranges_past_the_end_fail_without_retry() {
        let f = fixture().await;
        let path = Path::from("obj");
        f.store.put(&path, records(5000).into()).await.unwrap();
        let err = f.store.get_range(&path, 10..10).await.unwrap_err();
        assert!(!slatedb_common::retry::should_retry(&err), "{err}");
        assert!(
            matches!(
                EnvelopeError::find(&err),
                Some(EnvelopeError::EmptyRange { .. })
            ),
            "{err}"
        );
        for range in [5000..5001, 6000..7000, 100_000..100_001] {
            let err = f.store.get_range(&path, range.clone()).await.unwrap_err();
            assert!(
                !slatedb_common::retry::should_retry(&err),
                "{range:?}: {err}"
            );
            assert!(
                matches!(
                    EnvelopeError::find(&err),
                    Some(EnvelopeError::RangeNotSatisfiable { .. })
                ),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn conditional_puts_pass_through() {
        let f = fixture().await;
        let path = Path::from("manifest/00000000000000000001.manifest");
        let created = f
            .store
            .put_opts(&path, b"v1".to_vec().into(), PutMode::Create.into())
            .await
            .unwrap();
        let err = f
            .store
            .put_opts(&path, b"v2".to_vec().into(), PutMode::Create.into())
            .await
            .unwrap_err();
        assert!(
            matches!(err, object_store::Error::AlreadyExists { .. }),
            "{err}"
        );

        let update = PutMode::Update(created.clone().into());
        f.store
            .put_opts(&path, b"v3".to_vec().into(), update.clone().into())
            .await
            .unwrap();
        let err = f
            .store
            .put_opts(&path, b"v4".to_vec().into(), update.into())
            .await
            .unwrap_err();
        assert!(
            matches!(err, object_store::Error::Precondition { .. }),
            "{err}"
        );
        assert_eq!(
            f.store.get(&path).await.unwrap().bytes().await.unwrap(),
            &b"v3"[..]
        );

        let err = f.store.get(&Path::from("missing")).await.unwrap_err();
        assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
        let err = f
            .store
            .get_range(&Path::from("missing"), 0..4)
            .await
            .unwrap_err();
        assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn only_slatedbs_put_id_attribute_passes() {
        let f = fixture().await;
        let path = Path::from("wal/00000000000000000001.sst");
        let put_id = Attribute::Metadata(Cow::Borrowed(SLATEDB_PUT_ID_ATTRIBUTE));
        let attributes = Attributes::from_iter([(put_id.clone(), "01J0ULID")]);
        let opts = PutOptions {
            mode: PutMode::Create,
            attributes,
            ..PutOptions::default()
        };
        f.store
            .put_opts(&path, b"x".to_vec().into(), opts)
            .await
            .unwrap();
        let head = f
            .store
            .get_opts(&path, GetOptions::new().with_head(true))
            .await
            .unwrap();
        assert_eq!(
            head.attributes.get(&put_id).map(|v| v.as_ref()),
            Some("01J0ULID")
        );
        assert_eq!(head.meta.size, 1);

        for attribute in [
            Attribute::ContentType,
            Attribute::Metadata(Cow::Borrowed("patient")),
        ] {
            let opts = PutOptions::from(Attributes::from_iter([(attribute, "x")]));
            let err = f
                .store
                .put_opts(&Path::from("other"), b"x".to_vec().into(), opts)
                .await
                .unwrap_err();
            assert!(
                matches!(err, object_store::Error::NotImplemented { .. }),
                "{err}"
            );
            let opts =
                PutMultipartOptions::from(Attributes::from_iter([(Attribute::ContentType, "x")]));
            let err = f
                .store
                .put_multipart_opts(&Path::from("other"), opts)
                .await
                .unwrap_err();
            assert!(
                matches!(err, object_store::Error::NotImplemented { .. }),
                "{err}"
            );
        }
        let mut tags = object_store::TagSet::default();
        tags.push("k", "v");
        let err = f
            .store
            .put_opts(&Path::from("other"), b"x".to_vec().into(), tags.into())
            .await
            .unwrap_err();
        assert!(
            matches!(err, object_store::Error::NotImplemented { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_backing_store_holds_no_plaintext() {
        let f = fixture().await;
        for (i, len) in [100, 4096, 50_000].into_iter().enumerate() {
            let path = Path::from(format!("db/obj-{i}"));
            f.store.put(&path, records(len).into()).await.unwrap();
            let raw = raw_bytes(&f.raw, &path).await;
            assert!(!contains(&raw, MARKER), "marker in {path}");
            assert!(!contains(&raw, b"NHS-9434765919"), "marker in {path}");
        }
    }

    #[tokio::test]
    async fn tampering_is_an_integrity_error_on_full_and_range_reads() {
        let f = fixture().await;
        let path = Path::from("db/tampered.sst");
        let data = records(20_000);
        f.store.put(&path, data.clone().into()).await.unwrap();
        let raw = raw_bytes(&f.raw, &path).await;
        for at in [0, 4, 6, 20, 47, 48, 100, 4200, raw.len() - 1] {
            let mut bad = raw.to_vec();
            bad[at] ^= 0x40;
            f.raw.put(&path, bad.into()).await.unwrap();
            assert_integrity(f.store.get(&path).await.unwrap_err());
            // A range read over the damaged segment, or over any segment when the header
            // is damaged, fails as well.
            let segment = at.saturating_sub(HEADER_LEN) / (SEGMENT_SIZE + 16);
            let start = if at < HEADER_LEN {
                0
            } else {
                (segment * SEGMENT_SIZE) as u64
            };
            assert_integrity(
                f.store
                    .get_range(&path, start..start + 10)
                    .await
                    .unwrap_err(),
            );
        }
    }

    #[tokio::test]
    async fn truncation_is_detected_even_when_reading_the_beginning() {
        let f = fixture().await;
        let path = Path::from("db/truncated.sst");
        let data = records(3 * SEGMENT_SIZE);
        f.store.put(&path, data.into()).await.unwrap();
        let raw = raw_bytes(&f.raw, &path).await;
        // Cut at a segment boundary: the length is valid, only the last-segment flag
        // (checked on first read of this version) gives it away.
        let cut = HEADER_LEN + 2 * (SEGMENT_SIZE + 16);
        f.raw.put(&path, raw.slice(..cut).into()).await.unwrap();
        assert_integrity(f.store.get_range(&path, 0..10).await.unwrap_err());
        assert_integrity(f.store.get(&path).await.unwrap_err());
        // Mid-segment cut: the shortened last segment fails authentication.
        f.raw
            .put(&path, raw.slice(..cut + 100).into())
            .await
            .unwrap();
        assert_integrity(f.store.get_range(&path, 0..10).await.unwrap_err());
        // A cut that leaves less than a tag: no object has that length, so even `head`
        // and `list` say so.
        f.raw.put(&path, raw.slice(..cut + 5).into()).await.unwrap();
        assert_integrity(f.store.head(&path).await.unwrap_err());
        let listed: Vec<_> = f.store.list(None).collect().await;
        assert!(listed.into_iter().any(|m| m.is_err()));
    }

    #[tokio::test]
    async fn swapped_objects_fail() {
        let f = fixture().await;
        let a = Path::from("db/wal/01.sst");
        let b = Path::from("db/wal/02.sst");
        f.store.put(&a, records(9000).into()).await.unwrap();
        f.store.put(&b, records(9000).into()).await.unwrap();
        let (raw_a, raw_b) = (raw_bytes(&f.raw, &a).await, raw_bytes(&f.raw, &b).await);
        f.raw.put(&a, raw_b.into()).await.unwrap();
        f.raw.put(&b, raw_a.into()).await.unwrap();
        for path in [&a, &b] {
            assert_integrity(f.store.get(path).await.unwrap_err());
            assert_integrity(f.store.get_range(path, 5000..5010).await.unwrap_err());
        }
    }

    #[tokio::test]
    async fn a_shorter_object_swapped_in_fails_range_reads_without_retry() {
        let f = fixture().await;
        let path = Path::from("db/big.sst");
        f.store.put(&path, records(30_000).into()).await.unwrap();
        f.store
            .put(&Path::from("db/small.sst"), records(100).into())
            .await
            .unwrap();
        let small = raw_bytes(&f.raw, &Path::from("db/small.sst")).await;
        f.raw.put(&path, small.into()).await.unwrap();
        // SlateDB would ask for the footer of the 30 000-byte object it knew about.
        let err = f.store.get_range(&path, 29_000..30_000).await.unwrap_err();
        assert!(!slatedb_common::retry::should_retry(&err), "{err}");
    }

    #[tokio::test]
    async fn unknown_epoch_is_an_integrity_error() {
        let f = fixture().await;
        let path = Path::from("db/obj");
        f.store.put(&path, records(100).into()).await.unwrap();
        let mut raw = raw_bytes(&f.raw, &path).await.to_vec();
        raw[5..9].copy_from_slice(&9u32.to_be_bytes());
        f.raw.put(&path, raw.into()).await.unwrap();
        assert_integrity(f.store.get(&path).await.unwrap_err());
        assert_integrity(f.store.get_range(&path, 0..10).await.unwrap_err());
    }

    #[tokio::test]
    async fn multipart_uploads_encrypt_in_s3_sized_parts() {
        let f = fixture().await;
        let path = Path::from("db/compacted/big.sst");
        let data = records(12 * 1024 * 1024 + 12_345);
        let upload = f.store.put_multipart(&path).await.unwrap();
        let mut writer = WriteMultipart::new_with_chunk_size(upload, 1024 * 1024 + 7);
        for chunk in data.chunks(300_001) {
            writer.write(chunk);
        }
        writer.finish().await.unwrap();

        let raw = raw_bytes(&f.raw, &path).await;
        assert_eq!(
            raw.len() as u64,
            format::ciphertext_len(data.len() as u64).unwrap()
        );
        assert!(!contains(&raw, MARKER));
        assert_eq!(f.store.head(&path).await.unwrap().size, data.len() as u64);
        assert_eq!(
            f.store.get(&path).await.unwrap().bytes().await.unwrap(),
            data
        );
        let range = 6_000_000..6_100_000;
        assert_eq!(
            f.store.get_range(&path, range.clone()).await.unwrap(),
            &data[range.start as usize..range.end as usize]
        );
    }

    #[tokio::test]
    async fn multipart_parts_are_exactly_the_minimum_size() {
        #[derive(Debug, Default)]
        struct Recorder(Arc<Mutex<Vec<usize>>>);
        #[async_trait]
        impl MultipartUpload for Recorder {
            fn put_part(&mut self, data: PutPayload) -> UploadPart {
                self.0.lock().unwrap().push(data.content_length());
                Box::pin(async { Ok(()) })
            }
            async fn complete(&mut self) -> object_store::Result<PutResult> {
                Ok(PutResult {
                    e_tag: None,
                    version: None,
                    extensions: Default::default(),
                })
            }
            async fn abort(&mut self) -> object_store::Result<()> {
                Ok(())
            }
        }
        let f = fixture().await;
        let (_, key) = f.store.keyring().current_key().await.unwrap();
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let care_system = CareSystemName::parse("nw-london").unwrap();
        let mut pending = Vec::new();
        let encryptor = ObjectEncryptor::start(
            &key,
            KeyEpoch::FIRST,
            &ObjectBinding::new(&care_system, "p"),
            &mut pending,
        )
        .unwrap();
        let mut upload = EncryptingUpload {
            inner: Box::new(Recorder(sizes.clone())),
            encryptor: Some(encryptor),
            pending,
            location: Path::from("p"),
        };
        let total = 11 * 1024 * 1024 + 5;
        for chunk in records(total).chunks(777_777) {
            upload.put_part(chunk.to_vec().into()).await.unwrap();
        }
        upload.complete().await.unwrap();
        let sizes = sizes.lock().unwrap().clone();
        let (last, full) = sizes.split_last().unwrap();
        assert!(full.iter().all(|&s| s == MULTIPART_PART_SIZE), "{sizes:?}");
        assert!(*last <= MULTIPART_PART_SIZE && *last > 0, "{sizes:?}");
        assert_eq!(
            sizes.iter().sum::<usize>() as u64,
            format::ciphertext_len(total as u64).unwrap()
        );
    }

    #[tokio::test]
    async fn copies_re_encrypt_for_the_new_path() {
        let f = fixture().await;
        let from = Path::from("db/a");
        let to = Path::from("db/b");
        let data = records(9000);
        f.store.put(&from, data.clone().into()).await.unwrap();
        f.store.copy(&from, &to).await.unwrap();
        assert_ne!(raw_bytes(&f.raw, &from).await, raw_bytes(&f.raw, &to).await);
        assert_eq!(f.store.get(&to).await.unwrap().bytes().await.unwrap(), data);

        let err = f.store.copy_if_not_exists(&from, &to).await.unwrap_err();
        assert!(
            matches!(err, object_store::Error::AlreadyExists { .. }),
            "{err}"
        );

        let renamed = Path::from("db/c");
        f.store.rename(&to, &renamed).await.unwrap();
        assert!(matches!(
            f.store.head(&to).await.unwrap_err(),
            object_store::Error::NotFound { .. }
        ));
        assert_eq!(
            f.store.get(&renamed).await.unwrap().bytes().await.unwrap(),
            data
        );

        f.store.delete(&renamed).await.unwrap();
        assert!(matches!(
            f.store.get(&renamed).await.unwrap_err(),
            object_store::Error::NotFound { .. }
        ));
    }

    #[tokio::test]
    async fn objects_are_bound_to_their_care_system() {
        let f = fixture().await;
        let path = Path::from("db/obj");
        f.store.put(&path, records(100).into()).await.unwrap();
        // Another care system pointed (by misconfiguration) at the same bucket and key
        // store cannot read the object: its context does not unwrap the root key.
        let other = EncryptingObjectStore::from_arc(
            f.raw.clone(),
            Arc::new(EnvelopeKeyring::new(
                CareSystemName::parse("kent").unwrap(),
                f.provider.clone(),
                f.keys.clone(),
                KeyringConfig::default(),
            )),
        );
        let err = other.get(&path).await.unwrap_err();
        assert!(!slatedb_common::retry::should_retry(&err), "{err}");
        assert!(EnvelopeError::find(&err).is_some(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_key_makes_reads_and_writes_fail_closed() {
        let f = fixture().await;
        let path = Path::from("db/obj");
        f.store.put(&path, records(100).into()).await.unwrap();
        f.provider.enabled.store(false, Ordering::SeqCst);
        tokio::time::advance(KeyringConfig::default().key_ttl + std::time::Duration::from_secs(1))
            .await;
        for err in [
            f.store.get(&path).await.unwrap_err(),
            f.store.get_range(&path, 0..10).await.unwrap_err(),
            f.store
                .put(&path, b"new".to_vec().into())
                .await
                .unwrap_err(),
        ] {
            let envelope = EnvelopeError::find(&err).unwrap();
            assert!(envelope.is_key_unavailable(), "{err}");
            assert!(!slatedb_common::retry::should_retry(&err), "{err}");
        }
        f.provider.enabled.store(true, Ordering::SeqCst);
        assert_eq!(
            f.store.get(&path).await.unwrap().bytes().await.unwrap(),
            records(100)
        );
    }

    #[tokio::test]
    async fn wrapped_keys_live_outside_the_encrypted_objects() {
        let f = fixture().await;
        f.store
            .put(&Path::from("db/obj"), records(10).into())
            .await
            .unwrap();
        let raw: Vec<_> = f.raw.list(None).try_collect().await.unwrap();
        assert!(
            raw.iter()
                .all(|m| m.location != wrapped_key_path(KeyEpoch::FIRST))
        );
    }
}
