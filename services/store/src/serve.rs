//! `shcr store`: one care system's FHIR record store, as the operator deploys it.
//!
//! Job: turn [`StoreConfig`] (defaults < config file section `store` < `SHCR_STORE_*`
//! environment < flags; the operator's ConfigMap sets exactly the variables of [`StoreArgs`])
//! into a running store: check the settings, check the bucket and the KMS key, open the care
//! system's [`TenantDatabase`] on S3 with the KMS key provider, serve the FHIR API on `listen`
//! and `/metrics`, `/healthz`, `/readyz` on `metrics_listen`, and on shutdown drain requests and
//! close (flush) the database.
//!
//! Invariants:
//! - every setting is checked before anything is opened, and each refusal names the setting
//!   (its environment variable and flag) and what is wrong with it, never a secret;
//! - `/readyz` answers 200 only while the database is open and its key usable (re-checked every
//!   [`HEALTH_INTERVAL`]), and turns 503 as soon as shutdown starts;
//! - the database is closed (its writes flushed) after the last request is answered and the
//!   queued AuditEvents are written, on every exit path that opened it;
//! - AWS credentials come from the standard chain (environment, web identity, instance profile):
//!   the configuration never holds them.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::types::KeyState;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use shcr_fhir::identifiers::OdsCode;
use shcr_identity::AssertionVerifier;
use shcr_runtime::metrics::{MetricsRegistry, Readiness, ReadyFlag};
use tokio::sync::watch;

use crate::api::{FhirStore, FhirStoreConfig};
use crate::care_system::CareSystemName;
use crate::engine::EngineConfig;
use crate::engine::storage::ObjectStorage;
use crate::envelope::{KeyProvider, KeyringConfig, KmsKeyProvider};
use crate::tenant::{TenantConfig, TenantDatabase, TenantError, TenantHealth};

/// How often readiness re-checks the database and its key.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How long shutdown waits for queued AuditEvents to become durable.
pub const AUDIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of `shcr store` (file section `store`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The care system this store serves (its CareSystem's name).
    pub care_system: String,
    /// ODS code of the care system's lead organisation.
    pub ods_code: String,
    /// Human-readable name of the care system.
    pub display_name: String,
    /// ODS codes of the member organisations.
    pub members: Vec<String>,
    /// The care system's bucket.
    pub bucket: String,
    /// Key prefix inside the bucket (empty: the bucket is the care system's alone).
    pub prefix: String,
    /// Region of the bucket and the KMS key.
    pub region: String,
    /// The care system's KMS key (ARN, key id or alias).
    pub kms_key_arn: String,
    /// Address of the FHIR API listener.
    pub listen: SocketAddr,
    /// Address of the `/metrics`, `/healthz`, `/readyz` listener.
    pub metrics_listen: SocketAddr,
    /// S3 API endpoint for non-AWS object storage; absent: AWS.
    pub s3_endpoint: Option<String>,
    /// KMS API endpoint for a non-AWS KMS; absent: AWS.
    pub kms_endpoint: Option<String>,
    /// The gateway's Ed25519 public key (SPKI `PUBLIC KEY` PEM) for identity assertions.
    pub assertion_public_key: Option<String>,
    /// A file holding that PEM (e.g. a mounted Secret); exactly one of the two must be set.
    pub assertion_public_key_file: Option<PathBuf>,
    /// The largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Scheme and authority clients reach the store through (the gateway's), for `Location`
    /// and links; absent: from the request's `Host`.
    pub public_origin: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            care_system: String::new(),
            ods_code: String::new(),
            display_name: String::new(),
            members: Vec::new(),
            bucket: String::new(),
            prefix: String::new(),
            region: String::new(),
            kms_key_arn: String::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            s3_endpoint: None,
            kms_endpoint: None,
            assertion_public_key: None,
            assertion_public_key_file: None,
            max_body_bytes: FhirStoreConfig::default().max_body_bytes,
            public_origin: None,
        }
    }
}

/// Flags and environment variables of `shcr store`; each overrides the file's `store` section.
/// The variable names are the contract with the operator's store ConfigMap.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct StoreArgs {
    /// The care system this store serves
    #[arg(long, env = "SHCR_STORE_CARE_SYSTEM", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub care_system: Option<String>,
    /// ODS code of the care system's lead organisation
    #[arg(long, env = "SHCR_STORE_ODS_CODE", value_name = "CODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ods_code: Option<String>,
    /// Human-readable name of the care system
    #[arg(long, env = "SHCR_STORE_DISPLAY_NAME", value_name = "TEXT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// ODS codes of the member organisations, comma-separated
    #[arg(
        long,
        env = "SHCR_STORE_MEMBERS",
        value_name = "CODES",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
    /// The care system's S3 bucket
    #[arg(long, env = "SHCR_STORE_BUCKET", value_name = "BUCKET")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Key prefix inside the bucket [default: none]
    #[arg(long, env = "SHCR_STORE_PREFIX", value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Region of the bucket and the KMS key, e.g. eu-west-2
    #[arg(long, env = "SHCR_STORE_REGION", value_name = "REGION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The care system's KMS key (ARN, key id or alias)
    #[arg(long, env = "SHCR_STORE_KMS_KEY_ARN", value_name = "ARN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    /// Serve the FHIR API on this address [default: 0.0.0.0:8080]
    #[arg(long, env = "SHCR_STORE_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Serve /metrics, /healthz and /readyz on this address [default: 0.0.0.0:9090]
    #[arg(long, env = "SHCR_STORE_METRICS_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// S3 endpoint for non-AWS object storage, e.g. http://minio:9000
    #[arg(long, env = "SHCR_STORE_S3_ENDPOINT", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// KMS endpoint for a non-AWS KMS
    #[arg(long, env = "SHCR_STORE_KMS_ENDPOINT", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_endpoint: Option<String>,
    /// The gateway's identity-assertion public key (PEM text)
    #[arg(long, env = "SHCR_STORE_ASSERTION_PUBLIC_KEY", value_name = "PEM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assertion_public_key: Option<String>,
    /// File holding the gateway's identity-assertion public key (PEM)
    #[arg(
        long,
        env = "SHCR_STORE_ASSERTION_PUBLIC_KEY_FILE",
        value_name = "FILE"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assertion_public_key_file: Option<PathBuf>,
    /// Largest request body accepted, in bytes [default: 16777216]
    #[arg(long, env = "SHCR_STORE_MAX_BODY_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Scheme and authority clients use, for Location headers and links
    #[arg(long, env = "SHCR_STORE_PUBLIC_ORIGIN", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_origin: Option<String>,
}

/// Why `shcr store` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{setting} is not set ({how})")]
    Missing {
        setting: &'static str,
        how: &'static str,
    },
    #[error("{setting} is not valid: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
    #[error("cannot read the assertion public key file {path}: {source}")]
    ReadKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the gateway's assertion public key (from {origin}) is not usable: {reason}; expected \
         the Ed25519 `-----BEGIN PUBLIC KEY-----` PEM the gateway publishes"
    )]
    BadPublicKey { origin: String, reason: String },
    #[error("bucket {bucket:?} does not exist (in region {region}{endpoint})")]
    BucketMissing {
        bucket: String,
        region: String,
        endpoint: String,
    },
    #[error(
        "access to bucket {bucket:?} is denied: give the store's identity s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on it"
    )]
    BucketDenied { bucket: String },
    #[error("cannot reach bucket {bucket:?}{endpoint}: {reason}")]
    BucketUnreachable {
        bucket: String,
        endpoint: String,
        reason: String,
    },
    #[error(
        "KMS key {key} is {state}: the store cannot read or write records until the key is \
         enabled"
    )]
    KeyNotEnabled { key: String, state: String },
    #[error("KMS key {key} does not exist (in region {region}{endpoint})")]
    KeyMissing {
        key: String,
        region: String,
        endpoint: String,
    },
    #[error("cannot check KMS key {key}{endpoint}: {reason}")]
    KeyUnreachable {
        key: String,
        endpoint: String,
        reason: String,
    },
    #[error("cannot open the record store of care system {care_system}: {source}")]
    Open {
        care_system: String,
        source: Box<TenantError>,
    },
    #[error("cannot listen on {addr} ({setting}): {source}")]
    Listen {
        addr: SocketAddr,
        setting: &'static str,
        source: std::io::Error,
    },
    #[error("the {which} HTTP server failed: {source}")]
    Serve {
        which: &'static str,
        source: std::io::Error,
    },
    #[error("closing the record store (flushing its writes) failed: {0}")]
    Close(Box<TenantError>),
}

/// The checked settings: what [`run`] opens.
#[derive(Debug)]
pub struct CheckedConfig {
    pub care_system: CareSystemName,
    pub ods_code: OdsCode,
    pub members: Vec<OdsCode>,
    pub verifier: AssertionVerifier,
    config: StoreConfig,
}

impl StoreConfig {
    /// Checks every setting that can be checked without the network.
    pub fn check(self) -> Result<CheckedConfig, StoreError> {
        let care_system = match self.care_system.as_str() {
            "" => {
                return Err(StoreError::Missing {
                    setting: "the care system",
                    how: "SHCR_STORE_CARE_SYSTEM, --care-system or store.care_system",
                });
            }
            name => CareSystemName::parse(name).map_err(|e| StoreError::Invalid {
                setting: "the care system (SHCR_STORE_CARE_SYSTEM)",
                reason: e.to_string(),
            })?,
        };
        let ods_code = match self.ods_code.as_str() {
            "" => {
                return Err(StoreError::Missing {
                    setting: "the care system's ODS code",
                    how: "SHCR_STORE_ODS_CODE, --ods-code or store.ods_code",
                });
            }
            code => OdsCode::parse(code).map_err(|e| StoreError::Invalid {
                setting: "the ODS code (SHCR_STORE_ODS_CODE)",
                reason: e.to_string(),
            })?,
        };
        let members = self
            .members
            .iter()
            .map(|m| m.trim())
            .filter(|m| !m.is_empty())
            .map(|m| {
                OdsCode::parse(m).map_err(|e| StoreError::Invalid {
                    setting: "the member ODS codes (SHCR_STORE_MEMBERS)",
                    reason: format!("{m:?}: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let required = [
            (
                &self.bucket,
                "the bucket",
                "SHCR_STORE_BUCKET, --bucket or store.bucket",
            ),
            (
                &self.region,
                "the region",
                "SHCR_STORE_REGION, --region or store.region",
            ),
            (
                &self.kms_key_arn,
                "the KMS key",
                "SHCR_STORE_KMS_KEY_ARN, --kms-key-arn or store.kms_key_arn",
            ),
        ];
        for (value, setting, how) in required {
            if value.trim().is_empty() {
                return Err(StoreError::Missing { setting, how });
            }
        }
        if self.max_body_bytes == 0 {
            return Err(StoreError::Invalid {
                setting: "the body limit (SHCR_STORE_MAX_BODY_BYTES)",
                reason: "must be at least 1 byte".into(),
            });
        }
        for (endpoint, setting) in [
            (
                &self.s3_endpoint,
                "the S3 endpoint (SHCR_STORE_S3_ENDPOINT)",
            ),
            (
                &self.kms_endpoint,
                "the KMS endpoint (SHCR_STORE_KMS_ENDPOINT)",
            ),
        ] {
            if let Some(endpoint) = endpoint {
                url::Url::parse(endpoint).map_err(|e| StoreError::Invalid {
                    setting,
                    reason: format!("{endpoint:?} is not a URL: {e}"),
                })?;
            }
        }
        let verifier = self.load_verifier()?;
        Ok(CheckedConfig {
            care_system,
            ods_code,
            members,
            verifier,
            config: self,
        })
    }

    fn load_verifier(&self) -> Result<AssertionVerifier, StoreError> {
        let (pem, origin) = match (&self.assertion_public_key, &self.assertion_public_key_file) {
            (Some(_), Some(_)) => {
                return Err(StoreError::Invalid {
                    setting: "the assertion public key",
                    reason: "both SHCR_STORE_ASSERTION_PUBLIC_KEY and \
                             SHCR_STORE_ASSERTION_PUBLIC_KEY_FILE are set; set one"
                        .into(),
                });
            }
            (None, None) => {
                return Err(StoreError::Missing {
                    setting: "the gateway's assertion public key",
                    how: "SHCR_STORE_ASSERTION_PUBLIC_KEY (PEM text) or \
                          SHCR_STORE_ASSERTION_PUBLIC_KEY_FILE; without it no request could be \
                          authenticated",
                });
            }
            (Some(pem), None) => (pem.clone(), "SHCR_STORE_ASSERTION_PUBLIC_KEY".to_string()),
            (None, Some(path)) => (
                std::fs::read_to_string(path).map_err(|source| StoreError::ReadKeyFile {
                    path: path.clone(),
                    source,
                })?,
                path.display().to_string(),
            ),
        };
        AssertionVerifier::from_public_key_pem(&pem).map_err(|e| StoreError::BadPublicKey {
            origin,
            reason: e.to_string(),
        })
    }
}

fn endpoint_note(endpoint: &Option<String>) -> String {
    endpoint
        .as_ref()
        .map(|e| format!(" at {e}"))
        .unwrap_or_default()
}

/// The AWS clients of the store: the standard credential chain, the configured region and
/// endpoint overrides.
async fn aws_clients(config: &StoreConfig) -> (aws_sdk_s3::Client, aws_sdk_kms::Client) {
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        .load()
        .await;
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

/// Checks that the bucket exists and is reachable, so a typo or a missing grant is reported as
/// such rather than as a failure deep inside the database's first write.
async fn check_bucket(s3: &aws_sdk_s3::Client, config: &StoreConfig) -> Result<(), StoreError> {
    use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
    let endpoint = endpoint_note(&config.s3_endpoint);
    match s3.head_bucket().bucket(&config.bucket).send().await {
        Ok(_) => Ok(()),
        Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => {
            Err(StoreError::BucketMissing {
                bucket: config.bucket.clone(),
                region: config.region.clone(),
                endpoint,
            })
        }
        Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 403 => {
            Err(StoreError::BucketDenied {
                bucket: config.bucket.clone(),
            })
        }
        Err(e) => Err(StoreError::BucketUnreachable {
            bucket: config.bucket.clone(),
            endpoint,
            reason: DisplayErrorContext(&e).to_string(),
        }),
    }
}

/// Checks that the KMS key exists and is enabled.
async fn check_key(kms: &aws_sdk_kms::Client, config: &StoreConfig) -> Result<(), StoreError> {
    use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata};
    let key = config.kms_key_arn.clone();
    let endpoint = endpoint_note(&config.kms_endpoint);
    match kms.describe_key().key_id(&key).send().await {
        Ok(out) => {
            let state = out.key_metadata().and_then(|m| m.key_state().cloned());
            match state {
                Some(KeyState::Enabled) => Ok(()),
                Some(state) => Err(StoreError::KeyNotEnabled {
                    key,
                    state: state.as_str().to_string(),
                }),
                None => Err(StoreError::KeyUnreachable {
                    key,
                    endpoint,
                    reason: "DescribeKey returned no key state".into(),
                }),
            }
        }
        Err(e) if e.code() == Some("NotFoundException") => Err(StoreError::KeyMissing {
            key,
            region: config.region.clone(),
            endpoint,
        }),
        Err(e) => Err(StoreError::KeyUnreachable {
            key,
            endpoint,
            reason: match (e.code(), e.message()) {
                (Some(code), Some(message)) => format!("KMS {code}: {message}"),
                _ => DisplayErrorContext(&e).to_string(),
            },
        }),
    }
}

/// Opens the care system's database: S3 storage, KMS key provider.
async fn open_database(
    checked: &CheckedConfig,
    kms: aws_sdk_kms::Client,
) -> Result<TenantDatabase, StoreError> {
    let config = &checked.config;
    let provider: Arc<dyn KeyProvider> =
        Arc::new(KmsKeyProvider::new(kms, config.kms_key_arn.clone()));
    TenantDatabase::open(TenantConfig {
        care_system: checked.care_system.clone(),
        storage: ObjectStorage::S3 {
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            region: config.region.clone(),
            endpoint: config.s3_endpoint.clone(),
            credentials: None,
        },
        key_provider: provider,
        keyring: KeyringConfig::default(),
        engine: EngineConfig::default(),
    })
    .await
    .map_err(|source| StoreError::Open {
        care_system: checked.care_system.to_string(),
        source: Box::new(source),
    })
}

fn health_word(health: TenantHealth) -> &'static str {
    match health {
        TenantHealth::Ready => "ready",
        TenantHealth::Fenced => "fenced",
        TenantHealth::KeyUnavailable => "key-unavailable",
        TenantHealth::Closed => "closed",
    }
}

/// Runs the store until `shutdown` resolves, then drains requests and closes the database.
/// `on_ready` receives the bound addresses (FHIR, metrics) once the store serves (tests bind
/// port 0 and learn the ports here).
pub async fn run(
    config: StoreConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr, SocketAddr) + Send,
) -> Result<(), StoreError> {
    let checked = config.check()?;
    let config = checked.config.clone();

    let listener = bind(config.listen, "SHCR_STORE_LISTEN").await?;
    let metrics_listener = bind(config.metrics_listen, "SHCR_STORE_METRICS_LISTEN").await?;

    let (s3, kms) = aws_clients(&config).await;
    check_bucket(&s3, &config).await?;
    check_key(&kms, &config).await?;
    let database = open_database(&checked, kms).await?;
    tracing::info!(
        care_system = %checked.care_system,
        ods_code = checked.ods_code.as_str(),
        members = checked.members.len(),
        "record store open"
    );
    let store = Arc::new(FhirStore::new(
        database,
        FhirStoreConfig {
            max_body_bytes: config.max_body_bytes,
            public_origin: config.public_origin.clone(),
            ..FhirStoreConfig::default()
        },
    ));

    let served = serve(
        store.clone(),
        checked.verifier,
        listener,
        metrics_listener,
        shutdown,
        on_ready,
    )
    .await;
    let unrecorded = store.flush_audit(AUDIT_FLUSH_TIMEOUT).await;
    if unrecorded > 0 {
        tracing::error!(
            unrecorded,
            "shutting down with AuditEvents still queued: they are lost"
        );
    }
    let closed = store.database().close().await;
    tracing::info!(care_system = %checked.care_system, "record store closed");
    served?;
    closed.map_err(|e| StoreError::Close(Box::new(e)))
}

async fn bind(
    addr: SocketAddr,
    setting: &'static str,
) -> Result<tokio::net::TcpListener, StoreError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StoreError::Listen {
            addr,
            setting,
            source,
        })
}

/// Serves the FHIR API and the metrics endpoints until `shutdown`, keeping readiness current.
async fn serve(
    store: Arc<FhirStore>,
    verifier: AssertionVerifier,
    listener: tokio::net::TcpListener,
    metrics_listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr, SocketAddr) + Send,
) -> Result<(), StoreError> {
    let local = |l: &tokio::net::TcpListener, addr_setting: &'static str| {
        l.local_addr().map_err(|source| StoreError::Listen {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            setting: addr_setting,
            source,
        })
    };
    let fhir_addr = local(&listener, "SHCR_STORE_LISTEN")?;
    let metrics_addr = local(&metrics_listener, "SHCR_STORE_METRICS_LISTEN")?;

    let ready = ReadyFlag::new();
    let metrics = MetricsRegistry::new();
    let up = Gauge::<i64, AtomicI64>::default();
    metrics.register(
        "store_ready",
        "1 while the record store's database is open and its key usable, else 0",
        up.clone(),
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let health = {
        let store = store.clone();
        let ready = ready.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let health = store.database().health().await;
                if last != Some(health) {
                    if health == TenantHealth::Ready {
                        tracing::info!(state = health_word(health), "record store health");
                    } else {
                        tracing::warn!(state = health_word(health), "record store health");
                    }
                    last = Some(health);
                }
                let is_ready = health == TenantHealth::Ready && !*stop.borrow();
                ready.set_ready(is_ready);
                up.set(i64::from(is_ready));
                tokio::select! {
                    _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
                    _ = stop.changed() => {
                        ready.set_ready(false);
                        up.set(0);
                        return;
                    }
                }
            }
        })
    };

    let app = crate::api::router(store, verifier);
    let metrics_app = shcr_runtime::metrics::router(metrics, Readiness::from_flag(&ready));

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // Err means the sender is gone, which also means stop.
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let fhir_server = axum::serve(listener, app).with_graceful_shutdown(stopped(stop_rx.clone()));
    let metrics_server =
        axum::serve(metrics_listener, metrics_app).with_graceful_shutdown(stopped(stop_rx.clone()));
    let fhir_task = tokio::spawn(async move { fhir_server.await });
    let metrics_task = tokio::spawn(async move { metrics_server.await });
    on_ready(fhir_addr, metrics_addr);
    tracing::info!(%fhir_addr, %metrics_addr, "record store serving");

    shutdown.await;
    tracing::info!("shutting down: draining requests, then closing the record store");
    let _ = stop_tx.send(true);
    let _ = health.await;
    let fhir = join(fhir_task, "FHIR").await;
    let metrics = join(metrics_task, "metrics").await;
    fhir.and(metrics)
}

async fn join(
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    which: &'static str,
) -> Result<(), StoreError> {
    match task.await {
        Ok(result) => result.map_err(|source| StoreError::Serve { which, source }),
        Err(e) => Err(StoreError::Serve {
            which,
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> StoreConfig {
        let signer = shcr_identity::AssertionSigner::generate().expect("keygen");
        StoreConfig {
            care_system: "north-east".into(),
            ods_code: "QHM".into(),
            members: vec!["A81001".into(), " ".into()],
            bucket: "b".into(),
            region: "eu-west-2".into(),
            kms_key_arn: "arn:aws:kms:eu-west-2:111122223333:key/x".into(),
            assertion_public_key: Some(signer.public_key_pem()),
            ..StoreConfig::default()
        }
    }

    fn refusal(config: StoreConfig) -> String {
        config.check().expect_err("refused").to_string()
    }

    #[test]
    fn a_valid_config_checks() {
        let checked = valid().check().expect("valid");
        assert_eq!(checked.care_system.as_str(), "north-east");
        assert_eq!(checked.members.len(), 1, "blank members are ignored");
    }

    #[test]
    fn each_missing_setting_is_named_with_its_variable() {
        for (config, variable) in [
            (
                StoreConfig {
                    care_system: String::new(),
                    ..valid()
                },
                "SHCR_STORE_CARE_SYSTEM",
            ),
            (
                StoreConfig {
                    bucket: String::new(),
                    ..valid()
                },
                "SHCR_STORE_BUCKET",
            ),
            (
                StoreConfig {
                    kms_key_arn: String::new(),
                    ..valid()
                },
                "SHCR_STORE_KMS_KEY_ARN",
            ),
            (
                StoreConfig {
                    assertion_public_key: None,
                    ..valid()
                },
                "SHCR_STORE_ASSERTION_PUBLIC_KEY",
            ),
            (
                StoreConfig {
                    ods_code: "not an ods code".into(),
                    ..valid()
                },
                "SHCR_STORE_ODS_CODE",
            ),
            (
                StoreConfig {
                    members: vec!["bad code!".into()],
                    ..valid()
                },
                "SHCR_STORE_MEMBERS",
            ),
        ] {
            let message = refusal(config);
            assert!(message.contains(variable), "{variable}: {message}");
        }
    }

    #[test]
    fn a_bad_public_key_is_refused_clearly() {
        let message = refusal(StoreConfig {
            assertion_public_key: Some(
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----".into(),
            ),
            ..valid()
        });
        assert!(message.contains("not usable"), "{message}");
        assert!(message.contains("Ed25519"), "{message}");

        let both = refusal(StoreConfig {
            assertion_public_key_file: Some("/nonexistent".into()),
            ..valid()
        });
        assert!(both.contains("set one"), "{both}");

        let missing_file = refusal(StoreConfig {
            assertion_public_key: None,
            assertion_public_key_file: Some("/nonexistent/gateway.pem".into()),
            ..valid()
        });
        assert!(
            missing_file.contains("/nonexistent/gateway.pem"),
            "{missing_file}"
        );
    }
}
