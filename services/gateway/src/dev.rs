//! `shcr dev`: the platform on one machine, on the embedded default.
//!
//! Reads `CareSystem` manifests (exactly what a platform team would `kubectl apply`; two demo
//! care systems when none are given), opens one encrypted record store per care system on the
//! local filesystem with the local key provider, and serves health, readiness, metrics and a
//! status page. SIGTERM or Ctrl-C closes every store (flushing it) before exit.
//!
//! Layout of the data dir: `<dir>/<care-system>/objects/` (the care system's "bucket") and
//! `<dir>/<care-system>/keys/master.key` (its local master key, 0600). Each care system has its
//! own key, as in production each has its own KMS key.
//!
//! Invariants: `/healthz` answers 200 only once every store is open; a restart on the same dir
//! finds every record (all state is in the dir).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use shcr_fhir::identifiers::OdsCode;
use shcr_operator::CareSystem;
use shcr_runtime::metrics::{MetricsRegistry, Readiness, ReadyFlag};
use shcr_store::CareSystemName;
use shcr_store::engine::EngineConfig;
use shcr_store::engine::storage::ObjectStorage;
use shcr_store::envelope::{KeyProvider, KeyringConfig, LocalKeyProvider};
use shcr_store::tenant::{TenantConfig, TenantDatabase, TenantHealth};

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
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./shcr-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            care_systems: None,
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
    database: TenantDatabase,
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
        database,
    })
}

#[derive(Serialize)]
struct CareSystemStatus {
    name: String,
    display_name: String,
    ods_code: String,
    members: Vec<String>,
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

/// Runs `shcr dev` until `shutdown` resolves, then closes every store.
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

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DevError::Listen {
            addr: config.listen,
            source,
        })?;
    let ready = ReadyFlag::new();
    let metrics = MetricsRegistry::new();

    let mut stores = Vec::new();
    for care_system in care_systems {
        let store = open_store(&config.data_dir, care_system).await?;
        tracing::info!(care_system = %store.name, "record store open");
        stores.push(store);
    }
    let stores = Arc::new(stores);
    ready.set_ready(true);

    let status_stores = stores.clone();
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let stores = status_stores.clone();
                async move {
                    let mut out = Vec::new();
                    for s in stores.iter() {
                        out.push(CareSystemStatus {
                            name: s.name.to_string(),
                            display_name: s.care_system.spec.display_name.clone(),
                            ods_code: s.care_system.spec.ods_code.clone(),
                            members: s.care_system.spec.members.clone(),
                            store: health_word(s.database.health().await),
                        });
                    }
                    Json(out)
                }
            }),
        )
        .merge(shcr_runtime::metrics::router(
            metrics,
            Readiness::from_flag(&ready),
        ));

    let base = format!("http://{}", config.listen);
    println!(
        "shcr dev: {} care system(s) open in {}",
        stores.len(),
        config.data_dir.display()
    );
    for s in stores.iter() {
        println!(
            "  {:<20} {} ({}), members: {}",
            s.name,
            s.care_system.spec.display_name,
            s.care_system.spec.ods_code,
            s.care_system.spec.members.join(", ")
        );
    }
    println!("status:  curl {base}/");
    println!("health:  curl {base}/healthz   metrics: curl {base}/metrics");
    println!("shcr dev: ready (Ctrl-C to stop)");

    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(DevError::Serve);
    for s in stores.iter() {
        if let Err(e) = s.database.close().await {
            tracing::error!(care_system = %s.name, error = %e, "closing the record store failed");
        }
    }
    println!("shcr dev: every store flushed and closed");
    served
}
