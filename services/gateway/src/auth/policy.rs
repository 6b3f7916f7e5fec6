//! What a request asks to do, and whether a principal may do it in a care system.
//!
//! Job: [`classify`] turns an HTTP method and the FHIR path below `/{care-system}/fhir` into a
//! [`RequestClass`] — one SMART interaction on one or more resource types (or on every type),
//! a Bundle, or a public URL. [`authorize`] decides, before anything reaches a store, whether a
//! [`Principal`] may do it: they must act for a member organisation of the care system, their
//! SMART scopes must permit the interaction on the type, and a patient-confined token may not
//! name another patient's compartment or reach across patients.
//!
//! Invariants:
//! - classification is conservative: anything it does not recognise is refused
//!   ([`Unclassified`]) or needs the wildcard scope, never let through with less;
//! - a Bundle is classed as such; the store checks every entry against the scopes in the
//!   identity assertion (the gateway checks only that the token may act here at all);
//! - a [`Denial`] speaks only of the token's rights, never of records, so a 403 does not reveal
//!   whether a record exists — here or in another care system;
//! - the checks are pure: no I/O, no clock; logging and counting happen in the caller
//!   ([`super::Authenticator::authorize`]).

use axum::http::Method;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shcr_fhir::outcome::{IssueType, OperationOutcome};
use shcr_identity::{Interaction, ScopeContext};

use super::claims::Principal;
use super::fhir_response;

/// What a FHIR request asks to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestClass {
    /// Served without a token: the CapabilityStatement (`metadata`) and SMART discovery
    /// (`.well-known/smart-configuration`).
    Public,
    /// A batch or transaction Bundle POSTed to the base. The gateway checks membership and
    /// that the token has some clinical scope; the store checks each entry.
    Bundle,
    /// One interaction on some resource types.
    Access(Access),
}

/// One interaction on some resource types, possibly within one compartment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The interaction, as SMART groups them (history and `$everything` are reads).
    pub interaction: Interaction,
    /// Which resource types it touches.
    pub resource_types: ResourceTypes,
    /// The compartment the path names (`Patient/123`, `Patient/123/Observation`,
    /// `Patient/123/$everything`), if any.
    pub compartment: Option<Compartment>,
}

/// The resource types an interaction touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceTypes {
    /// These types (one for a type or instance interaction; the `_type` list of a system
    /// search).
    Only(Vec<String>),
    /// Every type: system history, system search without `_type`, `$export`, `$everything`,
    /// operations the gateway does not know. Needs a `*` scope.
    All,
}

/// A compartment named in the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compartment {
    /// The compartment's resource type, e.g. `Patient`.
    pub resource_type: String,
    /// Its id.
    pub id: String,
}

/// A method and path that are no FHIR interaction the gateway knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unclassified {
    /// The path is no FHIR REST URL.
    #[error("{0} is not a FHIR REST interaction this server supports")]
    Path(&'static str),
    /// The path is, but not with this method.
    #[error("method {method} is not allowed on this FHIR URL")]
    Method {
        /// The method used.
        method: String,
    },
}

impl IntoResponse for Unclassified {
    fn into_response(self) -> Response {
        let status = match self {
            Unclassified::Path(_) => StatusCode::NOT_FOUND,
            Unclassified::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
        };
        fhir_response(
            status,
            &OperationOutcome::error(IssueType::NotSupported, self.to_string()),
        )
    }
}

/// Classifies `method` on `path`, the part of the URL after `/{care-system}/fhir` (with or
/// without its leading `/`), and `query` (the raw query string, without `?`).
pub fn classify(
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<RequestClass, Unclassified> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let segments: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    if segments.iter().any(|s| s.is_empty()) {
        return Err(Unclassified::Path("a path with an empty segment"));
    }
    let read = method == Method::GET || method == Method::HEAD;
    let not_allowed = || Unclassified::Method {
        method: method.as_str().to_owned(),
    };
    let access = |interaction, resource_types, compartment| {
        Ok(RequestClass::Access(Access {
            interaction,
            resource_types,
            compartment,
        }))
    };
    let one = |t: &str| ResourceTypes::Only(vec![t.to_owned()]);
    match segments.as_slice() {
        [] if method == Method::POST => Ok(RequestClass::Bundle),
        [] if read => access(Interaction::Search, system_search_types(query), None),
        [] => Err(not_allowed()),
        ["metadata"] | [".well-known", "smart-configuration"] if read => Ok(RequestClass::Public),
        ["metadata"] | [".well-known", "smart-configuration"] => Err(not_allowed()),
        ["_history"] if read => access(Interaction::Read, ResourceTypes::All, None),
        ["_search"] if method == Method::POST => {
            access(Interaction::Search, system_search_types(query), None)
        }
        [op] if op.starts_with('$') => operation(method, ResourceTypes::All, None),
        [t] if is_type(t) => match *method {
            Method::GET | Method::HEAD => access(Interaction::Search, one(t), None),
            Method::POST => access(Interaction::Create, one(t), None),
            // Conditional update and patch.
            Method::PUT | Method::PATCH => access(Interaction::Update, one(t), None),
            Method::DELETE => access(Interaction::Delete, one(t), None),
            _ => Err(not_allowed()),
        },
        [t, "_search"] if is_type(t) && method == Method::POST => {
            access(Interaction::Search, one(t), None)
        }
        [t, "_history"] if is_type(t) && read => access(Interaction::Read, one(t), None),
        [t, op] if is_type(t) && op.starts_with('$') => {
            let types = if *op == "$export" {
                ResourceTypes::All
            } else {
                one(t)
            };
            operation(method, types, None)
        }
        [t, id] if is_type(t) && is_id(id) => {
            let compartment = patient_compartment(t, id);
            match *method {
                Method::GET | Method::HEAD => access(Interaction::Read, one(t), compartment),
                Method::PUT | Method::PATCH => access(Interaction::Update, one(t), compartment),
                Method::DELETE => access(Interaction::Delete, one(t), compartment),
                _ => Err(not_allowed()),
            }
        }
        [t, id, "_history"] if is_type(t) && is_id(id) && read => {
            access(Interaction::Read, one(t), patient_compartment(t, id))
        }
        [t, id, "_history", version] if is_type(t) && is_id(id) && is_id(version) && read => {
            access(Interaction::Read, one(t), patient_compartment(t, id))
        }
        ["Patient", id, "$everything"] if is_id(id) => {
            if read || method == Method::POST {
                access(
                    Interaction::Read,
                    ResourceTypes::All,
                    patient_compartment("Patient", id),
                )
            } else {
                Err(not_allowed())
            }
        }
        [t, id, op] if is_type(t) && is_id(id) && op.starts_with('$') => {
            let types = if *op == "$export" {
                ResourceTypes::All
            } else {
                one(t)
            };
            operation(method, types, patient_compartment(t, id))
        }
        // Compartment search: `Patient/123/Observation`, `Patient/123/*`.
        [t, id, target] if is_type(t) && is_id(id) && (is_type(target) || *target == "*") => {
            if !read {
                return Err(not_allowed());
            }
            let types = if *target == "*" {
                ResourceTypes::All
            } else {
                one(target)
            };
            access(
                Interaction::Search,
                types,
                Some(Compartment {
                    resource_type: (*t).to_owned(),
                    id: (*id).to_owned(),
                }),
            )
        }
        _ => Err(Unclassified::Path("this path")),
    }
}

/// An operation (`$name`): a read when fetched with GET, an update (the broadest write a
/// non-delete operation may be) when POSTed. Unknown operations therefore need a scope as
/// wide as what they could do.
fn operation(
    method: &Method,
    resource_types: ResourceTypes,
    compartment: Option<Compartment>,
) -> Result<RequestClass, Unclassified> {
    let interaction = match *method {
        Method::GET | Method::HEAD => Interaction::Read,
        Method::POST => Interaction::Update,
        _ => {
            return Err(Unclassified::Method {
                method: method.as_str().to_owned(),
            });
        }
    };
    Ok(RequestClass::Access(Access {
        interaction,
        resource_types,
        compartment,
    }))
}

/// A system search is limited to the types in `_type`, when every listed type is a type name.
fn system_search_types(query: Option<&str>) -> ResourceTypes {
    let Some(query) = query else {
        return ResourceTypes::All;
    };
    let mut types: Vec<String> = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if name == "_type" {
            for t in value.split(',') {
                if !is_type(t) {
                    return ResourceTypes::All;
                }
                types.push(t.to_owned());
            }
        }
    }
    if types.is_empty() {
        ResourceTypes::All
    } else {
        ResourceTypes::Only(types)
    }
}

fn patient_compartment(resource_type: &str, id: &str) -> Option<Compartment> {
    (resource_type == "Patient").then(|| Compartment {
        resource_type: "Patient".to_owned(),
        id: id.to_owned(),
    })
}

/// A FHIR resource type name (shape only; the store knows which types it supports).
fn is_type(segment: &str) -> bool {
    let mut chars = segment.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphanumeric())
        && segment.len() <= 64
}

/// A FHIR id: 1 to 64 of `A-Z a-z 0-9 - .`.
fn is_id(segment: &str) -> bool {
    (1..=64).contains(&segment.len())
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Why a principal may not do what they asked. The messages speak of the token, never of
/// records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// Their organisation is not a member of this care system.
    #[error(
        "organisation {organisation} (the role you signed in with) is not a member of this care system; sign in with a role at a member organisation"
    )]
    NotMember {
        /// The principal's own ODS code.
        organisation: String,
    },
    /// No scope permits the interaction on the type(s).
    #[error("the token's scopes do not permit {interaction} on {target}")]
    Scope {
        /// The interaction asked for.
        interaction: Interaction,
        /// `Observation`, `Observation, Condition` or `every resource type`.
        target: String,
    },
    /// The token has no clinical scope at all.
    #[error("the token has no SMART clinical scope (e.g. user/*.rs), so it permits nothing here")]
    NoClinicalScope,
    /// A patient-confined token naming another patient's compartment.
    #[error("this token is confined to one patient's records; the request names another patient")]
    OtherPatient,
    /// A patient-confined token asking for something that spans patients.
    #[error(
        "this token is confined to one patient's records; {interaction} across every patient is not allowed"
    )]
    AcrossPatients {
        /// The interaction asked for.
        interaction: Interaction,
    },
}

impl Denial {
    /// A low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotMember { .. } => "not_member",
            Self::Scope { .. } => "scope",
            Self::NoClinicalScope => "no_clinical_scope",
            Self::OtherPatient => "other_patient",
            Self::AcrossPatients { .. } => "across_patients",
        }
    }

    /// The 403 `OperationOutcome`.
    pub fn outcome(&self) -> OperationOutcome {
        OperationOutcome::error(IssueType::Forbidden, self.to_string())
    }
}

impl IntoResponse for Denial {
    fn into_response(self) -> Response {
        fhir_response(StatusCode::FORBIDDEN, &self.outcome())
    }
}

/// Decides whether `principal` may do `class` in a care system whose member organisations
/// (ODS codes) are `members`.
pub fn authorize(
    principal: &Principal,
    members: &[String],
    class: &RequestClass,
) -> Result<(), Denial> {
    let access = match class {
        RequestClass::Public => return Ok(()),
        RequestClass::Bundle | RequestClass::Access(_) => {
            if !members.contains(&principal.organisation) {
                return Err(Denial::NotMember {
                    organisation: principal.organisation.clone(),
                });
            }
            if principal.scopes.is_empty() {
                return Err(Denial::NoClinicalScope);
            }
            match class {
                RequestClass::Access(access) => access,
                _ => return Ok(()),
            }
        }
    };
    let permits = |context_ok: &dyn Fn(ScopeContext) -> bool| {
        let permits_type = |t: Option<&str>| {
            principal.scopes.clinical().iter().any(|scope| {
                context_ok(scope.context)
                    && scope.interactions.contains(&access.interaction)
                    && match (&scope.resource_type, t) {
                        (None, _) => true,
                        (Some(granted), Some(t)) => granted == t,
                        (Some(_), None) => false,
                    }
            })
        };
        match &access.resource_types {
            ResourceTypes::All => permits_type(None),
            ResourceTypes::Only(types) => types.iter().all(|t| permits_type(Some(t))),
        }
    };
    // `user/` and `system/` scopes reach whatever the user may see.
    if permits(&|context| context != ScopeContext::Patient) {
        return Ok(());
    }
    // Otherwise only `patient/` scopes could permit it: confined to the token's patient.
    if !permits(&|context| context == ScopeContext::Patient) {
        return Err(Denial::Scope {
            interaction: access.interaction,
            target: match &access.resource_types {
                ResourceTypes::All => "every resource type".to_owned(),
                ResourceTypes::Only(types) => types.join(", "),
            },
        });
    }
    let Some(patient) = principal.patient.as_deref() else {
        // The claims mapping refuses patient scopes without a patient; kept as a guard.
        return Err(Denial::OtherPatient);
    };
    match &access.compartment {
        Some(compartment) if compartment.resource_type == "Patient" => {
            if compartment.id == patient {
                Ok(())
            } else {
                Err(Denial::OtherPatient)
            }
        }
        // Another compartment (e.g. Encounter/1/...): the store confines it to the patient.
        Some(_) => Ok(()),
        None => match (&access.resource_types, access.interaction) {
            // Type-level search, read, create…: the store confines them to the compartment.
            (ResourceTypes::Only(_), _) => Ok(()),
            (ResourceTypes::All, interaction) => Err(Denial::AcrossPatients { interaction }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(interaction: Interaction, t: &str) -> RequestClass {
        RequestClass::Access(Access {
            interaction,
            resource_types: ResourceTypes::Only(vec![t.to_owned()]),
            compartment: None,
        })
    }

    #[test]
    fn classify_the_fhir_rest_surface() {
        let get = Method::GET;
        assert_eq!(
            classify(&get, "/Patient/1", None),
            Ok(RequestClass::Access(Access {
                interaction: Interaction::Read,
                resource_types: ResourceTypes::Only(vec!["Patient".into()]),
                compartment: Some(Compartment {
                    resource_type: "Patient".into(),
                    id: "1".into()
                }),
            }))
        );
        assert_eq!(
            classify(&get, "Observation", Some("code=1234")),
            Ok(access(Interaction::Search, "Observation"))
        );
        assert_eq!(
            classify(&Method::POST, "Observation", None),
            Ok(access(Interaction::Create, "Observation"))
        );
        assert_eq!(
            classify(&Method::POST, "Observation/_search", None),
            Ok(access(Interaction::Search, "Observation"))
        );
        assert_eq!(
            classify(&Method::PUT, "Observation/o-1", None),
            Ok(access(Interaction::Update, "Observation"))
        );
        assert_eq!(
            classify(&Method::DELETE, "Observation/o-1", None),
            Ok(access(Interaction::Delete, "Observation"))
        );
        assert_eq!(
            classify(&get, "Observation/o-1/_history/3", None),
            Ok(access(Interaction::Read, "Observation"))
        );
        assert_eq!(classify(&Method::POST, "", None), Ok(RequestClass::Bundle));
        assert_eq!(classify(&get, "/metadata", None), Ok(RequestClass::Public));
        assert_eq!(
            classify(&get, ".well-known/smart-configuration", None),
            Ok(RequestClass::Public)
        );
        let all = |interaction, compartment| {
            Ok(RequestClass::Access(Access {
                interaction,
                resource_types: ResourceTypes::All,
                compartment,
            }))
        };
        assert_eq!(
            classify(&get, "_history", None),
            all(Interaction::Read, None)
        );
        assert_eq!(classify(&get, "/", None), all(Interaction::Search, None));
        assert_eq!(
            classify(&get, "$export", None),
            all(Interaction::Read, None)
        );
        assert_eq!(
            classify(&get, "Patient/$export", None),
            all(Interaction::Read, None)
        );
        assert_eq!(
            classify(&get, "Patient/p1/$everything", None),
            all(
                Interaction::Read,
                Some(Compartment {
                    resource_type: "Patient".into(),
                    id: "p1".into()
                })
            )
        );
        assert_eq!(
            classify(&get, "", Some("_type=Observation,Condition&_count=5")),
            Ok(RequestClass::Access(Access {
                interaction: Interaction::Search,
                resource_types: ResourceTypes::Only(vec!["Observation".into(), "Condition".into()]),
                compartment: None,
            }))
        );
        assert_eq!(
            classify(&get, "Patient/p1/Observation", None),
            Ok(RequestClass::Access(Access {
                interaction: Interaction::Search,
                resource_types: ResourceTypes::Only(vec!["Observation".into()]),
                compartment: Some(Compartment {
                    resource_type: "Patient".into(),
                    id: "p1".into()
                }),
            }))
        );
        assert!(matches!(
            classify(&Method::POST, "Patient/p1", None),
            Err(Unclassified::Method { .. })
        ));
        assert!(matches!(
            classify(&get, "Patient//1", None),
            Err(Unclassified::Path(_))
        ));
        assert!(matches!(
            classify(&get, "patient/1", None),
            Err(Unclassified::Path(_))
        ));
        assert!(matches!(
            classify(&get, "Patient/1/_history/2/x", None),
            Err(Unclassified::Path(_))
        ));
    }
}
