//! The store refuses identity assertions that do not belong to the request they arrive with: a
//! captured assertion replayed, or used for another method, path, query or body, is 401 and
//! changes nothing. Refusal notices from the gateway land in the audit trail, once. Export jobs
//! belong to one person of one identity provider acting for one organisation.
//!
//! A real encrypted store (local directory, local key provider) over real HTTP.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shcr_identity::{
    ASSERTION_HEADER, AssertionSigner, Identity, RefusalNotice, RefusedActor, RequestBinding,
    Scopes,
};
use shcr_store::CareSystemName;
use shcr_store::api::{FhirStore, FhirStoreConfig, router};
use shcr_store::engine::EngineConfig;
use shcr_store::engine::storage::ObjectStorage;
use shcr_store::envelope::{KeyProvider, KeyringConfig, LocalKeyProvider};
use shcr_store::tenant::{TenantConfig, TenantDatabase};

const CARE_SYSTEM: &str = "north-east";

struct Store {
    origin: String,
    store: Arc<FhirStore>,
    signer: AssertionSigner,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn clinician() -> Identity {
    Identity {
        issuer: "https://idp-a.example".to_owned(),
        subject: "555021935107".to_owned(),
        organisation: "A81001".to_owned(),
        role: "R8000".to_owned(),
        scopes: Scopes::parse("user/*.cruds").expect("scopes"),
        patient: None,
        care_system: CARE_SYSTEM.to_owned(),
        break_glass_reason: None,
        request_id: "req-1".to_owned(),
        origin: None,
    }
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": "Binding"}]})
}

impl Store {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let provider: Arc<dyn KeyProvider> =
            Arc::new(LocalKeyProvider::open(dir.path().join("keys")).await?);
        let database = TenantDatabase::open(TenantConfig {
            care_system: CareSystemName::parse(CARE_SYSTEM)?,
            storage: ObjectStorage::LocalDir(dir.path().join("objects")),
            key_provider: provider,
            keyring: KeyringConfig::default(),
            engine: EngineConfig::default(),
        })
        .await?;
        let store = Arc::new(FhirStore::new(database, FhirStoreConfig::default()));
        let signer = AssertionSigner::generate()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = router(store.clone(), signer.verifier());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            origin: format!("http://{addr}"),
            store,
            signer,
            http: reqwest::Client::new(),
            _dir: dir,
        })
    }

    /// An assertion for `identity` bound to `method target` with `body`.
    fn assertion(&self, identity: &Identity, method: &str, target: &str, body: &str) -> String {
        self.signer
            .sign(
                identity,
                &RequestBinding::new(method, target, body.as_bytes()),
                Duration::from_secs(60),
            )
            .expect("signs")
    }

    /// Sends `method target` with `body` and the given assertion; status and JSON body.
    async fn send_with(
        &self,
        method: &str,
        target: &str,
        body: &str,
        assertion: &str,
    ) -> Result<(StatusCode, Value)> {
        let mut request = self
            .http
            .request(method.parse()?, format!("{}{target}", self.origin))
            .header(ASSERTION_HEADER, assertion);
        if !body.is_empty() {
            request = request
                .header("content-type", "application/fhir+json")
                .body(body.to_owned());
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Sends `method target` with `body` as `identity`, with a fresh assertion for it.
    async fn send(
        &self,
        identity: &Identity,
        method: &str,
        target: &str,
        body: &str,
    ) -> Result<(StatusCode, Value)> {
        let assertion = self.assertion(identity, method, target, body);
        self.send_with(method, target, body, &assertion).await
    }

    async fn audit_events(&self) -> Result<Vec<Value>> {
        ensure!(
            self.store.flush_audit(Duration::from_secs(10)).await == 0,
            "audit queue did not drain"
        );
        let (status, bundle) = self
            .send(
                &clinician(),
                "GET",
                "/north-east/fhir/AuditEvent?_count=1000",
                "",
            )
            .await?;
        ensure!(status == StatusCode::OK, "audit search: {status} {bundle}");
        Ok(bundle["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e["resource"].clone())
            .collect())
    }
}

fn diagnostics(body: &Value) -> String {
    body["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn assert_unauthenticated(status: StatusCode, body: &Value, says: &str, case: &str) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {body}");
    assert_eq!(body["resourceType"], "OperationOutcome", "{case}");
    assert_eq!(body["issue"][0]["code"], "login", "{case}");
    assert!(diagnostics(body).contains(says), "{case}: {body}");
}

#[tokio::test]
async fn a_captured_assertion_serves_one_request_only() -> Result<()> {
    let s = Store::start().await?;
    let body = patient("p1").to_string();
    let put = s.assertion(&clinician(), "PUT", "/north-east/fhir/Patient/p1", &body);
    let (status, reply) = s
        .send_with("PUT", "/north-east/fhir/Patient/p1", &body, &put)
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{reply}");

    // The same assertion again: the same request replayed, or a different one.
    let (status, reply) = s
        .send_with("PUT", "/north-east/fhir/Patient/p1", &body, &put)
        .await?;
    assert_unauthenticated(status, &reply, "already used", "replayed PUT");

    let read = s.assertion(&clinician(), "GET", "/north-east/fhir/Patient/p1", "");
    let (status, _) = s
        .send_with("GET", "/north-east/fhir/Patient/p1", "", &read)
        .await?;
    assert_eq!(status, StatusCode::OK);
    for attempt in 0..3 {
        let (status, reply) = s
            .send_with("GET", "/north-east/fhir/Patient/p1", "", &read)
            .await?;
        assert_unauthenticated(status, &reply, "already used", &format!("GET #{attempt}"));
        assert_ne!(reply["resourceType"], "Patient");
    }
    Ok(())
}

#[tokio::test]
async fn an_assertion_for_another_method_path_query_or_body_is_refused() -> Result<()> {
    let s = Store::start().await?;
    let me = clinician();
    let (status, _) = s
        .send(
            &me,
            "PUT",
            "/north-east/fhir/Patient/p1",
            &patient("p1").to_string(),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED);

    // Minted for reading p1: not for deleting it, reading p2, or searching.
    let read = s.assertion(&me, "GET", "/north-east/fhir/Patient/p1", "");
    let (status, reply) = s
        .send_with("DELETE", "/north-east/fhir/Patient/p1", "", &read)
        .await?;
    assert_unauthenticated(status, &reply, "method differs", "another method");
    let (status, reply) = s
        .send_with("GET", "/north-east/fhir/Patient/p2", "", &read)
        .await?;
    assert_unauthenticated(status, &reply, "path and query differs", "another path");
    let search = s.assertion(&me, "GET", "/north-east/fhir/Patient?family=Binding", "");
    let (status, reply) = s
        .send_with("GET", "/north-east/fhir/Patient?family=Other", "", &search)
        .await?;
    assert_unauthenticated(status, &reply, "path and query differs", "another query");

    // Minted for one body: not for another.
    let honest = patient("p1").to_string();
    let forged =
        json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Forged"}]}).to_string();
    let update = s.assertion(&me, "PUT", "/north-east/fhir/Patient/p1", &honest);
    let (status, reply) = s
        .send_with("PUT", "/north-east/fhir/Patient/p1", &forged, &update)
        .await?;
    assert_unauthenticated(status, &reply, "body differs", "another body");

    // Nothing changed: p1 is still at version 1 with its own name, and a mismatch did not use
    // the assertions up.
    let (status, reply) = s
        .send_with("GET", "/north-east/fhir/Patient/p1", "", &read)
        .await?;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["meta"]["versionId"], "1");
    assert_eq!(reply["name"][0]["family"], "Binding");
    Ok(())
}

#[tokio::test]
async fn gateway_refusal_notices_are_audited_once() -> Result<()> {
    let s = Store::start().await?;
    let endpoint = "/north-east/internal/gateway-refusals";
    let notice = RefusalNotice {
        care_system: CARE_SYSTEM.to_owned(),
        status: 403,
        reason: "forbidden".to_owned(),
        method: "GET".to_owned(),
        resource_type: Some("Patient".to_owned()),
        actor: Some(RefusedActor {
            issuer: "https://idp-b.example".to_owned(),
            subject: "intruder-1".to_owned(),
            organisation: "Y99999".to_owned(),
            role: "R8000".to_owned(),
        }),
        request_id: "refused-1".to_owned(),
    };
    let token = s
        .signer
        .sign_refusal(&notice, Duration::from_secs(60))
        .context("sign")?;
    let (status, reply) = s.send_with("POST", endpoint, "", &token).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    let (status, reply) = s.send_with("POST", endpoint, "", &token).await?;
    assert_unauthenticated(status, &reply, "already used", "a replayed notice");

    // A notice is no identity, and an identity is no notice.
    let token = s
        .signer
        .sign_refusal(&notice, Duration::from_secs(60))
        .context("sign")?;
    let (status, reply) = s
        .send_with("GET", "/north-east/fhir/Patient", "", &token)
        .await?;
    assert_unauthenticated(status, &reply, "typ", "a notice as an identity");
    let assertion = s.assertion(&clinician(), "POST", endpoint, "");
    let (status, reply) = s.send_with("POST", endpoint, "", &assertion).await?;
    assert_unauthenticated(status, &reply, "typ", "an identity as a notice");
    // A notice signed by anyone else is refused.
    let stranger = AssertionSigner::generate()?
        .sign_refusal(&notice, Duration::from_secs(60))
        .context("sign")?;
    let (status, _) = s.send_with("POST", endpoint, "", &stranger).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let refusals: Vec<Value> = s
        .audit_events()
        .await?
        .into_iter()
        .filter(|e| e["source"]["observer"]["display"] == "ShCR gateway")
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    let event = &refusals[0];
    assert_eq!(event["outcome"], "4");
    assert!(
        event["outcomeDesc"]
            .as_str()
            .unwrap_or_default()
            .contains("403")
    );
    assert_eq!(
        event["agent"][0]["who"]["identifier"]["value"],
        "intruder-1"
    );
    assert_eq!(
        event["agent"][0]["extension"][0]["valueUri"],
        "https://idp-b.example"
    );
    assert_eq!(event["agent"][1]["who"]["identifier"]["value"], "Y99999");
    assert_eq!(event["entity"][0]["type"]["code"], "Patient");
    assert_eq!(event["extension"][0]["valueString"], "refused-1");
    Ok(())
}

#[tokio::test]
async fn an_export_belongs_to_its_issuer_subject_and_organisation() -> Result<()> {
    let s = Store::start().await?;
    let me = clinician();
    let (status, _) = s
        .send(
            &me,
            "PUT",
            "/north-east/fhir/Patient/p1",
            &patient("p1").to_string(),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED);
    let assertion = s.assertion(&me, "GET", "/north-east/fhir/$export", "");
    let response = s
        .http
        .get(format!("{}/north-east/fhir/$export", s.origin))
        .header(ASSERTION_HEADER, assertion)
        .header("prefer", "respond-async")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .context("Content-Location")?
        .to_owned();
    let status_path = location
        .find("/north-east/")
        .map(|at| location[at..].to_owned())
        .context("status path")?;

    let mut same_subject_other_issuer = me.clone();
    same_subject_other_issuer.issuer = "https://idp-b.example".to_owned();
    let mut same_subject_other_organisation = me.clone();
    same_subject_other_organisation.organisation = "B86001".to_owned();
    for (who, case) in [
        (&same_subject_other_issuer, "another issuer"),
        (&same_subject_other_organisation, "another organisation"),
    ] {
        let (status, reply) = s.send(who, "GET", &status_path, "").await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{case}: {reply}");
        let (status, reply) = s.send(who, "DELETE", &status_path, "").await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{case} cancels: {reply}");
    }
    let (status, reply) = s.send(&me, "GET", &status_path, "").await?;
    assert!(
        status == StatusCode::OK || status == StatusCode::ACCEPTED,
        "the owner polls: {status} {reply}"
    );
    Ok(())
}
