//! The Terraform under `terraform/`, checked with a real OpenTofu (built from its Go module by the
//! test environment) as far as an offline machine allows.
//!
//! What runs here and what does not:
//! - `tofu fmt -check` over the whole tree, and `tofu get` on every configuration (which loads and
//!   decodes each configuration and its module tree: block structure, variable types and
//!   validation blocks, module sources).
//! - The IAM policies are rendered by OpenTofu's own `templatefile()` (a provider-free root
//!   configuration, `tofu apply` with local state) and then checked here: a store's policy is
//!   evaluated against its own, another care system's and look-alike resources; the operator's
//!   stays inside the ShCR bucket prefix and KMS tags and cannot read records; the bucket policy
//!   equals the one the operator writes.
//! - References between files and modules (`var.*`, `local.*`, `module.*.*`, `data.*`,
//!   resources, module arguments) are checked by a small reader of the canonically formatted
//!   HCL, because `tofu validate` needs the `hashicorp/aws` provider binary, which no registry
//!   reachable from these machines serves.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

const ACCOUNT: &str = "111122223333";
const REGION: &str = "eu-west-2";

fn terraform_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("terraform")
}

/// The configurations a user runs or calls.
const CONFIGURATIONS: &[&str] = &[
    "examples/complete",
    "modules/platform",
    "modules/care-system",
];

// ---------------------------------------------------------------------------------------------
// Running tofu
// ---------------------------------------------------------------------------------------------

/// The OpenTofu binary (built and cached on first use) and a private CLI home for this test
/// process under Cargo's temp dir: an empty CLI configuration, so nothing from the developer's
/// ~/.terraformrc applies, and the data dirs `tofu` would otherwise create in the repository.
struct Tofu {
    executable: PathBuf,
    home: PathBuf,
}

fn tofu() -> &'static Tofu {
    static TOFU: OnceLock<Tofu> = OnceLock::new();
    TOFU.get_or_init(|| {
        let executable = shcr_testenv::tools::TOFU
            .executable("tofu")
            .unwrap_or_else(|e| panic!("{e}"));
        let home = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terraform-tofu-home");
        let _ = fs::remove_dir_all(&home);
        fs::create_dir_all(&home).expect("create the tofu CLI home");
        fs::write(home.join("cli.tfrc"), "").expect("write empty CLI config");
        Tofu { executable, home }
    })
}

impl Tofu {
    /// `tofu <args>` in `dir`, with its own data dir (no `.terraform/` in the repository).
    fn run(&self, dir: &Path, args: &[&str]) -> Output {
        static RUN: AtomicU32 = AtomicU32::new(0);
        let data_dir = self
            .home
            .join(format!("data-{}", RUN.fetch_add(1, Ordering::Relaxed)));
        Command::new(&self.executable)
            .current_dir(dir)
            .args(args)
            .env("TF_CLI_CONFIG_FILE", self.home.join("cli.tfrc"))
            .env("TF_DATA_DIR", &data_dir)
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1")
            .env_remove("TF_PLUGIN_CACHE_DIR")
            .env_remove("TF_LOG")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.executable.display()))
    }
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// Formatting and loading
// ---------------------------------------------------------------------------------------------

#[test]
fn every_file_is_canonically_formatted() {
    let output = tofu().run(
        &terraform_dir(),
        &["fmt", "-check", "-recursive", "-diff", "-no-color", "."],
    );
    assert!(
        output.status.success(),
        "`tofu fmt -check -recursive terraform/` found files to reformat (run `tofu fmt \
         -recursive terraform/`):\n{}",
        describe(&output)
    );
}

#[test]
fn the_format_check_catches_a_misformatted_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(
        dir.path().join("main.tf"),
        "variable \"x\" {\ntype=string\n  default   = \"a\"\n}\n",
    )
    .expect("write main.tf");
    let output = tofu().run(
        dir.path(),
        &["fmt", "-check", "-recursive", "-no-color", "."],
    );
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("main.tf"),
        "{}",
        describe(&output)
    );
}

#[test]
fn every_configuration_and_its_module_tree_loads() {
    for configuration in CONFIGURATIONS {
        let dir = terraform_dir().join(configuration);
        let output = tofu().run(&dir, &["get", "-no-color"]);
        assert!(
            output.status.success(),
            "`tofu get` in terraform/{configuration}:\n{}",
            describe(&output)
        );
    }
    let output = tofu().run(
        &terraform_dir().join("examples/complete"),
        &["get", "-no-color"],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    for module in [
        "platform in ../../modules/platform",
        "care_system in ../../modules/care-system",
    ] {
        assert!(stdout.contains(module), "{module} not installed:\n{stdout}");
    }
}

#[test]
fn loading_reports_a_broken_configuration() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(
        dir.path().join("main.tf"),
        "variable \"x\" {\n  type = boool\n}\n",
    )
    .expect("write main.tf");
    let output = tofu().run(dir.path(), &["get", "-no-color"]);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        describe(&output).contains("not a valid type specification"),
        "{}",
        describe(&output)
    );
}

// ---------------------------------------------------------------------------------------------
// References between files and modules
// ---------------------------------------------------------------------------------------------

/// What one configuration directory declares and references, read from canonically formatted
/// HCL (`tofu fmt` layout: top-level blocks at column 0, their arguments at two spaces).
#[derive(Default, Debug)]
struct Declarations {
    /// variable name → has a default
    variables: BTreeMap<String, bool>,
    outputs: BTreeSet<String>,
    locals: BTreeSet<String>,
    /// `type.name` of resources, `data.type.name` of data sources
    objects: BTreeSet<String>,
    /// module name → (source, argument names)
    modules: BTreeMap<String, (String, BTreeSet<String>)>,
    /// (file, reference) of every `var.`, `local.`, `module.`, `data.` and `aws_*.` chain
    references: Vec<(String, Vec<String>)>,
    /// blocks missing the description (and, for variables, the type) the conventions require
    undocumented: Vec<String>,
}

fn quoted_labels(line: &str) -> Vec<String> {
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Dotted identifier chains outside comments: `module.platform.bucket_prefix[0]` → 3 parts.
fn chains(line: &str) -> Vec<Vec<String>> {
    let code = match line.find('#') {
        Some(at) => &line[..at],
        None => line,
    };
    code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
        .filter(|token| token.contains('.') && !token.starts_with('.'))
        .map(|token| token.split('.').map(str::to_owned).collect::<Vec<_>>())
        .filter(|parts| parts.iter().all(|p| !p.is_empty()))
        .collect()
}

fn read_declarations(dir: &Path) -> Declarations {
    let mut declarations = Declarations::default();
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "tf"))
        .collect();
    files.sort();
    for file in files {
        let file_name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = fs::read_to_string(&file).expect("read .tf file");
        // (kind, labels, body lines at depth 1)
        let mut block: Option<(String, Vec<String>, Vec<String>)> = None;
        for line in text.lines() {
            for chain in chains(line) {
                declarations.references.push((file_name.clone(), chain));
            }
            if let Some((kind, labels, body)) = &mut block {
                if line == "}" {
                    let has = |key: &str| {
                        body.iter()
                            .any(|l| l.trim_start().starts_with(&format!("{key} ")))
                    };
                    match kind.as_str() {
                        "variable" => {
                            declarations
                                .variables
                                .insert(labels[0].clone(), has("default"));
                            if !has("description") || !has("type") {
                                declarations
                                    .undocumented
                                    .push(format!("{file_name}: variable {}", labels[0]));
                            }
                        }
                        "output" => {
                            declarations.outputs.insert(labels[0].clone());
                            if !has("description") {
                                declarations
                                    .undocumented
                                    .push(format!("{file_name}: output {}", labels[0]));
                            }
                        }
                        "locals" => {
                            for l in body.iter() {
                                let Some(l) = l.strip_prefix("  ") else {
                                    continue;
                                };
                                if l.starts_with([' ', '#']) {
                                    continue;
                                }
                                if let Some((name, _)) = l.split_once(" = ") {
                                    declarations.locals.insert(name.trim().to_owned());
                                }
                            }
                        }
                        "resource" => {
                            declarations
                                .objects
                                .insert(format!("{}.{}", labels[0], labels[1]));
                        }
                        "data" => {
                            declarations
                                .objects
                                .insert(format!("data.{}.{}", labels[0], labels[1]));
                        }
                        "module" => {
                            let mut source = String::new();
                            let mut arguments = BTreeSet::new();
                            for l in body.iter() {
                                let Some(l) = l.strip_prefix("  ") else {
                                    continue;
                                };
                                if l.starts_with(' ') {
                                    continue;
                                }
                                if let Some((name, value)) = l.split_once('=') {
                                    let name = name.trim().to_owned();
                                    if name == "source" {
                                        source = value.trim().trim_matches('"').to_owned();
                                    }
                                    arguments.insert(name);
                                }
                            }
                            declarations
                                .modules
                                .insert(labels[0].clone(), (source, arguments));
                        }
                        _ => {}
                    }
                    block = None;
                } else {
                    body.push(line.to_owned());
                }
            } else if !line.starts_with(' ') && line.ends_with("{}") {
                // An empty one-line block, e.g. `data "aws_region" "current" {}`.
                let labels = quoted_labels(line);
                match line.split_whitespace().next() {
                    Some("data") if labels.len() == 2 => {
                        declarations
                            .objects
                            .insert(format!("data.{}.{}", labels[0], labels[1]));
                    }
                    Some("resource") if labels.len() == 2 => {
                        declarations
                            .objects
                            .insert(format!("{}.{}", labels[0], labels[1]));
                    }
                    _ => {}
                }
            } else if !line.starts_with(' ') && line.ends_with('{') {
                let kind = line
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                block = Some((kind, quoted_labels(line), Vec::new()));
            }
        }
        assert!(
            block.is_none(),
            "{file_name}: a top-level block is not closed at column 0"
        );
    }
    declarations
}

/// Every reference in `dir` (and the modules it calls) resolves; returns the problems found.
fn reference_problems(dir: &Path) -> Vec<String> {
    let declarations = read_declarations(dir);
    let mut problems: Vec<String> = declarations
        .undocumented
        .iter()
        .map(|block| format!("{}: {block} lacks a description or type", dir.display()))
        .collect();
    const META_ARGUMENTS: &[&str] = &[
        "source",
        "version",
        "for_each",
        "count",
        "depends_on",
        "providers",
    ];
    let mut module_outputs = BTreeMap::new();
    for (name, (source, arguments)) in &declarations.modules {
        let child_dir = dir.join(source);
        let child = read_declarations(&child_dir);
        for argument in arguments {
            if !META_ARGUMENTS.contains(&argument.as_str())
                && !child.variables.contains_key(argument)
            {
                problems.push(format!(
                    "module {name}: argument {argument} is not a variable of {source}"
                ));
            }
        }
        for (variable, has_default) in &child.variables {
            if !has_default && !arguments.contains(variable) {
                problems.push(format!(
                    "module {name}: required variable {variable} of {source} is not set"
                ));
            }
        }
        module_outputs.insert(name.clone(), child.outputs.clone());
        problems.extend(reference_problems(&child_dir));
    }
    for (file, chain) in &declarations.references {
        let head = chain[0].as_str();
        let problem = match head {
            "var" => (!declarations.variables.contains_key(&chain[1]))
                .then(|| format!("var.{} is not declared", chain[1])),
            "local" => (!declarations.locals.contains(&chain[1]))
                .then(|| format!("local.{} is not declared", chain[1])),
            "module" => match module_outputs.get(&chain[1]) {
                None => Some(format!("module.{} is not called", chain[1])),
                Some(outputs) => chain.get(2).and_then(|output| {
                    (!outputs.contains(output))
                        .then(|| format!("module.{}.{output} is not an output", chain[1]))
                }),
            },
            "data" if chain.len() >= 3 => {
                let object = format!("data.{}.{}", chain[1], chain[2]);
                (!declarations.objects.contains(&object))
                    .then(|| format!("{object} is not declared"))
            }
            _ if head.starts_with("aws_") => {
                let object = format!("{head}.{}", chain[1]);
                (!declarations.objects.contains(&object))
                    .then(|| format!("{object} is not declared"))
            }
            _ => None,
        };
        if let Some(problem) = problem {
            problems.push(format!("{}/{file}: {problem}", dir.display()));
        }
    }
    problems
}

#[test]
fn every_reference_resolves_and_every_input_is_documented() {
    for configuration in CONFIGURATIONS {
        let problems = reference_problems(&terraform_dir().join(configuration));
        assert!(
            problems.is_empty(),
            "{configuration}:\n{}",
            problems.join("\n")
        );
    }
}

#[test]
fn the_reference_check_finds_broken_references() {
    let dir = tempfile::tempdir().expect("temp dir");
    let child = dir.path().join("child");
    fs::create_dir(&child).expect("mkdir child");
    fs::write(
        child.join("main.tf"),
        "variable \"needed\" {\n  description = \"d\"\n  type        = string\n}\n\n\
         output \"out\" {\n  description = \"d\"\n  value       = var.needed\n}\n",
    )
    .expect("write child");
    fs::write(
        dir.path().join("main.tf"),
        "module \"c\" {\n  source = \"./child\"\n  extra  = 1\n}\n\n\
         output \"x\" {\n  value = module.c.missing\n}\n\n\
         output \"y\" {\n  description = \"d\"\n  value       = var.undeclared\n}\n",
    )
    .expect("write root");
    let problems = reference_problems(dir.path()).join("\n");
    for expected in [
        "argument extra is not a variable",
        "required variable needed",
        "module.c.missing is not an output",
        "var.undeclared is not declared",
        "output x lacks a description",
    ] {
        assert!(
            problems.contains(expected),
            "{expected} missing in:\n{problems}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering the policies with OpenTofu
// ---------------------------------------------------------------------------------------------

const BUCKET_A: &str = "shcr-west-yorkshire-111122223333";
const KEY_A: &str = "arn:aws:kms:eu-west-2:111122223333:key/0a1b2c3d-0000-4000-8000-00000000000a";
const BUCKET_B: &str = "shcr-west-111122223333";
const KEY_B: &str = "arn:aws:kms:eu-west-2:111122223333:key/0a1b2c3d-0000-4000-8000-00000000000b";

fn s3_arn(bucket: &str) -> String {
    format!("arn:aws:s3:::{bucket}")
}

/// Every policy, rendered once per test binary by `templatefile()` in a provider-free root
/// configuration applied with local state.
fn rendered() -> &'static BTreeMap<String, Value> {
    static RENDERED: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let modules = terraform_dir().join("modules");
        let care_system = modules.join("care-system/policies");
        let platform = modules.join("platform/policies");
        let store = |name: &str, bucket: &str, key: &str| {
            format!(
                "output \"{name}\" {{\n  value = templatefile(\"{}\", {{ bucket_arn = \"{}\", \
                 kms_key_arn = \"{key}\" }})\n}}\n",
                care_system.join("store.json.tftpl").display(),
                s3_arn(bucket)
            )
        };
        let operator = |name: &str, allow_deletion: bool| {
            format!(
                "output \"{name}\" {{\n  value = templatefile(\"{}\", {{ partition = \"aws\", \
                 account_id = \"{ACCOUNT}\", region = \"{REGION}\", bucket_prefix = \"shcr-\", \
                 allow_deletion = {allow_deletion} }})\n}}\n",
                platform.join("operator.json.tftpl").display()
            )
        };
        let config = [
            store("store_a", BUCKET_A, KEY_A),
            store("store_b", BUCKET_B, KEY_B),
            operator("operator_delete", true),
            operator("operator_retain", false),
            format!(
                "output \"bucket_a\" {{\n  value = templatefile(\"{}\", {{ bucket_name = \
                 \"{BUCKET_A}\" }})\n}}\n",
                care_system.join("bucket.json.tftpl").display()
            ),
        ]
        .join("\n");
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join("main.tf"), config).expect("write render config");
        for args in [
            &["init", "-no-color"][..],
            &["apply", "-auto-approve", "-no-color"][..],
        ] {
            let output = tofu().run(dir.path(), args);
            assert!(
                output.status.success(),
                "tofu {args:?} rendering the policies:\n{}",
                describe(&output)
            );
        }
        let output = tofu().run(dir.path(), &["output", "-json"]);
        assert!(output.status.success(), "{}", describe(&output));
        let outputs: BTreeMap<String, Value> =
            serde_json::from_slice(&output.stdout).expect("tofu output -json is JSON");
        outputs
            .into_iter()
            .map(|(name, output)| {
                let text = output["value"]
                    .as_str()
                    .expect("rendered template is a string");
                let policy = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("{name} does not render to JSON ({e}):\n{text}"));
                (name, policy)
            })
            .collect()
    })
}

fn policy(name: &str) -> &'static Value {
    rendered()
        .get(name)
        .unwrap_or_else(|| panic!("no rendered policy {name}"))
}

// ---------------------------------------------------------------------------------------------
// A small IAM evaluator
// ---------------------------------------------------------------------------------------------

/// `*` and `?` wildcards as IAM matches them (actions case-insensitively).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().expect("policy lists hold strings").to_owned())
            .collect(),
        Value::Null => Vec::new(),
        other => panic!("unexpected policy value {other}"),
    }
}

fn statements(policy: &Value) -> &Vec<Value> {
    policy["Statement"]
        .as_array()
        .expect("a policy has a Statement list")
}

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Allowed,
    ExplicitlyDenied,
    NotAllowed,
}

/// IAM's order: an explicit Deny wins, then an Allow, else nothing is allowed. A statement with
/// a Condition counts as matching for Deny and as not matching for Allow (the conservative
/// reading, since this evaluator knows no request context).
fn evaluate(policy: &Value, action: &str, resource: &str) -> Decision {
    let mut allowed = false;
    for statement in statements(policy) {
        let action_matches = {
            let lower = action.to_ascii_lowercase();
            let any = |key: &str| {
                strings(&statement[key])
                    .iter()
                    .any(|p| glob(&p.to_ascii_lowercase(), &lower))
            };
            if statement.get("NotAction").is_some() {
                !any("NotAction")
            } else {
                any("Action")
            }
        };
        let resource_matches = if statement.get("NotResource").is_some() {
            !strings(&statement["NotResource"])
                .iter()
                .any(|p| glob(p, resource))
        } else {
            strings(&statement["Resource"])
                .iter()
                .any(|p| glob(p, resource))
        };
        if !(action_matches && resource_matches) {
            continue;
        }
        let conditional = statement.get("Condition").is_some();
        match statement["Effect"].as_str() {
            Some("Deny") => return Decision::ExplicitlyDenied,
            Some("Allow") if !conditional => allowed = true,
            Some("Allow") => {}
            other => panic!("unexpected Effect {other:?}"),
        }
    }
    if allowed {
        Decision::Allowed
    } else {
        Decision::NotAllowed
    }
}

// ---------------------------------------------------------------------------------------------
// The store's policy
// ---------------------------------------------------------------------------------------------

/// What the store does: SlateDB on object_store (get, put with preconditions, list, delete,
/// multipart) and envelope encryption (GenerateDataKey, Decrypt, DescribeKey).
const STORE_NEEDS: &[(&str, Target)] = &[
    ("s3:ListBucket", Target::Bucket),
    ("s3:GetObject", Target::Object),
    ("s3:PutObject", Target::Object),
    ("s3:DeleteObject", Target::Object),
    ("s3:AbortMultipartUpload", Target::Object),
    ("kms:GenerateDataKey", Target::Key),
    ("kms:Decrypt", Target::Key),
    ("kms:DescribeKey", Target::Key),
];

#[derive(Clone, Copy)]
enum Target {
    Bucket,
    Object,
    Key,
}

fn target(target: Target, bucket: &str, key: &str) -> String {
    match target {
        Target::Bucket => s3_arn(bucket),
        Target::Object => format!("{}/records/manifest/00000001.manifest", s3_arn(bucket)),
        Target::Key => key.to_owned(),
    }
}

#[test]
fn a_store_policy_names_only_its_own_bucket_and_key() {
    let policy = policy("store_a");
    let own: BTreeSet<String> = [s3_arn(BUCKET_A), format!("{}/*", s3_arn(BUCKET_A))]
        .into_iter()
        .chain([KEY_A.to_owned()])
        .collect();
    let allowed_actions: BTreeSet<&str> = STORE_NEEDS.iter().map(|(a, _)| *a).collect();
    let mut denies = Vec::new();
    for statement in statements(policy) {
        assert!(
            statement.get("Condition").is_none(),
            "the store policy has no conditional statements: {statement}"
        );
        match statement["Effect"].as_str() {
            Some("Allow") => {
                assert!(statement.get("NotResource").is_none(), "{statement}");
                assert!(statement.get("NotAction").is_none(), "{statement}");
                for action in strings(&statement["Action"]) {
                    assert!(
                        allowed_actions.contains(action.as_str()),
                        "the store is granted {action}, which it does not need: {statement}"
                    );
                }
                for resource in strings(&statement["Resource"]) {
                    assert!(
                        own.contains(&resource),
                        "the store is granted {resource}, which is not its own bucket or key"
                    );
                    assert_ne!(resource, "*");
                }
            }
            Some("Deny") => denies.push(statement),
            other => panic!("unexpected Effect {other:?}"),
        }
    }
    // The isolation does not depend on other policies of the role staying absent.
    for service in ["s3:*", "kms:*"] {
        assert!(
            denies.iter().any(|d| strings(&d["Action"]) == [service]
                && !strings(&d["NotResource"]).is_empty()
                && strings(&d["NotResource"]).iter().all(|r| own.contains(r))),
            "no Deny of {service} outside the care system's own resources"
        );
    }
}

#[test]
fn a_store_can_do_its_work_on_its_own_bucket_and_key() {
    let policy = policy("store_a");
    for (action, kind) in STORE_NEEDS {
        let resource = target(*kind, BUCKET_A, KEY_A);
        assert_eq!(
            evaluate(policy, action, &resource),
            Decision::Allowed,
            "{action} on {resource}"
        );
    }
}

#[test]
fn a_store_is_denied_every_other_care_systems_bucket_and_key() {
    let policy = policy("store_a");
    let look_alikes = [
        BUCKET_B.to_owned(),
        format!("{BUCKET_A}-backup"),
        format!("{BUCKET_A}x"),
        "shcr-west-yorkshire".to_owned(),
        "other-organisation-records".to_owned(),
    ];
    for bucket in &look_alikes {
        for (action, kind) in STORE_NEEDS {
            let resource = match kind {
                Target::Key => continue,
                _ => target(*kind, bucket, KEY_A),
            };
            assert_eq!(
                evaluate(policy, action, &resource),
                Decision::ExplicitlyDenied,
                "{action} on {resource}"
            );
        }
    }
    for key in [
        KEY_B,
        "arn:aws:kms:eu-west-2:111122223333:key/0a1b2c3d-0000-4000-8000-00000000000ab",
        "arn:aws:kms:eu-west-1:111122223333:key/0a1b2c3d-0000-4000-8000-00000000000a",
        "arn:aws:kms:eu-west-2:111122223333:alias/shcr/west",
    ] {
        for action in [
            "kms:Decrypt",
            "kms:GenerateDataKey",
            "kms:DescribeKey",
            "kms:Encrypt",
        ] {
            assert_eq!(
                evaluate(policy, action, key),
                Decision::ExplicitlyDenied,
                "{action} on {key}"
            );
        }
    }
    // Account-wide calls have the resource "*": denied too.
    for action in ["s3:ListAllMyBuckets", "kms:ListKeys", "kms:CreateKey"] {
        assert_eq!(
            evaluate(policy, action, "*"),
            Decision::ExplicitlyDenied,
            "{action}"
        );
    }
    // And the store cannot reconfigure or destroy its own bucket or key.
    for (action, resource) in [
        ("s3:DeleteBucket", s3_arn(BUCKET_A)),
        ("s3:PutBucketPolicy", s3_arn(BUCKET_A)),
        ("s3:PutEncryptionConfiguration", s3_arn(BUCKET_A)),
        ("s3:DeleteObjectVersion", format!("{}/x", s3_arn(BUCKET_A))),
        ("kms:ScheduleKeyDeletion", KEY_A.to_owned()),
        ("kms:DisableKey", KEY_A.to_owned()),
        ("kms:PutKeyPolicy", KEY_A.to_owned()),
    ] {
        assert_eq!(
            evaluate(policy, action, &resource),
            Decision::NotAllowed,
            "{action} on {resource}"
        );
    }
}

#[test]
fn two_care_systems_policies_never_overlap() {
    let (a, b) = (policy("store_a"), policy("store_b"));
    for (action, kind) in STORE_NEEDS {
        let resource_a = target(*kind, BUCKET_A, KEY_A);
        let resource_b = target(*kind, BUCKET_B, KEY_B);
        assert_eq!(evaluate(b, action, &resource_b), Decision::Allowed);
        assert_eq!(
            evaluate(a, action, &resource_b),
            Decision::ExplicitlyDenied,
            "A: {action} on {resource_b}"
        );
        assert_eq!(
            evaluate(b, action, &resource_a),
            Decision::ExplicitlyDenied,
            "B: {action} on {resource_a}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The operator's policy
// ---------------------------------------------------------------------------------------------

/// The AWS calls in operator/src/bucket.rs and key.rs, as IAM actions.
const OPERATOR_CALLS: &[&str] = &[
    "s3:ListBucket",                 // HeadBucket
    "s3:CreateBucket",               // CreateBucket
    "s3:GetBucketTagging",           // GetBucketTagging
    "s3:PutBucketTagging",           // PutBucketTagging
    "s3:PutBucketPublicAccessBlock", // PutPublicAccessBlock
    "s3:PutEncryptionConfiguration", // PutBucketEncryption
    "s3:PutBucketVersioning",        // PutBucketVersioning
    "s3:PutBucketPolicy",            // PutBucketPolicy
    "s3:PutLifecycleConfiguration",  // PutBucketLifecycleConfiguration
    "kms:CreateKey",
    "kms:TagResource", // CreateKey with Tags
    "kms:CreateAlias",
    "kms:DescribeKey",
    "kms:ListResourceTags",
    "kms:GetKeyRotationStatus",
    "kms:EnableKeyRotation",
    "kms:DisableKeyRotation",
];
/// The calls only `deletionPolicy: Delete` makes.
const OPERATOR_DELETION_CALLS: &[&str] = &[
    "s3:ListBucketVersions",   // ListObjectVersions
    "s3:DeleteObject",         // DeleteObjects
    "s3:DeleteObjectVersion",  // DeleteObjects with version ids
    "s3:DeleteBucket",         // DeleteBucket
    "kms:ScheduleKeyDeletion", // ScheduleKeyDeletion
    "kms:DeleteAlias",         // DeleteAlias
];

fn allowed_actions(policy: &Value) -> BTreeSet<String> {
    statements(policy)
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| strings(&s["Action"]))
        .collect()
}

fn conditions_on(statement: &Value, prefix: &str) -> bool {
    statement["Condition"].as_object().is_some_and(|operators| {
        operators
            .values()
            .filter_map(Value::as_object)
            .any(|keys| keys.keys().any(|k| k.starts_with(prefix)))
    })
}

#[test]
fn the_operator_policy_stays_inside_the_shcr_prefix_and_tags() {
    let key_arns = format!("arn:aws:kms:{REGION}:{ACCOUNT}:key/");
    let alias_arns = format!("arn:aws:kms:{REGION}:{ACCOUNT}:alias/shcr/");
    for name in ["operator_delete", "operator_retain"] {
        for statement in statements(policy(name)) {
            assert_eq!(statement["Effect"], "Allow", "{name}: {statement}");
            let actions = strings(&statement["Action"]);
            for action in &actions {
                assert!(!action.contains('*'), "{name}: wildcard action {action}");
            }
            for resource in strings(&statement["Resource"]) {
                if resource == "*" {
                    // Only CreateKey, which has no ARN, and only with the ShCR tags.
                    assert_eq!(actions, ["kms:CreateKey"], "{name}: {statement}");
                    let condition = &statement["Condition"];
                    assert_eq!(
                        condition["StringEquals"]["aws:RequestTag/shcr.dev/managed-by"],
                        "shcr-operator",
                        "{name}: {statement}"
                    );
                    assert_eq!(
                        condition["Null"]["aws:RequestTag/shcr.dev/care-system"],
                        "false"
                    );
                    assert_eq!(
                        strings(&condition["ForAllValues:StringEquals"]["aws:TagKeys"]),
                        ["shcr.dev/care-system", "shcr.dev/managed-by"]
                    );
                } else if resource.starts_with("arn:aws:s3:::") {
                    assert!(
                        resource.starts_with("arn:aws:s3:::shcr-"),
                        "{name}: bucket outside the prefix: {resource}"
                    );
                } else if resource.starts_with(&key_arns) {
                    assert!(
                        conditions_on(statement, "aws:ResourceTag/")
                            || conditions_on(statement, "aws:RequestTag/"),
                        "{name}: key statement without a tag condition: {statement}"
                    );
                } else {
                    assert!(
                        resource.starts_with(&alias_arns),
                        "{name}: resource outside ShCR: {resource}"
                    );
                }
            }
        }
        // The operator provisions but never reads or writes records.
        let actions = allowed_actions(policy(name));
        for forbidden in [
            "s3:GetObject",
            "s3:PutObject",
            "kms:Decrypt",
            "kms:Encrypt",
            "kms:GenerateDataKey",
            "kms:ReEncryptFrom",
            "kms:PutKeyPolicy",
            "kms:UntagResource",
        ] {
            assert!(!actions.contains(forbidden), "{name} allows {forbidden}");
        }
    }
}

#[test]
fn the_operator_is_granted_exactly_the_calls_it_makes() {
    let expected = |with_deletion: bool| -> BTreeSet<String> {
        OPERATOR_CALLS
            .iter()
            .chain(if with_deletion {
                OPERATOR_DELETION_CALLS
            } else {
                &[]
            })
            .map(|a| (*a).to_owned())
            .collect()
    };
    assert_eq!(allowed_actions(policy("operator_delete")), expected(true));
    assert_eq!(allowed_actions(policy("operator_retain")), expected(false));
}

#[test]
fn the_operator_reaches_shcr_buckets_only() {
    let policy = policy("operator_delete");
    for (action, resource, expected) in [
        ("s3:CreateBucket", s3_arn(BUCKET_A), Decision::Allowed),
        ("s3:PutBucketPolicy", s3_arn(BUCKET_A), Decision::Allowed),
        ("s3:DeleteBucket", s3_arn(BUCKET_A), Decision::Allowed),
        (
            "s3:CreateBucket",
            s3_arn("payroll-exports"),
            Decision::NotAllowed,
        ),
        (
            "s3:PutBucketPolicy",
            s3_arn("payroll-exports"),
            Decision::NotAllowed,
        ),
        (
            "s3:DeleteBucket",
            s3_arn("payroll-exports"),
            Decision::NotAllowed,
        ),
        (
            "s3:DeleteObject",
            format!("{}/x", s3_arn("payroll-exports")),
            Decision::NotAllowed,
        ),
        (
            "s3:GetObject",
            format!("{}/x", s3_arn(BUCKET_A)),
            Decision::NotAllowed,
        ),
        // Alias statements are unconditional; key statements are conditional on tags, so
        // this evaluator (which knows no tags) never counts them as allowing anything.
        (
            "kms:CreateAlias",
            format!("arn:aws:kms:{REGION}:{ACCOUNT}:alias/shcr/west"),
            Decision::Allowed,
        ),
        (
            "kms:CreateAlias",
            format!("arn:aws:kms:{REGION}:{ACCOUNT}:alias/payroll"),
            Decision::NotAllowed,
        ),
        (
            "kms:ScheduleKeyDeletion",
            KEY_A.to_owned(),
            Decision::NotAllowed,
        ),
    ] {
        assert_eq!(
            evaluate(policy, action, &resource),
            expected,
            "{action} on {resource}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Agreement with the operator
// ---------------------------------------------------------------------------------------------

#[test]
fn the_bucket_policy_is_the_one_the_operator_writes() {
    let operator: Value = serde_json::from_str(
        &shcr_operator::bucket::deny_insecure_transport_policy(BUCKET_A),
    )
    .expect("the operator's policy is JSON");
    assert_eq!(policy("bucket_a"), &operator);
}

#[test]
fn the_care_system_module_uses_the_operators_names_and_tags() {
    let main = fs::read_to_string(terraform_dir().join("modules/care-system/main.tf"))
        .expect("read care-system main.tf");
    let alias = shcr_operator::key::alias_name("NAME");
    let alias_prefix = alias.trim_end_matches("NAME");
    for (what, expected) in [
        (
            "care-system tag",
            format!(
                "tag_care_system       = \"{}\"",
                shcr_operator::cloud::TAG_CARE_SYSTEM
            ),
        ),
        (
            "managed-by tag",
            format!(
                "tag_managed_by        = \"{}\"",
                shcr_operator::cloud::TAG_MANAGED_BY
            ),
        ),
        (
            "managed-by value the operator adopts",
            format!(
                "(local.tag_managed_by)  = \"{}\"",
                shcr_operator::cloud::MANAGER
            ),
        ),
        (
            "store ServiceAccount",
            format!(
                "store_service_account = \"{}\"",
                shcr_operator::workload::STORE_NAME
            ),
        ),
        (
            "key alias",
            format!("kms_alias             = \"{alias_prefix}${{var.name}}\""),
        ),
    ] {
        assert!(
            main.contains(&expected),
            "{what}: `{expected}` not in care-system/main.tf"
        );
    }
    let spec: shcr_operator::CareSystemSpec = serde_json::from_value(serde_json::json!({
        "odsCode": "QWO",
        "displayName": "West Yorkshire",
        "storage": {"region": REGION, "bucketName": BUCKET_A},
        "encryption": {"kmsKeyArn": KEY_A},
        "deletionPolicy": "Retain",
    }))
    .expect("the fields care_system_spec outputs are CareSystem spec fields");
    assert_eq!(spec.storage.bucket_name.as_deref(), Some(BUCKET_A));
    let outputs = fs::read_to_string(terraform_dir().join("modules/care-system/outputs.tf"))
        .expect("read outputs.tf");
    for field in [
        "bucketName",
        "region",
        "kmsKeyArn",
        "deletionPolicy = \"Retain\"",
    ] {
        assert!(outputs.contains(field), "care_system_spec lacks {field}");
    }
}
