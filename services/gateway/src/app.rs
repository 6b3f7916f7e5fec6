//! The reference web app (`/app/`) and the HTML platform page (`/` for browsers).
//!
//! Job: serve the record viewer's static assets, embedded in the binary at build time (no CDN,
//! no fetch at run time); turn the JSON platform status at `/` into a page when a browser asks
//! for `text/html`; and, in `shcr dev` only, mint dev tokens for the app's sign-in page.
//!
//! Invariants:
//! - The app talks to the public FHIR API only (`/{care-system}/fhir/...`) with a bearer token
//!   it keeps in memory; nothing here reads or serves records.
//! - `/` stays JSON unless the request's `Accept` names `text/html` before any JSON type.
//! - The dev token endpoint exists only where [`dev_token_routes`] is merged, which only
//!   `shcr dev` does (it owns the dev issuer); a production gateway has no such route.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{DevIssuer, TokenRequest};

const INDEX_HTML: &str = include_str!("../app/index.html");
const APP_JS: &str = include_str!("../app/app.js");
const APP_CSS: &str = include_str!("../app/app.css");

/// Headers every app response carries: no caching of the shell beyond revalidation, no
/// referrer (so no path ever leaks), and a CSP that forbids any origin but this one.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `/app/` and its assets.
pub fn routes() -> Router {
    Router::new()
        .route(
            "/app",
            get(|| async {
                (
                    StatusCode::PERMANENT_REDIRECT,
                    [(header::LOCATION, "/app/")],
                )
            }),
        )
        .route(
            "/app/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/app/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

/// What the sign-in page asks the dev issuer for.
#[derive(Debug, Deserialize)]
struct DevTokenBody {
    care_system: String,
    org: String,
    role: String,
    /// For a patient's own sign-in: their `Patient` id (patient/ scopes then).
    #[serde(default)]
    patient: Option<String>,
    /// Space-separated SMART scopes; default: everything the viewer reads.
    #[serde(default)]
    scope: Option<String>,
}

/// The scopes the viewer needs as a clinician: read and search, nothing more.
pub const CLINICIAN_SCOPES: &str = "user/*.rs";
/// The scopes the viewer needs as a patient.
pub const PATIENT_SCOPES: &str = "patient/*.rs";
/// Lifetime of a token minted for the app.
const APP_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// `POST /app/dev/token` (JSON `{care_system, org, role, patient?, scope?}` →
/// `{access_token, token_type, expires_in, scope}`); merge it only where the dev issuer runs.
pub fn dev_token_routes(issuer: Arc<DevIssuer>) -> Router {
    Router::new()
        .route("/app/dev/token", post(dev_token))
        .with_state(issuer)
}

async fn dev_token(
    State(issuer): State<Arc<DevIssuer>>,
    Json(body): Json<DevTokenBody>,
) -> Response {
    let patient = body.patient.filter(|p| !p.trim().is_empty());
    let scope = body.scope.unwrap_or_else(|| {
        if patient.is_some() {
            PATIENT_SCOPES.to_owned()
        } else {
            CLINICIAN_SCOPES.to_owned()
        }
    });
    let mut request = TokenRequest::new(body.care_system, body.org, body.role);
    request.scope = scope.clone();
    request.patient = patient;
    request.ttl = APP_TOKEN_TTL;
    match issuer.issue(&request) {
        Ok(token) => {
            let mut response = Json(json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": APP_TOKEN_TTL.as_secs(),
                "scope": scope,
            }))
            .into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request", "error_description": e.to_string()})),
        )
            .into_response(),
    }
}

/// Whether `accept` prefers HTML over JSON (order of appearance; a browser sends
/// `text/html,...`, curl sends `*/*`, FHIR clients send `application/fhir+json`).
pub fn prefers_html(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    for part in accept.split(',') {
        let media = part.split(';').next().unwrap_or("").trim();
        match media {
            "text/html" | "application/xhtml+xml" => return true,
            m if m.contains("json") => return false,
            _ => {}
        }
    }
    false
}

/// Middleware: a browser's `GET /` gets the platform status (the JSON array of care systems)
/// rendered as a page; everything else passes through untouched.
pub async fn html_status(request: Request<Body>, next: Next) -> Response {
    let wants_html = request.uri().path() == "/"
        && request.method() == axum::http::Method::GET
        && prefers_html(
            request
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok()),
        );
    let response = next.run(request).await;
    if !wants_html || response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Array(systems)) => {
            let mut page = asset("text/html; charset=utf-8", "").into_parts().0;
            page.status = StatusCode::OK;
            let mut response = Response::from_parts(page, Body::from(status_page(&systems)));
            response
                .headers_mut()
                .insert(header::VARY, HeaderValue::from_static("accept"));
            response
        }
        _ => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .map(escape)
        .unwrap_or_default()
}

/// The platform page: one row per care system with its readiness.
pub fn status_page(systems: &[Value]) -> String {
    let mut rows = String::new();
    for s in systems {
        let members = s
            .get("members")
            .and_then(Value::as_array)
            .map(|m| {
                m.iter()
                    .filter_map(|x| {
                        x.as_str()
                            .or_else(|| x.get("ods_code").and_then(Value::as_str))
                    })
                    .map(escape)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let store = text(s, "store");
        let class = if store == "ok" || store == "ready" {
            "ok"
        } else {
            "warn"
        };
        rows.push_str(&format!(
            "<tr><th scope=\"row\">{name}</th><td>{display}</td><td>{ods}</td><td>{members}</td><td><code>{base}</code></td><td><span class=\"tag {class}\">{store}</span></td></tr>\n",
            name = text(s, "name"),
            display = text(s, "display_name"),
            ods = text(s, "ods_code"),
            base = text(s, "fhir_base"),
        ));
    }
    format!(
        r#"<!doctype html>
<html lang="en-GB">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ShCR platform status</title><link rel="stylesheet" href="/app/app.css"></head>
<body>
<header class="banner"><div class="wrap"><span class="brand">ShCR</span> <span>shared care records</span></div></header>
<main id="main" class="wrap">
<h1>Platform status</h1>
<p><a class="button" href="/app/">Open the record viewer</a></p>
<table class="table">
<caption>Care systems on this gateway ({count})</caption>
<thead><tr><th scope="col">Name</th><th scope="col">Care system</th><th scope="col">ODS code</th><th scope="col">Member organisations</th><th scope="col">FHIR base</th><th scope="col">Store</th></tr></thead>
<tbody>
{rows}</tbody>
</table>
<p>The same as JSON: <code>curl http://this-host/</code>. Health: <a href="/healthz">/healthz</a>.</p>
</main>
</body>
</html>
"#,
        count = systems.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_only_when_preferred() {
        assert!(prefers_html(Some(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        )));
        assert!(!prefers_html(Some("*/*")));
        assert!(!prefers_html(None));
        assert!(!prefers_html(Some("application/json, text/html")));
        assert!(!prefers_html(Some("application/fhir+json")));
    }

    #[test]
    fn status_page_escapes() {
        let page = status_page(&[json!({
            "name": "north-east",
            "display_name": "<script>x</script>",
            "ods_code": "QHM",
            "members": ["RTD", "A84001"],
            "fhir_base": "http://127.0.0.1:8080/north-east/fhir",
            "store": "ok",
        })]);
        assert!(page.contains("&lt;script&gt;"));
        assert!(!page.contains("<script>x"));
        assert!(page.contains("RTD, A84001"));
        assert!(page.contains("href=\"/app/\""));
    }

    /// The app's assets and the HTML/JSON negotiation of `/`, over real HTTP.
    #[tokio::test]
    async fn serves_assets_and_negotiates_the_status_page() {
        let status = Router::new().route(
            "/",
            get(|| async {
                Json(json!([{"name": "north-east", "members": ["RTD"], "store": "ok"}]))
            }),
        );
        let app = status
            .merge(routes())
            .layer(axum::middleware::from_fn(html_status));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let base = format!("http://{addr}");

        let page = client.get(format!("{base}/app/")).send().await.unwrap();
        assert_eq!(page.status(), 200);
        assert!(
            page.headers()[header::CONTENT_SECURITY_POLICY.as_str()]
                .to_str()
                .unwrap()
                .starts_with("default-src 'self'")
        );
        assert!(page.text().await.unwrap().contains("/app/app.js"));
        let js = client
            .get(format!("{base}/app/app.js"))
            .send()
            .await
            .unwrap();
        assert!(
            js.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/javascript")
        );
        let redirect = client.get(format!("{base}/app")).send().await.unwrap();
        assert_eq!(redirect.status(), 308);

        let json_status = client.get(format!("{base}/")).send().await.unwrap();
        assert!(
            json_status.headers()["content-type"]
                .to_str()
                .unwrap()
                .contains("json")
        );
        let html = client
            .get(format!("{base}/"))
            .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
            .send()
            .await
            .unwrap();
        assert!(
            html.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let body = html.text().await.unwrap();
        assert!(body.contains("<th scope=\"row\">north-east</th>"), "{body}");
    }

    #[tokio::test]
    async fn dev_tokens_are_minted_for_the_app() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = Arc::new(DevIssuer::load_or_create(dir.path()).unwrap());
        let app = dev_token_routes(issuer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/app/dev/token");
        let ok: Value = client
            .post(&url)
            .json(&json!({"care_system": "north-east", "org": "RTD", "role": "R8000"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ok["scope"], CLINICIAN_SCOPES);
        assert_eq!(ok["access_token"].as_str().unwrap().split('.').count(), 3);
        let patient: Value = client
            .post(&url)
            .json(&json!({"care_system": "north-east", "org": "RTD", "role": "R8000", "patient": "demo-patient-1"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(patient["scope"], PATIENT_SCOPES);
        let bad = client
            .post(&url)
            .json(&json!({"care_system": "north-east", "org": "not an ods code", "role": "R8000"}))
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
    }
}
