//! The audit trail: one FHIR R4 `AuditEvent` per interaction, stored in the care system's own
//! database and searchable with `AuditEvent?patient=`, `date`, `agent` (and `action`,
//! `subtype`, `outcome`).
//!
//! Job: [`record`] is a middleware inside [`super::auth::authenticate`]: it gives each request an
//! [`AuditSlot`] that handlers fill as they learn what the request touches (the interaction, the
//! resource, the patients), and once the response is ready it records what happened — who (the
//! assertion's subject, organisation and role), for which patient and resource, what (the FHIR
//! RESTful interaction as `subtype`, the CRUDE `action`), when, the outcome (from the status),
//! and a break-glass reason as a flagged `purposeOfEvent` (`BTG` from v3-ActReason, the reason as
//! text). Failures (403, 404, 412, 5xx, …) are audited like successes.
//!
//! How events reach storage (the latency/loss trade-off):
//! - a successful write carries its AuditEvent in the *same* atomic commit as the resource (see
//!   [`super::fhir_store`]): the write and its audit are durable together or not at all, at no
//!   extra commit;
//! - everything else (reads, searches, history, `$everything`, failed writes) is handed to a
//!   bounded background writer that group-commits queued events. The response does not wait for
//!   that commit, so a read costs no extra round trip to the bucket. Events are not dropped: when
//!   the queue is full, requests wait for room (backpressure), a failing commit is retried with
//!   backoff and logged, and [`super::FhirStore::flush_audit`] (called on shutdown) waits until
//!   the queue is durable. What can be lost is the queue of a process that dies without shutting
//!   down (at most [`QUEUE_CAPACITY`] events, typically a few milliseconds' worth);
//! - requests without a valid assertion (401) are logged and not stored: an unauthenticated
//!   caller must not be able to write into a tenant's database.
//!
//! Invariants: audit events are written by the store only (clients get 405 on AuditEvent writes,
//! see [`super::capability::client_writable`]); they are indexed but not members of the patient
//! compartment, so `$everything` does not grow with every read of a record; an event holds
//! references and codes, never resource content.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{Value, json};
use shcr_fhir::datetime::format_instant;
use shcr_fhir::resource::{Resource, ResourceId, ResourceType};
use shcr_fhir::search::patient_compartment;
use shcr_identity::Identity;
use tokio::sync::mpsc;

use super::fhir_store::{FhirStore, StoredVersion, now_micros, stage_new};
use crate::engine::Commit;
use crate::tenant::TenantDatabase;

/// Events waiting for the background writer; beyond this, requests wait.
pub const QUEUE_CAPACITY: usize = 4096;

/// The most events one background commit carries.
const BATCH: usize = 512;

/// A FHIR RESTful interaction (`http://hl7.org/fhir/restful-interaction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditInteraction {
    Read,
    Vread,
    Update,
    Delete,
    HistoryInstance,
    HistoryType,
    HistorySystem,
    Create,
    SearchType,
    Batch,
    Transaction,
    Operation,
}

impl AuditInteraction {
    pub fn code(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Vread => "vread",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::HistoryInstance => "history-instance",
            Self::HistoryType => "history-type",
            Self::HistorySystem => "history-system",
            Self::Create => "create",
            Self::SearchType => "search-type",
            Self::Batch => "batch",
            Self::Transaction => "transaction",
            Self::Operation => "operation",
        }
    }

    /// The AuditEvent `action` (C R U D E).
    pub fn action(self) -> &'static str {
        match self {
            Self::Create => "C",
            Self::Update => "U",
            Self::Delete => "D",
            Self::Batch | Self::Transaction | Self::Operation => "E",
            Self::Read
            | Self::Vread
            | Self::HistoryInstance
            | Self::HistoryType
            | Self::HistorySystem
            | Self::SearchType => "R",
        }
    }

    fn from_method(method: &Method) -> Self {
        match *method {
            Method::POST => Self::Create,
            Method::PUT => Self::Update,
            Method::DELETE => Self::Delete,
            _ => Self::Read,
        }
    }
}

/// What one request touched, filled in by its handler.
#[derive(Debug, Default, Clone)]
pub struct AuditFacts {
    pub interaction: Option<AuditInteraction>,
    /// The resource type the request addressed (type-level and instance-level URLs).
    pub resource_type: Option<ResourceType>,
    /// The resource the request addressed or created.
    pub resource: Option<(ResourceType, ResourceId)>,
    /// Further resources a batch or transaction touched.
    pub others: Vec<(ResourceType, ResourceId)>,
    /// The operation name, for `$everything` and `$export`.
    pub operation: Option<&'static str>,
    pub patients: BTreeSet<ResourceId>,
    /// Set once the event went into the write's own commit.
    pub recorded: bool,
}

impl AuditFacts {
    pub fn add_patients(&mut self, patients: impl IntoIterator<Item = ResourceId>) {
        // Never truncated: an access to sixty records names all sixty patients.
        self.patients.extend(patients);
    }

    /// Adds the patients whose compartment `stored` is in (parsing its JSON).
    pub fn add_patients_of(&mut self, stored: &StoredVersion) {
        if stored.resource_type == ResourceType::Patient {
            self.add_patients([stored.id.clone()]);
        } else if let Some(body) = &stored.body
            && let Ok(resource) = Resource::parse(body, Some(stored.resource_type))
        {
            self.add_patients(patient_compartment(&resource));
        }
    }
}

/// The request's audit facts, shared between the middleware and the handler.
#[derive(Debug, Clone, Default)]
pub struct AuditSlot(Arc<Mutex<AuditFacts>>);

impl AuditSlot {
    /// Updates the facts (a poisoned lock still holds usable facts).
    pub fn with<R>(&self, f: impl FnOnce(&mut AuditFacts) -> R) -> R {
        let mut facts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut facts)
    }

    pub fn set(
        &self,
        interaction: AuditInteraction,
        resource_type: Option<ResourceType>,
        id: Option<&ResourceId>,
    ) {
        self.with(|f| {
            f.interaction = Some(interaction);
            f.resource_type = resource_type;
            if let (Some(t), Some(id)) = (resource_type, id) {
                f.resource = Some((t, id.clone()));
            }
        });
    }

    fn take(&self) -> AuditFacts {
        self.with(std::mem::take)
    }
}

/// The AuditEvent `outcome` for an HTTP status: 0 success, 4 minor failure (the client's),
/// 8 serious failure (the server's).
fn outcome_code(status: u16) -> &'static str {
    match status {
        0..=399 => "0",
        400..=499 => "4",
        _ => "8",
    }
}

/// Builds the AuditEvent for `facts` (without id and meta, which storage assigns).
pub fn audit_event(
    identity: &Identity,
    facts: &AuditFacts,
    status: u16,
    recorded: i64,
) -> Option<Resource> {
    let interaction = facts.interaction.unwrap_or(AuditInteraction::Read);
    let mut entity: Vec<Value> = facts
        .patients
        .iter()
        .map(|p| {
            json!({
                "what": {"reference": format!("Patient/{p}")},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "1",
                    "display": "Person",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                    "display": "Patient",
                },
            })
        })
        .collect();
    match &facts.resource {
        Some((t, id)) if !(*t == ResourceType::Patient && facts.patients.contains(id)) => {
            entity.push(json!({
                "what": {"reference": format!("{t}/{id}")},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                    "display": "System Object",
                },
            }));
        }
        Some(_) => {}
        None => {
            if let Some(t) = facts.resource_type {
                entity.push(json!({
                    "type": {
                        "system": "http://hl7.org/fhir/resource-types",
                        "code": t.as_str(),
                    },
                    "description": "resource type addressed",
                }));
            }
        }
    }
    for (t, id) in &facts.others {
        entity.push(json!({
            "what": {"reference": format!("{t}/{id}")},
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                "code": "2",
                "display": "System Object",
            },
        }));
    }
    if let Some(operation) = facts.operation {
        entity.push(json!({"name": operation, "description": "operation invoked"}));
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{
            "system": "http://hl7.org/fhir/restful-interaction",
            "code": interaction.code(),
        }],
        "action": interaction.action(),
        "recorded": format_instant(recorded)?,
        "outcome": outcome_code(status),
        "outcomeDesc": format!("HTTP {status}"),
        "agent": [
            {
                "type": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "code": "AUT",
                    "display": "author (originator)",
                }]},
                "who": {"identifier": {
                    "system": "https://fhir.nhs.uk/Id/sds-user-id",
                    "value": identity.subject,
                }},
                "altId": identity.subject,
                "role": [{"coding": [{
                    "system": "https://fhir.nhs.uk/CodeSystem/NHSDigital-SDS-JobRoleCode",
                    "code": identity.role,
                }]}],
                "requestor": true,
            },
            {
                "type": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                    "code": "PROV",
                    "display": "healthcare provider",
                }]},
                "who": {"identifier": {
                    "system": "https://fhir.nhs.uk/Id/ods-organization-code",
                    "value": identity.organisation,
                }},
                "requestor": false,
            },
        ],
        "source": {
            "site": identity.care_system,
            "observer": {"display": "ShCR record store"},
            "type": [{
                "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "4",
                "display": "Application Server",
            }],
        },
        "extension": [{
            "url": "https://shcr.dev/fhir/StructureDefinition/request-id",
            "valueString": identity.request_id,
        }],
    });
    if !entity.is_empty() {
        event["entity"] = Value::Array(entity);
    }
    if let Some(reason) = &identity.break_glass_reason {
        event["purposeOfEvent"] = json!([{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                "code": "BTG",
                "display": "break the glass",
            }],
            "text": reason,
        }]);
        event["meta"] = json!({"security": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
            "code": "BTG",
        }]});
    }
    Resource::parse(event.to_string().as_bytes(), Some(ResourceType::AuditEvent))
        .map_err(|e| {
            tracing::error!(error = %e, "built an AuditEvent the parser refuses");
        })
        .ok()
}

/// Builds the AuditEvent of a request the gateway refused (401/403) for this care system, from
/// its signed notice: who when known (issuer as an extension, subject, organisation, role), or
/// `unauthenticated`; what was attempted (the method and the resource type of the path).
pub(crate) fn refusal_event(
    notice: &shcr_identity::RefusalNotice,
    recorded: i64,
) -> Option<Resource> {
    let method = Method::from_bytes(notice.method.as_bytes()).unwrap_or(Method::GET);
    let interaction = AuditInteraction::from_method(&method);
    let agents = match &notice.actor {
        Some(actor) => json!([
            {
                "extension": [{
                    "url": "https://shcr.dev/fhir/StructureDefinition/identity-provider",
                    "valueUri": actor.issuer,
                }],
                "type": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "code": "AUT",
                    "display": "author (originator)",
                }]},
                "who": {"identifier": {
                    "system": "https://fhir.nhs.uk/Id/sds-user-id",
                    "value": actor.subject,
                }},
                "altId": actor.subject,
                "role": [{"coding": [{
                    "system": "https://fhir.nhs.uk/CodeSystem/NHSDigital-SDS-JobRoleCode",
                    "code": actor.role,
                }]}],
                "requestor": true,
            },
            {
                "type": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                    "code": "PROV",
                    "display": "healthcare provider",
                }]},
                "who": {"identifier": {
                    "system": "https://fhir.nhs.uk/Id/ods-organization-code",
                    "value": actor.organisation,
                }},
                "requestor": false,
            },
        ]),
        None => json!([{
            "type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                "code": "AUT",
                "display": "author (originator)",
            }]},
            "who": {"display": "unauthenticated"},
            "requestor": true,
        }]),
    };
    let mut event = json!({
        "resourceType": "AuditEvent",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{
            "system": "http://hl7.org/fhir/restful-interaction",
            "code": interaction.code(),
        }],
        "action": interaction.action(),
        "recorded": format_instant(recorded)?,
        "outcome": outcome_code(notice.status),
        "outcomeDesc": format!("HTTP {} from the gateway: {}", notice.status, notice.reason),
        "agent": agents,
        "source": {
            "site": notice.care_system,
            "observer": {"display": "ShCR gateway"},
            "type": [{
                "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "3",
                "display": "Web Server",
            }],
        },
        "extension": [{
            "url": "https://shcr.dev/fhir/StructureDefinition/request-id",
            "valueString": notice.request_id,
        }],
    });
    if let Some(t) = notice
        .resource_type
        .as_deref()
        .and_then(|t| t.parse::<ResourceType>().ok())
    {
        event["entity"] = json!([{
            "type": {"system": "http://hl7.org/fhir/resource-types", "code": t.as_str()},
            "description": "resource type addressed",
        }]);
    }
    Resource::parse(event.to_string().as_bytes(), Some(ResourceType::AuditEvent))
        .map_err(|e| {
            tracing::error!(error = %e, "built a refusal AuditEvent the parser refuses");
        })
        .ok()
}

/// Middleware: gives the request an [`AuditSlot`] and records its AuditEvent.
pub(crate) async fn record(
    State(store): State<Arc<FhirStore>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(identity) = request.extensions().get::<Arc<Identity>>().cloned() else {
        // `metadata`: no identity, nothing about a patient.
        return next.run(request).await;
    };
    let slot = AuditSlot::default();
    let method = request.method().clone();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    let mut facts = slot.take();
    if facts.recorded {
        return response;
    }
    if facts.interaction.is_none() {
        facts.interaction = Some(AuditInteraction::from_method(&method));
    }
    if let Some(event) = audit_event(&identity, &facts, response.status().as_u16(), now_micros()) {
        store.audit_writer().enqueue(event).await;
    }
    response
}

/// The bounded background writer of audit events (see the module comment).
pub(crate) struct AuditWriter {
    tx: mpsc::Sender<Resource>,
    pending: Arc<AtomicU64>,
}

impl AuditWriter {
    /// Starts the writer task on the current Tokio runtime.
    pub fn spawn(db: Arc<TenantDatabase>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let pending = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_loop(db, rx, pending.clone()));
        Self { tx, pending }
    }

    /// Queues `event`, waiting for room when the queue is full.
    pub async fn enqueue(&self, event: Resource) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(event).await.is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            tracing::error!("audit writer stopped: an AuditEvent was not recorded");
        }
    }

    /// Waits until every queued event is committed (or `timeout` passes); returns how many
    /// are still pending.
    pub async fn flush(&self, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pending = self.pending.load(Ordering::SeqCst);
            if pending == 0 || tokio::time::Instant::now() >= deadline {
                return pending;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn write_loop(
    db: Arc<TenantDatabase>,
    mut rx: mpsc::Receiver<Resource>,
    pending: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut commit = Commit::new();
            let now = now_micros();
            let staged = batch.iter().try_for_each(|event: &Resource| {
                stage_new(&mut commit, event.clone(), now).map(|_| ())
            });
            let result = match staged {
                Ok(()) => db.commit(commit).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => break,
                Err(error) if db_closed(&db).await => {
                    tracing::error!(
                        lost = batch.len(),
                        %error,
                        "audit events could not be recorded: the database is closed"
                    );
                    break;
                }
                Err(error) => {
                    tracing::error!(
                        queued = batch.len(),
                        %error,
                        "recording audit events failed; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        pending.fetch_sub(batch.len() as u64, Ordering::SeqCst);
        batch.clear();
    }
}

async fn db_closed(db: &TenantDatabase) -> bool {
    matches!(
        db.health().await,
        crate::tenant::TenantHealth::Closed | crate::tenant::TenantHealth::Fenced
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use shcr_identity::Scopes;

    #[test]
    fn events_name_who_what_patient_outcome_and_break_glass() {
        let identity = Identity {
            issuer: "https://idp.example".to_string(),
            subject: "555021935107".to_string(),
            organisation: "A81001".to_string(),
            role: "R8000".to_string(),
            scopes: Scopes::parse("user/*.rs").unwrap(),
            patient: None,
            care_system: "north-east".to_string(),
            break_glass_reason: Some("unconscious in ED".to_string()),
            request_id: "req-9".to_string(),
            origin: None,
        };
        let mut facts = AuditFacts {
            interaction: Some(AuditInteraction::Read),
            resource: Some((ResourceType::Observation, ResourceId::parse("o1").unwrap())),
            ..AuditFacts::default()
        };
        facts.add_patients([ResourceId::parse("p1").unwrap()]);
        let event = audit_event(&identity, &facts, 200, 1_700_000_000_000_000).unwrap();
        let json = Value::Object(event.into_json());
        assert_eq!(json["subtype"][0]["code"], "read");
        assert_eq!(json["action"], "R");
        assert_eq!(json["outcome"], "0");
        assert_eq!(json["entity"][0]["what"]["reference"], "Patient/p1");
        assert_eq!(json["entity"][1]["what"]["reference"], "Observation/o1");
        assert_eq!(
            json["agent"][0]["who"]["identifier"]["value"],
            "555021935107"
        );
        assert_eq!(json["agent"][1]["who"]["identifier"]["value"], "A81001");
        assert_eq!(json["purposeOfEvent"][0]["coding"][0]["code"], "BTG");
        assert_eq!(json["purposeOfEvent"][0]["text"], "unconscious in ED");
        assert_eq!(outcome_code(404), "4");
        assert_eq!(outcome_code(503), "8");
    }
}
