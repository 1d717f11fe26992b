//! Measured on clusters these tests have to themselves, one test at a time (WAL position is
//! cluster-wide): after a burst on both sides, each change landed once, the slots caught up, and
//! WAL stops growing; a change the initial snapshot's copy holds, and with Kafka a group whose
//! commit came back while the loop waited for Kafka, are confirmed without waiting for more WAL.

mod common;

use common::{audit_sql, slot_confirmed, wait_count, wait_for, Fixture};
use tokio_postgres::Client;

const JOBS: &str =
    "CREATE TABLE jobs (id bigint PRIMARY KEY, title text NOT NULL, status text, n int);";

/// 1000 insert transactions and 500 update transactions.
async fn burst(c: &Client, base: i64) {
    for i in 1..=1000i64 {
        c.execute(
            "INSERT INTO jobs (id, title) VALUES ($1, 'burst')",
            &[&(base + i)],
        )
        .await
        .unwrap();
        if i % 2 == 0 {
            c.execute("UPDATE jobs SET n = 1 WHERE id = $1", &[&(base + i)])
                .await
                .unwrap();
        }
    }
}

/// Held by each test: another's WAL would move the slots these tests watch.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn wal(c: &Client) -> i64 {
    Fixture::count(c, "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_echo_each_change_lands_once_and_wal_stops_growing() {
    let _alone = ALONE.lock().await;
    let schema = format!("{JOBS}\n{}", audit_sql("jobs"));
    let fx = Fixture::new("no_echo", &schema, r#"tables = ["public.jobs"]"#).await;
    let run = fx.start().await;
    // A burst on both sides: 1000 transactions each (insert, and an update every other one).
    let before: String =
        fx.d.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
    tokio::join!(burst(&fx.d, 0), burst(&fx.m, 100_000));
    fx.wait_equal("jobs", 60).await;
    // Each side saw its own 1500 changes and exactly the other side's 1500: nothing bounced back.
    for c in [&fx.d, &fx.m] {
        wait_count(30, c, "SELECT count(*) FROM audit", 3000).await;
    }
    // Quiet now. The slots catch up to (nearly) the end of WAL…
    let burst_wal = Fixture::count(
        &fx.d,
        &format!("SELECT (pg_current_wal_lsn() - '{before}'::pg_lsn)::bigint"),
    )
    .await;
    assert!(
        burst_wal > 2 * tandem::sync::IDLE_RECORD_BYTES as i64,
        "burst wrote only {burst_wal} bytes of WAL"
    );
    for (c, slot) in [(&fx.d, "no_echo_d"), (&fx.m, "no_echo_m")] {
        let lag_sql = format!(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = '{slot}'"
        );
        wait_for(
            30,
            &format!("slot {slot} confirmed close to the WAL end"),
            || async {
                Fixture::count(c, &lag_sql).await
                    < tandem::sync::IDLE_RECORD_BYTES as i64 + 16 * 1024
            },
        )
        .await;
    }
    // …and WAL stops growing: no change or checkpoint write keeps bouncing between the sides.
    // A window with a few background records is not bouncing (a later read pruning the burst's
    // dead row versions writes Heap2 PRUNE records, seen with pg_waldump): bouncing never stops,
    // so it is a quiet 3 s window within 30 s that must come.
    wait_for(
        30,
        "a 3 s window in which neither side writes WAL",
        || async {
            let (d0, m0) = (wal(&fx.d).await, wal(&fx.m).await);
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            let (d1, m1) = (wal(&fx.d).await, wal(&fx.m).await);
            // Allow the server's own background records (a standby snapshot is ~100 bytes).
            let quiet = d1 - d0 < 1024 && m1 - m0 < 1024;
            if !quiet {
                eprintln!("WAL grew: desktop +{} mobile +{}", d1 - d0, m1 - m0);
            }
            quiet
        },
    )
    .await;
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM audit").await,
        3000
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_the_initial_snapshot_holds_is_confirmed_on_a_quiet_source() {
    let _alone = ALONE.lock().await;
    let fx = Fixture::new("held", JOBS, r#"tables = ["public.jobs"]"#).await;
    // Written after `setup` made the slot and before the first run's copy: the copy holds it, so
    // the stream leaves it out, and nothing else is written on desktop afterwards.
    fx.d.batch_execute("INSERT INTO jobs (id, title) VALUES (1, 'before the copy')")
        .await
        .unwrap();
    let end = wal(&fx.d).await;
    let run = fx.start().await;
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 1).await;
    // The slot passes it with a group commit, not once 64 KiB more WAL came (before: never, on a
    // quiet source).
    let confirmed =
        "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots \
                     WHERE slot_name = 'held_d'";
    wait_for(
        10,
        "desktop's slot confirmed past the held change",
        || async { Fixture::count(&fx.d, confirmed).await >= end },
    )
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_kafka_a_commit_read_while_waiting_for_kafka_moves_the_slot_on_a_quiet_source() {
    let _alone = ALONE.lock().await;
    let (_kafka, brokers) = common::mock_kafka(1);
    let (d, m) = Fixture::databases("slow", JOBS).await;
    // The target's commits of `jobs` take 300 ms: long enough for the source to say something
    // while a group's commit is on its way.
    common::slow_commits(&m, "jobs", 0.3).await;
    d.batch_execute("CREATE TABLE unpublished (id int)")
        .await
        .unwrap();
    let text = Fixture::config_text("slow", r#"tables = ["public.jobs"]"#)
        + &format!("[kafka]\nbrokers = \"{brokers}\"\nrequired = true\n");
    let fx = Fixture::with_config("slow", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs (id, title) VALUES (1, 'lone')")
        .await
        .unwrap();
    let end = wal(&fx.d).await as u64;
    // The group's commit is sent 10 ms after the source went quiet and comes back 300 ms later.
    // Meanwhile WAL the stream leaves out wakes the walsender, whose keepalive makes the loop
    // wait for Kafka, and that wait reads the commit's result. Before: the slot then stayed
    // behind until the next group, or 64 KiB more WAL.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    fx.d.batch_execute("INSERT INTO unpublished VALUES (1)")
        .await
        .unwrap();
    wait_for(10, "desktop's slot confirmed past the change", || async {
        slot_confirmed(&fx.d, "slow_d").await >= end
    })
    .await;
    assert_eq!(Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await, 1);
    run.stop().await;
}
