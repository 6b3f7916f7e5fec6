//! The tenant proxy: `/{care-system}/fhir/...` → that care system's store.
//!
//! For each request, in order: resolve the care system (404 unknown, 503 not ready), serve SMART
//! discovery locally, refuse declared oversize bodies (413), authenticate the bearer token (401),
//! authorise it for this care system — member organisation, SMART scopes (403; 401 and 403 are
//! also reported to the care system's store for its audit trail, see [`crate::refusals`]),
//! admit it under the care system's rate and concurrency limits (429), read the request body
//! (up to the body limit, 413), then forward it with a freshly signed identity assertion bound
//! to that request over a pooled HTTP/1.1 connection, streaming the response body.
//!
//! Invariants:
//! - The client's `Authorization`, any `x-shcr-identity` it sent and hop-by-hop headers never
//!   reach a store; the store sees only the assertion the gateway signed for *its* care system.
//!   Hop-by-hop headers of the store's response never reach the client.
//! - Every response carries `X-Request-Id` (the client's, when it sent a sane one, else a new
//!   UUID) and the same id is in the assertion (`rid`), so gateway logs, store logs and audit
//!   join up. The assertion's `jti` is the gateway's own fresh UUID, never the request id.
//! - The assertion is bound to the request the store receives: its method, its path and query
//!   (as forwarded) and the SHA-256 of its body, which is why the body is read before signing;
//!   memory for bodies is bounded by the body limit times the admitted concurrency.
//! - The assertion's `origin` is the gateway's configured public origin, never the client's
//!   `Host`.
//! - W3C trace context: the caller's `traceparent`/`tracestate` are forwarded; when trace export
//!   is on, the gateway's span joins the caller's trace and the store sees the gateway's span as
//!   its parent.
//! - Every refusal is an `OperationOutcome` that names the rule, never whether a record exists;
//!   refusals are counted by reason and logged without tokens, paths or query values.
//! - A request's concurrency slot is held until its response body has been fully streamed.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use shcr_fhir::outcome::{IssueType, OperationOutcome};
use shcr_identity::{ASSERTION_HEADER, AssertionSigner, RefusalNotice, RequestBinding};

use crate::access::{AccessControl, AccessDecision};
use crate::limits::{LimitsConfig, Permit, Refusal};
use crate::metrics::{GatewayMetrics, UNKNOWN_CARE_SYSTEM};
use crate::refusals::RefusalReporter;
use crate::routing::{Resolution, Route, TenantRouter, Upstream};

const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request id accepted from a client.
const MAX_CLIENT_VALUE: usize = 200;

/// Request headers that describe one connection, not the request (RFC 9110 §7.6.1), plus the
/// proxy credentials; never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Timeouts and lifetimes of the proxy.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// From a request's arrival to the store's response head; past it, 504.
    pub request_timeout: Duration,
    /// Connecting to a store.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection to a store is kept.
    pub pool_idle_timeout: Duration,
    /// Lifetime of each identity assertion.
    pub assertion_ttl: Duration,
    /// Admission limits per care system (the body limit is applied here).
    pub limits: LimitsConfig,
    /// The origin (`scheme://host[:port]`) clients reach the FHIR API under, carried in every
    /// assertion (`origin`) so stores build absolute links from it rather than from `Host`.
    /// `None`: the assertion carries none.
    pub public_origin: Option<String>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(60),
            assertion_ttl: Duration::from_secs(60),
            limits: LimitsConfig::default(),
            public_origin: None,
        }
    }
}

/// The request body on its way to a store: the client's, read in full (it is signed).
type UpstreamBody = Full<Bytes>;

/// Everything one request needs; shared by all requests.
pub struct Proxy {
    router: TenantRouter,
    access: AccessControl,
    signer: Arc<AssertionSigner>,
    client: Client<HttpConnector, UpstreamBody>,
    refusals: RefusalReporter,
    metrics: GatewayMetrics,
    settings: ProxySettings,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(
        router: TenantRouter,
        access: AccessControl,
        signer: AssertionSigner,
        metrics: GatewayMetrics,
        settings: ProxySettings,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(1024)
            .build(connector);
        let signer = Arc::new(signer);
        let refusals = RefusalReporter::start(client.clone(), signer.clone(), metrics.clone());
        Self {
            router,
            access,
            signer,
            client,
            refusals,
            metrics,
            settings,
        }
    }

    /// The routing table this proxy follows.
    pub fn router(&self) -> &TenantRouter {
        &self.router
    }

    /// Handles one request under `/{care-system}/fhir`; anything else is a 404 OperationOutcome.
    pub async fn handle(self: Arc<Self>, request: Request<Body>) -> Response {
        let started = Instant::now();
        let request_id = request_id(request.headers());
        let span = tracing::info_span!(
            "gateway_request",
            request_id = %request_id,
            care_system = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        // Without the OpenTelemetry layer this fails and the request is simply not traced.
        let _ = shcr_runtime::trace_context::set_remote_parent(&span, request.headers());
        let (label, mut response) = {
            use tracing::Instrument as _;
            self.route(request, &request_id, &span)
                .instrument(span.clone())
                .await
        };
        let status = response.status();
        span.record("status", status.as_u16());
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID, value);
        }
        self.metrics
            .answered(&label, status.as_u16(), started.elapsed().as_secs_f64());
        response
    }

    /// Returns the metrics label (a known care system or `unknown`) and the response.
    async fn route(
        &self,
        request: Request<Body>,
        request_id: &str,
        span: &tracing::Span,
    ) -> (String, Response) {
        let path = request.uri().path().to_owned();
        let Some((care_system, rest)) = split_path(&path) else {
            return (
                UNKNOWN_CARE_SYSTEM.to_owned(),
                outcome(
                    StatusCode::NOT_FOUND,
                    IssueType::NotFound,
                    "no such endpoint: FHIR APIs are at /{care-system}/fhir",
                ),
            );
        };
        let (route, upstream) = match self.router.resolve(care_system) {
            Resolution::Unknown => {
                self.metrics
                    .refused(UNKNOWN_CARE_SYSTEM, "unknown_care_system");
                return (
                    UNKNOWN_CARE_SYSTEM.to_owned(),
                    outcome(
                        StatusCode::NOT_FOUND,
                        IssueType::NotFound,
                        "no such care system on this gateway",
                    ),
                );
            }
            Resolution::NotReady(route) => {
                let label = route.care_system.clone();
                if rest == SMART_CONFIGURATION {
                    return (label, self.smart_configuration());
                }
                self.metrics.refused(&label, "not_ready");
                tracing::info!(reason = ?route.not_ready_reason, "care system not ready");
                let mut response = outcome(
                    StatusCode::SERVICE_UNAVAILABLE,
                    IssueType::Transient,
                    "this care system's record store is not ready; retry shortly",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return (label, response);
            }
            Resolution::Ready(route, upstream) => (route, upstream),
        };
        span.record("care_system", route.care_system.as_str());
        let label = route.care_system.clone();
        if rest == SMART_CONFIGURATION {
            return (label, self.smart_configuration());
        }
        let response = self
            .forward(request, &route, &upstream, rest, request_id)
            .await;
        (label, response)
    }

    async fn forward(
        &self,
        request: Request<Body>,
        route: &Route,
        upstream: &Upstream,
        rest: &str,
        request_id: &str,
    ) -> Response {
        let arrived = tokio::time::Instant::now();
        let limit = self.settings.limits.max_body_bytes;
        if declared_length(request.headers()).is_some_and(|n| n > limit) {
            return self.too_large(route);
        }

        let decision = self
            .access
            .decide(
                request.method(),
                rest,
                request.uri().query(),
                request.headers(),
                route,
                request_id,
            )
            .await;
        let identity = match decision {
            AccessDecision::Public => None,
            AccessDecision::Refused {
                reason,
                response,
                actor,
            } => {
                self.metrics.refused(&route.care_system, reason);
                let status = response.status();
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    self.refusals.report(
                        RefusalNotice {
                            care_system: route.care_system.clone(),
                            status: status.as_u16(),
                            reason: reason.to_owned(),
                            method: request.method().as_str().to_owned(),
                            resource_type: addressed_type(rest),
                            actor,
                            request_id: request_id.to_owned(),
                        },
                        upstream,
                    );
                }
                return response;
            }
            AccessDecision::Allowed(mut identity) => {
                identity.origin = self.settings.public_origin.clone();
                Some(identity)
            }
        };

        let permit = match route.limiter.admit() {
            Ok(permit) => permit,
            Err(refusal) => return self.throttled(route, refusal),
        };

        let (mut parts, body) = request.into_parts();
        let uri = match upstream_uri(upstream, &parts.uri) {
            Ok(uri) => uri,
            Err(error) => {
                tracing::error!(%error, "cannot build the store URL");
                return internal_error("the gateway could not build the store URL");
            }
        };
        let deadline = arrived + self.settings.request_timeout;
        let body =
            match tokio::time::timeout_at(deadline, Limited::new(body, limit as usize).collect())
                .await
            {
                Err(_) => {
                    return outcome(
                        StatusCode::REQUEST_TIMEOUT,
                        IssueType::Timeout,
                        "the request body did not arrive in time",
                    );
                }
                Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
                    return self.too_large(route);
                }
                Ok(Err(_)) => {
                    return outcome(
                        StatusCode::BAD_REQUEST,
                        IssueType::Invalid,
                        "the request body could not be read",
                    );
                }
                Ok(Ok(collected)) => collected.to_bytes(),
            };
        prepare_request_headers(&mut parts.headers, request_id);
        if let Some(identity) = identity {
            let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
            let binding = RequestBinding::new(parts.method.as_str(), target, &body);
            match self
                .signer
                .sign(&identity, &binding, self.settings.assertion_ttl)
            {
                Ok(token) => match HeaderValue::from_str(&token) {
                    Ok(value) => {
                        parts.headers.insert(ASSERTION_HEADER, value);
                    }
                    Err(_) => {
                        return internal_error("the identity assertion is not a header value");
                    }
                },
                Err(error) => {
                    tracing::error!(%error, "cannot sign the identity assertion");
                    return internal_error("the gateway could not sign the identity assertion");
                }
            }
        }
        shcr_runtime::trace_context::inject_current(&mut parts.headers);
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let upstream_request = Request::from_parts(parts, Full::new(body));

        let sent = tokio::time::timeout_at(deadline, self.client.request(upstream_request)).await;
        match sent {
            Err(_) => {
                tracing::warn!("the store did not answer in time");
                outcome(
                    StatusCode::GATEWAY_TIMEOUT,
                    IssueType::Timeout,
                    "the care system's record store did not answer in time",
                )
            }
            Ok(Err(error)) => {
                tracing::warn!(error = %error_chain(&error), "forwarding to the store failed");
                outcome(
                    StatusCode::BAD_GATEWAY,
                    IssueType::Transient,
                    "the care system's record store could not be reached",
                )
            }
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(
                    parts,
                    Body::new(HoldPermit {
                        inner: body,
                        _permit: permit,
                    }),
                )
            }
        }
    }

    fn too_large(&self, route: &Route) -> Response {
        self.metrics.refused(&route.care_system, "too_large");
        outcome(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueType::TooLong,
            &format!(
                "the request body is larger than the {} bytes this gateway accepts",
                self.settings.limits.max_body_bytes
            ),
        )
    }

    fn throttled(&self, route: &Route, refusal: Refusal) -> Response {
        self.metrics.refused(&route.care_system, refusal.reason());
        tracing::info!(reason = refusal.reason(), "request throttled");
        let message = match refusal {
            Refusal::Concurrency => {
                "too many requests in flight for this care system; retry shortly"
            }
            Refusal::Rate { .. } => {
                "this care system's request rate limit is reached; retry shortly"
            }
        };
        let mut response = outcome(StatusCode::TOO_MANY_REQUESTS, IssueType::Throttled, message);
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(refusal.retry_after_secs()),
        );
        response
    }

    fn smart_configuration(&self) -> Response {
        let body = self.access.smart_configuration();
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// The path of SMART discovery below `/{care-system}/fhir/`.
const SMART_CONFIGURATION: &str = ".well-known/smart-configuration";

/// `/{cs}/fhir` or `/{cs}/fhir/{rest}` → `(cs, rest)`.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let path = path.strip_prefix('/')?;
    let (care_system, after) = path.split_once('/')?;
    if care_system.is_empty() {
        return None;
    }
    let rest = match after.strip_prefix("fhir")? {
        "" => "",
        more => more.strip_prefix('/')?,
    };
    Some((care_system, rest))
}

/// The resource type the path below `/fhir/` names (`Patient/1/_history` → `Patient`), when
/// its first segment is one: what a refusal notice may say was attempted.
fn addressed_type(rest: &str) -> Option<String> {
    let first = rest.split('/').next()?;
    first
        .parse::<shcr_fhir::resource::ResourceType>()
        .ok()
        .map(|t| t.as_str().to_owned())
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The client's request id when it is short visible ASCII, else a new UUID.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_CLIENT_VALUE && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn upstream_uri(upstream: &Upstream, original: &Uri) -> Result<Uri, http::Error> {
    let path_and_query = original
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(format!("{}{}", upstream.path_prefix, path_and_query))
        .build()
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// What the store may see of the client's headers, plus the gateway's own.
fn prepare_request_headers(headers: &mut HeaderMap, request_id: &str) {
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    headers.remove(ASSERTION_HEADER);
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID, value);
    }
    // The store builds `Location`, `fullUrl` and links from these (and `Host`, kept as the
    // client sent it), so they point at the gateway, not at the store's in-cluster address.
    if !headers.contains_key("x-forwarded-host")
        && let Some(host) = headers.get(header::HOST).cloned()
    {
        headers.insert("x-forwarded-host", host);
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
}

fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}

/// An `OperationOutcome` response with one error issue.
pub fn outcome(status: StatusCode, code: IssueType, diagnostics: &str) -> Response {
    let body = OperationOutcome::error(code, diagnostics).to_json();
    (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        body.to_string(),
    )
        .into_response()
}

fn internal_error(diagnostics: &str) -> Response {
    outcome(
        StatusCode::INTERNAL_SERVER_ERROR,
        IssueType::Exception,
        diagnostics,
    )
}

/// The store's response body, holding the request's concurrency slot until it is done.
struct HoldPermit {
    inner: hyper::body::Incoming,
    _permit: Permit,
}

impl HttpBody for HoldPermit {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_care_system_and_rest() {
        assert_eq!(split_path("/a/fhir"), Some(("a", "")));
        assert_eq!(split_path("/a/fhir/"), Some(("a", "")));
        assert_eq!(split_path("/a/fhir/Patient/1"), Some(("a", "Patient/1")));
        assert_eq!(split_path("/a/fhirx/Patient"), None);
        assert_eq!(split_path("/a/other"), None);
        assert_eq!(split_path("//fhir/x"), None);
        assert_eq!(split_path("/healthz"), None);
    }

    #[test]
    fn hop_by_hop_and_credentials_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        headers.insert(ASSERTION_HEADER, HeaderValue::from_static("forged"));
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+json"),
        );
        headers.insert(header::HOST, HeaderValue::from_static("gw.example"));
        prepare_request_headers(&mut headers, "rid");
        let names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "authorization",
            ASSERTION_HEADER,
        ] {
            assert!(!names.contains(&gone), "{gone} still in {names:?}");
        }
        assert_eq!(headers[REQUEST_ID], "rid");
        assert_eq!(headers["x-forwarded-host"], "gw.example");
        assert_eq!(headers[header::ACCEPT], "application/fhir+json");
    }

    #[test]
    fn client_request_ids_are_kept_only_when_sane() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&headers), "has space");
        let long = "x".repeat(500);
        headers.insert(REQUEST_ID, HeaderValue::from_str(&long).expect("ascii"));
        assert_eq!(request_id(&headers).len(), 36);
    }
}
