//! ShCR record store: a care system's FHIR records on object storage.
//!
//! So far this crate holds the storage foundation: [`envelope`], the encryption-at-rest
//! layer every byte written to the bucket passes through, and [`care_system`], the
//! parsed name every cryptographic binding uses.

pub mod care_system;
pub mod engine;
pub mod envelope;
pub mod tenant;

pub use care_system::CareSystemName;
