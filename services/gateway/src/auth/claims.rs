//! From a verified token's claims to a [`Principal`]: who is acting, for which organisation, in
//! which role, with which SMART scopes and (for patient-facing tokens) for which patient.
//!
//! Job: [`ClaimsMapping`] says, per issuer, which claims carry what. The default follows NHS
//! CIS2: `nhsid_nrbac_roles` lists the person's roles (`person_roleid`, `org_code`,
//! `role_code`, `activity_codes`) and `selected_roleid` picks the one they signed in with.
//! Other identity providers put a flat organisation and role claim in the token
//! ([`ClaimsStyle::Flat`]). Scopes come from the space-separated `scope` claim (or a JSON array
//! of scopes), parsed into [`Scopes`].
//!
//! Invariants:
//! - the mapping runs only on claims whose signature, issuer, audience and lifetime were
//!   verified; it never widens what the token says (no default organisation, role or scope);
//! - a missing or malformed subject, organisation or role is a [`ClaimsError`] naming the claim
//!   (→ 401), never a partially filled principal;
//! - the organisation is a valid ODS code; patient-context scopes require a `patient` claim;
//! - errors name claims, never their values (a patient id is patient data).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use shcr_fhir::identifiers::OdsCode;
use shcr_identity::{Identity, Scopes};

/// How an issuer's tokens say which organisation and role the person acts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimsStyle {
    /// NHS CIS2: a list of roles in `nrbac_roles_claim`, one selected by
    /// `selected_role_claim`.
    #[default]
    Cis2,
    /// One organisation claim and one role claim, both strings.
    Flat,
}

/// Which claims carry what, for one issuer. Every field has the CIS2/SMART default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaimsMapping {
    /// CIS2 role list, or flat organisation/role claims [default: cis2].
    pub style: ClaimsStyle,
    /// The person or service [default: `sub`].
    pub subject_claim: String,
    /// SMART scopes, space-separated string or array [default: `scope`].
    pub scope_claim: String,
    /// The patient a patient-facing token is confined to [default: `patient`].
    pub patient_claim: String,
    /// CIS2: the role list [default: `nhsid_nrbac_roles`].
    pub nrbac_roles_claim: String,
    /// CIS2: the `person_roleid` of the role in use [default: `selected_roleid`].
    pub selected_role_claim: String,
    /// Flat: the ODS code of the organisation [default: `org`].
    pub organisation_claim: String,
    /// Flat: the role code [default: `role`].
    pub role_claim: String,
}

impl Default for ClaimsMapping {
    fn default() -> Self {
        Self {
            style: ClaimsStyle::Cis2,
            subject_claim: "sub".to_owned(),
            scope_claim: "scope".to_owned(),
            patient_claim: "patient".to_owned(),
            nrbac_roles_claim: "nhsid_nrbac_roles".to_owned(),
            selected_role_claim: "selected_roleid".to_owned(),
            organisation_claim: "org".to_owned(),
            role_claim: "role".to_owned(),
        }
    }
}

impl ClaimsMapping {
    /// The flat style with the default claim names (`org`, `role`).
    pub fn flat() -> Self {
        Self {
            style: ClaimsStyle::Flat,
            ..Self::default()
        }
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        let names = [
            ("subject_claim", &self.subject_claim),
            ("scope_claim", &self.scope_claim),
            ("patient_claim", &self.patient_claim),
            ("nrbac_roles_claim", &self.nrbac_roles_claim),
            ("selected_role_claim", &self.selected_role_claim),
            ("organisation_claim", &self.organisation_claim),
            ("role_claim", &self.role_claim),
        ];
        match names.iter().find(|(_, name)| name.trim().is_empty()) {
            Some((field, _)) => Err(format!("claims.{field} is empty")),
            None => Ok(()),
        }
    }

    /// Maps verified claims to a principal of `issuer`.
    pub fn principal(
        &self,
        issuer: &str,
        claims: &Map<String, Value>,
    ) -> Result<Principal, ClaimsError> {
        let subject = required_string(claims, &self.subject_claim)?;
        let SelectedRole {
            organisation,
            role,
            person_role_id,
            activity_codes,
        } = match self.style {
            ClaimsStyle::Cis2 => self.cis2_role(claims)?,
            ClaimsStyle::Flat => SelectedRole {
                organisation: required_string(claims, &self.organisation_claim)?,
                role: required_string(claims, &self.role_claim)?,
                person_role_id: None,
                activity_codes: Vec::new(),
            },
        };
        let organisation_claim = match self.style {
            ClaimsStyle::Cis2 => format!("{}[].org_code", self.nrbac_roles_claim),
            ClaimsStyle::Flat => self.organisation_claim.clone(),
        };
        let organisation = OdsCode::parse(&organisation)
            .map_err(|e| ClaimsError::Invalid {
                claim: organisation_claim,
                reason: e.to_string(),
            })?
            .as_str()
            .to_owned();
        let scopes = match claims.get(&self.scope_claim) {
            None | Some(Value::Null) => Ok(Scopes::default()),
            Some(Value::String(raw)) => Scopes::parse(raw),
            Some(Value::Array(items)) => {
                let mut joined = Vec::with_capacity(items.len());
                for item in items {
                    joined.push(item.as_str().ok_or_else(|| ClaimsError::Invalid {
                        claim: self.scope_claim.clone(),
                        reason: "expected a string or an array of strings".to_owned(),
                    })?);
                }
                Scopes::parse(&joined.join(" "))
            }
            Some(_) => {
                return Err(ClaimsError::Invalid {
                    claim: self.scope_claim.clone(),
                    reason: "expected a string or an array of strings".to_owned(),
                });
            }
        }
        .map_err(|e| ClaimsError::Invalid {
            claim: self.scope_claim.clone(),
            reason: e.to_string(),
        })?;
        let patient = match claims.get(&self.patient_claim) {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) if is_fhir_id(id) => Some(id.clone()),
            Some(_) => {
                return Err(ClaimsError::Invalid {
                    claim: self.patient_claim.clone(),
                    reason: "expected a FHIR resource id (1-64 of A-Z a-z 0-9 - .)".to_owned(),
                });
            }
        };
        if scopes.has_patient_context() && patient.is_none() {
            return Err(ClaimsError::Missing {
                claim: self.patient_claim.clone(),
                hint: " (patient/ scopes need the patient they are confined to)",
            });
        }
        Ok(Principal {
            subject,
            issuer: issuer.to_owned(),
            organisation,
            role,
            person_role_id,
            activity_codes,
            scopes,
            patient,
        })
    }

    fn cis2_role(&self, claims: &Map<String, Value>) -> Result<SelectedRole, ClaimsError> {
        let selected = match claims.get(&self.selected_role_claim) {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            Some(Value::Number(n)) => n.to_string(),
            None | Some(Value::Null) => {
                return Err(ClaimsError::Missing {
                    claim: self.selected_role_claim.clone(),
                    hint: " (the token names no selected role: sign in again and choose a role)",
                });
            }
            Some(_) => {
                return Err(ClaimsError::Invalid {
                    claim: self.selected_role_claim.clone(),
                    reason: "expected a role id string".to_owned(),
                });
            }
        };
        let roles = match claims.get(&self.nrbac_roles_claim) {
            Some(Value::Array(roles)) => roles,
            None | Some(Value::Null) => {
                return Err(ClaimsError::Missing {
                    claim: self.nrbac_roles_claim.clone(),
                    hint: "",
                });
            }
            Some(_) => {
                return Err(ClaimsError::Invalid {
                    claim: self.nrbac_roles_claim.clone(),
                    reason: "expected a list of roles".to_owned(),
                });
            }
        };
        let role = roles
            .iter()
            .filter_map(Value::as_object)
            .find(|role| match role.get("person_roleid") {
                Some(Value::String(id)) => *id == selected,
                Some(Value::Number(n)) => n.to_string() == selected,
                _ => false,
            })
            .ok_or_else(|| ClaimsError::Invalid {
                claim: self.selected_role_claim.clone(),
                reason: format!("it matches no person_roleid in {}", self.nrbac_roles_claim),
            })?;
        let field = |name: &str| -> Result<String, ClaimsError> {
            match role.get(name) {
                Some(Value::String(value)) if !value.trim().is_empty() => Ok(value.clone()),
                _ => Err(ClaimsError::Missing {
                    claim: format!("{}[].{name}", self.nrbac_roles_claim),
                    hint: " (in the selected role)",
                }),
            }
        };
        let organisation = field("org_code")?;
        let role_code = field("role_code")?;
        let activity_codes = match role.get("activity_codes") {
            Some(Value::Array(codes)) => codes
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        Ok(SelectedRole {
            organisation,
            role: role_code,
            person_role_id: Some(selected),
            activity_codes,
        })
    }
}

/// The organisation and role a token says the person acts in.
struct SelectedRole {
    organisation: String,
    role: String,
    person_role_id: Option<String>,
    activity_codes: Vec<String>,
}

/// Who a verified token says is acting.
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    /// The person or service (the subject claim, e.g. a CIS2 UUID).
    pub subject: String,
    /// The `iss` of the token.
    pub issuer: String,
    /// The ODS code of the organisation they act for (a valid [`OdsCode`]).
    pub organisation: String,
    /// Their role code (CIS2 `role_code`, e.g. `S8000:G8000:R8000`, or the flat role claim).
    pub role: String,
    /// CIS2: the `person_roleid` of the selected role.
    pub person_role_id: Option<String>,
    /// CIS2: the national RBAC activity codes of the selected role.
    pub activity_codes: Vec<String>,
    /// What the token permits.
    pub scopes: Scopes,
    /// For patient-facing tokens: the only patient whose compartment they reach.
    pub patient: Option<String>,
}

impl Principal {
    /// Whether the token reaches only one patient's compartment (a `patient` claim and only
    /// `patient/` scopes).
    pub fn is_patient_confined(&self) -> bool {
        self.patient.is_some() && self.scopes.is_patient_confined()
    }

    /// The identity assertion contents for forwarding this request to `care_system`'s store.
    pub fn identity(
        &self,
        care_system: &str,
        break_glass_reason: Option<String>,
        request_id: String,
    ) -> Identity {
        Identity {
            issuer: self.issuer.clone(),
            subject: self.subject.clone(),
            organisation: self.organisation.clone(),
            role: self.role.clone(),
            scopes: self.scopes.clone(),
            patient: self.patient.clone(),
            care_system: care_system.to_owned(),
            break_glass_reason,
            request_id,
            origin: None,
        }
    }
}

/// Leaves the patient id out, so a principal can be logged.
impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("subject", &self.subject)
            .field("issuer", &self.issuer)
            .field("organisation", &self.organisation)
            .field("role", &self.role)
            .field("person_role_id", &self.person_role_id)
            .field("activity_codes", &self.activity_codes)
            .field("scopes", &self.scopes.to_string())
            .field("patient", &self.patient.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why verified claims do not make a principal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// A required claim is absent.
    #[error("the token has no {claim} claim{hint}")]
    Missing {
        /// The claim, e.g. `selected_roleid` or `nhsid_nrbac_roles[].org_code`.
        claim: String,
        /// What it means for the user, starting with a space, or empty.
        hint: &'static str,
    },
    /// A claim is present but unusable.
    #[error("the token's {claim} claim is not valid: {reason}")]
    Invalid {
        /// The claim.
        claim: String,
        /// What is wrong (never the value).
        reason: String,
    },
}

fn required_string(claims: &Map<String, Value>, claim: &str) -> Result<String, ClaimsError> {
    match claims.get(claim) {
        Some(Value::String(value)) if !value.trim().is_empty() => Ok(value.clone()),
        None | Some(Value::Null) => Err(ClaimsError::Missing {
            claim: claim.to_owned(),
            hint: "",
        }),
        Some(_) => Err(ClaimsError::Invalid {
            claim: claim.to_owned(),
            reason: "expected a non-empty string".to_owned(),
        }),
    }
}

/// FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`.
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    fn cis2_claims() -> Value {
        json!({
            "sub": "910000000001",
            "scope": "openid user/*.cruds",
            "selected_roleid": "555254242106",
            "nhsid_nrbac_roles": [
                {"person_roleid": "555254240100", "org_code": "RR8", "role_code": "S8000:G8000:R8001", "activity_codes": ["B0211"]},
                {"person_roleid": "555254242106", "org_code": "Y02494", "role_code": "S8000:G8000:R8000", "activity_codes": ["B0264", "B0380"]}
            ]
        })
    }

    #[test]
    fn cis2_selected_role_decides_organisation_and_role() {
        let principal = ClaimsMapping::default()
            .principal("https://cis2", &map(cis2_claims()))
            .expect("valid claims");
        assert_eq!(principal.organisation, "Y02494");
        assert_eq!(principal.role, "S8000:G8000:R8000");
        assert_eq!(principal.person_role_id.as_deref(), Some("555254242106"));
        assert_eq!(principal.activity_codes, vec!["B0264", "B0380"]);
        assert!(!principal.is_patient_confined());
    }

    #[test]
    fn cis2_problems_name_the_claim() {
        let mut claims = cis2_claims();
        claims
            .as_object_mut()
            .expect("object")
            .remove("selected_roleid");
        let err = ClaimsMapping::default()
            .principal("i", &map(claims))
            .expect_err("no selected role");
        assert!(err.to_string().contains("selected_roleid"), "{err}");

        let mut claims = cis2_claims();
        claims["selected_roleid"] = json!("999");
        let err = ClaimsMapping::default()
            .principal("i", &map(claims))
            .expect_err("unknown role");
        assert!(
            err.to_string().contains("matches no person_roleid"),
            "{err}"
        );

        let mut claims = cis2_claims();
        claims["nhsid_nrbac_roles"][1]["org_code"] = json!("y02494");
        let err = ClaimsMapping::default()
            .principal("i", &map(claims))
            .expect_err("lower-case ODS");
        assert!(err.to_string().contains("org_code"), "{err}");
    }

    #[test]
    fn patient_scopes_need_a_patient_and_errors_hide_its_value() {
        let claims = json!({"sub": "p", "org": "RR8", "role": "patient", "scope": "patient/*.rs"});
        let err = ClaimsMapping::flat()
            .principal("i", &map(claims))
            .expect_err("no patient claim");
        assert!(err.to_string().contains("patient"), "{err}");

        let claims = json!({"sub": "p", "org": "RR8", "role": "patient", "scope": ["patient/*.rs"], "patient": "pat-1"});
        let principal = ClaimsMapping::flat()
            .principal("i", &map(claims))
            .expect("valid");
        assert!(principal.is_patient_confined());
        assert!(!format!("{principal:?}").contains("pat-1"));

        let claims = json!({"sub": "p", "org": "RR8", "role": "r", "patient": "../../etc"});
        let err = ClaimsMapping::flat()
            .principal("i", &map(claims))
            .expect_err("bad id");
        assert!(!err.to_string().contains("etc"), "{err}");
    }
}
