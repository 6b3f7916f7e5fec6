//! The routing table follows `CareSystem` objects on a real apiserver (the test environment's):
//! a new care system, a changed member list, a readiness change and a deletion all take effect
//! on the running gateway without a restart. The test sets each CareSystem's status itself, as
//! the operator would.

mod support;

use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use shcr_gateway::auth::{DevIssuer, TokenRequest};
use shcr_gateway::limits::LimitsConfig;
use shcr_gateway::routing::TenantRouter;
use shcr_identity::AssertionSigner;
use shcr_operator::CareSystem;
use shcr_operator::care_system::{CareSystemStatus, condition};
use support::*;

const TIMEOUT: Duration = Duration::from_secs(30);

async fn install_crd(client: kube::Client) -> Result<()> {
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(include_str!("../../../crds/caresystem.yaml"))
            .context("crds/caresystem.yaml is a CRD")?;
    let name = crd.metadata.name.clone().context("the CRD has a name")?;
    let crds = Api::<CustomResourceDefinition>::all(client);
    crds.patch(
        &name,
        &PatchParams::apply("shcr-gateway-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("the apiserver accepts the CRD")?;
    eventually(TIMEOUT, || async {
        let crd = crds.get(&name).await?;
        Ok(crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True"))
    })
    .await
    .context("the CRD becomes established")
}

fn status(endpoint: &str, ready: bool) -> Result<serde_json::Value> {
    let mut status = CareSystemStatus {
        endpoint: Some(endpoint.to_owned()),
        ..CareSystemStatus::default()
    };
    status.set_condition(condition::READY, ready, "Test", "set by the test", None);
    Ok(json!({ "status": serde_json::to_value(status)? }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_follows_care_systems_without_a_restart() -> Result<()> {
    let kube = shcr_testenv::kube().await?;
    let client = kube.client().await?;
    install_crd(client.clone()).await?;

    let dir = tempfile::tempdir()?;
    let issuer = DevIssuer::load_or_create(dir.path())?;
    let signer = AssertionSigner::generate()?;
    let upstream = inspecting_upstream(signer.verifier()).await?;
    let router = TenantRouter::new(LimitsConfig::default());
    let follower = {
        let router = router.clone();
        let client = client.clone();
        tokio::spawn(async move { router.follow_kube(client, std::future::pending()).await })
    };
    let gateway = Gateway::start_with_router(
        router.clone(),
        vec![issuer.issuer_config()],
        signer,
        settings(),
    )
    .await?;
    eventually(TIMEOUT, || async { Ok(router.is_synced()) }).await?;

    let name = shcr_testenv::unique_name("gw-route");
    let url = format!("{}/{name}/fhir/Patient/p1", gateway.base);
    let http = reqwest::Client::new();
    let token = |org: &str| issuer.issue(&TokenRequest::new(name.as_str(), org, "R8000"));
    let rtd = token("RTD")?;
    let rae = token("RAE")?;
    let get = |token: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            Ok::<u16, anyhow::Error>(
                http.get(url)
                    .bearer_auth(token)
                    .send()
                    .await?
                    .status()
                    .as_u16(),
            )
        }
    };

    assert_eq!(get(rtd.clone()).await?, 404, "not created yet");

    let api = Api::<CareSystem>::all(client.clone());
    let care_system: CareSystem = serde_json::from_value(json!({
        "apiVersion": "shcr.dev/v1alpha1",
        "kind": "CareSystem",
        "metadata": {"name": name},
        "spec": {
            "odsCode": "QHM",
            "displayName": "Gateway routing test",
            "members": ["RTD"],
            "storage": {"region": "eu-west-2"}
        }
    }))?;
    api.create(&PostParams::default(), &care_system).await?;
    eventually(TIMEOUT, || status_is(get(rtd.clone()), 503))
        .await
        .context("created without status: known but not ready")?;

    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(status(&format!("http://{upstream}"), true)?),
    )
    .await?;
    eventually(TIMEOUT, || status_is(get(rtd.clone()), 200))
        .await
        .context("ready with an endpoint: routed")?;
    assert_eq!(get(rae.clone()).await?, 403, "RAE is not a member yet");

    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"members": ["RAE"]}})),
    )
    .await?;
    eventually(TIMEOUT, || status_is(get(rae.clone()), 200))
        .await
        .context("a new member is let in")?;
    assert_eq!(get(rtd.clone()).await?, 403, "a removed member is shut out");

    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(status(&format!("http://{upstream}"), false)?),
    )
    .await?;
    eventually(TIMEOUT, || status_is(get(rae.clone()), 503))
        .await
        .context("not ready again: 503")?;

    api.delete(&name, &DeleteParams::default()).await?;
    eventually(TIMEOUT, || status_is(get(rae.clone()), 404))
        .await
        .context("deleted: unknown")?;

    follower.abort();
    Ok(())
}

/// Whether the status `get` yields is `expected`.
async fn status_is(
    get: impl std::future::Future<Output = Result<u16>>,
    expected: u16,
) -> Result<bool> {
    Ok(get.await? == expected)
}
