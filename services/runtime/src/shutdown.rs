//! Graceful shutdown on SIGTERM (Kubernetes stopping a pod) or Ctrl-C (a person at a terminal).
//!
//! Job: a future that completes when the process is asked to stop, for
//! `axum::serve(..).with_graceful_shutdown(async { shutdown::signal().await; })`, which stops
//! accepting connections and drains in-flight requests before returning.
//!
//! Invariants:
//! - The signal handlers are installed on the future's first poll; poll it (start serving) early.
//! - If a handler cannot be installed, that signal keeps its default action (the process exits
//!   immediately) and the failure is logged; the other signal still works.
//! - Must run inside a Tokio runtime.

use std::fmt;

/// Which request to stop arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownSignal {
    /// SIGTERM, as sent by Kubernetes, systemd or `kill`.
    Terminate,
    /// SIGINT, as sent by Ctrl-C.
    Interrupt,
}

impl fmt::Display for ShutdownSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT (Ctrl-C)",
        })
    }
}

/// Completes at the first SIGTERM or Ctrl-C, logging which one arrived.
pub async fn signal() -> ShutdownSignal {
    let received = tokio::select! {
        () = interrupt() => ShutdownSignal::Interrupt,
        () = terminate() => ShutdownSignal::Terminate,
    };
    tracing::info!(signal = %received, "shutdown requested; finishing in-flight work");
    received
}

async fn interrupt() {
    if let Err(error) = tokio::signal::ctrl_c().await {
        tracing::error!(%error, "cannot listen for Ctrl-C; it will stop the process abruptly");
        std::future::pending::<()>().await;
    }
}

#[cfg(unix)]
async fn terminate() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            terminate.recv().await;
        }
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; it will stop the process abruptly");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending::<()>().await;
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_completes_the_future() {
        let waiting = tokio::spawn(signal());
        // Give the spawned task time to install its handlers before the signal is sent.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());

        let received = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("signal future completes")
            .expect("task does not panic");
        assert_eq!(received, ShutdownSignal::Terminate);
    }
}
