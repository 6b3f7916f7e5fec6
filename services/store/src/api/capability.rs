//! The CapabilityStatement served at `metadata`.
//!
//! Invariant: it lists exactly what [`super::http`] serves — the types, the interactions per
//! type, the search parameters and `_include`/`_revinclude` values (from the same registry the
//! search code uses), operations, `batch`/`transaction` and system history, and the security
//! model (the gateway's identity assertion) — and nothing else, so a client can trust it.
//! Not listed because not served: system search, conditional update/delete/read, PATCH,
//! `Group/$export`.

use serde_json::{Value, json};
use shcr_fhir::resource::ResourceType;
use shcr_fhir::search::{ID, LAST_UPDATED, ParamKind, type_params};

/// `Type:param` for every reference parameter of `t` (its `_include` values).
fn includes(t: ResourceType) -> Vec<String> {
    type_params(t)
        .iter()
        .filter(|p| p.kind == ParamKind::Reference)
        .map(|p| format!("{t}:{}", p.name))
        .collect()
}

/// `Source:param` for every reference parameter of any type that may point at `t` (the
/// `_revinclude` values of a search on `t`).
fn revincludes(t: ResourceType) -> Vec<String> {
    ResourceType::ALL
        .iter()
        .flat_map(|&source| {
            type_params(source)
                .iter()
                .filter(move |p| p.kind == ParamKind::Reference && p.targets.contains(&t))
                .map(move |p| format!("{source}:{}", p.name))
        })
        .collect()
}

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
                    if t == ResourceType::AuditEvent && p.name == "agent" {
                        param["documentation"] = json!(
                            "token on the agent's identifier: the person's SDS user id or the \
                             organisation's ODS code (system|value or value)"
                        );
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
                "searchInclude": includes(t),
                "searchRevInclude": revincludes(t),
            });
            if t == ResourceType::Patient {
                resource["operation"] = json!([
                    {
                        "name": "everything",
                        "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    },
                    {
                        "name": "export",
                        "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
                    },
                ]);
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
            "security": {
                "cors": false,
                "description": "Requests reach the store only through the ShCR gateway, which \
                    authenticates the person (OIDC) and attaches a short-lived signed identity \
                    assertion (x-shcr-identity, EdDSA) naming this care system; without a valid \
                    one every interaction but metadata is 401. SMART v2 scopes in the assertion \
                    are enforced (403), patient-scoped identities reach only their patient's \
                    compartment, and every interaction is recorded as an AuditEvent.",
            },
            "resource": resources,
            "interaction": [
                {"code": "history-system"},
                {"code": "batch"},
                {"code": "transaction"},
            ],
            "operation": [{
                "name": "export",
                "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
                "documentation": "Prefer: respond-async; _type, _since; NDJSON per type, \
                    encrypted at rest, downloaded through this API by the requester",
            }],
        }],
    })
}
