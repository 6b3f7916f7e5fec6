//! `shcr dev`: the whole platform on one machine, on the embedded default.
//!
//! Reads `CareSystem` manifests (exactly what a platform team would `kubectl apply`; two demo
//! care systems when none are given), opens one encrypted record store per care system on the
//! local filesystem with the local key provider, serves each store's FHIR API on its own
//! loopback port and puts the real gateway in front of them on `--listen`: tokens from the dev
//! issuer are verified, membership and scopes checked, identity assertions signed, requests
//! proxied. SIGTERM or Ctrl-C drains the gateway, then stops the stores and closes (flushes)
//! every database before exit.
//!
//! Layout of the data dir: `<dir>/<care-system>/objects/` (the care system's "bucket"),
//! `<dir>/<care-system>/keys/master.key` (its local master key, 0600; each care system has its
//! own key, as in production each has its own KMS key), `<dir>/gateway/assertion-key.pem` (the
//! gateway's assertion signing key, 0600) and the dev issuer's key (see `auth::DevIssuer`).
//!
//! Invariants: `/healthz` answers 200 only once every store is open; a restart on the same dir
//! finds every record and accepts tokens minted before it (all state is in the dir); stores are
//! reachable only on loopback, and only with an assertion signed by this gateway.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use shcr_fhir::identifiers::OdsCode;
use shcr_identity::AssertionSigner;
use shcr_operator::CareSystem;
use shcr_runtime::metrics::{MetricsRegistry, Readiness, ReadyFlag};
use shcr_store::CareSystemName;
use shcr_store::api::{FhirStore, FhirStoreConfig};
use shcr_store::engine::EngineConfig;
use shcr_store::engine::storage::ObjectStorage;
use shcr_store::envelope::{KeyProvider, KeyringConfig, LocalKeyProvider};
use shcr_store::tenant::{TenantConfig, TenantDatabase, TenantHealth};
use tokio::sync::watch;

use crate::access::AccessControl;
use crate::auth::{DevIssuer, TokenRequest};
use crate::config::SmartConfig;
use crate::limits::LimitsConfig;
use crate::metrics::GatewayMetrics;
use crate::proxy::{Proxy, ProxySettings};
use crate::routing::{RouteSpec, TenantRouter};
use crate::seed;
use crate::server::{self, Shutdown};

/// The two care systems `shcr dev` runs when no manifests are given.
pub const DEMO_CARE_SYSTEMS: &str = include_str!("demo-care-systems.yaml");

/// Configuration of `shcr dev` (file section `dev`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevConfig {
    /// Where records and keys live.
    pub data_dir: PathBuf,
    /// Address of the HTTP listener.
    pub listen: SocketAddr,
    /// Multi-document YAML of CareSystem manifests; absent: the two demo care systems.
    pub care_systems: Option<PathBuf>,
    /// Load synthetic demo patients (idempotent).
    pub seed_demo: bool,
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./shcr-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            care_systems: None,
            seed_demo: false,
        }
    }
}

/// Flags and environment variables of `shcr dev`; each overrides the file's `dev` section.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct DevArgs {
    /// Directory holding every care system's records and keys [default: ./shcr-data]
    #[arg(long, env = "SHCR_DEV_DATA_DIR", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "SHCR_DEV_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// CareSystem manifests (multi-document YAML) [default: two demo care systems]
    #[arg(long, env = "SHCR_DEV_CARE_SYSTEMS", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub care_systems: Option<PathBuf>,
    /// Load a handful of synthetic patients per care system (safe to repeat)
    #[arg(long, env = "SHCR_DEV_SEED_DEMO")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub seed_demo: bool,
}

/// What stops `shcr dev` from starting.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot read the care-system manifests {path}: {source}")]
    ReadManifests {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}, document {index}: not a valid CareSystem manifest: {source}")]
    InvalidManifest {
        origin: String,
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("{origin}, document {index}: {reason}")]
    RejectedManifest {
        origin: String,
        index: usize,
        reason: String,
    },
    #[error("{origin} holds no CareSystem manifest")]
    NoCareSystems { origin: String },
    #[error("cannot open the record store of care system {care_system}: {source}")]
    OpenStore {
        care_system: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot listen on {addr}: {source} (is another `shcr dev` running? use --listen)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(
        "the gateway's assertion key {path} is not usable: {reason} (delete it to make a new one)"
    )]
    AssertionKey { path: PathBuf, reason: String },
    #[error("the dev token issuer is not usable: {reason}")]
    DevIssuer { reason: String },
    #[error("cannot load the demo data into care system {care_system}: {reason}")]
    Seed { care_system: String, reason: String },
}

/// Parses CareSystem manifests from multi-document YAML, checking what the apiserver's schema
/// would check (`origin` names the source in errors).
pub fn parse_care_systems(yaml: &str, origin: &str) -> Result<Vec<CareSystem>, DevError> {
    let mut out: Vec<CareSystem> = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let index = i + 1;
        let value =
            serde_yaml::Value::deserialize(doc).map_err(|source| DevError::InvalidManifest {
                origin: origin.to_string(),
                index,
                source,
            })?;
        if value.is_null() {
            continue;
        }
        let reject = |reason: String| DevError::RejectedManifest {
            origin: origin.to_string(),
            index,
            reason,
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "CareSystem" {
            return Err(reject(format!("kind is {kind:?}, expected \"CareSystem\"")));
        }
        let care_system: CareSystem =
            serde_yaml::from_value(value).map_err(|source| DevError::InvalidManifest {
                origin: origin.to_string(),
                index,
                source,
            })?;
        let name = care_system.metadata.name.clone().unwrap_or_default();
        CareSystemName::parse(&name)
            .map_err(|e| reject(format!("metadata.name {name:?} is not usable: {e}")))?;
        let ods_ok = |code: &str| OdsCode::parse(code).is_ok();
        if !ods_ok(&care_system.spec.ods_code) {
            return Err(reject(format!(
                "spec.odsCode {:?} is not an ODS code (3 to 10 upper-case letters and digits)",
                care_system.spec.ods_code
            )));
        }
        if let Some(bad) = care_system.spec.members.iter().find(|m| !ods_ok(m)) {
            return Err(reject(format!(
                "spec.members holds {bad:?}, not an ODS code"
            )));
        }
        if out
            .iter()
            .any(|c| c.metadata.name == care_system.metadata.name)
        {
            return Err(reject(format!("care system {name} is defined twice")));
        }
        out.push(care_system);
    }
    if out.is_empty() {
        return Err(DevError::NoCareSystems {
            origin: origin.to_string(),
        });
    }
    Ok(out)
}

/// One care system's store in dev mode.
struct DevStore {
    care_system: CareSystem,
    name: CareSystemName,
    store: Arc<FhirStore>,
}

async fn open_store(data_dir: &Path, care_system: CareSystem) -> Result<DevStore, DevError> {
    let raw_name = care_system.metadata.name.clone().unwrap_or_default();
    let err = |source: Box<dyn std::error::Error + Send + Sync>| DevError::OpenStore {
        care_system: raw_name.clone(),
        source,
    };
    let name = CareSystemName::parse(&raw_name).map_err(|e| err(Box::new(e)))?;
    let root = data_dir.join(name.as_str());
    let provider: Arc<dyn KeyProvider> = Arc::new(
        LocalKeyProvider::open(root.join("keys"))
            .await
            .map_err(|e| err(Box::new(e)))?,
    );
    let database = TenantDatabase::open(TenantConfig {
        care_system: name.clone(),
        storage: ObjectStorage::LocalDir(root.join("objects")),
        key_provider: provider,
        keyring: KeyringConfig::default(),
        engine: EngineConfig::default(),
    })
    .await
    .map_err(|e| err(Box::new(e)))?;
    Ok(DevStore {
        care_system,
        name,
        store: Arc::new(FhirStore::new(database, FhirStoreConfig::default())),
    })
}

/// The gateway's assertion signing key, created (0600) on first run under the data dir.
fn load_or_create_assertion_key(data_dir: &Path) -> Result<AssertionSigner, DevError> {
    let path = data_dir.join("gateway").join("assertion-key.pem");
    let fail = |reason: String| DevError::AssertionKey {
        path: path.clone(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(pem) => AssertionSigner::from_pkcs8_pem(&pem).map_err(|e| fail(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let signer = AssertionSigner::generate().map_err(|e| fail(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
            }
            write_private(&path, signer.to_pkcs8_pem().as_bytes())
                .map_err(|e| fail(e.to_string()))?;
            Ok(signer)
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Writes a new file readable only by its owner.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[derive(Serialize)]
struct CareSystemStatus {
    name: String,
    display_name: String,
    ods_code: String,
    members: Vec<String>,
    fhir_base: String,
    store: &'static str,
}

fn health_word(h: TenantHealth) -> &'static str {
    match h {
        TenantHealth::Ready => "ready",
        TenantHealth::Fenced => "fenced",
        TenantHealth::KeyUnavailable => "key-unavailable",
        TenantHealth::Closed => "closed",
    }
}

/// Runs `shcr dev` until `shutdown` resolves, then drains the gateway and closes every store.
pub async fn run(
    config: DevConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DevError> {
    let (yaml, origin) = match &config.care_systems {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|source| DevError::ReadManifests {
                path: path.clone(),
                source,
            })?,
            path.display().to_string(),
        ),
        None => (
            DEMO_CARE_SYSTEMS.to_string(),
            "the built-in demo care systems".into(),
        ),
    };
    let care_systems = parse_care_systems(&yaml, &origin)?;

    // Bind first: a clash with another `shcr dev` is reported before any store is opened. The
    // port queues connections until the stores are open, so `/healthz` answers only then.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DevError::Listen {
            addr: config.listen,
            source,
        })?;
    let listen = listener.local_addr().map_err(DevError::Serve)?;

    let signer = load_or_create_assertion_key(&config.data_dir)?;
    let issuer = DevIssuer::load_or_create(&config.data_dir).map_err(|e| DevError::DevIssuer {
        reason: e.to_string(),
    })?;

    let mut stores = Vec::new();
    for care_system in care_systems {
        let store = open_store(&config.data_dir, care_system).await?;
        tracing::info!(care_system = %store.name, "record store open");
        stores.push(store);
    }
    if config.seed_demo {
        for (index, s) in stores.iter().enumerate() {
            let seeded = seed::seed(&s.store, index)
                .await
                .map_err(|e| DevError::Seed {
                    care_system: s.name.to_string(),
                    reason: e.to_string(),
                })?;
            tracing::info!(care_system = %s.name, created = seeded.created, present = seeded.present, "demo data seeded");
        }
    }

    // Each store serves its own FHIR API on a loopback port, behind the gateway; they stop
    // only after the gateway has drained.
    let (stop_stores, stores_stopping) = watch::channel(false);
    let mut store_servers = Vec::new();
    let mut routes = Vec::new();
    for s in &stores {
        let store_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|source| DevError::Listen {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                source,
            })?;
        let addr = store_listener.local_addr().map_err(DevError::Serve)?;
        let app = shcr_store::api::router(s.store.clone(), signer.verifier());
        let mut stopping = stores_stopping.clone();
        store_servers.push(tokio::spawn(async move {
            axum::serve(store_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopping.wait_for(|stop| *stop).await;
                })
                .await
        }));
        let mut spec =
            RouteSpec::from_care_system(&s.care_system).ok_or_else(|| DevError::OpenStore {
                care_system: s.name.to_string(),
                source: "the manifest has no name".into(),
            })?;
        spec.endpoint = Some(format!("http://{addr}"));
        spec.ready = true;
        routes.push(spec);
    }

    let registry = MetricsRegistry::new();
    let metrics = GatewayMetrics::register(&registry);
    let router = TenantRouter::new(LimitsConfig::default());
    router.set_static(routes);
    let access =
        AccessControl::new(&[issuer.issuer_config()], SmartConfig::default()).map_err(|e| {
            DevError::DevIssuer {
                reason: e.to_string(),
            }
        })?;
    access.authenticator().register_metrics(&registry);
    let proxy = Arc::new(Proxy::new(
        router,
        access,
        signer,
        metrics,
        ProxySettings::default(),
    ));
    let ready = ReadyFlag::new();
    ready.set_ready(true);

    let base = format!("http://{listen}");
    let stores = Arc::new(stores);
    let status_stores = stores.clone();
    let status_base = base.clone();
    let issuer = Arc::new(issuer);
    let extra = Router::new()
        .route(
            "/",
            get(move || {
                let stores = status_stores.clone();
                let base = status_base.clone();
                async move {
                    let mut out = Vec::new();
                    for s in stores.iter() {
                        out.push(CareSystemStatus {
                            name: s.name.to_string(),
                            display_name: s.care_system.spec.display_name.clone(),
                            ods_code: s.care_system.spec.ods_code.clone(),
                            members: s.care_system.spec.members.clone(),
                            fhir_base: format!("{base}/{}/fhir", s.name),
                            store: health_word(s.store.database().health().await),
                        });
                    }
                    Json(out)
                }
            }),
        )
        .merge(shcr_runtime::metrics::router(
            registry,
            Readiness::from_flag(&ready),
        ))
        // The web app's sign-in: tokens from the dev issuer, in `shcr dev` only.
        .merge(crate::app::dev_token_routes(issuer.clone()));
    let app = server::app(proxy, extra);

    print_welcome(&config, &base, &stores, &issuer);

    let served = server::serve(listener, app, Shutdown::new(shutdown), DRAIN)
        .await
        .map_err(DevError::Serve);
    let _ = stop_stores.send(true);
    for server in store_servers {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "a store's HTTP server failed"),
            Err(e) => tracing::error!(error = %e, "a store's HTTP server panicked"),
        }
    }
    for s in stores.iter() {
        let unrecorded = s.store.flush_audit(DRAIN).await;
        if unrecorded > 0 {
            tracing::error!(care_system = %s.name, unrecorded, "AuditEvents still queued at shutdown are lost");
        }
        if let Err(e) = s.store.database().close().await {
            tracing::error!(care_system = %s.name, error = %e, "closing the record store failed");
        }
    }
    println!("shcr dev: every store flushed and closed");
    served
}

/// Lifetime of the example token printed at start-up.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The example token: a clinician at `org` with full access (`user/*.cruds`).
fn dev_token_request(care_system: &str, org: &str) -> TokenRequest {
    let mut request = TokenRequest::new(care_system, org, "R8000");
    request.ttl = DEV_TOKEN_TTL;
    request
}

/// Time given to in-flight requests at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

fn print_welcome(config: &DevConfig, base: &str, stores: &[DevStore], issuer: &DevIssuer) {
    println!(
        "shcr dev: {} care system(s) open in {}",
        stores.len(),
        config.data_dir.display()
    );
    for s in stores {
        println!(
            "  {:<20} {base}/{}/fhir   {} ({}), members: {}",
            s.name,
            s.name,
            s.care_system.spec.display_name,
            s.care_system.spec.ods_code,
            s.care_system.spec.members.join(", ")
        );
    }
    println!("app:     {base}/app/   (record viewer; {base}/ is the status page in a browser)");
    println!("status:  curl {base}/");
    println!("health:  curl {base}/healthz   metrics: curl {base}/metrics");
    if let Some(first) = stores.first()
        && let Some(member) = first.care_system.spec.members.first()
    {
        let request = dev_token_request(first.name.as_str(), member);
        match issuer.issue(&request) {
            Ok(token) => {
                println!(
                    "try it (token valid {} minutes; more with `shcr token --data-dir {} --care-system {} --org {member} --role R8000`):",
                    DEV_TOKEN_TTL.as_secs() / 60,
                    config.data_dir.display(),
                    first.name,
                );
                println!(
                    "  curl -H 'Authorization: Bearer {token}' '{base}/{}/fhir/Patient?_count=5'",
                    first.name
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot mint the example token"),
        }
    }
    println!("shcr dev: ready (Ctrl-C to stop)");
}
