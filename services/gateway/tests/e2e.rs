//! The gateway end to end over HTTP: real encrypted stores behind the real gateway, tokens from
//! the dev issuer. Nothing crosses between care systems; scopes and patient compartments hold;
//! the hop carries what it should (assertion, request id, trace context) and nothing it should
//! not (client credentials, hop-by-hop headers); limits answer 404/503/413/429/504.

mod support;

use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};
use shcr_gateway::limits::LimitsConfig;
use shcr_gateway::proxy::ProxySettings;
use shcr_identity::AssertionSigner;
use support::*;

const NE: &str = "north-east";
const WY: &str = "west-yorkshire";
const CU: &str = "cumbria";
const NE_MEMBERS: &[&str] = &["RTD", "A84001"];
const WY_MEMBERS: &[&str] = &["RR8", "B86001"];
const CU_MEMBERS: &[&str] = &["RNN"];

async fn three_care_systems(settings: ProxySettings) -> Result<Platform> {
    Platform::start(
        &[(NE, NE_MEMBERS), (WY, WY_MEMBERS), (CU, CU_MEMBERS)],
        settings,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_crosses_between_care_systems() -> Result<()> {
    let platform = three_care_systems(settings()).await?;
    let systems = [(NE, NE_MEMBERS), (WY, WY_MEMBERS), (CU, CU_MEMBERS)];
    // The same patient id in every care system, each with its own content.
    for (cs, members) in systems {
        let token = platform.token(cs, members[0], "user/*.cruds")?;
        let (status, body) = platform
            .put(
                &format!("/{cs}/fhir/Patient/shared-id"),
                &token,
                &patient("shared-id", cs),
            )
            .await?;
        assert_eq!(status, 201, "{cs}: {body}");
        let (status, body) = platform
            .put(
                &format!("/{cs}/fhir/Patient/only-in-{cs}"),
                &token,
                &patient(&format!("only-in-{cs}"), cs),
            )
            .await?;
        assert_eq!(status, 201, "{cs}: {body}");
    }

    for (target, target_members) in systems {
        for (minted_for, minted_members) in systems {
            for org in minted_members.iter().chain(["Y99999"].iter()) {
                let token = platform.token(minted_for, org, "user/*.cruds")?;
                let (status, body) = platform
                    .get(&format!("/{target}/fhir/Patient/shared-id"), &token)
                    .await?;
                let case = format!("token for {minted_for} as {org} at {target}");
                if minted_for != target {
                    // Minted for another care system: its audience is wrong here.
                    assert_eq!(status, 401, "{case}: {body}");
                    assert!(diagnostics(&body).contains("aud"), "{case}: {body}");
                } else if !target_members.contains(org) {
                    assert_eq!(status, 403, "{case}: {body}");
                    assert!(
                        diagnostics(&body).contains("not a member"),
                        "{case}: {body}"
                    );
                } else {
                    assert_eq!(status, 200, "{case}: {body}");
                    assert_eq!(
                        body["name"][0]["family"], target,
                        "{case}: read another's record"
                    );
                }
                // Whatever the token, a record of another care system is never reachable.
                for other in systems.iter().map(|s| s.0).filter(|o| *o != target) {
                    let (status, body) = platform
                        .get(&format!("/{target}/fhir/Patient/only-in-{other}"), &token)
                        .await?;
                    assert!(
                        [401, 403, 404].contains(&status),
                        "{case} reached {other}'s record: {status} {body}"
                    );
                    assert_ne!(body["resourceType"], "Patient", "{case}");
                }
                // A search returns only the target's own records.
                let (status, body) = platform
                    .get(&format!("/{target}/fhir/Patient"), &token)
                    .await?;
                if status == 200 {
                    for entry in body["entry"].as_array().into_iter().flatten() {
                        assert_eq!(entry["resource"]["name"][0]["family"], target, "{case}");
                    }
                }
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_decide_what_a_token_may_do() -> Result<()> {
    let platform = Platform::start(&[(NE, NE_MEMBERS)], settings()).await?;
    let admin = platform.token(NE, "RTD", "user/*.cruds")?;
    assert_eq!(
        platform
            .put("/north-east/fhir/Patient/p1", &admin, &patient("p1", "A"))
            .await?
            .0,
        201
    );
    assert_eq!(
        platform
            .put(
                "/north-east/fhir/Observation/o1",
                &admin,
                &observation("o1", "p1")
            )
            .await?
            .0,
        201
    );
    // (scope, method, path, expected status)
    let cases: &[(&str, &str, &str, u16)] = &[
        ("user/*.rs", "GET", "/north-east/fhir/Patient/p1", 200),
        (
            "user/*.rs",
            "GET",
            "/north-east/fhir/Observation?subject=Patient/p1",
            200,
        ),
        ("user/*.rs", "POST", "/north-east/fhir/Observation", 403),
        ("user/*.rs", "PUT", "/north-east/fhir/Observation/o1", 403),
        (
            "user/*.rs",
            "DELETE",
            "/north-east/fhir/Observation/o1",
            403,
        ),
        (
            "user/Observation.rs",
            "GET",
            "/north-east/fhir/Observation/o1",
            200,
        ),
        (
            "user/Observation.rs",
            "GET",
            "/north-east/fhir/Patient/p1",
            403,
        ),
        (
            "user/Observation.r",
            "GET",
            "/north-east/fhir/Observation?code=8867-4",
            403,
        ),
        (
            "user/Observation.s",
            "GET",
            "/north-east/fhir/Observation/o1",
            403,
        ),
        (
            "user/Observation.cruds",
            "POST",
            "/north-east/fhir/Observation",
            201,
        ),
        (
            "user/Observation.cruds",
            "POST",
            "/north-east/fhir/Condition",
            403,
        ),
        (
            "user/*.cruds",
            "PUT",
            "/north-east/fhir/Observation/o1",
            200,
        ),
        (
            "openid fhirUser user/Condition.rs",
            "GET",
            "/north-east/fhir/Patient/p1",
            403,
        ),
    ];
    for (scope, method, path, expected) in cases {
        let token = platform.token(NE, "RTD", scope)?;
        let body = if path.contains("Condition") {
            json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"}, "code": {"text": "x"}})
        } else {
            observation("o1", "p1")
        };
        let request = platform
            .http
            .request(method.parse()?, platform.url(path))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json");
        let request = if *method == "GET" || *method == "DELETE" {
            request
        } else {
            request.body(body.to_string())
        };
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        assert_eq!(status, *expected, "{scope} {method} {path}: {text}");
        if status == 403 {
            assert!(text.contains("OperationOutcome"), "{text}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_token_stays_in_its_compartment() -> Result<()> {
    let platform = Platform::start(&[(NE, NE_MEMBERS)], settings()).await?;
    let admin = platform.token(NE, "RTD", "user/*.cruds")?;
    for p in ["p1", "p2"] {
        assert_eq!(
            platform
                .put(
                    &format!("/north-east/fhir/Patient/{p}"),
                    &admin,
                    &patient(p, p)
                )
                .await?
                .0,
            201
        );
        let o = format!("obs-{p}");
        assert_eq!(
            platform
                .put(
                    &format!("/north-east/fhir/Observation/{o}"),
                    &admin,
                    &observation(&o, p)
                )
                .await?
                .0,
            201
        );
    }
    let token = platform.patient_token(NE, "RTD", "p1")?;
    let (status, body) = platform.get("/north-east/fhir/Patient/p1", &token).await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = platform.get("/north-east/fhir/Patient/p2", &token).await?;
    assert_eq!(status, 403, "another patient: {body}");
    let (status, body) = platform
        .get("/north-east/fhir/Observation/obs-p2", &token)
        .await?;
    assert_eq!(status, 403, "another patient's observation: {body}");
    let (status, body) = platform
        .get("/north-east/fhir/Observation/obs-p1", &token)
        .await?;
    assert_eq!(status, 200, "{body}");
    let (status, body) = platform.get("/north-east/fhir/Observation", &token).await?;
    assert_eq!(status, 200, "{body}");
    let subjects: Vec<&Value> = body["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["resource"]["subject"]["reference"])
        .collect();
    assert_eq!(subjects, vec!["Patient/p1"], "{body}");
    let (status, _) = platform.get("/north-east/fhir/_history", &token).await?;
    assert_eq!(status, 403, "history across patients");
    let (status, _) = platform
        .post(
            "/north-east/fhir/Observation",
            &token,
            &observation("x", "p1"),
        )
        .await?;
    assert_eq!(status, 403, "patient/*.rs cannot write");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hop_carries_the_assertion_request_id_and_trace_but_no_credentials() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let issuer = shcr_gateway::auth::DevIssuer::load_or_create(dir.path())?;
    let signer = AssertionSigner::generate()?;
    let upstream = inspecting_upstream(signer.verifier()).await?;
    let gateway = Gateway::start(
        vec![route(NE, upstream, NE_MEMBERS)],
        vec![issuer.issuer_config()],
        signer,
        settings(),
    )
    .await?;
    let mut request = shcr_gateway::auth::TokenRequest::new(NE, "RTD", "R8000");
    request.user = Some("clinician-7".to_owned());
    let token = issuer.issue(&request)?;
    let http = reqwest::Client::new();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = http
        .get(format!("{}/north-east/fhir/Patient/p1?x=1", gateway.base))
        .bearer_auth(&token)
        .header("x-request-id", "req-abc-123")
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=1")
        .header("x-break-glass-reason", "  unconscious in ED  ")
        .header("x-shcr-identity", "forged-by-the-client")
        .header("connection", "x-client-private")
        .header("x-client-private", "1")
        .header("proxy-authorization", "Basic eDp5")
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    assert!(
        !response.headers().contains_key("keep-alive"),
        "{:?}",
        response.headers()
    );
    assert!(
        !response.headers().contains_key("x-store-private"),
        "{:?}",
        response.headers()
    );
    let seen: Value = response.json().await?;
    let headers = &seen["headers"];
    assert_eq!(headers["x-request-id"], "req-abc-123");
    assert_eq!(
        headers["traceparent"], traceparent,
        "trace context forwarded"
    );
    assert_eq!(headers["tracestate"], "vendor=1");
    for gone in [
        "authorization",
        "x-client-private",
        "proxy-authorization",
        "te",
    ] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} reached the store: {headers}"
        );
    }
    assert_ne!(headers["x-shcr-identity"], "forged-by-the-client");
    assert!(
        headers["x-forwarded-host"]
            .as_str()
            .is_some_and(|h| h.starts_with("127.0.0.1:"))
    );
    let identity = &seen["identity"];
    assert_eq!(identity["subject"], "clinician-7");
    assert_eq!(identity["organisation"], "RTD");
    assert_eq!(identity["role"], "R8000");
    assert_eq!(identity["care_system"], NE);
    assert_eq!(identity["scopes"], "user/*.cruds");
    assert_eq!(identity["break_glass_reason"], "unconscious in ED");
    assert_eq!(identity["request_id"], "req-abc-123");

    // Without a client id the gateway makes one, and the store and client see the same.
    let response = http
        .get(format!("{}/north-east/fhir/Patient/p1", gateway.base))
        .bearer_auth(&token)
        .send()
        .await?;
    let id = response.headers()["x-request-id"].to_str()?.to_owned();
    let seen: Value = response.json().await?;
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(seen["identity"]["request_id"], id.as_str());
    assert!(seen["identity"]["break_glass_reason"].is_null());

    // The CapabilityStatement is public: forwarded without any assertion.
    let seen: Value = http
        .get(format!("{}/north-east/fhir/metadata", gateway.base))
        .send()
        .await?
        .json()
        .await?;
    assert!(seen["identity"].is_null(), "{seen}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_unready_care_systems_and_discovery() -> Result<()> {
    let platform = Platform::start(&[(NE, NE_MEMBERS)], settings()).await?;
    let token = platform.token(NE, "RTD", "user/*.rs")?;
    let (status, body) = platform.get("/nowhere/fhir/Patient/1", &token).await?;
    assert_eq!(status, 404);
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert!(diagnostics(&body).contains("no such care system"), "{body}");
    let (status, _) = platform.get("/not-fhir", &token).await?;
    assert_eq!(status, 404);

    let mut pending = route(WY, "127.0.0.1:9".parse()?, WY_MEMBERS);
    pending.ready = false;
    platform.gateway.router.upsert(pending);
    let response = platform
        .http
        .get(platform.url("/west-yorkshire/fhir/Patient/1"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let body: Value = response.json().await?;
    assert_eq!(body["resourceType"], "OperationOutcome");

    // A ready care system whose store is down: 502, not a hang.
    platform
        .gateway
        .router
        .upsert(route(WY, "127.0.0.1:9".parse()?, WY_MEMBERS));
    let token_wy = platform.token(WY, "RR8", "user/*.rs")?;
    let (status, body) = platform
        .get("/west-yorkshire/fhir/Patient/1", &token_wy)
        .await?;
    assert_eq!(status, 502, "{body}");

    let response = platform
        .http
        .get(platform.url("/north-east/fhir/.well-known/smart-configuration"))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let smart: Value = response.json().await?;
    assert_eq!(smart["issuer"], shcr_gateway::auth::DEV_ISSUER);
    assert!(
        smart["capabilities"]
            .as_array()
            .is_some_and(|c| c.contains(&json!("permission-v2")))
    );
    assert!(
        smart["scopes_supported"]
            .as_array()
            .is_some_and(|s| s.contains(&json!("user/*.cruds")))
    );

    // Without a token: 401 with a challenge; metadata needs none.
    let response = platform
        .http
        .get(platform.url("/north-east/fhir/Patient/1"))
        .send()
        .await?;
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    let response = platform
        .http
        .get(platform.url("/north-east/fhir/metadata"))
        .send()
        .await?;
    assert_eq!(response.status(), 200);

    let metrics = platform
        .http
        .get(platform.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("shcr_gateway_requests_total{care_system=\"north-east\",class=\"4xx\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("care_system=\"unknown\",reason=\"unknown_care_system\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("shcr_gateway_request_duration_seconds_bucket"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_declared_or_streamed() -> Result<()> {
    let platform = Platform::start(
        &[(NE, NE_MEMBERS)],
        with_limits(LimitsConfig {
            max_body_bytes: 1024,
            ..LimitsConfig::default()
        }),
    )
    .await?;
    let token = platform.token(NE, "RTD", "user/*.cruds")?;
    let mut big = patient("big", "x");
    big["text"] = json!({"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>", "a".repeat(4000))});
    let (status, body) = platform
        .put("/north-east/fhir/Patient/big", &token, &big)
        .await?;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome");

    // Chunked, no Content-Length: cut off while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b' '; 512])).collect();
    let response = platform
        .http
        .post(platform.url("/north-east/fhir/Patient"))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await?;
    assert_eq!(response.status(), 413);

    // Nothing was stored.
    let (status, _) = platform.get("/north-east/fhir/Patient/big", &token).await?;
    assert_eq!(status, 404);
    let (status, _) = platform
        .put(
            "/north-east/fhir/Patient/small",
            &token,
            &patient("small", "x"),
        )
        .await?;
    assert_eq!(status, 201);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_care_system_is_throttled_without_starving_the_others() -> Result<()> {
    let platform = Platform::start(
        &[(NE, NE_MEMBERS), (WY, WY_MEMBERS)],
        with_limits(LimitsConfig {
            requests_per_second: 1,
            burst: 3,
            ..LimitsConfig::default()
        }),
    )
    .await?;
    let ne = platform.token(NE, "RTD", "user/*.rs")?;
    let wy = platform.token(WY, "RR8", "user/*.rs")?;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = platform
            .http
            .get(platform.url("/north-east/fhir/Patient/none"))
            .bearer_auth(&ne)
            .send()
            .await?;
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses[..3], [404, 404, 404], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    // West Yorkshire has its own budget.
    let (status, _) = platform
        .get("/west-yorkshire/fhir/Patient/none", &wy)
        .await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_and_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let issuer = shcr_gateway::auth::DevIssuer::load_or_create(dir.path())?;
    let signer = AssertionSigner::generate()?;
    let upstream = inspecting_upstream(signer.verifier()).await?;
    let gateway = Gateway::start(
        vec![
            route(NE, upstream, NE_MEMBERS),
            route(WY, upstream, WY_MEMBERS),
        ],
        vec![issuer.issuer_config()],
        signer,
        ProxySettings {
            request_timeout: Duration::from_millis(700),
            limits: LimitsConfig {
                max_concurrent_requests: 1,
                ..LimitsConfig::default()
            },
            ..ProxySettings::default()
        },
    )
    .await?;
    let ne = issuer.issue(&shcr_gateway::auth::TokenRequest::new(NE, "RTD", "R8000"))?;
    let wy = issuer.issue(&shcr_gateway::auth::TokenRequest::new(WY, "RR8", "R8000"))?;
    let http = reqwest::Client::new();
    let slow = {
        let http = http.clone();
        let url = format!("{}/north-east/fhir/Patient/1", gateway.base);
        let ne = ne.clone();
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(ne)
                .header("x-test-sleep-ms", "400")
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = http
        .get(format!("{}/north-east/fhir/Patient/1", gateway.base))
        .bearer_auth(&ne)
        .send()
        .await?;
    assert_eq!(busy.status(), 429, "the one slot is taken");
    assert_eq!(busy.headers()["retry-after"], "1");
    let other = http
        .get(format!("{}/west-yorkshire/fhir/Patient/1", gateway.base))
        .bearer_auth(&wy)
        .send()
        .await?;
    assert_eq!(other.status(), 200, "another care system is unaffected");
    assert_eq!(slow.await??, 200);
    // The slot came back.
    let again = http
        .get(format!("{}/north-east/fhir/Patient/1", gateway.base))
        .bearer_auth(&ne)
        .send()
        .await?;
    assert_eq!(again.status(), 200);

    let timed_out = http
        .get(format!("{}/north-east/fhir/Patient/1", gateway.base))
        .bearer_auth(&ne)
        .header("x-test-sleep-ms", "2000")
        .send()
        .await?;
    assert_eq!(timed_out.status(), 504);
    let body: Value = timed_out.json().await?;
    assert_eq!(body["issue"][0]["code"], "timeout");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_reaches_the_store_audit_flagged() -> Result<()> {
    let platform = Platform::start(&[(NE, NE_MEMBERS)], settings()).await?;
    let token = platform.token(NE, "RTD", "user/*.cruds")?;
    assert_eq!(
        platform
            .put(
                "/north-east/fhir/Patient/bg1",
                &token,
                &patient("bg1", "Glass")
            )
            .await?
            .0,
        201
    );
    let response = platform
        .http
        .get(platform.url("/north-east/fhir/Patient/bg1"))
        .bearer_auth(&token)
        .header("x-break-glass-reason", "unconscious in ED")
        .header("x-request-id", "bg-request-1")
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    // Reads are audited by a background writer: wait until the event is searchable.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let found = loop {
        let (status, body) = platform
            .get("/north-east/fhir/AuditEvent?patient=Patient/bg1", &token)
            .await?;
        assert_eq!(status, 200, "AuditEvent search: {body}");
        let flagged = body["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["resource"]["purposeOfEvent"][0]["coding"][0]["code"] == "BTG");
        if let Some(event) = flagged {
            break event["resource"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no flagged AuditEvent: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        found["purposeOfEvent"][0]["text"], "unconscious in ED",
        "{found}"
    );
    assert!(
        found.to_string().contains("bg-request-1"),
        "the request id joins up: {found}"
    );
    assert!(
        found.to_string().contains("RTD"),
        "who acted, for which organisation: {found}"
    );
    Ok(())
}
