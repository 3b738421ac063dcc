//! Phone numbers: anything a PBX or a Zendesk agent typed, normalised to E.164 for one default region.
//!
//! Parsing uses the `phonenumber` crate (a port of Google's libphonenumber with its metadata), never
//! hand-written patterns: both the numbers stored in Zendesk and the numbers in every query go through
//! [`PhoneParser::parse`], so "044 123-45-67", "+380 44 123 45 67" and "380441234567" all meet at
//! `+380441234567` when the default region is UA.
//!
//! An [`E164`] is kept as the number's digits in a `u64` (E.164 allows at most 15 digits and never
//! starts with 0), which makes it a cheap, compact hash key for the index.

use std::fmt;

use phonenumber::{PhoneNumber, country, metadata::DATABASE};

/// A phone number in E.164 form, stored as its digits (`+380441234567` is `380441234567`).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct E164(u64);

impl E164 {
    /// The digits as a number, without the leading `+`.
    pub fn digits(self) -> u64 {
        self.0
    }

    /// Builds an E.164 from its digits; `None` for 0 or more than 15 digits.
    pub fn from_digits(digits: u64) -> Option<Self> {
        (10..1_000_000_000_000_000)
            .contains(&digits)
            .then_some(Self(digits))
    }

    /// The cheap path for numbers that already look canonical: `+` followed by digits, with the
    /// usual separators (space, dash, dot, parentheses) ignored. The result is only a *candidate*:
    /// it has not been validated against the numbering plan, so callers must check it against a set
    /// of numbers that were themselves produced by [`PhoneParser::parse`] (where an equal candidate is
    /// the same number), and fall back to a full parse otherwise.
    pub fn candidate(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        let rest = raw.strip_prefix('+')?;
        let mut digits: u64 = 0;
        let mut count = 0u32;
        for b in rest.bytes() {
            match b {
                b'0'..=b'9' => {
                    if count == 0 && b == b'0' {
                        return None;
                    }
                    count += 1;
                    if count > 15 {
                        return None;
                    }
                    digits = digits * 10 + u64::from(b - b'0');
                }
                b' ' | b'-' | b'.' | b'(' | b')' => {}
                _ => return None,
            }
        }
        if count < 7 {
            None
        } else {
            Self::from_digits(digits)
        }
    }
}

impl fmt::Display for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "+{}", self.0)
    }
}

impl fmt::Debug for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "E164({self})")
    }
}

/// Why a number could not be normalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    /// Empty or only whitespace.
    #[error("the number is empty")]
    Empty,
    /// Longer than 64 bytes after trimming (the length is given).
    #[error("the number is too long ({0} characters, at most 64)")]
    TooLong(usize),
    /// libphonenumber could not read it as a valid number (the input is given).
    #[error("not a phone number: {0}")]
    Invalid(String),
}

/// Parses numbers for one default region (the region assumed for numbers without a country code).
#[derive(Clone)]
pub struct PhoneParser {
    region: country::Id,
    region_code: String,
}

impl fmt::Debug for PhoneParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhoneParser")
            .field("region", &self.region_code)
            .finish()
    }
}

/// The longest input we try to parse; anything longer is not a phone number.
pub(crate) const MAX_INPUT_LEN: usize = 64;

impl PhoneParser {
    /// `region` is an ISO 3166-1 alpha-2 code such as `UA` (case-insensitive).
    pub fn new(region: &str) -> Result<Self, String> {
        let code = region.trim().to_ascii_uppercase();
        let id: country::Id = code.parse().map_err(|_| {
            format!("unknown region {region:?}: expected an ISO 3166-1 alpha-2 code such as \"UA\"")
        })?;
        Ok(Self {
            region: id,
            region_code: code,
        })
    }

    #[cfg(test)]
    pub(crate) fn region(&self) -> &str {
        &self.region_code
    }

    /// Normalises `raw` to E.164. Accepts international and national formats with any of the usual
    /// separators, and the `00` / `+` international prefixes.
    pub fn parse(&self, raw: &str) -> Result<E164, PhoneError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(PhoneError::Empty);
        }
        if trimmed.len() > MAX_INPUT_LEN {
            return Err(PhoneError::TooLong(trimmed.len()));
        }
        if !trimmed.bytes().any(|b| b.is_ascii_digit()) {
            return Err(PhoneError::Invalid("it has no digits".into()));
        }
        let number = phonenumber::parse(Some(self.region), trimmed)
            .map_err(|e| PhoneError::Invalid(e.to_string()))?;
        e164_of(&number)
    }

    /// Like [`parse`](Self::parse) but for stored data: `None` instead of an error.
    pub fn parse_stored(&self, raw: &str) -> Option<E164> {
        self.parse(raw).ok()
    }
}

/// The E.164 digits of a parsed number: country code, the national number's leading zeros (Italy),
/// then its value — what `format().mode(Mode::E164)` prints, computed without the formatter, which
/// also matches the number against every national format pattern (half the cost of a parse) only
/// to discard the result in E.164 mode. Like the formatter, a country code without metadata is an
/// error.
fn e164_of(number: &PhoneNumber) -> Result<E164, PhoneError> {
    let code = number.code().value();
    if DATABASE.by_code(&code).is_none() {
        return Err(PhoneError::Invalid(format!("unknown country code +{code}")));
    }
    let national = number.national();
    let value = national.value();
    let value_digits = decimal_digits(value);
    let len = decimal_digits(code.into()) + u32::from(national.zeros()) + value_digits;
    if !(7..=15).contains(&len) {
        return Err(PhoneError::Invalid(format!(
            "{len} digits is not a plausible length"
        )));
    }
    let shift = 10u64.pow(u32::from(national.zeros()) + value_digits);
    E164::from_digits(u64::from(code) * shift + value)
        .ok_or_else(|| PhoneError::Invalid("not an E.164 number".into()))
}

fn decimal_digits(n: u64) -> u32 {
    n.checked_ilog10().map_or(1, |l| l + 1)
}

/// Masks a number for logs at info level: keeps the country code's first digits and the last two.
pub(crate) fn mask(raw: &str) -> String {
    let digits: Vec<char> = raw.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() <= 4 {
        return "*".repeat(digits.len().max(1));
    }
    let head: String = digits[..3].iter().collect();
    let tail: String = digits[digits.len() - 2..].iter().collect();
    format!("+{head}{}{tail}", "*".repeat(digits.len() - 5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ua() -> PhoneParser {
        PhoneParser::new("UA").unwrap()
    }

    #[test]
    fn formats_meet_at_one_e164() {
        let p = ua();
        let want = p.parse("+380441234567").unwrap();
        assert_eq!(want.to_string(), "+380441234567");
        for raw in [
            "044 123 45 67",
            "044 123-45-67",
            "(044) 123-45-67",
            "+38 (044) 123-45-67",
            "380441234567",
            "00380441234567",
            " +380 44 123 45 67 ",
        ] {
            assert_eq!(p.parse(raw), Ok(want), "{raw}");
        }
    }

    #[test]
    fn other_regions_keep_their_country_code() {
        let p = ua();
        assert_eq!(
            p.parse("+1 (555) 123-4567").unwrap().to_string(),
            "+15551234567"
        );
        assert_eq!(
            p.parse("+44 20 7946 0958").unwrap().to_string(),
            "+442079460958"
        );
        let us = PhoneParser::new("us").unwrap();
        assert_eq!(
            us.parse("(555) 123-4567").unwrap().to_string(),
            "+15551234567"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let p = ua();
        assert_eq!(p.parse(""), Err(PhoneError::Empty));
        assert_eq!(p.parse("   "), Err(PhoneError::Empty));
        assert!(matches!(p.parse("abc"), Err(PhoneError::Invalid(_))));
        assert!(matches!(p.parse("12"), Err(PhoneError::Invalid(_))));
        assert!(matches!(
            p.parse(&"1".repeat(80)),
            Err(PhoneError::TooLong(80))
        ));
        assert!(p.parse("+999999999999999999").is_err());
        assert!(PhoneParser::new("XX").is_err());
    }

    #[test]
    fn candidate_matches_parse_for_canonical_input() {
        let p = ua();
        for raw in ["+380441234567", "+380 44 123 45 67", "+1 (555) 123-4567"] {
            assert_eq!(E164::candidate(raw), Some(p.parse(raw).unwrap()), "{raw}");
        }
        assert_eq!(E164::candidate("0441234567"), None);
        assert_eq!(E164::candidate("+0441234567"), None);
        assert_eq!(E164::candidate("+38044x"), None);
    }

    /// The direct computation in `e164_of` agrees with the crate's own E.164 formatter, including
    /// Italian numbers that keep their leading zero and numbers of other regions.
    #[test]
    fn e164_matches_the_crate_formatter() {
        let p = ua();
        for raw in [
            "+39 06 6982 0000",
            "+39 02 1234 5678",
            "+44 20 7946 0958",
            "+1 (555) 123-4567",
            "044 123-45-67",
            "+380 50 123 45 67",
            "+7 495 123-45-67",
            "+86 10 1234 5678",
            "+225 07 12 34 56 78",
            "+800 1234 5678",
        ] {
            let number = phonenumber::parse(Some(p.region), raw.trim()).unwrap();
            let want = number.format().mode(phonenumber::Mode::E164).to_string();
            let got = p.parse(raw).map(|e| e.to_string());
            assert_eq!(
                got.as_deref().ok(),
                Some(want.as_str()).filter(|w| (8..=16).contains(&w.len())),
                "{raw}"
            );
        }
    }

    #[test]
    fn mask_hides_the_middle() {
        assert_eq!(mask("+380441234567"), "+380*******67");
        assert_eq!(mask("12"), "**");
    }
}
