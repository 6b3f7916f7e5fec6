//! The `shcr` command line: global flags, subcommands and their help, and the shape of the
//! configuration file. Parsing only; `main.rs` wires the result to the components.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde::Deserialize;
use shcr_operator::{OperatorArgs, OperatorConfig};
use shcr_runtime::telemetry::{TelemetryArgs, TelemetryConfig};

#[derive(Debug, Parser)]
#[command(
    name = "shcr",
    version,
    about = "ShCR: an open data layer for shared care records",
    long_about = "ShCR: an open data layer for shared care records.\n\
\n\
One binary runs every part of the platform: the Kubernetes operator, the gateway that routes \
clinicians and apps to their care system, and each care system's FHIR record store. \
`shcr dev` runs all of it on one machine.\n\
\n\
Settings come from, lowest to highest precedence: built-in defaults, the --config file, \
environment variables, then flags.\n\
\n\
Example:\n  shcr dev"
)]
pub struct Cli {
    /// Configuration file (YAML or JSON); flags and environment variables override it
    #[arg(long, global = true, env = "SHCR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    #[command(
        about = "Run the Kubernetes operator that provisions care systems",
        long_about = "Run the Kubernetes operator.\n\
\n\
It watches CareSystem resources and gives each care system its namespace, record store, \
bucket and encryption key, and reports progress in the CareSystem's status.\n\
\n\
Example:\n  shcr operator --config /etc/shcr/operator.yaml"
    )]
    Operator(OperatorArgs),

    #[command(
        about = "Run the gateway that routes requests to each care system's store",
        long_about = "Run the gateway.\n\
\n\
It checks clinicians' and apps' OIDC tokens and SMART scopes, then forwards each FHIR request \
to the record store of the care system it belongs to.\n\
\n\
Example:\n  shcr gateway --config gateway.yaml --log-format json"
    )]
    Gateway(shcr_gateway::config::GatewayArgs),

    #[command(
        about = "Run one care system's FHIR record store",
        long_about = "Run one care system's FHIR R4 record store.\n\
\n\
It serves the FHIR REST API for a single care system and keeps every record encrypted in \
that care system's bucket with its KMS key. It trusts only requests carrying the gateway's \
signed identity assertion (SHCR_STORE_ASSERTION_PUBLIC_KEY or _FILE holds the gateway's \
public key). Before serving it checks the bucket and the KMS key; /metrics, /healthz and \
/readyz are served on --metrics-listen. SIGTERM drains requests, then flushes and closes the \
database. The operator sets every SHCR_STORE_* variable; AWS credentials come from the \
standard AWS chain (environment, web identity, instance profile).\n\
\n\
Example:\n  shcr store --config store.yaml\n  SHCR_STORE_CARE_SYSTEM=north-east SHCR_STORE_ODS_CODE=QHM \
SHCR_STORE_BUCKET=shcr-north-east SHCR_STORE_REGION=eu-west-2 SHCR_STORE_KMS_KEY_ARN=arn:aws:kms:... \
SHCR_STORE_ASSERTION_PUBLIC_KEY_FILE=/etc/shcr/gateway.pem shcr store"
    )]
    // Boxed: the store has many flags, and the enum should not be as large as its largest arm.
    Store(Box<shcr_store::serve::StoreArgs>),

    #[command(
        about = "Run the platform on this machine (local storage and keys), no cloud needed",
        long_about = "Run everything on this machine.\n\
\n\
Runs the gateway and one encrypted FHIR record store per care system in one process, storing \
data in a local directory with a local key provider per care system: no cloud account and no \
cluster needed. Care systems come from CareSystem manifests (--care-systems), or two built-in \
demo care systems. The gateway trusts the dev token issuer (see `shcr token`); when ready it \
prints each care system's FHIR base URL and a ready-to-paste curl command with a token. \
--seed-demo loads a few synthetic patients per care system. Ctrl-C or SIGTERM drains requests, \
then flushes and closes every store; restarting on the same --data-dir finds every record.\n\
\n\
Examples:\n  shcr dev --seed-demo\n  shcr dev --data-dir /tmp/shcr --listen 127.0.0.1:9090 --care-systems my-ics.yaml"
    )]
    Dev(shcr_gateway::dev::DevArgs),

    #[command(
        about = "Mint a token for trying out a dev deployment",
        long_about = "Mint a token for a `shcr dev` deployment.\n\
\n\
Prints (as the last line of stdout) a JWT signed by the dev issuer whose Ed25519 key lives in \
the `shcr dev` data dir (created on first use, mode 0600), so you can call the FHIR API with \
curl or an app without an identity provider. The token is shaped like an NHS CIS2 token \
(nhsid_nrbac_roles with selected_roleid), carries SMART scopes, and is bound to one care \
system (aud urn:shcr:care-system:NAME): the dev gateway refuses it at any other. Dev only: \
production gateways do not trust the dev issuer unless configured to like any other issuer.\n\
\n\
Examples:\n  shcr token --care-system north-east --org RR8 --role R8000\n  \
TOKEN=$(shcr token --care-system north-east --org RR8 --role R8000 --scope 'user/*.rs' --ttl 15m)\n  \
shcr token --care-system north-east --org RR8 --role R8000 --scope 'patient/*.rs' --patient p-1"
    )]
    Token(shcr_gateway::auth::TokenArgs),

    #[command(
        about = "Bulk-import FHIR NDJSON files or Bundles into a care system",
        long_about = "Bulk-import FHIR data into a care system's record store.\n\
\n\
Reads FHIR R4 resources from NDJSON files (one resource per line) or JSON files holding a \
Bundle (batch, transaction, collection; urn:uuid references between entries are resolved) \
and writes them into a care system of a `shcr dev` data dir, with the same validation and \
indexing as the FHIR API. Resources keep their ids (those without one get a stable id), so \
running an import again duplicates nothing; progress is checkpointed, so an interrupted \
import resumes where it stopped. Prints a summary: created, updated, unchanged, and each \
failure with its file, line and the element at fault. Exits 1 when any resource failed. \
Stop `shcr dev` on the same data dir first.\n\
\n\
Examples:\n  shcr import --care-system north-east patients.ndjson observations.ndjson\n  \
shcr import --care-system north-east --data-dir /tmp/shcr synthea/*.json"
    )]
    Import(shcr_store::import::ImportArgs),

    #[command(
        about = "Export a care system's records as FHIR NDJSON",
        long_about = "Export a care system's records as FHIR NDJSON.\n\
\n\
Writes the current version of every record of one care system in a `shcr dev` data dir, \
one resource per line, ordered by type then id; the output can be imported again with \
`shcr import`. Stop `shcr dev` on the same data dir first.\n\
\n\
Examples:\n  shcr export --care-system north-east > records.ndjson\n  \
shcr export --care-system north-east --type Patient,Observation -o subset.ndjson"
    )]
    Export(shcr_store::import::ExportArgs),

    #[command(
        about = "Print the CareSystem CustomResourceDefinition as YAML",
        long_about = "Print the CareSystem CustomResourceDefinition (CRD) as YAML.\n\
\n\
The CRD is generated from the operator's Rust types, so it always matches this binary.\n\
\n\
Example:\n  shcr crd | kubectl apply -f -"
    )]
    Crd,
}

/// The configuration file: one section per component.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShcrConfig {
    pub telemetry: TelemetryConfig,
    pub operator: OperatorConfig,
    pub dev: shcr_gateway::dev::DevConfig,
    pub store: shcr_store::serve::StoreConfig,
    pub gateway: shcr_gateway::config::GatewayConfig,
}
