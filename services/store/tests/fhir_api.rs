//! The FHIR API over real HTTP: a store served by axum on a loopback port, driven with reqwest,
//! every request carrying a gateway identity assertion. Most tests use a local-directory bucket
//! with the local key provider; the ones started with [`TestServer::start_s3`] run on the test
//! environment's S3 server (moto) with keys from its KMS emulator (local-kms). Every
//! interaction, each error case, authentication and authorisation, the audit trail, and that a
//! failed request stores nothing.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use async_trait::async_trait;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shcr_identity::{ASSERTION_HEADER, AssertionSigner, Identity, RequestBinding, Scopes};
use shcr_store::CareSystemName;
use shcr_store::api::{FhirStore, FhirStoreConfig, router};
use shcr_store::engine::EngineConfig;
use shcr_store::engine::storage::{ObjectStorage, StaticCredentials};
use shcr_store::envelope::{
    DataKey, EncryptionContext, KeyProvider, KeyProviderError, KeyringConfig, KmsKeyProvider,
    LocalKeyProvider, SecretKey, WrappedKey,
};
use shcr_store::tenant::{TenantConfig, TenantDatabase};

const CARE_SYSTEM: &str = "north-east";
const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";

/// Fault injection: a key provider (local or KMS), with a switch that makes it refuse like a
/// disabled KMS key.
#[derive(Debug)]
struct SwitchableKeys {
    inner: Arc<dyn KeyProvider>,
    available: AtomicBool,
}

#[async_trait]
impl KeyProvider for SwitchableKeys {
    async fn generate_data_key(
        &self,
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyProviderError> {
        self.check(context)?;
        self.inner.generate_data_key(context).await
    }

    async fn decrypt_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &EncryptionContext,
    ) -> Result<SecretKey, KeyProviderError> {
        self.check(context)?;
        self.inner.decrypt_data_key(wrapped, context).await
    }
}

impl SwitchableKeys {
    fn check(&self, context: &EncryptionContext) -> Result<(), KeyProviderError> {
        if self.available.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(KeyProviderError::KeyUnavailable {
                context: context.clone(),
                reason: "disabled by the test".to_string(),
            })
        }
    }
}

const KEY_TTL: Duration = Duration::from_millis(200);

/// A clinician acting for a member organisation with every user scope, as the gateway would
/// vouch for them.
fn clinician() -> Identity {
    identity("user/*.cruds", None)
}

fn identity(scopes: &str, patient: Option<&str>) -> Identity {
    Identity {
        issuer: "https://idp.example".to_string(),
        subject: "555021935107".to_string(),
        organisation: "A81001".to_string(),
        role: "R8000".to_string(),
        scopes: Scopes::parse(scopes).expect("test scopes parse"),
        patient: patient.map(str::to_string),
        care_system: CARE_SYSTEM.to_string(),
        break_glass_reason: None,
        request_id: "test-request".to_string(),
        origin: None,
    }
}

struct TestServer {
    base: String,
    store: Arc<FhirStore>,
    /// A client sending a clinician's assertion with every request.
    http: AssertingClient,
    signer: Arc<AssertionSigner>,
    keys: Arc<SwitchableKeys>,
    dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn open_tenant(dir: &std::path::Path, keys: Arc<SwitchableKeys>) -> Result<TenantDatabase> {
    open_tenant_on(ObjectStorage::LocalDir(dir.join("objects")), keys).await
}

async fn open_tenant_on(
    storage: ObjectStorage,
    keys: Arc<SwitchableKeys>,
) -> Result<TenantDatabase> {
    Ok(TenantDatabase::open(TenantConfig {
        care_system: CareSystemName::parse(CARE_SYSTEM)?,
        storage,
        key_provider: keys,
        keyring: KeyringConfig {
            key_ttl: KEY_TTL,
            ..KeyringConfig::default()
        },
        engine: EngineConfig::default(),
    })
    .await?)
}

impl TestServer {
    async fn start() -> Result<Self> {
        Self::start_with(FhirStoreConfig::default()).await
    }

    async fn start_with(config: FhirStoreConfig) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let keys = Arc::new(SwitchableKeys {
            inner: Arc::new(LocalKeyProvider::open(dir.path().join("keys")).await?),
            available: AtomicBool::new(true),
        });
        let db = open_tenant(dir.path(), keys.clone()).await?;
        Self::serve(db, keys, dir, config).await
    }

    /// A store on a fresh bucket of the test S3 server, under a fresh key of the test KMS.
    async fn start_s3() -> Result<Self> {
        let s3 = shcr_testenv::s3().await?;
        let client = s3.client().await;
        let bucket = shcr_testenv::unique_name("fhir-api");
        s3.create_bucket(&client, &bucket).await?;
        let kms = shcr_testenv::kms().await?.client().await;
        let key = kms
            .create_key()
            .description("shcr fhir api test")
            .send()
            .await?
            .key_metadata
            .context("no key metadata")?
            .key_id;
        let keys = Arc::new(SwitchableKeys {
            inner: Arc::new(KmsKeyProvider::new(kms, key)),
            available: AtomicBool::new(true),
        });
        let creds = shcr_testenv::aws::test_credentials();
        let storage = ObjectStorage::S3 {
            bucket,
            prefix: format!("care/{CARE_SYSTEM}"),
            region: shcr_testenv::aws::REGION.to_string(),
            endpoint: Some(s3.endpoint().to_string()),
            credentials: Some(StaticCredentials {
                access_key_id: creds.access_key_id().to_string(),
                secret_access_key: creds.secret_access_key().to_string(),
            }),
        };
        let db = open_tenant_on(storage, keys.clone()).await?;
        Self::serve(db, keys, tempfile::tempdir()?, FhirStoreConfig::default()).await
    }

    async fn serve(
        db: TenantDatabase,
        keys: Arc<SwitchableKeys>,
        dir: tempfile::TempDir,
        config: FhirStoreConfig,
    ) -> Result<Self> {
        let store = Arc::new(FhirStore::new(db, config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let signer = Arc::new(AssertionSigner::generate()?);
        let app = router(store.clone(), signer.verifier());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            base: format!("http://{addr}/{CARE_SYSTEM}/fhir"),
            store,
            http: client_as(&signer, &clinician())?,
            signer,
            keys,
            dir,
            server,
        })
    }

    /// A client acting as `identity`.
    fn client(&self, identity: &Identity) -> Result<AssertingClient> {
        client_as(&self.signer, identity)
    }

    fn url(&self, path: &str) -> String {
        if path.is_empty() {
            return self.base.clone();
        }
        format!("{}/{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response> {
        self.http
            .post(self.url(path))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
    }

    async fn put(
        &self,
        path: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .put(self.url(path))
            .header("content-type", "application/fhir+json")
            .body(body.to_string());
        if let Some(etag) = if_match {
            req = req.header("if-match", etag);
        }
        req.send().await
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response> {
        self.http.get(self.url(path)).send().await
    }

    async fn get_json(&self, path: &str) -> Result<(StatusCode, Value)> {
        let resp = self.get(path).await?;
        let status = resp.status();
        Ok((status, resp.json().await?))
    }

    /// Creates a resource and returns its server-assigned id.
    async fn create(&self, body: &Value) -> Result<String> {
        let resp = self
            .post(body["resourceType"].as_str().context("type")?, body)
            .await?;
        ensure!(
            resp.status() == StatusCode::CREATED,
            "create: {}",
            resp.status()
        );
        let json: Value = resp.json().await?;
        Ok(json["id"].as_str().context("no id")?.to_string())
    }

    /// The AuditEvents matching `query` (after the background audit queue is durable).
    async fn audit_events(&self, query: &str) -> Result<Vec<Value>> {
        ensure!(
            self.store.flush_audit(Duration::from_secs(10)).await == 0,
            "audit queue did not drain"
        );
        let (status, bundle) = self.get_json(&format!("AuditEvent?{query}")).await?;
        ensure!(status == StatusCode::OK, "audit search: {status} {bundle}");
        Ok(bundle["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["search"]["mode"] == "match")
            .map(|e| e["resource"].clone())
            .collect())
    }

    /// The `total` of a search.
    async fn total(&self, query: &str) -> Result<u64> {
        let (status, bundle) = self.get_json(query).await?;
        ensure!(
            status == StatusCode::OK,
            "search {query}: {status} {bundle}"
        );
        bundle["total"].as_u64().context("no total")
    }
}

/// A client that sends `identity`'s assertion, signed by `signer`, with every request: a fresh
/// one per request, bound to it, as the gateway signs them.
fn client_as(signer: &Arc<AssertionSigner>, identity: &Identity) -> Result<AssertingClient> {
    Ok(AssertingClient {
        http: reqwest::Client::new(),
        signer: signer.clone(),
        identity: identity.clone(),
    })
}

/// A reqwest client acting as one identity (see [`client_as`]).
#[derive(Clone)]
struct AssertingClient {
    http: reqwest::Client,
    signer: Arc<AssertionSigner>,
    identity: Identity,
}

impl AssertingClient {
    fn request(&self, method: reqwest::Method, url: impl reqwest::IntoUrl) -> AssertedRequest {
        AssertedRequest {
            client: self.clone(),
            builder: self.http.request(method, url),
        }
    }

    fn get(&self, url: impl reqwest::IntoUrl) -> AssertedRequest {
        self.request(reqwest::Method::GET, url)
    }

    fn post(&self, url: impl reqwest::IntoUrl) -> AssertedRequest {
        self.request(reqwest::Method::POST, url)
    }

    fn put(&self, url: impl reqwest::IntoUrl) -> AssertedRequest {
        self.request(reqwest::Method::PUT, url)
    }

    fn delete(&self, url: impl reqwest::IntoUrl) -> AssertedRequest {
        self.request(reqwest::Method::DELETE, url)
    }

    fn patch(&self, url: impl reqwest::IntoUrl) -> AssertedRequest {
        self.request(reqwest::Method::PATCH, url)
    }
}

/// A request of an [`AssertingClient`]; the assertion is signed when it is sent.
struct AssertedRequest {
    client: AssertingClient,
    builder: reqwest::RequestBuilder,
}

impl AssertedRequest {
    fn header(self, name: &'static str, value: impl AsRef<str>) -> Self {
        Self {
            builder: self.builder.header(name, value.as_ref()),
            ..self
        }
    }

    fn body(self, body: impl Into<reqwest::Body>) -> Self {
        Self {
            builder: self.builder.body(body),
            ..self
        }
    }

    async fn send(self) -> Result<reqwest::Response> {
        let mut request = self.builder.build()?;
        let url = request.url();
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        };
        // A streamed body cannot be digested up front; it is signed as empty (the store
        // refuses it unless it is refused first for its size).
        let body = request
            .body()
            .and_then(|b| b.as_bytes())
            .unwrap_or_default();
        let binding = RequestBinding::new(request.method().as_str(), &target, body);
        let token =
            self.client
                .signer
                .sign(&self.client.identity, &binding, Duration::from_secs(300))?;
        request
            .headers_mut()
            .insert(ASSERTION_HEADER, token.parse()?);
        Ok(self.client.http.execute(request).await?)
    }
}

/// The first valid NHS number (Modulus 11) whose nine leading digits are `first_nine` or above.
fn nhs_number(first_nine: u64) -> String {
    (first_nine..)
        .find_map(|n| {
            let digits = format!("{n:09}");
            let sum: u32 = digits
                .chars()
                .filter_map(|c| c.to_digit(10))
                .zip((2..=10).rev())
                .map(|(d, w)| d * w)
                .sum();
            match 11 - sum % 11 {
                10 => None,
                11 => Some(format!("{digits}0")),
                check => Some(format!("{digits}{check}")),
            }
        })
        .unwrap_or_default()
}

fn patient(family: &str, nhs: &str, birth_date: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": NHS, "value": nhs}],
        "name": [{"family": family, "given": ["Ann"]}],
        "gender": "female",
        "birthDate": birth_date,
    })
}

fn observation(patient_id: &str, code: &str, date: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "effectiveDateTime": date,
    })
}

fn assert_outcome(body: &Value, code: &str) {
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert_eq!(body["issue"][0]["severity"], "error", "{body}");
    assert_eq!(body["issue"][0]["code"], code, "{body}");
}

#[tokio::test]
async fn create_read_vread_update_delete_keep_versions_and_history() -> Result<()> {
    let s = TestServer::start_s3().await?;
    let mut body = patient("Smith", &nhs_number(943476591), "1980-04-01");
    body["id"] = json!("client-chosen");
    let resp = s.post("Patient", &body).await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let headers = resp.headers().clone();
    assert_eq!(headers["etag"], "W/\"1\"");
    assert!(headers.contains_key("last-modified"));
    let created: Value = resp.json().await?;
    let id = created["id"].as_str().context("id")?.to_string();
    assert_ne!(id, "client-chosen", "the server assigns ids");
    assert_eq!(
        headers["location"].to_str()?,
        s.url(&format!("Patient/{id}/_history/1"))
    );
    assert_eq!(created["meta"]["versionId"], "1");
    assert!(created["meta"]["lastUpdated"].as_str().is_some());

    let resp = s.get(&format!("Patient/{id}")).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["etag"], "W/\"1\"");
    assert!(
        resp.headers()["content-type"]
            .to_str()?
            .starts_with("application/fhir+json")
    );
    let read: Value = resp.json().await?;
    assert_eq!(read, created);

    let mut changed = read.clone();
    changed["name"][0]["family"] = json!("Smythe");
    let resp = s
        .put(&format!("Patient/{id}"), &changed, Some("W/\"1\""))
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["etag"], "W/\"2\"");
    let updated: Value = resp.json().await?;
    assert_eq!(updated["meta"]["versionId"], "2");
    assert_eq!(updated["name"][0]["family"], "Smythe");

    let (status, v1) = s.get_json(&format!("Patient/{id}/_history/1")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v1["name"][0]["family"], "Smith");
    let (status, v2) = s.get_json(&format!("Patient/{id}/_history/2")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v2, updated);

    let resp = s
        .http
        .delete(s.url(&format!("Patient/{id}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (status, gone) = s.get_json(&format!("Patient/{id}")).await?;
    assert_eq!(status, StatusCode::GONE);
    assert_outcome(&gone, "deleted");
    // Deleting again changes nothing.
    let resp = s
        .http
        .delete(s.url(&format!("Patient/{id}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // History is kept: old versions still read, the deletion is a version of its own.
    let (status, _) = s.get_json(&format!("Patient/{id}/_history/2")).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, deleted) = s.get_json(&format!("Patient/{id}/_history/3")).await?;
    assert_eq!(status, StatusCode::GONE);
    assert_outcome(&deleted, "deleted");
    let (status, history) = s.get_json(&format!("Patient/{id}/_history")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 3);
    let methods: Vec<&str> = history["entry"]
        .as_array()
        .context("entries")?
        .iter()
        .filter_map(|e| e["request"]["method"].as_str())
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "POST"]);
    assert!(history["entry"][0].get("resource").is_none());
    assert_eq!(history["entry"][2]["resource"]["meta"]["versionId"], "1");

    // Updating a deleted resource brings it back as a new version.
    let resp = s.put(&format!("Patient/{id}"), &changed, None).await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["etag"], "W/\"4\"");
    Ok(())
}

#[tokio::test]
async fn missing_resources_and_versions_are_404_outcomes() -> Result<()> {
    let s = TestServer::start().await?;
    let (status, body) = s.get_json("Patient/does-not-exist").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&body, "not-found");
    let id = s
        .create(&patient("Jones", &nhs_number(943476592), "1970"))
        .await?;
    let (status, body) = s.get_json(&format!("Patient/{id}/_history/9")).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&body, "not-found");
    let (status, body) = s.get_json(&format!("Patient/{id}/_history/x")).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&body, "value");
    let (status, body) = s.get_json("Patient/does-not-exist/_history").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&body, "not-found");
    let (status, body) = s.get_json("Patient/bad_id!").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&body, "value");
    let (status, body) = s.get_json(&format!("Patient/{id}/$unknown")).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&body, "not-supported");
    let (status, body) = s.get_json("Spaceship/1").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&body, "not-supported");
    let resp = s.http.patch(s.url("Patient/1")).send().await?;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_outcome(&resp.json().await?, "not-supported");
    Ok(())
}

#[tokio::test]
async fn another_care_systems_url_is_404_and_touches_nothing() -> Result<()> {
    let s = TestServer::start().await?;
    let other = s.base.replace(CARE_SYSTEM, "south-west");
    let body = patient("Smith", &nhs_number(943476593), "1980");
    let resp = s
        .http
        .post(format!("{other}/Patient"))
        .body(body.to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_outcome(&resp.json().await?, "not-found");
    let resp = s.http.get(format!("{other}/metadata")).send().await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(s.total("Patient").await?, 0);
    Ok(())
}

#[tokio::test]
async fn if_match_mismatch_is_412_and_update_as_create_uses_the_url_id() -> Result<()> {
    let s = TestServer::start().await?;
    let mut body = patient("Khan", &nhs_number(943476594), "1990-01-01");
    body["id"] = json!("pat-1");
    // If-Match on a resource that does not exist cannot match.
    let resp = s.put("Patient/pat-1", &body, Some("W/\"1\"")).await?;
    assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        s.get("Patient/pat-1").await?.status(),
        StatusCode::NOT_FOUND
    );

    let resp = s.put("Patient/pat-1", &body, None).await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["etag"], "W/\"1\"");
    assert_eq!(
        resp.headers()["location"].to_str()?,
        s.url("Patient/pat-1/_history/1")
    );
    let resp = s.put("Patient/pat-1", &body, Some("W/\"1\"")).await?;
    assert_eq!(resp.status(), StatusCode::OK);

    body["name"][0]["family"] = json!("Stale");
    let resp = s.put("Patient/pat-1", &body, Some("W/\"1\"")).await?;
    assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
    assert_outcome(&resp.json().await?, "conflict");
    let resp = s.put("Patient/pat-1", &body, Some("three")).await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (_, current) = s.get_json("Patient/pat-1").await?;
    assert_eq!(current["meta"]["versionId"], "2");
    assert_eq!(current["name"][0]["family"], "Khan");
    assert_eq!(s.total("Patient?family=stale").await?, 0);
    Ok(())
}

#[tokio::test]
async fn concurrent_updates_get_distinct_versions_and_one_if_match_winner() -> Result<()> {
    let s = Arc::new(TestServer::start().await?);
    let mut body = patient("Race", &nhs_number(943476595), "1990");
    body["id"] = json!("racer");
    assert_eq!(
        s.put("Patient/racer", &body, None).await?.status(),
        StatusCode::CREATED
    );

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, body) = (s.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            s.put("Patient/racer", &body, Some("W/\"1\""))
                .await
                .map(|r| r.status())
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await??);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
            .count(),
        7
    );

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, body) = (s.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let resp = s.put("Patient/racer", &body, None).await?;
            ensure!(resp.status() == StatusCode::OK, "update: {}", resp.status());
            Ok::<_, anyhow::Error>(resp.headers()["etag"].to_str()?.to_string())
        }));
    }
    let mut etags = Vec::new();
    for t in tasks {
        etags.push(t.await??);
    }
    etags.sort();
    etags.dedup();
    assert_eq!(
        etags.len(),
        8,
        "every update got its own version: {etags:?}"
    );
    let (_, history) = s.get_json("Patient/racer/_history").await?;
    assert_eq!(history["total"], 10);
    Ok(())
}

#[tokio::test]
async fn prefer_return_minimal_representation_and_outcome() -> Result<()> {
    let s = TestServer::start().await?;
    let body = patient("Minimal", &nhs_number(943476596), "1990");
    let resp = s
        .http
        .post(s.url("Patient"))
        .header("prefer", "return=minimal")
        .body(body.to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(resp.headers().contains_key("location"));
    assert_eq!(resp.headers()["etag"], "W/\"1\"");
    assert!(resp.bytes().await?.is_empty());

    let resp = s
        .http
        .post(s.url("Patient"))
        .header("prefer", "return=representation")
        .body(body.to_string())
        .send()
        .await?;
    let json: Value = resp.json().await?;
    assert_eq!(json["resourceType"], "Patient");

    let resp = s
        .http
        .post(s.url("Patient"))
        .header("prefer", "return=OperationOutcome")
        .body(body.to_string())
        .send()
        .await?;
    let json: Value = resp.json().await?;
    assert_eq!(json["resourceType"], "OperationOutcome");
    assert_eq!(json["issue"][0]["severity"], "information");
    Ok(())
}

#[tokio::test]
async fn invalid_requests_get_outcomes_with_the_right_status_and_store_nothing() -> Result<()> {
    let s = TestServer::start_with(FhirStoreConfig {
        max_body_bytes: 4096,
        ..FhirStoreConfig::default()
    })
    .await?;
    let bad_nhs = "9434765918";
    let cases: Vec<(&str, &str, String, StatusCode, &str)> = vec![
        ("POST", "Patient", "{\"resourceType\": \"Patient\",".into(), StatusCode::BAD_REQUEST, "structure"),
        ("POST", "Patient", "[1, 2]".into(), StatusCode::BAD_REQUEST, "structure"),
        (
            "POST",
            "Patient",
            json!({"resourceType": "Observation", "status": "final"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "POST",
            "Patient",
            patient("Bad", bad_nhs, "1980").to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
        ),
        (
            "POST",
            "Patient",
            patient("Bad", &nhs_number(943476597), "1980-13-40").to_string(),
            StatusCode::BAD_REQUEST,
            "value",
        ),
        (
            "POST",
            "Patient",
            json!({"resourceType": "Patient", "name": [{"family": "x".repeat(5000)}]}).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
        ),
        (
            "PUT",
            "Patient/abc",
            json!({"resourceType": "Patient", "id": "xyz"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "PUT",
            "Patient/abc",
            json!({"resourceType": "Patient"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            "PUT",
            "Patient/a_b",
            json!({"resourceType": "Patient", "id": "a_b"}).to_string(),
            StatusCode::BAD_REQUEST,
            "value",
        ),
        (
            "PUT",
            "Patient/abc",
            json!({"resourceType": "Patient", "id": "abc", "identifier": [{"system": NHS, "value": bad_nhs}]})
                .to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
        ),
        ("POST", "Spaceship", "{}".into(), StatusCode::NOT_FOUND, "not-supported"),
        (
            "POST",
            "AuditEvent",
            json!({"resourceType": "AuditEvent"}).to_string(),
            StatusCode::METHOD_NOT_ALLOWED,
            "forbidden",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let req = match method {
            "POST" => s.http.post(s.url(path)),
            _ => s.http.put(s.url(path)),
        };
        let resp = req.body(body.clone()).send().await?;
        assert_eq!(resp.status(), status, "{method} {path}");
        let outcome: Value = resp.json().await?;
        assert_outcome(&outcome, code);
        assert!(
            !outcome.to_string().contains(bad_nhs),
            "outcome echoes patient data"
        );
    }
    // A chunked body without Content-Length is cut off at the limit too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b' '; 1024])).collect();
    let resp = s
        .http
        .post(s.url("Patient"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    assert_eq!(
        s.total("Patient").await?,
        0,
        "a failed request stored something"
    );
    assert_eq!(s.get("Patient/abc").await?.status(), StatusCode::NOT_FOUND);
    assert_eq!(s.total("Patient?identifier=9434765918").await?, 0);
    Ok(())
}

#[tokio::test]
async fn metadata_lists_exactly_what_is_supported() -> Result<()> {
    let s = TestServer::start().await?;
    let (status, cs) = s.get_json("metadata").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().context("resources")?;
    let patient = resources
        .iter()
        .find(|r| r["type"] == "Patient")
        .context("Patient")?;
    let interactions: Vec<&str> = patient["interaction"]
        .as_array()
        .context("interactions")?
        .iter()
        .filter_map(|i| i["code"].as_str())
        .collect();
    for i in [
        "read",
        "vread",
        "create",
        "update",
        "delete",
        "search-type",
        "history-instance",
    ] {
        assert!(interactions.contains(&i), "{i}");
    }
    assert!(interactions.contains(&"history-type"));
    assert_eq!(cs["rest"][0]["interaction"][0]["code"], "history-system");
    let params: Vec<&str> = patient["searchParam"]
        .as_array()
        .context("params")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for p in [
        "_id",
        "_lastUpdated",
        "identifier",
        "family",
        "birthdate",
        "general-practitioner",
    ] {
        assert!(params.contains(&p), "{p}");
    }
    assert_eq!(patient["operation"][0]["name"], "everything");
    assert_eq!(patient["conditionalCreate"], true);
    let audit = resources
        .iter()
        .find(|r| r["type"] == "AuditEvent")
        .context("AuditEvent")?;
    assert!(!audit["interaction"].to_string().contains("create"));
    let system: Vec<&str> = cs["rest"][0]["interaction"]
        .as_array()
        .context("system interactions")?
        .iter()
        .filter_map(|i| i["code"].as_str())
        .collect();
    assert_eq!(system, ["history-system", "batch", "transaction"]);
    assert_eq!(cs["rest"][0]["operation"][0]["name"], "export");
    assert!(
        patient["operation"]
            .as_array()
            .context("patient operations")?
            .iter()
            .any(|o| o["name"] == "export")
    );
    let observation = resources
        .iter()
        .find(|r| r["type"] == "Observation")
        .context("Observation")?;
    assert!(
        observation["searchInclude"]
            .as_array()
            .context("includes")?
            .contains(&json!("Observation:patient"))
    );
    assert!(
        patient["searchRevInclude"]
            .as_array()
            .context("revincludes")?
            .contains(&json!("Observation:patient"))
    );
    assert!(cs["rest"][0]["security"]["description"].is_string());
    Ok(())
}

#[tokio::test]
async fn search_by_token_string_date_reference_id_and_chain() -> Result<()> {
    let s = TestServer::start().await?;
    let nhs_a = nhs_number(943476600);
    let nhs_b = nhs_number(943476610);
    let a = s.create(&patient("Smith", &nhs_a, "1980-04-01")).await?;
    let b = s.create(&patient("Smithson", &nhs_b, "1995-07-20")).await?;
    let c = s
        .create(&patient("Müller", &nhs_number(943476620), "2001-01-01"))
        .await?;
    s.create(&observation(&a, "271737000", "2024-03-05T10:00:00Z"))
        .await?;
    s.create(&observation(&a, "38341003", "2023-01-01T09:00:00Z"))
        .await?;
    s.create(&observation(&b, "271737000", "2024-06-01T10:00:00Z"))
        .await?;

    assert_eq!(s.total("Patient").await?, 3);
    assert_eq!(
        s.total(&format!("Patient?identifier={NHS}|{nhs_a}"))
            .await?,
        1
    );
    assert_eq!(s.total(&format!("Patient?identifier={nhs_a}")).await?, 1);
    assert_eq!(s.total("Patient?family=smi").await?, 2);
    assert_eq!(s.total("Patient?family=SMITH").await?, 2);
    assert_eq!(s.total("Patient?family:exact=Smith").await?, 1);
    assert_eq!(
        s.total("Patient?family=muller").await?,
        1,
        "accent-insensitive"
    );
    assert_eq!(s.total("Patient?family=smi&birthdate=ge1990").await?, 1);
    assert_eq!(s.total("Patient?birthdate=1980").await?, 1);
    assert_eq!(s.total("Patient?birthdate=lt2000-01-01").await?, 2);
    assert_eq!(s.total("Patient?gender=female").await?, 3);
    assert_eq!(s.total(&format!("Patient?_id={a},{c}")).await?, 2);
    assert_eq!(s.total("Patient?_lastUpdated=gt2000-01-01").await?, 3);
    assert_eq!(s.total("Patient?_lastUpdated=lt2000-01-01").await?, 0);

    assert_eq!(
        s.total(&format!("Observation?patient=Patient/{a}")).await?,
        2
    );
    assert_eq!(s.total(&format!("Observation?subject={a}")).await?, 2);
    assert_eq!(
        s.total("Observation?code=http://snomed.info/sct|271737000")
            .await?,
        2
    );
    assert_eq!(
        s.total(&format!("Observation?patient={a}&code=271737000"))
            .await?,
        1
    );
    assert_eq!(s.total("Observation?date=ge2024-01-01").await?, 2);
    assert_eq!(s.total("Observation?date=2024-03").await?, 1);
    assert_eq!(
        s.total(&format!("Observation?patient.identifier={NHS}|{nhs_b}"))
            .await?,
        1,
        "chained search by NHS number"
    );

    let (status, bundle) = s
        .get_json(&format!("Patient?identifier={NHS}|{nhs_a}"))
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["entry"][0]["resource"]["id"], a.as_str());
    assert_eq!(bundle["entry"][0]["search"]["mode"], "match");
    assert_eq!(
        bundle["entry"][0]["fullUrl"].as_str(),
        Some(s.url(&format!("Patient/{a}")).as_str())
    );
    assert_eq!(bundle["link"][0]["relation"], "self");
    assert!(
        bundle["link"][0]["url"]
            .as_str()
            .context("self")?
            .starts_with(&s.url("Patient?"))
    );
    Ok(())
}

#[tokio::test]
async fn search_pages_with_count_and_an_opaque_next_cursor() -> Result<()> {
    let s = TestServer::start().await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            s.create(&patient("Page", &nhs_number(943476700 + i * 10), "1990"))
                .await?,
        );
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut next = Some(s.url("Patient?family=page&_count=2"));
    let mut pages = 0;
    while let Some(url) = next {
        let bundle: Value = s.http.get(&url).send().await?.json().await?;
        assert_eq!(bundle["total"], 5);
        for e in bundle["entry"].as_array().context("entries")? {
            seen.push(e["resource"]["id"].as_str().context("id")?.to_string());
        }
        next = bundle["link"]
            .as_array()
            .context("links")?
            .iter()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_string);
        pages += 1;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    let (status, bundle) = s.get_json("Patient?_count=0").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bundle["total"], 5);
    assert!(bundle["entry"].as_array().is_none_or(Vec::is_empty));
    let (status, body) = s.get_json("Patient?_cursor=zz").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&body, "invalid");
    Ok(())
}

#[tokio::test]
async fn unknown_or_malformed_search_parameters_are_400_unless_lenient() -> Result<()> {
    let s = TestServer::start().await?;
    s.create(&patient("Lenient", &nhs_number(943476800), "1990"))
        .await?;
    let (status, body) = s.get_json("Patient?nickname=x").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&body, "not-supported");
    assert!(body.to_string().contains("nickname"));
    let (status, body) = s
        .get_json("Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765918")
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(!body.to_string().contains("9434765918"));
    let (status, body) = s.get_json("Patient?birthdate=yesterday").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&body, "invalid");
    let (status, body) = s.get_json("Patient?_include=Patient:nickname").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.to_string().contains("_include"), "{body}");

    let resp = s
        .http
        .get(s.url("Patient?nickname=x&family=lenient&_include=Patient:general-practitioner"))
        .header("prefer", "handling=lenient")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let bundle: Value = resp.json().await?;
    assert_eq!(bundle["total"], 1);
    let entries = bundle["entry"].as_array().context("entries")?;
    let outcome = entries
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .context("outcome entry")?;
    assert_eq!(outcome["resource"]["issue"][0]["severity"], "warning");
    assert_eq!(
        outcome["resource"]["issue"].as_array().map(Vec::len),
        Some(1),
        "only the unknown parameter is ignored; _include is supported"
    );
    Ok(())
}

#[tokio::test]
async fn the_index_follows_updates_and_deletes() -> Result<()> {
    let s = TestServer::start().await?;
    let nhs = nhs_number(943476900);
    let id = s.create(&patient("Before", &nhs, "1990")).await?;
    let obs = s
        .create(&observation(&id, "271737000", "2024-03-05T10:00:00Z"))
        .await?;
    let (_, mut current) = s.get_json(&format!("Patient/{id}")).await?;
    current["name"][0]["family"] = json!("After");
    assert_eq!(
        s.put(&format!("Patient/{id}"), &current, None)
            .await?
            .status(),
        StatusCode::OK
    );
    assert_eq!(s.total("Patient?family=before").await?, 0);
    assert_eq!(s.total("Patient?family=after").await?, 1);
    assert_eq!(
        s.total(&format!("Patient?identifier={NHS}|{nhs}")).await?,
        1
    );

    let resp = s
        .http
        .delete(s.url(&format!("Patient/{id}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(s.total("Patient?family=after").await?, 0);
    assert_eq!(
        s.total(&format!("Patient?identifier={NHS}|{nhs}")).await?,
        0
    );
    assert_eq!(s.total(&format!("Patient?_id={id}")).await?, 0);
    assert_eq!(s.total("Patient").await?, 0);
    assert_eq!(
        s.total(&format!("Observation?patient.identifier={NHS}|{nhs}"))
            .await?,
        0
    );
    assert_eq!(s.total(&format!("Observation?_id={obs}")).await?, 1);
    Ok(())
}

#[tokio::test]
async fn everything_returns_the_patients_compartment() -> Result<()> {
    let s = TestServer::start().await?;
    let a = s
        .create(&patient("Every", &nhs_number(943477000), "1990"))
        .await?;
    let b = s
        .create(&patient("Other", &nhs_number(943477010), "1990"))
        .await?;
    let o1 = s
        .create(&observation(&a, "1", "2024-01-01T00:00:00Z"))
        .await?;
    let o2 = s
        .create(&observation(&a, "2", "2024-01-02T00:00:00Z"))
        .await?;
    s.create(&observation(&b, "3", "2024-01-03T00:00:00Z"))
        .await?;
    let resp = s
        .http
        .delete(s.url(&format!("Observation/{o2}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let (status, bundle) = s.get_json(&format!("Patient/{a}/$everything")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bundle["type"], "searchset");
    let mut got: Vec<String> = bundle["entry"]
        .as_array()
        .context("entries")?
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap_or(""),
                e["resource"]["id"].as_str().unwrap_or("")
            )
        })
        .collect();
    got.sort();
    let mut want = vec![format!("Observation/{o1}"), format!("Patient/{a}")];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(bundle["total"], 2);
    let (status, _) = s.get_json("Patient/nobody/$everything").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn an_unavailable_key_is_503_and_service_resumes_when_it_returns() -> Result<()> {
    let s = TestServer::start().await?;
    let id = s
        .create(&patient("Keyed", &nhs_number(943477100), "1990"))
        .await?;
    s.keys.available.store(false, Ordering::SeqCst);
    tokio::time::sleep(KEY_TTL + Duration::from_millis(200)).await;
    let (status, body) = s.get_json(&format!("Patient/{id}")).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_outcome(&body, "transient");
    let resp = s
        .post("Patient", &patient("Keyed", &nhs_number(943477110), "1990"))
        .await?;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let (status, _) = s.get_json("Patient").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    s.keys.available.store(true, Ordering::SeqCst);
    assert_eq!(
        s.get(&format!("Patient/{id}")).await?.status(),
        StatusCode::OK
    );
    assert_eq!(
        s.total("Patient").await?,
        1,
        "the refused create stored nothing"
    );
    Ok(())
}

#[tokio::test]
async fn a_fenced_store_answers_503() -> Result<()> {
    let s = TestServer::start().await?;
    s.create(&patient("Fenced", &nhs_number(943477200), "1990"))
        .await?;
    // A second writer opens the same database and fences the first.
    let successor = open_tenant(s.dir.path(), s.keys.clone()).await?;
    let resp = s
        .post(
            "Patient",
            &patient("Fenced", &nhs_number(943477210), "1990"),
        )
        .await?;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_outcome(&resp.json().await?, "transient");
    let (status, _) = s.get_json("Patient").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    successor.close().await?;
    Ok(())
}

#[tokio::test]
async fn conditional_create_creates_once_and_refuses_ambiguous_conditions() -> Result<()> {
    let s = TestServer::start().await?;
    let nhs = nhs_number(943477300);
    let body = patient("Once", &nhs, "1990");
    let condition = format!("identifier={NHS}|{nhs}");
    let send = |condition: String| {
        s.http
            .post(s.url("Patient"))
            .header("if-none-exist", condition)
            .body(body.to_string())
            .send()
    };
    let resp = send(condition.clone()).await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let first: Value = resp.json().await?;
    let resp = send(condition.clone()).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["etag"], "W/\"1\"");
    let second: Value = resp.json().await?;
    assert_eq!(first["id"], second["id"]);
    assert_eq!(s.total("Patient").await?, 1);

    s.create(&patient("Once", &nhs_number(943477310), "1990"))
        .await?;
    let resp = send("family=once".to_string()).await?;
    assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
    assert_outcome(&resp.json().await?, "duplicate");
    let resp = send("nickname=x".to_string()).await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = send("_count=1".to_string()).await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_outcome(&resp.json().await?, "invalid");
    assert_eq!(s.total("Patient").await?, 2);
    Ok(())
}

/// The same operations without HTTP, on an in-memory bucket.
#[tokio::test]
async fn fhir_store_works_without_http() -> Result<()> {
    use shcr_fhir::resource::{ResourceId, ResourceType};
    use shcr_fhir::search::SearchQuery;
    use shcr_store::api::ApiError;

    let dir = tempfile::tempdir()?;
    let keys: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::open(dir.path()).await?);
    let db = TenantDatabase::open(TenantConfig {
        care_system: CareSystemName::parse(CARE_SYSTEM)?,
        storage: ObjectStorage::Memory,
        key_provider: keys,
        keyring: KeyringConfig::default(),
        engine: EngineConfig::default(),
    })
    .await?;
    let store = FhirStore::new(db, FhirStoreConfig::default());
    let nhs = nhs_number(943477400);
    let created = store
        .create(
            ResourceType::Patient,
            patient("Direct", &nhs, "1990").to_string().as_bytes(),
        )
        .await?;
    assert!(created.created && created.changed);
    assert_eq!(created.stored.version, 1);
    let id = created.stored.id.clone();
    let read = store.read(ResourceType::Patient, &id).await?;
    assert_eq!(read, created.stored);

    let mut next: Value = serde_json::from_slice(read.body.as_deref().context("body")?)?;
    next["gender"] = json!("male");
    let stale = store
        .update(
            ResourceType::Patient,
            &id,
            next.to_string().as_bytes(),
            Some(7),
        )
        .await;
    assert!(matches!(
        stale,
        Err(ApiError::VersionConflict { expected: 7, .. })
    ));
    let updated = store
        .update(
            ResourceType::Patient,
            &id,
            next.to_string().as_bytes(),
            Some(1),
        )
        .await?;
    assert_eq!(updated.stored.version, 2);
    assert!(!updated.created);

    let query = SearchQuery::parse(ResourceType::Patient, [("gender", "male")], false)?;
    let page = store.search(&query).await?;
    assert_eq!(page.total, 1);
    assert_eq!(page.matches[0].id, id);
    let query = SearchQuery::parse(ResourceType::Patient, [("gender", "female")], false)?;
    assert_eq!(store.search(&query).await?.total, 0);

    let deleted = store.delete(ResourceType::Patient, &id).await?;
    assert_eq!(deleted.stored.version, 3);
    assert!(matches!(
        store.read(ResourceType::Patient, &id).await,
        Err(ApiError::Gone { .. })
    ));
    let missing = ResourceId::parse("missing")?;
    assert!(matches!(
        store.read(ResourceType::Patient, &missing).await,
        Err(ApiError::NotFound { .. })
    ));
    assert_eq!(store.history(ResourceType::Patient, &id).await?.len(), 3);
    store.database().close().await?;
    Ok(())
}

#[tokio::test]
async fn sort_orders_by_dates_and_pages_in_that_order() -> Result<()> {
    let s = TestServer::start().await?;
    let old = s
        .create(&patient("Sort", &nhs_number(943477500), "1950-01-01"))
        .await?;
    let young = s
        .create(&patient("Sort", &nhs_number(943477510), "2010-01-01"))
        .await?;
    let middle = s
        .create(&patient("Sort", &nhs_number(943477520), "1980-06-15"))
        .await?;
    let mut unknown = patient("Sort", &nhs_number(943477530), "1990");
    unknown
        .as_object_mut()
        .context("object")?
        .remove("birthDate");
    let unknown = s.create(&unknown).await?;

    let ids = |bundle: &Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (_, bundle) = s.get_json("Patient?_sort=birthdate").await?;
    assert_eq!(ids(&bundle), [old.as_str(), &middle, &young, &unknown]);
    let (_, bundle) = s.get_json("Patient?_sort=-birthdate").await?;
    assert_eq!(ids(&bundle), [young.as_str(), &middle, &old, &unknown]);

    // Paging follows the sort order, one at a time.
    let mut seen = Vec::new();
    let mut next = Some(s.url("Patient?_sort=-_lastUpdated&_count=1"));
    while let Some(url) = next {
        let bundle: Value = s.http.get(&url).send().await?.json().await?;
        assert_eq!(bundle["total"], 4);
        seen.extend(ids(&bundle));
        next = bundle["link"]
            .as_array()
            .context("links")?
            .iter()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_string);
    }
    assert_eq!(seen, [unknown.as_str(), &middle, &young, &old]);
    Ok(())
}

#[tokio::test]
async fn type_and_system_history_list_versions_newest_first_with_paging() -> Result<()> {
    let s = TestServer::start().await?;
    let a = s
        .create(&patient("Hist", &nhs_number(943477600), "1990"))
        .await?;
    let (_, mut current) = s.get_json(&format!("Patient/{a}")).await?;
    current["gender"] = json!("other");
    assert_eq!(
        s.put(&format!("Patient/{a}"), &current, None)
            .await?
            .status(),
        StatusCode::OK
    );
    let resp = s
        .post("Observation", &observation(&a, "1", "2024-01-01T00:00:00Z"))
        .await?;
    let obs: Value = resp.json().await?;
    let obs_updated = obs["meta"]["lastUpdated"]
        .as_str()
        .context("lastUpdated")?
        .to_string();
    let resp = s.http.delete(s.url(&format!("Patient/{a}"))).send().await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let summary = |bundle: &Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {}",
                            e["request"]["method"].as_str().unwrap_or(""),
                            e["request"]["url"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (status, bundle) = s.get_json("Patient/_history").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bundle["type"], "history");
    assert_eq!(bundle["total"], 3);
    let pa = format!("Patient/{a}");
    let ob = format!("Observation/{}", obs["id"].as_str().context("id")?);
    assert_eq!(
        summary(&bundle),
        [
            format!("DELETE {pa}"),
            format!("PUT {pa}"),
            format!("POST {pa}")
        ]
    );

    let (_, all) = s.get_json("_history").await?;
    assert_eq!(all["total"], 4);
    let newest_first = [
        format!("DELETE {pa}"),
        format!("POST {ob}"),
        format!("PUT {pa}"),
        format!("POST {pa}"),
    ];
    assert_eq!(summary(&all), newest_first);

    let mut paged = Vec::new();
    let mut next = Some(s.url("_history?_count=1"));
    while let Some(url) = next {
        let bundle: Value = s.http.get(&url).send().await?.json().await?;
        assert_eq!(bundle["total"], 4);
        paged.extend(summary(&bundle));
        next = bundle["link"]
            .as_array()
            .context("links")?
            .iter()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_string);
    }
    assert_eq!(paged, newest_first);

    let (status, since) = s
        .get_json(&format!("_history?_since={obs_updated}"))
        .await?;
    assert_eq!(status, StatusCode::OK, "{since}");
    assert_eq!(
        summary(&since),
        [format!("DELETE {pa}"), format!("POST {ob}")]
    );

    for bad in [
        "_history?_since=yesterday",
        "_history?nickname=1",
        "Patient/_history?_cursor=zz",
        "_history?_count=1&_count=2",
    ] {
        let (status, body) = s.get_json(bad).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_outcome(&body, "invalid");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Identity assertion and authorisation

#[tokio::test]
async fn requests_without_a_valid_assertion_are_401_and_touch_nothing() -> Result<()> {
    let s = TestServer::start().await?;
    let anonymous = reqwest::Client::new();
    // The CapabilityStatement is public.
    let resp = anonymous.get(s.url("metadata")).send().await?;
    assert_eq!(resp.status(), StatusCode::OK);

    let body = patient("Anon", &nhs_number(943478000), "1990");
    let stranger = AssertionSigner::generate()?;
    let mut other_system = clinician();
    other_system.care_system = "south-west".to_string();
    let any_request = RequestBinding::new("GET", "/", b"");
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("garbage", Some("not-a-jwt".to_string())),
        (
            "another key",
            Some(stranger.sign(&clinician(), &any_request, Duration::from_secs(60))?),
        ),
        (
            "another care system",
            Some(
                s.signer
                    .sign(&other_system, &any_request, Duration::from_secs(60))?,
            ),
        ),
    ];
    for (what, token) in cases {
        for (method, path) in [
            ("GET", "Patient"),
            ("POST", "Patient"),
            ("GET", "Patient/x"),
            ("GET", "_history"),
            ("GET", "Nothing/here/at/all"),
        ] {
            let mut req = match method {
                "POST" => anonymous.post(s.url(path)).body(body.to_string()),
                _ => anonymous.get(s.url(path)),
            };
            if let Some(token) = &token {
                req = req.header(ASSERTION_HEADER, token);
            }
            let resp = req.send().await?;
            assert_eq!(
                resp.status(),
                StatusCode::UNAUTHORIZED,
                "{what} {method} {path}"
            );
            assert!(
                resp.headers().contains_key("www-authenticate"),
                "{what}: 401 carries WWW-Authenticate"
            );
            assert_outcome(&resp.json().await?, "login");
        }
    }
    assert_eq!(s.total("Patient").await?, 0, "nothing was stored");
    Ok(())
}

#[tokio::test]
async fn scopes_are_enforced_per_interaction_and_type() -> Result<()> {
    let s = TestServer::start().await?;
    let p = s
        .create(&patient("Scoped", &nhs_number(943478100), "1970"))
        .await?;
    let o = s.create(&observation(&p, "1234", "2024-01-01")).await?;

    let reader = s.client(&identity("user/*.rs", None))?;
    assert_eq!(
        reader
            .get(s.url(&format!("Patient/{p}")))
            .send()
            .await?
            .status(),
        StatusCode::OK
    );
    let resp = reader
        .post(s.url("Patient"))
        .body(patient("No", &nhs_number(943478110), "1970").to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_outcome(&resp.json().await?, "forbidden");
    let resp = reader
        .delete(s.url(&format!("Observation/{o}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    let obs_only = s.client(&identity("user/Observation.rs", None))?;
    for path in [
        format!("Observation/{o}"),
        format!("Observation?patient={p}"),
    ] {
        assert_eq!(
            obs_only.get(s.url(&path)).send().await?.status(),
            StatusCode::OK,
            "{path}"
        );
    }
    for path in [
        format!("Patient/{p}"),
        "Patient".to_string(),
        format!("Patient/{p}/$everything"),
        "_history".to_string(),
    ] {
        let resp = obs_only.get(s.url(&path)).send().await?;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        assert_outcome(&resp.json().await?, "forbidden");
    }
    // Read but not search, and search but not read.
    let read_only = s.client(&identity("user/Patient.r", None))?;
    assert_eq!(
        read_only.get(s.url("Patient")).send().await?.status(),
        StatusCode::FORBIDDEN
    );
    let no_clinical = s.client(&identity("openid fhirUser", None))?;
    assert_eq!(
        no_clinical
            .get(s.url(&format!("Patient/{p}")))
            .send()
            .await?
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        s.total("Observation").await?,
        1,
        "the refused delete did nothing"
    );
    Ok(())
}

#[tokio::test]
async fn a_patient_scoped_identity_sees_only_its_compartment() -> Result<()> {
    let s = TestServer::start().await?;
    let mine = s
        .create(&patient("Mine", &nhs_number(943478200), "1980"))
        .await?;
    let theirs = s
        .create(&patient("Theirs", &nhs_number(943478210), "1981"))
        .await?;
    let my_obs = s.create(&observation(&mine, "1111", "2024-01-01")).await?;
    let their_obs = s
        .create(&observation(&theirs, "1111", "2024-01-02"))
        .await?;
    let me = s.client(&identity("patient/*.cruds", Some(&mine)))?;

    for path in [
        format!("Patient/{mine}"),
        format!("Observation/{my_obs}"),
        format!("Observation/{my_obs}/_history"),
        format!("Observation/{my_obs}/_history/1"),
        format!("Patient/{mine}/$everything"),
    ] {
        assert_eq!(
            me.get(s.url(&path)).send().await?.status(),
            StatusCode::OK,
            "{path}"
        );
    }
    for path in [
        format!("Patient/{theirs}"),
        format!("Observation/{their_obs}"),
        format!("Observation/{their_obs}/_history/1"),
        format!("Patient/{theirs}/$everything"),
        "Patient/does-not-exist".to_string(),
        "Observation/_history".to_string(),
        "_history".to_string(),
        "Practitioner".to_string(),
    ] {
        let resp = me.get(s.url(&path)).send().await?;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        assert_outcome(&resp.json().await?, "forbidden");
    }
    // Searches are confined, whatever the query asks for.
    for query in [
        "Observation".to_string(),
        "Observation?code=1111".to_string(),
        format!("Observation?patient={theirs}"),
    ] {
        let resp = me.get(s.url(&query)).send().await?;
        assert_eq!(resp.status(), StatusCode::OK, "{query}");
        let bundle: Value = resp.json().await?;
        let ids: Vec<&str> = bundle["entry"]
            .as_array()
            .context("entries")?
            .iter()
            .filter_map(|e| e["resource"]["id"].as_str())
            .collect();
        assert!(
            ids.iter().all(|id| *id == my_obs),
            "{query} returned another patient's records: {ids:?}"
        );
    }
    let bundle: Value = me.get(s.url("Patient")).send().await?.json().await?;
    assert_eq!(bundle["total"], 1);
    assert_eq!(bundle["entry"][0]["resource"]["id"], mine.as_str());

    // Writes: only into the own compartment.
    let resp = me
        .post(s.url("Observation"))
        .body(observation(&theirs, "2222", "2024-02-01").to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = me
        .post(s.url("Observation"))
        .body(observation(&mine, "2222", "2024-02-01").to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let mut moved = observation(&mine, "1111", "2024-01-02");
    moved["id"] = json!(their_obs);
    let resp = me
        .put(s.url(&format!("Observation/{their_obs}")))
        .body(moved.to_string())
        .send()
        .await?;
    assert_eq!(
        resp.status(),
        StatusCode::FORBIDDEN,
        "cannot take over another's record"
    );
    let resp = me
        .delete(s.url(&format!("Observation/{their_obs}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        s.total(&format!("Observation?patient={theirs}")).await?,
        1,
        "the other patient's record is untouched"
    );

    // Patient scopes without a patient reach nothing.
    let nobody = s.client(&identity("patient/*.rs", None))?;
    assert_eq!(
        nobody
            .get(s.url(&format!("Patient/{mine}")))
            .send()
            .await?
            .status(),
        StatusCode::FORBIDDEN
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Audit

#[tokio::test]
async fn every_interaction_is_audited_with_who_what_patient_and_outcome() -> Result<()> {
    let s = TestServer::start_s3().await?;
    let p = s
        .create(&patient("Audited", &nhs_number(943478300), "1960"))
        .await?;
    // A write's AuditEvent is in the write's own commit: visible without waiting.
    let (status, bundle) = s.get_json(&format!("AuditEvent?patient={p}")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bundle["total"], 1, "the create is audited: {bundle}");
    let create = &bundle["entry"][0]["resource"];
    assert_eq!(create["subtype"][0]["code"], "create");
    assert_eq!(create["action"], "C");
    assert_eq!(create["outcome"], "0");

    let o = s.create(&observation(&p, "5555", "2024-03-01")).await?;
    assert_eq!(
        s.get(&format!("Patient/{p}")).await?.status(),
        StatusCode::OK
    );
    assert_eq!(
        s.get(&format!("Observation/{o}")).await?.status(),
        StatusCode::OK
    );
    assert_eq!(s.total(&format!("Observation?patient={p}")).await?, 1);
    assert_eq!(
        s.get(&format!("Patient/{p}/$everything")).await?.status(),
        StatusCode::OK
    );
    assert_eq!(
        s.get("Observation/missing").await?.status(),
        StatusCode::NOT_FOUND
    );

    let events = s.audit_events(&format!("patient={p}&_count=100")).await?;
    let subtypes: Vec<&str> = events
        .iter()
        .filter_map(|e| e["subtype"][0]["code"].as_str())
        .collect();
    for wanted in ["create", "read", "search-type", "operation"] {
        assert!(subtypes.contains(&wanted), "{wanted} audited: {subtypes:?}");
    }
    let read = events
        .iter()
        .find(|e| {
            e["subtype"][0]["code"] == "read"
                && e["entity"].as_array().is_some_and(|es| {
                    es.iter()
                        .any(|x| x["what"]["reference"] == format!("Observation/{o}"))
                })
        })
        .context("the Observation read is audited against its patient")?;
    assert_eq!(
        read["agent"][0]["who"]["identifier"]["value"],
        "555021935107"
    );
    assert_eq!(read["agent"][0]["role"][0]["coding"][0]["code"], "R8000");
    assert_eq!(read["agent"][1]["who"]["identifier"]["value"], "A81001");
    assert_eq!(read["source"]["site"], CARE_SYSTEM);
    assert!(read["recorded"].is_string());
    assert!(read.get("purposeOfEvent").is_none(), "no break glass");

    // Failures are audited too.
    let failed = s.audit_events("outcome=4").await?;
    assert!(
        failed
            .iter()
            .any(|e| e["entity"].as_array().is_some_and(|es| es
                .iter()
                .any(|x| x["what"]["reference"] == "Observation/missing"))),
        "the 404 read is audited"
    );
    // By agent (person or organisation) and by date.
    assert!(!s.audit_events("agent=555021935107").await?.is_empty());
    assert!(
        !s.audit_events("agent=https://fhir.nhs.uk/Id/ods-organization-code|A81001")
            .await?
            .is_empty()
    );
    assert!(s.audit_events("agent=Y99999").await?.is_empty());
    assert!(!s.audit_events("date=ge2020-01-01").await?.is_empty());
    assert!(s.audit_events("date=lt2000-01-01").await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn break_glass_is_a_flagged_purpose_of_event() -> Result<()> {
    let s = TestServer::start().await?;
    let p = s
        .create(&patient("Glass", &nhs_number(943478400), "1950"))
        .await?;
    let mut emergency = clinician();
    emergency.break_glass_reason = Some("unconscious in ED".to_string());
    let resp = s
        .client(&emergency)?
        .get(s.url(&format!("Patient/{p}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let events = s.audit_events(&format!("patient={p}")).await?;
    let flagged: Vec<&Value> = events
        .iter()
        .filter(|e| e["purposeOfEvent"][0]["coding"][0]["code"] == "BTG")
        .collect();
    assert_eq!(flagged.len(), 1, "exactly the break-glass read is flagged");
    assert_eq!(flagged[0]["purposeOfEvent"][0]["text"], "unconscious in ED");
    assert_eq!(flagged[0]["subtype"][0]["code"], "read");
    Ok(())
}

#[tokio::test]
async fn clients_cannot_write_audit_events_and_they_stay_out_of_everything() -> Result<()> {
    let s = TestServer::start().await?;
    let p = s
        .create(&patient("Trail", &nhs_number(943478500), "1950"))
        .await?;
    let event = s.audit_events(&format!("patient={p}")).await?;
    let id = event[0]["id"].as_str().context("audit id")?.to_string();
    let resp = s.post("AuditEvent", &event[0]).await?;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let resp = s.put(&format!("AuditEvent/{id}"), &event[0], None).await?;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let resp = s
        .http
        .delete(s.url(&format!("AuditEvent/{id}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        s.get(&format!("AuditEvent/{id}")).await?.status(),
        StatusCode::OK
    );
    let (_, everything) = s.get_json(&format!("Patient/{p}/$everything")).await?;
    assert_eq!(everything["total"], 1, "only the patient: {everything}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// batch and transaction Bundles

fn entry_post(full_url: &str, resource: Value) -> Value {
    json!({
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": resource_type_of(&resource)},
    })
}

fn resource_type_of(resource: &Value) -> String {
    resource["resourceType"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn bundle_of(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

#[tokio::test]
async fn a_transaction_commits_everything_and_resolves_urn_uuid_references() -> Result<()> {
    let s = TestServer::start_s3().await?;
    let nhs = nhs_number(943479000);
    let gp = json!({
        "resourceType": "Practitioner",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "G1234567"}],
        "name": [{"family": "Jones"}],
    });
    let mut conditional_gp = entry_post("urn:uuid:gp", gp.clone());
    conditional_gp["request"]["ifNoneExist"] =
        json!("identifier=https://fhir.nhs.uk/Id/sds-user-id|G1234567");
    let mut p = patient("Trans", &nhs, "1970-01-01");
    p["generalPractitioner"] = json!([{"reference": "urn:uuid:gp"}]);
    let bundle = bundle_of(
        "transaction",
        vec![
            entry_post("urn:uuid:obs1", observation("x", "1000", "2024-01-01")),
            entry_post("urn:uuid:pat", p),
            conditional_gp.clone(),
            entry_post("urn:uuid:obs2", observation("x", "2000", "2024-01-02")),
        ],
    );
    let mut bundle = bundle;
    bundle["entry"][0]["resource"]["subject"]["reference"] = json!("urn:uuid:pat");
    bundle["entry"][3]["resource"]["subject"]["reference"] = json!("urn:uuid:pat");
    let resp = s.post("", &bundle).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let reply: Value = resp.json().await?;
    assert_eq!(reply["type"], "transaction-response");
    let entries = reply["entry"].as_array().context("entries")?;
    assert_eq!(entries.len(), 4);
    for e in entries {
        assert_eq!(e["response"]["status"], "201 Created", "{e}");
        assert_eq!(e["response"]["etag"], "W/\"1\"");
        assert!(
            e["response"]["location"]
                .as_str()
                .is_some_and(|l| l.ends_with("/_history/1"))
        );
    }
    let patient_id = entries[1]["resource"]["id"]
        .as_str()
        .context("patient id")?;
    let gp_id = entries[2]["resource"]["id"].as_str().context("gp id")?;
    assert_eq!(
        entries[1]["resource"]["generalPractitioner"][0]["reference"],
        format!("Practitioner/{gp_id}")
    );
    for i in [0, 3] {
        assert_eq!(
            entries[i]["resource"]["subject"]["reference"],
            format!("Patient/{patient_id}")
        );
    }
    assert_eq!(
        s.total(&format!("Observation?patient={patient_id}"))
            .await?,
        2
    );
    assert_eq!(
        s.total(&format!("Observation?patient.identifier={NHS}|{nhs}"))
            .await?,
        2,
        "chaining by NHS number finds the transaction's records"
    );
    // The transaction's AuditEvent went into the same commit.
    let (_, audit) = s
        .get_json(&format!(
            "AuditEvent?patient={patient_id}&subtype=transaction"
        ))
        .await?;
    assert_eq!(audit["total"], 1, "{audit}");

    // The conditional create now matches: a no-op referring to the existing Practitioner.
    let again = bundle_of("transaction", vec![conditional_gp]);
    let reply: Value = s.post("", &again).await?.json().await?;
    assert_eq!(reply["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(reply["entry"][0]["resource"]["id"], gp_id);
    assert_eq!(s.total("Practitioner").await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_failing_transaction_entry_stores_nothing() -> Result<()> {
    let s = TestServer::start().await?;
    let existing = s
        .create(&patient("Before", &nhs_number(943479100), "1970"))
        .await?;
    let good = entry_post(
        "urn:uuid:a",
        patient("Good", &nhs_number(943479110), "1971"),
    );
    let mut bad_nhs = patient("Bad", "9434765918", "1972");
    bad_nhs["identifier"][0]["value"] = json!("9434765918");
    let mut update = patient("Changed", &nhs_number(943479100), "1970");
    update["id"] = json!(existing);
    let put = |if_match: &str| {
        json!({
            "resource": update.clone(),
            "request": {"method": "PUT", "url": format!("Patient/{existing}"), "ifMatch": if_match},
        })
    };
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "invalid NHS number in the last entry",
            bundle_of(
                "transaction",
                vec![
                    good.clone(),
                    put("W/\"1\""),
                    entry_post("urn:uuid:b", bad_nhs),
                ],
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "Bundle.entry[2]",
        ),
        (
            "If-Match conflict",
            bundle_of("transaction", vec![good.clone(), put("W/\"7\"")]),
            StatusCode::PRECONDITION_FAILED,
            "Bundle.entry[1]",
        ),
        (
            "unresolved urn:uuid",
            bundle_of(
                "transaction",
                vec![
                    good.clone(),
                    entry_post(
                        "urn:uuid:o",
                        json!({
                            "resourceType": "Observation", "status": "final",
                            "code": {"text": "x"}, "subject": {"reference": "urn:uuid:nowhere"},
                        }),
                    ),
                ],
            ),
            StatusCode::BAD_REQUEST,
            "Bundle.entry[1]",
        ),
        (
            "the same resource twice",
            bundle_of("transaction", vec![put("W/\"1\""), put("W/\"1\"")]),
            StatusCode::BAD_REQUEST,
            "Bundle.entry[1]",
        ),
        (
            "a GET in a transaction",
            bundle_of(
                "transaction",
                vec![
                    good.clone(),
                    json!({"request": {"method": "GET", "url": "Patient"}}),
                ],
            ),
            StatusCode::BAD_REQUEST,
            "Bundle.entry[1]",
        ),
        (
            "an AuditEvent write",
            bundle_of(
                "transaction",
                vec![
                    good.clone(),
                    entry_post("urn:uuid:ae", json!({"resourceType": "AuditEvent"})),
                ],
            ),
            StatusCode::METHOD_NOT_ALLOWED,
            "Bundle.entry[1]",
        ),
        (
            "a URL that does not fit the method",
            bundle_of(
                "transaction",
                vec![
                    good.clone(),
                    json!({"request": {"method": "DELETE", "url": "Patient"}}),
                ],
            ),
            StatusCode::BAD_REQUEST,
            "Bundle.entry[1]",
        ),
        (
            "not a batch or transaction",
            bundle_of("collection", vec![good.clone()]),
            StatusCode::BAD_REQUEST,
            "Bundle.type",
        ),
        (
            "not a Bundle",
            patient("Odd", &nhs_number(943479120), "1970"),
            StatusCode::BAD_REQUEST,
            "Bundle",
        ),
    ];
    for (what, bundle, status, mentions) in cases {
        let resp = s.post("", &bundle).await?;
        assert_eq!(resp.status(), status, "{what}");
        let outcome: Value = resp.json().await?;
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{what}");
        assert!(outcome.to_string().contains(mentions), "{what}: {outcome}");
        assert_eq!(s.total("Patient").await?, 1, "{what}: nothing stored");
        assert_eq!(s.total("Observation").await?, 0, "{what}: nothing stored");
        let (_, current) = s.get_json(&format!("Patient/{existing}")).await?;
        assert_eq!(current["meta"]["versionId"], "1", "{what}: no update");
    }

    // An ambiguous conditional create fails the whole transaction.
    for n in [943479130, 943479140] {
        s.create(&json!({
            "resourceType": "Practitioner",
            "identifier": [{"system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "DUP1"}],
            "name": [{"family": format!("Dup{n}")}],
        }))
        .await?;
    }
    let mut ambiguous = entry_post("urn:uuid:p", json!({"resourceType": "Practitioner"}));
    ambiguous["request"]["ifNoneExist"] = json!("identifier=DUP1");
    let resp = s
        .post("", &bundle_of("transaction", vec![good.clone(), ambiguous]))
        .await?;
    assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(s.total("Patient").await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_storage_fault_fails_the_whole_transaction() -> Result<()> {
    let s = TestServer::start().await?;
    s.create(&patient("Keep", &nhs_number(943479200), "1970"))
        .await?;
    let bundle = bundle_of(
        "transaction",
        vec![
            entry_post(
                "urn:uuid:a",
                patient("Lost", &nhs_number(943479210), "1971"),
            ),
            entry_post(
                "urn:uuid:b",
                patient("Lost", &nhs_number(943479220), "1972"),
            ),
        ],
    );
    s.keys.available.store(false, Ordering::SeqCst);
    tokio::time::sleep(KEY_TTL + Duration::from_millis(200)).await;
    let resp = s.post("", &bundle).await?;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_outcome(&resp.json().await?, "transient");
    s.keys.available.store(true, Ordering::SeqCst);
    assert_eq!(
        s.total("Patient").await?,
        1,
        "nothing of the transaction was stored"
    );
    assert_eq!(s.post("", &bundle).await?.status(), StatusCode::OK);
    assert_eq!(s.total("Patient").await?, 3);
    Ok(())
}

#[tokio::test]
async fn a_batch_runs_entries_independently() -> Result<()> {
    let s = TestServer::start().await?;
    let p = s
        .create(&patient("Batch", &nhs_number(943479300), "1970"))
        .await?;
    let bundle = bundle_of(
        "batch",
        vec![
            entry_post("urn:uuid:x", observation(&p, "3000", "2024-01-01")),
            json!({"request": {"method": "GET", "url": "Patient/nobody"}}),
            entry_post("urn:uuid:y", patient("Bad", "1234567890", "1970")),
            json!({"request": {"method": "GET", "url": format!("Patient/{p}")}}),
            json!({"request": {"method": "GET", "url": format!("Observation?patient={p}")}}),
            json!({"request": {"method": "DELETE", "url": format!("Patient/{p}")}}),
        ],
    );
    let resp = s.post("", &bundle).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let reply: Value = resp.json().await?;
    assert_eq!(reply["type"], "batch-response");
    let statuses: Vec<&str> = reply["entry"]
        .as_array()
        .context("entries")?
        .iter()
        .filter_map(|e| e["response"]["status"].as_str())
        .collect();
    assert_eq!(
        statuses,
        [
            "201 Created",
            "404 Not Found",
            "422 Unprocessable Entity",
            "200 OK",
            "200 OK",
            "204 No Content"
        ]
    );
    assert_eq!(
        reply["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(reply["entry"][3]["resource"]["id"], p.as_str());
    assert_eq!(reply["entry"][4]["resource"]["total"], 1);
    assert_eq!(s.total("Observation").await?, 1);
    assert_eq!(
        s.get(&format!("Patient/{p}")).await?.status(),
        StatusCode::GONE
    );
    Ok(())
}

#[tokio::test]
async fn bundles_respect_scopes_and_the_patient_compartment() -> Result<()> {
    let s = TestServer::start().await?;
    let mine = s
        .create(&patient("Mine", &nhs_number(943479400), "1980"))
        .await?;
    let theirs = s
        .create(&patient("Theirs", &nhs_number(943479410), "1981"))
        .await?;
    let me = s.client(&identity("patient/*.cruds", Some(&mine)))?;
    let bundle = bundle_of(
        "transaction",
        vec![
            entry_post("urn:uuid:1", observation(&mine, "4000", "2024-01-01")),
            entry_post("urn:uuid:2", observation(&theirs, "4000", "2024-01-01")),
        ],
    );
    let resp = me.post(s.url("")).body(bundle.to_string()).send().await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.total("Observation").await?, 0);

    let reader = s.client(&identity("user/*.rs", None))?;
    let resp = reader
        .post(s.url(""))
        .body(
            bundle_of(
                "transaction",
                vec![entry_post(
                    "urn:uuid:1",
                    observation(&mine, "4000", "2024-01-01"),
                )],
            )
            .to_string(),
        )
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let reply: Value = reader
        .post(s.url(""))
        .body(
            bundle_of(
                "batch",
                vec![
                    entry_post("urn:uuid:1", observation(&mine, "4000", "2024-01-01")),
                    json!({"request": {"method": "GET", "url": format!("Patient/{theirs}")}}),
                ],
            )
            .to_string(),
        )
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(reply["entry"][0]["response"]["status"], "403 Forbidden");
    assert_eq!(reply["entry"][1]["response"]["status"], "200 OK");
    assert_eq!(s.total("Observation").await?, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// _include and _revinclude

#[tokio::test]
async fn include_and_revinclude_follow_the_patient_links() -> Result<()> {
    let s = TestServer::start().await?;
    let nhs = nhs_number(943479500);
    let p = s.create(&patient("Linked", &nhs, "1975")).await?;
    let other = s
        .create(&patient("Unlinked", &nhs_number(943479510), "1976"))
        .await?;
    let o1 = s.create(&observation(&p, "6000", "2024-01-01")).await?;
    let o2 = s.create(&observation(&p, "6001", "2024-01-02")).await?;
    s.create(&observation(&other, "6000", "2024-01-03")).await?;

    let modes = |bundle: &Value| -> Vec<(String, String)> {
        bundle["entry"]
            .as_array()
            .map(|es| {
                es.iter()
                    .map(|e| {
                        (
                            e["search"]["mode"].as_str().unwrap_or_default().to_string(),
                            format!(
                                "{}/{}",
                                e["resource"]["resourceType"].as_str().unwrap_or_default(),
                                e["resource"]["id"].as_str().unwrap_or_default()
                            ),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (status, bundle) = s
        .get_json(&format!(
            "Observation?patient={p}&_include=Observation:patient"
        ))
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bundle["total"], 2, "total counts matches only");
    let got = modes(&bundle);
    assert_eq!(got.iter().filter(|(m, _)| m == "match").count(), 2);
    assert_eq!(
        got.iter()
            .filter(|(m, _)| m == "include")
            .collect::<Vec<_>>(),
        vec![&("include".to_string(), format!("Patient/{p}"))],
        "the patient once, though two matches point at it"
    );

    // By NHS number through the chain, with the patient's records revincluded.
    let (_, bundle) = s
        .get_json(&format!(
            "Patient?identifier={NHS}|{nhs}&_revinclude=Observation:patient"
        ))
        .await?;
    let got = modes(&bundle);
    assert_eq!(got[0], ("match".to_string(), format!("Patient/{p}")));
    let mut included: Vec<&str> = got
        .iter()
        .filter(|(m, _)| m == "include")
        .map(|(_, r)| r.as_str())
        .collect();
    included.sort();
    let mut expected = vec![format!("Observation/{o1}"), format!("Observation/{o2}")];
    expected.sort();
    assert_eq!(included, expected);
    assert_eq!(
        s.total(&format!("Observation?patient.identifier={NHS}|{nhs}"))
            .await?,
        2
    );
    assert_eq!(
        s.total(&format!("Observation?patient.identifier={}", nhs))
            .await?,
        2,
        "the chain also takes the bare NHS number"
    );

    // Included resources obey scopes: without Patient read, no Patient is included.
    let obs_only = s.client(&identity("user/Observation.rs", None))?;
    let bundle: Value = obs_only
        .get(s.url(&format!(
            "Observation?patient={p}&_include=Observation:patient"
        )))
        .send()
        .await?
        .json()
        .await?;
    assert!(modes(&bundle).iter().all(|(m, _)| m == "match"));
    Ok(())
}

#[tokio::test]
async fn an_oversized_bundle_is_413_and_stores_nothing() -> Result<()> {
    let s = TestServer::start_with(FhirStoreConfig {
        max_body_bytes: 4096,
        ..FhirStoreConfig::default()
    })
    .await?;
    let entries: Vec<Value> = (0..40)
        .map(|i| {
            entry_post(
                &format!("urn:uuid:{i}"),
                patient("Big", &nhs_number(943479600 + i * 10), "1970"),
            )
        })
        .collect();
    let resp = s.post("", &bundle_of("transaction", entries)).await?;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_outcome(&resp.json().await?, "too-long");
    assert_eq!(s.total("Patient").await?, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bulk $export

/// Polls an export status URL until the manifest is ready.
async fn export_manifest(client: &AssertingClient, status_url: &str) -> Result<Value> {
    for _ in 0..200 {
        let resp = client.get(status_url).send().await?;
        match resp.status() {
            StatusCode::ACCEPTED => {
                ensure!(
                    resp.headers().contains_key("x-progress"),
                    "202 carries X-Progress"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            StatusCode::OK => return Ok(resp.json().await?),
            other => anyhow::bail!("export status: {other}"),
        }
    }
    anyhow::bail!("export did not finish")
}

#[tokio::test]
async fn bulk_export_writes_encrypted_ndjson_and_serves_it_decrypted() -> Result<()> {
    let s = TestServer::start().await?;
    let marker_nhs = nhs_number(943479700);
    let p = s
        .create(&patient("Exportfamily", &marker_nhs, "1966"))
        .await?;
    let other = s
        .create(&patient("Other", &nhs_number(943479710), "1967"))
        .await?;
    s.create(&observation(&p, "7000", "2024-01-01")).await?;
    s.create(&observation(&other, "7001", "2024-01-02")).await?;
    let system = s.client(&identity("system/*.rs", None))?;

    // Kick-off needs respond-async.
    let resp = system.get(s.url("$export")).send().await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_outcome(&resp.json().await?, "invalid");
    let resp = system
        .get(s.url("$export"))
        .header("prefer", "respond-async")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let status_url = resp
        .headers()
        .get("content-location")
        .context("Content-Location")?
        .to_str()?
        .to_string();
    let manifest = export_manifest(&system, &status_url).await?;
    assert_eq!(manifest["requiresAccessToken"], true);
    let outputs = manifest["output"].as_array().context("outputs")?;
    let mut types: Vec<&str> = outputs.iter().filter_map(|o| o["type"].as_str()).collect();
    types.sort();
    assert_eq!(
        types,
        ["Observation", "Patient"],
        "AuditEvents are not exported by default"
    );
    for output in outputs {
        let url = output["url"].as_str().context("url")?;
        let resp = system.get(url).send().await?;
        assert_eq!(resp.status(), StatusCode::OK);
        let text = resp.text().await?;
        let lines: Vec<Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(
            lines.len() as u64,
            output["count"].as_u64().context("count")?
        );
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l["resourceType"] == output["type"]));
        // Another person cannot fetch it.
        let resp = s
            .client(&{
                let mut someone = identity("system/*.rs", None);
                someone.subject = "someone-else".to_string();
                someone
            })?
            .get(url)
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
    // Nothing in the bucket is plaintext: the family name and NHS number appear nowhere.
    let mut stack = vec![s.dir.path().join("objects")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path)?;
                for needle in ["Exportfamily", marker_nhs.as_str()] {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                        "{needle} in plaintext in {}",
                        path.display()
                    );
                }
            }
        }
    }

    // _type and _since.
    let resp = system
        .get(s.url("$export?_type=Patient"))
        .header("prefer", "respond-async")
        .send()
        .await?;
    let url = resp
        .headers()
        .get("content-location")
        .context("location")?
        .to_str()?
        .to_string();
    let manifest = export_manifest(&system, &url).await?;
    assert_eq!(manifest["output"].as_array().map(Vec::len), Some(1));
    assert_eq!(manifest["output"][0]["type"], "Patient");
    let resp = system
        .get(s.url("$export?_since=2999-01-01T00:00:00Z"))
        .header("prefer", "respond-async")
        .send()
        .await?;
    let url = resp
        .headers()
        .get("content-location")
        .context("location")?
        .to_str()?
        .to_string();
    let manifest = export_manifest(&system, &url).await?;
    assert_eq!(manifest["output"].as_array().map(Vec::len), Some(0));

    // Patient-level export; DELETE cancels and forgets the job.
    let resp = system
        .get(s.url("Patient/$export?_type=Observation"))
        .header("prefer", "respond-async")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let url = resp
        .headers()
        .get("content-location")
        .context("location")?
        .to_str()?
        .to_string();
    export_manifest(&system, &url).await?;
    assert_eq!(
        system.delete(&url).send().await?.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        system.get(&url).send().await?.status(),
        StatusCode::NOT_FOUND
    );
    Ok(())
}

#[tokio::test]
async fn bulk_export_refusals() -> Result<()> {
    let s = TestServer::start().await?;
    let system = s.client(&identity("system/*.rs", None))?;
    for (query, status) in [
        ("$export?_type=Spaceship", StatusCode::BAD_REQUEST),
        ("$export?_since=yesterday", StatusCode::BAD_REQUEST),
        ("$export?_outputFormat=text/csv", StatusCode::BAD_REQUEST),
        ("$export?_elements=id", StatusCode::BAD_REQUEST),
        (
            "Patient/$export?_type=Practitioner",
            StatusCode::BAD_REQUEST,
        ),
        ("$export-status/no-such-job", StatusCode::NOT_FOUND),
        (
            "$export-output/no-such-job/Patient.ndjson",
            StatusCode::NOT_FOUND,
        ),
    ] {
        let resp = system
            .get(s.url(query))
            .header("prefer", "respond-async")
            .send()
            .await?;
        assert_eq!(resp.status(), status, "{query}");
        assert_eq!(
            resp.json::<Value>().await?["resourceType"],
            "OperationOutcome",
            "{query}"
        );
    }
    // Type-limited scopes and patient-confined identities cannot export everything.
    for who in [
        identity("user/Observation.rs", None),
        identity("patient/*.rs", Some("p1")),
    ] {
        let resp = s
            .client(&who)?
            .get(s.url("$export"))
            .header("prefer", "respond-async")
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
    Ok(())
}

/// The entries' resource ids of a searchset Bundle.
fn bundle_ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["search"]["mode"] != "outcome")
                .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Defect: a token with `patient/*.cruds user/Practitioner.rs` was treated as unconfined and
/// read and updated other patients' Observations. Confinement is decided per type.
#[tokio::test]
async fn mixed_scopes_keep_patient_grants_confined() -> Result<()> {
    let s = TestServer::start().await?;
    let mine = s
        .create(&patient("Mine", &nhs_number(943478300), "1980"))
        .await?;
    let theirs = s
        .create(&patient("Theirs", &nhs_number(943478310), "1981"))
        .await?;
    let their_obs = s
        .create(&observation(&theirs, "1111", "2024-01-02"))
        .await?;
    let practitioner = s
        .create(&json!({"resourceType": "Practitioner", "name": [{"family": "Jones"}]}))
        .await?;
    let me = s.client(&identity(
        "patient/*.cruds user/Practitioner.rs",
        Some(&mine),
    ))?;

    let resp = me
        .get(s.url(&format!("Observation/{their_obs}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let mut changed = observation(&theirs, "9999", "2024-01-02");
    changed["id"] = json!(their_obs);
    let resp = me
        .put(s.url(&format!("Observation/{their_obs}")))
        .body(changed.to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let stored: Value = s
        .http
        .get(s.url(&format!("Observation/{their_obs}")))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        stored["meta"]["versionId"], "1",
        "the other patient's record is unchanged"
    );
    let bundle: Value = me.get(s.url("Observation")).send().await?.json().await?;
    assert!(bundle_ids(&bundle).is_empty(), "{bundle}");
    // The user/ grant is not confined: the practitioner is readable.
    let resp = me
        .get(s.url(&format!("Practitioner/{practitioner}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    // A batch entry goes the same way as the plain request.
    let batch = bundle_of(
        "batch",
        vec![json!({"request": {"method": "GET", "url": format!("Observation/{their_obs}")}})],
    );
    let resp: Value = me
        .post(s.url(""))
        .body(batch.to_string())
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        resp["entry"][0]["response"]["status"], "403 Forbidden",
        "{resp}"
    );
    Ok(())
}

/// Defect: `If-None-Exist` ran an unconfined, unscoped search and returned the match.
#[tokio::test]
async fn conditional_create_discloses_nothing_the_caller_could_not_read() -> Result<()> {
    let s = TestServer::start().await?;
    let nhs = nhs_number(943478320);
    let theirs = s.create(&patient("Theirs", &nhs, "1981")).await?;
    let mine = s
        .create(&patient("Mine", &nhs_number(943478330), "1980"))
        .await?;
    s.create(&observation(&theirs, "5555", "2024-01-02"))
        .await?;

    // Create without search scope: the condition is refused.
    let create_only = s.client(&identity("user/Patient.c", None))?;
    let resp = create_only
        .post(s.url("Patient"))
        .header(
            "if-none-exist",
            format!("identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}"),
        )
        .body(patient("Probe", &nhs, "1981").to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // A confined caller's condition is searched in its own compartment only: the other
    // patient's Observation is not found (so a new one is created in the caller's compartment).
    let me = s.client(&identity("patient/*.cruds", Some(&mine)))?;
    let resp = me
        .post(s.url("Observation"))
        .header("if-none-exist", "code=5555")
        .body(observation(&mine, "5555", "2024-03-01").to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = resp.json().await?;
    assert_eq!(created["subject"]["reference"], format!("Patient/{mine}"));

    // With search but no read scope, a match is acknowledged without its content.
    let no_read = s.client(&identity("user/Patient.cs", None))?;
    let resp = no_read
        .post(s.url("Patient"))
        .header(
            "if-none-exist",
            format!("identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}"),
        )
        .body(patient("Probe", &nhs, "1981").to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("location").is_none());
    assert!(
        resp.bytes().await?.is_empty(),
        "no resource body for a caller without read"
    );
    Ok(())
}

/// Defect: a confined token PUT a deleted record's id, became its owner and read its history.
#[tokio::test]
async fn deleted_ids_cannot_be_taken_over_and_answer_like_absent_ones() -> Result<()> {
    let s = TestServer::start().await?;
    let mine = s
        .create(&patient("Mine", &nhs_number(943478340), "1980"))
        .await?;
    let theirs = s
        .create(&patient("Theirs", &nhs_number(943478350), "1981"))
        .await?;
    let their_obs = s
        .create(&observation(&theirs, "1111", "2024-01-02"))
        .await?;
    let resp = s
        .http
        .delete(s.url(&format!("Observation/{their_obs}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let me = s.client(&identity("patient/*.cruds", Some(&mine)))?;
    let mut takeover = observation(&mine, "1111", "2024-01-02");
    let mut statuses = Vec::new();
    for id in [their_obs.as_str(), "never-existed-1"] {
        takeover["id"] = json!(id);
        let resp = me
            .put(s.url(&format!("Observation/{id}")))
            .body(takeover.to_string())
            .send()
            .await?;
        statuses.push(resp.status());
        let resp = me
            .get(s.url(&format!("Observation/{id}/_history/1")))
            .send()
            .await?;
        statuses.push(resp.status());
        let resp = me
            .get(s.url(&format!("Observation/{id}/_history")))
            .send()
            .await?;
        statuses.push(resp.status());
    }
    assert!(
        statuses.iter().all(|s| *s == StatusCode::FORBIDDEN),
        "deleted and absent ids answer alike: {statuses:?}"
    );
    let history: Value = s
        .http
        .get(s.url(&format!("Observation/{their_obs}/_history")))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(history["total"], 2, "no version was added: {history}");
    Ok(())
}

/// Defect: `Observation?patient.identifier=` found patients without any Patient scope.
#[tokio::test]
async fn chained_search_needs_scope_on_the_chained_type() -> Result<()> {
    let s = TestServer::start().await?;
    let nhs = nhs_number(943478360);
    let p = s.create(&patient("Chained", &nhs, "1980")).await?;
    s.create(&observation(&p, "1111", "2024-01-02")).await?;
    let obs_only = s.client(&identity("user/Observation.rs", None))?;
    let query = format!("Observation?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}");
    let resp = obs_only.get(s.url(&query)).send().await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_outcome(&resp.json().await?, "forbidden");
    let both = s.client(&identity("user/Observation.rs user/Patient.s", None))?;
    let bundle: Value = both.get(s.url(&query)).send().await?.json().await?;
    assert_eq!(bundle["total"], 1, "{bundle}");
    Ok(())
}

/// Defect: resources labelled restricted (R) were served without a break-glass reason.
#[tokio::test]
async fn sensitive_records_need_break_glass_and_searches_say_what_was_withheld() -> Result<()> {
    let s = TestServer::start().await?;
    let p = s
        .create(&patient("Sensitive", &nhs_number(943478370), "1980"))
        .await?;
    let mut restricted = observation(&p, "7777", "2024-01-02");
    restricted["meta"] = json!({"security": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
        "code": "R",
    }]});
    let restricted = s.create(&restricted).await?;
    let ordinary = s.create(&observation(&p, "7777", "2024-01-03")).await?;

    let resp = s
        .http
        .get(s.url(&format!("Observation/{restricted}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: Value = resp.json().await?;
    assert!(diagnostics_of(&body).contains("break-glass"), "{body}");
    let bundle: Value = s
        .http
        .get(s.url(&format!("Observation?patient={p}")))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(bundle_ids(&bundle), vec![ordinary.clone()], "{bundle}");
    let outcome = bundle["entry"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["search"]["mode"] == "outcome"))
        .context("a search that withheld something says so")?;
    assert_eq!(outcome["resource"]["issue"][0]["code"], "suppressed");
    let everything: Value = s
        .http
        .get(s.url(&format!("Patient/{p}/$everything")))
        .send()
        .await?
        .json()
        .await?;
    assert!(!bundle_ids(&everything).contains(&restricted));

    let mut glass = clinician();
    glass.break_glass_reason = Some("unconscious in ED".to_string());
    let resp = s
        .client(&glass)?
        .get(s.url(&format!("Observation/{restricted}")))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    Ok(())
}

fn diagnostics_of(outcome: &Value) -> String {
    outcome["issue"]
        .as_array()
        .map(|issues| {
            issues
                .iter()
                .filter_map(|i| i["diagnostics"].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Defect: one AuditEvent named every patient a search touched (truncated at 50), and a
/// patient reading its access log saw other patients' ids.
#[tokio::test]
async fn audit_names_every_patient_and_a_patient_sees_only_itself() -> Result<()> {
    let s = TestServer::start().await?;
    let mut ids = Vec::new();
    for i in 0..60u64 {
        let p = s
            .create(&patient("Many", &nhs_number(943478400 + i * 10), "1980"))
            .await?;
        s.create(&observation(&p, "4242", "2024-01-02")).await?;
        ids.push(p);
    }
    let resp = s
        .http
        .get(s.url("Observation?code=4242&_count=100"))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    s.store.flush_audit(Duration::from_secs(10)).await;
    let events: Value = s
        .http
        .get(s.url(&format!(
            "AuditEvent?patient={}&subtype=search-type",
            ids[0]
        )))
        .send()
        .await?
        .json()
        .await?;
    let event = &events["entry"][0]["resource"];
    let named: BTreeSet<&str> = event["entity"]
        .as_array()
        .context("entities")?
        .iter()
        .filter_map(|e| e["what"]["reference"].as_str())
        .filter(|r| r.starts_with("Patient/"))
        .collect();
    assert_eq!(
        named.len(),
        60,
        "every patient named, none truncated: {event}"
    );

    let me = s.client(&identity("patient/*.rs", Some(&ids[0])))?;
    let log: Value = me.get(s.url("AuditEvent")).send().await?.json().await?;
    let text = log.to_string();
    assert!(text.contains(&format!("Patient/{}", ids[0])), "{log}");
    for other in &ids[1..] {
        assert!(
            !text.contains(other.as_str()),
            "the patient's log names another patient"
        );
    }
    Ok(())
}

/// Defect: the client's `Host` decided absolute links (`Location: http://evil.example/...`).
#[tokio::test]
async fn links_use_the_vouched_origin_not_the_clients_host() -> Result<()> {
    let s = TestServer::start().await?;
    let mut via_gateway = clinician();
    via_gateway.origin = Some("https://fhir.example.nhs.uk".to_string());
    let client = s.client(&via_gateway)?;
    let resp = client
        .post(s.url("Patient"))
        .header("host", "evil.example")
        .body(patient("Origin", &nhs_number(943478500), "1980").to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("a Location")?
        .to_string();
    assert!(
        location.starts_with(&format!(
            "https://fhir.example.nhs.uk/{CARE_SYSTEM}/fhir/Patient/"
        )),
        "{location}"
    );
    let bundle: Value = client
        .get(s.url("Patient"))
        .header("host", "evil.example")
        .send()
        .await?
        .json()
        .await?;
    assert!(!bundle.to_string().contains("evil.example"), "{bundle}");
    Ok(())
}
