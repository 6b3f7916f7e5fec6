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
        Command::Store(args) => overrides = overrides.section("store", args.as_ref())?,
        Command::Gateway(args) => overrides = overrides.section("gateway", args)?,
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
        Command::Gateway(_) => {
            shcr_gateway::server::run(config.gateway, async {
                shutdown::signal().await;
            })
            .await
            .context("the gateway stopped")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd => {
            print!("{}", shcr_operator::crd::crd_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(args) => {
            let data_dir = args.data_dir.clone().unwrap_or(config.dev.data_dir);
            let issuer = shcr_gateway::auth::DevIssuer::load_or_create(&data_dir)
                .context("cannot load the dev token issuer")?;
            let token = issuer
                .issue(&args.request())
                .context("cannot mint the token")?;
            eprintln!(
                "dev token for care system {}, organisation {}, role {}, scopes {:?}, valid {}s",
                args.care_system,
                args.org,
                args.role,
                args.scope,
                args.ttl.as_secs()
            );
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Store(_) => {
            shcr_store::serve::run(
                config.store,
                async {
                    shutdown::signal().await;
                },
                |_, _| {},
            )
            .await
            .context("the record store stopped")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Import(args) => {
            let summary = shcr_store::import::run_import(args)
                .await
                .context("the import stopped")?;
            print!("{summary}");
            Ok(if summary.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Export(args) => {
            let summary = shcr_store::import::run_export(args)
                .await
                .context("the export stopped")?;
            eprintln!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
