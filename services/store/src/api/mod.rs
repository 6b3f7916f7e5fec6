//! The FHIR R4 API of one care system: [`FhirStore`] (resource operations on the tenant's
//! database, usable without HTTP) and [`router`] (the REST surface at `/{care-system}/fhir`).
//!
//! Supported: `metadata` (public), create (and conditional create with `If-None-Exist`), read,
//! vread, update (with `If-Match` and update-as-create), delete, instance, type and system
//! `_history` (`_since`, `_count`, cursor paging), type search (`_id`, `_lastUpdated` and the
//! registry's token, string, date and reference parameters, one level of chaining such as
//! `patient.identifier`, `_include`/`_revinclude` on reference parameters, `_sort` on dates,
//! `_count` and cursor paging), `Patient/{id}/$everything`, `batch`/`transaction` Bundles
//! POSTed to the base, and Bulk Data `$export` (system and `Patient`, [`export`]). Every
//! request but `metadata` needs the gateway's identity assertion ([`auth`]); every interaction
//! is audited ([`audit`]). Not served: `Group/$export`, system search, conditional
//! update/delete, PATCH. Bulk import is `crate::import`.
//!
//! Invariants (details in each module):
//! - one atomic, durable commit per write (per transaction), holding the versions, current
//!   pointers, history, index and compartment changes and the write's AuditEvent; nothing is
//!   stored when a request fails;
//! - writes to one resource are serialised; writes to different resources are not;
//! - no handler runs without a verified identity for this care system, and a patient-scoped
//!   identity reaches only its patient's compartment;
//! - every error is an `OperationOutcome` with its status; no patient data in logs or errors.

mod access;
mod audit;
mod auth;
mod bundle;
mod capability;
mod error;
mod export;
mod fhir_store;
mod http;
mod refusal;
mod search;

pub use capability::{capability_statement, client_writable};
pub use error::ApiError;
pub use fhir_store::{FhirStore, FhirStoreConfig, HistoryPage, StoredVersion, WriteOutcome};
pub use http::router;
pub use search::SearchPage;
