//! `shcr gateway`: wires configuration to the proxy and serves it.
//!
//! Job: load the assertion key and the trusted issuers, fill the routing table from its source
//! (a live kube watch, or manifests on disk), serve the FHIR API on `listen` and health and
//! metrics on `metrics_listen`, and drain on shutdown.
//!
//! Invariants:
//! - Nothing is served until the configuration is known to be usable: a missing or bad key, an
//!   unusable issuer or unreadable manifests stop start-up with a message saying what to fix.
//! - `/readyz` answers 200 only once the routing table has been loaded completely.
//! - At shutdown no new connection is accepted; in-flight requests get `timeouts.drain` to
//!   finish.

use std::future::{Future, IntoFuture as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use shcr_identity::AssertionSigner;
use shcr_runtime::metrics::{MetricsRegistry, Readiness};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::access::AccessControl;
use crate::config::{GatewayConfig, RoutingSource};
use crate::metrics::GatewayMetrics;
use crate::proxy::{Proxy, ProxySettings};
use crate::routing::{RouteSpec, TenantRouter};

/// What stops `shcr gateway` from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "no assertion signing key: set `assertion_key_file` (or --assertion-key-file) to a PKCS#8 PEM Ed25519 key, e.g. from `openssl genpkey -algorithm ed25519`"
    )]
    NoAssertionKey,
    #[error("cannot read the assertion signing key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the assertion signing key {path} is not usable: {source}")]
    BadKey {
        path: PathBuf,
        source: shcr_identity::KeyError,
    },
    #[error("a configured issuer is not usable: {0}")]
    Issuer(String),
    #[error("`public_url` (--public-url, SHCR_GATEWAY_PUBLIC_URL) is not usable: {0}")]
    PublicUrl(#[from] shcr_identity::OriginError),
    #[error("cannot read the CareSystem manifests: {0}")]
    Manifests(#[from] crate::dev::DevError),
    #[error("cannot connect to Kubernetes to watch CareSystems: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// The gateway's HTTP application: health endpoints, `extra` routes, the web app (`/app/`,
/// [`crate::app`]), and the proxy for everything else; a browser's `GET /` gets the status as
/// a page.
pub fn app(proxy: Arc<Proxy>, extra: Router) -> Router {
    extra
        .merge(crate::app::routes())
        .fallback(move |request: Request<Body>| proxy.clone().handle(request))
        .layer(axum::middleware::from_fn(crate::app::html_status))
}

/// `/healthz` and `/readyz` alone (for the public listener; `/metrics` stays on its own port).
pub fn health_routes(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = readiness.is_ready();
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "ready\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
}

/// A shutdown signal that several servers can wait on.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Fires when `signal` resolves.
    pub fn new(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = tx.send(true);
        });
        Self(rx)
    }

    /// Resolves once shutdown has been asked for (or the signal's task is gone).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Serves `app` on `listener` until `shutdown`, then gives in-flight requests `drain` to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: Shutdown,
    drain: Duration,
) -> std::io::Result<()> {
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().wait())
        .into_future();
    let deadline = async move {
        shutdown.wait().await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        served = server => served,
        () = deadline => {
            tracing::warn!(drain_seconds = drain.as_secs(), "requests still in flight after the drain time; stopping anyway");
            Ok(())
        }
    }
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Listen { addr, source })
}

/// Loads the assertion signing key named by the configuration.
fn load_signer(config: &GatewayConfig) -> Result<AssertionSigner, GatewayError> {
    let path = config
        .assertion_key_file
        .clone()
        .ok_or(GatewayError::NoAssertionKey)?;
    let pem = std::fs::read_to_string(&path).map_err(|source| GatewayError::ReadKey {
        path: path.clone(),
        source,
    })?;
    AssertionSigner::from_pkcs8_pem(&pem).map_err(|source| GatewayError::BadKey { path, source })
}

/// Runs `shcr gateway` until `shutdown` resolves.
pub async fn run(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let signer = load_signer(&config)?;
    let public_origin = config.public_origin()?;
    let access = AccessControl::new(&config.issuers, config.smart.clone())
        .map_err(|e| GatewayError::Issuer(e.to_string()))?;
    let router = TenantRouter::new(config.limits.clone());
    let shutdown = Shutdown::new(shutdown);

    let follower = match &config.routing {
        RoutingSource::Manifests { file } => {
            let yaml = std::fs::read_to_string(file).map_err(|source| {
                crate::dev::DevError::ReadManifests {
                    path: file.clone(),
                    source,
                }
            })?;
            let care_systems = crate::dev::parse_care_systems(&yaml, &file.display().to_string())?;
            router.set_static(care_systems.iter().filter_map(|cs| {
                RouteSpec::from_care_system(cs).map(|mut spec| {
                    spec.ready = spec.endpoint.is_some();
                    spec
                })
            }));
            None
        }
        RoutingSource::Kube => {
            let client = kube::Client::try_default().await?;
            let router = router.clone();
            let stop = shutdown.clone();
            Some(tokio::spawn(async move {
                router.follow_kube(client, stop.wait()).await;
            }))
        }
    };

    let registry = MetricsRegistry::new();
    let metrics = GatewayMetrics::register(&registry);
    access.authenticator().register_metrics(&registry);
    for (issuer, error) in access.authenticator().warm_up().await {
        tracing::warn!(issuer, %error, "cannot fetch the issuer's signing keys yet; will retry on the first request");
    }
    let ready_router = router.clone();
    let readiness = Readiness::from_fn(move || ready_router.is_synced());
    let proxy = Arc::new(Proxy::new(
        router,
        access,
        signer,
        metrics,
        ProxySettings {
            public_origin: Some(public_origin),
            ..ProxySettings::from_config(&config)
        },
    ));

    let listener = bind(config.listen).await?;
    let metrics_listener = bind(config.metrics_listen).await?;
    tracing::info!(listen = %config.listen, metrics = %config.metrics_listen, "gateway serving");
    let public = serve(
        listener,
        app(proxy, health_routes(readiness.clone())),
        shutdown.clone(),
        config.timeouts.drain,
    );
    let internal = serve(
        metrics_listener,
        shcr_runtime::metrics::router(registry, readiness),
        shutdown.clone(),
        config.timeouts.drain,
    );
    let (public, internal) = tokio::join!(public, internal);
    if let Some(follower) = follower {
        let _ = follower.await;
    }
    public.map_err(GatewayError::Serve)?;
    internal.map_err(GatewayError::Serve)
}

impl ProxySettings {
    /// The proxy settings a gateway configuration asks for.
    pub fn from_config(config: &GatewayConfig) -> Self {
        Self {
            request_timeout: config.timeouts.request,
            connect_timeout: config.timeouts.connect,
            pool_idle_timeout: config.timeouts.pool_idle,
            assertion_ttl: config.timeouts.assertion,
            limits: config.limits.clone(),
            public_origin: config.public_origin().ok(),
        }
    }
}
