//! The CareSystem controller: one reconcile function of (CareSystem, context) → action.
//!
//! Order of work for a CareSystem that is not being deleted:
//! 1. finalizer (added before any cloud resource exists, by `kube::runtime::finalizer`);
//! 2. namespace `care-<name>` → `NamespaceReady`;
//! 3. KMS key (created or adopted) → `KeyReady`;
//! 4. bucket (created or adopted, encrypted under that key) → `BucketReady`;
//! 5. the store's namespaced objects by server-side apply → `StoreReady` once the Deployment
//!    reports its replicas available;
//! 6. status: `Ready` (all of the above), `Synced` (this reconcile succeeded), `observedGeneration`.
//!
//! Invariants:
//! - Every write uses server-side apply with the field manager [`FIELD_MANAGER`]; objects the
//!   operator manages are owned by their CareSystem, and a change to one of them (or its
//!   deletion) triggers a reconcile, which re-applies it (drift repair).
//! - An apply that would change nothing is skipped ([`crate::owned`]), and status is written
//!   only when it changed, so an idle operator (resyncs included) makes no API writes.
//! - A transient failure (cloud throttling, 5xx, network, apiserver) returns an error and is
//!   retried with jittered backoff; a permanent one (permission denied, a bucket owned by someone
//!   else) is reported as a False condition and retried only at the resync interval.
//! - `paused: true` makes no changes but keeps (and reports) status; deletion still applies the
//!   deletion policy.
//! - Deleting a CareSystem deletes its bucket and key only under `deletionPolicy: Delete`, and
//!   only resources tagged as this care system's. A failed deletion shows in status and Events
//!   and keeps the finalizer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, LimitRange, Namespace, ResourceQuota, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{self as kube_controller, Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::bucket::{BucketDeletion, BucketProvisioner, BucketSettings};
use crate::care_system::{CareSystem, CareSystemStatus, DeletionPolicy, condition};
use crate::cloud::CloudError;
use crate::config::{AssertionPublicKey, OperatorConfig};
use crate::key::{KeyDeletion, KeyProvisioner};
use crate::metrics::OperatorMetrics;
use crate::owned::{OwnedObjects, apply_params};
use crate::workload::{Provisioned, STORE_NAME, Workload};

/// The server-side apply field manager of every write.
pub const FIELD_MANAGER: &str = "shcr-operator";
/// The finalizer that guards cloud resources.
pub const FINALIZER: &str = "shcr.dev/cloud-resources";

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {}", kube_message(.0))]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error(
        "namespace {namespace} exists and does not belong to this CareSystem; delete or rename it"
    )]
    NamespaceTaken { namespace: String },
    #[error("the CareSystem has no name or uid (it was not read from the apiserver)")]
    Unnamed,
    #[error("cannot serialise the status: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

/// A kube error in one line: for an API refusal, the apiserver's own message (which already
/// names the verb, resource and reason) rather than the whole `Status` object.
fn kube_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

impl Error {
    /// Whether retrying soon could help.
    fn is_transient(&self) -> bool {
        match self {
            Self::Cloud(error) => error.is_transient(),
            Self::NamespaceTaken { .. } | Self::Unnamed | Self::Serialize(_) => false,
            Self::Kube(_) | Self::Finalizer(_) => true,
        }
    }

    fn reason(&self) -> &str {
        match self {
            Self::Cloud(error) => error.reason(),
            Self::NamespaceTaken { .. } => "NamespaceTaken",
            Self::Kube(_) => "KubernetesApiError",
            Self::Unnamed | Self::Serialize(_) | Self::Finalizer(_) => "InternalError",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    config: OperatorConfig,
    assertion_public_key: AssertionPublicKey,
    keys: KeyProvisioner,
    buckets: BucketProvisioner,
    recorder: Recorder,
    metrics: OperatorMetrics,
}

impl Context {
    /// `assertion_public_key` is the gateway's key every store is configured with (see
    /// [`AssertionPublicKey::load`]).
    pub fn new(
        client: Client,
        config: OperatorConfig,
        assertion_public_key: AssertionPublicKey,
        s3: aws_sdk_s3::Client,
        kms: aws_sdk_kms::Client,
        metrics: OperatorMetrics,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            assertion_public_key,
            keys: KeyProvisioner::new(kms),
            buckets: BucketProvisioner::new(s3),
            metrics,
        }
    }
}

impl Context {
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn config(&self) -> &OperatorConfig {
        &self.config
    }
}

/// Runs the controller until `shutdown` completes (then finishes in-flight reconciles). Watches
/// the CareSystems matching `care_system_selector` and every object the operator manages.
pub async fn run(
    context: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = context.client.clone();
    let mut care_systems = watcher::Config::default();
    if let Some(selector) = &context.config.care_system_selector {
        care_systems = care_systems.labels(selector);
    }
    let controller = Controller::new(Api::<CareSystem>::all(client.clone()), care_systems)
        .with_config(
            kube_controller::Config::default().concurrency(context.config.reconcile_concurrency),
        );
    let (controller, owned) = OwnedObjects::watch(controller, &client);
    let reconciler = Arc::new(Reconciler { context, owned });
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, reconciler)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(care_system = %object.name, "reconciled"),
                Err(error) => tracing::warn!(error = %error, "reconcile failed"),
            }
        })
        .await;
}

/// What one run of the controller shares: the context, and the watch caches of owned objects.
struct Reconciler {
    context: Arc<Context>,
    owned: OwnedObjects,
}

/// Reconciles one CareSystem.
async fn reconcile(
    care_system: Arc<CareSystem>,
    reconciler: Arc<Reconciler>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let context = &reconciler.context;
    let owned = &reconciler.owned;
    let api = Api::<CareSystem>::all(context.client.clone());
    let result = finalizer(&api, FINALIZER, care_system, |event| async {
        match event {
            Finalizer::Apply(care_system) => apply(&care_system, context, owned).await,
            Finalizer::Cleanup(care_system) => cleanup(&care_system, context, owned).await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)));
    context
        .metrics
        .reconciled(started.elapsed(), result.is_err());
    result
}

/// Backoff for transient failures: 5 to 10 seconds, jittered so many care systems failing
/// together (a cloud outage) do not retry in lockstep.
fn error_policy(
    care_system: Arc<CareSystem>,
    error: &Error,
    _reconciler: Arc<Reconciler>,
) -> Action {
    tracing::warn!(care_system = %care_system.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_millis(5_000 + jitter_millis(5_000)))
}

fn jitter_millis(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| u64::from(since.subsec_nanos()));
    nanos % max.max(1)
}

/// Reasons of a False condition that mean "on its way" or "as asked", not "something is wrong":
/// their Events are Normal, not Warning.
const PROGRESS_REASONS: &[&str] = &[
    "StoreStarting",
    "StoreNotAvailable",
    "StoreStopped",
    "Paused",
];

/// Conditions set during one reconcile, and the transitions worth an Event.
struct StatusUpdate {
    status: CareSystemStatus,
    generation: Option<i64>,
    transitions: Vec<KubeEvent>,
}

impl StatusUpdate {
    fn new(care_system: &CareSystem) -> Self {
        Self {
            status: care_system.status.clone().unwrap_or_default(),
            generation: care_system.metadata.generation,
            transitions: Vec::new(),
        }
    }

    fn set(&mut self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
        let message = message.into();
        if self
            .status
            .set_condition(type_, ok, reason, message.clone(), self.generation)
        {
            self.transitions.push(KubeEvent {
                type_: if ok || PROGRESS_REASONS.contains(&reason) {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: reason.to_owned(),
                note: Some(format!(
                    "{type_}={}: {message}",
                    if ok { "True" } else { "False" }
                )),
                action: "Reconcile".to_owned(),
                secondary: None,
            });
        }
    }
}

async fn apply(
    care_system: &CareSystem,
    context: &Context,
    owned: &OwnedObjects,
) -> Result<Action, Error> {
    let name = care_system.name_any();
    let mut update = StatusUpdate::new(care_system);

    if care_system.spec.paused {
        update.set(
            condition::SYNCED,
            false,
            "Paused",
            "spec.paused is true: the operator makes no changes to this care system",
        );
        update.status.message = Some("paused: set spec.paused to false to resume".to_owned());
        update.status.observed_generation = update.generation;
        write_status(care_system, update, context).await?;
        return Ok(Action::await_change());
    }

    let outcome = provision(care_system, context, owned, &mut update).await;
    let ready = [
        condition::NAMESPACE_READY,
        condition::KEY_READY,
        condition::BUCKET_READY,
        condition::STORE_READY,
    ]
    .iter()
    .all(|type_| update.status.is_true(type_));
    match &outcome {
        Ok(()) => {
            update.set(
                condition::SYNCED,
                true,
                "ReconcileSucceeded",
                "all resources are applied",
            );
            if ready {
                update.set(
                    condition::READY,
                    true,
                    "StoreAvailable",
                    "the record store is serving",
                );
                update.status.message = Some("ready".to_owned());
            } else {
                let waiting = "waiting for the store Deployment to report its replicas available";
                update.set(condition::READY, false, "StoreNotAvailable", waiting);
                update.status.message = Some(waiting.to_owned());
            }
        }
        Err(error) => {
            update.set(condition::SYNCED, false, error.reason(), error.to_string());
            if !ready {
                update.set(condition::READY, false, error.reason(), error.to_string());
            }
            update.status.message = Some(error.to_string());
        }
    }
    update.status.observed_generation = update.generation;
    context.metrics.set_ready(&name, Some(ready));
    write_status(care_system, update, context).await?;

    match outcome {
        Ok(()) => Ok(Action::requeue(context.config.resync_interval)),
        Err(error) if error.is_transient() => Err(error),
        Err(error) => {
            tracing::warn!(care_system = %name, %error, "care system needs attention");
            Ok(Action::requeue(context.config.resync_interval))
        }
    }
}

async fn provision(
    care_system: &CareSystem,
    context: &Context,
    owned: &OwnedObjects,
    update: &mut StatusUpdate,
) -> Result<(), Error> {
    let name = care_system.name_any();
    let workload = Workload::new(care_system, &context.config).ok_or(Error::Unnamed)?;
    let namespace = workload.namespace_name().to_owned();

    // Namespace.
    let step = ensure_namespace(care_system, &workload, context, owned).await;
    record(
        update,
        condition::NAMESPACE_READY,
        &step,
        "NamespaceReady",
        || format!("namespace {namespace} is applied"),
    );
    step?;
    update.status.namespace = Some(namespace.clone());

    // KMS key.
    let step = context
        .keys
        .ensure(&name, &care_system.spec.encryption)
        .await
        .map_err(Error::from);
    record(update, condition::KEY_READY, &step, "KeyReady", || {
        "the KMS key is enabled".to_owned()
    });
    let key = step?;
    update.status.kms_key_arn = Some(key.arn.clone());

    // Bucket.
    let bucket = bucket_name(care_system).ok_or(Error::Unnamed)?;
    let step = context
        .buckets
        .ensure(&BucketSettings {
            name: &bucket,
            region: &care_system.spec.storage.region,
            care_system: &name,
            kms_key_arn: &key.arn,
            retention_days: care_system.spec.storage.retention_days,
        })
        .await
        .map_err(Error::from);
    record(
        update,
        condition::BUCKET_READY,
        &step,
        "BucketReady",
        || format!("bucket {bucket} is configured"),
    );
    step?;
    update.status.bucket = Some(bucket.clone());

    // Store workload.
    let provisioned = Provisioned {
        bucket: &bucket,
        kms_key_arn: &key.arn,
        assertion_public_key: context.assertion_public_key.pem(),
    };
    let step = apply_workload(&workload, &provisioned, context, owned).await;
    if let Err(error) = &step {
        update.set(
            condition::STORE_READY,
            false,
            error.reason(),
            error.to_string(),
        );
    }
    let deployment = step?;
    update.status.endpoint = Some(workload.endpoint());
    let (available, reason, message) =
        store_availability(&deployment, care_system.spec.store.replicas);
    update.set(condition::STORE_READY, available, reason, message);
    Ok(())
}

/// Sets condition `type_` from a step's outcome.
fn record<T>(
    update: &mut StatusUpdate,
    type_: &str,
    step: &Result<T, Error>,
    ok_reason: &str,
    ok_message: impl FnOnce() -> String,
) {
    match step {
        Ok(_) => update.set(type_, true, ok_reason, ok_message()),
        Err(error) => update.set(type_, false, error.reason(), error.to_string()),
    }
}

/// The bucket of a care system: the one the spec names, or `shcr-<name>-<uid prefix>` (at most
/// 63 characters; the uid keeps a re-created CareSystem of the same name from reusing the old
/// one's retained bucket).
pub fn bucket_name(care_system: &CareSystem) -> Option<String> {
    if let Some(name) = &care_system.spec.storage.bucket_name {
        return Some(name.clone());
    }
    let name = care_system.metadata.name.as_deref()?;
    let uid = care_system.metadata.uid.as_deref()?;
    let uid_prefix: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let name: String = name
        .chars()
        .take(63 - "shcr-".len() - 1 - uid_prefix.len())
        .collect();
    Some(format!(
        "shcr-{}-{uid_prefix}",
        name.trim_end_matches(['-', '.'])
    ))
}

async fn ensure_namespace(
    care_system: &CareSystem,
    workload: &Workload<'_>,
    context: &Context,
    owned: &OwnedObjects,
) -> Result<(), Error> {
    let document = workload.namespace();
    if owned.unchanged::<Namespace, _>(&owned.namespaces, &document) {
        return Ok(());
    }
    let api = Api::<Namespace>::all(context.client.clone());
    let name = workload.namespace_name();
    if let Some(existing) = api.get_opt(name).await? {
        let uid = care_system.metadata.uid.as_deref();
        let ours = existing
            .owner_references()
            .iter()
            .any(|owner| Some(owner.uid.as_str()) == uid);
        if !ours {
            return Err(Error::NamespaceTaken {
                namespace: name.to_owned(),
            });
        }
    }
    let applied = api
        .patch(name, &apply_params(), &Patch::Apply(&document))
        .await?;
    owned.remember(&document, &applied);
    Ok(())
}

/// Applies one namespaced object unless that would change nothing ([`OwnedObjects::apply`]).
async fn apply_namespaced<K, S>(
    client: &Client,
    owned: &OwnedObjects,
    cached: &Store<S>,
    namespace: &str,
    document: &Value,
) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    S: Resource<DynamicType = ()> + Clone + 'static,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    Ok(owned.apply(&api, cached, document).await?)
}

async fn apply_workload(
    workload: &Workload<'_>,
    provisioned: &Provisioned<'_>,
    context: &Context,
    owned: &OwnedObjects,
) -> Result<Deployment, Error> {
    let client = &context.client;
    let ns = workload.namespace_name();
    let o = owned;
    apply_namespaced::<ServiceAccount, _>(
        client,
        o,
        &o.service_accounts,
        ns,
        &workload.service_account(),
    )
    .await?;
    apply_namespaced::<Role, _>(client, o, &o.roles, ns, &workload.role()).await?;
    apply_namespaced::<RoleBinding, _>(client, o, &o.role_bindings, ns, &workload.role_binding())
        .await?;
    for policy in [
        workload.default_deny_policy(),
        workload.gateway_ingress_policy(),
        workload.store_egress_policy(),
    ] {
        apply_namespaced::<NetworkPolicy, _>(client, o, &o.network_policies, ns, &policy).await?;
    }
    apply_namespaced::<ResourceQuota, _>(
        client,
        o,
        &o.resource_quotas,
        ns,
        &workload.resource_quota(),
    )
    .await?;
    apply_namespaced::<LimitRange, _>(client, o, &o.limit_ranges, ns, &workload.limit_range())
        .await?;
    let config_map = workload.config_map(provisioned);
    apply_namespaced::<ConfigMap, _>(client, o, &o.config_maps, ns, &config_map).await?;
    let document = workload.deployment(&config_map);
    let applied =
        apply_namespaced::<Deployment, _>(client, o, &o.deployments, ns, &document).await?;
    let deployment = match applied.or_else(|| o.cached_deployment(ns)) {
        Some(deployment) => deployment,
        // Skipped, yet gone from the cache since: apply after all.
        None => {
            let api = Api::<Deployment>::namespaced(client.clone(), ns);
            let deployment = api
                .patch(STORE_NAME, &apply_params(), &Patch::Apply(&document))
                .await?;
            o.remember(&document, &deployment);
            deployment
        }
    };
    apply_namespaced::<Service, _>(client, o, &o.services, ns, &workload.service()).await?;
    apply_namespaced::<PodDisruptionBudget, _>(
        client,
        o,
        &o.disruption_budgets,
        ns,
        &workload.pod_disruption_budget(),
    )
    .await?;
    Ok(deployment)
}

/// Whether the store Deployment reports what was asked of it: the current generation observed,
/// every replica updated and available.
fn store_availability(deployment: &Deployment, replicas: i32) -> (bool, &'static str, String) {
    if replicas == 0 {
        return (
            false,
            "StoreStopped",
            "spec.store.replicas is 0: the store is stopped".to_owned(),
        );
    }
    let Some(status) = &deployment.status else {
        return (
            false,
            "StoreStarting",
            "the store Deployment reports no status yet".to_owned(),
        );
    };
    let observed = status.observed_generation >= deployment.metadata.generation;
    let updated = status.updated_replicas.unwrap_or(0) >= replicas;
    let available = status.available_replicas.unwrap_or(0) >= replicas;
    if observed && updated && available {
        (
            true,
            "StoreAvailable",
            format!("{replicas} store replica(s) available"),
        )
    } else {
        (
            false,
            "StoreStarting",
            format!(
                "{} of {replicas} store replica(s) available",
                status.available_replicas.unwrap_or(0)
            ),
        )
    }
}

async fn write_status(
    care_system: &CareSystem,
    update: StatusUpdate,
    context: &Context,
) -> Result<(), Error> {
    let reference = care_system.object_ref(&());
    for event in &update.transitions {
        if let Err(error) = context.recorder.publish(event, &reference).await {
            tracing::warn!(%error, "cannot publish an Event");
        }
    }
    if care_system.status.as_ref() == Some(&update.status) {
        return Ok(());
    }
    let api = Api::<CareSystem>::all(context.client.clone());
    let patch = serde_json::json!({
        "apiVersion": CareSystem::api_version(&()),
        "kind": CareSystem::kind(&()),
        "status": serde_json::to_value(&update.status)?,
    });
    api.patch_status(
        &care_system.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

async fn cleanup(
    care_system: &CareSystem,
    context: &Context,
    owned: &OwnedObjects,
) -> Result<Action, Error> {
    let name = care_system.name_any();
    let reference = care_system.object_ref(&());
    let bucket = bucket_name(care_system).ok_or(Error::Unnamed)?;
    let key = care_system
        .status
        .as_ref()
        .and_then(|status| status.kms_key_arn.clone())
        .or_else(|| care_system.spec.encryption.kms_key_arn.clone())
        .unwrap_or_else(|| "(none created)".to_owned());
    context.metrics.set_ready(&name, None);
    owned.forget(&care_system.namespace_name());

    let note = match care_system.spec.deletion_policy {
        DeletionPolicy::Retain => format!(
            "deletionPolicy is Retain: bucket {bucket} and KMS key {key} are kept; delete them \
             by hand when no longer needed"
        ),
        DeletionPolicy::Delete => match delete_cloud_resources(care_system, &bucket, context).await
        {
            Ok(note) => note,
            Err(error) => {
                let mut update = StatusUpdate::new(care_system);
                update.set(
                    condition::SYNCED,
                    false,
                    error.reason(),
                    format!("deletion is blocked: {error}"),
                );
                update.status.message = Some(format!("deletion is blocked: {error}"));
                write_status(care_system, update, context).await?;
                return Err(error);
            }
        },
    };
    let event = KubeEvent {
        type_: EventType::Normal,
        reason: match care_system.spec.deletion_policy {
            DeletionPolicy::Retain => "CloudResourcesRetained",
            DeletionPolicy::Delete => "CloudResourcesDeleted",
        }
        .to_owned(),
        note: Some(note),
        action: "Delete".to_owned(),
        secondary: None,
    };
    if let Err(error) = context.recorder.publish(&event, &reference).await {
        tracing::warn!(%error, "cannot publish an Event");
    }
    Ok(Action::await_change())
}

async fn delete_cloud_resources(
    care_system: &CareSystem,
    bucket: &str,
    context: &Context,
) -> Result<String, Error> {
    let name = care_system.name_any();
    let bucket_note = match context
        .buckets
        .delete(bucket, &care_system.spec.storage.region, &name)
        .await?
    {
        BucketDeletion::Deleted => format!("bucket {bucket} deleted"),
        BucketDeletion::NotFound => format!("bucket {bucket} was already gone"),
    };
    let key_note = if let Some(arn) = &care_system.spec.encryption.kms_key_arn {
        format!("KMS key {arn} was provided in the spec and is kept")
    } else {
        match context
            .keys
            .schedule_deletion(&name, context.config.key_deletion_window_days)
            .await?
        {
            KeyDeletion::Scheduled { arn } => format!(
                "KMS key {arn} scheduled for deletion in {} days",
                context.config.key_deletion_window_days
            ),
            KeyDeletion::NotFound => "no managed KMS key was found".to_owned(),
        }
    };
    Ok(format!("{bucket_note}; {key_note}"))
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    #[test]
    fn generated_bucket_names_fit_s3_limits() {
        let spec = serde_json::from_value(serde_json::json!({
            "odsCode": "QWO", "displayName": "x", "storage": {"region": "eu-west-2"}
        }))
        .expect("spec parses");
        let mut care_system = CareSystem::new("x", spec);
        care_system.metadata = ObjectMeta {
            name: Some("a".repeat(58)),
            uid: Some("1234abcd-0000-4000-8000-000000000000".to_owned()),
            ..ObjectMeta::default()
        };
        let name = bucket_name(&care_system).expect("named");
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.starts_with("shcr-a") && name.ends_with("-1234abcd"),
            "{name}"
        );
    }
}
