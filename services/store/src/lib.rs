//! ShCR record store: a care system's FHIR records on object storage.
//!
//! - [`envelope`]: the encryption-at-rest layer every byte written to the bucket passes through;
//! - [`care_system`]: the parsed name every cryptographic binding uses;
//! - [`engine`] and [`tenant`]: the record engine on SlateDB and a care system's opened database;
//! - [`api`]: the FHIR R4 REST API on top of it;
//! - [`serve`]: `shcr store`, one care system's store as deployed; [`import`]: `shcr import`
//!   and `shcr export`, bulk loading and dumping a local (`shcr dev`) care system.

pub mod api;
pub mod care_system;
pub mod engine;
pub mod envelope;
pub mod import;
pub mod serve;
pub mod tenant;

pub use care_system::CareSystemName;
