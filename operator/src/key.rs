//! A care system's KMS key: create one (tagged, aliased, rotating), or adopt a key the platform
//! team names, and schedule a managed key's deletion under `deletionPolicy: Delete`.
//!
//! Invariants:
//! - A created key carries the tags [`TAG_CARE_SYSTEM`] = CareSystem name and [`TAG_MANAGED_BY`]
//!   = `shcr-operator`, and the alias `alias/shcr/<name>`, which is how it is found again.
//! - An alias that points to a key without this care system's tag is never used or touched.
//! - A key the CareSystem names in `encryption.kmsKeyArn` is never changed or deleted; it is only
//!   checked to be enabled and usable for encryption.
//! - Only keys with both tags are ever scheduled for deletion.

use aws_sdk_kms::Client;
use aws_sdk_kms::types::{KeyMetadata, KeyState, KeyUsageType, Tag};

use crate::care_system::EncryptionSpec;
use crate::cloud::{CloudError, MANAGER, TAG_CARE_SYSTEM, TAG_MANAGED_BY, classify, error_code};

/// The key a care system's data is encrypted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CareSystemKey {
    pub arn: String,
    /// Created and managed by the operator (as opposed to named in the spec).
    pub managed: bool,
}

/// What scheduling a key's deletion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDeletion {
    /// Now (or already) pending deletion.
    Scheduled { arn: String },
    /// No managed key exists for the care system.
    NotFound,
}

/// Creates, adopts and retires care systems' KMS keys.
#[derive(Debug, Clone)]
pub struct KeyProvisioner {
    client: Client,
}

/// The alias of a care system's managed key.
pub fn alias_name(care_system: &str) -> String {
    format!("alias/shcr/{care_system}")
}

impl KeyProvisioner {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// The key for `care_system` as its `encryption` spec asks: the named key after checking it
    /// is usable, or the managed key (created on first call).
    pub async fn ensure(
        &self,
        care_system: &str,
        spec: &EncryptionSpec,
    ) -> Result<CareSystemKey, CloudError> {
        match &spec.kms_key_arn {
            Some(arn) => self.adopt(arn).await.map(|arn| CareSystemKey {
                arn,
                managed: false,
            }),
            None => self
                .ensure_managed(care_system, spec.rotation)
                .await
                .map(|arn| CareSystemKey { arn, managed: true }),
        }
    }

    async fn adopt(&self, arn: &str) -> Result<String, CloudError> {
        let metadata = self
            .describe(arn)
            .await?
            .ok_or_else(|| {
                CloudError::permanent(
                    "KeyNotFound",
                    format!("KMS key {arn} (encryption.kmsKeyArn) does not exist or is not visible to the operator"),
                )
            })?;
        check_usable(&metadata, arn)?;
        Ok(metadata.arn().unwrap_or(arn).to_owned())
    }

    async fn ensure_managed(
        &self,
        care_system: &str,
        rotation: bool,
    ) -> Result<String, CloudError> {
        let alias = alias_name(care_system);
        let arn = match self.describe(&alias).await? {
            Some(metadata) => {
                let arn = metadata.arn().unwrap_or(metadata.key_id()).to_owned();
                if !self.is_ours(&arn, care_system).await? {
                    return Err(CloudError::permanent(
                        "KeyAliasTaken",
                        format!(
                            "the KMS alias {alias} points to key {arn}, which is not tagged \
                             {TAG_CARE_SYSTEM}={care_system}; remove the alias or name the key \
                             in encryption.kmsKeyArn"
                        ),
                    ));
                }
                check_usable(&metadata, &arn)?;
                arn
            }
            None => self.create(care_system, &alias).await?,
        };
        self.set_rotation(&arn, rotation).await?;
        Ok(arn)
    }

    async fn create(&self, care_system: &str, alias: &str) -> Result<String, CloudError> {
        let created = self
            .client
            .create_key()
            .description(format!("ShCR care system {care_system}: record encryption"))
            .key_usage(KeyUsageType::EncryptDecrypt)
            .tags(tag(TAG_CARE_SYSTEM, care_system)?)
            .tags(tag(TAG_MANAGED_BY, MANAGER)?)
            .send()
            .await
            .map_err(|e| classify("KMS CreateKey", e))?;
        let metadata = created
            .key_metadata()
            .ok_or_else(|| CloudError::Transient {
                operation: "KMS CreateKey",
                detail: "the answer named no key".to_owned(),
            })?;
        let arn = metadata.arn().unwrap_or(metadata.key_id()).to_owned();
        self.client
            .create_alias()
            .alias_name(alias)
            .target_key_id(metadata.key_id())
            .send()
            .await
            .map_err(|e| classify("KMS CreateAlias", e))?;
        tracing::info!(care_system, key = %arn, "created KMS key");
        Ok(arn)
    }

    async fn set_rotation(&self, arn: &str, rotation: bool) -> Result<(), CloudError> {
        let current = self
            .client
            .get_key_rotation_status()
            .key_id(arn)
            .send()
            .await
            .map_err(|e| classify("KMS GetKeyRotationStatus", e))?
            .key_rotation_enabled();
        if current == rotation {
            return Ok(());
        }
        if rotation {
            self.client
                .enable_key_rotation()
                .key_id(arn)
                .send()
                .await
                .map_err(|e| classify("KMS EnableKeyRotation", e))?;
        } else {
            self.client
                .disable_key_rotation()
                .key_id(arn)
                .send()
                .await
                .map_err(|e| classify("KMS DisableKeyRotation", e))?;
        }
        Ok(())
    }

    /// Schedules deletion of the managed key of `care_system` (found by its alias), then removes
    /// the alias. Keys without the care system's tags are refused.
    pub async fn schedule_deletion(
        &self,
        care_system: &str,
        pending_window_days: i32,
    ) -> Result<KeyDeletion, CloudError> {
        let alias = alias_name(care_system);
        let Some(metadata) = self.describe(&alias).await? else {
            return Ok(KeyDeletion::NotFound);
        };
        let arn = metadata.arn().unwrap_or(metadata.key_id()).to_owned();
        if !self.is_ours(&arn, care_system).await? {
            return Err(CloudError::permanent(
                "KeyNotManaged",
                format!(
                    "refusing to delete KMS key {arn}: it is not tagged as {care_system}'s \
                     managed key"
                ),
            ));
        }
        if metadata.key_state() != Some(&KeyState::PendingDeletion) {
            self.client
                .schedule_key_deletion()
                .key_id(&arn)
                .pending_window_in_days(pending_window_days)
                .send()
                .await
                .map_err(|e| classify("KMS ScheduleKeyDeletion", e))?;
            tracing::info!(care_system, key = %arn, pending_window_days, "scheduled KMS key deletion");
        }
        match self.client.delete_alias().alias_name(&alias).send().await {
            Ok(_) => {}
            Err(e) if error_code(&e) == Some("NotFoundException") => {}
            Err(e) => return Err(classify("KMS DeleteAlias", e)),
        }
        Ok(KeyDeletion::Scheduled { arn })
    }

    /// The key's metadata, or `None` when it (or the alias) does not exist.
    async fn describe(&self, key_id: &str) -> Result<Option<KeyMetadata>, CloudError> {
        match self.client.describe_key().key_id(key_id).send().await {
            Ok(output) => Ok(output.key_metadata().cloned()),
            Err(e) if error_code(&e) == Some("NotFoundException") => Ok(None),
            Err(e) => Err(classify("KMS DescribeKey", e)),
        }
    }

    async fn is_ours(&self, arn: &str, care_system: &str) -> Result<bool, CloudError> {
        let tags = self
            .client
            .list_resource_tags()
            .key_id(arn)
            .send()
            .await
            .map_err(|e| classify("KMS ListResourceTags", e))?;
        let has = |key: &str, value: &str| {
            tags.tags()
                .iter()
                .any(|tag| tag.tag_key() == key && tag.tag_value() == value)
        };
        Ok(has(TAG_CARE_SYSTEM, care_system) && has(TAG_MANAGED_BY, MANAGER))
    }
}

fn check_usable(metadata: &KeyMetadata, arn: &str) -> Result<(), CloudError> {
    match metadata.key_state() {
        Some(KeyState::Enabled) => {}
        state => {
            let state = state.map_or("in an unknown state", KeyState::as_str);
            return Err(CloudError::permanent(
                "KeyNotEnabled",
                format!("KMS key {arn} is {state}, not Enabled; enable it or use another key"),
            ));
        }
    }
    if metadata.key_usage() != Some(&KeyUsageType::EncryptDecrypt) {
        return Err(CloudError::permanent(
            "KeyNotUsable",
            format!("KMS key {arn} is not a symmetric ENCRYPT_DECRYPT key"),
        ));
    }
    Ok(())
}

fn tag(key: &str, value: &str) -> Result<Tag, CloudError> {
    Tag::builder()
        .tag_key(key)
        .tag_value(value)
        .build()
        .map_err(|e| {
            CloudError::permanent("InvalidTag", format!("cannot build KMS tag {key}: {e}"))
        })
}
