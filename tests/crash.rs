//! kill -9 of the tandem process in the middle of applying a 200,000-row transaction, then
//! restart: both sides end equal and every change landed exactly once. And a slot the server
//! invalidated while tandem was stopped: run refuses, saying how to resynchronise.

mod common;

use std::process::{Command, Stdio};

use common::{
    audit_sql, random_history, stream_from_a_few_hundred_rows, tandem_bin, wait_count, wait_for,
    Fixture, Reaped,
};

/// A session of `app` inside a transaction: the direction's main session, or its second one
/// applying a streamed transaction while it is in progress (one over 8 MB, as 200,000 rows are).
async fn apply_session_in_transaction(c: &tokio_postgres::Client, app: &str) -> bool {
    Fixture::count(
        c,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name ~ ('^{app}( streamed)?( [0-9]+ [^ ]+)?$') \
             AND xact_start IS NOT NULL AND state <> 'idle'"
        ),
    )
    .await
        > 0
}

async fn streaming(c: &tokio_postgres::Client, app: &str) -> bool {
    Fixture::count(
        c,
        &format!("SELECT count(*) FROM pg_stat_replication WHERE application_name = '{app}'"),
    )
    .await
        > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_200k_row_transaction_then_restart_loses_and_doubles_nothing() {
    let schema = format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, payload text, qty int);\n{}",
        audit_sql("items")
    );
    let fx = Fixture::new("kill9", &schema, r#"tables = ["public.items"]"#).await;
    let log = std::fs::File::create(std::env::temp_dir().join("tandem-kill9.log")).unwrap();
    let config = fx.config_path.to_str().unwrap().to_string();
    let spawn = || {
        Reaped(
            Command::new(tandem_bin())
                .args(["--config", &config, "run"])
                .stdout(Stdio::null())
                .stderr(log.try_clone().unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let mut child = spawn();
    wait_for(30, "both streams up", || async {
        streaming(&fx.d, "tandem stream D>M").await && streaming(&fx.m, "tandem stream M>D").await
    })
    .await;

    // One 200k-row transaction on desktop, small ones on mobile meanwhile.
    fx.d.batch_execute(
        "INSERT INTO items SELECT g, md5(g::text), 0 FROM generate_series(1, 200000) g",
    )
    .await
    .unwrap();
    for i in 0..20i64 {
        fx.m.execute(
            "INSERT INTO items VALUES ($1, 'mobile', 1)",
            &[&(1_000_000 + i)],
        )
        .await
        .unwrap();
    }
    wait_for(
        60,
        "desktop's big transaction being applied on mobile",
        || async { apply_session_in_transaction(&fx.m, "tandem apply D>M").await },
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());

    // The half-applied target transaction died with the process: mobile has all or none of it.
    wait_for(30, "the killed apply session is gone", || async {
        !apply_session_in_transaction(&fx.m, "tandem apply D>M").await
    })
    .await;
    let partial = Fixture::count(&fx.m, "SELECT count(*) FROM items WHERE id <= 200000").await;
    assert!(
        partial == 0 || partial == 200_000,
        "mobile holds {partial} of 200000 rows"
    );

    // Restart: it resumes from the checkpoint.
    let mut child = spawn();
    wait_count(
        180,
        &fx.m,
        "SELECT count(*) FROM items WHERE id <= 200000",
        200_000,
    )
    .await;
    fx.wait_equal("items", 60).await;
    // Exactly once: mobile's trigger saw 200000 applied inserts plus its own 20; desktop saw its
    // own 200000 plus mobile's 20.
    wait_for(30, "audit counts", || async {
        Fixture::count(&fx.m, "SELECT count(*) FROM audit").await == 200_020
            && Fixture::count(&fx.d, "SELECT count(*) FROM audit").await == 200_020
    })
    .await;

    // SIGTERM stops it cleanly.
    let status = common::sigterm_and_wait(&mut child);
    assert!(
        status.success(),
        "tandem run exited with {status} after SIGTERM"
    );
    fx.assert_slots_within_checkpoints().await;
}

/// kill -9 at seeded random instants while both sides write random histories (streamed
/// transactions, key changes, unchanged TOASTed values, rollbacks) with one row of an insert-only
/// ledger in each transaction; tandem is restarted after each kill. Both sides end equal, and every
/// ledger row fired each side's trigger exactly once (an insert applied twice fires the upsert's
/// update): nothing lost, nothing doubled, whatever the instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_instants_of_random_two_way_histories_loses_and_doubles_nothing() {
    let fx = kill_9_during_random_histories("kill9_random", true).await;
    let ledger = Fixture::count(&fx.d, "SELECT count(*) FROM ledger").await;
    for c in [&fx.d, &fx.m] {
        assert_eq!(
            Fixture::count(c, "SELECT count(*) FROM audit WHERE tbl = 'ledger'").await,
            ledger,
            "each ledger row inserted once, and not touched again"
        );
    }
}

/// The same with the first run's initial snapshot under way while both sides write: the copies,
/// merges and rows copied back meet the streams' changes (each side's stream leaves out what the
/// snapshot took in), and both sides end equal. A row only mobile has may reach desktop twice,
/// copied back and then sent (an upsert of the same values), when mobile commits it in the
/// moment between the merge's read of mobile and its copy back: so no exact trigger count here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_instants_while_the_initial_snapshot_meets_random_histories() {
    kill_9_during_random_histories("kill9_snap", false).await;
}

/// [`random_history`] on both sides (1,000 transactions each, with the ledger), `tandem run`
/// killed at seeded random instants (five times at least) and restarted, until both sides are
/// equal; then a clean stop and the slots within the checkpoints. `snapshot_first`: the first run
/// has done its initial snapshot (of the empty tables) before the writes begin.
async fn kill_9_during_random_histories(name: &str, snapshot_first: bool) -> Fixture {
    let schema = format!(
        "CREATE TABLE r (id bigint PRIMARY KEY, v text, n int, big text);\n\
         CREATE TABLE ledger (id bigint PRIMARY KEY, note text);\n{}",
        audit_sql("ledger")
    );
    let fx = Fixture::new(name, &schema, r#"tables = ["public.r", "public.ledger"]"#).await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    stream_from_a_few_hundred_rows(&fx.m).await;
    let log = format!("tandem-{name}.log");
    let _ = std::fs::remove_file(std::env::temp_dir().join(&log));
    let first = match snapshot_first {
        true => Some(run_process(&fx, &log).await),
        false => None,
    };
    let writing = std::sync::atomic::AtomicBool::new(true);
    let killer = async {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut kills = 0;
        let mut next = first;
        loop {
            let mut child = match next.take() {
                Some(c) => c,
                None => run_process(&fx, &log).await,
            };
            if !writing.load(std::sync::atomic::Ordering::SeqCst) && kills >= 5 {
                break (child, kills);
            }
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Not a wait for a condition: the instant of the crash, 50 ms to 1 s into the run.
            tokio::time::sleep(std::time::Duration::from_millis(50 + seed % 950)).await;
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            kills += 1;
        }
    };
    let writers = async {
        tokio::join!(
            random_history(&fx.d, 0, 0x5EED, 1000, true),
            random_history(&fx.m, 1000, 0xBEEF, 1000, true)
        );
        writing.store(false, std::sync::atomic::Ordering::SeqCst);
    };
    let ((mut child, kills), ()) = tokio::join!(killer, writers);
    eprintln!("killed tandem {kills} times");
    fx.wait_equal("ledger", 120).await;
    fx.wait_equal("r", 60).await;
    for (c, own) in [(&fx.d, "id < 1000000"), (&fx.m, "id >= 1000000")] {
        assert!(Fixture::count(c, &format!("SELECT count(*) FROM ledger WHERE {own}")).await > 200);
        assert_eq!(
            Fixture::count(
                c,
                "SELECT count(*) FROM audit WHERE tbl = 'ledger' AND op = 'INSERT'"
            )
            .await,
            Fixture::count(c, "SELECT count(*) FROM ledger").await,
            "every ledger row inserted once"
        );
    }
    assert!(common::sigterm_and_wait(&mut child).success());
    fx.assert_slots_within_checkpoints().await;
    fx
}

/// Start `tandem run` on `fx`'s config as a process (its log in the temp dir as `log`), and
/// wait until both its streams are up.
async fn run_process(fx: &Fixture, log: &str) -> Reaped {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::env::temp_dir().join(log))
        .unwrap();
    let child = Reaped(
        Command::new(tandem_bin())
            .args(["--config", fx.config_path.to_str().unwrap(), "run"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for(30, "both streams up", || async {
        streaming(&fx.d, "tandem stream D>M").await && streaming(&fx.m, "tandem stream M>D").await
    })
    .await;
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_tandem_leaves_no_session_waiting_on_an_application_lock() {
    // tandem's statement waits on a row an application on mobile holds, having locked another
    // row already; then tandem is killed. Its session must not stay queued there (holding that
    // row) until the application lets go.
    let fx = Fixture::new("kill_lock", common::ROWS_A, "tables = [\"public.a\"]").await;
    let mut child = run_process(&fx, "tandem-kill-lock.log").await;
    let (app, waiting) = common::tandem_waits_on_an_application(&fx).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The server notices the closed connection within its check interval (5 s).
    wait_count(15, &fx.m, &waiting, 0).await;
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        app.batch_execute("UPDATE a SET v = 'app' WHERE id = 1; ROLLBACK"),
    )
    .await
    .expect("the killed tandem's session still held row 1")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_signal_exits_at_once_and_the_next_run_loses_nothing() {
    // The first SIGTERM's graceful stop waits on tandem's statement, which waits on an
    // application's row lock; the second exits at once.
    let fx = Fixture::new("twice", common::ROWS_A, "tables = [\"public.a\"]").await;
    let log = std::env::temp_dir().join("tandem-twice.log");
    let _ = std::fs::remove_file(&log);
    let mut child = run_process(&fx, "tandem-twice.log").await;
    let (app, waiting) = common::tandem_waits_on_an_application(&fx).await;
    common::sigterm(&child);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal's stop did not wait for the group"
    );
    let asked = std::time::Instant::now();
    common::sigterm(&child);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(3),
            "the second signal did not exit at once"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("stopped at once by a second signal"),
        "{text}"
    );
    // The server ends the abandoned statement; the updates arrive with the next run.
    wait_count(15, &fx.m, &waiting, 0).await;
    app.batch_execute("ROLLBACK").await.unwrap();
    let mut child = run_process(&fx, "tandem-twice.log").await;
    wait_count(30, &fx.m, "SELECT count(*) FROM a WHERE v = 'd1'", 2).await;
    assert!(common::sigterm_and_wait(&mut child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_the_server_invalidated_stops_run_with_how_to_resynchronise() {
    // Clusters of its own: the WAL limit would threaten the shared clusters' other slots.
    let conf = "max_slot_wal_keep_size = 1MB";
    let d_cluster = tandem::localpg::LocalCluster::start_with("slot-lost-d", conf).unwrap();
    let m_cluster = tandem::localpg::LocalCluster::start_with("slot-lost-m", conf).unwrap();
    let mut clients = Vec::new();
    for c in [&d_cluster, &m_cluster] {
        let admin = common::connect(&c.url("postgres")).await;
        admin.batch_execute("CREATE DATABASE lost").await.unwrap();
        let db = common::connect(&c.url("lost")).await;
        db.batch_execute("CREATE TABLE jobs (id int PRIMARY KEY, v text)")
            .await
            .unwrap();
        clients.push(db);
    }
    let (m, d) = (clients.pop().unwrap(), clients.pop().unwrap());
    let text = format!(
        "[desktop]\nurl = \"{}\"\n[mobile]\nurl = \"{}\"\n[replication]\ntables = [\"public.jobs\"]\n",
        d_cluster.url("lost"),
        m_cluster.url("lost")
    );
    let fx = Fixture::with_config("slot_lost", d, m, text).await;
    // While healthy, run reports how much WAL the server may still add before the limit.
    let (mut child, port) = fx.run_with_metrics();
    let safe = |body: &str, dir: &str| {
        common::metric(body, "tandem_slot_safe_wal_bytes", &[("direction", dir)])
            .and_then(|v| v.parse::<f64>().ok())
    };
    // And how far each slot is behind its source's WAL.
    let behind = |body: &str, dir: &str| {
        common::metric(body, "tandem_slot_lag_bytes", &[("direction", dir)])
            .and_then(|v| v.parse::<f64>().ok())
    };
    wait_for(60, "safe WAL bytes reported for both slots", || async {
        common::scrape(port).is_some_and(|b| {
            safe(&b, "D>M").is_some_and(|v| v > 0.0)
                && safe(&b, "M>D").is_some_and(|v| v > 0.0)
                && behind(&b, "D>M").is_some_and(|v| v >= 0.0)
                && behind(&b, "M>D").is_some_and(|v| v >= 0.0)
        })
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    // tandem is not running; the desktop writes well past the limit and checkpoints.
    for _ in 0..3 {
        fx.d.batch_execute(
            "INSERT INTO jobs SELECT g, repeat('x', 100) FROM generate_series(1, 30000) g \
             ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v; SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .unwrap();
    }
    assert_eq!(
        Fixture::count(
            &fx.d,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'tandem_desktop' AND wal_status = 'lost'"
        )
        .await,
        1
    );
    let e = fx
        .start_nowait()
        .outcome()
        .await
        .expect_err("run refuses a lost slot");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("slot tandem_desktop was invalidated by the server")
            && msg.contains(
                "`tandem teardown`, `tandem setup`, then `tandem snapshot --seed desktop`"
            ),
        "{msg}"
    );
    assert_eq!(Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await, 0);
    let (code, out, err) = common::run_tandem(
        &["--config", fx.config_path.to_str().unwrap(), "status"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("slot tandem_desktop confirmed") && out.contains("INVALIDATED by the server"),
        "{out}"
    );
}
