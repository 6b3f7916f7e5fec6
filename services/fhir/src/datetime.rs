//! FHIR date, dateTime and instant values as half-open ranges of UTC instants.
//!
//! FHIR gives a partial date the meaning of the whole period it names: `2024` is the year,
//! `2024-03` the month, `2024-03-05T10:00:00Z` that second. A value therefore parses to a
//! [`DateRange`] `[start, end)` in microseconds since the Unix epoch, UTC. Search predicates and
//! index entries both use this one representation.
//!
//! Invariants:
//! - `start < end` for every range (an open start is `i64::MIN`, an open end is `i64::MAX`);
//! - years are 0001..=9999 (FHIR's grammar); calendar dates are checked (no 2023-02-29);
//! - in [`Strictness::Resource`] mode a time needs seconds and a timezone (FHIR's rule for stored
//!   data); in [`Strictness::Search`] mode `hh:mm` is allowed and a missing timezone means UTC;
//! - a date without a time is taken as the UTC day (FHIR leaves the zone unstated; the server
//!   picks one, and UTC is the only choice that is stable across clients);
//! - [`DateRange::to_key`] is order preserving: byte order of keys equals order of `start`, then
//!   `end`.

use time::{Date, Month};

/// Microseconds per day.
const DAY: i64 = 86_400_000_000;
/// The Julian day number of 1970-01-01.
const UNIX_EPOCH_JULIAN_DAY: i64 = 2_440_588;

/// Why a string is not a FHIR date/dateTime/instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DateError {
    #[error(
        "not a FHIR date or dateTime (expected YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+zz:zz)"
    )]
    Syntax,
    #[error("not a calendar date (month, day or time out of range)")]
    OutOfRange,
    #[error("a dateTime with a time must have a timezone (Z or +hh:mm) and seconds")]
    MissingTimeParts,
    #[error("the period ends before it starts")]
    EndBeforeStart,
}

/// How strictly to read a value: stored data follows FHIR's grammar exactly; search values are
/// allowed the shorter forms clients commonly send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    Resource,
    Search,
}

/// A half-open range `[start, end)` of UTC instants in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DateRange {
    start: i64,
    end: i64,
}

impl DateRange {
    /// The earliest representable instant, used for a period without a start.
    pub const OPEN_START: i64 = i64::MIN;
    /// The latest representable instant, used for a period without an end.
    pub const OPEN_END: i64 = i64::MAX;

    /// A range `[start, end)`; `None` unless `start < end`.
    pub fn new(start: i64, end: i64) -> Option<Self> {
        (start < end).then_some(Self { start, end })
    }

    /// Inclusive start, microseconds since the Unix epoch (UTC).
    pub fn start(&self) -> i64 {
        self.start
    }

    /// Exclusive end, microseconds since the Unix epoch (UTC).
    pub fn end(&self) -> i64 {
        self.end
    }

    /// Whether `other` lies entirely within `self`.
    pub fn contains(&self, other: &DateRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether the two ranges share at least one instant.
    pub fn overlaps(&self, other: &DateRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Parses a FHIR date, dateTime or instant.
    pub fn parse(input: &str, strictness: Strictness) -> Result<Self, DateError> {
        parse_value(input, strictness, false)
    }

    /// Parses a FHIR `date` (no time part allowed), e.g. `Patient.birthDate`.
    pub fn parse_date(input: &str) -> Result<Self, DateError> {
        parse_value(input, Strictness::Resource, true)
    }

    /// The range of a FHIR Period: from the start of `start` to the end of `end` (a period ending
    /// `2024-03` runs through March); a missing side is open.
    pub fn period(start: Option<DateRange>, end: Option<DateRange>) -> Result<Self, DateError> {
        let s = start.map_or(Self::OPEN_START, |r| r.start);
        let e = end.map_or(Self::OPEN_END, |r| r.end);
        Self::new(s, e).ok_or(DateError::EndBeforeStart)
    }

    /// The order-preserving key text: 16 hex digits of the start then 16 of the end, each the
    /// two's-complement value with its sign bit flipped so that unsigned order is signed order.
    pub fn to_key(&self) -> String {
        format!("{:016x}{:016x}", ordered(self.start), ordered(self.end))
    }

    /// The key text of the first range starting at or after `start` (for range scans).
    pub fn key_lower_bound(start: i64) -> String {
        format!("{:016x}", ordered(start))
    }

    /// Reads back a key written by [`DateRange::to_key`].
    pub fn from_key(key: &str) -> Option<Self> {
        if key.len() != 32 || !key.is_ascii() {
            return None;
        }
        let s = u64::from_str_radix(&key[..16], 16).ok()?;
        let e = u64::from_str_radix(&key[16..], 16).ok()?;
        Self::new(unordered(s), unordered(e))
    }
}

/// Formats microseconds since the Unix epoch as a FHIR instant in UTC with microsecond
/// precision (`2024-03-05T10:00:00.000000Z`), e.g. for `meta.lastUpdated`; `None` outside years
/// 0001..=9999.
pub fn format_instant(micros: i64) -> Option<String> {
    let days = micros.div_euclid(DAY);
    let in_day = micros.rem_euclid(DAY);
    let julian = i32::try_from(days + UNIX_EPOCH_JULIAN_DAY).ok()?;
    let date = Date::from_julian_day(julian).ok()?;
    if !(1..=9999).contains(&date.year()) {
        return None;
    }
    let secs = in_day / 1_000_000;
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        date.year(),
        u8::from(date.month()),
        date.day(),
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        in_day % 1_000_000
    ))
}

fn ordered(v: i64) -> u64 {
    (v as u64) ^ (1 << 63)
}

fn unordered(v: u64) -> i64 {
    (v ^ (1 << 63)) as i64
}

/// A cursor over ASCII input.
struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Scanner<'_> {
    fn digits(&mut self, n: usize) -> Result<u32, DateError> {
        let end = self.pos.checked_add(n).ok_or(DateError::Syntax)?;
        let slice = self.bytes.get(self.pos..end).ok_or(DateError::Syntax)?;
        let mut v = 0u32;
        for &b in slice {
            if !b.is_ascii_digit() {
                return Err(DateError::Syntax);
            }
            v = v * 10 + u32::from(b - b'0');
        }
        self.pos = end;
        Ok(v)
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.bytes.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn done(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

fn julian_day(year: u32, month: u32, day: u32) -> Result<i64, DateError> {
    let year = i32::try_from(year).map_err(|_| DateError::OutOfRange)?;
    let month = u8::try_from(month)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or(DateError::OutOfRange)?;
    let day = u8::try_from(day).map_err(|_| DateError::OutOfRange)?;
    let date = Date::from_calendar_date(year, month, day).map_err(|_| DateError::OutOfRange)?;
    Ok(i64::from(date.to_julian_day()))
}

fn last_day_of_month(year: u32, month: u32) -> Result<u32, DateError> {
    let y = i32::try_from(year).map_err(|_| DateError::OutOfRange)?;
    let m = u8::try_from(month)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or(DateError::OutOfRange)?;
    Ok(u32::from(m.length(y)))
}

fn day_start_micros(julian: i64) -> i64 {
    (julian - UNIX_EPOCH_JULIAN_DAY) * DAY
}

fn parse_value(
    input: &str,
    strictness: Strictness,
    date_only: bool,
) -> Result<DateRange, DateError> {
    let mut s = Scanner {
        bytes: input.as_bytes(),
        pos: 0,
    };
    let year = s.digits(4)?;
    if year == 0 {
        return Err(DateError::OutOfRange);
    }
    if s.done() {
        let start = day_start_micros(julian_day(year, 1, 1)?);
        let end = day_start_micros(julian_day(year, 12, 31)? + 1);
        return DateRange::new(start, end).ok_or(DateError::OutOfRange);
    }
    if !s.eat(b'-') {
        return Err(DateError::Syntax);
    }
    let month = s.digits(2)?;
    if s.done() {
        let last = last_day_of_month(year, month)?;
        let start = day_start_micros(julian_day(year, month, 1)?);
        let end = day_start_micros(julian_day(year, month, last)? + 1);
        return DateRange::new(start, end).ok_or(DateError::OutOfRange);
    }
    if !s.eat(b'-') {
        return Err(DateError::Syntax);
    }
    let day = s.digits(2)?;
    let day_start = day_start_micros(julian_day(year, month, day)?);
    if s.done() {
        return DateRange::new(day_start, day_start + DAY).ok_or(DateError::OutOfRange);
    }
    if date_only || !s.eat(b'T') {
        return Err(DateError::Syntax);
    }
    let hour = s.digits(2)?;
    if !s.eat(b':') {
        return Err(DateError::Syntax);
    }
    let minute = s.digits(2)?;
    let mut width: i64 = 60_000_000;
    let mut second = 0u32;
    let mut fraction: i64 = 0;
    if s.eat(b':') {
        second = s.digits(2)?;
        width = 1_000_000;
        if s.eat(b'.') {
            let mut scale = 100_000i64;
            let mut count = 0usize;
            while let Some(b) = s.peek().filter(u8::is_ascii_digit) {
                s.pos += 1;
                count += 1;
                if scale > 0 {
                    fraction += i64::from(b - b'0') * scale;
                    width = scale;
                    scale /= 10;
                }
            }
            if count == 0 {
                return Err(DateError::Syntax);
            }
        }
    } else if strictness == Strictness::Resource {
        return Err(DateError::MissingTimeParts);
    }
    // FHIR's grammar allows a leap second (`60`).
    if hour > 23 || minute > 59 || second > 60 {
        return Err(DateError::OutOfRange);
    }
    let offset_minutes: i64 = if s.done() {
        if strictness == Strictness::Resource {
            return Err(DateError::MissingTimeParts);
        }
        0
    } else if s.eat(b'Z') {
        0
    } else {
        let sign = if s.eat(b'+') {
            1
        } else if s.eat(b'-') {
            -1
        } else {
            return Err(DateError::Syntax);
        };
        let oh = s.digits(2)?;
        if !s.eat(b':') {
            return Err(DateError::Syntax);
        }
        let om = s.digits(2)?;
        if oh > 14 || om > 59 {
            return Err(DateError::OutOfRange);
        }
        sign * i64::from(oh * 60 + om)
    };
    if !s.done() {
        return Err(DateError::Syntax);
    }
    let local = day_start + i64::from(hour * 3600 + minute * 60 + second) * 1_000_000 + fraction;
    let start = local - offset_minutes * 60_000_000;
    DateRange::new(start, start + width).ok_or(DateError::OutOfRange)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: i64 = 1_000_000;

    fn r(s: &str) -> DateRange {
        DateRange::parse(s, Strictness::Resource).unwrap()
    }

    fn q(s: &str) -> DateRange {
        DateRange::parse(s, Strictness::Search).unwrap()
    }

    #[test]
    fn epoch_day() {
        assert_eq!(r("1970-01-01"), DateRange::new(0, DAY).unwrap());
    }

    #[test]
    fn precision_gives_the_whole_period() {
        let year = r("2024");
        assert_eq!(year.start(), r("2024-01-01").start());
        assert_eq!(year.end(), r("2025-01-01").start());
        let month = r("2024-02");
        assert_eq!(month.end() - month.start(), 29 * DAY, "leap February");
        assert_eq!(r("2023-02").end() - r("2023-02").start(), 28 * DAY);
        assert_eq!(r("2024-03-05").end() - r("2024-03-05").start(), DAY);
        let second = r("2024-03-05T10:00:00Z");
        assert_eq!(second.end() - second.start(), SEC);
        assert_eq!(second.start(), r("2024-03-05").start() + 10 * 3600 * SEC);
        let ms = r("2024-03-05T10:00:00.123Z");
        assert_eq!(ms.start(), second.start() + 123_000);
        assert_eq!(ms.end() - ms.start(), 1_000);
        let ns = r("2024-03-05T10:00:00.123456789Z");
        assert_eq!(ns.start(), second.start() + 123_456);
        assert_eq!(ns.end() - ns.start(), 1);
        let minute = q("2024-03-05T10:00");
        assert_eq!(minute.end() - minute.start(), 60 * SEC);
    }

    #[test]
    fn last_year_and_first_year() {
        let y = r("9999");
        assert!(y.start() < y.end());
        assert_eq!(r("9999-12").end(), y.end());
        assert!(r("0001").start() < 0);
    }

    #[test]
    fn timezones_convert_to_utc() {
        assert_eq!(
            r("2024-03-05T10:00:00+01:00").start(),
            r("2024-03-05T09:00:00Z").start()
        );
        assert_eq!(
            r("2024-03-05T10:00:00-05:30").start(),
            r("2024-03-05T15:30:00Z").start()
        );
        assert_eq!(
            q("2024-03-05T10:00").start(),
            r("2024-03-05T10:00:00Z").start()
        );
    }

    #[test]
    fn invalid_values() {
        use DateError::*;
        let cases = [
            ("", Syntax),
            ("24", Syntax),
            ("2024-3", Syntax),
            ("2024-03-5", Syntax),
            ("2024/03/05", Syntax),
            ("0000", OutOfRange),
            ("2024-13", OutOfRange),
            ("2024-00", OutOfRange),
            ("2023-02-29", OutOfRange),
            ("2024-04-31", OutOfRange),
            ("2024-03-05T", Syntax),
            ("2024-03-05T24:00:00Z", OutOfRange),
            ("2024-03-05T10:60:00Z", OutOfRange),
            ("2024-03-05T10:00:00", MissingTimeParts),
            ("2024-03-05T10:00Z", MissingTimeParts),
            ("2024-03-05T10:00:00.Z", Syntax),
            ("2024-03-05T10:00:00+1:00", Syntax),
            ("2024-03-05T10:00:00+15:00", OutOfRange),
            ("2024-03-05T10:00:00Zjunk", Syntax),
            ("２０２４", Syntax),
        ];
        for (input, err) in cases {
            assert_eq!(
                DateRange::parse(input, Strictness::Resource),
                Err(err),
                "{input:?}"
            );
        }
        assert_eq!(
            DateRange::parse_date("2024-03-05T10:00:00Z"),
            Err(DateError::Syntax)
        );
        assert!(DateRange::parse_date("2024-03-05").is_ok());
    }

    #[test]
    fn periods() {
        let p = DateRange::period(Some(r("2024-01")), Some(r("2024-03"))).unwrap();
        assert_eq!(p.start(), r("2024-01-01").start());
        assert_eq!(p.end(), r("2024-04-01").start());
        let open = DateRange::period(Some(r("2024")), None).unwrap();
        assert_eq!(open.end(), DateRange::OPEN_END);
        let open = DateRange::period(None, Some(r("2024"))).unwrap();
        assert_eq!(open.start(), DateRange::OPEN_START);
        assert_eq!(
            DateRange::period(Some(r("2024")), Some(r("2023"))),
            Err(DateError::EndBeforeStart)
        );
    }

    #[test]
    fn instants_format() {
        assert_eq!(
            format_instant(0).as_deref(),
            Some("1970-01-01T00:00:00.000000Z")
        );
        assert_eq!(
            format_instant(r("2024-03-05T10:11:12.5Z").start()).as_deref(),
            Some("2024-03-05T10:11:12.500000Z")
        );
        assert_eq!(format_instant(i64::MAX), None);
    }

    proptest! {
        #[test]
        fn formatted_instants_parse_back(micros in -62_135_596_800_000_000i64..253_402_300_799_000_000) {
            let text = format_instant(micros).unwrap();
            prop_assert_eq!(DateRange::parse(&text, Strictness::Resource).unwrap().start(), micros);
        }

        #[test]
        fn keys_round_trip_and_preserve_order(
            a in any::<i64>(), b in any::<i64>(), c in any::<i64>(), d in any::<i64>()
        ) {
            if let (Some(x), Some(y)) = (DateRange::new(a.min(b), a.max(b)), DateRange::new(c.min(d), c.max(d))) {
                prop_assert_eq!(DateRange::from_key(&x.to_key()), Some(x));
                prop_assert_eq!(x.to_key().cmp(&y.to_key()), x.cmp(&y));
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = DateRange::parse(&s, Strictness::Resource);
            let _ = DateRange::parse(&s, Strictness::Search);
        }

        #[test]
        fn generated_datetimes_parse(
            y in 1u32..=9999, m in 1u32..=12, d in 1u32..=28, h in 0u32..24, mi in 0u32..60, s in 0u32..60
        ) {
            let v = format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z");
            let range = DateRange::parse(&v, Strictness::Resource).unwrap();
            let day = DateRange::parse(&v[..10], Strictness::Resource).unwrap();
            prop_assert!(day.contains(&range));
        }
    }
}
