//! What every ShCR process needs, whichever component it runs.
//!
//! - [`config`]: layered typed configuration (defaults < file < environment < flags).
//! - [`telemetry`]: logs (human or JSON) and OpenTelemetry trace export over OTLP/HTTP.
//! - [`trace_context`]: W3C trace context across HTTP hops (gateway → store).
//! - [`metrics`]: a Prometheus registry with `/metrics`, `/healthz` and `/readyz`.
//! - [`shutdown`]: the SIGTERM / Ctrl-C future for graceful shutdown.
//!
//! This crate depends on no other ShCR crate; every component and the `shcr` binary depend on it.

pub mod config;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
pub mod trace_context;
