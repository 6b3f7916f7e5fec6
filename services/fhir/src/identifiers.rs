//! UK Core identifiers: NHS numbers and ODS organisation codes, parsed into types at the edge.
//!
//! Invariants:
//! - an [`NhsNumber`] holds exactly ten ASCII digits whose last digit is the Modulus 11 check
//!   digit of the first nine (NHS Data Dictionary: weights 10 down to 2, check = 11 − (sum mod 11),
//!   11 becomes 0, 10 means the number was never issued and is invalid);
//! - an [`OdsCode`] holds 3 to 10 ASCII uppercase letters or digits;
//! - errors never carry the rejected value (it may be patient data), only what was wrong.

use std::fmt;
use std::str::FromStr;

/// The UK Core identifier system of NHS numbers.
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// The UK Core identifier system of ODS organisation codes.
pub const ODS_ORGANIZATION_CODE_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// Why a string is not an NHS number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    #[error("an NHS number has exactly 10 digits (spaces or hyphens between groups are allowed)")]
    Syntax,
    #[error("the NHS number fails the Modulus 11 check: check the digits for a typing error")]
    CheckDigit,
}

/// A syntactically valid NHS number (10 digits passing Modulus 11), held as canonical digits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NhsNumber([u8; 10]);

impl NhsNumber {
    /// Parses an NHS number written as 10 digits, optionally grouped 3-3-4 with single spaces or
    /// hyphens ("943 476 5919", "943-476-5919"). Any other separator or grouping is rejected so
    /// that a typing error is not silently "corrected" into someone else's number.
    pub fn parse(input: &str) -> Result<Self, NhsNumberError> {
        let bytes = input.as_bytes();
        let digits: Vec<u8> = match bytes.len() {
            10 => bytes.to_vec(),
            12 => {
                let sep = bytes[3];
                if !(sep == b' ' || sep == b'-') || bytes[7] != sep {
                    return Err(NhsNumberError::Syntax);
                }
                bytes[..3]
                    .iter()
                    .chain(&bytes[4..7])
                    .chain(&bytes[8..])
                    .copied()
                    .collect()
            }
            _ => return Err(NhsNumberError::Syntax),
        };
        let mut out = [0u8; 10];
        for (slot, b) in out.iter_mut().zip(&digits) {
            if !b.is_ascii_digit() {
                return Err(NhsNumberError::Syntax);
            }
            *slot = b - b'0';
        }
        let mut first_nine = [0u8; 9];
        first_nine.copy_from_slice(&out[..9]);
        match check_digit(&first_nine) {
            Some(check) if check == out[9] => Ok(Self(out)),
            _ => Err(NhsNumberError::CheckDigit),
        }
    }

    /// The ten digits without separators, the form stored and indexed.
    pub fn as_digits(&self) -> String {
        self.0.iter().map(|d| char::from(b'0' + d)).collect()
    }
}

/// The Modulus 11 check digit of the first nine digits of an NHS number, or `None` when the
/// remainder makes the check digit 10 (no NHS number has such a prefix).
pub fn check_digit(first_nine: &[u8; 9]) -> Option<u8> {
    let sum: u32 = first_nine
        .iter()
        .zip((2..=10u32).rev())
        .map(|(&d, w)| u32::from(d) * w)
        .sum();
    match 11 - (sum % 11) {
        11 => Some(0),
        10 => None,
        // Provably < 10 here: 11 - (sum % 11) is in 1..=11 and 10, 11 are handled above.
        c => u8::try_from(c).ok(),
    }
}

impl FromStr for NhsNumber {
    type Err = NhsNumberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_digits())
    }
}

/// Debug does not print the number: it is patient data and Debug output ends up in logs.
impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NhsNumber(<redacted>)")
    }
}

/// Why a string is not an ODS code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OdsCodeError {
    #[error(
        "an ODS code is 3 to 10 uppercase letters or digits (for example \"RR8\" or \"Y02494\")"
    )]
    Syntax,
}

/// An Organisation Data Service code.
///
/// The rule: 3 to 10 ASCII characters, each an uppercase letter or a digit. Real codes are 3
/// (trusts, e.g. `RR8`), 5 (sites, e.g. `RR801`), 6 (GP practices, e.g. `Y02494`) or more
/// characters; ODS publishes no single grammar across all organisation types, so the rule
/// checks only the alphabet and length and does not guess per-type shapes. Lowercase is
/// rejected rather than upper-cased: identifiers are compared exactly elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OdsCode(String);

impl OdsCode {
    pub fn parse(input: &str) -> Result<Self, OdsCodeError> {
        let ok = (3..=10).contains(&input.len())
            && input
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if ok {
            Ok(Self(input.to_string()))
        } else {
            Err(OdsCodeError::Syntax)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for OdsCode {
    type Err = OdsCodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_valid_numbers_parse() {
        for n in ["9434765919", "9434765870", "9000000009", "4010232137"] {
            let parsed = NhsNumber::parse(n).unwrap();
            assert_eq!(parsed.as_digits(), n);
        }
    }

    #[test]
    fn formatted_numbers_parse_to_canonical_digits() {
        assert_eq!(
            NhsNumber::parse("943 476 5919").unwrap().as_digits(),
            "9434765919"
        );
        assert_eq!(
            NhsNumber::parse("943-476-5919").unwrap().to_string(),
            "9434765919"
        );
    }

    #[test]
    fn bad_formatting_is_a_syntax_error() {
        for n in [
            "",
            "943476591",
            "94347659190",
            "943 476-5919",
            "9434 76 5919",
            "943  4765919",
            "94347659l9",
            "943 476 591９",
            " 9434765919",
            "+434765919",
        ] {
            assert_eq!(NhsNumber::parse(n), Err(NhsNumberError::Syntax), "{n:?}");
        }
    }

    #[test]
    fn wrong_check_digit_is_rejected() {
        assert_eq!(
            NhsNumber::parse("9434765918"),
            Err(NhsNumberError::CheckDigit)
        );
    }

    #[test]
    fn remainder_one_gives_check_digit_zero_and_remainder_zero_is_invalid() {
        // 000000001: sum = 1*2 = 2 → 11 - 2 = 9.
        assert_eq!(check_digit(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), Some(9));
        // All zeros: sum 0 → 11 → 0.
        assert_eq!(check_digit(&[0; 9]), Some(0));
        assert!(NhsNumber::parse("0000000000").is_ok());
        // 000000005: sum = 10 → 11 - 10 = 1.
        assert_eq!(check_digit(&[0, 0, 0, 0, 0, 0, 0, 0, 5]), Some(1));
        // 000000006: sum = 12 ≡ 1 (mod 11) → check 10 → no number has this prefix.
        assert_eq!(check_digit(&[0, 0, 0, 0, 0, 0, 0, 0, 6]), None);
        for last in 0..=9 {
            let n = format!("000000006{last}");
            assert_eq!(NhsNumber::parse(&n), Err(NhsNumberError::CheckDigit), "{n}");
        }
    }

    /// For a run of prefixes, exactly one last digit passes — or none when the check digit
    /// would be 10 — and it is the one computed by hand from the weights.
    #[test]
    fn exactly_one_check_digit_per_prefix() {
        let mut never_issued = 0;
        for prefix in (0..20_000u32).map(|i| 943_470_000 + i) {
            let text = format!("{prefix:09}");
            let digits: Vec<u32> = text.bytes().map(|b| u32::from(b - b'0')).collect();
            let sum: u32 = digits.iter().zip((2..=10).rev()).map(|(d, w)| d * w).sum();
            let expected = match 11 - sum % 11 {
                11 => Some(0),
                10 => None,
                c => Some(c),
            };
            let passing: Vec<u32> = (0..10)
                .filter(|last| NhsNumber::parse(&format!("{text}{last}")).is_ok())
                .collect();
            assert_eq!(passing, expected.into_iter().collect::<Vec<_>>(), "{text}");
            never_issued += usize::from(expected.is_none());
        }
        assert!(never_issued > 0, "the run covers remainder-1 prefixes");
    }

    #[test]
    fn debug_does_not_leak_the_number() {
        let n = NhsNumber::parse("9434765919").unwrap();
        assert!(!format!("{n:?}").contains("943"));
    }

    #[test]
    fn ods_codes() {
        for ok in ["RR8", "RR801", "Y02494", "X26", "ABCDEFGHIJ"] {
            assert_eq!(OdsCode::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "RR", "rr8", "RR 8", "RR-8", "ABCDEFGHIJK", "RÉ8"] {
            assert_eq!(OdsCode::parse(bad), Err(OdsCodeError::Syntax), "{bad:?}");
        }
    }

    fn valid_number() -> impl Strategy<Value = String> {
        proptest::array::uniform9(0u8..10).prop_filter_map("check digit 10", |nine| {
            check_digit(&nine).map(|c| {
                nine.iter()
                    .chain(std::iter::once(&c))
                    .map(|d| char::from(b'0' + d))
                    .collect()
            })
        })
    }

    proptest! {
        #[test]
        fn every_number_with_a_computed_check_digit_parses(n in valid_number()) {
            prop_assert_eq!(NhsNumber::parse(&n).unwrap().as_digits(), n.clone());
            let grouped = format!("{} {} {}", &n[..3], &n[3..6], &n[6..]);
            prop_assert_eq!(NhsNumber::parse(&grouped).unwrap().as_digits(), n);
        }

        #[test]
        fn any_single_digit_change_is_rejected(
            n in valid_number(),
            pos in 0usize..10,
            delta in 1u8..10,
        ) {
            let mut digits: Vec<u8> = n.bytes().map(|b| b - b'0').collect();
            digits[pos] = (digits[pos] + delta) % 10;
            let changed: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
            prop_assert_eq!(NhsNumber::parse(&changed), Err(NhsNumberError::CheckDigit));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,20}") {
            let _ = NhsNumber::parse(&s);
            let _ = OdsCode::parse(&s);
        }
    }
}
