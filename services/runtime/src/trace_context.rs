//! W3C trace context across an HTTP hop (gateway → store).
//!
//! Job: write the current span's trace context into outgoing request headers (`traceparent`,
//! `tracestate`), and make a span handling an incoming request a child of the caller's span.
//!
//! Invariants:
//! - Only W3C Trace Context headers are read or written, whatever global propagator is set, so
//!   both ends of a hop always speak the same format.
//! - Headers carry identifiers only (trace id, span id, flags, vendor state) — never PHI.
//! - Without the OpenTelemetry layer (trace export off), injection writes nothing and
//!   [`set_remote_parent`] reports [`TraceContextError::TracingLayerMissing`]; callers may ignore
//!   that error, the request is simply not traced.

use axum::http::HeaderMap;
use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::{OpenTelemetrySpanExt, SetParentError};

#[derive(Debug, thiserror::Error)]
pub enum TraceContextError {
    #[error("trace export is off (no OpenTelemetry layer), so the caller's trace is not joined")]
    TracingLayerMissing,
    #[error("the span has already started; set its remote parent before entering it")]
    SpanAlreadyStarted,
    #[error("the span is filtered out, so it cannot join the caller's trace")]
    SpanDisabled,
}

impl From<SetParentError> for TraceContextError {
    fn from(error: SetParentError) -> Self {
        match error {
            SetParentError::LayerNotFound => Self::TracingLayerMissing,
            SetParentError::AlreadyStarted => Self::SpanAlreadyStarted,
            SetParentError::SpanDisabled => Self::SpanDisabled,
        }
    }
}

/// Writes the trace context of the current `tracing` span into `headers`.
pub fn inject_current(headers: &mut HeaderMap) {
    inject(&tracing::Span::current(), headers);
}

/// Writes the trace context of `span` into `headers`, replacing any already there.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Reads the caller's trace context from `headers`; an empty context when there is none or it is
/// malformed (a bad header must not fail the request).
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Makes `span` a child of the caller's span described by `headers`. Call it before the span is
/// entered. Without a `traceparent` header the span stays a root.
pub fn set_remote_parent(
    span: &tracing::Span,
    headers: &HeaderMap,
) -> Result<(), TraceContextError> {
    span.set_parent(extract(headers))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn trace_id(span: &tracing::Span) -> TraceId {
        span.context().span().span_context().trace_id()
    }

    #[test]
    fn a_trace_survives_the_http_hop() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));

        tracing::subscriber::with_default(subscriber, || {
            let mut headers = HeaderMap::new();
            let caller = tracing::info_span!("gateway_forward");
            let caller_trace = caller.in_scope(|| {
                inject_current(&mut headers);
                trace_id(&caller)
            });
            assert_ne!(caller_trace, TraceId::INVALID);
            assert!(headers.contains_key("traceparent"), "{headers:?}");

            let handler = tracing::info_span!("store_request");
            set_remote_parent(&handler, &headers).expect("parent is set before entry");
            assert_eq!(trace_id(&handler), caller_trace);
        });
    }

    #[test]
    fn missing_or_garbled_headers_start_a_new_trace() {
        let mut headers = HeaderMap::new();
        assert!(!extract(&headers).span().span_context().is_valid());
        headers.insert(
            "traceparent",
            axum::http::HeaderValue::from_static("not-a-traceparent"),
        );
        assert!(!extract(&headers).span().span_context().is_valid());
    }

    #[test]
    fn without_the_tracing_layer_nothing_is_injected() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let mut headers = HeaderMap::new();
            let span = tracing::info_span!("untraced");
            span.in_scope(|| inject_current(&mut headers));
            assert!(headers.is_empty());
            assert!(matches!(
                set_remote_parent(&tracing::info_span!("handler"), &headers),
                Err(TraceContextError::TracingLayerMissing)
            ));
        });
    }
}
