//! The gateway's authentication and authorisation against a real JWKS endpoint: the
//! token-attack matrix (each attack gets its precise 401), key rotation and the refetch rate
//! limit, claims mapping (CIS2 and flat), the scope/membership/compartment matrix, the HTTP
//! shape of refusals, and dev tokens (`shcr token`) verifying with the dev issuer config.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use axum::Router;
use axum::body::to_bytes;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Parser;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use shcr_gateway::auth::{
    AuthError, Authenticator, ClaimsError, ClaimsMapping, DEV_ISSUER, Denial, DevIssuer,
    IssuerConfig, JwksSource, MAX_TOKEN_BYTES, Principal, TokenArgs, authorize, classify,
};
use shcr_identity::Scopes;
use shcr_runtime::metrics::MetricsRegistry;

const ISSUER: &str = "https://idp.test/realms/healthcare";
const FLAT_ISSUER: &str = "https://flat-idp.test";
const AUDIENCE: &str = "urn:shcr:care-system:{care_system}";
const CARE_SYSTEM: &str = "north-east";

// ---------------------------------------------------------------------------------------------
// A real JWKS endpoint on a loopback port.

struct JwksServer {
    uri: url::Url,
    document: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: &[&TestKey]) -> Self {
        let document = Arc::new(Mutex::new(jwks(keys)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (document.clone(), fetches.clone());
        let app = Router::new().route(
            "/jwks",
            get(move || {
                let (doc, count) = (doc.clone(), count.clone());
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = doc.lock().expect("lock").to_string();
                    ([("content-type", "application/json")], body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            uri: format!("http://{addr}/jwks").parse().expect("url"),
            document,
            fetches,
        }
    }

    fn publish(&self, keys: &[&TestKey]) {
        *self.document.lock().expect("lock") = jwks(keys);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

// ---------------------------------------------------------------------------------------------
// Signing keys of the three families the gateway accepts.

struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key as a PEM, what an attacker would use as an HMAC secret.
    public_pem: String,
}

fn rsa_key(kid: &str) -> TestKey {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
    let pkcs8 = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair)
        .expect("pkcs8");
    let pem_text = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    let encoding = EncodingKey::from_rsa_pem(pem_text.as_bytes()).expect("rsa pem");
    let mut jwk =
        serde_json::to_value(Jwk::from_encoding_key(&encoding, Algorithm::RS256).expect("jwk"))
            .expect("json");
    jwk["kid"] = json!(kid);
    jwk["use"] = json!("sig");
    let spki = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(
        pair.public_key(),
    )
    .expect("spki");
    TestKey {
        kid: kid.to_owned(),
        alg: Algorithm::RS256,
        encoding,
        jwk,
        public_pem: pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec())),
    }
}

fn ec_key(kid: &str) -> TestKey {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("ec");
    let encoding = EncodingKey::from_ec_der(pkcs8.as_ref());
    let mut jwk =
        serde_json::to_value(Jwk::from_encoding_key(&encoding, Algorithm::ES256).expect("jwk"))
            .expect("json");
    jwk["kid"] = json!(kid);
    TestKey {
        kid: kid.to_owned(),
        alg: Algorithm::ES256,
        encoding,
        jwk,
        public_pem: String::new(),
    }
}

fn ed_key(kid: &str) -> TestKey {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let document = Ed25519KeyPair::generate_pkcs8(&rng).expect("ed25519");
    let pair = Ed25519KeyPair::from_pkcs8(document.as_ref()).expect("parse");
    let v1 = pair.to_pkcs8v1().expect("v1");
    TestKey {
        kid: kid.to_owned(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(v1.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                    "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref())}),
        public_pem: String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens.

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// CIS2-shaped claims for a clinician at Y02494 in `care_system`.
fn cis2_claims(care_system: &str) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE.replace("{care_system}", care_system),
        "sub": "910000000001",
        "iat": now(),
        "exp": now() + 600,
        "scope": "openid user/*.cruds",
        "selected_roleid": "555254242106",
        "nhsid_nrbac_roles": [
            {"person_roleid": "555254240100", "org_code": "RR8", "role_code": "S8000:G8000:R8001", "activity_codes": ["B0211"]},
            {"person_roleid": "555254242106", "org_code": "Y02494", "role_code": "S8000:G8000:R8000", "activity_codes": ["B0264"]}
        ]
    })
}

fn sign(key: &TestKey, claims: &Value) -> String {
    sign_as(key, key.alg, Some(&key.kid), claims)
}

fn sign_as(key: &TestKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key.encoding).expect("sign")
}

fn bearer(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {token}")).expect("header value")
}

fn issuer(uri: &url::Url) -> IssuerConfig {
    IssuerConfig::new(
        ISSUER,
        vec![AUDIENCE.to_owned()],
        JwksSource::Uri(uri.clone()),
    )
}

async fn authenticate(auth: &Authenticator, token: &str) -> Result<Principal, AuthError> {
    auth.authenticate(Some(&bearer(token)), CARE_SYSTEM).await
}

/// Changes `claims` and re-signs with `key`.
fn with(key: &TestKey, change: impl FnOnce(&mut Value)) -> String {
    let mut claims = cis2_claims(CARE_SYSTEM);
    change(&mut claims);
    sign(key, &claims)
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn token_attack_matrix_each_gets_its_precise_401() {
    let (rsa, ec, ed) = (rsa_key("rsa-1"), ec_key("ec-1"), ed_key("ed-1"));
    let server = JwksServer::start(&[&rsa, &ec, &ed]).await;
    let auth = Authenticator::new(vec![issuer(&server.uri)], reqwest::Client::new())
        .expect("authenticator");
    let metrics = MetricsRegistry::new();
    auth.register_metrics(&metrics);

    // The three families verify.
    for key in [&rsa, &ec, &ed] {
        let principal = authenticate(&auth, &sign(key, &cis2_claims(CARE_SYSTEM)))
            .await
            .unwrap_or_else(|e| panic!("{:?} token: {e}", key.alg));
        assert_eq!(principal.organisation, "Y02494");
        assert_eq!(principal.issuer, ISSUER);
    }
    // Inside the 60 s skew an expired token still passes.
    authenticate(&auth, &with(&rsa, |c| c["exp"] = json!(now() - 30)))
        .await
        .expect("within clock skew");

    let valid = sign(&rsa, &cis2_claims(CARE_SYSTEM));
    let parts: Vec<&str> = valid.split('.').collect();
    let mut tampered: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
    tampered["nhsid_nrbac_roles"][1]["org_code"] = json!("RR8");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(tampered.to_string()),
        parts[2]
    );
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#);
    let alg_none = format!("{none_header}.{}.", parts[1]);
    let hs256_with_public_key = jsonwebtoken::encode(
        &{
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("rsa-1".to_owned());
            h
        },
        &cis2_claims(CARE_SYSTEM),
        &EncodingKey::from_secret(rsa.public_pem.as_bytes()),
    )
    .expect("hs256");
    let oversized = with(&rsa, |c| c["padding"] = json!("x".repeat(MAX_TOKEN_BYTES)));
    // A P-256 signature presented under the RSA key's kid, and the reverse.
    let ec_under_rsa_kid = sign_as(
        &ec,
        Algorithm::ES256,
        Some("rsa-1"),
        &cis2_claims(CARE_SYSTEM),
    );
    let rsa_under_ec_kid = sign_as(
        &rsa,
        Algorithm::RS256,
        Some("ec-1"),
        &cis2_claims(CARE_SYSTEM),
    );
    // PS256 is a fine RSA algorithm but not in this issuer's allow-list.
    let ps256 = sign_as(
        &rsa,
        Algorithm::PS256,
        Some("rsa-1"),
        &cis2_claims(CARE_SYSTEM),
    );

    let cases: Vec<(&str, Option<HeaderValue>, AuthError)> = vec![
        ("missing", None, AuthError::MissingToken),
        (
            "basic auth",
            Some(HeaderValue::from_static("Basic dXNlcjpwYXNz")),
            AuthError::MalformedHeader("the scheme is not Bearer"),
        ),
        (
            "not a jwt",
            Some(bearer("not-a-jwt")),
            AuthError::Malformed("expected three base64url parts separated by dots".into()),
        ),
        (
            "expired",
            Some(bearer(&with(&rsa, |c| c["exp"] = json!(now() - 120)))),
            AuthError::Expired,
        ),
        (
            "not yet valid",
            Some(bearer(&with(&rsa, |c| c["nbf"] = json!(now() + 120)))),
            AuthError::NotYetValid,
        ),
        (
            "wrong iss",
            Some(bearer(&with(&rsa, |c| {
                c["iss"] = json!("https://evil.test")
            }))),
            AuthError::UntrustedIssuer,
        ),
        (
            "wrong aud",
            Some(bearer(&with(&rsa, |c| c["aud"] = json!("some-other-api")))),
            AuthError::WrongAudience,
        ),
        (
            "another care system's aud",
            Some(bearer(&sign(&rsa, &cis2_claims("west-yorkshire")))),
            AuthError::WrongAudience,
        ),
        (
            "unknown kid",
            Some(bearer(&sign_as(
                &rsa,
                Algorithm::RS256,
                Some("rsa-unknown"),
                &cis2_claims(CARE_SYSTEM),
            ))),
            AuthError::UnknownKey,
        ),
        (
            "tampered payload",
            Some(bearer(&tampered)),
            AuthError::BadSignature,
        ),
        ("alg none", Some(bearer(&alg_none)), AuthError::Unsigned),
        (
            "HS256 signed with the public key",
            Some(bearer(&hs256_with_public_key)),
            AuthError::Hmac {
                alg: "HS256".into(),
            },
        ),
        (
            "oversized",
            Some(bearer(&oversized)),
            AuthError::TokenTooLarge {
                limit: MAX_TOKEN_BYTES,
            },
        ),
        (
            "ES256 under an RSA key",
            Some(bearer(&ec_under_rsa_kid)),
            AuthError::KeyMismatch {
                alg: shcr_gateway::auth::SigningAlgorithm::ES256,
                key: "an RSA key",
            },
        ),
        (
            "RS256 under an EC key",
            Some(bearer(&rsa_under_ec_kid)),
            AuthError::KeyMismatch {
                alg: shcr_gateway::auth::SigningAlgorithm::RS256,
                key: "a P-256 key",
            },
        ),
        (
            "algorithm outside the issuer's allow-list",
            Some(bearer(&ps256)),
            AuthError::AlgorithmNotAllowed {
                alg: shcr_gateway::auth::SigningAlgorithm::PS256,
            },
        ),
        (
            "no exp",
            Some(bearer(&with(&rsa, |c| {
                c.as_object_mut().expect("object").remove("exp");
            }))),
            AuthError::MissingClaim("exp".into()),
        ),
        (
            "no sub",
            Some(bearer(&with(&rsa, |c| {
                c.as_object_mut().expect("object").remove("sub");
            }))),
            AuthError::Claims(ClaimsError::Missing {
                claim: "sub".into(),
                hint: "",
            }),
        ),
    ];
    for (name, header, expected) in cases {
        let got = auth.authenticate(header.as_ref(), CARE_SYSTEM).await;
        assert_eq!(got.as_ref().err(), Some(&expected), "{name}: got {got:?}");

        // Every one is a 401 with a Bearer challenge and a `login` OperationOutcome.
        let response = expected.clone().into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name}");
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .expect("challenge")
            .to_owned();
        match expected {
            AuthError::MissingToken => assert_eq!(challenge, "Bearer"),
            AuthError::MalformedHeader(_) => {
                assert!(
                    challenge.contains("error=\"invalid_request\""),
                    "{challenge}"
                )
            }
            _ => assert!(challenge.contains("error=\"invalid_token\""), "{challenge}"),
        }
        let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
        let outcome: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(outcome["issue"][0]["code"], "login", "{name}");
        assert_eq!(
            outcome["issue"][0]["diagnostics"],
            json!(expected.to_string()),
            "{name}"
        );
    }

    // Refusals are counted by reason, with no other label.
    let text = metrics.encode().expect("metrics");
    for reason in [
        "missing_token",
        "expired",
        "algorithm",
        "bad_signature",
        "audience",
        "issuer",
    ] {
        assert!(
            text.contains(&format!(
                "shcr_gateway_unauthenticated_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted:\n{text}"
        );
    }
}

#[tokio::test]
async fn key_rotation_refetches_and_the_refetch_rate_is_limited() {
    let (old, new) = (rsa_key("2026-01"), ed_key("2026-02"));
    let server = JwksServer::start(&[&old]).await;
    let mut config = issuer(&server.uri);
    config.jwks_refetch_interval = Duration::from_secs(1);
    let auth = Authenticator::new(vec![config], reqwest::Client::new()).expect("authenticator");

    authenticate(&auth, &sign(&old, &cis2_claims(CARE_SYSTEM)))
        .await
        .expect("old key");
    assert_eq!(server.fetches(), 1, "first use fetches the JWKS once");
    authenticate(&auth, &sign(&old, &cis2_claims(CARE_SYSTEM)))
        .await
        .expect("cached");
    assert_eq!(server.fetches(), 1, "known keys come from the cache");

    // The issuer rotates; a token with the new kid arrives at once: the cache was filled less
    // than the refetch interval ago, so no fetch, and a flood of unknown kids changes nothing.
    server.publish(&[&old, &new]);
    let new_token = sign(&new, &cis2_claims(CARE_SYSTEM));
    for _ in 0..20 {
        assert_eq!(
            authenticate(&auth, &new_token).await.err(),
            Some(AuthError::UnknownKey)
        );
    }
    assert_eq!(server.fetches(), 1, "refetches are rate-limited");

    // After the interval, the unknown kid triggers one refetch and the new key verifies.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let principal = authenticate(&auth, &new_token).await.expect("rotated key");
    assert_eq!(principal.subject, "910000000001");
    assert_eq!(server.fetches(), 2);

    // Concurrent unknown kids right after a fetch: still no extra fetch.
    let forged = sign_as(
        &new,
        Algorithm::EdDSA,
        Some("forged"),
        &cis2_claims(CARE_SYSTEM),
    );
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (auth, forged) = (auth.clone(), forged.clone());
        attempts.spawn(async move { authenticate(&auth, &forged).await });
    }
    while let Some(result) = attempts.join_next().await {
        assert_eq!(result.expect("task").err(), Some(AuthError::UnknownKey));
    }
    assert_eq!(server.fetches(), 2);

    // The default interval is 30 s.
    let server = JwksServer::start(&[&old]).await;
    let auth = Authenticator::new(vec![issuer(&server.uri)], reqwest::Client::new())
        .expect("authenticator");
    authenticate(&auth, &sign(&old, &cis2_claims(CARE_SYSTEM)))
        .await
        .expect("old key");
    server.publish(&[&old, &new]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        authenticate(&auth, &new_token).await.err(),
        Some(AuthError::UnknownKey)
    );
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn unreachable_jwks_is_503_not_401() {
    let rsa = rsa_key("k");
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let uri: url::Url = format!("http://127.0.0.1:{port}/jwks")
        .parse()
        .expect("url");
    let auth =
        Authenticator::new(vec![issuer(&uri)], reqwest::Client::new()).expect("authenticator");
    let err = authenticate(&auth, &sign(&rsa, &cis2_claims(CARE_SYSTEM)))
        .await
        .expect_err("no keys");
    assert_eq!(err, AuthError::KeysUnavailable);
    let response = err.into_response();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert!(
        auth.warm_up().await.len() == 1,
        "warm-up reports the issuer"
    );
}

#[tokio::test]
async fn claims_mapping_cis2_and_flat_issuers() {
    let (cis2_key, flat_key) = (ec_key("cis2"), ed_key("flat"));
    let server = JwksServer::start(&[&cis2_key]).await;
    let mut flat = IssuerConfig::new(
        FLAT_ISSUER,
        vec!["shcr-gateway".to_owned()],
        JwksSource::Inline(jwks(&[&flat_key])),
    );
    flat.claims = ClaimsMapping::flat();
    let auth = Authenticator::new(vec![issuer(&server.uri), flat], reqwest::Client::new())
        .expect("authenticator");

    // CIS2: the selected role decides organisation and role.
    let principal = authenticate(&auth, &sign(&cis2_key, &cis2_claims(CARE_SYSTEM)))
        .await
        .expect("cis2");
    assert_eq!(principal.organisation, "Y02494");
    assert_eq!(principal.role, "S8000:G8000:R8000");
    assert_eq!(principal.person_role_id.as_deref(), Some("555254242106"));
    assert_eq!(principal.activity_codes, vec!["B0264"]);
    assert_eq!(
        principal.scopes,
        Scopes::parse("openid user/*.cruds").expect("scopes")
    );
    let switched = with(&cis2_key, |c| c["selected_roleid"] = json!("555254240100"));
    let principal = authenticate(&auth, &switched).await.expect("other role");
    assert_eq!(principal.organisation, "RR8");

    // CIS2 without a selected role, or one naming no listed role: 401 naming the claim.
    let err = authenticate(
        &auth,
        &with(&cis2_key, |c| {
            c.as_object_mut().expect("object").remove("selected_roleid");
        }),
    )
    .await
    .expect_err("no selected role");
    assert!(err.to_string().contains("selected_roleid"), "{err}");
    assert_eq!(err.into_response().status(), StatusCode::UNAUTHORIZED);
    let err = authenticate(
        &auth,
        &with(&cis2_key, |c| c["selected_roleid"] = json!("1")),
    )
    .await
    .expect_err("unlisted role");
    assert!(
        err.to_string().contains("matches no person_roleid"),
        "{err}"
    );

    // Flat claims from another issuer; its audience has no care-system placeholder.
    let flat_claims = json!({
        "iss": FLAT_ISSUER, "aud": ["shcr-gateway", "account"], "sub": "svc-1",
        "exp": now() + 60, "org": "RR8", "role": "R8000",
        "scope": "user/Observation.rs",
    });
    let principal = authenticate(&auth, &sign(&flat_key, &flat_claims))
        .await
        .expect("flat");
    assert_eq!(
        (principal.organisation.as_str(), principal.role.as_str()),
        ("RR8", "R8000")
    );
    assert_eq!(principal.person_role_id, None);
    let mut no_org = flat_claims.clone();
    no_org.as_object_mut().expect("object").remove("org");
    let err = authenticate(&auth, &sign(&flat_key, &no_org))
        .await
        .expect_err("no org");
    assert_eq!(err.to_string(), "the token has no org claim");

    // A patient-facing token: patient/ scopes need the patient claim.
    let mut patient = flat_claims.clone();
    patient["scope"] = json!("patient/*.rs");
    let err = authenticate(&auth, &sign(&flat_key, &patient))
        .await
        .expect_err("no patient");
    assert!(err.to_string().contains("patient"), "{err}");
    patient["patient"] = json!("pat-1");
    let principal = authenticate(&auth, &sign(&flat_key, &patient))
        .await
        .expect("patient token");
    assert!(principal.is_patient_confined());
    assert_eq!(principal.patient.as_deref(), Some("pat-1"));
}

fn principal(org: &str, scope: &str, patient: Option<&str>) -> Principal {
    Principal {
        subject: "u".into(),
        issuer: ISSUER.into(),
        organisation: org.into(),
        role: "R8000".into(),
        person_role_id: None,
        activity_codes: Vec::new(),
        scopes: Scopes::parse(scope).expect("scopes"),
        patient: patient.map(str::to_owned),
    }
}

/// (organisation, scopes, patient, method, path, query, expected denial reason or None)
type MatrixCase<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    &'a Method,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
);

#[test]
fn scope_membership_and_compartment_matrix() {
    let members = vec!["RR8".to_owned(), "Y02494".to_owned()];
    let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
    let cases: Vec<MatrixCase> = vec![
        ("RR8", "user/*.cruds", None, &get, "Patient/p1", None, None),
        ("RR8", "user/*.cruds", None, &post, "", None, None),
        ("RR8", "user/*.cruds", None, &get, "_history", None, None),
        (
            "A81001",
            "user/*.cruds",
            None,
            &get,
            "Patient/p1",
            None,
            Some("not_member"),
        ),
        (
            "A81001",
            "user/*.cruds",
            None,
            &post,
            "",
            None,
            Some("not_member"),
        ),
        // Read-only scopes cannot write.
        (
            "RR8",
            "user/*.rs",
            None,
            &get,
            "Observation",
            Some("code=x"),
            None,
        ),
        (
            "RR8",
            "user/*.rs",
            None,
            &post,
            "Observation",
            None,
            Some("scope"),
        ),
        (
            "RR8",
            "user/*.rs",
            None,
            &put,
            "Observation/o1",
            None,
            Some("scope"),
        ),
        (
            "RR8",
            "user/*.rs",
            None,
            &delete,
            "Observation/o1",
            None,
            Some("scope"),
        ),
        (
            "RR8",
            "user/*.read",
            None,
            &get,
            "Observation/o1/_history/2",
            None,
            None,
        ),
        // Resource-type scopes.
        (
            "RR8",
            "user/Observation.rs",
            None,
            &get,
            "Observation/o1",
            None,
            None,
        ),
        (
            "RR8",
            "user/Observation.rs",
            None,
            &get,
            "Condition/c1",
            None,
            Some("scope"),
        ),
        (
            "RR8",
            "user/Observation.r",
            None,
            &get,
            "Observation",
            None,
            Some("scope"),
        ),
        (
            "RR8",
            "user/Observation.rs",
            None,
            &get,
            "Patient/p1/Observation",
            None,
            None,
        ),
        (
            "RR8",
            "user/Observation.rs",
            None,
            &get,
            "Patient/p1/Condition",
            None,
            Some("scope"),
        ),
        // System-level interactions need `*`.
        (
            "RR8",
            "user/Observation.rs user/Patient.rs",
            None,
            &get,
            "_history",
            None,
            Some("scope"),
        ),
        (
            "RR8",
            "user/Observation.rs",
            None,
            &get,
            "",
            None,
            Some("scope"),
        ),
        (
            "RR8",
            "user/Observation.rs",
            None,
            &get,
            "",
            Some("_type=Observation"),
            None,
        ),
        (
            "RR8",
            "user/Observation.rs",
            None,
            &get,
            "",
            Some("_type=Observation,Condition"),
            Some("scope"),
        ),
        (
            "RR8",
            "user/Patient.rs",
            None,
            &get,
            "Patient/p1/$everything",
            None,
            Some("scope"),
        ),
        (
            "RR8",
            "user/*.rs",
            None,
            &get,
            "Patient/p1/$everything",
            None,
            None,
        ),
        ("RR8", "user/*.rs", None, &get, "$export", None, None),
        (
            "RR8",
            "user/Observation.cruds",
            None,
            &get,
            "$export",
            None,
            Some("scope"),
        ),
        // No clinical scope at all.
        (
            "RR8",
            "openid fhirUser",
            None,
            &get,
            "Patient/p1",
            None,
            Some("no_clinical_scope"),
        ),
        (
            "RR8",
            "openid",
            None,
            &post,
            "",
            None,
            Some("no_clinical_scope"),
        ),
        // Patient-confined tokens: their own compartment only.
        (
            "RR8",
            "patient/*.rs",
            Some("p1"),
            &get,
            "Patient/p1",
            None,
            None,
        ),
        (
            "RR8",
            "patient/*.rs",
            Some("p1"),
            &get,
            "Patient/p2",
            None,
            Some("other_patient"),
        ),
        (
            "RR8",
            "patient/*.rs",
            Some("p1"),
            &get,
            "Patient/p1/$everything",
            None,
            None,
        ),
        (
            "RR8",
            "patient/*.rs",
            Some("p1"),
            &get,
            "Patient/p2/$everything",
            None,
            Some("other_patient"),
        ),
        (
            "RR8",
            "patient/*.rs",
            Some("p1"),
            &get,
            "Patient/p2/Observation",
            None,
            Some("other_patient"),
        ),
        (
            "RR8",
            "patient/*.rs",
            Some("p1"),
            &get,
            "Observation",
            None,
            None,
        ),
        (
            "RR8",
            "patient/*.rs",
            Some("p1"),
            &get,
            "_history",
            None,
            Some("across_patients"),
        ),
        (
            "RR8",
            "patient/*.rs",
            Some("p1"),
            &get,
            "$export",
            None,
            Some("across_patients"),
        ),
        (
            "RR8",
            "patient/*.rs",
            Some("p1"),
            &post,
            "Observation",
            None,
            Some("scope"),
        ),
        // user/ scopes beside patient/ ones are not confined.
        (
            "RR8",
            "patient/*.rs user/Patient.r",
            Some("p1"),
            &get,
            "Patient/p2",
            None,
            None,
        ),
        // Public URLs need nothing.
        ("A81001", "openid", None, &get, "metadata", None, None),
    ];
    for (org, scope, patient, method, path, query, expected) in cases {
        let class =
            classify(method, path, query).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let got = authorize(&principal(org, scope, patient), &members, &class);
        assert_eq!(
            got.as_ref().err().map(Denial::reason),
            expected,
            "{org} [{scope}] {method} {path}?{query:?}: {got:?}"
        );
    }
}

#[tokio::test]
async fn denials_are_403_outcomes_that_say_nothing_about_records() {
    let auth = Authenticator::new(Vec::new(), reqwest::Client::new()).expect("no issuers");
    let metrics = MetricsRegistry::new();
    auth.register_metrics(&metrics);
    let members = vec!["RR8".to_owned()];
    let class = classify(&Method::GET, "Patient/9434765919", None).expect("class");
    let denial = auth
        .authorize(
            &principal("A81001", "user/*.rs", None),
            CARE_SYSTEM,
            &members,
            &class,
        )
        .expect_err("not a member");
    let other = auth
        .authorize(
            &principal("RR8", "patient/*.rs", Some("p1")),
            CARE_SYSTEM,
            &members,
            &class,
        )
        .expect_err("another patient");
    for denial in [denial, other] {
        let response = denial.into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
        let text = String::from_utf8(body.to_vec()).expect("utf8");
        let outcome: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(outcome["issue"][0]["code"], "forbidden");
        // Neither the id asked for nor any hint of whether it exists.
        assert!(!text.contains("9434765919"), "{text}");
        assert!(
            !text.contains("not found") && !text.contains("exist"),
            "{text}"
        );
    }
    let text = metrics.encode().expect("metrics");
    assert!(
        text.contains("shcr_gateway_forbidden_total{reason=\"not_member\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("shcr_gateway_forbidden_total{reason=\"other_patient\"} 1"),
        "{text}"
    );
}

#[derive(Debug, Parser)]
struct TokenCommand {
    #[command(flatten)]
    args: TokenArgs,
}

#[tokio::test]
async fn shcr_token_output_verifies_with_the_dev_issuer_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().to_str().expect("utf-8 path");
    // Exactly the flags `shcr token` takes.
    let command = TokenCommand::try_parse_from([
        "shcr-token",
        "--data-dir",
        data_dir,
        "--care-system",
        CARE_SYSTEM,
        "--org",
        "RR8",
        "--role",
        "R8000",
        "--ttl",
        "15m",
    ])
    .expect("flags parse");
    assert_eq!(command.args.scope, "user/*.cruds", "default scope");
    assert_eq!(command.args.ttl, Duration::from_secs(900));
    let dev = DevIssuer::load_or_create(command.args.data_dir.as_deref().expect("dir"))
        .expect("dev issuer");
    let token = dev.issue(&command.args.request()).expect("token");

    // A fresh load (another process: `shcr dev`) trusts it.
    let gateway_side = DevIssuer::load_or_create(dir.path()).expect("reload");
    let auth = Authenticator::new(vec![gateway_side.issuer_config()], reqwest::Client::new())
        .expect("dev authenticator");
    let principal = auth
        .authenticate(Some(&bearer(&token)), CARE_SYSTEM)
        .await
        .expect("dev token verifies");
    assert_eq!(principal.issuer, DEV_ISSUER);
    assert_eq!(principal.organisation, "RR8");
    assert_eq!(principal.role, "R8000");
    assert_eq!(principal.subject, "dev-user");
    assert_eq!(
        principal.scopes,
        Scopes::parse("user/*.cruds").expect("scopes")
    );
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).expect("payload"))
            .expect("b64"),
    )
    .expect("json");
    let lifetime = claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat");
    assert_eq!(lifetime, 900);

    // Bound to its care system.
    assert_eq!(
        auth.authenticate(Some(&bearer(&token)), "west-yorkshire")
            .await
            .err(),
        Some(AuthError::WrongAudience)
    );
    // A patient-facing dev token.
    let command = TokenCommand::try_parse_from([
        "shcr-token",
        "--data-dir",
        data_dir,
        "--care-system",
        CARE_SYSTEM,
        "--org",
        "RR8",
        "--role",
        "patient",
        "--scope",
        "patient/*.rs",
        "--patient",
        "p-42",
        "--user",
        "nhs-login-1",
    ])
    .expect("flags parse");
    let token = dev.issue(&command.args.request()).expect("token");
    let principal = auth
        .authenticate(Some(&bearer(&token)), CARE_SYSTEM)
        .await
        .expect("patient token verifies");
    assert!(principal.is_patient_confined());
    assert_eq!(principal.patient.as_deref(), Some("p-42"));

    // A production-style gateway (no dev issuer configured) refuses dev tokens.
    let rsa = rsa_key("prod");
    let server = JwksServer::start(&[&rsa]).await;
    let production =
        Authenticator::new(vec![issuer(&server.uri)], reqwest::Client::new()).expect("prod");
    assert_eq!(
        production
            .authenticate(Some(&bearer(&token)), CARE_SYSTEM)
            .await
            .err(),
        Some(AuthError::UntrustedIssuer)
    );
}
