//! The FHIR resource operations of one care system, on its [`TenantDatabase`]: create
//! (conditional too), read, vread, update, delete, instance/type/system history and the patient
//! compartment; search is in [`super::search`]. HTTP lives in [`super::http`]; this type can be
//! driven without it.
//!
//! Keyspace use (see [`crate::engine::keyspace`]):
//! - `Current [type, id]` → [`CurrentPointer`]: latest version, deleted flag, lastUpdated;
//! - `Version [type, id, version]` → [`VersionRecord`]: the version's JSON (with `meta` set by
//!   the server) or a deletion marker, and its timestamp;
//! - `Index [type, param, value key, id]` → empty, one per [`index_terms`] term of the current
//!   version of each live resource;
//! - `Compartment [patient id, type, id]` → empty, one per [`patient_compartment`] member;
//! - `History [ts micros, type, id, version]` → empty, one per version.
//!
//! Invariants:
//! - every write is one atomic [`Commit`] holding the new version, the current pointer, the
//!   history entry and the index and compartment changes (stale entries of the previous version
//!   deleted, new ones added), and is acknowledged only once durable;
//! - writes to one resource are serialised by a striped lock held from reading the current
//!   pointer to the commit, so `If-Match` checks and version numbers are exact under
//!   concurrency; writes to different resources proceed in parallel (and share WAL flushes);
//! - index and compartment entries exist only for live (not deleted) resources, so a search
//!   never needs to re-check them;
//! - a rejected request stores nothing: all validation happens before the commit is built;
//! - versions are never overwritten or removed: a delete adds a deletion version.

use std::collections::{BTreeSet, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use shcr_fhir::datetime::format_instant;
use shcr_fhir::resource::{Resource, ResourceId, ResourceType};
use shcr_fhir::search::{SearchQuery, index_terms, patient_compartment};
use shcr_identity::Identity;
use tokio::sync::{Mutex, MutexGuard};

use super::audit::{AuditSlot, AuditWriter, audit_event};
use super::error::ApiError;
use super::export::ExportJobs;
use crate::care_system::CareSystemName;
use crate::engine::{Commit, Element, Family, Key};
use crate::tenant::{TenantDatabase, TenantHealth};

/// Limits and addressing of the FHIR API.
#[derive(Debug, Clone)]
pub struct FhirStoreConfig {
    /// The largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// The most index entries one search (or history, or `$everything`) may touch before it is
    /// refused as too costly.
    pub max_search_matches: usize,
    /// The scheme and authority clients reach the store through (e.g. the gateway's
    /// `https://fhir.example.nhs.uk`), for `Location`, `fullUrl` and links; when unset, taken
    /// from the request's `Host` header over `http`.
    pub public_origin: Option<String>,
}

impl Default for FhirStoreConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            max_search_matches: 100_000,
            public_origin: None,
        }
    }
}

/// The number of write-lock stripes: enough that unrelated resources rarely share one.
const LOCK_STRIPES: usize = 1024;

/// The latest state of a resource, as stored under `Current [type, id]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CurrentPointer {
    pub version: u64,
    pub deleted: bool,
    pub last_updated: i64,
}

impl CurrentPointer {
    const LEN: usize = 17;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.push(u8::from(self.deleted));
        out.extend_from_slice(&self.last_updated.to_be_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, ApiError> {
        let bytes: &[u8; Self::LEN] = bytes.try_into().map_err(|_| corrupt("current pointer"))?;
        let (version, rest) = bytes.split_at(8);
        let (deleted, last_updated) = rest.split_at(1);
        Ok(Self {
            version: u64::from_be_bytes(version.try_into().map_err(|_| corrupt("pointer"))?),
            deleted: deleted[0] != 0,
            last_updated: i64::from_be_bytes(
                last_updated.try_into().map_err(|_| corrupt("pointer"))?,
            ),
        })
    }
}

const VERSION_DELETED: u8 = 0;
const VERSION_RESOURCE: u8 = 1;

/// One version as stored under `Version [type, id, version]`: a kind byte, the timestamp
/// (micros, big-endian), then the resource JSON for a resource version.
pub(crate) struct VersionRecord;

impl VersionRecord {
    fn encode(last_updated: i64, json: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + json.map_or(0, <[u8]>::len));
        out.push(if json.is_some() {
            VERSION_RESOURCE
        } else {
            VERSION_DELETED
        });
        out.extend_from_slice(&last_updated.to_be_bytes());
        if let Some(json) = json {
            out.extend_from_slice(json);
        }
        out
    }

    /// `(last_updated, Some(json))` or `(last_updated, None)` for a deletion.
    fn decode(bytes: &Bytes) -> Result<(i64, Option<Bytes>), ApiError> {
        let kind = *bytes.first().ok_or_else(|| corrupt("version"))?;
        let ts: [u8; 8] = bytes
            .get(1..9)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt("version"))?;
        let ts = i64::from_be_bytes(ts);
        match kind {
            VERSION_DELETED => Ok((ts, None)),
            VERSION_RESOURCE => Ok((ts, Some(bytes.slice(9..)))),
            _ => Err(corrupt("version")),
        }
    }
}

fn corrupt(what: &'static str) -> ApiError {
    tracing::error!(record = what, "stored record is malformed");
    ApiError::Internal
}

/// One version of a resource as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    pub resource_type: ResourceType,
    pub id: ResourceId,
    pub version: u64,
    /// Microseconds since the Unix epoch, UTC.
    pub last_updated: i64,
    /// The resource JSON (with `id` and `meta` as stored); `None` for a deletion.
    pub body: Option<Bytes>,
}

/// One page of type or system history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// Versions in the requested window, across all pages.
    pub total: usize,
    /// This page's versions, newest first.
    pub versions: Vec<StoredVersion>,
    /// The cursor of the next (older) page, when there is one.
    pub next_cursor: Option<String>,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOutcome {
    /// The new version (for a delete of a resource that was absent or already deleted, the
    /// existing state and `changed == false`).
    pub stored: StoredVersion,
    /// The write created the resource (create, or update of an absent or deleted resource).
    pub created: bool,
    /// The write added a version.
    pub changed: bool,
}

/// The FHIR record store of one care system.
pub struct FhirStore {
    db: Arc<TenantDatabase>,
    /// The background writer of audit events other than writes' (started on first use, on the
    /// runtime of the request that needed it).
    audit: OnceLock<AuditWriter>,
    /// Bulk export jobs of this process.
    exports: ExportJobs,
    config: FhirStoreConfig,
    write_locks: Vec<Mutex<()>>,
    lock_hasher: RandomState,
    /// One per resource type (indexed like [`ResourceType::ALL`]): serialises conditional
    /// creates of a type, so two with the same condition cannot both create.
    conditional_locks: Vec<Mutex<()>>,
}

impl FhirStore {
    pub fn new(db: TenantDatabase, config: FhirStoreConfig) -> Self {
        Self {
            db: Arc::new(db),
            audit: OnceLock::new(),
            exports: ExportJobs::default(),
            config,
            write_locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            lock_hasher: RandomState::new(),
            conditional_locks: ResourceType::ALL.iter().map(|_| Mutex::new(())).collect(),
        }
    }

    pub fn care_system(&self) -> &CareSystemName {
        self.db.care_system()
    }

    pub fn config(&self) -> &FhirStoreConfig {
        &self.config
    }

    pub fn database(&self) -> &TenantDatabase {
        &self.db
    }

    pub(crate) fn exports(&self) -> &ExportJobs {
        &self.exports
    }

    pub(crate) fn audit_writer(&self) -> &AuditWriter {
        self.audit
            .get_or_init(|| AuditWriter::spawn(self.db.clone()))
    }

    /// Waits (up to `timeout`) until every queued AuditEvent is durable; returns how many are
    /// still queued. Call it on shutdown, before closing the database.
    pub async fn flush_audit(&self, timeout: Duration) -> u64 {
        match self.audit.get() {
            Some(writer) => writer.flush(timeout).await,
            None => 0,
        }
    }

    /// Fails fast with 503 when the tenant cannot serve (fenced, closed, key unavailable).
    pub async fn check_ready(&self) -> Result<(), ApiError> {
        match self.db.health().await {
            TenantHealth::Ready => Ok(()),
            TenantHealth::Fenced => Err(ApiError::Fenced),
            TenantHealth::KeyUnavailable => Err(ApiError::KeyUnavailable),
            TenantHealth::Closed => Err(ApiError::StorageUnavailable),
        }
    }

    async fn lock(&self, resource_type: ResourceType, id: &ResourceId) -> MutexGuard<'_, ()> {
        let hash = self.lock_hasher.hash_one((resource_type, id));
        // The modulo keeps the index below LOCK_STRIPES, the length of `write_locks`.
        let stripe = (hash % LOCK_STRIPES as u64) as usize;
        self.write_locks[stripe].lock().await
    }

    /// `create`: a new resource with a server-assigned id (any id in the body is replaced).
    pub async fn create(
        &self,
        resource_type: ResourceType,
        body: &[u8],
    ) -> Result<WriteOutcome, ApiError> {
        self.create_audited(resource_type, body, None).await
    }

    pub(crate) async fn create_audited(
        &self,
        resource_type: ResourceType,
        body: &[u8],
        audit: Option<WriteAudit<'_>>,
    ) -> Result<WriteOutcome, ApiError> {
        let resource = Resource::parse(body, Some(resource_type))?;
        self.create_new(resource, audit).await
    }

    /// Stores `resource` under a fresh server-assigned id (replacing any id it carries).
    async fn create_new(
        &self,
        mut resource: Resource,
        audit: Option<WriteAudit<'_>>,
    ) -> Result<WriteOutcome, ApiError> {
        let resource_type = resource.resource_type();
        let id = new_id()?;
        resource.set_id(id.clone());
        let _guard = self.lock(resource_type, &id).await;
        self.write_version(resource_type, &id, None, Some(resource), audit)
            .await
    }

    /// Conditional create (`If-None-Exist`): creates the resource unless `condition` matches
    /// one (returned unchanged, `changed == false`); more than one match is refused.
    ///
    /// Conditional creates of one type are serialised against each other; a plain create or
    /// update running at the same moment can still add a matching resource.
    pub async fn create_if_none_exist(
        &self,
        resource_type: ResourceType,
        body: &[u8],
        condition: &SearchQuery,
    ) -> Result<WriteOutcome, ApiError> {
        self.create_if_none_exist_audited(resource_type, body, condition, None)
            .await
    }

    pub(crate) async fn create_if_none_exist_audited(
        &self,
        resource_type: ResourceType,
        body: &[u8],
        condition: &SearchQuery,
        audit: Option<WriteAudit<'_>>,
    ) -> Result<WriteOutcome, ApiError> {
        if condition.filters.is_empty() || condition.resource_type != resource_type {
            return Err(ApiError::InvalidCondition);
        }
        let resource = Resource::parse(body, Some(resource_type))?;
        let slot = ResourceType::ALL
            .iter()
            .position(|t| *t == resource_type)
            .ok_or(ApiError::Internal)?;
        let _type_guard = self.conditional_locks[slot].lock().await;
        let mut probe = condition.clone();
        probe.count = 2;
        probe.cursor = None;
        let found = self.search(&probe).await?;
        match found.matches.as_slice() {
            [] if found.total == 0 => {}
            [existing] if found.total == 1 => {
                return Ok(WriteOutcome {
                    stored: existing.clone(),
                    created: false,
                    changed: false,
                });
            }
            _ => return Err(ApiError::MultipleMatches { resource_type }),
        }
        self.create_new(resource, audit).await
    }

    /// `update` (and update-as-create): `if_match` is the version the client last read.
    pub async fn update(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        body: &[u8],
        if_match: Option<u64>,
    ) -> Result<WriteOutcome, ApiError> {
        self.update_audited(resource_type, id, body, if_match, None)
            .await
    }

    pub(crate) async fn update_audited(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        body: &[u8],
        if_match: Option<u64>,
        audit: Option<WriteAudit<'_>>,
    ) -> Result<WriteOutcome, ApiError> {
        let resource = Resource::parse(body, Some(resource_type))?;
        if resource.id() != Some(id) {
            return Err(ApiError::IdMismatch);
        }
        let _guard = self.lock(resource_type, id).await;
        let current = self.current(resource_type, id).await?;
        if let Some(expected) = if_match {
            match current {
                Some(c) if !c.deleted && c.version == expected => {}
                Some(c) if !c.deleted => {
                    return Err(ApiError::VersionConflict {
                        expected,
                        current: c.version.to_string(),
                    });
                }
                _ => {
                    return Err(ApiError::VersionConflict {
                        expected,
                        current: "none (the resource does not exist)".to_string(),
                    });
                }
            }
        }
        self.write_version(resource_type, id, current, Some(resource), audit)
            .await
    }

    /// `delete`: adds a deletion version; deleting an absent or deleted resource changes
    /// nothing.
    pub async fn delete(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<WriteOutcome, ApiError> {
        self.delete_audited(resource_type, id, None).await
    }

    pub(crate) async fn delete_audited(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        audit: Option<WriteAudit<'_>>,
    ) -> Result<WriteOutcome, ApiError> {
        let _guard = self.lock(resource_type, id).await;
        match self.current(resource_type, id).await? {
            Some(c) if !c.deleted => {
                self.write_version(resource_type, id, Some(c), None, audit)
                    .await
            }
            other => Ok(WriteOutcome {
                stored: StoredVersion {
                    resource_type,
                    id: id.clone(),
                    version: other.map_or(0, |c| c.version),
                    last_updated: other.map_or(0, |c| c.last_updated),
                    body: None,
                },
                created: false,
                changed: false,
            }),
        }
    }

    /// Builds and commits one version, with its AuditEvent when `audit` is given. The caller
    /// holds the resource's write lock and has read `previous` under it.
    async fn write_version(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        previous: Option<CurrentPointer>,
        resource: Option<Resource>,
        audit: Option<WriteAudit<'_>>,
    ) -> Result<WriteOutcome, ApiError> {
        let mut commit = Commit::new();
        let (outcome, patients) = self
            .stage_version(&mut commit, resource_type, id, previous, resource)
            .await?;
        if let Some(audit) = &audit {
            audit.stage(&mut commit, &outcome, patients.clone())?;
        }
        self.db.commit(commit).await?;
        if let Some(audit) = &audit {
            audit.committed(&outcome, patients);
        }
        Ok(outcome)
    }

    /// Adds one version of a resource to `commit`: the version, the current pointer, the
    /// history entry and the index and compartment changes. Returns what the write will do and
    /// the patients whose compartment the resource was or will be in. The caller holds the
    /// resource's write lock and has read `previous` under it.
    pub(crate) async fn stage_version(
        &self,
        commit: &mut Commit,
        resource_type: ResourceType,
        id: &ResourceId,
        previous: Option<CurrentPointer>,
        resource: Option<Resource>,
    ) -> Result<(WriteOutcome, BTreeSet<ResourceId>), ApiError> {
        let version = previous.map_or(1, |p| p.version + 1);
        // Timestamps of one resource strictly increase, even if the clock steps back.
        let last_updated = now_micros().max(previous.map_or(i64::MIN, |p| p.last_updated + 1));
        let old = match previous {
            Some(p) if !p.deleted => Some(self.load_resource(resource_type, id, p.version).await?),
            _ => None,
        };
        let new = match resource {
            Some(mut r) => {
                let instant = format_instant(last_updated).ok_or(ApiError::Internal)?;
                r.set_meta(&version.to_string(), &instant);
                Some(r)
            }
            None => None,
        };
        let json = new.as_ref().map(Resource::to_bytes);
        let type_name = resource_type.as_str();

        commit.put(
            &Key::new(
                Family::Version,
                [type_name.into(), id.as_str().into(), version.into()],
            ),
            VersionRecord::encode(last_updated, json.as_deref()),
        );
        commit.put(
            &Key::new(Family::Current, [type_name.into(), id.as_str().into()]),
            CurrentPointer {
                version,
                deleted: new.is_none(),
                last_updated,
            }
            .encode(),
        );
        commit.put(
            &Key::new(
                Family::History,
                [
                    Element::U64(history_ts(last_updated)),
                    type_name.into(),
                    id.as_str().into(),
                    version.into(),
                ],
            ),
            Bytes::new(),
        );
        let old_terms = old.as_ref().map(index_keys).unwrap_or_default();
        let new_terms = new.as_ref().map(index_keys).unwrap_or_default();
        for (param, value) in old_terms.difference(&new_terms) {
            commit.delete(&index_key(type_name, param, value, id));
        }
        for (param, value) in new_terms.difference(&old_terms) {
            commit.put(&index_key(type_name, param, value, id), Bytes::new());
        }
        let old_patients: BTreeSet<ResourceId> =
            old.as_ref().map(compartment_of).unwrap_or_default();
        let new_patients: BTreeSet<ResourceId> =
            new.as_ref().map(compartment_of).unwrap_or_default();
        for patient in old_patients.difference(&new_patients) {
            commit.delete(&compartment_key(patient, type_name, id));
        }
        for patient in new_patients.difference(&old_patients) {
            commit.put(&compartment_key(patient, type_name, id), Bytes::new());
        }
        let outcome = WriteOutcome {
            stored: StoredVersion {
                resource_type,
                id: id.clone(),
                version,
                last_updated,
                body: json.map(Bytes::from),
            },
            created: previous.is_none_or(|p| p.deleted),
            changed: true,
        };
        let patients = old_patients.union(&new_patients).cloned().collect();
        Ok((outcome, patients))
    }

    pub(crate) async fn current(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<Option<CurrentPointer>, ApiError> {
        let key = Key::new(
            Family::Current,
            [resource_type.as_str().into(), id.as_str().into()],
        );
        match self.db.get(&key).await? {
            Some(bytes) => Ok(Some(CurrentPointer::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    async fn load_version(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        version: u64,
    ) -> Result<Option<StoredVersion>, ApiError> {
        let key = Key::new(
            Family::Version,
            [
                resource_type.as_str().into(),
                id.as_str().into(),
                version.into(),
            ],
        );
        let Some(bytes) = self.db.get(&key).await? else {
            return Ok(None);
        };
        let (last_updated, body) = VersionRecord::decode(&bytes)?;
        Ok(Some(StoredVersion {
            resource_type,
            id: id.clone(),
            version,
            last_updated,
            body,
        }))
    }

    async fn load_resource(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        version: u64,
    ) -> Result<Resource, ApiError> {
        let body = self
            .load_version(resource_type, id, version)
            .await?
            .and_then(|v| v.body)
            .ok_or_else(|| corrupt("current version"))?;
        Resource::parse(&body, Some(resource_type)).map_err(|_| corrupt("stored resource"))
    }

    /// `read`: the current version; 404 when it never existed, 410 when deleted.
    pub async fn read(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<StoredVersion, ApiError> {
        let current = self
            .current(resource_type, id)
            .await?
            .ok_or(ApiError::NotFound { resource_type })?;
        if current.deleted {
            return Err(ApiError::Gone { resource_type });
        }
        self.load_version(resource_type, id, current.version)
            .await?
            .filter(|v| v.body.is_some())
            .ok_or_else(|| corrupt("current version"))
    }

    /// The current version when the resource is live, else `None`.
    pub(crate) async fn read_live(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<Option<StoredVersion>, ApiError> {
        match self.read(resource_type, id).await {
            Ok(v) => Ok(Some(v)),
            Err(ApiError::NotFound { .. } | ApiError::Gone { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `vread`: one version; 404 when there is no such version, 410 when it is a deletion.
    pub async fn vread(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        version: u64,
    ) -> Result<StoredVersion, ApiError> {
        let stored = self
            .load_version(resource_type, id, version)
            .await?
            .ok_or(ApiError::VersionNotFound { resource_type })?;
        if stored.body.is_none() {
            return Err(ApiError::Gone { resource_type });
        }
        Ok(stored)
    }

    /// Instance `_history`: every version, newest first (deletions included, without a body).
    pub async fn history(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<Vec<StoredVersion>, ApiError> {
        if self.current(resource_type, id).await?.is_none() {
            return Err(ApiError::NotFound { resource_type });
        }
        let prefix = Key::new(
            Family::Version,
            [resource_type.as_str().into(), id.as_str().into()],
        );
        let start = prefix.encode();
        let end = crate::engine::prefix_end(&start);
        let mut versions = Vec::new();
        for (key, value) in self.scan_all(start, end).await? {
            let Some(Element::U64(version)) = key.elements.get(2) else {
                return Err(corrupt("version key"));
            };
            let (last_updated, body) = VersionRecord::decode(&value)?;
            versions.push(StoredVersion {
                resource_type,
                id: id.clone(),
                version: *version,
                last_updated,
                body,
            });
        }
        versions.reverse();
        Ok(versions)
    }

    /// Type and system `_history`: versions of every resource (of `resource_type`, when given;
    /// system history leaves out AuditEvents) written at or after `since` (micros), newest first, `count` per page; `before` is the
    /// cursor of the previous page.
    ///
    /// Reads the history entries since `since` in one pass, so without `_since` a long history
    /// is refused as too costly rather than scanned whole.
    pub async fn changes(
        &self,
        resource_type: Option<ResourceType>,
        since: Option<i64>,
        count: usize,
        before: Option<&str>,
    ) -> Result<HistoryPage, ApiError> {
        let before = match before {
            Some(cursor) => Some(decode_hex(cursor).ok_or(ApiError::InvalidHistoryCursor)?),
            None => None,
        };
        let family = Key::new(Family::History, []).encode();
        let start = match since {
            Some(since) => Key::new(Family::History, [Element::U64(history_ts(since))]).encode(),
            None => family.clone(),
        };
        let end = crate::engine::prefix_end(&family);
        let mut entries = Vec::new();
        for (key, _) in self.scan_all(start, end).await? {
            let (Some(Element::Text(t)), Some(Element::Text(id)), Some(Element::U64(version))) = (
                key.elements.get(1),
                key.elements.get(2),
                key.elements.get(3),
            ) else {
                return Err(corrupt("history key"));
            };
            let t: ResourceType = t.parse().map_err(|_| corrupt("history type"))?;
            // System history leaves out the store's own AuditEvents (read them with
            // `AuditEvent/_history` or an AuditEvent search): every read adds one.
            let wanted = match resource_type {
                Some(wanted) => wanted == t,
                None => t != ResourceType::AuditEvent,
            };
            if wanted {
                entries.push((key.encode(), t, id.clone(), *version));
            }
        }
        let total = entries.len();
        let mut page = entries
            .into_iter()
            .rev()
            .filter(|(key, ..)| before.as_ref().is_none_or(|b| key < b));
        let mut versions = Vec::new();
        let mut last = None;
        for (key, t, id, version) in page.by_ref().take(count) {
            let id = ResourceId::parse(&id).map_err(|_| corrupt("history id"))?;
            let stored = self
                .load_version(t, &id, version)
                .await?
                .ok_or_else(|| corrupt("history version"))?;
            versions.push(stored);
            last = Some(key);
        }
        let next_cursor = match (page.next(), last) {
            (Some(_), Some(last)) => Some(last.iter().map(|b| format!("{b:02x}")).collect()),
            _ => None,
        };
        Ok(HistoryPage {
            total,
            versions,
            next_cursor,
        })
    }

    /// `Patient/{id}/$everything`: the patient and every live resource in its compartment, in
    /// key order (type, then id).
    pub async fn everything(&self, patient: &ResourceId) -> Result<Vec<StoredVersion>, ApiError> {
        self.read(ResourceType::Patient, patient).await?;
        let start = Key::new(Family::Compartment, [patient.as_str().into()]).encode();
        let end = crate::engine::prefix_end(&start);
        let mut members = Vec::new();
        for (key, _) in self.scan_all(start, end).await? {
            let (Some(Element::Text(t)), Some(Element::Text(id))) =
                (key.elements.get(1), key.elements.get(2))
            else {
                return Err(corrupt("compartment key"));
            };
            let resource_type: ResourceType = t.parse().map_err(|_| corrupt("compartment type"))?;
            let id = ResourceId::parse(id).map_err(|_| corrupt("compartment id"))?;
            if let Some(stored) = self.read_live(resource_type, &id).await? {
                members.push(stored);
            }
        }
        Ok(members)
    }

    /// A transaction of updates (update-as-create), as a `transaction` Bundle of PUT entries
    /// without `ifMatch` runs them: every resource validated first, then all versions, index
    /// and compartment changes in one atomic commit, or nothing. No audit (like [`Self::update`]);
    /// the HTTP Bundle path ([`super::bundle`]) adds scopes, reference rewriting and the
    /// AuditEvent. A failure names the failing entry's index.
    pub async fn update_transaction(
        &self,
        entries: &[(ResourceType, ResourceId, &[u8])],
    ) -> Result<Vec<WriteOutcome>, (Option<usize>, ApiError)> {
        let mut targets = HashSet::with_capacity(entries.len());
        let mut writes = Vec::with_capacity(entries.len());
        for (index, (resource_type, id, body)) in entries.iter().enumerate() {
            let at = |e| (Some(index), e);
            let resource = Resource::parse(body, Some(*resource_type)).map_err(|e| at(e.into()))?;
            if resource.id() != Some(id) {
                return Err(at(ApiError::IdMismatch));
            }
            if !targets.insert((*resource_type, id.clone())) {
                return Err(at(ApiError::InvalidBundle(
                    "two entries write the same resource",
                )));
            }
            writes.push(TxWrite::Update {
                id: id.clone(),
                resource,
                if_match: None,
            });
        }
        self.commit_transaction(writes, None).await
    }

    /// Locks the conditional-create locks of `types` (in a fixed order, so concurrent callers
    /// cannot deadlock), as a transaction with conditional creates needs.
    pub(crate) async fn lock_types(
        &self,
        types: &BTreeSet<ResourceType>,
    ) -> Result<Vec<MutexGuard<'_, ()>>, ApiError> {
        let mut slots: Vec<usize> = types
            .iter()
            .map(|t| ResourceType::ALL.iter().position(|a| a == t))
            .collect::<Option<_>>()
            .ok_or(ApiError::Internal)?;
        slots.sort_unstable();
        let mut guards = Vec::with_capacity(slots.len());
        for slot in slots {
            guards.push(self.conditional_locks[slot].lock().await);
        }
        Ok(guards)
    }

    /// A transaction: every write in one atomic commit, with one AuditEvent, or nothing. The
    /// write locks of all targets are taken in stripe order (no deadlock between transactions);
    /// a failing entry is reported with its index. Targets must be distinct (the caller checks).
    pub(crate) async fn commit_transaction(
        &self,
        writes: Vec<TxWrite>,
        audit: Option<WriteAudit<'_>>,
    ) -> Result<Vec<WriteOutcome>, (Option<usize>, ApiError)> {
        let mut stripes: Vec<usize> = writes
            .iter()
            .map(|w| {
                let (t, id) = w.target();
                (self.lock_hasher.hash_one((t, id)) % LOCK_STRIPES as u64) as usize
            })
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            guards.push(self.write_locks[stripe].lock().await);
        }
        let mut commit = Commit::new();
        let mut outcomes = Vec::with_capacity(writes.len());
        let mut patients = BTreeSet::new();
        for (index, write) in writes.into_iter().enumerate() {
            let at = |e| (Some(index), e);
            let (resource_type, id) = write.target();
            let (resource_type, id) = (resource_type, id.clone());
            let current = self.current(resource_type, &id).await.map_err(at)?;
            let staged = match write {
                TxWrite::Create { resource, .. } => {
                    if current.is_some() {
                        return Err(at(ApiError::Internal));
                    }
                    Some(
                        self.stage_version(&mut commit, resource_type, &id, None, Some(resource))
                            .await,
                    )
                }
                TxWrite::Update {
                    resource, if_match, ..
                } => {
                    if let Some(expected) = if_match {
                        match current {
                            Some(c) if !c.deleted && c.version == expected => {}
                            Some(c) if !c.deleted => {
                                return Err(at(ApiError::VersionConflict {
                                    expected,
                                    current: c.version.to_string(),
                                }));
                            }
                            _ => {
                                return Err(at(ApiError::VersionConflict {
                                    expected,
                                    current: "none (the resource does not exist)".to_string(),
                                }));
                            }
                        }
                    }
                    Some(
                        self.stage_version(
                            &mut commit,
                            resource_type,
                            &id,
                            current,
                            Some(resource),
                        )
                        .await,
                    )
                }
                TxWrite::Delete { .. } => match current {
                    Some(c) if !c.deleted => Some(
                        self.stage_version(&mut commit, resource_type, &id, Some(c), None)
                            .await,
                    ),
                    other => {
                        outcomes.push(WriteOutcome {
                            stored: StoredVersion {
                                resource_type,
                                id: id.clone(),
                                version: other.map_or(0, |c| c.version),
                                last_updated: other.map_or(0, |c| c.last_updated),
                                body: None,
                            },
                            created: false,
                            changed: false,
                        });
                        None
                    }
                },
            };
            if let Some(staged) = staged {
                let (outcome, touched) = staged.map_err(at)?;
                patients.extend(touched);
                outcomes.push(outcome);
            }
        }
        if let Some(audit) = &audit {
            audit
                .stage_many(&mut commit, &outcomes, patients.clone())
                .map_err(|e| (None, e))?;
        }
        self.db.commit(commit).await.map_err(|e| (None, e.into()))?;
        drop(guards);
        if let Some(audit) = &audit {
            audit.committed_many(&outcomes, patients);
        }
        Ok(outcomes)
    }

    /// Whether `resource_type/id` is, in its current version, in `patient`'s compartment (the
    /// patient itself included).
    pub async fn in_compartment(
        &self,
        patient: &ResourceId,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<bool, ApiError> {
        let key = compartment_key(patient, resource_type.as_str(), id);
        Ok(self.db.get(&key).await?.is_some())
    }

    /// Every entry in `[start, end)`, refusing more than `max_search_matches`.
    pub(crate) async fn scan_all(
        &self,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    ) -> Result<Vec<(Key, Bytes)>, ApiError> {
        const PAGE: usize = 1024;
        let limit = self.config.max_search_matches;
        let mut out: Vec<(Key, Bytes)> = Vec::new();
        loop {
            let after = out.last().map(|(k, _)| k.encode());
            let page = self
                .db
                .scan_encoded(start.clone(), end.clone(), after.as_deref(), PAGE)
                .await?;
            let done = page.len() < PAGE;
            out.extend(page);
            if out.len() > limit {
                return Err(ApiError::TooCostly { limit });
            }
            if done {
                return Ok(out);
            }
        }
    }
}

/// Who wrote a version, so its AuditEvent goes into the same commit.
#[derive(Clone, Copy)]
pub(crate) struct WriteAudit<'a> {
    pub identity: &'a Identity,
    pub slot: &'a AuditSlot,
}

/// One write of a transaction, validated, with its target id fixed (creates get a fresh id
/// before references are resolved; an update's resource carries the URL's id).
pub(crate) enum TxWrite {
    Create {
        id: ResourceId,
        resource: Resource,
    },
    Update {
        id: ResourceId,
        resource: Resource,
        if_match: Option<u64>,
    },
    Delete {
        resource_type: ResourceType,
        id: ResourceId,
    },
}

impl TxWrite {
    fn target(&self) -> (ResourceType, &ResourceId) {
        match self {
            Self::Create { id, resource } | Self::Update { id, resource, .. } => {
                (resource.resource_type(), id)
            }
            Self::Delete { resource_type, id } => (*resource_type, id),
        }
    }
}

impl WriteAudit<'_> {
    fn stage_many(
        &self,
        commit: &mut Commit,
        outcomes: &[WriteOutcome],
        patients: BTreeSet<ResourceId>,
    ) -> Result<(), ApiError> {
        let mut facts = self.slot.with(|f| f.clone());
        facts.others = outcomes
            .iter()
            .map(|o| (o.stored.resource_type, o.stored.id.clone()))
            .collect();
        facts.add_patients(patients);
        let now = now_micros();
        let event = audit_event(self.identity, &facts, 200, now).ok_or(ApiError::Internal)?;
        stage_new(commit, event, now)?;
        Ok(())
    }

    fn committed_many(&self, outcomes: &[WriteOutcome], patients: BTreeSet<ResourceId>) {
        self.slot.with(|f| {
            f.others = outcomes
                .iter()
                .map(|o| (o.stored.resource_type, o.stored.id.clone()))
                .collect();
            f.add_patients(patients);
            f.recorded = true;
        });
    }

    fn stage(
        &self,
        commit: &mut Commit,
        outcome: &WriteOutcome,
        patients: BTreeSet<ResourceId>,
    ) -> Result<(), ApiError> {
        let mut facts = self.slot.with(|f| f.clone());
        facts.resource = Some((outcome.stored.resource_type, outcome.stored.id.clone()));
        facts.add_patients(patients);
        let status = if outcome.created { 201 } else { 200 };
        let event = audit_event(self.identity, &facts, status, outcome.stored.last_updated)
            .ok_or(ApiError::Internal)?;
        stage_new(commit, event, outcome.stored.last_updated)?;
        Ok(())
    }

    fn committed(&self, outcome: &WriteOutcome, patients: BTreeSet<ResourceId>) {
        self.slot.with(|f| {
            f.resource = Some((outcome.stored.resource_type, outcome.stored.id.clone()));
            f.add_patients(patients);
            f.recorded = true;
        });
    }
}

/// A fresh server-assigned id.
pub(crate) fn new_id() -> Result<ResourceId, ApiError> {
    ResourceId::parse(&uuid::Uuid::new_v4().to_string()).map_err(|_| ApiError::Internal)
}

/// Adds `resource` to `commit` as version 1 of a new resource under a fresh id, stamped
/// `last_updated`: no read and no lock needed, since nothing else can know the id yet.
pub(crate) fn stage_new(
    commit: &mut Commit,
    mut resource: Resource,
    last_updated: i64,
) -> Result<StoredVersion, ApiError> {
    let resource_type = resource.resource_type();
    let type_name = resource_type.as_str();
    let id = new_id()?;
    resource.set_id(id.clone());
    let instant = format_instant(last_updated).ok_or(ApiError::Internal)?;
    resource.set_meta("1", &instant);
    let json = resource.to_bytes();
    commit.put(
        &Key::new(
            Family::Version,
            [type_name.into(), id.as_str().into(), 1u64.into()],
        ),
        VersionRecord::encode(last_updated, Some(&json)),
    );
    commit.put(
        &Key::new(Family::Current, [type_name.into(), id.as_str().into()]),
        CurrentPointer {
            version: 1,
            deleted: false,
            last_updated,
        }
        .encode(),
    );
    commit.put(
        &Key::new(
            Family::History,
            [
                Element::U64(history_ts(last_updated)),
                type_name.into(),
                id.as_str().into(),
                1u64.into(),
            ],
        ),
        Bytes::new(),
    );
    for (param, value) in index_keys(&resource) {
        commit.put(&index_key(type_name, param, &value, &id), Bytes::new());
    }
    for patient in compartment_of(&resource) {
        commit.put(&compartment_key(&patient, type_name, &id), Bytes::new());
    }
    Ok(StoredVersion {
        resource_type,
        id,
        version: 1,
        last_updated,
        body: Some(Bytes::from(json)),
    })
}

/// The patient compartments a resource is stored in. AuditEvents are indexed (so
/// `AuditEvent?patient=` works) but kept out of the compartment, so `$everything` and
/// compartment checks do not grow with every access to a record.
fn compartment_of(resource: &Resource) -> BTreeSet<ResourceId> {
    if resource.resource_type() == ResourceType::AuditEvent {
        return BTreeSet::new();
    }
    patient_compartment(resource).into_iter().collect()
}

/// The `(param, value key)` pairs a resource is indexed under.
fn index_keys(resource: &Resource) -> BTreeSet<(&'static str, String)> {
    index_terms(resource)
        .into_iter()
        .map(|t| (t.param, t.value.to_key()))
        .collect()
}

fn index_key(type_name: &str, param: &str, value: &str, id: &ResourceId) -> Key {
    Key::new(
        Family::Index,
        [
            type_name.into(),
            param.into(),
            value.into(),
            id.as_str().into(),
        ],
    )
}

fn compartment_key(patient: &ResourceId, type_name: &str, id: &ResourceId) -> Key {
    Key::new(
        Family::Compartment,
        [
            patient.as_str().into(),
            type_name.into(),
            id.as_str().into(),
        ],
    )
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// History keys order by time; timestamps before 1970 (a broken clock) sort first.
fn history_ts(micros: i64) -> u64 {
    u64::try_from(micros).unwrap_or(0)
}

pub(crate) fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient(id: &str) -> Vec<u8> {
        serde_json::json!({"resourceType": "Patient", "id": id, "gender": "female"})
            .to_string()
            .into_bytes()
    }

    #[tokio::test]
    async fn update_transaction_writes_all_or_nothing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let name = CareSystemName::parse("tx-test")?;
        let store = crate::import::open_local(dir.path(), &name, true).await?;
        let (a, b) = (ResourceId::parse("a")?, ResourceId::parse("b")?);
        let (body_a, body_b) = (patient("a"), patient("b"));
        let out = store
            .update_transaction(&[
                (ResourceType::Patient, a.clone(), body_a.as_slice()),
                (ResourceType::Patient, b.clone(), body_b.as_slice()),
            ])
            .await
            .map_err(|(i, e)| anyhow::anyhow!("entry {i:?}: {e}"))?;
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|o| o.created && o.stored.version == 1));
        assert_eq!(store.read(ResourceType::Patient, &b).await?.version, 1);

        // A bad second entry (id mismatch) stores nothing, not even the good first one.
        let c = ResourceId::parse("c")?;
        let body_c = patient("c");
        let err = store
            .update_transaction(&[
                (ResourceType::Patient, c.clone(), body_c.as_slice()),
                (ResourceType::Patient, a.clone(), body_b.as_slice()),
            ])
            .await;
        assert!(matches!(err, Err((Some(1), ApiError::IdMismatch))));
        assert!(store.read_live(ResourceType::Patient, &c).await?.is_none());

        // Two entries for one resource are refused, naming the second.
        let err = store
            .update_transaction(&[
                (ResourceType::Patient, a.clone(), body_a.as_slice()),
                (ResourceType::Patient, a.clone(), body_a.as_slice()),
            ])
            .await;
        assert!(matches!(err, Err((Some(1), ApiError::InvalidBundle(_)))));
        assert_eq!(store.read(ResourceType::Patient, &a).await?.version, 1);
        store.database().close().await?;
        Ok(())
    }

    #[test]
    fn current_pointer_round_trips() {
        let p = CurrentPointer {
            version: 7,
            deleted: true,
            last_updated: 1_700_000_000_000_000,
        };
        assert_eq!(CurrentPointer::decode(&p.encode()).unwrap(), p);
        assert!(CurrentPointer::decode(&[1, 2, 3]).is_err());
    }

    #[test]
    fn version_record_round_trips() {
        let bytes = Bytes::from(VersionRecord::encode(42, Some(b"{}")));
        assert_eq!(
            VersionRecord::decode(&bytes).unwrap(),
            (42, Some(Bytes::from_static(b"{}")))
        );
        let bytes = Bytes::from(VersionRecord::encode(-5, None));
        assert_eq!(VersionRecord::decode(&bytes).unwrap(), (-5, None));
        assert!(VersionRecord::decode(&Bytes::from_static(&[9; 9])).is_err());
    }
}
