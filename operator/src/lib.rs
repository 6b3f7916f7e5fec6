//! The ShCR operator: turns a `CareSystem` custom resource into an isolated, encrypted tenant.
//!
//! - [`care_system`]: the `CareSystem` API types (`shcr.dev/v1alpha1`), with their OpenAPI schema
//!   and CEL validation rules.
//! - [`crd`]: the CRD YAML generated from those types (`shcr crd`, `crds/caresystem.yaml`).
//! - [`controller`]: the reconcile loop (finalizer, server-side apply, status, Events).
//! - [`owned`]: watch caches of the objects the operator owns, so that applies which would change
//!   nothing are skipped (an idle operator makes no API writes).
//! - [`workload`]: the Kubernetes objects of one care system, as pure functions.
//! - [`key`], [`bucket`], [`cloud`]: the care system's KMS key and bucket, and how cloud errors
//!   are sorted into transient and permanent.
//! - [`leader`]: leader election, so that of several replicas one reconciles.
//! - [`config`], [`metrics`]: the operator's configuration and Prometheus metrics.
//!
//! [`run`] is the entry point of `shcr operator`; [`run_with`] runs the same with clients built
//! by the caller (e.g. a test running the operator as a ServiceAccount).

pub mod bucket;
pub mod care_system;
pub mod cloud;
pub mod config;
pub mod controller;
pub mod crd;
pub mod key;
pub mod leader;
pub mod metrics;
pub mod owned;
pub mod workload;

use std::sync::Arc;

pub use care_system::{CareSystem, CareSystemSpec, CareSystemStatus};
pub use config::{AssertionKeyError, AssertionPublicKey, OperatorArgs, OperatorConfig};
use kube::Api;
use shcr_runtime::metrics::{MetricsRegistry, Readiness, ReadyFlag};

/// Why the operator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    AssertionKey(#[from] AssertionKeyError),
    #[error(transparent)]
    GatewayUrl(#[from] config::GatewayUrlError),
    #[error("cannot connect to Kubernetes: set KUBECONFIG or run in a pod with a service account")]
    Connect(#[source] kube::Error),
    #[error(
        "cannot list CareSystems; is the CRD installed (`shcr crd | kubectl apply -f -`) and may \
         the operator's service account list caresystems.shcr.dev?"
    )]
    CareSystemsUnavailable(#[source] kube::Error),
    #[error("cannot listen on {address} for metrics and health checks")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    #[error("the metrics and health server failed")]
    Serve(#[source] std::io::Error),
}

/// The APIs the operator talks to.
#[derive(Clone)]
pub struct Clients {
    /// Kubernetes; its credentials are the operator's identity (e.g. a ServiceAccount token).
    pub kube: kube::Client,
    pub s3: aws_sdk_s3::Client,
    pub kms: aws_sdk_kms::Client,
}

/// Runs the operator until `shutdown` completes: checks the identity-assertion public key,
/// connects to Kubernetes (in-cluster or `KUBECONFIG`) and AWS (default credential chain,
/// endpoint overrides from `config`), serves metrics and health checks, and reconciles
/// CareSystems.
pub async fn run(
    config: OperatorConfig,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let assertion_public_key = AssertionPublicKey::load(&config)?;
    check_gateway_public_url(&config)?;
    let kube = kube::Client::try_default()
        .await
        .map_err(RunError::Connect)?;
    let (s3, kms) = aws_clients(&config).await;
    serve(
        Clients { kube, s3, kms },
        config,
        assertion_public_key,
        shutdown,
    )
    .await
}

/// [`run`] with clients the caller built: everything `shcr operator` does (key check, CRD check,
/// metrics and health server on `config.listen`, leader election if enabled, the controller)
/// except connecting.
pub async fn run_with(
    clients: Clients,
    config: OperatorConfig,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let assertion_public_key = AssertionPublicKey::load(&config)?;
    check_gateway_public_url(&config)?;
    serve(clients, config, assertion_public_key, shutdown).await
}

/// Refuses an unusable `gateway_public_url`; warns when there is none.
fn check_gateway_public_url(config: &OperatorConfig) -> Result<(), config::GatewayUrlError> {
    if config.store_public_origin()?.is_none() {
        tracing::warn!(
            "no gateway_public_url is configured: stores get no SHCR_STORE_PUBLIC_ORIGIN and \
             build absolute links from the identity assertion's origin or the request"
        );
    }
    Ok(())
}

async fn serve(
    clients: Clients,
    config: OperatorConfig,
    assertion_public_key: AssertionPublicKey,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let Clients {
        kube: client,
        s3,
        kms,
    } = clients;
    Api::<CareSystem>::all(client.clone())
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(RunError::CareSystemsUnavailable)?;

    let registry = MetricsRegistry::new();
    let metrics = metrics::OperatorMetrics::register(&registry);
    let ready = ReadyFlag::new();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen {
            address: config.listen,
            source,
        })?;
    let router = shcr_runtime::metrics::router(registry, Readiness::from_flag(&ready));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(async move {
        let mut stop_rx = stop_rx;
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })
            .await
    });

    tracing::info!(listen = %config.listen, "operator started");
    let leader_election = config.leader_election.enabled;
    let context = Arc::new(controller::Context::new(
        client,
        config,
        assertion_public_key,
        s3,
        kms,
        metrics,
    ));
    // Standby replicas are ready too: they are healthy and take over when the leader goes.
    ready.set_ready(true);
    let outcome = if leader_election {
        leader::run_as_leader(context, shutdown).await
    } else {
        controller::run(context, shutdown).await;
        Ok(())
    };
    ready.set_ready(false);
    let _ = stop_tx.send(true);
    let served = match server.await {
        Ok(result) => result.map_err(RunError::Serve),
        Err(join_error) => Err(RunError::Serve(std::io::Error::other(join_error))),
    };
    outcome?;
    served
}

/// S3 and KMS clients from the default AWS configuration, with `config`'s endpoint and region
/// overrides (path-style S3 addressing when an endpoint is set, as S3-compatible servers expect).
pub async fn aws_clients(config: &OperatorConfig) -> (aws_sdk_s3::Client, aws_sdk_kms::Client) {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let shared = loader.load().await;
    let mut s3 = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(endpoint) = &config.s3_endpoint {
        s3 = s3.endpoint_url(endpoint).force_path_style(true);
    }
    let mut kms = aws_sdk_kms::config::Builder::from(&shared);
    if let Some(endpoint) = &config.kms_endpoint {
        kms = kms.endpoint_url(endpoint);
    }
    (
        aws_sdk_s3::Client::from_conf(s3.build()),
        aws_sdk_kms::Client::from_conf(kms.build()),
    )
}
