//! Smoke tests proving the Kubernetes control plane is the real thing.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

async fn create_namespace(client: &kube::Client, prefix: &str) -> Result<String> {
    let name = shcr_testenv::unique_name(prefix);
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(name)
}

#[tokio::test]
async fn crd_with_structural_schema_is_served_and_validated() -> Result<()> {
    let kube = shcr_testenv::kube().await?;
    let client = kube.client().await?;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "widgets.smoke.shcr.dev"},
        "spec": {
            "group": "smoke.shcr.dev",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "required": ["size"],
                        "properties": {"size": {"type": "integer", "minimum": 1}}
                    }}
                }}
            }]
        }
    }))?;
    crds.create(&PostParams::default(), &crd).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            crds,
            "widgets.smoke.shcr.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .context("CRD not established within 30 s")??;

    let ns = create_namespace(&client, "crd").await?;
    let gvk = GroupVersionKind::gvk("smoke.shcr.dev", "v1", "Widget");
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &ApiResource::from_gvk(&gvk));
    let good: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "smoke.shcr.dev/v1", "kind": "Widget",
        "metadata": {"name": "good"}, "spec": {"size": 3}
    }))?;
    widgets.create(&PostParams::default(), &good).await?;
    assert_eq!(widgets.get("good").await?.data["spec"]["size"], 3);

    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "smoke.shcr.dev/v1", "kind": "Widget",
        "metadata": {"name": "bad"}, "spec": {"size": 0}
    }))?;
    match widgets.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "unexpected status {status:?}");
            assert!(status.message.contains("spec.size"), "{}", status.message);
        }
        other => bail!("an invalid Widget was not rejected: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn deployment_is_created_and_watched() -> Result<()> {
    let kube = shcr_testenv::kube().await?;
    let client = kube.client().await?;
    let ns = create_namespace(&client, "deploy").await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let mut events = watcher(deployments.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
            }
        }
    }))?;
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(d) = events.try_next().await? {
            if d.metadata.name.as_deref() == Some("web") {
                return Ok::<_, anyhow::Error>(d);
            }
        }
        bail!("watch ended")
    })
    .await
    .context("no watch event for the Deployment within 30 s")??;
    assert_eq!(seen.spec.and_then(|s| s.replicas), Some(1));
    Ok(())
}

#[tokio::test]
async fn unprivileged_service_account_is_denied_by_rbac() -> Result<()> {
    let kube = shcr_testenv::kube().await?;
    let client = kube.client().await?;
    let ns = create_namespace(&client, "rbac").await?;
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "nobody"}}))?;
    sas.create(&PostParams::default(), &sa).await?;
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 600}
    }))?;
    let token = sas
        .create_token_request("nobody", &PostParams::default(), &request)
        .await?
        .status
        .context("TokenRequest returned no status")?
        .token
        .context("TokenRequest returned no token")?;

    let mut config = kube.admin_config().await?;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    let nobody = kube::Client::try_from(config)?;
    // Authenticated (the token is real) …
    let who = nobody.apiserver_version().await;
    assert!(who.is_ok(), "service-account token not accepted: {who:?}");
    // … but not authorized.
    match Api::<Secret>::namespaced(nobody, &ns)
        .list(&Default::default())
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status.message.contains("system:serviceaccount:")
                    && status.message.contains("nobody"),
                "{}",
                status.message
            );
        }
        other => bail!("an unprivileged service account listed secrets: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn namespace_deletion_completes() -> Result<()> {
    let kube = shcr_testenv::kube().await?;
    let client = kube.client().await?;
    let ns = create_namespace(&client, "gone").await?;
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "payload"}, "data": {"k": "v"}
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &cm)
        .await?;
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        match namespaces.get_opt(&ns).await? {
            None => return Ok(()),
            Some(n) if tokio::time::Instant::now() > deadline => bail!(
                "namespace {ns} still exists after 90 s (phase {:?}); is the controller-manager \
                 running? logs: {:?}",
                n.status.and_then(|s| s.phase),
                kube.log_paths()
            ),
            Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[tokio::test]
async fn kubectl_works_with_the_generated_kubeconfig() -> Result<()> {
    let kube = shcr_testenv::kube().await?;
    let output = kube.kubectl().args(["get", "ns", "-o", "name"]).output()?;
    assert!(
        output.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout)?;
    assert!(
        stdout.lines().any(|l| l == "namespace/kube-system"),
        "{stdout}"
    );

    let version = kube.kubectl().args(["version", "-o", "json"]).output()?;
    let version: serde_json::Value = serde_json::from_slice(&version.stdout)?;
    assert_eq!(
        version["serverVersion"]["gitVersion"],
        shcr_testenv::tools::KUBERNETES_VERSION
    );
    assert_eq!(
        version["clientVersion"]["gitVersion"],
        shcr_testenv::tools::KUBERNETES_VERSION
    );
    Ok(())
}

#[test]
fn helm_reports_its_version() -> Result<()> {
    let helm = shcr_testenv::tools::HELM.executable("helm")?;
    let output = std::process::Command::new(helm)
        .args(["version", "--short"])
        .output()?;
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout)?;
    assert!(
        stdout.starts_with(shcr_testenv::tools::HELM.version),
        "{stdout}"
    );
    Ok(())
}
