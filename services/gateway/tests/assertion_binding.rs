//! The hop from gateway to store, as an attacker sees it: an assertion captured on the wire
//! serves nothing (a replay is 401, whatever request it is used for); each assertion is bound
//! to its request and has the gateway's own `jti`; it carries the token's issuer and the
//! gateway's configured public origin. Requests the gateway refuses (401/403) for a known care
//! system are in that care system's audit trail. Real stores behind the real gateway.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::response::IntoResponse;
use serde_json::Value;
use shcr_gateway::auth::{DEV_ISSUER, DevIssuer, TokenRequest};
use shcr_gateway::proxy::ProxySettings;
use shcr_identity::{ASSERTION_HEADER, AssertionSigner};
use support::*;

const NE: &str = "north-east";
const NE_MEMBERS: &[&str] = &["RTD", "A84001"];

/// A wiretap between the gateway and `store`: forwards every request and keeps the assertion
/// it carried, as an attacker on the cluster network could.
async fn wiretap(
    store: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, Arc<Mutex<Vec<String>>>)> {
    let captured = Arc::new(Mutex::new(Vec::new()));
    let seen = captured.clone();
    let http = reqwest::Client::new();
    let app = Router::new().fallback(move |request: Request<Body>| {
        let seen = seen.clone();
        let http = http.clone();
        async move {
            let (parts, body) = request.into_parts();
            if let Some(token) = parts
                .headers
                .get(ASSERTION_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                seen.lock().expect("lock").push(token.to_owned());
            }
            let body = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let mut forwarded =
                http.request(parts.method.clone(), format!("http://{store}{target}"));
            for (name, value) in &parts.headers {
                if name != "host" {
                    forwarded = forwarded.header(name, value);
                }
            }
            match forwarded.body(body).send().await {
                Ok(response) => {
                    let status = response.status();
                    let bytes = response.bytes().await.unwrap_or_default();
                    (status, bytes).into_response()
                }
                Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
            }
        }
    });
    Ok((serve(app).await?, captured))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_assertion_cannot_be_replayed_at_the_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let issuer = DevIssuer::load_or_create(dir.path())?;
    let signer = AssertionSigner::generate()?;
    let store = open_store(dir.path(), NE).await?;
    let store_addr = serve(shcr_store::api::router(store.clone(), signer.verifier())).await?;
    let (tap, captured) = wiretap(store_addr).await?;
    let gateway = Gateway::start(
        vec![route(NE, tap, NE_MEMBERS)],
        vec![issuer.issuer_config()],
        signer,
        settings(),
    )
    .await?;
    let token = issuer.issue(&TokenRequest::new(NE, "RTD", "R8000"))?;
    let http = reqwest::Client::new();

    let body = patient("p1", "Replay").to_string();
    let response = http
        .put(format!("{}/north-east/fhir/Patient/p1", gateway.base))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(response.status(), 201);
    let response = http
        .get(format!("{}/north-east/fhir/Patient/p1", gateway.base))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let (put_assertion, get_assertion) = {
        let captured = captured.lock().expect("lock");
        (captured[0].clone(), captured[1].clone())
    };

    // The attacker replays what it captured straight at the store: three GETs and a POST.
    let store_url = |path: &str| format!("http://{store_addr}/north-east/fhir/{path}");
    for attempt in 0..3 {
        let response = http
            .get(store_url("Patient/p1"))
            .header(ASSERTION_HEADER, &get_assertion)
            .send()
            .await?;
        assert_eq!(response.status(), 401, "replayed GET #{attempt}");
        let outcome: Value = response.json().await?;
        assert!(diagnostics(&outcome).contains("already used"), "{outcome}");
    }
    let response = http
        .post(store_url("Patient"))
        .header(ASSERTION_HEADER, &get_assertion)
        .header("content-type", "application/fhir+json")
        .body(patient("p2", "Injected").to_string())
        .send()
        .await?;
    assert_eq!(response.status(), 401, "a GET's assertion used for a POST");
    let response = http
        .put(store_url("Patient/p1"))
        .header(ASSERTION_HEADER, &put_assertion)
        .header("content-type", "application/fhir+json")
        .body(body)
        .send()
        .await?;
    assert_eq!(response.status(), 401, "the PUT replayed as is");

    // Nothing the attacker sent was stored.
    let response = http
        .get(format!("{}/north-east/fhir/Patient", gateway.base))
        .bearer_auth(&token)
        .send()
        .await?;
    let bundle: Value = response.json().await?;
    assert_eq!(bundle["total"], 1, "{bundle}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_assertion_is_bound_and_carries_issuer_and_public_origin() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let issuer = DevIssuer::load_or_create(dir.path())?;
    let signer = AssertionSigner::generate()?;
    let upstream = inspecting_upstream(signer.verifier()).await?;
    let gateway = Gateway::start(
        vec![route(NE, upstream, NE_MEMBERS)],
        vec![issuer.issuer_config()],
        signer,
        ProxySettings {
            public_origin: Some("https://fhir.example.nhs.uk".to_owned()),
            ..ProxySettings::default()
        },
    )
    .await?;
    let token = issuer.issue(&TokenRequest::new(NE, "RTD", "R8000"))?;
    let http = reqwest::Client::new();
    // The same client request id twice, a body, a query, and a Host an attacker chose: the
    // inspecting upstream verifies each assertion against what it received, once.
    for _ in 0..2 {
        let response = http
            .post(format!(
                "{}/north-east/fhir/Patient?_format=json",
                gateway.base
            ))
            .bearer_auth(&token)
            .header("x-request-id", "same-id")
            .header("host", "evil.example")
            .header("content-type", "application/fhir+json")
            .body(patient("p1", "Bound").to_string())
            .send()
            .await?;
        assert_eq!(response.status(), 200);
        let seen: Value = response.json().await?;
        let identity = &seen["identity"];
        assert!(!identity.is_null(), "the assertion did not verify: {seen}");
        assert_eq!(identity["request_id"], "same-id");
        assert_eq!(identity["issuer"], DEV_ISSUER);
        assert_eq!(identity["origin"], "https://fhir.example.nhs.uk");
        assert!(seen["body_bytes"].as_u64().is_some_and(|n| n > 0));
    }
    Ok(())
}

/// The AuditEvents the gateway's refusals left in `store`'s trail.
async fn gateway_refusals(platform: &Platform, token: &str) -> Result<Vec<Value>> {
    let store = &context(platform.stores.first(), "a store")?.1;
    store.flush_audit(Duration::from_secs(10)).await;
    let (status, bundle) = platform
        .get("/north-east/fhir/AuditEvent?_count=1000", token)
        .await?;
    anyhow::ensure!(status == 200, "audit search: {status} {bundle}");
    Ok(bundle["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e["resource"].clone())
        .filter(|e| e["source"]["observer"]["display"] == "ShCR gateway")
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_refusals_are_in_the_care_systems_audit_trail() -> Result<()> {
    let platform = Platform::start(&[(NE, NE_MEMBERS)], settings()).await?;
    let auditor = platform.token(NE, "RTD", "user/*.rs")?;
    let outsider = {
        let mut request = TokenRequest::new(NE, "Y99999", "R8000");
        request.user = Some("outsider-1".to_owned());
        platform.issuer.issue(&request)?
    };
    // 403: a valid token acting for an organisation that is not a member.
    let (status, _) = platform
        .get("/north-east/fhir/Patient?family=SECRETNAME", &outsider)
        .await?;
    assert_eq!(status, 403);
    // 401: no token at all.
    let response = platform
        .http
        .get(platform.url("/north-east/fhir/Observation/obs-SECRETID"))
        .send()
        .await?;
    assert_eq!(response.status(), 401);

    // The notices travel asynchronously.
    let mut events = Vec::new();
    for _ in 0..100 {
        events = gateway_refusals(&platform, &auditor).await?;
        if events.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(events.len(), 2, "{events:?}");
    let forbidden = events
        .iter()
        .find(|e| e["outcomeDesc"].as_str().is_some_and(|d| d.contains("403")))
        .context("the 403 is audited")?;
    assert_eq!(forbidden["outcome"], "4");
    assert_eq!(
        forbidden["agent"][0]["who"]["identifier"]["value"],
        "outsider-1"
    );
    assert_eq!(
        forbidden["agent"][0]["extension"][0]["valueUri"],
        DEV_ISSUER
    );
    assert_eq!(
        forbidden["agent"][1]["who"]["identifier"]["value"],
        "Y99999"
    );
    assert_eq!(forbidden["entity"][0]["type"]["code"], "Patient");
    assert_eq!(forbidden["subtype"][0]["code"], "read");
    let unauthenticated = events
        .iter()
        .find(|e| e["outcomeDesc"].as_str().is_some_and(|d| d.contains("401")))
        .context("the 401 is audited")?;
    assert_eq!(unauthenticated["outcome"], "4");
    assert_eq!(
        unauthenticated["agent"][0]["who"]["display"],
        "unauthenticated"
    );
    assert_eq!(unauthenticated["entity"][0]["type"]["code"], "Observation");
    // What was attempted, never what it named.
    for event in &events {
        assert!(!event.to_string().contains("SECRET"), "{event}");
    }

    let metrics = platform
        .http
        .get(platform.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains(
            "shcr_gateway_refusal_notices_total{care_system=\"north-east\",outcome=\"recorded\"} 2"
        ),
        "{metrics}"
    );
    Ok(())
}
