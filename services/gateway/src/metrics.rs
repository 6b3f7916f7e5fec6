//! The gateway's Prometheus metrics: requests by care system and status class, latency to the
//! response head, refusals by reason, and the refusal notices sent to stores by outcome.
//!
//! Invariant: label values are bounded sets — a care system label is only ever a name from the
//! routing table (anything else is `unknown`), status classes are `1xx`..`5xx`, reasons are fixed
//! words. No path, id, token or person appears in a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use shcr_runtime::metrics::MetricsRegistry;

/// The care-system label used for names that are not in the routing table.
pub const UNKNOWN_CARE_SYSTEM: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    care_system: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CareSystemLabel {
    care_system: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    care_system: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NoticeLabels {
    care_system: String,
    outcome: &'static str,
}

/// The gateway's metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<CareSystemLabel, Histogram>,
    refusals: Family<RefusalLabels, Counter>,
    notices: Family<NoticeLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

impl GatewayMetrics {
    /// Registers the metrics as `shcr_gateway_*`.
    pub fn register(registry: &MetricsRegistry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            refusals: Family::default(),
            notices: Family::default(),
        };
        registry.register(
            "gateway_requests",
            "FHIR requests answered by the gateway, by care system and status class",
            metrics.requests.clone(),
        );
        registry.register(
            "gateway_request_duration_seconds",
            "Time from a request's arrival to its response head, by care system",
            metrics.latency.clone(),
        );
        registry.register(
            "gateway_refusals",
            "Requests the gateway refused itself, by care system and reason (unauthenticated, forbidden, rate, concurrency, too_large, not_ready, unknown_care_system)",
            metrics.refusals.clone(),
        );
        registry.register(
            "gateway_refusal_notices",
            "Refusal notices for stores' audit trails, by care system and outcome (recorded: the store took it; dropped: the queue was full; failed: the store could not be told)",
            metrics.notices.clone(),
        );
        metrics
    }

    /// Counts one refusal notice by `outcome` (`recorded`, `dropped` or `failed`).
    pub fn refusal_notice(&self, care_system: &str, outcome: &'static str) {
        self.notices
            .get_or_create(&NoticeLabels {
                care_system: care_system.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Counts one answered request.
    pub fn answered(&self, care_system: &str, status: u16, seconds: f64) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&RequestLabels {
                care_system: care_system.to_owned(),
                class,
            })
            .inc();
        self.latency
            .get_or_create(&CareSystemLabel {
                care_system: care_system.to_owned(),
            })
            .observe(seconds);
    }

    /// Counts one refusal by the gateway itself.
    pub fn refused(&self, care_system: &str, reason: &'static str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                care_system: care_system.to_owned(),
                reason,
            })
            .inc();
    }
}
