//! The storage-independent FHIR R4 core of ShCR: what a record store needs to accept, index and
//! search clinical records without knowing how they are stored.
//!
//! - [`identifiers`]: UK Core identifiers (NHS number with Modulus 11, ODS code);
//! - [`datetime`]: FHIR dates as half-open UTC ranges with FHIR's precision semantics;
//! - [`resource`]: resource types, ids and [`resource::Resource::parse`], which checks a body once;
//! - [`outcome`]: `OperationOutcome` and the HTTP status of every error this crate returns;
//! - [`search`]: the search-parameter registry, index terms, query parsing and matching.
//!
//! Nothing here does I/O. Errors never carry patient data: they name elements and parameters,
//! never values.

pub mod datetime;
pub mod identifiers;
pub mod outcome;
pub mod resource;
pub mod search;
