//! Which token issuers the gateway trusts, and how: the typed configuration of one OIDC issuer.
//!
//! Job: [`IssuerConfig`] is what a platform team writes (YAML/JSON, unknown fields refused) for
//! each identity provider: its exact `iss`, the audiences it mints for the gateway, where its
//! signing keys come from ([`JwksSource`]), which claims carry the organisation and role
//! ([`ClaimsMapping`]), which signature algorithms it may use ([`SigningAlgorithm`]) and the
//! clock skew tolerated. [`IssuerConfig::check`] rejects a configuration that would be unsafe
//! or could never accept a token, so mistakes surface at start-up, not as 401s.
//!
//! Invariants:
//! - HMAC algorithms and `none` are not representable in [`SigningAlgorithm`]: a shared-secret
//!   or unsigned token can never be accepted, whatever the configuration says;
//! - a remote JWKS is fetched over HTTPS, except from a loopback address (tests, sidecars);
//! - the tolerated clock skew is at most [`MAX_CLOCK_SKEW`].

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

use super::claims::ClaimsMapping;

/// The placeholder an audience may contain: replaced by the care system named in the request
/// path, so a token minted for one care system is refused at every other (SMART's `aud` is the
/// FHIR base URL of the resource server, which is per care system here).
pub const CARE_SYSTEM_PLACEHOLDER: &str = "{care_system}";

/// The largest clock skew an issuer may be given.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The clock skew tolerated on `exp`/`nbf` unless configured otherwise.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The shortest time between two JWKS fetches for one issuer unless configured otherwise: an
/// unknown `kid` triggers a refetch at most this often, so forged `kid`s cannot make the
/// gateway hammer an identity provider.
pub const DEFAULT_JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// How long fetched keys are used before they are refreshed (so a revoked key stops working)
/// unless configured otherwise.
pub const DEFAULT_JWKS_MAX_AGE: Duration = Duration::from_secs(3600);

/// One trusted OIDC token issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` of its tokens, e.g. CIS2's
    /// `https://am.nhsidentity.spineservices.nhs.uk:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare`.
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one. Each may contain
    /// `{care_system}`, replaced by the care system of the request (see
    /// [`CARE_SYSTEM_PLACEHOLDER`]); without it the audience is the same for every care system
    /// (e.g. the gateway's OAuth client id).
    pub audiences: Vec<String>,
    /// Where the issuer's public signing keys come from.
    pub jwks: JwksSource,
    /// Which claims carry subject, organisation, role, scopes and patient.
    #[serde(default)]
    pub claims: ClaimsMapping,
    /// Signature algorithms accepted from this issuer [default: RS256, ES256, EdDSA]. The
    /// token's `alg` header must be one of these *and* match its key's type.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<SigningAlgorithm>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds [default: 60, at most 60].
    #[serde(default = "default_clock_skew", with = "seconds")]
    pub clock_skew: Duration,
    /// Shortest time between two JWKS fetches (an unknown `kid` triggers one), in seconds
    /// [default: 30, at least 1].
    #[serde(default = "default_refetch_interval", with = "seconds")]
    pub jwks_refetch_interval: Duration,
    /// How long fetched keys are trusted before they are refreshed, in seconds [default: 3600].
    #[serde(default = "default_max_age", with = "seconds")]
    pub jwks_max_age: Duration,
}

impl IssuerConfig {
    /// An issuer with the default claims mapping (NHS CIS2), algorithms and timings.
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>, jwks: JwksSource) -> Self {
        Self {
            issuer: issuer.into(),
            audiences,
            jwks,
            claims: ClaimsMapping::default(),
            algorithms: default_algorithms(),
            clock_skew: DEFAULT_CLOCK_SKEW,
            jwks_refetch_interval: DEFAULT_JWKS_REFETCH_INTERVAL,
            jwks_max_age: DEFAULT_JWKS_MAX_AGE,
        }
    }

    /// Refuses a configuration that is unsafe or could never accept a token.
    pub fn check(&self) -> Result<(), IssuerConfigError> {
        let problem = |reason: String| IssuerConfigError {
            issuer: self.issuer.clone(),
            reason,
        };
        if self.issuer.trim().is_empty() {
            return Err(problem("`issuer` is empty".to_owned()));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(|a| a.trim().is_empty()) {
            return Err(problem(
                "`audiences` must list at least one non-empty audience".to_owned(),
            ));
        }
        if self.algorithms.is_empty() {
            return Err(problem(
                "`algorithms` is empty: no token could be accepted".to_owned(),
            ));
        }
        if self.clock_skew > MAX_CLOCK_SKEW {
            return Err(problem(format!(
                "`clock_skew` is {}s; at most {}s is allowed",
                self.clock_skew.as_secs(),
                MAX_CLOCK_SKEW.as_secs()
            )));
        }
        if self.jwks_refetch_interval < Duration::from_secs(1) {
            return Err(problem(
                "`jwks_refetch_interval` must be at least 1 second".to_owned(),
            ));
        }
        if let JwksSource::Uri(uri) = &self.jwks {
            let loopback = match uri.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(name)) => name == "localhost",
                None => false,
            };
            if uri.scheme() != "https" && !(uri.scheme() == "http" && loopback) {
                return Err(problem(format!(
                    "the JWKS URI {uri} must use https (plain http is allowed only for loopback)"
                )));
            }
        }
        self.claims.check().map_err(problem)
    }

    /// The audiences accepted for a request to `care_system`.
    pub fn audiences_for(&self, care_system: &str) -> Vec<String> {
        self.audiences
            .iter()
            .map(|a| a.replace(CARE_SYSTEM_PLACEHOLDER, care_system))
            .collect()
    }
}

/// Where an issuer's signing keys come from. Written as a mapping with exactly one key:
/// `jwks: {uri: https://…}`, `jwks: {inline: {keys: […]}}` or `jwks: {file: /etc/…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "JwksSourceFields", into = "JwksSourceFields")]
pub enum JwksSource {
    /// A JWKS URL (the issuer's `jwks_uri`), fetched and cached.
    Uri(url::Url),
    /// A JWKS document given inline (the dev issuer, tests).
    Inline(serde_json::Value),
    /// A JWKS document in a file, read once at start-up.
    File(PathBuf),
}

/// The written form of [`JwksSource`] (serde_yaml writes enums as YAML tags; a one-key
/// mapping reads the same in YAML and JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwksSourceFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uri: Option<url::Url>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inline: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
}

impl TryFrom<JwksSourceFields> for JwksSource {
    type Error = &'static str;

    fn try_from(fields: JwksSourceFields) -> Result<Self, Self::Error> {
        match (fields.uri, fields.inline, fields.file) {
            (Some(uri), None, None) => Ok(Self::Uri(uri)),
            (None, Some(inline), None) => Ok(Self::Inline(inline)),
            (None, None, Some(file)) => Ok(Self::File(file)),
            _ => Err("jwks needs exactly one of `uri`, `inline` or `file`"),
        }
    }
}

impl From<JwksSource> for JwksSourceFields {
    fn from(source: JwksSource) -> Self {
        match source {
            JwksSource::Uri(uri) => Self {
                uri: Some(uri),
                ..Self::default()
            },
            JwksSource::Inline(inline) => Self {
                inline: Some(inline),
                ..Self::default()
            },
            JwksSource::File(file) => Self {
                file: Some(file),
                ..Self::default()
            },
        }
    }
}

/// A JWS signature algorithm the gateway may accept. Deliberately no HMAC and no `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SigningAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl SigningAlgorithm {
    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::EdDSA => "EdDSA",
        }
    }

    /// Parses an `alg` header value; `None` for anything not in this list (HMAC, `none`, …).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::RS256,
            Self::RS384,
            Self::RS512,
            Self::PS256,
            Self::PS384,
            Self::PS512,
            Self::ES256,
            Self::ES384,
            Self::EdDSA,
        ]
        .into_iter()
        .find(|alg| alg.name() == name)
    }

    pub(crate) fn jwt_algorithm(self) -> Algorithm {
        match self {
            Self::RS256 => Algorithm::RS256,
            Self::RS384 => Algorithm::RS384,
            Self::RS512 => Algorithm::RS512,
            Self::PS256 => Algorithm::PS256,
            Self::PS384 => Algorithm::PS384,
            Self::PS512 => Algorithm::PS512,
            Self::ES256 => Algorithm::ES256,
            Self::ES384 => Algorithm::ES384,
            Self::EdDSA => Algorithm::EdDSA,
        }
    }
}

impl std::fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A configured issuer that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("issuer {issuer:?}: {reason}")]
pub struct IssuerConfigError {
    /// The issuer's `issuer` value.
    pub issuer: String,
    /// What is wrong and what to change.
    pub reason: String,
}

fn default_algorithms() -> Vec<SigningAlgorithm> {
    vec![
        SigningAlgorithm::RS256,
        SigningAlgorithm::ES256,
        SigningAlgorithm::EdDSA,
    ]
}

fn default_clock_skew() -> Duration {
    DEFAULT_CLOCK_SKEW
}

fn default_refetch_interval() -> Duration {
    DEFAULT_JWKS_REFETCH_INTERVAL
}

fn default_max_age() -> Duration {
    DEFAULT_JWKS_MAX_AGE
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

    #[test]
    fn yaml_with_defaults_and_unknown_fields_refused() {
        let config: IssuerConfig = serde_yaml::from_str(
            "issuer: https://idp.example\naudiences: [shcr]\njwks:\n  uri: https://idp.example/jwks\n",
        )
        .expect("valid config");
        assert_eq!(config.algorithms.len(), 3);
        assert_eq!(config.clock_skew, DEFAULT_CLOCK_SKEW);
        config.check().expect("a sane config passes");

        let err = serde_yaml::from_str::<IssuerConfig>(
            "issuer: x\naudiences: [a]\njwks: {uri: https://x/j}\nalgorithm: [HS256]\n",
        )
        .expect_err("unknown field");
        assert!(err.to_string().contains("algorithm"), "{err}");
        let err = serde_yaml::from_str::<IssuerConfig>(
            "issuer: x\naudiences: [a]\njwks: {uri: https://x/j}\nalgorithms: [HS256]\n",
        )
        .expect_err("HMAC is not representable");
        assert!(err.to_string().contains("HS256"), "{err}");
        let err = serde_yaml::from_str::<IssuerConfig>(
            "issuer: x\naudiences: [a]\njwks: {uri: https://x/j, file: /k.json}\n",
        )
        .expect_err("two key sources");
        assert!(err.to_string().contains("exactly one"), "{err}");
        let round_trip: IssuerConfig =
            serde_json::from_value(serde_json::to_value(&config).expect("json")).expect("back");
        assert_eq!(round_trip, config);
    }

    #[test]
    fn unsafe_configs_are_refused_with_a_reason() {
        let base = IssuerConfig::new(
            "https://idp.example",
            vec!["shcr".to_owned()],
            JwksSource::Uri("http://idp.example/jwks".parse().expect("url")),
        );
        let err = base.check().expect_err("plain http to a remote host");
        assert!(err.reason.contains("https"), "{err}");

        let mut loopback = base.clone();
        loopback.jwks = JwksSource::Uri("http://127.0.0.1:9/jwks".parse().expect("url"));
        loopback.check().expect("loopback http is fine");

        let mut skew = loopback.clone();
        skew.clock_skew = Duration::from_secs(600);
        assert!(skew.check().expect_err("skew").reason.contains("60"));

        let mut no_aud = loopback.clone();
        no_aud.audiences.clear();
        assert!(no_aud.check().is_err());

        let mut no_alg = loopback;
        no_alg.algorithms.clear();
        assert!(no_alg.check().is_err());
    }

    #[test]
    fn audience_placeholder_names_the_care_system() {
        let config = IssuerConfig::new(
            "https://idp.example",
            vec![
                "urn:shcr:care-system:{care_system}".to_owned(),
                "client-1".to_owned(),
            ],
            JwksSource::Inline(serde_json::json!({"keys": []})),
        );
        assert_eq!(
            config.audiences_for("north-east"),
            vec!["urn:shcr:care-system:north-east", "client-1"]
        );
    }
}
