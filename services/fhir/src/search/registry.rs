//! The search parameters this server supports: per resource type, each parameter's kind and the
//! element paths its values come from.
//!
//! Invariants:
//! - names and paths follow the FHIR R4 search parameter definitions (e.g. Immunization's code
//!   parameter is `vaccine-code`, Condition's dates are `onset-date` and `recorded-date`);
//! - a path is dot-separated element names from the resource root; choice elements (`[x]`) are
//!   listed once per supported type (`effectiveDateTime`, `effectivePeriod`, …);
//! - a reference parameter lists its target types; references to other types are not indexed
//!   under it (so `patient` only ever holds `Patient/…` references);
//! - `_id` and `_lastUpdated` apply to every type; `_id` is the key itself and is never indexed.

use crate::resource::ResourceType;

/// How a parameter's values are indexed and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    Token,
    String,
    Date,
    Reference,
}

impl ParamKind {
    /// The FHIR `SearchParamType` code, as a CapabilityStatement lists it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::String => "string",
            Self::Date => "date",
            Self::Reference => "reference",
        }
    }
}

/// One supported search parameter of one resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchParam {
    pub name: &'static str,
    pub kind: ParamKind,
    /// Element paths from the resource root (see the module comment).
    pub paths: &'static [&'static str],
    /// For reference parameters, the resource types they may point to.
    pub targets: &'static [ResourceType],
}

use ParamKind::{Date, Reference, String as Str, Token};
use ResourceType as T;

const fn p(name: &'static str, kind: ParamKind, paths: &'static [&'static str]) -> SearchParam {
    SearchParam {
        name,
        kind,
        paths,
        targets: &[],
    }
}

const fn r(
    name: &'static str,
    paths: &'static [&'static str],
    targets: &'static [ResourceType],
) -> SearchParam {
    SearchParam {
        name,
        kind: Reference,
        paths,
        targets,
    }
}

/// `_lastUpdated`, common to every type.
pub const LAST_UPDATED: SearchParam = p("_lastUpdated", Date, &["meta.lastUpdated"]);
/// `_id`, common to every type; answered from the resource key, never from the index.
pub const ID: SearchParam = p("_id", Token, &["id"]);

const PATIENT_ONLY: &[ResourceType] = &[T::Patient];
const SUBJECT: &[ResourceType] = &[T::Patient, T::Group];
const PERFORMERS: &[ResourceType] = &[
    T::Practitioner,
    T::PractitionerRole,
    T::Organization,
    T::Patient,
];

const PATIENT: &[SearchParam] = &[
    p("identifier", Token, &["identifier"]),
    p("family", Str, &["name.family"]),
    p("given", Str, &["name.given"]),
    p("name", Str, &["name"]),
    p("birthdate", Date, &["birthDate"]),
    p("gender", Token, &["gender"]),
    p("address-postalcode", Str, &["address.postalCode"]),
    r(
        "general-practitioner",
        &["generalPractitioner"],
        &[T::Practitioner, T::PractitionerRole, T::Organization],
    ),
];

const PRACTITIONER: &[SearchParam] = &[
    p("identifier", Token, &["identifier"]),
    p("name", Str, &["name"]),
];

const ORGANIZATION: &[SearchParam] = &[
    p("identifier", Token, &["identifier"]),
    p("name", Str, &["name", "alias"]),
];

const PRACTITIONER_ROLE: &[SearchParam] = &[
    p("identifier", Token, &["identifier"]),
    r("practitioner", &["practitioner"], &[T::Practitioner]),
    r("organization", &["organization"], &[T::Organization]),
];

const OBSERVATION: &[SearchParam] = &[
    r("patient", &["subject"], PATIENT_ONLY),
    r("subject", &["subject"], SUBJECT),
    p("code", Token, &["code"]),
    p(
        "date",
        Date,
        &["effectiveDateTime", "effectivePeriod", "effectiveInstant"],
    ),
    p("status", Token, &["status"]),
    p("category", Token, &["category"]),
    r("encounter", &["encounter"], &[T::Encounter]),
    r("performer", &["performer"], PERFORMERS),
];

const CONDITION: &[SearchParam] = &[
    r("patient", &["subject"], PATIENT_ONLY),
    r("subject", &["subject"], SUBJECT),
    p("code", Token, &["code"]),
    p("onset-date", Date, &["onsetDateTime", "onsetPeriod"]),
    p("recorded-date", Date, &["recordedDate"]),
    p("clinical-status", Token, &["clinicalStatus"]),
    p("category", Token, &["category"]),
    r("encounter", &["encounter"], &[T::Encounter]),
];

const PROCEDURE: &[SearchParam] = &[
    r("patient", &["subject"], PATIENT_ONLY),
    r("subject", &["subject"], SUBJECT),
    p("code", Token, &["code"]),
    p("date", Date, &["performedDateTime", "performedPeriod"]),
    p("status", Token, &["status"]),
    p("category", Token, &["category"]),
    r("encounter", &["encounter"], &[T::Encounter]),
];

const MEDICATION_REQUEST: &[SearchParam] = &[
    r("patient", &["subject"], PATIENT_ONLY),
    r("subject", &["subject"], SUBJECT),
    p("code", Token, &["medicationCodeableConcept"]),
    p("authoredon", Date, &["authoredOn"]),
    p("status", Token, &["status"]),
    p("intent", Token, &["intent"]),
    p("category", Token, &["category"]),
    r("encounter", &["encounter"], &[T::Encounter]),
];

const MEDICATION_STATEMENT: &[SearchParam] = &[
    r("patient", &["subject"], PATIENT_ONLY),
    r("subject", &["subject"], SUBJECT),
    p("code", Token, &["medicationCodeableConcept"]),
    p("effective", Date, &["effectiveDateTime", "effectivePeriod"]),
    p("status", Token, &["status"]),
    p("category", Token, &["category"]),
    r("context", &["context"], &[T::Encounter]),
];

const ALLERGY_INTOLERANCE: &[SearchParam] = &[
    r("patient", &["patient"], PATIENT_ONLY),
    p("code", Token, &["code"]),
    p("date", Date, &["recordedDate"]),
    p("clinical-status", Token, &["clinicalStatus"]),
    p("category", Token, &["category"]),
];

const IMMUNIZATION: &[SearchParam] = &[
    r("patient", &["patient"], PATIENT_ONLY),
    p("vaccine-code", Token, &["vaccineCode"]),
    p("date", Date, &["occurrenceDateTime"]),
    p("status", Token, &["status"]),
];

const ENCOUNTER: &[SearchParam] = &[
    r("patient", &["subject"], PATIENT_ONLY),
    r("subject", &["subject"], SUBJECT),
    p("class", Token, &["class"]),
    p("type", Token, &["type"]),
    p("date", Date, &["period"]),
    p("status", Token, &["status"]),
];

const DOCUMENT_REFERENCE: &[SearchParam] = &[
    r("patient", &["subject"], PATIENT_ONLY),
    r("subject", &["subject"], SUBJECT),
    p("type", Token, &["type"]),
    p("date", Date, &["date"]),
    p("period", Date, &["context.period"]),
    p("status", Token, &["status"]),
    p("category", Token, &["category"]),
    r("encounter", &["context.encounter"], &[T::Encounter]),
];

const CARE_PLAN: &[SearchParam] = &[
    r("patient", &["subject"], PATIENT_ONLY),
    r("subject", &["subject"], SUBJECT),
    p("date", Date, &["period"]),
    p("status", Token, &["status"]),
    p("category", Token, &["category"]),
    r("encounter", &["encounter"], &[T::Encounter]),
];

const COMPOSITION: &[SearchParam] = &[
    r("patient", &["subject"], PATIENT_ONLY),
    r("subject", &["subject"], SUBJECT),
    p("type", Token, &["type"]),
    p("date", Date, &["date"]),
    p("status", Token, &["status"]),
    p("category", Token, &["category"]),
    r("encounter", &["encounter"], &[T::Encounter]),
];

const AUDIT_EVENT: &[SearchParam] = &[
    r("patient", &["entity.what"], PATIENT_ONLY),
    p("date", Date, &["recorded"]),
    // The store's audit agents are people and organisations named by identifier (SDS user id,
    // ODS code), not by reference, so `agent` is a token on the agent's identifier
    // (`agent=https://fhir.nhs.uk/Id/ods-organization-code|A81001`, or the bare value).
    p("agent", Token, &["agent.who.identifier"]),
    p("type", Token, &["type"]),
    p("subtype", Token, &["subtype"]),
    p("action", Token, &["action"]),
    p("outcome", Token, &["outcome"]),
];

const GROUP: &[SearchParam] = &[p("identifier", Token, &["identifier"])];

const NONE: &[SearchParam] = &[];

/// The type-specific search parameters of `resource_type` (without `_id` and `_lastUpdated`).
pub fn type_params(resource_type: ResourceType) -> &'static [SearchParam] {
    match resource_type {
        T::Patient => PATIENT,
        T::Practitioner => PRACTITIONER,
        T::PractitionerRole => PRACTITIONER_ROLE,
        T::Organization => ORGANIZATION,
        T::Observation => OBSERVATION,
        T::Condition => CONDITION,
        T::Procedure => PROCEDURE,
        T::MedicationRequest => MEDICATION_REQUEST,
        T::MedicationStatement => MEDICATION_STATEMENT,
        T::AllergyIntolerance => ALLERGY_INTOLERANCE,
        T::Immunization => IMMUNIZATION,
        T::Encounter => ENCOUNTER,
        T::DocumentReference => DOCUMENT_REFERENCE,
        T::CarePlan => CARE_PLAN,
        T::Composition => COMPOSITION,
        T::AuditEvent => AUDIT_EVENT,
        T::Group => GROUP,
        T::Bundle => NONE,
    }
}

/// Every parameter that is written to the index for `resource_type`: its own plus
/// `_lastUpdated`.
pub fn indexed_params(resource_type: ResourceType) -> impl Iterator<Item = &'static SearchParam> {
    type_params(resource_type)
        .iter()
        .chain(std::iter::once(&LAST_UPDATED))
}

/// The search parameter `name` of `resource_type`, including `_id` and `_lastUpdated`.
pub fn find_param(resource_type: ResourceType, name: &str) -> Option<&'static SearchParam> {
    match name {
        "_id" => Some(&ID),
        "_lastUpdated" => Some(&LAST_UPDATED),
        _ => type_params(resource_type).iter().find(|p| p.name == name),
    }
}

/// Elements that are FHIR `date` (no time part), checked more strictly than dateTime.
pub(crate) const DATE_ONLY_ELEMENTS: &[&str] = &["birthDate"];

/// Elements bound to a required value set that parsing checks (element, allowed codes).
pub(crate) const REQUIRED_CODES: &[(&str, &[&str], &str)] = &[(
    "gender",
    &["male", "female", "other", "unknown"],
    "male, female, other, unknown",
)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_unique_names_and_sane_params() {
        for &t in ResourceType::ALL {
            let params = type_params(t);
            for (i, a) in params.iter().enumerate() {
                assert!(!a.paths.is_empty(), "{t}.{}", a.name);
                assert_eq!(a.kind == Reference, !a.targets.is_empty(), "{t}.{}", a.name);
                for b in &params[i + 1..] {
                    assert_ne!(a.name, b.name, "{t}");
                }
            }
        }
    }

    #[test]
    fn issue_parameters_exist() {
        let patient = [
            "identifier",
            "family",
            "given",
            "name",
            "birthdate",
            "gender",
            "address-postalcode",
            "general-practitioner",
            "_id",
            "_lastUpdated",
        ];
        for name in patient {
            assert!(find_param(T::Patient, name).is_some(), "{name}");
        }
        for t in [T::Practitioner, T::Organization] {
            assert!(find_param(t, "identifier").is_some());
            assert!(find_param(t, "name").is_some());
        }
        for t in [
            T::Observation,
            T::Condition,
            T::Procedure,
            T::MedicationRequest,
            T::MedicationStatement,
            T::AllergyIntolerance,
            T::Immunization,
            T::Encounter,
            T::DocumentReference,
            T::CarePlan,
            T::Composition,
            T::AuditEvent,
        ] {
            assert!(find_param(t, "patient").is_some(), "{t}");
        }
        for name in ["patient", "date", "agent"] {
            assert!(find_param(T::AuditEvent, name).is_some());
        }
        assert!(find_param(T::Patient, "nope").is_none());
        assert_eq!(
            find_param(T::Patient, "birthdate").map(|p| p.kind.as_str()),
            Some("date")
        );
    }
}
