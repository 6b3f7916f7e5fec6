//! Prometheus metrics and health endpoints.
//!
//! Job: one shared [`MetricsRegistry`] per process that components register their metrics into at
//! start-up, and an axum [`Router`] serving it at `/metrics` (OpenMetrics text) beside `/healthz`
//! (the process is alive) and `/readyz` (it can serve traffic, as a [`Readiness`] says).
//!
//! Invariants:
//! - Every metric name gets the `shcr_` prefix, so ShCR metrics never collide with others.
//! - Metric labels never carry PHI (no patient identifiers, no resource ids): label values must be
//!   bounded sets such as care-system names, resource types or status codes.
//! - `/healthz` does no work beyond answering; `/readyz` asks the readiness check on every request
//!   and answers 503 until it says ready.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::{Metric, Registry};

/// The content type of the text prometheus-client produces (OpenMetrics 1.0).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

const METRIC_PREFIX: &str = "shcr";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("encoding the metrics as OpenMetrics text failed")]
    Encode(#[from] std::fmt::Error),
}

/// The process's metrics. Cheap to clone; clones share the same registry.
#[derive(Debug, Clone)]
pub struct MetricsRegistry {
    registry: Arc<RwLock<Registry>>,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsRegistry {
    pub fn new() -> Self {
        Self {
            registry: Arc::new(RwLock::new(Registry::with_prefix(METRIC_PREFIX))),
        }
    }

    /// Registers `metric` as `shcr_<name>`. Keep a clone of the metric to update it; the registry
    /// reads the shared value. Counters are exposed with the `_total` suffix.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.write(|registry| registry.register(name, help, metric));
    }

    /// Gives `register_metrics` the underlying registry, for sub-registries with a component
    /// prefix or constant labels, or metrics with units.
    pub fn with_registry<T>(&self, register_metrics: impl FnOnce(&mut Registry) -> T) -> T {
        self.write(register_metrics)
    }

    /// The current value of every metric in OpenMetrics text format.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let registry = self.registry.read().unwrap_or_else(PoisonError::into_inner);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }

    fn write<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        // A panic while registering leaves the registry usable (registration is append-only),
        // so a poisoned lock is not a reason to lose metrics.
        let mut registry = self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut registry)
    }
}

/// A switch a component flips once it can serve traffic (and back, while draining).
#[derive(Debug, Clone, Default)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    /// A flag that starts not ready.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What `/readyz` asks: a [`ReadyFlag`] or any cheap, non-blocking check.
#[derive(Clone)]
pub struct Readiness(Arc<dyn Fn() -> bool + Send + Sync>);

impl Readiness {
    pub fn from_flag(flag: &ReadyFlag) -> Self {
        let flag = flag.clone();
        Self(Arc::new(move || flag.is_ready()))
    }

    /// `check` runs on every `/readyz` request, on the async runtime: it must not block.
    pub fn from_fn(check: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(check))
    }

    pub fn is_ready(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.is_ready())
            .finish()
    }
}

#[derive(Debug, Clone)]
struct Endpoints {
    metrics: MetricsRegistry,
    readiness: Readiness,
}

/// `/metrics`, `/healthz` and `/readyz`. Serve on its own port, or merge into a component's router.
pub fn router(metrics: MetricsRegistry, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(serve_health))
        .route("/readyz", get(serve_readiness))
        .with_state(Endpoints { metrics, readiness })
}

async fn serve_metrics(State(endpoints): State<Endpoints>) -> Response {
    match endpoints.metrics.encode() {
        Ok(text) => ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot serve /metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
        }
    }
}

async fn serve_health() -> &'static str {
    "ok\n"
}

async fn serve_readiness(State(endpoints): State<Endpoints>) -> (StatusCode, &'static str) {
    if endpoints.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use prometheus_client::metrics::counter::Counter;
    use tower::ServiceExt;

    use super::*;

    async fn get(router: Router, path: &str) -> (StatusCode, Option<String>, String) {
        let request = Request::get(path)
            .body(Body::empty())
            .expect("request builds");
        let response = router.oneshot(request).await.expect("router answers");
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body reads");
        let body = String::from_utf8(body.to_vec()).expect("body is UTF-8");
        (status, content_type, body)
    }

    #[tokio::test]
    async fn metrics_endpoint_shows_registered_counters() {
        let metrics = MetricsRegistry::new();
        let requests = Counter::<u64>::default();
        metrics.register("store_requests", "FHIR requests handled", requests.clone());
        requests.inc_by(3);

        let router = router(metrics, Readiness::from_fn(|| true));
        let (status, content_type, body) = get(router, "/metrics").await;

        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(
            body.contains("# HELP shcr_store_requests FHIR requests handled"),
            "{body}"
        );
        assert!(body.contains("shcr_store_requests_total 3"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn readiness_follows_the_flag() {
        let flag = ReadyFlag::new();
        let router = router(MetricsRegistry::new(), Readiness::from_flag(&flag));

        let (status, _, _) = get(router.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _, _) = get(router.clone(), "/healthz").await;
        assert_eq!(status, StatusCode::OK, "alive even when not ready");

        flag.set_ready(true);
        let (status, _, body) = get(router, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "ready\n");
    }
}
