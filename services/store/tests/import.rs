//! Bulk import and export on real files and a real (local-directory, encrypted) store: NDJSON
//! and Bundles, failures reported by line and element without patient data, re-runs that
//! duplicate nothing, and an interrupted import that resumes from its checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use async_trait::async_trait;
use serde_json::{Value, json};
use shcr_fhir::resource::{ResourceId, ResourceType};
use shcr_store::CareSystemName;
use shcr_store::api::{FhirStore, FhirStoreConfig};
use shcr_store::engine::EngineConfig;
use shcr_store::engine::storage::ObjectStorage;
use shcr_store::envelope::{
    DataKey, EncryptionContext, KeyProvider, KeyProviderError, KeyringConfig, LocalKeyProvider,
    SecretKey, WrappedKey,
};
use shcr_store::import::{ImportError, ImportOptions, export, import_files, open_local};
use shcr_store::tenant::{TenantConfig, TenantDatabase};

const CARE_SYSTEM: &str = "north-east";
const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";

fn patient(id: &str, nhs: &str, family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [{"system": NHS, "value": nhs}],
        "name": [{"family": family, "given": ["Alex"]}],
        "gender": "female",
        "birthDate": "1970-01-01",
    })
}

fn observation(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "27113001"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": "2025-03-01T10:00:00Z",
        "valueQuantity": {"value": 72.5, "unit": "kg"},
    })
}

fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    std::fs::write(path, lines.join("\n") + "\n")?;
    Ok(())
}

async fn open_store(dir: &Path) -> Result<FhirStore> {
    Ok(open_local(dir, &CareSystemName::parse(CARE_SYSTEM)?, true).await?)
}

/// Versions of every resource of `t` in the store (a duplicate or an empty re-write would add
/// one).
async fn versions(store: &FhirStore, t: ResourceType) -> Result<usize> {
    Ok(store.changes(Some(t), None, 1, None).await?.total)
}

fn options(checkpoint: Option<PathBuf>) -> ImportOptions {
    ImportOptions {
        concurrency: 8,
        checkpoint,
        progress: true,
    }
}

#[tokio::test]
async fn ndjson_imports_reports_bad_lines_and_reruns_duplicate_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let file = dir.path().join("records.ndjson");
    let mut lines = vec![
        patient("p1", "9990000018", "Smith").to_string(),
        patient("p2", "9990000026", "Jones").to_string(),
        observation("o1", "p1").to_string(),
        String::new(),
        // Line 5: a wrong NHS number check digit (rejected with 422 by the API too).
        patient("p3", "9990000019", "Taylor").to_string(),
        // Line 6: not JSON at all.
        "{\"resourceType\": \"Patient\", \"id\": \"p4\"".to_string(),
        // Line 7: a type this server does not store.
        json!({"resourceType": "Basic", "id": "b1"}).to_string(),
        // Line 8: no id: gets a stable one.
        json!({"resourceType": "Observation", "status": "final",
               "code": {"text": "pulse"}, "subject": {"reference": "Patient/p2"}})
        .to_string(),
    ];
    write_lines(&file, &lines)?;

    let store = open_store(&data).await?;
    let checkpoint = dir.path().join("checkpoint.json");
    let summary = import_files(
        &store,
        std::slice::from_ref(&file),
        &options(Some(checkpoint.clone())),
    )
    .await?;
    assert_eq!(
        (
            summary.created,
            summary.updated,
            summary.unchanged,
            summary.failed
        ),
        (4, 0, 0, 3),
        "{summary}"
    );
    let failed_lines: Vec<u64> = summary.failures.iter().map(|f| f.line).collect();
    assert_eq!(failed_lines, vec![5, 6, 7], "{summary}");
    let nhs_failure = &summary.failures[0];
    assert!(
        nhs_failure.message.contains("Patient.identifier[0].value"),
        "the element path is named: {nhs_failure}"
    );
    let text = summary.to_string();
    for secret in ["9990000019", "Taylor", "Alex"] {
        assert!(
            !text.contains(secret),
            "patient data in the summary: {text}"
        );
    }
    assert!(text.contains("records.ndjson:5"), "{text}");
    assert!(text.contains("not well-formed JSON"), "{text}");

    let read = store
        .read(ResourceType::Observation, &ResourceId::parse("o1")?)
        .await?;
    assert_eq!(read.version, 1);
    let everything = store.everything(&ResourceId::parse("p2")?).await?;
    assert_eq!(
        everything.len(),
        2,
        "the id-less Observation is indexed in p2's compartment"
    );

    // A re-run with the checkpoint skips the finished file.
    let again = import_files(
        &store,
        std::slice::from_ref(&file),
        &options(Some(checkpoint.clone())),
    )
    .await?;
    assert_eq!(again.files_skipped, 1, "{again}");
    assert_eq!(again.imported() + again.failed, 0, "{again}");

    // A re-run without a checkpoint finds everything already there: unchanged, no new version.
    let rerun = import_files(&store, std::slice::from_ref(&file), &options(None)).await?;
    assert_eq!(
        (rerun.created, rerun.updated, rerun.unchanged, rerun.failed),
        (0, 0, 4, 3),
        "{rerun}"
    );
    assert_eq!(versions(&store, ResourceType::Patient).await?, 2);
    assert_eq!(versions(&store, ResourceType::Observation).await?, 2);

    // A changed resource is updated (a new version); the file's new size restarts it.
    lines[0] = patient("p1", "9990000018", "Smith-Jones").to_string();
    write_lines(&file, &lines)?;
    let changed = import_files(
        &store,
        std::slice::from_ref(&file),
        &options(Some(checkpoint)),
    )
    .await?;
    assert_eq!(
        (changed.created, changed.updated, changed.unchanged),
        (0, 1, 3),
        "{changed}"
    );
    let p1 = store
        .read(ResourceType::Patient, &ResourceId::parse("p1")?)
        .await?;
    assert_eq!(p1.version, 2);
    store.database().close().await?;
    Ok(())
}

#[tokio::test]
async fn bundles_resolve_urn_uuid_references_and_report_entry_lines() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let patient_uuid = "0b9e6a34-4a3b-4b8e-9c1d-2f6e8a7b5c40";
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": format!("urn:uuid:{patient_uuid}"),
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": NHS, "value": "9990000034"}],
                    "name": [{"family": "Brown"}],
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:7c1f4c8e-1d2a-4a57-8f3e-9b0d6e5a4c21",
                "resource": {
                    "resourceType": "Condition",
                    "subject": {"reference": format!("urn:uuid:{patient_uuid}")},
                    "code": {"text": "asthma"},
                },
                "request": {"method": "POST", "url": "Condition"},
            },
            {
                "fullUrl": "urn:uuid:5d2b8f3a-6c4e-4f1b-a9d7-3e8c0b1a2f65",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "weight"},
                    "subject": {"reference": format!("urn:uuid:{patient_uuid}")},
                    "effectiveDateTime": "not a date",
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    });
    // Pretty-printed, as FHIR tools write Bundles: the bad entry's line is reported.
    let text = serde_json::to_string_pretty(&bundle)?;
    let bad_entry_line = text
        .lines()
        .position(|l| l.contains("5d2b8f3a-6c4e-4f1b-a9d7-3e8c0b1a2f65"))
        .context("fullUrl line")? as u64; // 0-based index of the fullUrl line = 1-based line of `{`
    let file = dir.path().join("bundle.json");
    std::fs::write(&file, &text)?;

    let store = open_store(&data).await?;
    let summary = import_files(&store, std::slice::from_ref(&file), &options(None)).await?;
    assert_eq!((summary.created, summary.failed), (2, 1), "{summary}");
    let failure = &summary.failures[0];
    assert_eq!(failure.entry, Some(2), "{failure}");
    assert_eq!(failure.line, bad_entry_line, "{failure}");
    assert!(
        failure.message.contains("Observation.effectiveDateTime"),
        "{failure}"
    );

    let patient_id = ResourceId::parse(patient_uuid)?;
    store.read(ResourceType::Patient, &patient_id).await?;
    let condition = store
        .read(
            ResourceType::Condition,
            &ResourceId::parse("7c1f4c8e-1d2a-4a57-8f3e-9b0d6e5a4c21")?,
        )
        .await?;
    let condition: Value = serde_json::from_slice(condition.body.as_deref().context("body")?)?;
    assert_eq!(
        condition["subject"]["reference"],
        format!("Patient/{patient_uuid}")
    );
    assert_eq!(store.everything(&patient_id).await?.len(), 2);

    // NDJSON and Bundle together, again: nothing new.
    let ndjson = dir.path().join("more.ndjson");
    write_lines(&ndjson, &[observation("o9", patient_uuid).to_string()])?;
    let rerun = import_files(&store, &[file, ndjson], &options(None)).await?;
    assert_eq!(
        (rerun.created, rerun.unchanged, rerun.failed),
        (1, 2, 1),
        "{rerun}"
    );
    assert_eq!(versions(&store, ResourceType::Patient).await?, 1);
    assert_eq!(versions(&store, ResourceType::Condition).await?, 1);

    // Export writes every live resource once; importing it elsewhere gives the same records.
    let mut out = Vec::new();
    let exported = export(&store, ResourceType::ALL, &mut out, Path::new("memory")).await?;
    assert_eq!(exported.total(), 3, "{exported}");
    store.database().close().await?;
    let dump = dir.path().join("dump.ndjson");
    std::fs::write(&dump, &out)?;
    let other = open_local(
        &dir.path().join("other"),
        &CareSystemName::parse("south-west")?,
        true,
    )
    .await?;
    let copied = import_files(&other, &[dump], &options(None)).await?;
    assert_eq!((copied.created, copied.failed), (3, 0), "{copied}");
    assert_eq!(other.everything(&patient_id).await?.len(), 3);
    other.database().close().await?;
    Ok(())
}

#[tokio::test]
async fn an_unknown_care_system_is_refused_with_the_ones_found() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open_store(dir.path()).await?;
    store.database().close().await?;
    let err = open_local(dir.path(), &CareSystemName::parse("nort-east")?, false)
        .await
        .err()
        .context("a missing care system is refused")?;
    let message = err.to_string();
    ensure!(
        matches!(err, ImportError::NoSuchCareSystem { .. }),
        "{message}"
    );
    assert!(message.contains("found: north-east"), "{message}");
    assert!(message.contains("--create"), "{message}");
    Ok(())
}

/// Fault injection: the local key provider, refusing like a disabled KMS key once its budget
/// of calls is spent.
#[derive(Debug)]
struct BudgetedKeys {
    inner: LocalKeyProvider,
    budget: AtomicI64,
}

impl BudgetedKeys {
    fn spend(&self, context: &EncryptionContext) -> Result<(), KeyProviderError> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) > 0 {
            Ok(())
        } else {
            Err(KeyProviderError::KeyUnavailable {
                context: context.clone(),
                reason: "disabled by the test".to_string(),
            })
        }
    }
}

#[async_trait]
impl KeyProvider for BudgetedKeys {
    async fn generate_data_key(
        &self,
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyProviderError> {
        self.spend(context)?;
        self.inner.generate_data_key(context).await
    }

    async fn decrypt_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &EncryptionContext,
    ) -> Result<SecretKey, KeyProviderError> {
        self.spend(context)?;
        self.inner.decrypt_data_key(wrapped, context).await
    }
}

async fn open_budgeted(dir: &Path, keys: Arc<BudgetedKeys>) -> Result<FhirStore> {
    let db = TenantDatabase::open(TenantConfig {
        care_system: CareSystemName::parse(CARE_SYSTEM)?,
        storage: ObjectStorage::LocalDir(dir.join("objects")),
        key_provider: keys,
        // Every operation asks the provider again, so the budget is spent per write.
        keyring: KeyringConfig {
            key_ttl: Duration::ZERO,
            ..KeyringConfig::default()
        },
        engine: EngineConfig::default(),
    })
    .await?;
    Ok(FhirStore::new(db, FhirStoreConfig::default()))
}

#[tokio::test]
async fn a_store_failure_stops_the_import_and_a_rerun_resumes_from_the_checkpoint() -> Result<()> {
    const LINES: usize = 1200;
    let dir = tempfile::tempdir()?;
    let keys_dir = dir.path().join("keys");
    let file = dir.path().join("patients.ndjson");
    let checkpoint = dir.path().join("checkpoint.json");
    let lines: Vec<String> = (0..LINES)
        .map(|i| patient(&format!("p{i}"), "9990000042", "Evans").to_string())
        .collect();
    write_lines(&file, &lines)?;

    // Measure what 600 writes cost in key-provider calls, on a scratch store.
    let probe_keys = Arc::new(BudgetedKeys {
        inner: LocalKeyProvider::open(dir.path().join("probe-keys")).await?,
        budget: AtomicI64::new(i64::MAX),
    });
    let probe = open_budgeted(&dir.path().join("probe"), probe_keys.clone()).await?;
    let probe_file = dir.path().join("probe.ndjson");
    write_lines(&probe_file, &lines[..600])?;
    let serial = ImportOptions {
        concurrency: 1,
        checkpoint: None,
        progress: false,
    };
    import_files(&probe, &[probe_file], &serial).await?;
    let per_line = (i64::MAX - probe_keys.budget.load(Ordering::SeqCst)) as f64 / 600.0;
    probe.database().close().await?;

    // The key "is disabled" around line 768, in the second batch of 512 lines.
    let keys = Arc::new(BudgetedKeys {
        inner: LocalKeyProvider::open(&keys_dir).await?,
        budget: AtomicI64::new((per_line * 768.0) as i64),
    });
    let store = open_budgeted(dir.path(), keys.clone()).await?;
    let with_checkpoint = ImportOptions {
        checkpoint: Some(checkpoint.clone()),
        ..serial
    };
    let err = import_files(&store, std::slice::from_ref(&file), &with_checkpoint)
        .await
        .err()
        .context("the import stops when the store fails")?;
    let message = err.to_string();
    ensure!(matches!(err, ImportError::StoreFailed { .. }), "{message}");
    assert!(message.contains("patients.ndjson:"), "{message}");
    assert!(message.contains("run the same command again"), "{message}");
    let saved: Value = serde_json::from_slice(&std::fs::read(&checkpoint)?)?;
    let progress = saved["files"]
        .as_object()
        .and_then(|files| files.values().next())
        .context("the file's progress")?;
    assert_eq!(progress["lines"], 512, "only whole, durable batches count");
    assert_eq!(progress["complete"], false);
    drop(store);

    // The key is back; a new process resumes after line 512.
    keys.budget.store(i64::MAX, Ordering::SeqCst);
    let store = open_budgeted(dir.path(), keys).await?;
    let resumed = import_files(&store, &[file], &with_checkpoint).await?;
    assert_eq!(resumed.lines_skipped, 512, "{resumed}");
    assert_eq!(
        resumed.created + resumed.unchanged,
        (LINES - 512) as u64,
        "{resumed}"
    );
    assert!(
        resumed.unchanged > 0,
        "part of batch 2 was written before the failure"
    );
    assert_eq!(resumed.failed, 0, "{resumed}");
    assert_eq!(
        versions(&store, ResourceType::Patient).await?,
        LINES,
        "every patient exactly once"
    );
    store.database().close().await?;
    Ok(())
}
