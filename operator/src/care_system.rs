//! The `CareSystem` API (`shcr.dev/v1alpha1`, cluster-scoped): what a platform team writes to
//! give one local care system its isolated, encrypted record store, and what the operator reports
//! back.
//!
//! Invariants:
//! - The apiserver enforces what it can, so bad input never reaches the controller: the ODS code
//!   pattern and immutability, an immutable bucket name, unique members, replica bounds and a name
//!   short enough for the `care-<name>` namespace (OpenAPI schema + CEL `x-kubernetes-validations`).
//! - Doc comments on the spec are the `kubectl explain` descriptions: write them for the platform
//!   team, say what a field does and what its default is.
//! - Conditions are keyed by `type` (metav1.Condition); `Ready` means the store can serve,
//!   `Synced` means the last reconcile succeeded.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A local care system (e.g. an Integrated Care System) with its own FHIR record store, bucket
/// and KMS key.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shcr.dev",
    version = "v1alpha1",
    kind = "CareSystem",
    plural = "caresystems",
    status = "CareSystemStatus",
    derive = "PartialEq",
    shortname = "csys",
    category = "shcr",
    doc = "A local care system with its own isolated FHIR record store, bucket and encryption key. The ShCR operator provisions them and reports progress in status.conditions.",
    printcolumn(name = "ODS", type_ = "string", json_path = ".spec.odsCode", description = "ODS code of the care system"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Whether the record store can serve requests"),
    printcolumn(name = "Bucket", type_ = "string", json_path = ".status.bucket", description = "Object storage bucket holding the records"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 58").message("metadata.name must be at most 58 characters: the care system's namespace is care-<name>"),
)]
#[serde(rename_all = "camelCase")]
pub struct CareSystemSpec {
    /// ODS code of the care system's commissioning organisation (e.g. the ICB code `QWO`): 3 to
    /// 10 upper-case letters and digits. Immutable: it names the care system in audit records.
    #[schemars(regex(pattern = "^[A-Z0-9]{3,10}$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("odsCode is immutable: create a new CareSystem instead"))]
    pub ods_code: String,

    /// Human-readable name shown to clinicians and in audit records, e.g. "West Yorkshire ICS".
    #[schemars(length(min = 1, max = 200))]
    pub display_name: String,

    /// ODS codes of the member organisations (trusts, GP practices, local authorities). A user
    /// reaches this care system only when acting for one of them. Each code at most once.
    #[serde(default)]
    #[schemars(
        length(max = 500),
        inner(regex(pattern = "^[A-Z0-9]{3,10}$"), length(max = 10))
    )]
    #[x_kube(validation = Rule::new("self.all(m, self.exists_one(o, o == m))").message("members must not repeat an ODS code"))]
    pub members: Vec<String>,

    /// Where the care system's records are stored: one object storage bucket of its own.
    pub storage: StorageSpec,

    /// The KMS key the care system's data is encrypted under. Default: the operator creates a key
    /// with automatic rotation.
    #[serde(default)]
    pub encryption: EncryptionSpec,

    /// The record store workload. Defaults suit a small care system.
    #[serde(default)]
    pub store: StoreSpec,

    /// What happens to the bucket and key when this CareSystem is deleted. `Retain` (default)
    /// leaves both in place; `Delete` removes the bucket and schedules the key for deletion,
    /// which destroys every record (crypto-shredding).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// When true the operator makes no changes for this care system (status is kept and
    /// reported); set back to false to resume. Deleting the CareSystem still applies
    /// deletionPolicy.
    #[serde(default)]
    pub paused: bool,
}

/// Where a care system's records live.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.bucketName) == has(oldSelf.bucketName) && (!has(self.bucketName) || self.bucketName == oldSelf.bucketName)").message("storage.bucketName is immutable: it cannot be added, changed or removed after creation"))]
pub struct StorageSpec {
    /// Name of the bucket (S3 naming rules). When absent the operator generates
    /// `shcr-<name>-<uid prefix>` and reports it in status.bucket. An existing bucket is adopted
    /// only if it carries this care system's ShCR tags. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"))]
    pub bucket_name: Option<String>,

    /// Region of the bucket, e.g. `eu-west-2`.
    #[schemars(regex(pattern = "^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: String,

    /// Days to keep superseded object versions before they expire. Absent: kept forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 36500))]
    pub retention_days: Option<i32>,
}

/// The care system's KMS key.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSpec {
    /// ARN of an existing, enabled KMS key to use. Absent: the operator creates a key (tagged,
    /// alias `alias/shcr/<name>`) and manages it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$"))]
    pub kms_key_arn: Option<String>,

    /// Turn on automatic yearly rotation of a key the operator creates. Default: true.
    #[serde(default = "enabled")]
    pub rotation: bool,
}

impl Default for EncryptionSpec {
    fn default() -> Self {
        Self {
            kms_key_arn: None,
            rotation: true,
        }
    }
}

fn enabled() -> bool {
    true
}

/// The record store workload of the care system.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoreSpec {
    /// Container image of the store. Absent: the image the operator is configured with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Number of store pods: 1 (default) runs the store, 0 stops it. The store is the single
    /// writer of its database, so more than one is refused.
    #[serde(default = "one_replica")]
    #[schemars(range(min = 0, max = 1))]
    pub replicas: i32,

    /// CPU and memory requests and limits of the store container. Absent: the operator's
    /// defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for StoreSpec {
    fn default() -> Self {
        Self {
            image: None,
            replicas: one_replica(),
            resources: None,
        }
    }
}

fn one_replica() -> i32 {
    1
}

/// What deleting a CareSystem does to its bucket and key.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum DeletionPolicy {
    /// Keep the bucket and the key (the safe default).
    #[default]
    Retain,
    /// Delete the bucket and schedule the key for deletion.
    Delete,
}

/// What the operator observed and did.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CareSystemStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready (the store can serve), Synced (the last reconcile succeeded) and one per part:
    /// NamespaceReady, KeyReady, BucketReady, StoreReady.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The namespace holding the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,

    /// The bucket holding the records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,

    /// ARN of the KMS key the records are encrypted under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,

    /// In-cluster URL of the store's FHIR API, for the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// One line on the current state, or what is wrong and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Condition types the operator sets.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const SYNCED: &str = "Synced";
    pub const NAMESPACE_READY: &str = "NamespaceReady";
    pub const BUCKET_READY: &str = "BucketReady";
    pub const KEY_READY: &str = "KeyReady";
    pub const STORE_READY: &str = "StoreReady";
}

impl CareSystemStatus {
    /// The condition of `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether the condition of `type_` is `True`.
    pub fn is_true(&self, type_: &str) -> bool {
        self.condition(type_).is_some_and(|c| c.status == "True")
    }

    /// Sets a condition, keeping its `lastTransitionTime` unless the status changes. Returns
    /// whether the status changed (a transition worth an Event).
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
        generation: Option<i64>,
    ) -> bool {
        let status = if status { "True" } else { "False" }.to_owned();
        let message = message.into();
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(existing) => {
                let transitioned = existing.status != status;
                if transitioned {
                    existing.last_transition_time = Time(k8s_openapi::jiff::Timestamp::now());
                }
                existing.status = status;
                existing.reason = reason.to_owned();
                existing.message = message;
                existing.observed_generation = generation;
                transitioned
            }
            None => {
                self.conditions.push(Condition {
                    type_: type_.to_owned(),
                    status,
                    reason: reason.to_owned(),
                    message,
                    observed_generation: generation,
                    last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
                });
                true
            }
        }
    }
}

impl CareSystem {
    /// The namespace that holds this care system's store: `care-<name>`.
    pub fn namespace_name(&self) -> String {
        format!("care-{}", self.metadata.name.as_deref().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_safe_ones() {
        let spec: CareSystemSpec = serde_json::from_value(serde_json::json!({
            "odsCode": "QWO",
            "displayName": "West Yorkshire",
            "storage": {"region": "eu-west-2"}
        }))
        .expect("minimal spec parses");
        assert_eq!(spec.deletion_policy, DeletionPolicy::Retain);
        assert!(!spec.paused);
        assert!(spec.encryption.rotation);
        assert_eq!(spec.encryption.kms_key_arn, None);
        assert_eq!(spec.store.replicas, 1);
        assert!(spec.members.is_empty());
    }

    #[test]
    fn set_condition_reports_transitions_only() {
        let mut status = CareSystemStatus::default();
        assert!(status.set_condition(condition::READY, false, "Provisioning", "starting", Some(1)));
        assert!(!status.set_condition(condition::READY, false, "Provisioning", "still", Some(2)));
        assert!(status.set_condition(condition::READY, true, "StoreAvailable", "ok", Some(2)));
        assert!(status.is_true(condition::READY));
        assert_eq!(status.conditions.len(), 1);
    }
}
