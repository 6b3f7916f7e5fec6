//! Normalisation of index and query values so that equal-for-search values have equal bytes.
//!
//! Invariants:
//! - [`normalize_string`] is idempotent and case- and accent-insensitive: it lowercases, then
//!   decomposes (NFD) and drops combining marks, then collapses runs of whitespace to one space
//!   and trims; so "Zoë", "ZOE" and " zoe " all normalise to "zoe";
//! - FHIR string search is a prefix search, so `normalize(query)` being a prefix of
//!   `normalize(value)` is the match rule ([`string_matches`]);
//! - every index key value is capped at [`MAX_KEY_VALUE_BYTES`] bytes (cut at a character
//!   boundary) by [`cap`], on the index side and the query side alike, so longer values compare
//!   on their first bytes only.

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// The longest value, in bytes, that an index key holds.
pub const MAX_KEY_VALUE_BYTES: usize = 512;

/// Lowercases, strips accents and collapses whitespace (see the module invariants).
pub fn normalize_string(input: &str) -> String {
    let lowered = input.to_lowercase();
    let stripped: String = lowered.nfd().filter(|c| !is_combining_mark(*c)).collect();
    stripped.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// FHIR string search: does the (normalised) query match the (normalised) indexed value?
/// Both sides are expected to come from [`normalize_string`]; a prefix of the value matches.
pub fn string_matches(normalized_query: &str, normalized_value: &str) -> bool {
    normalized_value.starts_with(cap(normalized_query))
}

/// Cuts a value to at most [`MAX_KEY_VALUE_BYTES`] bytes at a character boundary.
pub(crate) fn cap(value: &str) -> &str {
    cut(value, MAX_KEY_VALUE_BYTES)
}

/// Cuts a value to at most `max` bytes at a character boundary.
pub(crate) fn cut(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accents_and_case_are_ignored() {
        assert_eq!(normalize_string("Zoë"), "zoe");
        assert_eq!(normalize_string("ZOË"), "zoe");
        assert_eq!(normalize_string("Zoe\u{0308}"), "zoe", "decomposed input");
        assert_eq!(normalize_string("Siân"), "sian");
        assert_eq!(normalize_string("Ó Súilleabháin"), "o suilleabhain");
        assert_eq!(
            normalize_string("Đặng"),
            "đang",
            "letters that are not base+mark stay"
        );
        assert_eq!(normalize_string("  Mary \t Ann "), "mary ann");
        assert_eq!(normalize_string("İpek"), "ipek");
        assert_eq!(normalize_string(""), "");
    }

    #[test]
    fn prefix_matching() {
        assert!(string_matches(
            &normalize_string("zoe"),
            &normalize_string("Zoë")
        ));
        assert!(string_matches(
            &normalize_string("Sm"),
            &normalize_string("Smith")
        ));
        assert!(string_matches("", "smith"));
        assert!(!string_matches("smithe", "smith"));
        assert!(!string_matches("mith", "smith"), "prefix, not substring");
    }

    #[test]
    fn cap_cuts_at_char_boundaries() {
        let long = "é".repeat(MAX_KEY_VALUE_BYTES);
        let capped = cap(&long);
        assert!(capped.len() <= MAX_KEY_VALUE_BYTES);
        assert!(long.starts_with(capped));
        assert_eq!(cap("abc"), "abc");
    }

    proptest! {
        #[test]
        fn normalisation_is_idempotent(s in "\\PC{0,40}") {
            let once = normalize_string(&s);
            prop_assert_eq!(normalize_string(&once), once.clone());
            prop_assert!(string_matches(&once, &once));
        }
    }
}
