//! The operator's Prometheus metrics: reconciles, failures, reconcile duration and care systems
//! by readiness.
//!
//! Invariant: labels are bounded sets (outcome, readiness); care system names appear in no label,
//! so the series count does not grow with the number of tenants.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use shcr_runtime::metrics::MetricsRegistry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadyLabel {
    ready: &'static str,
}

/// The operator's metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct OperatorMetrics {
    reconciles: Counter,
    failures: Counter,
    duration: Histogram,
    care_systems: Family<ReadyLabel, Gauge>,
    readiness: Arc<Mutex<HashMap<String, bool>>>,
}

impl OperatorMetrics {
    /// Registers the metrics as `shcr_operator_*`.
    pub fn register(registry: &MetricsRegistry) -> Self {
        let metrics = Self {
            reconciles: Counter::default(),
            failures: Counter::default(),
            duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            care_systems: Family::default(),
            readiness: Arc::default(),
        };
        registry.register(
            "operator_reconciles",
            "CareSystem reconciles started",
            metrics.reconciles.clone(),
        );
        registry.register(
            "operator_reconcile_failures",
            "CareSystem reconciles that failed",
            metrics.failures.clone(),
        );
        registry.register(
            "operator_reconcile_duration_seconds",
            "Time one CareSystem reconcile took",
            metrics.duration.clone(),
        );
        registry.register(
            "operator_care_systems",
            "CareSystems by readiness",
            metrics.care_systems.clone(),
        );
        metrics
    }

    /// Reconciles started so far.
    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }

    /// Reconciles that failed so far (and were retried with backoff).
    pub fn failures(&self) -> u64 {
        self.failures.get()
    }

    pub fn reconciled(&self, took: Duration, failed: bool) {
        self.reconciles.inc();
        if failed {
            self.failures.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    /// Records whether `care_system` is ready; `None` forgets it (deleted).
    pub fn set_ready(&self, care_system: &str, ready: Option<bool>) {
        let mut readiness = self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match ready {
            Some(ready) => readiness.insert(care_system.to_owned(), ready),
            None => readiness.remove(care_system),
        };
        let ready_count = readiness.values().filter(|ready| **ready).count();
        let total = readiness.len();
        let gauge = |ready, count: usize| {
            self.care_systems
                .get_or_create(&ReadyLabel { ready })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        };
        gauge("true", ready_count);
        gauge("false", total - ready_count);
    }
}
