//! FHIR resources as they enter the store: parsed and checked once, at the edge.
//!
//! [`Resource::parse`] turns request bytes into a [`Resource`] or a [`ResourceError`] naming the
//! offending element with a FHIRPath-like expression (`Patient.identifier[0].value`).
//!
//! Invariants of a [`Resource`]:
//! - it is a JSON object whose `resourceType` is a supported [`ResourceType`] (and the expected
//!   one, when the request named one);
//! - its `id`, if present, has FHIR id syntax;
//! - every Identifier anywhere in it (contained resources and Bundle entries included) whose
//!   system is the NHS number system holds a number passing Modulus 11, and every one on the ODS
//!   system holds a syntactically valid ODS code;
//! - every element a search parameter of its type indexes has the JSON shape and value syntax
//!   FHIR requires (so [`crate::search::index_terms`] never meets a value it cannot read).
//!
//! Errors say what is wrong and where, never the rejected value: values are patient data.

use std::fmt::{self, Write as _};
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::datetime::DateError;
use crate::identifiers::{
    NHS_NUMBER_SYSTEM, NhsNumber, NhsNumberError, ODS_ORGANIZATION_CODE_SYSTEM, OdsCode,
    OdsCodeError,
};

macro_rules! resource_types {
    ($($variant:ident),* $(,)?) => {
        /// The resource types this server stores.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum ResourceType {
            $($variant),*
        }

        impl ResourceType {
            /// Every supported type, in declaration order.
            pub const ALL: &'static [ResourceType] = &[$(ResourceType::$variant),*];

            /// The FHIR name, e.g. `"MedicationRequest"`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ResourceType::$variant => stringify!($variant)),*
                }
            }
        }
    };
}

resource_types!(
    Patient,
    Practitioner,
    PractitionerRole,
    Organization,
    Observation,
    Condition,
    Procedure,
    MedicationRequest,
    MedicationStatement,
    AllergyIntolerance,
    Immunization,
    Encounter,
    DocumentReference,
    CarePlan,
    Composition,
    AuditEvent,
    Bundle,
    Group,
);

/// The string is not the name of a supported resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a resource type this server supports")]
pub struct UnsupportedResourceType;

impl FromStr for ResourceType {
    type Err = UnsupportedResourceType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or(UnsupportedResourceType)
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The string is not a FHIR id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a resource id is 1 to 64 characters from A-Z, a-z, 0-9, '-' and '.'")]
pub struct InvalidResourceId;

/// A FHIR logical id: `[A-Za-z0-9\-\.]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId(String);

impl ResourceId {
    pub fn parse(input: &str) -> Result<Self, InvalidResourceId> {
        let ok = (1..=64).contains(&input.len())
            && input
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if ok {
            Ok(Self(input.to_string()))
        } else {
            Err(InvalidResourceId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ResourceId {
    type Err = InvalidResourceId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether an error means the request could not be read as FHIR (HTTP 400) or was read but
/// breaks a rule (HTTP 422).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Malformed,
    Unprocessable,
}

/// What is wrong with one element.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElementProblem {
    #[error("expected {expected}")]
    WrongJsonType { expected: &'static str },
    #[error("{0}")]
    Date(DateError),
    #[error("{0}")]
    Id(InvalidResourceId),
    #[error("{0}")]
    NhsNumber(NhsNumberError),
    #[error("{0}")]
    OdsCode(OdsCodeError),
    #[error("not one of the codes allowed here ({allowed})")]
    CodeNotAllowed { allowed: &'static str },
}

/// Why a body is not an acceptable resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("the body is not well-formed JSON (line {line}, column {column})")]
    NotJson { line: usize, column: usize },
    #[error("the body must be a JSON object holding one FHIR resource")]
    NotAnObject,
    #[error("resourceType is missing or not a string")]
    MissingResourceType,
    #[error("resourceType names a type this server does not support")]
    UnsupportedResourceType,
    #[error("resourceType is {found} but the request is for {expected}")]
    ResourceTypeMismatch {
        expected: ResourceType,
        found: ResourceType,
    },
    #[error("{expression}: {problem}")]
    Element {
        expression: String,
        problem: ElementProblem,
    },
}

impl ResourceError {
    pub(crate) fn element(expression: impl Into<String>, problem: ElementProblem) -> Self {
        Self::Element {
            expression: expression.into(),
            problem,
        }
    }

    /// 400 for what cannot be read as FHIR, 422 for business rules (NHS number, ODS code).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Element {
                problem: ElementProblem::NhsNumber(_) | ElementProblem::OdsCode(_),
                ..
            } => ErrorKind::Unprocessable,
            _ => ErrorKind::Malformed,
        }
    }

    /// The FHIRPath-like location of the problem, when it is one element.
    pub fn expression(&self) -> Option<&str> {
        match self {
            Self::Element { expression, .. } => Some(expression),
            Self::MissingResourceType
            | Self::UnsupportedResourceType
            | Self::ResourceTypeMismatch { .. } => Some("resourceType"),
            Self::NotJson { .. } | Self::NotAnObject => None,
        }
    }
}

/// A parsed, checked FHIR resource (see the module invariants).
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    resource_type: ResourceType,
    id: Option<ResourceId>,
    json: Map<String, Value>,
}

impl Resource {
    /// Parses request bytes; `expected_type` is the type the URL names, if any.
    pub fn parse(bytes: &[u8], expected_type: Option<ResourceType>) -> Result<Self, ResourceError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ResourceError::NotJson {
            line: e.line(),
            column: e.column(),
        })?;
        Self::from_value(value, expected_type)
    }

    /// Checks an already-decoded JSON value (e.g. one entry of a Bundle).
    pub fn from_value(
        value: Value,
        expected_type: Option<ResourceType>,
    ) -> Result<Self, ResourceError> {
        let Value::Object(json) = value else {
            return Err(ResourceError::NotAnObject);
        };
        let resource_type: ResourceType = json
            .get("resourceType")
            .and_then(Value::as_str)
            .ok_or(ResourceError::MissingResourceType)?
            .parse()
            .map_err(|_| ResourceError::UnsupportedResourceType)?;
        if let Some(expected) = expected_type
            && expected != resource_type
        {
            return Err(ResourceError::ResourceTypeMismatch {
                expected,
                found: resource_type,
            });
        }
        let id = match json.get("id") {
            None => None,
            Some(Value::String(s)) => Some(ResourceId::parse(s).map_err(|e| {
                ResourceError::element(format!("{resource_type}.id"), ElementProblem::Id(e))
            })?),
            Some(_) => {
                return Err(ResourceError::element(
                    format!("{resource_type}.id"),
                    ElementProblem::WrongJsonType {
                        expected: "a string",
                    },
                ));
            }
        };
        check_uk_core_identifiers(&json, &mut resource_type.as_str().to_string())?;
        crate::search::check_indexed_elements(resource_type, &json)?;
        Ok(Self {
            resource_type,
            id,
            json,
        })
    }

    pub fn resource_type(&self) -> ResourceType {
        self.resource_type
    }

    pub fn id(&self) -> Option<&ResourceId> {
        self.id.as_ref()
    }

    /// The resource's JSON object.
    pub fn json(&self) -> &Map<String, Value> {
        &self.json
    }

    pub fn into_json(self) -> Map<String, Value> {
        self.json
    }

    /// Serialises the resource (compact JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a Map<String, Value> cannot fail: keys are strings and values are JSON.
        serde_json::to_vec(&self.json).unwrap_or_default()
    }

    /// Sets the server-assigned id.
    pub fn set_id(&mut self, id: ResourceId) {
        self.json
            .insert("id".to_string(), Value::String(id.as_str().to_string()));
        self.id = Some(id);
    }

    /// Sets `meta.versionId` and `meta.lastUpdated` (a FHIR instant, see
    /// [`crate::datetime::format_instant`]), keeping the rest of `meta`.
    pub fn set_meta(&mut self, version_id: &str, last_updated: &str) {
        let meta = self
            .json
            .entry("meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if !meta.is_object() {
            *meta = Value::Object(Map::new());
        }
        if let Value::Object(meta) = meta {
            meta.insert(
                "versionId".to_string(),
                Value::String(version_id.to_string()),
            );
            meta.insert(
                "lastUpdated".to_string(),
                Value::String(last_updated.to_string()),
            );
        }
    }
}

/// Walks the whole resource and checks every Identifier on the NHS number or ODS system.
/// `path` is a reused buffer (the expression of `object`), so the walk allocates only on error.
fn check_uk_core_identifiers(
    object: &Map<String, Value>,
    path: &mut String,
) -> Result<(), ResourceError> {
    let system = object.get("system").and_then(Value::as_str);
    if let Some(system @ (NHS_NUMBER_SYSTEM | ODS_ORGANIZATION_CODE_SYSTEM)) = system
        && let Some(value) = object.get("value")
    {
        let expression = || format!("{path}.value");
        let Value::String(value) = value else {
            return Err(ResourceError::element(
                expression(),
                ElementProblem::WrongJsonType {
                    expected: "a string",
                },
            ));
        };
        if system == NHS_NUMBER_SYSTEM {
            NhsNumber::parse(value)
                .map_err(|e| ResourceError::element(expression(), ElementProblem::NhsNumber(e)))?;
        } else {
            OdsCode::parse(value)
                .map_err(|e| ResourceError::element(expression(), ElementProblem::OdsCode(e)))?;
        }
    }
    for (key, child) in object {
        let len = path.len();
        match child {
            Value::Object(o) => {
                path.push('.');
                path.push_str(key);
                check_uk_core_identifiers(o, path)?;
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Object(o) = item {
                        path.truncate(len);
                        path.push('.');
                        path.push_str(key);
                        // Writing to a String cannot fail.
                        let _ = write!(path, "[{i}]");
                        check_uk_core_identifiers(o, path)?;
                    }
                }
            }
            _ => {}
        }
        path.truncate(len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(v: Value, expected: Option<ResourceType>) -> Result<Resource, ResourceError> {
        Resource::parse(&serde_json::to_vec(&v).unwrap(), expected)
    }

    #[test]
    fn resource_types_round_trip() {
        for t in ResourceType::ALL {
            assert_eq!(t.as_str().parse::<ResourceType>(), Ok(*t));
            assert_eq!(t.to_string(), t.as_str());
        }
        assert!("patient".parse::<ResourceType>().is_err());
        assert!("Medication".parse::<ResourceType>().is_err());
        assert_eq!(ResourceType::ALL.len(), 18);
    }

    #[test]
    fn resource_ids() {
        for ok in ["a", "123", "A-b.c", &"x".repeat(64)] {
            assert!(ResourceId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "a_b", "é", &"x".repeat(65)] {
            assert!(ResourceId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_valid_patient_parses() {
        let p = parse(
            json!({
                "resourceType": "Patient",
                "id": "p1",
                "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": "943 476 5919"}],
                "name": [{"family": "Smith", "given": ["Zoë"]}],
                "birthDate": "1980-02-29",
                "gender": "female",
                "generalPractitioner": [{"identifier": {"system": ODS_ORGANIZATION_CODE_SYSTEM, "value": "Y02494"}}]
            }),
            Some(ResourceType::Patient),
        )
        .unwrap();
        assert_eq!(p.resource_type(), ResourceType::Patient);
        assert_eq!(p.id().map(ResourceId::as_str), Some("p1"));
    }

    #[test]
    fn malformed_bodies_are_400() {
        let cases: [(&[u8], ResourceError); 4] = [
            (b"{", ResourceError::NotJson { line: 1, column: 1 }),
            (b"[]", ResourceError::NotAnObject),
            (b"{}", ResourceError::MissingResourceType),
            (
                br#"{"resourceType":"Medication"}"#,
                ResourceError::UnsupportedResourceType,
            ),
        ];
        for (body, err) in cases {
            let got = Resource::parse(body, None).unwrap_err();
            assert_eq!(got, err);
            assert_eq!(got.kind(), ErrorKind::Malformed);
        }
    }

    #[test]
    fn type_must_match_the_url() {
        let err = parse(
            json!({"resourceType": "Patient"}),
            Some(ResourceType::Observation),
        )
        .unwrap_err();
        assert_eq!(
            err,
            ResourceError::ResourceTypeMismatch {
                expected: ResourceType::Observation,
                found: ResourceType::Patient
            }
        );
        assert_eq!(err.expression(), Some("resourceType"));
    }

    #[test]
    fn bad_ids_name_the_element() {
        let err = parse(json!({"resourceType": "Patient", "id": "a b"}), None).unwrap_err();
        assert_eq!(err.expression(), Some("Patient.id"));
        assert_eq!(err.kind(), ErrorKind::Malformed);
        let err = parse(json!({"resourceType": "Patient", "id": 7}), None).unwrap_err();
        assert_eq!(err.expression(), Some("Patient.id"));
    }

    #[test]
    fn bad_nhs_number_is_422_at_the_identifier() {
        let err = parse(
            json!({
                "resourceType": "Patient",
                "identifier": [
                    {"system": "urn:other", "value": "x"},
                    {"system": NHS_NUMBER_SYSTEM, "value": "9434765918"}
                ]
            }),
            None,
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unprocessable);
        assert_eq!(err.expression(), Some("Patient.identifier[1].value"));
        assert!(!err.to_string().contains("9434765918"));
    }

    #[test]
    fn nested_identifiers_are_checked_too() {
        let err = parse(
            json!({
                "resourceType": "Observation",
                "subject": {"identifier": {"system": NHS_NUMBER_SYSTEM, "value": "123"}}
            }),
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.expression(),
            Some("Observation.subject.identifier.value")
        );
        let err = parse(
            json!({
                "resourceType": "Organization",
                "identifier": [{"system": ODS_ORGANIZATION_CODE_SYSTEM, "value": "rr8"}]
            }),
            None,
        )
        .unwrap_err();
        assert_eq!(err.expression(), Some("Organization.identifier[0].value"));
        assert_eq!(err.kind(), ErrorKind::Unprocessable);
    }

    #[test]
    fn indexed_elements_are_type_checked() {
        let cases = [
            (
                json!({"resourceType": "Patient", "birthDate": "1980-02-30"}),
                "Patient.birthDate",
            ),
            (
                json!({"resourceType": "Patient", "birthDate": "1980-02-03T10:00:00Z"}),
                "Patient.birthDate",
            ),
            (
                json!({"resourceType": "Patient", "birthDate": 1980}),
                "Patient.birthDate",
            ),
            (
                json!({"resourceType": "Patient", "gender": "f"}),
                "Patient.gender",
            ),
            (
                json!({"resourceType": "Patient", "name": [{"family": 3}]}),
                "Patient.name[0].family",
            ),
            (
                json!({"resourceType": "Patient", "name": "Smith"}),
                "Patient.name",
            ),
            (
                json!({"resourceType": "Observation", "effectiveDateTime": "yesterday"}),
                "Observation.effectiveDateTime",
            ),
            (
                json!({"resourceType": "Observation", "effectivePeriod": {"start": "2024-02", "end": "2024-01"}}),
                "Observation.effectivePeriod",
            ),
            (
                json!({"resourceType": "Observation", "subject": "Patient/1"}),
                "Observation.subject",
            ),
            (
                json!({"resourceType": "Observation", "code": {"coding": [{"code": 5}]}}),
                "Observation.code.coding[0].code",
            ),
        ];
        for (body, expression) in cases {
            let err = parse(body.clone(), None).unwrap_err();
            assert_eq!(err.expression(), Some(expression), "{body}");
            assert_eq!(err.kind(), ErrorKind::Malformed);
        }
    }

    #[test]
    fn hostile_bodies_are_errors_not_panics() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            Resource::parse(deep.as_bytes(), None),
            Err(ResourceError::NotJson { .. })
        ));
        let deep_object = format!(
            r#"{{"resourceType":"Patient","extension":{}1{}}}"#,
            r#"{"a":"#.repeat(100),
            "}".repeat(100)
        );
        assert!(Resource::parse(deep_object.as_bytes(), None).is_ok());
        assert!(Resource::parse(b"\xff\xfe", None).is_err());
        assert!(Resource::parse(b"", None).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Resource::parse(&bytes, None);
        }

        #[test]
        fn parse_never_panics_on_json_shapes(
            key in proptest::sample::select(vec![
                "identifier", "name", "birthDate", "gender", "subject", "code", "effectivePeriod",
                "generalPractitioner", "address", "meta", "id", "category", "status",
            ]),
            value in prop_oneof![
                Just(json!(null)),
                any::<i64>().prop_map(|n| json!(n)),
                "\\PC{0,20}".prop_map(|s| json!(s)),
                "\\PC{0,20}".prop_map(|s| json!([{"family": s.clone(), "system": NHS_NUMBER_SYSTEM, "value": s, "reference": "Patient/1"}])),
                "\\PC{0,20}".prop_map(|s| json!({"start": s, "coding": [{"code": s}], "reference": s})),
            ],
            t in proptest::sample::select(vec!["Patient", "Observation", "AuditEvent", "Organization"]),
        ) {
            let body = json!({"resourceType": t, key: value});
            if let Ok(r) = parse(body, None) {
                let _ = crate::search::index_terms(&r);
                let _ = crate::search::patient_compartment(&r);
            }
        }
    }

    #[test]
    fn set_id_and_meta() {
        let mut p = parse(
            json!({"resourceType": "Patient", "meta": {"profile": ["x"]}}),
            None,
        )
        .unwrap();
        p.set_id(ResourceId::parse("abc").unwrap());
        p.set_meta("2", "2024-01-01T00:00:00Z");
        let json = p.json();
        assert_eq!(json["id"], "abc");
        assert_eq!(json["meta"]["versionId"], "2");
        assert_eq!(json["meta"]["profile"][0], "x");
        let again = Resource::parse(&p.to_bytes(), Some(ResourceType::Patient)).unwrap();
        assert_eq!(again, p);
    }
}
