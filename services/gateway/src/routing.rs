//! The routing table: care system name → its store's endpoint, member organisations and
//! readiness, kept current from `CareSystem` objects.
//!
//! Two sources fill a [`TenantRouter`]:
//! - [`TenantRouter::follow_kube`]: a kube watcher over every `CareSystem` in the cluster; a care
//!   system created, changed or deleted takes effect on the next request, without a restart.
//!   After every (re)list the table is replaced as a whole, so a deletion missed while the watch
//!   was down is still applied.
//! - [`TenantRouter::set_static`]: manifests on disk with endpoints known up front (`shcr dev`,
//!   or a gateway configured with a manifests file).
//!
//! Invariants:
//! - A care system is routable only when its `Ready` condition is `True` *and* its status names
//!   an endpoint URL the proxy can use; anything else known is "not ready" (503), never a guess.
//! - A care system's [`CareSystemLimiter`] survives updates to its entry and is dropped only with
//!   the care system, so a CareSystem edit does not reset its budget.
//! - Lookups are a read lock and an `Arc` clone: the table is swapped, never mutated in place
//!   under a reader.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use futures::StreamExt;
use http::uri::{Authority, Scheme};
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use shcr_operator::CareSystem;
use shcr_operator::care_system::condition;

use crate::limits::{CareSystemLimiter, LimitsConfig};

/// Where a care system's store answers: scheme, authority and an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Prepended to the request path (no trailing slash; empty for none).
    pub path_prefix: String,
}

/// Why an endpoint URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("endpoint {0:?} is not a URL: {1}")]
    NotAUrl(String, String),
    #[error(
        "endpoint {0:?} is not an http:// URL with a host (the gateway reaches stores over the cluster network)"
    )]
    Unsupported(String),
}

impl Upstream {
    /// Parses a store endpoint such as `http://store.care-x.svc:8080`.
    pub fn parse(endpoint: &str) -> Result<Self, EndpointError> {
        let uri: http::Uri = endpoint.parse().map_err(|e: http::uri::InvalidUri| {
            EndpointError::NotAUrl(endpoint.to_owned(), e.to_string())
        })?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(EndpointError::Unsupported(endpoint.to_owned()));
        };
        if *scheme != Scheme::HTTP || uri.query().is_some() {
            return Err(EndpointError::Unsupported(endpoint.to_owned()));
        }
        Ok(Self {
            scheme: scheme.clone(),
            authority: authority.clone(),
            path_prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// One care system as the gateway sees it.
#[derive(Debug)]
pub struct Route {
    /// The care system's name (the first path segment).
    pub care_system: String,
    /// Its display name, for SMART discovery.
    pub display_name: String,
    /// The store, when the care system is ready and names a usable endpoint.
    pub upstream: Option<Upstream>,
    /// ODS codes of the member organisations, sorted, each once.
    pub members: Vec<String>,
    /// Why it is not routable, when it is not (for logs; never shown to clients).
    pub not_ready_reason: Option<String>,
    /// Its admission limits.
    pub limiter: Arc<CareSystemLimiter>,
}

impl Route {
    /// Whether `ods_code` is a member organisation.
    pub fn is_member(&self, ods_code: &str) -> bool {
        self.members
            .binary_search_by(|m| m.as_str().cmp(ods_code))
            .is_ok()
    }
}

/// The description of one care system, before it is placed in the table.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub care_system: String,
    pub display_name: String,
    pub endpoint: Option<String>,
    pub members: BTreeSet<String>,
    pub ready: bool,
}

impl RouteSpec {
    /// What a `CareSystem` object says: readiness from its `Ready` condition, the endpoint from
    /// `status.endpoint`.
    pub fn from_care_system(care_system: &CareSystem) -> Option<Self> {
        let name = care_system.metadata.name.clone()?;
        let status = care_system.status.clone().unwrap_or_default();
        Some(Self {
            care_system: name,
            display_name: care_system.spec.display_name.clone(),
            endpoint: status.endpoint.clone(),
            members: care_system.spec.members.iter().cloned().collect(),
            ready: status.is_true(condition::READY),
        })
    }
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// No such care system.
    Unknown,
    /// Known, but its store cannot take requests now.
    NotReady(Arc<Route>),
    /// Known and ready.
    Ready(Arc<Route>, Upstream),
}

/// Why the kube source stopped.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot connect to Kubernetes to watch CareSystems: {0}")]
    Kube(#[from] kube::Error),
}

/// The routing table; cheap to clone (clones share the table).
#[derive(Debug, Clone)]
pub struct TenantRouter {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    table: RwLock<Arc<HashMap<String, Arc<Route>>>>,
    limits: LimitsConfig,
    /// Set once the first complete list has been loaded.
    synced: std::sync::atomic::AtomicBool,
}

impl TenantRouter {
    /// An empty table whose care systems get `limits`.
    pub fn new(limits: LimitsConfig) -> Self {
        Self {
            inner: Arc::new(Shared {
                table: RwLock::new(Arc::new(HashMap::new())),
                limits,
                synced: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Finds `care_system`.
    pub fn resolve(&self, care_system: &str) -> Resolution {
        let table = self.snapshot();
        match table.get(care_system) {
            None => Resolution::Unknown,
            Some(route) => match &route.upstream {
                Some(upstream) => Resolution::Ready(route.clone(), upstream.clone()),
                None => Resolution::NotReady(route.clone()),
            },
        }
    }

    /// Every care system, by name.
    pub fn care_systems(&self) -> Vec<Arc<Route>> {
        let mut routes: Vec<_> = self.snapshot().values().cloned().collect();
        routes.sort_by(|a, b| a.care_system.cmp(&b.care_system));
        routes
    }

    /// Whether the table has been loaded once (a gateway is ready only after that).
    pub fn is_synced(&self) -> bool {
        self.inner.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    fn snapshot(&self) -> Arc<HashMap<String, Arc<Route>>> {
        self.inner
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the whole table with `specs`.
    pub fn set_static(&self, specs: impl IntoIterator<Item = RouteSpec>) {
        self.replace_all(specs.into_iter().collect());
        self.inner
            .synced
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn build(&self, spec: RouteSpec, previous: Option<&Arc<Route>>) -> Arc<Route> {
        let limiter = previous
            .map(|p| p.limiter.clone())
            .unwrap_or_else(|| Arc::new(CareSystemLimiter::new(&self.inner.limits)));
        let (upstream, not_ready_reason) = match (&spec.endpoint, spec.ready) {
            (None, _) => (None, Some("its status names no endpoint".to_owned())),
            (_, false) => (None, Some("its Ready condition is not True".to_owned())),
            (Some(endpoint), true) => match Upstream::parse(endpoint) {
                Ok(upstream) => (Some(upstream), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        if let Some(reason) = &not_ready_reason {
            tracing::debug!(care_system = %spec.care_system, %reason, "care system not routable");
        }
        Arc::new(Route {
            care_system: spec.care_system,
            display_name: spec.display_name,
            upstream,
            members: spec.members.into_iter().collect(),
            not_ready_reason,
            limiter,
        })
    }

    fn replace_all(&self, specs: Vec<RouteSpec>) {
        let mut guard = self
            .inner
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let old = guard.clone();
        let table = specs
            .into_iter()
            .map(|spec| {
                let name = spec.care_system.clone();
                let route = self.build(spec, old.get(&name));
                (name, route)
            })
            .collect();
        *guard = Arc::new(table);
    }

    /// Adds or replaces one care system.
    pub fn upsert(&self, spec: RouteSpec) {
        let mut guard = self
            .inner
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut table = HashMap::clone(&guard);
        let name = spec.care_system.clone();
        let route = self.build(spec, table.get(&name));
        tracing::info!(care_system = %name, routable = route.upstream.is_some(), "care system route updated");
        table.insert(name, route);
        *guard = Arc::new(table);
    }

    /// Removes one care system.
    pub fn remove(&self, care_system: &str) {
        let mut guard = self
            .inner
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if guard.contains_key(care_system) {
            let mut table = HashMap::clone(&guard);
            table.remove(care_system);
            *guard = Arc::new(table);
            tracing::info!(care_system, "care system route removed");
        }
    }

    /// Follows every `CareSystem` in the cluster until `shutdown` resolves. Watch errors are
    /// retried with backoff (the table keeps serving what it last knew); the function returns
    /// only at shutdown.
    pub async fn follow_kube(
        &self,
        client: kube::Client,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let api: Api<CareSystem> = Api::all(client);
        let events = watcher(api, watcher::Config::default()).default_backoff();
        let mut events = std::pin::pin!(events);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut relist: Option<Vec<RouteSpec>> = None;
        loop {
            let event = tokio::select! {
                () = &mut shutdown => return,
                event = events.next() => event,
            };
            let Some(event) = event else { return };
            match event {
                Ok(watcher::Event::Init) => relist = Some(Vec::new()),
                Ok(watcher::Event::InitApply(object)) => {
                    if let (Some(list), Some(spec)) =
                        (relist.as_mut(), RouteSpec::from_care_system(&object))
                    {
                        list.push(spec);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let specs = relist.take().unwrap_or_default();
                    tracing::info!(care_systems = specs.len(), "CareSystem routes loaded");
                    self.set_static(specs);
                }
                Ok(watcher::Event::Apply(object)) => {
                    if let Some(spec) = RouteSpec::from_care_system(&object) {
                        self.upsert(spec);
                    }
                }
                Ok(watcher::Event::Delete(object)) => {
                    if let Some(name) = object.metadata.name.as_deref() {
                        self.remove(name);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "watching CareSystems failed; retrying, routes kept as they were");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, endpoint: Option<&str>, ready: bool) -> RouteSpec {
        RouteSpec {
            care_system: name.to_owned(),
            display_name: name.to_owned(),
            endpoint: endpoint.map(str::to_owned),
            members: BTreeSet::from(["RR8".to_owned()]),
            ready,
        }
    }

    #[test]
    fn only_ready_care_systems_with_a_usable_endpoint_route() {
        let router = TenantRouter::new(LimitsConfig::default());
        router.set_static([
            spec("a", Some("http://store.care-a.svc:8080"), true),
            spec("b", Some("http://store.care-b.svc:8080"), false),
            spec("c", None, true),
            spec("d", Some("https://x"), true),
        ]);
        match router.resolve("a") {
            Resolution::Ready(route, upstream) => {
                assert!(route.is_member("RR8"));
                assert_eq!(upstream.authority.as_str(), "store.care-a.svc:8080");
                assert_eq!(upstream.path_prefix, "");
            }
            other => panic!("{other:?}"),
        }
        for name in ["b", "c", "d"] {
            assert!(
                matches!(router.resolve(name), Resolution::NotReady(_)),
                "{name}"
            );
        }
        assert!(matches!(router.resolve("zz"), Resolution::Unknown));
    }

    #[test]
    fn updates_keep_the_limiter_and_removal_forgets() {
        let router = TenantRouter::new(LimitsConfig::default());
        router.upsert(spec("a", Some("http://h:1"), true));
        let before = match router.resolve("a") {
            Resolution::Ready(route, _) => route.limiter.clone(),
            other => panic!("{other:?}"),
        };
        let mut changed = spec("a", Some("http://h:2/base/"), true);
        changed.members = BTreeSet::from(["RAE".to_owned()]);
        router.upsert(changed);
        match router.resolve("a") {
            Resolution::Ready(route, upstream) => {
                assert!(Arc::ptr_eq(&before, &route.limiter));
                assert!(route.is_member("RAE") && !route.is_member("RR8"));
                assert_eq!(upstream.path_prefix, "/base");
            }
            other => panic!("{other:?}"),
        }
        router.remove("a");
        assert!(matches!(router.resolve("a"), Resolution::Unknown));
    }
}
