//! Gateway overhead: read-by-id through the gateway versus straight to the store, same run.
//!
//! `cargo run --release -p shcr-gateway --example gateway_bench [-- SECONDS CONNECTIONS]`
//!
//! One encrypted store (local dir, warmed cache) serves `Patient/{id}`; the gateway in front of
//! it verifies a dev-issuer token, authorises, signs the assertion and proxies. Both run in this
//! process on loopback together with the load generator, so:
//! - latency is measured with one request at a time (p50/p99; the difference is the gateway's
//!   added latency);
//! - throughput is measured with CONNECTIONS concurrent keep-alive connections; the machine is
//!   shared by client, gateway and store, so the ratio matters more than the absolute figures;
//! - the gateway's CPU cost per request is measured two ways: the difference in process CPU time
//!   per request between the two paths (from /proc/self/stat; the direct runs before and after
//!   the gateway's are pooled, as the store slows down while its audit log grows, yet this still
//!   charges the gateway with any store-side difference), and — the fair figure — the CPU time of the gateway's own threads per proxied
//!   request: the gateway runs on a runtime of its own (threads named `GATEWAY_THREAD`, read
//!   from /proc/self/task/*/stat), so client and store work are not counted against it. Either
//!   gives requests per second per core.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use shcr_gateway::access::AccessControl;
use shcr_gateway::auth::{DevIssuer, TokenRequest};
use shcr_gateway::config::SmartConfig;
use shcr_gateway::metrics::GatewayMetrics;
use shcr_gateway::proxy::{Proxy, ProxySettings};
use shcr_gateway::routing::{RouteSpec, TenantRouter};
use shcr_identity::{ASSERTION_HEADER, AssertionSigner, Identity, RequestBinding, Scopes};
use shcr_runtime::metrics::MetricsRegistry;
use shcr_store::CareSystemName;
use shcr_store::api::{FhirStore, FhirStoreConfig};
use shcr_store::engine::EngineConfig;
use shcr_store::engine::storage::ObjectStorage;
use shcr_store::envelope::{KeyProvider, KeyringConfig, LocalKeyProvider};
use shcr_store::tenant::{TenantConfig, TenantDatabase};

const CARE_SYSTEM: &str = "bench";
/// Name of the gateway runtime's threads, so their CPU time can be told apart.
const GATEWAY_THREAD: &str = "shcr-gw-bench";
/// Worker threads of the gateway runtime.
const GATEWAY_WORKERS: usize = 1;
const PATIENTS: usize = 100;

type HttpClient = Client<HttpConnector, Empty<bytes::Bytes>>;

struct Target {
    name: &'static str,
    base: String,
    header: (&'static str, HeaderValue),
    /// Straight to the store: each request needs an assertion of its own (bound to it, used
    /// once), signed here as the gateway would.
    asserting: Option<Arc<(AssertionSigner, Identity)>>,
}

#[derive(Debug)]
struct Figures {
    requests: usize,
    seconds: f64,
    cpu_seconds: f64,
    gateway_cpu_seconds: f64,
    p50_us: f64,
    p99_us: f64,
}

impl Figures {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn cpu_us_per_request(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.requests as f64
    }
    fn gateway_cpu_us_per_request(&self) -> f64 {
        self.gateway_cpu_seconds * 1e6 / self.requests as f64
    }
}

/// utime + stime in seconds from the text of a `/proc/.../stat` file.
fn stat_cpu_seconds(stat: &str) -> Result<f64> {
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').context("/proc stat has a command")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    // USER_HZ is 100 on Linux.
    Ok((utime + stime) / 100.0)
}

/// CPU time of the threads of this process named [`GATEWAY_THREAD`] (the gateway's runtime).
fn gateway_cpu_seconds() -> Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue; // the thread has gone
        };
        if comm.trim_end() != GATEWAY_THREAD {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
            total += stat_cpu_seconds(&stat)?;
        }
    }
    Ok(total)
}

fn cpu_seconds() -> Result<f64> {
    stat_cpu_seconds(&std::fs::read_to_string("/proc/self/stat")?)
}

/// What signing one assertion costs, and how much of it is jsonwebtoken re-parsing the PKCS#8
/// key (deriving the public key: a second base-point multiplication) on every call.
fn signing_cost(signer: &AssertionSigner, identity: &Identity) -> Result<()> {
    const N: u32 = 2_000;
    let der = pem::parse(signer.to_pkcs8_pem())?.into_contents();
    let started = Instant::now();
    for _ in 0..N {
        signer.sign(
            identity,
            &RequestBinding::new("GET", "/bench/fhir/Patient/p1", b""),
            Duration::from_secs(60),
        )?;
    }
    let sign_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(N);
    let started = Instant::now();
    for _ in 0..N {
        aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|e| anyhow::anyhow!("the key does not parse: {e}"))?;
    }
    let parse_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(N);
    println!(
        "\nassertion signing: {sign_us:.1} µs per assertion, of which ≈ {parse_us:.1} µs re-parsing the key"
    );
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index])
}

async fn one(client: &HttpClient, target: &Target, id: usize) -> Result<()> {
    let path = format!("/{CARE_SYSTEM}/fhir/Patient/p{id}");
    let header = match &target.asserting {
        Some(asserting) => {
            let (signer, identity) = &**asserting;
            let binding = RequestBinding::new("GET", &path, b"");
            let token = signer.sign(identity, &binding, Duration::from_secs(60))?;
            (ASSERTION_HEADER, HeaderValue::from_str(&token)?)
        }
        None => target.header.clone(),
    };
    let request = Request::get(format!("{}{path}", target.base))
        .header(header.0, header.1)
        .body(Empty::new())?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status == 200,
        "{} answered {status}: {}",
        target.name,
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

async fn run(
    client: &HttpClient,
    target: &Target,
    connections: usize,
    seconds: f64,
) -> Result<Figures> {
    // Warm up the pool and the caches.
    for id in 0..PATIENTS {
        one(client, target, id).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_start = cpu_seconds()?;
    let gateway_cpu_start = gateway_cpu_seconds()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let client = client.clone();
        let target = Target {
            name: target.name,
            base: target.base.clone(),
            header: target.header.clone(),
            asserting: target.asserting.clone(),
        };
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut id = c;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                one(&client, &target, id % PATIENTS).await?;
                latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                id += 1;
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu_start;
    let gateway_cpu = gateway_cpu_seconds()? - gateway_cpu_start;
    latencies.sort_unstable();
    Ok(Figures {
        requests: latencies.len(),
        seconds: elapsed,
        cpu_seconds: cpu,
        gateway_cpu_seconds: gateway_cpu,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5.0);
    let connections: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);

    let dir = tempfile::tempdir()?;
    let name = CareSystemName::parse(CARE_SYSTEM)?;
    let provider: Arc<dyn KeyProvider> =
        Arc::new(LocalKeyProvider::open(dir.path().join("keys")).await?);
    let database = TenantDatabase::open(TenantConfig {
        care_system: name,
        storage: ObjectStorage::LocalDir(dir.path().join("objects")),
        key_provider: provider,
        keyring: KeyringConfig::default(),
        engine: EngineConfig::default(),
    })
    .await?;
    let store = Arc::new(FhirStore::new(database, FhirStoreConfig::default()));
    for id in 0..PATIENTS {
        let body = serde_json::json!({
            "resourceType": "Patient", "id": format!("p{id}"),
            "name": [{"family": "Bench", "given": [format!("P{id}")]}],
            "birthDate": "1970-01-01"
        });
        store
            .update(
                shcr_fhir::resource::ResourceType::Patient,
                &shcr_fhir::resource::ResourceId::parse(&format!("p{id}"))?,
                &serde_json::to_vec(&body)?,
                None,
            )
            .await?;
    }
    let signer = AssertionSigner::generate()?;
    let store_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let store_addr = store_listener.local_addr()?;
    let store_app = shcr_store::api::router(store.clone(), signer.verifier());
    tokio::spawn(async move { axum::serve(store_listener, store_app).await });

    let issuer = DevIssuer::load_or_create(dir.path())?;
    let token = issuer.issue(&TokenRequest::new(CARE_SYSTEM, "RTD", "R8000"))?;
    // Straight to the store: the assertions the gateway would make, one per request.
    let assertion_identity = Identity {
        issuer: shcr_gateway::auth::DEV_ISSUER.into(),
        subject: "dev-user".into(),
        organisation: "RTD".into(),
        role: "R8000".into(),
        scopes: Scopes::parse("user/*.cruds")?,
        patient: None,
        care_system: CARE_SYSTEM.into(),
        break_glass_reason: None,
        request_id: "bench".into(),
        origin: None,
    };
    let signer_for_costs = AssertionSigner::from_pkcs8_pem(&signer.to_pkcs8_pem())?;
    let direct_signer = AssertionSigner::from_pkcs8_pem(&signer.to_pkcs8_pem())?;

    let router = TenantRouter::new(shcr_gateway::limits::LimitsConfig {
        requests_per_second: 0,
        max_concurrent_requests: 100_000,
        ..Default::default()
    });
    router.set_static([RouteSpec {
        care_system: CARE_SYSTEM.into(),
        display_name: "Bench".into(),
        endpoint: Some(format!("http://{store_addr}")),
        members: ["RTD".to_owned()].into_iter().collect(),
        ready: true,
    }]);
    let registry = MetricsRegistry::new();
    let access = AccessControl::new(&[issuer.issuer_config()], SmartConfig::default())?;
    let proxy = Arc::new(Proxy::new(
        router,
        access,
        signer,
        GatewayMetrics::register(&registry),
        ProxySettings::default(),
    ));
    let gateway_app = shcr_gateway::server::app(proxy, axum::Router::new());
    // The gateway on a runtime of its own, so its threads' CPU time is its alone (its pooled
    // client's connection tasks are spawned there too).
    let gateway_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(GATEWAY_WORKERS)
        .thread_name(GATEWAY_THREAD)
        .enable_all()
        .build()?;
    let gateway_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    gateway_listener.set_nonblocking(true)?;
    let gateway_addr = gateway_listener.local_addr()?;
    gateway_runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(gateway_listener)?;
        axum::serve(listener, gateway_app).await
    });

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    let direct = Target {
        name: "store",
        base: format!("http://{store_addr}"),
        header: (
            ASSERTION_HEADER,
            HeaderValue::from_static("signed-per-request"),
        ),
        asserting: Some(Arc::new((direct_signer, assertion_identity.clone()))),
    };
    let through = Target {
        name: "gateway",
        base: format!("http://{gateway_addr}"),
        header: (
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        ),
        asserting: None,
    };

    println!(
        "read-by-id of {PATIENTS} patients, {} cores; {seconds}s per run",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    for (label, conns) in [
        ("sequential (latency)", 1),
        ("concurrent (throughput)", connections),
    ] {
        // Direct runs on both sides of the gateway run: the store slows down as its audit log
        // grows (memtable flushes, compaction), which would otherwise all land on the gateway.
        let d1 = run(&client, &direct, conns, seconds).await?;
        let g = run(&client, &through, conns, seconds).await?;
        let d2 = run(&client, &direct, conns, seconds).await?;
        let d = Figures {
            requests: d1.requests + d2.requests,
            seconds: d1.seconds + d2.seconds,
            cpu_seconds: d1.cpu_seconds + d2.cpu_seconds,
            gateway_cpu_seconds: d1.gateway_cpu_seconds + d2.gateway_cpu_seconds,
            p50_us: (d1.p50_us + d2.p50_us) / 2.0,
            p99_us: (d1.p99_us + d2.p99_us) / 2.0,
        };
        println!("\n{label}, {conns} connection(s):");
        for (name, f) in [
            ("direct (before) ", &d1),
            ("through gateway ", &g),
            ("direct (after)  ", &d2),
        ] {
            println!(
                "  {name} {:>9.0} req/s  p50 {:>7.1} µs  p99 {:>7.1} µs  cpu {:>6.1} µs/req",
                f.rps(),
                f.p50_us,
                f.p99_us,
                f.cpu_us_per_request()
            );
        }
        let added_cpu = g.cpu_us_per_request() - d.cpu_us_per_request();
        let own_cpu = g.gateway_cpu_us_per_request();
        let per_core = |us: f64| if us > 0.0 { 1e6 / us } else { f64::INFINITY };
        println!(
            "  ratio gateway/direct: {:.2} of the throughput; p50 +{:.1} µs, p99 +{:.1} µs",
            g.rps() / d.rps(),
            g.p50_us - d.p50_us,
            g.p99_us - d.p99_us,
        );
        println!(
            "  gateway cpu: own threads {own_cpu:.1} µs/req ⇒ ≈ {:.0} req/s per core; process difference {added_cpu:.1} µs/req ⇒ ≈ {:.0} req/s per core",
            per_core(own_cpu),
            per_core(added_cpu),
        );
    }
    signing_cost(&signer_for_costs, &assertion_identity)?;
    store.database().close().await?;
    gateway_runtime.shutdown_background();
    Ok(())
}
