//! `shcr store`, `shcr import` and `shcr export` as processes, as an operator or a person at a
//! terminal meets them: exit statuses, one-line refusals naming the setting at fault, and the
//! import summary.

use std::path::Path;
use std::process::{Command, Output};

/// An Ed25519 SPKI public key (any will do: these tests never get as far as a request).
const GATEWAY_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----\n\
MCowBQYDK2VwAyEAislxuXifRNNjKZWuusjXstpNe1svOsdquo6pnubT9Pk=\n\
-----END PUBLIC KEY-----\n";

/// `shcr` with the given arguments, isolated from the caller's ShCR, AWS and OTLP settings.
fn shcr(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shcr"));
    command.args(args);
    for (variable, _) in std::env::vars() {
        if variable.starts_with("SHCR_") || variable.starts_with("AWS_") {
            command.env_remove(variable);
        }
    }
    command.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
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

/// The store's settings as the operator's ConfigMap sets them.
fn store_env<'a>(command: &'a mut Command, s3: &str, kms: &str) -> &'a mut Command {
    command
        .env("SHCR_STORE_CARE_SYSTEM", "north-east")
        .env("SHCR_STORE_ODS_CODE", "QHM")
        .env("SHCR_STORE_DISPLAY_NAME", "North East and North Cumbria")
        .env("SHCR_STORE_MEMBERS", "A81001,RTD")
        .env("SHCR_STORE_BUCKET", "shcr-no-such-bucket")
        .env("SHCR_STORE_REGION", "eu-west-2")
        .env(
            "SHCR_STORE_KMS_KEY_ARN",
            "arn:aws:kms:eu-west-2:111122223333:key/00000000-0000-0000-0000-000000000000",
        )
        .env("SHCR_STORE_LISTEN", "127.0.0.1:0")
        .env("SHCR_STORE_METRICS_LISTEN", "127.0.0.1:0")
        .env("SHCR_STORE_S3_ENDPOINT", s3)
        .env("SHCR_STORE_KMS_ENDPOINT", kms)
        .env("SHCR_STORE_ASSERTION_PUBLIC_KEY", GATEWAY_PUBLIC_KEY)
        .env("AWS_ACCESS_KEY_ID", "shcr-test-access-key")
        .env("AWS_SECRET_ACCESS_KEY", "shcr-test-secret-key")
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

#[test]
fn store_refuses_bad_settings_in_one_line_naming_the_variable() {
    let (code, _, stderr) = run(&mut shcr(&["store"]));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("SHCR_STORE_CARE_SYSTEM"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");

    let (code, _, stderr) = run(store_env(
        &mut shcr(&["store"]),
        "http://127.0.0.1:1",
        "http://127.0.0.1:1",
    )
    .env(
        "SHCR_STORE_ASSERTION_PUBLIC_KEY",
        "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----",
    ));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("SHCR_STORE_ASSERTION_PUBLIC_KEY"),
        "{stderr}"
    );
    assert!(stderr.contains("not usable"), "{stderr}");

    let (code, _, stderr) = run(store_env(
        &mut shcr(&["store", "--members", "A81001,not an ods code!"]),
        "http://127.0.0.1:1",
        "http://127.0.0.1:1",
    ));
    assert_eq!(
        code,
        Some(1),
        "a flag overrides the variable and is checked"
    );
    assert!(stderr.contains("SHCR_STORE_MEMBERS"), "{stderr}");
}

#[tokio::test]
async fn store_names_a_missing_bucket() -> anyhow::Result<()> {
    let s3 = shcr_testenv::s3().await?;
    let kms = shcr_testenv::kms().await?;
    // A care system without member organisations: the operator sets the variable empty.
    let (code, _, stderr) = run(
        store_env(&mut shcr(&["store"]), s3.endpoint(), kms.endpoint())
            .env("SHCR_STORE_MEMBERS", ""),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("bucket \"shcr-no-such-bucket\" does not exist"),
        "{stderr}"
    );
    Ok(())
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write test file");
}

#[test]
fn import_prints_a_summary_and_export_writes_what_was_imported() {
    let dir = tempfile_dir("import-cli");
    let data = dir.join("data");
    let data = data.to_str().expect("UTF-8 path");
    let records = dir.join("records.ndjson");
    write(
        &records,
        concat!(
            r#"{"resourceType":"Patient","id":"p1","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9990000018"}]}"#,
            "\n",
            r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"pulse"},"subject":{"reference":"Patient/p1"}}"#,
            "\n",
        ),
    );
    let records = records.to_str().expect("UTF-8 path");

    let (code, _, stderr) = run(&mut shcr(&[
        "import",
        "--care-system",
        "north-east",
        "--data-dir",
        data,
        records,
    ]));
    assert_eq!(code, Some(1), "an unknown care system is refused");
    assert!(stderr.contains("--create"), "{stderr}");

    let (code, stdout, stderr) = run(&mut shcr(&[
        "import",
        "--care-system",
        "north-east",
        "--data-dir",
        data,
        "--create",
        records,
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("2 created"), "{stdout}");

    // A second file with one bad line: exit 1 and the line named; the first file is skipped.
    let bad = dir.join("bad.ndjson");
    write(
        &bad,
        "{\"resourceType\":\"Patient\",\"id\":\"p2\",\"identifier\":[{\"system\":\"https://fhir.nhs.uk/Id/nhs-number\",\"value\":\"9990000019\"}]}\n",
    );
    let (code, stdout, _) = run(&mut shcr(&[
        "import",
        "--care-system",
        "north-east",
        "--data-dir",
        data,
        records,
        bad.to_str().expect("UTF-8 path"),
    ]));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("bad.ndjson:1"), "{stdout}");
    assert!(!stdout.contains("9990000019"), "no patient data: {stdout}");
    assert!(stdout.contains("1 file(s)"), "resumed: {stdout}");

    let (code, stdout, stderr) = run(&mut shcr(&[
        "export",
        "--care-system",
        "north-east",
        "--data-dir",
        data,
    ]));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains("\"id\":\"p1\""), "{stdout}");
    assert!(stderr.contains("exported 2 resource(s)"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}
