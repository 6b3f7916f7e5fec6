//! The identity assertion: what the gateway vouches for, signed for one store.
//!
//! The gateway authenticates the person, decides they may act in a care system, and forwards the
//! request with a compact JWS (EdDSA / Ed25519) in [`ASSERTION_HEADER`]. The store trusts nothing
//! else: it verifies the signature with the gateway's public key, the lifetime, and that the
//! assertion names *its* care system (`aud`), so an assertion minted for one tenant is useless at
//! another even inside the cluster network.
//!
//! Invariants: the only accepted algorithm is EdDSA (no `none`, no HMAC, no key confusion);
//! lifetimes are short ([`MAX_LIFETIME`]) with a small clock skew ([`CLOCK_SKEW`]); a private key
//! never leaves [`AssertionSigner`] except as the PKCS#8 PEM its owner asked for.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::scope::{ScopeError, Scopes};

/// The request header carrying the assertion from the gateway to a store.
pub const ASSERTION_HEADER: &str = "x-shcr-identity";

/// The `iss` of every assertion.
const ISSUER: &str = "shcr-gateway";

/// The longest lifetime a store accepts, whatever the gateway asked for.
pub const MAX_LIFETIME: Duration = Duration::from_secs(300);

/// Clock skew tolerated between gateway and store.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Who is acting, for whom, and with what rights: what the gateway vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
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
    /// The gateway's request id, so audit and logs join up.
    pub request_id: String,
}

/// The JWT claims: a flat, versionable wire form of [`Identity`].
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    org: String,
    role: String,
    scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    break_glass: Option<String>,
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

    /// Signs `identity`, valid for `ttl` (capped at [`MAX_LIFETIME`]).
    pub fn sign(&self, identity: &Identity, ttl: Duration) -> Result<String, AssertionError> {
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.to_owned(),
            aud: identity.care_system.clone(),
            sub: identity.subject.clone(),
            org: identity.organisation.clone(),
            role: identity.role.clone(),
            scope: identity.scopes.to_string(),
            patient: identity.patient.clone(),
            break_glass: identity.break_glass_reason.clone(),
            jti: identity.request_id.clone(),
            iat: now,
            exp: now + ttl.min(MAX_LIFETIME).as_secs().max(1),
        };
        // The JWS compact serialisation (RFC 7515 §7.1) of the same header jsonwebtoken writes;
        // verification stays with jsonwebtoken.
        let header = serde_json::to_vec(&Header::new(Algorithm::EdDSA))
            .map_err(|e| AssertionError::Signing(e.to_string()))?;
        let payload =
            serde_json::to_vec(&claims).map_err(|e| AssertionError::Signing(e.to_string()))?;
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

/// Verifies assertions (the store side). Holds only the gateway's public key.
#[derive(Clone)]
pub struct AssertionVerifier {
    decoding: DecodingKey,
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
        }
    }

    /// Verifies `token` for `care_system` and returns who it vouches for.
    pub fn verify(&self, token: &str, care_system: &str) -> Result<Identity, AssertionError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = CLOCK_SKEW.as_secs();
        validation.set_issuer(&[ISSUER]);
        // The audience is checked below, to say which care system it named.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AssertionError::Expired,
                _ => AssertionError::Invalid(e.to_string()),
            })?
            .claims;
        if claims.aud != care_system {
            return Err(AssertionError::WrongCareSystem { named: claims.aud });
        }
        if claims.exp.saturating_sub(claims.iat) > MAX_LIFETIME.as_secs()
            || claims.iat > unix_now() + CLOCK_SKEW.as_secs()
        {
            return Err(AssertionError::Expired);
        }
        Ok(Identity {
            subject: claims.sub,
            organisation: claims.org,
            role: claims.role,
            scopes: Scopes::parse(&claims.scope)?,
            patient: claims.patient,
            care_system: claims.aud,
            break_glass_reason: claims.break_glass,
            request_id: claims.jti,
        })
    }
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

fn unix_now() -> u64 {
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

    fn identity() -> Identity {
        Identity {
            subject: "555021935107".to_owned(),
            organisation: "A81001".to_owned(),
            role: "R8000".to_owned(),
            scopes: Scopes::parse("user/*.cruds").expect("valid"),
            patient: None,
            care_system: "north-east".to_owned(),
            break_glass_reason: Some("unconscious in ED".to_owned()),
            request_id: "req-1".to_owned(),
        }
    }

    #[test]
    fn round_trip_through_pem_keys() {
        let signer = AssertionSigner::generate().expect("keygen");
        let reloaded =
            AssertionSigner::from_pkcs8_pem(&signer.to_pkcs8_pem()).expect("private PEM reloads");
        let verifier =
            AssertionVerifier::from_public_key_pem(&signer.public_key_pem()).expect("public PEM");
        let token = reloaded
            .sign(&identity(), Duration::from_secs(60))
            .expect("sign");
        assert_eq!(
            verifier.verify(&token, "north-east").expect("verifies"),
            identity()
        );
    }

    #[test]
    fn signatures_are_what_jsonwebtoken_would_write() {
        let signer = AssertionSigner::generate().expect("keygen");
        let token = signer
            .sign(&identity(), Duration::from_secs(60))
            .expect("sign");
        let (signing_input, _) = token.rsplit_once('.').expect("three parts");
        let (header, payload) = signing_input.split_once('.').expect("three parts");
        let payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json");
        let claims: Claims = serde_json::from_value(payload).expect("claims");
        let reference = jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(&signer.pkcs8_der),
        )
        .expect("jsonwebtoken signs");
        // Ed25519 is deterministic: same key, same input, same signature.
        assert_eq!(token, reference);
        assert!(header.len() > 10);
    }

    #[test]
    fn another_care_system_is_refused() {
        let signer = AssertionSigner::generate().expect("keygen");
        let token = signer
            .sign(&identity(), Duration::from_secs(60))
            .expect("sign");
        match signer.verifier().verify(&token, "west-yorkshire") {
            Err(AssertionError::WrongCareSystem { named }) => assert_eq!(named, "north-east"),
            other => panic!("expected WrongCareSystem, got {other:?}"),
        }
    }

    #[test]
    fn another_key_tampering_and_alg_none_are_refused() {
        let signer = AssertionSigner::generate().expect("keygen");
        let stranger = AssertionSigner::generate().expect("keygen");
        let token = stranger
            .sign(&identity(), Duration::from_secs(60))
            .expect("sign");
        assert!(matches!(
            signer.verifier().verify(&token, "north-east"),
            Err(AssertionError::Invalid(_))
        ));

        let token = signer
            .sign(&identity(), Duration::from_secs(60))
            .expect("sign");
        let parts: Vec<&str> = token.split('.').collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        payload["org"] = "Y99999".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(payload.to_string()),
            parts[2]
        );
        assert!(matches!(
            signer.verifier().verify(&forged, "north-east"),
            Err(AssertionError::Invalid(_))
        ));

        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(signer.verifier().verify(&unsigned, "north-east").is_err());
        assert!(signer.verifier().verify("not a jwt", "north-east").is_err());
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
