//! A care system's bucket: create it (or adopt it when it is tagged as ours), keep its security
//! settings in place, and remove it under `deletionPolicy: Delete`.
//!
//! Invariants:
//! - Every reconcile re-applies the settings (public access blocked, default SSE-KMS with the care
//!   system's key, versioning, a policy denying plain-HTTP access, tags, retention), so drift in
//!   the bucket is repaired like drift in the cluster.
//! - A bucket is used or deleted only if it carries [`TAG_CARE_SYSTEM`] = CareSystem name and
//!   [`TAG_MANAGED_BY`] = `shcr-operator`. The tags are written right after creation; a bucket
//!   without them (someone else's, or one whose creation was interrupted before tagging) is
//!   reported and left alone for a person to check.

use aws_sdk_s3::Client;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, BucketLocationConstraint, BucketVersioningStatus,
    CreateBucketConfiguration, Delete, ExpirationStatus, LifecycleRule, LifecycleRuleFilter,
    NoncurrentVersionExpiration, ObjectIdentifier, PublicAccessBlockConfiguration,
    ServerSideEncryption, ServerSideEncryptionByDefault, ServerSideEncryptionConfiguration,
    ServerSideEncryptionRule, Tag, Tagging, VersioningConfiguration,
};

use crate::cloud::{
    CloudError, MANAGER, TAG_CARE_SYSTEM, TAG_MANAGED_BY, classify, error_code, http_status,
};

/// What the bucket of one care system should look like.
#[derive(Debug, Clone)]
pub struct BucketSettings<'a> {
    pub name: &'a str,
    pub region: &'a str,
    pub care_system: &'a str,
    pub kms_key_arn: &'a str,
    pub retention_days: Option<i32>,
}

/// What deleting a bucket did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketDeletion {
    Deleted,
    NotFound,
}

/// Creates, configures and deletes care systems' buckets.
#[derive(Debug, Clone)]
pub struct BucketProvisioner {
    client: Client,
}

enum Ownership {
    Missing,
    Ours,
    NotOurs,
}

impl BucketProvisioner {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// A client that talks to `region` (buckets live in the region each CareSystem names).
    fn client_for(&self, region: &str) -> Client {
        Client::from_conf(
            self.client
                .config()
                .to_builder()
                .region(Region::new(region.to_owned()))
                .build(),
        )
    }

    /// Creates or adopts the bucket and applies every setting.
    pub async fn ensure(&self, settings: &BucketSettings<'_>) -> Result<(), CloudError> {
        let client = self.client_for(settings.region);
        let name = settings.name;
        match ownership(&client, name, settings.care_system).await? {
            Ownership::Ours => {}
            Ownership::NotOurs => {
                return Err(CloudError::permanent(
                    "BucketNotOwned",
                    format!(
                        "bucket {name} already exists and is not tagged \
                         {TAG_CARE_SYSTEM}={}; choose another storage.bucketName, or tag the \
                         bucket if it really is this care system's",
                        settings.care_system
                    ),
                ));
            }
            Ownership::Missing => {
                create(&client, name, settings.region).await?;
                put_tags(&client, name, settings.care_system).await?;
                tracing::info!(
                    care_system = settings.care_system,
                    bucket = name,
                    "created bucket"
                );
            }
        }
        configure(&client, settings).await
    }

    /// Empties and deletes the bucket, if it exists and is this care system's.
    pub async fn delete(
        &self,
        name: &str,
        region: &str,
        care_system: &str,
    ) -> Result<BucketDeletion, CloudError> {
        let client = self.client_for(region);
        match ownership(&client, name, care_system).await? {
            Ownership::Missing => return Ok(BucketDeletion::NotFound),
            Ownership::NotOurs => {
                return Err(CloudError::permanent(
                    "BucketNotOwned",
                    format!(
                        "refusing to delete bucket {name}: it is not tagged as {care_system}'s"
                    ),
                ));
            }
            Ownership::Ours => {}
        }
        empty(&client, name).await?;
        client
            .delete_bucket()
            .bucket(name)
            .send()
            .await
            .map_err(|e| classify("S3 DeleteBucket", e))?;
        tracing::info!(care_system, bucket = name, "deleted bucket");
        Ok(BucketDeletion::Deleted)
    }
}

async fn ownership(
    client: &Client,
    name: &str,
    care_system: &str,
) -> Result<Ownership, CloudError> {
    match client.head_bucket().bucket(name).send().await {
        Ok(_) => {}
        Err(e) if http_status(&e) == Some(404) => return Ok(Ownership::Missing),
        // 403: the bucket exists in an account we cannot read.
        Err(e) if http_status(&e) == Some(403) => return Ok(Ownership::NotOurs),
        Err(e) => return Err(classify("S3 HeadBucket", e)),
    }
    let tags = match client.get_bucket_tagging().bucket(name).send().await {
        Ok(output) => output.tag_set().to_vec(),
        Err(e) if error_code(&e) == Some("NoSuchTagSet") => Vec::new(),
        Err(e) if http_status(&e) == Some(403) => return Ok(Ownership::NotOurs),
        Err(e) => return Err(classify("S3 GetBucketTagging", e)),
    };
    let has = |key: &str, value: &str| tags.iter().any(|t| t.key() == key && t.value() == value);
    if has(TAG_CARE_SYSTEM, care_system) && has(TAG_MANAGED_BY, MANAGER) {
        Ok(Ownership::Ours)
    } else {
        Ok(Ownership::NotOurs)
    }
}

async fn create(client: &Client, name: &str, region: &str) -> Result<(), CloudError> {
    let mut request = client.create_bucket().bucket(name);
    // us-east-1 is the one region that refuses an explicit location constraint.
    if region != "us-east-1" {
        request = request.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(region))
                .build(),
        );
    }
    match request.send().await {
        Ok(_) => Ok(()),
        Err(e) if error_code(&e) == Some("BucketAlreadyOwnedByYou") => Ok(()),
        Err(e) if error_code(&e) == Some("BucketAlreadyExists") => Err(CloudError::permanent(
            "BucketNameTaken",
            format!(
                "bucket name {name} is taken by another account; choose another storage.bucketName"
            ),
        )),
        Err(e) => Err(classify("S3 CreateBucket", e)),
    }
}

async fn put_tags(client: &Client, name: &str, care_system: &str) -> Result<(), CloudError> {
    let tagging = Tagging::builder()
        .tag_set(s3_tag(TAG_CARE_SYSTEM, care_system)?)
        .tag_set(s3_tag(TAG_MANAGED_BY, MANAGER)?)
        .build()
        .map_err(invalid_request)?;
    client
        .put_bucket_tagging()
        .bucket(name)
        .tagging(tagging)
        .send()
        .await
        .map_err(|e| classify("S3 PutBucketTagging", e))?;
    Ok(())
}

async fn configure(client: &Client, settings: &BucketSettings<'_>) -> Result<(), CloudError> {
    let name = settings.name;
    client
        .put_public_access_block()
        .bucket(name)
        .public_access_block_configuration(
            PublicAccessBlockConfiguration::builder()
                .block_public_acls(true)
                .ignore_public_acls(true)
                .block_public_policy(true)
                .restrict_public_buckets(true)
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify("S3 PutPublicAccessBlock", e))?;

    let encryption = ServerSideEncryptionConfiguration::builder()
        .rules(
            ServerSideEncryptionRule::builder()
                .apply_server_side_encryption_by_default(
                    ServerSideEncryptionByDefault::builder()
                        .sse_algorithm(ServerSideEncryption::AwsKms)
                        .kms_master_key_id(settings.kms_key_arn)
                        .build()
                        .map_err(invalid_request)?,
                )
                .bucket_key_enabled(true)
                .build(),
        )
        .build()
        .map_err(invalid_request)?;
    client
        .put_bucket_encryption()
        .bucket(name)
        .server_side_encryption_configuration(encryption)
        .send()
        .await
        .map_err(|e| classify("S3 PutBucketEncryption", e))?;

    client
        .put_bucket_versioning()
        .bucket(name)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify("S3 PutBucketVersioning", e))?;

    client
        .put_bucket_policy()
        .bucket(name)
        .policy(deny_insecure_transport_policy(name))
        .send()
        .await
        .map_err(|e| classify("S3 PutBucketPolicy", e))?;

    put_tags(client, name, settings.care_system).await?;

    if let Some(days) = settings.retention_days {
        let rule = LifecycleRule::builder()
            .id("shcr-retention")
            .status(ExpirationStatus::Enabled)
            .filter(LifecycleRuleFilter::builder().prefix("").build())
            .noncurrent_version_expiration(
                NoncurrentVersionExpiration::builder()
                    .noncurrent_days(days)
                    .build(),
            )
            .build()
            .map_err(invalid_request)?;
        client
            .put_bucket_lifecycle_configuration()
            .bucket(name)
            .lifecycle_configuration(
                BucketLifecycleConfiguration::builder()
                    .rules(rule)
                    .build()
                    .map_err(invalid_request)?,
            )
            .send()
            .await
            .map_err(|e| classify("S3 PutBucketLifecycleConfiguration", e))?;
    }
    Ok(())
}

/// The bucket policy: deny every request not made over TLS.
pub fn deny_insecure_transport_policy(bucket: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [format!("arn:aws:s3:::{bucket}"), format!("arn:aws:s3:::{bucket}/*")],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}}
        }]
    })
    .to_string()
}

/// Deletes every object version and delete marker, a page at a time.
async fn empty(client: &Client, name: &str) -> Result<(), CloudError> {
    loop {
        let page = client
            .list_object_versions()
            .bucket(name)
            .max_keys(1000)
            .send()
            .await
            .map_err(|e| classify("S3 ListObjectVersions", e))?;
        let mut objects = Vec::new();
        let versions = page
            .versions()
            .iter()
            .map(|v| (v.key(), v.version_id()))
            .chain(
                page.delete_markers()
                    .iter()
                    .map(|m| (m.key(), m.version_id())),
            );
        for (key, version) in versions {
            let Some(key) = key else { continue };
            objects.push(
                ObjectIdentifier::builder()
                    .key(key)
                    .set_version_id(version.map(str::to_owned))
                    .build()
                    .map_err(invalid_request)?,
            );
        }
        if objects.is_empty() {
            return Ok(());
        }
        let deleted = client
            .delete_objects()
            .bucket(name)
            .delete(
                Delete::builder()
                    .set_objects(Some(objects))
                    .quiet(true)
                    .build()
                    .map_err(invalid_request)?,
            )
            .send()
            .await
            .map_err(|e| classify("S3 DeleteObjects", e))?;
        if let Some(error) = deleted.errors().first() {
            return Err(CloudError::permanent(
                "BucketNotEmptied",
                format!(
                    "cannot empty bucket {name}: {} objects refused deletion, e.g. {} ({}: {})",
                    deleted.errors().len(),
                    error.key().unwrap_or("?"),
                    error.code().unwrap_or("?"),
                    error.message().unwrap_or("no message"),
                ),
            ));
        }
    }
}

fn s3_tag(key: &str, value: &str) -> Result<Tag, CloudError> {
    Tag::builder()
        .key(key)
        .value(value)
        .build()
        .map_err(invalid_request)
}

fn invalid_request(error: aws_sdk_s3::error::BuildError) -> CloudError {
    CloudError::permanent(
        "InvalidRequest",
        format!("cannot build the S3 request: {error}"),
    )
}
