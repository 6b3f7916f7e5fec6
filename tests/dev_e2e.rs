//! `shcr dev` as a user runs it: start the process, wait until it says it is ready, mint a token
//! with `shcr token`, call the FHIR API through the gateway, stop it with SIGTERM, start it
//! again on the same data dir and find the record.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn shcr() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shcr"));
    for variable in [
        "SHCR_CONFIG",
        "SHCR_LOG_FORMAT",
        "SHCR_LOG_LEVEL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "SHCR_DEV_DATA_DIR",
        "SHCR_DEV_LISTEN",
        "SHCR_DEV_CARE_SYSTEMS",
        "SHCR_DEV_SEED_DEMO",
    ] {
        command.env_remove(variable);
    }
    command
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// A running `shcr dev` and the lines it has printed so far.
struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Dev {
    fn start(data_dir: &Path, listen: SocketAddr) -> Dev {
        let mut child = shcr()
            .args([
                "dev",
                "--seed-demo",
                "--listen",
                &listen.to_string(),
                "--data-dir",
            ])
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("shcr dev starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut dev = Dev {
            child,
            lines,
            seen: Vec::new(),
        };
        dev.wait_for_line("shcr dev: ready", Duration::from_secs(60));
        dev
    }

    fn wait_for_line(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "`{needle}` never printed; output so far:\n{}",
            self.seen.join("\n")
        );
    }

    /// SIGTERM, then waits for a clean exit.
    fn terminate(mut self) -> Vec<String> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        self.wait_for_line("every store flushed and closed", Duration::from_secs(30));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "shcr dev exited with {status}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "shcr dev did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 exchange (Connection: close): status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to shcr dev");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn token(data_dir: &Path, care_system: &str, org: &str) -> String {
    let output = shcr()
        .args([
            "token",
            "--care-system",
            care_system,
            "--org",
            org,
            "--role",
            "R8000",
            "--data-dir",
        ])
        .arg(data_dir)
        .output()
        .expect("shcr token runs");
    assert!(
        output.status.success(),
        "shcr token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .expect("a token on the last line")
        .trim()
        .to_owned()
}

#[test]
fn dev_runs_the_platform_and_keeps_records_across_a_restart() {
    let dir = tempfile_dir();
    let listen = free_addr();
    let dev = Dev::start(&dir, listen);
    let printed = dev.seen.join("\n");
    assert!(
        printed.contains(&format!("http://{listen}/north-east/fhir")),
        "prints the FHIR base URLs:\n{printed}"
    );
    assert!(
        printed.contains("curl -H 'Authorization: Bearer "),
        "prints a ready-to-paste curl:\n{printed}"
    );
    assert_eq!(http(listen, "GET", "/healthz", None, "").0, 200);

    let ne = token(&dir, "north-east", "RTD");
    let (status, body) = http(
        listen,
        "GET",
        "/north-east/fhir/Patient/demo-patient-1",
        Some(&ne),
        "",
    );
    assert_eq!(status, 200, "seeded demo patient: {body}");
    assert!(body.contains("https://fhir.nhs.uk/Id/nhs-number"), "{body}");
    let (status, body) = http(
        listen,
        "PUT",
        "/north-east/fhir/Patient/e2e-1",
        Some(&ne),
        r#"{"resourceType":"Patient","id":"e2e-1","name":[{"family":"Restart"}]}"#,
    );
    assert_eq!(status, 201, "{body}");
    let (status, _) = http(listen, "GET", "/north-east/fhir/Patient/e2e-1", None, "");
    assert_eq!(status, 401, "no token, no record");
    let wy = token(&dir, "west-yorkshire", "RR8");
    let (status, _) = http(
        listen,
        "GET",
        "/north-east/fhir/Patient/e2e-1",
        Some(&wy),
        "",
    );
    assert_eq!(status, 401, "a west-yorkshire token is not for north-east");

    dev.terminate();

    let listen = free_addr();
    let dev = Dev::start(&dir, listen);
    let (status, body) = http(
        listen,
        "GET",
        "/north-east/fhir/Patient/e2e-1",
        Some(&ne),
        "",
    );
    assert_eq!(status, 200, "the record survives the restart: {body}");
    assert!(body.contains("Restart"), "{body}");
    let (status, body) = http(
        listen,
        "GET",
        "/west-yorkshire/fhir/Patient/e2e-1",
        Some(&wy),
        "",
    );
    assert_eq!(status, 404, "and stays in its own care system: {body}");
    dev.terminate();
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "dev-e2e-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
