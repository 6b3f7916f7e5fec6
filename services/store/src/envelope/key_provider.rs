//! Key providers: where tenant root keys come from and how they are wrapped.
//!
//! A [`KeyProvider`] makes fresh 256-bit data keys and hands back each one twice: in
//! plaintext (to use now) and wrapped under a key the provider guards (to store in the
//! bucket). Unwrapping needs the provider and the same [`EncryptionContext`], which names
//! the care system and the purpose of the key — never PHI, since KMS logs it in clear.
//!
//! Invariants: a provider never returns a plaintext key for a wrapped blob it did not
//! authenticate against the context; "the key exists but may not be used now" (disabled,
//! pending deletion, access denied) is always [`KeyProviderError::KeyUnavailable`], which
//! the store reports as 503 and which clears when the key is re-enabled.

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;

use super::secret_key::SecretKey;
use crate::care_system::CareSystemName;

/// What a data key is for. Part of the encryption context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// A care system's tenant root key, from which every object key is derived.
    TenantRootKey,
}

impl KeyPurpose {
    /// The purpose as written into encryption contexts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TenantRootKey => "tenant-root-key",
        }
    }
}

/// The authenticated, non-secret context a data key is wrapped under: KMS's
/// `EncryptionContext`, the local provider's AAD.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EncryptionContext {
    care_system: CareSystemName,
    purpose: KeyPurpose,
}

impl EncryptionContext {
    /// Context `"care-system"` key.
    pub const CARE_SYSTEM_KEY: &'static str = "care-system";
    /// Context `"purpose"` key.
    pub const PURPOSE_KEY: &'static str = "purpose";

    /// A context for `care_system`'s key used for `purpose`.
    pub fn new(care_system: CareSystemName, purpose: KeyPurpose) -> Self {
        Self {
            care_system,
            purpose,
        }
    }

    /// The care system named in the context.
    pub fn care_system(&self) -> &CareSystemName {
        &self.care_system
    }

    /// The purpose named in the context.
    pub fn purpose(&self) -> KeyPurpose {
        self.purpose
    }

    /// The context as a KMS `EncryptionContext` map.
    pub fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            (
                Self::CARE_SYSTEM_KEY.to_owned(),
                self.care_system.as_str().to_owned(),
            ),
            (
                Self::PURPOSE_KEY.to_owned(),
                self.purpose.as_str().to_owned(),
            ),
        ])
    }

    /// An unambiguous byte encoding (length-prefixed pairs in key order), used as AAD.
    pub fn to_aad(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in [
            (Self::CARE_SYSTEM_KEY, self.care_system.as_str()),
            (Self::PURPOSE_KEY, self.purpose.as_str()),
        ] {
            for field in [key, value] {
                out.extend_from_slice(&(field.len() as u32).to_be_bytes());
                out.extend_from_slice(field.as_bytes());
            }
        }
        out
    }
}

impl fmt::Display for EncryptionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "care-system={}, purpose={}",
            self.care_system,
            self.purpose.as_str()
        )
    }
}

/// A data key as the provider wrapped it: opaque bytes, safe to store in the bucket.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(Vec<u8>);

impl WrappedKey {
    /// Wraps stored bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey({} bytes)", self.0.len())
    }
}

/// A fresh data key: use `plaintext`, store `wrapped`.
#[derive(Debug, Clone)]
pub struct DataKey {
    /// The key itself; never persist it.
    pub plaintext: SecretKey,
    /// The key wrapped by the provider under the encryption context.
    pub wrapped: WrappedKey,
}

/// Why a provider could not make or unwrap a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyProviderError {
    /// The key exists but may not be used now: disabled, pending deletion, or access
    /// denied. The store answers 503 until an operator re-enables it.
    #[error(
        "the key for {context} is unavailable ({reason}): check that the key is enabled and \
         that the store's identity may use it"
    )]
    KeyUnavailable {
        /// The context of the refused request.
        context: EncryptionContext,
        /// What the provider said.
        reason: String,
    },
    /// The wrapped key was not made by this provider's key under this context
    /// (tampered, swapped, or made for another care system or purpose).
    #[error(
        "the wrapped key for {context} was rejected ({reason}): it was modified, or wrapped by \
         another key or for another care system"
    )]
    WrappedKeyRejected {
        /// The context the unwrap was attempted under.
        context: EncryptionContext,
        /// What the provider said.
        reason: String,
    },
    /// The provider could not be reached or failed transiently; retrying may help.
    #[error("the key provider could not serve {context}: {reason}")]
    Unreachable {
        /// The context of the failed request.
        context: EncryptionContext,
        /// What went wrong.
        reason: String,
    },
    /// The provider answered with something this code cannot use.
    #[error("the key provider answered {context} unexpectedly: {reason}")]
    UnexpectedResponse {
        /// The context of the request.
        context: EncryptionContext,
        /// What was wrong with the answer.
        reason: String,
    },
    /// Local cryptography failed (a broken random source).
    #[error("local cryptography failed while {0}")]
    Crypto(&'static str),
}

impl KeyProviderError {
    /// Whether the failure may clear by itself, so the request is worth retrying.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// A source of data keys, wrapped under a key the provider guards.
#[async_trait]
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// A fresh random 256-bit key, in plaintext and wrapped under `context`.
    async fn generate_data_key(
        &self,
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyProviderError>;

    /// Unwraps a key made by [`generate_data_key`](Self::generate_data_key) under the same
    /// `context`.
    async fn decrypt_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &EncryptionContext,
    ) -> Result<SecretKey, KeyProviderError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_names_care_system_and_purpose_only() {
        let context = EncryptionContext::new(
            CareSystemName::parse("nw-london").unwrap(),
            KeyPurpose::TenantRootKey,
        );
        let map = context.to_map();
        assert_eq!(map.len(), 2);
        assert_eq!(map["care-system"], "nw-london");
        assert_eq!(map["purpose"], "tenant-root-key");
        assert_eq!(
            context.to_string(),
            "care-system=nw-london, purpose=tenant-root-key"
        );
    }

    #[test]
    fn aad_differs_per_care_system() {
        let a = EncryptionContext::new(
            CareSystemName::parse("a").unwrap(),
            KeyPurpose::TenantRootKey,
        );
        let b = EncryptionContext::new(
            CareSystemName::parse("b").unwrap(),
            KeyPurpose::TenantRootKey,
        );
        assert_ne!(a.to_aad(), b.to_aad());
    }
}
