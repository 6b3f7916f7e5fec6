//! Type-level search: a parsed [`SearchQuery`] answered from the index.
//!
//! Each filter becomes a set of matching ids (index lookups for tokens, strings, references and
//! `:missing`; a range scan filtered by [`DatePredicate::matches`] for dates; key reads for
//! `_id`); filters are intersected, then the matches are ordered by their position (the
//! `_sort` dates, then the id; see [`position`]) and paged.
//!
//! Invariants:
//! - index entries exist only for live resources (see [`super::fhir_store`]), so matches need no
//!   re-check, except `_id`, which is checked against the current pointers;
//! - the cursor is the hex of the position of the last match of the previous page: stable while
//!   resources change, opaque to clients; it holds sort dates and an id, which clients already
//!   had on the previous page;
//! - a search touching more than the configured number of index entries is refused (400
//!   too-costly) rather than run unbounded.

use std::collections::{BTreeSet, HashMap};

use shcr_fhir::resource::{Resource, ResourceId, ResourceType};
use shcr_fhir::search::index_terms;
use shcr_fhir::search::{
    Criterion, DatePredicate, Filter, IndexValue, KeyMatch, SearchParam, SearchQuery, SortKey,
};
use shcr_fhir::{datetime::DateRange, search::QueryProblem, search::SearchError};

use super::error::ApiError;
use super::fhir_store::{CurrentPointer, FhirStore, StoredVersion, now_micros};
use crate::engine::{Element, Family, Key, prefix_end};

/// One page of search results.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchPage {
    /// Matches across all pages.
    pub total: usize,
    /// This page's matches, in id order.
    pub matches: Vec<StoredVersion>,
    /// The cursor of the next page, when there is one.
    pub next_cursor: Option<String>,
    /// Live resources `_include`d by or `_revinclude`ing this page's matches, each once.
    pub included: Vec<StoredVersion>,
}

impl FhirStore {
    /// Runs `query`, with its `_include`s and `_revinclude`s for this page's matches.
    pub async fn search(&self, query: &SearchQuery) -> Result<SearchPage, ApiError> {
        if query.sort.len() > MAX_SORT_KEYS {
            return Err(ApiError::Unsupported("_sort with more than 4 keys"));
        }
        let after = match &query.cursor {
            Some(c) => Some(decode_cursor(c).ok_or_else(|| {
                ApiError::Search(SearchError::InvalidParameter {
                    param: "_cursor".to_string(),
                    problem: QueryProblem::InvalidCursor,
                })
            })?),
            None => None,
        };
        let t = query.resource_type;
        let mut matching: Option<BTreeSet<String>> = None;
        for filter in &query.filters {
            let ids = self.filter_ids(t, filter).await?;
            matching = Some(match matching {
                None => ids,
                Some(m) => m.intersection(&ids).cloned().collect(),
            });
        }
        let matching = match matching {
            Some(m) => m,
            None => self.all_live_ids(t).await?,
        };
        let total = matching.len();
        let mut sort_values = Vec::with_capacity(query.sort.len());
        for key in &query.sort {
            sort_values.push(self.date_starts(t, key.param.name).await?);
        }
        let mut ordered: Vec<(String, String)> = matching
            .into_iter()
            .map(|id| (position(&id, &query.sort, &sort_values), id))
            .collect();
        ordered.sort();
        let count = usize::try_from(query.count).unwrap_or(usize::MAX);
        let mut page = ordered
            .iter()
            .filter(|(pos, _)| after.as_ref().is_none_or(|a| pos.as_str() > a.as_str()));
        let mut matches = Vec::new();
        let mut last = None;
        for (pos, id) in page.by_ref().take(count) {
            last = Some(pos);
            let id = ResourceId::parse(id).map_err(|_| ApiError::Internal)?;
            if let Some(stored) = self.read_live(t, &id).await? {
                matches.push(stored);
            }
        }
        let next_cursor = match (page.next(), last) {
            (Some(_), Some(last)) => Some(encode_cursor(last)),
            _ => None,
        };
        let included = self.included(query, &matches).await?;
        Ok(SearchPage {
            total,
            matches,
            next_cursor,
            included,
        })
    }

    /// `_include`: the live targets of each match's reference parameter (read from the match's
    /// JSON); `_revinclude`: the live resources whose reference parameter points at a match
    /// (one index lookup per match). Each resource at most once, never a match again; more than
    /// `max_search_matches` is refused as too costly.
    async fn included(
        &self,
        query: &SearchQuery,
        matches: &[StoredVersion],
    ) -> Result<Vec<StoredVersion>, ApiError> {
        if query.include.is_empty() && query.revinclude.is_empty() {
            return Ok(Vec::new());
        }
        let limit = self.config().max_search_matches;
        let mut seen: BTreeSet<(ResourceType, String)> = matches
            .iter()
            .map(|m| (m.resource_type, m.id.as_str().to_string()))
            .collect();
        let mut wanted: Vec<(ResourceType, ResourceId)> = Vec::new();
        if !query.include.is_empty() {
            for m in matches {
                let Some(body) = &m.body else { continue };
                let resource =
                    Resource::parse(body, Some(m.resource_type)).map_err(|_| ApiError::Internal)?;
                let terms = index_terms(&resource);
                for include in &query.include {
                    for term in terms.iter().filter(|t| t.param == include.param.name) {
                        if let IndexValue::Reference { resource_type, id } = &term.value
                            && include.target.is_none_or(|t| t == *resource_type)
                            && seen.insert((*resource_type, id.as_str().to_string()))
                        {
                            wanted.push((*resource_type, id.clone()));
                        }
                    }
                }
            }
        }
        for rev in &query.revinclude {
            for m in matches {
                let key = IndexValue::Reference {
                    resource_type: m.resource_type,
                    id: m.id.clone(),
                }
                .to_key();
                for id in self
                    .index_ids(rev.source, rev.param.name, &KeyMatch::Exact(key))
                    .await?
                {
                    if seen.insert((rev.source, id.clone())) {
                        let id = ResourceId::parse(&id).map_err(|_| ApiError::Internal)?;
                        wanted.push((rev.source, id));
                    }
                }
                if wanted.len() > limit {
                    return Err(ApiError::TooCostly { limit });
                }
            }
        }
        if wanted.len() > limit {
            return Err(ApiError::TooCostly { limit });
        }
        let mut included = Vec::with_capacity(wanted.len());
        for (t, id) in wanted {
            if let Some(stored) = self.read_live(t, &id).await? {
                included.push(stored);
            }
        }
        Ok(included)
    }

    async fn filter_ids(
        &self,
        t: ResourceType,
        filter: &Filter,
    ) -> Result<BTreeSet<String>, ApiError> {
        let Some(chain) = &filter.chain else {
            return self.criterion_ids(t, filter.param, &filter.criterion).await;
        };
        let targets = self
            .criterion_ids(chain.target_type, chain.param, &filter.criterion)
            .await?;
        let mut ids = BTreeSet::new();
        for target in targets {
            let id = ResourceId::parse(&target).map_err(|_| ApiError::Internal)?;
            let value = IndexValue::Reference {
                resource_type: chain.target_type,
                id,
            }
            .to_key();
            ids.extend(
                self.index_ids(t, filter.param.name, &KeyMatch::Exact(value))
                    .await?,
            );
            self.check_budget(ids.len())?;
        }
        Ok(ids)
    }

    async fn criterion_ids(
        &self,
        t: ResourceType,
        param: &SearchParam,
        criterion: &Criterion,
    ) -> Result<BTreeSet<String>, ApiError> {
        let mut ids = BTreeSet::new();
        match criterion {
            Criterion::Ids(wanted) => {
                for id in wanted {
                    if self.read_live(t, id).await?.is_some() {
                        ids.insert(id.as_str().to_string());
                    }
                }
            }
            Criterion::Missing(true) => {
                let present = KeyMatch::Exact(IndexValue::Present.to_key());
                let present = self.index_ids(t, param.name, &present).await?;
                ids = self
                    .all_live_ids(t)
                    .await?
                    .difference(&present)
                    .cloned()
                    .collect();
            }
            Criterion::Dates(predicates) => {
                let now = now_micros();
                for predicate in predicates {
                    ids.extend(self.date_ids(t, param.name, predicate, now).await?);
                    self.check_budget(ids.len())?;
                }
            }
            other => {
                for key_match in other.key_matches() {
                    ids.extend(self.index_ids(t, param.name, &key_match).await?);
                    self.check_budget(ids.len())?;
                }
            }
        }
        Ok(ids)
    }

    fn check_budget(&self, n: usize) -> Result<(), ApiError> {
        let limit = self.config().max_search_matches;
        if n > limit {
            return Err(ApiError::TooCostly { limit });
        }
        Ok(())
    }

    /// Ids under the index entries of `param` whose value key equals or starts with the match.
    async fn index_ids(
        &self,
        t: ResourceType,
        param: &str,
        key_match: &KeyMatch,
    ) -> Result<BTreeSet<String>, ApiError> {
        let (start, end) = match key_match {
            KeyMatch::Exact(value) => {
                let start = Key::new(
                    Family::Index,
                    [t.as_str().into(), param.into(), value.as_str().into()],
                )
                .encode();
                let end = prefix_end(&start);
                (start, end)
            }
            KeyMatch::Prefix(value) => {
                let start = value_prefix(t, param, value);
                let end = prefix_end(&start);
                (start, end)
            }
        };
        self.scan_all(start, end)
            .await?
            .into_iter()
            .map(|(key, _)| entry_id(&key))
            .collect()
    }

    async fn date_ids(
        &self,
        t: ResourceType,
        param: &str,
        predicate: &DatePredicate,
        now: i64,
    ) -> Result<BTreeSet<String>, ApiError> {
        let (lo, hi) = predicate.key_range(now);
        let start = value_prefix(t, param, &lo);
        let end = value_prefix(t, param, &hi);
        let mut ids = BTreeSet::new();
        for (key, _) in self.scan_all(start, Some(end)).await? {
            let Some(Element::Text(value)) = key.elements.get(2) else {
                return Err(ApiError::Internal);
            };
            let range = value
                .strip_prefix('d')
                .and_then(DateRange::from_key)
                .ok_or(ApiError::Internal)?;
            if predicate.matches(&range, now) {
                ids.insert(entry_id(&key)?);
            }
        }
        Ok(ids)
    }

    /// For every resource with a value for the date parameter, the key text (16 hex digits,
    /// order preserving) of its earliest and latest range start.
    async fn date_starts(
        &self,
        t: ResourceType,
        param: &str,
    ) -> Result<HashMap<String, (String, String)>, ApiError> {
        let start = value_prefix(t, param, "d");
        let end = prefix_end(&start);
        let mut starts: HashMap<String, (String, String)> = HashMap::new();
        for (key, _) in self.scan_all(start, end).await? {
            let Some(Element::Text(value)) = key.elements.get(2) else {
                return Err(ApiError::Internal);
            };
            let begin = value.get(1..17).ok_or(ApiError::Internal)?.to_string();
            starts
                .entry(entry_id(&key)?)
                .and_modify(|(lo, hi)| {
                    if begin < *lo {
                        lo.clone_from(&begin);
                    }
                    if begin > *hi {
                        hi.clone_from(&begin);
                    }
                })
                .or_insert_with(|| (begin.clone(), begin.clone()));
        }
        Ok(starts)
    }

    /// Ids of every live resource of the type.
    async fn all_live_ids(&self, t: ResourceType) -> Result<BTreeSet<String>, ApiError> {
        let start = Key::new(Family::Current, [t.as_str().into()]).encode();
        let end = prefix_end(&start);
        let mut ids = BTreeSet::new();
        for (key, value) in self.scan_all(start, end).await? {
            if !CurrentPointer::decode(&value)?.deleted
                && let Some(Element::Text(id)) = key.elements.get(1)
            {
                ids.insert(id.clone());
            }
        }
        Ok(ids)
    }
}

/// The encoded start of every index entry of `param` whose value key starts with `value`: the
/// encoding of `[type, param, value]` without the value's terminator.
fn value_prefix(t: ResourceType, param: &str, value: &str) -> Vec<u8> {
    let mut key = Key::new(
        Family::Index,
        [t.as_str().into(), param.into(), value.into()],
    )
    .encode();
    key.pop();
    key
}

fn entry_id(key: &Key) -> Result<String, ApiError> {
    match key.elements.get(3) {
        Some(Element::Text(id)) => Ok(id.clone()),
        _ => Err(ApiError::Internal),
    }
}

/// The most `_sort` keys a search may have (keeps cursors within
/// [`shcr_fhir::search::MAX_CURSOR_BYTES`]).
const MAX_SORT_KEYS: usize = 4;

/// The text whose byte order is the result order of `id`: per sort key `v` and the 16 hex
/// digits of the earliest start (ascending) or of the complement of the latest start
/// (descending), or `w` when the resource has no value (so those come last either way); then
/// the id, which breaks ties and is the whole position when there is no `_sort`.
fn position(id: &str, sort: &[SortKey], values: &[HashMap<String, (String, String)>]) -> String {
    let mut out = String::new();
    for (key, values) in sort.iter().zip(values) {
        match values.get(id) {
            Some((earliest, _)) if !key.descending => {
                out.push('v');
                out.push_str(earliest);
            }
            Some((_, latest)) => {
                out.push('v');
                out.extend(latest.chars().map(complement_hex_digit));
            }
            None => out.push('w'),
        }
        out.push('.');
    }
    out.push_str(id);
    out
}

fn complement_hex_digit(c: char) -> char {
    c.to_digit(16)
        .and_then(|d| char::from_digit(15 - d, 16))
        .unwrap_or(c)
}

fn encode_cursor(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(cursor: &str) -> Option<String> {
    if !cursor.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let position = String::from_utf8(bytes).ok()?;
    let id = position.rsplit('.').next()?;
    ResourceId::parse(id).ok()?;
    Some(position)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_junk() {
        let c = encode_cursor("abc-1.2");
        assert_eq!(decode_cursor(&c).as_deref(), Some("abc-1.2"));
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor("abc"), None);
        assert_eq!(decode_cursor("2f"), None);
        let p = encode_cursor("v0000000000000001.abc");
        assert_eq!(decode_cursor(&p).as_deref(), Some("v0000000000000001.abc"));
    }

    #[test]
    fn value_prefix_is_a_prefix_of_longer_values_only() {
        let p = value_prefix(ResourceType::Patient, "family", "ssmi");
        let smith = Key::new(
            Family::Index,
            [
                "Patient".into(),
                "family".into(),
                "ssmith".into(),
                "1".into(),
            ],
        )
        .encode();
        let jones = Key::new(
            Family::Index,
            [
                "Patient".into(),
                "family".into(),
                "sjones".into(),
                "1".into(),
            ],
        )
        .encode();
        assert!(smith.starts_with(&p));
        assert!(!jones.starts_with(&p));
    }
}
