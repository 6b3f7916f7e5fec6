//! Indexing: the search terms and patient compartment of a resource.
//!
//! One walk over the registry paths serves two purposes: at parse time ([`check_indexed_elements`])
//! it rejects resources whose indexed elements have the wrong shape or syntax, naming the element;
//! at index time ([`index_terms`]) it emits the terms. Because every [`Resource`] passed the
//! check, indexing never meets a value it cannot read.
//!
//! Index value encoding ([`IndexValue::to_key`]) — a one-byte form tag, then the value, so the
//! forms of one parameter never collide and byte order is search order:
//! - `t{system}|{code}`: a token with its system (`t|{code}` when the coding has no system); the
//!   system has `\` and `|` escaped as `\\` and `\|`, so `t{system}|` is the prefix of every code
//!   in that system. NHS numbers are indexed as their 10 canonical digits;
//! - `c{code}`: the same token's code alone, for `code` searches on any system;
//! - `s{normalized}`: a string lowercased, accent-stripped, whitespace-collapsed
//!   ([`super::normalize_string`]); string search is a prefix scan on it;
//! - `e{exact}`: the same string as written, for `:exact`;
//! - `d{start:016x}{end:016x}`: a date range ([`DateRange::to_key`]), ordered by start;
//! - `r{Type}/{id}`: a relative reference to a supported type;
//! - `p`: the parameter has at least one value (one per parameter), for `:missing`.
//!
//! Values longer than [`super::MAX_KEY_VALUE_BYTES`] are cut (see [`super::normalize`]).
//! Only relative references (`Patient/123`, optionally `/_history/n`) are indexed: absolute URLs,
//! `urn:uuid:` and contained (`#x`) references are not (the store rewrites its own absolute and
//! `urn:uuid` references to relative ones before indexing).

use serde_json::{Map, Value};

use super::normalize::{cap, normalize_string};
use super::registry::{
    DATE_ONLY_ELEMENTS, ParamKind, REQUIRED_CODES, SearchParam, indexed_params, type_params,
};
use crate::datetime::{DateRange, Strictness};
use crate::identifiers::{NHS_NUMBER_SYSTEM, NhsNumber};
use crate::resource::{ElementProblem, Resource, ResourceError, ResourceId, ResourceType};

/// One value of a resource for one search parameter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexValue {
    /// A token with its system (empty when the coding has none).
    Token { system: String, code: String },
    /// A token's code alone (matches `code` searches on any system).
    TokenCode(String),
    /// A string, normalised for case- and accent-insensitive prefix search.
    String(String),
    /// A string as written, for `:exact`.
    ExactString(String),
    /// A date, dateTime, instant or Period as a half-open UTC range.
    Date(DateRange),
    /// A relative reference to a supported type.
    Reference {
        resource_type: ResourceType,
        id: ResourceId,
    },
    /// The parameter has at least one value (answers `:missing=false`; its absence answers
    /// `:missing=true`).
    Present,
}

impl IndexValue {
    /// The order-preserving key text the store writes (see the module comment).
    pub fn to_key(&self) -> String {
        match self {
            Self::Token { system, code } => token_key(system, code),
            Self::TokenCode(code) => format!("c{}", cap(code)),
            Self::String(s) => format!("s{}", cap(s)),
            Self::ExactString(s) => format!("e{}", cap(s)),
            Self::Date(range) => format!("d{}", range.to_key()),
            Self::Reference { resource_type, id } => reference_key(*resource_type, id),
            Self::Present => PRESENT_KEY.to_string(),
        }
    }
}

/// The key of [`IndexValue::Present`].
pub(crate) const PRESENT_KEY: &str = "p";

pub(crate) fn escape_system(system: &str) -> String {
    system.replace('\\', "\\\\").replace('|', "\\|")
}

pub(crate) fn token_key(system: &str, code: &str) -> String {
    let key = format!("t{}|{}", escape_system(system), code);
    cap(&key).to_string()
}

pub(crate) fn reference_key(resource_type: ResourceType, id: &ResourceId) -> String {
    format!("r{resource_type}/{id}")
}

/// One index entry of a resource: the parameter name and one value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IndexTerm {
    pub param: &'static str,
    pub value: IndexValue,
}

/// Every index term of `resource`, sorted and without duplicates. Includes `_lastUpdated` when
/// `meta.lastUpdated` is set (set it with [`Resource::set_meta`] before indexing).
pub fn index_terms(resource: &Resource) -> Vec<IndexTerm> {
    let mut terms = Vec::new();
    for param in indexed_params(resource.resource_type()) {
        let before = terms.len();
        // A checked resource never fails here; an unreadable value (only `meta.lastUpdated` is
        // not checked at parse time) is simply not indexed.
        let _ = extract(
            resource.resource_type(),
            resource.json(),
            param,
            &mut |value| {
                terms.push(IndexTerm {
                    param: param.name,
                    value,
                });
            },
        );
        if terms.len() > before {
            terms.push(IndexTerm {
                param: param.name,
                value: IndexValue::Present,
            });
        }
    }
    terms.sort();
    terms.dedup();
    terms
}

/// The ids of the patients whose compartment `resource` belongs to: a Patient's own id, and for
/// other types the targets of their `patient` parameter. Sorted, without duplicates.
pub fn patient_compartment(resource: &Resource) -> Vec<ResourceId> {
    let mut ids = Vec::new();
    if resource.resource_type() == ResourceType::Patient
        && let Some(id) = resource.id()
    {
        ids.push(id.clone());
    }
    if let Some(param) = type_params(resource.resource_type())
        .iter()
        .find(|p| p.name == "patient")
    {
        let _ = extract(
            resource.resource_type(),
            resource.json(),
            param,
            &mut |value| {
                if let IndexValue::Reference {
                    resource_type: ResourceType::Patient,
                    id,
                } = value
                {
                    ids.push(id);
                }
            },
        );
    }
    ids.sort();
    ids.dedup();
    ids
}

/// Checks the shape and syntax of every element the type's search parameters read.
pub(crate) fn check_indexed_elements(
    resource_type: ResourceType,
    json: &Map<String, Value>,
) -> Result<(), ResourceError> {
    for param in type_params(resource_type) {
        extract(resource_type, json, param, &mut |_| {})?;
    }
    Ok(())
}

fn wrong_type(expression: &str, expected: &'static str) -> ResourceError {
    ResourceError::element(expression, ElementProblem::WrongJsonType { expected })
}

/// Walks one parameter's paths and hands every value to `emit`.
fn extract(
    resource_type: ResourceType,
    json: &Map<String, Value>,
    param: &SearchParam,
    emit: &mut dyn FnMut(IndexValue),
) -> Result<(), ResourceError> {
    for path in param.paths {
        let segments: Vec<&str> = path.split('.').collect();
        let mut leaves = Vec::new();
        collect_leaves(
            json,
            &segments,
            resource_type.as_str().to_string(),
            &mut leaves,
        )?;
        let element = segments.last().copied().unwrap_or_default();
        for (expression, value) in leaves {
            match param.kind {
                ParamKind::Token => token_values(&expression, element, value, emit)?,
                ParamKind::String => string_values(&expression, value, emit)?,
                ParamKind::Date => emit(IndexValue::Date(date_value(&expression, element, value)?)),
                ParamKind::Reference => {
                    if let Some((resource_type, id)) = reference_value(&expression, value)?
                        && param.targets.contains(&resource_type)
                    {
                        emit(IndexValue::Reference { resource_type, id });
                    }
                }
            }
        }
    }
    Ok(())
}

/// Follows `segments` from `object`, flattening arrays, collecting `(expression, value)` leaves.
fn collect_leaves<'v>(
    object: &'v Map<String, Value>,
    segments: &[&str],
    path: String,
    out: &mut Vec<(String, &'v Value)>,
) -> Result<(), ResourceError> {
    let Some((first, rest)) = segments.split_first() else {
        return Ok(());
    };
    let Some(child) = object.get(*first) else {
        return Ok(());
    };
    let here = format!("{path}.{first}");
    let items: Vec<(String, &Value)> = match child {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{here}[{i}]"), v))
            .collect(),
        other => vec![(here, other)],
    };
    for (expression, item) in items {
        if rest.is_empty() {
            out.push((expression, item));
        } else if let Value::Object(o) = item {
            collect_leaves(o, rest, expression, out)?;
        } else {
            return Err(wrong_type(&expression, "an object"));
        }
    }
    Ok(())
}

fn optional_string<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    expression: &str,
) -> Result<Option<&'v str>, ResourceError> {
    match object.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong_type(&format!("{expression}.{key}"), "a string")),
    }
}

fn emit_token(system: &str, code: &str, emit: &mut dyn FnMut(IndexValue)) {
    if code.is_empty() {
        return;
    }
    emit(IndexValue::Token {
        system: system.to_string(),
        code: code.to_string(),
    });
    emit(IndexValue::TokenCode(code.to_string()));
}

fn coding_values(
    expression: &str,
    coding: &Map<String, Value>,
    emit: &mut dyn FnMut(IndexValue),
) -> Result<(), ResourceError> {
    let system = optional_string(coding, "system", expression)?.unwrap_or_default();
    if let Some(code) = optional_string(coding, "code", expression)? {
        emit_token(system, code, emit);
    }
    Ok(())
}

fn token_values(
    expression: &str,
    element: &str,
    value: &Value,
    emit: &mut dyn FnMut(IndexValue),
) -> Result<(), ResourceError> {
    match value {
        Value::String(code) => {
            if let Some((_, allowed, listed)) =
                REQUIRED_CODES.iter().find(|(e, _, _)| *e == element)
                && !allowed.contains(&code.as_str())
            {
                return Err(ResourceError::element(
                    expression,
                    ElementProblem::CodeNotAllowed { allowed: listed },
                ));
            }
            emit_token("", code, emit);
        }
        Value::Bool(b) => emit_token("", if *b { "true" } else { "false" }, emit),
        Value::Object(o) if o.contains_key("coding") => {
            let Some(Value::Array(codings)) = o.get("coding") else {
                return Err(wrong_type(
                    &format!("{expression}.coding"),
                    "an array of Codings",
                ));
            };
            for (i, coding) in codings.iter().enumerate() {
                let at = format!("{expression}.coding[{i}]");
                let Value::Object(coding) = coding else {
                    return Err(wrong_type(&at, "a Coding"));
                };
                coding_values(&at, coding, emit)?;
            }
        }
        Value::Object(o) if o.contains_key("value") => {
            let system = optional_string(o, "system", expression)?.unwrap_or_default();
            if let Some(v) = optional_string(o, "value", expression)? {
                // The NHS number was checked at parse time; index its canonical digits so that
                // "943 476 5919" and "9434765919" find each other.
                let canonical = match system {
                    NHS_NUMBER_SYSTEM => NhsNumber::parse(v).map(|n| n.as_digits()).ok(),
                    _ => None,
                };
                emit_token(system, canonical.as_deref().unwrap_or(v), emit);
            }
        }
        Value::Object(o) => coding_values(expression, o, emit)?,
        _ => {
            return Err(wrong_type(
                expression,
                "a code, Coding, CodeableConcept or Identifier",
            ));
        }
    }
    Ok(())
}

const NAME_PARTS: &[&str] = &["text", "family", "given", "prefix", "suffix"];

fn emit_string(s: &str, emit: &mut dyn FnMut(IndexValue)) {
    emit(IndexValue::String(normalize_string(s)));
    emit(IndexValue::ExactString(s.to_string()));
}

fn string_values(
    expression: &str,
    value: &Value,
    emit: &mut dyn FnMut(IndexValue),
) -> Result<(), ResourceError> {
    match value {
        Value::String(s) => emit_string(s, emit),
        Value::Object(name) => {
            for part in NAME_PARTS {
                let at = format!("{expression}.{part}");
                match name.get(*part) {
                    None => {}
                    Some(Value::String(s)) => emit_string(s, emit),
                    Some(Value::Array(items)) => {
                        for (i, item) in items.iter().enumerate() {
                            let Value::String(s) = item else {
                                return Err(wrong_type(&format!("{at}[{i}]"), "a string"));
                            };
                            emit_string(s, emit);
                        }
                    }
                    Some(_) => return Err(wrong_type(&at, "a string")),
                }
            }
        }
        _ => return Err(wrong_type(expression, "a string or HumanName")),
    }
    Ok(())
}

fn date_value(expression: &str, element: &str, value: &Value) -> Result<DateRange, ResourceError> {
    let parse = |s: &str, at: &str| {
        let parsed = if DATE_ONLY_ELEMENTS.contains(&element) {
            DateRange::parse_date(s)
        } else {
            DateRange::parse(s, Strictness::Resource)
        };
        parsed.map_err(|e| ResourceError::element(at, ElementProblem::Date(e)))
    };
    match value {
        Value::String(s) => parse(s, expression),
        Value::Object(period) => {
            let start = optional_string(period, "start", expression)?
                .map(|s| parse(s, &format!("{expression}.start")))
                .transpose()?;
            let end = optional_string(period, "end", expression)?
                .map(|s| parse(s, &format!("{expression}.end")))
                .transpose()?;
            DateRange::period(start, end)
                .map_err(|e| ResourceError::element(expression, ElementProblem::Date(e)))
        }
        _ => Err(wrong_type(expression, "a date, dateTime or Period")),
    }
}

fn reference_value(
    expression: &str,
    value: &Value,
) -> Result<Option<(ResourceType, ResourceId)>, ResourceError> {
    let Value::Object(reference) = value else {
        return Err(wrong_type(expression, "a Reference"));
    };
    Ok(optional_string(reference, "reference", expression)?.and_then(parse_relative_reference))
}

/// `Type/id` or `Type/id/_history/v` to a supported type; anything else is `None`.
pub(crate) fn parse_relative_reference(reference: &str) -> Option<(ResourceType, ResourceId)> {
    let segments: Vec<&str> = reference.split('/').collect();
    let (type_name, id) = match segments.as_slice() {
        [t, id] | [t, id, "_history", _] => (*t, *id),
        _ => return None,
    };
    Some((type_name.parse().ok()?, ResourceId::parse(id).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identifiers::ODS_ORGANIZATION_CODE_SYSTEM;
    use serde_json::json;

    fn resource(v: Value) -> Resource {
        Resource::parse(&serde_json::to_vec(&v).unwrap(), None).unwrap()
    }

    fn values(terms: &[IndexTerm], param: &str) -> Vec<IndexValue> {
        terms
            .iter()
            .filter(|t| t.param == param && t.value != IndexValue::Present)
            .map(|t| t.value.clone())
            .collect()
    }

    fn keys(terms: &[IndexTerm], param: &str) -> Vec<String> {
        values(terms, param)
            .iter()
            .map(IndexValue::to_key)
            .collect()
    }

    #[test]
    fn patient_terms() {
        let p = resource(json!({
            "resourceType": "Patient",
            "id": "p1",
            "meta": {"lastUpdated": "2024-01-02T03:04:05.678Z"},
            "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": "943 476 5919"}],
            "name": [{"family": "O'Brien", "given": ["Zoë", "Anne"], "prefix": ["Dr"]}],
            "birthDate": "1980-02",
            "gender": "female",
            "address": [{"postalCode": "LS1 4AP"}],
            "generalPractitioner": [
                {"reference": "Organization/org1"},
                {"reference": "https://elsewhere.example/fhir/Practitioner/x"},
                {"identifier": {"system": ODS_ORGANIZATION_CODE_SYSTEM, "value": "Y02494"}}
            ]
        }));
        let terms = index_terms(&p);
        assert_eq!(
            keys(&terms, "identifier"),
            vec![
                format!("t{NHS_NUMBER_SYSTEM}|9434765919"),
                "c9434765919".to_string()
            ]
        );
        assert!(keys(&terms, "given").contains(&"szoe".to_string()));
        assert!(keys(&terms, "given").contains(&"eZoë".to_string()));
        assert!(keys(&terms, "family").contains(&"so'brien".to_string()));
        let name = keys(&terms, "name");
        for k in ["so'brien", "szoe", "sanne", "sdr"] {
            assert!(name.contains(&k.to_string()), "{k} in {name:?}");
        }
        assert_eq!(keys(&terms, "gender"), vec!["t|female", "cfemale"]);
        assert_eq!(
            keys(&terms, "address-postalcode"),
            vec!["sls1 4ap", "eLS1 4AP"]
        );
        assert_eq!(
            keys(&terms, "general-practitioner"),
            vec!["rOrganization/org1"]
        );
        let [IndexValue::Date(birth)] = values(&terms, "birthdate")[..] else {
            panic!("one birthdate");
        };
        assert_eq!(
            birth,
            DateRange::parse("1980-02", Strictness::Resource).unwrap()
        );
        assert_eq!(values(&terms, "_lastUpdated").len(), 1);
        let present: Vec<&str> = terms
            .iter()
            .filter(|t| t.value == IndexValue::Present)
            .map(|t| t.param)
            .collect();
        assert_eq!(present.len(), 9, "every populated parameter: {present:?}");
        assert_eq!(
            patient_compartment(&p),
            vec![ResourceId::parse("p1").unwrap()]
        );
    }

    #[test]
    fn observation_terms_and_compartment() {
        let o = resource(json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [
                {"system": "http://snomed.info/sct", "code": "271649006"},
                {"system": "http://loinc.org", "code": "8480-6"}
            ], "text": "Systolic"},
            "subject": {"reference": "Patient/p1/_history/3"},
            "encounter": {"reference": "Encounter/e1"},
            "effectivePeriod": {"start": "2024-03-05T10:00:00Z"}
        }));
        let terms = index_terms(&o);
        let code = keys(&terms, "code");
        assert!(code.contains(&"thttp://snomed.info/sct|271649006".to_string()));
        assert!(code.contains(&"c8480-6".to_string()));
        assert_eq!(code.len(), 4);
        assert_eq!(keys(&terms, "patient"), vec!["rPatient/p1"]);
        assert_eq!(keys(&terms, "subject"), vec!["rPatient/p1"]);
        assert_eq!(keys(&terms, "encounter"), vec!["rEncounter/e1"]);
        assert_eq!(keys(&terms, "status"), vec!["t|final", "cfinal"]);
        let [IndexValue::Date(d)] = values(&terms, "date")[..] else {
            panic!("one date");
        };
        assert_eq!(d.end(), DateRange::OPEN_END);
        assert_eq!(
            patient_compartment(&o),
            vec![ResourceId::parse("p1").unwrap()]
        );
    }

    #[test]
    fn group_subjects_are_not_in_the_patient_param() {
        let o = resource(json!({
            "resourceType": "Observation",
            "subject": {"reference": "Group/g1"}
        }));
        let terms = index_terms(&o);
        assert!(keys(&terms, "patient").is_empty());
        assert_eq!(keys(&terms, "subject"), vec!["rGroup/g1"]);
        assert!(patient_compartment(&o).is_empty());
    }

    #[test]
    fn audit_event_patient_and_agent() {
        let a = resource(json!({
            "resourceType": "AuditEvent",
            "recorded": "2024-03-05T10:00:00Z",
            "agent": [{"who": {"identifier": {"system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "5550"}}, "requestor": true}],
            "entity": [{"what": {"reference": "Patient/p9"}}, {"what": {"reference": "Observation/o1"}}]
        }));
        let terms = index_terms(&a);
        assert_eq!(keys(&terms, "patient"), vec!["rPatient/p9"]);
        assert!(
            !terms.iter().any(|t| t.param == "type"),
            "no presence entry for a parameter without values"
        );
        assert_eq!(
            keys(&terms, "agent"),
            vec!["thttps://fhir.nhs.uk/Id/sds-user-id|5550", "c5550"]
        );
        assert_eq!(
            patient_compartment(&a),
            vec![ResourceId::parse("p9").unwrap()]
        );
    }

    #[test]
    fn other_types() {
        let c = resource(json!({
            "resourceType": "Condition",
            "subject": {"reference": "Patient/p1"},
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "onsetPeriod": {"start": "2020", "end": "2021-06"},
            "recordedDate": "2021-07-01T09:30:00+01:00"
        }));
        let terms = index_terms(&c);
        assert_eq!(keys(&terms, "clinical-status"), vec!["t|active", "cactive"]);
        let [IndexValue::Date(onset)] = values(&terms, "onset-date")[..] else {
            panic!("one onset");
        };
        assert_eq!(
            onset.start(),
            DateRange::parse_date("2020-01-01").unwrap().start()
        );
        assert_eq!(
            onset.end(),
            DateRange::parse_date("2021-07-01").unwrap().start()
        );
        assert_eq!(values(&terms, "recorded-date").len(), 1);

        let org = resource(json!({
            "resourceType": "Organization",
            "identifier": [{"system": ODS_ORGANIZATION_CODE_SYSTEM, "value": "RR8"}],
            "name": "Leeds Teaching Hospitals",
            "alias": ["LTHT"]
        }));
        let terms = index_terms(&org);
        assert_eq!(
            keys(&terms, "identifier"),
            vec![
                format!("t{ODS_ORGANIZATION_CODE_SYSTEM}|RR8"),
                "cRR8".to_string()
            ]
        );
        let name = keys(&terms, "name");
        assert!(name.contains(&"sleeds teaching hospitals".to_string()));
        assert!(name.contains(&"sltht".to_string()));
        assert!(patient_compartment(&org).is_empty());

        let pr = resource(json!({
            "resourceType": "Practitioner",
            "name": [{"text": "Dr Siân Jones"}]
        }));
        assert!(keys(&index_terms(&pr), "name").contains(&"sdr sian jones".to_string()));
    }

    #[test]
    fn systems_with_pipes_are_escaped() {
        assert_eq!(token_key("a|b", "c"), "ta\\|b|c");
        assert_ne!(token_key("a|b", "c"), token_key("a", "b|c"));
    }

    #[test]
    fn references() {
        let ok = |s: &str| parse_relative_reference(s).map(|(t, id)| format!("{t}/{id}"));
        assert_eq!(ok("Patient/1").as_deref(), Some("Patient/1"));
        assert_eq!(ok("Patient/1/_history/2").as_deref(), Some("Patient/1"));
        for none in [
            "#c1",
            "urn:uuid:0b3a",
            "https://x/fhir/Patient/1",
            "Location/1",
            "Patient/",
            "Patient/a b",
            "Patient/1/x/2",
            "",
        ] {
            assert_eq!(ok(none), None, "{none}");
        }
    }
}
