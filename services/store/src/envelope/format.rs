//! The encrypted object format: a segmented streaming AEAD.
//!
//! Modelled on Tink's AES-GCM-HKDF streaming AEAD and age's STREAM. An object is a
//! plaintext header followed by AES-256-GCM segments:
//!
//! ```text
//! offset  len  field
//!      0    4  magic "SHCR"
//!      4    1  format version (1)
//!      5    4  key epoch, u32 big-endian: which tenant root key (TRK) to use
//!      9   32  salt, random per object
//!     41    7  nonce prefix, random per object
//!     48    …  segments: 4096 plaintext bytes + 16-byte tag each; the last one holds
//!              1..=4096 bytes (0 only when the whole object is empty)
//! ```
//!
//! - object key = HKDF-SHA256(ikm = TRK, salt = header salt, info = "shcr-object-v1");
//! - segment nonce = nonce prefix ‖ segment index (u32 BE) ‖ last-segment flag (1 byte),
//!   Tink's layout, so a segment cannot be moved, and a non-final segment cannot pose as
//!   the end of the object;
//! - segment AAD = domain tag ‖ format version ‖ care system ‖ object path ‖ header bytes
//!   (length-prefixed), so every segment authenticates the header, and an object copied
//!   or swapped to another path or care system no longer decrypts.
//!
//! Invariants:
//! - decryption never returns bytes that did not authenticate: every failure (flipped
//!   bit, truncation, extension, wrong path, wrong key, unknown header) is an error, and
//!   [`IntegrityError`] says which;
//! - the ciphertext length is a pure function of the plaintext length and back
//!   ([`ciphertext_len`], [`plaintext_len`]), so sizes can be reported without reading;
//!   lengths no encoder can produce are integrity errors;
//! - a (key, nonce) pair is never reused: each object has a fresh random salt, hence a
//!   fresh key, and within an object the nonce carries the segment index.

use std::ops::Range;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
use bytes::Bytes;
use zeroize::Zeroizing;

use super::secret_key::{KEY_LEN, KeyEpoch, SecretKey};
use crate::care_system::CareSystemName;

/// Plaintext bytes per segment; matches SlateDB's 4 KiB blocks so a block read touches
/// one or two segments.
pub const SEGMENT_SIZE: usize = 4096;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Length of the plaintext header at the start of every object.
pub const HEADER_LEN: usize = 48;
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;

const MAGIC: [u8; 4] = *b"SHCR";
const SALT_LEN: usize = 32;
const NONCE_PREFIX_LEN: usize = 7;
const HKDF_INFO: &[u8] = b"shcr-object-v1";
const AAD_DOMAIN: &[u8] = b"shcr-object-segment";
/// Segment indices are 32 bits in the nonce.
const MAX_SEGMENTS: u64 = 1 << 32;
const SEGMENT: u64 = SEGMENT_SIZE as u64;
const SEGMENT_CIPHERTEXT: u64 = (SEGMENT_SIZE + TAG_LEN) as u64;
const HEADER: u64 = HEADER_LEN as u64;
const TAG: u64 = TAG_LEN as u64;

/// Why stored bytes are not a genuine object for this path. Never retry these: the
/// bytes will not change by reading them again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The object does not start with the format's magic bytes.
    #[error(
        "the object does not start with an ShCR encryption header (written unencrypted or overwritten)"
    )]
    NotEncrypted,
    /// The header names a format version this build cannot read.
    #[error(
        "the object uses encryption format version {0}, which this build does not read: \
         upgrade the store"
    )]
    UnsupportedVersion(u8),
    /// No encoder produces an object of this length.
    #[error(
        "the object is {0} bytes long, which no encrypted object can be: it was truncated or \
         extended"
    )]
    InvalidLength(u64),
    /// A segment's tag did not verify.
    #[error(
        "segment {segment} failed authentication: the object was modified, truncated or \
         extended, moved from another path or care system, or encrypted under another key"
    )]
    Authentication {
        /// Index of the failing segment.
        segment: u64,
    },
    /// The bytes handed in for a range are not the ciphertext of its segments.
    #[error("expected {expected} bytes of ciphertext for the requested segments, got {actual}")]
    UnexpectedCiphertextLength {
        /// Length of the covering ciphertext range.
        expected: u64,
        /// Length actually supplied.
        actual: u64,
    },
}

/// Errors of the format's operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Stored bytes failed to authenticate.
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    /// The plaintext is longer than 2^32 segments (16 TiB).
    #[error("a plaintext of {0} bytes is larger than the largest encryptable object (16 TiB)")]
    TooLarge(u64),
    /// The crypto library refused an operation that cannot fail with valid inputs.
    #[error("the cryptographic library failed while {0}; the system random source may be broken")]
    Crypto(&'static str),
}

/// A plaintext range outside the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "byte range {start}..{end} is not within an object of {len} bytes: integrity check failed, \
     the object is shorter than its reader expects (truncated or replaced?)"
)]
pub struct RangeNotSatisfiable {
    /// Requested start.
    pub start: u64,
    /// Requested end (exclusive).
    pub end: u64,
    /// Plaintext length of the object.
    pub len: u64,
}

/// Where an object lives: the names its ciphertext is bound to.
#[derive(Debug, Clone, Copy)]
pub struct ObjectBinding<'a> {
    care_system: &'a CareSystemName,
    path: &'a str,
}

impl<'a> ObjectBinding<'a> {
    /// An object at `path` (as the encrypting store sees it) of `care_system`.
    pub fn new(care_system: &'a CareSystemName, path: &'a str) -> Self {
        Self { care_system, path }
    }
}

/// The plaintext header of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    epoch: KeyEpoch,
    salt: [u8; SALT_LEN],
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

impl Header {
    /// A fresh header for a new object under `epoch`'s root key.
    pub fn generate(epoch: KeyEpoch) -> Result<Self, FormatError> {
        let mut salt = [0u8; SALT_LEN];
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        aws_lc_rs::rand::fill(&mut salt).map_err(|_| FormatError::Crypto("drawing a salt"))?;
        aws_lc_rs::rand::fill(&mut nonce_prefix)
            .map_err(|_| FormatError::Crypto("drawing a nonce prefix"))?;
        Ok(Self {
            epoch,
            salt,
            nonce_prefix,
        })
    }

    /// Parses the header at the start of `bytes` (which may hold more than the header).
    pub fn parse(bytes: &[u8]) -> Result<Self, IntegrityError> {
        let header: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(IntegrityError::InvalidLength(bytes.len() as u64))?;
        let (magic, rest) = header.split_at(MAGIC.len());
        if magic != MAGIC {
            return Err(IntegrityError::NotEncrypted);
        }
        let (version, rest) = rest.split_at(1);
        if version[0] != FORMAT_VERSION {
            return Err(IntegrityError::UnsupportedVersion(version[0]));
        }
        let (epoch, rest) = rest.split_at(4);
        let (salt, nonce_prefix) = rest.split_at(SALT_LEN);
        let mut header = Self {
            epoch: KeyEpoch::new(u32::from_be_bytes([epoch[0], epoch[1], epoch[2], epoch[3]])),
            salt: [0; SALT_LEN],
            nonce_prefix: [0; NONCE_PREFIX_LEN],
        };
        header.salt.copy_from_slice(salt);
        header.nonce_prefix.copy_from_slice(nonce_prefix);
        Ok(header)
    }

    /// The header's bytes as stored.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = FORMAT_VERSION;
        out[5..9].copy_from_slice(&self.epoch.get().to_be_bytes());
        out[9..41].copy_from_slice(&self.salt);
        out[41..].copy_from_slice(&self.nonce_prefix);
        out
    }

    /// The root key epoch the object was encrypted under.
    pub fn epoch(&self) -> KeyEpoch {
        self.epoch
    }
}

/// Number of segments of a plaintext of `plaintext_len` bytes (at least one).
fn segment_count(plaintext_len: u64) -> u64 {
    plaintext_len.div_ceil(SEGMENT).max(1)
}

/// Ciphertext length of a plaintext of `plaintext_len` bytes, or `None` past 16 TiB.
pub fn ciphertext_len(plaintext_len: u64) -> Option<u64> {
    let segments = segment_count(plaintext_len);
    if segments > MAX_SEGMENTS {
        return None;
    }
    Some(HEADER + plaintext_len + segments * TAG)
}

/// Plaintext length of an object whose ciphertext is `ciphertext_len` bytes; lengths no
/// encoder produces (a cut inside the header or a tag, a dangling empty segment) fail.
pub fn plaintext_len(ciphertext_len: u64) -> Result<u64, IntegrityError> {
    let invalid = IntegrityError::InvalidLength(ciphertext_len);
    let body = ciphertext_len.checked_sub(HEADER).ok_or(invalid.clone())?;
    let full = body / SEGMENT_CIPHERTEXT;
    let rest = body % SEGMENT_CIPHERTEXT;
    let (segments, plaintext) = match (full, rest) {
        (0, TAG) => (1, 0),
        (full, 0) if full > 0 => (full, full * SEGMENT),
        (full, rest) if rest > TAG => (full + 1, full * SEGMENT + rest - TAG),
        _ => return Err(invalid),
    };
    if segments > MAX_SEGMENTS {
        return Err(invalid);
    }
    Ok(plaintext)
}

/// The ciphertext byte range that holds the segments covering `plaintext`, before the
/// object's length is known: the end may lie past the object (stores clamp range ends),
/// and [`SegmentSpan::new`] then gives the exact range. `plaintext` must not be empty.
pub fn covering_ciphertext_range(plaintext: &Range<u64>) -> Range<u64> {
    let first = plaintext.start / SEGMENT;
    let end_segment = plaintext.end.saturating_sub(1) / SEGMENT + 1;
    segment_offset(first)..segment_offset(end_segment)
}

/// Offset of segment `index` in the object.
fn segment_offset(index: u64) -> u64 {
    HEADER.saturating_add(index.saturating_mul(SEGMENT_CIPHERTEXT))
}

/// The segments of an object that cover a plaintext range, and where they lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSpan {
    plaintext: Range<u64>,
    segments: Range<u64>,
    total_segments: u64,
    ciphertext: Range<u64>,
}

impl SegmentSpan {
    /// The span covering `plaintext` in an object of `plaintext_len` bytes. The range end
    /// is clamped to the object (as object stores do); an empty range, or one starting at
    /// or past the end, is refused.
    pub fn new(plaintext: Range<u64>, plaintext_len: u64) -> Result<Self, RangeNotSatisfiable> {
        let refuse = RangeNotSatisfiable {
            start: plaintext.start,
            end: plaintext.end,
            len: plaintext_len,
        };
        if plaintext.start >= plaintext.end || plaintext.start >= plaintext_len {
            return Err(refuse);
        }
        let plaintext = plaintext.start..plaintext.end.min(plaintext_len);
        let total_segments = segment_count(plaintext_len);
        if total_segments > MAX_SEGMENTS {
            return Err(refuse);
        }
        let first = plaintext.start / SEGMENT;
        let end = (plaintext.end - 1) / SEGMENT + 1;
        let object_end = HEADER + plaintext_len + total_segments * TAG;
        let ciphertext = segment_offset(first)..segment_offset(end).min(object_end);
        Ok(Self {
            plaintext,
            segments: first..end,
            total_segments,
            ciphertext,
        })
    }

    /// The span of the object's last segment (the one carrying the last-segment flag).
    pub fn last_segment(plaintext_len: u64) -> Self {
        let total_segments = segment_count(plaintext_len);
        let last = total_segments - 1;
        let start = (last * SEGMENT).min(plaintext_len);
        Self {
            plaintext: start..plaintext_len,
            segments: last..total_segments,
            total_segments,
            ciphertext: segment_offset(last)..HEADER + plaintext_len + total_segments * TAG,
        }
    }

    /// The plaintext range this span yields (clamped to the object).
    pub fn plaintext(&self) -> Range<u64> {
        self.plaintext.clone()
    }

    /// The ciphertext byte range holding the covering segments.
    pub fn ciphertext(&self) -> Range<u64> {
        self.ciphertext.clone()
    }

    /// Whether the span includes the object's last segment.
    pub fn includes_last_segment(&self) -> bool {
        self.segments.end == self.total_segments
    }
}

/// The AEAD state for one object: its derived key, nonce prefix and segment AAD.
pub struct ObjectCipher {
    key: LessSafeKey,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    aad: Vec<u8>,
}

impl std::fmt::Debug for ObjectCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectCipher(<redacted>)")
    }
}

impl ObjectCipher {
    /// Derives the object key for `header` from the root key, bound to `binding`.
    pub fn new(
        root: &SecretKey,
        header: &Header,
        binding: &ObjectBinding<'_>,
    ) -> Result<Self, FormatError> {
        let mut object_key = Zeroizing::new([0u8; KEY_LEN]);
        Salt::new(HKDF_SHA256, &header.salt)
            .extract(root.expose())
            .expand(&[HKDF_INFO], &AES_256_GCM)
            .and_then(|okm| okm.fill(object_key.as_mut()))
            .map_err(|_| FormatError::Crypto("deriving an object key"))?;
        let key = UnboundKey::new(&AES_256_GCM, object_key.as_ref())
            .map_err(|_| FormatError::Crypto("loading an object key"))?;

        let care_system = binding.care_system.as_str().as_bytes();
        let path = binding.path.as_bytes();
        let mut aad = Vec::with_capacity(
            AAD_DOMAIN.len() + 1 + 8 + care_system.len() + path.len() + HEADER_LEN,
        );
        aad.extend_from_slice(AAD_DOMAIN);
        aad.push(FORMAT_VERSION);
        for field in [care_system, path] {
            aad.extend_from_slice(&(field.len() as u32).to_be_bytes());
            aad.extend_from_slice(field);
        }
        aad.extend_from_slice(&header.to_bytes());

        Ok(Self {
            key: LessSafeKey::new(key),
            nonce_prefix: header.nonce_prefix,
            aad,
        })
    }

    fn nonce(&self, index: u64, last: bool) -> Result<Nonce, FormatError> {
        let index = u32::try_from(index)
            .map_err(|_| FormatError::TooLarge(index.saturating_mul(SEGMENT)))?;
        let mut nonce = [0u8; 12];
        nonce[..NONCE_PREFIX_LEN].copy_from_slice(&self.nonce_prefix);
        nonce[NONCE_PREFIX_LEN..11].copy_from_slice(&index.to_be_bytes());
        nonce[11] = u8::from(last);
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Appends segment `index`'s ciphertext and tag to `out`.
    fn seal_segment(
        &self,
        index: u64,
        last: bool,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let nonce = self.nonce(index, last)?;
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(&self.aad), &mut out[start..])
            .map_err(|_| FormatError::Crypto("sealing a segment"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Appends segment `index`'s plaintext to `out`, or fails leaving `out` as it was.
    fn open_segment(
        &self,
        index: u64,
        last: bool,
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let failed = IntegrityError::Authentication { segment: index };
        let body_len = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(failed.clone())?;
        let (body, tag) = ciphertext.split_at(body_len);
        let nonce = self.nonce(index, last)?;
        let start = out.len();
        out.extend_from_slice(body);
        if self
            .key
            .open_in_place_separate_tag(nonce, Aad::from(&self.aad), tag, &mut out[start..])
            .is_err()
        {
            out.truncate(start);
            return Err(failed.into());
        }
        Ok(())
    }

    /// Decrypts the segments of `span` from `ciphertext` (exactly `span.ciphertext()`'s
    /// bytes) and returns exactly the span's plaintext range.
    pub fn decrypt_span(
        &self,
        span: &SegmentSpan,
        ciphertext: &[u8],
    ) -> Result<Bytes, FormatError> {
        let expected = span.ciphertext.end - span.ciphertext.start;
        if ciphertext.len() as u64 != expected {
            return Err(IntegrityError::UnexpectedCiphertextLength {
                expected,
                actual: ciphertext.len() as u64,
            }
            .into());
        }
        let mut out = Vec::with_capacity(ciphertext.len());
        let mut rest = ciphertext;
        for index in span.segments.clone() {
            let take = rest.len().min(SEGMENT_CIPHERTEXT as usize);
            let (segment, tail) = rest.split_at(take);
            let last = index + 1 == span.total_segments;
            // A non-final segment is always full: a short one means the length lied.
            if !last && segment.len() != SEGMENT_CIPHERTEXT as usize {
                return Err(IntegrityError::Authentication { segment: index }.into());
            }
            self.open_segment(index, last, segment, &mut out)?;
            rest = tail;
        }
        let base = span.segments.start * SEGMENT;
        let from = usize::try_from(span.plaintext.start - base)
            .map_err(|_| FormatError::TooLarge(span.plaintext.start))?;
        let to = usize::try_from(span.plaintext.end - base)
            .map_err(|_| FormatError::TooLarge(span.plaintext.end))?;
        let out = Bytes::from(out);
        if to > out.len() || from > to {
            return Err(IntegrityError::UnexpectedCiphertextLength {
                expected,
                actual: ciphertext.len() as u64,
            }
            .into());
        }
        Ok(out.slice(from..to))
    }
}

/// Encrypts an object as it streams: plaintext goes in through [`push`](Self::push) in
/// any chunking, ciphertext comes out in order. One full segment is held back until
/// more data or [`finish`](Self::finish) says whether it is the last.
#[derive(Debug)]
pub struct ObjectEncryptor {
    cipher: ObjectCipher,
    pending: Zeroizing<Vec<u8>>,
    next_segment: u64,
}

impl ObjectEncryptor {
    /// Starts an object under `root` (the TRK of `epoch`), writing its header to `out`.
    pub fn start(
        root: &SecretKey,
        epoch: KeyEpoch,
        binding: &ObjectBinding<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Self, FormatError> {
        let header = Header::generate(epoch)?;
        let cipher = ObjectCipher::new(root, &header, binding)?;
        out.extend_from_slice(&header.to_bytes());
        Ok(Self {
            cipher,
            pending: Zeroizing::new(Vec::with_capacity(SEGMENT_SIZE)),
            next_segment: 0,
        })
    }

    /// Encrypts every segment of `plaintext` that is known not to be the last, appending
    /// the ciphertext to `out`.
    pub fn push(&mut self, mut plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), FormatError> {
        while !plaintext.is_empty() {
            if self.pending.len() == SEGMENT_SIZE {
                // More bytes follow, so the held-back segment is not the last.
                self.cipher
                    .seal_segment(self.next_segment, false, &self.pending, out)?;
                self.next_segment += 1;
                self.pending.clear();
            }
            if self.pending.is_empty() && plaintext.len() > SEGMENT_SIZE {
                // Seal straight from the input: more bytes follow, so it is not the last.
                let (segment, rest) = plaintext.split_at(SEGMENT_SIZE);
                self.cipher
                    .seal_segment(self.next_segment, false, segment, out)?;
                self.next_segment += 1;
                plaintext = rest;
                continue;
            }
            let take = (SEGMENT_SIZE - self.pending.len()).min(plaintext.len());
            let (head, rest) = plaintext.split_at(take);
            self.pending.extend_from_slice(head);
            plaintext = rest;
        }
        Ok(())
    }

    /// Seals the held-back bytes as the last segment (empty for an empty object).
    pub fn finish(self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        self.cipher
            .seal_segment(self.next_segment, true, &self.pending, out)
    }
}

/// Encrypts a whole object for `binding` under `root`, the TRK of `epoch`.
pub fn encrypt_object(
    root: &SecretKey,
    epoch: KeyEpoch,
    binding: &ObjectBinding<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let len = plaintext.len() as u64;
    let total = ciphertext_len(len).ok_or(FormatError::TooLarge(len))?;
    let mut out =
        Vec::with_capacity(usize::try_from(total).map_err(|_| FormatError::TooLarge(len))?);
    let mut encryptor = ObjectEncryptor::start(root, epoch, binding, &mut out)?;
    encryptor.push(plaintext, &mut out)?;
    encryptor.finish(&mut out)?;
    Ok(out)
}

/// Decrypts a whole object read from `binding`'s path. `root` must be the TRK of the
/// epoch its header names ([`Header::parse`] reads it).
pub fn decrypt_object(
    root: &SecretKey,
    binding: &ObjectBinding<'_>,
    ciphertext: &[u8],
) -> Result<Bytes, FormatError> {
    let header = Header::parse(ciphertext)?;
    let len = plaintext_len(ciphertext.len() as u64)?;
    let cipher = ObjectCipher::new(root, &header, binding)?;
    if len == 0 {
        cipher.open_segment(0, true, &ciphertext[HEADER_LEN..], &mut Vec::new())?;
        return Ok(Bytes::new());
    }
    let span = SegmentSpan::new(0..len, len)
        .map_err(|_| IntegrityError::InvalidLength(ciphertext.len() as u64))?;
    cipher.decrypt_span(&span, &ciphertext[HEADER_LEN..])
}

/// Decrypts `plaintext` range of an object of `plaintext_len` bytes, given its header
/// and the ciphertext of the covering segments (`span.ciphertext()` of the span
/// [`SegmentSpan::new`] gives for the same range).
pub fn decrypt_range(
    root: &SecretKey,
    binding: &ObjectBinding<'_>,
    header: &Header,
    span: &SegmentSpan,
    segments: &[u8],
) -> Result<Bytes, FormatError> {
    ObjectCipher::new(root, header, binding)?.decrypt_span(span, segments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn care_system() -> CareSystemName {
        CareSystemName::parse("nw-london").unwrap()
    }

    fn key(byte: u8) -> SecretKey {
        SecretKey::from_slice(&[byte; KEY_LEN]).unwrap()
    }

    fn plaintext(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    fn encrypt(data: &[u8], path: &str) -> Vec<u8> {
        let cs = care_system();
        encrypt_object(
            &key(1),
            KeyEpoch::FIRST,
            &ObjectBinding::new(&cs, path),
            data,
        )
        .unwrap()
    }

    fn decrypt(ciphertext: &[u8], path: &str) -> Result<Bytes, FormatError> {
        let cs = care_system();
        decrypt_object(&key(1), &ObjectBinding::new(&cs, path), ciphertext)
    }

    fn read_range(ciphertext: &[u8], path: &str, range: Range<u64>) -> Result<Bytes, FormatError> {
        let cs = care_system();
        let header = Header::parse(ciphertext)?;
        let len = plaintext_len(ciphertext.len() as u64)?;
        let span = SegmentSpan::new(range, len).expect("range within object");
        let ct = span.ciphertext();
        let segments = ciphertext
            .get(ct.start as usize..ct.end as usize)
            .ok_or(IntegrityError::InvalidLength(ciphertext.len() as u64))?;
        decrypt_range(
            &key(1),
            &ObjectBinding::new(&cs, path),
            &header,
            &span,
            segments,
        )
    }

    fn is_integrity_error(result: Result<Bytes, FormatError>) -> bool {
        matches!(result, Err(FormatError::Integrity(_)))
    }

    #[test]
    fn header_layout_is_stable() {
        let ct = encrypt(b"hello", "a/b");
        assert_eq!(&ct[..4], b"SHCR");
        assert_eq!(ct[4], FORMAT_VERSION);
        assert_eq!(&ct[5..9], &1u32.to_be_bytes());
        assert_eq!(ct.len(), HEADER_LEN + 5 + TAG_LEN);
        let header = Header::parse(&ct).unwrap();
        assert_eq!(header.to_bytes().as_slice(), &ct[..HEADER_LEN]);
    }

    #[test]
    fn empty_object_is_one_empty_last_segment() {
        let ct = encrypt(b"", "empty");
        assert_eq!(ct.len(), HEADER_LEN + TAG_LEN);
        assert_eq!(plaintext_len(ct.len() as u64), Ok(0));
        assert_eq!(decrypt(&ct, "empty").unwrap(), Bytes::new());
        assert!(is_integrity_error(decrypt(&ct, "other")));
    }

    #[test]
    fn lengths_at_segment_boundaries() {
        for (p, segments) in [
            (1, 1),
            (4095, 1),
            (4096, 1),
            (4097, 2),
            (8192, 2),
            (8193, 3),
        ] {
            let c = ciphertext_len(p).unwrap();
            assert_eq!(c, HEADER + p + segments * TAG, "plaintext {p}");
            assert_eq!(plaintext_len(c), Ok(p));
            assert_eq!(encrypt(&plaintext(p as usize), "x").len() as u64, c);
        }
    }

    #[test]
    fn impossible_lengths_are_integrity_errors() {
        for c in [
            0,
            1,
            HEADER,
            HEADER + TAG - 1,
            HEADER + SEGMENT_CIPHERTEXT + 1,
            HEADER + SEGMENT_CIPHERTEXT + TAG,
        ] {
            assert_eq!(
                plaintext_len(c),
                Err(IntegrityError::InvalidLength(c)),
                "{c}"
            );
        }
    }

    #[test]
    fn unknown_version_and_magic_are_reported() {
        let mut ct = encrypt(b"x", "p");
        ct[4] = 9;
        assert_eq!(
            decrypt(&ct, "p"),
            Err(FormatError::Integrity(IntegrityError::UnsupportedVersion(
                9
            )))
        );
        ct[0] = b'X';
        assert_eq!(
            decrypt(&ct, "p"),
            Err(FormatError::Integrity(IntegrityError::NotEncrypted))
        );
    }

    #[test]
    fn wrong_root_key_fails() {
        let cs = care_system();
        let ct = encrypt(b"secret", "p");
        assert!(is_integrity_error(decrypt_object(
            &key(2),
            &ObjectBinding::new(&cs, "p"),
            &ct
        )));
    }

    #[test]
    fn other_care_system_fails() {
        let ct = encrypt(b"secret", "p");
        let other = CareSystemName::parse("kent").unwrap();
        assert!(is_integrity_error(decrypt_object(
            &key(1),
            &ObjectBinding::new(&other, "p"),
            &ct
        )));
    }

    #[test]
    fn dropping_the_last_full_segment_is_detected() {
        let ct = encrypt(&plaintext(3 * SEGMENT_SIZE), "p");
        let cut = HEADER_LEN + 2 * (SEGMENT_SIZE + TAG_LEN);
        assert!(is_integrity_error(decrypt(&ct[..cut], "p")));
    }

    #[test]
    fn streaming_chunking_does_not_change_the_format() {
        let cs = care_system();
        let binding = ObjectBinding::new(&cs, "p");
        let data = plaintext(3 * SEGMENT_SIZE + 17);
        for chunk in [
            1,
            100,
            SEGMENT_SIZE - 1,
            SEGMENT_SIZE,
            SEGMENT_SIZE + 1,
            3 * SEGMENT_SIZE,
        ] {
            let mut out = Vec::new();
            let mut enc =
                ObjectEncryptor::start(&key(1), KeyEpoch::FIRST, &binding, &mut out).unwrap();
            for part in data.chunks(chunk) {
                enc.push(part, &mut out).unwrap();
            }
            enc.finish(&mut out).unwrap();
            assert_eq!(out.len() as u64, ciphertext_len(data.len() as u64).unwrap());
            assert_eq!(decrypt(&out, "p").unwrap(), data, "chunk {chunk}");
        }
    }

    #[test]
    fn empty_and_past_end_ranges_are_refused() {
        assert!(SegmentSpan::new(5..5, 10).is_err());
        assert!(SegmentSpan::new(10..11, 10).is_err());
        assert!(SegmentSpan::new(0..1, 0).is_err());
        assert_eq!(SegmentSpan::new(8..100, 10).unwrap().plaintext(), 8..10);
    }

    #[test]
    fn covering_range_matches_span_before_clamping() {
        let len = 3 * SEGMENT + 100;
        for range in [0..1, 4095..4097, 5000..len, 0..len, 100..len + 5000] {
            let span = SegmentSpan::new(range.clone(), len).unwrap();
            let covering = covering_ciphertext_range(&range);
            let object_end = ciphertext_len(len).unwrap();
            assert_eq!(
                span.ciphertext(),
                covering.start..covering.end.min(object_end)
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip(len in 0usize..40 * 1024, a in any::<u64>(), b in any::<u64>()) {
            let data = plaintext(len);
            let ct = encrypt(&data, "wal/000001.sst");
            prop_assert_eq!(ct.len() as u64, ciphertext_len(len as u64).unwrap());
            prop_assert_eq!(plaintext_len(ct.len() as u64), Ok(len as u64));
            prop_assert_eq!(decrypt(&ct, "wal/000001.sst").unwrap(), data.as_slice());
            if len > 0 {
                let (x, y) = (a % len as u64, b % (len as u64 + 1));
                let range = x.min(y)..x.max(y).max(x.min(y) + 1);
                let got = read_range(&ct, "wal/000001.sst", range.clone()).unwrap();
                let end = range.end.min(len as u64);
                prop_assert_eq!(got, &data[range.start as usize..end as usize]);
            }
        }

        #[test]
        fn any_bit_flip_is_detected(len in 0usize..20 * 1024, at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut ct = encrypt(&plaintext(len), "p");
            let at = at.index(ct.len());
            ct[at] ^= 1 << bit;
            prop_assert!(is_integrity_error(decrypt(&ct, "p")));
            // A range read covering the flipped byte (or any range, for a header flip)
            // fails too.
            if len > 0 {
                let range = if at < HEADER_LEN {
                    0..1
                } else {
                    let segment = ((at - HEADER_LEN) / (SEGMENT_SIZE + TAG_LEN)) as u64;
                    segment * SEGMENT..(segment * SEGMENT + 1)
                };
                prop_assert!(is_integrity_error(read_range(&ct, "p", range)));
            }
        }

        #[test]
        fn any_truncation_is_detected(len in 0usize..20 * 1024, cut in any::<prop::sample::Index>()) {
            let ct = encrypt(&plaintext(len), "p");
            let cut = cut.index(ct.len());
            prop_assert!(is_integrity_error(decrypt(&ct[..cut], "p")));
        }

        #[test]
        fn any_extension_is_detected(len in 0usize..20 * 1024, extra in prop::collection::vec(any::<u8>(), 1..5000)) {
            let mut ct = encrypt(&plaintext(len), "p");
            ct.extend_from_slice(&extra);
            prop_assert!(is_integrity_error(decrypt(&ct, "p")));
        }

        #[test]
        fn moved_objects_do_not_decrypt(len in 0usize..20 * 1024, path in "[a-z0-9/._-]{1,40}") {
            prop_assume!(path != "manifest/00000000000000000001.manifest");
            let ct = encrypt(&plaintext(len), "manifest/00000000000000000001.manifest");
            prop_assert!(is_integrity_error(decrypt(&ct, &path)));
            if len > 0 {
                prop_assert!(is_integrity_error(read_range(&ct, &path, 0..1)));
            }
        }
    }
}
