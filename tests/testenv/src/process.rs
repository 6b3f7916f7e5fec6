//! Child processes of the test environment and the reaper that outlives nothing.
//!
//! Invariants:
//! - every server runs in its own process group, so killing the group takes its children too;
//! - every group and every temp dir is registered with one [`Reaper`] per test binary before the
//!   server can outlive its caller. The reaper is a tiny `sh` process in its own group that reads
//!   registrations from a pipe; when the test binary ends in any way (normal exit, panic, abort,
//!   SIGKILL) the kernel closes the pipe, and the reaper kills every registered group and removes
//!   every registered dir. Shared servers live in statics (never dropped), so this is what cleans
//!   them up;
//! - a server's stdout and stderr go to a log file whose tail is shown when it fails to start.

use std::fs::File;
use std::io::{PipeWriter, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::TestEnvError;

const REAPER_SCRIPT: &str = r#"
trap '' INT TERM HUP
pgs=""; dirs=""
while read -r kind val; do
  case "$kind" in
    pg) pgs="$pgs $val" ;;
    unpg) pgs=$(printf '%s\n' $pgs | grep -vx -- "$val" | tr '\n' ' ') ;;
    dir) dirs="$dirs $val" ;;
  esac
done
for pg in $pgs; do kill -TERM "-$pg" 2>/dev/null; done
sleep 1
for pg in $pgs; do kill -KILL "-$pg" 2>/dev/null; done
for d in $dirs; do rm -rf -- "$d"; done
"#;

/// The per-process reaper (see the module comment).
struct Reaper {
    pipe: Mutex<PipeWriter>,
}

fn reaper() -> Result<&'static Reaper, TestEnvError> {
    static REAPER: OnceLock<Result<Reaper, String>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (reader, writer) = std::io::pipe().map_err(|e| format!("creating reaper pipe: {e}"))?;
        Command::new("sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .stdin(reader)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting the reaper (sh): {e}"))?;
        Ok(Reaper {
            pipe: Mutex::new(writer),
        })
    });
    reaper.as_ref().map_err(|e| TestEnvError::Io(e.clone()))
}

fn tell_reaper(line: String) -> Result<(), TestEnvError> {
    let reaper = reaper()?;
    let mut pipe = reaper
        .pipe
        .lock()
        .map_err(|_| TestEnvError::Io("reaper pipe lock poisoned".into()))?;
    pipe.write_all(line.as_bytes())
        .and_then(|()| pipe.flush())
        .map_err(|e| TestEnvError::Io(format!("talking to the reaper: {e}")))
}

/// A temporary directory that is removed on drop and, failing that, by the reaper.
pub struct ScratchDir {
    dir: tempfile::TempDir,
}

impl ScratchDir {
    pub fn new(label: &str) -> Result<Self, TestEnvError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("shcr-testenv-{label}-"))
            .tempdir()
            .map_err(|e| TestEnvError::Io(format!("creating a temp dir: {e}")))?;
        tell_reaper(format!("dir {}\n", dir.path().display()))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A server process started for tests; killed (with its whole process group) on drop.
pub struct ManagedProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl ManagedProcess {
    /// Spawns `command` in a new process group with output to `log_path`.
    pub fn spawn(name: &str, mut command: Command, log_path: &Path) -> Result<Self, TestEnvError> {
        let log = File::create(log_path)
            .map_err(|e| TestEnvError::Io(format!("creating {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| TestEnvError::Io(format!("cloning log handle: {e}")))?;
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let child = command.spawn().map_err(|e| TestEnvError::Spawn {
            name: name.to_string(),
            program: format!("{:?}", command.get_program()),
            reason: e.to_string(),
        })?;
        tell_reaper(format!("pg {}\n", child.id()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log_path: log_path.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, 30)
    }

    /// Fails with the log tail when the process has exited.
    pub fn ensure_running(&mut self) -> Result<(), TestEnvError> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let log_tail = self.log_tail();
                let hint = if log_tail.contains("address already in use") {
                    "\nhint: a port it wanted is in use by another process"
                } else {
                    ""
                };
                Err(TestEnvError::ExitedDuringStartup {
                    name: self.name.clone(),
                    status: status.to_string(),
                    log_tail: format!("{log_tail}{hint}"),
                })
            }
            Ok(None) => Ok(()),
            Err(e) => Err(TestEnvError::Io(format!("waiting on {}: {e}", self.name))),
        }
    }

    /// Sends SIGKILL to the process group and reaps the leader.
    pub fn kill(&mut self) {
        kill_group(self.child.id(), "KILL");
        let _ = self.child.wait();
        let _ = tell_reaper(format!("unpg {}\n", self.child.id()));
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill_group(pgid: u32, signal: &str) {
    // `kill` from the shell is the simplest way to signal a group without libc bindings.
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last `lines` lines of a log file (or a note that it could not be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(could not read {}: {e})", path.display()),
    }
}

/// A free loopback TCP port. Another process may take it before the server binds; the server
/// then exits with "address already in use", which [`ManagedProcess::ensure_running`] reports.
pub fn free_port() -> Result<u16, TestEnvError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| TestEnvError::Io(format!("finding a free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| TestEnvError::Io(format!("finding a free port: {e}")))
}

/// Polls `probe` until it succeeds, the process exits, or `timeout` passes.
pub async fn wait_until_ready<F, Fut>(
    process: &mut ManagedProcess,
    timeout: Duration,
    mut probe: F,
) -> Result<(), TestEnvError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        process.ensure_running()?;
        let last_error = match probe().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(TestEnvError::NotReady {
                name: process.name().to_string(),
                waited: timeout,
                last_error,
                log_tail: process.log_tail(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether something accepts TCP connections on the loopback port.
pub async fn tcp_open(port: u16) -> Result<(), String> {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map(|_| ())
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_dies_during_start_up_is_reported_with_its_log() {
        let dir = ScratchDir::new("unit").unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'listen tcp 127.0.0.1:1: bind: address already in use' >&2; exit 3",
        ]);
        let mut process =
            ManagedProcess::spawn("doomed", cmd, &dir.path().join("doomed.log")).unwrap();
        let err = wait_until_ready(&mut process, Duration::from_secs(10), || async {
            Err("not yet".to_string())
        })
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("doomed exited during start-up"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("address already in use"), "{text}");
        assert!(text.contains("hint: a port it wanted is in use"), "{text}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out_with_the_last_probe_error() {
        let dir = ScratchDir::new("unit").unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo still starting; sleep 30"]);
        let mut process =
            ManagedProcess::spawn("sleepy", cmd, &dir.path().join("sleepy.log")).unwrap();
        let err = wait_until_ready(&mut process, Duration::from_millis(300), || async {
            Err("connection refused".to_string())
        })
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sleepy was not ready"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
        assert!(text.contains("still starting"), "{text}");
    }

    #[test]
    fn dropping_a_process_kills_its_whole_group() {
        let dir = ScratchDir::new("unit").unwrap();
        let pid_file = dir.path().join("grandchild.pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("sleep 60 & echo $! > {}; wait", pid_file.display()));
        let process = ManagedProcess::spawn("parent", cmd, &dir.path().join("p.log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pid_file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let grandchild = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .to_string();
        drop(process);
        // Dead means gone or a zombie awaiting its (new) parent's reaping.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{grandchild}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|r| !r.trim_start().starts_with('Z'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !alive(),
            "grandchild {grandchild} outlived its process group"
        );
    }
}
