//! The `CareSystem` CustomResourceDefinition, generated from the Rust types.
//!
//! Invariant: `crds/caresystem.yaml` in the repository is byte-for-byte what [`crd_yaml`]
//! returns (a test fails otherwise), so the chart and `kubectl apply` users get the schema this
//! binary enforces.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;
use serde_json::Value;

use crate::care_system::CareSystem;

/// Why the CRD could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("cannot render the CareSystem CRD as YAML")]
    Yaml(#[from] serde_yaml::Error),
    #[error("cannot reflow the CareSystem CRD's descriptions")]
    Json(#[from] serde_json::Error),
}

/// The CareSystem CRD. Doc comments are wrapped at 100 columns in the source and `kubectl
/// explain` wraps again, so single line breaks in descriptions become spaces (paragraph breaks
/// and code blocks stay).
pub fn care_system_crd() -> Result<CustomResourceDefinition, CrdError> {
    let mut crd = serde_json::to_value(CareSystem::crd())?;
    reflow_descriptions(&mut crd);
    Ok(serde_json::from_value(crd)?)
}

/// The CareSystem CRD as one YAML document.
pub fn crd_yaml() -> Result<String, CrdError> {
    Ok(serde_yaml::to_string(&care_system_crd()?)?)
}

fn reflow_descriptions(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                match field {
                    Value::String(text) if key == "description" && !text.contains("```") => {
                        *text = text
                            .split("\n\n")
                            .map(|paragraph| paragraph.replace('\n', " "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    _ => reflow_descriptions(field),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(reflow_descriptions),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_read_as_sentences() {
        let yaml = crd_yaml().expect("CRD renders");
        assert!(
            yaml.contains("What happens to the bucket and key when this CareSystem is deleted. `Retain` (default) leaves"),
            "{yaml}"
        );
    }

    #[test]
    fn checked_in_crd_matches_the_types() {
        let generated = crd_yaml().expect("CRD renders");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/caresystem.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            generated == checked_in,
            "crds/caresystem.yaml is out of date; regenerate it with \
             `cargo run -- crd > crds/caresystem.yaml`"
        );
    }
}
