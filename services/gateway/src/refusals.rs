//! Refusal notices: the gateway tells a care system's store about each request it refused
//! (401/403) for that care system, so the refusal is in the tenant's own audit trail.
//!
//! Job: [`RefusalReporter::report`] queues a [`RefusalNotice`]; one background task signs each
//! (a [`shcr_identity::assertion::REFUSAL_TYP`] JWS for the care system, with its own `jti`) and
//! POSTs it, in the `x-shcr-identity` header with no body, to the store's
//! `/{care-system}/internal/gateway-refusals`, which records it as an AuditEvent.
//!
//! Invariants:
//! - clients never wait for this: the queue is bounded ([`QUEUE_CAPACITY`]) and a full queue
//!   drops the notice, counted (`shcr_gateway_refusal_notices_total{outcome="dropped"}`) and
//!   logged as an error; a store that cannot be told is counted as `failed` and logged;
//! - a notice holds the method and the resource type of the path, the status and reason, who
//!   when the token was verified (issuer, subject, organisation, role) and the request id —
//!   never ids, query values, bodies or tokens.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use shcr_identity::{ASSERTION_HEADER, AssertionSigner, RefusalNotice};
use tokio::sync::mpsc;

use crate::metrics::GatewayMetrics;
use crate::routing::Upstream;

/// Notices waiting to be sent; beyond this, new ones are dropped.
pub const QUEUE_CAPACITY: usize = 1024;

/// The path of the store's endpoint below `/{care-system}`.
const ENDPOINT: &str = "internal/gateway-refusals";

/// How long one notice may take to deliver.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Lifetime of a notice's signature.
const NOTICE_TTL: Duration = Duration::from_secs(60);

struct Pending {
    notice: RefusalNotice,
    upstream: Upstream,
}

/// Queues refusal notices for delivery to the stores. Cheap to clone.
#[derive(Clone)]
pub struct RefusalReporter {
    tx: Option<mpsc::Sender<Pending>>,
    metrics: GatewayMetrics,
}

impl std::fmt::Debug for RefusalReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalReporter").finish_non_exhaustive()
    }
}

impl RefusalReporter {
    /// Starts the delivery task on the current Tokio runtime. Outside a runtime nothing can be
    /// delivered: every notice is then dropped (and counted).
    pub fn start(
        client: Client<HttpConnector, Full<Bytes>>,
        signer: Arc<AssertionSigner>,
        metrics: GatewayMetrics,
    ) -> Self {
        let tx = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                runtime.spawn(deliver(rx, client, signer, metrics.clone()));
                Some(tx)
            }
            Err(_) => {
                tracing::error!("no async runtime: gateway refusals will not reach the stores");
                None
            }
        };
        Self { tx, metrics }
    }

    /// Queues `notice` for `upstream` (the store of `notice.care_system`); never waits.
    pub fn report(&self, notice: RefusalNotice, upstream: &Upstream) {
        let care_system = notice.care_system.clone();
        let pending = Pending {
            notice,
            upstream: upstream.clone(),
        };
        let queued = match &self.tx {
            Some(tx) => tx.try_send(pending).is_ok(),
            None => false,
        };
        if !queued {
            self.metrics.refusal_notice(&care_system, "dropped");
            tracing::error!(
                care_system,
                "refusal notice dropped (queue full): this refusal is not in the care system's audit trail"
            );
        }
    }
}

async fn deliver(
    mut rx: mpsc::Receiver<Pending>,
    client: Client<HttpConnector, Full<Bytes>>,
    signer: Arc<AssertionSigner>,
    metrics: GatewayMetrics,
) {
    while let Some(Pending { notice, upstream }) = rx.recv().await {
        let care_system = notice.care_system.clone();
        let outcome = match send(&client, &signer, &notice, &upstream).await {
            Ok(()) => "recorded",
            Err(error) => {
                tracing::error!(
                    care_system,
                    request_id = notice.request_id,
                    %error,
                    "refusal notice not delivered: this refusal is not in the care system's audit trail"
                );
                "failed"
            }
        };
        metrics.refusal_notice(&care_system, outcome);
    }
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    signer: &AssertionSigner,
    notice: &RefusalNotice,
    upstream: &Upstream,
) -> Result<(), String> {
    let token = signer
        .sign_refusal(notice, NOTICE_TTL)
        .map_err(|e| e.to_string())?;
    let uri = Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(format!(
            "{}/{}/{ENDPOINT}",
            upstream.path_prefix, notice.care_system
        ))
        .build()
        .map_err(|e| e.to_string())?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(ASSERTION_HEADER, token)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(SEND_TIMEOUT, client.request(request))
        .await
        .map_err(|_| "the store did not answer in time".to_owned())?
        .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("the store answered {}", response.status()))
    }
}
