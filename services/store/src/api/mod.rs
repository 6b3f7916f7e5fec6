//! The FHIR R4 API of one care system: [`FhirStore`] (resource operations on the tenant's
//! database, usable without HTTP) and [`router`] (the REST surface at `/{care-system}/fhir`).
//!
//! Supported today: `metadata`, create (and conditional create with `If-None-Exist`), read,
//! vread, update (with `If-Match` and update-as-create), delete, instance, type and system
//! `_history` (`_since`, `_count`, cursor paging), type search (`_id`, `_lastUpdated` and the
//! registry's token, string, date and reference parameters, one level of chaining, `_sort` on
//! dates, `_count` and cursor paging) and `Patient/{id}/$everything`. Not yet:
//! batch/transaction Bundles, `_include`/`_revinclude`, bulk export and import, audit events
//! and verification of the gateway's identity assertion (issue 4).
//!
//! Invariants (details in each module):
//! - one atomic, durable commit per write, holding the version, the current pointer, history
//!   and the index and compartment changes; nothing is stored when a request fails;
//! - writes to one resource are serialised; writes to different resources are not;
//! - every error is an `OperationOutcome` with its status; no patient data in logs or errors.

mod capability;
mod error;
mod fhir_store;
mod http;
mod search;

pub use capability::{capability_statement, client_writable};
pub use error::ApiError;
pub use fhir_store::{FhirStore, FhirStoreConfig, HistoryPage, StoredVersion, WriteOutcome};
pub use http::router;
pub use search::SearchPage;
