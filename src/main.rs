//! The `tandem` command line: parse, load config, call into the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use tandem::config::Config;
use tandem::config::TableName;
use tandem::ops::{bench, demo, repair, setup, snapshot, teardown, verify};
use tandem::side::Side;
use tandem::source::stream::refuse_poolers;
use tandem::sync;

/// jemalloc, standing in for `malloc` itself (unprefixed), so librdkafka's C allocations use it
/// too. librdkafka frees each message and its headers on its delivery thread, not the thread that
/// allocated them; glibc's arenas made that cross-thread churn about a third of tandem's CPU with
/// Kafka on (measured in the README's performance section).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Log lines as text, or as one JSON object each (for log collectors). RUST_LOG filters them.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TANDEM_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate both sides, then create the control schema, publications, slots and checkpoints.
    Setup {
        /// Set REPLICA IDENTITY FULL on tables whose conflict policy needs old rows.
        #[arg(long)]
        replica_identity_full: bool,
        /// Make key sequences of two-way tables disjoint: `odd-even` (desktop odd, mobile even).
        #[arg(long, value_parser = ["odd-even"])]
        sequences: Option<String>,
        /// SIDE's database moved to another server (a new cluster): take over the checkpoint
        /// taken against the one it replaced, which setup otherwise refuses as another pair's.
        #[arg(long, value_name = "SIDE", value_parser = verify::parse_side)]
        replaced: Option<tandem::side::Side>,
    },
    /// Replicate both directions until SIGINT or SIGTERM.
    Run {
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9187), and
        /// http://ADDR/health: 200 while both directions stream, else 503.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Drop tandem's slots and publications (nothing keeps WAL afterwards).
    Teardown {
        /// Also drop the `tandem` control schema (checkpoints included).
        #[arg(long)]
        purge: bool,
    },
    /// Bring the other side in line with SEED for existing rows (merge; --mirror for an exact copy).
    Snapshot {
        /// Only this table (schema-qualified).
        #[arg(long)]
        table: Option<TableName>,
        /// The side whose rows win: desktop or mobile.
        #[arg(long, value_parser = verify::parse_side)]
        seed: tandem::side::Side,
        /// Make the target an exact copy (delete rows only the target has).
        #[arg(long)]
        mirror: bool,
    },
    /// Where each direction is, what the target refuses, paused tables and recorded conflicts.
    Status {
        /// Machine-readable output (the same report as JSON).
        #[arg(long)]
        json: bool,
    },
    /// Re-apply events from the Kafka audit topic to one side (idempotent).
    Replay {
        /// Read from the Kafka topic of [kafka] (the only source for now).
        #[arg(long, required = true)]
        from_kafka: bool,
        /// Topic (default: [kafka] topic).
        #[arg(long)]
        topic: Option<String>,
        /// The side to write to: desktop or mobile.
        #[arg(long, value_parser = verify::parse_side)]
        to: tandem::side::Side,
        /// Only changes made on this site: D or M.
        #[arg(long, value_parser = parse_site)]
        site: Option<tandem::side::Side>,
        /// Only this table (schema-qualified).
        #[arg(long)]
        table: Option<TableName>,
        /// Only changes committed at or after this source LSN (X/Y).
        #[arg(long, conflicts_with = "since")]
        since_lsn: Option<tandem::lsn::Lsn>,
        /// Only changes committed at or after this time (RFC 3339, UTC).
        #[arg(long)]
        since: Option<String>,
        /// Print what would be applied, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Read the Kafka audit topic.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Continue a table paused by the `error` conflict policy.
    Resolve {
        /// The paused table (schema-qualified).
        #[arg(long)]
        table: TableName,
        /// Whose version of the conflicting row ends on both sides, or skip the conflicting change.
        #[arg(long, value_name = "desktop|mobile|skip")]
        take: tandem::ops::resolve::Take,
    },
    /// Leave one source transaction out of the other side (one it rejects; `run` names it).
    Skip {
        /// The side the transaction was committed on: desktop or mobile.
        #[arg(long, value_parser = verify::parse_side)]
        from: tandem::side::Side,
        /// Its commit LSN, as `tandem run` printed it.
        #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
        lsn: Option<tandem::lsn::Lsn>,
        /// Withdraw the request instead.
        #[arg(long)]
        clear: bool,
    },
    /// Make a schema change on one side and have `run` make it on the other at the same point of
    /// the stream (after the changes before it, before those after it).
    Ddl {
        /// The side to run it on first: desktop or mobile.
        #[arg(long, value_parser = verify::parse_side)]
        on: tandem::side::Side,
        /// The statement(s), e.g. "ALTER TABLE public.jobs ADD COLUMN note text".
        sql: String,
    },
    /// Compare both sides by primary key. Exit 0: in sync; 1: differences; 2: error.
    Verify {
        /// Only this table (schema-qualified).
        #[arg(long)]
        table: Option<TableName>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make the other side equal to SOURCE for every difference verify finds.
    Repair {
        /// The side whose rows are right: desktop or mobile.
        #[arg(long, value_parser = verify::parse_side)]
        source: tandem::side::Side,
        /// Only this table (schema-qualified).
        #[arg(long)]
        table: Option<TableName>,
        /// Print what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Drain the same backlogs with native logical replication and with tandem; report rows/s.
    Bench {
        /// Workloads to run, comma-separated: w1, w2, w3, w4, w5.
        #[arg(long, value_delimiter = ',', default_value = "w1,w2,w3,w4,w5")]
        workload: Vec<bench::Workload>,
        /// Runs of each contender per workload (their order rotates).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Multiply backlog sizes (1.0 = 100k transactions for W1, 1M rows for W2, 1000 × 100 KB for W4, 2M rows for W5).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Contenders to run, comma-separated (default: all available): native, native-binary,
        /// pglogical, tandem, tandem-two-way, tandem-conflicts, tandem-kafka.
        #[arg(long, value_delimiter = ',')]
        only: Vec<bench::Contender>,
        /// Also run tandem publishing to this Kafka (host:port): the tandem-kafka contender.
        #[arg(long)]
        kafka_brokers: Option<String>,
        /// Seconds of steady load at half of native's best W1 rate, for replication lag p50/p99
        /// (0 skips it; needs W1).
        #[arg(long, default_value_t = 10.0)]
        lag_seconds: f64,
    },
    /// Two throwaway local clusters, a sample schema, and live sync on screen.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print events, one line each.
    Tail {
        /// Keep reading new events.
        #[arg(long)]
        follow: bool,
        /// Only this table (schema-qualified).
        #[arg(long)]
        table: Option<TableName>,
        /// Only changes made on this site: D or M.
        #[arg(long, value_parser = parse_site)]
        site: Option<tandem::side::Side>,
        /// Topic (default: [kafka] topic).
        #[arg(long)]
        topic: Option<String>,
    },
}

fn parse_site(s: &str) -> Result<tandem::side::Side, String> {
    match s {
        "D" | "d" | "desktop" => Ok(tandem::side::Side::Desktop),
        "M" | "m" | "mobile" => Ok(tandem::side::Side::Mobile),
        _ => Err(format!("`{s}`: use D or M")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: a journal, a file or a log collector
        // would keep the escape bytes (`NO_COLOR` switches them off there too).
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // The main thread too: `run` itself (bench's samplers, status loops) runs on it.
    tandem::sched::batch_this_thread();
    let rt = tandem::sched::runtime().expect("tokio runtime");
    // verify reserves 1 for "differences found"; its errors exit 2.
    let error_code = if matches!(cli.command, Command::Verify { .. }) {
        2
    } else {
        1
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(p) = e.downcast_ref::<setup::Problems>() {
                eprint!("error: {p}");
            } else if let Some(hint) = tandem::db::pooler_hint(&e) {
                eprintln!("error: {e:#}. {hint}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(error_code)
        }
    }
}

/// A watch that turns true on SIGINT or SIGTERM. A second signal exits at once (128 + its
/// number), as an impatient operator or a supervisor's escalation means: nothing is lost, the
/// slots were confirmed only to what the targets hold, and the server ends tandem's statements
/// in flight (`db::CONNECTION_CHECK`).
fn shutdown_signal() -> watch::Receiver<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!(
            "stopping: finishing the current group and checkpointing (a second signal exits at once)"
        );
        let _ = tx.send(true);
        let code = tokio::select! {
            _ = int.recv() => 128 + libc::SIGINT,
            _ = term.recv() => 128 + libc::SIGTERM,
        };
        eprintln!(
            "stopped at once by a second signal, without the final checkpoint: the next start \
             resumes from the last one, and nothing is lost"
        );
        std::process::exit(code);
    });
    rx
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Snapshot {
            table,
            seed,
            mirror,
        } => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            tandem::lease::refuse_while_running(&cfg, "snapshot").await?;
            refuse_poolers(&cfg, &Side::BOTH).await?;
            let mode = if mirror {
                snapshot::Mode::Mirror
            } else {
                snapshot::Mode::Merge
            };
            for o in snapshot::snapshot(cfg, table.as_ref(), seed, mode).await? {
                if o.skipped {
                    println!("{}: already done by the interrupted run, skipped", o.table);
                } else {
                    println!(
                        "{}: copied {} rows from {seed}: {} inserted, {} updated, {} deleted on {}; {} copied back to {seed}",
                        o.table, o.copied, o.inserted, o.updated, o.deleted, seed.other(), o.copied_back
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            workload,
            repeat,
            scale,
            json,
            only,
            kafka_brokers,
            lag_seconds,
        } => {
            let report = bench::run(
                &bench::Options {
                    workloads: &workload,
                    only: &only,
                    kafka: kafka_brokers.as_deref(),
                    repeat: repeat.max(1),
                    scale,
                    lag_seconds,
                },
                |line| {
                    if !json {
                        eprintln!("{line}");
                    }
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            from_kafka: _,
            topic,
            to,
            site,
            table,
            since_lsn,
            since,
            dry_run,
        } => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            if !dry_run {
                refuse_poolers(&cfg, &[to]).await?;
            }
            let filter = tandem::ops::replay::Filter {
                site,
                table,
                since_lsn,
                since,
            };
            let r = tandem::ops::replay::replay(cfg, to, topic.as_deref(), &filter, dry_run, |l| {
                println!("{l}")
            })
            .await?;
            println!(
                "{} events read, {} {}",
                r.read,
                r.applied,
                if dry_run {
                    "would be applied"
                } else {
                    "applied"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command:
                AuditCommand::Tail {
                    follow,
                    table,
                    site,
                    topic,
                },
        } => {
            let cfg = Config::load(&cli.config)?;
            let filter = tandem::ops::replay::Filter {
                site,
                table,
                ..Default::default()
            };
            tandem::ops::replay::tail(&cfg, topic.as_deref(), follow, &filter).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let cfg = Config::load(&cli.config)?;
            let (report, unreachable) = tandem::ops::status::status(&cfg).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            match unreachable {
                None => Ok(ExitCode::SUCCESS),
                Some(e) => Err(e),
            }
        }
        Command::Resolve { table, take } => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            refuse_poolers(&cfg, &Side::BOTH).await?;
            for line in tandem::ops::resolve::resolve(cfg, &table, take).await? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip {
            from,
            lsn,
            clear: _,
        } => {
            let cfg = Config::load(&cli.config)?;
            println!("{}", tandem::ops::skip::skip(&cfg, from, lsn).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ddl { on, sql } => {
            let cfg = Config::load(&cli.config)?;
            println!("{}", tandem::ops::ddl::ddl(&cfg, on, &sql).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { table, json } => {
            let cfg = Config::load(&cli.config)?;
            let report = verify::verify(&cfg, table.as_ref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", verify::render(&report));
            }
            let in_sync = report.tables.iter().all(|t| t.is_in_sync());
            Ok(if in_sync {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Repair {
            source,
            table,
            dry_run,
        } => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            if !dry_run {
                refuse_poolers(&cfg, &[source.other()]).await?;
            }
            let (up, del) = if dry_run {
                ("would upsert", "would delete")
            } else {
                ("upserted", "deleted")
            };
            for r in repair::repair(cfg, source, table.as_ref(), dry_run).await? {
                println!(
                    "{}: {up} {} rows, {del} {} rows on {}",
                    r.table,
                    r.upserted,
                    r.deleted,
                    source.other()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { duration } => {
            demo::run(
                duration.map(std::time::Duration::from_secs),
                shutdown_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Setup {
            replica_identity_full,
            sequences,
            replaced,
        } => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            let opts = setup::Options {
                replica_identity_full,
                sequences_odd_even: sequences.is_some(),
                replaced,
            };
            for line in setup::setup_with(cfg, opts).await? {
                println!("{line}");
            }
            println!("setup complete");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { metrics_addr } => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            let status = Arc::new(sync::Status::default());
            if let Some(addr) = metrics_addr {
                tandem::metrics::serve(addr, status.clone()).await?;
            }
            sync::run(cfg, shutdown_signal(), status).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown { purge } => {
            let cfg = Config::load(&cli.config)?;
            tandem::lease::refuse_while_running(&cfg, "teardown").await?;
            for line in teardown::teardown(&cfg, purge).await? {
                println!("{line}");
            }
            println!("teardown complete");
            Ok(ExitCode::SUCCESS)
        }
    }
}
