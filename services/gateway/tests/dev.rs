//! `shcr dev` in process: stores open on the embedded default behind the gateway, health
//! answers, demo data is seeded once, the FHIR API works with a dev token, a restart on the same
//! data dir finds the same keys and records, bad manifests are refused with clear errors.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use shcr_gateway::auth::{DevIssuer, TokenRequest};
use shcr_gateway::dev::{DEMO_CARE_SYSTEMS, DevConfig, DevError, parse_care_systems, run};
use shcr_gateway::seed::PATIENTS_PER_CARE_SYSTEM;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_every_care_system_and_survives_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    for round in 0..2 {
        let listen = free_addr()?;
        let config = DevConfig {
            data_dir: dir.path().to_path_buf(),
            listen,
            care_systems: None,
            seed_demo: true,
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

        // The FHIR API through the gateway, with a token from the dev issuer in the data dir
        // (the same key after the restart).
        let issuer = DevIssuer::load_or_create(dir.path())?;
        let token = issuer.issue(&TokenRequest::new("north-east", "RTD", "R8000"))?;
        let patients: serde_json::Value = http
            .get(format!("{base}/north-east/fhir/Patient?_count=50"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        let seeded = patients["entry"].as_array().map(Vec::len).unwrap_or(0);
        let expected = PATIENTS_PER_CARE_SYSTEM + usize::from(round == 1);
        assert_eq!(
            seeded, expected,
            "round {round}: seeding is idempotent: {patients}"
        );
        if round == 0 {
            let created = http
                .put(format!("{base}/north-east/fhir/Patient/kept"))
                .bearer_auth(&token)
                .header("content-type", "application/fhir+json")
                .body(r#"{"resourceType":"Patient","id":"kept","name":[{"family":"Kept"}]}"#)
                .send()
                .await?;
            assert_eq!(created.status(), 201);
            let location = created.headers()["location"].to_str()?.to_owned();
            assert!(
                location.starts_with(&format!("{base}/north-east/fhir/Patient/kept")),
                "Location names the gateway: {location}"
            );
        } else {
            let kept: serde_json::Value = http
                .get(format!("{base}/north-east/fhir/Patient/kept"))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            assert_eq!(kept["name"][0]["family"], "Kept", "{kept}");
        }
        // A west-yorkshire token cannot read north-east.
        let other = issuer.issue(&TokenRequest::new("west-yorkshire", "RR8", "R8000"))?;
        let refused = http
            .get(format!("{base}/north-east/fhir/Patient/kept"))
            .bearer_auth(&other)
            .send()
            .await?;
        assert_eq!(refused.status(), 401);

        let _ = stop.send(());
        server.await??;
    }
    // Each care system has its own master key, created 0600, reused by the restart.
    for name in ["north-east", "west-yorkshire"] {
        let key = dir.path().join(name).join("keys").join("master.key");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    let key = dir.path().join("gateway").join("assertion-key.pem");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", key.display());
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
