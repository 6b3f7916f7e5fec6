//! Test harness: real record stores (encrypted, on a temp dir) behind a real gateway, both over
//! real HTTP on loopback, with tokens from the dev issuer. Also an "inspecting" upstream that
//! verifies the gateway's assertion as a store does — signature, care system, bound to the
//! method, path and query and body it arrived with, used once — and echoes what it received;
//! used where the test must see the hop itself (headers, assertion contents) or inject faults
//! (slowness).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request};
use serde_json::{Value, json};
use shcr_gateway::access::AccessControl;
use shcr_gateway::auth::{DevIssuer, IssuerConfig, TokenRequest};
use shcr_gateway::config::SmartConfig;
use shcr_gateway::limits::LimitsConfig;
use shcr_gateway::metrics::GatewayMetrics;
use shcr_gateway::proxy::{Proxy, ProxySettings};
use shcr_gateway::routing::{RouteSpec, TenantRouter};
use shcr_gateway::server;
use shcr_identity::{ASSERTION_HEADER, AssertionSigner, AssertionVerifier};
use shcr_runtime::metrics::{MetricsRegistry, Readiness};
use shcr_store::CareSystemName;
use shcr_store::api::{FhirStore, FhirStoreConfig};
use shcr_store::engine::EngineConfig;
use shcr_store::engine::storage::ObjectStorage;
use shcr_store::envelope::{KeyProvider, KeyringConfig, LocalKeyProvider};
use shcr_store::tenant::{TenantConfig, TenantDatabase};

/// Serves `app` on a fresh loopback port for the rest of the test.
pub async fn serve(app: Router) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// Opens an encrypted store for `name` under `dir`.
pub async fn open_store(dir: &Path, name: &str) -> Result<Arc<FhirStore>> {
    let care_system = CareSystemName::parse(name)?;
    let root = dir.join(name);
    let provider: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::open(root.join("keys")).await?);
    let database = TenantDatabase::open(TenantConfig {
        care_system,
        storage: ObjectStorage::LocalDir(root.join("objects")),
        key_provider: provider,
        keyring: KeyringConfig::default(),
        engine: EngineConfig::default(),
    })
    .await?;
    Ok(Arc::new(FhirStore::new(
        database,
        FhirStoreConfig::default(),
    )))
}

/// A running gateway.
pub struct Gateway {
    pub base: String,
    pub router: TenantRouter,
    pub registry: MetricsRegistry,
}

impl Gateway {
    /// Starts a gateway trusting `issuers`, signing with `signer`, routing `routes`.
    pub async fn start(
        routes: Vec<RouteSpec>,
        issuers: Vec<IssuerConfig>,
        signer: AssertionSigner,
        settings: ProxySettings,
    ) -> Result<Self> {
        let router = TenantRouter::new(settings.limits.clone());
        router.set_static(routes);
        Self::start_with_router(router, issuers, signer, settings).await
    }

    /// Starts a gateway following `router` (filled by the caller, e.g. from kube).
    pub async fn start_with_router(
        router: TenantRouter,
        issuers: Vec<IssuerConfig>,
        signer: AssertionSigner,
        settings: ProxySettings,
    ) -> Result<Self> {
        let registry = MetricsRegistry::new();
        let metrics = GatewayMetrics::register(&registry);
        let access = AccessControl::new(&issuers, SmartConfig::default())?;
        access.authenticator().register_metrics(&registry);
        let proxy = Arc::new(Proxy::new(
            router.clone(),
            access,
            signer,
            metrics,
            settings,
        ));
        let ready_router = router.clone();
        let app = server::app(
            proxy,
            shcr_runtime::metrics::router(
                registry.clone(),
                Readiness::from_fn(move || ready_router.is_synced()),
            ),
        );
        let addr = serve(app).await?;
        Ok(Self {
            base: format!("http://{addr}"),
            router,
            registry,
        })
    }
}

/// A route to `endpoint`, ready, with `members`.
pub fn route(name: &str, endpoint: SocketAddr, members: &[&str]) -> RouteSpec {
    RouteSpec {
        care_system: name.to_owned(),
        display_name: format!("{name} (test)"),
        endpoint: Some(format!("http://{endpoint}")),
        members: members
            .iter()
            .map(|m| (*m).to_owned())
            .collect::<BTreeSet<_>>(),
        ready: true,
    }
}

/// Real stores behind a real gateway.
pub struct Platform {
    pub dir: tempfile::TempDir,
    pub issuer: DevIssuer,
    pub gateway: Gateway,
    pub stores: Vec<(String, Arc<FhirStore>)>,
    pub http: reqwest::Client,
}

impl Platform {
    /// One store per `(name, members)`, with `settings`.
    pub async fn start(care_systems: &[(&str, &[&str])], settings: ProxySettings) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let issuer = DevIssuer::load_or_create(dir.path())?;
        let signer = AssertionSigner::generate()?;
        let mut routes = Vec::new();
        let mut stores = Vec::new();
        for (name, members) in care_systems {
            let store = open_store(dir.path(), name).await?;
            let addr = serve(shcr_store::api::router(store.clone(), signer.verifier())).await?;
            routes.push(route(name, addr, members));
            stores.push(((*name).to_owned(), store));
        }
        let gateway =
            Gateway::start(routes, vec![issuer.issuer_config()], signer, settings).await?;
        Ok(Self {
            dir,
            issuer,
            gateway,
            stores,
            http: reqwest::Client::new(),
        })
    }

    /// A dev token for `care_system`, acting for `org`, with `scope`.
    pub fn token(&self, care_system: &str, org: &str, scope: &str) -> Result<String> {
        let mut request = TokenRequest::new(care_system, org, "R8000");
        request.scope = scope.to_owned();
        Ok(self.issuer.issue(&request)?)
    }

    /// A patient-facing token confined to `patient`.
    pub fn patient_token(&self, care_system: &str, org: &str, patient: &str) -> Result<String> {
        let mut request = TokenRequest::new(care_system, org, "R8000");
        request.scope = "patient/*.rs".to_owned();
        request.patient = Some(patient.to_owned());
        Ok(self.issuer.issue(&request)?)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.base)
    }

    /// `GET path` with `token`; returns status and JSON body (Null when not JSON).
    pub async fn get(&self, path: &str, token: &str) -> Result<(u16, Value)> {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// `PUT path` of `body` with `token`.
    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Result<(u16, Value)> {
        let response = self
            .http
            .put(self.url(path))
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// `POST path` of `body` with `token`.
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Result<(u16, Value)> {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }
}

pub fn patient(id: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]})
}

pub fn observation(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueQuantity": {"value": 70, "unit": "/min"}
    })
}

/// The diagnostics of an OperationOutcome body.
pub fn diagnostics(body: &Value) -> String {
    body["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// An upstream standing in for a store where the test must see the hop: it verifies the
/// assertion for the care system in the path and for the request it came with, once (401 for
/// an invalid, mismatched or replayed one, with the reason as the body), and answers with the
/// headers, identity and body size it received. `x-test-sleep-ms` makes it slow (fault
/// injection).
pub async fn inspecting_upstream(verifier: AssertionVerifier) -> Result<SocketAddr> {
    let app = Router::new().fallback(move |request: Request<Body>| {
        let verifier = verifier.clone();
        async move { inspect(verifier, request).await }
    });
    serve(app).await
}

async fn inspect(verifier: AssertionVerifier, request: Request<Body>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let headers = request.headers().clone();
    if let Some(ms) = headers
        .get("x-test-sleep-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let care_system = request
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let method = request.method().as_str().to_owned();
    let target = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_default();
    let body = axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let identity = match headers.get(ASSERTION_HEADER).and_then(|v| v.to_str().ok()) {
        Some(token) => match verifier
            .verify(token, &care_system, &method, &target)
            .and_then(|verified| verified.accept(&body))
        {
            Ok(identity) => json!({
                "issuer": identity.issuer,
                "subject": identity.subject,
                "organisation": identity.organisation,
                "role": identity.role,
                "scopes": identity.scopes.to_string(),
                "patient": identity.patient,
                "care_system": identity.care_system,
                "break_glass_reason": identity.break_glass_reason,
                "request_id": identity.request_id,
                "origin": identity.origin,
            }),
            Err(e) => {
                return (axum::http::StatusCode::UNAUTHORIZED, e.to_string()).into_response();
            }
        },
        None => Value::Null,
    };
    let mut response = axum::Json(json!({
        "headers": headers_json(&headers),
        "identity": identity,
        "body_bytes": body.len(),
    }))
    .into_response();
    // Hop-by-hop headers the gateway must not pass back.
    response.headers_mut().insert(
        "keep-alive",
        axum::http::HeaderValue::from_static("timeout=5"),
    );
    response
        .headers_mut()
        .insert("x-store-private", axum::http::HeaderValue::from_static("1"));
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("x-store-private"),
    );
    response
}

fn headers_json(headers: &HeaderMap) -> Value {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        map.insert(
            name.as_str().to_owned(),
            Value::String(value.to_str().unwrap_or("<binary>").to_owned()),
        );
    }
    Value::Object(map)
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Default proxy settings for tests.
pub fn settings() -> ProxySettings {
    ProxySettings::default()
}

/// Settings with `limits`.
pub fn with_limits(limits: LimitsConfig) -> ProxySettings {
    ProxySettings {
        limits,
        ..ProxySettings::default()
    }
}

pub fn context<T>(value: Option<T>, what: &str) -> Result<T> {
    value.context(what.to_owned())
}
