//! Record store benchmark: the FHIR operations of one care system on the test environment's S3
//! server (moto) with KMS (local-kms), with envelope encryption on and off, same run.
//!
//! ```sh
//! CARGO_TARGET_DIR=$HOME/.cache/shcr/target/bench-rust-1.95.0 \
//!   cargo run --release -p shcr-store --example store_bench -- --patients 40
//! ```
//!
//! A synthetic data generator makes realistic UK patients (names, postcodes, test-range NHS
//! numbers 999 000 0000 upwards, valid by Modulus 11, a GP practice) each with ~100 resources of
//! mixed types (observations, conditions, encounters, medication requests, procedures,
//! immunisations, allergies) referencing the patient. For each mode it measures, through
//! [`FhirStore`] (validation, indexing, compartments; no HTTP, no auth, no audit):
//! - ingest: each patient's 100 resources written as one transaction of 100 updates
//!   (update-as-create, [`FhirStore::update_transaction`]: what a `transaction` Bundle of 100
//!   PUT entries commits, without the HTTP layer), `--in-flight` transactions at a time;
//! - bulk import: the same kind of data as NDJSON through `shcr import`'s code path;
//! - after closing and reopening the database (reads then come from S3 through the cache):
//!   read-by-id and NHS-number search latency p50/p99 at `--concurrency`, first (cold) and
//!   second (cached) pass; `Patient/$everything` latency one at a time; export throughput;
//! - and the encrypted/clear ratio of each figure.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};
use shcr_fhir::resource::{ResourceId, ResourceType};
use shcr_fhir::search::SearchQuery;
use shcr_store::CareSystemName;
use shcr_store::api::{FhirStore, FhirStoreConfig};
use shcr_store::engine::EngineConfig;
use shcr_store::engine::storage::{ObjectStorage, StaticCredentials};
use shcr_store::envelope::{KeyProvider, KeyringConfig, KmsKeyProvider};
use shcr_store::import::{ImportOptions, export, import_files};
use shcr_store::tenant::{TenantConfig, TenantDatabase};

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";

#[derive(Debug, Parser)]
struct Args {
    /// Patients ingested through concurrent writes (each with ~100 resources)
    #[arg(long, default_value_t = 40)]
    patients: usize,
    /// Patients loaded through bulk import
    #[arg(long, default_value_t = 20)]
    import_patients: usize,
    /// Transactions (one patient's 100 resources each) in flight during ingest
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Concurrent requests for reads and searches
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Reads by id per pass
    #[arg(long, default_value_t = 4000)]
    reads: usize,
    /// NHS-number searches per pass
    #[arg(long, default_value_t = 1000)]
    searches: usize,
    /// Run only one mode (`encrypted` or `clear`), for profiling one of them alone; the
    /// table then shows the other mode's figures as zero
    #[arg(long)]
    only: Option<String>,
    /// `$everything` calls
    #[arg(long, default_value_t = 40)]
    everything: usize,
}

/// A small deterministic generator (SplitMix64): the same data every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const FAMILY: &[&str] = &[
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel",
    "Robinson", "Wright", "Thompson", "Evans", "Walker", "White", "Roberts", "Green", "Hall",
    "Thomas", "Clarke", "Jackson", "Wood", "Harris", "Edwards", "Turner", "Martin", "Cooper",
    "Hill", "Ward", "Hughes", "Moore", "Clark", "King", "Harrison", "Lewis", "Baker", "Lee",
    "Allen", "Morris", "Khan",
];
const GIVEN_FEMALE: &[&str] = &[
    "Olivia",
    "Amelia",
    "Isla",
    "Ava",
    "Mia",
    "Grace",
    "Sophia",
    "Lily",
    "Freya",
    "Emily",
    "Margaret",
    "Susan",
    "Patricia",
    "Elizabeth",
    "Fatima",
    "Aisha",
];
const GIVEN_MALE: &[&str] = &[
    "Oliver", "George", "Harry", "Noah", "Jack", "Leo", "Arthur", "Muhammad", "Oscar", "Charlie",
    "David", "John", "Michael", "Peter", "Robert", "Ian",
];
const OUTWARD: &[&str] = &[
    "NE1", "NE2", "NE6", "NE29", "SR1", "SR4", "DH1", "DH9", "TS1", "TS18", "CA1", "CA28", "DL1",
    "NE63", "NE46", "SR8",
];
const INWARD_LETTERS: &[u8] = b"ABDEFGHJLNPQRSTUWXYZ";
const STREETS: &[&str] = &[
    "High Street",
    "Station Road",
    "Church Lane",
    "Front Street",
    "Victoria Terrace",
    "Westgate Road",
    "Park View",
    "Durham Road",
    "Coast Road",
    "Osborne Road",
];
const GP_PRACTICES: &[&str] = &["A81001", "A81002", "A84005", "A85001", "A87002", "A88006"];
const OBSERVATIONS: &[(&str, &str, &str)] = &[
    ("27113001", "Body weight", "kg"),
    ("50373000", "Body height", "cm"),
    ("72514003", "Heart rate", "/min"),
    ("271649006", "Systolic blood pressure", "mm[Hg]"),
    ("271650006", "Diastolic blood pressure", "mm[Hg]"),
    ("1107381000000101", "HbA1c", "mmol/mol"),
    ("86290005", "Respiratory rate", "/min"),
];
const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Type 2 diabetes mellitus"),
    ("38341003", "Hypertension"),
    ("195967001", "Asthma"),
    ("13645005", "COPD"),
    ("35489007", "Depressive disorder"),
    ("49436004", "Atrial fibrillation"),
];
const MEDICATIONS: &[(&str, &str)] = &[
    ("325072002", "Metformin 500mg tablets"),
    ("318135002", "Ramipril 5mg capsules"),
    ("320000009", "Atorvastatin 20mg tablets"),
    ("35936511000001108", "Salbutamol 100mcg inhaler"),
];
const PROCEDURES: &[(&str, &str)] = &[
    ("80146002", "Appendicectomy"),
    ("73761001", "Colonoscopy"),
    ("429064006", "Total knee replacement"),
];
const VACCINES: &[(&str, &str)] = &[
    ("39114911000001105", "Influenza vaccine"),
    ("39115611000001103", "COVID-19 vaccine"),
    ("3439211000001108", "Pneumococcal vaccine"),
];
const ALLERGENS: &[(&str, &str)] = &[("91936005", "Penicillin"), ("227493005", "Cashew nut")];

/// A test-range NHS number (999 000 0000 upwards) valid by Modulus 11, distinct per `i`:
/// `999` and `2i` (or `2i + 1` when `2i` has no valid check digit), then the check digit.
fn nhs_number(i: usize) -> String {
    (2 * i..)
        .find_map(|n| {
            let body = format!("999{:06}", n % 1_000_000);
            let sum: u32 = body
                .chars()
                .filter_map(|c| c.to_digit(10))
                .zip((2..=10).rev())
                .map(|(d, w)| d * w)
                .sum();
            match 11 - sum % 11 {
                11 => Some(format!("{body}0")),
                10 => None,
                c => Some(format!("{body}{c}")),
            }
        })
        .unwrap_or_default()
}

fn date(rng: &mut Rng, from_year: usize, years: usize) -> String {
    format!(
        "{}-{:02}-{:02}",
        from_year + rng.below(years),
        1 + rng.below(12),
        1 + rng.below(28)
    )
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}], "text": display})
}

const SNOMED: &str = "http://snomed.info/sct";

/// One patient and their ~100 resources, with ids derived from `tag` and `i`.
fn patient_records(tag: &str, i: usize) -> (String, String, Vec<Value>) {
    let mut rng = Rng(0x5EED ^ (i as u64).wrapping_mul(0x9E37_79B9));
    let pid = format!("{tag}-pat-{i}");
    let nhs = nhs_number(i);
    let female = rng.below(2) == 0;
    let given = rng.pick(if female { GIVEN_FEMALE } else { GIVEN_MALE });
    let postcode = format!(
        "{} {}{}{}",
        rng.pick(OUTWARD),
        rng.below(10),
        INWARD_LETTERS[rng.below(INWARD_LETTERS.len())] as char,
        INWARD_LETTERS[rng.below(INWARD_LETTERS.len())] as char
    );
    let subject = json!({"reference": format!("Patient/{pid}")});
    let prefix = if female { "Mrs" } else { "Mr" };
    let mut out = vec![json!({
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": NHS, "value": nhs}],
        "name": [{"use": "official", "family": rng.pick(FAMILY), "given": [given], "prefix": [prefix]}],
        "gender": if female { "female" } else { "male" },
        "birthDate": date(&mut rng, 1930, 90),
        "address": [{"use": "home", "line": [format!("{} {}", 1 + rng.below(200), rng.pick(STREETS))], "city": "Newcastle upon Tyne", "postalCode": postcode, "country": "GB"}],
        "telecom": [{"system": "phone", "value": format!("0191 496 {:04}", rng.below(10_000)), "use": "home"}],
        "generalPractitioner": [{"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": rng.pick(GP_PRACTICES)}}],
    })];
    let mut push = |kind: &str, k: usize, mut body: Value| {
        body["id"] = json!(format!("{tag}-{kind}-{i}-{k}"));
        out.push(body);
    };
    for k in 0..60 {
        let (code, display, unit) = OBSERVATIONS[rng.below(OBSERVATIONS.len())];
        push(
            "obs",
            k,
            json!({
                "resourceType": "Observation", "status": "final",
                "category": [coding("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs", "Vital Signs")],
                "code": coding(SNOMED, code, display), "subject": subject,
                "effectiveDateTime": format!("{}T{:02}:{:02}:00Z", date(&mut rng, 2015, 10), rng.below(24), rng.below(60)),
                "valueQuantity": {"value": 40 + rng.below(100), "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            }),
        );
    }
    for k in 0..10 {
        let (code, display) = CONDITIONS[rng.below(CONDITIONS.len())];
        push(
            "cond",
            k,
            json!({
                "resourceType": "Condition",
                "clinicalStatus": coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
                "category": [coding("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item", "Problem List Item")],
                "code": coding(SNOMED, code, display), "subject": subject,
                "onsetDateTime": date(&mut rng, 1990, 35),
            }),
        );
    }
    for k in 0..10 {
        push(
            "enc",
            k,
            json!({
                "resourceType": "Encounter", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
                "type": [coding(SNOMED, "185347001", "Encounter for problem")], "subject": subject,
                "period": {"start": format!("{}T09:00:00Z", date(&mut rng, 2015, 10))},
            }),
        );
    }
    for k in 0..8 {
        let (code, display) = MEDICATIONS[rng.below(MEDICATIONS.len())];
        push(
            "med",
            k,
            json!({
                "resourceType": "MedicationRequest", "status": "active", "intent": "order",
                "medicationCodeableConcept": coding("https://dmd.nhs.uk", code, display), "subject": subject,
                "authoredOn": date(&mut rng, 2018, 7),
                "dosageInstruction": [{"text": "One tablet twice a day"}],
            }),
        );
    }
    for k in 0..5 {
        let (code, display) = PROCEDURES[rng.below(PROCEDURES.len())];
        push(
            "proc",
            k,
            json!({
                "resourceType": "Procedure", "status": "completed",
                "code": coding(SNOMED, code, display), "subject": subject,
                "performedDateTime": date(&mut rng, 2000, 25),
            }),
        );
    }
    for k in 0..4 {
        let (code, display) = VACCINES[rng.below(VACCINES.len())];
        push(
            "imm",
            k,
            json!({
                "resourceType": "Immunization", "status": "completed",
                "vaccineCode": coding(SNOMED, code, display), "patient": subject,
                "occurrenceDateTime": date(&mut rng, 2015, 10),
            }),
        );
    }
    for k in 0..2 {
        let (code, display) = ALLERGENS[rng.below(ALLERGENS.len())];
        push(
            "alg",
            k,
            json!({
                "resourceType": "AllergyIntolerance",
                "clinicalStatus": coding("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active", "Active"),
                "code": coding(SNOMED, code, display), "patient": subject,
                "recordedDate": date(&mut rng, 2010, 15),
            }),
        );
    }
    (pid, nhs, out)
}

struct Latencies(Vec<Duration>);

impl Latencies {
    fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i].as_secs_f64() * 1000.0
    }
}

/// Runs `n` operations `op(k)` with `concurrency` in flight; latencies (sorted) and ops/s.
async fn measure<F, Fut>(n: usize, concurrency: usize, op: F) -> Result<(Latencies, f64)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let started = Instant::now();
    let mut results = futures::stream::iter(0..n)
        .map(|k| {
            let fut = op(k);
            async move {
                let t = Instant::now();
                fut.await.map(|()| t.elapsed())
            }
        })
        .buffer_unordered(concurrency);
    let mut lat = Vec::with_capacity(n);
    while let Some(r) = results.next().await {
        lat.push(r?);
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    lat.sort();
    Ok((Latencies(lat), rate))
}

#[derive(Default, Clone, Copy)]
struct Figures {
    ingest_per_s: f64,
    import_per_s: f64,
    read_cold: (f64, f64, f64),
    read_warm: (f64, f64, f64),
    search_cold: (f64, f64, f64),
    search_warm: (f64, f64, f64),
    chained_cold: (f64, f64, f64),
    chained_warm: (f64, f64, f64),
    everything: (f64, f64, f64),
    everything_size: usize,
    export_per_s: f64,
}

async fn open(
    encrypted: bool,
    storage: &ObjectStorage,
    kms: &aws_sdk_kms::Client,
    key: &str,
) -> Result<FhirStore> {
    let provider: Arc<dyn KeyProvider> = Arc::new(KmsKeyProvider::new(kms.clone(), key));
    let config = TenantConfig {
        care_system: CareSystemName::parse("bench")?,
        storage: storage.clone(),
        key_provider: provider,
        keyring: KeyringConfig::default(),
        engine: EngineConfig::default(),
    };
    let db = if encrypted {
        TenantDatabase::open(config).await?
    } else {
        TenantDatabase::open_unencrypted_for_benchmarks(config).await?
    };
    Ok(FhirStore::new(db, FhirStoreConfig::default()))
}

/// Logs a phase boundary with the wall-clock time (seconds since the epoch), to line up with
/// `perf record -k realtime` samples (`perf report --time start,end`).
fn phase(mode: &str, what: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!("[{mode}] {what} at {:.6}", now.as_secs_f64());
}

fn triple(l: &Latencies, rate: f64) -> (f64, f64, f64) {
    (l.pct(0.5), l.pct(0.99), rate)
}

async fn run_mode(encrypted: bool, args: &Args, scratch: &Path) -> Result<Figures> {
    let s3 = shcr_testenv::s3().await?;
    let kms_server = shcr_testenv::kms().await?;
    let kms = kms_server.client().await;
    let s3_client = s3.client().await;
    let bucket = shcr_testenv::unique_name(if encrypted {
        "sbench-enc"
    } else {
        "sbench-raw"
    });
    s3.create_bucket(&s3_client, &bucket).await?;
    let key = kms
        .create_key()
        .send()
        .await?
        .key_metadata()
        .and_then(|m| m.arn().map(str::to_owned))
        .context("key arn")?;
    let creds = shcr_testenv::aws::test_credentials();
    let storage = ObjectStorage::S3 {
        bucket,
        prefix: String::new(),
        region: shcr_testenv::aws::REGION.into(),
        endpoint: Some(s3.endpoint().into()),
        credentials: Some(StaticCredentials {
            access_key_id: creds.access_key_id().into(),
            secret_access_key: creds.secret_access_key().into(),
        }),
    };
    let mode = if encrypted { "encrypted" } else { "clear" };
    let mut f = Figures::default();

    let store = Arc::new(open(encrypted, &storage, &kms, &key).await?);
    // Ingest: one 100-resource batch per patient, `in_flight` patients at a time.
    let mut patients = Vec::new();
    let mut ids = Vec::new();
    let mut batches = Vec::new();
    for i in 0..args.patients {
        let (pid, nhs, records) = patient_records("ing", i);
        patients.push((pid, nhs));
        let mut batch = Vec::new();
        for r in records {
            let t: ResourceType = r["resourceType"].as_str().context("type")?.parse()?;
            let id = ResourceId::parse(r["id"].as_str().context("id")?)?;
            ids.push((t, id.clone()));
            batch.push((t, id, serde_json::to_vec(&r)?));
        }
        batches.push(batch);
    }
    let total: usize = batches.iter().map(Vec::len).sum();
    let started = Instant::now();
    let ingest = store.clone();
    let mut stream = futures::stream::iter(batches)
        .map(|batch| {
            let store = ingest.clone();
            async move {
                let entries: Vec<(ResourceType, ResourceId, &[u8])> = batch
                    .iter()
                    .map(|(t, id, body)| (*t, id.clone(), body.as_slice()))
                    .collect();
                store
                    .update_transaction(&entries)
                    .await
                    .map_err(|(entry, e)| anyhow::anyhow!("transaction entry {entry:?}: {e}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.in_flight);
    while let Some(r) = stream.next().await {
        r?;
    }
    drop(stream);
    drop(ingest);
    f.ingest_per_s = total as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "[{mode}] ingest: {total} resources, {:.0}/s",
        f.ingest_per_s
    );

    // Bulk import of NDJSON.
    let file = scratch.join(format!("import-{mode}.ndjson"));
    let mut text = String::new();
    for i in 0..args.import_patients {
        // Distinct patients (and NHS numbers) from the ingested ones.
        for r in patient_records("imp", 100_000 + i).2 {
            text.push_str(&r.to_string());
            text.push('\n');
        }
    }
    std::fs::write(&file, text)?;
    let summary = import_files(
        &store,
        &[file],
        &ImportOptions {
            concurrency: 64,
            checkpoint: None,
            progress: false,
        },
    )
    .await?;
    anyhow::ensure!(summary.failed == 0, "import failures: {summary}");
    f.import_per_s = summary.imported() as f64 / summary.elapsed.as_secs_f64();
    eprintln!(
        "[{mode}] bulk import: {} resources, {:.0}/s",
        summary.imported(),
        f.import_per_s
    );

    // Reopen: reads now come from the bucket through the block cache.
    store.database().close().await?;
    drop(store);
    let store = Arc::new(open(encrypted, &storage, &kms, &key).await?);

    let read = |seed: u64| {
        let store = store.clone();
        let ids = &ids;
        move |k: usize| {
            let store = store.clone();
            let (t, id) = &ids[(Rng(seed ^ k as u64).next() as usize) % ids.len()];
            let (t, id) = (*t, id.clone());
            async move {
                store.read(t, &id).await?;
                Ok(())
            }
        }
    };
    let (l, r) = measure(args.reads, args.concurrency, read(1)).await?;
    f.read_cold = triple(&l, r);
    phase(mode, "cached reads start");
    let (l, r) = measure(args.reads, args.concurrency, read(1)).await?;
    f.read_warm = triple(&l, r);
    phase(mode, "cached reads end");

    // A search by NHS number for a random patient: `Patient?identifier=…`, or chained,
    // a patient's observations (`Observation?patient.identifier=…`).
    let by_nhs_number =
        |seed: u64, resource_type: ResourceType, param: &'static str, expected: usize| {
            let store = store.clone();
            let patients = &patients;
            move |k: usize| {
                let store = store.clone();
                let (_, nhs) = &patients[(Rng(seed ^ k as u64).next() as usize) % patients.len()];
                let value = format!("{NHS}|{nhs}");
                async move {
                    let q = SearchQuery::parse(resource_type, [(param, value)], false)?;
                    let page = store.search(&q).await?;
                    anyhow::ensure!(
                        page.total == expected,
                        "{param} search found {}",
                        page.total
                    );
                    Ok(())
                }
            }
        };
    let search = |seed: u64| by_nhs_number(seed, ResourceType::Patient, "identifier", 1);
    let (l, r) = measure(args.searches, args.concurrency, search(2)).await?;
    f.search_cold = triple(&l, r);
    let (l0, runs) = store.database().storage_layout();
    eprintln!("[{mode}] database layout: {l0} L0 SSTs, {runs} sorted runs");
    phase(mode, "cached searches start");
    let (l, r) = measure(args.searches, args.concurrency, search(2)).await?;
    f.search_warm = triple(&l, r);
    phase(mode, "cached searches end");

    let chained =
        |seed: u64| by_nhs_number(seed, ResourceType::Observation, "patient.identifier", 60);
    let (l, r) = measure(args.searches, args.concurrency, chained(3)).await?;
    f.chained_cold = triple(&l, r);
    let (l, r) = measure(args.searches, args.concurrency, chained(3)).await?;
    f.chained_warm = triple(&l, r);

    let sizes = std::sync::Mutex::new(0usize);
    let (l, r) = measure(args.everything, 1, |k| {
        let store = store.clone();
        let pid = patients[k % patients.len()].0.clone();
        let sizes = &sizes;
        async move {
            let all = store.everything(&ResourceId::parse(&pid)?).await?;
            if let Ok(mut s) = sizes.lock() {
                *s = all.len();
            }
            Ok(())
        }
    })
    .await?;
    f.everything = triple(&l, r);
    f.everything_size = sizes.into_inner().unwrap_or(0);

    let mut sink = tokio::io::sink();
    let exported = export(&store, ResourceType::ALL, &mut sink, Path::new("sink")).await?;
    f.export_per_s = exported.total() as f64 / exported.elapsed.as_secs_f64();
    store.database().close().await?;
    Ok(f)
}

fn latency_cell(v: (f64, f64, f64)) -> String {
    format!("p50 {:.2} / p99 {:.2} ms, {:.0}/s", v.0, v.1, v.2)
}

/// One table row: the figure with encryption on, off, and on/off throughput (1.00 = free).
fn row(name: &str, enc: String, raw: String, ratio: f64) {
    println!("{name:<30} | {enc:>34} | {raw:>34} | {ratio:>5.2}");
}

fn latency_row(name: &str, enc: (f64, f64, f64), raw: (f64, f64, f64)) {
    row(name, latency_cell(enc), latency_cell(raw), enc.2 / raw.2);
}

fn rate_row(name: &str, enc: f64, raw: f64) {
    row(
        name,
        format!("{enc:.0} resources/s"),
        format!("{raw:.0} resources/s"),
        enc / raw,
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let (run_clear, run_enc) = match args.only.as_deref() {
        None => (true, true),
        Some("clear") => (true, false),
        Some("encrypted") => (false, true),
        Some(other) => anyhow::bail!("--only takes `encrypted` or `clear`, not `{other}`"),
    };
    let raw = if run_clear {
        run_mode(false, &args, scratch.path()).await?
    } else {
        Figures::default()
    };
    let enc = if run_enc {
        run_mode(true, &args, scratch.path()).await?
    } else {
        Figures::default()
    };
    println!(
        "store_bench: {} patients ingested (transactions of 100, {} in flight) + {} imported, \
         ~100 resources each; S3 = moto, KMS = local-kms; reads/searches at concurrency {}, \
         $everything one at a time",
        args.patients, args.in_flight, args.import_patients, args.concurrency
    );
    println!(
        "{:<30} | {:>34} | {:>34} | {:>5}",
        "", "encryption on", "encryption off", "ratio"
    );
    rate_row(
        "ingest (tx bundles of 100)",
        enc.ingest_per_s,
        raw.ingest_per_s,
    );
    rate_row("bulk import (NDJSON)", enc.import_per_s, raw.import_per_s);
    latency_row("read by id (cold)", enc.read_cold, raw.read_cold);
    latency_row("read by id (cached)", enc.read_warm, raw.read_warm);
    latency_row("NHS-number search (cold)", enc.search_cold, raw.search_cold);
    latency_row(
        "NHS-number search (cached)",
        enc.search_warm,
        raw.search_warm,
    );
    latency_row(
        "chained Obs search (cold)",
        enc.chained_cold,
        raw.chained_cold,
    );
    latency_row(
        "chained Obs search (cached)",
        enc.chained_warm,
        raw.chained_warm,
    );
    latency_row(
        &format!("$everything ({} res)", enc.everything_size),
        enc.everything,
        raw.everything,
    );
    rate_row("export", enc.export_per_s, raw.export_per_s);
    println!("(last column: throughput with encryption on / off; 1.00 = crypto costs nothing)");
    Ok(())
}
