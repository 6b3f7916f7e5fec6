//! Spans reach a real OTLP/HTTP receiver: the test runs a minimal collector (POST /v1/traces,
//! protobuf body), points `telemetry::init` at it and checks what arrives.
//!
//! `init` installs the process-wide subscriber, which can happen once per process, so this file
//! holds exactly one test.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use shcr_runtime::telemetry::{self, TelemetryConfig};
use shcr_runtime::trace_context;
use tokio::sync::mpsc;

async fn receive_traces(
    State(received): State<mpsc::Sender<ExportTraceServiceRequest>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, Vec<u8>) {
    // The exporter is built without compression; a compressed body would be a change to notice.
    if headers.contains_key(header::CONTENT_ENCODING) {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            let _ = received.send(request).await;
            (
                StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(_) => (StatusCode::BAD_REQUEST, Vec::new()),
    }
}

fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| match attribute.value.as_ref() {
            Some(AnyValue {
                value: Some(any_value::Value::StringValue(value)),
            }) => Some(value.as_str()),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_http_receiver() {
    let (sender, mut received) = mpsc::channel(64);
    let collector = Router::new()
        .route("/v1/traces", post(receive_traces))
        .with_state(sender);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let address = listener.local_addr().expect("receiver address");
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let config = TelemetryConfig {
        otlp_endpoint: Some(
            format!("http://{address}")
                .parse()
                .expect("endpoint URL parses"),
        ),
        service_name: "otlp-export-test".to_owned(),
        ..TelemetryConfig::default()
    };
    let guard = telemetry::init(&config).expect("telemetry starts");

    tracing::info_span!("import_bundle", care_system = "north-east").in_scope(|| {
        tracing::info!("importing");
    });

    // The gateway → store hop, through the subscriber `init` installed.
    let mut headers = HeaderMap::new();
    tracing::info_span!("gateway_forward").in_scope(|| trace_context::inject_current(&mut headers));
    let handler = tracing::info_span!("store_request");
    trace_context::set_remote_parent(&handler, &headers).expect("the store joins the trace");
    handler.in_scope(|| tracing::info!("handled"));
    drop(handler);

    // Flushing blocks until the receiver has answered, and the receiver runs on this runtime.
    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .expect("flush task does not panic")
        .expect("spans are flushed");

    let mut requests = vec![
        tokio::time::timeout(Duration::from_secs(10), received.recv())
            .await
            .expect("the receiver gets an export within 10 s")
            .expect("the receiver is still running"),
    ];
    // Shutdown has waited for every export, so any further batches are already queued.
    while let Ok(request) = received.try_recv() {
        requests.push(request);
    }
    let resource_spans: Vec<_> = requests
        .iter()
        .flat_map(|request| &request.resource_spans)
        .collect();
    let span_named = |name: &str| {
        resource_spans
            .iter()
            .flat_map(|resource_spans| &resource_spans.scope_spans)
            .flat_map(|scope| &scope.spans)
            .find(|span| span.name == name)
            .unwrap_or_else(|| panic!("no span named {name} in {requests:#?}"))
    };

    for resource_spans in &resource_spans {
        let resource = resource_spans.resource.as_ref().expect("a resource");
        assert_eq!(
            string_attribute(&resource.attributes, "service.name"),
            Some("otlp-export-test")
        );
    }

    let import = span_named("import_bundle");
    assert_eq!(
        string_attribute(&import.attributes, "care_system"),
        Some("north-east"),
        "span attributes: {:#?}",
        import.attributes
    );
    assert_eq!(import.trace_id.len(), 16, "a W3C trace id");

    let forward = span_named("gateway_forward");
    let store = span_named("store_request");
    assert_eq!(store.trace_id, forward.trace_id, "one trace across the hop");
    assert_eq!(
        store.parent_span_id, forward.span_id,
        "the store span is the gateway span's child"
    );
    assert_ne!(
        import.trace_id, forward.trace_id,
        "unrelated work is a separate trace"
    );
}
