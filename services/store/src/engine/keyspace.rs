//! The keyspace: how records, versions, index entries and audit events map to ordered keys.
//!
//! A key is a family byte followed by a tuple of elements. Elements are encoded so that the
//! byte order of encoded keys equals the element-wise order of the tuples (the FoundationDB tuple
//! layer's trick): a text or bytes element is its bytes with every `0x00` escaped as `0x00 0xFF`,
//! then a `0x00` terminator; an integer is 8 big-endian bytes. So a tuple's encoding is a prefix
//! of every longer tuple that starts with it, and range scans by prefix (all versions of one
//! resource, all index entries of one parameter value, all audit events in a time range) are
//! plain ordered scans.
//!
//! Invariants:
//! - `decode(encode(k)) == k` for every key;
//! - `encode(a) < encode(b)` iff `a < b` (family first, then elements in order);
//! - keys name resources by type and server-assigned id only: never a name, an NHS number or any
//!   other patient data (index values live in keys, but keys are encrypted with everything else
//!   in the bucket).

use std::cmp::Ordering;

/// What a key holds. The byte values are part of the on-disk format: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Family {
    /// `[type, id]` → the current version pointer of a resource.
    Current = 0x01,
    /// `[type, id, version]` → one immutable version of a resource.
    Version = 0x02,
    /// `[type, param, normalized value, id]` → empty; a search index entry.
    Index = 0x03,
    /// `[patient id, type, id]` → empty; the patient compartment.
    Compartment = 0x04,
    /// `[timestamp micros, type, id, version]` → empty; system-wide history in time order.
    History = 0x05,
    /// `[timestamp micros, event id]` → an audit event.
    Audit = 0x06,
    /// `[name, ...]` → engine and job metadata (export jobs, import progress).
    Meta = 0x07,
}

impl Family {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Current,
            0x02 => Self::Version,
            0x03 => Self::Index,
            0x04 => Self::Compartment,
            0x05 => Self::History,
            0x06 => Self::Audit,
            0x07 => Self::Meta,
            _ => return None,
        })
    }
}

/// One element of a key tuple.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Element {
    Text(String),
    Bytes(Vec<u8>),
    U64(u64),
}

const TAG_BYTES: u8 = 0x01;
const TAG_TEXT: u8 = 0x02;
const TAG_U64: u8 = 0x03;

impl Element {
    fn tag(&self) -> u8 {
        match self {
            Self::Bytes(_) => TAG_BYTES,
            Self::Text(_) => TAG_TEXT,
            Self::U64(_) => TAG_U64,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.tag());
        match self {
            Self::Text(s) => escape_into(s.as_bytes(), out),
            Self::Bytes(b) => escape_into(b, out),
            Self::U64(n) => out.extend_from_slice(&n.to_be_bytes()),
        }
    }
}

impl PartialOrd for Element {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Element {
    /// The order of the encodings: by tag, then by value (text and bytes bytewise).
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Self::Text(a), Self::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Self::Bytes(a), Self::Bytes(b)) => a.cmp(b),
            (Self::U64(a), Self::U64(b)) => a.cmp(b),
            _ => self.tag().cmp(&other.tag()),
        }
    }
}

impl From<&str> for Element {
    fn from(s: &str) -> Self {
        Self::Text(s.to_string())
    }
}

impl From<String> for Element {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl From<u64> for Element {
    fn from(n: u64) -> Self {
        Self::U64(n)
    }
}

fn escape_into(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        out.push(b);
        if b == 0x00 {
            out.push(0xFF);
        }
    }
    out.push(0x00);
}

/// A decoded key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub family: Family,
    pub elements: Vec<Element>,
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.family
            .cmp(&other.family)
            .then_with(|| self.elements.cmp(&other.elements))
    }
}

/// A key that could not be decoded: the database holds something this version did not write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed key at byte {offset}: {reason}")]
pub struct KeyDecodeError {
    pub offset: usize,
    pub reason: &'static str,
}

impl Key {
    pub fn new(family: Family, elements: impl IntoIterator<Item = Element>) -> Self {
        Self {
            family,
            elements: elements.into_iter().collect(),
        }
    }

    /// The encoded key; also a scan prefix for every key that extends this tuple.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.elements.len() * 16);
        out.push(self.family as u8);
        for e in &self.elements {
            e.encode_into(&mut out);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KeyDecodeError> {
        let (&first, mut rest) = bytes.split_first().ok_or(KeyDecodeError {
            offset: 0,
            reason: "empty key",
        })?;
        let family = Family::from_byte(first).ok_or(KeyDecodeError {
            offset: 0,
            reason: "unknown family",
        })?;
        let mut elements = Vec::new();
        while let Some((&tag, after_tag)) = rest.split_first() {
            let offset = bytes.len() - rest.len();
            match tag {
                TAG_U64 => {
                    let (n, after) = after_tag.split_at_checked(8).ok_or(KeyDecodeError {
                        offset,
                        reason: "truncated integer",
                    })?;
                    let mut buf = [0u8; 8];
                    buf.copy_from_slice(n);
                    elements.push(Element::U64(u64::from_be_bytes(buf)));
                    rest = after;
                }
                TAG_TEXT | TAG_BYTES => {
                    let (raw, after) = unescape(after_tag).ok_or(KeyDecodeError {
                        offset,
                        reason: "unterminated or badly escaped string",
                    })?;
                    if tag == TAG_TEXT {
                        let text = String::from_utf8(raw).map_err(|_| KeyDecodeError {
                            offset,
                            reason: "text element is not UTF-8",
                        })?;
                        elements.push(Element::Text(text));
                    } else {
                        elements.push(Element::Bytes(raw));
                    }
                    rest = after;
                }
                _ => {
                    return Err(KeyDecodeError {
                        offset,
                        reason: "unknown element tag",
                    });
                }
            }
        }
        Ok(Self { family, elements })
    }
}

/// Splits an escaped, terminated string off the front of `bytes`.
fn unescape(bytes: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0x00 {
            if bytes.get(i + 1) == Some(&0xFF) {
                out.push(0x00);
                i += 2;
                continue;
            }
            return Some((out, &bytes[i + 1..]));
        }
        out.push(b);
        i += 1;
    }
    None
}

/// The smallest key greater than every key that starts with `prefix` (the exclusive end of a
/// prefix scan), or `None` when no such key exists (prefix is all `0xFF`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn element() -> impl Strategy<Value = Element> {
        prop_oneof![
            ".{0,12}".prop_map(Element::Text),
            proptest::collection::vec(prop_oneof![Just(0u8), Just(0xFFu8), any::<u8>()], 0..12)
                .prop_map(Element::Bytes),
            any::<u64>().prop_map(Element::U64),
        ]
    }

    fn family() -> impl Strategy<Value = Family> {
        prop_oneof![
            Just(Family::Current),
            Just(Family::Version),
            Just(Family::Index),
            Just(Family::Compartment),
            Just(Family::History),
            Just(Family::Audit),
            Just(Family::Meta),
        ]
    }

    fn key() -> impl Strategy<Value = Key> {
        (family(), proptest::collection::vec(element(), 0..5))
            .prop_map(|(family, elements)| Key { family, elements })
    }

    proptest! {
        #[test]
        fn round_trips(k in key()) {
            prop_assert_eq!(Key::decode(&k.encode()).unwrap(), k);
        }

        #[test]
        fn byte_order_is_tuple_order(a in key(), b in key()) {
            prop_assert_eq!(a.encode().cmp(&b.encode()), a.cmp(&b));
        }

        #[test]
        fn a_tuple_prefixes_its_extensions(k in key(), extra in element()) {
            let mut longer = k.clone();
            longer.elements.push(extra);
            let (short, long) = (k.encode(), longer.encode());
            prop_assert!(long.starts_with(&short));
            let end = prefix_end(&short).unwrap();
            prop_assert!(long.as_slice() < end.as_slice());
        }
    }

    #[test]
    fn text_prefix_does_not_match_a_longer_word() {
        // "Smith" must not be a tuple prefix of "Smithson" once terminated.
        let smith = Key::new(
            Family::Index,
            ["Patient".into(), "family".into(), "smith".into()],
        );
        let smithson = Key::new(
            Family::Index,
            ["Patient".into(), "family".into(), "smithson".into()],
        );
        assert!(!smithson.encode().starts_with(&smith.encode()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Key::decode(&[]).is_err());
        assert!(Key::decode(&[0x99]).is_err());
        assert!(Key::decode(&[0x01, TAG_TEXT, b'a']).is_err());
        assert!(Key::decode(&[0x01, TAG_U64, 1, 2]).is_err());
    }
}
