//! The Kubernetes objects one care system gets, as server-side-apply documents: its namespace
//! and, inside it, the store's ServiceAccount, Role/RoleBinding, NetworkPolicies,
//! ResourceQuota, LimitRange, ConfigMap, Deployment, Service and PodDisruptionBudget.
//!
//! Pure functions of (CareSystem, operator config, provisioned bucket and key): no I/O, so the
//! shapes are unit-tested here and the controller only applies them.
//!
//! Invariants:
//! - Every object carries [`MANAGED_BY_LABEL`] = `shcr-operator` and the care system label, and
//!   is owned by the CareSystem (controller owner reference), so deleting the CareSystem garbage
//!   collects it and a change to it wakes the controller.
//! - The store runs as the single writer of its database: the Deployment uses `Recreate`, so an
//!   old pod is gone before a new one starts.
//! - The store pod is as locked down as the `restricted` Pod Security Standard asks (non-root,
//!   read-only root filesystem, no capabilities, no privilege escalation, RuntimeDefault
//!   seccomp), and the namespace enforces that standard.
//! - Network: everything is denied except ingress from the gateway's pods to the store port, and
//!   egress to DNS and the configured object storage / KMS destinations.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

use crate::care_system::CareSystem;
use crate::config::OperatorConfig;

/// Placeholder in store ServiceAccount annotation values for the care system's name.
pub const CARE_SYSTEM_PLACEHOLDER: &str = "{care_system}";

/// Label on every object the operator manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "shcr-operator";
/// Label naming the care system an object belongs to.
pub const CARE_SYSTEM_LABEL: &str = "shcr.dev/care-system";
/// Name of the store's Deployment, Service, ServiceAccount, Role, ConfigMap and PDB.
pub const STORE_NAME: &str = "shcr-store";
/// Port of the store's FHIR API.
pub const STORE_PORT: i32 = 8080;
/// Port of the store's `/metrics`, `/healthz` and `/readyz`.
pub const STORE_METRICS_PORT: i32 = 9090;
/// NetworkPolicy names.
pub const POLICY_DEFAULT_DENY: &str = "default-deny";
pub const POLICY_GATEWAY_INGRESS: &str = "allow-gateway-ingress";
pub const POLICY_STORE_EGRESS: &str = "allow-store-egress";

/// What the store's configuration needs beyond the spec: the cloud resources already provisioned
/// for the care system, and the gateway key it trusts.
#[derive(Debug, Clone)]
pub struct Provisioned<'a> {
    pub bucket: &'a str,
    pub kms_key_arn: &'a str,
    /// The gateway's identity-assertion public key (SPKI PEM).
    pub assertion_public_key: &'a str,
}

/// Builds the objects of one care system.
#[derive(Debug)]
pub struct Workload<'a> {
    care_system: &'a CareSystem,
    config: &'a OperatorConfig,
    name: String,
    namespace: String,
    owner: OwnerReference,
}

impl<'a> Workload<'a> {
    /// `None` when the CareSystem has no name or uid yet (it was not read from the apiserver).
    pub fn new(care_system: &'a CareSystem, config: &'a OperatorConfig) -> Option<Self> {
        let name = care_system.metadata.name.clone()?;
        let owner = kube::Resource::controller_owner_ref(care_system, &())?;
        Some(Self {
            care_system,
            config,
            namespace: care_system.namespace_name(),
            name,
            owner,
        })
    }

    pub fn namespace_name(&self) -> &str {
        &self.namespace
    }

    /// The in-cluster URL of the store's FHIR API.
    pub fn endpoint(&self) -> String {
        format!("http://{STORE_NAME}.{}.svc:{STORE_PORT}", self.namespace)
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            ("app.kubernetes.io/part-of".to_owned(), "shcr".to_owned()),
            (CARE_SYSTEM_LABEL.to_owned(), self.name.clone()),
        ])
    }

    fn store_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), STORE_NAME.to_owned()),
            ("app.kubernetes.io/instance".to_owned(), self.name.clone()),
        ])
    }

    fn store_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels();
        labels.extend(self.store_selector());
        labels.insert("app.kubernetes.io/component".to_owned(), "store".to_owned());
        labels
    }

    fn metadata(&self, name: &str, labels: BTreeMap<String, String>) -> Value {
        json!({
            "name": name,
            "namespace": self.namespace,
            "labels": labels,
            "ownerReferences": [self.owner],
        })
    }

    /// The namespace `care-<name>`, enforcing the `restricted` Pod Security Standard.
    pub fn namespace(&self) -> Value {
        let mut labels = self.labels();
        labels.insert(
            "pod-security.kubernetes.io/enforce".to_owned(),
            "restricted".to_owned(),
        );
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": self.namespace,
                "labels": labels,
                "ownerReferences": [self.owner],
            },
        })
    }

    pub fn service_account(&self) -> Value {
        let mut metadata = self.metadata(STORE_NAME, self.store_labels());
        if !self.config.store_service_account_annotations.is_empty() {
            // `{care_system}` in a value names this care system, so IRSA can give each store its
            // own role (`…:role/shcr-store-{care_system}`) rather than one role for all stores.
            let annotations: BTreeMap<&str, String> = self
                .config
                .store_service_account_annotations
                .iter()
                .map(|(key, value)| {
                    (
                        key.as_str(),
                        value.replace(CARE_SYSTEM_PLACEHOLDER, &self.name),
                    )
                })
                .collect();
            metadata["annotations"] = json!(annotations);
        }
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata,
            "automountServiceAccountToken": false,
        })
    }

    /// Read access to the store's own ConfigMap and nothing else.
    pub fn role(&self) -> Value {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": self.metadata(STORE_NAME, self.store_labels()),
            "rules": [{
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [STORE_NAME],
                "verbs": ["get", "watch"],
            }],
        })
    }

    pub fn role_binding(&self) -> Value {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": self.metadata(STORE_NAME, self.store_labels()),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": STORE_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": STORE_NAME, "namespace": self.namespace}],
        })
    }

    /// Deny all traffic in and out of every pod of the namespace unless another policy allows it.
    pub fn default_deny_policy(&self) -> Value {
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": self.metadata(POLICY_DEFAULT_DENY, self.labels()),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        })
    }

    /// Only the gateway's pods may reach the store, and only on its API port.
    pub fn gateway_ingress_policy(&self) -> Value {
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": self.metadata(POLICY_GATEWAY_INGRESS, self.labels()),
            "spec": {
                "podSelector": {"matchLabels": self.store_selector()},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{
                        "namespaceSelector": {"matchLabels": {
                            "kubernetes.io/metadata.name": self.config.gateway_namespace,
                        }},
                        "podSelector": {"matchLabels": self.config.gateway_pod_labels},
                    }],
                    "ports": [{"protocol": "TCP", "port": STORE_PORT}],
                }],
            },
        })
    }

    /// The store may resolve names and reach object storage and KMS, nothing else.
    pub fn store_egress_policy(&self) -> Value {
        let mut egress = vec![json!({
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        })];
        egress.extend(self.config.store_egress.iter().map(|rule| {
            json!({
                "to": [{"ipBlock": {"cidr": rule.cidr}}],
                "ports": [{"protocol": "TCP", "port": rule.port}],
            })
        }));
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": self.metadata(POLICY_STORE_EGRESS, self.labels()),
            "spec": {
                "podSelector": {"matchLabels": self.store_selector()},
                "policyTypes": ["Egress"],
                "egress": egress,
            },
        })
    }

    /// Caps what the namespace can consume: room for one store pod during a `Recreate` rollout,
    /// no persistent volumes, no externally exposed Services.
    pub fn resource_quota(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": self.metadata(STORE_NAME, self.labels()),
            "spec": {"hard": {
                "pods": "4",
                "requests.cpu": "8",
                "requests.memory": "32Gi",
                "limits.memory": "32Gi",
                "persistentvolumeclaims": "0",
                "services.loadbalancers": "0",
                "services.nodeports": "0",
            }},
        })
    }

    /// Defaults for containers that name no resources, so the quota never blocks them.
    pub fn limit_range(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": self.metadata(STORE_NAME, self.labels()),
            "spec": {"limits": [{
                "type": "Container",
                "defaultRequest": {"cpu": "100m", "memory": "256Mi"},
                "default": {"memory": "1Gi"},
                "max": {"memory": "16Gi"},
            }]},
        })
    }

    /// The store's settings; the Deployment reads them as environment variables.
    pub fn config_map(&self, provisioned: &Provisioned<'_>) -> Value {
        let spec = &self.care_system.spec;
        let mut data = BTreeMap::from([
            ("SHCR_STORE_CARE_SYSTEM", self.name.clone()),
            ("SHCR_STORE_ODS_CODE", spec.ods_code.clone()),
            ("SHCR_STORE_DISPLAY_NAME", spec.display_name.clone()),
            ("SHCR_STORE_MEMBERS", spec.members.join(",")),
            ("SHCR_STORE_BUCKET", provisioned.bucket.to_owned()),
            ("SHCR_STORE_REGION", spec.storage.region.clone()),
            ("SHCR_STORE_KMS_KEY_ARN", provisioned.kms_key_arn.to_owned()),
            (
                "SHCR_STORE_ASSERTION_PUBLIC_KEY",
                provisioned.assertion_public_key.to_owned(),
            ),
            ("SHCR_STORE_LISTEN", format!("0.0.0.0:{STORE_PORT}")),
            (
                "SHCR_STORE_METRICS_LISTEN",
                format!("0.0.0.0:{STORE_METRICS_PORT}"),
            ),
        ]);
        if let Some(endpoint) = &self.config.s3_endpoint {
            data.insert("SHCR_STORE_S3_ENDPOINT", endpoint.clone());
        }
        if let Some(endpoint) = &self.config.kms_endpoint {
            data.insert("SHCR_STORE_KMS_ENDPOINT", endpoint.clone());
        }
        // Checked at start-up (`check_gateway_public_url`): an unusable one never gets here.
        if let Ok(Some(origin)) = self.config.store_public_origin() {
            data.insert("SHCR_STORE_PUBLIC_ORIGIN", origin);
        }
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.metadata(STORE_NAME, self.store_labels()),
            "data": data,
        })
    }

    /// The record store. `config_map` is the document from [`Self::config_map`]: its digest in a
    /// pod annotation restarts the store when its settings change.
    pub fn deployment(&self, config_map: &Value) -> Value {
        let store = &self.care_system.spec.store;
        let image = store
            .image
            .clone()
            .unwrap_or_else(|| self.config.store_image.clone());
        let resources = store.resources.as_ref().map_or_else(
            || {
                json!({
                    "requests": {"cpu": "250m", "memory": "512Mi"},
                    "limits": {"memory": "1Gi"},
                })
            },
            |resources| json!(resources),
        );
        let config_digest = format!("{:016x}", fnv1a(config_map["data"].to_string().as_bytes()));
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.metadata(STORE_NAME, self.store_labels()),
            "spec": {
                "replicas": store.replicas,
                // One writer per database: the old pod stops before the new one starts.
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": self.store_selector()},
                "template": {
                    "metadata": {
                        "labels": self.store_labels(),
                        "annotations": {"shcr.dev/config-digest": config_digest},
                    },
                    "spec": {
                        "serviceAccountName": STORE_NAME,
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "securityContext": {
                            "runAsNonRoot": true,
                            "runAsUser": 65532,
                            "runAsGroup": 65532,
                            "fsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [{
                            "name": "store",
                            "image": image,
                            "args": ["store"],
                            "envFrom": [{"configMapRef": {"name": STORE_NAME}}],
                            "ports": [
                                {"name": "http", "containerPort": STORE_PORT, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": STORE_METRICS_PORT, "protocol": "TCP"},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": "metrics"},
                                "periodSeconds": 5,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": "metrics"},
                                "periodSeconds": 10,
                                "failureThreshold": 6,
                            },
                            "startupProbe": {
                                "httpGet": {"path": "/healthz", "port": "metrics"},
                                "periodSeconds": 2,
                                "failureThreshold": 60,
                            },
                            "resources": resources,
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "runAsNonRoot": true,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }],
                        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
                    },
                },
            },
        })
    }

    pub fn service(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(STORE_NAME, self.store_labels()),
            "spec": {
                "type": "ClusterIP",
                "selector": self.store_selector(),
                "ports": [{"name": "http", "port": STORE_PORT, "targetPort": "http", "protocol": "TCP"}],
            },
        })
    }

    /// Voluntary evictions (node drains) take the single store pod only when it is the sole
    /// disruption; the budget never blocks a drain forever.
    pub fn pod_disruption_budget(&self) -> Value {
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": self.metadata(STORE_NAME, self.store_labels()),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": self.store_selector()},
            },
        })
    }
}

/// FNV-1a: a digest that stays the same across builds and Rust versions (unlike std's hasher),
/// so upgrading the operator does not restart every store.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;
    use crate::care_system::CareSystemSpec;

    fn care_system(members: &[&str]) -> CareSystem {
        let spec: CareSystemSpec = serde_json::from_value(json!({
            "odsCode": "QWO",
            "displayName": "West Yorkshire",
            "members": members,
            "storage": {"region": "eu-west-2"},
        }))
        .expect("spec parses");
        let mut care_system = CareSystem::new("west-yorkshire", spec);
        care_system.metadata = ObjectMeta {
            name: Some("west-yorkshire".to_owned()),
            uid: Some("0f0e0d0c-0000-4000-8000-000000000000".to_owned()),
            ..ObjectMeta::default()
        };
        care_system
    }

    const PROVISIONED: Provisioned<'static> = Provisioned {
        bucket: "shcr-west-yorkshire-0f0e0d0c",
        kms_key_arn: "arn:aws:kms:eu-west-2:111122223333:key/abc",
        assertion_public_key: "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",
    };

    #[test]
    fn store_is_a_locked_down_single_writer() {
        let config = OperatorConfig::default();
        let cs = care_system(&["RR8"]);
        let workload = Workload::new(&cs, &config).expect("named");
        let deployment = workload.deployment(&workload.config_map(&PROVISIONED));
        assert_eq!(deployment["metadata"]["namespace"], "care-west-yorkshire");
        assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let container = &pod["containers"][0];
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert_eq!(
            deployment["metadata"]["ownerReferences"][0]["kind"],
            "CareSystem"
        );
        assert_eq!(
            deployment["metadata"]["ownerReferences"][0]["controller"],
            true
        );
    }

    #[test]
    fn store_config_carries_the_gateway_key() {
        let config = OperatorConfig::default();
        let cs = care_system(&["RR8"]);
        let workload = Workload::new(&cs, &config).expect("named");
        let config_map = workload.config_map(&PROVISIONED);
        assert_eq!(
            config_map["data"]["SHCR_STORE_ASSERTION_PUBLIC_KEY"],
            PROVISIONED.assertion_public_key
        );
        assert_eq!(
            workload.deployment(&config_map)["spec"]["template"]["spec"]["containers"][0]["envFrom"]
                [0]["configMapRef"]["name"],
            STORE_NAME
        );
    }

    #[test]
    fn stores_build_links_from_the_gateways_public_url() {
        let cs = care_system(&["RR8"]);
        let config = OperatorConfig::default();
        let workload = Workload::new(&cs, &config).expect("named");
        assert!(
            workload.config_map(&PROVISIONED)["data"]
                .get("SHCR_STORE_PUBLIC_ORIGIN")
                .is_none()
        );
        let config = OperatorConfig {
            gateway_public_url: Some("https://fhir.example.nhs.uk/".to_owned()),
            ..OperatorConfig::default()
        };
        let workload = Workload::new(&cs, &config).expect("named");
        assert_eq!(
            workload.config_map(&PROVISIONED)["data"]["SHCR_STORE_PUBLIC_ORIGIN"],
            "https://fhir.example.nhs.uk"
        );
    }

    #[test]
    fn each_store_can_have_its_own_cloud_role() {
        let config = OperatorConfig {
            store_service_account_annotations: BTreeMap::from([(
                "eks.amazonaws.com/role-arn".to_owned(),
                "arn:aws:iam::111122223333:role/shcr-store-{care_system}".to_owned(),
            )]),
            ..OperatorConfig::default()
        };
        let cs = care_system(&["RR8"]);
        let workload = Workload::new(&cs, &config).expect("named");
        assert_eq!(
            workload.service_account()["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
            "arn:aws:iam::111122223333:role/shcr-store-west-yorkshire"
        );
    }

    #[test]
    fn member_change_restarts_the_store() {
        let config = OperatorConfig::default();
        let before = care_system(&["RR8"]);
        let after = care_system(&["RR8", "A81001"]);
        let digest = |cs: &CareSystem| {
            let workload = Workload::new(cs, &config).expect("named");
            workload.deployment(&workload.config_map(&PROVISIONED))["spec"]["template"]["metadata"]
                ["annotations"]["shcr.dev/config-digest"]
                .clone()
        };
        assert_ne!(digest(&before), digest(&after));
        assert_eq!(digest(&before), digest(&care_system(&["RR8"])));
    }

    #[test]
    fn only_the_gateway_may_reach_the_store() {
        let config = OperatorConfig::default();
        let cs = care_system(&[]);
        let workload = Workload::new(&cs, &config).expect("named");
        let policy = workload.gateway_ingress_policy();
        let from = &policy["spec"]["ingress"][0]["from"][0];
        assert_eq!(
            from["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "shcr-system"
        );
        assert_eq!(
            from["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            "shcr-gateway"
        );
    }
}
