//! A real Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.
//!
//! No kubelet or scheduler runs: pods never start, so tests that need a workload "available" set
//! its status the way the deployment controller would. The controller-manager runs only the
//! controllers tests rely on (namespace deletion, garbage collection, service-account tokens);
//! in particular no deployment controller, which would overwrite such status.
//!
//! Invariants: every process and the temp dir are registered with the reaper; the admin
//! kubeconfig authenticates with a client certificate in `system:masters`; RBAC is the only
//! authorizer, so an unprivileged identity is really denied.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::TestEnvError;
use crate::pki::ControlPlanePki;
use crate::process::{ManagedProcess, ScratchDir, free_port, tcp_open, wait_until_ready};
use crate::tools;

const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running control plane.
pub struct KubeCluster {
    // Field order is drop order: stop the controller-manager and apiserver before etcd, and
    // remove the directory last.
    controller_manager: ManagedProcess,
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    server_url: String,
    dir: ScratchDir,
}

impl KubeCluster {
    /// Builds (if needed) and starts etcd, the apiserver and the controller-manager.
    pub async fn start() -> Result<Self, TestEnvError> {
        let etcd_bin = tools::ETCD.executable("etcd")?;
        let apiserver_bin = tools::KUBERNETES.executable("kube-apiserver")?;
        let kcm_bin = tools::KUBERNETES.executable("kube-controller-manager")?;
        let kubectl = tools::KUBERNETES.executable("kubectl")?;

        let dir = ScratchDir::new("kube")?;
        let root = dir.path().to_path_buf();
        let pki = ControlPlanePki::generate(&root)?;

        let (mut etcd, etcd_url) = start_etcd(&etcd_bin, &root).await?;

        let api_port = free_port()?;
        let mut apiserver_cmd = Command::new(&apiserver_bin);
        apiserver_cmd.args([
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", root.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", pki.serving_cert.display()),
            format!("--tls-private-key-file={}", pki.serving_key.display()),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            format!(
                "--service-account-key-file={}",
                pki.service_account_public_key.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key.display()
            ),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "--v=0".into(),
        ]);
        let mut apiserver = ManagedProcess::spawn(
            "kube-apiserver",
            apiserver_cmd,
            &root.join("kube-apiserver.log"),
        )?;

        let server_url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig_yaml = admin_kubeconfig(&server_url, &pki)?;
        let kubeconfig = root.join("kubeconfig");
        std::fs::write(&kubeconfig, &kubeconfig_yaml)
            .map_err(|e| TestEnvError::Io(format!("writing the kubeconfig: {e}")))?;

        wait_until_ready(&mut apiserver, START_TIMEOUT, || {
            let yaml = kubeconfig_yaml.clone();
            async move {
                let client = client_from_yaml(&yaml).await.map_err(|e| e.to_string())?;
                let req = http_get("/readyz")?;
                let body = client
                    .request_text(req)
                    .await
                    .map_err(|e| format!("GET /readyz: {e}"))?;
                if body.trim() == "ok" {
                    Ok(())
                } else {
                    Err(format!("/readyz said {body}"))
                }
            }
        })
        .await?;

        let mut kcm_cmd = Command::new(&kcm_bin);
        kcm_cmd.args([
            format!("--kubeconfig={}", kubeconfig.display()),
            "--controllers=namespace-controller,garbage-collector-controller,serviceaccount-controller,serviceaccount-token-controller".into(),
            format!(
                "--service-account-private-key-file={}",
                pki.service_account_key.display()
            ),
            format!("--root-ca-file={}", pki.ca_cert.display()),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            format!("--cert-dir={}", root.join("kcm-certs").display()),
            "--v=0".into(),
        ]);
        let mut controller_manager = ManagedProcess::spawn(
            "kube-controller-manager",
            kcm_cmd,
            &root.join("kube-controller-manager.log"),
        )?;
        // The controller-manager has no cheap readiness signal of its own; give it a moment and
        // make sure it did not die on its flags. Tests that need it (namespace deletion) poll.
        tokio::time::sleep(Duration::from_millis(500)).await;
        controller_manager.ensure_running()?;
        etcd.ensure_running()?;

        Ok(Self {
            controller_manager,
            apiserver,
            etcd,
            kubeconfig,
            kubectl,
            server_url,
            dir,
        })
    }

    /// Path of the admin kubeconfig (for `kubectl --kubeconfig` and `helm --kubeconfig`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The kubectl built with this control plane.
    pub fn kubectl_path(&self) -> &Path {
        &self.kubectl
    }

    /// A `kubectl` command preset with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// A new admin client, bound to the caller's async runtime.
    pub async fn client(&self) -> Result<kube::Client, TestEnvError> {
        let yaml = std::fs::read_to_string(&self.kubeconfig)
            .map_err(|e| TestEnvError::Io(format!("reading the kubeconfig: {e}")))?;
        client_from_yaml(&yaml).await
    }

    /// A client config for the admin, to derive other identities from (tokens, impersonation).
    pub async fn admin_config(&self) -> Result<kube::Config, TestEnvError> {
        let yaml = std::fs::read_to_string(&self.kubeconfig)
            .map_err(|e| TestEnvError::Io(format!("reading the kubeconfig: {e}")))?;
        config_from_yaml(&yaml).await
    }

    /// The directory holding logs, certificates and the kubeconfig.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Logs of the three processes, for diagnosing a failing test.
    pub fn log_paths(&self) -> [&Path; 3] {
        [
            self.etcd.log_path(),
            self.apiserver.log_path(),
            self.controller_manager.log_path(),
        ]
    }
}

async fn start_etcd(bin: &Path, root: &Path) -> Result<(ManagedProcess, String), TestEnvError> {
    let client_port = free_port()?;
    let peer_port = free_port()?;
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = Command::new(bin);
    cmd.args([
        "--name=shcr-testenv".to_string(),
        format!("--data-dir={}", root.join("etcd-data").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=shcr-testenv={peer_url}"),
        "--unsafe-no-fsync=true".to_string(),
        "--quota-backend-bytes=4294967296".to_string(),
        "--log-level=warn".to_string(),
    ]);
    cmd.env("ETCD_UNSUPPORTED_ARCH", "");
    let mut etcd = ManagedProcess::spawn("etcd", cmd, &root.join("etcd.log"))?;
    wait_until_ready(&mut etcd, START_TIMEOUT, || tcp_open(client_port)).await?;
    Ok((etcd, client_url))
}

fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn admin_kubeconfig(server: &str, pki: &ControlPlanePki) -> Result<String, TestEnvError> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "shcr-testenv", "cluster": {
            "server": server,
            "certificate-authority-data": b64(&pki.ca_cert_pem),
        }}],
        "users": [{"name": "shcr-testenv-admin", "user": {
            "client-certificate-data": b64(&pki.admin_cert_pem),
            "client-key-data": b64(&pki.admin_key_pem),
        }}],
        "contexts": [{"name": "shcr-testenv", "context": {
            "cluster": "shcr-testenv", "user": "shcr-testenv-admin", "namespace": "default",
        }}],
        "current-context": "shcr-testenv",
    });
    serde_yaml::to_string(&doc).map_err(|e| TestEnvError::Io(format!("writing kubeconfig: {e}")))
}

async fn config_from_yaml(yaml: &str) -> Result<kube::Config, TestEnvError> {
    let kubeconfig = Kubeconfig::from_yaml(yaml)
        .map_err(|e| TestEnvError::Io(format!("parsing the kubeconfig: {e}")))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| TestEnvError::Io(format!("loading the kubeconfig: {e}")))
}

async fn client_from_yaml(yaml: &str) -> Result<kube::Client, TestEnvError> {
    let config = config_from_yaml(yaml).await?;
    kube::Client::try_from(config)
        .map_err(|e| TestEnvError::Io(format!("building a kube client: {e}")))
}

fn http_get(path: &str) -> Result<http::Request<Vec<u8>>, String> {
    http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())
}
