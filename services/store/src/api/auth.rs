//! Who may do what: verification of the gateway's identity assertion and the store's own
//! authorisation checks (defence in depth behind the gateway).
//!
//! Job: [`authenticate`] is a middleware in front of every route except `metadata`: it verifies
//! the `x-shcr-identity` assertion — signature, lifetime, that it names *this* care system, and
//! that it was signed for *this* request (method, path and query, then, once the body is read up
//! to the store's limit, the body's SHA-256) — accepts it once (the verifier's replay cache), and
//! puts the [`shcr_identity::Identity`] into the request extensions as an `Arc<Identity>`; without a valid
//! one the request gets 401 (`login`) with `WWW-Authenticate` and reaches no handler. The
//! gateway's refusal notices ([`super::refusal`]) are verified here too, as notices only, and
//! reach their handler as an `Arc<shcr_identity::RefusalNotice>`. Handlers
//! then call [`super::access::Access`] to check the assertion's SMART scopes (403 `forbidden`) and, for
//! patient-confined identities, that everything they touch is in that patient's compartment.
//!
//! Invariants:
//! - no handler other than `metadata` runs without a verified identity for this care system
//!   (or, on the refusal endpoint only, a verified refusal notice);
//! - an assertion serves one request: another method, path, query or body is 401, and so is a
//!   second use of the same assertion; when the replay cache is full of live assertions the
//!   request is refused (503), never accepted unremembered;
//! - confinement to a patient's compartment is decided per interaction and type by
//!   [`super::access`], never here.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
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

/// Middleware: verifies the identity assertion (or, on the refusal endpoint, the refusal
/// notice) and attaches the [`shcr_identity::Identity`] (or the notice).
pub(crate) async fn authenticate(
    State(auth): State<AuthState>,
    request: Request,
    next: Next,
) -> Response {
    if is_metadata(request.uri().path()) {
        return next.run(request).await;
    }
    let token = match request.headers().get(ASSERTION_HEADER) {
        None => return refuse(AssertionError::Missing),
        Some(value) => match value.to_str() {
            Ok(token) => token.trim().to_owned(),
            Err(_) => {
                return refuse(AssertionError::Invalid(
                    "the header is not visible ASCII".to_string(),
                ));
            }
        },
    };
    let care_system = auth.store.care_system().as_str();
    if super::refusal::is_refusal_path(request.uri().path()) {
        return match auth.verifier.verify_refusal(&token, care_system) {
            Ok(notice) => {
                let mut request = request;
                request.extensions_mut().insert(Arc::new(notice));
                next.run(request).await
            }
            Err(e) => refuse(e),
        };
    }
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path(), |pq| pq.as_str());
    let verified =
        match auth
            .verifier
            .verify(&token, care_system, request.method().as_str(), target)
        {
            Ok(verified) => verified,
            Err(e) => return refuse(e),
        };
    // The body is read here (handlers read it fully anyway, under the same limit) so that its
    // digest can be checked before any handler sees the request.
    let (parts, body) = request.into_parts();
    let limit = auth.store.config().max_body_bytes;
    let body = match read_body(body, &parts.headers, limit).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    match verified.accept(&body) {
        Ok(identity) => {
            let mut request = Request::from_parts(parts, Body::from(body));
            request.extensions_mut().insert(Arc::new(identity));
            next.run(request).await
        }
        Err(e) => refuse(e),
    }
}

/// The response refusing an assertion: 401, or 503 when the replay cache has no room.
fn refuse(error: AssertionError) -> Response {
    match error {
        AssertionError::ReplayCacheFull => {
            tracing::warn!(error = %error, "identity assertion refused");
            ApiError::StorageUnavailable.into_response()
        }
        error => ApiError::Unauthenticated(error).into_response(),
    }
}

/// Reads the body, refusing more than `limit` bytes with 413.
async fn read_body(
    body: Body,
    headers: &axum::http::HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::BodyTooLarge { limit })
        }
        Err(_) => Err(ApiError::BodyUnreadable),
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
