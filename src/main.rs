//! The `tandem` command line: parse, load config, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use tandem::config::Config;
use tandem::ops::{demo, setup, teardown};
use tandem::sync;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Two-way PostgreSQL sync over logical replication"
)]
struct Cli {
    /// Config file (TOML). TANDEM_DESKTOP_URL / TANDEM_MOBILE_URL override its URLs.
    #[arg(long, global = true, default_value = "tandem.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate both sides, then create the control schema, publications, slots and checkpoints.
    Setup,
    /// Replicate both directions until SIGINT or SIGTERM.
    Run,
    /// Drop tandem's slots and publications (nothing keeps WAL afterwards).
    Teardown {
        /// Also drop the `tandem` control schema (checkpoints included).
        #[arg(long)]
        purge: bool,
    },
    /// Two throwaway local clusters, a sample schema, and live sync on screen.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(p) = e.downcast_ref::<setup::Problems>() {
                eprint!("error: {p}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A watch that turns true on SIGINT or SIGTERM.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: finishing the current group and checkpointing");
        let _ = tx.send(true);
    });
    rx
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo { duration } => {
            demo::run(
                duration.map(std::time::Duration::from_secs),
                shutdown_signal(),
            )
            .await
        }
        Command::Setup => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            for line in setup::setup(cfg).await? {
                println!("{line}");
            }
            println!("setup complete");
            Ok(())
        }
        Command::Run => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            sync::run(cfg, shutdown_signal(), Arc::default()).await
        }
        Command::Teardown { purge } => {
            let cfg = Config::load(&cli.config)?;
            for line in teardown::teardown(&cfg, purge).await? {
                println!("{line}");
            }
            println!("teardown complete");
            Ok(())
        }
    }
}
