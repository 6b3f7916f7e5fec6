//! `shcr store` as the operator runs it: configured like the store ConfigMap, against the test
//! environment's S3 server and KMS emulator, serving FHIR requests that carry the gateway's
//! signed identity assertion; restarted on the same bucket it finds its records; a missing
//! bucket or a disabled key stops it with a precise message.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use shcr_identity::{ASSERTION_HEADER, AssertionSigner, Identity, RequestBinding, Scopes};
use shcr_store::serve::{StoreConfig, StoreError, run};
use tokio::sync::oneshot;

const CARE_SYSTEM: &str = "north-east";
const NHS_NUMBER: &str = "9990000018";
const FAMILY: &str = "Featherstonehaugh";

/// The store's AWS credentials come from the standard chain; here, the environment.
fn aws_environment() {
    let credentials = shcr_testenv::aws::test_credentials();
    // SAFETY: every test in this binary sets the same values, before starting any store.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", credentials.access_key_id());
        std::env::set_var("AWS_SECRET_ACCESS_KEY", credentials.secret_access_key());
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
}

struct Cloud {
    bucket: String,
    key_arn: String,
    s3_endpoint: String,
    kms_endpoint: String,
    kms: aws_sdk_kms::Client,
    s3: aws_sdk_s3::Client,
}

async fn cloud() -> Result<Cloud> {
    aws_environment();
    let s3_server = shcr_testenv::s3().await?;
    let kms_server = shcr_testenv::kms().await?;
    let s3 = s3_server.client().await;
    let kms = kms_server.client().await;
    let bucket = shcr_testenv::unique_name("store");
    s3_server.create_bucket(&s3, &bucket).await?;
    let key = kms.create_key().send().await?;
    let key_arn = key
        .key_metadata()
        .map(|m| m.arn().unwrap_or_default().to_string())
        .context("key arn")?;
    Ok(Cloud {
        bucket,
        key_arn,
        s3_endpoint: s3_server.endpoint().to_string(),
        kms_endpoint: kms_server.endpoint().to_string(),
        kms,
        s3,
    })
}

fn config(cloud: &Cloud, signer: &AssertionSigner) -> StoreConfig {
    StoreConfig {
        care_system: CARE_SYSTEM.into(),
        ods_code: "QHM".into(),
        display_name: "North East and North Cumbria".into(),
        members: vec!["A81001".into(), "RTD".into()],
        bucket: cloud.bucket.clone(),
        region: shcr_testenv::aws::REGION.into(),
        kms_key_arn: cloud.key_arn.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        s3_endpoint: Some(cloud.s3_endpoint.clone()),
        kms_endpoint: Some(cloud.kms_endpoint.clone()),
        assertion_public_key: Some(signer.public_key_pem()),
        ..StoreConfig::default()
    }
}

/// A store running in this process, stopped like SIGTERM stops it.
struct Running {
    fhir: String,
    metrics: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

impl Running {
    async fn start(config: StoreConfig) -> Result<Self> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(run(
            config,
            async {
                let _ = stopped.await;
            },
            move |fhir, metrics| {
                let _ = ready_tx.send((fhir, metrics));
            },
        ));
        let (fhir, metrics) = match ready_rx.await {
            Ok(addrs) => addrs,
            Err(_) => {
                let outcome = task.await?;
                anyhow::bail!("the store did not start: {outcome:?}");
            }
        };
        Ok(Self {
            fhir: format!("http://{fhir}/{CARE_SYSTEM}/fhir"),
            metrics: format!("http://{metrics}"),
            stop,
            task,
        })
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        Ok(tokio::time::timeout(Duration::from_secs(60), self.task).await???)
    }
}

/// An assertion for the one request `method url` with `body`.
fn assertion(signer: &AssertionSigner, method: &str, url: &str, body: &str) -> Result<String> {
    let url = reqwest::Url::parse(url)?;
    let target = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    Ok(signer.sign(
        &Identity {
            issuer: "https://idp.example".into(),
            subject: "555021935107".into(),
            organisation: "A81001".into(),
            role: "R8000".into(),
            scopes: Scopes::parse("user/*.cruds")?,
            patient: None,
            care_system: CARE_SYSTEM.into(),
            break_glass_reason: None,
            request_id: "test-request".into(),
            origin: None,
        },
        &RequestBinding::new(method, &target, body.as_bytes()),
        Duration::from_secs(60),
    )?)
}

async fn wait_ready(http: &reqwest::Client, metrics: &str) -> Result<()> {
    for _ in 0..100 {
        if http
            .get(format!("{metrics}/readyz"))
            .send()
            .await?
            .status()
            .is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("/readyz never answered 200")
}

#[tokio::test]
async fn serves_signed_requests_and_keeps_records_across_restarts() -> Result<()> {
    let cloud = cloud().await?;
    let signer = AssertionSigner::generate()?;
    let http = reqwest::Client::new();

    let store = Running::start(config(&cloud, &signer)).await?;
    wait_ready(&http, &store.metrics).await?;
    let metrics = http
        .get(format!("{}/metrics", store.metrics))
        .send()
        .await?
        .text()
        .await?;
    assert!(metrics.contains("shcr_store_ready 1"), "{metrics}");

    let unsigned = http
        .get(format!("{}/Patient?_count=1", store.fhir))
        .send()
        .await?;
    assert_eq!(unsigned.status(), 401, "no assertion, no access");

    let url = format!("{}/Patient", store.fhir);
    let body = json!({
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS_NUMBER}],
        "name": [{"family": FAMILY}],
    })
    .to_string();
    let created = http
        .post(&url)
        .header(ASSERTION_HEADER, assertion(&signer, "POST", &url, &body)?)
        .header("content-type", "application/fhir+json")
        .body(body)
        .send()
        .await?;
    assert_eq!(created.status(), 201, "{}", created.text().await?);
    let location = created
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .context("Location")?
        .to_string();
    let id = location
        .split("/Patient/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .context("id in Location")?
        .to_string();

    store.stop().await?;

    // Restarted on the same bucket and key: the record is still there.
    let store = Running::start(config(&cloud, &signer)).await?;
    let url = format!("{}/Patient/{id}", store.fhir);
    let read = http
        .get(&url)
        .header(ASSERTION_HEADER, assertion(&signer, "GET", &url, "")?)
        .send()
        .await?;
    assert_eq!(read.status(), 200);
    let body: Value = read.json().await?;
    assert_eq!(body["name"][0]["family"], FAMILY);
    store.stop().await?;

    // Nothing in the bucket holds the patient's data in the clear.
    let listed = cloud
        .s3
        .list_objects_v2()
        .bucket(&cloud.bucket)
        .send()
        .await?;
    let keys: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    ensure!(!keys.is_empty(), "the store wrote to its bucket");
    for key in keys {
        let object = cloud
            .s3
            .get_object()
            .bucket(&cloud.bucket)
            .key(&key)
            .send()
            .await?;
        let bytes = object.body.collect().await?.into_bytes();
        for secret in [NHS_NUMBER, FAMILY] {
            ensure!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{key} holds patient data in the clear"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_missing_bucket_or_a_disabled_key_stops_it_with_a_precise_message() -> Result<()> {
    let cloud = cloud().await?;
    let signer = AssertionSigner::generate()?;

    let missing = StoreConfig {
        bucket: "shcr-no-such-bucket".into(),
        ..config(&cloud, &signer)
    };
    let err = run(missing, async {}, |_, _| {})
        .await
        .err()
        .context("a missing bucket is refused")?;
    let message = err.to_string();
    ensure!(matches!(err, StoreError::BucketMissing { .. }), "{message}");
    assert!(message.contains("shcr-no-such-bucket"), "{message}");
    assert!(message.contains("does not exist"), "{message}");

    cloud
        .kms
        .disable_key()
        .key_id(&cloud.key_arn)
        .send()
        .await?;
    let err = run(config(&cloud, &signer), async {}, |_, _| {})
        .await
        .err()
        .context("a disabled key is refused")?;
    let message = err.to_string();
    ensure!(matches!(err, StoreError::KeyNotEnabled { .. }), "{message}");
    assert!(message.contains("Disabled"), "{message}");
    assert!(message.contains(&cloud.key_arn), "{message}");

    let err =
        run(
            StoreConfig {
                kms_key_arn:
                    "arn:aws:kms:eu-west-2:111122223333:key/00000000-0000-0000-0000-000000000000"
                        .into(),
                ..config(&cloud, &signer)
            },
            async {},
            |_, _| {},
        )
        .await
        .err()
        .context("an unknown key is refused")?;
    ensure!(matches!(err, StoreError::KeyMissing { .. }), "{err}");
    Ok(())
}
