//! `shcr-testenv`: build the test environment's tools ahead of a test run, or start the whole
//! environment by hand to poke at it.
//!
//! ```text
//! shcr-testenv prepare   # build/cache every tool (what `make test` runs first)
//! shcr-testenv up        # start apiserver, S3 and KMS; print endpoints; Ctrl-C stops them
//! ```

use std::process::ExitCode;
use std::time::Instant;

use shcr_testenv::{TestEnvError, tools};

fn usage() -> ExitCode {
    eprintln!(
        "usage: shcr-testenv prepare | up\n\n  prepare  build and cache every tool of the test \
         environment under ~/.cache/shcr/testenv\n  up       start the Kubernetes control plane, \
         the S3 server and the KMS emulator, print how to reach them, stop on Ctrl-C"
    );
    ExitCode::from(2)
}

fn prepare() -> Result<(), TestEnvError> {
    let started = Instant::now();
    tools::go_version()?;
    for (i, tool) in tools::ALL.iter().enumerate() {
        eprintln!(
            "shcr-testenv: [{}/{}] {} {}",
            i + 1,
            tools::ALL.len(),
            tool.name,
            tool.version
        );
        let dir = tool.ensure_built()?;
        eprintln!("shcr-testenv:       ready in {}", dir.display());
    }
    eprintln!("shcr-testenv: all tools ready in {:.1?}", started.elapsed());
    Ok(())
}

async fn up() -> Result<(), TestEnvError> {
    let kube = shcr_testenv::kube().await?;
    let s3 = shcr_testenv::s3().await?;
    let kms = shcr_testenv::kms().await?;
    println!("export KUBECONFIG={}", kube.kubeconfig_path().display());
    println!("export SHCR_TEST_S3_ENDPOINT={}", s3.endpoint());
    println!("export SHCR_TEST_KMS_ENDPOINT={}", kms.endpoint());
    println!("# kubectl: {}", kube.kubectl_path().display());
    println!("# logs and certificates: {}", kube.dir().display());
    println!("# press Ctrl-C to stop everything");
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| TestEnvError::Io(format!("waiting for Ctrl-C: {e}")))
}

fn main() -> ExitCode {
    let command = std::env::args().nth(1);
    let result = match command.as_deref() {
        Some("prepare") => prepare(),
        Some("up") => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(up()),
            Err(e) => Err(TestEnvError::Io(format!("starting the async runtime: {e}"))),
        },
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shcr-testenv: error: {e}");
            ExitCode::FAILURE
        }
    }
}
