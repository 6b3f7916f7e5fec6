//! Who is acting, and what they may do — the contract between the gateway and the stores.
//!
//! - [`scope`]: SMART on FHIR v2 scopes (`user/*.cruds`, `patient/Observation.rs`, …) parsed
//!   once into a [`Scopes`] set that answers "may this interaction touch this resource type?".
//! - [`assertion`]: the short-lived identity assertion the gateway signs (Ed25519) for every
//!   request it forwards, and the store verifies with the gateway's public key. It names one care
//!   system; a store rejects an assertion naming any other.
//!
//! Invariants: an assertion carries no patient data beyond the patient *id* a patient-facing
//! token is confined to; parsing is total (every input is accepted or gets a typed error).

pub mod assertion;
pub mod scope;

pub use assertion::{
    ASSERTION_HEADER, AssertionError, AssertionSigner, AssertionVerifier, Identity, KeyError,
};
pub use scope::{Interaction, ScopeContext, ScopeError, Scopes, SmartScope};
