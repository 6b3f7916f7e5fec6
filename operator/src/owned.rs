//! The objects the operator owns, as its watches last saw them, and what it last applied to each:
//! lets a reconcile skip a server-side apply that would change nothing, so that an idle operator
//! (periodic resyncs included) sends the apiserver no writes.
//!
//! The controller is fed by one reflector per owned kind (label `managed-by=shcr-operator`);
//! their stores are the watch caches read here. Only the Deployment is cached whole (its status
//! says whether the store is available); of the other kinds only metadata is kept.
//!
//! Invariants:
//! - An apply is skipped only when the desired document is identical to the one this process last
//!   applied to that object *and* the watch cache holds the object at the resourceVersion that
//!   apply returned, i.e. nothing has changed the object since. Anything else (a deleted object,
//!   an edited field, a status update, a lagging cache, a restarted operator with empty memory)
//!   applies again, so drift repair is unaffected.
//! - Checking costs no API request: it reads the watch caches.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, LimitRange, Namespace, ResourceQuota, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::care_system::CareSystem;
use crate::controller::FIELD_MANAGER;
use crate::workload::{MANAGED_BY, MANAGED_BY_LABEL, STORE_NAME, fnv1a};

/// Watch caches of the owned objects, and the record of what was applied.
pub struct OwnedObjects {
    pub(crate) namespaces: Store<PartialObjectMeta<Namespace>>,
    pub(crate) deployments: Store<Deployment>,
    pub(crate) service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pub(crate) roles: Store<PartialObjectMeta<Role>>,
    pub(crate) role_bindings: Store<PartialObjectMeta<RoleBinding>>,
    pub(crate) network_policies: Store<PartialObjectMeta<NetworkPolicy>>,
    pub(crate) resource_quotas: Store<PartialObjectMeta<ResourceQuota>>,
    pub(crate) limit_ranges: Store<PartialObjectMeta<LimitRange>>,
    pub(crate) config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub(crate) services: Store<PartialObjectMeta<Service>>,
    pub(crate) disruption_budgets: Store<PartialObjectMeta<PodDisruptionBudget>>,
    /// `kind/namespace/name` → what was last applied.
    applied: Mutex<HashMap<String, Applied>>,
}

#[derive(Debug, PartialEq, Eq)]
struct Applied {
    digest: u64,
    resource_version: String,
}

impl OwnedObjects {
    /// Adds a watch per owned kind to `controller` (each change to an owned object reconciles
    /// its CareSystem) and returns the caches those watches fill.
    pub fn watch(
        controller: Controller<CareSystem>,
        client: &Client,
    ) -> (Controller<CareSystem>, Self) {
        let config = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let (deployments, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(Api::<Deployment>::all(client.clone()), config.clone()).default_backoff(),
        )
        .touched_objects();
        let controller = controller.watches_stream(stream, owner_of);
        let (controller, namespaces) = watch_metadata(controller, client, &config);
        let (controller, service_accounts) = watch_metadata(controller, client, &config);
        let (controller, roles) = watch_metadata(controller, client, &config);
        let (controller, role_bindings) = watch_metadata(controller, client, &config);
        let (controller, network_policies) = watch_metadata(controller, client, &config);
        let (controller, resource_quotas) = watch_metadata(controller, client, &config);
        let (controller, limit_ranges) = watch_metadata(controller, client, &config);
        let (controller, config_maps) = watch_metadata(controller, client, &config);
        let (controller, services) = watch_metadata(controller, client, &config);
        let (controller, disruption_budgets) = watch_metadata(controller, client, &config);
        let owned = Self {
            namespaces,
            deployments,
            service_accounts,
            roles,
            role_bindings,
            network_policies,
            resource_quotas,
            limit_ranges,
            config_maps,
            services,
            disruption_budgets,
            applied: Mutex::new(HashMap::new()),
        };
        (controller, owned)
    }

    /// Whether applying `document` (an object of kind `K`) would change nothing: it is what was
    /// last applied, and the object has not changed since (per `cached`).
    pub(crate) fn unchanged<K, S>(&self, cached: &Store<S>, document: &Value) -> bool
    where
        K: Resource<DynamicType = ()>,
        S: Resource<DynamicType = ()> + Clone + 'static,
    {
        let (namespace, name) = document_name(document);
        let Some(current) = version_in(cached, namespace, name) else {
            return false;
        };
        let key = key::<K>(namespace, name);
        let wanted = Applied {
            digest: fnv1a(document.to_string().as_bytes()),
            resource_version: current,
        };
        self.lock().get(&key) == Some(&wanted)
    }

    /// Records that `document` was applied and the apiserver answered with `applied`.
    pub(crate) fn remember<K>(&self, document: &Value, applied: &K)
    where
        K: Resource<DynamicType = ()>,
    {
        let (namespace, name) = document_name(document);
        let Some(resource_version) = applied.meta().resource_version.clone() else {
            return;
        };
        self.lock().insert(
            key::<K>(namespace, name),
            Applied {
                digest: fnv1a(document.to_string().as_bytes()),
                resource_version,
            },
        );
    }

    /// Server-side applies `document` through `api` unless [`Self::unchanged`]; returns the
    /// object the apiserver answered with, or `None` when the apply was skipped.
    pub(crate) async fn apply<K, S>(
        &self,
        api: &Api<K>,
        cached: &Store<S>,
        document: &Value,
    ) -> Result<Option<K>, kube::Error>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
        S: Resource<DynamicType = ()> + Clone + 'static,
    {
        if self.unchanged::<K, S>(cached, document) {
            return Ok(None);
        }
        let (_, name) = document_name(document);
        let applied = api
            .patch(name, &apply_params(), &Patch::Apply(document))
            .await?;
        self.remember(document, &applied);
        Ok(Some(applied))
    }

    /// The store Deployment of `namespace` as last watched.
    pub(crate) fn cached_deployment(&self, namespace: &str) -> Option<Deployment> {
        self.deployments
            .get(&ObjectRef::new(STORE_NAME).within(namespace))
            .map(|deployment| Deployment::clone(&deployment))
    }

    /// Forgets what was applied in `namespace` (and to the namespace itself): its care system is
    /// gone.
    pub(crate) fn forget(&self, namespace: &str) {
        let namespace_key = key::<Namespace>(None, namespace);
        self.lock()
            .retain(|key, _| *key != namespace_key && key.split('/').nth(1) != Some(namespace));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Applied>> {
        // The map holds plain values: a panic while it was locked cannot leave it inconsistent.
        self.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Server-side apply as the operator's field manager, taking ownership of conflicting fields and
/// rejecting unknown fields.
pub(crate) fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict()
}

fn watch_metadata<K>(
    controller: Controller<CareSystem>,
    client: &Client,
    config: &watcher::Config,
) -> (Controller<CareSystem>, Store<PartialObjectMeta<K>>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<PartialObjectMeta<K>>::all(client.clone()),
            config.clone(),
        )
        .default_backoff(),
    )
    .touched_objects();
    (controller.watches_stream(stream, owner_of), store)
}

/// The CareSystem that owns `object`. Owned objects live in the care system's namespace while
/// the CareSystem is cluster-scoped, so the reference must carry no namespace (the generic
/// `Controller::owns` would copy the child's).
pub(crate) fn owner_of<K: Resource>(object: K) -> Option<ObjectRef<CareSystem>> {
    object
        .meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|owner| {
            owner.kind == CareSystem::kind(&()) && owner.api_version == CareSystem::api_version(&())
        })
        .map(|owner| ObjectRef::new(&owner.name))
}

fn document_name(document: &Value) -> (Option<&str>, &str) {
    let metadata = &document["metadata"];
    (
        metadata["namespace"].as_str(),
        metadata["name"].as_str().unwrap_or_default(),
    )
}

fn key<K: Resource<DynamicType = ()>>(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{}/{name}", K::kind(&()), namespace.unwrap_or_default())
}

fn version_in<S>(store: &Store<S>, namespace: Option<&str>, name: &str) -> Option<String>
where
    S: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut reference = ObjectRef::<S>::new(name);
    if let Some(namespace) = namespace {
        reference = reference.within(namespace);
    }
    store.get(&reference)?.meta().resource_version.clone()
}
