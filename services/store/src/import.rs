//! `shcr import` and `shcr export`: bulk loading FHIR data into, and dumping it out of, a care
//! system on the embedded default (the `shcr dev` data dir).
//!
//! Import reads NDJSON files (one resource per line; a line may also hold a Bundle) and JSON
//! documents holding a Bundle (batch, transaction, collection …) or one resource, and writes
//! every resource through [`FhirStore`], so validation, indexing and the patient compartment are
//! exactly those of the FHIR API.
//!
//! Invariants:
//! - a re-run never duplicates: every resource is written by id (update-as-create). A resource
//!   without an id gets a deterministic one — the UUID of its Bundle entry's `urn:uuid:` fullUrl,
//!   else a digest of its content — and `urn:uuid:` references inside a Bundle are rewritten to
//!   `Type/id`. A resource equal to the stored one (ignoring `meta.versionId` and
//!   `meta.lastUpdated`) is left alone (counted unchanged), so no empty versions pile up;
//! - progress is checkpointed (file identity, byte offset, line) after each batch whose writes
//!   are all durable, so an interrupted import resumes where it stopped. A failure of the store
//!   itself (5xx) stops the import before the checkpoint moves past it; a rejected resource (4xx)
//!   is reported and skipped;
//! - failures name the file, line (and Bundle entry) and the element path and rule broken, never
//!   a value from the resource: the summary and the checkpoint hold no patient data;
//! - the data dir is opened as its single writer: stop `shcr dev` on the same dir first (opening
//!   the database fences any earlier writer).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use shcr_fhir::outcome::ToOutcome as _;
use shcr_fhir::resource::{ResourceError, ResourceId, ResourceType};
use tokio::io::{AsyncBufReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

use crate::api::{ApiError, FhirStore, FhirStoreConfig, client_writable};
use crate::care_system::CareSystemName;
use crate::engine::storage::ObjectStorage;
use crate::engine::{Element, EngineConfig, Family, Key};
use crate::envelope::{KeyProvider, KeyringConfig, LocalKeyProvider};
use crate::tenant::{TenantConfig, TenantDatabase};

/// NDJSON lines written per checkpointed batch.
const BATCH_LINES: usize = 512;
/// Failures listed in full in the summary; the rest are counted.
const MAX_LISTED_FAILURES: usize = 100;
/// The checkpoint file's name inside the care system's directory.
pub const CHECKPOINT_FILE: &str = "import-checkpoint.json";

/// Flags of `shcr import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The care system to import into
    #[arg(long, value_name = "NAME")]
    pub care_system: String,
    /// Directory holding every care system's records and keys (as for `shcr dev`)
    #[arg(
        long,
        env = "SHCR_DEV_DATA_DIR",
        value_name = "DIR",
        default_value = "./shcr-data"
    )]
    pub data_dir: PathBuf,
    /// Create the care system in DIR if it does not exist yet
    #[arg(long)]
    pub create: bool,
    /// Checkpoint file [default: DIR/NAME/import-checkpoint.json]
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Ignore the checkpoint and read every file from the start (nothing is duplicated)
    #[arg(long)]
    pub restart: bool,
    /// Resources written concurrently
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub concurrency: usize,
    /// NDJSON files (one resource per line) or JSON files holding a Bundle or a resource
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Flags of `shcr export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The care system to export
    #[arg(long, value_name = "NAME")]
    pub care_system: String,
    /// Directory holding every care system's records and keys (as for `shcr dev`)
    #[arg(
        long,
        env = "SHCR_DEV_DATA_DIR",
        value_name = "DIR",
        default_value = "./shcr-data"
    )]
    pub data_dir: PathBuf,
    /// Resource types to export, comma-separated [default: every type clients write]
    #[arg(long = "type", value_name = "TYPES", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Write NDJSON to FILE instead of standard output
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Why an import or export could not run (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("--care-system {name:?} is not a care-system name: {reason}")]
    CareSystemName { name: String, reason: String },
    #[error(
        "there is no care system {care_system:?} in {data_dir} (found: {found}); start `shcr dev \
         --data-dir {data_dir}` once to create its care systems, or pass --create"
    )]
    NoSuchCareSystem {
        care_system: String,
        data_dir: String,
        found: String,
    },
    #[error("cannot open the key of care system {care_system}: {reason}")]
    Keys { care_system: String, reason: String },
    #[error(
        "cannot open the record store of care system {care_system}: {reason} (is `shcr dev` \
         running on the same data dir? stop it first)"
    )]
    Open { care_system: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the checkpoint {path} is not one this version wrote ({reason}); pass --restart to \
         ignore it"
    )]
    BadCheckpoint { path: PathBuf, reason: String },
    #[error(
        "the record store failed at {location}: {message}; everything before it is imported and \
         checkpointed: fix the cause and run the same command again to resume"
    )]
    StoreFailed { location: String, message: String },
    #[error("--type {0:?} is not a resource type this server stores")]
    UnknownType(String),
    #[error("--concurrency must be at least 1")]
    Concurrency,
    #[error("closing the record store (flushing its writes) failed: {0}")]
    Close(String),
}

/// One resource (or Bundle entry, or line) that was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportFailure {
    pub file: PathBuf,
    /// 1-based line of the NDJSON line, or of the Bundle entry in a JSON document.
    pub line: u64,
    /// 0-based index of the Bundle entry, when the failure is one entry of a Bundle.
    pub entry: Option<usize>,
    /// What is wrong: element paths and rules, never values.
    pub message: String,
}

impl fmt::Display for ImportFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(entry) = self.entry {
            write!(f, " (Bundle.entry[{entry}])")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub failed: u64,
    /// Files skipped whole because the checkpoint says they were imported already.
    pub files_skipped: u64,
    /// Lines skipped because the checkpoint says they were imported already.
    pub lines_skipped: u64,
    /// The first [`MAX_LISTED_FAILURES`] failures.
    pub failures: Vec<ImportFailure>,
    /// Bytes of input read.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl ImportSummary {
    fn record(&mut self, result: Result<Written, ImportFailure>) {
        match result {
            Ok(Written::Created) => self.created += 1,
            Ok(Written::Updated) => self.updated += 1,
            Ok(Written::Unchanged) => self.unchanged += 1,
            Ok(Written::Deleted) => self.deleted += 1,
            Err(failure) => self.fail(failure),
        }
    }

    fn fail(&mut self, failure: ImportFailure) {
        self.failed += 1;
        if self.failures.len() < MAX_LISTED_FAILURES {
            self.failures.push(failure);
        }
    }

    /// Resources written or confirmed present.
    pub fn imported(&self) -> u64 {
        self.created + self.updated + self.unchanged + self.deleted
    }
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.imported() as f64 / secs
        } else {
            0.0
        };
        writeln!(
            f,
            "imported {} resource(s) in {secs:.1}s ({rate:.0}/s): {} created, {} updated, {} \
             unchanged, {} deleted; {} failed",
            self.imported(),
            self.created,
            self.updated,
            self.unchanged,
            self.deleted,
            self.failed
        )?;
        if self.files_skipped > 0 || self.lines_skipped > 0 {
            writeln!(
                f,
                "resumed from the checkpoint: {} file(s) and {} line(s) already imported were \
                 skipped (--restart reads everything again)",
                self.files_skipped, self.lines_skipped
            )?;
        }
        for failure in &self.failures {
            writeln!(f, "  failed: {failure}")?;
        }
        let unlisted = self.failed - self.failures.len() as u64;
        if unlisted > 0 {
            writeln!(f, "  … and {unlisted} more failure(s)")?;
        }
        Ok(())
    }
}

/// How to run an import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Resources written concurrently.
    pub concurrency: usize,
    /// Where progress is checkpointed; `None`: no checkpoint (every file read whole).
    pub checkpoint: Option<PathBuf>,
    /// Show a progress bar on standard error (only drawn when it is a terminal).
    pub progress: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            concurrency: 16,
            checkpoint: None,
            progress: false,
        }
    }
}

/// Opens the care system `name` in `data_dir` (the `shcr dev` layout:
/// `<dir>/<name>/objects/` and `<dir>/<name>/keys/master.key`).
pub async fn open_local(
    data_dir: &Path,
    name: &CareSystemName,
    create: bool,
) -> Result<FhirStore, ImportError> {
    let root = data_dir.join(name.as_str());
    let keys = root.join("keys");
    if !create
        && !keys
            .join(crate::envelope::local_key_provider::MASTER_KEY_FILE_NAME)
            .is_file()
    {
        let mut found: Vec<String> = std::fs::read_dir(data_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().join("keys").is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        return Err(ImportError::NoSuchCareSystem {
            care_system: name.to_string(),
            data_dir: data_dir.display().to_string(),
            found: if found.is_empty() {
                "none".into()
            } else {
                found.join(", ")
            },
        });
    }
    let provider: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::open(keys).await.map_err(
        |e| ImportError::Keys {
            care_system: name.to_string(),
            reason: e.to_string(),
        },
    )?);
    let database = TenantDatabase::open(TenantConfig {
        care_system: name.clone(),
        storage: ObjectStorage::LocalDir(root.join("objects")),
        key_provider: provider,
        keyring: KeyringConfig::default(),
        engine: EngineConfig::default(),
    })
    .await
    .map_err(|e| ImportError::Open {
        care_system: name.to_string(),
        reason: e.to_string(),
    })?;
    Ok(FhirStore::new(database, FhirStoreConfig::default()))
}

fn parse_name(name: &str) -> Result<CareSystemName, ImportError> {
    CareSystemName::parse(name).map_err(|e| ImportError::CareSystemName {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

/// `shcr import`: opens the care system, imports `args.files`, closes (flushes) the store.
pub async fn run_import(args: ImportArgs) -> Result<ImportSummary, ImportError> {
    let name = parse_name(&args.care_system)?;
    if args.concurrency == 0 {
        return Err(ImportError::Concurrency);
    }
    let store = open_local(&args.data_dir, &name, args.create).await?;
    let checkpoint = args
        .checkpoint
        .clone()
        .unwrap_or_else(|| args.data_dir.join(name.as_str()).join(CHECKPOINT_FILE));
    if args.restart {
        match std::fs::remove_file(&checkpoint) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ImportError::Write {
                    path: checkpoint,
                    source,
                });
            }
        }
    }
    let options = ImportOptions {
        concurrency: args.concurrency,
        checkpoint: Some(checkpoint),
        progress: true,
    };
    let imported = import_files(&store, &args.files, &options).await;
    let closed = store.database().close().await;
    let summary = imported?;
    closed.map_err(|e| ImportError::Close(e.to_string()))?;
    Ok(summary)
}

/// What one write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Created,
    Updated,
    Unchanged,
    Deleted,
}

/// One thing to do, prepared from a line or Bundle entry.
#[derive(Debug)]
enum Action {
    Upsert {
        resource_type: ResourceType,
        id: ResourceId,
        json: Map<String, Value>,
    },
    Delete {
        resource_type: ResourceType,
        id: ResourceId,
    },
}

/// An action with where it came from.
#[derive(Debug)]
struct Item {
    line: u64,
    entry: Option<usize>,
    action: Action,
}

/// A prepared unit, or why it could not be prepared.
type Prepared = Result<Item, ImportFailure>;

/// Where one file stands in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileProgress {
    size: u64,
    modified_ms: u128,
    /// Bytes fully imported from the start of the file.
    offset: u64,
    /// Lines fully imported.
    lines: u64,
    complete: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CheckpointDoc {
    version: u32,
    files: BTreeMap<String, FileProgress>,
}

/// The checkpoint file: loaded once, saved atomically (write then rename) after each batch.
struct Checkpoint {
    path: Option<PathBuf>,
    doc: CheckpointDoc,
}

impl Checkpoint {
    fn load(path: Option<&Path>) -> Result<Self, ImportError> {
        let Some(path) = path else {
            return Ok(Self {
                path: None,
                doc: CheckpointDoc::default(),
            });
        };
        let doc = match std::fs::read(path) {
            Ok(bytes) => {
                let doc: CheckpointDoc =
                    serde_json::from_slice(&bytes).map_err(|e| ImportError::BadCheckpoint {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                if doc.version != 1 {
                    return Err(ImportError::BadCheckpoint {
                        path: path.to_owned(),
                        reason: format!("version {}", doc.version),
                    });
                }
                doc
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CheckpointDoc {
                version: 1,
                files: BTreeMap::new(),
            },
            Err(source) => {
                return Err(ImportError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(Self {
            path: Some(path.to_owned()),
            doc,
        })
    }

    /// The recorded progress of `key`, if it still describes the same file.
    fn progress(&self, key: &str, size: u64, modified_ms: u128) -> Option<&FileProgress> {
        self.doc
            .files
            .get(key)
            .filter(|p| p.size == size && p.modified_ms == modified_ms)
    }

    async fn save(&mut self, key: &str, progress: FileProgress) -> Result<(), ImportError> {
        self.doc.files.insert(key.to_owned(), progress);
        let Some(path) = &self.path else {
            return Ok(());
        };
        let write_err = |source| ImportError::Write {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&self.doc)
            .map_err(|e| write_err(std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(write_err)?;
        }
        tokio::fs::write(&tmp, bytes).await.map_err(write_err)?;
        tokio::fs::rename(&tmp, path).await.map_err(write_err)
    }
}

/// Imports `files` into `store` (see the module invariants).
pub async fn import_files(
    store: &FhirStore,
    files: &[PathBuf],
    options: &ImportOptions,
) -> Result<ImportSummary, ImportError> {
    if options.concurrency == 0 {
        return Err(ImportError::Concurrency);
    }
    let started = Instant::now();
    let mut checkpoint = Checkpoint::load(options.checkpoint.as_deref())?;
    let mut summary = ImportSummary::default();

    let mut total = 0;
    let mut metas = Vec::with_capacity(files.len());
    for path in files {
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|source| ImportError::Read {
                path: path.clone(),
                source,
            })?;
        total += meta.len();
        metas.push(meta);
    }
    let bar = if options.progress && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, \
             eta {eta}) {msg}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };

    for (path, meta) in files.iter().zip(metas) {
        let key = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.clone())
            .display()
            .to_string();
        let modified_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis());
        let size = meta.len();
        let resume = checkpoint.progress(&key, size, modified_ms).cloned();
        if let Some(done) = &resume
            && done.complete
        {
            summary.files_skipped += 1;
            summary.lines_skipped += done.lines;
            bar.inc(size);
            continue;
        }
        bar.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let mut progress = resume.unwrap_or(FileProgress {
            size,
            modified_ms,
            offset: 0,
            lines: 0,
            complete: false,
        });
        summary.lines_skipped += progress.lines;
        let resumed_at = progress.offset;
        bar.inc(resumed_at);
        let file = FileImport {
            store,
            path,
            concurrency: options.concurrency,
            bar: &bar,
        };
        if is_ndjson(path).await? {
            file.ndjson(&mut progress, &key, &mut checkpoint, &mut summary)
                .await?;
        } else {
            file.document(&mut summary).await?;
            bar.inc(size);
        }
        progress.offset = size;
        progress.complete = true;
        checkpoint.save(&key, progress).await?;
        summary.bytes += size.saturating_sub(resumed_at);
    }
    bar.finish_and_clear();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// NDJSON unless the first non-blank line is not a complete JSON value (a pretty-printed
/// document).
async fn is_ndjson(path: &Path) -> Result<bool, ImportError> {
    let read_err = |source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_err)?;
    let mut lines = tokio::io::BufReader::new(file).lines();
    while let Some(line) = lines.next_line().await.map_err(read_err)? {
        let line = line.trim();
        if !line.is_empty() {
            return Ok(serde_json::from_str::<serde::de::IgnoredAny>(line).is_ok());
        }
    }
    Ok(true)
}

/// One file being imported.
struct FileImport<'a> {
    store: &'a FhirStore,
    path: &'a Path,
    concurrency: usize,
    bar: &'a ProgressBar,
}

impl FileImport<'_> {
    fn failure(
        &self,
        line: u64,
        entry: Option<usize>,
        message: impl Into<String>,
    ) -> ImportFailure {
        ImportFailure {
            file: self.path.to_owned(),
            line,
            entry,
            message: message.into(),
        }
    }

    async fn ndjson(
        &self,
        progress: &mut FileProgress,
        key: &str,
        checkpoint: &mut Checkpoint,
        summary: &mut ImportSummary,
    ) -> Result<(), ImportError> {
        let read_err = |source| ImportError::Read {
            path: self.path.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::open(self.path).await.map_err(read_err)?;
        file.seek(std::io::SeekFrom::Start(progress.offset))
            .await
            .map_err(read_err)?;
        let mut reader = tokio::io::BufReader::new(file);
        let mut buf = Vec::new();
        loop {
            let mut batch: Vec<Prepared> = Vec::new();
            let mut batch_bytes = 0u64;
            let mut batch_lines = 0u64;
            let mut eof = false;
            while batch_lines < BATCH_LINES as u64 {
                buf.clear();
                let n = reader.read_until(b'\n', &mut buf).await.map_err(read_err)?;
                if n == 0 {
                    eof = true;
                    break;
                }
                batch_bytes += n as u64;
                batch_lines += 1;
                let line = progress.lines + batch_lines;
                let text = buf.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<Value>(text) {
                    Ok(value) => batch.extend(self.prepare_value(value, line)),
                    Err(e) => batch.push(Err(self.failure(
                        line,
                        None,
                        format!("not well-formed JSON (column {})", e.column()),
                    ))),
                }
            }
            self.execute(batch, summary).await?;
            progress.offset += batch_bytes;
            progress.lines += batch_lines;
            self.bar.inc(batch_bytes);
            checkpoint.save(key, progress.clone()).await?;
            if eof {
                return Ok(());
            }
        }
    }

    /// A whole-file JSON document: a Bundle, or one resource.
    async fn document(&self, summary: &mut ImportSummary) -> Result<(), ImportError> {
        let text = tokio::fs::read_to_string(self.path)
            .await
            .map_err(|source| ImportError::Read {
                path: self.path.to_owned(),
                source,
            })?;
        let items = match serde_json::from_str::<BundleDoc<'_>>(&text) {
            Ok(doc) if doc.resource_type.as_deref() == Some("Bundle") => {
                self.prepare_bundle_entries(&text, &doc.entry)
            }
            Ok(_) => match serde_json::from_str::<Value>(&text) {
                Ok(value) => self.prepare_value(value, 1),
                Err(e) => vec![Err(self.failure(
                    e.line() as u64,
                    None,
                    format!("not well-formed JSON (column {})", e.column()),
                ))],
            },
            Err(e) => vec![Err(self.failure(
                e.line() as u64,
                None,
                format!("not a FHIR JSON document: {}", strip_values(&e)),
            ))],
        };
        for chunk in chunks(items, BATCH_LINES) {
            self.execute(chunk, summary).await?;
        }
        Ok(())
    }

    /// A decoded line or document: one resource, or a Bundle of entries.
    fn prepare_value(&self, value: Value, line: u64) -> Vec<Prepared> {
        if value.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
            let entries: Vec<Value> = match value.get("entry") {
                None => Vec::new(),
                Some(Value::Array(entries)) => entries.clone(),
                Some(_) => {
                    return vec![Err(self.failure(
                        line,
                        None,
                        "Bundle.entry: expected an array",
                    ))];
                }
            };
            let entries: Vec<Entry> = entries
                .into_iter()
                .enumerate()
                .map(|(index, value)| Entry { index, line, value })
                .collect();
            return self.prepare_entries(entries);
        }
        vec![self.prepare_resource(value, line, None, None, &HashMap::new())]
    }

    /// Bundle entries of a whole-file document, each with the line it starts on.
    fn prepare_bundle_entries(&self, text: &str, raw: &[&RawValue]) -> Vec<Prepared> {
        let base = text.as_ptr() as usize;
        let mut entries = Vec::with_capacity(raw.len());
        let mut out = Vec::new();
        let mut counted = 0usize;
        let mut current_line = 1u64;
        for (index, entry) in raw.iter().enumerate() {
            // RawValue borrows from `text`, so the entry's offset is its distance from the start.
            let offset = (entry.get().as_ptr() as usize).saturating_sub(base);
            let offset = offset.min(text.len());
            current_line += text
                .as_bytes()
                .get(counted..offset)
                .map_or(0, |s| s.iter().filter(|&&b| b == b'\n').count() as u64);
            counted = counted.max(offset);
            let entry_line = current_line;
            match serde_json::from_str::<Value>(entry.get()) {
                Ok(value) => entries.push(Entry {
                    index,
                    line: entry_line,
                    value,
                }),
                Err(e) => out.push(Err(self.failure(
                    entry_line,
                    Some(index),
                    format!("not well-formed JSON (column {})", e.column()),
                ))),
            }
        }
        out.extend(self.prepare_entries(entries));
        out
    }

    /// Assigns ids to the entries, rewrites references between them, and prepares each.
    fn prepare_entries(&self, entries: Vec<Entry>) -> Vec<Prepared> {
        // First pass: every entry's identity, so references can be rewritten.
        let mut targets: HashMap<String, String> = HashMap::new();
        let mut planned = Vec::with_capacity(entries.len());
        for entry in entries {
            let full_url = entry
                .value
                .get("fullUrl")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let resource = entry.value.get("resource").cloned();
            let request = entry.value.get("request").cloned();
            let id = match &resource {
                Some(Value::Object(r)) => entry_id(r, full_url.as_deref()),
                _ => None,
            };
            if let (Some(url), Some(Value::Object(r)), Some(id)) = (&full_url, &resource, &id)
                && let Some(t) = r.get("resourceType").and_then(Value::as_str)
            {
                targets.insert(url.clone(), format!("{t}/{id}"));
            }
            planned.push((entry.index, entry.line, resource, request, id));
        }
        planned
            .into_iter()
            .map(|(index, line, resource, request, id)| {
                let method = request
                    .as_ref()
                    .and_then(|r| r.get("method"))
                    .and_then(Value::as_str)
                    .unwrap_or("PUT");
                match method {
                    "POST" | "PUT" => match resource {
                        Some(resource) => {
                            self.prepare_resource(resource, line, Some(index), id, &targets)
                        }
                        None => Err(self.failure(
                            line,
                            Some(index),
                            "Bundle.entry.resource: missing (nothing to import)",
                        )),
                    },
                    "DELETE" => self.prepare_delete(request.as_ref(), line, index),
                    other => Err(self.failure(
                        line,
                        Some(index),
                        format!(
                            "Bundle.entry.request.method: {other} is not an import action (POST, \
                             PUT or DELETE)"
                        ),
                    )),
                }
            })
            .collect()
    }

    fn prepare_delete(&self, request: Option<&Value>, line: u64, index: usize) -> Prepared {
        let url = request
            .and_then(|r| r.get("url"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let parsed = url
            .split_once('/')
            .filter(|(_, id)| !id.contains(['/', '?']))
            .and_then(|(t, id)| {
                Some((t.parse::<ResourceType>().ok()?, ResourceId::parse(id).ok()?))
            });
        match parsed {
            Some((resource_type, id)) => Ok(Item {
                line,
                entry: Some(index),
                action: Action::Delete { resource_type, id },
            }),
            None => Err(self.failure(
                line,
                Some(index),
                "Bundle.entry.request.url: a DELETE must name Type/id (conditional deletes are \
                 not imported)",
            )),
        }
    }

    /// Checks the resource's type, gives it its id, rewrites Bundle-internal references.
    fn prepare_resource(
        &self,
        value: Value,
        line: u64,
        entry: Option<usize>,
        entry_id: Option<String>,
        targets: &HashMap<String, String>,
    ) -> Prepared {
        let fail = |message: String| self.failure(line, entry, message);
        let Value::Object(mut json) = value else {
            return Err(fail(ResourceError::NotAnObject.to_string()));
        };
        let resource_type: ResourceType = match json.get("resourceType").and_then(Value::as_str) {
            None => return Err(fail(ResourceError::MissingResourceType.to_string())),
            Some(t) => t
                .parse()
                .map_err(|_| fail(ResourceError::UnsupportedResourceType.to_string()))?,
        };
        if !client_writable(resource_type) || resource_type == ResourceType::Bundle {
            return Err(fail(ApiError::ReadOnlyType { resource_type }.to_string()));
        }
        if !targets.is_empty() {
            for value in json.values_mut() {
                rewrite_references(value, targets);
            }
        }
        let id = match (json.get("id"), entry_id) {
            (Some(Value::String(id)), _) => {
                ResourceId::parse(id).map_err(|e| fail(format!("{resource_type}.id: {e}")))?
            }
            (Some(_), _) => return Err(fail(format!("{resource_type}.id: expected a string"))),
            (None, Some(id)) => {
                ResourceId::parse(&id).map_err(|e| fail(format!("{resource_type}.id: {e}")))?
            }
            (None, None) => content_id(&json)?,
        };
        json.insert("id".into(), Value::String(id.as_str().to_owned()));
        Ok(Item {
            line,
            entry,
            action: Action::Upsert {
                resource_type,
                id,
                json,
            },
        })
    }

    /// Runs `batch` with the configured concurrency and records the outcomes; stops at the
    /// first failure of the store itself.
    async fn execute(
        &self,
        batch: Vec<Prepared>,
        summary: &mut ImportSummary,
    ) -> Result<(), ImportError> {
        let mut results = futures::stream::iter(batch)
            .map(|prepared| async move {
                match prepared {
                    Err(failure) => Ok(Err(failure)),
                    Ok(item) => {
                        let (line, entry) = (item.line, item.entry);
                        match write(self.store, item.action).await {
                            Ok(written) => Ok(Ok(written)),
                            Err(e) if e.is_server_error() => Err(ImportError::StoreFailed {
                                location: self.failure(line, entry, "").to_string(),
                                message: e.to_string(),
                            }),
                            Err(e) => Ok(Err(self.failure(line, entry, describe(&e)))),
                        }
                    }
                }
            })
            .buffer_unordered(self.concurrency);
        let mut first_fatal = None;
        while let Some(result) = results.next().await {
            match result {
                Ok(outcome) => summary.record(outcome),
                Err(fatal) => {
                    first_fatal.get_or_insert(fatal);
                }
            }
        }
        match first_fatal {
            Some(fatal) => Err(fatal),
            None => Ok(()),
        }
    }
}

/// A Bundle entry awaiting preparation.
struct Entry {
    index: usize,
    line: u64,
    value: Value,
}

/// The parts of a whole-file document needed to find Bundle entries and their lines.
#[derive(Deserialize)]
struct BundleDoc<'a> {
    #[serde(rename = "resourceType", default)]
    resource_type: Option<String>,
    #[serde(borrow, default)]
    entry: Vec<&'a RawValue>,
}

fn chunks<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut iter = items.into_iter().peekable();
    while iter.peek().is_some() {
        out.push(iter.by_ref().take(size).collect());
    }
    out
}

/// A serde error's category and position, without any quoted input.
fn strip_values(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("not well-formed JSON (column {})", e.column())
        }
        _ => format!(
            "resourceType or entry has the wrong JSON type (column {})",
            e.column()
        ),
    }
}

/// The error message for a rejected resource: the element path and the rule, as the API's
/// OperationOutcome diagnostics give it.
fn describe(e: &ApiError) -> String {
    format!("{} (HTTP {})", e, e.status())
}

/// The id of a Bundle entry's resource when it has none: the UUID of an `urn:uuid:` fullUrl.
fn entry_id(resource: &Map<String, Value>, full_url: Option<&str>) -> Option<String> {
    if let Some(Value::String(id)) = resource.get("id") {
        return Some(id.clone());
    }
    let uuid = full_url?.strip_prefix("urn:uuid:")?;
    ResourceId::parse(uuid)
        .ok()
        .map(|id| id.as_str().to_owned())
}

/// A deterministic id from the resource's content, so re-importing the same id-less resource
/// finds it again: 40 hex digits of SHA-256 over its canonical JSON.
fn content_id(json: &Map<String, Value>) -> Result<ResourceId, ImportFailure> {
    // serde_json's Map is ordered by key (no preserve_order), so equal resources serialise
    // equally.
    let bytes = serde_json::to_vec(json).unwrap_or_default();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
    let hex: String = digest
        .as_ref()
        .iter()
        .take(20)
        .map(|b| format!("{b:02x}"))
        .collect();
    ResourceId::parse(&hex).map_err(|e| ImportFailure {
        file: PathBuf::new(),
        line: 0,
        entry: None,
        message: e.to_string(),
    })
}

/// Rewrites `reference` values naming another entry of the same Bundle to `Type/id`.
fn rewrite_references(value: &mut Value, targets: &HashMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "reference"
                    && let Value::String(reference) = v
                    && let Some(target) = targets.get(reference.as_str())
                {
                    *reference = target.clone();
                } else {
                    rewrite_references(v, targets);
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                rewrite_references(v, targets);
            }
        }
        _ => {}
    }
}

/// The resource without the server-set `meta.versionId` and `meta.lastUpdated` (and without
/// `meta` when nothing else is in it), for comparing with what is stored.
fn comparable(mut json: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Object(meta)) = json.get_mut("meta") {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            json.remove("meta");
        }
    }
    json
}

/// Writes one action: unchanged when the stored resource already equals it, else an update
/// (update-as-create when absent or deleted) guarded by the version just read.
async fn write(store: &FhirStore, action: Action) -> Result<Written, ApiError> {
    match action {
        Action::Delete { resource_type, id } => {
            let outcome = store.delete(resource_type, &id).await?;
            Ok(if outcome.changed {
                Written::Deleted
            } else {
                Written::Unchanged
            })
        }
        Action::Upsert {
            resource_type,
            id,
            json,
        } => {
            let current = match store.read(resource_type, &id).await {
                Ok(stored) => Some(stored),
                Err(ApiError::NotFound { .. } | ApiError::Gone { .. }) => None,
                Err(e) => return Err(e),
            };
            let new = comparable(json);
            if let Some(stored) = &current
                && let Some(body) = &stored.body
                && let Ok(Value::Object(old)) = serde_json::from_slice::<Value>(body)
                && comparable(old) == new
            {
                return Ok(Written::Unchanged);
            }
            let bytes = serde_json::to_vec(&new).map_err(|_| ApiError::Internal)?;
            let outcome = store
                .update(resource_type, &id, &bytes, current.map(|c| c.version))
                .await?;
            Ok(if outcome.created {
                Written::Created
            } else {
                Written::Updated
            })
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Resources written, per type.
    pub per_type: BTreeMap<&'static str, u64>,
    pub elapsed: Duration,
}

impl ExportSummary {
    pub fn total(&self) -> u64 {
        self.per_type.values().sum()
    }
}

impl fmt::Display for ExportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .per_type
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        write!(
            f,
            "exported {} resource(s) in {:.1}s{}{}",
            self.total(),
            self.elapsed.as_secs_f64(),
            if parts.is_empty() { "" } else { ": " },
            parts.join(", ")
        )
    }
}

/// Writes the current version of every live resource of `types` to `out`, one per line, in
/// type then id order.
pub async fn export(
    store: &FhirStore,
    types: &[ResourceType],
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    out_name: &Path,
) -> Result<ExportSummary, ImportError> {
    const PAGE: usize = 512;
    let started = Instant::now();
    let mut summary = ExportSummary::default();
    let write_err = |source| ImportError::Write {
        path: out_name.to_owned(),
        source,
    };
    let failed = |e: ApiError| ImportError::StoreFailed {
        location: "export".into(),
        message: e.to_string(),
    };
    for &resource_type in types {
        let prefix = Key::new(Family::Current, [resource_type.as_str().into()]);
        let mut after: Option<Vec<u8>> = None;
        let mut count = 0;
        loop {
            let page = store
                .database()
                .scan_prefix(&prefix, after.as_deref(), PAGE)
                .await
                .map_err(|e| failed(ApiError::from(e)))?;
            for (key, _) in &page {
                let (Some(Element::Text(t)), Some(Element::Text(id))) =
                    (key.elements.first(), key.elements.get(1))
                else {
                    continue;
                };
                if t != resource_type.as_str() {
                    continue;
                }
                let Ok(id) = ResourceId::parse(id) else {
                    continue;
                };
                match store.read(resource_type, &id).await {
                    Ok(stored) => {
                        if let Some(body) = stored.body {
                            out.write_all(&body).await.map_err(write_err)?;
                            out.write_all(b"\n").await.map_err(write_err)?;
                            count += 1;
                        }
                    }
                    Err(ApiError::Gone { .. } | ApiError::NotFound { .. }) => {}
                    Err(e) => return Err(failed(e)),
                }
            }
            match page.last() {
                Some((key, _)) if page.len() == PAGE => after = Some(key.encode()),
                _ => break,
            }
        }
        if count > 0 {
            summary.per_type.insert(resource_type.as_str(), count);
        }
    }
    out.flush().await.map_err(write_err)?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// `shcr export`: opens the care system, writes its records as NDJSON, closes the store.
pub async fn run_export(args: ExportArgs) -> Result<ExportSummary, ImportError> {
    let name = parse_name(&args.care_system)?;
    let types: Vec<ResourceType> = if args.types.is_empty() {
        ResourceType::ALL
            .iter()
            .copied()
            .filter(|t| client_writable(*t) && *t != ResourceType::Bundle)
            .collect()
    } else {
        args.types
            .iter()
            .map(|t| {
                t.trim()
                    .parse()
                    .map_err(|_| ImportError::UnknownType(t.clone()))
            })
            .collect::<Result<_, _>>()?
    };
    let store = open_local(&args.data_dir, &name, false).await?;
    let exported = match &args.output {
        Some(path) => {
            let file =
                tokio::fs::File::create(path)
                    .await
                    .map_err(|source| ImportError::Write {
                        path: path.clone(),
                        source,
                    })?;
            let mut out = tokio::io::BufWriter::new(file);
            export(&store, &types, &mut out, path).await
        }
        None => {
            let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
            export(&store, &types, &mut out, Path::new("standard output")).await
        }
    };
    let closed = store.database().close().await;
    let summary = exported?;
    closed.map_err(|e| ImportError::Close(e.to_string()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_to_bundle_entries_are_rewritten() {
        let targets = HashMap::from([("urn:uuid:a".to_string(), "Patient/a".to_string())]);
        let mut value = serde_json::json!({
            "subject": {"reference": "urn:uuid:a"},
            "performer": [{"reference": "urn:uuid:b"}],
        });
        rewrite_references(&mut value, &targets);
        assert_eq!(value["subject"]["reference"], "Patient/a");
        assert_eq!(value["performer"][0]["reference"], "urn:uuid:b");
    }

    #[test]
    fn content_ids_are_deterministic_and_valid() {
        let a = serde_json::json!({"resourceType": "Patient", "gender": "female"});
        let Value::Object(a) = a else { unreachable!() };
        let first = content_id(&a).expect("id");
        assert_eq!(first, content_id(&a.clone()).expect("id"));
        assert_eq!(first.as_str().len(), 40);
    }

    #[test]
    fn server_meta_is_ignored_when_comparing() {
        let Value::Object(stored) = serde_json::json!({
            "resourceType": "Patient", "id": "p",
            "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:00Z"}
        }) else {
            unreachable!()
        };
        let Value::Object(new) = serde_json::json!({"resourceType": "Patient", "id": "p"}) else {
            unreachable!()
        };
        assert_eq!(comparable(stored), comparable(new));
    }
}
