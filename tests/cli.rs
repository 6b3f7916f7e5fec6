//! The `shcr` command line as a user meets it: help text, flag errors, configuration errors.

use std::path::PathBuf;
use std::process::{Command, Output};

const SUBCOMMANDS: &[&str] = &[
    "operator", "gateway", "store", "dev", "token", "import", "export", "crd",
];

/// `shcr` with the given arguments, isolated from the caller's ShCR and OTLP settings.
fn shcr(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shcr"));
    command.args(args);
    for variable in [
        "SHCR_CONFIG",
        "SHCR_LOG_FORMAT",
        "SHCR_LOG_LEVEL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        command.env_remove(variable);
    }
    command
}

fn run(command: &mut Command) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("shcr runs");
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn config_file(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, text).expect("write config file");
    path
}

#[test]
fn help_lists_every_subcommand() {
    let (code, stdout, _) = run(&mut shcr(&["--help"]));
    assert_eq!(code, Some(0));
    for subcommand in SUBCOMMANDS {
        assert!(
            stdout
                .lines()
                .any(|line| line.trim_start().starts_with(&format!("{subcommand} "))),
            "`{subcommand}` missing from --help:\n{stdout}"
        );
    }
    for flag in ["--config", "--log-format", "--log-level", "--otlp-endpoint"] {
        assert!(
            stdout.contains(flag),
            "`{flag}` missing from --help:\n{stdout}"
        );
    }
}

#[test]
fn every_subcommand_help_has_an_example() {
    for subcommand in SUBCOMMANDS {
        let (code, stdout, _) = run(&mut shcr(&[subcommand, "--help"]));
        assert_eq!(code, Some(0));
        assert!(
            stdout.contains(&format!("shcr {subcommand}")) && stdout.contains("Example"),
            "`shcr {subcommand} --help` shows no example:\n{stdout}"
        );
    }
}

#[test]
fn a_bad_log_format_is_explained() {
    let (code, _, stderr) = run(&mut shcr(&["--log-format", "nonsense", "store"]));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("nonsense"), "{stderr}");
    assert!(stderr.contains("--log-format"), "{stderr}");
    assert!(
        stderr.contains("human") && stderr.contains("json"),
        "{stderr}"
    );
}

#[test]
fn a_flag_beats_its_environment_variable() {
    let (_, _, stderr) = run(shcr(&["store"]).env("SHCR_LOG_FORMAT", "nonsense"));
    assert!(
        stderr.contains("nonsense"),
        "the variable is read:\n{stderr}"
    );

    let (code, _, stderr) = run(shcr(&["--log-format", "human", "store"])
        .env("SHCR_LOG_FORMAT", "json")
        .env("SHCR_LOG_LEVEL", "debug"));
    // `shcr store` then refuses to start: no care system is configured.
    assert_eq!(code, Some(1));
    let line = stderr
        .lines()
        .find(|line| line.contains("configuration loaded"))
        .unwrap_or_else(|| panic!("SHCR_LOG_LEVEL applies:\n{stderr}"));
    assert!(!line.starts_with('{'), "the flag wins: {line}");
}

#[test]
fn crd_prints_the_checked_in_crd() {
    let (code, stdout, stderr) = run(&mut shcr(&["crd"]));
    assert_eq!(code, Some(0), "{stderr}");
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/caresystem.yaml"))
            .expect("crds/caresystem.yaml exists");
    assert!(
        stdout == checked_in,
        "crds/caresystem.yaml differs from `shcr crd`; regenerate it with \
         `cargo run -- crd > crds/caresystem.yaml`"
    );
}

#[test]
fn a_config_file_error_names_the_file_and_key() {
    let path = config_file("cli-unknown-key.yaml", "telemetry:\n  log_levle: debug\n");
    let (code, _, stderr) = run(&mut shcr(&[
        "--config",
        path.to_str().expect("UTF-8 path"),
        "store",
    ]));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("log_levle"), "{stderr}");
    assert!(stderr.contains("cli-unknown-key.yaml"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
}

#[test]
fn the_config_file_is_read_and_environment_and_flags_override_it() {
    let path = config_file(
        "cli-debug-json.yaml",
        "telemetry:\n  log_level: debug\n  log_format: json\n",
    );
    let path = path.to_str().expect("UTF-8 path");
    let loaded_line = |stderr: &str| {
        stderr
            .lines()
            .find(|line| line.contains("configuration loaded"))
            .map(str::to_owned)
    };

    let (_, _, stderr) = run(&mut shcr(&["--config", path, "store"]));
    let line = loaded_line(&stderr).expect("the file's debug level applies");
    assert!(
        line.starts_with('{'),
        "the file's JSON format applies: {line}"
    );

    let (_, _, stderr) = run(shcr(&["--config", path, "store"]).env("SHCR_LOG_LEVEL", "info"));
    assert_eq!(
        loaded_line(&stderr),
        None,
        "the environment beats the file:\n{stderr}"
    );

    let (_, _, stderr) = run(&mut shcr(&[
        "--config",
        path,
        "--log-format",
        "human",
        "store",
    ]));
    let line = loaded_line(&stderr).expect("debug level still from the file");
    assert!(!line.starts_with('{'), "the flag beats the file: {line}");
}

#[test]
fn a_bad_log_level_flag_is_explained() {
    let (code, _, stderr) = run(&mut shcr(&["--log-level", "info,[[", "store"]));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("info,[["), "{stderr}");
    assert!(stderr.contains("RUST_LOG"), "{stderr}");
}
