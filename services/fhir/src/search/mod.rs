//! FHIR search: the parameter registry, indexing of resources, query parsing and the matching
//! rules the store applies to index entries.
//!
//! The store's contract: write one index entry per [`IndexTerm`] of [`index_terms`] under
//! `[type, param, IndexValue::to_key(), id]`; answer a [`Filter`] by looking up its
//! [`Criterion::key_matches`] (tokens, strings, references), scanning
//! [`DatePredicate::key_range`] and filtering with [`DatePredicate::matches`] (dates), or reading
//! resource keys (`_id`). Both sides normalise values the same way, so equality of keys is
//! equality for search.

mod index;
mod normalize;
mod query;
mod registry;

pub(crate) use index::check_indexed_elements;
pub use index::{IndexTerm, IndexValue, index_terms, patient_compartment};
pub use normalize::{MAX_KEY_VALUE_BYTES, normalize_string, string_matches};
pub use query::{
    Chain, Criterion, DEFAULT_COUNT, DatePredicate, DatePrefix, Filter, Include, KeyMatch,
    MAX_COUNT, MAX_CURSOR_BYTES, MAX_NAME_BYTES, MAX_PARAMETERS, MAX_VALUE_BYTES,
    MAX_VALUES_PER_PARAMETER, QueryProblem, ReferenceQuery, SearchError, SearchQuery, SortKey,
    StringQuery, TokenQuery,
};
pub use registry::{
    ID, LAST_UPDATED, ParamKind, SearchParam, find_param, indexed_params, type_params,
};
