//! Initial snapshot: merge and mirror results, crash safety and resumption, and writes during
//! the snapshot neither lost nor doubled.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{run_tandem, tandem_bin, wait_count, wait_for, Fixture};
use tandem::ops::verify;

const SCHEMA: &str =
    "CREATE TABLE jobs (id bigint PRIMARY KEY, title text, n int NOT NULL DEFAULT 0);";

fn counts(r: &verify::Report, table: &str) -> (u64, u64, u64, u64) {
    let t = r.tables.iter().find(|t| t.table == table).unwrap();
    (t.in_sync, t.only_desktop, t.only_mobile, t.differs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_gives_both_sides_the_union_and_mirror_an_exact_copy() {
    let (d, m) = Fixture::databases("snap_merge", SCHEMA).await;
    d.batch_execute(
        "INSERT INTO jobs (id, title) SELECT g, 'd' || g FROM generate_series(1, 1000) g",
    )
    .await
    .unwrap();
    m.batch_execute(
        "INSERT INTO jobs (id, title) SELECT g, CASE WHEN g <= 600 THEN 'm' ELSE 'd' END || g FROM generate_series(500, 1000) g;
         INSERT INTO jobs (id, title) SELECT g, 'mobile only' FROM generate_series(1001, 1500) g;",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "snap_merge",
        d,
        m,
        Fixture::config_text("snap_merge", r#"tables = ["public.jobs"]"#),
    )
    .await;
    let before = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(counts(&before, "public.jobs"), (400, 499, 500, 101));

    let (code, out, err) = run_tandem(
        &[
            "--config",
            fx.config_path.to_str().unwrap(),
            "snapshot",
            "--seed",
            "desktop",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("public.jobs: copied 1000 rows from desktop: 499 inserted, 101 updated, 0 deleted on mobile; 500 copied back to desktop"),
        "{out}"
    );
    let after = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(counts(&after, "public.jobs"), (1500, 0, 0, 0));
    assert_eq!(Fixture::rows(&fx.m, "jobs").await[0], "(1,d1,0)");
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM jobs WHERE id BETWEEN 500 AND 600 AND title LIKE 'd%'"
        )
        .await,
        101
    );

    // Mirror from mobile: desktop becomes an exact copy of mobile.
    fx.m.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'tandem', 'test'); DELETE FROM jobs WHERE id > 1400; \
         UPDATE jobs SET title = 'mobile edit' WHERE id = 7; COMMIT;",
    )
    .await
    .unwrap();
    let (code, out, err) = run_tandem(
        &[
            "--config",
            fx.config_path.to_str().unwrap(),
            "snapshot",
            "--seed",
            "mobile",
            "--mirror",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("public.jobs: copied 1400 rows from mobile: 0 inserted, 1 updated, 100 deleted on desktop; 0 copied back"), "{out}");
    assert_eq!(
        Fixture::rows(&fx.d, "jobs").await,
        Fixture::rows(&fx.m, "jobs").await
    );
}

/// `parent` and `child` under `"public.*"` (child first), both sides connecting as a plain role:
/// a superuser's snapshot writes as `session_replication_role = replica`, which checks no
/// foreign key.
async fn parent_child_as_plain_role(db: &str) -> Fixture {
    let (d, m) = Fixture::databases(
        db,
        &format!(
            "{}{}",
            common::PARENT_CHILD,
            common::plain_role("tandem_plain", db, &["parent", "child"])
        ),
    )
    .await;
    let text = common::connect_as(
        &Fixture::config_text(db, r#"tables = ["public.*"]"#),
        "tandem_plain",
        &["desktop", "mobile"],
    );
    Fixture::with_config(db, d, m, text).await
}

/// Each table is copied after the tables it references: `child` comes before `parent` in the
/// configured order, and its rows on each side reference that side's `parent` rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_is_copied_after_the_tables_its_foreign_keys_reference() {
    let fx = parent_child_as_plain_role("fk_order").await;
    common::parent_and_child_on_each_side(&fx.d, &fx.m).await;
    let run = fx.start().await;
    for t in ["parent", "child"] {
        fx.wait_equal(t, 30).await;
    }
    assert_eq!(
        Fixture::rows(&fx.m, "child").await,
        ["(10,1)", "(20,2)"],
        "the union on both sides"
    );
    run.stop().await;
}

/// A mirror deletes the target's rows the seed lacks after the rows that reference them: mobile's
/// own parent row 2 is referenced by its own child row 20 and by child row 10, which desktop
/// has too, pointing at its parent row 1, which mobile lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_deletes_a_row_after_the_rows_that_reference_it() {
    let fx = parent_child_as_plain_role("mirror_fk").await;
    common::parent_and_child_on_each_side(&fx.d, &fx.m).await;
    fx.m.batch_execute("INSERT INTO child VALUES (10, 2)")
        .await
        .unwrap();
    let (code, out, err) = run_tandem(
        &[
            "--config",
            fx.config_path.to_str().unwrap(),
            "snapshot",
            "--seed",
            "desktop",
            "--mirror",
        ],
        &[],
    );
    // Before: `update or delete on table "parent" violates foreign key constraint`.
    assert_eq!(code, 0, "{err}");
    for t in ["parent", "child"] {
        assert_eq!(
            Fixture::rows(&fx.m, t).await,
            Fixture::rows(&fx.d, t).await,
            "{t}"
        );
    }
    assert_eq!(Fixture::rows(&fx.m, "child").await, ["(10,1)"]);
    assert!(
        out.contains(
            "public.child: copied 1 rows from desktop: 0 inserted, 1 updated, 1 deleted on mobile"
        ) && out.contains(
            "public.parent: copied 1 rows from desktop: 0 inserted, 0 updated, 1 deleted on mobile"
        ),
        "{out}"
    );
}

/// The target's user triggers do not fire for the rows a copy writes, as for streamed rows (the
/// role may set `session_replication_role`): each side stamps `at` on its own writes only, and
/// the copy carries the seed's stamps across, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_keeps_the_seeds_values_where_a_trigger_of_the_target_would_stamp_its_own() {
    let schema = "CREATE TABLE notes (id int PRIMARY KEY, v text, at timestamptz);
         CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN NEW.at := clock_timestamp(); RETURN NEW; END $$;
         CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION stamp();";
    let fx = Fixture::new("copy_trigger", schema, r#"tables = ["public.notes"]"#).await;
    fx.d.batch_execute("INSERT INTO notes (id, v) VALUES (1, 'd'), (2, 'd')")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO notes (id, v) VALUES (2, 'm'), (3, 'm')")
        .await
        .unwrap();
    let d_before = Fixture::rows(&fx.d, "notes").await;
    let m_before = Fixture::rows(&fx.m, "notes").await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO notes (id, v) VALUES (4, 'd')")
        .await
        .unwrap();
    // Before: every copied row had the target's stamp of the copy's time, and never matched.
    fx.wait_equal("notes", 30).await;
    let after = Fixture::rows(&fx.d, "notes").await;
    assert_eq!(after.len(), 4, "{after:?}");
    // Desktop's rows 1 and 2 (the seed's version of 2) and mobile's 3, with the stamps they had.
    for row in [&d_before[0], &d_before[1], &m_before[1]] {
        assert!(after.contains(row), "{row} not in {after:?}");
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_key_merge_counts_equal_rows_and_mirror_copies_them_exactly() {
    // No key: the merge gives each side as many copies of a row as the side with more has; the
    // mirror gives the target exactly the seed's copies.
    let schema =
        "CREATE TABLE links (job int, note text); ALTER TABLE links REPLICA IDENTITY FULL;";
    let (d, m) = Fixture::databases("snap_keyless", schema).await;
    // Desktop: job 1 twice, 2 once, 3 once, (NULL, NULL) once. Mobile: job 1 once, 2 three
    // times, 4 once, (NULL, NULL) once.
    d.batch_execute(
        "INSERT INTO links VALUES (1, 'a'), (1, 'a'), (2, 'b'), (3, 'c'), (NULL, NULL)",
    )
    .await
    .unwrap();
    m.batch_execute(
        "INSERT INTO links VALUES (1, 'a'), (2, 'b'), (2, 'b'), (2, 'b'), (4, 'd'), (NULL, NULL)",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "snap_keyless",
        d,
        m,
        Fixture::config_text("snap_keyless", r#"tables = ["public.links"]"#),
    )
    .await;
    let before = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(counts(&before, "public.links"), (3, 2, 3, 0));
    let cfg = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(&["--config", cfg, "snapshot", "--seed", "desktop"], &[]);
    assert_eq!(code, 0, "{err}");
    // Log lines into a pipe carry no terminal colour codes.
    assert!(err.contains("INFO") && !err.contains('\x1b'), "{err:?}");
    assert!(
        out.contains("public.links: copied 5 rows from desktop: 2 inserted, 0 updated, 0 deleted on mobile; 3 copied back to desktop"),
        "{out}"
    );
    let union = [
        "(,)", "(1,a)", "(1,a)", "(2,b)", "(2,b)", "(2,b)", "(3,c)", "(4,d)",
    ];
    for c in [&fx.d, &fx.m] {
        assert_eq!(Fixture::rows(c, "links").await, union);
    }
    // Mirror from desktop after it dropped a copy of job 2 and job 4 behind tandem's back.
    fx.d.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'tandem', 'test'); \
         DELETE FROM links WHERE ctid = (SELECT min(ctid) FROM links WHERE job = 2); \
         DELETE FROM links WHERE job = 4; COMMIT;",
    )
    .await
    .unwrap();
    let (code, out, err) = run_tandem(
        &["--config", cfg, "snapshot", "--seed", "desktop", "--mirror"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "public.links: copied 6 rows from desktop: 0 inserted, 0 updated, 2 deleted on mobile"
        ),
        "{out}"
    );
    assert_eq!(
        Fixture::rows(&fx.m, "links").await,
        ["(,)", "(1,a)", "(1,a)", "(2,b)", "(2,b)", "(3,c)"]
    );
    assert_eq!(
        Fixture::rows(&fx.d, "links").await,
        Fixture::rows(&fx.m, "links").await
    );
}

async fn session_copying(c: &tokio_postgres::Client, column: &str) -> bool {
    Fixture::count(
        c,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tandem snapshot' \
             AND datname = current_database() AND state = 'active' AND query LIKE 'COPY pg_temp.tandem_stage%{column}%'"
        ),
    )
    .await
        > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_mid_copy_leaves_the_target_untouched_and_a_rerun_resumes() {
    let schema = "CREATE TABLE small (id int PRIMARY KEY, v text); CREATE TABLE big (id int PRIMARY KEY, payload text);";
    let (d, m) = Fixture::databases("snap_crash", schema).await;
    d.batch_execute(
        "INSERT INTO small SELECT g, 'd' FROM generate_series(1, 100) g;
         INSERT INTO big SELECT g, md5(g::text) || md5((g + 1)::text) FROM generate_series(1, 600000) g; ANALYZE big;",
    )
    .await
    .unwrap();
    m.batch_execute("INSERT INTO big SELECT g, 'mobile' FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let fx = Fixture::with_config(
        "snap_crash",
        d,
        m,
        Fixture::config_text("snap_crash", r#"tables = ["public.small", "public.big"]"#),
    )
    .await;
    let big_before = Fixture::rows(&fx.m, "big").await;
    let mut child = Command::new(tandem_bin())
        .args([
            "--config",
            fx.config_path.to_str().unwrap(),
            "snapshot",
            "--seed",
            "desktop",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !session_copying(&fx.m, "payload").await {
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "never caught the copy of big"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tandem snapshot' AND datname = current_database()", 0).await;
    // big: untouched. small: done before the crash.
    assert_eq!(Fixture::rows(&fx.m, "big").await, big_before);
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM small").await,
        100
    );
    let states: String =
        fx.m.query_one(
            "SELECT string_agg(table_name || '=' || state, ',' ORDER BY 1) FROM tandem.snapshots",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(states, "public.big=pending,public.small=done");

    // A change behind tandem's back shows whether small is redone (it must not be).
    fx.m.batch_execute("BEGIN; SELECT pg_logical_emit_message(true, 'tandem', 'test'); UPDATE small SET v = 'kept' WHERE id = 1; COMMIT;")
        .await
        .unwrap();
    let (code, out, err) = run_tandem(
        &[
            "--config",
            fx.config_path.to_str().unwrap(),
            "snapshot",
            "--seed",
            "desktop",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("public.small: already done by the interrupted run, skipped"),
        "{out}"
    );
    assert!(
        out.contains("public.big: copied 600000 rows from desktop: 599990 inserted, 10 updated"),
        "{out}"
    );
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM small WHERE v = 'kept'").await,
        1
    );
    let r = verify::verify(&fx.cfg, Some(&"public.big".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(counts(&r, "public.big"), (600_000, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_during_runs_initial_snapshot_are_neither_lost_nor_doubled() {
    let (d, m) = Fixture::databases("snap_live", SCHEMA).await;
    d.batch_execute("INSERT INTO jobs (id, title) SELECT g, 'd' FROM generate_series(1, 200000) g; ANALYZE jobs")
        .await
        .unwrap();
    m.batch_execute(
        "INSERT INTO jobs (id, title) SELECT g, 'm' FROM generate_series(300001, 300100) g",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "snap_live",
        d,
        m,
        Fixture::config_text("snap_live", r#"tables = ["public.jobs"]"#),
    )
    .await;
    let run = fx.start_nowait();
    // Writes on both sides while run copies: increments, inserts, deletes.
    let mut first_write_before_streaming = None;
    for i in 1..=300i64 {
        fx.d.execute("UPDATE jobs SET n = n + 1 WHERE id = $1", &[&(i * 500)])
            .await
            .unwrap();
        fx.d.execute(
            "INSERT INTO jobs (id, title) VALUES ($1, 'new on d')",
            &[&(400_000 + i)],
        )
        .await
        .unwrap();
        fx.m.execute(
            "INSERT INTO jobs (id, title) VALUES ($1, 'new on m')",
            &[&(500_000 + i)],
        )
        .await
        .unwrap();
        if i % 10 == 0 {
            fx.d.execute("DELETE FROM jobs WHERE id = $1", &[&(i * 500 + 1)])
                .await
                .unwrap();
        }
        first_write_before_streaming
            .get_or_insert(!run.status.from_desktop.streaming.load(Ordering::Relaxed));
    }
    assert_eq!(
        first_write_before_streaming,
        Some(true),
        "the writes were meant to overlap the snapshot"
    );
    let want = 200_000 + 100 + 300 + 300 - 30;
    for c in [&fx.d, &fx.m] {
        wait_count(120, c, "SELECT count(*) FROM jobs", want).await;
    }
    wait_for(60, "verify in sync", || async {
        verify::verify(&fx.cfg, None)
            .await
            .unwrap()
            .tables
            .iter()
            .all(|t| t.is_in_sync())
    })
    .await;
    // Each increment landed once.
    assert_eq!(
        Fixture::count(&fx.m, "SELECT sum(n)::int8 FROM jobs").await,
        300
    );
    let done_at = "SELECT updated_at::text FROM tandem.snapshots WHERE table_name = 'public.jobs' AND state = 'done'";
    let first: String = fx.m.query_one(done_at, &[]).await.unwrap().get(0);
    run.stop().await;
    // A restart does not snapshot again.
    let run = fx.start().await;
    run.stop().await;
    let second: String = fx.m.query_one(done_at, &[]).await.unwrap().get(0);
    assert_eq!(first, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_initial_snapshot_cut_off_by_the_server_is_tried_again() {
    let (d, m) = Fixture::databases("snap_cut", SCHEMA).await;
    d.batch_execute("INSERT INTO jobs (id, title) SELECT g, 'd' FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    let fx = Fixture::with_config(
        "snap_cut",
        d,
        m,
        Fixture::config_text("snap_cut", r#"tables = ["public.jobs"]"#),
    )
    .await;
    // The target's application locks the table, so the copy waits there with its transaction
    // open; the server then ends the copy's session, as a restart or failover does.
    let app = common::connect(&common::clusters().mobile.url("snap_cut")).await;
    app.batch_execute("BEGIN; LOCK TABLE jobs IN SHARE MODE")
        .await
        .unwrap();
    let copying =
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tandem snapshot' \
                   AND datname = current_database() AND wait_event_type = 'Lock' \
                   AND query LIKE 'COPY%FROM STDIN'";
    let run = fx.start_nowait();
    wait_count(60, &fx.m, copying, 1).await;
    let ended = Fixture::count(
        &fx.m,
        &copying.replace("count(*)", "count(pg_terminate_backend(pid))"),
    )
    .await;
    assert_eq!(ended, 1);
    // run neither exits nor forgets it: /health says why it has not started, while the next
    // attempt waits on the same lock.
    wait_for(30, "/health naming the interrupted snapshot", || async {
        assert!(
            !run.is_finished(),
            "run exited when its snapshot was cut off"
        );
        let (code, body) = tandem::metrics::health(&run.status);
        code == 503 && body.contains("initial snapshot interrupted") && body.contains("terminat")
    })
    .await;
    wait_count(30, &fx.m, copying, 1).await;
    // A stop asked for meanwhile is not held up by the copy (its transaction rolls back).
    tokio::time::timeout(Duration::from_secs(10), run.stop())
        .await
        .expect("a stop during the initial snapshot waited for the copy");
    // And the copy's session does not stay behind in the lock's queue (where it would hold up
    // the application's next lock of the table) until the application lets go.
    wait_count(10, &fx.m, copying, 0).await;
    app.batch_execute("ROLLBACK").await.unwrap();
    let run = fx.start_nowait();
    wait_count(60, &fx.m, "SELECT count(*) FROM jobs", 20_000).await;
    fx.d.batch_execute("INSERT INTO jobs (id, title) VALUES (20001, 'after the snapshot')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id = 20001", 1).await;
    let (code, body) = tandem::metrics::health(&run.status);
    assert!(code == 200 && !body.contains("not started"), "{body}");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_target_is_copied_into_directly_and_a_colliding_write_falls_back_to_the_merge() {
    let (d, m) = Fixture::databases("snap_direct", SCHEMA).await;
    d.batch_execute("INSERT INTO jobs (id, title) SELECT g, 'd' FROM generate_series(1, 50000) g")
        .await
        .unwrap();
    let fx = Fixture::with_config(
        "snap_direct",
        d,
        m,
        Fixture::config_text("snap_direct", r#"tables = ["public.jobs"]"#),
    )
    .await;
    // The target's application has a row with a key the seed has too, not yet committed: the
    // table looks empty, so the COPY goes straight into it and then waits on that row.
    let app = common::connect(&common::clusters().mobile.url("snap_direct")).await;
    app.batch_execute("BEGIN; INSERT INTO jobs (id, title) VALUES (25000, 'mobile app')")
        .await
        .unwrap();
    let (stdout, stderr) = snapshot_meeting(&fx, app, "COPY \"public\".\"jobs\"%FROM STDIN").await;
    assert!(
        stderr.contains("has a key the seed has too; copying through a staging table instead"),
        "{stderr}"
    );
    // The merge: the seed's version of the colliding row, every other row inserted once.
    assert!(
        stdout.contains("public.jobs: copied 50000 rows from desktop: 49999 inserted, 1 updated, 0 deleted on mobile"),
        "{stdout}"
    );
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(counts(&r, "public.jobs"), (50_000, 0, 0, 0));
}

/// Rows mobile's application changes while the merge runs, held by a transaction the merge's
/// UPDATE waits for: the merge, reading mobile as it was before that transaction, meets the
/// change and is made again over the same copy with a later read. Both rows take desktop's
/// version, and mobile's stream leaves the transaction out. Before (the merge read at one moment
/// and wrote under READ COMMITTED), the UPDATE gave row 1 desktop's version once the application
/// committed, while the stream sent the application's version to desktop: the sides differed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_the_target_changes_during_the_merge_end_the_same_on_both_sides() {
    let (d, m) = Fixture::databases("snap_merge_race", SCHEMA).await;
    d.batch_execute("INSERT INTO jobs (id, title) SELECT g, 'd' FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    // Not empty: the copy goes through the staging table and the merge.
    m.batch_execute("INSERT INTO jobs (id, title) VALUES (1, 'm')")
        .await
        .unwrap();
    let fx = Fixture::with_config(
        "snap_merge_race",
        d,
        m,
        Fixture::config_text("snap_merge_race", r#"tables = ["public.jobs"]"#),
    )
    .await;
    let app = common::connect(&common::clusters().mobile.url("snap_merge_race")).await;
    app.batch_execute(
        "BEGIN; UPDATE jobs SET title = 'mobile app' WHERE id = 1; \
         INSERT INTO jobs (id, title) VALUES (15000, 'mobile app')",
    )
    .await
    .unwrap();
    // The merge's UPDATE waits on the application's row 1.
    let (stdout, stderr) = snapshot_meeting(&fx, app, "UPDATE \"public\".\"jobs\"%").await;
    assert!(stderr.contains("merging again"), "{stderr}");
    // Rows 1 and 15000 took the seed's version; the other 19,998 were inserted once.
    assert!(
        stdout.contains("public.jobs: copied 20000 rows from desktop: 19998 inserted, 2 updated"),
        "{stdout}\n{stderr}"
    );
    let run = fx.start().await;
    fx.m.execute("INSERT INTO jobs (id, title) VALUES (30000, 'after')", &[])
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM jobs WHERE id = 30000", 1).await;
    run.stop().await;
    let changed = "SELECT string_agg(id || ' ' || title, ', ' ORDER BY id) FROM jobs \
                   WHERE id IN (1, 15000)";
    for c in [&fx.d, &fx.m] {
        let rows: String = c.query_one(changed, &[]).await.unwrap().get(0);
        assert_eq!(rows, "1 d, 15000 d");
    }
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(counts(&r, "public.jobs"), (20_001, 0, 0, 0));
}

/// A seed's row that collides with one of the target's on another unique constraint is no change
/// made during the merge: the snapshot stops at the second merge with PostgreSQL's error naming
/// the constraint, mobile unchanged (not after 21 merges, blaming the application).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collision_on_another_unique_constraint_stops_the_merge_with_its_own_error() {
    let schema = "CREATE TABLE jobs (id bigint PRIMARY KEY, title text, n int NOT NULL DEFAULT 0, \
                  CONSTRAINT jobs_title_key UNIQUE (title));";
    let (d, m) = Fixture::databases("snap_unique", schema).await;
    d.batch_execute("INSERT INTO jobs (id, title) VALUES (1, 'same'), (3, 'd')")
        .await
        .unwrap();
    m.batch_execute("INSERT INTO jobs (id, title) VALUES (2, 'same')")
        .await
        .unwrap();
    let fx = Fixture::with_config(
        "snap_unique",
        d,
        m,
        Fixture::config_text("snap_unique", r#"tables = ["public.jobs"]"#),
    )
    .await;
    let config = fx.config_path.to_str().unwrap();
    let (code, _, err) = run_tandem(&["--config", config, "snapshot", "--seed", "desktop"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("jobs_title_key"), "{err}");
    assert!(!err.contains("merges"), "{err}");
    // Once again as it was, once with rows rewritten (nothing differs here), then the hint.
    assert_eq!(err.matches("; merging again").count(), 2, "{err}");
    assert!(
        err.contains("a row only mobile has holds a value one of desktop's rows takes, and a merge keeps such rows: change or delete it on mobile, or make mobile an exact copy of desktop with `tandem snapshot --seed desktop --mirror`"),
        "{err}"
    );
    assert_eq!(Fixture::rows(&fx.m, "jobs").await, ["(2,same,0)"]);
}

/// Rows exchanging values of a unique constraint that is not their key (a list reordered, two
/// users' emails swapped), and a value the target's own row holds: no order of UPDATEs passes
/// PostgreSQL's row-by-row check. A merge and a mirror get them through, deleted and written
/// again in one statement: rows referencing them (NO ACTION) stay, and the target's own column
/// keeps its values. A key that would cascade the delete stops it, with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_exchanging_unique_values_are_snapshotted_in_one_statement() {
    let (d, m, text) = common::unique_swap_databases(
        "snap_swap",
        "tandem_snap_swap",
        "CREATE TABLE lists (id int PRIMARY KEY, list int NOT NULL, pos int NOT NULL, \
         UNIQUE (list, pos));",
        &["lists"],
    )
    .await;
    d.batch_execute(
        "INSERT INTO lists VALUES (1, 1, 1), (2, 1, 2), (3, 1, 3); \
         INSERT INTO users VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B'), (3, 'c@x', 'C'); \
         INSERT INTO orders VALUES (1, 1), (2, 2); \
         INSERT INTO tags VALUES (1, 'red'), (2, 'blue'); INSERT INTO post_tags VALUES (1, 1);",
    )
    .await
    .unwrap();
    // Mobile's rows: the list in another order, the emails swapped, c@x held by a user of
    // its own, the tags' names swapped; and a column of its own.
    m.batch_execute(
        "INSERT INTO lists VALUES (1, 1, 3), (2, 1, 1), (3, 1, 2); \
         INSERT INTO users VALUES (1, 'b@x', 'A', 7), (2, 'a@x', 'B', 8), (4, 'c@x', 'D', 9); \
         INSERT INTO orders VALUES (1, 1), (2, 2); \
         INSERT INTO tags VALUES (1, 'blue'), (2, 'red'); INSERT INTO post_tags VALUES (1, 1);",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config("snap_swap", d, m, text).await;
    let config = fx.config_path.to_str().unwrap();
    let snapshot = |more: &[&str]| {
        let mut args = vec!["--config", config, "snapshot", "--seed", "desktop"];
        args.extend(more);
        run_tandem(&args, &[])
    };
    let (code, _, err) = snapshot(&["--table", "public.lists"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("written again in one statement"), "{err}");
    assert_eq!(
        Fixture::rows(&fx.m, "lists").await,
        Fixture::rows(&fx.d, "lists").await
    );

    let (code, _, err) = snapshot(&["--table", "public.tags"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("which would set off post_tags_tag_id_fkey of post_tags (ON DELETE CASCADE); change the rows on mobile so that none holds a value desktop gives another"),
        "{err}"
    );
    assert_eq!(Fixture::rows(&fx.m, "post_tags").await, ["(1,1)"]);
    assert_eq!(Fixture::rows(&fx.m, "tags").await, ["(1,blue)", "(2,red)"]);

    // A merge keeps mobile's user 4, so desktop's user 3 cannot have c@x.
    let (code, _, err) = snapshot(&["--table", "public.users"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Key (email)=(c@x) already exists"), "{err}");
    assert!(
        err.contains("`tandem snapshot --seed desktop --mirror`"),
        "{err}"
    );
    let before = ["(1,b@x,A,7)", "(2,a@x,B,8)", "(4,c@x,D,9)"];
    assert_eq!(Fixture::rows(&fx.m, "users").await, before);

    fx.m.batch_execute("DROP TABLE post_tags; DROP TABLE tags")
        .await
        .unwrap();
    fx.d.batch_execute("DROP TABLE post_tags; DROP TABLE tags")
        .await
        .unwrap();
    // Every table: users first gets desktop's rows with nothing of its own deleted (orders
    // reference it), but for user 4, which holds c@x; then each table is mirrored.
    let (code, _, err) = snapshot(&["--mirror"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        Fixture::rows(&fx.m, "users").await,
        ["(1,a@x,A,7)", "(2,b@x,B,8)", "(3,c@x,C,)"]
    );
    assert_eq!(Fixture::rows(&fx.m, "orders").await, ["(1,1)", "(2,2)"]);
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(counts(&r, "public.users"), (3, 0, 0, 0));
    assert_eq!(counts(&r, "public.orders"), (2, 0, 0, 0));
    assert_eq!(counts(&r, "public.lists"), (3, 0, 0, 0));
}

/// A mirror's first pass, over tables others reference, frees a value a row only mobile has
/// holds by deleting that row; where foreign keys are checked (a plain role), rows of mobile's
/// that still reference it (the mirror deletes them later) stop it: it says which and what to do,
/// mobile unchanged, and once they are gone the mirror goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_names_a_row_holding_a_value_that_rows_still_reference() {
    let db = "snap_held_ref";
    let schema = format!(
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE); \
         CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL REFERENCES users); {}",
        common::plain_role("tandem_plain", db, &["users", "orders"])
    );
    let (d, m) = Fixture::databases(db, &schema).await;
    d.batch_execute("INSERT INTO users VALUES (3, 'c@x'); INSERT INTO orders VALUES (3, 3)")
        .await
        .unwrap();
    m.batch_execute("INSERT INTO users VALUES (4, 'c@x'); INSERT INTO orders VALUES (4, 4)")
        .await
        .unwrap();
    let text = common::connect_as(
        &Fixture::config_text(db, r#"tables = ["public.*"]"#),
        "tandem_plain",
        &["desktop", "mobile"],
    );
    let fx = Fixture::with_config(db, d, m, text).await;
    let config = fx.config_path.to_str().unwrap();
    let mirror = || {
        run_tandem(
            &[
                "--config", config, "snapshot", "--seed", "desktop", "--mirror",
            ],
            &[],
        )
    };
    let (code, _, err) = mirror();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("a row only mobile has holds a value one of desktop's rows takes, and rows of mobile's still reference it"),
        "{err}"
    );
    assert!(
        err.contains("Key (id)=(4) is still referenced from table \"orders\""),
        "{err}"
    );
    assert_eq!(Fixture::rows(&fx.m, "users").await, ["(4,c@x)"]);
    fx.m.batch_execute("DELETE FROM orders").await.unwrap();
    let (code, _, err) = mirror();
    assert_eq!(code, 0, "{err}");
    assert_eq!(Fixture::rows(&fx.m, "users").await, ["(3,c@x)"]);
    assert_eq!(Fixture::rows(&fx.m, "orders").await, ["(3,3)"]);
}

/// `tandem snapshot --seed desktop` while `app` holds an uncommitted row on mobile: once the
/// snapshot's statement like `query` waits on it, `app` commits. Returns stdout and stderr of the
/// snapshot, which must have succeeded.
async fn snapshot_meeting(
    fx: &Fixture,
    app: tokio_postgres::Client,
    query: &str,
) -> (String, String) {
    let child = Command::new(tandem_bin())
        .args(["--config", fx.config_path.to_str().unwrap()])
        .args(["snapshot", "--seed", "desktop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_count(
        60,
        &fx.m,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tandem snapshot' \
             AND datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '{query}'"
        ),
        1,
    )
    .await;
    app.batch_execute("COMMIT").await.unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

/// Changes desktop made between `setup` and the snapshot are in the copy; the stream, resuming
/// from before them, leaves them out. Each reached mobile's trigger once (the copy), and a row
/// mobile's application changed after the copy keeps that change on both sides (before: the
/// replayed older change set it back on mobile, while desktop took mobile's: the sides differed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_the_copy_holds_are_not_applied_again_by_the_stream() {
    let schema = format!("{SCHEMA}\n{}", common::audit_sql("jobs"));
    let (d, m) = Fixture::databases("snap_once", &schema).await;
    d.batch_execute("INSERT INTO jobs (id, title) SELECT g, 'd' FROM generate_series(1, 2000) g")
        .await
        .unwrap();
    let fx = Fixture::with_config(
        "snap_once",
        d,
        m,
        Fixture::config_text("snap_once", "tables = [\"public.jobs\"]"),
    )
    .await;
    // The update of 1,990 rows is streamed while in progress when replayed: its changes come to
    // a second session with no commit LSN yet, whose plain UPDATEs of rows the copy holds would
    // go through (that session left out nothing, the test failed).
    common::stream_from_a_few_hundred_rows(&fx.d).await;
    fx.d.batch_execute(
        "UPDATE jobs SET n = 1 WHERE id <= 1990;
         INSERT INTO jobs (id, title) SELECT g, 'd' FROM generate_series(2001, 2010) g;
         DELETE FROM jobs WHERE id > 1990;
         TRUNCATE audit;",
    )
    .await
    .unwrap();
    let config = fx.config_path.to_str().unwrap();
    let (code, _, err) = run_tandem(&["--config", config, "snapshot", "--seed", "desktop"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM audit WHERE op = 'INSERT'").await,
        1990
    );
    fx.m.execute("UPDATE jobs SET title = 'phone' WHERE id = 5", &[])
        .await
        .unwrap();
    let run = fx.start().await;
    fx.d.execute("INSERT INTO jobs (id, title) VALUES (10000, 'after')", &[])
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id = 10000", 1).await;
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
    assert!(common::streamed_txns(&fx.d, "snap_once_d").await >= 1);
    assert_eq!(
        Fixture::count(
            &fx.d,
            "SELECT count(*) FROM jobs WHERE id = 5 AND title = 'phone'"
        )
        .await,
        1
    );
    // Mobile's trigger: the copy's 1,990 inserts, its own update, the row inserted after.
    let ops: String =
        fx.m.query_one(
            "SELECT string_agg(op || ' ' || n, ', ' ORDER BY op) \
             FROM (SELECT op, count(*) n FROM audit GROUP BY op) a",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ops, "INSERT 1991, UPDATE 1");
}

/// The other way: changes mobile made between `setup` and the first `run` are in what the merge
/// read of mobile. It overwrote them with desktop's rows (desktop seeds) or copied mobile's own
/// rows to desktop, so mobile's stream leaves them out: both sides end with the merge's result,
/// and desktop's trigger sees only the row copied back (before: mobile's stream then sent its
/// update and delete to desktop, whose rows became mobile's old ones while mobile held desktop's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_the_merge_read_on_the_target_are_not_sent_back_by_its_stream() {
    let schema = format!(
        "{SCHEMA}\n{}\nINSERT INTO jobs (id, title) SELECT g, 'same' FROM generate_series(1, 10) g;",
        common::audit_sql("jobs")
    );
    let (d, m) = Fixture::databases("snap_back", &schema).await;
    let fx = Fixture::with_config(
        "snap_back",
        d,
        m,
        Fixture::config_text(
            "snap_back",
            "tables = [\"public.jobs\"]\ninitial_snapshot = false",
        ),
    )
    .await;
    fx.m.batch_execute(
        "UPDATE jobs SET title = 'phone' WHERE id = 5;
         DELETE FROM jobs WHERE id = 7;
         INSERT INTO jobs (id, title) VALUES (20, 'phone''s own');",
    )
    .await
    .unwrap();
    for c in [&fx.d, &fx.m] {
        c.batch_execute("TRUNCATE audit").await.unwrap();
    }
    let config = fx.config_path.to_str().unwrap();
    let (code, _, err) = run_tandem(&["--config", config, "snapshot", "--seed", "desktop"], &[]);
    assert_eq!(code, 0, "{err}");
    let run = fx.start().await;
    fx.m.execute("INSERT INTO jobs (id, title) VALUES (21, 'after')", &[])
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM jobs WHERE id = 21", 1).await;
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
    assert_eq!(
        Fixture::rows(&fx.d, "jobs").await,
        [
            "(1,same,0)",
            "(10,same,0)",
            "(2,same,0)",
            "(20,\"phone's own\",0)",
            "(21,after,0)",
            "(3,same,0)",
            "(4,same,0)",
            "(5,same,0)",
            "(6,same,0)",
            "(7,same,0)",
            "(8,same,0)",
            "(9,same,0)"
        ]
    );
    // Desktop's trigger: row 20 copied back, row 21 sent after.
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM audit").await,
        2,
        "{:?}",
        Fixture::rows(&fx.d, "audit").await
    );
}

/// A configured table other tables inherit from (`INHERITS`, as older office schemas partition):
/// its rows are its own, as native logical replication takes them. Before, a query of it read
/// its children's rows too: verify counted them, repair and the snapshot wrote them into the
/// parent a second time, a mirror deleted the target's children's rows, a `TRUNCATE ONLY` of the
/// parent emptied the target's children, and the publication held the children, which `run`
/// refused for ever as tables taken out of the config (`setup` made them so again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_others_inherit_from_is_synced_by_its_own_rows() {
    let schema = "CREATE TABLE parent (id int PRIMARY KEY, v text);
                  CREATE TABLE child (extra text) INHERITS (parent);
                  ALTER TABLE child ADD PRIMARY KEY (id);";
    let (d, m) = Fixture::databases("snap_inherit", schema).await;
    d.batch_execute("INSERT INTO parent VALUES (1, 'p'); INSERT INTO child VALUES (2, 'c', 'e')")
        .await
        .unwrap();
    m.batch_execute(
        "INSERT INTO parent VALUES (8, 'mobile only'); INSERT INTO child VALUES (7, 'mc', 'e')",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "snap_inherit",
        d,
        m,
        Fixture::config_text("snap_inherit", r#"tables = ["public.parent"]"#),
    )
    .await;
    let cfg = fx.config_path.to_str().unwrap();
    let own = |c| async move { Fixture::rows(c, "ONLY parent").await };
    let children = |c| async move { Fixture::rows(c, "child").await };
    let before = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(counts(&before, "public.parent"), (0, 1, 1, 0));
    let (code, out, err) = run_tandem(
        &["--config", cfg, "snapshot", "--seed", "desktop", "--mirror"],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(own(&fx.m).await, ["(1,p)"]);
    assert_eq!(children(&fx.m).await, ["(7,mc,e)"]);
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO child VALUES (4, 'c', 'e'); UPDATE child SET v = 'cc' WHERE id = 2;
         INSERT INTO parent VALUES (3, 'p')",
    )
    .await
    .unwrap();
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM ONLY parent WHERE id = 3",
        1,
    )
    .await;
    assert_eq!(own(&fx.m).await, own(&fx.d).await);
    assert_eq!(children(&fx.m).await, ["(7,mc,e)"]);
    // Drift behind tandem's back, repaired: the parent's own rows only.
    fx.m.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'tandem', 'test');
         UPDATE parent SET v = 'drift' WHERE id = 1; COMMIT;",
    )
    .await
    .unwrap();
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(counts(&r, "public.parent"), (1, 0, 0, 1));
    common::repair_from_desktop(cfg);
    assert_eq!(own(&fx.m).await, own(&fx.d).await);
    assert_eq!(children(&fx.m).await, ["(7,mc,e)"]);
    // TRUNCATE ONLY the parent: the children keep their rows on both sides.
    fx.d.batch_execute("TRUNCATE ONLY parent; INSERT INTO parent VALUES (9, 'after')")
        .await
        .unwrap();
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM ONLY parent WHERE id = 9",
        1,
    )
    .await;
    assert_eq!(own(&fx.m).await, ["(9,after)"]);
    assert_eq!(children(&fx.m).await, ["(7,mc,e)"]);
    run.stop().await;
}
