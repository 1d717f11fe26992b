//! `tandem bench`: drain the same backlog with each contender, in one run, on two throwaway
//! clusters with identical settings, and report rows/s and tandem's ratio to each.
//!
//! Method, per workload and contender: fresh databases, the contender set up but paused, the
//! backlog generated on desktop, then the contender resumed and timed until the target's table
//! equals the source's and the source slot has confirmed past the backlog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Config;
use crate::localpg::LocalCluster;
use crate::lsn::Lsn;
use crate::ops::setup;
use crate::sync::{self, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Workload {
    /// Many small transactions: two inserts and one update each, from 4 clients.
    W1,
    /// One transaction inserting N rows, then one updating them all.
    W2,
    /// Rows with 100 KB TOASTed text, then updates of another column.
    W4,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "w1" => Ok(Workload::W1),
            "w2" => Ok(Workload::W2),
            "w4" => Ok(Workload::W4),
            _ => Err(format!("unknown workload `{s}`; use w1, w2 or w4")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Contender {
    NativeText,
    NativeBinary,
    Tandem,
    /// tandem with conflict detection on (last_write_wins on `v`): one locking lookup per batch.
    TandemConflicts,
    /// tandem publishing every event to the configured Kafka (`required = true`).
    TandemKafka,
}

impl std::str::FromStr for Contender {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Contender::NativeText),
            "native-binary" => Ok(Contender::NativeBinary),
            "tandem" => Ok(Contender::Tandem),
            "tandem-conflicts" => Ok(Contender::TandemConflicts),
            "tandem-kafka" => Ok(Contender::TandemKafka),
            _ => Err(format!(
                "unknown contender `{s}`; use native, native-binary, tandem or tandem-conflicts"
            )),
        }
    }
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::NativeText => "native",
            Contender::NativeBinary => "native (binary)",
            Contender::Tandem => "tandem",
            Contender::TandemConflicts => "tandem+conflicts",
            Contender::TandemKafka => "tandem+kafka",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub workload: Workload,
    pub contender: Contender,
    pub repeat: u32,
    /// Row changes in the backlog.
    pub changes: u64,
    /// Until the target equals the source and the slot confirmed past the backlog.
    pub seconds: f64,
    /// Until the target equals the source (the slot may confirm a little later).
    pub applied_seconds: f64,
    pub rows_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub workload: Workload,
    pub changes: u64,
    pub native_best_rows_per_s: f64,
    pub tandem_rows_per_s: f64,
    /// tandem ÷ best native; above 1 is faster.
    pub ratio: f64,
    /// tandem with conflict detection on.
    pub tandem_conflicts_rows_per_s: f64,
    /// tandem publishing to Kafka (0 when no broker is configured).
    pub tandem_kafka_rows_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub measurements: Vec<Measurement>,
    pub summary: Vec<Summary>,
    /// Peak resident memory of this process (tandem ran in it), in MiB.
    pub peak_rss_mib: f64,
}

async fn connect(url: &str) -> Result<Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

fn schema(w: Workload) -> &'static str {
    match w {
        Workload::W1 => {
            "CREATE TABLE bench (id bigint PRIMARY KEY, v int NOT NULL, note text);
            CREATE PROCEDURE gen(c int, n int) LANGUAGE plpgsql AS $$
            BEGIN
              FOR i IN 1..n LOOP
                INSERT INTO bench VALUES (c::bigint * 100000000 + i * 2, 0, 'first');
                INSERT INTO bench VALUES (c::bigint * 100000000 + i * 2 + 1, 0, 'second');
                UPDATE bench SET v = v + 1 WHERE id = c::bigint * 100000000 + i * 2;
                COMMIT;
              END LOOP;
            END $$;"
        }
        Workload::W2 => "CREATE TABLE bench (id bigint PRIMARY KEY, v int NOT NULL, note text);",
        Workload::W4 => "CREATE TABLE bench (id bigint PRIMARY KEY, v int NOT NULL, note text);",
    }
}

/// Generate the backlog on `d`; returns the number of row changes and a WAL position inside the
/// last transaction (every contender must confirm past it).
async fn generate(w: Workload, d: &Client, d_url: &str, scale: f64) -> Result<(u64, Lsn)> {
    let n = |base: f64| ((base * scale).round() as i64).max(1);
    let changes = match w {
        Workload::W1 => {
            let per_client = n(25_000.0);
            let mut tasks = Vec::new();
            for c in 0..4 {
                let url = d_url.to_string();
                tasks.push(tokio::spawn(async move {
                    let client = connect(&url).await?;
                    client
                        .execute("CALL gen($1, $2)", &[&c, &(per_client as i32)])
                        .await?;
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            (4 * per_client * 3) as u64
        }
        Workload::W2 => {
            let rows = n(1_000_000.0);
            d.execute(
                "INSERT INTO bench SELECT g, 0, 'row ' || g FROM generate_series(1, $1::int8) g",
                &[&rows],
            )
            .await?;
            d.batch_execute("UPDATE bench SET v = v + 1").await?;
            (rows * 2) as u64
        }
        Workload::W4 => {
            let rows = n(1_000.0);
            // 100 KB of hex that does not compress: stored out of line.
            d.execute(
                "INSERT INTO bench SELECT g, 0, (SELECT string_agg(md5(g::text || x::text), '') FROM generate_series(1, 3200) x) \
                 FROM generate_series(1, $1::int8) g",
                &[&rows],
            )
            .await?;
            d.batch_execute("UPDATE bench SET v = v + 1").await?;
            (rows * 2) as u64
        }
    };
    let end: String = d
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    Ok((changes, end.parse()?))
}

const DIGEST: &str = "SELECT count(*)::text || ':' || coalesce(sum(v), 0)::text || ':' || coalesce(sum(length(note)), 0)::text FROM bench";

/// Wait until the source slot confirmed past `end` and the target equals the source. Returns
/// `(applied, drained)` seconds since `t`: when the target's own progress record (`progress`: an
/// SQL query for an LSN on the target) first passed `end` (the drain time if it never did), and
/// when the slot was confirmed past `end`.
///
/// Only cheap catalog queries are polled: comparing the tables is a full scan of both, which on a
/// small machine would steal the CPU the contender needs; it runs once at the end.
async fn wait_drained(
    d: &Client,
    m: &Client,
    slot: &str,
    progress: &str,
    end: Lsn,
    limit: Duration,
    t: Instant,
) -> Result<(f64, f64)> {
    let deadline = Instant::now() + limit;
    let lsn = |v: Option<String>| v.and_then(|v| v.parse::<Lsn>().ok());
    let mut applied = None;
    loop {
        if applied.is_none() {
            let p = m
                .query_opt(progress, &[])
                .await?
                .and_then(|r| lsn(r.get(0)));
            if p.is_some_and(|p| p >= end) {
                applied = Some(t.elapsed().as_secs_f64());
            }
        }
        let confirmed = lsn(d
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .get(0));
        if confirmed.is_some_and(|c| c >= end) {
            break;
        }
        if Instant::now() > deadline {
            bail!("slot {slot} not confirmed past {end} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = t.elapsed().as_secs_f64();
    let want: String = d.query_one(DIGEST, &[]).await?.get(0);
    loop {
        let got: String = m.query_one(DIGEST, &[]).await?.get(0);
        if got == want {
            return Ok((applied.unwrap_or(drained).min(drained), drained));
        }
        if Instant::now() > deadline {
            bail!("not equal within {limit:?} (target {got}, source {want})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn fresh_db(c: &LocalCluster, name: &str, w: Workload) -> Result<Client> {
    let admin = connect(&c.url("postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let db = connect(&c.url(name)).await?;
    db.batch_execute(schema(w)).await?;
    Ok(db)
}

async fn measure(
    dc: &LocalCluster,
    mc: &LocalCluster,
    w: Workload,
    who: Contender,
    repeat: u32,
    scale: f64,
    kafka: Option<&str>,
) -> Result<Measurement> {
    let name = format!("bench_{}_{}", format!("{w:?}").to_lowercase(), repeat);
    let d = fresh_db(dc, &name, w).await?;
    let m = fresh_db(mc, &name, w).await?;
    let limit = Duration::from_secs(1800);
    let (changes, seconds, applied_seconds) = match who {
        Contender::NativeText | Contender::NativeBinary => {
            d.batch_execute("CREATE PUBLICATION bench_pub FOR TABLE bench")
                .await?;
            let binary = who == Contender::NativeBinary;
            m.batch_execute(&format!(
                "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port={} dbname={name} user=postgres' \
                 PUBLICATION bench_pub WITH (copy_data = false, enabled = false, binary = {binary}, slot_name = '{name}_native')",
                dc.port
            ))
            .await?;
            let (changes, end) = generate(w, &d, &dc.url(&name), scale).await?;
            let t = Instant::now();
            m.batch_execute("ALTER SUBSCRIPTION bench_sub ENABLE")
                .await?;
            let (applied, secs) = wait_drained(
                &d,
                &m,
                &format!("{name}_native"),
                "SELECT remote_lsn::text FROM pg_replication_origin_status ORDER BY local_id DESC LIMIT 1",
                end,
                limit,
                t,
            )
            .await?;
            m.batch_execute("ALTER SUBSCRIPTION bench_sub DISABLE; ALTER SUBSCRIPTION bench_sub SET (slot_name = NONE); DROP SUBSCRIPTION bench_sub").await?;
            d.execute(
                "SELECT pg_drop_replication_slot($1)",
                &[&format!("{name}_native")],
            )
            .await?;
            (changes, secs, applied)
        }
        Contender::Tandem | Contender::TandemConflicts | Contender::TandemKafka => {
            let conflicts = match (who, kafka) {
                (Contender::TandemConflicts, _) => {
                    "[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"v\"\n".to_string()
                }
                (Contender::TandemKafka, Some(brokers)) => format!(
                    "[kafka]\nbrokers = \"{brokers}\"\ntopic = \"tandem.bench.{name}\"\nrequired = true\n"
                ),
                _ => String::new(),
            };
            let text = format!(
                "[desktop]\nurl = \"{}\"\nslot = \"{name}_d\"\npublication = \"{name}_d\"\n\
                 [mobile]\nurl = \"{}\"\nslot = \"{name}_m\"\npublication = \"{name}_m\"\n\
                 [replication]\ntables = [\"public.bench\"]\ninitial_snapshot = false\n{conflicts}",
                dc.url(&name),
                mc.url(&name)
            );
            let cfg = Arc::new(Config::parse(&text, |_| None).map_err(|e| anyhow::anyhow!(e.0))?);
            setup::setup(cfg.clone()).await?;
            let (changes, end) = generate(w, &d, &dc.url(&name), scale).await?;
            let (tx, rx) = watch::channel(false);
            let t = Instant::now();
            let task = tokio::spawn(sync::run(cfg.clone(), rx, Arc::new(Status::default())));
            let drained = wait_drained(
                &d,
                &m,
                &format!("{name}_d"),
                "SELECT lsn::text FROM tandem.checkpoints WHERE direction = 'D>M'",
                end,
                limit,
                t,
            )
            .await;
            let _ = tx.send(true);
            task.await??;
            let (applied, secs) = drained?;
            crate::ops::teardown::teardown(&cfg, true).await?;
            (changes, secs, applied)
        }
    };
    drop((d, m));
    let admin = connect(&dc.url("postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    let admin = connect(&mc.url("postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    Ok(Measurement {
        workload: w,
        contender: who,
        repeat,
        changes,
        seconds,
        applied_seconds,
        rows_per_s: changes as f64 / seconds,
    })
}

/// Both clusters, identical. The subscription launcher otherwise waits up to 5 s before starting
/// a newly enabled subscription's worker, which would be timed as native's drain.
const BENCH_CONF: &str = "wal_retrieve_retry_interval = '100ms'\n";

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// `kafka`: brokers for the tandem+kafka contender (from `[kafka]` of the config, when present).
pub async fn run(
    workloads: &[Workload],
    only: &[Contender],
    kafka: Option<&str>,
    repeat: u32,
    scale: f64,
    progress: impl Fn(&Measurement),
) -> Result<Report> {
    let (dc, mc) = tokio::task::spawn_blocking(|| -> Result<_> {
        Ok((
            LocalCluster::start_with("bench-desktop", BENCH_CONF)?,
            LocalCluster::start_with("bench-mobile", BENCH_CONF)?,
        ))
    })
    .await??;
    let contenders: Vec<Contender> = [
        Contender::NativeText,
        Contender::NativeBinary,
        Contender::Tandem,
        Contender::TandemConflicts,
        Contender::TandemKafka,
    ]
    .into_iter()
    .filter(|c| only.is_empty() || only.contains(c))
    .filter(|c| *c != Contender::TandemKafka || kafka.is_some())
    .collect();
    let mut measurements = Vec::new();
    for &w in workloads {
        for r in 0..repeat {
            // Rotate the order: the machine is noisy and the first run of a pair is often slower.
            for i in 0..contenders.len() {
                let who = contenders[(i + r as usize) % contenders.len()];
                let m = measure(&dc, &mc, w, who, r, scale, kafka).await?;
                progress(&m);
                measurements.push(m);
            }
        }
    }
    let summary = workloads
        .iter()
        .map(|&w| {
            let best = |f: &dyn Fn(Contender) -> bool| {
                measurements
                    .iter()
                    .filter(|m| m.workload == w && f(m.contender))
                    .map(|m| m.rows_per_s)
                    .fold(0.0, f64::max)
            };
            let native = best(&|c| matches!(c, Contender::NativeText | Contender::NativeBinary));
            let tandem = best(&|c| c == Contender::Tandem);
            let with_conflicts = best(&|c| c == Contender::TandemConflicts);
            let with_kafka = best(&|c| c == Contender::TandemKafka);
            let changes = measurements
                .iter()
                .find(|m| m.workload == w)
                .map_or(0, |m| m.changes);
            Summary {
                workload: w,
                changes,
                native_best_rows_per_s: native,
                tandem_rows_per_s: tandem,
                ratio: tandem / native,
                tandem_conflicts_rows_per_s: with_conflicts,
                tandem_kafka_rows_per_s: with_kafka,
            }
        })
        .collect();
    Ok(Report {
        measurements,
        summary,
        peak_rss_mib: peak_rss_mib(),
    })
}

pub fn render(r: &Report) -> String {
    let mut out = format!(
        "{:<4} {:<16} {:>10} {:>9} {:>9} {:>12}\n",
        "work", "contender", "changes", "applied", "drained", "rows/s"
    );
    for m in &r.measurements {
        out.push_str(&format!(
            "{:<4} {:<16} {:>10} {:>8.2}s {:>8.2}s {:>12.0}\n",
            format!("{:?}", m.workload),
            m.contender.name(),
            m.changes,
            m.applied_seconds,
            m.seconds,
            m.rows_per_s
        ));
    }
    out.push_str("\nbest of each (rows/s):\n");
    for s in &r.summary {
        out.push_str(&format!(
            "{:<4} native {:>10.0}   tandem {:>10.0}   tandem/native {:.2}x   with conflict detection {:>10.0} ({:.2}x)\n",
            format!("{:?}", s.workload),
            s.native_best_rows_per_s,
            s.tandem_rows_per_s,
            s.ratio,
            s.tandem_conflicts_rows_per_s,
            s.tandem_conflicts_rows_per_s / s.native_best_rows_per_s
        ));
        if s.tandem_kafka_rows_per_s > 0.0 {
            out.push_str(&format!(
                "     with Kafka on {:>10.0}: {:.0}% of tandem without\n",
                s.tandem_kafka_rows_per_s,
                100.0 * s.tandem_kafka_rows_per_s / s.tandem_rows_per_s
            ));
        }
    }
    out.push_str(&format!(
        "peak RSS of the tandem process: {:.0} MiB\n",
        r.peak_rss_mib
    ));
    out
}
