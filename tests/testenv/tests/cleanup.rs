//! The environment never outlives its test process: even `kill -9` leaves no server and no
//! temp dir behind (the reaper's job).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn port_of(url: &str) -> Result<u16> {
    Ok(url
        .rsplit(':')
        .next()
        .context("no port in url")?
        .trim_end_matches('/')
        .parse()?)
}

#[test]
fn kill_9_of_the_test_process_leaves_nothing_behind() -> Result<()> {
    let mut up = Command::new(env!("CARGO_BIN_EXE_shcr-testenv"))
        .arg("up")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = up.stdout.take().context("no stdout")?;
    let mut ports = Vec::new();
    let mut dir = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(url) = line
            .strip_prefix("export SHCR_TEST_S3_ENDPOINT=")
            .or_else(|| line.strip_prefix("export SHCR_TEST_KMS_ENDPOINT="))
        {
            ports.push(port_of(url)?);
        }
        if let Some(path) = line.strip_prefix("# logs and certificates: ") {
            dir = Some(std::path::PathBuf::from(path));
        }
        if line.starts_with("# press Ctrl-C") {
            break;
        }
    }
    let dir = dir.context("`shcr-testenv up` did not print its directory")?;
    let kubeconfig = std::fs::read_to_string(dir.join("kubeconfig"))?;
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .context("no server in kubeconfig")?;
    ports.push(port_of(server.trim_matches('\''))?);
    assert_eq!(ports.len(), 3, "{ports:?}");
    for port in &ports {
        std::net::TcpStream::connect(("127.0.0.1", *port))
            .with_context(|| format!("port {port} not open while the environment is up"))?;
    }

    up.kill()?; // SIGKILL: no destructor, no signal handler runs
    up.wait()?;

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let open: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
            .collect();
        if open.is_empty() && !dir.exists() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "15 s after kill -9: ports still open {open:?}, dir {} exists: {}",
                dir.display(),
                dir.exists()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
