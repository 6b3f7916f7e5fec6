//! Authentication and authorisation at the gateway: who is calling, and may they do this here.
//!
//! Job: [`Authenticator::authenticate`] verifies an OIDC bearer JWT against the configured
//! issuers ([`IssuerConfig`]) and maps its claims to a [`Principal`]; [`classify`] says what a
//! FHIR request asks to do and [`authorize`] (or [`Authenticator::authorize`], which also logs
//! and counts) whether the principal may do it in a care system. [`DevIssuer`] is the token
//! issuer of `shcr dev` and `shcr token`.
//!
//! The order at the gateway: classify the request (public URLs need no token) → authenticate
//! (401, or 503 while an issuer's keys cannot be fetched) → authorise against the care system's
//! members (403) → sign the identity assertion from [`Principal::identity`].
//!
//! Invariants:
//! - the algorithm comes from the issuer's allow-list *and* must match the key's type and curve;
//!   `none` and HMAC are refused before any key is looked at (no HS256-with-the-public-key);
//! - `iss` selects the issuer, then `iss`, `aud`, `exp` and `nbf` are all checked, with at most
//!   60 s of clock skew; tokens over [`MAX_TOKEN_BYTES`] are refused unread;
//! - a 401 carries `WWW-Authenticate: Bearer` with an RFC 6750 error and an `OperationOutcome`;
//!   a 403 an `OperationOutcome` that speaks of the token, never of records;
//! - every refusal is counted by reason (bounded label values) and logged without patient data
//!   and without the token.

mod claims;
mod dev_issuer;
mod issuer;
mod jwks;
mod policy;

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Map, Value};
use shcr_fhir::outcome::{IssueType, OperationOutcome};
use shcr_runtime::metrics::MetricsRegistry;

pub use claims::{ClaimsError, ClaimsMapping, ClaimsStyle, Principal};
pub use dev_issuer::{
    DEV_AUDIENCE, DEV_ISSUER, DevIssuer, DevIssuerError, MAX_DEV_TOKEN_TTL, TokenArgs, TokenRequest,
};
pub use issuer::{
    CARE_SYSTEM_PLACEHOLDER, IssuerConfig, IssuerConfigError, JwksSource, MAX_CLOCK_SKEW,
    SigningAlgorithm,
};
pub use policy::{
    Access, Compartment, Denial, RequestClass, ResourceTypes, Unclassified, authorize, classify,
};

use jwks::{KeyCache, KeyLookupError};

/// The largest bearer token accepted; larger ones are refused without being parsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Why a request is not authenticated. Every variant is a 401 except
/// [`AuthError::KeysUnavailable`] (503: the identity provider, not the client, is at fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    MissingToken,
    #[error("the Authorization header is not `Bearer <token>`: {0}")]
    MalformedHeader(&'static str),
    #[error("the token is larger than {limit} bytes")]
    TokenTooLarge { limit: usize },
    #[error("the token is not a signed JWT: {0}")]
    Malformed(String),
    #[error("unsigned tokens (alg none) are not accepted")]
    Unsigned,
    #[error("the token is signed with {alg}; shared-secret (HMAC) signatures are not accepted")]
    Hmac { alg: String },
    #[error(
        "the token's algorithm is not one this gateway supports (RS*, PS*, ES256, ES384, EdDSA)"
    )]
    UnsupportedAlgorithm,
    #[error("the token's issuer does not allow algorithm {alg}")]
    AlgorithmNotAllowed { alg: SigningAlgorithm },
    #[error("the token's header has a `crit` extension this gateway does not understand")]
    CriticalHeader,
    #[error("the token's issuer is not one this gateway trusts")]
    UntrustedIssuer,
    #[error("the token's key id (kid) is not among its issuer's current signing keys")]
    UnknownKey,
    #[error("the token has no key id (kid) and its issuer has several signing keys")]
    AmbiguousKey,
    #[error("the token says {alg} but its key ({key}) cannot make {alg} signatures")]
    KeyMismatch {
        alg: SigningAlgorithm,
        key: &'static str,
    },
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("the token is not meant for this care system (aud)")]
    WrongAudience,
    #[error("the token's issuer (iss) does not match")]
    WrongIssuer,
    #[error("the token has no {0} claim")]
    MissingClaim(String),
    #[error("{0}")]
    Claims(#[from] ClaimsError),
    #[error("the signing keys of the token's issuer cannot be fetched; try again shortly")]
    KeysUnavailable,
}

impl AuthError {
    /// A low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::MalformedHeader(_) | Self::Malformed(_) | Self::CriticalHeader => "malformed",
            Self::TokenTooLarge { .. } => "too_large",
            Self::Unsigned
            | Self::Hmac { .. }
            | Self::UnsupportedAlgorithm
            | Self::AlgorithmNotAllowed { .. }
            | Self::KeyMismatch { .. } => "algorithm",
            Self::UntrustedIssuer | Self::WrongIssuer => "issuer",
            Self::UnknownKey | Self::AmbiguousKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongAudience => "audience",
            Self::MissingClaim(_) | Self::Claims(_) => "claims",
            Self::KeysUnavailable => "keys_unavailable",
        }
    }

    /// The HTTP status: 401, or 503 for [`AuthError::KeysUnavailable`].
    pub fn status(&self) -> StatusCode {
        match self {
            Self::KeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 §3).
    pub fn challenge(&self) -> String {
        let error = match self {
            // No credentials at all: a bare challenge, no error code.
            Self::MissingToken => return "Bearer".to_owned(),
            Self::MalformedHeader(_) => "invalid_request",
            _ => "invalid_token",
        };
        // error_description allows %x20-21 / %x23-5B / %x5D-7E only.
        let description: String = self
            .to_string()
            .chars()
            .map(|c| match c {
                '"' | '\\' => '\'',
                c if (' '..='~').contains(&c) => c,
                _ => ' ',
            })
            .collect();
        format!("Bearer error=\"{error}\", error_description=\"{description}\"")
    }

    /// The `OperationOutcome`.
    pub fn outcome(&self) -> OperationOutcome {
        let code = match self {
            Self::KeysUnavailable => IssueType::Transient,
            _ => IssueType::Login,
        };
        OperationOutcome::error(code, self.to_string())
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let mut response = fhir_response(self.status(), &self.outcome());
        if let Ok(challenge) = HeaderValue::from_str(&self.challenge()) {
            response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
        }
        if self == Self::KeysUnavailable {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

pub(crate) fn fhir_response(status: StatusCode, outcome: &OperationOutcome) -> Response {
    let mut response = (status, outcome.to_json().to_string()).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// The configured issuers cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(transparent)]
    Issuer(#[from] IssuerConfigError),
    #[error("issuer {0:?} is configured twice")]
    Duplicate(String),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Counters of refused requests, by reason.
#[derive(Debug, Clone, Default)]
struct AuthMetrics {
    unauthenticated: Family<ReasonLabel, Counter>,
    forbidden: Family<ReasonLabel, Counter>,
}

struct Issuer {
    config: IssuerConfig,
    keys: KeyCache,
}

/// Verifies bearer tokens against the trusted issuers. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    issuers: Arc<HashMap<String, Issuer>>,
    metrics: AuthMetrics,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Trusts `issuers`, fetching remote JWKS with `http`. Inline and file JWKS are parsed now;
    /// remote ones on first use (or [`Authenticator::warm_up`]).
    pub fn new(issuers: Vec<IssuerConfig>, http: reqwest::Client) -> Result<Self, AuthConfigError> {
        let mut by_iss = HashMap::new();
        for config in issuers {
            config.check()?;
            let keys =
                KeyCache::new(&config, http.clone()).map_err(|reason| IssuerConfigError {
                    issuer: config.issuer.clone(),
                    reason,
                })?;
            let iss = config.issuer.clone();
            if by_iss
                .insert(iss.clone(), Issuer { config, keys })
                .is_some()
            {
                return Err(AuthConfigError::Duplicate(iss));
            }
        }
        Ok(Self {
            issuers: Arc::new(by_iss),
            metrics: AuthMetrics::default(),
        })
    }

    /// Registers the refusal counters: `shcr_gateway_unauthenticated_total{reason}` (401/503)
    /// and `shcr_gateway_forbidden_total{reason}` (403).
    pub fn register_metrics(&self, registry: &MetricsRegistry) {
        registry.register(
            "gateway_unauthenticated",
            "Requests refused for missing or invalid credentials, by reason",
            self.metrics.unauthenticated.clone(),
        );
        registry.register(
            "gateway_forbidden",
            "Authenticated requests refused by the access policy, by reason",
            self.metrics.forbidden.clone(),
        );
    }

    /// Fetches every remote JWKS now; returns the issuers whose keys could not be fetched
    /// (requests for them will retry, rate-limited).
    pub async fn warm_up(&self) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for (iss, issuer) in self.issuers.iter() {
            if let Err(error) = issuer.keys.warm_up().await {
                failed.push((iss.clone(), error));
            }
        }
        failed
    }

    /// Verifies the `Authorization` header of a request to `care_system` and says who is
    /// calling. Counts and logs (without the token) every refusal.
    pub async fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
        care_system: &str,
    ) -> Result<Principal, AuthError> {
        let result = self.verify(authorization, care_system).await;
        if let Err(error) = &result {
            self.metrics
                .unauthenticated
                .get_or_create(&ReasonLabel {
                    reason: error.reason(),
                })
                .inc();
            tracing::info!(
                care_system,
                reason = error.reason(),
                error = %error,
                "request not authenticated"
            );
        }
        result
    }

    /// [`authorize`], with the refusal counted and logged (subject, organisation, role and
    /// reason; never a patient id).
    pub fn authorize(
        &self,
        principal: &Principal,
        care_system: &str,
        members: &[String],
        class: &RequestClass,
    ) -> Result<(), Denial> {
        let result = authorize(principal, members, class);
        if let Err(denial) = &result {
            self.metrics
                .forbidden
                .get_or_create(&ReasonLabel {
                    reason: denial.reason(),
                })
                .inc();
            tracing::info!(
                care_system,
                subject = %principal.subject,
                organisation = %principal.organisation,
                role = %principal.role,
                reason = denial.reason(),
                denial = %denial,
                "request denied"
            );
        }
        result
    }

    async fn verify(
        &self,
        authorization: Option<&HeaderValue>,
        care_system: &str,
    ) -> Result<Principal, AuthError> {
        let token = bearer_token(authorization)?;
        let UnverifiedToken {
            alg: alg_name,
            kid,
            claims,
        } = unverified_parts(token)?;
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(AuthError::Unsigned);
        }
        if alg_name.starts_with("HS") {
            return Err(AuthError::Hmac { alg: alg_name });
        }
        let alg = SigningAlgorithm::from_name(&alg_name).ok_or(AuthError::UnsupportedAlgorithm)?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::MissingClaim("iss".to_owned()))?;
        let Some(issuer) = self.issuers.get(iss) else {
            tracing::debug!(iss, "token from an issuer that is not configured");
            return Err(AuthError::UntrustedIssuer);
        };
        let config = &issuer.config;
        if !config.algorithms.contains(&alg) {
            return Err(AuthError::AlgorithmNotAllowed { alg });
        }
        let key = issuer
            .keys
            .key_for(kid.as_deref())
            .await
            .map_err(|e| match e {
                KeyLookupError::Unknown => AuthError::UnknownKey,
                KeyLookupError::Ambiguous => AuthError::AmbiguousKey,
                KeyLookupError::Unavailable(_) => AuthError::KeysUnavailable,
            })?;
        if !key.verifies(alg) {
            return Err(AuthError::KeyMismatch {
                alg,
                key: key.kind.name(),
            });
        }
        let mut validation = Validation::new(alg.jwt_algorithm());
        validation.leeway = config.clock_skew.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&config.audiences_for(care_system));
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let verified =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation).map_err(
                |e| match e.into_kind() {
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidAudience => AuthError::WrongAudience,
                    ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                    ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim),
                    ErrorKind::InvalidAlgorithm => AuthError::KeyMismatch {
                        alg,
                        key: key.kind.name(),
                    },
                    ErrorKind::InvalidClaimFormat(claim) => {
                        AuthError::Malformed(format!("the {claim} claim has the wrong type"))
                    }
                    other => AuthError::Malformed(format!("{other:?}")),
                },
            )?;
        Ok(config.claims.principal(&config.issuer, &verified.claims)?)
    }
}

/// The token of a `Bearer` Authorization header.
fn bearer_token(authorization: Option<&HeaderValue>) -> Result<&str, AuthError> {
    let header = authorization.ok_or(AuthError::MissingToken)?;
    if header.len() > MAX_TOKEN_BYTES + "Bearer ".len() {
        return Err(AuthError::TokenTooLarge {
            limit: MAX_TOKEN_BYTES,
        });
    }
    let header = header
        .to_str()
        .map_err(|_| AuthError::MalformedHeader("it holds non-ASCII characters"))?;
    let (scheme, token) = header
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedHeader("no token after the scheme"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader("the scheme is not Bearer"));
    }
    let token = token.trim();
    if token.is_empty() || token.contains(' ') {
        return Err(AuthError::MalformedHeader("expected exactly one token"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::TokenTooLarge {
            limit: MAX_TOKEN_BYTES,
        });
    }
    Ok(token)
}

/// What a token says before its signature is checked.
struct UnverifiedToken {
    alg: String,
    kid: Option<String>,
    claims: Map<String, Value>,
}

/// The header's `alg` and `kid`, and the claims, read *without* verification: only to pick the
/// issuer and key. Nothing read here is trusted until the signature is checked.
fn unverified_parts(token: &str) -> Result<UnverifiedToken, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(
            "expected three base64url parts separated by dots".to_owned(),
        ));
    };
    let decode_object = |part: &str, what: &str| -> Result<Map<String, Value>, AuthError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| AuthError::Malformed(format!("the {what} is not base64url")))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(AuthError::Malformed(format!(
                "the {what} is not a JSON object"
            ))),
        }
    };
    let header = decode_object(header, "header")?;
    let claims = decode_object(payload, "payload")?;
    if header.contains_key("crit") {
        return Err(AuthError::CriticalHeader);
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::Malformed("the header has no alg".to_owned()))?
        .to_owned();
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(AuthError::Malformed("the kid is not a string".to_owned())),
    };
    Ok(UnverifiedToken { alg, kid, claims })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_follow_rfc_6750() {
        assert_eq!(AuthError::MissingToken.challenge(), "Bearer");
        assert_eq!(
            AuthError::Expired.challenge(),
            "Bearer error=\"invalid_token\", error_description=\"the token has expired\""
        );
        let challenge = AuthError::MalformedHeader("the scheme is not Bearer").challenge();
        assert!(
            challenge.starts_with("Bearer error=\"invalid_request\""),
            "{challenge}"
        );
        let response = AuthError::KeysUnavailable.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(RETRY_AFTER));
    }

    #[test]
    fn header_parsing() {
        let value = |s: &str| HeaderValue::from_str(s).expect("header");
        assert_eq!(bearer_token(None), Err(AuthError::MissingToken));
        assert_eq!(bearer_token(Some(&value("bearer a.b.c"))), Ok("a.b.c"));
        assert!(matches!(
            bearer_token(Some(&value("Basic dXNlcjpwYXNz"))),
            Err(AuthError::MalformedHeader(_))
        ));
        assert!(matches!(
            bearer_token(Some(&value("Bearer a b"))),
            Err(AuthError::MalformedHeader(_))
        ));
        let huge = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert!(matches!(
            bearer_token(Some(&value(&huge))),
            Err(AuthError::TokenTooLarge { .. })
        ));
        assert!(matches!(
            unverified_parts("a.b"),
            Err(AuthError::Malformed(_))
        ));
    }
}
