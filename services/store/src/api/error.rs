//! Why a FHIR interaction failed, and the HTTP status and `OperationOutcome` each failure gets.
//!
//! Invariants:
//! - every variant maps to exactly one status (see [`ApiError::status`]) and one outcome;
//! - diagnostics name types, elements, parameters and versions, never a value from a resource
//!   or a search (those are patient data); storage failures are reported by kind only.

use shcr_fhir::outcome::{IssueType, OperationOutcome, Severity, ToOutcome};
use shcr_fhir::resource::{ResourceError, ResourceType};
use shcr_fhir::search::SearchError;
use shcr_identity::{AssertionError, Interaction};

use crate::engine::EngineError;
use crate::tenant::TenantError;

/// A failed FHIR interaction.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error("this server does not support the resource type named in the URL")]
    UnknownResourceType,
    #[error("the resource id in the URL is not a FHIR id (1-64 of A-Z a-z 0-9 - .)")]
    InvalidId,
    #[error("the version id in the URL is not a whole number")]
    InvalidVersionId,
    #[error("{resource_type} with this id does not exist")]
    NotFound { resource_type: ResourceType },
    #[error("{resource_type} with this id does not have the requested version")]
    VersionNotFound { resource_type: ResourceType },
    #[error("{resource_type} with this id was deleted")]
    Gone { resource_type: ResourceType },
    #[error(
        "If-Match names version {expected} but the current version is {current}: read the \
         resource again and reapply the change"
    )]
    VersionConflict { expected: u64, current: String },
    #[error(
        "If-None-Exist matches more than one {resource_type}: make the condition specific \
         enough to identify one resource"
    )]
    MultipleMatches { resource_type: ResourceType },
    #[error("If-None-Exist must be a search query with at least one search parameter")]
    InvalidCondition,
    #[error(
        "_history takes _since (a FHIR instant), _count (a whole number) and the _cursor of a \
         previous page only, each at most once"
    )]
    InvalidHistoryParameter,
    #[error("the _history paging cursor is not one this server issued")]
    InvalidHistoryCursor,
    #[error("If-Match must be an ETag such as W/\"3\"")]
    InvalidIfMatch,
    #[error("an update must carry the resource id in the body, equal to the id in the URL")]
    IdMismatch,
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body could not be read")]
    BodyUnreadable,
    #[error("this store does not serve the care system named in the URL")]
    WrongCareSystem,
    #[error("no FHIR interaction is defined at this URL")]
    NoSuchInteraction,
    #[error("this URL does not support the HTTP method used")]
    MethodNotAllowed,
    #[error("{resource_type} resources are written by the store itself, not by clients")]
    ReadOnlyType { resource_type: ResourceType },
    #[error("{0} is not supported by this server")]
    Unsupported(&'static str),
    #[error("the search matches more than {limit} resources: add criteria to narrow it")]
    TooCostly { limit: usize },
    #[error(
        "the care system's encryption key is unavailable (disabled, deleted or access denied): \
         records cannot be read or written until the key is usable again"
    )]
    KeyUnavailable,
    #[error(
        "this store instance is no longer the writer of the care system's database (another \
         instance took over): retry, the request will reach the current writer"
    )]
    Fenced,
    #[error("the record store is temporarily unavailable: retry later")]
    StorageUnavailable,
    #[error("the record store failed to process the request")]
    Internal,
    #[error("{0}")]
    Unauthenticated(AssertionError),
    #[error(
        "the identity's scopes do not permit {interaction} of {}",
        resource_type.map_or("every resource type".to_string(), |t| t.to_string())
    )]
    ScopeDenied {
        interaction: Interaction,
        resource_type: Option<ResourceType>,
    },
    #[error("not permitted: {0}")]
    Forbidden(&'static str),
    #[error("invalid Bundle: {0}")]
    InvalidBundle(&'static str),
    #[error("invalid $export request: {0}")]
    InvalidExport(&'static str),
    #[error("$export runs asynchronously: send Prefer: respond-async")]
    RespondAsyncRequired,
    #[error("no such export job (jobs are kept in memory and end with a restart or DELETE)")]
    NoSuchExport,
    #[error("the export job failed: start it again")]
    ExportFailed,
    #[error("Bundle.entry[{index}]: {source}")]
    Entry { index: usize, source: Box<ApiError> },
    #[error(
        "the identity is confined to one patient's records and this resource is not in that \
         patient's compartment"
    )]
    OutsideCompartment,
}

impl ApiError {
    /// Converts a storage failure, keeping only its kind (never its message: messages from
    /// lower layers may quote keys, and keys hold index values).
    pub(crate) fn from_tenant(e: TenantError) -> Self {
        match e {
            TenantError::KeyUnavailable(_) => Self::KeyUnavailable,
            TenantError::Engine(EngineError::KeyUnavailable(_)) => Self::KeyUnavailable,
            TenantError::Engine(EngineError::Fenced) => Self::Fenced,
            TenantError::Engine(EngineError::Closed | EngineError::Unavailable(_))
            | TenantError::Keyring(_)
            | TenantError::Storage(_) => Self::StorageUnavailable,
            TenantError::Engine(
                EngineError::Data(_) | EngineError::Internal(_) | EngineError::Key(_),
            ) => Self::Internal,
        }
    }

    /// Whether the failure is the server's (logged) rather than the client's.
    pub fn is_server_error(&self) -> bool {
        self.status() >= 500
    }
}

impl From<TenantError> for ApiError {
    fn from(e: TenantError) -> Self {
        Self::from_tenant(e)
    }
}

impl ToOutcome for ApiError {
    fn status(&self) -> u16 {
        match self {
            Self::Resource(e) => e.status(),
            Self::Entry { source, .. } => source.status(),
            Self::InvalidBundle(_) | Self::InvalidExport(_) | Self::RespondAsyncRequired => 400,
            Self::NoSuchExport => 404,
            Self::ExportFailed => 500,
            Self::Search(e) => e.status(),
            Self::UnknownResourceType
            | Self::NotFound { .. }
            | Self::VersionNotFound { .. }
            | Self::WrongCareSystem
            | Self::NoSuchInteraction => 404,
            Self::InvalidId
            | Self::InvalidVersionId
            | Self::InvalidIfMatch
            | Self::InvalidCondition
            | Self::InvalidHistoryParameter
            | Self::InvalidHistoryCursor
            | Self::IdMismatch
            | Self::BodyUnreadable
            | Self::Unsupported(_)
            | Self::TooCostly { .. } => 400,
            Self::MethodNotAllowed | Self::ReadOnlyType { .. } => 405,
            Self::Unauthenticated(_) => 401,
            Self::ScopeDenied { .. } | Self::Forbidden(_) | Self::OutsideCompartment => 403,
            Self::Gone { .. } => 410,
            Self::VersionConflict { .. } | Self::MultipleMatches { .. } => 412,
            Self::BodyTooLarge { .. } => 413,
            Self::KeyUnavailable | Self::Fenced | Self::StorageUnavailable => 503,
            Self::Internal => 500,
        }
    }

    fn outcome(&self) -> OperationOutcome {
        let code = match self {
            Self::Resource(e) => return e.outcome(),
            Self::Search(e) => return e.outcome(),
            Self::Entry { index, source } => {
                let mut outcome = source.outcome();
                for issue in &mut outcome.issues {
                    issue.diagnostics = Some(match issue.diagnostics.take() {
                        Some(d) => format!("Bundle.entry[{index}]: {d}"),
                        None => format!("Bundle.entry[{index}]"),
                    });
                    if issue.expression.is_empty() {
                        issue.expression.push(format!("Bundle.entry[{index}]"));
                    } else {
                        for e in &mut issue.expression {
                            *e = format!("Bundle.entry[{index}].resource.{e}");
                        }
                    }
                }
                return outcome;
            }
            Self::InvalidBundle(_) | Self::InvalidExport(_) | Self::RespondAsyncRequired => {
                IssueType::Invalid
            }
            Self::NoSuchExport => IssueType::NotFound,
            Self::ExportFailed => IssueType::Exception,
            Self::UnknownResourceType
            | Self::NoSuchInteraction
            | Self::MethodNotAllowed
            | Self::Unsupported(_) => IssueType::NotSupported,
            Self::ReadOnlyType { .. } => IssueType::Forbidden,
            Self::InvalidId | Self::InvalidVersionId | Self::InvalidIfMatch => IssueType::Value,
            Self::NotFound { .. } | Self::VersionNotFound { .. } | Self::WrongCareSystem => {
                IssueType::NotFound
            }
            Self::Gone { .. } => IssueType::Deleted,
            Self::VersionConflict { .. } => IssueType::Conflict,
            Self::MultipleMatches { .. } => IssueType::Duplicate,
            Self::InvalidCondition | Self::InvalidHistoryParameter | Self::InvalidHistoryCursor => {
                IssueType::Invalid
            }
            Self::IdMismatch => IssueType::Invalid,
            Self::BodyTooLarge { .. } => IssueType::TooLong,
            Self::BodyUnreadable => IssueType::Structure,
            Self::TooCostly { .. } => IssueType::TooCostly,
            Self::KeyUnavailable | Self::Fenced | Self::StorageUnavailable => IssueType::Transient,
            Self::Internal => IssueType::Exception,
            Self::Unauthenticated(_) => IssueType::Login,
            Self::ScopeDenied { .. } | Self::Forbidden(_) | Self::OutsideCompartment => {
                IssueType::Forbidden
            }
        };
        let expression = match self {
            Self::IdMismatch => Some("id"),
            _ => None,
        };
        OperationOutcome::single(Severity::Error, code, self.to_string(), expression)
    }
}
