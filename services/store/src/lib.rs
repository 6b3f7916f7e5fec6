//! ShCR record store: a care system's FHIR records on object storage.
//!
//! - [`envelope`]: the encryption-at-rest layer every byte written to the bucket passes through;
//! - [`care_system`]: the parsed name every cryptographic binding uses;
//! - [`engine`] and [`tenant`]: the record engine on SlateDB and a care system's opened database;
//! - [`api`]: the FHIR R4 REST API on top of it.

pub mod api;
pub mod care_system;
pub mod engine;
pub mod envelope;
pub mod tenant;

pub use care_system::CareSystemName;
