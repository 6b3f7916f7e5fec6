//! Search query parsing: the URL's parameters turned into a typed [`SearchQuery`].
//!
//! Invariants:
//! - parsing never panics and is bounded: at most [`MAX_PARAMETERS`] parameters, each name at
//!   most [`MAX_NAME_BYTES`] and value at most [`MAX_VALUE_BYTES`] bytes, at most
//!   [`MAX_VALUES_PER_PARAMETER`] comma-separated alternatives;
//! - every error names the parameter (sanitised and cut to [`MAX_NAME_BYTES`]) and never echoes a
//!   value, since values are often patient data (an NHS number, a name);
//! - strict mode fails on the first unknown or malformed parameter; lenient mode
//!   (`Prefer: handling=lenient`) skips it and lists it in [`SearchQuery::ignored`], except that
//!   too many parameters is always an error;
//! - repeated parameters are ANDed, comma-separated values within one are ORed (FHIR);
//! - the query side normalises exactly like the index side ([`super::index`]), so each token,
//!   string and reference criterion becomes key matches ([`Criterion::key_matches`]) against
//!   [`super::IndexValue::to_key`] keys.

use std::fmt;

use super::index::{PRESENT_KEY, escape_system, reference_key, token_key};
use super::normalize::{cap, cut, normalize_string};
use super::registry::{ParamKind, SearchParam, find_param};
use crate::datetime::{DateError, DateRange, Strictness};
use crate::identifiers::{NHS_NUMBER_SYSTEM, NhsNumber};
use crate::resource::{ResourceId, ResourceType};

/// The most parameters one query may have.
pub const MAX_PARAMETERS: usize = 100;
/// The longest parameter name (with modifiers and chain), in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// The longest parameter value, in bytes.
pub const MAX_VALUE_BYTES: usize = 2048;
/// The most comma-separated alternatives in one value.
pub const MAX_VALUES_PER_PARAMETER: usize = 64;
/// The page size when `_count` is absent.
pub const DEFAULT_COUNT: u32 = 20;
/// The largest page size; larger `_count` values are lowered to it (FHIR lets servers do so).
pub const MAX_COUNT: u32 = 1000;
/// The longest paging cursor, in bytes.
pub const MAX_CURSOR_BYTES: usize = 512;

/// What is wrong with one parameter (never includes the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryProblem {
    #[error("value is longer than {MAX_VALUE_BYTES} bytes")]
    ValueTooLong,
    #[error("more than {MAX_VALUES_PER_PARAMETER} comma-separated values")]
    TooManyValues,
    #[error("value is empty")]
    EmptyValue,
    #[error("a backslash must escape ',', '|', '$' or '\\'")]
    BadEscape,
    #[error("modifier is not supported for this parameter")]
    UnsupportedModifier,
    #[error("{0}")]
    Date(DateError),
    #[error("not a valid resource id")]
    InvalidId,
    #[error("not a valid NHS number (10 digits passing the Modulus 11 check)")]
    InvalidNhsNumber,
    #[error("a reference is 'Type/id' or 'id' pointing to a type this parameter allows")]
    InvalidReference,
    #[error(":missing takes true or false")]
    InvalidMissing,
    #[error(
        "chained search needs a reference parameter, a type modifier when it allows several types, and one level only"
    )]
    InvalidChain,
    #[error("may appear only once")]
    Repeated,
    #[error("_count takes a whole number")]
    InvalidCount,
    #[error("_sort takes _lastUpdated or date parameters of this type, '-' for descending")]
    InvalidSort,
    #[error(
        "takes 'SourceType:reference-parameter[:TargetType]' naming a reference of the types involved"
    )]
    InvalidInclude,
    #[error("only JSON is supported")]
    UnsupportedFormat,
    #[error("the paging cursor is not one this server issued")]
    InvalidCursor,
}

/// Why a query cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error("too many search parameters (at most {MAX_PARAMETERS})")]
    TooManyParameters,
    #[error("unknown search parameter '{param}' for {resource_type}")]
    UnknownParameter {
        param: String,
        resource_type: ResourceType,
    },
    #[error("search parameter '{param}': {problem}")]
    InvalidParameter {
        param: String,
        problem: QueryProblem,
    },
}

impl SearchError {
    /// The parameter at fault, when there is one.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::TooManyParameters => None,
            Self::UnknownParameter { param, .. } | Self::InvalidParameter { param, .. } => {
                Some(param)
            }
        }
    }
}

/// Makes a client-supplied parameter name safe to echo: control characters replaced, cut.
fn sanitize_name(name: &str) -> String {
    let kept = cut(name, MAX_NAME_BYTES);
    let safe: String = kept
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if kept.len() < name.len() {
        format!("{safe}…")
    } else {
        safe
    }
}

/// An index key to look up: equal to, or starting with, the text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyMatch {
    Exact(String),
    Prefix(String),
}

/// One token alternative.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenQuery {
    /// `system|code`.
    SystemCode { system: String, code: String },
    /// `|code`: the code with no system.
    NoSystem { code: String },
    /// `code`: the code in any system.
    AnySystem { code: String },
    /// `system|`: any code in the system.
    System { system: String },
}

impl TokenQuery {
    pub fn key_match(&self) -> KeyMatch {
        match self {
            Self::SystemCode { system, code } => KeyMatch::Exact(token_key(system, code)),
            Self::NoSystem { code } => KeyMatch::Exact(token_key("", code)),
            Self::AnySystem { code } => KeyMatch::Exact(format!("c{}", cap(code))),
            Self::System { system } => KeyMatch::Prefix(format!("t{}|", escape_system(system))),
        }
    }
}

/// One string alternative.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringQuery {
    /// Case- and accent-insensitive prefix; holds the normalised text.
    Prefix(String),
    /// `:exact`; holds the text as given.
    Exact(String),
}

impl StringQuery {
    pub fn key_match(&self) -> KeyMatch {
        match self {
            Self::Prefix(s) => KeyMatch::Prefix(format!("s{}", cap(s))),
            Self::Exact(s) => KeyMatch::Exact(format!("e{}", cap(s))),
        }
    }
}

/// One reference alternative, resolved to a type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReferenceQuery {
    pub resource_type: ResourceType,
    pub id: ResourceId,
}

/// The prefix of a date search value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatePrefix {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Sa,
    Eb,
    Ap,
}

impl DatePrefix {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "eq" => Self::Eq,
            "ne" => Self::Ne,
            "lt" => Self::Lt,
            "gt" => Self::Gt,
            "le" => Self::Le,
            "ge" => Self::Ge,
            "sa" => Self::Sa,
            "eb" => Self::Eb,
            "ap" => Self::Ap,
            _ => return None,
        })
    }
}

/// One date alternative: a prefix and the range the search value denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DatePredicate {
    pub prefix: DatePrefix,
    pub range: DateRange,
}

impl DatePredicate {
    /// FHIR R4 date search semantics for an indexed range `target` against this search range
    /// `s` (both half-open): `eq` s contains target; `ne` not eq; `gt` target ends after s ends;
    /// `lt` target starts before s starts; `ge` gt or eq; `le` lt or eq; `sa` target starts at
    /// or after s ends; `eb` target ends at or before s starts; `ap` target overlaps s widened by
    /// 10% of the distance between s and `now` (microseconds since the Unix epoch, UTC).
    pub fn matches(&self, target: &DateRange, now: i64) -> bool {
        let s = &self.range;
        match self.prefix {
            DatePrefix::Eq => s.contains(target),
            DatePrefix::Ne => !s.contains(target),
            DatePrefix::Gt => target.end() > s.end(),
            DatePrefix::Lt => target.start() < s.start(),
            DatePrefix::Ge => target.end() > s.end() || s.contains(target),
            DatePrefix::Le => target.start() < s.start() || s.contains(target),
            DatePrefix::Sa => target.start() >= s.end(),
            DatePrefix::Eb => target.end() <= s.start(),
            DatePrefix::Ap => self.approximate(now).overlaps(target),
        }
    }

    fn approximate(&self, now: i64) -> DateRange {
        let s = &self.range;
        let margin = (i128::from(now) - i128::from(s.start())).abs() / 10;
        let margin = i64::try_from(margin).unwrap_or(i64::MAX);
        let start = s.start().saturating_sub(margin);
        let end = s.end().saturating_add(margin);
        DateRange::new(start, end).unwrap_or(*s)
    }

    /// The `[lower, upper)` bounds on index keys (`d…`, ordered by range start) that can hold a
    /// match; the store scans them and filters each entry with [`DatePredicate::matches`].
    pub fn key_range(&self, now: i64) -> (String, String) {
        let s = &self.range;
        let (lo, hi) = match self.prefix {
            DatePrefix::Eq => (s.start(), s.end()),
            DatePrefix::Lt | DatePrefix::Eb => (DateRange::OPEN_START, s.start()),
            DatePrefix::Le => (DateRange::OPEN_START, s.end()),
            DatePrefix::Sa => (s.end(), DateRange::OPEN_END),
            DatePrefix::Ap => (DateRange::OPEN_START, self.approximate(now).end()),
            DatePrefix::Ne | DatePrefix::Gt | DatePrefix::Ge => {
                (DateRange::OPEN_START, DateRange::OPEN_END)
            }
        };
        (
            format!("d{}", DateRange::key_lower_bound(lo)),
            format!("d{}", DateRange::key_lower_bound(hi)),
        )
    }
}

/// What one parameter asks for; alternatives within one criterion are ORed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Criterion {
    /// `:missing=true|false`: whether the resource has no value for the parameter. `false` is a
    /// key lookup of [`super::IndexValue::Present`]; `true` is its complement.
    Missing(bool),
    /// `_id`.
    Ids(Vec<ResourceId>),
    Tokens(Vec<TokenQuery>),
    Strings(Vec<StringQuery>),
    References(Vec<ReferenceQuery>),
    Dates(Vec<DatePredicate>),
}

impl Criterion {
    /// The index keys to look up for token, string and reference criteria and `:missing=false`
    /// (ORed); empty for `:missing=true` (the complement of `:missing=false`), `Ids` (answered
    /// from the resource keys) and `Dates` (use [`DatePredicate::key_range`]).
    pub fn key_matches(&self) -> Vec<KeyMatch> {
        match self {
            Self::Tokens(v) => v.iter().map(TokenQuery::key_match).collect(),
            Self::Strings(v) => v.iter().map(StringQuery::key_match).collect(),
            Self::References(v) => v
                .iter()
                .map(|r| KeyMatch::Exact(reference_key(r.resource_type, &r.id)))
                .collect(),
            Self::Missing(false) => vec![KeyMatch::Exact(PRESENT_KEY.to_string())],
            Self::Missing(true) | Self::Ids(_) | Self::Dates(_) => Vec::new(),
        }
    }
}

/// One level of chaining: the criterion applies to `param` of the referenced `target_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub target_type: ResourceType,
    pub param: &'static SearchParam,
}

/// One search condition. With a chain, `param` is the reference parameter followed and the
/// criterion applies to the chained parameter of the referenced resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub param: &'static SearchParam,
    pub chain: Option<Chain>,
    pub criterion: Criterion,
}

/// `_include` (`source` is the searched type) or `_revinclude` (resources of `source` whose
/// `param` points at the matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub source: ResourceType,
    pub param: &'static SearchParam,
    pub target: Option<ResourceType>,
}

/// One `_sort` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub param: &'static SearchParam,
    pub descending: bool,
}

/// A parsed search (see the module invariants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    pub resource_type: ResourceType,
    /// All must hold (AND).
    pub filters: Vec<Filter>,
    pub include: Vec<Include>,
    pub revinclude: Vec<Include>,
    pub sort: Vec<SortKey>,
    /// Page size, `0..=MAX_COUNT`.
    pub count: u32,
    /// The opaque cursor of the page asked for, as the client sent it.
    pub cursor: Option<String>,
    /// Parameters skipped in lenient mode, with why.
    pub ignored: Vec<SearchError>,
}

impl SearchQuery {
    /// Parses percent-decoded query pairs for a search on `resource_type`.
    pub fn parse<K, V>(
        resource_type: ResourceType,
        pairs: impl IntoIterator<Item = (K, V)>,
        lenient: bool,
    ) -> Result<Self, SearchError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut query = Self {
            resource_type,
            filters: Vec::new(),
            include: Vec::new(),
            revinclude: Vec::new(),
            sort: Vec::new(),
            count: DEFAULT_COUNT,
            cursor: None,
            ignored: Vec::new(),
        };
        let mut seen_count = false;
        let mut seen_sort = false;
        for (n, (name, value)) in pairs.into_iter().enumerate() {
            if n >= MAX_PARAMETERS {
                return Err(SearchError::TooManyParameters);
            }
            let (name, value) = (name.as_ref(), value.as_ref());
            let result = query.parse_pair(name, value, &mut seen_count, &mut seen_sort);
            match result {
                Ok(()) => {}
                Err(e) if lenient => query.ignored.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok(query)
    }

    fn parse_pair(
        &mut self,
        name: &str,
        value: &str,
        seen_count: &mut bool,
        seen_sort: &mut bool,
    ) -> Result<(), SearchError> {
        let invalid = |problem| SearchError::InvalidParameter {
            param: sanitize_name(name),
            problem,
        };
        let unknown = || SearchError::UnknownParameter {
            param: sanitize_name(name),
            resource_type: self.resource_type,
        };
        if name.len() > MAX_NAME_BYTES {
            return Err(unknown());
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(invalid(QueryProblem::ValueTooLong));
        }
        match name {
            "_count" => {
                if std::mem::replace(seen_count, true) {
                    return Err(invalid(QueryProblem::Repeated));
                }
                self.count = parse_count(value).map_err(invalid)?;
                return Ok(());
            }
            "_sort" => {
                if std::mem::replace(seen_sort, true) {
                    return Err(invalid(QueryProblem::Repeated));
                }
                self.sort = parse_sort(self.resource_type, value).map_err(invalid)?;
                return Ok(());
            }
            "_cursor" => {
                if self.cursor.is_some() {
                    return Err(invalid(QueryProblem::Repeated));
                }
                let ok = !value.is_empty()
                    && value.len() <= MAX_CURSOR_BYTES
                    && value.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(invalid(QueryProblem::InvalidCursor));
                }
                self.cursor = Some(value.to_string());
                return Ok(());
            }
            "_format" => {
                return match value {
                    "json" | "application/json" | "application/fhir+json" => Ok(()),
                    _ => Err(invalid(QueryProblem::UnsupportedFormat)),
                };
            }
            "_include" => {
                let include = parse_include(value).map_err(invalid)?;
                if include.source != self.resource_type {
                    return Err(invalid(QueryProblem::InvalidInclude));
                }
                self.include.push(include);
                return Ok(());
            }
            "_revinclude" => {
                let include = parse_include(value).map_err(invalid)?;
                let points_here = include.param.targets.contains(&self.resource_type)
                    && include.target.is_none_or(|t| t == self.resource_type);
                if !points_here {
                    return Err(invalid(QueryProblem::InvalidInclude));
                }
                self.revinclude.push(include);
                return Ok(());
            }
            _ => {}
        }
        let (head, chained) = match name.split_once('.') {
            Some((head, rest)) => (head, Some(rest)),
            None => (name, None),
        };
        let (param_name, modifier) = split_modifier(head);
        let param = find_param(self.resource_type, param_name).ok_or_else(unknown)?;
        let filter = match chained {
            None => Filter {
                param,
                chain: None,
                criterion: parse_criterion(param, modifier, value).map_err(invalid)?,
            },
            Some(rest) => {
                let target_type =
                    chain_target(param, modifier).ok_or(invalid(QueryProblem::InvalidChain))?;
                if rest.contains('.') {
                    return Err(invalid(QueryProblem::InvalidChain));
                }
                let (chained_name, chained_modifier) = split_modifier(rest);
                let chained_param = find_param(target_type, chained_name).ok_or_else(unknown)?;
                Filter {
                    param,
                    chain: Some(Chain {
                        target_type,
                        param: chained_param,
                    }),
                    criterion: parse_criterion(chained_param, chained_modifier, value)
                        .map_err(invalid)?,
                }
            }
        };
        self.filters.push(filter);
        Ok(())
    }
}

fn split_modifier(name: &str) -> (&str, Option<&str>) {
    match name.split_once(':') {
        Some((n, m)) => (n, Some(m)),
        None => (name, None),
    }
}

fn chain_target(param: &SearchParam, modifier: Option<&str>) -> Option<ResourceType> {
    if param.kind != ParamKind::Reference {
        return None;
    }
    match (modifier, param.targets) {
        (None, [only]) => Some(*only),
        (Some(m), targets) => {
            let t: ResourceType = m.parse().ok()?;
            targets.contains(&t).then_some(t)
        }
        (None, _) => None,
    }
}

fn parse_count(value: &str) -> Result<u32, QueryProblem> {
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(QueryProblem::InvalidCount);
    }
    let n: u64 = value.parse().map_err(|_| QueryProblem::InvalidCount)?;
    Ok(u32::try_from(n.min(u64::from(MAX_COUNT))).unwrap_or(MAX_COUNT))
}

fn parse_sort(resource_type: ResourceType, value: &str) -> Result<Vec<SortKey>, QueryProblem> {
    let mut keys = Vec::new();
    for item in value.split(',') {
        if keys.len() >= MAX_VALUES_PER_PARAMETER {
            return Err(QueryProblem::TooManyValues);
        }
        let (descending, name) = match item.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, item),
        };
        let param = find_param(resource_type, name)
            .filter(|p| p.kind == ParamKind::Date)
            .ok_or(QueryProblem::InvalidSort)?;
        keys.push(SortKey { param, descending });
    }
    Ok(keys)
}

fn parse_include(value: &str) -> Result<Include, QueryProblem> {
    let mut parts = value.split(':');
    let source: ResourceType = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(QueryProblem::InvalidInclude)?;
    let param = parts
        .next()
        .and_then(|name| find_param(source, name))
        .filter(|p| p.kind == ParamKind::Reference)
        .ok_or(QueryProblem::InvalidInclude)?;
    let target = match parts.next() {
        None => None,
        Some(t) => {
            let t: ResourceType = t.parse().map_err(|_| QueryProblem::InvalidInclude)?;
            if !param.targets.contains(&t) {
                return Err(QueryProblem::InvalidInclude);
            }
            Some(t)
        }
    };
    if parts.next().is_some() {
        return Err(QueryProblem::InvalidInclude);
    }
    Ok(Include {
        source,
        param,
        target,
    })
}

/// Splits on `sep` where it is not escaped by a backslash; pieces keep their escapes.
fn split_unescaped(value: &str, sep: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            pieces.push(&value[start..i]);
            start = i + c.len_utf8();
        }
    }
    pieces.push(&value[start..]);
    pieces
}

/// Removes FHIR search escapes (`\,` `\|` `\$` `\\`).
fn unescape(piece: &str) -> Result<String, QueryProblem> {
    let mut out = String::with_capacity(piece.len());
    let mut chars = piece.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ (',' | '|' | '$' | '\\')) => out.push(e),
                _ => return Err(QueryProblem::BadEscape),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn parse_criterion(
    param: &'static SearchParam,
    modifier: Option<&str>,
    value: &str,
) -> Result<Criterion, QueryProblem> {
    if modifier == Some("missing") {
        return match value {
            "true" => Ok(Criterion::Missing(true)),
            "false" => Ok(Criterion::Missing(false)),
            _ => Err(QueryProblem::InvalidMissing),
        };
    }
    if value.is_empty() {
        return Err(QueryProblem::EmptyValue);
    }
    let pieces = split_unescaped(value, ',');
    if pieces.len() > MAX_VALUES_PER_PARAMETER {
        return Err(QueryProblem::TooManyValues);
    }
    if pieces.iter().any(|p| p.is_empty()) {
        return Err(QueryProblem::EmptyValue);
    }
    if param.name == "_id" {
        if modifier.is_some() {
            return Err(QueryProblem::UnsupportedModifier);
        }
        let ids = pieces
            .iter()
            .map(|p| ResourceId::parse(&unescape(p)?).map_err(|_| QueryProblem::InvalidId))
            .collect::<Result<_, _>>()?;
        return Ok(Criterion::Ids(ids));
    }
    match param.kind {
        ParamKind::Token => {
            if modifier.is_some() {
                return Err(QueryProblem::UnsupportedModifier);
            }
            let tokens = pieces
                .iter()
                .map(|p| parse_token(p))
                .collect::<Result<_, _>>()?;
            Ok(Criterion::Tokens(tokens))
        }
        ParamKind::String => {
            let exact = match modifier {
                None => false,
                Some("exact") => true,
                Some(_) => return Err(QueryProblem::UnsupportedModifier),
            };
            let strings = pieces
                .iter()
                .map(|p| {
                    let text = unescape(p)?;
                    Ok(if exact {
                        StringQuery::Exact(text)
                    } else {
                        StringQuery::Prefix(normalize_string(&text))
                    })
                })
                .collect::<Result<_, QueryProblem>>()?;
            Ok(Criterion::Strings(strings))
        }
        ParamKind::Date => {
            if modifier.is_some() {
                return Err(QueryProblem::UnsupportedModifier);
            }
            let dates = pieces
                .iter()
                .map(|p| parse_date_predicate(&unescape(p)?))
                .collect::<Result<_, _>>()?;
            Ok(Criterion::Dates(dates))
        }
        ParamKind::Reference => {
            let type_modifier = match modifier {
                None => None,
                Some(m) => Some(
                    m.parse::<ResourceType>()
                        .ok()
                        .filter(|t| param.targets.contains(t))
                        .ok_or(QueryProblem::UnsupportedModifier)?,
                ),
            };
            let mut refs = Vec::new();
            for p in &pieces {
                refs.extend(parse_reference(param, type_modifier, &unescape(p)?)?);
            }
            Ok(Criterion::References(refs))
        }
    }
}

fn parse_token(piece: &str) -> Result<TokenQuery, QueryProblem> {
    let parts = split_unescaped(piece, '|');
    let token = match parts.as_slice() {
        [code] => TokenQuery::AnySystem {
            code: unescape(code)?,
        },
        ["", code] => TokenQuery::NoSystem {
            code: unescape(code)?,
        },
        [system, ""] => TokenQuery::System {
            system: unescape(system)?,
        },
        [system, code] => TokenQuery::SystemCode {
            system: unescape(system)?,
            code: unescape(code)?,
        },
        _ => return Err(QueryProblem::BadEscape),
    };
    // NHS numbers are indexed as canonical digits; accept the formatted forms too.
    if let TokenQuery::SystemCode { system, code } = &token
        && system == NHS_NUMBER_SYSTEM
    {
        let digits = NhsNumber::parse(code)
            .map_err(|_| QueryProblem::InvalidNhsNumber)?
            .as_digits();
        return Ok(TokenQuery::SystemCode {
            system: system.clone(),
            code: digits,
        });
    }
    Ok(token)
}

fn parse_date_predicate(text: &str) -> Result<DatePredicate, QueryProblem> {
    let (prefix, rest) = match text.get(..2).and_then(DatePrefix::parse) {
        Some(prefix) => (prefix, &text[2..]),
        None => (DatePrefix::Eq, text),
    };
    let range = DateRange::parse(rest, Strictness::Search).map_err(QueryProblem::Date)?;
    Ok(DatePredicate { prefix, range })
}

fn parse_reference(
    param: &SearchParam,
    type_modifier: Option<ResourceType>,
    text: &str,
) -> Result<Vec<ReferenceQuery>, QueryProblem> {
    let (resource_type, id) = match text.split_once('/') {
        Some((t, id)) => {
            let t: ResourceType = t.parse().map_err(|_| QueryProblem::InvalidReference)?;
            if type_modifier.is_some_and(|m| m != t) {
                return Err(QueryProblem::InvalidReference);
            }
            (Some(t), id)
        }
        None => (type_modifier, text),
    };
    let id = ResourceId::parse(id).map_err(|_| QueryProblem::InvalidReference)?;
    match resource_type {
        Some(t) if param.targets.contains(&t) => Ok(vec![ReferenceQuery {
            resource_type: t,
            id,
        }]),
        Some(_) => Err(QueryProblem::InvalidReference),
        None => Ok(param
            .targets
            .iter()
            .map(|&t| ReferenceQuery {
                resource_type: t,
                id: id.clone(),
            })
            .collect()),
    }
}

impl fmt::Display for DatePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Eq => "eq",
            Self::Ne => "ne",
            Self::Lt => "lt",
            Self::Gt => "gt",
            Self::Le => "le",
            Self::Ge => "ge",
            Self::Sa => "sa",
            Self::Eb => "eb",
            Self::Ap => "ap",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: ResourceType = ResourceType::Patient;

    fn parse(t: ResourceType, pairs: &[(&str, &str)]) -> Result<SearchQuery, SearchError> {
        SearchQuery::parse(t, pairs.iter().copied(), false)
    }

    fn criterion(t: ResourceType, name: &str, value: &str) -> Criterion {
        let q = parse(t, &[(name, value)]).unwrap();
        assert_eq!(q.filters.len(), 1);
        q.filters[0].criterion.clone()
    }

    fn problem(t: ResourceType, name: &str, value: &str) -> QueryProblem {
        match parse(t, &[(name, value)]) {
            Err(SearchError::InvalidParameter { problem, .. }) => problem,
            other => panic!("{name}={value}: {other:?}"),
        }
    }

    fn range(s: &str) -> DateRange {
        DateRange::parse(s, Strictness::Search).unwrap()
    }

    #[test]
    fn defaults() {
        let q = parse(T, &[]).unwrap();
        assert_eq!(q.count, DEFAULT_COUNT);
        assert!(q.filters.is_empty() && q.sort.is_empty() && q.ignored.is_empty());
    }

    #[test]
    fn token_forms() {
        let c = criterion(T, "identifier", "http://x|1,|2,3,http://y|");
        assert_eq!(
            c,
            Criterion::Tokens(vec![
                TokenQuery::SystemCode {
                    system: "http://x".into(),
                    code: "1".into()
                },
                TokenQuery::NoSystem { code: "2".into() },
                TokenQuery::AnySystem { code: "3".into() },
                TokenQuery::System {
                    system: "http://y".into()
                },
            ])
        );
        assert_eq!(
            c.key_matches(),
            vec![
                KeyMatch::Exact("thttp://x|1".into()),
                KeyMatch::Exact("t|2".into()),
                KeyMatch::Exact("c3".into()),
                KeyMatch::Prefix("thttp://y|".into()),
            ]
        );
    }

    #[test]
    fn escapes_in_tokens() {
        let c = criterion(T, "identifier", r"a\|b|c\,d");
        assert_eq!(
            c,
            Criterion::Tokens(vec![TokenQuery::SystemCode {
                system: "a|b".into(),
                code: "c,d".into()
            }])
        );
        assert_eq!(problem(T, "identifier", r"a\q"), QueryProblem::BadEscape);
        assert_eq!(problem(T, "identifier", r"a\"), QueryProblem::BadEscape);
        assert_eq!(problem(T, "identifier", "a|b|c"), QueryProblem::BadEscape);
    }

    #[test]
    fn nhs_numbers_are_canonicalised_and_checked() {
        let c = criterion(
            T,
            "identifier",
            "https://fhir.nhs.uk/Id/nhs-number|943 476 5919",
        );
        assert_eq!(
            c.key_matches(),
            vec![KeyMatch::Exact(
                "thttps://fhir.nhs.uk/Id/nhs-number|9434765919".into()
            )]
        );
        assert_eq!(
            problem(
                T,
                "identifier",
                "https://fhir.nhs.uk/Id/nhs-number|9434765918"
            ),
            QueryProblem::InvalidNhsNumber
        );
    }

    #[test]
    fn index_and_query_agree_on_tokens() {
        use crate::resource::Resource;
        use crate::search::index_terms;
        let p = Resource::parse(
            r#"{"resourceType":"Patient","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"943-476-5919"}],"gender":"male","name":[{"family":"Zoë"}]}"#.as_bytes(),
            None,
        )
        .unwrap();
        let terms = index_terms(&p);
        // Alternatives are ORed: a hit is any key match among the parameter's entries.
        let hits = |name: &str, value: &str| {
            let q = parse(T, &[(name, value)]).unwrap();
            let filter = &q.filters[0];
            let keys: Vec<String> = terms
                .iter()
                .filter(|t| t.param == filter.param.name)
                .map(|t| t.value.to_key())
                .collect();
            filter.criterion.key_matches().iter().any(|m| match m {
                KeyMatch::Exact(k) => keys.contains(k),
                KeyMatch::Prefix(k) => keys.iter().any(|x| x.starts_with(k.as_str())),
            })
        };
        assert!(hits(
            "identifier",
            "https://fhir.nhs.uk/Id/nhs-number|9434765919"
        ));
        assert!(hits("identifier", "9434765919"));
        assert!(hits("identifier", "https://fhir.nhs.uk/Id/nhs-number|"));
        assert!(!hits("identifier", "|9434765919"));
        assert!(hits("gender", "male"));
        assert!(hits("gender", "|male"));
        assert!(!hits("gender", "female"));
        assert!(hits("family", "zoe"));
        assert!(hits("family", "ZO"));
        assert!(hits("family:exact", "Zoë"));
        assert!(!hits("family:exact", "zoë"));
        assert!(!hits("family", "zoey"));
        assert!(hits("gender:missing", "false"));
        assert!(!hits("birthdate:missing", "false"));
    }

    #[test]
    fn strings() {
        assert_eq!(
            criterion(T, "family", "Zoë,Sm"),
            Criterion::Strings(vec![
                StringQuery::Prefix("zoe".into()),
                StringQuery::Prefix("sm".into())
            ])
        );
        assert_eq!(
            criterion(T, "name:exact", "Zoë"),
            Criterion::Strings(vec![StringQuery::Exact("Zoë".into())])
        );
        assert_eq!(
            problem(T, "name:contains", "x"),
            QueryProblem::UnsupportedModifier
        );
        assert_eq!(problem(T, "name", ""), QueryProblem::EmptyValue);
        assert_eq!(problem(T, "name", "a,,b"), QueryProblem::EmptyValue);
    }

    #[test]
    fn missing_modifier() {
        assert_eq!(
            criterion(T, "birthdate:missing", "true"),
            Criterion::Missing(true)
        );
        assert_eq!(
            criterion(T, "gender:missing", "false"),
            Criterion::Missing(false)
        );
        assert_eq!(
            problem(T, "gender:missing", "yes"),
            QueryProblem::InvalidMissing
        );
        assert_eq!(
            problem(T, "gender:exact", "x"),
            QueryProblem::UnsupportedModifier
        );
    }

    #[test]
    fn references() {
        let o = ResourceType::Observation;
        let id = ResourceId::parse("123").unwrap();
        assert_eq!(
            criterion(o, "patient", "Patient/123"),
            Criterion::References(vec![ReferenceQuery {
                resource_type: ResourceType::Patient,
                id: id.clone()
            }])
        );
        assert_eq!(
            criterion(o, "patient", "123").key_matches(),
            vec![KeyMatch::Exact("rPatient/123".into())]
        );
        assert_eq!(
            criterion(o, "subject", "123").key_matches(),
            vec![
                KeyMatch::Exact("rPatient/123".into()),
                KeyMatch::Exact("rGroup/123".into())
            ]
        );
        assert_eq!(
            criterion(o, "subject:Group", "123").key_matches(),
            vec![KeyMatch::Exact("rGroup/123".into())]
        );
        assert_eq!(
            problem(o, "patient", "Group/123"),
            QueryProblem::InvalidReference
        );
        assert_eq!(
            problem(o, "patient", "Patient/a b"),
            QueryProblem::InvalidReference
        );
        assert_eq!(
            problem(o, "patient", "http://x/Patient/1"),
            QueryProblem::InvalidReference
        );
        assert_eq!(
            problem(o, "subject:Practitioner", "1"),
            QueryProblem::UnsupportedModifier
        );
        assert_eq!(
            problem(o, "subject:Group", "Patient/1"),
            QueryProblem::InvalidReference
        );
    }

    #[test]
    fn chaining() {
        let q = parse(
            ResourceType::Observation,
            &[(
                "patient.identifier",
                "https://fhir.nhs.uk/Id/nhs-number|9434765919",
            )],
        )
        .unwrap();
        let f = &q.filters[0];
        assert_eq!(f.param.name, "patient");
        let chain = f.chain.as_ref().unwrap();
        assert_eq!(chain.target_type, ResourceType::Patient);
        assert_eq!(chain.param.name, "identifier");
        assert!(
            parse(
                ResourceType::Observation,
                &[("subject:Patient.identifier", "x")]
            )
            .is_ok()
        );
        for bad in [
            "subject.identifier",
            "code.identifier",
            "patient.organization.name",
        ] {
            assert_eq!(
                problem(ResourceType::Observation, bad, "x"),
                QueryProblem::InvalidChain,
                "{bad}"
            );
        }
        assert!(matches!(
            parse(ResourceType::Observation, &[("patient.nickname", "x")]),
            Err(SearchError::UnknownParameter { .. })
        ));
    }

    #[test]
    fn ids() {
        assert_eq!(
            criterion(T, "_id", "a,b"),
            Criterion::Ids(vec![
                ResourceId::parse("a").unwrap(),
                ResourceId::parse("b").unwrap()
            ])
        );
        assert_eq!(problem(T, "_id", "a b"), QueryProblem::InvalidId);
    }

    #[test]
    fn date_prefixes_parse() {
        let Criterion::Dates(d) = criterion(T, "birthdate", "ge2024-03,lt2025,2024-03-05T10:00")
        else {
            panic!()
        };
        assert_eq!(d[0].prefix, DatePrefix::Ge);
        assert_eq!(d[0].range, range("2024-03"));
        assert_eq!(d[1].prefix, DatePrefix::Lt);
        assert_eq!(d[2].prefix, DatePrefix::Eq);
        for p in ["eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap"] {
            let Criterion::Dates(d) = criterion(T, "_lastUpdated", &format!("{p}2024")) else {
                panic!()
            };
            assert_eq!(d[0].prefix.to_string(), p);
        }
        assert!(matches!(
            problem(T, "birthdate", "xx2024"),
            QueryProblem::Date(_)
        ));
        assert!(matches!(
            problem(T, "birthdate", "2024-02-30"),
            QueryProblem::Date(_)
        ));
        assert!(matches!(
            problem(T, "birthdate", "é"),
            QueryProblem::Date(_)
        ));
    }

    /// Each prefix against target ranges before, inside, straddling and after March 2024.
    #[test]
    fn date_prefix_semantics() {
        let now = range("2024-06-01").start();
        let search = |p: DatePrefix| DatePredicate {
            prefix: p,
            range: range("2024-03"),
        };
        let before = range("2024-02-10");
        let inside = range("2024-03-10");
        let whole = range("2024-03");
        let straddle_start =
            DateRange::period(Some(range("2024-02-20")), Some(range("2024-03-05"))).unwrap();
        let straddle_end =
            DateRange::period(Some(range("2024-03-20")), Some(range("2024-04-05"))).unwrap();
        let covering = range("2024");
        let after = range("2024-04-10");
        let open_end = DateRange::period(Some(range("2024-03-10")), None).unwrap();
        let targets = [
            before,
            inside,
            whole,
            straddle_start,
            straddle_end,
            covering,
            after,
            open_end,
        ];
        use DatePrefix::*;
        let expect: [(DatePrefix, [bool; 8]); 8] = [
            (Eq, [false, true, true, false, false, false, false, false]),
            (Ne, [true, false, false, true, true, true, true, true]),
            (Lt, [true, false, false, true, false, true, false, false]),
            (Gt, [false, false, false, false, true, true, true, true]),
            (Le, [true, true, true, true, false, true, false, false]),
            (Ge, [false, true, true, false, true, true, true, true]),
            (Sa, [false, false, false, false, false, false, true, false]),
            (Eb, [true, false, false, false, false, false, false, false]),
        ];
        for (prefix, wants) in expect {
            for (target, want) in targets.iter().zip(wants) {
                assert_eq!(
                    search(prefix).matches(target, now),
                    want,
                    "{prefix} {target:?}"
                );
                let (lo, hi) = search(prefix).key_range(now);
                let key = format!("d{}", target.to_key());
                if want {
                    assert!(
                        lo <= key && key < hi,
                        "{prefix}: key range must hold matches"
                    );
                }
            }
        }
        // ap: March 2024 seen from June 2024 widens by ~9 days on each side.
        assert!(search(Ap).matches(&inside, now));
        assert!(search(Ap).matches(&range("2024-02-25"), now));
        assert!(!search(Ap).matches(&range("2024-01-01"), now));
        assert!(search(Ap).matches(&range("2024-04-05"), now));
    }

    #[test]
    fn day_against_datetime_values() {
        let now = 0;
        let p = |s: &str| match criterion(T, "_lastUpdated", s) {
            Criterion::Dates(d) => d[0],
            _ => panic!(),
        };
        let t = range("2024-03-05T23:59:59Z");
        assert!(p("2024-03-05").matches(&t, now));
        assert!(!p("2024-03-06").matches(&t, now));
        assert!(p("lt2024-03-06").matches(&t, now));
        assert!(p("ge2024-03-05").matches(&t, now));
        assert!(!p("gt2024-03-05").matches(&t, now));
        assert!(p("2024-03-05T23:59:59Z").matches(&t, now));
        assert!(!p("2024-03-05T23:59:59+01:00").matches(&t, now));
    }

    #[test]
    fn result_parameters() {
        let q = parse(
            ResourceType::Observation,
            &[
                ("_count", "50"),
                ("_sort", "-date,_lastUpdated"),
                ("_include", "Observation:patient"),
                ("_include", "Observation:subject:Group"),
                ("_cursor", "abc123"),
                ("_format", "json"),
            ],
        )
        .unwrap();
        assert_eq!(q.count, 50);
        assert_eq!(q.sort.len(), 2);
        assert!(q.sort[0].descending && q.sort[0].param.name == "date");
        assert!(!q.sort[1].descending && q.sort[1].param.name == "_lastUpdated");
        assert_eq!(q.include.len(), 2);
        assert_eq!(q.include[1].target, Some(ResourceType::Group));
        assert_eq!(q.cursor.as_deref(), Some("abc123"));
        assert_eq!(
            parse(T, &[("_count", "999999999")]).unwrap().count,
            MAX_COUNT
        );
        assert_eq!(parse(T, &[("_count", "0")]).unwrap().count, 0);
        let q = parse(
            T,
            &[
                ("_revinclude", "Observation:patient"),
                ("_revinclude", "AuditEvent:patient"),
            ],
        )
        .unwrap();
        assert_eq!(q.revinclude.len(), 2);
        assert_eq!(problem(T, "_count", "-1"), QueryProblem::InvalidCount);
        assert_eq!(problem(T, "_count", "ten"), QueryProblem::InvalidCount);
        assert_eq!(
            parse(T, &[("_count", "1"), ("_count", "2")]).unwrap_err(),
            SearchError::InvalidParameter {
                param: "_count".into(),
                problem: QueryProblem::Repeated
            }
        );
        assert_eq!(problem(T, "_sort", "family"), QueryProblem::InvalidSort);
        assert_eq!(problem(T, "_sort", ""), QueryProblem::InvalidSort);
        assert_eq!(
            problem(T, "_include", "Observation:patient"),
            QueryProblem::InvalidInclude
        );
        assert_eq!(
            problem(T, "_include", "Patient:family"),
            QueryProblem::InvalidInclude
        );
        assert_eq!(problem(T, "_include", "*"), QueryProblem::InvalidInclude);
        assert_eq!(
            problem(T, "_revinclude", "Observation:encounter"),
            QueryProblem::InvalidInclude
        );
        assert_eq!(
            problem(T, "_format", "xml"),
            QueryProblem::UnsupportedFormat
        );
        assert_eq!(problem(T, "_cursor", "a b"), QueryProblem::InvalidCursor);
    }

    #[test]
    fn unknown_parameters_strict_and_lenient() {
        let err = parse(T, &[("nickname", "x")]).unwrap_err();
        assert_eq!(
            err,
            SearchError::UnknownParameter {
                param: "nickname".into(),
                resource_type: T
            }
        );
        assert_eq!(
            err.to_string(),
            "unknown search parameter 'nickname' for Patient"
        );
        assert!(parse(T, &[("_summary", "true")]).is_err());
        assert!(
            parse(T, &[("code", "x")]).is_err(),
            "an Observation parameter on Patient"
        );
        let q = SearchQuery::parse(
            T,
            [
                ("nickname", "x"),
                ("family", "smith"),
                ("birthdate", "bad"),
                ("gender", "female"),
            ],
            true,
        )
        .unwrap();
        assert_eq!(q.filters.len(), 2);
        assert_eq!(q.ignored.len(), 2);
        assert_eq!(q.ignored[0].param(), Some("nickname"));
        assert_eq!(q.ignored[1].param(), Some("birthdate"));
    }

    #[test]
    fn hostile_input_is_bounded() {
        let many: Vec<(String, String)> = (0..5000)
            .map(|i| (format!("p{i}"), "x".to_string()))
            .collect();
        assert_eq!(
            SearchQuery::parse(T, many.clone(), true).unwrap_err(),
            SearchError::TooManyParameters
        );
        assert_eq!(
            SearchQuery::parse(T, many, false).unwrap_err(),
            SearchError::UnknownParameter {
                param: "p0".into(),
                resource_type: T
            }
        );
        let huge = "a".repeat(MAX_VALUE_BYTES + 1);
        assert_eq!(problem(T, "family", &huge), QueryProblem::ValueTooLong);
        let alternatives = vec!["a"; MAX_VALUES_PER_PARAMETER + 1].join(",");
        assert_eq!(
            problem(T, "family", &alternatives),
            QueryProblem::TooManyValues
        );
        let long_name = format!("{}\u{7}", "n".repeat(1000));
        let err = parse(T, &[(long_name.as_str(), "x")]).unwrap_err();
        let param = err.param().unwrap();
        assert!(param.len() <= MAX_NAME_BYTES + '…'.len_utf8());
        assert!(!param.contains('\u{7}'));
        let wide = "é".repeat(1000);
        let err = parse(T, &[(wide.as_str(), "x")]).unwrap_err();
        assert!(err.param().unwrap().len() <= MAX_NAME_BYTES + '…'.len_utf8());
        let err = parse(T, &[("fam\u{0}ily\u{202e}", "x")]).unwrap_err();
        assert!(!err.param().unwrap().contains('\u{0}'));
    }

    proptest! {
        #[test]
        fn parse_never_panics(
            pairs in proptest::collection::vec(("\\PC{0,30}", "\\PC{0,60}"), 0..20),
            lenient in any::<bool>(),
        ) {
            for t in [ResourceType::Patient, ResourceType::Observation, ResourceType::AuditEvent] {
                let _ = SearchQuery::parse(t, pairs.clone(), lenient);
            }
        }

        #[test]
        fn known_names_with_arbitrary_values_never_panic(
            name in proptest::sample::select(vec![
                "identifier", "family", "name:exact", "birthdate", "gender:missing",
                "general-practitioner", "general-practitioner:Organization", "_id", "_lastUpdated",
                "_count", "_sort", "_include", "_revinclude", "_cursor",
            ]),
            value in "[a-zA-Z0-9|,\\\\:/.\\-+TZé ]{0,40}",
        ) {
            let _ = SearchQuery::parse(ResourceType::Patient, [(name, value)], false);
        }

        #[test]
        fn a_date_always_matches_itself_with_eq(
            y in 1u32..=9999, m in 1u32..=12, d in 1u32..=28,
        ) {
            for text in [format!("{y:04}"), format!("{y:04}-{m:02}"), format!("{y:04}-{m:02}-{d:02}")] {
                let r = range(&text);
                let p = DatePredicate { prefix: DatePrefix::Eq, range: r };
                prop_assert!(p.matches(&r, 0));
                let ne = DatePredicate { prefix: DatePrefix::Ne, range: r };
                prop_assert!(!ne.matches(&r, 0));
            }
        }
    }
}
