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
    Gateway,

    #[command(
        about = "Run one care system's FHIR record store",
        long_about = "Run one care system's FHIR R4 record store.\n\
\n\
It serves the FHIR REST API for a single care system and keeps every record encrypted in \
that care system's bucket.\n\
\n\
Example:\n  shcr store --config store.yaml"
    )]
    Store,

    #[command(
        about = "Run the platform on this machine (local storage and keys), no cloud needed",
        long_about = "Run everything on this machine.\n\
\n\
Opens one encrypted record store per care system in one process, storing data in a local \
directory with a local key provider per care system: no cloud account and no cluster needed. \
Care systems come from CareSystem manifests (--care-systems), or two built-in demo care \
systems. Serves status, /healthz, /readyz and /metrics; Ctrl-C or SIGTERM flushes and closes \
every store. The FHIR API and the authenticating gateway arrive with issues 4 and 5.\n\
\n\
Examples:\n  shcr dev\n  shcr dev --data-dir /tmp/shcr --listen 127.0.0.1:9090 --care-systems my-ics.yaml"
    )]
    Dev(shcr_gateway::dev::DevArgs),

    #[command(
        about = "Mint a token for trying out a dev deployment",
        long_about = "Mint a token for a `shcr dev` deployment.\n\
\n\
Prints a signed token that the dev gateway accepts, so you can call the FHIR API with curl \
or an app without an identity provider. Dev only: production gateways do not trust it.\n\
\n\
Example:\n  shcr token"
    )]
    Token,

    #[command(
        about = "Bulk-import FHIR NDJSON files or Bundles into a care system",
        long_about = "Bulk-import FHIR data into a care system's record store.\n\
\n\
Reads FHIR R4 resources from NDJSON files (one resource per line) or from Bundles.\n\
\n\
Example:\n  shcr import --config store.yaml patients.ndjson"
    )]
    Import,

    #[command(
        about = "Export a care system's records as FHIR NDJSON",
        long_about = "Export a care system's records as FHIR NDJSON.\n\
\n\
Writes the records of one care system's store, one resource per line.\n\
\n\
Example:\n  shcr export --config store.yaml > records.ndjson"
    )]
    Export,

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
}
