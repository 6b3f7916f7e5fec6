//! The operator's configuration: one typed struct, loaded by the binary from defaults < file
//! (section `operator`) < environment < flags.
//!
//! Invariants: defaults are the safe ones (no cloud identity annotation, egress only to DNS and
//! HTTPS, metrics on their own port); unknown keys are rejected. The gateway's identity-assertion
//! public key has no default: without it every store would refuse every request, so the operator
//! refuses to start ([`AssertionPublicKey::load`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::leader::LeaderElectionConfig;

/// Configuration of `shcr operator`. The Kubernetes connection comes from the environment
/// (in-cluster service account, or `KUBECONFIG`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct OperatorConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// Image of the record store when a CareSystem does not name one.
    pub store_image: String,
    /// Annotations on every store ServiceAccount, e.g. `eks.amazonaws.com/role-arn` (IRSA) so
    /// the store gets credentials for its own bucket and key. `{care_system}` in a value is
    /// replaced by the CareSystem's name, so each store can have its own role
    /// (`arn:aws:iam::111122223333:role/shcr-store-{care_system}`).
    pub store_service_account_annotations: BTreeMap<String, String>,
    /// S3 API endpoint for non-AWS object storage (e.g. `http://minio:9000`); absent: AWS.
    pub s3_endpoint: Option<String>,
    /// KMS API endpoint for a non-AWS KMS; absent: AWS.
    pub kms_endpoint: Option<String>,
    /// Region for the KMS client and for buckets' default (each CareSystem names its bucket's).
    pub region: Option<String>,
    /// File holding the gateway's identity-assertion public key (SPKI `PUBLIC KEY` PEM, Ed25519).
    /// Every store gets it (`SHCR_STORE_ASSERTION_PUBLIC_KEY`) to verify who is asking. Required.
    pub assertion_public_key_file: Option<PathBuf>,
    /// The URL clients reach the gateway's FHIR API under (an origin such as
    /// `https://fhir.example.nhs.uk`, no path). Every store gets it as
    /// `SHCR_STORE_PUBLIC_ORIGIN`, so the absolute links it writes (`Location`, `fullUrl`,
    /// paging) name the gateway and never come from a client's `Host` header. Absent: stores
    /// get none (the operator warns at start-up).
    pub gateway_public_url: Option<String>,
    /// Namespace the gateway runs in: the only source of traffic a store accepts.
    pub gateway_namespace: String,
    /// Labels selecting the gateway's pods in `gateway_namespace`.
    pub gateway_pod_labels: BTreeMap<String, String>,
    /// Where stores may connect besides DNS: object storage and KMS endpoints.
    pub store_egress: Vec<EgressRule>,
    /// Days a deleted CareSystem's KMS key stays pending deletion (7 to 30) under
    /// `deletionPolicy: Delete`; during that window the deletion can be cancelled.
    pub key_deletion_window_days: i32,
    /// Reconcile only CareSystems whose labels match this selector (e.g. `shard=a`); absent:
    /// all of them.
    pub care_system_selector: Option<String>,
    /// Leader election among operator replicas.
    pub leader_election: LeaderElectionConfig,
    /// How often a care system is re-checked (cloud resources and drift) when nothing changes.
    #[serde(with = "seconds")]
    pub resync_interval: Duration,
    /// At most this many care systems are reconciled at once (each reconcile waits on cloud
    /// APIs, so some parallelism speeds up a burst of new care systems); 0: unbounded.
    pub reconcile_concurrency: u16,
}

/// One destination stores may open connections to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// IP range in CIDR notation, e.g. `10.0.0.0/16`.
    pub cidr: String,
    /// TCP port.
    pub port: i32,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            store_image: concat!("ghcr.io/shcr-dev/shcr:", env!("CARGO_PKG_VERSION")).to_owned(),
            store_service_account_annotations: BTreeMap::new(),
            s3_endpoint: None,
            kms_endpoint: None,
            region: None,
            assertion_public_key_file: None,
            gateway_public_url: None,
            gateway_namespace: "shcr-system".to_owned(),
            gateway_pod_labels: BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                "shcr-gateway".to_owned(),
            )]),
            store_egress: vec![EgressRule {
                cidr: "0.0.0.0/0".to_owned(),
                port: 443,
            }],
            key_deletion_window_days: 30,
            care_system_selector: None,
            leader_election: LeaderElectionConfig::default(),
            resync_interval: Duration::from_secs(300),
            reconcile_concurrency: 16,
        }
    }
}

/// Command-line flags (and environment variables) overriding [`OperatorConfig`]; pass to
/// `Overrides::section("operator", ..)`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct OperatorArgs {
    /// Serve /metrics, /healthz and /readyz on this address [default: 0.0.0.0:9090]
    #[arg(long, env = "SHCR_OPERATOR_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,

    /// Record store image for CareSystems that do not name one
    #[arg(long, env = "SHCR_OPERATOR_STORE_IMAGE", value_name = "IMAGE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_image: Option<String>,

    /// S3 endpoint for non-AWS object storage, e.g. http://minio:9000
    #[arg(long, env = "SHCR_OPERATOR_S3_ENDPOINT", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,

    /// KMS endpoint for a non-AWS KMS
    #[arg(long, env = "SHCR_OPERATOR_KMS_ENDPOINT", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_endpoint: Option<String>,

    /// The gateway's identity-assertion public key (SPKI PEM), handed to every store
    #[arg(
        long,
        env = "SHCR_OPERATOR_ASSERTION_PUBLIC_KEY_FILE",
        value_name = "FILE"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assertion_public_key_file: Option<PathBuf>,

    /// The URL clients reach the gateway under, e.g. https://fhir.example.nhs.uk; stores build links from it
    #[arg(long, env = "SHCR_OPERATOR_GATEWAY_PUBLIC_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_public_url: Option<String>,

    /// Namespace the gateway runs in [default: shcr-system]
    #[arg(
        long,
        env = "SHCR_OPERATOR_GATEWAY_NAMESPACE",
        value_name = "NAMESPACE"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_namespace: Option<String>,
}

impl OperatorConfig {
    /// The stores' public origin: [`Self::gateway_public_url`] checked and normalised
    /// (`None` when not configured).
    pub fn store_public_origin(&self) -> Result<Option<String>, GatewayUrlError> {
        self.gateway_public_url
            .as_deref()
            .map(shcr_identity::public_origin)
            .transpose()
            .map_err(GatewayUrlError)
    }
}

/// Why `gateway_public_url` is unusable.
#[derive(Debug, thiserror::Error)]
#[error(
    "gateway_public_url (--gateway-public-url, SHCR_OPERATOR_GATEWAY_PUBLIC_URL) is not usable: {0}"
)]
pub struct GatewayUrlError(#[source] pub shcr_identity::OriginError);

/// The gateway's identity-assertion public key, checked to be an Ed25519 SPKI PEM. Stores get
/// its PEM text and verify with it the identity the gateway asserts on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionPublicKey {
    pem: String,
}

/// Why the identity-assertion public key is unusable.
#[derive(Debug, thiserror::Error)]
pub enum AssertionKeyError {
    #[error(
        "no identity-assertion public key is configured: set --assertion-public-key-file \
         (SHCR_OPERATOR_ASSERTION_PUBLIC_KEY_FILE, or operator.assertion_public_key_file) to the \
         gateway's public key PEM; without it every store would refuse every request"
    )]
    Missing,
    #[error("cannot read the identity-assertion public key file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the identity-assertion public key in {path} is not usable: {source}")]
    Invalid {
        path: PathBuf,
        source: shcr_identity::assertion::KeyError,
    },
}

impl AssertionPublicKey {
    /// Checks `pem` is an Ed25519 SPKI `PUBLIC KEY` PEM.
    pub fn from_pem(pem: &str) -> Result<Self, shcr_identity::assertion::KeyError> {
        shcr_identity::AssertionVerifier::from_public_key_pem(pem)?;
        Ok(Self {
            pem: format!("{}\n", pem.trim()),
        })
    }

    /// Reads and checks the key file `config` names.
    pub fn load(config: &OperatorConfig) -> Result<Self, AssertionKeyError> {
        let path = config
            .assertion_public_key_file
            .as_deref()
            .ok_or(AssertionKeyError::Missing)?;
        Self::read(path)
    }

    fn read(path: &Path) -> Result<Self, AssertionKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| AssertionKeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pem(&text).map_err(|source| AssertionKeyError::Invalid {
            path: path.to_owned(),
            source,
        })
    }

    /// The PEM text (trimmed, one trailing newline).
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(path: Option<PathBuf>) -> OperatorConfig {
        OperatorConfig {
            assertion_public_key_file: path,
            ..OperatorConfig::default()
        }
    }

    #[test]
    fn the_gateway_public_url_must_be_an_origin() {
        assert_eq!(
            OperatorConfig::default().store_public_origin().ok(),
            Some(None)
        );
        let config = OperatorConfig {
            gateway_public_url: Some("https://FHIR.example.nhs.uk/".to_owned()),
            ..OperatorConfig::default()
        };
        assert_eq!(
            config.store_public_origin().ok(),
            Some(Some("https://fhir.example.nhs.uk".to_owned()))
        );
        let config = OperatorConfig {
            gateway_public_url: Some("fhir.example.nhs.uk/fhir".to_owned()),
            ..OperatorConfig::default()
        };
        let err = config.store_public_origin().expect_err("not an origin");
        assert!(err.to_string().contains("gateway_public_url"), "{err}");
    }

    #[test]
    fn assertion_key_is_required_and_checked() {
        assert!(matches!(
            AssertionPublicKey::load(&config_with(None)),
            Err(AssertionKeyError::Missing)
        ));
        let dir = std::env::temp_dir().join(format!("shcr-operator-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let signer = shcr_identity::AssertionSigner::generate().expect("key");

        let public = dir.join("public.pem");
        std::fs::write(&public, signer.public_key_pem()).expect("write");
        let key = AssertionPublicKey::load(&config_with(Some(public))).expect("valid key");
        assert_eq!(key.pem().trim(), signer.public_key_pem().trim());

        let private = dir.join("private.pem");
        std::fs::write(&private, signer.to_pkcs8_pem()).expect("write");
        assert!(matches!(
            AssertionPublicKey::load(&config_with(Some(private))),
            Err(AssertionKeyError::Invalid { .. })
        ));
        assert!(matches!(
            AssertionPublicKey::load(&config_with(Some(dir.join("absent.pem")))),
            Err(AssertionKeyError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
