//! `batch` and `transaction` Bundles POSTed to the base URL.
//!
//! Job: plan every entry (method, URL, resource, `ifNoneExist`, `ifMatch`), check it against
//! the identity's scopes and compartment exactly as the single interaction would be, and run
//! it: a `transaction` as one atomic commit, a `batch` entry by entry.
//!
//! Transactions (all-or-nothing):
//! - entries may POST (with `ifNoneExist`), PUT (with `ifMatch`) and DELETE; GET entries are
//!   refused (use a batch), as are two entries writing the same resource;
//! - conditional creates are resolved first, under the per-type conditional-create locks held
//!   until the commit: no match creates, one match makes the entry a no-op that refers to the
//!   existing resource, more than one fails the transaction (412);
//! - every create gets its server id before any resource is parsed, and every `reference`
//!   equal to an entry's `fullUrl` (`urn:uuid:…` or otherwise) anywhere in any resource is
//!   rewritten to `Type/id`; an unresolved `urn:uuid:` reference fails the transaction;
//! - all versions, index and compartment changes and the transaction's AuditEvent go into one
//!   engine commit ([`FhirStore::commit_transaction`]); any failure — a bad entry, a version
//!   conflict, a storage fault — stores nothing and answers with the failing entry's status
//!   and an `OperationOutcome` naming `Bundle.entry[i]`.
//!
//! Batches: each entry succeeds or fails on its own (its own commit), failures carrying their
//! `OperationOutcome` in `response.outcome`; GET entries (read and search) are supported.
//! One AuditEvent records the batch and what it touched.

use std::collections::{BTreeSet, HashMap, HashSet};

use axum::http::StatusCode;
use serde_json::{Map, Value, json};
use shcr_fhir::datetime::format_instant;
use shcr_fhir::outcome::ToOutcome;
use shcr_fhir::resource::{Resource, ResourceId, ResourceType};
use shcr_fhir::search::SearchQuery;
use shcr_identity::{Identity, Interaction};

use super::access::{Access, readable};
use super::audit::{AuditInteraction, AuditSlot};
use super::capability::client_writable;
use super::error::ApiError;
use super::fhir_store::{FhirStore, StoredVersion, TxWrite, WriteOutcome, new_id};

/// The most entries one Bundle may carry.
pub const MAX_ENTRIES: usize = 1000;

/// What one entry asks for.
enum Planned {
    Create {
        resource_type: ResourceType,
        resource: Value,
        if_none_exist: Option<SearchQuery>,
        full_url: Option<String>,
    },
    Update {
        resource_type: ResourceType,
        id: ResourceId,
        resource: Value,
        if_match: Option<u64>,
    },
    Delete {
        resource_type: ResourceType,
        id: ResourceId,
    },
    Read {
        resource_type: ResourceType,
        id: ResourceId,
    },
    Search {
        query: SearchQuery,
    },
}

fn invalid(message: &'static str) -> ApiError {
    ApiError::InvalidBundle(message)
}

fn in_entry(index: usize) -> impl Fn(ApiError) -> ApiError {
    move |e| ApiError::Entry {
        index,
        source: Box::new(e),
    }
}

/// Processes a `batch` or `transaction` Bundle and returns the response Bundle.
pub(crate) async fn process(
    store: &FhirStore,
    identity: &Identity,
    audit: &AuditSlot,
    base: &str,
    body: &[u8],
    return_minimal: bool,
) -> Result<Value, ApiError> {
    // Entries are checked one by one (a batch entry's bad resource fails only that entry), so
    // the Bundle itself is only read as JSON here.
    let bundle: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(shcr_fhir::resource::ResourceError::NotAnObject.into()),
        Err(e) => {
            return Err(shcr_fhir::resource::ResourceError::NotJson {
                line: e.line(),
                column: e.column(),
            }
            .into());
        }
    };
    match bundle.get("resourceType").and_then(Value::as_str) {
        Some("Bundle") => {}
        _ => return Err(invalid("POST to the base URL takes a Bundle")),
    }
    let transaction = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => true,
        Some("batch") => false,
        _ => return Err(invalid("Bundle.type must be batch or transaction")),
    };
    audit.set(
        if transaction {
            AuditInteraction::Transaction
        } else {
            AuditInteraction::Batch
        },
        None,
        None,
    );
    let entries = match bundle.get("entry") {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries.clone(),
        Some(_) => return Err(invalid("Bundle.entry must be an array")),
    };
    if entries.len() > MAX_ENTRIES {
        return Err(invalid("a Bundle may carry at most 1000 entries"));
    }
    let access = Access::new(identity);
    if transaction {
        let planned = entries
            .iter()
            .enumerate()
            .map(|(i, e)| plan(e, base).map_err(in_entry(i)))
            .collect::<Result<Vec<_>, _>>()?;
        run_transaction(store, &access, audit, base, planned, return_minimal).await
    } else {
        let mut responses = Vec::with_capacity(entries.len());
        let mut touched = Vec::new();
        let mut returned = Vec::new();
        for entry in &entries {
            let result = match plan(entry, base) {
                Ok(planned) => run_batch_entry(store, &access, base, planned, return_minimal).await,
                Err(e) => Err(e),
            };
            responses.push(match result {
                Ok((response, target, versions)) => {
                    touched.extend(target);
                    returned.extend(versions);
                    response
                }
                Err(e) => error_entry(&e),
            });
        }
        audit.with(|f| {
            for (t, id) in &touched {
                if *t == ResourceType::Patient {
                    f.add_patients([id.clone()]);
                }
            }
            for stored in &returned {
                f.add_patients_of(stored);
            }
            f.others = touched;
        });
        Ok(json!({
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": responses,
        }))
    }
}

/// Reads one entry's request.
fn plan(entry: &Value, base: &str) -> Result<Planned, ApiError> {
    let request = entry
        .get("request")
        .and_then(Value::as_object)
        .ok_or(invalid("each entry needs a request with method and url"))?;
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .ok_or(invalid("entry.request.method is missing"))?;
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or(invalid("entry.request.url is missing"))?;
    let url = url
        .strip_prefix(base)
        .unwrap_or(url)
        .trim_start_matches('/');
    let (path, query) = url
        .split_once('?')
        .map_or((url, None), |(p, q)| (p, Some(q)));
    let mut segments = path.split('/');
    let resource_type: ResourceType = segments
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or(ApiError::UnknownResourceType)?;
    let id = segments
        .next()
        .map(|id| ResourceId::parse(id).map_err(|_| ApiError::InvalidId))
        .transpose()?;
    if segments.next().is_some() {
        return Err(invalid(
            "entry.request.url must be Type, Type/id or Type?query",
        ));
    }
    let resource = || {
        entry
            .get("resource")
            .cloned()
            .ok_or(invalid("POST and PUT entries need a resource"))
    };
    if matches!(method, "POST" | "PUT" | "DELETE") && !client_writable(resource_type) {
        return Err(ApiError::ReadOnlyType { resource_type });
    }
    match (method, id, query) {
        ("POST", None, None) => {
            let if_none_exist = request
                .get("ifNoneExist")
                .map(|v| {
                    let text = v.as_str().ok_or(ApiError::InvalidCondition)?;
                    let text = text.split_once('?').map_or(text, |(_, q)| q);
                    parse_query(resource_type, text, false)
                })
                .transpose()?;
            Ok(Planned::Create {
                resource_type,
                resource: resource()?,
                if_none_exist,
                full_url: entry
                    .get("fullUrl")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
        }
        ("PUT", Some(id), None) => {
            let if_match = match request.get("ifMatch") {
                None => None,
                Some(v) => Some(parse_etag(v.as_str().ok_or(ApiError::InvalidIfMatch)?)?),
            };
            Ok(Planned::Update {
                resource_type,
                id,
                resource: resource()?,
                if_match,
            })
        }
        ("DELETE", Some(id), None) => Ok(Planned::Delete { resource_type, id }),
        ("GET", Some(id), None) => Ok(Planned::Read { resource_type, id }),
        ("GET", None, query) => Ok(Planned::Search {
            query: parse_query(resource_type, query.unwrap_or_default(), false)?,
        }),
        ("POST" | "PUT" | "DELETE" | "GET", ..) => Err(invalid(
            "entry.request.url does not fit the method: POST Type, PUT Type/id, DELETE Type/id, GET Type/id or Type?query",
        )),
        _ => Err(invalid(
            "entry.request.method must be GET, POST, PUT or DELETE",
        )),
    }
}

fn parse_query(
    resource_type: ResourceType,
    query: &str,
    lenient: bool,
) -> Result<SearchQuery, ApiError> {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    Ok(SearchQuery::parse(
        resource_type,
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        lenient,
    )?)
}

/// The version an ETag names (`W/"3"` or `"3"`).
fn parse_etag(text: &str) -> Result<u64, ApiError> {
    let text = text.trim();
    text.strip_prefix("W/")
        .unwrap_or(text)
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
        .ok_or(ApiError::InvalidIfMatch)
}

/// Rewrites every `reference` in `value` that names a key of `ids`; refuses an unresolved
/// `urn:uuid:` reference.
fn resolve_references(value: &mut Value, ids: &HashMap<String, String>) -> Result<(), ApiError> {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get_mut("reference") {
                if let Some(resolved) = ids.get(reference.as_str()) {
                    *reference = resolved.clone();
                } else if reference.starts_with("urn:uuid:") {
                    return Err(invalid(
                        "a urn:uuid reference names no entry's fullUrl in this transaction",
                    ));
                }
            }
            for child in map.values_mut() {
                resolve_references(child, ids)?;
            }
        }
        Value::Array(items) => {
            for item in items {
                resolve_references(item, ids)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A conditional create's match is returned only to a caller who could read it.
async fn visible_match(
    store: &FhirStore,
    access: &Access<'_>,
    mut found: StoredVersion,
) -> Result<StoredVersion, ApiError> {
    let may_read = match access.read_confinement(found.resource_type) {
        Some(c) => readable(store, &c, found.resource_type, &found.id).await?,
        None => false,
    };
    if !may_read {
        found.body = None;
    }
    Ok(found)
}

/// What one transaction entry will do.
enum Step {
    Write(TxWrite),
    /// A conditional create that matched: refers to the existing resource.
    Existing(StoredVersion),
}

async fn run_transaction(
    store: &FhirStore,
    access: &Access<'_>,
    audit: &AuditSlot,
    base: &str,
    mut planned: Vec<Planned>,
    return_minimal: bool,
) -> Result<Value, ApiError> {
    // Scopes, confinement, GETs and duplicate targets, before anything is read: each entry is
    // authorised exactly as the same plain request would be.
    let mut targets = HashSet::new();
    let mut conditional_types = BTreeSet::new();
    let mut confinements = Vec::with_capacity(planned.len());
    for (index, p) in planned.iter_mut().enumerate() {
        let at = in_entry(index);
        match p {
            Planned::Create {
                resource_type,
                if_none_exist,
                ..
            } => {
                confinements.push(
                    access
                        .authorize(*resource_type, Interaction::Create)
                        .map_err(&at)?,
                );
                if let Some(condition) = if_none_exist {
                    access.authorize_search(condition).map_err(&at)?;
                    conditional_types.insert(*resource_type);
                }
            }
            Planned::Update {
                resource_type, id, ..
            } => {
                confinements.push(
                    access
                        .authorize(*resource_type, Interaction::Update)
                        .map_err(&at)?,
                );
                if !targets.insert((*resource_type, id.clone())) {
                    return Err(at(invalid("two entries write the same resource")));
                }
            }
            Planned::Delete { resource_type, id } => {
                confinements.push(
                    access
                        .authorize(*resource_type, Interaction::Delete)
                        .map_err(&at)?,
                );
                if !targets.insert((*resource_type, id.clone())) {
                    return Err(at(invalid("two entries write the same resource")));
                }
            }
            Planned::Read { .. } | Planned::Search { .. } => {
                return Err(at(invalid(
                    "GET entries are not supported in a transaction: send reads in a batch",
                )));
            }
        }
    }
    store.check_ready().await?;
    let _type_guards = store.lock_types(&conditional_types).await?;

    // Conditional creates, then ids for every create, so references can be resolved.
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut existing: HashMap<usize, StoredVersion> = HashMap::new();
    let mut new_ids: HashMap<usize, ResourceId> = HashMap::new();
    for (index, p) in planned.iter().enumerate() {
        let Planned::Create {
            resource_type,
            if_none_exist,
            full_url,
            ..
        } = p
        else {
            continue;
        };
        let target = match if_none_exist {
            Some(condition) => {
                if condition.filters.is_empty() {
                    return Err(in_entry(index)(ApiError::InvalidCondition));
                }
                let mut probe = condition.clone();
                probe.count = 2;
                probe.cursor = None;
                let found = store.search(&probe).await.map_err(in_entry(index))?;
                match found.matches.as_slice() {
                    [] if found.total == 0 => None,
                    [one] if found.total == 1 => Some(one.clone()),
                    _ => {
                        return Err(in_entry(index)(ApiError::MultipleMatches {
                            resource_type: *resource_type,
                        }));
                    }
                }
            }
            None => None,
        };
        let id = match target {
            Some(found) => {
                let id = found.id.clone();
                existing.insert(index, visible_match(store, access, found).await?);
                id
            }
            None => {
                let id = new_id()?;
                new_ids.insert(index, id.clone());
                id
            }
        };
        if let Some(full_url) = full_url {
            ids.insert(full_url.clone(), format!("{resource_type}/{id}"));
        }
    }

    // Resolve references, parse and check every resource.
    let mut steps = Vec::with_capacity(planned.len());
    for (index, (p, confinement)) in planned.into_iter().zip(&confinements).enumerate() {
        let at = in_entry(index);
        let step = match p {
            Planned::Create {
                resource_type,
                mut resource,
                ..
            } => {
                if let Some(found) = existing.remove(&index) {
                    Step::Existing(found)
                } else {
                    resolve_references(&mut resource, &ids).map_err(&at)?;
                    let mut resource = Resource::from_value(resource, Some(resource_type))
                        .map_err(|e| at(e.into()))?;
                    let id = new_ids.remove(&index).ok_or(ApiError::Internal)?;
                    resource.set_id(id.clone());
                    confinement.require_writable(&resource, true).map_err(&at)?;
                    Step::Write(TxWrite::Create { id, resource })
                }
            }
            Planned::Update {
                resource_type,
                id,
                mut resource,
                if_match,
            } => {
                resolve_references(&mut resource, &ids).map_err(&at)?;
                let resource = Resource::from_value(resource, Some(resource_type))
                    .map_err(|e| at(e.into()))?;
                if resource.id() != Some(&id) {
                    return Err(at(ApiError::IdMismatch));
                }
                confinement
                    .require_writable(&resource, false)
                    .map_err(&at)?;
                confinement
                    .require_updatable(store, resource_type, &id)
                    .await
                    .map_err(&at)?;
                Step::Write(TxWrite::Update {
                    id,
                    resource,
                    if_match,
                })
            }
            Planned::Delete { resource_type, id } => {
                confinement
                    .require_existing(store, resource_type, &id)
                    .await
                    .map_err(&at)?;
                Step::Write(TxWrite::Delete { resource_type, id })
            }
            Planned::Read { .. } | Planned::Search { .. } => {
                return Err(at(ApiError::Internal));
            }
        };
        steps.push(step);
    }

    // One commit.
    let mut writes = Vec::new();
    let mut slots = Vec::with_capacity(steps.len());
    for step in steps {
        match step {
            Step::Write(w) => {
                slots.push(None);
                writes.push(w);
            }
            Step::Existing(found) => slots.push(Some(found)),
        }
    }
    let writer = super::fhir_store::WriteAudit {
        identity: access.identity,
        slot: audit,
    };
    let write_indexes: Vec<usize> = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| i)
        .collect();
    let mut outcomes = store
        .commit_transaction(writes, Some(writer))
        .await
        .map_err(|(index, e)| match index {
            Some(i) => in_entry(write_indexes.get(i).copied().unwrap_or(i))(e),
            None => e,
        })?
        .into_iter();
    let mut responses = Vec::with_capacity(slots.len());
    for slot in slots {
        let entry = match slot {
            Some(found) => write_entry(
                base,
                &WriteOutcome {
                    stored: found,
                    created: false,
                    changed: false,
                },
                return_minimal,
            ),
            None => {
                let outcome = outcomes.next().ok_or(ApiError::Internal)?;
                write_entry(base, &outcome, return_minimal)
            }
        };
        responses.push(entry);
    }
    Ok(json!({
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": responses,
    }))
}

/// Runs one batch entry, authorised exactly as the same plain request; returns its response
/// entry, the resource it touched, and the versions it returned or wrote (whose patients the
/// batch's AuditEvent names).
async fn run_batch_entry(
    store: &FhirStore,
    access: &Access<'_>,
    base: &str,
    planned: Planned,
    return_minimal: bool,
) -> Result<BatchResult, ApiError> {
    store.check_ready().await?;
    match planned {
        Planned::Create {
            resource_type,
            resource,
            if_none_exist,
            ..
        } => {
            let confinement = access.authorize(resource_type, Interaction::Create)?;
            let mut if_none_exist = if_none_exist;
            if let Some(condition) = &mut if_none_exist {
                access.authorize_search(condition)?;
            }
            let parsed = Resource::from_value(resource, Some(resource_type))?;
            confinement.require_writable(&parsed, true)?;
            let body = parsed.to_bytes();
            let mut outcome = match if_none_exist {
                Some(condition) => {
                    store
                        .create_if_none_exist(resource_type, &body, &condition)
                        .await?
                }
                None => store.create(resource_type, &body).await?,
            };
            if !outcome.changed {
                outcome.stored = visible_match(store, access, outcome.stored).await?;
            }
            let target = (resource_type, outcome.stored.id.clone());
            Ok((
                write_entry(base, &outcome, return_minimal),
                Some(target),
                vec![outcome.stored],
            ))
        }
        Planned::Update {
            resource_type,
            id,
            resource,
            if_match,
        } => {
            let confinement = access.authorize(resource_type, Interaction::Update)?;
            let parsed = Resource::from_value(resource, Some(resource_type))?;
            confinement.require_writable(&parsed, false)?;
            confinement
                .require_updatable(store, resource_type, &id)
                .await?;
            let outcome = store
                .update(resource_type, &id, &parsed.to_bytes(), if_match)
                .await?;
            Ok((
                write_entry(base, &outcome, return_minimal),
                Some((resource_type, id)),
                vec![outcome.stored],
            ))
        }
        Planned::Delete { resource_type, id } => {
            let confinement = access.authorize(resource_type, Interaction::Delete)?;
            confinement
                .require_existing(store, resource_type, &id)
                .await?;
            let outcome = store.delete(resource_type, &id).await?;
            Ok((
                json!({"response": {"status": status_line(StatusCode::NO_CONTENT)}}),
                outcome.changed.then_some((resource_type, id)),
                Vec::new(),
            ))
        }
        Planned::Read { resource_type, id } => {
            let confinement = access.authorize(resource_type, Interaction::Read)?;
            confinement
                .require_existing(store, resource_type, &id)
                .await?;
            let stored = store.read(resource_type, &id).await?;
            let mut entry = write_entry(
                base,
                &WriteOutcome {
                    stored: stored.clone(),
                    created: false,
                    changed: false,
                },
                false,
            );
            entry["response"]
                .as_object_mut()
                .map(|r| r.remove("location"));
            Ok((entry, Some((resource_type, id)), vec![stored]))
        }
        Planned::Search { mut query } => {
            access.authorize_search(&mut query)?;
            let page = store.search(&query).await?;
            let entries: Vec<Value> = page
                .matches
                .iter()
                .map(|m| super::http::match_entry(base, m))
                .collect::<Result<_, _>>()?;
            Ok((
                json!({
                    "resource": {
                        "resourceType": "Bundle",
                        "type": "searchset",
                        "total": page.total,
                        "entry": entries,
                    },
                    "response": {"status": status_line(StatusCode::OK)},
                }),
                None,
                page.matches,
            ))
        }
    }
}

/// A batch entry's response, the resource it touched, and the versions it returned or wrote.
type BatchResult = (
    Value,
    Option<(ResourceType, ResourceId)>,
    Vec<StoredVersion>,
);

fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    )
}

/// The response entry of a write (or of a conditional create that found its match).
fn write_entry(base: &str, outcome: &WriteOutcome, return_minimal: bool) -> Value {
    let stored = &outcome.stored;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    if stored.body.is_none() {
        return json!({"response": {"status": status_line(StatusCode::NO_CONTENT)}});
    }
    let mut response = Map::new();
    response.insert("status".into(), json!(status_line(status)));
    response.insert(
        "location".into(),
        json!(format!(
            "{}/{}/_history/{}",
            stored.resource_type, stored.id, stored.version
        )),
    );
    response.insert("etag".into(), json!(format!("W/\"{}\"", stored.version)));
    if let Some(instant) = format_instant(stored.last_updated) {
        response.insert("lastModified".into(), json!(instant));
    }
    let mut entry = json!({
        "fullUrl": format!("{base}/{}/{}", stored.resource_type, stored.id),
        "response": response,
    });
    if !return_minimal
        && let Some(body) = &stored.body
        && let Ok(resource) = serde_json::from_slice::<Value>(body)
    {
        entry["resource"] = resource;
    }
    entry
}

/// The response entry of a failed batch entry.
fn error_entry(error: &ApiError) -> Value {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json!({
        "response": {
            "status": status_line(status),
            "outcome": error.outcome().to_json(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_everywhere_and_unresolved_urns_fail() {
        let ids = HashMap::from([("urn:uuid:a".to_string(), "Patient/p1".to_string())]);
        let mut value = json!({
            "subject": {"reference": "urn:uuid:a"},
            "performer": [{"reference": "Practitioner/x"}],
            "nested": {"deeper": [{"reference": "urn:uuid:a"}]},
        });
        resolve_references(&mut value, &ids).unwrap();
        assert_eq!(value["subject"]["reference"], "Patient/p1");
        assert_eq!(value["nested"]["deeper"][0]["reference"], "Patient/p1");
        assert_eq!(value["performer"][0]["reference"], "Practitioner/x");
        let mut bad = json!({"subject": {"reference": "urn:uuid:zzz"}});
        assert!(resolve_references(&mut bad, &ids).is_err());
    }

    #[test]
    fn etags_parse() {
        assert_eq!(parse_etag("W/\"3\"").unwrap(), 3);
        assert_eq!(parse_etag("\"4\"").unwrap(), 4);
        assert!(parse_etag("3").is_err());
    }
}
