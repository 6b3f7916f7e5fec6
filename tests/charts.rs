//! The Helm charts (`charts/shcr`, `charts/care-system`) and the image recipe (`Dockerfile`),
//! against the test environment's real helm, kubectl and kube-apiserver.
//!
//! - lint, render with default and representative values, and validate what is rendered on the
//!   apiserver (`kubectl apply --dry-run=server`, with the CRD installed);
//! - `helm install`/`upgrade` of both charts; the identity-assertion key pair the chart generates
//!   is a matching Ed25519 pair and survives upgrades;
//! - bad values fail `helm install` with the schema's message;
//! - the rendered configuration files parse into the components' own config types;
//! - RBAC: the operator, running in-process with a token of the chart's ServiceAccount, takes a
//!   CareSystem to Ready (S3 and KMS from the test environment); with one rule removed from the
//!   chart's ClusterRole it reports the refusal in the CareSystem's status;
//! - the Dockerfile builds with the toolchain and the exact `cargo build` of `make release`.
//!
//! No kubelet runs in the test cluster, so pods never start: `helm test` hooks and readiness
//! cannot run here; installs are checked by the objects they create.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::json;
use shcr_operator::care_system::condition;
use shcr_operator::{CareSystem, OperatorConfig};
use shcr_runtime::telemetry::TelemetryConfig;
use tokio::sync::{Mutex, OnceCell};

const TIMEOUT: Duration = Duration::from_secs(90);
const CRD_NAME: &str = "caresystems.shcr.dev";
const TEST_LABEL: &str = "shcr.dev/test";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart(name: &str) -> PathBuf {
    repo().join("charts").join(name)
}

fn shcr_chart() -> PathBuf {
    chart("shcr")
}

fn care_system_chart() -> PathBuf {
    chart("care-system")
}

/// Representative values of a production install and of one care system.
fn production_values() -> PathBuf {
    shcr_chart().join("ci").join("production-values.yaml")
}

fn care_system_values() -> PathBuf {
    care_system_chart().join("ci").join("example-values.yaml")
}

// ---------------------------------------------------------------------------------------------
// Running helm and kubectl.

/// `helm` with its cache, config and data dirs private to this test binary.
fn helm() -> anyhow::Result<Command> {
    let home = std::env::temp_dir().join(format!("shcr-charts-helm-{}", std::process::id()));
    let mut command = Command::new(shcr_testenv::tools::HELM.executable("helm")?);
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG");
    Ok(command)
}

/// `helm` talking to the test cluster (with the CRD installed).
async fn helm_on_cluster() -> anyhow::Result<Command> {
    let kube = cluster().await?;
    let mut command = helm()?;
    command.arg("--kubeconfig").arg(kube.kubeconfig_path());
    Ok(command)
}

/// Runs `command`; its stdout, or an error with its stderr.
fn succeeds(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}\n{stdout}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

/// Runs `command`, which must fail; its stderr.
fn fails(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        !output.status.success(),
        "{command:?} succeeded but should have failed:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Runs `command` with `input` on stdin; its stdout, or an error with its stderr.
fn succeeds_with_input(command: &mut Command, input: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    child
        .stdin
        .take()
        .context("stdin is piped")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The test cluster, with the chart's CRD installed and established (once per test binary).
async fn cluster() -> anyhow::Result<&'static shcr_testenv::KubeCluster> {
    static CRD: OnceCell<()> = OnceCell::const_new();
    let kube = shcr_testenv::kube().await?;
    CRD.get_or_try_init(|| async {
        let crd = shcr_chart().join("crds").join("caresystem.yaml");
        succeeds(
            kube.kubectl()
                .args([
                    "apply",
                    "--server-side",
                    "--field-manager=shcr-charts-test",
                    "-f",
                ])
                .arg(&crd),
        )?;
        succeeds(kube.kubectl().args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{CRD_NAME}"),
        ]))?;
        anyhow::Ok(())
    })
    .await?;
    Ok(kube)
}

async fn admin() -> anyhow::Result<Client> {
    Ok(cluster().await?.client().await?)
}

fn create_namespace(kube: &shcr_testenv::KubeCluster, name: &str) -> anyhow::Result<()> {
    succeeds(kube.kubectl().args(["create", "namespace", name]))?;
    Ok(())
}

/// `helm template` of `chart` with `args`; the rendered documents.
fn render(chart: &Path, release: &str, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = succeeds(helm()?.arg("template").arg(release).arg(chart).args(args))?;
    documents(&text)
}

fn documents(text: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_json::Value::deserialize(document)?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// The one rendered document of `kind` whose name ends with `suffix`.
fn find<'a>(
    documents: &'a [serde_json::Value],
    kind: &str,
    suffix: &str,
) -> anyhow::Result<&'a serde_json::Value> {
    let found: Vec<_> = documents
        .iter()
        .filter(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        other => bail!("expected one {kind} named *{suffix}, found {}", other.len()),
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
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
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Lint, render, validate on the apiserver.

#[test]
fn charts_lint_cleanly() -> anyhow::Result<()> {
    succeeds(helm()?.args(["lint", "--strict"]).arg(shcr_chart()))?;
    succeeds(
        helm()?
            .args(["lint", "--strict"])
            .arg(shcr_chart())
            .arg("-f")
            .arg(production_values()),
    )?;
    succeeds(
        helm()?
            .args(["lint", "--strict"])
            .arg(care_system_chart())
            .arg("-f")
            .arg(care_system_values()),
    )?;
    Ok(())
}

#[test]
fn the_chart_ships_the_generated_crd() -> anyhow::Result<()> {
    let shipped = std::fs::read_to_string(shcr_chart().join("crds").join("caresystem.yaml"))?;
    let checked_in = std::fs::read_to_string(repo().join("crds").join("caresystem.yaml"))?;
    assert!(
        shipped == checked_in,
        "charts/shcr/crds/caresystem.yaml differs from crds/caresystem.yaml: copy it over \
         (`cp crds/caresystem.yaml charts/shcr/crds/`)"
    );
    assert_eq!(
        shipped,
        shcr_operator::crd::crd_yaml()?,
        "the chart's CRD is not what `shcr crd` generates"
    );
    // Templated for upgrades, the same CRD, kept on uninstall.
    let rendered = render(&shcr_chart(), "crds", &["--set", "crds.templated=true"])?;
    let crd = find(&rendered, "CustomResourceDefinition", CRD_NAME)?;
    let generated: serde_json::Value = serde_yaml::from_str(&shipped)?;
    assert_eq!(crd["spec"], generated["spec"]);
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    Ok(())
}

#[tokio::test]
async fn rendered_charts_pass_server_side_validation() -> anyhow::Result<()> {
    let kube = cluster().await?;
    let namespace = shcr_testenv::unique_name("render");
    create_namespace(kube, &namespace)?;
    let renders = [
        (shcr_chart(), vec![]),
        (
            shcr_chart(),
            vec!["-f".to_owned(), production_values().display().to_string()],
        ),
        (
            shcr_chart(),
            vec!["--set".to_owned(), "crds.templated=true".to_owned()],
        ),
        (
            care_system_chart(),
            vec!["-f".to_owned(), care_system_values().display().to_string()],
        ),
    ];
    for (chart, args) in renders {
        let mut command = helm()?;
        command
            .arg("template")
            .arg("validate")
            .arg(&chart)
            .args(["--namespace", &namespace])
            .args(&args);
        let rendered = succeeds(&mut command)?;
        ensure!(!rendered.trim().is_empty(), "{chart:?} rendered nothing");
        let applied = succeeds_with_input(
            kube.kubectl().args([
                "apply",
                "--dry-run=server",
                "--namespace",
                &namespace,
                "-f",
                "-",
            ]),
            &rendered,
        )
        .with_context(|| format!("the apiserver refuses {chart:?} rendered with {args:?}"))?;
        assert!(applied.contains("(server dry run)"), "{applied}");
    }
    Ok(())
}

#[test]
fn representative_values_render_what_they_say() -> anyhow::Result<()> {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let rendered = render(
        &shcr_chart(),
        "prod",
        &[
            "--namespace",
            "shcr-system",
            "-f",
            &production_values().display().to_string(),
            "--set",
            &format!("image.digest={digest}"),
            "--set",
            "serviceMonitor.enabled=true",
        ],
    )?;
    // The image by tag and digest, for every component (and the operator's default store image).
    let image = format!("ghcr.io/shcr-dev/shcr:0.1.0@{digest}");
    for suffix in ["-operator", "-gateway"] {
        let deployment = find(&rendered, "Deployment", suffix)?;
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["containers"][0]["image"], image.as_str());
        // Strict security contexts.
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let container = &pod["containers"][0]["securityContext"];
        assert_eq!(container["readOnlyRootFilesystem"], true);
        assert_eq!(container["allowPrivilegeEscalation"], false);
        assert_eq!(container["capabilities"]["drop"], json!(["ALL"]));
    }
    let operator_config = component_config(&rendered, "-operator")?;
    assert!(operator_config.contains(&format!("store_image: \"{image}\"")));

    // Cloud identities on the ServiceAccounts.
    let operator_sa = find(&rendered, "ServiceAccount", "-operator")?;
    assert!(
        operator_sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            .as_str()
            .is_some_and(|arn| arn.contains(":role/"))
    );

    // Operator: two replicas, leader election in the release namespace, POD_NAME for its identity.
    let operator = find(&rendered, "Deployment", "-operator")?;
    assert_eq!(operator["spec"]["replicas"], 2);
    let env = &operator["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(env[0]["name"], "POD_NAME");
    assert_eq!(
        env[0]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );

    // Gateway: HPA, PDB, topology spread.
    let hpa = find(&rendered, "HorizontalPodAutoscaler", "-gateway")?;
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    let pdb = find(&rendered, "PodDisruptionBudget", "-gateway")?;
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let gateway = find(&rendered, "Deployment", "-gateway")?;
    let spread = gateway["spec"]["template"]["spec"]["topologySpreadConstraints"]
        .as_array()
        .context("topology spread constraints")?;
    assert!(
        spread
            .iter()
            .any(|c| c["topologyKey"] == "topology.kubernetes.io/zone")
    );

    // Each key half goes only where it is used.
    let secret_items = |deployment: &serde_json::Value| {
        deployment["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .and_then(|volumes| volumes.iter().find(|v| v["name"] == "identity-assertion"))
            .map(|volume| volume["secret"]["items"].clone())
    };
    assert_eq!(
        secret_items(gateway),
        Some(json!([{"key": "private.pem", "path": "private.pem"}]))
    );
    assert_eq!(
        secret_items(operator),
        Some(json!([{"key": "public.pem", "path": "public.pem"}]))
    );

    // NetworkPolicies: restricted FHIR ingress; ServiceMonitors when asked for.
    let policy = find(&rendered, "NetworkPolicy", "-gateway")?;
    let from = policy["spec"]["ingress"][1]["from"].to_string();
    assert!(from.contains("ingress-nginx"), "{from}");
    for suffix in ["-operator", "-gateway"] {
        let monitor = find(&rendered, "ServiceMonitor", suffix)?;
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    }
    Ok(())
}

#[test]
fn an_existing_key_secret_replaces_the_generated_one() -> anyhow::Result<()> {
    let rendered = render(
        &shcr_chart(),
        "byo",
        &["--set", "identityAssertion.existingSecret=keys-from-vault"],
    )?;
    assert!(
        !rendered.iter().any(|d| d["kind"] == "Secret"),
        "no Secret is generated when one is provided"
    );
    for suffix in ["-operator", "-gateway"] {
        let deployment = find(&rendered, "Deployment", suffix)?;
        let volumes = deployment["spec"]["template"]["spec"]["volumes"].to_string();
        assert!(
            volumes.contains("\"secretName\":\"keys-from-vault\""),
            "{volumes}"
        );
    }
    Ok(())
}

/// The `shcr.yaml` of a component's ConfigMap.
fn component_config(rendered: &[serde_json::Value], suffix: &str) -> anyhow::Result<String> {
    find(rendered, "ConfigMap", suffix)?["data"]["shcr.yaml"]
        .as_str()
        .map(str::to_owned)
        .context("shcr.yaml in the ConfigMap")
}

/// The operator's config file as `shcr operator` reads it (unknown keys refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorFile {
    telemetry: TelemetryConfig,
    operator: OperatorConfig,
}

/// The gateway's config file as `shcr gateway` reads it (unknown keys refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    telemetry: TelemetryConfig,
    gateway: shcr_gateway::config::GatewayConfig,
}

#[test]
fn rendered_config_files_are_what_the_components_read() -> anyhow::Result<()> {
    for values in [None, Some(production_values())] {
        let mut args = vec!["--namespace".to_owned(), "platform".to_owned()];
        if let Some(values) = &values {
            args.extend(["-f".to_owned(), values.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rendered = render(&shcr_chart(), "cfg", &args)?;

        let operator: OperatorFile =
            serde_yaml::from_str(&component_config(&rendered, "-operator")?)
                .context("the operator's config file does not parse as OperatorConfig")?;
        let gateway: GatewayFile = serde_yaml::from_str(&component_config(&rendered, "-gateway")?)
            .context("the gateway's config file does not parse as GatewayConfig")?;
        assert_eq!(operator.telemetry.service_name, "shcr-operator");
        assert_eq!(gateway.telemetry.service_name, "shcr-gateway");

        // The stores admit traffic from exactly the gateway pods the chart runs.
        let operator = operator.operator;
        assert_eq!(operator.gateway_namespace, "platform");
        let gateway_deployment = find(&rendered, "Deployment", "-gateway")?;
        let selector: std::collections::BTreeMap<String, String> =
            serde_json::from_value(gateway_deployment["spec"]["selector"]["matchLabels"].clone())?;
        assert_eq!(operator.gateway_pod_labels, selector);
        // Leader election in the release namespace, on a Lease the chart's Role covers.
        assert!(operator.leader_election.enabled);
        assert_eq!(operator.leader_election.lease_namespace, "platform");
        let role = find(&rendered, "Role", "-leader-election")?;
        assert_eq!(role["rules"][0]["resources"], json!(["leases"]));
        // The key halves are read from where the Deployments mount them.
        assert_eq!(
            operator.assertion_public_key_file.as_deref(),
            Some(Path::new("/etc/shcr/identity-assertion/public.pem"))
        );
        assert_eq!(
            gateway.gateway.assertion_key_file.as_deref(),
            Some(Path::new("/etc/shcr/identity-assertion/private.pem"))
        );
        if values.is_some() {
            assert_eq!(gateway.gateway.issuers.len(), 1);
            assert!(gateway.gateway.issuers[0].check().is_ok());
            assert_eq!(operator.region.as_deref(), Some("eu-west-2"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Installs.

#[tokio::test]
async fn both_charts_install_and_the_key_pair_survives_upgrades() -> anyhow::Result<()> {
    let client = admin().await?;
    let namespace = shcr_testenv::unique_name("platform");
    // Cluster-scoped objects (ClusterRoles) are named after the release: one per test.
    let release = &shcr_testenv::unique_name("shcr");
    succeeds(
        helm_on_cluster()
            .await?
            .args(["install", release])
            .arg(shcr_chart())
            .args(["--namespace", &namespace, "--create-namespace"])
            .arg("-f")
            .arg(production_values()),
    )?;

    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    for component in ["operator", "gateway"] {
        let name = format!("{release}-{component}");
        deployments
            .get(&name)
            .await
            .with_context(|| format!("Deployment {name}"))?;
    }
    let secret_name = format!("{release}-identity-assertion");

    // The generated identity-assertion key pair: a PKCS#8 Ed25519 key and its own public key.
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let (private, public) = key_pair(&secrets.get(&secret_name).await?)?;
    let signer = shcr_identity::AssertionSigner::from_pkcs8_pem(&private)?;
    // The same key, whatever the line endings of either PEM encoder.
    assert_eq!(pem_body(&signer.public_key_pem()), pem_body(&public));
    shcr_identity::AssertionVerifier::from_public_key_pem(&public)?;

    // An upgrade keeps the key (stores keep trusting the gateway).
    succeeds(
        helm_on_cluster()
            .await?
            .args(["upgrade", release])
            .arg(shcr_chart())
            .args(["--namespace", &namespace])
            .arg("-f")
            .arg(production_values())
            .args(["--set", "gateway.autoscaling.maxReplicas=12"]),
    )?;
    let (private_after, public_after) = key_pair(&secrets.get(&secret_name).await?)?;
    assert_eq!(
        private_after, private,
        "the upgrade replaced the signing key"
    );
    assert_eq!(public_after, public);

    // One care system, as a care system would onboard.
    let care_system_release = shcr_testenv::unique_name("wy");
    succeeds(
        helm_on_cluster()
            .await?
            .args(["install", &care_system_release])
            .arg(care_system_chart())
            .args(["--namespace", &namespace])
            .arg("-f")
            .arg(care_system_values())
            // Not reconciled by any operator of this test binary.
            .args([
                "--set",
                &format!("labels.{}=none", TEST_LABEL.replace('.', "\\.")),
            ]),
    )?;
    let care_system = Api::<CareSystem>::all(client.clone())
        .get(&care_system_release)
        .await?;
    assert_eq!(care_system.spec.ods_code, "QWO");
    assert_eq!(care_system.spec.members, ["RR8", "A81001", "RCF"]);
    assert_eq!(care_system.spec.storage.region, "eu-west-2");
    assert_eq!(care_system.spec.storage.retention_days, Some(90));
    Ok(())
}

/// A PEM document's lines, without line-ending differences.
fn pem_body(pem: &str) -> Vec<&str> {
    pem.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect()
}

fn key_pair(secret: &Secret) -> anyhow::Result<(String, String)> {
    let data = secret.data.as_ref().context("secret data")?;
    let text = |key: &str| -> anyhow::Result<String> {
        let bytes = data
            .get(key)
            .with_context(|| format!("{key} in the Secret"))?;
        Ok(String::from_utf8(bytes.0.clone())?)
    };
    Ok((text("private.pem")?, text("public.pem")?))
}

#[tokio::test]
async fn bad_values_fail_install_with_the_schema_error() -> anyhow::Result<()> {
    let namespace = shcr_testenv::unique_name("bad");
    create_namespace(cluster().await?, &namespace)?;
    let care_system = |sets: &[&str]| -> anyhow::Result<Command> {
        let mut command = helm()?;
        command
            .args(["install", "bad"])
            .arg(care_system_chart())
            .args(["--namespace", &namespace]);
        for set in sets {
            command.args(["--set", set]);
        }
        Ok(command)
    };
    let kubeconfig = cluster().await?.kubeconfig_path().to_owned();
    let cases: [(&[&str], &str); 5] = [
        (
            &["displayName=West Yorkshire", "storage.region=eu-west-2"],
            "missing property 'odsCode'",
        ),
        (
            &["odsCode=qwo", "displayName=x", "storage.region=eu-west-2"],
            "'/odsCode': 'qwo' does not match pattern",
        ),
        (
            &[
                "odsCode=QWO",
                "displayName=x",
                "storage.region=eu-west-2",
                "store.replicas=one",
            ],
            "'/store/replicas': got string, want integer",
        ),
        (
            &[
                "odsCode=QWO",
                "displayName=x",
                "storage.region=eu-west-2",
                "colour=blue",
            ],
            "additional properties 'colour' not allowed",
        ),
        (
            &["odsCode=QWO", "displayName=x"],
            "'/storage': missing property 'region'",
        ),
    ];
    for (sets, expected) in cases {
        let mut command = care_system(sets)?;
        command.arg("--kubeconfig").arg(&kubeconfig);
        let stderr = fails(&mut command)?;
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(expected),
            "{sets:?}: expected {expected:?} in:\n{stderr}"
        );
    }

    let platform_cases: [(&str, &str); 3] = [
        (
            "operator.replica=3",
            "additional properties 'replica' not allowed",
        ),
        (
            "image.digest=latest",
            "'/image/digest': 'latest' does not match pattern",
        ),
        (
            "gateway.autoscaling.maxReplicas=many",
            "'/gateway/autoscaling/maxReplicas': got string, want integer",
        ),
    ];
    for (set, expected) in platform_cases {
        let stderr = fails(
            helm()?
                .args(["install", "bad-platform"])
                .arg(shcr_chart())
                .args(["--namespace", &namespace, "--set", set])
                .arg("--kubeconfig")
                .arg(&kubeconfig),
        )?;
        assert!(
            stderr.contains(expected),
            "{set}: expected {expected:?} in:\n{stderr}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RBAC: the operator as the chart's ServiceAccount.

/// Operators of this binary reconcile one at a time (each restricted to its own CareSystems by
/// label, but the sequencing keeps their Leases and logs apart).
static OPERATOR: Mutex<()> = Mutex::const_new(());

/// A platform release installed with the test environment's S3 and KMS endpoints.
struct Platform {
    namespace: String,
    release: String,
    public_key_file: PathBuf,
}

async fn install_platform(prefix: &str) -> anyhow::Result<Platform> {
    let client = admin().await?;
    let namespace = shcr_testenv::unique_name(prefix);
    // Cluster-scoped objects (ClusterRoles) are named after the release: one per test.
    let release = shcr_testenv::unique_name("shcr");
    let s3 = shcr_testenv::s3().await?;
    let kms = shcr_testenv::kms().await?;
    succeeds(
        helm_on_cluster()
            .await?
            .args(["install", &release])
            .arg(shcr_chart())
            .args(["--namespace", &namespace, "--create-namespace"])
            .args([
                "--set",
                &format!("operator.aws.s3Endpoint={}", s3.endpoint()),
            ])
            .args([
                "--set",
                &format!("operator.aws.kmsEndpoint={}", kms.endpoint()),
            ])
            .args([
                "--set",
                &format!("operator.aws.region={}", shcr_testenv::aws::REGION),
            ])
            .args([
                "--set",
                &format!("operator.careSystemSelector={TEST_LABEL}={namespace}"),
            ]),
    )?;
    let secret = Api::<Secret>::namespaced(client, &namespace)
        .get(&format!("{release}-identity-assertion"))
        .await?;
    let (_, public) = key_pair(&secret)?;
    let public_key_file = std::env::temp_dir().join(format!("{namespace}-public.pem"));
    std::fs::write(&public_key_file, public)?;
    Ok(Platform {
        namespace,
        release,
        public_key_file,
    })
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.public_key_file);
    }
}

impl Platform {
    /// The operator's configuration exactly as the chart renders it into its ConfigMap, with
    /// the paths and ports of this process instead of the pod's.
    async fn operator_config(&self) -> anyhow::Result<OperatorConfig> {
        let config_map = Api::<ConfigMap>::namespaced(admin().await?, &self.namespace)
            .get(&format!("{}-operator", self.release))
            .await?;
        let text = config_map
            .data
            .as_ref()
            .and_then(|data| data.get("shcr.yaml"))
            .context("shcr.yaml in the operator ConfigMap")?;
        let file: OperatorFile = serde_yaml::from_str(text)?;
        Ok(OperatorConfig {
            listen: "127.0.0.1:0".parse()?,
            assertion_public_key_file: Some(self.public_key_file.clone()),
            ..file.operator
        })
    }
}

/// A client authenticated as `service_account` of `namespace` with a token from the
/// TokenRequest API: exactly the identity the operator pod would have.
async fn client_as(namespace: &str, service_account: &str) -> anyhow::Result<Client> {
    let kube = cluster().await?;
    let request = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        }),
        status: None,
    };
    let issued = Api::<ServiceAccount>::namespaced(kube.client().await?, namespace)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .context("TokenRequest for the operator's ServiceAccount")?;
    let token = issued
        .status
        .context("token in the TokenRequest status")?
        .token;
    let mut config = kube.admin_config().await?;
    config.auth_info = serde_json::from_value(json!({ "token": token }))?;
    Ok(Client::try_from(config)?)
}

/// An in-process operator (what `shcr operator` runs), stopped like SIGTERM when dropped.
struct RunningOperator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), shcr_operator::RunError>>,
}

async fn start_operator(client: Client, config: OperatorConfig) -> anyhow::Result<RunningOperator> {
    let clients = shcr_operator::Clients {
        kube: client,
        s3: shcr_testenv::s3().await?.client().await,
        kms: shcr_testenv::kms().await?.client().await,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(shcr_operator::run_with(clients, config, async move {
        let _ = stopped.await;
    }));
    Ok(RunningOperator {
        stop: Some(stop),
        task,
    })
}

impl RunningOperator {
    async fn shut_down(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(TIMEOUT, task).await???;
        Ok(())
    }

    fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn care_system(name: &str, group: &str) -> anyhow::Result<CareSystem> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "shcr.dev/v1alpha1",
        "kind": "CareSystem",
        "metadata": {"name": name, "labels": {TEST_LABEL: group}},
        "spec": {
            "odsCode": "QWO",
            "displayName": "West Yorkshire",
            "members": ["RR8"],
            "storage": {"region": shcr_testenv::aws::REGION},
        },
    }))?)
}

async fn condition_of(
    api: &Api<CareSystem>,
    name: &str,
    type_: &str,
) -> anyhow::Result<Option<(String, String)>> {
    let care_system = api.get(name).await?;
    Ok(care_system
        .status
        .as_ref()
        .and_then(|status| status.condition(type_))
        .map(|c| (c.status.clone(), c.message.clone())))
}

async fn condition_is(
    api: &Api<CareSystem>,
    name: &str,
    type_: &str,
    status: &str,
) -> anyhow::Result<()> {
    eventually(&format!("{name} has {type_}={status}"), || async {
        Ok(condition_of(api, name, type_)
            .await?
            .is_some_and(|(s, _)| s == status))
    })
    .await
}

/// Sets the store Deployment's status as the deployment controller would (no kubelet here).
async fn mark_store_available(client: &Client, namespace: &str) -> anyhow::Result<()> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let deployment = deployments.get("shcr-store").await?;
    let status = json!({"status": {
        "observedGeneration": deployment.metadata.generation,
        "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
    }});
    deployments
        .patch_status("shcr-store", &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_with_the_charts_service_account_makes_a_care_system_ready() -> anyhow::Result<()>
{
    let _one_operator = OPERATOR.lock().await;
    let admin = admin().await?;
    let platform = install_platform("rbac").await?;
    let config = platform.operator_config().await?;
    assert!(
        config.leader_election.enabled,
        "the chart turns leader election on"
    );
    let operator_client = client_as(
        &platform.namespace,
        &format!("{}-operator", platform.release),
    )
    .await?;
    let operator = start_operator(operator_client, config).await?;

    let api = Api::<CareSystem>::all(admin.clone());
    let name = shcr_testenv::unique_name("rbac-wy");
    api.create(
        &PostParams::default(),
        &care_system(&name, &platform.namespace)?,
    )
    .await?;
    for type_ in [
        condition::NAMESPACE_READY,
        condition::KEY_READY,
        condition::BUCKET_READY,
        condition::SYNCED,
    ] {
        if let Err(error) = condition_is(&api, &name, type_, "True").await {
            // Say why: an operator that could not lead (Lease rights) never reconciles.
            let state = if operator.is_running() {
                "the operator is running (not leading, or not reconciling)".to_owned()
            } else {
                format!("the operator stopped: {:?}", operator.shut_down().await)
            };
            bail!("{error}; {state}");
        }
    }
    let namespace = format!("care-{name}");
    mark_store_available(&admin, &namespace).await?;
    condition_is(&api, &name, condition::READY, "True").await?;
    assert!(operator.is_running(), "the operator stopped");

    // The operator held the chart's Lease (leader election under the chart's Role) ...
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        admin.clone(),
        &platform.namespace,
    )
    .get(&format!("{}-operator", platform.release))
    .await?;
    assert!(lease.spec.and_then(|s| s.holder_identity).is_some());
    // ... and handed the chart's public key to the store.
    let store_config = Api::<ConfigMap>::namespaced(admin.clone(), &namespace)
        .get("shcr-store")
        .await?;
    let public = std::fs::read_to_string(&platform.public_key_file)?;
    assert_eq!(
        store_config
            .data
            .unwrap_or_default()
            .get("SHCR_STORE_ASSERTION_PUBLIC_KEY")
            .map(|key| key.trim().to_owned()),
        Some(public.trim().to_owned())
    );

    // Deletion (finalizer removal) works with the same rights.
    api.delete(&name, &DeleteParams::default()).await?;
    eventually(&format!("{name} is deleted"), || async {
        Ok(api.get_opt(&name).await?.is_none())
    })
    .await?;
    operator.shut_down().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_missing_one_chart_permission_reports_it_in_status() -> anyhow::Result<()> {
    let _one_operator = OPERATOR.lock().await;
    let admin = admin().await?;
    let platform = install_platform("rbac-cut").await?;
    let mut config = platform.operator_config().await?;
    config.leader_election.enabled = false;

    // The chart's ClusterRole without its networkpolicies rule, bound to a new ServiceAccount.
    let roles = Api::<ClusterRole>::all(admin.clone());
    let chart_role = roles.get(&format!("{}-operator", platform.release)).await?;
    let mut rules = chart_role.rules.clone().unwrap_or_default();
    let before = rules.len();
    rules.retain(|rule| {
        !rule
            .resources
            .as_ref()
            .is_some_and(|r| r.iter().any(|r| r == "networkpolicies"))
    });
    assert_eq!(
        rules.len(),
        before - 1,
        "the chart has one networkpolicies rule"
    );
    let cut = format!("{}-without-networkpolicies", platform.namespace);
    roles
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: ObjectMeta {
                    name: Some(cut.clone()),
                    ..ObjectMeta::default()
                },
                rules: Some(rules),
                aggregation_rule: None,
            },
        )
        .await?;
    let service_account = "operator-without-networkpolicies";
    Api::<ServiceAccount>::namespaced(admin.clone(), &platform.namespace)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(service_account.to_owned()),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            },
        )
        .await?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: ObjectMeta {
                    name: Some(cut.clone()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".to_owned()),
                    kind: "ClusterRole".to_owned(),
                    name: cut.clone(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_owned(),
                    name: service_account.to_owned(),
                    namespace: Some(platform.namespace.clone()),
                    api_group: None,
                }]),
            },
        )
        .await?;

    let operator = start_operator(
        client_as(&platform.namespace, service_account).await?,
        config,
    )
    .await?;
    let api = Api::<CareSystem>::all(admin.clone());
    let name = shcr_testenv::unique_name("rbac-cut-wy");
    api.create(
        &PostParams::default(),
        &care_system(&name, &platform.namespace)?,
    )
    .await?;
    eventually(
        &format!("{name} reports that network policies are forbidden"),
        || async {
            Ok(condition_of(&api, &name, condition::SYNCED)
                .await?
                .is_some_and(|(status, message)| {
                    status == "False"
                        && message.contains("is forbidden")
                        && message.contains(&format!(
                            "system:serviceaccount:{}:{service_account}",
                            platform.namespace
                        ))
                        && message.contains("cannot patch resource \"networkpolicies\"")
                }))
        },
    )
    .await?;
    let ready = condition_of(&api, &name, condition::READY).await?;
    assert!(
        ready.as_ref().is_some_and(|(status, _)| status == "False"),
        "Ready should be False, is {ready:?}"
    );

    api.delete(&name, &DeleteParams::default()).await?;
    eventually(&format!("{name} is deleted"), || async {
        Ok(api.get_opt(&name).await?.is_none())
    })
    .await?;
    operator.shut_down().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The image.

/// Joins a Dockerfile's or Makefile's continuation lines.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') && current.is_empty() {
            continue;
        }
        if let Some(continued) = trimmed.strip_suffix('\\') {
            current.push_str(continued.trim());
            current.push(' ');
        } else {
            current.push_str(trimmed);
            lines.push(std::mem::take(&mut current));
        }
    }
    lines
}

/// The `cargo build ...` command in `text`, up to the end of its shell command.
fn cargo_build(text: &str) -> Option<String> {
    logical_lines(text).into_iter().find_map(|line| {
        let start = line.find("cargo build")?;
        let command = line[start..].split("&&").next()?.trim();
        Some(command.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

#[test]
fn dockerfile_builds_with_the_suites_toolchain_and_command() -> anyhow::Result<()> {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile"))?;
    let makefile = std::fs::read_to_string(repo().join("Makefile"))?;

    let image_build = cargo_build(&dockerfile).context("a cargo build in the Dockerfile")?;
    let make_release = makefile
        .split("\nrelease:")
        .nth(1)
        .and_then(cargo_build)
        .context("a cargo build in the Makefile's release target")?;
    assert_eq!(image_build, make_release);
    assert_eq!(image_build, "cargo build --release --locked --bin shcr");

    // The toolchain: the one this suite runs with, within the workspace's rust-version.
    let pinned = dockerfile
        .lines()
        .find_map(|line| line.trim().strip_prefix("ARG RUST_VERSION="))
        .context("ARG RUST_VERSION= in the Dockerfile")?;
    let rustc =
        succeeds(Command::new(std::env::var("RUSTC").unwrap_or("rustc".into())).arg("--version"))?;
    assert_eq!(
        rustc.split_whitespace().nth(1),
        Some(pinned),
        "the image is built with Rust {pinned} but the suite runs {rustc}"
    );
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml"))?;
    let rust_version = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("rust-version = "))
        .context("rust-version in Cargo.toml")?
        .trim_matches('"');
    assert!(
        pinned.starts_with(rust_version),
        "{pinned} vs rust-version {rust_version}"
    );

    // Runs as non-root (the charts' 65532) on a distroless base.
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert!(
        stages
            .last()
            .is_some_and(|from| from.contains("distroless")),
        "{stages:?}"
    );
    assert!(
        dockerfile
            .lines()
            .any(|line| line.trim() == "USER 65532:65532")
    );
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/shcr\"]"));

    // --locked holds: Cargo.lock already resolves the binary's dependency graph, so the image
    // build uses exactly it (`cargo tree` resolves as `cargo build` does, without building).
    succeeds(
        Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .args([
                "tree",
                "--locked",
                "--offline",
                "-p",
                "shcr",
                "-e",
                "normal,build",
            ])
            .current_dir(repo()),
    )
    .context("Cargo.lock is out of date: `cargo build --locked` in the image would fail")?;
    Ok(())
}
