//! The ShCR test environment: real protocol peers for tests, built from source and cached.
//!
//! A test asks for what it needs — [`kube`], [`s3`], [`kms`] — and gets a running, ready server
//! shared by every test of the same test binary (started once, on first use). Clients are built
//! per call so that they bind to the calling test's async runtime. Cold, the first call builds
//! the tool into `~/.cache/shcr/testenv/` (see [`tools`]); warm, start-up takes seconds.
//!
//! Clean-up: shared servers live in statics and are never dropped; the reaper (see [`process`])
//! kills them and removes their temp dirs when the test binary exits, however it exits.

pub mod aws;
pub mod kube_cluster;
pub mod pki;
pub mod process;
pub mod tools;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::OnceCell;

pub use aws::{KmsServer, S3Server};
pub use kube_cluster::KubeCluster;

/// What can go wrong while building or starting the environment. Every message says what
/// happened and, where there is one, what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TestEnvError {
    #[error(
        "Go is not installed (no `go` on PATH): the test environment builds Kubernetes, etcd, \
         helm, local-kms and OpenTofu from Go modules; install Go ≥ {}.{}",
        tools::MIN_GO.0,
        tools::MIN_GO.1
    )]
    GoMissing,
    #[error(
        "Go is too old or unrecognised (`{found}`): the test environment needs Go ≥ {}.{} \
         (Kubernetes 1.36 requires it)",
        tools::MIN_GO.0,
        tools::MIN_GO.1
    )]
    GoTooOld { found: String },
    #[error("building {tool} for the test environment failed; last lines of its log:\n{log_tail}")]
    BuildFailed { tool: String, log_tail: String },
    #[error("could not start {name} ({program}): {reason}")]
    Spawn {
        name: String,
        program: String,
        reason: String,
    },
    #[error("{name} exited during start-up ({status}); last lines of its log:\n{log_tail}")]
    ExitedDuringStartup {
        name: String,
        status: String,
        log_tail: String,
    },
    #[error(
        "{name} was not ready after {waited:?} (last probe: {last_error}); last lines of its \
         log:\n{log_tail}"
    )]
    NotReady {
        name: String,
        waited: Duration,
        last_error: String,
        log_tail: String,
    },
    #[error("{0}")]
    Io(String),
}

static KUBE: OnceCell<Result<KubeCluster, TestEnvError>> = OnceCell::const_new();
static S3: OnceCell<Result<S3Server, TestEnvError>> = OnceCell::const_new();
static KMS: OnceCell<Result<KmsServer, TestEnvError>> = OnceCell::const_new();

/// The shared Kubernetes control plane of this test binary.
pub async fn kube() -> Result<&'static KubeCluster, TestEnvError> {
    KUBE.get_or_init(KubeCluster::start)
        .await
        .as_ref()
        .map_err(Clone::clone)
}

/// The shared S3-protocol server of this test binary.
pub async fn s3() -> Result<&'static S3Server, TestEnvError> {
    S3.get_or_init(S3Server::start)
        .await
        .as_ref()
        .map_err(Clone::clone)
}

/// The shared KMS emulator of this test binary.
pub async fn kms() -> Result<&'static KmsServer, TestEnvError> {
    KMS.get_or_init(KmsServer::start)
        .await
        .as_ref()
        .map_err(Clone::clone)
}

/// A DNS-1123 name unique within this test binary run (for namespaces, buckets, keys).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}
