//! Shared test harness: one pair of real PostgreSQL clusters per test binary, one database pair
//! per test, and helpers that make a scenario's setup one line.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tandem::config::Config;
use tandem::localpg::LocalCluster;
use tandem::ops::setup;
use tandem::sync::{self, Status};
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

pub struct Pair {
    pub desktop: LocalCluster,
    pub mobile: LocalCluster,
}

/// tandem's log in the tests' captured output, shown for a failing test only: `tandem=info`, or
/// what `RUST_LOG` says. (The libtest capture follows the threads a test's runtime spawns.)
fn logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tandem=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A directory of this test binary's own for the files its tests write (configs, spools), removed
/// once the binary's process is gone, however it ended, as the clusters are.
pub fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tandem-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; rm -rf '{}'",
                std::process::id(),
                dir.display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        dir
    })
}

/// tandem's apply sessions for streamed transactions on this database (a connection's count).
pub const STREAMED_SESSIONS: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
     AND application_name LIKE 'tandem apply % streamed %'";

/// The binary's shared clusters, started on first use.
pub fn clusters() -> &'static Pair {
    logs();
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        let (d, m) = std::thread::scope(|s| {
            // Commit timestamps on, for last_write_wins without a version column. Every test
            // keeps its slots to the end: more than the 64 a throwaway cluster has.
            let conf = "track_commit_timestamp = on\nmax_replication_slots = 256";
            let d = s.spawn(|| {
                LocalCluster::start_with("test-desktop", conf).expect("start desktop cluster")
            });
            let m = s.spawn(|| {
                LocalCluster::start_with("test-mobile", conf).expect("start mobile cluster")
            });
            (d.join().unwrap(), m.join().unwrap())
        });
        Pair {
            desktop: d,
            mobile: m,
        }
    })
}

pub async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    c.batch_execute("SET extra_float_digits = 3").await.unwrap();
    c
}

/// Poll `cond` until it holds; panic with `what` after `secs` seconds.
pub async fn wait_for<F, Fut>(secs: u64, what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_explained(secs, what, cond, || async { String::new() }).await
}

/// [`wait_for`], with what `explain` finds at the timeout appended to the panic: the state a
/// rare failure should leave behind to be understood.
pub async fn wait_for_explained<F, Fut, E, EFut>(secs: u64, what: &str, mut cond: F, explain: E)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
    E: FnOnce() -> EFut,
    EFut: Future<Output = String>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        if Instant::now() > deadline {
            let why = explain().await;
            panic!("timed out after {secs} s waiting for: {what}{why}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll the count `sql` returns on `c` until it is `want`; panic with the query and its last
/// count after `secs` seconds.
pub async fn wait_count(secs: u64, c: &Client, sql: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = Fixture::count(c, sql).await;
        if got == want {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for {sql} to give {want}; it gave {got}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One test's pair of databases (same name on both clusters), its config and connections.
pub struct Fixture {
    pub name: String,
    pub cfg: Arc<Config>,
    pub d: Client,
    pub m: Client,
    pub config_path: PathBuf,
}

impl Fixture {
    /// Fresh databases named `name` on both clusters with `schema` applied to both.
    pub async fn databases(name: &str, schema: &str) -> (Client, Client) {
        let p = clusters();
        let mut out = Vec::new();
        for c in [&p.desktop, &p.mobile] {
            let admin = connect(&c.url("postgres")).await;
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .unwrap();
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            let db = connect(&c.url(name)).await;
            db.batch_execute(schema).await.unwrap();
            out.push(db);
        }
        let m = out.pop().unwrap();
        let d = out.pop().unwrap();
        (d, m)
    }

    /// Config text for this test: its own databases, its own slot names (slots are cluster-wide).
    pub fn config_text(name: &str, replication: &str) -> String {
        let p = clusters();
        format!(
            "[desktop]\nurl = \"{}\"\nslot = \"{name}_d\"\npublication = \"{name}_d\"\n\
             [mobile]\nurl = \"{}\"\nslot = \"{name}_m\"\npublication = \"{name}_m\"\n\
             [replication]\n{replication}\n",
            p.desktop.url(name),
            p.mobile.url(name)
        )
    }

    /// Databases, schema, config and a completed `setup`.
    pub async fn new(name: &str, schema: &str, replication: &str) -> Fixture {
        let (d, m) = Self::databases(name, schema).await;
        Self::with_config(name, d, m, Self::config_text(name, replication)).await
    }

    /// A fixture over existing databases with a given config text; runs `setup`.
    pub async fn with_config(name: &str, d: Client, m: Client, text: String) -> Fixture {
        let config_path = scratch().join(format!("tandem-test-{name}.toml"));
        std::fs::write(&config_path, &text).unwrap();
        let cfg = Arc::new(Config::parse(&text, |_| None).unwrap());
        setup::setup(cfg.clone())
            .await
            .unwrap_or_else(|e| panic!("setup: {e:#}"));
        Fixture {
            name: name.to_string(),
            cfg,
            d,
            m,
            config_path,
        }
    }

    /// Start `tandem run` in this process and return at once (before its initial snapshot ends).
    pub fn start_nowait(&self) -> Running {
        let (tx, rx) = watch::channel(false);
        let status = Arc::new(Status::default());
        let task = tokio::spawn(sync::run(self.cfg.clone(), rx, status.clone()));
        Running { tx, task, status }
    }

    /// Start `tandem run` in this process and wait for it to stop on its own with an error
    /// (a check at its start, a read-only target): the error's text, with its causes.
    pub async fn refused(&self) -> String {
        self.start_nowait().failure().await
    }

    /// Run `tandem run` in this process until the returned handle is stopped. Returns once both
    /// directions stream (after the initial snapshot), so a test's writes go through the streams.
    pub async fn start(&self) -> Running {
        let (tx, rx) = watch::channel(false);
        let status = Arc::new(Status::default());
        let task = tokio::spawn(sync::run(self.cfg.clone(), rx, status.clone()));
        let running = Running { tx, task, status };
        let streaming =
            |s: &tandem::sync::Progress| s.streaming.load(std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(streaming(&running.status.from_desktop) && streaming(&running.status.from_mobile)) {
            assert!(
                !running.task.is_finished(),
                "tandem run ended before streaming"
            );
            assert!(
                Instant::now() < deadline,
                "tandem run not streaming after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        running
    }

    /// `tandem run` of this fixture's config as a child process serving `/metrics` on a free
    /// port (`scrape` it), returned once it listens there. The port is free when picked, but
    /// anything on the machine may take it before tandem binds it (an outgoing connection's
    /// local port comes from the same range): a `run` that could not listen is started again on
    /// another port. Before, the test waited out its deadline on a `run` long gone.
    pub fn run_with_metrics(&self) -> (Reaped, u16) {
        let log = self.config_path.with_extension("metrics.log");
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Reaped(
                std::process::Command::new(tandem_bin())
                    .args(["--config", self.config_path.to_str().unwrap(), "run"])
                    .arg("--metrics-addr")
                    .arg(format!("127.0.0.1:{port}"))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap(),
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let err = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        err.contains("cannot listen there"),
                        "tandem run exited ({status}) before serving /metrics: {err}"
                    );
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return (child, port);
                }
                assert!(
                    Instant::now() < deadline,
                    "tandem run not serving /metrics after 30 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("tandem run could not listen on any of 5 free ports");
    }

    /// Rows of `table` on `c` as text, ordered, for exact comparison across sides.
    pub async fn rows(c: &Client, table: &str) -> Vec<String> {
        c.query(
            &format!("SELECT tandem_row_::text FROM {table} tandem_row_ ORDER BY 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    pub async fn count(c: &Client, sql: &str) -> i64 {
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Wait until `table` holds the same rows on both sides.
    pub async fn wait_equal(&self, table: &str, secs: u64) {
        wait_for(secs, &format!("{table} equal on both sides"), || async {
            Self::rows(&self.d, table).await == Self::rows(&self.m, table).await
        })
        .await;
    }

    /// The invariant behind "nothing lost": neither slot is confirmed past the checkpoint that
    /// the other side holds for it.
    pub async fn assert_slots_within_checkpoints(&self) {
        for (src, slot, tgt, dir) in [
            (&self.d, "d", &self.m, "D>M"),
            (&self.m, "m", &self.d, "M>D"),
        ] {
            let slot = format!("{}_{slot}", self.name);
            let (confirmed, checkpoint) = Self::slot_and_checkpoint(src, &slot, tgt, dir).await;
            assert!(
                confirmed <= checkpoint,
                "{slot}: confirmed {confirmed:X} > checkpoint {checkpoint:X}"
            );
        }
    }

    /// `(confirmed_flush_lsn of the slot on side c, checkpoint stored on the other side)`.
    pub async fn slot_and_checkpoint(
        source: &Client,
        slot: &str,
        target: &Client,
        dir: &str,
    ) -> (u64, u64) {
        let s = slot_confirmed(source, slot).await;
        let c: String = target
            .query_one(
                "SELECT lsn::text FROM tandem.checkpoints WHERE direction = $1",
                &[&dir],
            )
            .await
            .unwrap()
            .get(0);
        (s, c.parse::<tandem::lsn::Lsn>().unwrap().0)
    }
}

/// The first column of each row `sql` returns on `c`, as text.
pub async fn strings(c: &Client, sql: &str) -> Vec<String> {
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The `confirmed_flush_lsn` of `slot` on `c`.
pub async fn slot_confirmed(c: &Client, slot: &str) -> u64 {
    let s: String = c
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    s.parse::<tandem::lsn::Lsn>().unwrap().0
}

pub struct Running {
    tx: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub status: Arc<Status>,
}

impl Running {
    /// Graceful stop; panics if replication had failed.
    pub async fn stop(self) {
        let _ = self.tx.send(true);
        self.task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("sync failed: {e:#}"));
    }

    /// Wait for `run` to end on its own and return how it ended.
    pub async fn outcome(self) -> anyhow::Result<()> {
        self.task.await.unwrap()
    }

    /// Wait (up to 60 s) for `run` to stop on its own with an error, and return its text.
    pub async fn failure(self) -> String {
        let e = tokio::time::timeout(Duration::from_secs(60), self.outcome())
            .await
            .expect("run stops on its own")
            .expect_err("run stops with an error");
        format!("{e:#}")
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// A trigger that counts every row change applied to `table`, firing even for replicated rows
/// (`ENABLE ALWAYS`), into `audit` — which no publication includes. Shows each change landed once.
pub fn audit_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS audit (tbl text, op text, at timestamptz DEFAULT clock_timestamp());
         CREATE OR REPLACE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO audit (tbl, op) VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$;
         CREATE TRIGGER audit_{table} AFTER INSERT OR UPDATE OR DELETE ON {table}
           FOR EACH ROW EXECUTE FUNCTION audit_row();
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER audit_{table};"
    )
}

/// The `tandem` binary under test.
pub fn tandem_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

/// Run the `tandem` binary to completion: `(exit code, stdout, stderr)`.
pub fn run_tandem(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(tandem_bin())
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run tandem");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run_tandem`] for a command that must end by itself: killed, and the test failed, if it is
/// still running after `secs`.
pub fn run_tandem_within(secs: u64, args: &[&str]) -> (i32, String, String) {
    use std::process::Stdio;
    let mut child = std::process::Command::new(tandem_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tandem");
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "tandem {args:?} still running after {secs} s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Names of tandem-looking slots and publications on `c` whose name starts with `prefix`.
pub async fn leftovers(c: &Client, prefix: &str) -> Vec<String> {
    c.query(
        "SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE slot_name LIKE $1 || '%' \
         UNION ALL SELECT 'publication ' || pubname FROM pg_publication WHERE pubname LIKE $1 || '%'",
        &[&prefix],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// `tandem verify` finds the sides in sync; after `drift` on `c` it finds a difference, whose
/// report it returns.
pub async fn verify_finds_drift(cfg: &str, c: &Client, drift: &str) -> String {
    let (code, out, err) = run_tandem(&["--config", cfg, "verify"], &[]);
    assert_eq!(code, 0, "in sync before the drift: {out}{err}");
    c.batch_execute(drift).await.unwrap();
    let (code, out, err) = run_tandem(&["--config", cfg, "verify"], &[]);
    assert_eq!(code, 1, "the drift found: {out}{err}");
    out
}

/// `tandem repair --source desktop` succeeds.
pub fn repair_from_desktop(cfg: &str) {
    let (code, out, err) = run_tandem(&["--config", cfg, "repair", "--source", "desktop"], &[]);
    assert_eq!(code, 0, "{out}{err}");
}

/// `GET /metrics` over a plain socket.
pub fn scrape(port: u16) -> Option<String> {
    http_get(port, "/metrics")
}

/// `GET path` over a plain socket: the whole response, status line included.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The value of the first sample of metric `name` in a `/metrics` body that carries every
/// `key="value"` label given.
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<String> {
    body.lines()
        .find(|l| {
            l.strip_prefix(name).is_some_and(|r| r.starts_with('{'))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_string)
}

/// The smallest decoding memory on this database: every transaction of a few hundred rows is
/// streamed while in progress.
pub async fn stream_from_a_few_hundred_rows(c: &Client) {
    c.batch_execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET logical_decoding_work_mem = ''64kB''', \
         current_database()); END $$",
    )
    .await
    .unwrap();
}

/// A seeded random history on `base`'s 16 keys: inserts (as upserts), updates, deletes, key
/// changes, NULLs, updates that leave a TOASTed value unchanged, in transactions of 1 to 12
/// statements and now and then of 300 to 600 (streamed while in progress, some with a
/// subtransaction rolled back), a tenth of them rolled back; `txns` transactions (1,000 at most, so
/// ledger ids stay apart). With `ledger`, each transaction also inserts one row
/// `base * 1000 + txn` into `ledger (id bigint PRIMARY KEY, note text)` (insert-only, so each row
/// lands exactly once on each side, whichever path applies it).
pub async fn random_history(c: &Client, base: i64, mut seed: u64, txns: i64, ledger: bool) {
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for txn in 0..txns {
        let len = if rnd(15) == 0 {
            300 + rnd(300)
        } else {
            1 + rnd(12)
        };
        let savepoint = len >= 300 && rnd(2) == 0;
        let mut sql = String::from("BEGIN;");
        if ledger {
            sql.push_str(&format!(
                "INSERT INTO ledger VALUES ({}, 'txn {txn}');",
                base * 1000 + txn
            ));
        }
        for s in 0..len {
            if savepoint && s == len / 2 {
                sql.push_str("SAVEPOINT sp;");
            }
            if savepoint && s == len * 3 / 4 {
                sql.push_str("ROLLBACK TO SAVEPOINT sp;");
            }
            let k = base + rnd(16) as i64;
            sql.push_str(&match rnd(7) {
                0 | 1 => format!(
                    "INSERT INTO r VALUES ({k}, 't{txn}.{s}', {s}) \
                     ON CONFLICT (id) DO UPDATE SET v = excluded.v, n = excluded.n;"
                ),
                2 => format!("UPDATE r SET n = n + 1 WHERE id = {k};"),
                3 => format!("DELETE FROM r WHERE id = {k};"),
                4 => {
                    let to = base + rnd(16) as i64;
                    format!(
                        "UPDATE r SET id = {to}, v = 'moved {txn}.{s}' WHERE id = {k} \
                         AND NOT EXISTS (SELECT 1 FROM r WHERE id = {to} AND {to} <> {k});"
                    )
                }
                5 => format!(
                    "UPDATE r SET big = (SELECT string_agg(md5(g || '{txn}.{s}'), '') \
                     FROM generate_series(1, 100) g) WHERE id = {k};"
                ),
                _ => format!("UPDATE r SET v = NULL WHERE id = {k};"),
            });
        }
        sql.push_str(if rnd(10) == 0 { "ROLLBACK;" } else { "COMMIT;" });
        c.batch_execute(&sql).await.unwrap();
    }
}

/// Transactions `slot` has streamed while in progress (`pg_stat_replication_slots`).
pub async fn streamed_txns(c: &Client, slot: &str) -> i64 {
    Fixture::count(
        c,
        &format!("SELECT coalesce(sum(stream_txns), 0)::bigint FROM pg_stat_replication_slots WHERE slot_name = '{slot}'"),
    )
    .await
}

/// Wait for `run` to stop on a source transaction the target refused: its error text and the
/// commit LSN of the `tandem skip` command it ends with.
pub async fn rejected(run: Running) -> (String, String) {
    let e = run.failure().await;
    let lsn = skip_lsn(&e).unwrap_or_else(|| panic!("no skip command in: {e}"));
    (e, lsn)
}

/// SIGTERM to a child we spawned and have not reaped (`tandem run` stops gracefully on it).
pub fn sigterm(child: &std::process::Child) {
    // SAFETY: plain kill(2) of our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// [`sigterm`], then the child's exit status.
pub fn sigterm_and_wait(child: &mut std::process::Child) -> std::process::ExitStatus {
    sigterm(child);
    child.wait().unwrap()
}

/// The LSN of the `tandem skip --from … --lsn …` command a refusal's text gives.
pub fn skip_lsn(text: &str) -> Option<String> {
    text.split(" --lsn ")
        .nth(1)
        .filter(|_| text.contains("`tandem skip --from "))
        .and_then(|r| r.split('`').next())
        .map(str::to_string)
}

/// A TCP proxy in front of a server, to play what a NAT or VPN does to the connections it
/// carries: go silent on the replication ones (no data, no FIN, no RST), or close the client's
/// side while the server's stays open (the server notices nothing, as after a dropped network).
/// Connections opened afterwards pass. Needs `sslmode=disable` to tell replication connections
/// by their startup packet.
pub struct Proxy {
    pub port: u16,
    /// The cluster port it forwards to.
    upstream: u16,
    /// Bumped to silence every replication connection opened before it.
    silenced: Arc<std::sync::atomic::AtomicU64>,
    /// Bumped to close the client side of every connection opened before it.
    cut: watch::Sender<u64>,
    /// Set: the server's bytes reach clients a few at a time (see [`Proxy::trickle`]).
    trickling: Arc<std::sync::atomic::AtomicBool>,
    /// Set: replication connections are refused as a pooler refuses them (see [`Proxy::pool`]).
    pooling: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silenced = Arc::new(AtomicU64::new(0));
        let (cut, cuts) = watch::channel(0u64);
        let gen = silenced.clone();
        let trickling = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let trickle = trickling.clone();
        let pooling = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pooler = pooling.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if pooler.load(Ordering::Relaxed) && asks_replication(&client).await {
                    use tokio::io::AsyncWriteExt;
                    let _ = client.write_all(&POOLER_REFUSAL).await;
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let born = gen.load(Ordering::Relaxed);
                let cut_born = *cuts.borrow();
                let is_replication = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to, first) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                        true,
                    ),
                    (Box::new(sr), Box::new(cw), false),
                ] {
                    let (gen, is_replication) = (gen.clone(), is_replication.clone());
                    let trickle = trickle.clone();
                    let mut cuts = cuts.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut startup = first;
                        let silent = || {
                            is_replication.load(Ordering::Relaxed)
                                && gen.load(Ordering::Relaxed) > born
                        };
                        loop {
                            let read = tokio::select! {
                                r = from.read(&mut buf) => r,
                                _ = cuts.wait_for(|&c| c > cut_born) => {
                                    // The server's half lives on (leaked); the client's closes.
                                    if first {
                                        std::mem::forget(to);
                                    } else {
                                        std::mem::forget(from);
                                    }
                                    return;
                                }
                            };
                            let n = match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if std::mem::take(&mut startup)
                                && buf[..n].windows(12).any(|w| w == b"replication\0")
                            {
                                is_replication.store(true, Ordering::Relaxed);
                            }
                            // Silent: hold everything, forever, without closing.
                            while silent() {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                            if !first && trickle.load(Ordering::Relaxed) {
                                for piece in buf[..n].chunks(4) {
                                    if to.write_all(piece).await.is_err() {
                                        return;
                                    }
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                }
                            } else if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Proxy {
            port,
            upstream,
            silenced,
            cut,
            trickling,
            pooling,
        }
    }

    /// From now on the proxy plays a connection pooler (PgBouncer, Supavisor), or stops: SQL
    /// connections pass, and a replication connection gets PgBouncer's refusal.
    pub fn pool(&self, on: bool) {
        self.pooling.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// `name`'s config text with the URL of the cluster this proxy forwards to through it,
    /// over plain TCP (the proxy reads startup packets).
    pub fn route(&self, text: &str, name: &str) -> String {
        let upstream = self.upstream;
        let routed = text.replacen(
            &format!(":{upstream}/{name}"),
            &format!(":{}/{name}?sslmode=disable", self.port),
            1,
        );
        assert_ne!(routed, text, "no URL to {upstream} in: {text}");
        routed
    }

    /// Every replication connection open now goes silent.
    pub fn silence_replication(&self) {
        self.silenced
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// From now on the server's answers reach clients 4 bytes at a time, 1 ms apart, as a slow
    /// network may split them: each message of a response is read on its own.
    pub fn trickle(&self) {
        self.trickling
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The server's answers pass as they come again (after [`Proxy::trickle`]).
    pub fn flow(&self) {
        self.trickling
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every connection open now is closed on the client's side only.
    pub fn cut_clients(&self) {
        self.cut.send_modify(|c| *c += 1);
    }
}

/// Does the startup packet waiting on `client` ask for replication? Peeked, so it still passes.
async fn asks_replication(client: &tokio::net::TcpStream) -> bool {
    let mut buf = vec![0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = client.peek(&mut buf).await.unwrap_or(0);
        let whole = n >= 4 && n >= u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        if whole || n == 0 || Instant::now() > deadline {
            return buf[..n].windows(12).any(|w| w == b"replication\0");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// PgBouncer's answer to a startup packet with `replication` in it: an ErrorResponse.
const POOLER_REFUSAL: [u8; 71] =
    *b"E\0\0\0\x46SFATAL\0VFATAL\0C08P01\0Munsupported startup parameter: replication\0\0";

/// The schema of [`tandem_waits_on_an_application`]'s fixtures.
pub const ROWS_A: &str = "CREATE TABLE a (id int PRIMARY KEY, v text);";

/// With `run` streaming `fx` (table `a` of [`ROWS_A`]): desktop writes rows 1 and 2, then
/// updates both in one transaction while an application on mobile holds row 2, so tandem's
/// statement on mobile locks row 1 and waits. Returns the application's session (its transaction
/// open) and a query counting tandem's sessions waiting on a lock there.
pub async fn tandem_waits_on_an_application(fx: &Fixture) -> (Client, String) {
    fx.d.batch_execute("INSERT INTO a VALUES (1, 'd0'), (2, 'd0')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM a", 2).await;
    let app = connect(&clusters().mobile.url(&fx.name)).await;
    app.batch_execute("BEGIN; UPDATE a SET v = 'app' WHERE id = 2")
        .await
        .unwrap();
    fx.d.batch_execute("UPDATE a SET v = 'd1' WHERE id = 1; UPDATE a SET v = 'd1' WHERE id = 2")
        .await
        .unwrap();
    let waiting = apply_lock_waits(&fx.name);
    wait_count(30, &fx.m, &waiting, 1).await;
    (app, waiting)
}

/// A query counting tandem's apply sessions (`run`'s, `resolve`'s …) in database `db` waiting
/// on a lock.
pub fn apply_lock_waits(db: &str) -> String {
    format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
         AND application_name LIKE 'tandem apply%' AND wait_event_type = 'Lock'"
    )
}

/// A child process killed and reaped when dropped, so a failing test leaves no `tandem run`
/// behind retrying against clusters that are gone.
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The topic of [`mock_kafka`]'s cluster.
pub const TOPIC: &str = "tandem.events";

/// A one-broker mock Kafka with the topic in `partitions` partitions, and its bootstrap address.
/// The broker lives as long as the cluster: keep it bound (`_cluster`, not `_`).
pub fn mock_kafka(partitions: i32) -> (MockCluster<'static, DefaultProducerContext>, String) {
    let cluster = MockCluster::<DefaultProducerContext>::new(1).unwrap();
    cluster.create_topic(TOPIC, partitions, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    (cluster, brokers)
}

/// Wait until `slot` on `c` is in use by a walsender (`active`), or no longer is.
pub async fn wait_slot_active(c: &Client, slot: &str, active: bool) {
    let sql =
        format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active");
    let what = format!("slot {slot} active: {active}");
    wait_for(30, &what, || async {
        (Fixture::count(c, &sql).await == 1) == active
    })
    .await;
}

/// Make every commit on `c` of a transaction that inserted into `table` take `seconds` longer
/// (a deferred constraint trigger that sleeps, enabled for tandem's sessions too).
pub async fn slow_commits(c: &Client, table: &str, seconds: f64) {
    c.batch_execute(&format!(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {table} \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow(); \
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER slow_commit;"
    ))
    .await
    .unwrap();
}

/// Make `c`'s first commit of tandem's apply sessions that touched `table` fail `after` seconds
/// into it (a deferred constraint trigger, as a deferred foreign key fails at commit); later
/// commits pass. The sequence `once` counts the commits it saw.
pub async fn fail_first_apply_commit(c: &Client, table: &str, after: f64) {
    c.batch_execute(&format!(
        "CREATE SEQUENCE once; GRANT USAGE ON SEQUENCE once TO PUBLIC;
         CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF current_setting('application_name') LIKE 'tandem apply%' AND nextval('once') = 1 THEN
               PERFORM pg_sleep({after});
               RAISE EXCEPTION 'injected failure at commit';
             END IF;
             RETURN NULL;
           END $$;
         CREATE CONSTRAINT TRIGGER fail_once AFTER INSERT OR UPDATE OR DELETE ON {table}
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_once();
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER fail_once;"
    ))
    .await
    .unwrap();
}

/// `parent`, and `child`, whose rows reference it: configured before it in name order.
pub const PARENT_CHILD: &str = "CREATE TABLE parent (id int PRIMARY KEY, v text);
     CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent (id));";

/// Rows exchanging unique values, for snapshot and repair: `users` (`email` UNIQUE) with
/// `orders` referencing them (`NO ACTION`), `tags` (`name` UNIQUE) with `post_tags` referencing
/// them `ON DELETE CASCADE`, after the tables of `more` (named in `more_tables`). Mobile's `users`
/// has a column of its own (`seen`), and the config writes to mobile as the plain role `role`, so
/// foreign keys are checked as tandem writes (a superuser's writes check none), and `users` by
/// the columns both sides have. Returns the databases, before `setup`, and the config text.
pub async fn unique_swap_databases(
    db: &str,
    role: &str,
    more: &str,
    more_tables: &[&str],
) -> (Client, Client, String) {
    let mut tables = more_tables.to_vec();
    tables.extend(["users", "orders", "tags", "post_tags"]);
    let schema = format!(
        "{more} CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE, name text); \
         CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL REFERENCES users); \
         CREATE TABLE tags (id int PRIMARY KEY, name text NOT NULL UNIQUE); \
         CREATE TABLE post_tags (id int PRIMARY KEY, \
           tag_id int NOT NULL REFERENCES tags ON DELETE CASCADE); {}",
        plain_role(role, db, &tables)
    );
    let (d, m) = Fixture::databases(db, &schema).await;
    m.batch_execute("ALTER TABLE users ADD COLUMN seen int")
        .await
        .unwrap();
    let text = connect_as(
        &Fixture::config_text(
            db,
            "tables = [\"public.*\"]\n[replication.columns]\n\"public.users\" = [\"id\", \"email\", \"name\"]",
        ),
        role,
        &["mobile"],
    );
    (d, m, text)
}

/// A parent row and a child row referencing it on each side: desktop's 1 and 10, mobile's 2 and
/// 20.
pub async fn parent_and_child_on_each_side(d: &Client, m: &Client) {
    d.batch_execute("INSERT INTO parent VALUES (1, 'd'); INSERT INTO child VALUES (10, 1)")
        .await
        .unwrap();
    m.batch_execute("INSERT INTO parent VALUES (2, 'm'); INSERT INTO child VALUES (20, 2)")
        .await
        .unwrap();
}

/// SQL making `role` a login role with REPLICATION (its password is its name) that may create
/// tandem's schema in `db` and owns `tables` (to publish them): not a superuser, as on Supabase,
/// so foreign keys are checked and triggers fire for the rows tandem writes.
pub fn plain_role(role: &str, db: &str, tables: &[&str]) -> String {
    let owned: String = tables
        .iter()
        .map(|t| format!("ALTER TABLE {t} OWNER TO {role};\n"))
        .collect();
    format!(
        "DO $$ BEGIN CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{role}'; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         GRANT CREATE ON DATABASE {db} TO {role};
         {owned}"
    )
}

/// `text` (a [`Fixture::config_text`]) with the URLs of `sides` (`"desktop"`, `"mobile"`)
/// connecting as `role` of [`plain_role`].
pub fn connect_as(text: &str, role: &str, sides: &[&str]) -> String {
    let (desktop, mobile) = text.split_at(text.find("[mobile]").unwrap());
    let as_role = |part: &str, side: &str| match sides.contains(&side) {
        true => part.replacen(
            "postgresql://postgres@",
            &format!("postgresql://{role}:{role}@"),
            1,
        ),
        false => part.to_string(),
    };
    format!(
        "{}{}",
        as_role(desktop, "desktop"),
        as_role(mobile, "mobile")
    )
}
