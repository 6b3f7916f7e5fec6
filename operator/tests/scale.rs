//! The operator at scale against the test environment: 200 CareSystems reach Ready, and once they
//! have, the idle operator (periodic resyncs included) sends the apiserver no writes.
//!
//! Its own test binary, so that the burst of 200 care systems has the test environment (its own
//! apiserver, S3 and KMS servers) to itself. Figures (apply-to-Ready latency for 1 and for 200,
//! idle request rate, RSS) are printed: `cargo test -p shcr-operator --test scale -- --nocapture`.
//!
//! Requests are counted by a layer on the operator's real kube client (every request it sends
//! passes through it). A deployment-controller stand-in marks each store Deployment available,
//! as no kubelet runs here.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use common::{TEST_LABEL, care_system, client, operator_config, spec, start_operator_configured};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, ResourceExt as _};
use serde_json::json;
use shcr_operator::CareSystem;
use shcr_operator::care_system::condition;

const CARE_SYSTEMS: usize = 200;
/// Resync interval of the operator under test: short, so the idle window includes resyncs.
const RESYNC: Duration = Duration::from_secs(15);

/// Requests one client has sent: (method, path, whether a watch).
#[derive(Clone, Default)]
struct RequestLog(Arc<Mutex<Vec<(http::Method, String, bool)>>>);

impl RequestLog {
    fn record<B>(&self, request: &http::Request<B>) {
        let watch = request
            .uri()
            .query()
            .is_some_and(|query| query.split('&').any(|pair| pair == "watch=true"));
        self.lock().push((
            request.method().clone(),
            request.uri().path().to_owned(),
            watch,
        ));
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Requests from index `from` on.
    fn since(&self, from: usize) -> Vec<(http::Method, String, bool)> {
        self.lock()
            .get(from..)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(http::Method, String, bool)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A client of the test apiserver (admin credentials) whose requests are logged.
async fn counting_client(log: &RequestLog) -> anyhow::Result<Client> {
    let config = shcr_testenv::kube().await?.admin_config().await?;
    let log = log.clone();
    let layer =
        tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
            log.record(&request);
            request
        });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build())
}

/// Marks every store Deployment of `group`'s care systems available as soon as it appears or
/// changes generation, as the deployment controller would once the pods were ready.
fn deployment_controller(client: Client, namespace_prefix: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let deployments = Api::<Deployment>::all(client.clone());
        let config =
            watcher::Config::default().labels("app.kubernetes.io/managed-by=shcr-operator");
        let mut events = watcher(deployments, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(deployment) = event else { continue };
            let namespace = deployment.namespace().unwrap_or_default();
            if !namespace.starts_with(&namespace_prefix) {
                continue;
            }
            let status = deployment.status.clone().unwrap_or_default();
            if status.observed_generation == deployment.metadata.generation
                && status.available_replicas == Some(1)
            {
                continue;
            }
            let patch = json!({"status": {
                "observedGeneration": deployment.metadata.generation,
                "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
            }});
            let api = Api::<Deployment>::namespaced(client.clone(), &namespace);
            if let Err(error) = api
                .patch_status(
                    &deployment.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await
            {
                eprintln!("cannot mark {namespace} available: {error}");
            }
        }
    })
}

/// When each CareSystem of `group` was first seen Ready.
fn ready_tracker(
    client: Client,
    group: &str,
) -> (
    Arc<Mutex<BTreeMap<String, Instant>>>,
    tokio::task::JoinHandle<()>,
) {
    let ready = Arc::new(Mutex::new(BTreeMap::new()));
    let task = {
        let ready = Arc::clone(&ready);
        let config = watcher::Config::default().labels(&format!("{TEST_LABEL}={group}"));
        tokio::spawn(async move {
            let mut events = watcher(Api::<CareSystem>::all(client), config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(care_system) = event else { continue };
                let is_ready = care_system
                    .status
                    .as_ref()
                    .is_some_and(|status| status.is_true(condition::READY));
                if is_ready {
                    ready
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry(care_system.name_any())
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    (ready, task)
}

/// Creates `names` (at most 16 requests at once) and returns when each was sent.
async fn create_all(
    api: &Api<CareSystem>,
    group: &str,
    names: &[String],
) -> anyhow::Result<BTreeMap<String, Instant>> {
    futures::stream::iter(names.iter().cloned())
        .map(|name| async move {
            let started = Instant::now();
            api.create(&PostParams::default(), &care_system(&name, group, spec())?)
                .await?;
            anyhow::Ok((name, started))
        })
        .buffer_unordered(16)
        .try_collect()
        .await
}

/// Waits until every one of `created` is Ready; returns each one's apply-to-Ready latency.
async fn wait_ready(
    ready: &Mutex<BTreeMap<String, Instant>>,
    created: &BTreeMap<String, Instant>,
    timeout: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let deadline = Instant::now() + timeout;
    loop {
        {
            let ready = ready.lock().unwrap_or_else(PoisonError::into_inner);
            let latencies: Vec<Duration> = created
                .iter()
                .filter_map(|(name, started)| ready.get(name).map(|at| *at - *started))
                .collect();
            if latencies.len() == created.len() {
                return Ok(latencies);
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {} care systems became Ready within {timeout:?}",
                    latencies.len(),
                    created.len()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_care_systems_become_ready_and_the_idle_operator_writes_nothing()
-> anyhow::Result<()> {
    let admin = client().await?;
    let group = shcr_testenv::unique_name("scale");
    let api = Api::<CareSystem>::all(admin.clone());
    let (ready, tracker) = ready_tracker(admin.clone(), &group);
    let deployments = deployment_controller(admin.clone(), format!("care-{group}-"));

    let rss_before = rss_mib();
    let log = RequestLog::default();
    let mut config = operator_config(&group, None).await?;
    config.resync_interval = RESYNC;
    // Reconciles mostly wait on S3 and KMS: twice the default parallelism drains the burst about
    // a quarter faster here (measured: 95 s with 16, 72 s with 32, on a loaded 2-core machine).
    config.reconcile_concurrency = 32;
    let operator = start_operator_configured(&counting_client(&log).await?, config).await?;

    // One care system, alone.
    let single = create_all(&api, &group, &[format!("{group}-one")]).await?;
    let one = wait_ready(&ready, &single, Duration::from_secs(60)).await?;
    println!("apply → Ready, 1 care system: {:?}", one[0]);

    // Two hundred at once.
    let names: Vec<String> = (0..CARE_SYSTEMS).map(|i| format!("{group}-{i}")).collect();
    let burst_started = Instant::now();
    let created = create_all(&api, &group, &names).await?;
    let mut latencies = wait_ready(&ready, &created, Duration::from_secs(150)).await?;
    let all_ready = burst_started.elapsed();
    latencies.sort();
    println!(
        "apply → Ready, {CARE_SYSTEMS} care systems: all in {all_ready:?}; per care system \
         p50 {:?}, p95 {:?}, max {:?}; {} reconciles, {} failed",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        percentile(&latencies, 1.0),
        operator.metrics.reconciles(),
        operator.metrics.failures(),
    );
    assert_eq!(operator.metrics.failures(), 0, "no reconcile failed");
    let listed = api
        .list(&ListParams::default().labels(&format!("{TEST_LABEL}={group}")))
        .await?;
    assert_eq!(listed.items.len(), CARE_SYSTEMS + 1);
    for care_system in &listed.items {
        let status = care_system.status.as_ref().context("status")?;
        assert!(
            status.is_true(condition::READY),
            "{}",
            care_system.name_any()
        );
        assert!(
            status.is_true(condition::SYNCED),
            "{}",
            care_system.name_any()
        );
    }

    // Idle: let in-flight work settle, then watch a window that spans a resync of every one.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let reconciles_before = operator.metrics.reconciles();
    let from = log.len();
    let window = RESYNC + Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let requests = log.since(from);
    let resynced = operator.metrics.reconciles() - reconciles_before;
    let writes: Vec<_> = requests
        .iter()
        .filter(|(method, _, _)| !matches!(*method, http::Method::GET | http::Method::HEAD))
        .collect();
    let watches = requests.iter().filter(|(_, _, watch)| *watch).count();
    let per_minute = requests.len() as f64 * 60.0 / window.as_secs_f64();
    let rss_after = rss_mib();
    println!(
        "idle for {window:?} with {} care systems: {resynced} reconciles (resyncs), {} API \
         requests ({per_minute:.1}/min; {watches} watch (re)starts), {} writes; test process RSS \
         {rss_after:.1} MiB ({:+.1} MiB since before the operator started)",
        CARE_SYSTEMS + 1,
        requests.len(),
        writes.len(),
        rss_after - rss_before,
    );
    assert!(
        resynced > CARE_SYSTEMS as u64,
        "the window spans a resync of every care system ({resynced} reconciles)"
    );
    assert!(writes.is_empty(), "the idle operator wrote: {writes:?}");

    // Clean up (Retain: finalizers come off quickly; namespaces go by garbage collection).
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels(&format!("{TEST_LABEL}={group}")),
    )
    .await?;
    common::eventually("every care system is deleted", || async {
        Ok(api
            .list(&ListParams::default().labels(&format!("{TEST_LABEL}={group}")))
            .await?
            .items
            .is_empty())
    })
    .await?;
    operator.shut_down().await?;
    tracker.abort();
    deployments.abort();
    Ok(())
}
