//! Errors from the cloud APIs (S3, KMS), sorted into the two kinds the controller treats
//! differently, and the tags that mark a cloud resource as a care system's.
//!
//! Invariants:
//! - Throttling, 5xx answers and network failures are [`CloudError::Transient`]: retried with
//!   backoff. Everything else (permission denied, invalid ARN, a resource owned by someone else)
//!   is [`CloudError::Permanent`]: reported as a condition with its reason, retried only at the
//!   slow resync interval, so a care system that needs a person never hot-loops.
//! - A [`CloudError::Permanent`] reason is a valid metav1.Condition reason (CamelCase letters
//!   and digits).

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// Tag naming the CareSystem a bucket or key belongs to.
pub const TAG_CARE_SYSTEM: &str = "shcr.dev/care-system";
/// Tag marking a bucket or key as created and managed by the operator.
pub const TAG_MANAGED_BY: &str = "shcr.dev/managed-by";
/// Value of [`TAG_MANAGED_BY`].
pub const MANAGER: &str = "shcr-operator";

/// Error codes that mean "try again later" whatever the HTTP status.
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "KMSInternalException",
    "DependencyTimeoutException",
    "OperationAborted",
];

#[derive(Debug, Clone, thiserror::Error)]
pub enum CloudError {
    /// Worth retrying soon.
    #[error("{operation} failed temporarily (will retry): {detail}")]
    Transient {
        operation: &'static str,
        detail: String,
    },
    /// Needs a person (or a change elsewhere) before a retry can succeed.
    #[error("{message}")]
    Permanent { reason: String, message: String },
}

impl CloudError {
    pub fn permanent(reason: &str, message: impl Into<String>) -> Self {
        Self::Permanent {
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// The condition reason for this error.
    pub fn reason(&self) -> &str {
        match self {
            Self::Transient { .. } => "CloudApiUnavailable",
            Self::Permanent { reason, .. } => reason,
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}

/// The error code of an SDK error (`NoSuchBucket`, `NotFoundException`, ...), if the service
/// answered with one.
pub fn error_code<E: ProvideErrorMetadata>(error: &SdkError<E>) -> Option<&str> {
    match error {
        SdkError::ServiceError(context) => context.err().code(),
        _ => None,
    }
}

/// The HTTP status of the service's answer, if there was one.
pub fn http_status<E>(error: &SdkError<E>) -> Option<u16> {
    error
        .raw_response()
        .map(|response| response.status().as_u16())
}

/// Sorts an SDK error from `operation` (e.g. "S3 CreateBucket") into transient or permanent.
pub fn classify<E>(operation: &'static str, error: SdkError<E>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = http_status(&error);
    let code = error_code(&error).map(str::to_owned);
    let detail = DisplayErrorContext(&error).to_string();
    let transient = match &error {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            status.is_some_and(|status| status >= 500 || status == 429)
                || code
                    .as_deref()
                    .is_some_and(|code| TRANSIENT_CODES.contains(&code))
        }
        _ => false,
    };
    if transient {
        return CloudError::Transient { operation, detail };
    }
    let reason = code
        .as_deref()
        .map(condition_reason)
        .filter(|reason| !reason.is_empty())
        .unwrap_or_else(|| "CloudRequestFailed".to_owned());
    CloudError::Permanent {
        reason,
        message: format!("{operation} was refused: {detail}"),
    }
}

/// Keeps the characters a metav1.Condition reason allows, starting with a letter.
fn condition_reason(code: &str) -> String {
    code.chars()
        .filter(char::is_ascii_alphanumeric)
        .skip_while(|c| !c.is_ascii_alphabetic())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_valid_condition_reasons() {
        assert_eq!(condition_reason("AccessDenied"), "AccessDenied");
        assert_eq!(
            condition_reason("Invalid.Arn-Exception"),
            "InvalidArnException"
        );
        assert_eq!(condition_reason("404NotFound"), "NotFound");
    }
}
