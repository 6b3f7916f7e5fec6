//! Who is acting, and what they may do — the contract between the gateway and the stores.
//!
//! - [`scope`]: SMART on FHIR v2 scopes (`user/*.cruds`, `patient/Observation.rs`, …) parsed
//!   once into a [`Scopes`] set that answers "may this interaction touch this resource type?".
//! - [`assertion`]: the short-lived identity assertion the gateway signs (Ed25519) for every
//!   request it forwards, and the store verifies with the gateway's public key. It names one care
//!   system and one request (method, path and query, body digest); a store rejects an assertion
//!   naming any other, and accepts each one once ([`replay`]). The same key signs the gateway's
//!   refusal notices ([`RefusalNotice`]).
//! - [`replay`]: the bounded cache of assertion ids a store has accepted.
//!
//! Invariants: an assertion carries no patient data beyond the patient *id* a patient-facing
//! token is confined to; parsing is total (every input is accepted or gets a typed error).

pub mod assertion;
pub mod replay;
pub mod scope;

pub use assertion::{
    ASSERTION_HEADER, AssertionError, AssertionSigner, AssertionVerifier, Identity, KeyError,
    OriginError, RefusalNotice, RefusedActor, RequestBinding, VerifiedAssertion, body_digest,
    public_origin,
};
pub use replay::ReplayCache;
pub use scope::{Interaction, ScopeContext, ScopeError, Scopes, SmartScope};
