//! The AWS KMS key provider: one customer-managed KMS key per care system.
//!
//! Data keys come from `GenerateDataKey` (AES_256) and are unwrapped with `Decrypt`, both
//! with the KMS key id pinned and the [`EncryptionContext`] as KMS `EncryptionContext`
//! (`{"care-system": …, "purpose": …}`), which CloudTrail records and key policies can
//! condition on.
//!
//! Invariants: a key KMS refuses to use — disabled, pending deletion, access denied,
//! gone — is [`KeyProviderError::KeyUnavailable`] (503 upstream, and the crypto-shredding
//! path); a ciphertext KMS will not open for this key and context is
//! [`KeyProviderError::WrappedKeyRejected`]; only failures that may clear by themselves
//! are [`KeyProviderError::Unreachable`]. The plaintext key is copied into zeroizing
//! memory as soon as it leaves the SDK's response.

use std::fmt;

use async_trait::async_trait;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use zeroize::Zeroizing;

use super::key_provider::{DataKey, EncryptionContext, KeyProvider, KeyProviderError, WrappedKey};
use super::secret_key::SecretKey;

/// Wraps data keys with an AWS KMS key.
#[derive(Clone)]
pub struct KmsKeyProvider {
    client: aws_sdk_kms::Client,
    key_id: String,
}

impl fmt::Debug for KmsKeyProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsKeyProvider")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl KmsKeyProvider {
    /// A provider using `key_id` (key id, key ARN, alias name or alias ARN) through
    /// `client`.
    pub fn new(client: aws_sdk_kms::Client, key_id: impl Into<String>) -> Self {
        Self {
            client,
            key_id: key_id.into(),
        }
    }

    /// The KMS key this provider uses.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

/// How a KMS error code should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KmsFailure {
    KeyUnavailable,
    WrappedKeyRejected,
    Transient,
    Other,
}

/// Sorts a KMS error code (`__type` of the error response) into what the store does.
fn classify_code(code: Option<&str>) -> KmsFailure {
    match code {
        Some(
            "DisabledException"
            | "KMSInvalidStateException"
            | "AccessDeniedException"
            | "NotFoundException"
            | "InvalidKeyUsageException",
        ) => KmsFailure::KeyUnavailable,
        Some("InvalidCiphertextException" | "IncorrectKeyException") => {
            KmsFailure::WrappedKeyRejected
        }
        Some(
            "KeyUnavailableException"
            | "KMSInternalException"
            | "DependencyTimeoutException"
            | "ThrottlingException"
            | "LimitExceededException",
        ) => KmsFailure::Transient,
        _ => KmsFailure::Other,
    }
}

/// Turns an SDK error into a provider error, keeping KMS's own words in the reason.
fn map_sdk_error<E, R>(err: SdkError<E, R>, context: &EncryptionContext) -> KeyProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let context = context.clone();
    let failure = match &err {
        SdkError::ServiceError(service) => classify_code(service.err().code()),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            KmsFailure::Transient
        }
        _ => KmsFailure::Other,
    };
    let reason = match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("KMS {code}: {message}"),
        (Some(code), None) => format!("KMS {code}"),
        _ => DisplayErrorContext(&err).to_string(),
    };
    match failure {
        KmsFailure::KeyUnavailable => KeyProviderError::KeyUnavailable { context, reason },
        KmsFailure::WrappedKeyRejected => KeyProviderError::WrappedKeyRejected { context, reason },
        KmsFailure::Transient => KeyProviderError::Unreachable { context, reason },
        KmsFailure::Other => KeyProviderError::UnexpectedResponse { context, reason },
    }
}

/// Moves a plaintext key out of the SDK's blob into zeroizing memory.
fn take_plaintext(
    blob: Option<Blob>,
    context: &EncryptionContext,
) -> Result<SecretKey, KeyProviderError> {
    let unexpected = |reason: &str| KeyProviderError::UnexpectedResponse {
        context: context.clone(),
        reason: reason.to_owned(),
    };
    let bytes = Zeroizing::new(
        blob.ok_or_else(|| unexpected("no plaintext key"))?
            .into_inner(),
    );
    SecretKey::from_slice(&bytes).ok_or_else(|| unexpected("plaintext key is not 32 bytes"))
}

#[async_trait]
impl KeyProvider for KmsKeyProvider {
    async fn generate_data_key(
        &self,
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyProviderError> {
        let mut output = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context.to_map()))
            .send()
            .await
            .map_err(|e| map_sdk_error(e, context))?;
        let plaintext = take_plaintext(output.plaintext.take(), context)?;
        let wrapped =
            output
                .ciphertext_blob
                .take()
                .ok_or_else(|| KeyProviderError::UnexpectedResponse {
                    context: context.clone(),
                    reason: "no wrapped key (CiphertextBlob)".to_owned(),
                })?;
        Ok(DataKey {
            plaintext,
            wrapped: WrappedKey::new(wrapped.into_inner()),
        })
    }

    async fn decrypt_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &EncryptionContext,
    ) -> Result<SecretKey, KeyProviderError> {
        let mut output = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(wrapped.as_bytes()))
            .set_encryption_context(Some(context.to_map()))
            .send()
            .await
            .map_err(|e| map_sdk_error(e, context))?;
        take_plaintext(output.plaintext.take(), context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::care_system::CareSystemName;
    use crate::envelope::key_provider::KeyPurpose;
    use aws_sdk_kms::config::retry::RetryConfig;
    use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
    use aws_smithy_http_client::test_util::infallible_client_fn;
    use aws_smithy_types::base64;
    use std::sync::{Arc, Mutex};

    const KEY_ARN: &str = "arn:aws:kms:eu-west-2:111122223333:key/test";

    fn context() -> EncryptionContext {
        EncryptionContext::new(
            CareSystemName::parse("nw-london").unwrap(),
            KeyPurpose::TenantRootKey,
        )
    }

    /// A client whose every request gets `status` and `body`; the requests' bodies are
    /// recorded.
    fn client(status: u16, body: String) -> (aws_sdk_kms::Client, Arc<Mutex<Vec<String>>>) {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let http = infallible_client_fn(move |request: http::Request<_>| {
            let target = request
                .headers()
                .get("x-amz-target")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let sent = std::str::from_utf8(request.body().bytes().unwrap_or_default())
                .unwrap()
                .to_owned();
            seen.lock().unwrap().push(format!("{target} {sent}"));
            http::Response::builder()
                .status(status)
                .header("content-type", "application/x-amz-json-1.1")
                .body(body.clone())
                .unwrap()
        });
        let config = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("eu-west-2"))
            .credentials_provider(Credentials::new("AKID", "SECRET", None, None, "test"))
            .retry_config(RetryConfig::disabled())
            .http_client(http)
            .build();
        (aws_sdk_kms::Client::from_conf(config), requests)
    }

    fn error_body(code: &str) -> String {
        format!(r#"{{"__type":"{code}","message":"refused by test"}}"#)
    }

    #[tokio::test]
    async fn generate_sends_key_id_spec_and_context() {
        let key = [7u8; 32];
        let body = format!(
            r#"{{"CiphertextBlob":"{}","Plaintext":"{}","KeyId":"{KEY_ARN}"}}"#,
            base64::encode(b"wrapped-by-kms"),
            base64::encode(key)
        );
        let (client, requests) = client(200, body);
        let provider = KmsKeyProvider::new(client, KEY_ARN);
        let data_key = provider.generate_data_key(&context()).await.unwrap();
        assert_eq!(data_key.plaintext.expose(), &key);
        assert_eq!(data_key.wrapped.as_bytes(), b"wrapped-by-kms");

        let sent = requests.lock().unwrap().join("\n");
        assert!(sent.starts_with("TrentService.GenerateDataKey "), "{sent}");
        assert!(
            sent.contains(r#""KeyId":"arn:aws:kms:eu-west-2:111122223333:key/test""#),
            "{sent}"
        );
        assert!(sent.contains(r#""KeySpec":"AES_256""#), "{sent}");
        assert!(sent.contains(r#""care-system":"nw-london""#), "{sent}");
        assert!(sent.contains(r#""purpose":"tenant-root-key""#), "{sent}");
    }

    #[tokio::test]
    async fn decrypt_pins_the_key_and_context() {
        let key = [9u8; 32];
        let body = format!(
            r#"{{"Plaintext":"{}","KeyId":"{KEY_ARN}"}}"#,
            base64::encode(key)
        );
        let (client, requests) = client(200, body);
        let provider = KmsKeyProvider::new(client, KEY_ARN);
        let unwrapped = provider
            .decrypt_data_key(&WrappedKey::new(b"wrapped".to_vec()), &context())
            .await
            .unwrap();
        assert_eq!(unwrapped.expose(), &key);
        let sent = requests.lock().unwrap().join("\n");
        assert!(sent.starts_with("TrentService.Decrypt "), "{sent}");
        assert!(
            sent.contains(&format!(
                r#""CiphertextBlob":"{}""#,
                base64::encode(b"wrapped")
            )),
            "{sent}"
        );
        assert!(
            sent.contains(r#""KeyId":"arn:aws:kms:eu-west-2:111122223333:key/test""#),
            "{sent}"
        );
        assert!(sent.contains(r#""care-system":"nw-london""#), "{sent}");
    }

    #[tokio::test]
    async fn refused_keys_are_unavailable() {
        for code in [
            "DisabledException",
            "KMSInvalidStateException",
            "AccessDeniedException",
            "NotFoundException",
        ] {
            let (client, _) = client(400, error_body(code));
            let provider = KmsKeyProvider::new(client, KEY_ARN);
            let err = provider
                .decrypt_data_key(&WrappedKey::new(vec![1]), &context())
                .await
                .unwrap_err();
            assert!(
                matches!(err, KeyProviderError::KeyUnavailable { .. }),
                "{code}: {err}"
            );
            assert!(err.to_string().contains(code), "{err}");
            let err = provider.generate_data_key(&context()).await.unwrap_err();
            assert!(
                matches!(err, KeyProviderError::KeyUnavailable { .. }),
                "{code}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn foreign_ciphertexts_are_rejected() {
        for code in ["InvalidCiphertextException", "IncorrectKeyException"] {
            let (client, _) = client(400, error_body(code));
            let provider = KmsKeyProvider::new(client, KEY_ARN);
            let err = provider
                .decrypt_data_key(&WrappedKey::new(vec![1]), &context())
                .await
                .unwrap_err();
            assert!(
                matches!(err, KeyProviderError::WrappedKeyRejected { .. }),
                "{code}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retryable() {
        for (status, code) in [(500, "KMSInternalException"), (400, "ThrottlingException")] {
            let (client, _) = client(status, error_body(code));
            let provider = KmsKeyProvider::new(client, KEY_ARN);
            let err = provider.generate_data_key(&context()).await.unwrap_err();
            assert!(err.is_transient(), "{code}: {err}");
        }
    }

    #[tokio::test]
    async fn a_short_plaintext_key_is_refused() {
        let body = format!(r#"{{"Plaintext":"{}"}}"#, base64::encode([1u8; 16]));
        let (client, _) = client(200, body);
        let provider = KmsKeyProvider::new(client, KEY_ARN);
        let err = provider
            .decrypt_data_key(&WrappedKey::new(vec![1]), &context())
            .await
            .unwrap_err();
        assert!(
            matches!(err, KeyProviderError::UnexpectedResponse { .. }),
            "{err}"
        );
    }
}
