//! SMART on FHIR scopes (v2 syntax, with the v1 `read`/`write`/`*` suffixes accepted).
//!
//! A clinical scope is `<context>/<resource type or *>.<permissions>`, where the context is
//! `patient`, `user` or `system` and the v2 permissions are a subsequence of `cruds` (create,
//! read, update, delete, search). v1's `.read` means `rs`, `.write` means `cud`, `.*` all five.
//! Non-clinical scopes (`openid`, `fhirUser`, `launch/patient`, `offline_access`, …) are kept
//! but grant nothing here. Granular v2 query constraints (`?category=…`) are rejected rather than
//! silently widened.

use std::collections::BTreeSet;
use std::fmt;

/// One FHIR interaction class, as SMART v2 groups them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Interaction {
    /// `c`: create (including conditional create and the create half of a transaction).
    Create,
    /// `r`: read and vread, history, `$everything`, `$export` downloads.
    Read,
    /// `u`: update.
    Update,
    /// `d`: delete.
    Delete,
    /// `s`: search.
    Search,
}

impl Interaction {
    const ALL: [Interaction; 5] = [
        Interaction::Create,
        Interaction::Read,
        Interaction::Update,
        Interaction::Delete,
        Interaction::Search,
    ];

    fn letter(self) -> char {
        match self {
            Interaction::Create => 'c',
            Interaction::Read => 'r',
            Interaction::Update => 'u',
            Interaction::Delete => 'd',
            Interaction::Search => 's',
        }
    }
}

impl fmt::Display for Interaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Interaction::Create => "create",
            Interaction::Read => "read",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
            Interaction::Search => "search",
        })
    }
}

/// Whose data a scope reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeContext {
    /// Only the compartment of the patient in the token's `patient` claim.
    Patient,
    /// Whatever the user may see.
    User,
    /// A backend service acting on its own behalf.
    System,
}

/// One clinical SMART scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SmartScope {
    /// Whose data.
    pub context: ScopeContext,
    /// The resource type, or `None` for `*`.
    pub resource_type: Option<String>,
    /// Which interactions, as a sorted set.
    pub interactions: BTreeSet<Interaction>,
}

impl SmartScope {
    fn permits(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.interactions.contains(&interaction)
            && self
                .resource_type
                .as_deref()
                .is_none_or(|granted| granted == resource_type)
    }
}

impl fmt::Display for SmartScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let context = match self.context {
            ScopeContext::Patient => "patient",
            ScopeContext::User => "user",
            ScopeContext::System => "system",
        };
        let letters: String = Interaction::ALL
            .iter()
            .filter(|i| self.interactions.contains(i))
            .map(|i| i.letter())
            .collect();
        write!(
            f,
            "{context}/{}.{letters}",
            self.resource_type.as_deref().unwrap_or("*")
        )
    }
}

/// Why a scope string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// A clinical scope whose shape is wrong.
    #[error(
        "scope {scope:?} is not a SMART scope: expected <patient|user|system>/<Type|*>.<cruds>"
    )]
    Malformed {
        /// The offending scope.
        scope: String,
    },
    /// A granular v2 scope with a query constraint, which this server does not enforce.
    #[error(
        "scope {scope:?} has a query constraint; granular scopes are not supported, ask for the whole type"
    )]
    Granular {
        /// The offending scope.
        scope: String,
    },
}

/// The scopes of one token, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    clinical: Vec<SmartScope>,
    other: Vec<String>,
}

impl Scopes {
    /// Parses a space-separated `scope` claim.
    pub fn parse(raw: &str) -> Result<Self, ScopeError> {
        let mut scopes = Scopes::default();
        for token in raw.split_ascii_whitespace() {
            match parse_clinical(token)? {
                Some(scope) => scopes.clinical.push(scope),
                None => scopes.other.push(token.to_owned()),
            }
        }
        Ok(scopes)
    }

    /// Whether any scope permits `interaction` on `resource_type`.
    pub fn permits(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.clinical
            .iter()
            .any(|scope| scope.permits(resource_type, interaction))
    }

    /// Whether any scope permits `interaction` on every resource type (`*`), as system-level
    /// interactions (system history, system search, `$export` of everything) need.
    pub fn permits_all_types(&self, interaction: Interaction) -> bool {
        self.clinical
            .iter()
            .any(|scope| scope.resource_type.is_none() && scope.interactions.contains(&interaction))
    }

    /// Whether every clinical scope is patient-context: the token reaches one compartment only.
    /// A token with no clinical scope at all is not patient-confined (it simply reaches nothing).
    pub fn is_patient_confined(&self) -> bool {
        !self.clinical.is_empty()
            && self
                .clinical
                .iter()
                .all(|scope| scope.context == ScopeContext::Patient)
    }

    /// Whether any clinical scope has patient context.
    pub fn has_patient_context(&self) -> bool {
        self.clinical
            .iter()
            .any(|scope| scope.context == ScopeContext::Patient)
    }

    /// The clinical scopes.
    pub fn clinical(&self) -> &[SmartScope] {
        &self.clinical
    }

    /// Whether there is no clinical scope.
    pub fn is_empty(&self) -> bool {
        self.clinical.is_empty()
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for item in self
            .clinical
            .iter()
            .map(ToString::to_string)
            .chain(self.other.iter().cloned())
        {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            f.write_str(&item)?;
        }
        Ok(())
    }
}

/// `Ok(None)` for a non-clinical scope such as `openid` or `launch/patient`.
fn parse_clinical(token: &str) -> Result<Option<SmartScope>, ScopeError> {
    let malformed = || ScopeError::Malformed {
        scope: token.to_owned(),
    };
    let Some((context, rest)) = token.split_once('/') else {
        return Ok(None);
    };
    let context = match context {
        "patient" => ScopeContext::Patient,
        "user" => ScopeContext::User,
        "system" => ScopeContext::System,
        _ => return Ok(None),
    };
    if rest.contains('?') {
        return Err(ScopeError::Granular {
            scope: token.to_owned(),
        });
    }
    let (resource_type, permissions) = rest.rsplit_once('.').ok_or_else(malformed)?;
    let resource_type = match resource_type {
        "*" => None,
        name if is_resource_type_name(name) => Some(name.to_owned()),
        _ => return Err(malformed()),
    };
    let interactions: BTreeSet<Interaction> = match permissions {
        "read" => [Interaction::Read, Interaction::Search].into(),
        "write" => [
            Interaction::Create,
            Interaction::Update,
            Interaction::Delete,
        ]
        .into(),
        "*" => Interaction::ALL.into(),
        letters => parse_v2_letters(letters).ok_or_else(malformed)?,
    };
    Ok(Some(SmartScope {
        context,
        resource_type,
        interactions,
    }))
}

/// v2 permissions: a non-empty subsequence of `cruds`, in that order.
fn parse_v2_letters(letters: &str) -> Option<BTreeSet<Interaction>> {
    let mut remaining = Interaction::ALL.iter();
    let mut set = BTreeSet::new();
    for letter in letters.chars() {
        let interaction = remaining.by_ref().find(|i| i.letter() == letter)?;
        set.insert(*interaction);
    }
    (!set.is_empty()).then_some(set)
}

fn is_resource_type_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphanumeric())
        && name.len() <= 64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn v2_scopes_grant_exactly_their_letters() {
        let scopes = Scopes::parse("openid fhirUser user/Observation.rs user/Patient.cruds")
            .expect("valid scopes");
        assert!(scopes.permits("Observation", Interaction::Read));
        assert!(scopes.permits("Observation", Interaction::Search));
        assert!(!scopes.permits("Observation", Interaction::Create));
        assert!(scopes.permits("Patient", Interaction::Delete));
        assert!(!scopes.permits("Condition", Interaction::Read));
        assert!(!scopes.permits_all_types(Interaction::Read));
        assert!(!scopes.is_patient_confined());
    }

    #[test]
    fn wildcard_and_v1_forms() {
        let scopes = Scopes::parse("user/*.read").expect("valid");
        assert!(scopes.permits("Condition", Interaction::Search));
        assert!(!scopes.permits("Condition", Interaction::Update));
        assert!(scopes.permits_all_types(Interaction::Read));
        let scopes = Scopes::parse("patient/*.*").expect("valid");
        assert!(scopes.permits("Observation", Interaction::Delete));
        assert!(scopes.is_patient_confined());
        let scopes = Scopes::parse("user/Observation.write").expect("valid");
        assert!(scopes.permits("Observation", Interaction::Create));
        assert!(!scopes.permits("Observation", Interaction::Read));
    }

    #[test]
    fn bad_scopes_are_refused_with_the_offender_named() {
        for bad in [
            "user/Observation.sr",
            "user/Observation.x",
            "user/Observation.",
            "user/observation.rs",
            "user/Observation",
        ] {
            let err = Scopes::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert!(matches!(
            Scopes::parse("patient/Observation.rs?category=laboratory"),
            Err(ScopeError::Granular { .. })
        ));
    }

    #[test]
    fn non_clinical_scopes_grant_nothing() {
        let scopes = Scopes::parse("openid launch/patient offline_access").expect("valid");
        assert!(scopes.is_empty());
        assert!(!scopes.permits("Patient", Interaction::Read));
        assert!(!scopes.is_patient_confined());
    }

    proptest! {
        #[test]
        fn display_round_trips(context in 0..3usize, ty in prop::option::of("[A-Z][a-zA-Z]{0,12}"), mask in 1u8..32) {
            let context = ["patient", "user", "system"][context];
            let letters: String = "cruds".chars().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, c)| c).collect();
            let raw = format!("{context}/{}.{letters}", ty.as_deref().unwrap_or("*"));
            let scopes = Scopes::parse(&raw).expect("generated scopes are valid");
            prop_assert_eq!(scopes.to_string(), raw.clone());
            prop_assert_eq!(Scopes::parse(&scopes.to_string()).expect("reparses"), scopes);
        }

        #[test]
        fn parsing_is_total(raw in "\\PC{0,40}") {
            let _ = Scopes::parse(&raw);
        }
    }
}
