//! Who may do what: verification of the gateway's identity assertion and the store's own
//! authorisation checks (defence in depth behind the gateway).
//!
//! Job: [`authenticate`] is a middleware in front of every route except `metadata`: it verifies
//! the `x-shcr-identity` assertion (signature, lifetime, and that it names *this* care system)
//! and puts the [`shcr_identity::Identity`] into the request extensions as an `Arc<Identity>`; without a valid
//! one the request gets 401 (`login`) with `WWW-Authenticate` and reaches no handler. Handlers
//! then call [`super::access::Access`] to check the assertion's SMART scopes (403 `forbidden`) and, for
//! patient-confined identities, that everything they touch is in that patient's compartment.
//!
//! Invariants:
//! - no handler other than `metadata` runs without a verified identity for this care system;
//! - a patient-confined identity (a `patient` claim and only `patient/` scopes) reaches only its
//!   patient's compartment: reads and writes of anything else are 403 whether or not it exists
//!   (the check is a compartment-key lookup, so existence is not revealed), searches are
//!   restricted to the compartment by a forced `patient` (or `_id`) criterion, and interactions
//!   that span patients (type/system history, `$export`) are refused;
//! - refusals name the interaction and type, never a resource's content.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shcr_identity::{ASSERTION_HEADER, AssertionError, AssertionVerifier};

use super::error::ApiError;
use super::fhir_store::FhirStore;

/// What the authentication middleware needs.
#[derive(Clone)]
pub(crate) struct AuthState {
    pub store: Arc<FhirStore>,
    pub verifier: AssertionVerifier,
}

/// Whether `path` is the CapabilityStatement (`/{care-system}/fhir/metadata`), the one URL
/// served without an identity.
fn is_metadata(path: &str) -> bool {
    let mut parts = path.trim_start_matches('/').split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(cs), Some("fhir"), Some("metadata"), None) if !cs.is_empty()
    )
}

/// Middleware: verifies the identity assertion and attaches the [`shcr_identity::Identity`].
pub(crate) async fn authenticate(
    State(auth): State<AuthState>,
    mut request: Request,
    next: Next,
) -> Response {
    if is_metadata(request.uri().path()) {
        return next.run(request).await;
    }
    let verified = match request.headers().get(ASSERTION_HEADER) {
        None => Err(AssertionError::Missing),
        Some(value) => match value.to_str() {
            Ok(token) => auth
                .verifier
                .verify(token.trim(), auth.store.care_system().as_str()),
            Err(_) => Err(AssertionError::Invalid(
                "the header is not visible ASCII".to_string(),
            )),
        },
    };
    match verified {
        Ok(identity) => {
            request.extensions_mut().insert(Arc::new(identity));
            next.run(request).await
        }
        Err(e) => ApiError::Unauthenticated(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_capability_statement_is_public() {
        assert!(is_metadata("/north-east/fhir/metadata"));
        assert!(!is_metadata("/north-east/fhir/metadata/x"));
        assert!(!is_metadata("/north-east/fhir/Patient"));
        assert!(!is_metadata("//fhir/metadata"));
        assert!(!is_metadata("/north-east/other/metadata"));
    }
}
