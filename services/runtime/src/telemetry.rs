//! Process telemetry: logs and OpenTelemetry traces.
//!
//! Job: install the process-wide `tracing` subscriber once — a formatter writing human or JSON
//! logs to stderr, an `EnvFilter` (RUST_LOG syntax), and, when an OTLP endpoint is configured,
//! a `tracing-opentelemetry` layer exporting spans in batches over OTLP/HTTP (protobuf). Also sets
//! the W3C TraceContext propagator globally.
//!
//! Invariants:
//! - Logs go to stderr, so commands that print results (`shcr crd`, `shcr export`) keep stdout
//!   clean.
//! - Trace export is off unless an endpoint is configured; no network traffic by default.
//! - Spans from the exporter's own HTTP stack and from OpenTelemetry itself are never exported,
//!   so exporting cannot feed on itself.
//! - The [`TelemetryGuard`] owns the tracer provider: shutting it down (or dropping it) flushes
//!   queued spans. That call blocks until the export finishes, so make it outside async code
//!   (after the runtime has stopped, or in `spawn_blocking`).
//! - No PHI in logs or spans is a rule for callers; nothing here records request contents.

use std::fmt;
use std::io::IsTerminal as _;
use std::str::FromStr;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt as log_fmt};
use url::Url;

/// The path OTLP/HTTP receivers accept traces on, relative to the collector's base URL.
const OTLP_TRACES_PATH: &str = "v1/traces";

/// Crates whose spans must not be exported: the exporter's HTTP client and OpenTelemetry itself.
const NOT_EXPORTED: &[&str] = &[
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "opentelemetry_http",
    "reqwest",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
];

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Which log events are kept, in RUST_LOG syntax (`info`, `warn,shcr_store=debug`).
/// Checked when parsed, so a typo is a configuration error rather than silently dropped logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LogFilter(String);

impl LogFilter {
    fn to_env_filter(&self) -> Result<EnvFilter, TelemetryError> {
        EnvFilter::builder()
            .parse(&self.0)
            .map_err(|source| TelemetryError::InvalidLogFilter {
                filter: self.0.clone(),
                reason: source.to_string(),
            })
    }
}

impl Default for LogFilter {
    /// `info` for ShCR; the storage engine's routine chatter (every open prints its settings)
    /// only from `warn` up.
    fn default() -> Self {
        Self("info,slatedb=warn".to_owned())
    }
}

impl FromStr for LogFilter {
    type Err = TelemetryError;

    fn from_str(filter: &str) -> Result<Self, Self::Err> {
        let candidate = Self(filter.to_owned());
        candidate.to_env_filter()?;
        Ok(candidate)
    }
}

impl TryFrom<String> for LogFilter {
    type Error = TelemetryError;

    fn try_from(filter: String) -> Result<Self, Self::Error> {
        filter.parse()
    }
}

impl From<LogFilter> for String {
    fn from(filter: LogFilter) -> Self {
        filter.0
    }
}

impl fmt::Display for LogFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The fraction of new traces that are recorded, between 0.0 and 1.0. A request that arrives
/// with a sampled parent (W3C `traceparent`) follows its parent's decision.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct SampleRatio(f64);

impl SampleRatio {
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for SampleRatio {
    fn default() -> Self {
        Self(1.0)
    }
}

impl TryFrom<f64> for SampleRatio {
    type Error = TelemetryError;

    fn try_from(ratio: f64) -> Result<Self, Self::Error> {
        if (0.0..=1.0).contains(&ratio) {
            Ok(Self(ratio))
        } else {
            Err(TelemetryError::InvalidSampleRatio(ratio))
        }
    }
}

impl From<SampleRatio> for f64 {
    fn from(ratio: SampleRatio) -> Self {
        ratio.0
    }
}

impl FromStr for SampleRatio {
    type Err = TelemetryError;

    fn from_str(ratio: &str) -> Result<Self, Self::Err> {
        let parsed: f64 = ratio
            .trim()
            .parse()
            .map_err(|_| TelemetryError::SampleRatioNotANumber(ratio.to_owned()))?;
        parsed.try_into()
    }
}

/// Telemetry settings of one process (config file section `telemetry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// RUST_LOG-style filter; `info` by default.
    pub log_level: LogFilter,
    /// Base URL of an OTLP/HTTP collector (as `OTEL_EXPORTER_OTLP_ENDPOINT`, e.g.
    /// `http://otel-collector:4318`); spans are posted to `<endpoint>/v1/traces`. A URL that
    /// already ends in `/v1/traces` is used as is. Unset: traces are not exported.
    pub otlp_endpoint: Option<Url>,
    /// The `service.name` resource attribute on exported spans.
    pub service_name: String,
    pub sample_ratio: SampleRatio,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::default(),
            log_level: LogFilter::default(),
            otlp_endpoint: None,
            service_name: "shcr".to_owned(),
            sample_ratio: SampleRatio::default(),
        }
    }
}

/// Command-line flags (and their environment variables) overriding [`TelemetryConfig`].
/// Flatten into a binary's top-level arguments; pass to
/// [`Overrides::section`](crate::config::Overrides::section) as section `telemetry`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct TelemetryArgs {
    /// Log format: `human` for a terminal, `json` for a log collector
    #[arg(long, global = true, env = "SHCR_LOG_FORMAT", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,

    /// Which logs to show, RUST_LOG syntax, e.g. `info` or `warn,shcr_store=debug` [default: info]
    #[arg(long, global = true, env = "SHCR_LOG_LEVEL", value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogFilter>,

    /// Send traces to this OpenTelemetry collector (OTLP over HTTP), e.g. http://localhost:4318
    #[arg(
        long,
        global = true,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<Url>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "`{filter}` is not a valid log filter ({reason}); use RUST_LOG syntax such as `info` or `warn,shcr_store=debug`"
    )]
    InvalidLogFilter { filter: String, reason: String },

    #[error("trace sample ratio {0} is out of range; use a number from 0.0 (none) to 1.0 (all)")]
    InvalidSampleRatio(f64),

    #[error("trace sample ratio `{0}` is not a number; use a number from 0.0 (none) to 1.0 (all)")]
    SampleRatioNotANumber(String),

    #[error("cannot set up the OTLP trace exporter for {endpoint}")]
    Exporter {
        endpoint: Url,
        source: opentelemetry_otlp::ExporterBuildError,
    },

    #[error("telemetry is already initialised in this process")]
    AlreadyInitialised(#[from] tracing_subscriber::util::TryInitError),

    #[error("flushing traces failed")]
    Flush(#[source] opentelemetry_sdk::error::OTelSdkError),
}

/// Keeps trace export running; flushes queued spans and stops the exporter on
/// [`shutdown`](Self::shutdown) or drop.
#[must_use = "dropping the guard stops trace export"]
#[derive(Debug)]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every span finished so far. Blocks until the export completes or times out.
    pub fn flush(&self) -> Result<(), TelemetryError> {
        match &self.tracer_provider {
            Some(provider) => provider.force_flush().map_err(TelemetryError::Flush),
            None => Ok(()),
        }
    }

    /// Flushes queued spans and stops the exporter. Blocks until done.
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        match self.tracer_provider.take() {
            Some(provider) => provider.shutdown().map_err(TelemetryError::Flush),
            None => Ok(()),
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take()
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing traces at exit failed");
        }
    }
}

/// Installs the process-wide subscriber described by `config`. Call once, early in `main`.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = config.log_level.to_env_filter()?;
    let log_layer = match config.log_format {
        LogFormat::Human => log_fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => log_fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let tracer_provider = match &config.otlp_endpoint {
        Some(endpoint) => Some(tracer_provider(config, endpoint)?),
        None => None,
    };
    let trace_layer = tracer_provider.as_ref().map(|provider| {
        let not_exported = NOT_EXPORTED.iter().fold(
            Targets::new().with_default(LevelFilter::TRACE),
            |targets, target| targets.with_target(*target, LevelFilter::OFF),
        );
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("shcr"))
            .with_filter(not_exported)
    });

    tracing_subscriber::registry()
        .with(filter)
        .with(log_layer)
        .with(trace_layer)
        .try_init()?;

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(provider) = &tracer_provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    Ok(TelemetryGuard { tracer_provider })
}

fn tracer_provider(
    config: &TelemetryConfig,
    endpoint: &Url,
) -> Result<SdkTracerProvider, TelemetryError> {
    let traces_url = traces_url(endpoint);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url.as_str())
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: traces_url.clone(),
            source,
        })?;
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio.get(),
        ))))
        .with_resource(resource)
        .build())
}

/// `<endpoint>/v1/traces`, keeping any path prefix of the endpoint (`https://host/otlp`).
fn traces_url(endpoint: &Url) -> Url {
    let base_path = endpoint.path().trim_end_matches('/');
    if base_path.ends_with(OTLP_TRACES_PATH) {
        return endpoint.clone();
    }
    let mut url = endpoint.clone();
    url.set_path(&format!("{base_path}/{OTLP_TRACES_PATH}"));
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        text.parse().expect("test URL parses")
    }

    #[test]
    fn traces_go_under_the_collector_base_url() {
        assert_eq!(
            traces_url(&url("http://collector:4318")).as_str(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url(&url("https://example.net/otlp/")).as_str(),
            "https://example.net/otlp/v1/traces"
        );
        assert_eq!(
            traces_url(&url("http://collector:4318/v1/traces")).as_str(),
            "http://collector:4318/v1/traces"
        );
    }

    #[test]
    fn a_bad_log_filter_is_rejected_when_parsed() {
        let error = "info,[[".parse::<LogFilter>().expect_err("bad filter");
        assert!(error.to_string().contains("info,[["), "{error}");
        assert!("warn,shcr_store=debug".parse::<LogFilter>().is_ok());
    }

    #[test]
    fn sample_ratio_must_be_a_fraction() {
        assert!("1.5".parse::<SampleRatio>().is_err());
        assert!("-0.1".parse::<SampleRatio>().is_err());
        assert!("half".parse::<SampleRatio>().is_err());
        assert_eq!(
            "0.25".parse::<SampleRatio>().map(SampleRatio::get).ok(),
            Some(0.25)
        );
    }

    #[test]
    fn defaults_are_quiet_and_local() {
        let config = TelemetryConfig::default();
        assert_eq!(config.otlp_endpoint, None, "no export unless asked");
        assert_eq!(config.log_level.to_string(), "info,slatedb=warn");
        assert_eq!(config.log_format, LogFormat::Human);
    }

    #[test]
    fn config_file_values_are_checked() {
        let parsed: Result<TelemetryConfig, _> = serde_yaml::from_str("sample_ratio: 2.0\n");
        assert!(parsed.is_err(), "out-of-range ratio must be rejected");
        let parsed: Result<TelemetryConfig, _> = serde_yaml::from_str("log_level: 'info,[['\n");
        assert!(parsed.is_err(), "bad filter must be rejected");
        let parsed: TelemetryConfig =
            serde_yaml::from_str("log_format: json\notlp_endpoint: http://localhost:4318\n")
                .expect("valid section parses");
        assert_eq!(parsed.log_format, LogFormat::Json);
    }
}
