//! Leader election: of several operator replicas, exactly one reconciles at a time.
//!
//! Built on `kube-lease-manager` (a `coordination.k8s.io/v1` Lease, renewed by server-side
//! apply). A replica waits as a standby until it holds the lease, then runs the controller.
//!
//! Invariants:
//! - The controller runs only while this replica holds the lease.
//! - On shutdown the controller finishes its in-flight reconciles *before* the lease is released,
//!   so a standby never starts while the old leader is still writing.
//! - Losing the lease (renewal failed, e.g. the apiserver was unreachable for longer than the
//!   lease) stops the controller and returns [`LeaderError::LostLeadership`]: the process exits
//!   and Kubernetes restarts it as a standby, rather than carrying on unsure it still leads.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::controller::{self, Context};

/// Leader election settings (section `operator.leader_election`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaderElectionConfig {
    /// Off only for a single replica run by hand; with more than one replica both would reconcile.
    pub enabled: bool,
    /// Namespace of the Lease (the operator's own).
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's name in the Lease. Absent: `POD_NAME`, else a name unique to the process.
    pub identity: Option<String>,
    /// How long a lease holds without renewal before a standby may take it.
    pub lease_duration_seconds: u64,
    /// How long before expiry the leader renews (also the clock skew tolerated); less than the
    /// duration.
    pub renew_before_seconds: u64,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lease_namespace: "shcr-system".to_owned(),
            lease_name: "shcr-operator".to_owned(),
            identity: None,
            lease_duration_seconds: 15,
            renew_before_seconds: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "leader election needs 0 < renew_before_seconds ({renew_before}) < \
         lease_duration_seconds ({duration})"
    )]
    InvalidTiming { duration: u64, renew_before: u64 },
    #[error(
        "cannot use the Lease {namespace}/{name} for leader election; does the namespace exist \
         and may the operator get, create and patch leases there?"
    )]
    Lease {
        namespace: String,
        name: String,
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("lost the leader lease; stopping so that a standby replica takes over")]
    LostLeadership,
}

impl LeaderElectionConfig {
    fn identity(&self) -> String {
        self.identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .unwrap_or_else(|| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.subsec_nanos());
                format!("shcr-operator-{}-{nanos}", std::process::id())
            })
    }
}

/// Runs the controller whenever this replica leads, until `shutdown` completes.
pub async fn run_as_leader(
    context: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), LeaderError> {
    let config = context.config().leader_election.clone();
    let (duration, renew_before) = (config.lease_duration_seconds, config.renew_before_seconds);
    if renew_before == 0 || renew_before >= duration {
        return Err(LeaderError::InvalidTiming {
            duration,
            renew_before,
        });
    }
    let identity = config.identity();
    let lease_error = |source| LeaderError::Lease {
        namespace: config.lease_namespace.clone(),
        name: config.lease_name.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(context.client().clone(), &config.lease_name)
        .with_namespace(&config.lease_namespace)
        .with_parameters(LeaseParams::new(identity.clone(), duration, renew_before))
        .build()
        .await
        .map_err(lease_error)?;
    let (mut leading, lease_task) = manager.watch().await;

    tracing::info!(%identity, lease = %config.lease_name, "waiting to become the leader");
    let mut shutdown = Box::pin(shutdown);
    while !*leading.borrow_and_update() {
        tokio::select! {
            () = &mut shutdown => {
                drop(leading);
                return finish(lease_task, lease_error).await;
            }
            changed = leading.changed() => if changed.is_err() {
                return Err(LeaderError::LostLeadership);
            }
        }
    }
    tracing::info!(%identity, "became the leader; reconciling");

    let lost = Arc::new(AtomicBool::new(false));
    let stop = {
        let lost = Arc::clone(&lost);
        let mut watching = leading.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = leadership_lost(&mut watching) => lost.store(true, Ordering::Release),
            }
        }
    };
    controller::run(context, stop).await;
    // Only now, with no reconcile in flight, let the lease go.
    drop(leading);
    finish(lease_task, lease_error).await?;
    if lost.load(Ordering::Acquire) {
        return Err(LeaderError::LostLeadership);
    }
    Ok(())
}

async fn leadership_lost(leading: &mut watch::Receiver<bool>) {
    loop {
        if leading.changed().await.is_err() || !*leading.borrow_and_update() {
            return;
        }
    }
}

/// Waits for the lease task to release the lease.
async fn finish(
    lease_task: tokio::task::JoinHandle<
        kube_lease_manager::Result<kube_lease_manager::LeaseManager>,
    >,
    lease_error: impl Fn(kube_lease_manager::LeaseManagerError) -> LeaderError,
) -> Result<(), LeaderError> {
    match lease_task.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(lease_error(error)),
        Err(join_error) => {
            tracing::warn!(%join_error, "the lease task ended abnormally");
            Ok(())
        }
    }
}
