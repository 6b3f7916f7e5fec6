//! An issuer's public signing keys: parsed from a JWKS, cached, and refetched when a token names
//! a key the cache does not hold.
//!
//! Job: [`KeyCache::key_for`] finds the key a token's `kid` names and checks that it can verify
//! the token's algorithm. A remote JWKS is fetched on first use, refreshed when older than the
//! issuer's `jwks_max_age`, and refetched on an unknown `kid` (key rotation) — but never more
//! often than `jwks_refetch_interval`, so forged `kid`s cannot turn the gateway into a flood
//! against the identity provider. One fetch at a time per issuer; concurrent callers wait for it.
//!
//! Invariants:
//! - symmetric (`oct`) keys, keys marked for encryption (`use: enc`) and keys of unsupported
//!   types or curves are dropped when a JWKS is parsed: they can never verify a token;
//! - a key verifies only algorithms of its own type and curve, and only its JWK `alg` when the
//!   JWKS states one (no RSA/EC/EdDSA confusion, no HMAC-with-the-public-key);
//! - a failed refresh keeps the keys already held; only an issuer never fetched successfully
//!   has no keys ([`KeyLookupError::Unavailable`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};

use super::issuer::{IssuerConfig, JwksSource, SigningAlgorithm};

/// The largest JWKS document accepted from an issuer.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// How long one JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The key type and curve of a public key: decides which algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn verifies(self, alg: SigningAlgorithm) -> bool {
        use SigningAlgorithm as A;
        match self {
            Self::Rsa => matches!(
                alg,
                A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512
            ),
            Self::P256 => alg == A::ES256,
            Self::P384 => alg == A::ES384,
            Self::Ed25519 => alg == A::EdDSA,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Rsa => "an RSA key",
            Self::P256 => "a P-256 key",
            Self::P384 => "a P-384 key",
            Self::Ed25519 => "an Ed25519 key",
        }
    }
}

/// One verification key.
#[derive(Clone)]
pub(crate) struct VerificationKey {
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// The JWK's `alg`, when the JWKS pins one.
    pub alg: Option<SigningAlgorithm>,
    pub decoding: DecodingKey,
}

impl VerificationKey {
    pub(crate) fn verifies(&self, alg: SigningAlgorithm) -> bool {
        self.kind.verifies(alg) && self.alg.is_none_or(|pinned| pinned == alg)
    }
}

/// The usable keys of one JWKS document.
#[derive(Clone, Default)]
pub(crate) struct KeySet {
    keys: Vec<Arc<VerificationKey>>,
}

impl KeySet {
    /// Parses a JWKS document, keeping only keys that can verify a signature.
    pub(crate) fn parse(document: &Value) -> Result<Self, String> {
        let keys = document
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| "not a JWKS: expected an object with a \"keys\" array".to_owned())?;
        let keys = keys
            .iter()
            .filter_map(|key| parse_key(key).map(Arc::new))
            .collect();
        Ok(Self { keys })
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    fn find(&self, kid: Option<&str>) -> Lookup {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|key| key.kid.as_deref() == Some(kid))
                .map_or(Lookup::NotFound, |key| Lookup::Found(key.clone())),
            // Without a `kid` the set must hold exactly one key: guessing among several would
            // let the token choose which key (and so which algorithm family) verifies it.
            None => match self.keys.as_slice() {
                [only] => Lookup::Found(only.clone()),
                [] => Lookup::NotFound,
                _ => Lookup::Ambiguous,
            },
        }
    }
}

enum Lookup {
    Found(Arc<VerificationKey>),
    NotFound,
    Ambiguous,
}

fn parse_key(value: &Value) -> Option<VerificationKey> {
    let jwk: Jwk = serde_json::from_value(value.clone()).ok()?;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => KeyKind::P256,
            EllipticCurve::P384 => KeyKind::P384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => KeyKind::Ed25519,
            _ => return None,
        },
        AlgorithmParameters::OctetKey(_) => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(other) => Some(SigningAlgorithm::from_name(&other.to_string())?),
    };
    if alg.is_some_and(|alg| !kind.verifies(alg)) {
        return None;
    }
    let decoding = DecodingKey::from_jwk(&jwk).ok()?;
    Some(VerificationKey {
        kid: jwk.common.key_id,
        kind,
        alg,
        decoding,
    })
}

/// Why no key was found for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyLookupError {
    /// No key with that `kid`, even after a refetch (or a refetch was not allowed yet).
    Unknown,
    /// No `kid` and several keys.
    Ambiguous,
    /// The issuer's keys could not be fetched and none are held.
    Unavailable(String),
}

struct Cached {
    keys: KeySet,
    fetched_at: Option<Instant>,
}

/// The keys of one issuer.
pub(crate) struct KeyCache {
    source: Source,
    refetch_interval: Duration,
    max_age: Duration,
    cached: RwLock<Cached>,
    /// When the last fetch was attempted (successful or not); serialises fetches.
    last_attempt: Mutex<Option<Instant>>,
}

enum Source {
    Fixed,
    Remote {
        uri: url::Url,
        http: reqwest::Client,
    },
}

impl KeyCache {
    /// Builds the cache; inline and file JWKS are parsed now, a remote JWKS on first use.
    pub(crate) fn new(config: &IssuerConfig, http: reqwest::Client) -> Result<Self, String> {
        let (source, keys) = match &config.jwks {
            JwksSource::Uri(uri) => (
                Source::Remote {
                    uri: uri.clone(),
                    http,
                },
                KeySet::default(),
            ),
            JwksSource::Inline(document) => (Source::Fixed, fixed_keys(document)?),
            JwksSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the JWKS file {}: {e}", path.display()))?;
                let document: Value = serde_json::from_str(&text)
                    .map_err(|e| format!("the JWKS file {} is not JSON: {e}", path.display()))?;
                (Source::Fixed, fixed_keys(&document)?)
            }
        };
        Ok(Self {
            source,
            refetch_interval: config.jwks_refetch_interval,
            max_age: config.jwks_max_age,
            cached: RwLock::new(Cached {
                keys,
                fetched_at: None,
            }),
            last_attempt: Mutex::new(None),
        })
    }

    /// The key for a token with this `kid`, fetching the JWKS when it is unknown or stale.
    pub(crate) async fn key_for(
        &self,
        kid: Option<&str>,
    ) -> Result<Arc<VerificationKey>, KeyLookupError> {
        let (found, stale) = {
            let cached = self.cached.read().await;
            let stale = match (&self.source, cached.fetched_at) {
                (Source::Fixed, _) => false,
                (Source::Remote { .. }, None) => true,
                (Source::Remote { .. }, Some(at)) => at.elapsed() >= self.max_age,
            };
            (cached.keys.find(kid), stale)
        };
        match found {
            Lookup::Found(key) if !stale => return Ok(key),
            Lookup::Ambiguous if !stale => return Err(KeyLookupError::Ambiguous),
            _ => {}
        }
        let Source::Remote { uri, http } = &self.source else {
            return Err(match found {
                Lookup::Ambiguous => KeyLookupError::Ambiguous,
                _ => KeyLookupError::Unknown,
            });
        };
        let fetch_error = self.refetch(uri, http).await;
        let cached = self.cached.read().await;
        match cached.keys.find(kid) {
            Lookup::Found(key) => Ok(key),
            Lookup::Ambiguous => Err(KeyLookupError::Ambiguous),
            // Never fetched successfully: the identity provider's fault, not the token's.
            Lookup::NotFound if cached.fetched_at.is_none() => Err(KeyLookupError::Unavailable(
                fetch_error
                    .unwrap_or_else(|| "no keys fetched yet; the last attempt failed".to_owned()),
            )),
            Lookup::NotFound => Err(KeyLookupError::Unknown),
        }
    }

    /// Fetches the JWKS unless a fetch happened within the refetch interval. Returns the fetch
    /// error, if this call fetched and failed.
    async fn refetch(&self, uri: &url::Url, http: &reqwest::Client) -> Option<String> {
        let mut last_attempt = self.last_attempt.lock().await;
        if last_attempt.is_some_and(|at| at.elapsed() < self.refetch_interval) {
            // Rate-limited; a concurrent caller may just have fetched, which the caller's
            // second lookup sees.
            return None;
        }
        *last_attempt = Some(Instant::now());
        match fetch(uri, http).await {
            Ok(keys) => {
                tracing::info!(jwks_uri = %uri, keys = keys.len(), "fetched the issuer's signing keys");
                let mut cached = self.cached.write().await;
                cached.keys = keys;
                cached.fetched_at = Some(Instant::now());
                None
            }
            Err(error) => {
                tracing::warn!(jwks_uri = %uri, %error, "cannot fetch the issuer's signing keys");
                Some(error)
            }
        }
    }

    /// Fetches a remote JWKS now (at start-up), so the first request does not wait for it.
    pub(crate) async fn warm_up(&self) -> Result<usize, String> {
        match &self.source {
            Source::Fixed => Ok(self.cached.read().await.keys.len()),
            Source::Remote { uri, http } => {
                if let Some(error) = self.refetch(uri, http).await {
                    return Err(error);
                }
                let cached = self.cached.read().await;
                match cached.fetched_at {
                    Some(_) => Ok(cached.keys.len()),
                    // Rate-limited after a failed attempt.
                    None => Err("no keys fetched yet; the last attempt failed".to_owned()),
                }
            }
        }
    }
}

fn fixed_keys(document: &Value) -> Result<KeySet, String> {
    let keys = KeySet::parse(document)?;
    if keys.len() == 0 {
        return Err(
            "the JWKS holds no usable signing key (RSA, P-256, P-384 or Ed25519)".to_owned(),
        );
    }
    Ok(keys)
}

async fn fetch(uri: &url::Url, http: &reqwest::Client) -> Result<KeySet, String> {
    let mut response = http
        .get(uri.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("the JWKS endpoint answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the JWKS failed: {e}"))?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    let document: Value =
        serde_json::from_slice(&body).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
    KeySet::parse(&document)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn symmetric_encryption_and_mismatched_keys_are_dropped() {
        let ed = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        let document = json!({"keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "enc", "use": "enc", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "pinned-rsa", "alg": "RS256", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "OKP", "crv": "X25519", "kid": "x", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "weird"},
            ed,
        ]});
        let keys = KeySet::parse(&document).expect("a JWKS");
        assert_eq!(keys.len(), 1);
        match keys.find(Some("ed")) {
            Lookup::Found(key) => {
                assert!(key.verifies(SigningAlgorithm::EdDSA));
                assert!(!key.verifies(SigningAlgorithm::RS256));
                assert!(!key.verifies(SigningAlgorithm::ES256));
            }
            _ => panic!("the Ed25519 key is kept"),
        }
        assert!(matches!(keys.find(Some("hmac")), Lookup::NotFound));
        assert!(matches!(keys.find(None), Lookup::Found(_)));
        assert!(KeySet::parse(&json!({"nokeys": []})).is_err());
    }
}
