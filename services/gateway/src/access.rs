//! The proxy's access decision for one request, from the [`crate::auth`] building blocks, and
//! SMART discovery.
//!
//! Job: [`AccessControl::decide`] classifies the request (public URLs need no token), verifies
//! the bearer token for the care system in the path, checks membership and scopes against the
//! care system's routing entry, and returns the [`Identity`] the gateway will vouch for — or the
//! response refusing it (401/403/404/405, or 503 while an issuer's keys cannot be fetched).
//!
//! Invariants: a request gets an identity only after authentication *and* authorisation both
//! passed; the identity names exactly the care system of the path; the break-glass reason is
//! the client's `X-Break-Glass-Reason` header, bounded, and only ever travels inside the signed
//! assertion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use http::{HeaderMap, HeaderName, Method, header};
use serde_json::{Value, json};
use shcr_identity::{Identity, RefusedActor};

use crate::auth::{
    AuthConfigError, Authenticator, IssuerConfig, JwksSource, Principal, RequestClass, classify,
};
use crate::config::SmartConfig;
use crate::routing::Route;

const BREAK_GLASS: HeaderName = HeaderName::from_static("x-break-glass-reason");
/// Longest break-glass reason carried (longer ones are cut).
const MAX_BREAK_GLASS_CHARS: usize = 500;

/// The outcome of [`AccessControl::decide`].
#[derive(Debug)]
pub enum AccessDecision {
    /// A public URL: forward without an identity.
    Public,
    /// Forward with this identity.
    Allowed(Identity),
    /// Refused; `reason` is a metrics label, `actor` who was refused when the token was
    /// verified (for the care system's audit trail).
    Refused {
        reason: &'static str,
        response: Response,
        actor: Option<RefusedActor>,
    },
}

/// Authentication, authorisation and discovery for the proxy.
#[derive(Debug, Clone)]
pub struct AccessControl {
    authenticator: Authenticator,
    verified: Arc<VerifiedTokens>,
    discovery: Value,
}

impl AccessControl {
    /// Trusts `issuers`; `smart` adds the OAuth endpoints SMART discovery advertises.
    pub fn new(issuers: &[IssuerConfig], smart: SmartConfig) -> Result<Self, AuthConfigError> {
        let authenticator = Authenticator::new(issuers.to_vec(), reqwest::Client::new())?;
        Ok(Self {
            authenticator,
            verified: Arc::new(VerifiedTokens::default()),
            discovery: discovery(issuers, &smart),
        })
    }

    /// The authenticator (to register its metrics or warm up its keys).
    pub fn authenticator(&self) -> &Authenticator {
        &self.authenticator
    }

    /// Decides whether the request `method rest?query` with `headers`, for care system `route`,
    /// may go on, and with which identity.
    pub async fn decide(
        &self,
        method: &Method,
        rest: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        route: &Route,
        request_id: &str,
    ) -> AccessDecision {
        let class = match classify(method, rest, query) {
            Ok(class) => class,
            Err(unclassified) => {
                return AccessDecision::Refused {
                    reason: "unsupported",
                    response: unclassified.into_response(),
                    actor: None,
                };
            }
        };
        if class == RequestClass::Public {
            return AccessDecision::Public;
        }
        let authorization = headers.get(header::AUTHORIZATION);
        let principal = match self.verified.get(authorization, &route.care_system) {
            Some(principal) => principal,
            None => match self
                .authenticator
                .authenticate(authorization, &route.care_system)
                .await
            {
                Ok(principal) => {
                    self.verified
                        .insert(authorization, &route.care_system, &principal);
                    principal
                }
                Err(error) => {
                    return AccessDecision::Refused {
                        reason: "unauthenticated",
                        response: error.into_response(),
                        actor: None,
                    };
                }
            },
        };
        if let Err(denial) =
            self.authenticator
                .authorize(&principal, &route.care_system, &route.members, &class)
        {
            return AccessDecision::Refused {
                reason: "forbidden",
                response: denial.into_response(),
                actor: Some(RefusedActor {
                    issuer: principal.issuer.clone(),
                    subject: principal.subject.clone(),
                    organisation: principal.organisation.clone(),
                    role: principal.role.clone(),
                }),
            };
        }
        AccessDecision::Allowed(principal.identity(
            &route.care_system,
            break_glass_reason(headers),
            request_id.to_owned(),
        ))
    }

    /// `/{care-system}/fhir/.well-known/smart-configuration`.
    pub fn smart_configuration(&self) -> &Value {
        &self.discovery
    }
}

/// The client's `X-Break-Glass-Reason`, trimmed and bounded; absent when empty or not text.
pub fn break_glass_reason(headers: &HeaderMap) -> Option<String> {
    headers
        .get(BREAK_GLASS)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| v.chars().take(MAX_BREAK_GLASS_CHARS).collect())
}

/// The SMART App Launch 2.0 discovery document (the same for every care system: they share the
/// identity providers).
fn discovery(issuers: &[IssuerConfig], smart: &SmartConfig) -> Value {
    let mut doc = json!({
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "scopes_supported": [
            "openid", "fhirUser", "launch/patient", "offline_access",
            "patient/*.rs", "patient/*.cruds", "user/*.rs", "user/*.cruds", "system/*.rs", "system/*.cruds"
        ],
        "capabilities": [
            "launch-standalone", "client-public", "client-confidential-symmetric",
            "client-confidential-asymmetric", "sso-openid-connect", "context-standalone-patient",
            "permission-v1", "permission-v2", "permission-patient", "permission-user"
        ],
    });
    if let Some(first) = issuers.first() {
        doc["issuer"] = json!(first.issuer);
        if let JwksSource::Uri(uri) = &first.jwks {
            doc["jwks_uri"] = json!(uri.as_str());
        }
    }
    if let Some(endpoint) = &smart.authorization_endpoint {
        doc["authorization_endpoint"] = json!(endpoint);
    }
    if let Some(endpoint) = &smart.token_endpoint {
        doc["token_endpoint"] = json!(endpoint);
    }
    doc
}

/// How long a verified token is reused without verifying its signature again (bounded also by
/// its own `exp`): short, so a key the identity provider withdraws stops working soon.
const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// Tokens remembered at most; the cache is emptied when full (simple, and bounded).
const VERIFIED_CAPACITY: usize = 10_000;

/// Tokens verified recently, by (Authorization header, care system): a client reusing its token
/// (the usual case) costs one signature check a minute instead of one per request. Only the
/// exact header bytes that passed verification for that care system hit; authorisation still
/// runs on every request.
#[derive(Debug, Default)]
struct VerifiedTokens {
    entries: Mutex<HashMap<TokenKey, (Principal, Instant)>>,
}

/// The `Authorization` header bytes and the care system they were verified for.
type TokenKey = (Vec<u8>, String);

impl VerifiedTokens {
    fn get(&self, authorization: Option<&HeaderValue>, care_system: &str) -> Option<Principal> {
        let key = (authorization?.as_bytes().to_vec(), care_system.to_owned());
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match entries.get(&key) {
            Some((principal, until)) if Instant::now() < *until => Some(principal.clone()),
            _ => None,
        }
    }

    fn insert(
        &self,
        authorization: Option<&HeaderValue>,
        care_system: &str,
        principal: &Principal,
    ) {
        let Some(authorization) = authorization else {
            return;
        };
        let Some(remaining) = remaining_lifetime(authorization) else {
            return;
        };
        let until = Instant::now() + remaining.min(VERIFIED_TTL);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= VERIFIED_CAPACITY {
            entries.clear();
        }
        entries.insert(
            (authorization.as_bytes().to_vec(), care_system.to_owned()),
            (principal.clone(), until),
        );
    }
}

/// The time left before the `exp` of a bearer token that has just been verified (so its
/// payload is trusted); `None` when it cannot be read.
fn remaining_lifetime(authorization: &HeaderValue) -> Option<Duration> {
    let token = authorization.to_str().ok()?.split_once(' ')?.1.trim();
    let payload = URL_SAFE_NO_PAD.decode(token.split('.').nth(1)?).ok()?;
    let exp = serde_json::from_slice::<Value>(&payload)
        .ok()?
        .get("exp")?
        .as_u64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    exp.checked_sub(now).map(Duration::from_secs)
}
