//! The FHIR API over real HTTP: a store on a local-directory bucket with the local key provider,
//! served by axum on a loopback port, driven with reqwest. Every interaction, each error case,
//! and that a failed request stores nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use async_trait::async_trait;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shcr_store::CareSystemName;
use shcr_store::api::{FhirStore, FhirStoreConfig, router};
use shcr_store::engine::EngineConfig;
use shcr_store::engine::storage::ObjectStorage;
use shcr_store::envelope::{
    DataKey, EncryptionContext, KeyProvider, KeyProviderError, KeyringConfig, LocalKeyProvider,
    SecretKey, WrappedKey,
};
use shcr_store::tenant::{TenantConfig, TenantDatabase};

const CARE_SYSTEM: &str = "north-east";
const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";

/// Fault injection: the local key provider, with a switch that makes it refuse like a disabled
/// KMS key.
#[derive(Debug)]
struct SwitchableKeys {
    inner: LocalKeyProvider,
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

struct TestServer {
    base: String,
    http: reqwest::Client,
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
    Ok(TenantDatabase::open(TenantConfig {
        care_system: CareSystemName::parse(CARE_SYSTEM)?,
        storage: ObjectStorage::LocalDir(dir.join("objects")),
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
            inner: LocalKeyProvider::open(dir.path().join("keys")).await?,
            available: AtomicBool::new(true),
        });
        let db = open_tenant(dir.path(), keys.clone()).await?;
        let store = Arc::new(FhirStore::new(db, config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let app = router(store);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            base: format!("http://{addr}/{CARE_SYSTEM}/fhir"),
            http: reqwest::Client::new(),
            keys,
            dir,
            server,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response> {
        Ok(self
            .http
            .post(self.url(path))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await?)
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
        Ok(req.send().await?)
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response> {
        Ok(self.http.get(self.url(path)).send().await?)
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
    let s = TestServer::start().await?;
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
    let (status, body) = s
        .get_json("Patient?_include=Patient:general-practitioner")
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&body, "not-supported");

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
        Some(2)
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
