//! What one request's identity may do: SMART scopes and patient confinement, decided per
//! interaction and resource type.
//!
//! Job: [`Access::authorize`] is the one gate every interaction on a type passes. It checks that
//! some scope grants the interaction on the type (403 otherwise) and returns the request's
//! [`Confinement`] for it: unconfined when a `user/` or `system/` scope grants it, else confined
//! to the compartment of the identity's patient (the grant came from a `patient/` scope). The
//! handler then keeps to that confinement with the checks below — on existing targets, on
//! bodies about to be written, on searches (forced into the compartment) — and never decides
//! confinement itself.
//!
//! Invariants:
//! - confinement is per (type, interaction): a token with `patient/*.cruds user/Practitioner.rs`
//!   is confined on `Observation` and unconfined on reading `Practitioner`; mixing scopes never
//!   widens a `patient/` grant;
//! - a confined identity without a usable patient id is refused outright;
//! - a confined check on an existing resource is a compartment-key lookup: it answers 403 the
//!   same way whether the resource is absent, deleted or another patient's (no existence
//!   oracle);
//! - a search touches no type (chained or searched) that the scopes do not grant search on;
//! - refusals name the interaction and type, never a resource's content.

use shcr_fhir::resource::{Resource, ResourceId, ResourceType};
use shcr_fhir::search::{
    Criterion, Filter, ReferenceQuery, SearchQuery, find_param, patient_compartment,
};
use shcr_identity::{Identity, Interaction, ScopeContext};

use super::error::ApiError;
use super::fhir_store::FhirStore;

/// Whose data one interaction may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Confinement {
    /// Whatever the care system holds (a `user/` or `system/` scope granted it).
    Unconfined,
    /// Only this patient's compartment (only a `patient/` scope granted it).
    Patient(ResourceId),
}

impl Confinement {
    pub fn patient(&self) -> Option<&ResourceId> {
        match self {
            Self::Unconfined => None,
            Self::Patient(p) => Some(p),
        }
    }

    /// `resource_type/id` must be, in its current version, in the compartment.
    pub async fn require_existing(
        &self,
        store: &FhirStore,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<(), ApiError> {
        match self {
            Self::Unconfined => Ok(()),
            Self::Patient(patient) => {
                if store.in_compartment(patient, resource_type, id).await? {
                    Ok(())
                } else {
                    Err(ApiError::OutsideCompartment)
                }
            }
        }
    }

    /// A stored version (current or old) must be in the compartment: its own content decides,
    /// so an old version of a resource that moved between patients stays with its patient.
    pub fn permits_version(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        body: Option<&[u8]>,
    ) -> bool {
        let Self::Patient(patient) = self else {
            return true;
        };
        if resource_type == ResourceType::Patient {
            return id == patient;
        }
        body.and_then(|b| Resource::parse(b, Some(resource_type)).ok())
            .is_some_and(|r| patient_compartment(&r).contains(patient))
    }

    /// A resource about to be written must name the compartment's patient; a confined identity
    /// cannot create a Patient (the server assigns the id).
    pub fn require_writable(&self, resource: &Resource, create: bool) -> Result<(), ApiError> {
        let Self::Patient(patient) = self else {
            return Ok(());
        };
        if resource.resource_type() == ResourceType::Patient {
            return if !create && resource.id() == Some(patient) {
                Ok(())
            } else {
                Err(ApiError::OutsideCompartment)
            };
        }
        if patient_compartment(resource).contains(patient) {
            Ok(())
        } else {
            Err(ApiError::OutsideCompartment)
        }
    }

    /// An update of `resource_type/id`: a live target must be in the compartment; a confined
    /// identity may not update-as-create at all (absent and deleted ids answer like another
    /// patient's: 403), so it can never take over an id whose history it could not read.
    pub async fn require_updatable(
        &self,
        store: &FhirStore,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<(), ApiError> {
        self.require_existing(store, resource_type, id).await
    }

    /// Restricts `query` to the compartment by a forced `patient=Patient/{id}` criterion
    /// (`_id={id}` for Patient searches). Types outside the compartment are refused.
    pub fn confine_search(&self, query: &mut SearchQuery) -> Result<(), ApiError> {
        let Self::Patient(patient) = self else {
            return Ok(());
        };
        let filter = if query.resource_type == ResourceType::Patient {
            Filter {
                param: &shcr_fhir::search::ID,
                chain: None,
                criterion: Criterion::Ids(vec![patient.clone()]),
            }
        } else {
            let param =
                find_param(query.resource_type, "patient").ok_or(ApiError::OutsideCompartment)?;
            Filter {
                param,
                chain: None,
                criterion: Criterion::References(vec![ReferenceQuery {
                    resource_type: ResourceType::Patient,
                    id: patient.clone(),
                }]),
            }
        };
        query.filters.push(filter);
        Ok(())
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

    /// The scopes must permit `interaction` on `resource_type`; returns how far it reaches.
    pub fn authorize(
        &self,
        resource_type: ResourceType,
        interaction: Interaction,
    ) -> Result<Confinement, ApiError> {
        let scopes = &self.identity.scopes;
        if !scopes.permits(resource_type.as_str(), interaction) {
            return Err(ApiError::ScopeDenied {
                interaction,
                resource_type: Some(resource_type),
            });
        }
        let unconfined = scopes.clinical().iter().any(|s| {
            s.context != ScopeContext::Patient
                && s.interactions.contains(&interaction)
                && s.resource_type
                    .as_deref()
                    .is_none_or(|t| t == resource_type.as_str())
        });
        if unconfined {
            Ok(Confinement::Unconfined)
        } else {
            self.patient().map(Confinement::Patient)
        }
    }

    /// A search: search scope on the searched type and on every type a chain reaches; the
    /// query is confined as a search of its type must be. Returns the confinement applied.
    pub fn authorize_search(&self, query: &mut SearchQuery) -> Result<Confinement, ApiError> {
        let confinement = self.authorize(query.resource_type, Interaction::Search)?;
        for filter in &query.filters {
            if let Some(chain) = &filter.chain {
                self.authorize(chain.target_type, Interaction::Search)?;
            }
        }
        confinement.confine_search(query)?;
        Ok(confinement)
    }

    /// An interaction across every type and patient (system/type history, `$export`): a
    /// `user/` or `system/` scope must grant `interaction` on `*`.
    pub fn authorize_all_patients(
        &self,
        resource_type: Option<ResourceType>,
        interaction: Interaction,
        what: &'static str,
    ) -> Result<(), ApiError> {
        let granted = |context_ok: fn(ScopeContext) -> bool| {
            self.identity.scopes.clinical().iter().any(|s| {
                context_ok(s.context)
                    && s.interactions.contains(&interaction)
                    && match (resource_type, s.resource_type.as_deref()) {
                        (_, None) => true,
                        (Some(t), Some(granted)) => granted == t.as_str(),
                        (None, Some(_)) => false,
                    }
            })
        };
        if !granted(|_| true) {
            return Err(ApiError::ScopeDenied {
                interaction,
                resource_type,
            });
        }
        if granted(|c| c != ScopeContext::Patient) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(what))
        }
    }

    /// The confinement of reading `resource_type`, or `None` when the scopes do not grant it
    /// (to filter what a bundle returns).
    pub fn read_confinement(&self, resource_type: ResourceType) -> Option<Confinement> {
        self.authorize(resource_type, Interaction::Read).ok()
    }

    fn patient(&self) -> Result<ResourceId, ApiError> {
        match self.identity.patient.as_deref().map(ResourceId::parse) {
            Some(Ok(id)) => Ok(id),
            _ => Err(ApiError::Forbidden(
                "the identity's only grant for this is a patient scope, but it names no valid patient",
            )),
        }
    }
}

/// Whether `stored` may be returned to a reader with `confinement` (scope already checked).
pub(crate) async fn readable(
    store: &FhirStore,
    confinement: &Confinement,
    resource_type: ResourceType,
    id: &ResourceId,
) -> Result<bool, ApiError> {
    match confinement.patient() {
        None => Ok(true),
        Some(patient) => store.in_compartment(patient, resource_type, id).await,
    }
}

/// The `meta.security` confidentiality codes withheld without break-glass (v3-Confidentiality
/// restricted and very restricted).
const SENSITIVE: [&str; 2] = ["R", "V"];
const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";

/// Whether `stored` is labelled sensitive and must be withheld from `identity`: without a
/// break-glass reason, a resource labelled `R` or `V` is not served (reads answer 403, searches
/// leave it out and say so); with one it is served and the AuditEvent is flagged.
pub(crate) const WITHHELD: &str = "the record is labelled sensitive (meta.security R or V): \
     it is served only with a break-glass reason (X-Break-Glass-Reason), which is audited";

pub(crate) fn withheld(identity: &Identity, stored: &super::StoredVersion) -> bool {
    if identity.break_glass_reason.is_some() {
        return false;
    }
    let Some(body) = &stored.body else {
        return false;
    };
    // Most resources carry no labels: skip the parse for them.
    if !body.windows(10).any(|w| w == b"\"security\"") {
        return false;
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    value["meta"]["security"].as_array().is_some_and(|labels| {
        labels.iter().any(|l| {
            l["system"].as_str() == Some(CONFIDENTIALITY)
                && l["code"].as_str().is_some_and(|c| SENSITIVE.contains(&c))
        })
    })
}
