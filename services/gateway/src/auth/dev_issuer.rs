//! The dev token issuer: what `shcr dev` trusts and `shcr token` signs with, so the FHIR API can
//! be tried without an identity provider.
//!
//! Job: [`DevIssuer::load_or_create`] keeps one Ed25519 key at `<data-dir>/dev-issuer/key.pem`
//! (PKCS#8 PEM, mode 0600, directory 0700), creating it on first use; [`DevIssuer::issue`] signs
//! a CIS2-shaped token (`nhsid_nrbac_roles` + `selected_roleid`, SMART `scope`, optional
//! `patient`); [`DevIssuer::issuer_config`] is the [`IssuerConfig`] the dev gateway trusts, with
//! the public key inline.
//!
//! Audience convention: `aud` is `urn:shcr:care-system:<name>` ([`DEV_AUDIENCE`], with the
//! `{care_system}` placeholder), so a dev token works at the care system it was minted for and
//! is refused (401) at every other, as a SMART token is bound to one FHIR server.
//!
//! Invariants:
//! - the dev issuer is an ordinary [`IssuerConfig`]: a production gateway never accepts its
//!   tokens unless configured to trust its key like any other issuer;
//! - the private key never leaves the key file; a key file readable by group or others is
//!   refused rather than used;
//! - every request is checked before signing (care-system name, ODS code, scopes, patient id,
//!   lifetime at most [`MAX_DEV_TOKEN_TTL`]), so `shcr token` never prints a token the gateway
//!   would refuse for its shape.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SecureRandom as _;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use shcr_fhir::identifiers::OdsCode;
use shcr_identity::Scopes;
use shcr_store::CareSystemName;

use super::issuer::{IssuerConfig, JwksSource, SigningAlgorithm};

/// The `iss` of dev tokens (`.invalid`: it is no real host).
pub const DEV_ISSUER: &str = "https://dev-issuer.shcr.invalid";

/// The `aud` of dev tokens; `{care_system}` is the care system they are minted for.
pub const DEV_AUDIENCE: &str = "urn:shcr:care-system:{care_system}";

/// The longest lifetime of a dev token.
pub const MAX_DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The `person_roleid` of the single role in a dev token.
const DEV_ROLE_ID: &str = "dev-role-1";

/// What a dev token should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The care system it is for (its `aud`).
    pub care_system: String,
    /// The ODS code of the organisation the user acts for.
    pub org: String,
    /// The role code, e.g. `R8000`.
    pub role: String,
    /// SMART scopes, space-separated.
    pub scope: String,
    /// For patient-facing tokens: the patient id.
    pub patient: Option<String>,
    /// The subject [default: `dev-user`].
    pub user: Option<String>,
    /// Lifetime.
    pub ttl: Duration,
}

impl TokenRequest {
    /// A clinician token with the defaults: scope `user/*.cruds`, one hour.
    pub fn new(
        care_system: impl Into<String>,
        org: impl Into<String>,
        role: impl Into<String>,
    ) -> Self {
        Self {
            care_system: care_system.into(),
            org: org.into(),
            role: role.into(),
            scope: "user/*.cruds".to_owned(),
            patient: None,
            user: None,
            ttl: Duration::from_secs(3600),
        }
    }
}

/// Flags of `shcr token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The `shcr dev` data directory holding the dev issuer's key [default: the `dev.data_dir`
    /// setting, ./shcr-data]
    #[arg(long, env = "SHCR_DEV_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The care system the token is for, e.g. north-east
    #[arg(long, value_name = "NAME")]
    pub care_system: String,
    /// ODS code of the organisation the user acts for, e.g. RR8
    #[arg(long, value_name = "ODS")]
    pub org: String,
    /// National RBAC role code, e.g. R8000
    #[arg(long, value_name = "CODE")]
    pub role: String,
    /// SMART scopes, space-separated
    #[arg(long, value_name = "SCOPES", default_value = "user/*.cruds")]
    pub scope: String,
    /// For a patient-facing token (with patient/ scopes): the patient's id
    #[arg(long, value_name = "ID")]
    pub patient: Option<String>,
    /// The user (subject) [default: dev-user]
    #[arg(long, value_name = "ID")]
    pub user: Option<String>,
    /// Lifetime, e.g. 15m, 8h (at most 24h)
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
}

impl TokenArgs {
    /// The token these flags ask for.
    pub fn request(&self) -> TokenRequest {
        TokenRequest {
            care_system: self.care_system.clone(),
            org: self.org.clone(),
            role: self.role.clone(),
            scope: self.scope.clone(),
            patient: self.patient.clone(),
            user: self.user.clone(),
            ttl: self.ttl,
        }
    }
}

/// Why the dev issuer cannot load its key or sign a token.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not the dev issuer's Ed25519 key ({detail}); delete it to make a new one")]
    BadKey { path: PathBuf, detail: String },
    #[error(
        "{path} can be read by other users; run `chmod 600 {path}` (or delete it to make a new key)"
    )]
    InsecureKeyFile { path: PathBuf },
    #[error("invalid {field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("cannot sign the token: {0}")]
    Signing(String),
}

/// The dev token issuer and its key.
pub struct DevIssuer {
    key_path: PathBuf,
    encoding: EncodingKey,
    public_raw: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("key_path", &self.key_path)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// Loads `<data_dir>/dev-issuer/key.pem`, creating the key (0600) if there is none.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, DevIssuerError> {
        let dir = data_dir.join("dev-issuer");
        let key_path = dir.join("key.pem");
        if !key_path.exists() {
            create_key(&dir, &key_path)?;
        }
        let io = |action| {
            let path = key_path.clone();
            move |source| DevIssuerError::Io {
                action,
                path,
                source,
            }
        };
        let metadata = fs::metadata(&key_path).map_err(io("inspect"))?;
        if is_readable_by_others(&metadata) {
            return Err(DevIssuerError::InsecureKeyFile { path: key_path });
        }
        let text = fs::read_to_string(&key_path).map_err(io("read"))?;
        let bad_key = |detail: String| DevIssuerError::BadKey {
            path: key_path.clone(),
            detail,
        };
        let block = pem::parse(text.trim()).map_err(|e| bad_key(e.to_string()))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(bad_key(format!("a {:?} PEM, not PRIVATE KEY", block.tag())));
        }
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(block.contents())
            .map_err(|e| bad_key(e.to_string()))?;
        // jsonwebtoken's EdDSA signer reads v1 PKCS#8.
        let v1 = pair.to_pkcs8v1().map_err(|e| bad_key(e.to_string()))?;
        let public_raw = pair.public_key().as_ref().to_vec();
        Ok(Self {
            kid: thumbprint(&public_raw),
            encoding: EncodingKey::from_ed_der(v1.as_ref()),
            public_raw,
            key_path,
        })
    }

    /// Where the private key lives.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// The key id (RFC 7638 thumbprint) in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWKS.
    pub fn jwks(&self) -> Value {
        json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "use": "sig",
            "alg": "EdDSA",
            "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&self.public_raw),
        }]})
    }

    /// The issuer configuration a dev gateway trusts: this key inline, EdDSA only, CIS2 claims,
    /// `aud` = [`DEV_AUDIENCE`].
    pub fn issuer_config(&self) -> IssuerConfig {
        let mut config = IssuerConfig::new(
            DEV_ISSUER,
            vec![DEV_AUDIENCE.to_owned()],
            JwksSource::Inline(self.jwks()),
        );
        config.algorithms = vec![SigningAlgorithm::EdDSA];
        config
    }

    /// Signs a CIS2-shaped token for `request`.
    pub fn issue(&self, request: &TokenRequest) -> Result<String, DevIssuerError> {
        let invalid = |field, reason: String| DevIssuerError::InvalidRequest { field, reason };
        let care_system = CareSystemName::parse(&request.care_system)
            .map_err(|e| invalid("--care-system", e.to_string()))?;
        let org = OdsCode::parse(&request.org).map_err(|e| invalid("--org", e.to_string()))?;
        let role = request.role.trim();
        if role.is_empty() || role.len() > 64 || !role.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "--role",
                "expected a role code such as R8000 (1-64 printable characters, no spaces)"
                    .to_owned(),
            ));
        }
        let scopes =
            Scopes::parse(&request.scope).map_err(|e| invalid("--scope", e.to_string()))?;
        if scopes.is_empty() {
            return Err(invalid(
                "--scope",
                "no SMART clinical scope (e.g. user/*.rs): the token would permit nothing"
                    .to_owned(),
            ));
        }
        if let Some(patient) = &request.patient {
            let valid = (1..=64).contains(&patient.len())
                && patient
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !valid {
                return Err(invalid(
                    "--patient",
                    "expected a FHIR Patient id (1-64 of A-Z a-z 0-9 - .)".to_owned(),
                ));
            }
        } else if scopes.has_patient_context() {
            return Err(invalid(
                "--patient",
                "patient/ scopes need --patient, the patient the token is confined to".to_owned(),
            ));
        }
        if request.ttl.is_zero() || request.ttl > MAX_DEV_TOKEN_TTL {
            return Err(invalid(
                "--ttl",
                format!(
                    "expected a lifetime between 1s and {}",
                    humantime::format_duration(MAX_DEV_TOKEN_TTL)
                ),
            ));
        }
        let user = request.user.as_deref().unwrap_or("dev-user");
        if user.trim().is_empty() {
            return Err(invalid("--user", "empty".to_owned()));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut claims = json!({
            "iss": DEV_ISSUER,
            "aud": DEV_AUDIENCE.replace(super::CARE_SYSTEM_PLACEHOLDER, care_system.as_str()),
            "sub": user,
            "iat": now,
            "nbf": now,
            "exp": now + request.ttl.as_secs().max(1),
            "jti": random_id()?,
            "scope": scopes.to_string(),
            "selected_roleid": DEV_ROLE_ID,
            "nhsid_nrbac_roles": [{
                "person_roleid": DEV_ROLE_ID,
                "org_code": org.as_str(),
                "role_code": role,
                "activity_codes": [],
            }],
        });
        if let Some(patient) = &request.patient {
            claims["patient"] = json!(patient);
        }
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| DevIssuerError::Signing(e.to_string()))
    }
}

fn create_key(dir: &Path, key_path: &Path) -> Result<(), DevIssuerError> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| DevIssuerError::Io {
            action,
            path,
            source,
        }
    };
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io("create", dir))?;
    let document = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
        .map_err(|e| DevIssuerError::Signing(format!("cannot generate a key: {e}")))?;
    let text = pem::encode(&pem::Pem::new("PRIVATE KEY", document.as_ref().to_vec()));
    // Write a private temporary file, then link it into place: a concurrent `shcr token` or
    // `shcr dev` either sees no key or a whole one, and the first writer wins.
    let temp = dir.join(format!("key.pem.{}.tmp", std::process::id()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temp).map_err(io("create", &temp))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("write", &temp))?;
    let linked = fs::hard_link(&temp, key_path);
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io("create", key_path)(e)),
    }
}

#[cfg(unix)]
fn is_readable_by_others(metadata: &fs::Metadata) -> bool {
    std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o077 != 0
}

#[cfg(not(unix))]
fn is_readable_by_others(_metadata: &fs::Metadata) -> bool {
    false
}

/// RFC 7638 JWK thumbprint of an Ed25519 public key.
fn thumbprint(public_raw: &[u8]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public_raw)
    );
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        canonical.as_bytes(),
    ))
}

fn random_id() -> Result<String, DevIssuerError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|e| DevIssuerError::Signing(format!("no randomness: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DevIssuer::load_or_create(dir.path()).expect("create");
        let second = DevIssuer::load_or_create(dir.path()).expect("reload");
        assert_eq!(first.kid(), second.kid());
        #[cfg(unix)]
        {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &fs::metadata(first.key_path()).expect("meta").permissions(),
            );
            assert_eq!(mode & 0o777, 0o600);
            fs::set_permissions(
                first.key_path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            )
            .expect("chmod");
            let err = DevIssuer::load_or_create(dir.path()).expect_err("world-readable");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn bad_requests_name_the_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let issuer = DevIssuer::load_or_create(dir.path()).expect("create");
        let ok = TokenRequest::new("north-east", "RR8", "R8000");
        issuer.issue(&ok).expect("valid request");
        let cases = [
            (
                "--care-system",
                TokenRequest {
                    care_system: "North East".into(),
                    ..ok.clone()
                },
            ),
            (
                "--org",
                TokenRequest {
                    org: "rr8".into(),
                    ..ok.clone()
                },
            ),
            (
                "--scope",
                TokenRequest {
                    scope: "user/Observation.xyz".into(),
                    ..ok.clone()
                },
            ),
            (
                "--scope",
                TokenRequest {
                    scope: "openid".into(),
                    ..ok.clone()
                },
            ),
            (
                "--patient",
                TokenRequest {
                    scope: "patient/*.rs".into(),
                    ..ok.clone()
                },
            ),
            (
                "--ttl",
                TokenRequest {
                    ttl: Duration::from_secs(90_000),
                    ..ok.clone()
                },
            ),
            (
                "--role",
                TokenRequest {
                    role: " ".into(),
                    ..ok.clone()
                },
            ),
        ];
        for (flag, request) in cases {
            let err = issuer.issue(&request).expect_err(flag);
            assert!(err.to_string().contains(flag), "{flag}: {err}");
        }
    }
}
