//! AWS-protocol peers: an S3 server (moto) and a KMS emulator (local-kms).
//!
//! Why moto for S3: it runs without Docker from PyPI, implements conditional writes
//! (`If-None-Match: *` and `If-Match` on PutObject, which SlateDB depends on) and also the bucket
//! configuration the operator manages (public access block, default SSE-KMS, versioning, bucket
//! policy, tagging), which the lighter `s3s-fs` does not. SeaweedFS would need a large Go build.
//! local-kms keeps real key states (enabled, disabled, pending deletion) and checks encryption
//! contexts.
//!
//! Invariants: each server listens on a fresh loopback port, keeps its data in a scratch dir and
//! is registered with the reaper; clients are built per caller so they bind to its runtime.

use std::process::Command;
use std::time::Duration;

use aws_sdk_kms::config::Credentials;

use crate::TestEnvError;
use crate::process::{ManagedProcess, ScratchDir, free_port, tcp_open, wait_until_ready};
use crate::tools;

/// The region every test client uses.
pub const REGION: &str = "eu-west-2";
/// The account id local-kms puts in key ARNs.
pub const ACCOUNT_ID: &str = "111122223333";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Static credentials that the emulators accept.
pub fn test_credentials() -> Credentials {
    Credentials::new(
        "shcr-test-access-key",
        "shcr-test-secret-key",
        None,
        None,
        "shcr-testenv",
    )
}

async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .credentials_provider(test_credentials())
        .endpoint_url(endpoint)
        .load()
        .await
}

/// A running S3-protocol server.
pub struct S3Server {
    process: ManagedProcess,
    endpoint: String,
    _dir: ScratchDir,
}

impl S3Server {
    pub async fn start() -> Result<Self, TestEnvError> {
        let moto = tools::MOTO.executable("moto_server")?;
        let dir = ScratchDir::new("s3")?;
        let port = free_port()?;
        let mut cmd = Command::new(moto);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .env("MOTO_ALLOW_NONEXISTENT_REGION", "true");
        let mut process = ManagedProcess::spawn("moto (S3)", cmd, &dir.path().join("moto.log"))?;
        wait_until_ready(&mut process, START_TIMEOUT, || tcp_open(port)).await?;
        Ok(Self {
            process,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// An S3 client for this server (path-style addressing), bound to the caller's runtime.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        let shared = sdk_config(&self.endpoint).await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Creates a bucket in [`REGION`] (the location constraint the server insists on).
    pub async fn create_bucket(
        &self,
        client: &aws_sdk_s3::Client,
        bucket: &str,
    ) -> Result<(), TestEnvError> {
        use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
        client
            .create_bucket()
            .bucket(bucket)
            .create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(REGION))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                TestEnvError::Io(format!(
                    "creating bucket {bucket}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(e)
                ))
            })
    }

    /// Fails with the log tail when the server has died.
    pub fn ensure_running(&mut self) -> Result<(), TestEnvError> {
        self.process.ensure_running()
    }
}

/// A running KMS-protocol emulator.
pub struct KmsServer {
    process: ManagedProcess,
    endpoint: String,
    _dir: ScratchDir,
}

impl KmsServer {
    pub async fn start() -> Result<Self, TestEnvError> {
        let local_kms = tools::LOCAL_KMS.executable("local-kms")?;
        let dir = ScratchDir::new("kms")?;
        let port = free_port()?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)
            .map_err(|e| TestEnvError::Io(format!("creating {}: {e}", data.display())))?;
        let mut cmd = Command::new(local_kms);
        cmd.env("PORT", port.to_string())
            .env("KMS_REGION", REGION)
            .env("KMS_ACCOUNT_ID", ACCOUNT_ID)
            .env("KMS_DATA_PATH", &data)
            .env("KMS_SEED_PATH", dir.path().join("no-seed.yaml"))
            .current_dir(dir.path());
        let mut process = ManagedProcess::spawn("local-kms", cmd, &dir.path().join("kms.log"))?;
        wait_until_ready(&mut process, START_TIMEOUT, || tcp_open(port)).await?;
        Ok(Self {
            process,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A KMS client for this emulator, bound to the caller's runtime.
    pub async fn client(&self) -> aws_sdk_kms::Client {
        aws_sdk_kms::Client::new(&sdk_config(&self.endpoint).await)
    }

    /// Fails with the log tail when the emulator has died.
    pub fn ensure_running(&mut self) -> Result<(), TestEnvError> {
        self.process.ensure_running()
    }
}
