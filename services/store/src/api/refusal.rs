//! The gateway's refusal notices: requests the gateway refused (401/403) for this care system,
//! recorded in this care system's audit trail although they never reached the store.
//!
//! Job: `POST /{care-system}/internal/gateway-refusals` carries a signed [`RefusalNotice`] in
//! the `x-shcr-identity` header (no body). [`super::auth::authenticate`] verifies it like any
//! assertion — the gateway's signature, its lifetime, that it names this care system, once —
//! and [`receive`] turns it into an AuditEvent ([`super::audit::refusal_event`]) queued on the
//! store's audit writer; the answer is 202 once queued.
//!
//! Invariants:
//! - only a verified notice reaches [`receive`]: an identity assertion is not a notice (the JWS
//!   `typ` differs), and a notice is refused everywhere else;
//! - the path is outside `/fhir`, which is all the gateway forwards, so clients cannot reach it
//!   through the gateway; inside the cluster only the gateway may connect to a store;
//! - a notice holds the method and resource type of the refused request, never ids, query
//!   values or bodies.

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shcr_identity::RefusalNotice;

use super::audit::refusal_event;
use super::error::ApiError;
use super::fhir_store::{FhirStore, now_micros};

/// The route of the endpoint, for the router.
pub(crate) const ROUTE: &str = "/{care_system}/internal/gateway-refusals";

/// Whether `path` is the refusal endpoint of some care system.
pub(crate) fn is_refusal_path(path: &str) -> bool {
    let mut parts = path.trim_start_matches('/').split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(cs), Some("internal"), Some("gateway-refusals"), None) if !cs.is_empty()
    )
}

/// Records the verified notice as an AuditEvent.
pub(crate) async fn receive(
    State(store): State<Arc<FhirStore>>,
    Path(care_system): Path<String>,
    Extension(notice): Extension<Arc<RefusalNotice>>,
) -> Response {
    if care_system != store.care_system().as_str() {
        return ApiError::WrongCareSystem.into_response();
    }
    match refusal_event(&notice, now_micros()) {
        Some(event) => {
            store.audit_writer().enqueue(event).await;
            StatusCode::ACCEPTED.into_response()
        }
        None => ApiError::Internal.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_internal_endpoint_is_a_refusal_path() {
        assert!(is_refusal_path("/north-east/internal/gateway-refusals"));
        assert!(!is_refusal_path("/north-east/internal/gateway-refusals/x"));
        assert!(!is_refusal_path("/north-east/fhir/gateway-refusals"));
        assert!(!is_refusal_path("//internal/gateway-refusals"));
    }
}
