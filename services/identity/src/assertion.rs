//! The identity assertion: what the gateway vouches for, signed for one store and one request.
//!
//! The gateway authenticates the person, decides they may act in a care system, and forwards the
//! request with a compact JWS (EdDSA / Ed25519) in [`ASSERTION_HEADER`]. The store trusts nothing
//! else: it verifies the signature with the gateway's public key, the lifetime, that the
//! assertion names *its* care system (`aud`), so an assertion minted for one tenant is useless at
//! another even inside the cluster network, and that it was minted for *this* request: the
//! method (`htm`), the path and query (`htu`, as the gateway sent them to the store) and the
//! SHA-256 of the body (`bsh`, base64url; the digest of the empty body when there is none) are
//! signed, and the store compares them with what it received. Each assertion carries a `jti`
//! the gateway mints (a random UUID, never anything the client chose); a store accepts a `jti`
//! once (the verifier's [`ReplayCache`]). The store gets the [`Identity`] only from
//! [`VerifiedAssertion::accept`], after the body digest and the replay check.
//!
//! The same key signs [`RefusalNotice`]s: the gateway telling a store it refused a request
//! (401/403) for that care system, so the refusal is in the tenant's audit trail. Each kind has
//! its own JWS `typ` ([`IDENTITY_TYP`], [`REFUSAL_TYP`], RFC 8725 §3.11), checked on
//! verification, so a notice is never accepted as an identity or the other way round.
//!
//! Invariants: the only accepted algorithm is EdDSA (no `none`, no HMAC, no key confusion);
//! lifetimes are short ([`MAX_LIFETIME`]) with a small clock skew ([`CLOCK_SKEW`]); a private key
//! never leaves [`AssertionSigner`] except as the PKCS#8 PEM its owner asked for; a verified
//! assertion yields an identity only for the request it was signed for, once.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::replay::ReplayCache;
use crate::scope::{ScopeError, Scopes};

/// The request header carrying the assertion (or a refusal notice) from the gateway to a store.
pub const ASSERTION_HEADER: &str = "x-shcr-identity";

/// The JWS `typ` of an identity assertion.
pub const IDENTITY_TYP: &str = "shcr-identity+jwt";

/// The JWS `typ` of a refusal notice.
pub const REFUSAL_TYP: &str = "shcr-refusal+jwt";

/// The `iss` of every assertion.
const ISSUER: &str = "shcr-gateway";

/// The longest lifetime a store accepts, whatever the gateway asked for.
pub const MAX_LIFETIME: Duration = Duration::from_secs(300);

/// Clock skew tolerated between gateway and store.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Who is acting, for whom, and with what rights: what the gateway vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The identity provider that authenticated the person: the bearer token's `iss`.
    /// Subjects are unique only within one issuer, so `(issuer, subject)` names a person.
    pub issuer: String,
    /// The person (or service) — the token's `sub`, e.g. a CIS2 UUID.
    pub subject: String,
    /// The organisation they act for (ODS code).
    pub organisation: String,
    /// Their role (e.g. an NRBAC role code such as `R8000`).
    pub role: String,
    /// What they may do.
    pub scopes: Scopes,
    /// For patient-facing tokens: the only patient whose compartment they reach.
    pub patient: Option<String>,
    /// The care system this assertion is for.
    pub care_system: String,
    /// Why the person is breaking the glass, when they are.
    pub break_glass_reason: Option<String>,
    /// The gateway's request id, so audit and logs join up. Not an anti-replay value (the
    /// client may choose it); the assertion's own `jti` is.
    pub request_id: String,
    /// The public origin (`scheme://host[:port]`) the gateway serves the FHIR API under, from
    /// its configuration (never from the client's `Host`): what absolute links in responses
    /// should start with. `None` when the gateway has none configured.
    pub origin: Option<String>,
}

/// The request an assertion is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBinding {
    /// The HTTP method, e.g. `GET`.
    pub method: String,
    /// The path and query as sent to the store, e.g. `/north-east/fhir/Patient?name=x`.
    pub target: String,
    /// base64url (no padding) of the SHA-256 of the request body.
    pub body_sha256: String,
}

impl RequestBinding {
    /// The binding of a request `method target` with `body` (empty when it has none).
    pub fn new(method: &str, target: &str, body: &[u8]) -> Self {
        Self {
            method: method.to_owned(),
            target: target.to_owned(),
            body_sha256: body_digest(body),
        }
    }
}

/// base64url of the SHA-256 of `body`.
pub fn body_digest(body: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest(&SHA256, body).as_ref())
}

/// Why a public URL cannot be an [`Identity::origin`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{url:?} is not a public origin: expected http:// or https:// and a host (and port), with no \
     path, query or credentials, e.g. https://fhir.example.nhs.uk"
)]
pub struct OriginError {
    /// The URL given.
    pub url: String,
}

/// Checks that `url` is an origin (`http(s)://host[:port]`, a trailing `/` allowed) and returns
/// it without the trailing `/`, scheme and host in lower case.
pub fn public_origin(url: &str) -> Result<String, OriginError> {
    let error = || OriginError {
        url: url.to_owned(),
    };
    let trimmed = url.trim();
    let lower = trimmed.to_ascii_lowercase();
    let (scheme, authority) = if let Some(rest) = lower.strip_prefix("https://") {
        ("https", rest)
    } else if let Some(rest) = lower.strip_prefix("http://") {
        ("http", rest)
    } else {
        return Err(error());
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let valid = !authority.is_empty()
        && !authority.starts_with(':')
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !valid {
        return Err(error());
    }
    Ok(format!("{scheme}://{authority}"))
}

/// The JWT claims: a flat, versionable wire form of [`Identity`] and [`RequestBinding`].
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    /// The identity provider (the token's `iss`).
    idp: String,
    sub: String,
    org: String,
    role: String,
    scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    break_glass: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    /// The request id (for audit joining).
    rid: String,
    /// The bound method, target and body digest (`htm`/`htu` after RFC 9449's DPoP claims).
    htm: String,
    htu: String,
    bsh: String,
    jti: String,
    iat: u64,
    exp: u64,
}

/// Why an assertion was refused (store side) or could not be made (gateway side).
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    /// No assertion at all.
    #[error("no identity assertion: requests must come through the ShCR gateway")]
    Missing,
    /// Not a well-formed assertion, or a bad signature, or a disallowed algorithm.
    #[error("identity assertion rejected: {0}")]
    Invalid(String),
    /// Expired, or its lifetime is longer than a store accepts.
    #[error("identity assertion expired or too long-lived")]
    Expired,
    /// Minted for another care system.
    #[error("identity assertion is for care system {named:?}, not this one")]
    WrongCareSystem {
        /// The care system it names.
        named: String,
    },
    /// Minted for another request: the method, the path and query, or the body differ.
    #[error("identity assertion was minted for another request: the {what} differs")]
    OtherRequest {
        /// `method`, `path and query` or `body`.
        what: &'static str,
    },
    /// Its `jti` was seen before: each assertion is good for one request.
    #[error("identity assertion already used: each one is good for a single request")]
    Replayed,
    /// The replay cache is full of live assertions, so a new one cannot be remembered (and is
    /// refused rather than accepted unremembered).
    #[error("too many identity assertions in flight to remember another; retry shortly")]
    ReplayCacheFull,
    /// Its scopes do not parse.
    #[error("identity assertion carries bad scopes: {0}")]
    Scopes(#[from] ScopeError),
    /// Signing failed (gateway side).
    #[error("could not sign the identity assertion: {0}")]
    Signing(String),
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not PEM, or not the expected PEM label.
    #[error("not a {expected} PEM: {detail}")]
    Pem {
        /// What was expected.
        expected: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// PEM, but not an Ed25519 key.
    #[error("not an Ed25519 key: {0}")]
    NotEd25519(String),
}

/// Signs assertions (the gateway side). Holds the Ed25519 private key.
pub struct AssertionSigner {
    pkcs8_der: Vec<u8>,
    /// The parsed key pair, kept so signing does not re-derive it from PKCS#8 per request
    /// (`jsonwebtoken::encode` does, which measured ~36 µs of the ~99 µs a signature cost).
    pair: Ed25519KeyPair,
    public: Vec<u8>,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("public_key", &self.public_key_pem())
            .finish_non_exhaustive()
    }
}

impl AssertionSigner {
    /// A fresh key pair.
    pub fn generate() -> Result<Self, KeyError> {
        let document = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|e| KeyError::NotEd25519(e.to_string()))?;
        Self::from_pkcs8_der(document.as_ref())
    }

    /// Loads a PKCS#8 `PRIVATE KEY` PEM (as `openssl genpkey -algorithm ed25519` or Helm's
    /// `genPrivateKey "ed25519"` write it).
    pub fn from_pkcs8_pem(pem_text: &str) -> Result<Self, KeyError> {
        let block = pem::parse(pem_text.trim()).map_err(|e| KeyError::Pem {
            expected: "PRIVATE KEY",
            detail: e.to_string(),
        })?;
        if block.tag() != "PRIVATE KEY" {
            return Err(KeyError::Pem {
                expected: "PRIVATE KEY",
                detail: format!("found {:?}", block.tag()),
            });
        }
        Self::from_pkcs8_der(block.contents())
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| KeyError::NotEd25519(e.to_string()))?;
        // Normalise to v1 PKCS#8 (what jsonwebtoken's EdDSA signer reads).
        let v1 = pair
            .to_pkcs8v1()
            .map_err(|e| KeyError::NotEd25519(e.to_string()))?;
        Ok(Self {
            pkcs8_der: v1.as_ref().to_vec(),
            public: pair.public_key().as_ref().to_vec(),
            pair,
        })
    }

    /// The private key as PKCS#8 PEM, for its owner to store (0600).
    pub fn to_pkcs8_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PRIVATE KEY", self.pkcs8_der.clone()))
    }

    /// The public key as an SPKI `PUBLIC KEY` PEM, for the stores.
    pub fn public_key_pem(&self) -> String {
        let spki = spki_from_raw(&self.public);
        pem::encode(&pem::Pem::new("PUBLIC KEY", spki))
    }

    /// The raw 32-byte public key, for a JWKS `x`.
    pub fn public_key_raw(&self) -> &[u8] {
        &self.public
    }

    /// A verifier for this signer's assertions.
    pub fn verifier(&self) -> AssertionVerifier {
        AssertionVerifier::from_raw(&self.public)
    }

    /// Signs `identity` for the one request `binding` describes, valid for `ttl` (capped at
    /// [`MAX_LIFETIME`]), with a fresh random `jti`.
    pub fn sign(
        &self,
        identity: &Identity,
        binding: &RequestBinding,
        ttl: Duration,
    ) -> Result<String, AssertionError> {
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.to_owned(),
            aud: identity.care_system.clone(),
            idp: identity.issuer.clone(),
            sub: identity.subject.clone(),
            org: identity.organisation.clone(),
            role: identity.role.clone(),
            scope: identity.scopes.to_string(),
            patient: identity.patient.clone(),
            break_glass: identity.break_glass_reason.clone(),
            origin: identity.origin.clone(),
            rid: identity.request_id.clone(),
            htm: binding.method.clone(),
            htu: binding.target.clone(),
            bsh: binding.body_sha256.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            exp: expiry(now, ttl),
        };
        self.sign_claims(IDENTITY_TYP, &claims)
    }

    /// Signs a refusal notice for `notice.care_system`'s store, valid for `ttl`.
    pub fn sign_refusal(
        &self,
        notice: &RefusalNotice,
        ttl: Duration,
    ) -> Result<String, AssertionError> {
        let now = unix_now();
        let claims = RefusalClaims {
            iss: ISSUER.to_owned(),
            aud: notice.care_system.clone(),
            status: notice.status,
            reason: notice.reason.clone(),
            method: notice.method.clone(),
            resource_type: notice.resource_type.clone(),
            actor: notice.actor.clone(),
            rid: notice.request_id.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            exp: expiry(now, ttl),
        };
        self.sign_claims(REFUSAL_TYP, &claims)
    }

    fn sign_claims(&self, typ: &str, claims: &impl Serialize) -> Result<String, AssertionError> {
        // The JWS compact serialisation (RFC 7515 §7.1) of the same header jsonwebtoken writes;
        // verification stays with jsonwebtoken.
        let header =
            serde_json::to_vec(&header(typ)).map_err(|e| AssertionError::Signing(e.to_string()))?;
        let payload =
            serde_json::to_vec(claims).map_err(|e| AssertionError::Signing(e.to_string()))?;
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature = self.pair.sign(signing_input.as_bytes());
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

fn header(typ: &str) -> Header {
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some(typ.to_owned());
    header
}

fn expiry(now: u64, ttl: Duration) -> u64 {
    now + ttl.min(MAX_LIFETIME).as_secs().max(1)
}

/// Verifies assertions (the store side). Holds the gateway's public key and the
/// [`ReplayCache`] of the assertions it accepted (shared by its clones), so that an assertion
/// is accepted once.
#[derive(Clone)]
pub struct AssertionVerifier {
    decoding: DecodingKey,
    replay: Arc<ReplayCache>,
}

impl std::fmt::Debug for AssertionVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionVerifier").finish_non_exhaustive()
    }
}

impl AssertionVerifier {
    /// Loads the gateway's SPKI `PUBLIC KEY` PEM.
    pub fn from_public_key_pem(pem_text: &str) -> Result<Self, KeyError> {
        let block = pem::parse(pem_text.trim()).map_err(|e| KeyError::Pem {
            expected: "PUBLIC KEY",
            detail: e.to_string(),
        })?;
        if block.tag() != "PUBLIC KEY" {
            return Err(KeyError::Pem {
                expected: "PUBLIC KEY",
                detail: format!("found {:?}", block.tag()),
            });
        }
        let raw = block
            .contents()
            .strip_prefix(ED25519_SPKI_PREFIX.as_slice())
            .filter(|raw| raw.len() == 32)
            .ok_or_else(|| KeyError::NotEd25519("the SPKI is not an Ed25519 key".to_owned()))?;
        Ok(Self::from_raw(raw))
    }

    fn from_raw(raw: &[u8]) -> Self {
        Self {
            decoding: DecodingKey::from_ed_der(raw),
            replay: Arc::new(ReplayCache::default()),
        }
    }

    /// This verifier remembering at most `capacity` accepted assertions (see [`ReplayCache`]).
    pub fn with_replay_capacity(mut self, capacity: usize) -> Self {
        self.replay = Arc::new(ReplayCache::new(capacity));
        self
    }

    /// Verifies `token` for `care_system` and for the request `method target` (the path and
    /// query the store received). The body is checked, and the `jti` remembered, by
    /// [`VerifiedAssertion::accept`], which alone yields the [`Identity`].
    pub fn verify(
        &self,
        token: &str,
        care_system: &str,
        method: &str,
        target: &str,
    ) -> Result<VerifiedAssertion, AssertionError> {
        let claims: Claims = self.decode(token, IDENTITY_TYP, care_system)?;
        check_lifetime(claims.iat, claims.exp)?;
        if claims.htm != method {
            return Err(AssertionError::OtherRequest { what: "method" });
        }
        if claims.htu != target {
            return Err(AssertionError::OtherRequest {
                what: "path and query",
            });
        }
        let identity = Identity {
            issuer: claims.idp,
            subject: claims.sub,
            organisation: claims.org,
            role: claims.role,
            scopes: Scopes::parse(&claims.scope)?,
            patient: claims.patient,
            care_system: claims.aud,
            break_glass_reason: claims.break_glass,
            request_id: claims.rid,
            origin: claims.origin,
        };
        Ok(VerifiedAssertion {
            identity,
            replay: self.replay.clone(),
            body_sha256: claims.bsh,
            jti: claims.jti,
            expires_at: claims.exp,
        })
    }

    /// Verifies a refusal notice for `care_system`, accepting it once.
    pub fn verify_refusal(
        &self,
        token: &str,
        care_system: &str,
    ) -> Result<RefusalNotice, AssertionError> {
        let claims: RefusalClaims = self.decode(token, REFUSAL_TYP, care_system)?;
        check_lifetime(claims.iat, claims.exp)?;
        self.replay.accept_once(&claims.jti, claims.exp)?;
        Ok(RefusalNotice {
            care_system: claims.aud,
            status: claims.status,
            reason: claims.reason,
            method: claims.method,
            resource_type: claims.resource_type,
            actor: claims.actor,
            request_id: claims.rid,
        })
    }

    /// Checks the signature, `typ`, issuer, expiry and audience, and decodes the claims.
    fn decode<C: DeserializeOwned + Audience>(
        &self,
        token: &str,
        typ: &str,
        care_system: &str,
    ) -> Result<C, AssertionError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AssertionError::Invalid(e.to_string()))?;
        if header.typ.as_deref() != Some(typ) {
            return Err(AssertionError::Invalid(format!(
                "the JWS typ is {:?}, expected {typ:?}",
                header.typ.unwrap_or_default()
            )));
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.set_issuer(&[ISSUER]);
        // The audience is checked below, to say which care system it named.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<C>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AssertionError::Expired,
                _ => AssertionError::Invalid(e.to_string()),
            })?
            .claims;
        if claims.audience() != care_system {
            return Err(AssertionError::WrongCareSystem {
                named: claims.audience().to_owned(),
            });
        }
        Ok(claims)
    }
}

/// An assertion whose signature, lifetime, audience, method and target were checked; the body
/// digest and the replay check remain.
#[derive(Debug)]
pub struct VerifiedAssertion {
    identity: Identity,
    replay: Arc<ReplayCache>,
    body_sha256: String,
    jti: String,
    expires_at: u64,
}

impl VerifiedAssertion {
    /// Checks the request's `body` against the signed digest, then accepts the assertion
    /// (its `jti`) once, and yields who it vouches for.
    pub fn accept(self, body: &[u8]) -> Result<Identity, AssertionError> {
        if body_digest(body) != self.body_sha256 {
            return Err(AssertionError::OtherRequest { what: "body" });
        }
        self.replay.accept_once(&self.jti, self.expires_at)?;
        Ok(self.identity)
    }

    /// The identity, before the body and replay checks: for logging only.
    pub fn unchecked_identity(&self) -> &Identity {
        &self.identity
    }
}

/// A person the gateway refused after authenticating them (a 403): who, as their token said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedActor {
    /// The token's `iss`.
    pub issuer: String,
    /// The token's subject.
    pub subject: String,
    /// The organisation (ODS code) they act for.
    pub organisation: String,
    /// Their role code.
    pub role: String,
}

/// The gateway's notice to a store that it refused a request for that care system. Holds what
/// was attempted — the method and the resource type of the path — never ids, query values or
/// bodies (which may hold patient data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalNotice {
    /// The care system the request named (the notice's audience).
    pub care_system: String,
    /// The HTTP status the gateway answered (401 or 403).
    pub status: u16,
    /// The refusal's reason label (a fixed vocabulary, e.g. `unauthenticated`, `forbidden`).
    pub reason: String,
    /// The HTTP method of the refused request.
    pub method: String,
    /// The resource type the path addressed, when it named one.
    pub resource_type: Option<String>,
    /// Who, when the token was verified (403); `None` for an unauthenticated request.
    pub actor: Option<RefusedActor>,
    /// The gateway's request id of the refused request.
    pub request_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct RefusalClaims {
    iss: String,
    aud: String,
    status: u16,
    reason: String,
    method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resource_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    actor: Option<RefusedActor>,
    rid: String,
    jti: String,
    iat: u64,
    exp: u64,
}

/// Claims that name a care system.
trait Audience {
    fn audience(&self) -> &str;
}

impl Audience for Claims {
    fn audience(&self) -> &str {
        &self.aud
    }
}

impl Audience for RefusalClaims {
    fn audience(&self) -> &str {
        &self.aud
    }
}

fn check_lifetime(iat: u64, exp: u64) -> Result<(), AssertionError> {
    if exp.saturating_sub(iat) > MAX_LIFETIME.as_secs() || iat > unix_now() + CLOCK_SKEW.as_secs() {
        return Err(AssertionError::Expired);
    }
    Ok(())
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (0 unused bits) } followed by the 32 raw key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn spki_from_raw(raw: &[u8]) -> Vec<u8> {
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(raw);
    spki
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    const TARGET: &str = "/north-east/fhir/Patient?family=Smith";

    fn identity() -> Identity {
        Identity {
            issuer: "https://idp.example/realms/a".to_owned(),
            subject: "555021935107".to_owned(),
            organisation: "A81001".to_owned(),
            role: "R8000".to_owned(),
            scopes: Scopes::parse("user/*.cruds").expect("valid"),
            patient: None,
            care_system: "north-east".to_owned(),
            break_glass_reason: Some("unconscious in ED".to_owned()),
            request_id: "req-1".to_owned(),
            origin: Some("https://fhir.example.nhs.uk".to_owned()),
        }
    }

    fn get() -> RequestBinding {
        RequestBinding::new("GET", TARGET, b"")
    }

    fn sign(signer: &AssertionSigner, binding: &RequestBinding) -> String {
        signer
            .sign(&identity(), binding, Duration::from_secs(60))
            .expect("sign")
    }

    fn payload(token: &str) -> serde_json::Value {
        let part = token.split('.').nth(1).expect("three parts");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("b64")).expect("json")
    }

    #[test]
    fn round_trip_through_pem_keys_carries_issuer_and_origin() {
        let signer = AssertionSigner::generate().expect("keygen");
        let reloaded =
            AssertionSigner::from_pkcs8_pem(&signer.to_pkcs8_pem()).expect("private PEM reloads");
        let verifier =
            AssertionVerifier::from_public_key_pem(&signer.public_key_pem()).expect("public PEM");
        let token = sign(&reloaded, &get());
        let identity = verifier
            .verify(&token, "north-east", "GET", TARGET)
            .expect("verifies")
            .accept(b"")
            .expect("accepted");
        assert_eq!(identity, self::identity());
        assert_eq!(identity.issuer, "https://idp.example/realms/a");
        assert_eq!(
            identity.origin.as_deref(),
            Some("https://fhir.example.nhs.uk")
        );
    }

    #[test]
    fn signatures_are_what_jsonwebtoken_would_write() {
        let signer = AssertionSigner::generate().expect("keygen");
        let token = sign(&signer, &get());
        let claims: Claims = serde_json::from_value(payload(&token)).expect("claims");
        let reference = jsonwebtoken::encode(
            &header(IDENTITY_TYP),
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(&signer.pkcs8_der),
        )
        .expect("jsonwebtoken signs");
        // Ed25519 is deterministic: same key, same input, same signature.
        assert_eq!(token, reference);
    }

    #[test]
    fn an_assertion_serves_only_the_request_it_was_signed_for() {
        let signer = AssertionSigner::generate().expect("keygen");
        let verifier = signer.verifier();
        let body = br#"{"resourceType":"Patient"}"#;
        let post = RequestBinding::new("POST", "/north-east/fhir/Patient", body);
        let other = |token: &str, method: &str, target: &str| match verifier.verify(
            token,
            "north-east",
            method,
            target,
        ) {
            Err(AssertionError::OtherRequest { what }) => what,
            other => panic!("expected OtherRequest, got {other:?}"),
        };
        let token = sign(&signer, &post);
        assert_eq!(other(&token, "PUT", "/north-east/fhir/Patient"), "method");
        assert_eq!(
            other(&token, "POST", "/north-east/fhir/Observation"),
            "path and query"
        );
        assert_eq!(
            other(&token, "POST", "/north-east/fhir/Patient?x=1"),
            "path and query"
        );
        let verified = verifier
            .verify(&token, "north-east", "POST", "/north-east/fhir/Patient")
            .expect("right request");
        match verified.accept(br#"{"resourceType":"Observation"}"#) {
            Err(AssertionError::OtherRequest { what }) => assert_eq!(what, "body"),
            other => panic!("expected a body mismatch, got {other:?}"),
        }
        // A mismatch does not use the assertion up: the genuine request still goes through.
        verifier
            .verify(&token, "north-east", "POST", "/north-east/fhir/Patient")
            .expect("right request")
            .accept(body)
            .expect("the genuine request");
    }

    #[test]
    fn an_assertion_is_accepted_once_and_each_gets_a_fresh_jti() {
        let signer = AssertionSigner::generate().expect("keygen");
        let verifier = signer.verifier();
        let first = sign(&signer, &get());
        let second = sign(&signer, &get());
        assert_ne!(payload(&first)["jti"], payload(&second)["jti"]);
        assert_ne!(
            payload(&first)["jti"],
            "req-1",
            "the request id is not the jti"
        );
        assert_eq!(payload(&first)["rid"], "req-1");
        let accept = |token: &str| {
            verifier
                .verify(token, "north-east", "GET", TARGET)
                .and_then(|v| v.accept(b""))
        };
        accept(&first).expect("first use");
        assert!(matches!(accept(&first), Err(AssertionError::Replayed)));
        accept(&second).expect("another assertion for the same request");
    }

    #[test]
    fn refusal_notices_and_assertions_are_not_interchangeable() {
        let signer = AssertionSigner::generate().expect("keygen");
        let verifier = signer.verifier();
        let notice = RefusalNotice {
            care_system: "north-east".to_owned(),
            status: 403,
            reason: "forbidden".to_owned(),
            method: "GET".to_owned(),
            resource_type: Some("Patient".to_owned()),
            actor: Some(RefusedActor {
                issuer: "https://idp.example".to_owned(),
                subject: "u1".to_owned(),
                organisation: "Y99999".to_owned(),
                role: "R8000".to_owned(),
            }),
            request_id: "req-2".to_owned(),
        };
        let token = signer
            .sign_refusal(&notice, Duration::from_secs(60))
            .expect("sign");
        assert!(matches!(
            verifier.verify(&token, "north-east", "GET", TARGET),
            Err(AssertionError::Invalid(_))
        ));
        assert!(matches!(
            verifier.verify_refusal(&token, "west-yorkshire"),
            Err(AssertionError::WrongCareSystem { .. })
        ));
        assert_eq!(
            verifier
                .verify_refusal(&token, "north-east")
                .expect("notice"),
            notice
        );
        assert!(matches!(
            verifier.verify_refusal(&token, "north-east"),
            Err(AssertionError::Replayed)
        ));
        let assertion = sign(&signer, &get());
        assert!(matches!(
            verifier.verify_refusal(&assertion, "north-east"),
            Err(AssertionError::Invalid(_))
        ));
    }

    #[test]
    fn another_care_system_is_refused() {
        let signer = AssertionSigner::generate().expect("keygen");
        let token = sign(&signer, &get());
        match signer
            .verifier()
            .verify(&token, "west-yorkshire", "GET", TARGET)
        {
            Err(AssertionError::WrongCareSystem { named }) => assert_eq!(named, "north-east"),
            other => panic!("expected WrongCareSystem, got {other:?}"),
        }
    }

    #[test]
    fn another_key_tampering_and_alg_none_are_refused() {
        let signer = AssertionSigner::generate().expect("keygen");
        let stranger = AssertionSigner::generate().expect("keygen");
        let verify = |token: &str| signer.verifier().verify(token, "north-east", "GET", TARGET);
        let token = sign(&stranger, &get());
        assert!(matches!(verify(&token), Err(AssertionError::Invalid(_))));

        let token = sign(&signer, &get());
        let parts: Vec<&str> = token.split('.').collect();
        let mut payload = payload(&token);
        payload["org"] = "Y99999".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(payload.to_string()),
            parts[2]
        );
        assert!(matches!(verify(&forged), Err(AssertionError::Invalid(_))));

        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"shcr-identity+jwt"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(verify(&unsigned).is_err());
        assert!(verify("not a jwt").is_err());
    }

    #[test]
    fn public_origins_are_scheme_and_authority_only() {
        assert_eq!(
            public_origin("https://FHIR.example.nhs.uk/").as_deref(),
            Ok("https://fhir.example.nhs.uk")
        );
        assert_eq!(
            public_origin("http://127.0.0.1:8080").as_deref(),
            Ok("http://127.0.0.1:8080")
        );
        for bad in [
            "fhir.example.nhs.uk",
            "ftp://x",
            "https://",
            "https://x/fhir",
            "https://x?q=1",
            "https://user@x",
        ] {
            assert!(public_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_key_material_says_what_is_wrong() {
        let err = AssertionVerifier::from_public_key_pem("hello").expect_err("not PEM");
        assert!(err.to_string().contains("PUBLIC KEY"), "{err}");
        let signer = AssertionSigner::generate().expect("keygen");
        let err =
            AssertionVerifier::from_public_key_pem(&signer.to_pkcs8_pem()).expect_err("private");
        assert!(err.to_string().contains("PRIVATE KEY"), "{err}");
    }
}
