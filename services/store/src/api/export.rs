//! Bulk Data `$export` (FHIR Bulk Data Access, async pattern): system-level `/$export` and
//! `Patient/$export`.
//!
//! Job: kick-off (`Prefer: respond-async` required; `_type`, `_since`, `_outputFormat`) answers
//! 202 with `Content-Location` naming a status URL; a background task writes one NDJSON file per
//! resource type; polling the status URL answers 202 with `X-Progress` while running and 200 with
//! the manifest when done; each output is downloaded through the API; `DELETE` on the status URL
//! cancels the job and deletes its files.
//!
//! Invariants:
//! - output files are written through the tenant's encrypting object store (under `exports/`),
//!   so they are encrypted at rest like the database, and decrypted only when downloaded through
//!   the API by the identity that started the job — the same identity provider, subject and
//!   organisation ([`JobOwner`]); anyone else, including the same subject of another issuer or
//!   acting for another organisation, gets 404 for its status, files and cancellation;
//! - a system export leaves out AuditEvents unless `_type` names them; a `Patient/$export`
//!   exports the patient-compartment types (Patient and the types with a `patient` link);
//! - jobs live in this process: after a restart their status URLs answer 404 and their files
//!   (still encrypted) stay in the bucket until deleted; a client starts the export again.
//! - only identities whose scopes read every type may export; patient-confined ones may not.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::{Value, json};
use shcr_fhir::datetime::{DateRange, Strictness, format_instant};
use shcr_fhir::resource::ResourceType;
use shcr_fhir::search::{MAX_COUNT, SearchQuery, find_param};
use shcr_identity::Identity;
use tokio::sync::Mutex;

use super::error::ApiError;
use super::fhir_store::{FhirStore, now_micros};

/// The state of one export job.
enum JobState {
    Running,
    Done { manifest: Value },
    Failed,
}

/// Who a job belongs to: subjects are unique only within their identity provider, and a person
/// acting for another organisation must not see what they exported for this one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JobOwner {
    issuer: String,
    subject: String,
    organisation: String,
}

impl JobOwner {
    fn of(identity: &Identity) -> Self {
        Self {
            issuer: identity.issuer.clone(),
            subject: identity.subject.clone(),
            organisation: identity.organisation.clone(),
        }
    }
}

struct Job {
    owner: JobOwner,
    state: Mutex<JobState>,
    /// Types finished, for `X-Progress`.
    done_types: AtomicUsize,
    total_types: usize,
    cancelled: AtomicBool,
    files: Mutex<Vec<ObjectPath>>,
}

/// The export jobs of one store (in process memory).
#[derive(Default)]
pub(crate) struct ExportJobs {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

/// What a kick-off asked for.
pub(crate) struct ExportRequest {
    pub types: Vec<ResourceType>,
    pub since: Option<i64>,
    /// The request URL, echoed in the manifest.
    pub request_url: String,
}

/// Parses the kick-off parameters; `patient_level` restricts the default types to the patient
/// compartment.
pub(crate) fn parse_request(
    pairs: &[(String, String)],
    patient_level: bool,
    request_url: String,
) -> Result<ExportRequest, ApiError> {
    let mut types: Option<Vec<ResourceType>> = None;
    let mut since = None;
    for (name, value) in pairs {
        match name.as_str() {
            "_type" => {
                let mut list = Vec::new();
                for t in value.split(',').filter(|t| !t.is_empty()) {
                    let t: ResourceType = t.parse().map_err(|_| {
                        ApiError::InvalidExport("_type names a type this server does not hold")
                    })?;
                    if patient_level && !in_patient_compartment(t) {
                        return Err(ApiError::InvalidExport(
                            "_type names a type outside the patient compartment",
                        ));
                    }
                    list.push(t);
                }
                types.get_or_insert_with(Vec::new).extend(list);
            }
            "_since" => {
                since = Some(
                    DateRange::parse(value, Strictness::Search)
                        .map_err(|_| ApiError::InvalidExport("_since must be a FHIR instant"))?
                        .start(),
                );
            }
            "_outputFormat" => {
                if !matches!(
                    value.as_str(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ) {
                    return Err(ApiError::InvalidExport(
                        "_outputFormat must be application/fhir+ndjson",
                    ));
                }
            }
            _ => {
                return Err(ApiError::InvalidExport(
                    "$export takes _type, _since and _outputFormat only",
                ));
            }
        }
    }
    let types = match types {
        Some(mut t) => {
            t.sort_by_key(|t| t.as_str());
            t.dedup();
            t
        }
        None => ResourceType::ALL
            .iter()
            .copied()
            .filter(|t| *t != ResourceType::AuditEvent && *t != ResourceType::Bundle)
            .filter(|t| !patient_level || in_patient_compartment(*t))
            .collect(),
    };
    Ok(ExportRequest {
        types,
        since,
        request_url,
    })
}

fn in_patient_compartment(t: ResourceType) -> bool {
    t == ResourceType::Patient
        || (t != ResourceType::AuditEvent && find_param(t, "patient").is_some())
}

fn output_path(job: &str, t: ResourceType) -> ObjectPath {
    ObjectPath::from(format!("exports/{job}/{t}.ndjson"))
}

impl ExportJobs {
    /// Starts a job for `owner`; returns its id.
    pub async fn start(
        &self,
        store: Arc<FhirStore>,
        owner: &Identity,
        request: ExportRequest,
        base: String,
    ) -> Result<String, ApiError> {
        let id = uuid::Uuid::new_v4().to_string();
        let job = Arc::new(Job {
            owner: JobOwner::of(owner),
            state: Mutex::new(JobState::Running),
            done_types: AtomicUsize::new(0),
            total_types: request.types.len(),
            cancelled: AtomicBool::new(false),
            files: Mutex::new(Vec::new()),
        });
        self.jobs.lock().await.insert(id.clone(), job.clone());
        let job_id = id.clone();
        tokio::spawn(async move {
            let result = run(&store, &job_id, &job, &request, &base).await;
            let mut state = job.state.lock().await;
            *state = match result {
                Ok(manifest) => JobState::Done { manifest },
                Err(e) => {
                    tracing::error!(error = %e, "bulk export failed");
                    JobState::Failed
                }
            };
        });
        Ok(id)
    }

    async fn job(&self, id: &str, owner: &Identity) -> Result<Arc<Job>, ApiError> {
        let owner = JobOwner::of(owner);
        match self.jobs.lock().await.get(id) {
            Some(job) if job.owner == owner => Ok(job.clone()),
            _ => Err(ApiError::NoSuchExport),
        }
    }

    /// `Ok(None)` while running (with the progress text), `Ok(Some(manifest))` when done.
    pub async fn status(
        &self,
        id: &str,
        owner: &Identity,
    ) -> Result<Result<Value, String>, ApiError> {
        let job = self.job(id, owner).await?;
        let state = job.state.lock().await;
        match &*state {
            JobState::Running => Ok(Err(format!(
                "{} of {} types written",
                job.done_types.load(Ordering::SeqCst),
                job.total_types
            ))),
            JobState::Done { manifest } => Ok(Ok(manifest.clone())),
            JobState::Failed => Err(ApiError::ExportFailed),
        }
    }

    /// Cancels a job and deletes its files.
    pub async fn cancel(
        &self,
        store: &FhirStore,
        id: &str,
        owner: &Identity,
    ) -> Result<(), ApiError> {
        let job = self.job(id, owner).await?;
        job.cancelled.store(true, Ordering::SeqCst);
        self.jobs.lock().await.remove(id);
        let objects = store.database().encrypted_store();
        for path in job.files.lock().await.iter() {
            if let Err(e) = objects.delete(path).await {
                tracing::warn!(error = %e, "could not delete a cancelled export's file");
            }
        }
        Ok(())
    }

    /// The decrypted NDJSON of one output file.
    pub async fn download(
        &self,
        store: &FhirStore,
        id: &str,
        owner: &Identity,
        file: &str,
    ) -> Result<Bytes, ApiError> {
        let job = self.job(id, owner).await?;
        let t: ResourceType = file
            .strip_suffix(".ndjson")
            .and_then(|t| t.parse().ok())
            .ok_or(ApiError::NoSuchExport)?;
        let path = output_path(id, t);
        if !job.files.lock().await.contains(&path) {
            return Err(ApiError::NoSuchExport);
        }
        let objects = store.database().encrypted_store();
        let result = objects
            .get(&path)
            .await
            .map_err(|_| ApiError::StorageUnavailable)?;
        result
            .bytes()
            .await
            .map_err(|_| ApiError::StorageUnavailable)
    }
}

async fn run(
    store: &FhirStore,
    job_id: &str,
    job: &Job,
    request: &ExportRequest,
    base: &str,
) -> Result<Value, ApiError> {
    let transaction_time = format_instant(now_micros()).ok_or(ApiError::Internal)?;
    let objects = store.database().encrypted_store();
    let mut outputs = Vec::new();
    for &t in &request.types {
        if job.cancelled.load(Ordering::SeqCst) {
            return Err(ApiError::ExportFailed);
        }
        let mut pairs = vec![("_count".to_string(), MAX_COUNT.to_string())];
        if let Some(since) = request.since {
            let instant = format_instant(since).ok_or(ApiError::Internal)?;
            pairs.push(("_lastUpdated".to_string(), format!("ge{instant}")));
        }
        let mut ndjson = Vec::new();
        let mut count = 0usize;
        let mut cursor: Option<String> = None;
        loop {
            let mut page_pairs = pairs.clone();
            if let Some(c) = &cursor {
                page_pairs.push(("_cursor".to_string(), c.clone()));
            }
            let query = SearchQuery::parse(
                t,
                page_pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                false,
            )?;
            let page = store.search(&query).await?;
            for m in &page.matches {
                if let Some(body) = &m.body {
                    ndjson.extend_from_slice(body);
                    ndjson.push(b'\n');
                    count += 1;
                }
            }
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        if count > 0 {
            let path = output_path(job_id, t);
            objects
                .put(&path, PutPayload::from(ndjson))
                .await
                .map_err(|_| ApiError::StorageUnavailable)?;
            job.files.lock().await.push(path);
            outputs.push(json!({
                "type": t.as_str(),
                "url": format!("{base}/$export-output/{job_id}/{t}.ndjson"),
                "count": count,
            }));
        }
        job.done_types.fetch_add(1, Ordering::SeqCst);
    }
    Ok(json!({
        "transactionTime": transaction_time,
        "request": request.request_url,
        "requiresAccessToken": true,
        "output": outputs,
        "error": [],
    }))
}
