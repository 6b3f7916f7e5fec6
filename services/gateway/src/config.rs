//! The gateway's configuration: one typed struct, loaded by the binary from defaults < file
//! (section `gateway`) < environment < flags.
//!
//! Invariants: defaults are the safe ones — no issuer is trusted until one is configured (so a
//! fresh gateway accepts no token), health and metrics have their own port, limits are finite;
//! unknown keys are rejected.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::auth::IssuerConfig;
use crate::limits::LimitsConfig;

/// Configuration of `shcr gateway`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the FHIR API (`/{care-system}/fhir/...`) is served.
    pub listen: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (also answered on `listen`,
    /// except `/metrics`).
    pub metrics_listen: SocketAddr,
    /// The URL clients reach the FHIR API under (`https://fhir.example.nhs.uk`): an origin,
    /// no path. Every identity assertion carries it, so stores build absolute links
    /// (`Location`, `fullUrl`, paging) from it and never from a client's `Host`. Absent:
    /// `http://` and `listen` (`localhost` for an unspecified address).
    pub public_url: Option<String>,
    /// The identity providers whose tokens are accepted. Empty: none (every request is 401).
    pub issuers: Vec<IssuerConfig>,
    /// PKCS#8 PEM of the Ed25519 key that signs identity assertions for the stores (the stores
    /// get its public half). Required.
    pub assertion_key_file: Option<PathBuf>,
    /// Where the routing table comes from.
    pub routing: RoutingSource,
    /// Per-care-system limits.
    pub limits: LimitsConfig,
    /// Timeouts, in seconds.
    pub timeouts: TimeoutsConfig,
    /// OAuth endpoints advertised by SMART discovery (`.well-known/smart-configuration`), for
    /// apps that log in through the gateway's identity provider.
    pub smart: SmartConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            public_url: None,
            issuers: Vec::new(),
            assertion_key_file: None,
            routing: RoutingSource::default(),
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            smart: SmartConfig::default(),
        }
    }
}

impl GatewayConfig {
    /// The origin the FHIR API is served under: [`Self::public_url`] checked and normalised,
    /// or derived from [`Self::listen`].
    pub fn public_origin(&self) -> Result<String, shcr_identity::OriginError> {
        match &self.public_url {
            Some(url) => shcr_identity::public_origin(url),
            None if self.listen.ip().is_unspecified() => {
                Ok(format!("http://localhost:{}", self.listen.port()))
            }
            None => Ok(format!("http://{}", self.listen)),
        }
    }
}

/// Where the routing table comes from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum RoutingSource {
    /// `CareSystem` objects in the cluster, followed live (in-cluster service account or
    /// `KUBECONFIG`).
    #[default]
    Kube,
    /// CareSystem manifests in a file (multi-document YAML), read at start-up. A care system is
    /// routed to its `status.endpoint`; one without an endpoint answers 503.
    Manifests { file: PathBuf },
}

/// Timeouts of the proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// From a request's arrival to the store's response head; past it the client gets 504.
    #[serde(with = "seconds")]
    pub request: Duration,
    /// Connecting to a store.
    #[serde(with = "seconds")]
    pub connect: Duration,
    /// How long an idle connection to a store is kept in the pool.
    #[serde(with = "seconds")]
    pub pool_idle: Duration,
    /// Lifetime of each identity assertion (at most 300).
    #[serde(with = "seconds")]
    pub assertion: Duration,
    /// Time given to in-flight requests at shutdown.
    #[serde(with = "seconds")]
    pub drain: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(30),
            connect: Duration::from_secs(2),
            pool_idle: Duration::from_secs(60),
            assertion: Duration::from_secs(60),
            drain: Duration::from_secs(30),
        }
    }
}

/// OAuth endpoints for SMART discovery.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmartConfig {
    /// The identity provider's authorization endpoint.
    pub authorization_endpoint: Option<String>,
    /// The identity provider's token endpoint.
    pub token_endpoint: Option<String>,
}

/// Flags and environment variables of `shcr gateway`; each overrides the file's `gateway`
/// section.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct GatewayArgs {
    /// Serve the FHIR API on this address [default: 0.0.0.0:8080]
    #[arg(long, env = "SHCR_GATEWAY_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Serve /metrics, /healthz and /readyz on this address [default: 0.0.0.0:9090]
    #[arg(long, env = "SHCR_GATEWAY_METRICS_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// The URL clients reach the FHIR API under, e.g. https://fhir.example.nhs.uk [default: http:// and the listen address]
    #[arg(long, env = "SHCR_GATEWAY_PUBLIC_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// PKCS#8 PEM of the Ed25519 key that signs identity assertions for the stores
    #[arg(long, env = "SHCR_GATEWAY_ASSERTION_KEY_FILE", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assertion_key_file: Option<PathBuf>,
    /// Route from CareSystem manifests in FILE instead of watching the cluster
    #[arg(long, env = "SHCR_GATEWAY_CARE_SYSTEMS", value_name = "FILE")]
    #[serde(
        rename = "routing",
        skip_serializing_if = "Option::is_none",
        serialize_with = "manifests_routing"
    )]
    pub care_systems: Option<PathBuf>,
}

fn manifests_routing<S: Serializer>(
    file: &Option<PathBuf>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match file {
        Some(file) => RoutingSource::Manifests { file: file.clone() }.serialize(serializer),
        None => serializer.serialize_none(),
    }
}

mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(value.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_defaults_and_a_flag_override() {
        let file: GatewayConfig = serde_yaml::from_str(
            "listen: 127.0.0.1:1\nrouting: {source: kube}\nlimits: {max_body_bytes: 10}\ntimeouts: {request: 0.5}\n",
        )
        .expect("valid");
        assert_eq!(file.limits.max_body_bytes, 10);
        assert_eq!(file.limits.burst, LimitsConfig::default().burst);
        assert_eq!(file.timeouts.request, Duration::from_millis(500));
        assert_eq!(file.timeouts.connect, TimeoutsConfig::default().connect);

        let args = GatewayArgs {
            care_systems: Some(PathBuf::from("cs.yaml")),
            ..GatewayArgs::default()
        };
        let value = serde_json::to_value(&args).expect("serialises");
        assert_eq!(
            value,
            serde_json::json!({"routing": {"source": "manifests", "file": "cs.yaml"}})
        );
        let err = serde_yaml::from_str::<GatewayConfig>("limts: {}\n").expect_err("typo");
        assert!(err.to_string().contains("limts"), "{err}");
    }

    #[test]
    fn the_public_origin_is_configured_or_derived_from_listen() {
        let config = GatewayConfig::default();
        assert_eq!(
            config.public_origin().as_deref(),
            Ok("http://localhost:8080")
        );
        let config = GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            ..GatewayConfig::default()
        };
        assert_eq!(
            config.public_origin().as_deref(),
            Ok("http://127.0.0.1:9000")
        );
        let config = GatewayConfig {
            public_url: Some("https://fhir.example.nhs.uk/".to_owned()),
            ..GatewayConfig::default()
        };
        assert_eq!(
            config.public_origin().as_deref(),
            Ok("https://fhir.example.nhs.uk")
        );
        let config = GatewayConfig {
            public_url: Some("https://fhir.example.nhs.uk/fhir".to_owned()),
            ..GatewayConfig::default()
        };
        let err = config.public_origin().expect_err("a path");
        assert!(err.to_string().contains("no path"), "{err}");
    }
}
