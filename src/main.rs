//! `shcr`: the one ShCR binary. CLI dispatch only — parse the command line, load the layered
//! configuration, start telemetry, run the chosen component, and turn any error into one line on
//! stderr and a non-zero exit status.

mod cli;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use cli::{Cli, Command, ShcrConfig};
use shcr_runtime::config::{self, Overrides};
use shcr_runtime::{shutdown, telemetry};

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
    let mut overrides = Overrides::new().section("telemetry", &cli.telemetry)?;
    match &cli.command {
        Command::Operator(args) => overrides = overrides.section("operator", args)?,
        Command::Dev(args) => overrides = overrides.section("dev", args)?,
        _ => {}
    }
    let config: ShcrConfig =
        config::load(cli.config.as_deref(), &overrides).context("cannot load the configuration")?;
    let telemetry = telemetry::init(&config.telemetry).context("cannot start telemetry")?;
    tracing::debug!(
        config_file = cli.config.as_ref().map(|path| path.display().to_string()),
        "configuration loaded"
    );

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let outcome = runtime.block_on(dispatch(cli.command, config));
    // Stop the runtime before flushing traces: the flush blocks, which async code must not do.
    drop(runtime);
    telemetry
        .shutdown()
        .context("cannot flush traces at exit")?;
    outcome
}

async fn dispatch(command: Command, config: ShcrConfig) -> anyhow::Result<ExitCode> {
    match command {
        Command::Operator(_) => {
            shcr_operator::run(config.operator, async {
                shutdown::signal().await;
            })
            .await
            .context("the operator stopped")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(_) => {
            shcr_gateway::dev::run(config.dev, async {
                shutdown::signal().await;
            })
            .await
            .context("shcr dev stopped")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd => {
            print!("{}", shcr_operator::crd::crd_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway => Ok(not_built_yet("gateway", 5)),
        Command::Token => Ok(not_built_yet("token", 5)),
        Command::Store => Ok(not_built_yet("store", 4)),
        Command::Import => Ok(not_built_yet("import", 4)),
        Command::Export => Ok(not_built_yet("export", 4)),
    }
}

/// Scaffolding until the component crates provide their `run` functions: names the issue that
/// tracks each subcommand and exits with status 2.
fn not_built_yet(name: &str, issue: u32) -> ExitCode {
    eprintln!("`shcr {name}` is not built yet in this version (see issue {issue})");
    ExitCode::from(2)
}
