//! `OperationOutcome`: how every error reaches a FHIR client, and the HTTP status that goes with
//! each error of this crate.
//!
//! Invariants:
//! - every error type of this crate maps to exactly one (status, OperationOutcome) through
//!   [`ToOutcome`], with severity `error` and a FHIR issue-type code;
//! - diagnostics are the errors' own messages, which name elements and parameters but never
//!   carry a value from the request (values are patient data), so an outcome is safe to return
//!   and to log.

use serde_json::{Value, json};

use crate::resource::{ElementProblem, ErrorKind, ResourceError};
use crate::search::SearchError;

/// `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fatal => "fatal",
            Self::Error => "error",
            Self::Warning => "warning",
            Self::Information => "information",
        }
    }
}

/// `OperationOutcome.issue.code` (FHIR R4 IssueType), the codes this server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IssueType {
    Invalid,
    Structure,
    Required,
    Value,
    Invariant,
    Security,
    Login,
    Forbidden,
    Processing,
    NotSupported,
    Duplicate,
    NotFound,
    Deleted,
    TooLong,
    CodeInvalid,
    BusinessRule,
    Conflict,
    Transient,
    Exception,
    Timeout,
    Throttled,
    TooCostly,
    Suppressed,
    Informational,
}

impl IssueType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Structure => "structure",
            Self::Required => "required",
            Self::Value => "value",
            Self::Invariant => "invariant",
            Self::Security => "security",
            Self::Login => "login",
            Self::Forbidden => "forbidden",
            Self::Processing => "processing",
            Self::NotSupported => "not-supported",
            Self::Duplicate => "duplicate",
            Self::NotFound => "not-found",
            Self::Deleted => "deleted",
            Self::TooLong => "too-long",
            Self::CodeInvalid => "code-invalid",
            Self::BusinessRule => "business-rule",
            Self::Conflict => "conflict",
            Self::Transient => "transient",
            Self::Exception => "exception",
            Self::Timeout => "timeout",
            Self::Throttled => "throttled",
            Self::TooCostly => "too-costly",
            Self::Suppressed => "suppressed",
            Self::Informational => "informational",
        }
    }
}

/// One `OperationOutcome.issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueType,
    pub diagnostics: Option<String>,
    /// FHIRPath-like locations, e.g. `Patient.identifier[0].value`.
    pub expression: Vec<String>,
}

/// A FHIR `OperationOutcome`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OperationOutcome {
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    /// An outcome with one issue.
    pub fn single(
        severity: Severity,
        code: IssueType,
        diagnostics: impl Into<String>,
        expression: Option<&str>,
    ) -> Self {
        Self {
            issues: vec![Issue {
                severity,
                code,
                diagnostics: Some(diagnostics.into()),
                expression: expression.map(str::to_string).into_iter().collect(),
            }],
        }
    }

    /// An outcome with one `error` issue.
    pub fn error(code: IssueType, diagnostics: impl Into<String>) -> Self {
        Self::single(Severity::Error, code, diagnostics, None)
    }

    /// Warnings for the parameters a lenient search skipped (for the searchset's outcome entry).
    pub fn ignored_parameters(ignored: &[SearchError]) -> Self {
        Self {
            issues: ignored
                .iter()
                .map(|e| Issue {
                    severity: Severity::Warning,
                    code: IssueType::NotSupported,
                    diagnostics: Some(format!("ignored: {e}")),
                    expression: Vec::new(),
                })
                .collect(),
        }
    }

    /// The FHIR JSON representation.
    pub fn to_json(&self) -> Value {
        let issues: Vec<Value> = self
            .issues
            .iter()
            .map(|issue| {
                let mut v = json!({
                    "severity": issue.severity.as_str(),
                    "code": issue.code.as_str(),
                });
                if let Some(d) = &issue.diagnostics {
                    v["diagnostics"] = json!(d);
                }
                if !issue.expression.is_empty() {
                    v["expression"] = json!(issue.expression);
                }
                v
            })
            .collect();
        json!({"resourceType": "OperationOutcome", "issue": issues})
    }
}

/// An error that has an HTTP status and an `OperationOutcome`.
pub trait ToOutcome {
    fn status(&self) -> u16;
    fn outcome(&self) -> OperationOutcome;
}

impl ToOutcome for ResourceError {
    fn status(&self) -> u16 {
        match self.kind() {
            ErrorKind::Malformed => 400,
            ErrorKind::Unprocessable => 422,
        }
    }

    fn outcome(&self) -> OperationOutcome {
        let code = match self {
            Self::NotJson { .. } | Self::NotAnObject => IssueType::Structure,
            Self::MissingResourceType => IssueType::Required,
            Self::UnsupportedResourceType => IssueType::NotSupported,
            Self::ResourceTypeMismatch { .. } => IssueType::Invalid,
            Self::Element { problem, .. } => match problem {
                ElementProblem::WrongJsonType { .. } => IssueType::Structure,
                ElementProblem::CodeNotAllowed { .. } => IssueType::CodeInvalid,
                ElementProblem::NhsNumber(_) | ElementProblem::OdsCode(_) => {
                    IssueType::BusinessRule
                }
                ElementProblem::Date(_) | ElementProblem::Id(_) => IssueType::Value,
            },
        };
        OperationOutcome::single(Severity::Error, code, self.to_string(), self.expression())
    }
}

impl ToOutcome for SearchError {
    fn status(&self) -> u16 {
        400
    }

    fn outcome(&self) -> OperationOutcome {
        let code = match self {
            Self::TooManyParameters => IssueType::TooCostly,
            Self::UnknownParameter { .. } => IssueType::NotSupported,
            Self::InvalidParameter { .. } => IssueType::Invalid,
        };
        OperationOutcome::error(code, self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identifiers::NHS_NUMBER_SYSTEM;
    use crate::resource::{Resource, ResourceType};
    use crate::search::SearchQuery;

    #[test]
    fn bad_nhs_number_is_a_422_outcome_without_the_number() {
        let body = format!(
            r#"{{"resourceType":"Patient","identifier":[{{"system":"{NHS_NUMBER_SYSTEM}","value":"9434765918"}}]}}"#
        );
        let err = Resource::parse(body.as_bytes(), Some(ResourceType::Patient)).unwrap_err();
        assert_eq!(err.status(), 422);
        let json = err.outcome().to_json();
        assert_eq!(json["resourceType"], "OperationOutcome");
        assert_eq!(json["issue"][0]["severity"], "error");
        assert_eq!(json["issue"][0]["code"], "business-rule");
        assert_eq!(
            json["issue"][0]["expression"][0],
            "Patient.identifier[0].value"
        );
        assert!(!json.to_string().contains("9434765918"));
    }

    #[test]
    fn malformed_json_is_a_400_structure_outcome() {
        let err = Resource::parse(b"{\"resourceType\":", None).unwrap_err();
        assert_eq!(err.status(), 400);
        let json = err.outcome().to_json();
        assert_eq!(json["issue"][0]["code"], "structure");
        assert!(json["issue"][0].get("expression").is_none());
    }

    #[test]
    fn search_errors_are_400_and_name_the_parameter_not_the_value() {
        let err = SearchQuery::parse(
            ResourceType::Patient,
            [("identifier", "https://fhir.nhs.uk/Id/nhs-number|9434765918")],
            false,
        )
        .unwrap_err();
        assert_eq!(err.status(), 400);
        let text = err.outcome().to_json().to_string();
        assert!(text.contains("identifier"), "{text}");
        assert!(!text.contains("9434765918"), "{text}");
        let err =
            SearchQuery::parse(ResourceType::Patient, [("nickname", "x")], false).unwrap_err();
        assert_eq!(err.outcome().to_json()["issue"][0]["code"], "not-supported");
    }

    #[test]
    fn ignored_parameters_become_warnings() {
        let q = SearchQuery::parse(ResourceType::Patient, [("nickname", "x")], true).unwrap();
        let json = OperationOutcome::ignored_parameters(&q.ignored).to_json();
        assert_eq!(json["issue"][0]["severity"], "warning");
        assert!(
            json["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("nickname")
        );
    }
}
