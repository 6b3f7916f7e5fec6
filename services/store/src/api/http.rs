//! The FHIR R4 REST surface of one care system over HTTP, at `/{care-system}/fhir`.
//!
//! Job: turn requests into [`FhirStore`] calls and results into FHIR responses — status,
//! `ETag`, `Last-Modified`, `Location`, `Prefer` handling, Bundles — and every failure into an
//! `OperationOutcome` with its status ([`ApiError`]).
//!
//! Invariants:
//! - a request naming another care system than the store's own gets 404 and touches nothing;
//! - bodies are read up to the configured limit and refused with 413 beyond it, before parsing;
//! - every response to an error is an `OperationOutcome`, including unknown URLs and methods;
//! - logs carry the status and the error's message, which never holds patient data (see
//!   [`ApiError`]); request bodies, URLs and query values are never logged.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Value, json};
use shcr_fhir::datetime::format_instant;
use shcr_fhir::datetime::{DateRange, Strictness};
use shcr_fhir::outcome::{IssueType, OperationOutcome, Severity, ToOutcome};
use shcr_fhir::resource::{ResourceId, ResourceType};
use shcr_fhir::search::{DEFAULT_COUNT, MAX_COUNT, SearchQuery};
use shcr_identity::{AssertionVerifier, Identity, Interaction};

use super::access::{Access, Confinement, WITHHELD, readable, withheld};
use super::audit::{AuditInteraction, AuditSlot};
use super::auth::{AuthState, authenticate};
use super::capability::{capability_statement, client_writable};
use super::error::ApiError;
use super::fhir_store::{FhirStore, StoredVersion, WriteAudit, WriteOutcome, now_micros};

const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// The FHIR API of `store`, to be served at the root (its routes start `/{care-system}/fhir`).
/// Every request but `metadata` must carry an identity assertion `verifier` accepts for this
/// store's care system (see [`super::auth`]).
pub fn router(store: Arc<FhirStore>, verifier: AssertionVerifier) -> Router {
    let auth = AuthState {
        store: store.clone(),
        verifier,
    };
    Router::new()
        .route("/{care_system}/fhir/metadata", get(metadata))
        .route(super::refusal::ROUTE, post(super::refusal::receive))
        .route("/{care_system}/fhir", post(bundle))
        .route(
            "/{care_system}/fhir/{resource_type}",
            get(search).post(create),
        )
        .route(
            "/{care_system}/fhir/{resource_type}/{id}",
            get(read).put(update).delete(delete),
        )
        .route(
            "/{care_system}/fhir/{resource_type}/{id}/{operation}",
            get(instance_operation),
        )
        .route(
            "/{care_system}/fhir/{resource_type}/{id}/_history/{version}",
            get(vread),
        )
        .fallback(no_such_interaction)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            store.clone(),
            super::audit::record,
        ))
        .layer(axum::middleware::from_fn_with_state(auth, authenticate))
        .with_state(store)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if self.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self, "FHIR request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "FHIR request refused");
        }
        let mut response = fhir_json(status, &self.outcome().to_json());
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("X-ShCR-Identity realm=\"shcr-store\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

type ApiResult = Result<Response, ApiError>;

async fn no_such_interaction() -> ApiError {
    ApiError::NoSuchInteraction
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Checks the care system in the URL and works out the base URL of this store's FHIR API.
fn base_url(
    store: &FhirStore,
    care_system: &str,
    headers: &HeaderMap,
    gateway_origin: Option<&str>,
) -> Result<String, ApiError> {
    if care_system != store.care_system().as_str() {
        return Err(ApiError::WrongCareSystem);
    }
    // The configured origin (the operator sets it), else the one the gateway vouches for in the
    // assertion; the client's `Host` only for an assertion naming none (an older gateway).
    let origin = match store.config().public_origin.as_deref().or(gateway_origin) {
        Some(origin) => origin.trim_end_matches('/').to_string(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| {
                    !h.is_empty()
                        && h.bytes().all(|b| {
                            b.is_ascii_alphanumeric()
                                || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                        })
                })
                .unwrap_or("localhost");
            format!("http://{host}")
        }
    };
    Ok(format!("{origin}/{care_system}/fhir"))
}

fn parse_type(resource_type: &str) -> Result<ResourceType, ApiError> {
    resource_type
        .parse()
        .map_err(|_| ApiError::UnknownResourceType)
}

fn parse_id(id: &str) -> Result<ResourceId, ApiError> {
    ResourceId::parse(id).map_err(|_| ApiError::InvalidId)
}

/// What the client asked for in `Prefer` headers.
#[derive(Debug, Default, Clone, Copy)]
struct Prefer {
    return_minimal: bool,
    return_outcome: bool,
    lenient: bool,
}

fn prefer(headers: &HeaderMap) -> Prefer {
    let mut prefer = Prefer::default();
    for value in headers.get_all("prefer") {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split([',', ';']) {
            let token: String = token.chars().filter(|c| !c.is_whitespace()).collect();
            match token.as_str() {
                "return=minimal" => prefer.return_minimal = true,
                "return=OperationOutcome" => prefer.return_outcome = true,
                "return=representation" => {
                    prefer.return_minimal = false;
                    prefer.return_outcome = false;
                }
                "handling=lenient" => prefer.lenient = true,
                "handling=strict" => prefer.lenient = false,
                _ => {}
            }
        }
    }
    prefer
}

/// The version an `If-Match` header names (`W/"3"` or `"3"`).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| ApiError::InvalidIfMatch)?.trim();
    let quoted = text.strip_prefix("W/").unwrap_or(text);
    let version = quoted
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .ok_or(ApiError::InvalidIfMatch)?;
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::InvalidIfMatch);
    }
    version
        .parse()
        .map(Some)
        .map_err(|_| ApiError::InvalidIfMatch)
}

/// Reads the body, refusing more than `limit` bytes with 413.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
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

fn fhir_json(status: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, FHIR_JSON)], body).into_response()
}

fn etag(version: u64) -> String {
    format!("W/\"{version}\"")
}

fn http_date(micros: i64) -> String {
    let since_epoch = Duration::from_micros(u64::try_from(micros).unwrap_or(0));
    httpdate::fmt_http_date(UNIX_EPOCH + since_epoch)
}

fn version_url(base: &str, stored: &StoredVersion) -> String {
    format!(
        "{base}/{}/{}/_history/{}",
        stored.resource_type, stored.id, stored.version
    )
}

/// A response carrying one version: status, `ETag`, `Last-Modified`, optionally `Location`,
/// and the body `Prefer: return=` asks for.
fn version_response(
    status: StatusCode,
    stored: &StoredVersion,
    base: &str,
    location: bool,
    prefer: Prefer,
) -> Response {
    let mut builder = Response::builder()
        .status(status)
        .header(header::ETAG, etag(stored.version))
        .header(header::LAST_MODIFIED, http_date(stored.last_updated));
    if location {
        builder = builder.header(header::LOCATION, version_url(base, stored));
    }
    let body = if prefer.return_minimal {
        None
    } else if prefer.return_outcome {
        let outcome = OperationOutcome::single(
            Severity::Information,
            IssueType::Informational,
            format!(
                "{} {} version {} stored",
                stored.resource_type, stored.id, stored.version
            ),
            None,
        );
        Some(Bytes::from(
            serde_json::to_vec(&outcome.to_json()).unwrap_or_default(),
        ))
    } else {
        stored.body.clone()
    };
    let result = match body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, FHIR_JSON)
            .body(Body::from(body)),
        None => builder.body(Body::empty()),
    };
    // Every header value above is ASCII built by this module, so building cannot fail.
    result.unwrap_or_else(|_| ApiError::Internal.into_response())
}

async fn metadata(
    State(store): State<Arc<FhirStore>>,
    Path(care_system): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base_url(&store, &care_system, &headers, None)?;
    let date = format_instant(now_micros()).ok_or(ApiError::Internal)?;
    Ok(fhir_json(
        StatusCode::OK,
        &capability_statement(&base, &date),
    ))
}

/// `batch` and `transaction` Bundles (see [`super::bundle`]).
async fn bundle(
    State(store): State<Arc<FhirStore>>,
    Path(care_system): Path<String>,
    Extension(identity): Extension<Arc<Identity>>,
    Extension(audit): Extension<AuditSlot>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let base = base_url(&store, &care_system, &headers, identity.origin.as_deref())?;
    let body = read_body(body, &headers, store.config().max_body_bytes).await?;
    let prefer = prefer(&headers);
    let response = super::bundle::process(
        &store,
        &identity,
        &audit,
        &base,
        &body,
        prefer.return_minimal,
    )
    .await?;
    Ok(fhir_json(StatusCode::OK, &response))
}

/// `$export` kick-off (system level, or `Patient/$export`).
async fn export_kickoff(
    store: &Arc<FhirStore>,
    identity: &Identity,
    audit: &AuditSlot,
    base: &str,
    raw: Option<&str>,
    headers: &HeaderMap,
    patient_level: bool,
) -> ApiResult {
    audit.set(AuditInteraction::Operation, None, None);
    audit.with(|f| f.operation = Some("$export"));
    Access::new(identity).authorize_all_patients(None, Interaction::Read, "bulk export")?;
    let respond_async = headers.get_all("prefer").iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split([',', ';']).any(|t| t.trim() == "respond-async"))
    });
    if !respond_async {
        return Err(ApiError::RespondAsyncRequired);
    }
    let pairs = query_pairs(raw);
    let path = if patient_level {
        "Patient/$export"
    } else {
        "$export"
    };
    let request_url = match raw {
        Some(q) if !q.is_empty() => format!("{base}/{path}?{q}"),
        _ => format!("{base}/{path}"),
    };
    let request = super::export::parse_request(&pairs, patient_level, request_url)?;
    store.check_ready().await?;
    let job = store
        .exports()
        .start(store.clone(), identity, request, base.to_string())
        .await?;
    let location = format!("{base}/$export-status/{job}");
    Response::builder()
        .status(StatusCode::ACCEPTED)
        .header(header::CONTENT_LOCATION, location)
        .body(Body::empty())
        .map_err(|_| ApiError::Internal)
}

/// `$export` status polling: 202 with `X-Progress` while running, 200 with the manifest.
async fn export_status(store: &FhirStore, identity: &Identity, job: &str) -> ApiResult {
    match store.exports().status(job, identity).await? {
        Err(progress) => Response::builder()
            .status(StatusCode::ACCEPTED)
            .header("x-progress", progress)
            .header(header::RETRY_AFTER, "1")
            .body(Body::empty())
            .map_err(|_| ApiError::Internal),
        Ok(manifest) => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&manifest).unwrap_or_default(),
        )
            .into_response()),
    }
}

async fn create(
    State(store): State<Arc<FhirStore>>,
    Extension(identity): Extension<Arc<Identity>>,
    Extension(audit): Extension<AuditSlot>,
    Path((care_system, resource_type)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let base = base_url(&store, &care_system, &headers, identity.origin.as_deref())?;
    let resource_type = parse_type(&resource_type)?;
    if !client_writable(resource_type) {
        return Err(ApiError::ReadOnlyType { resource_type });
    }
    audit.set(AuditInteraction::Create, Some(resource_type), None);
    let access = Access::new(&identity);
    let confinement = access.authorize(resource_type, Interaction::Create)?;
    let prefer = prefer(&headers);
    let condition = match headers.get("if-none-exist") {
        Some(value) => {
            let text = value.to_str().map_err(|_| ApiError::InvalidCondition)?;
            let text = text.split_once('?').map_or(text, |(_, query)| query);
            let pairs = query_pairs(Some(text));
            let mut condition = SearchQuery::parse(
                resource_type,
                pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                false,
            )?;
            // The condition is a search: it needs search scope and stays in the compartment.
            access.authorize_search(&mut condition)?;
            Some(condition)
        }
        None => None,
    };
    let body = read_body(body, &headers, store.config().max_body_bytes).await?;
    check_body(&confinement, resource_type, &body, true)?;
    store.check_ready().await?;
    let writer = Some(WriteAudit {
        identity: &identity,
        slot: &audit,
    });
    let outcome = match &condition {
        Some(condition) => {
            store
                .create_if_none_exist_audited(resource_type, &body, condition, writer)
                .await?
        }
        None => store.create_audited(resource_type, &body, writer).await?,
    };
    if !outcome.changed {
        audit.with(|f| {
            f.resource = Some((resource_type, outcome.stored.id.clone()));
            f.add_patients_of(&outcome.stored);
        });
        // The match is returned only to a caller who could read it.
        let may_read = match access.read_confinement(resource_type) {
            Some(c) => readable(&store, &c, resource_type, &outcome.stored.id).await?,
            None => false,
        };
        if !may_read {
            return Ok(StatusCode::OK.into_response());
        }
    }
    Ok(write_response(&outcome, &base, prefer))
}

async fn read(
    State(store): State<Arc<FhirStore>>,
    Extension(identity): Extension<Arc<Identity>>,
    Extension(audit): Extension<AuditSlot>,
    Path((care_system, resource_type, id)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let base = base_url(&store, &care_system, &headers, identity.origin.as_deref())?;
    if resource_type == "$export-status" {
        audit.set(AuditInteraction::Operation, None, None);
        audit.with(|f| f.operation = Some("$export-status"));
        return export_status(&store, &identity, &id).await;
    }
    if resource_type == "Patient" && id == "$export" {
        return export_kickoff(
            &store,
            &identity,
            &audit,
            &base,
            raw.as_deref(),
            &headers,
            true,
        )
        .await;
    }
    let resource_type = parse_type(&resource_type)?;
    let access = Access::new(&identity);
    if id == "_history" {
        audit.set(AuditInteraction::HistoryType, Some(resource_type), None);
        access.authorize_all_patients(
            Some(resource_type),
            Interaction::Read,
            "history across patients",
        )?;
        return changes(&store, &base, Some(resource_type), raw.as_deref()).await;
    }
    let id = parse_id(&id)?;
    audit.set(AuditInteraction::Read, Some(resource_type), Some(&id));
    let confinement = access.authorize(resource_type, Interaction::Read)?;
    store.check_ready().await?;
    confinement
        .require_existing(&store, resource_type, &id)
        .await?;
    let stored = store.read(resource_type, &id).await?;
    audit.with(|f| f.add_patients_of(&stored));
    if withheld(&identity, &stored) {
        return Err(ApiError::Forbidden(WITHHELD));
    }
    Ok(version_response(
        StatusCode::OK,
        &stored,
        &base,
        false,
        Prefer::default(),
    ))
}

async fn vread(
    State(store): State<Arc<FhirStore>>,
    Extension(identity): Extension<Arc<Identity>>,
    Extension(audit): Extension<AuditSlot>,
    Path((care_system, resource_type, id, version)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base_url(&store, &care_system, &headers, identity.origin.as_deref())?;
    let resource_type = parse_type(&resource_type)?;
    let id = parse_id(&id)?;
    let version: u64 = version
        .parse()
        .ok()
        .filter(|_| version.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(ApiError::InvalidVersionId)?;
    audit.set(AuditInteraction::Vread, Some(resource_type), Some(&id));
    let confinement = Access::new(&identity).authorize(resource_type, Interaction::Read)?;
    store.check_ready().await?;
    confinement
        .require_existing(&store, resource_type, &id)
        .await?;
    let stored = store.vread(resource_type, &id, version).await?;
    // Each version's own content decides its compartment.
    if !confinement.permits_version(resource_type, &id, stored.body.as_deref()) {
        return Err(ApiError::OutsideCompartment);
    }
    audit.with(|f| f.add_patients_of(&stored));
    if withheld(&identity, &stored) {
        return Err(ApiError::Forbidden(WITHHELD));
    }
    Ok(version_response(
        StatusCode::OK,
        &stored,
        &base,
        false,
        Prefer::default(),
    ))
}

async fn update(
    State(store): State<Arc<FhirStore>>,
    Extension(identity): Extension<Arc<Identity>>,
    Extension(audit): Extension<AuditSlot>,
    Path((care_system, resource_type, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let base = base_url(&store, &care_system, &headers, identity.origin.as_deref())?;
    let resource_type = parse_type(&resource_type)?;
    if !client_writable(resource_type) {
        return Err(ApiError::ReadOnlyType { resource_type });
    }
    let id = parse_id(&id)?;
    audit.set(AuditInteraction::Update, Some(resource_type), Some(&id));
    let confinement = Access::new(&identity).authorize(resource_type, Interaction::Update)?;
    let expected = if_match(&headers)?;
    let body = read_body(body, &headers, store.config().max_body_bytes).await?;
    check_body(&confinement, resource_type, &body, false)?;
    store.check_ready().await?;
    confinement
        .require_updatable(&store, resource_type, &id)
        .await?;
    let writer = Some(WriteAudit {
        identity: &identity,
        slot: &audit,
    });
    let outcome = store
        .update_audited(resource_type, &id, &body, expected, writer)
        .await?;
    Ok(write_response(&outcome, &base, prefer(&headers)))
}

async fn delete(
    State(store): State<Arc<FhirStore>>,
    Extension(identity): Extension<Arc<Identity>>,
    Extension(audit): Extension<AuditSlot>,
    Path((care_system, resource_type, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    base_url(&store, &care_system, &headers, identity.origin.as_deref())?;
    if resource_type == "$export-status" {
        audit.set(AuditInteraction::Operation, None, None);
        audit.with(|f| f.operation = Some("$export-cancel"));
        store.exports().cancel(&store, &id, &identity).await?;
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let resource_type = parse_type(&resource_type)?;
    if !client_writable(resource_type) {
        return Err(ApiError::ReadOnlyType { resource_type });
    }
    let id = parse_id(&id)?;
    audit.set(AuditInteraction::Delete, Some(resource_type), Some(&id));
    let confinement = Access::new(&identity).authorize(resource_type, Interaction::Delete)?;
    store.check_ready().await?;
    confinement
        .require_existing(&store, resource_type, &id)
        .await?;
    let writer = Some(WriteAudit {
        identity: &identity,
        slot: &audit,
    });
    let outcome = store.delete_audited(resource_type, &id, writer).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    if outcome.changed
        && let Ok(value) = HeaderValue::from_str(&etag(outcome.stored.version))
    {
        response.headers_mut().insert(header::ETAG, value);
    }
    Ok(response)
}

async fn instance_operation(
    State(store): State<Arc<FhirStore>>,
    Extension(identity): Extension<Arc<Identity>>,
    Extension(audit): Extension<AuditSlot>,
    Path((care_system, resource_type, id, operation)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let base = base_url(&store, &care_system, &headers, identity.origin.as_deref())?;
    if resource_type == "$export-output" {
        audit.set(AuditInteraction::Operation, None, None);
        audit.with(|f| f.operation = Some("$export-output"));
        Access::new(&identity).authorize_all_patients(None, Interaction::Read, "bulk export")?;
        let ndjson = store
            .exports()
            .download(&store, &id, &identity, &operation)
            .await?;
        return Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/fhir+ndjson")],
            ndjson,
        )
            .into_response());
    }
    let resource_type = parse_type(&resource_type)?;
    let id = parse_id(&id)?;
    let access = Access::new(&identity);
    audit.set(
        if operation == "_history" {
            AuditInteraction::HistoryInstance
        } else {
            AuditInteraction::Operation
        },
        Some(resource_type),
        Some(&id),
    );
    let confinement = access.authorize(resource_type, Interaction::Read)?;
    match operation.as_str() {
        "_history" => {
            store.check_ready().await?;
            confinement
                .require_existing(&store, resource_type, &id)
                .await?;
            // Each version's own content decides its compartment.
            let versions: Vec<StoredVersion> = store
                .history(resource_type, &id)
                .await?
                .into_iter()
                .filter(|v| {
                    v.body.is_none()
                        || confinement.permits_version(resource_type, &id, v.body.as_deref())
                })
                .filter(|v| !withheld(&identity, v))
                .collect();
            audit.with(|f| versions.iter().for_each(|v| f.add_patients_of(v)));
            let self_link = format!("{base}/{resource_type}/{id}/_history");
            Ok(fhir_json(
                StatusCode::OK,
                &history_bundle(&base, &versions, versions.len(), &self_link, None),
            ))
        }
        "$everything" if resource_type == ResourceType::Patient => {
            audit.with(|f| {
                f.operation = Some("$everything");
                f.add_patients([id.clone()]);
            });
            store.check_ready().await?;
            confinement
                .require_existing(&store, resource_type, &id)
                .await?;
            let members = store.everything(&id).await?;
            // Every member is in this patient's compartment; a type whose read is confined to
            // another patient is left out.
            let entries: Vec<Value> = members
                .iter()
                .filter(|m| {
                    access
                        .read_confinement(m.resource_type)
                        .is_some_and(|c| c.patient().is_none_or(|p| *p == id))
                })
                .filter(|m| !withheld(&identity, m))
                .map(|m| match_entry(&base, m))
                .collect::<Result<_, _>>()?;
            Ok(fhir_json(
                StatusCode::OK,
                &json!({
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": entries.len(),
                    "link": [{
                        "relation": "self",
                        "url": format!("{base}/Patient/{id}/$everything"),
                    }],
                    "entry": entries,
                }),
            ))
        }
        _ => Err(ApiError::NoSuchInteraction),
    }
}

fn resource_json(stored: &StoredVersion) -> Result<Option<Value>, ApiError> {
    stored
        .body
        .as_ref()
        .map(|b| serde_json::from_slice(b))
        .transpose()
        .map_err(|_| ApiError::Internal)
}

pub(super) fn match_entry(base: &str, stored: &StoredVersion) -> Result<Value, ApiError> {
    Ok(json!({
        "fullUrl": format!("{base}/{}/{}", stored.resource_type, stored.id),
        "resource": resource_json(stored)?,
        "search": {"mode": "match"},
    }))
}

fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// Type (`resource_type` given) or system `_history`.
async fn changes(
    store: &FhirStore,
    base: &str,
    resource_type: Option<ResourceType>,
    raw: Option<&str>,
) -> ApiResult {
    let pairs = query_pairs(raw);
    let (mut since, mut count, mut cursor) = (None, None, None);
    for (name, value) in &pairs {
        let slot_taken = match name.as_str() {
            "_since" => since
                .replace(
                    DateRange::parse(value, Strictness::Search)
                        .map_err(|_| ApiError::InvalidHistoryParameter)?
                        .start(),
                )
                .is_some(),
            "_count" => {
                let n: u32 = value
                    .parse()
                    .ok()
                    .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or(ApiError::InvalidHistoryParameter)?;
                count.replace(n.min(MAX_COUNT)).is_some()
            }
            "_cursor" => cursor.replace(value.as_str()).is_some(),
            _ => return Err(ApiError::InvalidHistoryParameter),
        };
        if slot_taken {
            return Err(ApiError::InvalidHistoryParameter);
        }
    }
    let count = count.unwrap_or(DEFAULT_COUNT);
    store.check_ready().await?;
    let page = store
        .changes(
            resource_type,
            since,
            usize::try_from(count).unwrap_or(usize::MAX),
            cursor,
        )
        .await?;
    let path = match resource_type {
        Some(t) => format!("{base}/{t}/_history"),
        None => format!("{base}/_history"),
    };
    let link = |cursor: Option<&str>| {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in &pairs {
            if name != "_cursor" || cursor.is_none() {
                query.append_pair(name, value);
            }
        }
        if let Some(cursor) = cursor {
            query.append_pair("_cursor", cursor);
        }
        let query = query.finish();
        if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        }
    };
    let next = page.next_cursor.as_deref().map(|c| link(Some(c)));
    Ok(fhir_json(
        StatusCode::OK,
        &history_bundle(base, &page.versions, page.total, &link(None), next),
    ))
}

fn history_bundle(
    base: &str,
    versions: &[StoredVersion],
    total: usize,
    self_link: &str,
    next_link: Option<String>,
) -> Value {
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| {
            let url = format!("{}/{}", v.resource_type, v.id);
            let (method, status) = match (&v.body, v.version) {
                (None, _) => ("DELETE", "204 No Content"),
                (Some(_), 1) => ("POST", "201 Created"),
                (Some(_), _) => ("PUT", "200 OK"),
            };
            let mut entry = json!({
                "fullUrl": format!("{base}/{url}"),
                "request": {"method": method, "url": url},
                "response": {
                    "status": status,
                    "etag": etag(v.version),
                    "lastModified": format_instant(v.last_updated),
                },
            });
            if let Ok(Some(resource)) = resource_json(v) {
                entry["resource"] = resource;
            }
            entry
        })
        .collect();
    let mut links = vec![json!({"relation": "self", "url": self_link})];
    if let Some(next) = next_link {
        links.push(json!({"relation": "next", "url": next}));
    }
    json!({
        "resourceType": "Bundle",
        "type": "history",
        "total": total,
        "link": links,
        "entry": entries,
    })
}

async fn search(
    State(store): State<Arc<FhirStore>>,
    Extension(identity): Extension<Arc<Identity>>,
    Extension(audit): Extension<AuditSlot>,
    Path((care_system, resource_type)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    let base = base_url(&store, &care_system, &headers, identity.origin.as_deref())?;
    if resource_type == "$export" {
        return export_kickoff(
            &store,
            &identity,
            &audit,
            &base,
            raw.as_deref(),
            &headers,
            false,
        )
        .await;
    }
    let access = Access::new(&identity);
    if resource_type == "_history" {
        audit.set(AuditInteraction::HistorySystem, None, None);
        access.authorize_all_patients(None, Interaction::Read, "history across patients")?;
        return changes(&store, &base, None, raw.as_deref()).await;
    }
    let resource_type = parse_type(&resource_type)?;
    audit.set(AuditInteraction::SearchType, Some(resource_type), None);
    let pairs = query_pairs(raw.as_deref());
    let prefer = prefer(&headers);
    let mut query = SearchQuery::parse(
        resource_type,
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        prefer.lenient,
    )?;
    let warnings = OperationOutcome::ignored_parameters(&query.ignored);
    let confinement = access.authorize_search(&mut query)?;
    store.check_ready().await?;
    let page = store.search(&query).await?;

    // Included resources obey the same scopes and compartment as a read of them would.
    let mut included = Vec::new();
    for stored in &page.included {
        let Some(read) = access.read_confinement(stored.resource_type) else {
            continue;
        };
        if readable(&store, &read, stored.resource_type, &stored.id).await? {
            included.push(stored);
        }
    }
    let before = page.matches.len() + included.len();
    let matches: Vec<&StoredVersion> = page
        .matches
        .iter()
        .filter(|m| !withheld(&identity, m))
        .collect();
    included.retain(|m| !withheld(&identity, m));
    let withheld_count = before - matches.len() - included.len();
    // Every returned resource names its patients in the audit trail.
    audit.with(|f| {
        f.add_patients(searched_patients(&query));
        for stored in matches.iter().chain(included.iter()).copied() {
            f.add_patients_of(stored);
        }
    });
    let mut included_entries = Vec::new();
    for stored in included {
        let mut entry = redacted_entry(&base, stored, &confinement)?;
        entry["search"]["mode"] = json!("include");
        included_entries.push(entry);
    }
    let link = |extra: Option<(&str, &str)>| {
        let mut serializer = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in &pairs {
            if name != "_cursor" {
                serializer.append_pair(name, value);
            }
        }
        if let Some((name, value)) = extra {
            serializer.append_pair(name, value);
        }
        let query = serializer.finish();
        if query.is_empty() {
            format!("{base}/{resource_type}")
        } else {
            format!("{base}/{resource_type}?{query}")
        }
    };
    let mut self_query = url::form_urlencoded::Serializer::new(String::new());
    self_query.extend_pairs(&pairs);
    let self_query = self_query.finish();
    let self_url = if self_query.is_empty() {
        format!("{base}/{resource_type}")
    } else {
        format!("{base}/{resource_type}?{self_query}")
    };
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(cursor) = &page.next_cursor {
        links.push(json!({"relation": "next", "url": link(Some(("_cursor", cursor)))}));
    }
    let mut entries: Vec<Value> = matches
        .iter()
        .map(|m| redacted_entry(&base, m, &confinement))
        .collect::<Result<_, _>>()?;
    entries.extend(included_entries);
    let mut warnings = warnings;
    if withheld_count > 0 {
        warnings.issues.extend(
            OperationOutcome::single(
                Severity::Information,
                IssueType::Suppressed,
                format!("{withheld_count} resource(s) withheld: {WITHHELD}"),
                None,
            )
            .issues,
        );
    }
    if !warnings.issues.is_empty() {
        entries.push(json!({
            "resource": warnings.to_json(),
            "search": {"mode": "outcome"},
        }));
    }
    Ok(fhir_json(
        StatusCode::OK,
        &json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": page.total,
            "link": links,
            "entry": entries,
        }),
    ))
}

/// The patients a search is about: the `Patient` targets of its `patient`/`subject` criteria.
fn searched_patients(query: &SearchQuery) -> Vec<ResourceId> {
    query
        .filters
        .iter()
        .filter(|f| f.chain.is_none() && matches!(f.param.name, "patient" | "subject"))
        .flat_map(|f| match &f.criterion {
            shcr_fhir::search::Criterion::References(refs) => refs
                .iter()
                .filter(|r| r.resource_type == ResourceType::Patient)
                .map(|r| r.id.clone())
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// The resource in `body` must be writable under `confinement`. Bodies that do not parse are
/// left for the store to refuse with the precise error.
fn check_body(
    confinement: &Confinement,
    resource_type: ResourceType,
    body: &[u8],
    create: bool,
) -> Result<(), ApiError> {
    if confinement.patient().is_none() {
        return Ok(());
    }
    match shcr_fhir::resource::Resource::parse(body, Some(resource_type)) {
        Ok(resource) => confinement.require_writable(&resource, create),
        Err(_) => Ok(()),
    }
}

/// A search match entry; an AuditEvent shown to a patient-confined reader names no other
/// patient (an access to several records is logged once, naming each).
fn redacted_entry(
    base: &str,
    stored: &StoredVersion,
    confinement: &Confinement,
) -> Result<Value, ApiError> {
    let mut entry = match_entry(base, stored)?;
    if let (ResourceType::AuditEvent, Some(patient)) = (stored.resource_type, confinement.patient())
    {
        redact_audit_event(&mut entry["resource"], patient);
    }
    Ok(entry)
}

/// Keeps, of an AuditEvent's `entity` entries, those that reference nothing or `patient`
/// itself: the other records an access touched may be other patients'.
pub(super) fn redact_audit_event(event: &mut Value, patient: &ResourceId) {
    let own = format!("Patient/{patient}");
    if let Some(entities) = event.get_mut("entity").and_then(Value::as_array_mut) {
        entities.retain(|e| e["what"]["reference"].as_str().is_none_or(|r| r == own));
    }
}

/// The response to a create or update: 201 when the write created the resource, else 200.
fn write_response(outcome: &WriteOutcome, base: &str, prefer: Prefer) -> Response {
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    version_response(status, &outcome.stored, base, true, prefer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn if_match_accepts_weak_and_strong_etags_only() {
        assert_eq!(
            if_match(&headers(&[("if-match", "W/\"3\"")])).unwrap(),
            Some(3)
        );
        assert_eq!(
            if_match(&headers(&[("if-match", "\"12\"")])).unwrap(),
            Some(12)
        );
        assert_eq!(if_match(&headers(&[])).unwrap(), None);
        for bad in ["3", "W/\"\"", "W/\"x\"", "*"] {
            let h = headers(&[("if-match", bad)]);
            assert!(
                matches!(if_match(&h), Err(ApiError::InvalidIfMatch)),
                "{bad}"
            );
        }
    }

    #[test]
    fn prefer_reads_return_and_handling() {
        let p = prefer(&headers(&[("prefer", "return=minimal, handling=lenient")]));
        assert!(p.return_minimal && p.lenient && !p.return_outcome);
        let p = prefer(&headers(&[("prefer", "return=OperationOutcome")]));
        assert!(p.return_outcome && !p.return_minimal);
        let p = prefer(&headers(&[]));
        assert!(!p.return_minimal && !p.lenient);
    }

    #[test]
    fn http_dates_are_imf_fixdate() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    }
}
