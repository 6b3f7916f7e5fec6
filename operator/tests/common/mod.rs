//! Helpers shared by the operator's integration tests: the test environment's apiserver with
//! the CRD installed, CareSystem fixtures, a controller running in-process, and waiting.
//!
//! Each test binary uses a subset, so unused helpers are expected in each.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use shcr_operator::controller::{self, Context};
use shcr_operator::leader::{self, LeaderElectionConfig};
use shcr_operator::metrics::OperatorMetrics;
use shcr_operator::{AssertionPublicKey, CareSystem, OperatorConfig};
use shcr_runtime::metrics::MetricsRegistry;
use tokio::sync::OnceCell;

pub const TIMEOUT: Duration = Duration::from_secs(60);
pub const TEST_LABEL: &str = "shcr.dev/test";

static CRD: OnceCell<()> = OnceCell::const_new();

pub async fn client() -> anyhow::Result<Client> {
    let kube = shcr_testenv::kube().await?;
    let client = kube.client().await?;
    CRD.get_or_try_init(|| install_crd(client.clone())).await?;
    Ok(client)
}

async fn install_crd(client: Client) -> anyhow::Result<()> {
    let crds = Api::<CustomResourceDefinition>::all(client);
    let crd = shcr_operator::crd::care_system_crd()?;
    let name = crd.metadata.name.clone().context("CRD has a name")?;
    crds.patch(
        &name,
        &PatchParams::apply("shcr-operator-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("the apiserver accepts the CRD")?;
    eventually("the CRD is established", || async {
        let crd = crds.get(&name).await?;
        Ok(crd
            .status
            .and_then(|status| status.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True"))
    })
    .await
}

pub async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting until {what} (last error: {last_error:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn care_system(name: &str, group: &str, spec: serde_json::Value) -> anyhow::Result<CareSystem> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "shcr.dev/v1alpha1",
        "kind": "CareSystem",
        "metadata": {"name": name, "labels": {TEST_LABEL: group}},
        "spec": spec,
    }))?)
}

pub fn spec() -> serde_json::Value {
    json!({
        "odsCode": "QWO",
        "displayName": "West Yorkshire",
        "members": ["RR8", "A81001"],
        "storage": {"region": shcr_testenv::aws::REGION},
    })
}

/// An AWS SDK result with the service's error message (the SDK's Display says only "service error").
pub fn sdk<T, E: std::error::Error + Send + Sync + 'static>(
    result: Result<T, aws_sdk_s3::error::SdkError<E>>,
) -> anyhow::Result<T> {
    result.map_err(|e| anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
}

// The controller.

/// A controller reconciling only the CareSystems labelled with `group`; stops when dropped.
pub struct RunningOperator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub metrics: OperatorMetrics,
}

impl RunningOperator {
    /// Asks the operator to stop as SIGTERM would, and waits until it has.
    pub async fn shut_down(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(TIMEOUT, task).await??;
        }
        Ok(())
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub async fn start_operator(client: &Client, group: &str) -> anyhow::Result<RunningOperator> {
    start_operator_with(client, group, None).await
}

/// The configuration of a test operator reconciling only the CareSystems labelled with `group`.
pub async fn operator_config(
    group: &str,
    leader: Option<LeaderElectionConfig>,
) -> anyhow::Result<OperatorConfig> {
    let s3 = shcr_testenv::s3().await?;
    let kms = shcr_testenv::kms().await?;
    Ok(OperatorConfig {
        region: Some(shcr_testenv::aws::REGION.to_owned()),
        s3_endpoint: Some(s3.endpoint().to_owned()),
        kms_endpoint: Some(kms.endpoint().to_owned()),
        care_system_selector: Some(format!("{TEST_LABEL}={group}")),
        key_deletion_window_days: 7,
        leader_election: leader.unwrap_or_else(|| LeaderElectionConfig {
            enabled: false,
            ..LeaderElectionConfig::default()
        }),
        ..OperatorConfig::default()
    })
}

/// The gateway key every test operator hands its stores (one per test process).
pub fn assertion_key() -> anyhow::Result<&'static (AssertionPublicKey, String)> {
    static KEY: std::sync::OnceLock<(AssertionPublicKey, String)> = std::sync::OnceLock::new();
    if let Some(key) = KEY.get() {
        return Ok(key);
    }
    let pem = shcr_identity::AssertionSigner::generate()?.public_key_pem();
    let key = AssertionPublicKey::from_pem(&pem)?;
    Ok(KEY.get_or_init(|| (key, pem)))
}

/// Starts an operator; with `leader`, only while it holds that lease.
pub async fn start_operator_with(
    client: &Client,
    group: &str,
    leader: Option<LeaderElectionConfig>,
) -> anyhow::Result<RunningOperator> {
    start_operator_configured(client, operator_config(group, leader).await?).await
}

/// Starts an operator with `config` (leader election as `config` says) on `client`.
pub async fn start_operator_configured(
    client: &Client,
    config: OperatorConfig,
) -> anyhow::Result<RunningOperator> {
    let s3 = shcr_testenv::s3().await?;
    let kms = shcr_testenv::kms().await?;
    let leader = config.leader_election.enabled;
    let metrics = OperatorMetrics::register(&MetricsRegistry::new());
    let context = Arc::new(Context::new(
        client.clone(),
        config,
        assertion_key()?.0.clone(),
        s3.client().await,
        kms.client().await,
        metrics.clone(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stopped.await;
    };
    let task = if leader {
        tokio::spawn(async move {
            if let Err(error) = leader::run_as_leader(context, stopped).await {
                panic!("the operator failed: {error}");
            }
        })
    } else {
        tokio::spawn(controller::run(context, stopped))
    };
    Ok(RunningOperator {
        stop: Some(stop),
        task: Some(task),
        metrics,
    })
}

pub async fn condition_is(
    api: &Api<CareSystem>,
    name: &str,
    type_: &str,
    status: &str,
) -> anyhow::Result<()> {
    eventually(&format!("{name} has {type_}={status}"), || async {
        let care_system = api.get(name).await?;
        Ok(care_system
            .status
            .as_ref()
            .and_then(|s| s.condition(type_))
            .is_some_and(|c| c.status == status))
    })
    .await
}

pub async fn condition_reason(
    api: &Api<CareSystem>,
    name: &str,
    type_: &str,
) -> anyhow::Result<String> {
    let care_system = api.get(name).await?;
    Ok(care_system
        .status
        .as_ref()
        .and_then(|s| s.condition(type_))
        .map(|c| c.reason.clone())
        .unwrap_or_default())
}

/// Sets the Deployment's status as the deployment controller would once its pods are available.
pub async fn mark_store_available(client: &Client, namespace: &str) -> anyhow::Result<()> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let deployment = deployments.get("shcr-store").await?;
    let status = json!({"status": {
        "observedGeneration": deployment.metadata.generation,
        "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
        "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                        "message": "test", "lastUpdateTime": "2026-01-01T00:00:00Z",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }});
    deployments
        .patch_status("shcr-store", &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

pub async fn wait_gone(api: &Api<CareSystem>, name: &str) -> anyhow::Result<()> {
    let waited = eventually(&format!("{name} is deleted"), || async {
        Ok(api.get_opt(name).await?.is_none())
    })
    .await;
    if let Err(error) = waited {
        // Say why deletion is stuck: the operator reports it in status.
        let message = api
            .get_opt(name)
            .await?
            .and_then(|c| c.status)
            .and_then(|s| s.message);
        bail!("{error}; status message: {message:?}");
    }
    Ok(())
}
