//! Who may do what: verification of the gateway's identity assertion and the store's own
//! authorisation checks (defence in depth behind the gateway).
//!
//! Job: [`authenticate`] is a middleware in front of every route except `metadata`: it verifies
//! the `x-shcr-identity` assertion (signature, lifetime, and that it names *this* care system)
//! and puts the [`Identity`] into the request extensions as an [`Arc<Identity>`]; without a valid
//! one the request gets 401 (`login`) with `WWW-Authenticate` and reaches no handler. Handlers
//! then call [`Access`] to check the assertion's SMART scopes (403 `forbidden`) and, for
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
use shcr_fhir::resource::{ResourceId, ResourceType};
use shcr_fhir::search::{Criterion, Filter, ReferenceQuery, SearchQuery, find_param};
use shcr_identity::{ASSERTION_HEADER, AssertionError, AssertionVerifier, Identity, Interaction};

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

/// Middleware: verifies the identity assertion and attaches the [`Identity`].
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

/// The authorisation checks of one request's identity.
pub(crate) struct Access<'a> {
    pub identity: &'a Identity,
}

impl<'a> Access<'a> {
    pub fn new(identity: &'a Identity) -> Self {
        Self { identity }
    }

    /// The scopes must permit `interaction` on `resource_type`.
    pub fn require(
        &self,
        resource_type: ResourceType,
        interaction: Interaction,
    ) -> Result<(), ApiError> {
        if self
            .identity
            .scopes
            .permits(resource_type.as_str(), interaction)
        {
            Ok(())
        } else {
            Err(ApiError::ScopeDenied {
                interaction,
                resource_type: Some(resource_type),
            })
        }
    }

    /// The scopes must permit `interaction` on every type (`*`), as system-level interactions
    /// need.
    pub fn require_all_types(&self, interaction: Interaction) -> Result<(), ApiError> {
        if self.identity.scopes.permits_all_types(interaction) {
            Ok(())
        } else {
            Err(ApiError::ScopeDenied {
                interaction,
                resource_type: None,
            })
        }
    }

    /// Whether the scopes permit reading `resource_type` (to filter what a bundle returns).
    pub fn may_read(&self, resource_type: ResourceType) -> bool {
        self.identity
            .scopes
            .permits(resource_type.as_str(), Interaction::Read)
    }

    /// The patient this identity is confined to, when it is patient-confined. A confined
    /// identity without a usable patient id is refused outright.
    pub fn confined_patient(&self) -> Result<Option<ResourceId>, ApiError> {
        if !self.identity.scopes.is_patient_confined() {
            return Ok(None);
        }
        match self.identity.patient.as_deref().map(ResourceId::parse) {
            Some(Ok(id)) => Ok(Some(id)),
            _ => Err(ApiError::Forbidden(
                "the identity has only patient scopes but names no valid patient",
            )),
        }
    }

    /// Refuses interactions spanning patients for confined identities.
    pub fn require_unconfined(&self, what: &'static str) -> Result<(), ApiError> {
        match self.confined_patient()? {
            None => Ok(()),
            Some(_) => Err(ApiError::Forbidden(what)),
        }
    }

    /// For a confined identity: `resource_type/id` must be in its patient's compartment now.
    pub async fn require_in_compartment(
        &self,
        store: &FhirStore,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<(), ApiError> {
        let Some(patient) = self.confined_patient()? else {
            return Ok(());
        };
        if store.in_compartment(&patient, resource_type, id).await? {
            Ok(())
        } else {
            Err(ApiError::OutsideCompartment)
        }
    }

    /// For a confined identity: the resource about to be written must name its patient.
    pub fn require_names_patient(&self, compartment: &[ResourceId]) -> Result<(), ApiError> {
        match self.confined_patient()? {
            Some(patient) if !compartment.contains(&patient) => Err(ApiError::OutsideCompartment),
            _ => Ok(()),
        }
    }

    /// For a confined identity: restricts `query` to the patient's compartment by adding a
    /// `patient=Patient/{id}` criterion (`_id={id}` for Patient searches). Types outside the
    /// compartment are refused.
    pub fn confine_search(&self, query: &mut SearchQuery) -> Result<(), ApiError> {
        let Some(patient) = self.confined_patient()? else {
            return Ok(());
        };
        let filter = if query.resource_type == ResourceType::Patient {
            Filter {
                param: &shcr_fhir::search::ID,
                chain: None,
                criterion: Criterion::Ids(vec![patient]),
            }
        } else {
            let param =
                find_param(query.resource_type, "patient").ok_or(ApiError::OutsideCompartment)?;
            Filter {
                param,
                chain: None,
                criterion: Criterion::References(vec![ReferenceQuery {
                    resource_type: ResourceType::Patient,
                    id: patient,
                }]),
            }
        };
        query.filters.push(filter);
        Ok(())
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
