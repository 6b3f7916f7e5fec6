//! The CapabilityStatement served at `metadata`.
//!
//! Invariant: it lists exactly what [`super::http`] serves — the types, the interactions per
//! type, the search parameters (from the same registry the search code uses) and operations —
//! and nothing else, so a client can trust it.

use serde_json::{Value, json};
use shcr_fhir::resource::ResourceType;
use shcr_fhir::search::{ID, LAST_UPDATED, ParamKind, type_params};

/// Whether clients may create, update and delete resources of this type. Audit events are
/// written by the store itself, never by clients.
pub fn client_writable(resource_type: ResourceType) -> bool {
    resource_type != ResourceType::AuditEvent
}

/// The CapabilityStatement of a store whose base URL is `base`; `date` is a FHIR dateTime.
pub fn capability_statement(base: &str, date: &str) -> Value {
    let resources: Vec<Value> = ResourceType::ALL
        .iter()
        .map(|&t| {
            let mut interactions = vec![
                "read",
                "vread",
                "search-type",
                "history-instance",
                "history-type",
            ];
            if client_writable(t) {
                interactions.extend(["create", "update", "delete"]);
            }
            let params: Vec<Value> = [&ID, &LAST_UPDATED]
                .into_iter()
                .chain(type_params(t))
                .map(|p| {
                    let mut param = json!({"name": p.name, "type": p.kind.as_str()});
                    if p.kind == ParamKind::Reference {
                        param["documentation"] =
                            json!("one level of chaining is supported, e.g. patient.identifier");
                    }
                    param
                })
                .collect();
            let mut resource = json!({
                "type": t.as_str(),
                "interaction": interactions
                    .iter()
                    .map(|code| json!({"code": code}))
                    .collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": client_writable(t),
                "conditionalCreate": client_writable(t),
                "conditionalRead": "not-supported",
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "searchParam": params,
            });
            if t == ResourceType::Patient {
                resource["operation"] = json!([{
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                }]);
            }
            resource
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": {"name": "ShCR", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "ShCR record store", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{"code": "history-system"}],
        }],
    })
}
