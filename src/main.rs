//! `shcr`: the one ShCR binary. CLI dispatch only — parse the command line, load the layered
//! configuration, start telemetry, run the chosen component, and turn any error into one line on
//! stderr and a non-zero exit status.

mod cli;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use cli::{Cli, Command, ShcrConfig};
use shcr_runtime::config::{self, Overrides};
use shcr_runtime::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("shcr: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = Overrides::new().section("telemetry", &cli.telemetry)?;
    let config: ShcrConfig =
        config::load(cli.config.as_deref(), &overrides).context("cannot load the configuration")?;
    let telemetry = telemetry::init(&config.telemetry).context("cannot start telemetry")?;
    tracing::debug!(
        config_file = cli.config.as_ref().map(|path| path.display().to_string()),
        "configuration loaded"
    );

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let outcome = runtime.block_on(dispatch(cli.command));
    // Stop the runtime before flushing traces: the flush blocks, which async code must not do.
    drop(runtime);
    telemetry
        .shutdown()
        .context("cannot flush traces at exit")?;
    outcome
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    Ok(not_built_yet(command))
}

/// Scaffolding until the component crates provide their `run` functions: names the issue that
/// tracks each subcommand and exits with status 2.
fn not_built_yet(command: Command) -> ExitCode {
    let (name, issue) = match command {
        Command::Operator => ("operator", 6),
        Command::Crd => ("crd", 6),
        Command::Gateway => ("gateway", 5),
        Command::Dev => ("dev", 5),
        Command::Token => ("token", 5),
        Command::Store => ("store", 4),
        Command::Import => ("import", 4),
        Command::Export => ("export", 4),
    };
    eprintln!("`shcr {name}` is not built yet in this version (see issue {issue})");
    ExitCode::from(2)
}
