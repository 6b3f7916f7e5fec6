//! `shcr dev --seed-demo`: synthetic patients so a first run shows real data.
//!
//! Each care system gets [`PATIENTS_PER_CARE_SYSTEM`] patients with test NHS numbers (the
//! `999` range NHS England reserves for testing, with a valid Modulus 11 check digit), two
//! observations and one condition each.
//!
//! Invariants: idempotent — every resource has a fixed id and is written only when absent, so
//! seeding twice (or after a restart) changes nothing; entirely synthetic (no real person's
//! data); NHS numbers differ between care systems.

use serde_json::{Value, json};
use shcr_fhir::resource::{ResourceId, ResourceType};
use shcr_store::api::{ApiError, FhirStore};

/// How many demo patients each care system gets.
pub const PATIENTS_PER_CARE_SYSTEM: usize = 4;

const GIVEN: [&str; 8] = [
    "Ada", "Bryn", "Cerys", "Dafydd", "Elin", "Fraser", "Gwen", "Harri",
];
const FAMILY: [&str; 4] = ["Testpatient", "Example", "Synthetic", "Demo"];

/// What seeding wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seeded {
    /// Resources written now.
    pub created: usize,
    /// Resources that were already there.
    pub present: usize,
}

/// A test NHS number `999` + `serial` (6 digits) + its Modulus 11 check digit; serials whose
/// check digit would be 10 (invalid) are skipped, so `nth` counts valid numbers.
pub fn test_nhs_number(nth: u32) -> String {
    let mut serial = 0u32;
    let mut found = 0u32;
    loop {
        let body = format!("999{serial:06}");
        let sum: u32 = body
            .bytes()
            .zip((2..=10).rev())
            .map(|(digit, weight)| u32::from(digit - b'0') * weight)
            .sum();
        let check = match 11 - sum % 11 {
            11 => Some(0),
            10 => None,
            c => Some(c),
        };
        if let Some(check) = check {
            if found == nth {
                return format!("{body}{check}");
            }
            found += 1;
        }
        serial += 1;
    }
}

/// The demo resources of care system number `index` (its position in the manifests), with
/// ids prefixed `demo-`.
pub fn demo_resources(index: usize) -> Vec<(ResourceType, String, Value)> {
    let mut out = Vec::new();
    for p in 0..PATIENTS_PER_CARE_SYSTEM {
        let n = index * PATIENTS_PER_CARE_SYSTEM + p;
        let patient_id = format!("demo-patient-{}", p + 1);
        let nhs = test_nhs_number(n as u32);
        let given = GIVEN[n % GIVEN.len()];
        let family = FAMILY[p % FAMILY.len()];
        out.push((
            ResourceType::Patient,
            patient_id.clone(),
            json!({
                "resourceType": "Patient",
                "id": patient_id,
                "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}],
                "name": [{"use": "official", "family": family, "given": [given]}],
                "gender": if p % 2 == 0 { "female" } else { "male" },
                "birthDate": format!("{}-0{}-1{}", 1940 + 9 * p, 1 + p % 9, p % 10),
            }),
        ));
        let subject = json!({"reference": format!("Patient/{patient_id}")});
        out.push((
            ResourceType::Observation,
            format!("demo-heart-rate-{}", p + 1),
            json!({
                "resourceType": "Observation",
                "id": format!("demo-heart-rate-{}", p + 1),
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
                "subject": subject,
                "effectiveDateTime": format!("2026-0{}-1{}T09:30:00Z", 1 + p % 9, p % 10),
                "valueQuantity": {"value": 62 + 7 * p, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"},
            }),
        ));
        out.push((
            ResourceType::Observation,
            format!("demo-blood-pressure-{}", p + 1),
            json!({
                "resourceType": "Observation",
                "id": format!("demo-blood-pressure-{}", p + 1),
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}]},
                "subject": subject,
                "effectiveDateTime": format!("2026-0{}-1{}T09:35:00Z", 1 + p % 9, p % 10),
                "component": [
                    {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": 118 + 4 * p, "unit": "mmHg"}},
                    {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}, "valueQuantity": {"value": 76 + 2 * p, "unit": "mmHg"}}
                ],
            }),
        ));
        let (code, display) = [
            ("44054006", "Diabetes mellitus type 2"),
            ("38341003", "Hypertensive disorder"),
            ("195967001", "Asthma"),
            ("13645005", "Chronic obstructive lung disease"),
        ][p % 4];
        out.push((
            ResourceType::Condition,
            format!("demo-condition-{}", p + 1),
            json!({
                "resourceType": "Condition",
                "id": format!("demo-condition-{}", p + 1),
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
                "subject": subject,
                "recordedDate": "2025-11-01",
            }),
        ));
    }
    out
}

/// Writes the demo resources of care system number `index` that are not there yet.
pub async fn seed(store: &FhirStore, index: usize) -> Result<Seeded, ApiError> {
    let mut seeded = Seeded::default();
    for (resource_type, id, body) in demo_resources(index) {
        let id = ResourceId::parse(&id).map_err(|_| ApiError::InvalidId)?;
        match store.read(resource_type, &id).await {
            Ok(_) => seeded.present += 1,
            Err(ApiError::NotFound { .. }) => {
                let bytes = serde_json::to_vec(&body).map_err(|_| ApiError::Internal)?;
                store.update(resource_type, &id, &bytes, None).await?;
                seeded.created += 1;
            }
            // Deleted by the user: leave it deleted.
            Err(ApiError::Gone { .. }) => seeded.present += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(seeded)
}

#[cfg(test)]
mod tests {
    use shcr_fhir::identifiers::NhsNumber;

    use super::*;

    #[test]
    fn test_nhs_numbers_are_valid_distinct_and_in_the_test_range() {
        let numbers: Vec<String> = (0..20).map(test_nhs_number).collect();
        for n in &numbers {
            assert!(n.starts_with("999"), "{n}");
            assert!(NhsNumber::parse(n).is_ok(), "{n} fails Modulus 11");
        }
        let mut unique = numbers.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), numbers.len());
    }

    #[test]
    fn care_systems_get_different_patients() {
        let a = demo_resources(0);
        let b = demo_resources(1);
        assert_eq!(a.len(), PATIENTS_PER_CARE_SYSTEM * 4);
        assert_ne!(a[0].2["identifier"], b[0].2["identifier"]);
    }
}
