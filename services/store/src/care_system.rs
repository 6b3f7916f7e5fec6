//! The name of a care system, parsed once at the edge.
//!
//! A care system's name is part of every cryptographic binding the store makes
//! (the AAD of every object segment, the KMS encryption context of its root keys),
//! so it must be one canonical spelling: a lowercase DNS label (`[a-z0-9-]`, 1–63
//! characters, no leading or trailing hyphen), the same shape Kubernetes requires
//! for the namespace a care system runs in. Names carry no PHI.

use std::fmt;
use std::str::FromStr;

/// A validated care system name, e.g. `nw-london`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CareSystemName(String);

/// Why a string is not a care system name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a valid care system name: use 1-63 lowercase letters, digits or hyphens, \
     starting and ending with a letter or digit"
)]
pub struct InvalidCareSystemName {
    input: String,
}

/// Longest DNS label, and so the longest care system name.
const MAX_LEN: usize = 63;

impl CareSystemName {
    /// Parses `input` as a care system name.
    pub fn parse(input: &str) -> Result<Self, InvalidCareSystemName> {
        let well_formed = !input.is_empty()
            && input.len() <= MAX_LEN
            && input
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !input.starts_with('-')
            && !input.ends_with('-');
        if well_formed {
            Ok(Self(input.to_owned()))
        } else {
            Err(InvalidCareSystemName {
                input: input.to_owned(),
            })
        }
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CareSystemName {
    type Err = InvalidCareSystemName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for CareSystemName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for CareSystemName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for name in ["a", "nw-london", "icb-42", &"x".repeat(63)] {
            assert_eq!(CareSystemName::parse(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn rejects_anything_else() {
        for name in [
            "",
            "-a",
            "a-",
            "NW-London",
            "nw_london",
            "nw london",
            "nw/london",
            &"x".repeat(64),
        ] {
            assert!(CareSystemName::parse(name).is_err(), "{name:?} accepted");
        }
    }
}
