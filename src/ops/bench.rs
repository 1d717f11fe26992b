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
use crate::side::Side;
use crate::sync::{self, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Workload {
    /// Many small transactions: two inserts and one update each, from 4 clients.
    W1,
    /// One transaction inserting N rows, then one updating them all.
    W2,
    /// W1's transactions on both sides at once (2 clients each), on disjoint keys.
    W3,
    /// Rows with 100 KB TOASTed text, then updates of another column.
    W4,
    /// The initial copy: N rows in the table before replication is set up, none on the target,
    /// and one row written after. Native subscribes with `copy_data = true`, tandem runs with its
    /// initial snapshot; both are done once that last row has arrived.
    W5,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "w1" => Ok(Workload::W1),
            "w2" => Ok(Workload::W2),
            "w3" => Ok(Workload::W3),
            "w4" => Ok(Workload::W4),
            "w5" => Ok(Workload::W5),
            _ => Err(format!("unknown workload `{s}`; use w1, w2, w3, w4 or w5")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Contender {
    NativeText,
    NativeBinary,
    /// pglogical 2 (when its extension is installed), one subscription per direction.
    Pglogical,
    /// tandem configured for the workload's direction(s), as a native subscription is: one-way
    /// for W1/W2/W4, both ways for W3.
    Tandem,
    /// tandem with the table configured both ways for a one-way workload: the target's
    /// walsender then decodes every row tandem applies (PostgreSQL 15 has no origin filter in
    /// pgoutput), only for tandem to drop it as its own echo.
    TandemTwoWay,
    /// tandem both ways with conflict detection on (last_write_wins on `v`): one locking lookup
    /// per batch.
    TandemConflicts,
    /// tandem (as `Tandem`) publishing every event to the configured Kafka (`required = true`).
    TandemKafka,
}

const ALL: [Contender; 7] = [
    Contender::NativeText,
    Contender::NativeBinary,
    Contender::Pglogical,
    Contender::Tandem,
    Contender::TandemTwoWay,
    Contender::TandemConflicts,
    Contender::TandemKafka,
];

impl std::str::FromStr for Contender {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ALL.into_iter().find(|c| c.key() == s).ok_or_else(|| {
            let keys: Vec<&str> = ALL.iter().map(|c| c.key()).collect();
            format!("unknown contender `{s}`; use one of {}", keys.join(", "))
        })
    }
}

impl Contender {
    fn key(self) -> &'static str {
        match self {
            Contender::NativeText => "native",
            Contender::NativeBinary => "native-binary",
            Contender::Pglogical => "pglogical",
            Contender::Tandem => "tandem",
            Contender::TandemTwoWay => "tandem-two-way",
            Contender::TandemConflicts => "tandem-conflicts",
            Contender::TandemKafka => "tandem-kafka",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Contender::NativeText => "native",
            Contender::NativeBinary => "native (binary)",
            Contender::Pglogical => "pglogical",
            Contender::Tandem => "tandem",
            Contender::TandemTwoWay => "tandem two-way",
            Contender::TandemConflicts => "tandem+conflicts",
            Contender::TandemKafka => "tandem+kafka",
        }
    }

    fn is_tandem(self) -> bool {
        !self.is_native() && self != Contender::Pglogical
    }

    fn is_native(self) -> bool {
        matches!(self, Contender::NativeText | Contender::NativeBinary)
    }

    /// Native cannot replicate both ways on PostgreSQL 15 (no `origin = none`), and for W3
    /// "tandem two-way" is plain "tandem".
    /// W5 compares initial copies: native's table sync and tandem's snapshot (pglogical's
    /// copy starts when its subscription is created, before the rows exist here).
    fn runs(self, w: Workload) -> bool {
        match w {
            Workload::W3 => !(self.is_native() || self == Contender::TandemTwoWay),
            Workload::W5 => self.is_native() || self == Contender::Tandem,
            _ => true,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub workload: Workload,
    pub contender: Contender,
    pub repeat: u32,
    /// Row changes in the backlog (both sides' for W3).
    pub changes: u64,
    /// Until the target equals the source and the slot confirmed past the backlog.
    pub seconds: f64,
    /// Until the target equals the source (the slot may confirm a little later).
    pub applied_seconds: f64,
    pub rows_per_s: f64,
    /// CPU time of this process (tandem's threads, librdkafka's included) over the drain, per
    /// row change; tandem contenders only (the others run in the servers).
    pub cpu_us_per_change: Option<f64>,
    /// CPU time of the source's walsender over the drain, as a share of the drain's seconds
    /// (the busier one for W3): near 1, the walsender decoding and sending the backlog is what
    /// the drain waits on, whatever the contender does. `None` when it could not be read.
    pub walsender_busy: Option<f64>,
    /// CPU time of both servers' processes over the drain, per row change: decoding and
    /// sending on the source, applying on the target (native's and pglogical's apply workers
    /// run there, tandem's sessions too), WAL writing, checkpoints. With `cpu_us_per_change`,
    /// all a contender costs: on a machine with fewer cores than busy processes, what rows/s
    /// is made of. `None` when it could not be read.
    pub servers_us_per_change: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub workload: Workload,
    pub changes: u64,
    /// Best of native text and binary (0 for W3: native cannot).
    pub native_best_rows_per_s: f64,
    /// 0 when pglogical is not installed.
    pub pglogical_rows_per_s: f64,
    pub tandem_rows_per_s: f64,
    /// tandem ÷ best native; above 1 is faster.
    pub ratio_native: f64,
    /// tandem ÷ pglogical.
    pub ratio_pglogical: f64,
    pub tandem_two_way_rows_per_s: f64,
    /// tandem with conflict detection on.
    pub tandem_conflicts_rows_per_s: f64,
    /// tandem publishing to Kafka (0 when no broker is configured).
    pub tandem_kafka_rows_per_s: f64,
    /// The same contenders' rows/s averaged over their rounds (`--repeat`): on a noisy machine
    /// a ratio of means moves less than one of bests. Native's is the better of text's mean and
    /// binary's.
    pub native_mean_rows_per_s: f64,
    pub pglogical_mean_rows_per_s: f64,
    pub tandem_mean_rows_per_s: f64,
    pub tandem_kafka_mean_rows_per_s: f64,
}

/// Steady-state replication lag at a fixed rate (W1's transactions, 4 clients).
#[derive(Debug, Clone, Serialize)]
pub struct Lag {
    pub contender: Contender,
    /// Source transactions per second offered (half of native's best W1 drain rate).
    pub tps: f64,
    pub seconds: f64,
    /// Samples of the source's WAL position, each timed until the target's progress passed it.
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub measurements: Vec<Measurement>,
    pub summary: Vec<Summary>,
    pub lag: Vec<Lag>,
    /// Peak resident memory of this process (tandem ran in it), in MiB.
    pub peak_rss_mib: f64,
}

async fn connect(url: &str) -> Result<Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

const TABLE: &str = "CREATE TABLE bench (id bigint PRIMARY KEY, v int NOT NULL, note text);";

/// W1's transaction shape, for `n` transactions of client `c` (keys disjoint per client).
/// `gen_paced` offers them at `rate` transactions per second instead of as fast as possible.
const PROCEDURES: &str = "
CREATE PROCEDURE gen(c int, n int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..n LOOP
    INSERT INTO bench VALUES (c::bigint * 100000000 + i * 2, 0, 'first');
    INSERT INTO bench VALUES (c::bigint * 100000000 + i * 2 + 1, 0, 'second');
    UPDATE bench SET v = v + 1 WHERE id = c::bigint * 100000000 + i * 2;
    COMMIT;
  END LOOP;
END $$;
CREATE PROCEDURE gen_paced(c int, n int, rate float8) LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz := clock_timestamp();
  ahead float8;
BEGIN
  FOR i IN 1..n LOOP
    INSERT INTO bench VALUES (c::bigint * 100000000 + i * 2, 0, 'first');
    INSERT INTO bench VALUES (c::bigint * 100000000 + i * 2 + 1, 0, 'second');
    UPDATE bench SET v = v + 1 WHERE id = c::bigint * 100000000 + i * 2;
    COMMIT;
    ahead := i / rate - extract(epoch FROM clock_timestamp() - t0);
    IF ahead > 0.001 THEN
      PERFORM pg_sleep(ahead);
    END IF;
  END LOOP;
END $$;";

async fn run_clients(jobs: Vec<(String, i32, i64, Option<f64>)>) -> Result<()> {
    let mut tasks = Vec::new();
    for (url, c, n, rate) in jobs {
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            match rate {
                None => {
                    client
                        .execute("CALL gen($1, $2)", &[&c, &(n as i32)])
                        .await?
                }
                Some(r) => {
                    client
                        .execute("CALL gen_paced($1, $2, $3)", &[&c, &(n as i32), &r])
                        .await?
                }
            };
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn wal_position(c: &Client) -> Result<Lsn> {
    let s: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    Ok(s.parse()?)
}

/// One more small transaction closing the backlog; returns a WAL position inside it. A
/// contender has passed the backlog once it confirmed past that: the insert position after the
/// last commit may hold other records (running xacts, a checkpoint) that no replication confirms
/// before more transactions come.
async fn end_mark(c: &Client, id: i64) -> Result<Lsn> {
    let lsn = crate::db::last_row(
        c,
        &format!(
            "BEGIN; INSERT INTO bench VALUES ({id}, 0, 'end'); \
             SELECT pg_current_wal_insert_lsn()::text; COMMIT"
        ),
    )
    .await?
    .remove(0);
    Ok(lsn.parse()?)
}

/// W5's rows, written before replication is set up, as in a database that has been in use.
async fn existing_rows(d: &Client, scale: f64) -> Result<()> {
    let rows = ((2_000_000.0 * scale).round() as i64).max(1);
    d.execute(
        "INSERT INTO bench SELECT g, g % 1000, 'row ' || g FROM generate_series(1, $1::int8) g",
        &[&rows],
    )
    .await?;
    d.batch_execute("ANALYZE bench").await?;
    Ok(())
}

/// Generate the backlog; returns the number of row changes and, per source side written, a WAL
/// position inside its last transaction (the contender must confirm past it).
async fn generate(
    w: Workload,
    d: &Client,
    m: &Client,
    urls: (&str, &str),
    scale: f64,
) -> Result<(u64, Vec<(Side, Lsn)>)> {
    let n = |base: f64| ((base * scale).round() as i64).max(1);
    let changes = match w {
        Workload::W1 => {
            let per_client = n(25_000.0);
            run_clients(
                (0..4)
                    .map(|c| (urls.0.to_string(), c, per_client, None))
                    .collect(),
            )
            .await?;
            (4 * per_client * 3) as u64
        }
        Workload::W3 => {
            let per_client = n(25_000.0);
            run_clients(
                (0..4)
                    .map(|c| {
                        let url = if c < 2 { urls.0 } else { urls.1 };
                        (url.to_string(), c, per_client, None)
                    })
                    .collect(),
            )
            .await?;
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
        // The rows were there before replication was set up (`existing_rows`).
        Workload::W5 => d
            .query_one("SELECT count(*) FROM bench", &[])
            .await?
            .get::<_, i64>(0) as u64,
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
    let mut ends = vec![(Side::Desktop, end_mark(d, -1).await?)];
    if w == Workload::W3 {
        ends.push((Side::Mobile, end_mark(m, -2).await?));
    }
    Ok((changes, ends))
}

const DIGEST: &str = "SELECT count(*)::text || ':' || coalesce(sum(v), 0)::text || ':' || coalesce(sum(length(note)), 0)::text FROM bench";

fn parse_lsn(v: Option<String>) -> Option<Lsn> {
    v.and_then(|v| v.parse::<Lsn>().ok())
}

async fn progress_of(target: &Client, progress: &str) -> Result<Option<Lsn>> {
    Ok(target
        .query_opt(progress, &[])
        .await?
        .and_then(|r| parse_lsn(r.get(0))))
}

/// Wait until the source slot confirmed past `end` and the target equals the source. Returns
/// `(applied, drained)` seconds since `t`: when the target's own progress record (`progress`: an
/// SQL query for an LSN on the target) first passed `end` (the drain time if it never did), and
/// when the slot was confirmed past `end`.
///
/// Only cheap catalog queries are polled: comparing the tables is a full scan of both, which on a
/// small machine would steal the CPU the contender needs; it runs once at the end.
/// When a contender has drained a backlog: its slot confirmed past `end`, and for W5 the
/// target holds `rows` rows.
struct Drained {
    end: Lsn,
    rows: Option<i64>,
}

async fn wait_drained(
    source: &Client,
    target: &Client,
    (slot, progress): (&str, &str),
    Drained { end, rows }: Drained,
    limit: Duration,
    t: Instant,
    alive: &dyn Fn() -> bool,
) -> Result<(f64, f64)> {
    let deadline = Instant::now() + limit;
    let mut applied = None;
    loop {
        if !alive() {
            bail!("the contender stopped before it drained the backlog");
        }
        if applied.is_none()
            && progress_of(target, progress)
                .await?
                .is_some_and(|p| p >= end)
        {
            applied = Some(t.elapsed().as_secs_f64());
        }
        let confirmed = parse_lsn(
            source
                .query_one(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?
                .get(0),
        );
        if confirmed.is_some_and(|c| c >= end) {
            break;
        }
        if Instant::now() > deadline {
            bail!("slot {slot} not confirmed past {end} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // W5: a slot confirms past the end while the copy still runs (native's apply worker skips
    // a table that is not synchronised yet), so the copy is done when the target has every row.
    if rows.is_some() {
        // What the progress record said is beside the point: applied means the rows are there.
        applied = None;
    }
    while let Some(rows) = rows {
        let got: i64 = target
            .query_one("SELECT count(*) FROM bench", &[])
            .await?
            .get(0);
        if got == rows {
            break;
        }
        if !alive() || Instant::now() > deadline {
            bail!("the target has {got} of {rows} rows");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = t.elapsed().as_secs_f64();
    loop {
        // Both each time: with W3 the source still takes the other direction's changes.
        let want: String = source.query_one(DIGEST, &[]).await?.get(0);
        let got: String = target.query_one(DIGEST, &[]).await?.get(0);
        if got == want {
            return Ok((applied.unwrap_or(drained).min(drained), drained));
        }
        if Instant::now() > deadline {
            bail!("not equal within {limit:?} (target {got}, source {want})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn fresh_db(c: &LocalCluster, name: &str) -> Result<Client> {
    let admin = connect(&c.url("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let db = connect(&c.url(name)).await?;
    db.batch_execute(TABLE).await?;
    db.batch_execute(PROCEDURES).await?;
    Ok(db)
}

/// Free a measurement's space. Not `DROP DATABASE`: with pglogical preloaded it waits forever
/// for pglogical's supervisor to absorb a ProcSignalBarrier (it never does on PostgreSQL 15), so
/// each measurement gets a database of its own and the clusters go away at the end.
async fn drop_table(db: &Client) -> Result<()> {
    db.batch_execute("DROP TABLE IF EXISTS bench").await?;
    Ok(())
}

/// One contender's replication of one database pair, set up but paused until `resume`.
struct Pair {
    d: Client,
    m: Client,
    name: String,
    who: Contender,
    tandem: Option<(Arc<Config>, Option<TandemRun>)>,
    /// pglogical subscriptions by the side they read from, with their slot names.
    pglogical: Vec<(Side, String, String)>,
}

struct TandemRun {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// Every contender's replication connection goes without TLS: the clusters offer it, libpq's
/// default `sslmode=prefer` would take it, and encrypting costs the walsender — the bottleneck
/// of W1 and W2 — CPU that has nothing to do with how a contender applies.
fn dsn(c: &LocalCluster, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} dbname={db} user=postgres sslmode=disable",
        c.port
    )
}

impl Pair {
    async fn prepare(
        dc: &LocalCluster,
        mc: &LocalCluster,
        name: String,
        w: Workload,
        who: Contender,
        kafka: Option<&str>,
        scale: f64,
    ) -> Result<Pair> {
        let d = fresh_db(dc, &name).await?;
        let m = fresh_db(mc, &name).await?;
        if w == Workload::W5 {
            existing_rows(&d, scale).await?;
        }
        let two_way = w == Workload::W3
            || matches!(who, Contender::TandemTwoWay | Contender::TandemConflicts);
        let mut pair = Pair {
            d,
            m,
            name,
            who,
            tandem: None,
            pglogical: Vec::new(),
        };
        let name = pair.name.clone();
        match who {
            Contender::NativeText | Contender::NativeBinary => {
                pair.d
                    .batch_execute("CREATE PUBLICATION bench_pub FOR TABLE bench")
                    .await?;
                let binary = who == Contender::NativeBinary;
                pair.m.batch_execute(&format!(
                    "CREATE SUBSCRIPTION bench_sub CONNECTION '{}' \
                     PUBLICATION bench_pub WITH (copy_data = {copy}, enabled = false, binary = {binary}, slot_name = '{name}_native')",
                    dsn(dc, &name),
                    copy = w == Workload::W5
                ))
                .await?;
            }
            Contender::Pglogical => {
                for (c, cl, node) in [(&pair.d, dc, "d"), (&pair.m, mc, "m")] {
                    c.batch_execute(&format!(
                        "CREATE EXTENSION pglogical; \
                         SELECT pglogical.create_node(node_name := 'node_{node}', dsn := '{}'); \
                         SELECT pglogical.replication_set_add_table('default', 'public.bench');",
                        dsn(cl, &name)
                    ))
                    .await?;
                }
                let mut subs = vec![(Side::Desktop, "sub_d")];
                if two_way {
                    subs.push((Side::Mobile, "sub_m"));
                }
                for (source, sub) in subs {
                    let (provider, subscriber) = match source {
                        Side::Desktop => (dc, &pair.m),
                        Side::Mobile => (mc, &pair.d),
                    };
                    // forward_origins = '{}': what a subscription applied is not sent back.
                    subscriber
                        .batch_execute(&format!(
                            "SELECT pglogical.create_subscription(subscription_name := '{sub}', \
                             provider_dsn := '{}', replication_sets := '{{default}}', \
                             synchronize_structure := false, synchronize_data := false, \
                             forward_origins := '{{}}')",
                            dsn(provider, &name)
                        ))
                        .await?;
                    // The slot is made by the subscription's worker: wait for it before the
                    // backlog, then pause.
                    let slot = pglogical_replicating(subscriber, sub).await?;
                    subscriber
                        .execute(
                            "SELECT pglogical.alter_subscription_disable($1, true)",
                            &[&sub],
                        )
                        .await?;
                    pair.pglogical.push((source, sub.to_string(), slot));
                }
                for (source, _, slot) in &pair.pglogical {
                    wait_slot_inactive(pair.source(*source), slot).await?;
                }
            }
            _ => {
                let extra = match (who, kafka) {
                    (Contender::TandemConflicts, _) => {
                        "[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"v\"\n"
                            .to_string()
                    }
                    (Contender::TandemKafka, Some(brokers)) => {
                        let topic = format!("tandem.bench.{name}");
                        create_topic(brokers, &topic).await?;
                        format!(
                            "[kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\nrequired = true\n"
                        )
                    }
                    _ => String::new(),
                };
                let direction = if two_way {
                    ""
                } else {
                    "[replication.direction]\n\"public.bench\" = \"desktop_to_mobile\"\n"
                };
                let text = format!(
                    "[desktop]\nurl = \"{}?sslmode=disable\"\nslot = \"{name}_d\"\npublication = \"{name}_d\"\n\
                     [mobile]\nurl = \"{}?sslmode=disable\"\nslot = \"{name}_m\"\npublication = \"{name}_m\"\n\
                     [replication]\ntables = [\"public.bench\"]\ninitial_snapshot = {}\n{direction}{extra}",
                    dc.url(&name),
                    mc.url(&name),
                    w == Workload::W5
                );
                let cfg =
                    Arc::new(Config::parse(&text, |_| None).map_err(|e| anyhow::anyhow!(e.0))?);
                setup::setup(cfg.clone()).await?;
                pair.tandem = Some((cfg, None));
            }
        }
        Ok(pair)
    }

    /// False once an in-process tandem run ended (it only ends by itself on an error).
    fn alive(&self) -> bool {
        !matches!(&self.tandem, Some((_, Some(run))) if run.task.is_finished())
    }

    fn source(&self, side: Side) -> &Client {
        match side {
            Side::Desktop => &self.d,
            Side::Mobile => &self.m,
        }
    }

    /// The slot on `source` and an SQL query for the progress on its target.
    fn slot_and_progress(&self, source: Side) -> (String, String) {
        let name = &self.name;
        if self.who.is_native() {
            return (
                format!("{name}_native"),
                "SELECT remote_lsn::text FROM pg_replication_origin_status \
                 WHERE external_id LIKE 'pg\\_%' ORDER BY local_id DESC LIMIT 1"
                    .into(),
            );
        }
        if let Some((_, _, slot)) = self.pglogical.iter().find(|(s, _, _)| *s == source) {
            // pglogical names the subscription's replication origin after its slot.
            return (
                slot.clone(),
                format!(
                    "SELECT remote_lsn::text FROM pg_replication_origin_status WHERE external_id = '{slot}'"
                ),
            );
        }
        let suffix = match source {
            Side::Desktop => "d",
            Side::Mobile => "m",
        };
        (
            format!("{name}_{suffix}"),
            format!(
                "SELECT lsn::text FROM tandem.checkpoints WHERE direction = '{}'",
                source.direction_from()
            ),
        )
    }

    async fn resume(&mut self) -> Result<()> {
        if self.who.is_native() {
            self.m
                .batch_execute("ALTER SUBSCRIPTION bench_sub ENABLE")
                .await?;
        }
        for (source, sub, _) in &self.pglogical {
            let subscriber = self.source(source.other());
            subscriber
                .execute(
                    "SELECT pglogical.alter_subscription_enable($1, true)",
                    &[sub],
                )
                .await?;
        }
        if let Some((cfg, run)) = &mut self.tandem {
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(sync::run(cfg.clone(), rx, Arc::new(Status::default())));
            *run = Some(TandemRun { stop: tx, task });
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<()> {
        let name = &self.name;
        if self.who.is_native() {
            self.m.batch_execute("ALTER SUBSCRIPTION bench_sub DISABLE; ALTER SUBSCRIPTION bench_sub SET (slot_name = NONE); DROP SUBSCRIPTION bench_sub").await?;
            self.d
                .execute(
                    "SELECT pg_drop_replication_slot($1)",
                    &[&format!("{name}_native")],
                )
                .await?;
        }
        for (source, sub, _) in &self.pglogical {
            let subscriber = self.source(source.other());
            // Drops the provider's slot too.
            subscriber
                .execute("SELECT pglogical.drop_subscription($1)", &[sub])
                .await?;
        }
        if let Some((cfg, run)) = self.tandem.take() {
            if let Some(run) = run {
                let _ = run.stop.send(true);
                run.task.await??;
            }
            crate::ops::teardown::teardown(&cfg, true).await?;
        }
        if !self.pglogical.is_empty() {
            for (c, node) in [(&self.d, "node_d"), (&self.m, "node_m")] {
                c.execute("SELECT pglogical.drop_node($1)", &[&node])
                    .await?;
                c.batch_execute("DROP EXTENSION pglogical").await?;
            }
        }
        drop_table(&self.d).await?;
        drop_table(&self.m).await?;
        Ok(())
    }
}

/// Brokers need not create topics on first use (tansu does not).
async fn create_topic(brokers: &str, topic: &str) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => bail!("creating Kafka topic {t}: {e}"),
        }
    }
    Ok(())
}

/// Wait until a pglogical subscription replicates; returns its slot's name.
async fn pglogical_replicating(subscriber: &Client, sub: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = subscriber
            .query_opt(
                "SELECT status, slot_name FROM pglogical.show_subscription_status($1)",
                &[&sub],
            )
            .await?;
        if let Some(r) = row {
            if r.get::<_, String>(0) == "replicating" {
                return Ok(r.get(1));
            }
        }
        if Instant::now() > deadline {
            bail!("pglogical subscription {sub} not replicating after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_slot_inactive(source: &Client, slot: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active: Option<bool> = source
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .map(|r| r.get(0));
        match active {
            Some(false) => return Ok(()),
            None => bail!("slot {slot} does not exist"),
            Some(true) if Instant::now() > deadline => bail!("slot {slot} still active after 30 s"),
            Some(true) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
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
    let name = format!(
        "bench_{}_{}_{repeat}",
        format!("{w:?}").to_lowercase(),
        who.key().replace('-', "_")
    );
    let mut pair = Pair::prepare(dc, mc, name.clone(), w, who, kafka, scale).await?;
    let (changes, ends) =
        generate(w, &pair.d, &pair.m, (&dc.url(&name), &mc.url(&name)), scale).await?;
    let limit = Duration::from_secs(1800);
    // W5 is done when the target holds every row (see `wait_drained`): the rows and the end mark.
    let rows = (w == Workload::W5).then_some(changes as i64 + 1);
    let t = Instant::now();
    let cpu = process_cpu_seconds();
    let servers = || Some(dc.cpu_seconds()? + mc.cpu_seconds()?);
    let servers_before = servers();
    pair.resume().await?;
    let mut times = (0.0f64, 0.0f64);
    let mut walsender: Option<f64> = None;
    let mut result = Ok(());
    for (source, end) in ends {
        let (slot, progress) = pair.slot_and_progress(source);
        let target = pair.source(source.other());
        let alive = || pair.alive();

        match wait_drained(
            pair.source(source),
            target,
            (&slot, &progress),
            Drained { end, rows },
            limit,
            t,
            &alive,
        )
        .await
        {
            Ok((a, d)) => {
                times = (times.0.max(a), times.1.max(d));
                // The contender still streams (it stops in `finish`), so the slot's walsender
                // is the one that drained the backlog; it has idled since.
                if let Some(w) = walsender_cpu_seconds(pair.source(source), &slot).await {
                    let w = w / d;
                    walsender = Some(walsender.map_or(w, |b| b.max(w)));
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let cpu = process_cpu_seconds() - cpu;
    let servers = servers().zip(servers_before).map(|(a, b)| a - b);
    // A failed run's own error says more than "stopped before it drained".
    pair.finish().await?;
    result?;
    let (applied_seconds, seconds) = times;
    Ok(Measurement {
        workload: w,
        contender: who,
        repeat,
        changes,
        seconds,
        applied_seconds,
        rows_per_s: changes as f64 / seconds,
        cpu_us_per_change: who.is_tandem().then(|| cpu * 1e6 / changes as f64),
        walsender_busy: walsender,
        servers_us_per_change: servers.map(|s| s * 1e6 / changes as f64),
    })
}

/// Replication lag at a steady `tps` (W1's transactions from 4 clients for `secs`): the source's
/// WAL position is sampled every few milliseconds, and each sample is timed until the target's
/// progress record passed it.
async fn measure_lag(
    dc: &LocalCluster,
    mc: &LocalCluster,
    who: Contender,
    tps: f64,
    secs: f64,
) -> Result<Lag> {
    let name = format!("bench_lag_{}", who.key().replace('-', "_"));
    let mut pair = Pair::prepare(dc, mc, name.clone(), Workload::W1, who, None, 1.0).await?;
    pair.resume().await?;
    let (slot, progress) = pair.slot_and_progress(Side::Desktop);
    // Warm up: one transaction through, so the contender is streaming.
    let warm = end_mark(&pair.d, -1).await?;
    wait_drained(
        &pair.d,
        &pair.m,
        (&slot, &progress),
        Drained {
            end: warm,
            rows: None,
        },
        Duration::from_secs(60),
        Instant::now(),
        &|| pair.alive(),
    )
    .await?;
    let per_client = ((tps * secs) / 4.0).round().max(1.0) as i64;
    let load = {
        let url = dc.url(&name);
        tokio::spawn(run_clients(
            (0..4)
                .map(|c| (url.clone(), c, per_client, Some(tps / 4.0)))
                .collect(),
        ))
    };
    let t0 = Instant::now();
    let mut sent: Vec<(f64, Lsn)> = Vec::new();
    let mut seen: Vec<(f64, Lsn)> = Vec::new();
    let src = connect(&dc.url(&name)).await?;
    let tgt = connect(&mc.url(&name)).await?;
    let tick = Duration::from_millis(5);
    while !load.is_finished() {
        let (a, b) = tokio::join!(wal_position(&src), progress_of(&tgt, &progress));
        let now = t0.elapsed().as_secs_f64();
        sent.push((now, a?));
        if let Some(p) = b? {
            seen.push((now, p));
        }
        tokio::time::sleep(tick).await;
    }
    load.await??;
    let elapsed = t0.elapsed().as_secs_f64();
    let last = end_mark(&src, -2).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(p) = progress_of(&tgt, &progress).await? {
            seen.push((t0.elapsed().as_secs_f64(), p));
            if p >= last {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("{}: target did not catch up after the lag run", who.name());
        }
        tokio::time::sleep(tick).await;
    }
    pair.finish().await?;
    if std::env::var("TANDEM_BENCH_TRACE").is_ok() {
        for (i, (t, l)) in sent.iter().enumerate().step_by(25) {
            let s = seen
                .get(i)
                .map(|(t, l)| format!("{t:.3} {l}"))
                .unwrap_or_default();
            eprintln!("sent {t:.3} {l}   seen {s}");
        }
    }
    let mut lags: Vec<f64> = Vec::new();
    let mut j = 0;
    for (t, lsn) in &sent {
        while j < seen.len() && (seen[j].1 < *lsn || seen[j].0 < *t) {
            j += 1;
        }
        if j == seen.len() {
            break;
        }
        lags.push((seen[j].0 - t) * 1000.0);
    }
    lags.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(Lag {
        contender: who,
        tps,
        seconds: elapsed,
        samples: lags.len(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: lags.last().copied().unwrap_or(f64::NAN),
    })
}

fn pglogical_installed() -> bool {
    crate::localpg::bindir()
        .ok()
        .and_then(|b| b.parent().map(|p| p.join("lib/pglogical.so")))
        .is_some_and(|p| p.exists())
}

/// Both clusters, identical. The subscription launcher otherwise waits up to 5 s before starting
/// a newly enabled subscription's worker, which would be timed as native's drain.
fn bench_conf(pglogical: bool) -> String {
    let mut conf = "wal_retrieve_retry_interval = '100ms'\nmax_worker_processes = 32\n".to_string();
    if pglogical {
        conf.push_str("shared_preload_libraries = 'pglogical'\n");
    }
    conf
}

/// CPU time so far of the walsender serving `slot` (a local cluster's process: the bench runs
/// beside its servers), `None` when the slot is not active or the process cannot be read.
async fn walsender_cpu_seconds(source: &Client, slot: &str) -> Option<f64> {
    let pid: i32 = source
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()?
        .get::<_, Option<i32>>(0)?;
    crate::localpg::proc_times(pid as u32).map(|t| t.own)
}

/// User and system CPU time of this process so far, all threads.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

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

pub struct Options<'a> {
    pub workloads: &'a [Workload],
    /// Contenders to run (empty: all that are available).
    pub only: &'a [Contender],
    /// Brokers for the tandem+kafka contender.
    pub kafka: Option<&'a str>,
    pub repeat: u32,
    pub scale: f64,
    /// Seconds of steady load for the lag measurement (0: skip it). Needs W1 (its rate is half
    /// of native's best W1 drain rate).
    pub lag_seconds: f64,
}

pub async fn run(o: &Options<'_>, progress: impl Fn(&str)) -> Result<Report> {
    let pgl = pglogical_installed();
    if !pgl {
        progress("pglogical is not installed (Debian: postgresql-15-pglogical): not measured");
    }
    let conf = bench_conf(pgl);
    let (dc, mc) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((
            LocalCluster::start_with("bench-desktop", &conf)?,
            LocalCluster::start_with("bench-mobile", &conf)?,
        ))
    })
    .await??;
    let contenders: Vec<Contender> = ALL
        .into_iter()
        .filter(|c| o.only.is_empty() || o.only.contains(c))
        .filter(|c| *c != Contender::TandemKafka || o.kafka.is_some())
        .filter(|c| *c != Contender::Pglogical || pgl)
        .collect();
    let mut measurements = Vec::new();
    for &w in o.workloads {
        let these: Vec<Contender> = contenders.iter().copied().filter(|c| c.runs(w)).collect();
        for r in 0..o.repeat {
            // Rotate the order: the machine is noisy and the first run of a pair is often slower.
            for i in 0..these.len() {
                let who = these[(i + r as usize) % these.len()];
                let m = measure(&dc, &mc, w, who, r, o.scale, o.kafka).await?;
                progress(&format!(
                    "{:?} {}: {} changes in {:.2} s",
                    m.workload,
                    who.name(),
                    m.changes,
                    m.seconds
                ));
                measurements.push(m);
            }
        }
    }
    let summary = summarize(o.workloads, &measurements);
    let mut lag = Vec::new();
    let native_w1 = best(&measurements, Workload::W1, &|c| c.is_native());
    if o.lag_seconds > 0.0 && native_w1 > 0.0 {
        // W1 transactions carry 3 row changes.
        let tps = native_w1 / 3.0 / 2.0;
        for who in [
            Contender::NativeText,
            Contender::Pglogical,
            Contender::Tandem,
        ] {
            if !contenders.contains(&who) {
                continue;
            }
            let l = measure_lag(&dc, &mc, who, tps, o.lag_seconds).await?;
            progress(&format!(
                "lag {}: p50 {:.1} ms, p99 {:.1} ms at {:.0} tps",
                who.name(),
                l.p50_ms,
                l.p99_ms,
                l.tps
            ));
            lag.push(l);
        }
    } else if o.lag_seconds > 0.0 {
        progress(
            "lag not measured: it runs at half of native's W1 rate, so it needs W1 and native",
        );
    }
    Ok(Report {
        measurements,
        summary,
        lag,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// The best rows/s of `w`'s runs by a contender `f` picks; 0 when none ran.
fn best(ms: &[Measurement], w: Workload, f: &dyn Fn(Contender) -> bool) -> f64 {
    ms.iter()
        .filter(|m| m.workload == w && f(m.contender))
        .map(|m| m.rows_per_s)
        .fold(0.0, f64::max)
}

/// The best, over the contenders `f` picks, of each one's mean rows/s over its rounds of `w`.
fn best_mean(ms: &[Measurement], w: Workload, f: &dyn Fn(Contender) -> bool) -> f64 {
    let mut means: Vec<(Contender, f64, u32)> = Vec::new();
    for m in ms.iter().filter(|m| m.workload == w && f(m.contender)) {
        match means.iter_mut().find(|(c, ..)| *c == m.contender) {
            Some((_, sum, n)) => {
                *sum += m.rows_per_s;
                *n += 1;
            }
            None => means.push((m.contender, m.rows_per_s, 1)),
        }
    }
    means
        .iter()
        .map(|(_, sum, n)| sum / f64::from(*n))
        .fold(0.0, f64::max)
}

/// Each workload's figures per contender: bests, means over rounds, and tandem's ratios.
fn summarize(workloads: &[Workload], ms: &[Measurement]) -> Vec<Summary> {
    workloads
        .iter()
        .map(|&w| {
            let native = best(ms, w, &|c| c.is_native());
            let pglogical = best(ms, w, &|c| c == Contender::Pglogical);
            let tandem = best(ms, w, &|c| c == Contender::Tandem);
            Summary {
                workload: w,
                changes: ms.iter().find(|m| m.workload == w).map_or(0, |m| m.changes),
                native_best_rows_per_s: native,
                pglogical_rows_per_s: pglogical,
                tandem_rows_per_s: tandem,
                ratio_native: tandem / native,
                ratio_pglogical: tandem / pglogical,
                tandem_two_way_rows_per_s: best(ms, w, &|c| c == Contender::TandemTwoWay),
                tandem_conflicts_rows_per_s: best(ms, w, &|c| c == Contender::TandemConflicts),
                tandem_kafka_rows_per_s: best(ms, w, &|c| c == Contender::TandemKafka),
                native_mean_rows_per_s: best_mean(ms, w, &|c| c.is_native()),
                pglogical_mean_rows_per_s: best_mean(ms, w, &|c| c == Contender::Pglogical),
                tandem_mean_rows_per_s: best_mean(ms, w, &|c| c == Contender::Tandem),
                tandem_kafka_mean_rows_per_s: best_mean(ms, w, &|c| c == Contender::TandemKafka),
            }
        })
        .collect()
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn rate(v: f64) -> String {
    if v > 0.0 {
        format!("{v:.0}")
    } else {
        "-".into()
    }
}

/// One line of a summary table: the first cell left-aligned, the rest right-aligned, each in its
/// width (in characters, as `format!` counts them).
fn columns(cells: &[String], widths: &[usize]) -> String {
    let mut line = String::new();
    for (i, (c, &w)) in cells.iter().zip(widths).enumerate() {
        if i == 0 {
            line.push_str(&format!("{c:<w$}"));
        } else {
            line.push_str(&format!(" {c:>w$}"));
        }
    }
    line.push('\n');
    line
}

pub fn render(r: &Report) -> String {
    let mut out = format!(
        "{:<4} {:<16} {:>10} {:>9} {:>9} {:>12} {:>14} {:>14} {:>10}\n",
        "work",
        "contender",
        "changes",
        "applied",
        "drained",
        "rows/s",
        "tandem µs/row",
        "servers µs/row",
        "walsender"
    );
    let us = |v: Option<f64>| v.map_or("-".into(), |c| format!("{c:.2}"));
    for m in &r.measurements {
        out.push_str(&format!(
            "{:<4} {:<16} {:>10} {:>8.2}s {:>8.2}s {:>12.0} {:>14} {:>14} {:>10}\n",
            format!("{:?}", m.workload),
            m.contender.name(),
            m.changes,
            m.applied_seconds,
            m.seconds,
            m.rows_per_s,
            us(m.cpu_us_per_change),
            us(m.servers_us_per_change),
            m.walsender_busy
                .map_or("-".into(), |b| format!("{:.0}%", b * 100.0))
        ));
    }
    // Both tables open with the same columns: native, pglogical and tandem, and tandem's ratios.
    let header = |more: &[&str]| {
        ["work", "native", "pglogical", "tandem", "÷native", "÷pglog"]
            .iter()
            .chain(more)
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
    };
    let row = |w: Workload, native: f64, pglogical: f64, tandem: f64, more: &[f64]| {
        [
            format!("{w:?}"),
            rate(native),
            rate(pglogical),
            rate(tandem),
            ratio(tandem, native),
            ratio(tandem, pglogical),
        ]
        .into_iter()
        .chain(more.iter().map(|&v| rate(v)))
        .collect::<Vec<_>>()
    };
    let best_widths = [4, 10, 10, 10, 8, 8, 10, 10, 10];
    out.push_str("\nbest of each, rows/s:\n");
    out.push_str(&columns(
        &header(&["two-way", "conflicts", "kafka"]),
        &best_widths,
    ));
    for s in &r.summary {
        let more = [
            s.tandem_two_way_rows_per_s,
            s.tandem_conflicts_rows_per_s,
            s.tandem_kafka_rows_per_s,
        ];
        out.push_str(&columns(
            &row(
                s.workload,
                s.native_best_rows_per_s,
                s.pglogical_rows_per_s,
                s.tandem_rows_per_s,
                &more,
            ),
            &best_widths,
        ));
    }
    // Means only when a contender ran more than one round (rounds are numbered from 0).
    let repeated = r.measurements.iter().any(|m| m.repeat > 0);
    if repeated {
        let mean_widths = [4, 10, 10, 10, 8, 8, 10];
        out.push_str("\nmean of each over its rounds, rows/s:\n");
        out.push_str(&columns(&header(&["kafka"]), &mean_widths));
        for s in &r.summary {
            out.push_str(&columns(
                &row(
                    s.workload,
                    s.native_mean_rows_per_s,
                    s.pglogical_mean_rows_per_s,
                    s.tandem_mean_rows_per_s,
                    &[s.tandem_kafka_mean_rows_per_s],
                ),
                &mean_widths,
            ));
        }
    }
    for s in &r.summary {
        if s.tandem_kafka_rows_per_s > 0.0 && s.tandem_rows_per_s > 0.0 {
            out.push_str(&format!(
                "{:?}: with Kafka on, {:.0}% of tandem's throughput without (best to best{})\n",
                s.workload,
                100.0 * s.tandem_kafka_rows_per_s / s.tandem_rows_per_s,
                if repeated {
                    format!(
                        "; {:.0}% mean to mean",
                        100.0 * s.tandem_kafka_mean_rows_per_s / s.tandem_mean_rows_per_s
                    )
                } else {
                    String::new()
                }
            ));
        }
    }
    if !r.lag.is_empty() {
        out.push_str(&format!(
            "\nsteady-state lag at {:.0} transactions/s (half of native's best W1 rate):\n",
            r.lag[0].tps
        ));
        for l in &r.lag {
            out.push_str(&format!(
                "{:<16} p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms   ({} samples over {:.1} s)\n",
                l.contender.name(),
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                l.samples,
                l.seconds
            ));
        }
    }
    out.push_str(&format!(
        "peak RSS of the tandem process: {:.0} MiB\n",
        r.peak_rss_mib
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(workload: Workload, contender: Contender, repeat: u32, rows_per_s: f64) -> Measurement {
        Measurement {
            workload,
            contender,
            repeat,
            changes: 300,
            seconds: 1.0,
            applied_seconds: 1.0,
            rows_per_s,
            cpu_us_per_change: None,
            walsender_busy: None,
            servers_us_per_change: None,
        }
    }

    #[test]
    fn means_average_each_contenders_rounds_and_native_takes_its_better_mean() {
        use Contender::*;
        let w = Workload::W1;
        let ms = [
            run(w, NativeText, 0, 100.0),
            run(w, NativeBinary, 0, 90.0),
            run(w, Tandem, 0, 300.0),
            run(w, TandemKafka, 0, 240.0),
            run(w, NativeText, 1, 60.0),
            run(w, NativeBinary, 1, 86.0),
            run(w, Tandem, 1, 200.0),
            run(w, TandemKafka, 1, 210.0),
        ];
        let s = &summarize(&[w], &ms)[0];
        // Bests: text's 100 and tandem's 300.
        assert_eq!(s.native_best_rows_per_s, 100.0);
        assert_eq!(s.tandem_rows_per_s, 300.0);
        assert_eq!(s.ratio_native, 3.0);
        // Means: text 80, binary 88 (the better), tandem 250, with Kafka 225; no pglogical.
        assert_eq!(s.native_mean_rows_per_s, 88.0);
        assert_eq!(s.tandem_mean_rows_per_s, 250.0);
        assert_eq!(s.tandem_kafka_mean_rows_per_s, 225.0);
        assert_eq!(s.pglogical_mean_rows_per_s, 0.0);
        let r = Report {
            measurements: ms.to_vec(),
            summary: summarize(&[w], &ms),
            lag: Vec::new(),
            peak_rss_mib: 1.0,
        };
        let text = render(&r);
        assert!(text.contains("mean of each over its rounds"), "{text}");
        assert!(text.contains("2.84x"), "{text}");
        assert!(
            text.contains("W1: with Kafka on, 80% of tandem's throughput without (best to best; 90% mean to mean)"),
            "{text}"
        );
        // One round each: no means.
        let once = Report {
            measurements: ms[..4].to_vec(),
            summary: summarize(&[w], &ms[..4]),
            lag: Vec::new(),
            peak_rss_mib: 1.0,
        };
        let text = render(&once);
        assert!(!text.contains("mean"), "{text}");
    }
}
