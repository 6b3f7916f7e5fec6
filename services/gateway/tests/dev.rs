//! `shcr dev` end to end: stores open on the embedded default, health answers, a restart on the
//! same data dir finds the same keys and database, bad manifests are refused with clear errors.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use shcr_gateway::dev::{DEMO_CARE_SYSTEMS, DevConfig, DevError, parse_care_systems, run};

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn wait_healthy(base: &str) -> Result<()> {
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(format!("{base}/healthz")).await
            && r.status() == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("shcr dev never became healthy")
}

#[tokio::test]
async fn dev_serves_every_care_system_and_survives_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for round in 0..2 {
        let listen = free_addr()?;
        let config = DevConfig {
            data_dir: dir.path().to_path_buf(),
            listen,
            care_systems: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(config, async {
            let _ = stopped.await;
        }));
        let base = format!("http://{listen}");
        wait_healthy(&base).await?;
        let status: serde_json::Value = reqwest::get(format!("{base}/")).await?.json().await?;
        let names: Vec<&str> = status
            .as_array()
            .context("status is a list")?
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, ["north-east", "west-yorkshire"], "round {round}");
        assert!(
            status
                .as_array()
                .context("list")?
                .iter()
                .all(|c| c["store"] == "ready"),
            "{status}"
        );
        let metrics = reqwest::get(format!("{base}/metrics")).await?;
        assert_eq!(metrics.status(), 200);
        let _ = stop.send(());
        server.await??;
    }
    // Each care system has its own master key, created 0600, reused by the restart.
    for name in ["north-east", "west-yorkshire"] {
        let key = dir.path().join(name).join("keys").join("master.key");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    let a = std::fs::read(dir.path().join("north-east/keys/master.key"))?;
    let b = std::fs::read(dir.path().join("west-yorkshire/keys/master.key"))?;
    assert_ne!(a, b, "care systems must not share a key");
    Ok(())
}

#[test]
fn the_demo_manifests_are_valid_care_systems() -> Result<()> {
    let systems = parse_care_systems(DEMO_CARE_SYSTEMS, "demo")?;
    assert_eq!(systems.len(), 2);
    assert!(systems.iter().all(|c| !c.spec.members.is_empty()));
    Ok(())
}

#[test]
fn bad_manifests_are_refused_with_the_document_and_the_reason() {
    let cases = [
        (
            "kind: ConfigMap\nmetadata: {name: x}\n",
            "kind is \"ConfigMap\"",
        ),
        (
            "kind: CareSystem\nmetadata: {name: a}\nspec: {odsCode: qwo, displayName: A, storage: {region: eu-west-2}}\n",
            "spec.odsCode",
        ),
        (
            "kind: CareSystem\nmetadata: {name: a}\nspec: {odsCode: QWO, displayName: A, members: [\"not one\"], storage: {region: eu-west-2}}\n",
            "spec.members",
        ),
        (
            "kind: CareSystem\nmetadata: {name: a}\nspec: {odsCode: 7}\n",
            "not a valid CareSystem",
        ),
        (
            "kind: CareSystem\nmetadata: {name: Bad_Name}\nspec: {odsCode: QWO, displayName: A, storage: {region: eu-west-2}}\n",
            "metadata.name",
        ),
        ("# nothing here\n", "holds no CareSystem"),
    ];
    for (yaml, expected) in cases {
        let err = parse_care_systems(yaml, "test.yaml").expect_err(yaml);
        let text = err.to_string();
        assert!(text.contains(expected), "{yaml:?} gave {text}");
        assert!(text.contains("test.yaml"), "{text}");
    }
    let twice = format!("{DEMO_CARE_SYSTEMS}\n---\n{DEMO_CARE_SYSTEMS}");
    assert!(matches!(
        parse_care_systems(&twice, "twice"),
        Err(DevError::RejectedManifest { .. })
    ));
}
