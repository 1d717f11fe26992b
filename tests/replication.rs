//! Replication scenarios against real PostgreSQL: both directions at once, order, keys, TOAST,
//! truncate, per-table direction, no echo, and restart from the checkpoint.

mod common;

use common::{
    audit_sql, clusters, connect, random_history, run_tandem, scrape,
    stream_from_a_few_hundred_rows, streamed_txns, wait_count, wait_for, Fixture, Running,
    STREAMED_SESSIONS,
};
use tokio_postgres::Client;

/// `items`, replicated desktop → mobile only.
const ITEMS_ONE_WAY: &str =
    "tables = [\"public.items\"]\n[replication.direction]\n\"public.items\" = \"desktop_to_mobile\"";

const JOBS: &str = "
CREATE TABLE jobs (id bigint PRIMARY KEY, title text NOT NULL, status text, n int);
CREATE TABLE tasks (id bigint PRIMARY KEY, job_id bigint NOT NULL REFERENCES jobs (id), note text);
CREATE TABLE scratch (id int PRIMARY KEY, v text);";

/// 300 inserts from `base + 1`, with updates and deletes mixed in, one transaction each.
async fn writer(c: &Client, base: i64) {
    for i in 1..=300i64 {
        let id = base + i;
        c.execute(
            "INSERT INTO jobs (id, title, n) VALUES ($1, 'job', 0)",
            &[&id],
        )
        .await
        .unwrap();
        if i % 3 == 0 {
            c.execute(
                "UPDATE jobs SET status = 'done', n = n + 1 WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        }
        if i % 5 == 0 {
            c.execute("DELETE FROM jobs WHERE id = $1", &[&(id - 1)])
                .await
                .unwrap();
        }
    }
}

const JOBS_TABLES: &str = r#"tables = ["public.jobs", "public.tasks", "public.scratch"]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inserts_updates_deletes_and_truncate_flow_both_ways_at_once() {
    let fx = Fixture::new("flow_both", JOBS, JOBS_TABLES).await;
    let run = fx.start().await;
    // Disjoint keys: desktop writes 1..=300, mobile 10001..=10300, concurrently.
    let (d, m) = (&fx.d, &fx.m);
    tokio::join!(writer(d, 0), writer(m, 10_000));
    fx.wait_equal("jobs", 60).await;
    let rows = Fixture::count(d, "SELECT count(*) FROM jobs").await;
    assert_eq!(
        rows,
        2 * (300 - 60),
        "each side's inserts minus its deletes, on both sides"
    );
    assert_eq!(
        Fixture::count(
            m,
            "SELECT count(*) FROM jobs WHERE status = 'done' AND n = 1"
        )
        .await,
        2 * 80
    );

    // Truncate on one side empties the other; then writes after it still flow.
    d.batch_execute("INSERT INTO scratch SELECT g, 'x' FROM generate_series(1, 50) g")
        .await
        .unwrap();
    fx.wait_equal("scratch", 30).await;
    assert_eq!(Fixture::count(m, "SELECT count(*) FROM scratch").await, 50);
    m.batch_execute("TRUNCATE scratch; INSERT INTO scratch VALUES (7, 'after truncate')")
        .await
        .unwrap();
    wait_for(30, "truncate reaches desktop", || async {
        Fixture::rows(d, "scratch").await == vec!["(7,\"after truncate\")".to_string()]
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_table_transaction_with_foreign_key_and_primary_key_change() {
    let fx = Fixture::new("fk_and_pk", JOBS, JOBS_TABLES).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "BEGIN;
         INSERT INTO jobs VALUES (1, 'parent', 'open', 0);
         INSERT INTO tasks VALUES (1, 1, 'child a'), (2, 1, 'child b');
         UPDATE jobs SET title = 'parent v2' WHERE id = 1;
         COMMIT;",
    )
    .await
    .unwrap();
    fx.wait_equal("tasks", 30).await;
    fx.wait_equal("jobs", 30).await;
    assert_eq!(
        Fixture::rows(&fx.m, "jobs").await,
        vec!["(1,\"parent v2\",open,0)"]
    );

    // Primary-key change on mobile: the old key disappears on desktop, the new one appears.
    fx.m.batch_execute(
        "INSERT INTO jobs VALUES (5, 'renumber me', null, 1); UPDATE jobs SET id = 6 WHERE id = 5;",
    )
    .await
    .unwrap();
    wait_for(30, "key change reaches desktop", || async {
        Fixture::count(
            &fx.d,
            "SELECT count(*) FROM jobs WHERE id = 6 AND title = 'renumber me'",
        )
        .await
            == 1
            && Fixture::count(&fx.d, "SELECT count(*) FROM jobs WHERE id = 5").await == 0
    })
    .await;
    // A key swap through a temporary key inside one transaction.
    fx.d.batch_execute(
        "INSERT INTO jobs VALUES (20, 'a', null, 0), (21, 'b', null, 0);
         BEGIN; UPDATE jobs SET id = -1 WHERE id = 20; UPDATE jobs SET id = 20 WHERE id = 21;
                UPDATE jobs SET id = 21 WHERE id = -1; COMMIT;",
    )
    .await
    .unwrap();
    fx.wait_equal("jobs", 30).await;
    assert_eq!(
        Fixture::rows(&fx.m, "jobs")
            .await
            .into_iter()
            .filter(|r| r.starts_with("(2"))
            .collect::<Vec<_>>(),
        vec!["(20,b,,0)", "(21,a,,0)"]
    );
    run.stop().await;
}

/// Each row's id and how its `body` is stored (`none`: not compressed).
async fn compression(c: &Client) -> Option<String> {
    c.query_one(
        "SELECT string_agg(id || ':' || coalesce(pg_column_compression(body), 'none'), ' ' ORDER BY id) \
         FROM docs",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A URL's `options` reach the sessions tandem applies with: `default_toast_compression=lz4` in
/// mobile's URL (README, Performance: W4 is bound by the target compressing large values with
/// pglz) stores the large values tandem writes on mobile with lz4, while mobile's own writes and
/// what tandem writes on desktop keep each server's default, pglz.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_urls_options_reach_the_apply_sessions() {
    let name = "url_lz4";
    let (d, m) =
        Fixture::databases(name, "CREATE TABLE docs (id int PRIMARY KEY, body text);").await;
    let mobile = clusters().mobile.url(name);
    let text = Fixture::config_text(name, r#"tables = ["public.docs"]"#).replace(
        &format!("\"{mobile}\""),
        &format!("\"{mobile}?options=-c%20default_toast_compression%3Dlz4\""),
    );
    assert!(text.contains("%3Dlz4"), "{text}");
    let fx = Fixture::with_config(name, d, m, text).await;
    let run = fx.start().await;
    // 180 kB that compress well, so the server compresses them whichever way.
    let body =
        |id: i32| format!("INSERT INTO docs SELECT {id}, repeat('row {id} of docs ', 10000)");
    fx.d.batch_execute(&body(1)).await.unwrap();
    fx.m.batch_execute(&body(2)).await.unwrap();
    wait_for(30, "both rows on both sides", || async {
        compression(&fx.d).await.is_some_and(|s| s.contains("2:"))
            && compression(&fx.m).await.is_some_and(|s| s.contains("1:"))
    })
    .await;
    assert_eq!(compression(&fx.m).await.as_deref(), Some("1:lz4 2:pglz"));
    assert_eq!(compression(&fx.d).await.as_deref(), Some("1:pglz 2:pglz"));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_megabyte_toasted_value_survives_an_update_of_another_column() {
    let fx = Fixture::new(
        "toast",
        "CREATE TABLE docs (id int PRIMARY KEY, body text, rev int);",
        r#"tables = ["public.docs"]"#,
    )
    .await;
    let run = fx.start().await;
    // 1 MiB of hex that does not compress, so it is stored out of line.
    fx.d.batch_execute(
        "INSERT INTO docs SELECT 1, string_agg(md5(g::text), ''), 1 FROM generate_series(1, 32768) g",
    )
    .await
    .unwrap();
    let digest = "SELECT md5(body) || ':' || length(body) || ':' || rev FROM docs WHERE id = 1";
    let want_d: String = fx.d.query_one(digest, &[]).await.unwrap().get(0);
    wait_for(30, "document on mobile", || async {
        fx.m.query_opt(digest, &[])
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0))
            == Some(want_d.clone())
    })
    .await;
    // Only `rev` changes: pgoutput sends `body` as unchanged-TOAST, and mobile must keep its copy.
    fx.d.batch_execute("UPDATE docs SET rev = 2 WHERE id = 1")
        .await
        .unwrap();
    let want: String = fx.d.query_one(digest, &[]).await.unwrap().get(0);
    assert!(want.ends_with(":1048576:2"), "{want}");
    wait_for(30, "rev 2 on mobile with the body intact", || async {
        fx.m.query_one(digest, &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            == want
    })
    .await;
    // And back the other way.
    fx.m.batch_execute("UPDATE docs SET rev = 3 WHERE id = 1")
        .await
        .unwrap();
    let want: String = fx.m.query_one(digest, &[]).await.unwrap().get(0);
    wait_for(30, "rev 3 on desktop with the body intact", || async {
        fx.d.query_one(digest, &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            == want
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_type_round_trips_exactly_both_ways() {
    let schema = "
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE TABLE every_type (
            id int PRIMARY KEY,
            i2 smallint, i4 int, i8 bigint,
            num numeric, num_s numeric(40, 20),
            f4 real, f8 double precision,
            t text, vc varchar(10), ch char(5),
            bin bytea, b bool, u uuid, j json, jb jsonb,
            d date, tm time, ts timestamp, tstz timestamptz, iv interval,
            ai int[], at text[], m mood, am mood[],
            g bigint GENERATED ALWAYS AS (i4::bigint * 2) STORED,
            ident bigint GENERATED ALWAYS AS IDENTITY
        );";
    let fx = Fixture::new("types", schema, r#"tables = ["public.every_type"]"#).await;
    let run = fx.start().await;
    let values = |id: i32| {
        format!(
            "INSERT INTO every_type (id, i2, i4, i8, num, num_s, f4, f8, t, vc, ch, bin, b, u, j, jb, d, tm, ts, tstz, iv, ai, at, m, am) VALUES
            ({id}, -32768, 2147483647, -9223372036854775808, 'NaN', 12345678901234567890.12345678901234567890,
             'NaN', 'Infinity', E'multi\\nline \"quoted\" \\\\ back', 'ten chars!', 'ab',
             '\\x00ff10', true, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{\"a\": 1,  \"a\": [1, 2.50]}}', '{{\"z\": null, \"b\": [true]}}',
             '0044-03-15 BC', '23:59:59.999999', '2024-02-29 12:34:56.789012', '2024-06-01 01:02:03.456+05:30', '1 year 2 mons -3 days 04:05:06.7',
             '{{1,NULL,-3}}', '{{\"a,b\",NULL,\"\",\"q\\\"uote\"}}', 'happy', '{{sad,happy}}'),
            ({id1}, 0, 0, 0, 0.000000000000000000000000000001, -0.00000000000000000001, '-Infinity', '-0', '', '', '',
             '\\x', false, '00000000-0000-0000-0000-000000000000', '[]', '{{}}', 'infinity', '00:00', '-infinity', 'infinity', '0',
             '{{}}', '{{}}', 'sad', '{{}}'),
            ({id2}, 1, 1, 1, 3.14159, 1.5, 1.17549435e-38, 2.2250738585072014e-308, 'ünïcødé ✓', 'x', 'x',
             NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
            id1 = id + 1,
            id2 = id + 2
        )
    };
    fx.d.batch_execute(&values(1)).await.unwrap();
    fx.m.batch_execute(&values(101)).await.unwrap();
    // A row of NULLs except the key, and an update of every column.
    fx.d.batch_execute("INSERT INTO every_type (id) VALUES (50)")
        .await
        .unwrap();
    fx.m.batch_execute("UPDATE every_type SET f8 = 0.1::float8 + 0.2::float8, f4 = 1.1, num = -1e-10, iv = '-1 day' WHERE id = 101")
        .await
        .unwrap();
    wait_for(60, "all 8 rows on both sides", || async {
        Fixture::count(&fx.d, "SELECT count(*) FROM every_type").await == 7
            && Fixture::count(&fx.m, "SELECT count(*) FROM every_type").await == 7
    })
    .await;
    fx.wait_equal("every_type", 30).await;
    // The text form is exact for every type here (floats print shortest-exact), and the
    // generated column is recomputed on each side, the identity value carried over as given.
    let rows = Fixture::rows(&fx.d, "every_type").await;
    assert!(
        rows.iter().any(|r| r.contains(",NaN,Infinity,")
            && r.contains("12345678901234567890.12345678901234567890")),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.contains("0.30000000000000004")),
        "{rows:?}"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_table_direction_is_honoured() {
    let schema = "CREATE TABLE climaster (id int PRIMARY KEY, name text);
                  CREATE TABLE notes (id int PRIMARY KEY, body text);";
    let fx = Fixture::new(
        "direction",
        schema,
        "tables = [\"public.climaster\", \"public.notes\"]\n[replication.direction]\n\"public.climaster\" = \"desktop_to_mobile\"",
    )
    .await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO climaster VALUES (1, 'from desktop')")
        .await
        .unwrap();
    fx.m.batch_execute(
        "INSERT INTO climaster VALUES (2, 'mobile only'); INSERT INTO notes VALUES (1, 'sentinel')",
    )
    .await
    .unwrap();
    // The sentinel was committed after the mobile climaster row: once it is on desktop, the
    // climaster row would be there too if it flowed.
    wait_count(30, &fx.d, "SELECT count(*) FROM notes", 1).await;
    wait_count(30, &fx.m, "SELECT count(*) FROM climaster WHERE id = 1", 1).await;
    assert_eq!(
        Fixture::rows(&fx.d, "climaster").await,
        vec!["(1,\"from desktop\")"]
    );
    assert_eq!(
        Fixture::rows(&fx.m, "climaster").await,
        vec!["(1,\"from desktop\")", "(2,\"mobile only\")"]
    );
    run.stop().await;
}

const ROLLBACKS: &str =
    "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()";

/// Mobile's `items` reaches `want` while replication keeps running, after a group was rolled
/// back there (more rollbacks than `before`): a plain statement was abandoned and redone.
async fn redone_as_upserts(fx: &Fixture, run: &Running, before: i64, want: &[&str]) {
    wait_for(
        60,
        "the abandoned transaction and the next one on mobile",
        || async { Fixture::rows(&fx.m, "items").await == want },
    )
    .await;
    assert!(!run.is_finished(), "replication keeps running");
    wait_for(30, "the abandoned group in mobile's statistics", || async {
        Fixture::count(&fx.m, ROLLBACKS).await > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_insert_meeting_a_row_already_on_the_target_is_applied_as_an_upsert() {
    // A large transaction's inserts go out as plain INSERTs (no ON CONFLICT); a row the target
    // already has must not stop replication or lose the rest of the transaction.
    let fx = Fixture::new(
        "collide",
        "CREATE TABLE items (id int PRIMARY KEY, v text);",
        // Batches of two rows: the three-row transaction below is "large" (see `Batch::large`).
        &format!("batch_rows = 2\n{ITEMS_ONE_WAY}"),
    )
    .await;
    fx.m.batch_execute("INSERT INTO items VALUES (2, 'mobile had it')")
        .await
        .unwrap();
    let before = Fixture::count(&fx.m, ROLLBACKS).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "BEGIN; INSERT INTO items VALUES (1, 'a'), (2, 'b'), (3, 'c'); COMMIT; \
         INSERT INTO items VALUES (4, 'after')",
    )
    .await
    .unwrap();
    // The plain INSERT failed and its group was rolled back, then applied again as upserts.
    redone_as_upserts(&fx, &run, before, &["(1,a)", "(2,b)", "(3,c)", "(4,after)"]).await;
    // Later inserts of that table still arrive (as upserts now).
    fx.d.batch_execute("INSERT INTO items VALUES (5, 'later')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items WHERE id = 5", 1).await;
    fx.assert_slots_within_checkpoints().await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_commit_waits_for_the_counts_of_its_plain_updates() {
    // 20,000 changes close a group at its transaction's commit, right after its last batch is
    // sent: that batch's count (a plain UPDATE's) must be known before the commit goes out
    // behind it, or the group commits without the row the UPDATE missed.
    let fx = Fixture::new(
        "missed_last",
        "CREATE TABLE items (id int PRIMARY KEY, v text);",
        ITEMS_ONE_WAY,
    )
    .await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO items SELECT g, 'first' FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items", 20000).await;
    // Mobile loses the last row behind tandem's back (no table flows mobile → desktop).
    fx.m.batch_execute("DELETE FROM items WHERE id = 20000")
        .await
        .unwrap();
    fx.d.batch_execute("UPDATE items SET v = 'second'")
        .await
        .unwrap();
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM items WHERE v = 'second'",
        20000,
    )
    .await;
    assert!(!run.is_finished(), "replication keeps running");
    fx.assert_slots_within_checkpoints().await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_sent_behind_a_commit_the_target_refuses_is_not_committed_either() {
    // The target's first commit of tandem's fails, 0.3 s after it was sent (a deferred trigger:
    // as a deferred foreign key fails). The next groups are sent behind it meanwhile. A failed
    // COMMIT ends its transaction, so the server runs what follows in a new one: unguarded,
    // those groups committed and moved the checkpoint past the refused one's rows, lost.
    let fx = Fixture::new(
        "refused_commit",
        "CREATE TABLE items (id int PRIMARY KEY, v text);",
        ITEMS_ONE_WAY,
    )
    .await;
    common::fail_first_apply_commit(&fx.m, "items", 0.3).await;
    let run = fx.start().await;
    // One transaction, then four more while its group's commit is on its way: each a group of
    // its own, committed without waiting (the source is quiet 10 ms after each).
    for id in 1..=5i32 {
        fx.d.execute("INSERT INTO items VALUES ($1, 'd')", &[&id])
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    }
    wait_count(30, &fx.m, "SELECT count(*) FROM items", 5).await;
    assert!(
        Fixture::count(&fx.m, "SELECT last_value FROM once").await >= 2,
        "the first commit failed and its rows were applied again"
    );
    assert!(!run.is_finished(), "replication keeps running");
    fx.assert_slots_within_checkpoints().await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_of_a_row_missing_on_the_target_is_applied_as_an_upsert() {
    // A large transaction's whole-row updates go out as plain UPDATEs (no ON CONFLICT); a row the
    // target lacks must still end up there, with nothing of the transaction lost or doubled.
    let fx = Fixture::new(
        "missed",
        "CREATE TABLE items (id int PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);",
        // Batches of two rows: the four-row transaction below is "large" (see `Batch::large`).
        &format!("batch_rows = 2\n{ITEMS_ONE_WAY}"),
    )
    .await;
    // Counts every change the target's rows take, to show the rolled-back group left nothing.
    fx.m.batch_execute(&audit_sql("items")).await.unwrap();
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO items SELECT g, 'first', 0 FROM generate_series(1, 4) g")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items", 4).await;
    // Mobile loses row 3 behind tandem's back (no table flows mobile → desktop).
    fx.m.batch_execute("DELETE FROM items WHERE id = 3")
        .await
        .unwrap();
    let before = Fixture::count(&fx.m, ROLLBACKS).await;
    fx.d.batch_execute(
        "UPDATE items SET v = 'second', n = n + 1; INSERT INTO items VALUES (5, 'after', 0)",
    )
    .await
    .unwrap();
    // The plain UPDATE missed row 3 and its group was rolled back, then applied again as upserts.
    let want = [
        "(1,second,1)",
        "(2,second,1)",
        "(3,second,1)",
        "(4,second,1)",
        "(5,after,0)",
    ];
    redone_as_upserts(&fx, &run, before, &want).await;
    // 4 inserts, mobile's delete, then 4 upserts (row 3 recreated) and 1 insert: each once.
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM audit").await,
        10
    );
    fx.assert_slots_within_checkpoints().await;
    run.stop().await;
}

/// `items` flowing desktop → mobile, where only mobile refuses `v = 'bad'` (CHECK `no_bad`).
async fn refusing(name: &str) -> Fixture {
    let fx = Fixture::new(
        name,
        "CREATE TABLE items (id int PRIMARY KEY, v text);",
        ITEMS_ONE_WAY,
    )
    .await;
    fx.m.batch_execute("ALTER TABLE items ADD CONSTRAINT no_bad CHECK (v <> 'bad')")
        .await
        .unwrap();
    fx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadlock_with_an_application_on_the_target_is_retried_not_a_refusal() {
    // tandem holds a's row and waits for b's, which an application transaction on mobile holds
    // while it waits for a's: the server ends tandem's transaction (40P01). That is not a row
    // the target refuses: the direction starts over from its checkpoint and applies it again.
    let fx = Fixture::new(
        "deadlock",
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY, v text);",
        "tables = [\"public.a\", \"public.b\"]\n[replication.direction]\n\
         \"public.a\" = \"desktop_to_mobile\"\n\"public.b\" = \"desktop_to_mobile\"",
    )
    .await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO a VALUES (1, 'd0'); INSERT INTO b VALUES (1, 'd0')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM b", 1).await;
    let app = common::connect(&clusters().mobile.url("deadlock")).await;
    // The application waits longer before checking for a deadlock, so tandem's session is the
    // one the server ends.
    app.batch_execute("SET deadlock_timeout = '60s'; BEGIN; UPDATE b SET v = 'app' WHERE id = 1")
        .await
        .unwrap();
    fx.d.batch_execute(
        "BEGIN; UPDATE a SET v = 'd1' WHERE id = 1; UPDATE b SET v = 'd1' WHERE id = 1; COMMIT",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, &common::apply_lock_waits("deadlock"), 1).await;
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        app.batch_execute("UPDATE a SET v = 'app' WHERE id = 1; COMMIT"),
    )
    .await
    .expect("the server ends tandem's transaction, not the application's")
    .unwrap();
    wait_for(60, "desktop's transaction applied again", || async {
        assert!(!run.is_finished(), "run stopped on the deadlock");
        Fixture::rows(&fx.m, "a").await == ["(1,d1)"]
            && Fixture::rows(&fx.m, "b").await == ["(1,d1)"]
    })
    .await;
    assert!(
        run.status
            .from_desktop
            .starts
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2,
        "the direction started over"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stricter_default_isolation_on_the_target_does_not_fail_writes_to_rows_an_application_changed(
) {
    // A database set to `repeatable read` for its application: tandem's write of a row an
    // application changed (and committed) while tandem waited for it failed with "could not
    // serialize access", and the direction started over. tandem's sessions read committed, as
    // PostgreSQL's default, and the write goes through the first time.
    let fx = Fixture::new(
        "isolation",
        common::ROWS_A,
        "tables = [\"public.a\"]\n[replication.direction]\n\"public.a\" = \"desktop_to_mobile\"",
    )
    .await;
    fx.m.batch_execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = \
         ''repeatable read''', current_database()); END $$",
    )
    .await
    .unwrap();
    let run = fx.start().await;
    let (app, _) = common::tandem_waits_on_an_application(&fx).await;
    app.batch_execute("COMMIT").await.unwrap();
    wait_for(30, "desktop's update applied", || async {
        Fixture::rows(&fx.m, "a").await == ["(1,d1)", "(2,d1)"]
    })
    .await;
    assert_eq!(
        run.status
            .from_desktop
            .starts
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the direction did not start over"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn xml_content_reaches_a_target_whose_database_takes_xml_as_documents() {
    // `xmloption = document` set on mobile's database for its application: desktop's xml
    // content (text around an element, as `xmloption = content` takes it, the default) was
    // refused as "invalid XML document", for the initial snapshot's copy and the stream alike.
    // tandem's sessions take xml as content, as pg_dump's do (a document is content too).
    let (d, m) = Fixture::databases(
        "xml_doc",
        "CREATE TABLE docs (id int PRIMARY KEY, body xml);",
    )
    .await;
    m.batch_execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET xmloption = document', \
         current_database()); END $$",
    )
    .await
    .unwrap();
    d.batch_execute("INSERT INTO docs VALUES (1, 'copied <b>bold</b>')")
        .await
        .unwrap();
    let fx = Fixture::with_config(
        "xml_doc",
        d,
        m,
        Fixture::config_text("xml_doc", "tables = [\"public.docs\"]"),
    )
    .await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO docs VALUES (2, 'streamed <i>it</i>'), (3, '<doc/>')")
        .await
        .unwrap();
    wait_for(30, "desktop's xml on mobile", || async {
        Fixture::rows(&fx.m, "docs").await.len() == 3
    })
    .await;
    assert_eq!(
        Fixture::rows(&fx.m, "docs").await,
        [
            "(1,\"copied <b>bold</b>\")",
            "(2,\"streamed <i>it</i>\")",
            "(3,<doc/>)"
        ]
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_while_the_target_waits_on_an_application_lock_cancels_the_wait() {
    // A stop (Ctrl-C, a deploy) must not wait for the application, and must not leave tandem's
    // session behind on the server, waiting with the rows it already locked.
    let fx = Fixture::new(
        "stop_lock",
        common::ROWS_A,
        "tables = [\"public.a\"]\n[replication.direction]\n\"public.a\" = \"desktop_to_mobile\"",
    )
    .await;
    let run = fx.start().await;
    let (app, waiting) = common::tandem_waits_on_an_application(&fx).await;
    let asked = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(20), run.stop())
        .await
        .expect("the stop waited for the application's lock");
    let took = asked.elapsed();
    // Cancelled, rolled back and gone, while the application still holds its row.
    wait_count(10, &fx.m, &waiting, 0).await;
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        app.batch_execute("UPDATE a SET v = 'app' WHERE id = 1"),
    )
    .await
    .expect("tandem's rolled-back group still held row 1")
    .unwrap();
    app.batch_execute("ROLLBACK").await.unwrap();
    // Nothing lost: the next run applies both updates from the checkpoint.
    let run = fx.start().await;
    wait_for(30, "both updates applied after the restart", || async {
        Fixture::rows(&fx.m, "a").await == ["(1,d1)", "(2,d1)"]
    })
    .await;
    run.stop().await;
    eprintln!("stop returned after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_streamed_session_holding_rows_is_ended_by_the_next_main_session() {
    // A streamed transaction's session that the network cut off stays on the target, inside its
    // transaction, holding its rows. When that transaction comes again whole (not streamed, so
    // no new streamed session ends the old one), the direction's main session would wait on
    // those rows forever: it must end the stale session of either kind when it connects.
    let schema = "CREATE TABLE a (id int PRIMARY KEY, v text);";
    let (d, m) = Fixture::databases("stale_streamed", schema).await;
    for c in [&d, &m] {
        c.batch_execute("INSERT INTO a VALUES (1, 'd0')")
            .await
            .unwrap();
    }
    let fx = Fixture::with_config(
        "stale_streamed",
        d,
        m,
        Fixture::config_text(
            "stale_streamed",
            "tables = [\"public.a\"]\ninitial_snapshot = false",
        ),
    )
    .await;
    let name = format!(
        "tandem apply D>M streamed {} gone:1",
        tandem::lease::pair_key(&fx.cfg)
    );
    let (stale, conn) = tokio_postgres::connect(
        &format!(
            "{}?application_name={}",
            clusters().mobile.url("stale_streamed"),
            name.replace(' ', "%20").replace('>', "%3E")
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    stale
        .batch_execute("BEGIN; UPDATE a SET v = 'stale' WHERE id = 1")
        .await
        .unwrap();
    let run = fx.start().await;
    fx.d.batch_execute("UPDATE a SET v = 'd1' WHERE id = 1")
        .await
        .unwrap();
    wait_for(
        30,
        "desktop's update applied past the stale session",
        || async { Fixture::rows(&fx.m, "a").await == ["(1,d1)"] },
    )
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_the_target_rejects_stops_replication_naming_the_constraint() {
    // The failing batch is followed by others already sent (pipelined): the error must be the
    // rejected row's, not "current transaction is aborted" from the ones after it.
    let fx = refusing("rejects").await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO items SELECT g, CASE WHEN g = 10 THEN 'bad' ELSE 'ok' END \
         FROM generate_series(1, 7000) g",
    )
    .await
    .unwrap();
    let e = run.failure().await;
    assert!(e.contains("no_bad") && e.contains("items"), "{e}");
    assert!(!e.contains("current transaction is aborted"), "{e}");
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM items").await,
        0,
        "nothing of the transaction is applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_row_followed_by_a_table_not_written_before_is_named_at_the_commit() {
    // An office's room bookings may not overlap (an exclusion constraint). Mobile holds a
    // booking of its own; desktop books the same hour and, in the same transaction, writes a
    // table tandem had not written yet. The booking is sent ahead, then the note's statement is
    // prepared at the group's commit: that is refused as "current transaction is aborted", and
    // was the error `run` stopped with, naming neither the booking nor a transaction to skip.
    let fx = Fixture::new(
        "refused_then_prepare",
        "CREATE TABLE booking (id int PRIMARY KEY, during tstzrange, \
           EXCLUDE USING gist (during WITH &&)); \
         CREATE TABLE notes (id int PRIMARY KEY, v text);",
        "tables = [\"public.booking\", \"public.notes\"]\n[replication.direction]\n\
         \"public.booking\" = \"desktop_to_mobile\"\n\"public.notes\" = \"desktop_to_mobile\"",
    )
    .await;
    fx.start().await.stop().await;
    fx.m.batch_execute(
        "INSERT INTO booking VALUES (1, '[2026-01-01 10:00+00,2026-01-01 11:00+00)')",
    )
    .await
    .unwrap();
    fx.d.batch_execute(
        "BEGIN; \
         INSERT INTO booking VALUES (2, '[2026-01-01 10:30+00,2026-01-01 11:30+00)'); \
         INSERT INTO notes VALUES (1, 'room booked'); COMMIT",
    )
    .await
    .unwrap();
    let (e, _) = common::rejected(fx.start_nowait()).await;
    assert!(
        e.contains("was rejected by mobile") && e.contains("booking_during_excl"),
        "{e}"
    );
    assert!(!e.contains("current transaction is aborted"), "{e}");
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM notes").await,
        0,
        "nothing of the transaction is applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_refusal_retry_stalls_only_that_direction_until_the_target_is_fixed_or_it_is_skipped() {
    // As native's apply worker retries: `run` stays up, the other direction flows, `/health`
    // says what is refused, and fixing the target or `tandem skip` lets the direction go on
    // without a restart.
    let fx = Fixture::new(
        "refuse_retry",
        "CREATE TABLE items (id int PRIMARY KEY, v text);",
        "tables = [\"public.items\"]\non_refusal = \"retry\"",
    )
    .await;
    fx.m.batch_execute("ALTER TABLE items ADD CONSTRAINT no_bad CHECK (v <> 'bad')")
        .await
        .unwrap();
    let (mut child, port) = fx.run_with_metrics();
    let health = || common::http_get(port, "/health").unwrap_or_default();
    let healthy = || std::future::ready(health().starts_with("HTTP/1.1 200"));
    let stalled = |what: &'static str| {
        let h = health();
        // Streaming only while it tries again, stalled throughout.
        (h.starts_with("HTTP/1.1 503")
            && h.contains("\nM>D streaming checkpoint ")
            && h.contains("; stalled, refused by the target: desktop → mobile: ")
            && h.contains(what))
        .then_some(h)
    };
    wait_for(60, "streaming both ways", healthy).await;
    for sql in [
        "INSERT INTO items VALUES (1, 'ok')",
        "INSERT INTO items VALUES (2, 'bad')",
        "INSERT INTO items VALUES (3, 'ok')",
    ] {
        fx.d.batch_execute(sql).await.unwrap();
    }
    wait_for(60, "/health naming the refusal", || async {
        stalled("no_bad").is_some()
    })
    .await;
    assert_eq!(Fixture::rows(&fx.m, "items").await, ["(1,ok)"]);
    // `tandem status`, a process of its own, shows the stall too.
    let cfg = fx.config_path.to_str().unwrap();
    let status = || run_tandem(&["--config", cfg, "status"], &[]).1;
    let mut shown = String::new();
    wait_for(30, "`tandem status` naming the refusal", || {
        shown = status();
        std::future::ready(shown.contains("  STALLED since "))
    })
    .await;
    assert!(
        shown.contains("on_refusal = \"retry\"")
            && shown.contains("was rejected by mobile")
            && shown.contains("no_bad")
            && shown.contains("tandem skip --from desktop --lsn "),
        "{shown}"
    );
    let out = run_tandem(&["--config", cfg, "status", "--json"], &[]).1;
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: not JSON: {out}"));
    let r = &v["directions"][0]["refusal"];
    assert!(
        v["run"] == "running"
            && r["stopped"] == false
            && r["tries"].as_i64().is_some_and(|n| n >= 1)
            && r["error"].as_str().is_some_and(|e| e.contains("no_bad"))
            && v["directions"][1]["refusal"].is_null(),
        "{v}"
    );
    fx.m.batch_execute("INSERT INTO items VALUES (50, 'm')")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM items WHERE id = 50", 1).await;
    assert!(child.try_wait().unwrap().is_none(), "run stopped");

    // Fixed on mobile: the next try applies it and what came after.
    fx.m.batch_execute("ALTER TABLE items DROP CONSTRAINT no_bad")
        .await
        .unwrap();
    wait_for(
        60,
        "the refused transaction and the next applied",
        || async {
            Fixture::rows(&fx.m, "items").await == ["(1,ok)", "(2,bad)", "(3,ok)", "(50,m)"]
        },
    )
    .await;
    wait_for(30, "healthy again", healthy).await;
    let shown = status();
    assert!(
        !shown.contains("STALLED") && shown.contains("run: running"),
        "{shown}"
    );

    // Refused again, and left out with the `tandem skip` that `/health` gives, while run runs.
    fx.m.batch_execute("ALTER TABLE items ADD CONSTRAINT no_bad CHECK (v <> 'bad') NOT VALID")
        .await
        .unwrap();
    fx.d.batch_execute("INSERT INTO items VALUES (4, 'bad')")
        .await
        .unwrap();
    let mut h = None;
    wait_for(60, "/health naming the second refusal", || {
        h = stalled("(4, bad)");
        std::future::ready(h.is_some())
    })
    .await;
    let lsn = common::skip_lsn(&h.unwrap()).expect("a skip command on /health");
    let (code, _, err) = run_tandem(
        &["--config", cfg, "skip", "--from", "desktop", "--lsn", &lsn],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    // Left out at the next try, which moves the checkpoint past it: healthy with nothing after it.
    wait_for(60, "healthy once it is left out", healthy).await;
    fx.d.batch_execute("INSERT INTO items VALUES (5, 'ok')")
        .await
        .unwrap();
    wait_count(60, &fx.m, "SELECT count(*) FROM items WHERE id = 5", 1).await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM items WHERE id = 4").await,
        0,
        "the skipped transaction is left out"
    );

    // A column mobile lacks stalls the direction the same way until it is added there.
    fx.d.batch_execute("ALTER TABLE items ADD COLUMN n int; INSERT INTO items VALUES (6, 'ok', 7)")
        .await
        .unwrap();
    wait_for(60, "/health naming the missing column", || async {
        stalled("column `n` of public.items exists on the source side but not on the target")
            .is_some()
    })
    .await;
    fx.m.batch_execute("ALTER TABLE items ADD COLUMN n int")
        .await
        .unwrap();
    wait_count(60, &fx.m, "SELECT count(*) FROM items WHERE n = 7", 1).await;
    wait_for(30, "healthy at the end", healthy).await;
    let refusals = common::metric(
        &scrape(port).unwrap(),
        "tandem_refusals_total",
        &[("direction", "D>M")],
    )
    .and_then(|v| v.parse::<u64>().ok());
    assert!(refusals.is_some_and(|n| n >= 3), "{refusals:?}");
    assert!(common::sigterm_and_wait(&mut child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rejected_transaction_is_named_and_tandem_skip_leaves_out_only_it() {
    let fx = refusing("skipone").await;
    // Past the initial snapshot first: the rows below must come through the stream.
    fx.start().await.stop().await;
    // Three transactions waiting when run starts, so they share one target commit: the failure
    // alone does not tell which is rejected. The second carries its own xid.
    fx.d.batch_execute("INSERT INTO items SELECT g, 'ok' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    fx.d.batch_execute("INSERT INTO items VALUES (101, 'bad'), (102, txid_current()::text)")
        .await
        .unwrap();
    fx.d.batch_execute("INSERT INTO items SELECT g, 'ok' FROM generate_series(103, 200) g")
        .await
        .unwrap();
    let xid: String =
        fx.d.query_one("SELECT v FROM items WHERE id = 102", &[])
            .await
            .unwrap()
            .get(0);
    let (e, lsn) = common::rejected(fx.start_nowait()).await;
    assert!(
        e.contains(&format!("desktop transaction {xid} (committed "))
            && e.contains("was rejected by mobile")
            && e.contains("no_bad"),
        "{e}"
    );
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM items").await,
        100,
        "the transaction before it is applied, nothing of it or after it"
    );
    let cfg = fx.config_path.to_str().unwrap();
    // After the stop, `tandem status` still says why, with the same fix.
    let (_, status, _) = run_tandem(&["--config", cfg, "status"], &[]);
    assert!(
        status.contains("run: not running")
            && status.contains("  REFUSED: `tandem run` stopped at ")
            && status.contains(&format!("desktop transaction {xid} (committed "))
            && status.contains(&format!("tandem skip --from desktop --lsn {lsn}")),
        "{status}"
    );

    // An LSN before the checkpoint names a transaction already applied.
    let (code, _, err) = run_tandem(
        &[
            "--config", cfg, "skip", "--from", "desktop", "--lsn", "0/10",
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("before the checkpoint"), "{err}");
    let (code, out, err) = run_tandem(
        &["--config", cfg, "skip", "--from", "desktop", "--lsn", &lsn],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("will be left out of mobile"), "{out}");
    let (_, status, _) = run_tandem(&["--config", cfg, "status"], &[]);
    assert!(
        status.contains(&format!(
            "SKIP PENDING: the desktop transaction committing at {lsn}"
        )),
        "{status}"
    );
    // Withdrawn and asked again.
    let (code, out, err) = run_tandem(
        &["--config", cfg, "skip", "--from", "desktop", "--clear"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no transaction will be left out"), "{out}");
    let (_, status, _) = run_tandem(&["--config", cfg, "status"], &[]);
    assert!(!status.contains("SKIP PENDING"), "{status}");
    let (code, _, err) = run_tandem(
        &["--config", cfg, "skip", "--from", "desktop", "--lsn", &lsn],
        &[],
    );
    assert_eq!(code, 0, "{err}");

    // Only that transaction is left out; the one after it and later ones flow.
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO items VALUES (300, 'later')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items WHERE id = 300", 1).await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM items").await,
        199
    );
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM items WHERE id IN (101, 102)").await,
        0
    );
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM tandem.checkpoints WHERE direction = 'D>M' AND skip_lsn IS NULL"
        )
        .await,
        1,
        "the request is cleared with the checkpoint that passed it"
    );
    let (_, status, _) = run_tandem(&["--config", cfg, "status"], &[]);
    assert!(
        !status.contains("REFUSED"),
        "passed, no longer shown: {status}"
    );

    // A request no transaction commits at is withdrawn once the stream passes it.
    run.stop().await;
    let now: String =
        fx.d.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
    let (code, _, err) = run_tandem(
        &["--config", cfg, "skip", "--from", "desktop", "--lsn", &now],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO items VALUES (301, 'after')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items WHERE id = 301", 1).await;
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM tandem.checkpoints WHERE direction = 'D>M' AND skip_lsn IS NULL",
        1,
    )
    .await;
    run.stop().await;
    let (_, status, _) = run_tandem(&["--config", cfg, "status"], &[]);
    assert!(!status.contains("SKIP PENDING"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_refusing_every_write_is_not_blamed_on_one_transaction() {
    let fx = refusing("readonly").await;
    fx.start().await.stop().await;
    fx.d.batch_execute("INSERT INTO items VALUES (1, 'ok')")
        .await
        .unwrap();
    fx.m.batch_execute("ALTER DATABASE readonly SET default_transaction_read_only = on")
        .await
        .unwrap();
    let e = fx.refused().await;
    assert!(e.contains("read-only transaction"), "{e}");
    assert!(!e.contains("tandem skip"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_transaction_applied_while_in_progress_is_named_too() {
    // Streamed and applied live, its commit LSN is not known when the target refuses it: run
    // starts over with transactions applied whole at their commit, and then names it.
    let fx = refusing("skiplive").await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    // The first transaction this run sees: no whole one before it shows where to look.
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO items SELECT g, CASE g WHEN 2500 THEN 'bad' WHEN 2999 THEN txid_current()::text \
         ELSE 'ok' END FROM generate_series(1, 3000) g",
    )
    .await
    .unwrap();
    let xid: String =
        fx.d.query_one("SELECT v FROM items WHERE id = 2999", &[])
            .await
            .unwrap()
            .get(0);
    let (e, _) = common::rejected(run).await;
    assert!(
        e.contains(&format!("desktop transaction {xid} (committed ")) && e.contains("no_bad"),
        "{e}"
    );
    assert!(
        streamed_txns(&fx.d, "skiplive_d").await >= 1,
        "it was streamed while in progress"
    );
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM items").await,
        0,
        "nothing of it is applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_side_no_table_flows_from_is_not_streamed_and_its_slot_holds_no_wal() {
    let fx = Fixture::new(
        "oneway",
        "CREATE TABLE climaster (id int PRIMARY KEY, name text);",
        "tables = [\"public.climaster\"]\n[replication.direction]\n\"public.climaster\" = \"desktop_to_mobile\"",
    )
    .await;
    let slot_m = "oneway_m";
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO climaster SELECT g, 'from desktop' FROM generate_series(1, 500) g",
    )
    .await
    .unwrap();
    fx.m.batch_execute("INSERT INTO climaster VALUES (100000, 'mobile only')")
        .await
        .unwrap();
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM climaster WHERE id <= 500",
        500,
    )
    .await;
    // Mobile is not streamed (nobody decodes it), yet its slot moves past its WAL: the rows
    // tandem applied there and the mobile-only row.
    let m_end: String =
        fx.m.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
    let m_end = m_end.parse::<tandem::lsn::Lsn>().unwrap().0;
    wait_for(30, "mobile slot confirmed past its WAL", || async {
        Fixture::slot_and_checkpoint(&fx.m, slot_m, &fx.d, "M>D")
            .await
            .0
            >= m_end
    })
    .await;
    // A walsender, not any holder: `pg_replication_slot_advance` holds the slot in tandem's SQL
    // session while it moves it, and the confirmed position is visible before it lets go.
    let walsenders = Fixture::count(
        &fx.m,
        "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid \
         WHERE s.slot_name = 'oneway_m' AND a.backend_type = 'walsender'",
    )
    .await;
    assert_eq!(walsenders, 0, "mobile's slot is not streamed");
    fx.assert_slots_within_checkpoints().await;
    run.stop().await;
    // A restart finds no gap, and the mobile-only row never reached desktop.
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO climaster VALUES (501, 'after restart')")
        .await
        .unwrap();
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM climaster WHERE id = 501",
        1,
    )
    .await;
    run.stop().await;
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM climaster").await,
        501
    );
    fx.assert_slots_within_checkpoints().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_resumes_from_the_checkpoint_with_nothing_lost_or_doubled() {
    let schema = format!("{JOBS}\n{}", audit_sql("jobs"));
    let fx = Fixture::new("restart", &schema, JOBS_TABLES).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'first' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    run.stop().await;

    // The slot is never confirmed past what the target holds.
    fx.assert_slots_within_checkpoints().await;
    // Written while tandem is down, on both sides.
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'while down' FROM generate_series(101, 200) g; UPDATE jobs SET n = 7 WHERE id <= 10")
        .await
        .unwrap();
    fx.m.batch_execute(
        "INSERT INTO jobs SELECT g, 'mobile while down' FROM generate_series(1001, 1050) g",
    )
    .await
    .unwrap();
    let run = fx.start().await;
    fx.wait_equal("jobs", 30).await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await,
        250
    );
    // Desktop: its own 100 + 100 + 10 changes plus mobile's 50. Mobile: its own 50 plus desktop's 210.
    wait_for(30, "audit counts", || async {
        Fixture::count(&fx.d, "SELECT count(*) FROM audit").await == 260
            && Fixture::count(&fx.m, "SELECT count(*) FROM audit").await == 260
    })
    .await;
    run.stop().await;
    // A third start with nothing new applies nothing again.
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (999, 'marker')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM audit").await,
        261
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sslmode_require_encrypts_sql_and_replication_connections() {
    let (d, m) =
        Fixture::databases("tls", "CREATE TABLE jobs (id int PRIMARY KEY, title text);").await;
    let text = Fixture::config_text("tls", r#"tables = ["public.jobs"]"#)
        .replace("/tls\"", "/tls?sslmode=require\"");
    assert_eq!(text.matches("sslmode=require").count(), 2, "{text}");
    let fx = Fixture::with_config("tls", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, 'over tls')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    assert_eq!(Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await, 1);
    let ssl = |app: &str| {
        format!(
            "SELECT count(*) FILTER (WHERE s.ssl) - count(*) FILTER (WHERE NOT s.ssl) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name ~ ('^{app}( [0-9]+ [^ ]+)?$') \
             AND a.datname = current_database()"
        )
    };
    // Encrypted: the walsender on desktop and the apply session on mobile.
    assert_eq!(Fixture::count(&fx.d, &ssl("tandem stream D>M")).await, 1);
    assert_eq!(Fixture::count(&fx.m, &ssl("tandem apply D>M")).await, 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sslmode_verify_full_checks_the_servers_certificate_on_sql_and_replication_connections() {
    use tandem::config::Site;
    use tandem::side::Side;
    use tandem::source::walsender::{WalConfig, WalConnection};

    let (d, m) = Fixture::databases(
        "verify",
        "CREATE TABLE jobs (id int PRIMARY KEY, title text);",
    )
    .await;
    let p = clusters();
    // Each cluster's certificate is signed by a CA of its own, for the name `localhost`.
    let (d_ca, m_ca) = (p.desktop.ca_cert().unwrap(), p.mobile.ca_cert().unwrap());
    let url = |port: u16, host: &str, mode: &str, ca: &std::path::Path| {
        format!(
            "postgresql://postgres@{host}:{port}/verify?sslmode={mode}&sslrootcert={}",
            ca.display()
        )
    };
    // Both connections, SQL and replication: the error of each, or None when it connected.
    let connect_both = |url: String| async move {
        let site = Site {
            side: Side::Desktop,
            url: url.clone(),
            slot: "verify_d".into(),
            publication: "verify_d".into(),
        };
        let sql = tandem::db::connect(&site, "tandem verify test").await.err();
        let wal = match WalConfig::from_url(&url) {
            Ok(cfg) => WalConnection::connect(&cfg)
                .await
                .err()
                .map(|e| e.to_string()),
            Err(e) => Some(e),
        };
        (sql.map(|e| e.to_string()), wal)
    };
    let dp = p.desktop.port;
    for (url, want) in [
        // The mobile cluster's CA did not sign the desktop's certificate.
        (
            url(dp, "localhost", "verify-full", &m_ca),
            "not signed by a CA in sslrootcert",
        ),
        (
            url(dp, "localhost", "verify-ca", &m_ca),
            "not signed by a CA in sslrootcert",
        ),
        // The certificate names `localhost`, not 127.0.0.1.
        (
            url(dp, "127.0.0.1", "verify-full", &d_ca),
            "does not name the host in the url",
        ),
        // libpq checks the CA in `require` too once a root certificate is given.
        (
            url(dp, "localhost", "require", &m_ca),
            "not signed by a CA in sslrootcert",
        ),
        (
            url(
                dp,
                "localhost",
                "verify-full",
                std::path::Path::new("/nonexistent/ca.crt"),
            ),
            "sslrootcert /nonexistent/ca.crt: ",
        ),
    ] {
        let (sql, wal) = connect_both(url.clone()).await;
        for (what, e) in [("sql", sql), ("replication", wal)] {
            let e = e.unwrap_or_else(|| panic!("{what} connected with {url}"));
            assert!(e.contains(want), "{what} with {url}: {e}");
        }
    }
    // verify-ca checks the CA and not the name.
    for url in [
        url(dp, "127.0.0.1", "verify-ca", &d_ca),
        url(dp, "localhost", "verify-full", &d_ca),
    ] {
        assert_eq!(connect_both(url.clone()).await, (None, None), "{url}");
    }

    // A run with verify-full on both sides replicates, encrypted.
    let text = Fixture::config_text("verify", r#"tables = ["public.jobs"]"#)
        .replace(
            &format!("\"{}\"", p.desktop.url("verify")),
            &format!("\"{}\"", url(dp, "localhost", "verify-full", &d_ca)),
        )
        .replace(
            &format!("\"{}\"", p.mobile.url("verify")),
            &format!(
                "\"{}\"",
                url(p.mobile.port, "localhost", "verify-full", &m_ca)
            ),
        );
    assert_eq!(text.matches("sslmode=verify-full").count(), 2, "{text}");
    let fx = Fixture::with_config("verify", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, 'verified')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    assert_eq!(Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await, 1);
    let ssl = "SELECT count(*) FILTER (WHERE s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a \
               USING (pid) WHERE a.application_name = 'tandem stream D>M' \
               AND a.datname = current_database()";
    assert_eq!(Fixture::count(&fx.d, ssl).await, 1);
    run.stop().await;

    // sslrootcert=system: verify-full against the machine's trusted CAs, which SSL_CERT_FILE
    // replaces (as for OpenSSL). Trusting both clusters' CAs, `status` reaches both sides;
    // trusting the desktop's alone, it stops at the mobile side.
    let system = std::fs::read_to_string(&fx.config_path)
        .unwrap()
        .replace(&d_ca.display().to_string(), "system")
        .replace(&m_ca.display().to_string(), "system")
        .replace("sslmode=verify-full&", "");
    assert_eq!(
        system.matches("?sslrootcert=system\"").count(),
        2,
        "{system}"
    );
    let path = common::scratch().join("tandem-verify-system");
    let both = path.with_extension("crt");
    std::fs::write(&path, system).unwrap();
    std::fs::write(
        &both,
        std::fs::read_to_string(&d_ca).unwrap() + &std::fs::read_to_string(&m_ca).unwrap(),
    )
    .unwrap();
    let status = |ca: &std::path::Path| {
        run_tandem(
            &["--config", path.to_str().unwrap(), "status"],
            &[("SSL_CERT_FILE", ca.to_str().unwrap())],
        )
    };
    let (code, out, err) = status(&both);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, _, err) = status(&d_ca);
    assert_ne!(code, 0);
    assert!(
        err.contains("mobile") && err.contains("not signed by a CA in sslrootcert"),
        "{err}"
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&both);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_connections_try_the_urls_hosts_in_order_and_honour_hostaddr() {
    use tandem::source::walsender::{WalConfig, WalConnection};
    let p = clusters();
    let port = p.desktop.port;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for url in [
        // The first server does not answer: the second is used, as on the SQL side.
        format!("postgresql://postgres@127.0.0.1:{closed},127.0.0.1:{port}/postgres?sslmode=disable"),
        // A name that does not resolve, with the address to use.
        format!("postgresql://postgres@tandem-test.invalid:{port}/postgres?hostaddr=127.0.0.1&sslmode=disable"),
    ] {
        let cfg = WalConfig::from_url(&url).unwrap();
        let mut c = WalConnection::connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let id = c.identify_system().await.unwrap();
        assert!(id.timeline >= 1, "{url}");
        let site = tandem::config::Site {
            side: tandem::side::Side::Desktop,
            url: url.clone(),
            slot: "unused".into(),
            publication: "unused".into(),
        };
        tandem::db::connect(&site, "tandem test")
            .await
            .unwrap_or_else(|e| panic!("sql {url}: {e}"));
    }
    // None answers: the last server's error.
    let url = format!("postgresql://postgres@127.0.0.1:{closed}/postgres?sslmode=disable");
    let e = WalConnection::connect(&WalConfig::from_url(&url).unwrap())
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("refused"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_urls_options_reach_the_walsender_and_tandems_own_settings_still_hold() {
    let (d, m) = Fixture::databases(
        "url_options",
        "CREATE TABLE jobs (id int PRIMARY KEY, at timestamptz, day date);",
    )
    .await;
    // Logged replication commands show the options arrived; a date style of the URL's own
    // would change how the stream renders dates, unless tandem's settings come after it.
    let text = Fixture::config_text("url_options", r#"tables = ["public.jobs"]"#).replace(
        "/url_options\"\nslot = \"url_options_d\"",
        "/url_options?options=-c%20log_replication_commands%3Don%20-c%20datestyle%3DSQL%2CDMY\"\n\
         slot = \"url_options_d\"",
    );
    assert_eq!(
        text.matches("log_replication_commands").count(),
        1,
        "{text}"
    );
    let fx = Fixture::with_config("url_options", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, '2026-03-04 05:06:07.891+00', '2026-03-04')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
    let log = std::fs::read_to_string(clusters().desktop.dir.join("server.log")).unwrap();
    assert!(
        log.contains("received replication command: START_REPLICATION SLOT \"url_options_d\""),
        "the walsender did not get the URL's options"
    );
}

/// The walsender asks for a reply at half its `wal_sender_timeout` and ends the connection when
/// none comes by the whole. tandem answered only at its 5 s heartbeat, so a 2 s timeout (set
/// here in the URLs' options) ended both streams every few seconds, reconnected each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_wal_sender_timeout_is_answered_in_time_and_the_stream_stays() {
    let (d, m) = Fixture::databases(
        "sender_timeout",
        "CREATE TABLE jobs (id int PRIMARY KEY, v text);",
    )
    .await;
    // Both URLs.
    let text = Fixture::config_text("sender_timeout", r#"tables = ["public.jobs"]"#).replace(
        "/sender_timeout\"",
        "/sender_timeout?options=-c%20wal_sender_timeout%3D2s\"",
    );
    assert_eq!(text.matches("wal_sender_timeout").count(), 2, "{text}");
    let fx = Fixture::with_config("sender_timeout", d, m, text).await;
    let run = fx.start().await;
    let holder = |slot: &'static str| {
        format!("SELECT coalesce(active_pid, 0)::bigint FROM pg_replication_slots WHERE slot_name = '{slot}'")
    };
    let (hd, hm) = (holder("sender_timeout_d"), holder("sender_timeout_m"));
    wait_for(30, "both slots streamed", || async {
        Fixture::count(&fx.d, &hd).await != 0 && Fixture::count(&fx.m, &hm).await != 0
    })
    .await;
    let before = (
        Fixture::count(&fx.d, &hd).await,
        Fixture::count(&fx.m, &hm).await,
    );
    // Idle for three times the timeout: a stream unanswered would have been ended and opened
    // again by another walsender.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, 'd')")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO jobs VALUES (2, 'm')")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM jobs", 2).await;
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 2).await;
    assert_eq!(
        (
            Fixture::count(&fx.d, &hd).await,
            Fixture::count(&fx.m, &hm).await
        ),
        before,
        "the same walsenders stream both slots"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_certificate_logs_in_on_sql_and_replication_connections() {
    use tandem::localpg::CERT_ROLE;
    // The clusters' pg_hba lets CERT_ROLE in by client certificate only (`cert`).
    let schema = format!(
        "DO $$ BEGIN CREATE ROLE {CERT_ROLE} LOGIN SUPERUSER; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE jobs (id int PRIMARY KEY, title text);"
    );
    let (d, m) = Fixture::databases("clientcert", &schema).await;
    let p = clusters();
    let (d_cert, d_key) = p.desktop.client_cert(CERT_ROLE).unwrap();
    let (m_cert, m_key) = p.mobile.client_cert(CERT_ROLE).unwrap();
    let url = |port: u16,
               ca: std::path::PathBuf,
               client: Option<(&std::path::Path, &std::path::Path)>| {
        let mut u = format!(
            "postgresql://{CERT_ROLE}@localhost:{port}/clientcert?sslmode=verify-full&sslrootcert={}",
            ca.display()
        );
        if let Some((c, k)) = client {
            u.push_str(&format!("&sslcert={}&sslkey={}", c.display(), k.display()));
        }
        u
    };
    let d_url = |client| url(p.desktop.port, p.desktop.ca_cert().unwrap(), client);
    let m_url = url(
        p.mobile.port,
        p.mobile.ca_cert().unwrap(),
        Some((&m_cert, &m_key)),
    );
    let status = |desktop: String| {
        let text = Fixture::config_text("clientcert", r#"tables = ["public.jobs"]"#)
            .replace(&p.desktop.url("clientcert"), &desktop)
            .replace(&p.mobile.url("clientcert"), &m_url);
        let path = common::scratch().join("tandem-clientcert.toml");
        std::fs::write(&path, text).unwrap();
        let out = run_tandem(&["--config", path.to_str().unwrap(), "status"], &[]);
        let _ = std::fs::remove_file(&path);
        out
    };
    // Without a certificate, and with one the desktop's CA did not sign: refused, saying so.
    let (code, _, err) = status(d_url(None));
    assert_ne!(code, 0);
    assert!(
        err.contains("desktop") && err.contains("certificate") && err.contains("sslcert"),
        "{err}"
    );
    let (code, _, err) = status(d_url(Some((&m_cert, &m_key))));
    assert_ne!(code, 0);
    assert!(
        err.contains("desktop") && err.contains("rejected the client certificate"),
        "{err}"
    );

    // With its own certificate on each side, a run replicates; the sessions show who logged in.
    let text = Fixture::config_text("clientcert", r#"tables = ["public.jobs"]"#)
        .replace(
            &p.desktop.url("clientcert"),
            &d_url(Some((&d_cert, &d_key))),
        )
        .replace(&p.mobile.url("clientcert"), &m_url);
    assert_eq!(text.matches("sslcert=").count(), 2, "{text}");
    let fx = Fixture::with_config("clientcert", d, m, text).await;
    let run = fx.start().await;
    fx.m.batch_execute("INSERT INTO jobs VALUES (1, 'by certificate')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    let dn = |app: &str| {
        format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name ~ ('^{app}( [0-9]+ [^ ]+)?$') AND a.datname = current_database() \
             AND a.usename = '{CERT_ROLE}' AND s.client_dn = '/CN={CERT_ROLE}'"
        )
    };
    assert_eq!(Fixture::count(&fx.m, &dn("tandem stream M>D")).await, 1);
    assert_eq!(Fixture::count(&fx.d, &dn("tandem apply M>D")).await, 1);
    run.stop().await;
}

/// A `tandem ddl` schema change behind other transactions and ahead of more, all waiting to be
/// applied: it runs in a target transaction of its own, and a `TRUNCATE` starts one. Before,
/// they shared one with the others and were refused, and refused again at every restart: an
/// `ALTER TABLE` or `TRUNCATE` after rows whose deferred foreign key check is pending (mobile's
/// role may not skip it), "pending trigger events"; rows using an enum label added just before,
/// "unsafe use of new value".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_change_waiting_among_other_transactions_is_applied_with_them() {
    let role = "tandem_ddl_group";
    let (d, m) = Fixture::databases(
        "ddl_group",
        &format!(
            "CREATE TYPE mood AS ENUM ('sad');
             CREATE TABLE moods (id int PRIMARY KEY, m mood);
             CREATE TABLE parent (id int PRIMARY KEY);
             CREATE TABLE child (id int PRIMARY KEY,
                                 p int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);
             {}
             ALTER TYPE mood OWNER TO {role};",
            common::plain_role(role, "ddl_group", &["moods", "parent", "child"])
        ),
    )
    .await;
    let text = common::connect_as(
        &Fixture::config_text("ddl_group", "tables = [\"public.*\"]"),
        role,
        &["mobile"],
    );
    let fx = Fixture::with_config("ddl_group", d, m, text).await;
    let cfg = fx.config_path.to_str().unwrap();
    let ddl = |on: &str, sql: &str| run_tandem(&["--config", cfg, "ddl", "--on", on, sql], &[]);
    // The initial snapshot done, run stops: what follows waits, and comes in one read.
    fx.start().await.stop().await;
    fx.d.batch_execute("INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1)")
        .await
        .unwrap();
    for sql in [
        "ALTER TABLE child ADD COLUMN note text",
        "ALTER TYPE mood ADD VALUE 'glad'",
    ] {
        let (code, _, err) = ddl("desktop", sql);
        assert_eq!(code, 0, "{err}");
    }
    // One transaction each; a TRUNCATE after a row with a check pending too.
    for sql in [
        "INSERT INTO moods VALUES (1, 'glad'); INSERT INTO moods VALUES (2, 'sad')",
        "UPDATE moods SET m = 'glad' WHERE id = 2",
        "INSERT INTO child VALUES (3, 1, 'x')",
        "TRUNCATE child",
        "INSERT INTO child VALUES (2, 1, 'n')",
    ] {
        fx.d.batch_execute(sql).await.unwrap();
    }
    let run = fx.start().await;
    // As text: the label is not on mobile until the schema change arrives.
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM moods WHERE m::text = 'glad'",
        2,
    )
    .await;
    wait_count(30, &fx.m, "SELECT count(*) FROM child WHERE note = 'n'", 1).await;
    assert_eq!(Fixture::rows(&fx.m, "child").await, ["(2,1,n)"]);
    // And while run runs, the other way.
    let (code, _, err) = ddl("mobile", "ALTER TYPE mood ADD VALUE 'calm'");
    assert_eq!(code, 0, "{err}");
    fx.m.batch_execute("INSERT INTO moods VALUES (3, 'calm')")
        .await
        .unwrap();
    fx.wait_equal("moods", 30).await;
    assert_eq!(
        Fixture::rows(&fx.d, "moods").await,
        ["(1,glad)", "(2,glad)", "(3,calm)"]
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tandem_ddl_makes_a_schema_change_on_the_other_side_at_its_point_in_the_stream() {
    let fx = Fixture::new(
        "ddl",
        "CREATE TABLE items (id int PRIMARY KEY, v text);",
        "tables = [\"public.items\"]",
    )
    .await;
    fx.d.batch_execute("INSERT INTO items SELECT g, 'x' FROM generate_series(1, 2000) g")
        .await
        .unwrap();
    // The schema change's own UPDATE below then streams while in progress.
    common::stream_from_a_few_hundred_rows(&fx.d).await;
    let run = fx.start().await;
    wait_count(60, &fx.m, "SELECT count(*) FROM items", 2000).await;
    let cfg = fx.config_path.to_str().unwrap();
    let ddl = |on: &str, sql: &str| run_tandem(&["--config", cfg, "ddl", "--on", on, sql], &[]);

    // A column and the values that fill it, made on desktop while run runs, and desktop writing
    // with it at once: mobile takes the column before the rows that carry it.
    let (code, out, err) = ddl(
        "desktop",
        "ALTER TABLE items ADD COLUMN n int; UPDATE items SET n = id * 10",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("desktop: ran it (schema change "), "{out}");
    fx.d.batch_execute("INSERT INTO items VALUES (3000, 'd', 30000)")
        .await
        .unwrap();
    // The column is not there until the schema change arrives: a failing query counts as none.
    let on_mobile = |sql: &'static str| async {
        fx.m.query_one(sql, &[])
            .await
            .map_or(-1, |r| r.get::<_, i64>(0))
    };
    wait_for(
        60,
        "the column on mobile, filled, and the row after it",
        || async { on_mobile("SELECT count(*) FROM items WHERE n = id * 10").await == 2001 },
    )
    .await;
    assert!(
        streamed_txns(&fx.d, "ddl_d").await > 0,
        "the schema change's transaction streamed while in progress"
    );
    fx.m.batch_execute("INSERT INTO items VALUES (5000, 'm', 50000)")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM items WHERE n = 50000", 1).await;

    // Made on mobile, with an unqualified name: read with mobile's search_path on desktop too.
    // A session setting in it (as a pasted migration has) does not stay in run's session there.
    let (code, _, err) = ddl(
        "mobile",
        "SET default_transaction_read_only = on; CREATE INDEX items_n ON items (n)",
    );
    assert_eq!(code, 0, "{err}");
    wait_count(
        30,
        &fx.d,
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'items_n'",
        1,
    )
    .await;
    fx.m.batch_execute("INSERT INTO items VALUES (5500, 'm', 55000)")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM items WHERE id = 5500", 1).await;

    // A statement the side refuses: one error, nothing recorded.
    let (code, _, err) = ddl("desktop", "ALTER TABLE items ADD COLUMN n int");
    assert_eq!(code, 1);
    assert!(
        err.contains("desktop: the statement failed; nothing was changed on either side")
            && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM tandem.ddl").await,
        1
    );

    // Any role may write a logical message: one naming the first schema change's row from
    // another transaction is not run again (on mobile, ADD COLUMN n would be refused and stop run).
    fx.d.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'tandem-ddl', (SELECT min(id)::text FROM tandem.ddl)); \
         INSERT INTO items VALUES (6000, 'after', 60000); COMMIT",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items WHERE id = 6000", 1).await;
    assert!(!run.is_finished());

    // Transaction control in the text ends tandem's transaction part way: refused, and never
    // run on mobile (there it would end run's own transaction).
    let (code, _, err) = ddl(
        "desktop",
        "ALTER TABLE items ADD COLUMN y int; COMMIT; ALTER TABLE items ADD COLUMN z int",
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("desktop: the statement ended tandem's transaction"),
        "{err}"
    );
    // Dropped on desktop by hand; the next row shows the direction went past the message.
    fx.d.batch_execute(
        "ALTER TABLE items DROP COLUMN y, DROP COLUMN z; INSERT INTO items VALUES (7000, 'later', 70000)",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items WHERE id = 7000", 1).await;
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' AND column_name IN ('y', 'z')"
        )
        .await,
        0
    );
    assert!(!run.is_finished());

    // The other side refuses it (a column of that name already there): named like any refused
    // transaction, and applied once the obstacle is gone.
    fx.m.batch_execute("ALTER TABLE items ADD COLUMN x int")
        .await
        .unwrap();
    let (code, _, err) = ddl("desktop", "ALTER TABLE items ADD COLUMN x int DEFAULT 7");
    assert_eq!(code, 0, "{err}");
    let (e, _) = common::rejected(run).await;
    let id = Fixture::count(&fx.d, "SELECT max(id) FROM tandem.ddl").await;
    assert!(
        e.contains("was rejected by mobile")
            && e.contains(&format!(
                "running desktop's schema change {id} (its statement: tandem.ddl on desktop)"
            ))
            // Never the statement's text, which may carry a password.
            && !e.contains("DEFAULT 7")
            && e.contains("already exists"),
        "{e}"
    );
    fx.m.batch_execute("ALTER TABLE items DROP COLUMN x")
        .await
        .unwrap();
    let run = fx.start().await;
    wait_for(30, "the column on mobile after the restart", || async {
        on_mobile("SELECT count(*) FROM items WHERE x = 7").await == 2005
    })
    .await;
    run.stop().await;
}

/// Run `sql` on desktop with `tandem ddl` and wait until `run` running it on mobile waits for
/// a lock on `items`, which a transaction of mobile's application holds: that transaction's
/// changes reach desktop after the schema change there.
async fn ddl_held_back_on_mobile(fx: &Fixture, sql: &str) {
    let (code, _, err) = run_tandem(
        &[
            "--config",
            fx.config_path.to_str().unwrap(),
            "ddl",
            "--on",
            "desktop",
            sql,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM pg_locks WHERE relation = 'items'::regclass AND NOT granted",
        1,
    )
    .await;
}

/// A column renamed and one dropped with `tandem ddl` on desktop while mobile's application has
/// transactions writing both under their old names, which hold the change back on mobile: they
/// reach desktop after the change there, their values for the renamed column land in it under
/// the new name and the dropped column's are left out (before: refused, "column `v` exists on
/// the source side but not on the target", and `run` stopped). One is a one-row transaction
/// meeting desktop's session bound to the columns before the change, the other one streamed
/// while in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_column_renamed_or_dropped_with_tandem_ddl_takes_the_other_sides_rows_on_their_way() {
    let fx = Fixture::new(
        "ddlcol",
        "CREATE TABLE items (id int PRIMARY KEY, v text, w text);",
        r#"tables = ["public.items"]"#,
    )
    .await;
    stream_from_a_few_hundred_rows(&fx.m).await;
    let run = fx.start().await;
    // Desktop's apply session knows items by its columns before the change.
    fx.m.batch_execute("INSERT INTO items VALUES (1, 'first', 'first')")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM items WHERE id = 1", 1).await;
    let streamed_before = streamed_txns(&fx.m, "ddlcol_m").await;
    let held = connect(&clusters().mobile.url("ddlcol")).await;
    let large = connect(&clusters().mobile.url("ddlcol")).await;
    held.batch_execute("BEGIN; UPDATE items SET v = 'held', w = 'held' WHERE id = 1")
        .await
        .unwrap();
    large
        .batch_execute("BEGIN; INSERT INTO items VALUES (10, 'large', 'large')")
        .await
        .unwrap();
    ddl_held_back_on_mobile(
        &fx,
        "ALTER TABLE items RENAME COLUMN v TO body; ALTER TABLE items DROP COLUMN w",
    )
    .await;
    // Its lock on items already held: not queued behind the change.
    large
        .batch_execute(
            "INSERT INTO items SELECT g, 'large', 'large' FROM generate_series(11, 509) g",
        )
        .await
        .unwrap();
    held.batch_execute("COMMIT").await.unwrap();
    large.batch_execute("COMMIT").await.unwrap();
    wait_count(
        30,
        &fx.d,
        "SELECT count(*) FROM items WHERE body = 'held'",
        1,
    )
    .await;
    wait_count(
        30,
        &fx.d,
        "SELECT count(*) FROM items WHERE body = 'large'",
        500,
    )
    .await;
    wait_for(
        10,
        "mobile's slot to count the streamed transaction",
        || async { streamed_txns(&fx.m, "ddlcol_m").await > streamed_before },
    )
    .await;
    // The change then runs on mobile, and rows flow both ways under the new names.
    fx.m.batch_execute("INSERT INTO items (id, body) VALUES (2, 'after')")
        .await
        .unwrap();
    fx.d.batch_execute("INSERT INTO items (id, body) VALUES (3, 'after')")
        .await
        .unwrap();
    fx.wait_equal("items", 30).await;
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM items WHERE body = 'after'").await,
        2
    );
    for c in [&fx.d, &fx.m] {
        assert_eq!(
            Fixture::count(
                c,
                "SELECT count(*) FROM tandem.renamed_columns WHERE old_name IN ('v', 'w')"
            )
            .await,
            2
        );
    }
    run.stop().await;
}

/// A table dropped with `tandem ddl` on desktop while a transaction of mobile's writes it and
/// another table, holding the drop back on mobile: the transaction reaches desktop after the
/// drop there, its other table's row arrives and the dropped table's is left out (before:
/// refused, "table public.items does not exist; create it there", and `run` stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_dropped_with_tandem_ddl_leaves_out_the_other_sides_rows_on_their_way() {
    let fx = Fixture::new(
        "ddldrop",
        "CREATE TABLE items (id int PRIMARY KEY, v text); CREATE TABLE notes (id int PRIMARY KEY);",
        r#"tables = ["public.*"]"#,
    )
    .await;
    let run = fx.start().await;
    fx.m.batch_execute("INSERT INTO items VALUES (1, 'first')")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM items WHERE id = 1", 1).await;
    let held = connect(&clusters().mobile.url("ddldrop")).await;
    held.batch_execute("BEGIN; INSERT INTO items VALUES (2, 'held'); INSERT INTO notes VALUES (2)")
        .await
        .unwrap();
    ddl_held_back_on_mobile(&fx, "DROP TABLE items").await;
    held.batch_execute("COMMIT").await.unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM notes WHERE id = 2", 1).await;
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM pg_class WHERE relname = 'items'",
        0,
    )
    .await;
    fx.m.batch_execute("INSERT INTO notes VALUES (3)")
        .await
        .unwrap();
    fx.d.batch_execute("INSERT INTO notes VALUES (4)")
        .await
        .unwrap();
    fx.wait_equal("notes", 30).await;
    assert_eq!(Fixture::rows(&fx.d, "notes").await, ["(2)", "(3)", "(4)"]);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_tandem_ddl_creates_that_the_patterns_take_in_flows_both_ways_at_once() {
    let fx = Fixture::new(
        "ddlnew",
        "CREATE TABLE items (id int PRIMARY KEY, v text);",
        "tables = [\"public.*\"]",
    )
    .await;
    stream_from_a_few_hundred_rows(&fx.m).await;
    let run = fx.start().await;
    let cfg_path = fx.config_path.to_str().unwrap().to_string();
    let cfg = cfg_path.as_str();
    let ddl = |on: &str, sql: &str| run_tandem(&["--config", cfg, "ddl", "--on", on, sql], &[]);
    let published = |c: &'static str| {
        format!(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'ddlnew_{c}' \
             AND tablename = 'notes'"
        )
    };

    // Made on desktop with a row of its own while run runs: no setup, no restart.
    let (code, out, err) = ddl(
        "desktop",
        "CREATE TABLE notes (id bigint PRIMARY KEY, body text); \
         INSERT INTO notes VALUES (1, 'made with it')",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "desktop: public.notes was created and flows both ways: added to publication ddlnew_d"
        ),
        "{out}"
    );
    assert_eq!(Fixture::count(&fx.d, &published("d")).await, 1);
    fx.d.batch_execute("INSERT INTO notes VALUES (2, 'desktop')")
        .await
        .unwrap();
    // The table is not on mobile until the schema change arrives: a failing query counts as none.
    wait_for(
        30,
        "notes on mobile with both of desktop's rows",
        || async {
            fx.m.query_one("SELECT count(*) FROM notes", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 2)
        },
    )
    .await;
    // Mobile put it in its own publication in the transaction that made it there.
    assert_eq!(Fixture::count(&fx.m, &published("m")).await, 1);
    fx.m.batch_execute(
        "INSERT INTO notes VALUES (3, 'mobile'); UPDATE notes SET body = 'edited' WHERE id = 1",
    )
    .await
    .unwrap();
    wait_count(
        30,
        &fx.d,
        "SELECT count(*) FROM notes WHERE id = 3 OR body = 'edited'",
        2,
    )
    .await;
    fx.wait_equal("notes", 30).await;

    // Renamed on both sides with `tandem ddl`, a table run knew from its start by its old name
    // goes on flowing, both ways, under the new one. Rows mobile writes under the old name before
    // the rename reaches it arrive at desktop after desktop's rename: they go to the table by its
    // new name (before: refused, the name gone, and run stopped). Mobile's application holds the
    // rename back there with a transaction open on items until its row is in.
    fx.m.batch_execute("INSERT INTO items VALUES (10, 'before')")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM items WHERE id = 10", 1).await;
    let streamed_before = streamed_txns(&fx.m, "ddlnew_m").await;
    // Two of mobile's transactions hold it back: a one-row one, which reaches desktop whole and
    // meets the main session bound to items before the rename, and one streamed while in
    // progress (mobile decodes in 64 kB), applied on desktop by a session of its own. Each writes
    // a row first, so both hold items before the rename queues for it; the streamed one writes
    // the rest only after desktop's rename (before, its first rows could reach desktop's items
    // and hold desktop's rename back in turn).
    let small = connect(&clusters().mobile.url("ddlnew")).await;
    let large = connect(&clusters().mobile.url("ddlnew")).await;
    small
        .batch_execute("BEGIN; INSERT INTO items VALUES (11, 'on its way')")
        .await
        .unwrap();
    large
        .batch_execute("BEGIN; INSERT INTO items VALUES (12, 'on its way')")
        .await
        .unwrap();
    ddl_held_back_on_mobile(&fx, "ALTER TABLE items RENAME TO things").await;
    // Its lock on items already held: not queued behind the rename.
    large
        .batch_execute("INSERT INTO items SELECT g, 'on its way' FROM generate_series(13, 510) g")
        .await
        .unwrap();
    small.batch_execute("COMMIT").await.unwrap();
    large.batch_execute("COMMIT").await.unwrap();
    wait_count(
        30,
        &fx.d,
        "SELECT count(*) FROM things WHERE v = 'on its way'",
        500,
    )
    .await;
    wait_for(
        10,
        "mobile's slot to count the streamed transaction",
        || async { streamed_txns(&fx.m, "ddlnew_m").await > streamed_before },
    )
    .await;
    for c in [&fx.d, &fx.m] {
        wait_count(
            30,
            c,
            "SELECT count(*) FROM tandem.renamed WHERE old_name = 'public.items' \
             AND new_name = 'public.things'",
            1,
        )
        .await;
    }
    fx.d.batch_execute("INSERT INTO things VALUES (1, 'renamed')")
        .await
        .unwrap();
    wait_for(30, "desktop's row in mobile's renamed table", || async {
        fx.m.query_one("SELECT count(*) FROM things WHERE v = 'renamed'", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 1)
    })
    .await;
    fx.m.batch_execute("INSERT INTO things VALUES (2, 'back')")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM things WHERE id = 2", 1).await;

    // One setup would refuse (no key, no REPLICA IDENTITY FULL) is refused whole, on the side
    // named first: nothing made there, nothing to run on the other.
    let (code, _, err) = ddl("mobile", "CREATE TABLE loose (v text)");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("mobile: public.loose has no primary key")
            && err.contains("REPLICA IDENTITY FULL")
            && err.contains("nothing was changed on either side"),
        "{err}"
    );
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM pg_class WHERE relname = 'loose'"
        )
        .await,
        0
    );
    // One outside the patterns is made on both sides and left out of the publications.
    let (code, out, err) = ddl(
        "mobile",
        "CREATE SCHEMA aside; CREATE TABLE aside.notes (id int PRIMARY KEY)",
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("was created"), "{out}");
    wait_count(
        30,
        &fx.d,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'aside'",
        1,
    )
    .await;
    for c in [&fx.d, &fx.m] {
        assert_eq!(
            Fixture::count(
                c,
                "SELECT count(*) FROM pg_publication_tables WHERE schemaname = 'aside'"
            )
            .await,
            0
        );
    }
    assert!(!run.is_finished());
    run.stop().await;

    // The rename took the record of items' initial snapshot along, so a restart does not copy
    // things as a table never synchronised (fails while the record stays under the old name).
    let recorded = |name: &'static str| {
        format!("SELECT count(*) FROM tandem.snapshots WHERE table_name = 'public.{name}'")
    };
    assert_eq!(Fixture::count(&fx.m, &recorded("items")).await, 0);
    assert_eq!(Fixture::count(&fx.m, &recorded("things")).await, 1);
    // A restart finds the publications as the config wants them and the table synchronised (run
    // recorded it where it made it): no initial snapshot of it, and its changes go on flowing.
    // Whichever side seeds it: with mobile as the seed, the snapshot would read desktop.
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM tandem.snapshots WHERE table_name = 'public.notes' \
             AND state = 'done' AND seed = 'M'"
        )
        .await,
        1
    );
    let run = fx.start().await;
    fx.m.batch_execute("DELETE FROM notes WHERE id = 2")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM notes", 2).await;
    fx.wait_equal("notes", 30).await;
    run.stop().await;
    let mut cfg = (*fx.cfg).clone();
    cfg.seed = tandem::side::Side::Mobile;
    let seeded_by_mobile = Fixture {
        cfg: std::sync::Arc::new(cfg),
        ..fx
    };
    let run = seeded_by_mobile.start().await;
    // A copy from mobile would have recorded itself on desktop.
    assert_eq!(
        Fixture::count(
            &seeded_by_mobile.d,
            "SELECT count(*) FROM tandem.snapshots WHERE table_name = 'public.notes'"
        )
        .await,
        0
    );

    // Dropped with `tandem ddl`, it is no longer synchronised: made again by hand on each side,
    // with rows of their own, and published by setup, the next start copies it like any table
    // never synchronised (fails while the record of its first life stays).
    let (code, _, err) = ddl("desktop", "DROP TABLE notes");
    assert_eq!(code, 0, "{err}");
    wait_count(
        30,
        &seeded_by_mobile.m,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'notes'",
        0,
    )
    .await;
    run.stop().await;
    seeded_by_mobile
        .d
        .batch_execute(
            "CREATE TABLE notes (id bigint PRIMARY KEY, body text); INSERT INTO notes VALUES (10, 'd')",
        )
        .await
        .unwrap();
    seeded_by_mobile
        .m
        .batch_execute(
            "CREATE TABLE notes (id bigint PRIMARY KEY, body text); INSERT INTO notes VALUES (11, 'm')",
        )
        .await
        .unwrap();
    tandem::ops::setup::setup(seeded_by_mobile.cfg.clone())
        .await
        .unwrap();
    let run = seeded_by_mobile.start().await;
    seeded_by_mobile.wait_equal("notes", 30).await;
    assert_eq!(
        Fixture::count(&seeded_by_mobile.d, "SELECT count(*) FROM notes").await,
        2
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_column_added_on_the_source_only_stops_run_naming_its_transaction_and_a_restart_resumes()
{
    let fx = Fixture::new(
        "ddl_drift",
        "CREATE TABLE jobs (id int PRIMARY KEY, title text);",
        r#"tables = ["public.jobs"]"#,
    )
    .await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, 'before')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
    // Written while `run` is stopped, so that both come in the first group of the next start:
    // a row, then the desktop's schema moving first and a row using the new column.
    fx.d.batch_execute("INSERT INTO jobs VALUES (3, 'before too')")
        .await
        .unwrap();
    fx.d.batch_execute(
        "ALTER TABLE jobs ADD COLUMN extra text; INSERT INTO jobs VALUES (2, 'after', 'e')",
    )
    .await
    .unwrap();
    let (msg, _) = common::rejected(fx.start_nowait()).await;
    assert_eq!(msg.matches("desktop → mobile").count(), 1, "{msg}");
    assert!(
        msg.contains("was rejected by mobile")
            && msg.contains("column `extra` of public.jobs exists on the source side but not on the target; add it to the target"),
        "{msg}"
    );
    // The transaction before it landed (found one per commit), nothing of it, and the
    // checkpoint did not pass it.
    assert_eq!(
        Fixture::rows(&fx.m, "jobs").await,
        ["(1,before)", "(3,\"before too\")"]
    );
    fx.assert_slots_within_checkpoints().await;

    // Once the target has the column, a restart resumes from the checkpoint: nothing lost.
    fx.m.batch_execute("ALTER TABLE jobs ADD COLUMN extra text")
        .await
        .unwrap();
    let run = fx.start().await;
    fx.wait_equal("jobs", 30).await;
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM jobs WHERE id = 2 AND extra = 'e'"
        )
        .await,
        1
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_created_after_setup_stops_run_until_setup_publishes_it() {
    let fx = Fixture::new(
        "late_table",
        "CREATE TABLE jobs (id int PRIMARY KEY, title text);",
        r#"tables = ["public.*"]"#,
    )
    .await;
    for c in [&fx.d, &fx.m] {
        c.batch_execute("CREATE TABLE late (id int PRIMARY KEY, v text)")
            .await
            .unwrap();
    }
    fx.d.batch_execute("INSERT INTO late VALUES (1, 'before setup')")
        .await
        .unwrap();
    // Matches `public.*`, but no publication has it: run refuses before copying anything.
    let msg = fx.refused().await;
    assert!(
        msg.contains(
            "public.late match [replication] tables but are not in publication late_table_d"
        ) && msg.contains("run `tandem setup` to add them"),
        "{msg}"
    );
    assert_eq!(Fixture::count(&fx.m, "SELECT count(*) FROM late").await, 0);
    let config = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(&["--config", config, "status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("NOT PUBLISHED public.late").count(), 2, "{out}");

    let (code, out, err) = run_tandem(&["--config", config, "setup"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    // Now run snapshots the table and streams its changes, both ways.
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO late VALUES (2, 'from desktop')")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO late VALUES (3, 'from mobile')")
        .await
        .unwrap();
    fx.wait_equal("late", 30).await;
    assert_eq!(Fixture::count(&fx.d, "SELECT count(*) FROM late").await, 3);
    run.stop().await;

    // A table created while run runs: the metric (and a warning) say it is not being sent.
    let (mut child, port) = fx.run_with_metrics();
    let unpublished = |body: &str, dir: &str| {
        common::metric(body, "tandem_unpublished_tables", &[("direction", dir)])
    };
    wait_for(60, "no unpublished tables reported", || async {
        scrape(port).is_some_and(|b| unpublished(&b, "D>M").as_deref() == Some("0"))
    })
    .await;
    for c in [&fx.d, &fx.m] {
        c.batch_execute("CREATE TABLE later (id int PRIMARY KEY)")
            .await
            .unwrap();
    }
    wait_for(
        60,
        "the new table reported unpublished both ways",
        || async {
            scrape(port).is_some_and(|b| {
                unpublished(&b, "D>M").as_deref() == Some("1")
                    && unpublished(&b, "M>D").as_deref() == Some("1")
            })
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A table `setup` publishes while `run` runs is copied as at the start, without a restart: the
/// streams send only its changes from then on, not the rows each side had before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_setup_publishes_while_run_runs_gets_its_initial_snapshot() {
    let fx = Fixture::new(
        "published_later",
        "CREATE TABLE jobs (id int PRIMARY KEY, title text);",
        r#"tables = ["public.*"]"#,
    )
    .await;
    let run = fx.start().await;
    for c in [&fx.d, &fx.m] {
        c.batch_execute("CREATE TABLE late (id int PRIMARY KEY, v text)")
            .await
            .unwrap();
    }
    fx.d.batch_execute("INSERT INTO late VALUES (1, 'desktop before'), (5, 'desktop')")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO late VALUES (4, 'mobile before'), (5, 'mobile')")
        .await
        .unwrap();
    let config = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(&["--config", config, "setup"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    fx.d.batch_execute("INSERT INTO late VALUES (2, 'desktop after')")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO late VALUES (3, 'mobile after')")
        .await
        .unwrap();
    // Each side's rows from before reach the other; the key both had takes the seed's row.
    wait_for(
        60,
        "late's rows from before setup on both sides",
        || async {
            Fixture::count(&fx.m, "SELECT count(*) FROM late").await == 5
                && Fixture::count(&fx.d, "SELECT count(*) FROM late").await == 5
        },
    )
    .await;
    fx.wait_equal("late", 30).await;
    assert_eq!(
        Fixture::rows(&fx.m, "late").await,
        [
            "(1,\"desktop before\")",
            "(2,\"desktop after\")",
            "(3,\"mobile after\")",
            "(4,\"mobile before\")",
            "(5,desktop)"
        ]
    );
    assert!(!run.is_finished(), "run stopped");
    // Both directions stream again.
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, 'desktop'); INSERT INTO late VALUES (6, 'd')")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO jobs VALUES (2, 'mobile')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM late WHERE id = 6", 1).await;
    fx.wait_equal("jobs", 30).await;
    assert_eq!(Fixture::count(&fx.d, "SELECT count(*) FROM jobs").await, 2);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_table_replicates_as_one_table_whatever_each_side_partitions_it_by() {
    // Desktop partitions by day, mobile by a hash of the id: rows travel as rows of `meas`.
    let (d, m) = Fixture::databases("parted", "").await;
    d.batch_execute(
        "CREATE TABLE meas (id bigint, day date, v int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE meas_h1 PARTITION OF meas FOR VALUES FROM ('2026-01-01') TO ('2026-07-01');
         CREATE TABLE meas_h2 PARTITION OF meas FOR VALUES FROM ('2026-07-01') TO ('2027-01-01');
         INSERT INTO meas VALUES (1, '2026-02-01', 1), (2, '2026-08-01', 2);",
    )
    .await
    .unwrap();
    m.batch_execute(
        "CREATE TABLE meas (id bigint, day date, v int, PRIMARY KEY (id, day)) PARTITION BY HASH (id);
         CREATE TABLE meas_0 PARTITION OF meas FOR VALUES WITH (MODULUS 2, REMAINDER 0);
         CREATE TABLE meas_1 PARTITION OF meas FOR VALUES WITH (MODULUS 2, REMAINDER 1);
         INSERT INTO meas VALUES (2, '2026-08-01', 20), (3, '2026-03-01', 3);",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "parted",
        d,
        m,
        Fixture::config_text("parted", r#"tables = ["public.*"]"#),
    )
    .await;
    // Published as the table itself, not as its partitions.
    for c in [&fx.d, &fx.m] {
        let published: String = c
            .query_one(
                "SELECT string_agg(tablename::text, ',') FROM pg_publication_tables \
                 WHERE pubname LIKE 'parted_%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(published, "meas");
    }
    // The merge into a partitioned target counts what it inserted and updated.
    let config = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(&["--config", config, "snapshot", "--seed", "desktop"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("public.meas: copied 2 rows from desktop: 1 inserted, 1 updated, 0 deleted on mobile; 1 copied back to desktop"),
        "{out}"
    );
    fx.wait_equal("meas", 5).await;

    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO meas VALUES (4, '2026-02-04', 4);
         UPDATE meas SET day = '2026-09-01' WHERE id = 1;",
    )
    .await
    .unwrap();
    fx.m.batch_execute(
        "DELETE FROM meas WHERE id = 3; INSERT INTO meas VALUES (5, '2026-11-05', 5);
         UPDATE meas SET v = 22 WHERE id = 2;",
    )
    .await
    .unwrap();
    fx.wait_equal("meas", 30).await;
    assert_eq!(
        Fixture::rows(&fx.d, "meas").await,
        [
            "(1,2026-09-01,1)",
            "(2,2026-08-01,22)",
            "(4,2026-02-04,4)",
            "(5,2026-11-05,5)"
        ]
    );
    // The moved row is in the partition its new day belongs to.
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM meas_h2 WHERE id = 1").await,
        1
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflict_rules_on_a_partitioned_table_get_old_rows_from_every_partition() {
    let schema = "CREATE TABLE meas (id bigint, day date, v int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE meas_h1 PARTITION OF meas FOR VALUES FROM ('2026-01-01') TO ('2026-07-01');
         CREATE TABLE meas_h2 PARTITION OF meas FOR VALUES FROM ('2026-07-01') TO ('2027-01-01');
         INSERT INTO meas VALUES (1, '2026-02-01', 1);";
    // No initial snapshot: the rows are equal already, and the conflict below is for the rules.
    let tables = "tables = [\"public.meas\"]\ninitial_snapshot = false";
    let fx = Fixture::new("parted_rules", schema, tables).await;
    // The same tables under a rule that compares old rows: each partition must log them, since
    // the partition holding a row is what writes its old image to the WAL.
    let text =
        Fixture::config_text("parted_rules", tables) + "[conflicts]\npolicy = \"desktop_wins\"\n";
    std::fs::write(&fx.config_path, text).unwrap();
    let config = fx.config_path.to_str().unwrap();
    let (code, _, err) = run_tandem(&["--config", config, "setup"], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("public.meas, public.meas_h1, public.meas_h2")
            && err.contains("--replica-identity-full"),
        "{err}"
    );
    let (code, out, err) = run_tandem(
        &["--config", config, "setup", "--replica-identity-full"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("table public.meas_h2 now has REPLICA IDENTITY FULL"),
        "{out}"
    );
    // A partition added since: run refuses until setup has seen to it.
    for c in [&fx.d, &fx.m] {
        c.batch_execute("CREATE TABLE meas_h3 PARTITION OF meas FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')")
            .await
            .unwrap();
    }
    let (code, _, err) = run_tandem(&["--config", config, "run"], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("public.meas_h3 log changes without it"),
        "{err}"
    );
    let (code, _, err) = run_tandem(
        &["--config", config, "setup", "--replica-identity-full"],
        &[],
    );
    assert_eq!(code, 0, "{err}");

    // Both sides change the row while run is stopped: desktop's version wins on both.
    fx.d.batch_execute("UPDATE meas SET v = 10 WHERE id = 1")
        .await
        .unwrap();
    fx.m.batch_execute("UPDATE meas SET v = 20 WHERE id = 1")
        .await
        .unwrap();
    let (mut child, _) = fx.run_with_metrics();
    fx.wait_equal("meas", 30).await;
    // The sides are equal as soon as desktop's version reached mobile; mobile's update reaching
    // desktop, where it is the conflict, may come a moment later.
    wait_for(
        30,
        "mobile's update met as a conflict on desktop",
        || async { Fixture::count(&fx.d, "SELECT count(*) FROM tandem.conflicts").await >= 1 },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(Fixture::rows(&fx.m, "meas").await, ["(1,2026-02-01,10)"]);
    assert_eq!(Fixture::rows(&fx.d, "meas").await, ["(1,2026-02-01,10)"]);
}

/// `JOBS`, owned by a plain role (LOGIN and REPLICATION, no superuser) as on managed cloud
/// PostgreSQL, with `extra` run before the tables change owner.
fn plain_role_jobs(role: &str, password: &str, db: &str, extra: &str) -> String {
    format!(
        "DO $$ BEGIN CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}'; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT CREATE ON DATABASE {db} TO {role};
         {JOBS}
         {extra}
         ALTER TABLE jobs OWNER TO {role}; ALTER TABLE tasks OWNER TO {role};
         ALTER TABLE scratch OWNER TO {role};"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_without_superuser_replicates_both_ways_without_echo() {
    // As on managed cloud PostgreSQL: LOGIN and REPLICATION, owner of its tables, no superuser.
    // No replication origin then, and no session_replication_role: the marker alone stops echo,
    // and the target's triggers fire for replicated rows (the audit trigger counts them).
    let schema = plain_role_jobs("tandem_app", "app-pw", "nonsuper", &audit_sql("jobs"))
        + "GRANT INSERT ON audit TO tandem_app;";
    let (d, m) = Fixture::databases("nonsuper", &schema).await;
    let text = Fixture::config_text("nonsuper", JOBS_TABLES)
        .replace("postgresql://postgres@", "postgresql://tandem_app:app-pw@");
    assert_eq!(text.matches("tandem_app:app-pw@").count(), 2);
    let fx = Fixture::with_config("nonsuper", d, m, text).await;
    let run = fx.start().await;
    tokio::join!(writer(&fx.d, 0), writer(&fx.m, 10_000));
    fx.wait_equal("jobs", 60).await;
    // 300 inserts + 100 updates + 60 deletes per side, each landing once on the other side.
    for c in [&fx.d, &fx.m] {
        wait_count(30, c, "SELECT count(*) FROM audit", 920).await;
    }
    let role = "SELECT string_agg(DISTINCT usename::text, ',') FROM pg_stat_activity \
                WHERE application_name LIKE 'tandem %' AND datname = current_database()";
    for c in [&fx.d, &fx.m] {
        let used: String = c.query_one(role, &[]).await.unwrap().get(0);
        assert_eq!(
            used, "tandem_app",
            "tandem's sessions run as the plain role"
        );
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_connections_reconnect_and_lose_nothing() {
    let schema = format!("{JOBS}\n{}", audit_sql("jobs"));
    let fx = Fixture::new("reconnect", &schema, JOBS_TABLES).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'before' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    // An admin kills tandem's sessions: the apply session on mobile and the walsender on desktop.
    let kill = |app: &str| {
        format!("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name ~ ('^{app}( [0-9]+ [^ ]+)?$') AND datname = current_database()")
    };
    assert_eq!(Fixture::count(&fx.m, &kill("tandem apply D>M")).await, 1);
    assert_eq!(Fixture::count(&fx.m, &kill("tandem stream M>D")).await, 1);
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'after' FROM generate_series(101, 200) g")
        .await
        .unwrap();
    fx.m.batch_execute(
        "INSERT INTO jobs SELECT g, 'mobile after' FROM generate_series(1001, 1010) g",
    )
    .await
    .unwrap();
    fx.wait_equal("jobs", 60).await;
    assert!(!run.is_finished(), "sync must survive terminated sessions");
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await,
        210
    );
    wait_for(30, "each change once", || async {
        Fixture::count(&fx.m, "SELECT count(*) FROM audit").await == 210
            && Fixture::count(&fx.d, "SELECT count(*) FROM audit").await == 210
    })
    .await;
    run.stop().await;
}

/// An application swaps two rows' values of a UNIQUE column through a temporary value (a list
/// reordered, two users' emails exchanged): right on the source in its order. Batched, the
/// key's latest images were written in another order and the target refused the transaction
/// (a unique violation) for ever. A group refused is now applied again one change per statement,
/// in source order, as native's apply does; then batched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_swapped_through_a_unique_column_are_applied_in_the_sources_order() {
    let fx = Fixture::new(
        "unique_swap",
        "CREATE TABLE items (id int PRIMARY KEY, list int, pos int, UNIQUE (list, pos)); \
         CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE);",
        "tables = [\"public.items\", \"public.users\"]",
    )
    .await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO items SELECT g, 1, g FROM generate_series(1, 10) g; \
         INSERT INTO users SELECT g, 'u' || g || '@x' FROM generate_series(1, 10) g",
    )
    .await
    .unwrap();
    fx.wait_equal("items", 30).await;
    fx.wait_equal("users", 30).await;
    // Stopped: these arrive together, in one group.
    run.stop().await;
    let swaps = |a: i32, b: i32| {
        format!(
            "BEGIN; \
             UPDATE items SET pos = -1 WHERE id = {a}; UPDATE items SET pos = {a} WHERE id = {b}; \
             UPDATE items SET pos = {b} WHERE id = {a}; COMMIT; \
             BEGIN; \
             UPDATE users SET email = 'tmp' WHERE id = {a}; \
             UPDATE users SET email = 'u{a}@x' WHERE id = {b}; \
             UPDATE users SET email = 'u{b}@x' WHERE id = {a}; COMMIT;"
        )
    };
    fx.d.batch_execute(&swaps(1, 2)).await.unwrap();
    fx.d.batch_execute(&swaps(3, 4)).await.unwrap();
    fx.d.batch_execute("INSERT INTO items VALUES (11, 1, 11)")
        .await
        .unwrap();
    let run = fx.start().await;
    fx.wait_equal("items", 30).await;
    fx.wait_equal("users", 30).await;
    // Mobile's own swap, while run runs (a group of its own), reaches desktop too.
    fx.m.batch_execute(&swaps(5, 6)).await.unwrap();
    wait_for(30, "mobile's swap on desktop", || async {
        Fixture::count(&fx.d, "SELECT pos::bigint FROM items WHERE id = 5").await == 6
            && Fixture::count(
                &fx.d,
                "SELECT count(*) FROM users WHERE id = 6 AND email = 'u5@x'",
            )
            .await
                == 1
    })
    .await;
    // Batched again after the swaps: later rows flow, and the sides are equal.
    fx.d.batch_execute("INSERT INTO items SELECT 100 + g, 2, g FROM generate_series(1, 500) g")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items WHERE list = 2", 500).await;
    fx.wait_equal("items", 30).await;
    fx.wait_equal("users", 30).await;
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM items WHERE list = 1 AND (id, pos) IN \
             ((1, 2), (2, 1), (3, 4), (4, 3), (5, 6), (6, 5))"
        )
        .await,
        6,
        "every swap made"
    );
    assert!(!run.is_finished(), "replication keeps running");
    fx.assert_slots_within_checkpoints().await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_slot_keeps_up_with_writes_to_unpublished_tables() {
    let schema = format!("{JOBS}\nCREATE TABLE local_only (id int PRIMARY KEY, v text);");
    let fx = Fixture::new("idle_slot", &schema, JOBS_TABLES).await;
    let run = fx.start().await;
    // 4 MB of WAL that no publication covers: PostgreSQL 15 sends no transaction for it, only
    // keepalives, and the slot must still move or the WAL would pile up on desktop.
    fx.d.batch_execute(
        "INSERT INTO local_only SELECT g, repeat('x', 1000) FROM generate_series(1, 4000) g",
    )
    .await
    .unwrap();
    let lag = "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'idle_slot_d'";
    assert!(Fixture::count(&fx.d, lag).await > 1_000_000);
    wait_for(
        60,
        "desktop slot confirmed past the unpublished writes",
        || async {
            Fixture::count(&fx.d, lag).await < tandem::sync::IDLE_RECORD_BYTES as i64 + 16 * 1024
        },
    )
    .await;
    assert_eq!(Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await, 0);
    run.stop().await;
}

/// A key change that left a TOASTed value unchanged, onto a key the target holds a row of its own
/// at (a table desktop alone sends, mobile's application wrote that row): the moved row, with its
/// unchanged value, takes the key's place, and replication goes on (before: a unique violation
/// stopped it, naming the transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_change_onto_a_key_the_target_holds_moves_the_row_there() {
    let fx = Fixture::new(
        "rekey_taken",
        "CREATE TABLE r (id bigint PRIMARY KEY, v text, big text);",
        "tables = [\"public.r\"]\n[replication.direction]\n\"public.r\" = \"desktop_to_mobile\"",
    )
    .await;
    let run = fx.start().await;
    fx.m.execute("INSERT INTO r VALUES (2, 'mobile''s own', 'small')", &[])
        .await
        .unwrap();
    fx.d.batch_execute(
        "INSERT INTO r SELECT 1, 'first', string_agg(md5(g::text), '') FROM generate_series(1, 200) g;",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM r WHERE id = 1", 1).await;
    fx.d.batch_execute(
        "UPDATE r SET id = 2, v = 'moved' WHERE id = 1; INSERT INTO r VALUES (3, 'after', NULL);",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM r WHERE id = 3", 1).await;
    fx.wait_equal("r", 30).await;
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM r WHERE id = 2 AND length(big) = 6400 AND v = 'moved'"
        )
        .await,
        1
    );
    run.stop().await;
}

/// Batched apply against the sources' own row-by-row histories, through the real SQL paths:
/// merged statements, plain INSERT/UPDATE for a large transaction's batches, many source
/// transactions per target commit, both directions at once on their own keys. Both sides end
/// with the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_histories_on_a_few_keys_end_with_the_same_rows_on_both_sides() {
    let fx = random_histories("randhist", "", "").await;
    assert!(streamed_txns(&fx.d, "randhist_d").await >= 1);
    assert!(streamed_txns(&fx.m, "randhist_m").await >= 1);
}

/// The same through conflict detection (each batch's rows looked up and locked, decided by the
/// rule; large transactions come whole at their commit). The sides write disjoint keys, so no
/// decision may change a row and no conflict may be logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_histories_through_conflict_detection_end_equal_with_no_conflict_logged() {
    let fx = random_histories(
        "randhist_cf",
        "ALTER TABLE r REPLICA IDENTITY FULL;",
        "[conflicts]\npolicy = \"desktop_wins\"",
    )
    .await;
    for c in [&fx.d, &fx.m] {
        assert_eq!(
            Fixture::count(c, "SELECT count(*) FROM tandem.conflicts").await,
            0,
            "{:?}",
            Fixture::rows(c, "tandem.conflicts").await
        );
    }
}

/// Both sides' [`random_history`] written at once under `name` (with `schema` and `config` added),
/// until the sides are equal; rows on both sides' keys and some TOASTed values checked to be there.
async fn random_histories(name: &str, schema: &str, config: &str) -> Fixture {
    let fx = Fixture::new(
        name,
        &format!("CREATE TABLE r (id bigint PRIMARY KEY, v text, n int, big text);{schema}"),
        &format!("tables = [\"public.r\"]\n{config}"),
    )
    .await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    stream_from_a_few_hundred_rows(&fx.m).await;
    let run = fx.start().await;
    tokio::join!(
        random_history(&fx.d, 0, 0x5EED, 120, false),
        random_history(&fx.m, 1000, 0xBEEF, 120, false)
    );
    fx.wait_equal("r", 90).await;
    run.stop().await;
    for (range, side) in [("id < 1000", "desktop's"), ("id >= 1000", "mobile's")] {
        assert!(
            Fixture::count(&fx.d, &format!("SELECT count(*) FROM r WHERE {range}")).await > 0,
            "{side} keys have rows"
        );
    }
    assert!(
        Fixture::count(&fx.d, "SELECT count(*) FROM r WHERE length(big) > 3000").await > 0,
        "some rows carry a TOASTed value"
    );
    fx
}

/// The source keeps PostgreSQL's default `logical_decoding_work_mem` (64 MB); tandem lowers its own
/// walsender's to 8 MB, so a ~22 MB transaction arrives in blocks and is applied while the source
/// has not committed it yet (under 64 MB it would come only at its commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_over_8_mb_is_applied_while_in_progress_under_the_default_decoding_memory() {
    let fx = Fixture::new("decode_cap", JOBS, JOBS_TABLES).await;
    let url = common::clusters().desktop.url("decode_cap");
    let a = common::connect(&url).await;
    let run = fx.start().await;
    a.batch_execute(
        "BEGIN; INSERT INTO jobs SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, 20000) g",
    )
    .await
    .unwrap();
    wait_for(
        60,
        "the target writes the open transaction's rows",
        || async {
            Fixture::count(
                &fx.m,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'tandem apply % streamed %' AND backend_xid IS NOT NULL",
            )
            .await
                == 1
        },
    )
    .await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await,
        0,
        "nothing of it is visible before the source commits"
    );
    a.batch_execute("COMMIT").await.unwrap();
    fx.wait_equal("jobs", 60).await;
    assert!(streamed_txns(&fx.d, "decode_cap_d").await >= 1);
    run.stop().await;
}

/// Large transactions come from the source while still in progress (protocol 2 streaming): one
/// is applied as it arrives in a second session, one streamed alongside it is spooled. Each
/// commits in commit order, without its rolled-back subtransactions, aborted ones leave nothing,
/// and a restart in the middle of one applies it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_transactions_stream_in_progress_and_apply_whole_at_commit() {
    let schema = format!("{JOBS}\n{}", audit_sql("jobs"));
    // Streaming is on by default without conflict rules or Kafka.
    let fx = Fixture::new("streamed", &schema, JOBS_TABLES).await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    let url = common::clusters().desktop.url("streamed");
    let (a, b) = (common::connect(&url).await, common::connect(&url).await);
    let run = fx.start().await;

    // a: large, with a subtransaction rolled back; b: another large one, interleaved and
    // committed first; small ones and a large aborted one in between.
    a.batch_execute(
        "BEGIN; INSERT INTO jobs SELECT g, 'a' FROM generate_series(1, 3000) g; SAVEPOINT s; \
         INSERT INTO jobs SELECT g, 'rolled back' FROM generate_series(3001, 5000) g; \
         ROLLBACK TO s; INSERT INTO jobs SELECT g, 'a2' FROM generate_series(5001, 6000) g; \
         INSERT INTO scratch SELECT g, 'a' FROM generate_series(1, 10) g",
    )
    .await
    .unwrap();
    b.batch_execute("BEGIN; INSERT INTO jobs SELECT g, 'b' FROM generate_series(10001, 13000) g")
        .await
        .unwrap();
    fx.d.batch_execute("INSERT INTO jobs VALUES (20001, 'small')")
        .await
        .unwrap();
    a.batch_execute("UPDATE jobs SET n = 1 WHERE id <= 3000")
        .await
        .unwrap();
    b.batch_execute("UPDATE jobs SET status = 'b done' WHERE id BETWEEN 10001 AND 13000; COMMIT")
        .await
        .unwrap();
    fx.d.batch_execute(
        "BEGIN; INSERT INTO jobs SELECT g, 'aborted' FROM generate_series(30001, 33000) g; ROLLBACK",
    )
    .await
    .unwrap();
    // After a's commit, a small transaction changes a row a wrote: it must land after a.
    a.batch_execute("COMMIT").await.unwrap();
    // scratch was first described inside a; the server will not describe it again.
    fx.d.batch_execute(
        "UPDATE jobs SET status = 'after a' WHERE id = 1; UPDATE scratch SET v = 'after a'",
    )
    .await
    .unwrap();
    fx.wait_equal("jobs", 60).await;
    fx.wait_equal("scratch", 30).await;
    let m = &fx.m;
    assert_eq!(
        Fixture::count(m, "SELECT count(*) FROM jobs").await,
        3000 + 1000 + 3000 + 1
    );
    assert_eq!(
        Fixture::count(
            m,
            "SELECT count(*) FROM jobs WHERE title = 'rolled back' OR title = 'aborted'"
        )
        .await,
        0
    );
    assert_eq!(
        Fixture::count(
            m,
            "SELECT count(*) FROM jobs WHERE id = 1 AND n = 1 AND status = 'after a'"
        )
        .await,
        1
    );
    // Every change landed once: 7,001 inserts, 3,000 + 3,000 + 1 updates.
    wait_count(30, m, "SELECT count(*) FROM audit", 13_002).await;
    let streamed = streamed_txns(&fx.d, "streamed_d").await;
    assert!(
        streamed >= 3,
        "a, b and the aborted one were streamed: {streamed}"
    );
    // a went to the second apply session while in progress (b, interleaved, was spooled).
    assert_eq!(Fixture::count(m, STREAMED_SESSIONS).await, 1);

    // Stopped while a streamed transaction is open: the server streams it again from its start
    // after the restart, and it applies once.
    a.batch_execute(
        "BEGIN; UPDATE jobs SET n = 2 WHERE id <= 3000; \
         INSERT INTO jobs SELECT g, 'c' FROM generate_series(40001, 43000) g",
    )
    .await
    .unwrap();
    wait_for(30, "the open transaction to be streamed", || async {
        streamed_txns(&fx.d, "streamed_d").await > streamed
    })
    .await;
    run.stop().await;
    fx.assert_slots_within_checkpoints().await;
    let run = fx.start().await;
    a.batch_execute("COMMIT").await.unwrap();
    fx.wait_equal("jobs", 60).await;
    wait_count(30, m, "SELECT count(*) FROM audit", 13_002 + 6_000).await;
    assert_eq!(
        Fixture::count(m, "SELECT count(*) FROM jobs WHERE n = 2").await,
        3000
    );
    run.stop().await;
}

/// A target trigger (firing for replicated rows too) makes a whole transaction wait on a row the
/// live streamed transaction holds in the other session. Instead of both sessions waiting
/// forever, the direction starts over, spools that transaction, and everything lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_transaction_blocked_by_the_live_one_makes_it_spooled_instead() {
    let fx = Fixture::new("live_blocked", JOBS, JOBS_TABLES).await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    // Mobile only: every applied insert bumps one counter row.
    fx.m.batch_execute(
        "CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL);
         INSERT INTO counters VALUES (1, 0);
         CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN UPDATE counters SET n = n + 1 WHERE id = 1; RETURN NULL; END $$;
         CREATE TRIGGER bump AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION bump();
         ALTER TABLE jobs ENABLE ALWAYS TRIGGER bump;",
    )
    .await
    .unwrap();
    let a = common::connect(&common::clusters().desktop.url("live_blocked")).await;
    let run = fx.start().await;
    a.batch_execute("BEGIN; INSERT INTO jobs SELECT g, 'big' FROM generate_series(1, 3000) g")
        .await
        .unwrap();
    // The live session has applied some of it, so it holds the counter row.
    common::wait_for_explained(
        30,
        "the open transaction applied live",
        || async {
            Fixture::count(
                &fx.m,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'tandem apply % streamed %' \
                 AND state = 'idle in transaction'",
            )
            .await
                == 1
        },
        // It timed out twice in three full runs with a CPU hog beside them: what did the
        // sessions and the stream do?
        || async {
            let sessions: Vec<String> = fx
                .m
                .query(
                    "SELECT format('%s: %s %s %s', application_name, state, wait_event, left(query, 60)) \
                     FROM pg_stat_activity WHERE datname = current_database()",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            format!(
                "; desktop streamed {} transactions; desktop's stream started {} times; \
                 mobile's sessions: {sessions:#?}",
                streamed_txns(&fx.d, "live_blocked_d").await,
                run.status
                    .from_desktop
                    .starts
                    .load(std::sync::atomic::Ordering::Relaxed)
            )
        },
    )
    .await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (5000, 'small')")
        .await
        .unwrap();
    // Lands while the big one is still open on the source: nothing waits forever.
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id = 5000", 1).await;
    a.batch_execute("COMMIT").await.unwrap();
    fx.wait_equal("jobs", 60).await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT n::bigint FROM counters").await,
        3001,
        "each insert applied once"
    );
    run.stop().await;
}

/// Desktop's 3,000 rows in one transaction reach mobile, mobile's walsender (slot `slot`) streams
/// tandem's write of them back, and mobile's next row of the table then reaches desktop.
async fn echo_and_back(fx: &Fixture, slot: &str) {
    fx.d.batch_execute(
        "INSERT INTO jobs (id, title) SELECT g, 'd' FROM generate_series(1, 3000) g",
    )
    .await
    .unwrap();
    wait_count(60, &fx.m, "SELECT count(*) FROM jobs", 3000).await;
    wait_for(30, "mobile's walsender streamed the echo", || async {
        streamed_txns(&fx.m, slot).await >= 1
    })
    .await;
    fx.m.execute("INSERT INTO jobs (id, title) VALUES (5000, 'mobile')", &[])
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM jobs WHERE id = 5000", 1).await;
}

/// tandem's own large transaction on mobile (desktop's 3,000 rows, applied there while in
/// progress), streamed back by mobile's walsender, opens no apply session on desktop: it has
/// nothing to apply, its marker coming first (before: a session opened at its first message).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_echo_streamed_back_opens_no_session() {
    let fx = Fixture::new("echo_live", JOBS, JOBS_TABLES).await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    stream_from_a_few_hundred_rows(&fx.m).await;
    let run = fx.start().await;
    echo_and_back(&fx, "echo_live_m").await;
    assert_eq!(Fixture::count(&fx.d, STREAMED_SESSIONS).await, 0);
    run.stop().await;
}

/// tandem's own large transaction on mobile (desktop's 3,000 rows, applied there in one target
/// transaction) is streamed by mobile's walsender while decoded. With conflict rules and
/// `stream_in_progress = true` tandem spools it until its commit: without its rows (without
/// Kafka nothing reads an echo's changes), but with its relation message, which pgoutput does not
/// send again once the streamed transaction that sent it committed. Mobile's next row of that
/// table reaches desktop (it fails when the relation is dropped with the rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_echo_spooled_without_its_rows_keeps_its_relation_for_the_next_change() {
    let fx = Fixture::new(
        "echo_spool",
        JOBS,
        &format!(
            "{JOBS_TABLES}\nstream_in_progress = true\n[conflicts]\npolicy = \"apply_remote\""
        ),
    )
    .await;
    stream_from_a_few_hundred_rows(&fx.m).await;
    let run = fx.start().await;
    echo_and_back(&fx, "echo_spool_m").await;
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
}

/// `tandem run --metrics-addr` counts streamed transactions by how they were applied: the first
/// live, one streamed while it was open spooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streamed_transactions_are_counted_in_prometheus_metrics() {
    let fx = Fixture::new("streamed_metrics", JOBS, JOBS_TABLES).await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    let url = common::clusters().desktop.url("streamed_metrics");
    let (a, b) = (common::connect(&url).await, common::connect(&url).await);
    let (mut child, port) = fx.run_with_metrics();
    common::wait_slot_active(&fx.d, "streamed_metrics_d", true).await;
    a.batch_execute("BEGIN; INSERT INTO jobs SELECT g, 'a' FROM generate_series(1, 3000) g")
        .await
        .unwrap();
    wait_for(30, "a streamed", || async {
        streamed_txns(&fx.d, "streamed_metrics_d").await >= 1
    })
    .await;
    b.batch_execute("BEGIN; INSERT INTO jobs SELECT g, 'b' FROM generate_series(10001, 13000) g")
        .await
        .unwrap();
    wait_for(30, "b streamed", || async {
        streamed_txns(&fx.d, "streamed_metrics_d").await >= 2
    })
    .await;
    b.batch_execute("COMMIT").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    fx.wait_equal("jobs", 60).await;
    let count = |body: &str, applied: &str| {
        common::metric(
            body,
            "tandem_streamed_transactions_total",
            &[("direction", "D>M"), ("applied", applied)],
        )
    };
    wait_for(
        30,
        "one live and one spooled streamed transaction counted",
        || async {
            scrape(port).is_some_and(|b| {
                count(&b, "live").as_deref() == Some("1")
                    && count(&b, "spooled").as_deref() == Some("1")
            })
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `tandem_lag_seconds` is what a reader of the target sees: measured when the target's commit
/// is done, not when it was sent (before, a commit the target took a second over read as a few
/// milliseconds of lag).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lag_gauge_counts_the_time_the_target_takes_to_commit() {
    let (d, m) = Fixture::databases("lag_metric", JOBS).await;
    // Every commit of tandem's that touched `jobs` on mobile takes a second.
    common::slow_commits(&m, "jobs", 1.0).await;
    let text = Fixture::config_text("lag_metric", r#"tables = ["public.jobs"]"#);
    let fx = Fixture::with_config("lag_metric", d, m, text).await;
    let (mut child, port) = fx.run_with_metrics();
    common::wait_slot_active(&fx.d, "lag_metric_d", true).await;
    fx.d.batch_execute("INSERT INTO jobs (id, title) VALUES (1, 'slow')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 1).await;
    let lag = || {
        scrape(port).and_then(|b| {
            common::metric(&b, "tandem_lag_seconds", &[("direction", "D>M")])
                .and_then(|v| v.parse::<f64>().ok())
        })
    };
    // The row is visible once the commit is done; tandem reads its result just after.
    wait_for(
        10,
        "a lag of at least the commit's second reported",
        || async { lag().is_some_and(|l| l >= 1.0) },
    )
    .await;
    let l = lag().unwrap();
    assert!(l < 30.0, "lag {l} s, for a commit that took 1 s");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_column_list_keeps_the_other_columns_each_sides_own() {
    // Desktop keeps salaries, mobile a flag of its own; both have `notes`, each its own.
    let (d, m) = Fixture::databases(
        "collist",
        "CREATE TABLE staff (id int PRIMARY KEY, name text, notes text);",
    )
    .await;
    d.batch_execute(
        "ALTER TABLE staff ADD COLUMN salary int; \
         INSERT INTO staff VALUES (1, 'ann', 'desk', 100), (2, 'bob', 'desk', 200)",
    )
    .await
    .unwrap();
    m.batch_execute("ALTER TABLE staff ADD COLUMN on_phone bool NOT NULL DEFAULT false")
        .await
        .unwrap();
    let text = |cols: &str| {
        Fixture::config_text(
            "collist",
            &format!(
                "tables = [\"public.staff\"]\n[replication.columns]\n\"public.staff\" = {cols}"
            ),
        )
    };
    // Without the key, neither side could update or delete: refused before anything exists.
    let bad =
        std::sync::Arc::new(tandem::config::Config::parse(&text(r#"["name"]"#), |_| None).unwrap());
    let e = format!("{:#}", tandem::ops::setup::setup(bad).await.unwrap_err());
    assert!(
        e.contains("[replication.columns] must list its key column(s) id"),
        "{e}"
    );
    let salary = std::sync::Arc::new(
        tandem::config::Config::parse(&text(r#"["id", "name", "salary"]"#), |_| None).unwrap(),
    );
    let e = format!("{:#}", tandem::ops::setup::setup(salary).await.unwrap_err());
    assert!(
        e.contains(
            "column `salary` exists on desktop but not on mobile; add it to mobile (or take it \
             off [replication.columns] to keep it desktop's own)"
        ),
        "{e}"
    );
    // Old rows need REPLICA IDENTITY FULL, which PostgreSQL 15 sends only when every column
    // flows.
    let wins = format!(
        "{}[conflicts]\npolicy = \"desktop_wins\"\n",
        text(r#"["id", "name"]"#)
    );
    let wins = std::sync::Arc::new(tandem::config::Config::parse(&wins, |_| None).unwrap());
    let e = format!("{:#}", tandem::ops::setup::setup(wins).await.unwrap_err());
    assert!(
        e.contains("conflict policy desktop_wins needs the old row"),
        "{e}"
    );
    // A column of mobile's own that must have a value no row from desktop brings.
    m.batch_execute("ALTER TABLE staff ADD COLUMN pin int NOT NULL")
        .await
        .unwrap();
    let list = std::sync::Arc::new(
        tandem::config::Config::parse(&text(r#"["id", "name"]"#), |_| None).unwrap(),
    );
    let e = format!("{:#}", tandem::ops::setup::setup(list).await.unwrap_err());
    assert!(
        e.contains(
            "mobile: column `pin` of public.staff is NOT NULL without a default and \
             [replication.columns] leaves it out, so no row from desktop could be inserted"
        ),
        "{e}"
    );
    m.batch_execute("ALTER TABLE staff DROP COLUMN pin")
        .await
        .unwrap();
    let fx = Fixture::with_config("collist", d, m, text(r#"["id", "name"]"#)).await;
    let published: Vec<String> =
        fx.d.query_one(
            "SELECT attnames::text[] FROM pg_publication_tables WHERE pubname = 'collist_d'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, ["id", "name"]);

    let run = fx.start().await;
    assert_eq!(
        Fixture::rows(&fx.m, "staff").await,
        ["(1,ann,,f)", "(2,bob,,f)"],
        "the snapshot copies the listed columns only"
    );
    fx.d.batch_execute(
        "UPDATE staff SET salary = 999, notes = 'raise', name = 'anne' WHERE id = 1; \
         INSERT INTO staff VALUES (3, 'cy', 'new', 300)",
    )
    .await
    .unwrap();
    fx.m.batch_execute(
        "UPDATE staff SET name = 'bobby', notes = 'phone', on_phone = true WHERE id = 2",
    )
    .await
    .unwrap();
    wait_for(30, "both changes crossed", || async {
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM staff WHERE name IN ('anne', 'cy')",
        )
        .await
            == 2
            && Fixture::count(&fx.d, "SELECT count(*) FROM staff WHERE name = 'bobby'").await == 1
    })
    .await;
    run.stop().await;
    assert_eq!(
        Fixture::rows(&fx.d, "staff").await,
        ["(1,anne,raise,999)", "(2,bobby,desk,200)", "(3,cy,new,300)"]
    );
    assert_eq!(
        Fixture::rows(&fx.m, "staff").await,
        ["(1,anne,,f)", "(2,bobby,phone,t)", "(3,cy,,f)"]
    );
    // Compared by the listed columns: `notes` differs, yet the sides are in sync.
    let cfg = fx.config_path.to_str().unwrap();
    // A listed column changed behind tandem's back is found, and repair leaves the rest alone.
    let drift = "UPDATE staff SET name = 'wrong', notes = 'mine' WHERE id = 3";
    common::verify_finds_drift(cfg, &fx.m, drift).await;
    common::repair_from_desktop(cfg);
    assert_eq!(Fixture::rows(&fx.m, "staff").await[2], "(3,cy,mine,f)");
    // A list changed in the config only: run refuses until setup changes the publications.
    let changed = fx.config_path.with_extension("notes.toml");
    std::fs::write(&changed, text(r#"["id", "name", "notes"]"#)).unwrap();
    let changed = changed.to_str().unwrap();
    let (code, _, err) = run_tandem(&["--config", changed, "run"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "public.staff: publication collist_d sends (id, name), [replication.columns] says \
             (id, name, notes); run `tandem setup`"
        ),
        "{err}"
    );
    let (code, out, err) = run_tandem(&["--config", changed, "setup"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    for c in [&fx.d, &fx.m] {
        let published: Vec<String> = c
            .query_one(
                "SELECT attnames::text[] FROM pg_publication_tables WHERE pubname LIKE 'collist_%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(published, ["id", "name", "notes"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_filter_sends_only_its_rows_and_moves_rows_in_and_out() {
    // Phones get the north's jobs; what they write comes back whatever its region.
    let (d, m) = Fixture::databases(
        "rowfilter",
        "CREATE TABLE jobs (id int PRIMARY KEY, region text NOT NULL, title text);",
    )
    .await;
    d.batch_execute("INSERT INTO jobs VALUES (1, 'north', 'a'), (2, 'south', 'b')")
        .await
        .unwrap();
    let text = Fixture::config_text(
        "rowfilter",
        "tables = [\"public.jobs\"]\n[replication.filter.\"public.jobs\"]\n\
         desktop_to_mobile = \"region = 'north'\"",
    );
    let cfg = std::sync::Arc::new(tandem::config::Config::parse(&text, |_| None).unwrap());
    // `region` is not in the key: PostgreSQL would refuse desktop's own updates and deletes.
    let e = format!("{:#}", tandem::ops::setup::setup(cfg).await.unwrap_err());
    assert!(
        e.contains("uses a column outside the replica identity of public.jobs")
            && e.contains("REPLICA IDENTITY FULL"),
        "{e}"
    );
    d.batch_execute("UPDATE jobs SET title = title WHERE id = 1; DELETE FROM jobs WHERE id = 99")
        .await
        .expect("the refused setup left no publication behind to refuse these");
    let bad = text.replace("region = 'north'", "region = ");
    let cfg = std::sync::Arc::new(tandem::config::Config::parse(&bad, |_| None).unwrap());
    let e = format!("{:#}", tandem::ops::setup::setup(cfg).await.unwrap_err());
    assert!(e.contains("is not a condition a publication takes"), "{e}");

    d.batch_execute("ALTER TABLE jobs REPLICA IDENTITY FULL")
        .await
        .unwrap();
    // A phone's row from before: the snapshot merges, and copies it back to desktop.
    m.batch_execute("INSERT INTO jobs VALUES (20, 'south', 'old phone')")
        .await
        .unwrap();
    let fx = Fixture::with_config("rowfilter", d, m, text).await;
    let run = fx.start().await;
    assert_eq!(
        Fixture::rows(&fx.m, "jobs").await,
        ["(1,north,a)", "(20,south,\"old phone\")"],
        "the snapshot copies the filter's rows"
    );
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM jobs WHERE id = 20").await,
        1
    );
    fx.d.batch_execute(
        "INSERT INTO jobs VALUES (3, 'north', 'c'), (4, 'south', 'd'); \
         UPDATE jobs SET region = 'south' WHERE id = 1; \
         UPDATE jobs SET region = 'north' WHERE id = 2",
    )
    .await
    .unwrap();
    fx.m.batch_execute("INSERT INTO jobs VALUES (10, 'south', 'from a phone')")
        .await
        .unwrap();
    wait_for(30, "both directions crossed", || async {
        Fixture::rows(&fx.m, "jobs").await
            == [
                "(10,south,\"from a phone\")",
                "(2,north,b)",
                "(20,south,\"old phone\")",
                "(3,north,c)",
            ]
            && Fixture::count(&fx.d, "SELECT count(*) FROM jobs WHERE id = 10").await == 1
    })
    .await;
    run.stop().await;
    // Compared by the rows the filter lets through: desktop's southern rows are its own.
    let cfg = fx.config_path.to_str().unwrap();
    let out = common::verify_finds_drift(cfg, &fx.m, "DELETE FROM jobs WHERE id = 3").await;
    assert!(
        out.contains("1 only desktop") && out.contains("{\"id\":3}"),
        "{out}"
    );
    // A filter changed in the config only: run refuses until setup changes the publication.
    let changed = fx.config_path.with_extension("south.toml");
    std::fs::write(
        &changed,
        std::fs::read_to_string(&fx.config_path)
            .unwrap()
            .replace("'north'", "'south'"),
    )
    .unwrap();
    let changed = changed.to_str().unwrap();
    let (code, _, err) = run_tandem(&["--config", changed, "run"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("public.jobs: publication rowfilter_d sends (region = 'north'::text), [replication.filter] says (region = 'south'::text)"),
        "{err}"
    );
    let (code, out, err) = run_tandem(&["--config", changed, "setup"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let qual: String =
        fx.d.query_one(
            "SELECT pg_get_expr(prqual, prrelid) FROM pg_publication_rel pr \
             JOIN pg_publication p ON p.oid = pr.prpubid WHERE p.pubname = 'rowfilter_d'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(qual, "(region = 'south'::text)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_need_quoting_work_everywhere() {
    // Office databases migrated from desktop tools keep names with capitals, spaces, quotes and
    // reserved words: every statement tandem builds must quote them.
    let schema = r#"
        CREATE SCHEMA "Sales Dept";
        CREATE TABLE "Sales Dept"."Order Items" (
            "Item ID" int, "Line" int, "Qty" int, "note's" text, "select" text, "Größe" text,
            PRIMARY KEY ("Item ID", "Line"));
        CREATE TABLE public."Customer" ("Id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            "Name" text NOT NULL, "Updated At" timestamptz NOT NULL DEFAULT now());"#;
    let (d, m) = Fixture::databases("quoting", schema).await;
    d.batch_execute(
        r#"INSERT INTO "Sales Dept"."Order Items" VALUES (1, 1, 5, 'it''s', 'from', 'XL');
           INSERT INTO "Customer" ("Name") VALUES ('Ann "the" Bold')"#,
    )
    .await
    .unwrap();
    let text = Fixture::config_text(
        "quoting",
        "tables = [\"Sales Dept.Order Items\", \"public.Customer\"]\n\
         [replication.filter.\"Sales Dept.Order Items\"]\n\
         desktop_to_mobile = '\"Item ID\" <> 2'\n\
         [replication.columns]\n\
         \"public.Customer\" = [\"Id\", \"Name\", \"Updated At\"]\n\
         [conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"Updated At\"\n",
    );
    let fx = Fixture::with_config("quoting", d, m, text).await;
    let cfg = fx.config_path.to_str().unwrap();
    // The identity's sequence has a quoted name too.
    let (code, out, err) = run_tandem(&["--config", cfg, "setup", "--sequences", "odd-even"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let items = r#""Sales Dept"."Order Items""#;
    let run = fx.start().await;
    fx.wait_equal(items, 30).await;
    fx.wait_equal(r#""Customer""#, 30).await;
    fx.d.batch_execute(
        r#"INSERT INTO "Sales Dept"."Order Items" VALUES (1, 2, 1, 'a"b', 'where', NULL), (2, 1, 0, 'x', 'y', 'S');
           UPDATE "Sales Dept"."Order Items" SET "Qty" = 7, "note's" = 'now' WHERE "Item ID" = 1 AND "Line" = 1;
           UPDATE "Customer" SET "Name" = 'Ann', "Updated At" = now()"#,
    )
    .await
    .unwrap();
    wait_count(
        30,
        &fx.m,
        r#"SELECT count(*) FROM "Sales Dept"."Order Items" WHERE "Line" = 2"#,
        1,
    )
    .await;
    fx.m.batch_execute(
        r#"INSERT INTO "Sales Dept"."Order Items" VALUES (3, 1, 2, 'phone', 'group', 'M');
           UPDATE "Sales Dept"."Order Items" SET "Line" = 9 WHERE "Item ID" = 1 AND "Line" = 2;
           INSERT INTO "Customer" ("Name") VALUES ('Bo')"#,
    )
    .await
    .unwrap();
    wait_for(30, "changes crossed both ways", || async {
        Fixture::count(
            &fx.d,
            r#"SELECT count(*) FROM "Sales Dept"."Order Items" WHERE "Item ID" = 3 OR "Line" = 9"#,
        )
        .await
            == 2
            && Fixture::count(
                &fx.m,
                r#"SELECT count(*) FROM "Customer" WHERE "Name" = 'Ann'"#,
            )
            .await
                == 1
    })
    .await;
    run.stop().await;
    // Item 2 is filtered out of mobile; everything else is equal.
    assert_eq!(
        Fixture::rows(&fx.d, items).await,
        [
            "(1,1,7,now,from,XL)",
            "(1,9,1,\"a\"\"b\",where,)",
            "(2,1,0,x,y,S)",
            "(3,1,2,phone,group,M)"
        ]
    );
    assert_eq!(
        Fixture::rows(&fx.m, items).await,
        [
            "(1,1,7,now,from,XL)",
            "(1,9,1,\"a\"\"b\",where,)",
            "(3,1,2,phone,group,M)"
        ]
    );
    for c in [&fx.d, &fx.m] {
        let names = common::strings(c, r#"SELECT "Name" FROM "Customer" ORDER BY "Name""#).await;
        assert_eq!(names, ["Ann", "Bo"]);
    }
    let drift = r#"UPDATE "Sales Dept"."Order Items" SET "select" = 'drift' WHERE "Item ID" = 3"#;
    common::verify_finds_drift(cfg, &fx.m, drift).await;
    common::repair_from_desktop(cfg);
    let (code, out, err) = run_tandem(&["--config", cfg, "status"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run_tandem(&["--config", cfg, "teardown"], &[]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_keyed_by_its_replica_identity_index_replicates_without_a_primary_key() {
    let schema = "
        CREATE TABLE codes (code text NOT NULL, region int NOT NULL, label text);
        CREATE UNIQUE INDEX codes_key ON codes (region, code);
        ALTER TABLE codes REPLICA IDENTITY USING INDEX codes_key;";
    let (d, m) = Fixture::databases("ridx", schema).await;
    d.batch_execute("INSERT INTO codes VALUES ('a', 1, 'alpha'), ('b', 1, 'beta')")
        .await
        .unwrap();
    let fx = Fixture::with_config(
        "ridx",
        d,
        m,
        Fixture::config_text("ridx", "tables = [\"public.codes\"]"),
    )
    .await;
    let run = fx.start().await;
    fx.wait_equal("codes", 30).await;
    fx.d.batch_execute(
        "UPDATE codes SET label = 'ALPHA' WHERE code = 'a'; \
         UPDATE codes SET code = 'c' WHERE code = 'b'; \
         INSERT INTO codes VALUES ('d', 2, NULL)",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM codes WHERE code = 'd'", 1).await;
    fx.m.batch_execute(
        "DELETE FROM codes WHERE code = 'c'; UPDATE codes SET region = 3 WHERE code = 'd'",
    )
    .await
    .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM codes WHERE region = 3", 1).await;
    run.stop().await;
    for c in [&fx.d, &fx.m] {
        assert_eq!(Fixture::rows(c, "codes").await, ["(a,1,ALPHA)", "(d,3,)"]);
    }
    let cfg = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(&["--config", cfg, "verify"], &[]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_key_replicates_both_ways_by_its_values() {
    // A link table with no key at all, equal rows included: each side's update or delete of
    // one of two equal rows changes one row on the other side too, as native logical
    // replication does under REPLICA IDENTITY FULL. `json` has no equality operator and
    // a TOASTed value may arrive unchanged: both still find their row.
    let schema = "
        CREATE TABLE links (job int, worker int, note text, doc json);
        ALTER TABLE links REPLICA IDENTITY FULL;";
    let (d, m) = Fixture::databases("keyless", schema).await;
    // Mobile finds rows through an index on `worker` (NULLs too), desktop by scanning.
    m.batch_execute("CREATE INDEX ON links (worker)")
        .await
        .unwrap();
    d.batch_execute(
        "INSERT INTO links VALUES (1, 1, 'a', '{}'), (1, 1, 'a', '{}'), (1, NULL, NULL, NULL)",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "keyless",
        d,
        m,
        Fixture::config_text("keyless", "tables = [\"public.links\"]"),
    )
    .await;
    let run = fx.start().await;
    fx.wait_equal("links", 30).await;
    let rows = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // One of two equal rows changes; the NULL row is found; a large value, then an update
    // leaving it unchanged.
    fx.d.batch_execute(
        "UPDATE links SET note = 'b' WHERE ctid = (SELECT min(ctid) FROM links WHERE note = 'a'); \
         UPDATE links SET note = 'n' WHERE worker IS NULL; \
         INSERT INTO links SELECT 2, 2, string_agg(md5(g::text), ''), '[1]' FROM generate_series(1, 20000) g; \
         INSERT INTO links VALUES (3, 3, 'c', '{}'), (3, 3, 'c', '{}'), (3, 3, 'c', '{}'); \
         UPDATE links SET worker = 7 WHERE job = 2",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM links WHERE worker = 7", 1).await;
    fx.wait_equal("links", 30).await;
    // The other way: one of three equal rows deleted, then two of three in one statement (the
    // second must not find the row the first deleted).
    fx.m.batch_execute(
        "DELETE FROM links WHERE ctid = (SELECT min(ctid) FROM links WHERE job = 3); \
         DELETE FROM links WHERE note = 'a'; \
         INSERT INTO links VALUES (4, 4, 'd', NULL), (4, 4, 'd', NULL), (4, 4, 'd', NULL); \
         DELETE FROM links WHERE job = 4 AND ctid <> (SELECT min(ctid) FROM links WHERE job = 4)",
    )
    .await
    .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM links WHERE job = 4", 1).await;
    fx.wait_equal("links", 30).await;
    run.stop().await;
    let mut stored = Vec::new();
    for c in [&fx.d, &fx.m] {
        // Stored out of line (the update of `worker` sent it as unchanged), and whole.
        let r = c
            .query_one(
                "SELECT md5(note), (SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class \
                 WHERE oid = 'links'::regclass) FROM links WHERE job = 2",
                &[],
            )
            .await
            .unwrap();
        stored.push(r.get::<_, String>(0));
        assert!(r.get::<_, bool>(1));
        let r = c
            .query(
                "SELECT l::text FROM (SELECT job, worker, left(note, 3) AS note, doc FROM links) l ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>();
        assert_eq!(
            r,
            rows(&[
                "(1,,n,)",
                "(1,1,b,{})",
                "(2,7,c4c,[1])",
                "(3,3,c,{})",
                "(3,3,c,{})",
                "(4,4,d,)"
            ])
        );
    }
    assert_eq!(stored[0], stored[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_without_a_key_gets_whole_old_rows_from_setup_and_keeps_them() {
    // Without REPLICA IDENTITY FULL a published keyless table refuses the application's own
    // updates and deletes: setup says so, sets it when allowed, and run refuses a partition
    // created since without it. Rows are found by partition and address, so equal rows in two
    // partitions, and a row an update moves between partitions, stay apart.
    let schema = "
        CREATE TABLE readings (sensor int, day date, v int) PARTITION BY RANGE (day);
        CREATE TABLE readings_h1 PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2026-07-01');
        CREATE TABLE readings_h2 PARTITION OF readings FOR VALUES FROM ('2026-07-01') TO ('2027-01-01');";
    let (d, m) = Fixture::databases("keyless_parted", schema).await;
    let text = Fixture::config_text("keyless_parted", "tables = [\"public.readings\"]")
        + "[conflicts]\npolicy = \"desktop_wins\"\n";
    let config = common::scratch().join("tandem-test-keyless_parted-setup.toml");
    std::fs::write(&config, &text).unwrap();
    let cfg = config.to_str().unwrap();
    let (code, _, err) = run_tandem(&["--config", cfg, "setup"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("desktop: table public.readings has no primary key")
            && err.contains(
                "on public.readings, public.readings_h1, public.readings_h2, or add a primary key"
            ),
        "{err}"
    );
    let (code, out, err) = run_tandem(&["--config", cfg, "setup", "--replica-identity-full"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("mobile: table public.readings_h2 now has REPLICA IDENTITY FULL")
            && out.contains(
                "warning: table public.readings has no primary key: conflicts on it are not detected"
            ),
        "{out}"
    );
    let fx = Fixture::with_config("keyless_parted", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO readings VALUES (1, '2026-02-01', 5), (1, '2026-02-01', 5), (1, '2026-08-01', 5); \
         UPDATE readings SET day = '2026-08-01' WHERE tableoid = 'readings_h1'::regclass \
         AND ctid = (SELECT min(ctid) FROM readings_h1); \
         DELETE FROM readings_h2 WHERE ctid = (SELECT min(ctid) FROM readings_h2)",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM readings", 2).await;
    fx.m.batch_execute("UPDATE readings_h2 SET v = 6")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM readings WHERE v = 6", 1).await;
    run.stop().await;
    for c in [&fx.d, &fx.m] {
        let r = common::strings(
            c,
            "SELECT tableoid::regclass::text || ' ' || r::text FROM readings r ORDER BY 1",
        )
        .await;
        assert_eq!(
            r,
            [
                "readings_h1 (1,2026-02-01,5)",
                "readings_h2 (1,2026-08-01,6)"
            ]
        );
    }
    for c in [&fx.d, &fx.m] {
        c.batch_execute(
            "CREATE TABLE readings_h3 PARTITION OF readings FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
        )
        .await
        .unwrap();
    }
    let (code, _, err) = run_tandem(&["--config", cfg, "run"], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains(
            "public.readings has no primary key, so tandem finds its rows by their values"
        ) && err.contains("public.readings_h3 log changes without it"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeouts_set_on_the_database_do_not_cut_tandems_sessions_short() {
    // Hosted databases often carry a database- or role-wide statement, lock and idle timeout
    // meant for the application. tandem's copy, batches and a streamed transaction's session
    // (idle in transaction between the source's blocks) need longer, and `run`'s lock session
    // and its apply sessions idle whenever the source is quiet (before: an idle-session timeout
    // ended them at every quiet spell, and `run` reconnected each time).
    let (d, m) = Fixture::databases("timeouts", JOBS).await;
    d.batch_execute("INSERT INTO jobs SELECT g, 'old' FROM generate_series(1, 200000) g")
        .await
        .unwrap();
    for c in [&d, &m] {
        c.batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET statement_timeout = ''50ms''; \
             ALTER DATABASE %I SET idle_in_transaction_session_timeout = ''300ms''; \
             ALTER DATABASE %I SET idle_session_timeout = ''300ms''; \
             ALTER DATABASE %I SET lock_timeout = ''50ms''', \
             current_database(), current_database(), current_database(), current_database()); \
             END $$",
        )
        .await
        .unwrap();
    }
    stream_from_a_few_hundred_rows(&d).await;
    let fx = Fixture::with_config(
        "timeouts",
        d,
        m,
        Fixture::config_text("timeouts", JOBS_TABLES),
    )
    .await;
    // The initial snapshot copies 200,000 rows: far longer than 50 ms.
    let run = fx.start().await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await,
        200000
    );
    // A streamed transaction pausing between blocks: mobile's live session waits, idle in
    // its transaction, longer than 300 ms. A session the server ended would be reconnected and
    // the transaction applied again, so what shows is the server ending none.
    let ended = "SELECT pg_stat_clear_snapshot(); \
                 SELECT (sessions_fatal + sessions_killed)::text FROM pg_stat_database \
                 WHERE datname = current_database()";
    let ended_before = tandem::db::last_row(&fx.m, ended).await.unwrap();
    let a = common::connect(&common::clusters().desktop.url("timeouts")).await;
    a.batch_execute(
        "SET idle_in_transaction_session_timeout = 0; BEGIN; \
         INSERT INTO jobs SELECT g, 'big' FROM generate_series(300001, 303000) g",
    )
    .await
    .unwrap();
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'tandem %' \
         AND state = 'idle in transaction' AND datname = current_database()",
        1,
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    a.batch_execute(
        "INSERT INTO jobs SELECT g, 'big' FROM generate_series(303001, 306000) g; COMMIT",
    )
    .await
    .unwrap();
    fx.wait_equal("jobs", 60).await;
    assert!(!run.is_finished());
    assert_eq!(
        tandem::db::last_row(&fx.m, ended).await.unwrap(),
        ended_before,
        "mobile ended none of tandem's sessions"
    );
    run.stop().await;
    let cfg = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(&["--config", cfg, "verify"], &[]);
    assert_eq!(code, 0, "{out}{err}");
}

/// `money` renders in the server's `lc_monetary`: an office server set up in German writes
/// `1.234,56 €`, which a server in English refuses (or takes for another amount). Before, the
/// initial snapshot failed with `invalid input syntax for type money`, and so did every change,
/// and verify found every row different; tandem's sessions and streams now render it in the C
/// locale (`scripts/ensure-locale` makes the German locale; found by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_crosses_between_servers_of_different_monetary_locales() {
    let (d, m) = Fixture::databases(
        "money",
        "CREATE TABLE pay (id int PRIMARY KEY, amount money);",
    )
    .await;
    d.batch_execute(
        "ALTER DATABASE money SET lc_monetary = 'de_DE.UTF-8';
         INSERT INTO pay VALUES (1, 1234.56), (2, -7.5)",
    )
    .await
    .unwrap_or_else(|e| panic!("{e} (scripts/ensure-locale makes de_DE.UTF-8)"));
    let fresh = common::connect(&clusters().desktop.url("money")).await;
    assert_eq!(
        common::strings(&fresh, "SELECT amount::text FROM pay WHERE id = 1").await,
        ["1.234,56 €"],
        "desktop renders money in German"
    );
    let fx = Fixture::with_config(
        "money",
        fresh,
        m,
        Fixture::config_text("money", r#"tables = ["public.pay"]"#),
    )
    .await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO pay VALUES (3, 99999.99); UPDATE pay SET amount = 0.01 WHERE id = 2",
    )
    .await
    .unwrap();
    fx.m.batch_execute("INSERT INTO pay VALUES (4, 1000000)")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM pay WHERE id = 4", 1).await;
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM pay WHERE amount = 0.01::money",
        1,
    )
    .await;
    let amounts = "SELECT string_agg(id || '=' || amount::numeric, ' ' ORDER BY id) FROM pay";
    for c in [&fx.d, &fx.m] {
        assert_eq!(
            common::strings(c, amounts).await,
            ["1=1234.56 2=0.01 3=99999.99 4=1000000.00"]
        );
    }
    run.stop().await;
    let (code, out, err) = run_tandem(
        &["--config", fx.config_path.to_str().unwrap(), "verify"],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latin1_desktop_and_a_utf8_mobile_exchange_accented_text() {
    // Office servers installed with a Western locale often have LATIN1 or WIN1252 databases; the
    // phones' cloud database is UTF8. Text crosses in each server's own encoding, converted.
    let p = clusters();
    let admin = common::connect(&p.desktop.url("postgres")).await;
    for sql in [
        "DROP DATABASE IF EXISTS latin WITH (FORCE)",
        "CREATE DATABASE latin ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let schema = "CREATE TABLE clients (id int PRIMARY KEY, name text, city varchar(40));";
    let d = common::connect(&p.desktop.url("latin")).await;
    d.batch_execute(schema).await.unwrap();
    d.batch_execute("INSERT INTO clients VALUES (1, 'Zoë Müller', 'Zürich'), (2, 'plain', 'Oslo')")
        .await
        .unwrap();
    let madmin = common::connect(&p.mobile.url("postgres")).await;
    for sql in [
        "DROP DATABASE IF EXISTS latin WITH (FORCE)",
        "CREATE DATABASE latin",
    ] {
        madmin.batch_execute(sql).await.unwrap();
    }
    let m = common::connect(&p.mobile.url("latin")).await;
    m.batch_execute(schema).await.unwrap();
    let fx = Fixture::with_config(
        "latin",
        d,
        m,
        Fixture::config_text("latin", "tables = [\"public.clients\"]"),
    )
    .await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO clients VALUES (3, 'François Þór', 'Reykjavík'); \
         UPDATE clients SET city = 'Málaga' WHERE id = 2",
    )
    .await
    .unwrap();
    fx.m.batch_execute("INSERT INTO clients VALUES (4, 'Åsa Ñúñez', 'Göteborg')")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM clients WHERE id = 4", 1).await;
    fx.wait_equal("clients", 30).await;
    let want = [
        "(1,\"Zoë Müller\",Zürich)",
        "(2,plain,Málaga)",
        "(3,\"François Þór\",Reykjavík)",
        "(4,\"Åsa Ñúñez\",Göteborg)",
    ];
    for c in [&fx.d, &fx.m] {
        assert_eq!(Fixture::rows(c, "clients").await, want);
    }
    // A character LATIN1 lacks cannot land on desktop: that transaction is named, as any the
    // target refuses, and nothing after it is applied.
    fx.m.batch_execute("INSERT INTO clients VALUES (5, '東京', 'Tōkyō')")
        .await
        .unwrap();
    let (e, lsn) = common::rejected(run).await;
    assert!(
        e.contains("was rejected by desktop") && e.contains("LATIN1"),
        "{e}"
    );
    let cfg = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(
        &["--config", cfg, "skip", "--from", "mobile", "--lsn", &lsn],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    fx.m.batch_execute("DELETE FROM clients WHERE id = 5")
        .await
        .unwrap();
    let run = fx.start().await;
    fx.d.batch_execute("UPDATE clients SET name = 'Zoé' WHERE id = 1")
        .await
        .unwrap();
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM clients WHERE name = 'Zoé'",
        1,
    )
    .await;
    run.stop().await;
    // verify compares the same text, whatever bytes each server stores it as.
    let drift = "UPDATE clients SET city = 'Zurich' WHERE id = 1";
    common::verify_finds_drift(cfg, &fx.m, drift).await;
    common::repair_from_desktop(cfg);
    assert_eq!(Fixture::rows(&fx.m, "clients").await[0], "(1,Zoé,Zürich)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_firing_for_applied_rows_is_warned_about_until_the_role_may_skip_it() {
    // A role without superuser cannot set session_replication_role unless granted, so mobile's
    // stamping trigger rewrites the rows tandem applies there.
    let schema = "DO $$ BEGIN CREATE ROLE tandem_trg LOGIN REPLICATION PASSWORD 'trg-pw'; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT CREATE ON DATABASE trig TO tandem_trg;
         CREATE TABLE jobs (id bigint PRIMARY KEY, title text NOT NULL, status text);
         ALTER TABLE jobs OWNER TO tandem_trg;
         CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN NEW.status := 'stamped'; RETURN NEW; END $$;";
    let (d, m) = Fixture::databases("trig", schema).await;
    d.batch_execute(
        "CREATE TABLE parts (id bigint PRIMARY KEY, status text); \
         ALTER TABLE parts OWNER TO tandem_trg",
    )
    .await
    .unwrap();
    // Mobile partitions it: a trigger of one partition, and one of the partitioned table
    // (cloned to each partition), fire for applied rows too.
    m.batch_execute(
        "CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION stamp(); \
         CREATE TABLE parts (id bigint PRIMARY KEY, status text) PARTITION BY RANGE (id); \
         CREATE TABLE parts_low PARTITION OF parts FOR VALUES FROM (0) TO (100); \
         CREATE TABLE parts_high PARTITION OF parts FOR VALUES FROM (100) TO (MAXVALUE); \
         ALTER TABLE parts OWNER TO tandem_trg; ALTER TABLE parts_low OWNER TO tandem_trg; \
         ALTER TABLE parts_high OWNER TO tandem_trg; \
         CREATE TRIGGER stamp_low BEFORE INSERT ON parts_low FOR EACH ROW EXECUTE FUNCTION stamp(); \
         CREATE TRIGGER stamp_all AFTER INSERT ON parts FOR EACH ROW EXECUTE FUNCTION stamp();",
    )
    .await
    .unwrap();
    let text = Fixture::config_text("trig", "tables = [\"public.jobs\", \"public.parts\"]")
        .replace("postgresql://postgres@", "postgresql://tandem_trg:trg-pw@");
    let fx = Fixture::with_config("trig", d, m, text).await;
    let cfg = fx.config_path.to_str().unwrap();
    let warning = "mobile: trigger stamp on public.jobs will fire for the rows tandem applies \
                   (role tandem_trg may not set session_replication_role)";
    let (code, out, err) = run_tandem(&["--config", cfg, "setup"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(warning), "{out}");
    assert!(
        out.contains("GRANT SET ON PARAMETER session_replication_role TO \"tandem_trg\""),
        "{out}"
    );
    assert!(!out.contains("desktop: trigger"), "{out}");
    assert!(
        out.contains(
            "mobile: trigger stamp_low on public.parts_low (a partition of public.parts) will fire"
        ) && out
            .contains(r#"`ALTER TABLE "public"."parts_low" ENABLE ALWAYS TRIGGER "stamp_low"`"#),
        "{out}"
    );
    assert_eq!(
        out.matches("trigger stamp_all on public.parts will fire")
            .count(),
        1,
        "{out}"
    );

    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, 'a', 'new')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id = 1", 1).await;
    run.stop().await;
    assert_eq!(Fixture::rows(&fx.m, "jobs").await, ["(1,a,stamped)"]);

    // The fix setup names: applied rows no longer fire it; the application's own still do.
    common::connect(&clusters().mobile.url("trig"))
        .await
        .batch_execute("GRANT SET ON PARAMETER session_replication_role TO tandem_trg")
        .await
        .unwrap();
    let (code, out, err) = run_tandem(&["--config", cfg, "setup"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("trigger stamp"), "{out}");
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (2, 'b', 'new')")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO jobs VALUES (3, 'c', 'new')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id = 2", 1).await;
    wait_count(30, &fx.d, "SELECT count(*) FROM jobs WHERE id = 3", 1).await;
    run.stop().await;
    assert_eq!(
        Fixture::rows(&fx.m, "jobs").await,
        ["(1,a,stamped)", "(2,b,new)", "(3,c,stamped)"]
    );
    assert_eq!(
        Fixture::rows(&fx.d, "jobs").await,
        ["(1,a,new)", "(2,b,new)", "(3,c,stamped)"]
    );
}

/// A response the target's answers split into many reads (a slow network, here a proxy passing
/// 4 bytes per millisecond) does not stall the apply session. tokio-postgres keeps two pieces
/// of a request's answer until it is read, then stops reading the socket: statements sent ahead
/// of their results must still be read while tandem awaits one of its own queries (preparing a
/// statement for a table it writes the first time), or neither answer ever comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_split_into_many_reads_do_not_stall_statements_sent_ahead() {
    through_trickling_proxies("trickle", "").await;
}

/// The same under conflict rules: each batch is looked up (and its rows locked) before it is
/// written, with statements out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_split_into_many_reads_do_not_stall_conflict_lookups() {
    through_trickling_proxies("trickle_cf", "[conflicts]\npolicy = \"desktop_wins\"\n").await;
}

async fn through_trickling_proxies(name: &str, extra: &str) {
    let (d, m) = Fixture::databases(name, JOBS).await;
    if !extra.is_empty() {
        for c in [&d, &m] {
            c.batch_execute(
                "ALTER TABLE jobs REPLICA IDENTITY FULL; ALTER TABLE tasks REPLICA IDENTITY FULL; \
                 ALTER TABLE scratch REPLICA IDENTITY FULL",
            )
            .await
            .unwrap();
        }
    }
    // Both sides through proxies: the replication streams and the SQL sessions alike.
    let (to_d, to_m) = (
        common::Proxy::start(clusters().desktop.port).await,
        common::Proxy::start(clusters().mobile.port).await,
    );
    let text = Fixture::config_text(name, JOBS_TABLES) + extra;
    let text = to_m.route(&to_d.route(&text, name), name);
    let fx = Fixture::with_config(name, d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO scratch VALUES (1, 'warm')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM scratch", 1).await;
    to_d.trickle();
    to_m.trickle();
    // Two tables tandem has not written yet: each needs a statement prepared while the group's
    // opening (and then the first table's batch) is still on its way.
    fx.d.batch_execute(
        "BEGIN; INSERT INTO jobs (id, title) VALUES (1, 'a'), (2, 'b'); \
         INSERT INTO tasks (id, job_id, note) VALUES (10, 1, 'x'); COMMIT",
    )
    .await
    .unwrap();
    wait_count(60, &fx.m, "SELECT count(*) FROM tasks", 1).await;
    // And the other way, an update and a delete, read from a trickling stream too.
    fx.m.batch_execute(
        "BEGIN; UPDATE jobs SET status = 'done' WHERE id = 1; DELETE FROM jobs WHERE id = 2; \
         UPDATE scratch SET v = 'from mobile'; COMMIT",
    )
    .await
    .unwrap();
    wait_count(60, &fx.d, "SELECT count(*) FROM jobs", 1).await;
    for t in ["jobs", "tasks", "scratch"] {
        fx.wait_equal(t, 30).await;
    }
    assert_eq!(Fixture::rows(&fx.d, "jobs").await, ["(1,a,done,)"]);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replication_connection_gone_silent_is_taken_as_lost_and_opened_again() {
    use std::sync::atomic::Ordering;
    let (d, m) = Fixture::databases("silent", JOBS).await;
    let p = clusters();
    let proxy = common::Proxy::start(p.desktop.port).await;
    // Desktop through the proxy.
    let text = proxy.route(
        &Fixture::config_text("silent", "tables = [\"public.jobs\"]\nreceive_timeout = 2"),
        "silent",
    );
    let fx = Fixture::with_config("silent", d, m, text).await;
    let run = fx.start().await;
    let ins = "INSERT INTO jobs (id, title) VALUES ($1, 'x')";
    fx.d.execute(ins, &[&1i64]).await.unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 1).await;
    // Idle longer than the timeout first: a quiet source is pinged, not dropped.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(run.status.from_desktop.starts.load(Ordering::Relaxed), 1);

    proxy.silence_replication();
    fx.d.execute(ins, &[&2i64]).await.unwrap();
    // Within the 2 s timeout and a reconnect, through a new connection.
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 2).await;
    assert_eq!(run.status.from_desktop.starts.load(Ordering::Relaxed), 2);
    fx.d.execute(ins, &[&3i64]).await.unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 3).await;
    run.stop().await;
    fx.wait_equal("jobs", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_held_by_a_session_tandem_may_not_end_is_waited_for() {
    // tandem runs as a plain role; another consumer, a superuser's, holds desktop's slot when
    // `run` starts. tandem may not end it: it waits, saying who holds the slot, instead of
    // stopping `run` after 90 s as before, and streams once the slot is free.
    let schema = plain_role_jobs("tandem_held", "held-pw", "held", "");
    let (d, m) = Fixture::databases("held", &schema).await;
    let text = Fixture::config_text("held", r#"tables = ["public.jobs"]"#).replace(
        "postgresql://postgres@",
        "postgresql://tandem_held:held-pw@",
    );
    let fx = Fixture::with_config("held", d, m, text).await;
    let p = clusters();
    let confirmed: String =
        fx.d.query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'held_d'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The other consumer: a replication connection as postgres that confirms nothing.
    let mut wc = tandem::source::walsender::WalConfig::from_url(&p.desktop.url("held")).unwrap();
    wc.application_name = "other consumer".into();
    let conn = tandem::source::walsender::WalConnection::connect(&wc)
        .await
        .unwrap();
    let holder = conn
        .start(tandem::source::walsender::StartOptions {
            slot: "held_d",
            start: confirmed.parse().unwrap(),
            publication: "held_d",
            proto_version: 1,
            streaming: false,
            decoding_memory_cap: None,
            receive_timeout: None,
        })
        .await
        .unwrap();
    let (mut child, port) = fx.run_with_metrics();
    let health = || common::http_get(port, "/health").unwrap_or_default();
    wait_for(90, "run saying who holds the slot", || async {
        let body = health();
        body.starts_with("HTTP/1.1 503")
            && body.contains("D>M not streaming")
            && body.contains("slot held_d is still held by server process")
            && body.contains("(other consumer, from ")
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "run stopped while the slot was held"
    );
    // Waiting for a held slot is counted as that, not as a lost connection.
    let body = scrape(port).unwrap();
    let count = |name| common::metric(&body, name, &[("direction", "D>M")]);
    assert!(
        count("tandem_slot_held_total").is_some_and(|v| v.parse::<f64>().unwrap() >= 1.0),
        "{body}"
    );
    assert_eq!(count("tandem_reconnects_total"), None, "{body}");
    drop(holder);
    fx.d.execute("INSERT INTO jobs (id, title) VALUES (1, 'after')", &[])
        .await
        .unwrap();
    wait_count(60, &fx.m, "SELECT count(*) FROM jobs", 1).await;
    let body = health();
    assert!(
        body.starts_with("HTTP/1.1 200") && !body.contains("reconnecting"),
        "{body}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_renamed_on_the_source_loses_no_changes() {
    let fx = Fixture::new("renamed", JOBS, r#"tables = ["public.jobs"]"#).await;
    let run = fx.start().await;
    let ins = |t: &str, id: i64| format!("INSERT INTO {t} (id, title) VALUES ({id}, 'x')");
    fx.d.batch_execute(&ins("jobs", 1)).await.unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 1).await;
    // Renamed on desktop while run streams it: its changes still reach mobile's table (before,
    // they were left out as an unlisted table's, and the checkpoint moved past them).
    fx.d.batch_execute(&format!(
        "ALTER TABLE jobs RENAME TO jobs2; {}",
        ins("jobs2", 2)
    ))
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id = 2", 1).await;
    run.stop().await;
    // Restarted as it is, run says what happened.
    let (code, out, err) = run_tandem(&["--config", fx.config_path.to_str().unwrap(), "run"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(
            "desktop: public.jobs named in [replication] tables no longer exists on desktop, and \
             publication renamed_d holds public.jobs2, which the config does not name: renamed"
        ),
        "{err}"
    );
    // Then as the warning says: renamed on mobile too and in the config, setup, restart. The
    // changes desktop made under either name meanwhile, and mobile's, arrive.
    fx.d.batch_execute(&ins("jobs2", 3)).await.unwrap();
    fx.m.batch_execute(&format!(
        "ALTER TABLE jobs RENAME TO jobs2; {}",
        ins("jobs2", 4)
    ))
    .await
    .unwrap();
    let p = clusters();
    let (d, m) = (
        common::connect(&p.desktop.url("renamed")).await,
        common::connect(&p.mobile.url("renamed")).await,
    );
    let text = Fixture::config_text("renamed", r#"tables = ["public.jobs2"]"#);
    let fx2 = Fixture::with_config("renamed2", d, m, text).await;
    let run = fx2.start().await;
    wait_count(30, &fx2.m, "SELECT count(*) FROM jobs2", 4).await;
    wait_count(30, &fx2.d, "SELECT count(*) FROM jobs2", 4).await;
    run.stop().await;
    fx2.wait_equal("jobs2", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_apply_session_cut_off_inside_its_transaction_is_ended_and_nothing_is_lost() {
    let (d, m) = Fixture::databases("cutoff", JOBS).await;
    stream_from_a_few_hundred_rows(&d).await;
    let p = clusters();
    // Mobile through the proxy: tandem's sessions there can be cut off.
    let proxy = common::Proxy::start(p.mobile.port).await;
    let text = proxy.route(
        &Fixture::config_text("cutoff", "tables = [\"public.jobs\"]"),
        "cutoff",
    );
    let fx = Fixture::with_config("cutoff", d, m, text).await;
    let run = fx.start().await;
    // A large desktop transaction is applied on mobile while in progress, and left open there.
    let writer = common::connect(&p.desktop.url("cutoff")).await;
    writer
        .batch_execute(
            "BEGIN; INSERT INTO jobs (id, title) \
             SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
        )
        .await
        .unwrap();
    // Its session has written rows of it (it holds a lock on the table) and waits for more.
    let open = "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
                WHERE a.datname = current_database() \
                AND a.application_name LIKE 'tandem apply % streamed %' \
                AND a.state = 'idle in transaction' AND l.relation = 'jobs'::regclass \
                AND l.mode = 'RowExclusiveLock' LIMIT 1";
    // Polled for the pid itself: between batches the session is active for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let stale: i32 = loop {
        if let Some(r) = fx.m.query_opt(open, &[]).await.unwrap() {
            break r.get(0);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no streamed apply session idle inside its transaction after 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // The network drops tandem's connections to mobile: mobile keeps the session, with its open
    // transaction and its uncommitted rows, until its keepalives notice (hours); the next session
    // inserting the same keys would wait on them. tandem's next session of that name ends it.
    proxy.cut_clients();
    writer.batch_execute("COMMIT").await.unwrap();
    wait_count(60, &fx.m, "SELECT count(*) FROM jobs", 20000).await;
    assert_eq!(
        Fixture::count(
            &fx.m,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {stale}")
        )
        .await,
        0
    );
    assert!(!run.is_finished());
    run.stop().await;
    fx.wait_equal("jobs", 10).await;
}

/// The walsender streams transactions with nothing for this database too: past the decoding
/// memory, another database's catalog changes (a migration making many tables) are streamed as
/// an empty transaction. tandem opens no session on the target for one (before: a session at its
/// stream's start, and one CI run found it there), and rows after it arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_with_nothing_for_this_database_opens_no_session() {
    let fx = Fixture::new(
        "foreign_stream",
        "CREATE TABLE items (id int PRIMARY KEY, v text);",
        "tables = [\"public.items\"]",
    )
    .await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO items VALUES (1, 'before')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items", 1).await;
    let before = streamed_txns(&fx.d, "foreign_stream_d").await;
    let admin = connect(&clusters().desktop.url("postgres")).await;
    for sql in [
        "DROP DATABASE IF EXISTS foreign_stream_other WITH (FORCE)",
        "CREATE DATABASE foreign_stream_other",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let other = connect(&clusters().desktop.url("foreign_stream_other")).await;
    other
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..200 LOOP \
             EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY, v text)', i); END LOOP; END $$",
        )
        .await
        .unwrap();
    wait_for(
        30,
        "desktop's slot to stream the other database's transaction",
        || async { streamed_txns(&fx.d, "foreign_stream_d").await > before },
    )
    .await;
    fx.d.batch_execute("INSERT INTO items VALUES (2, 'after')")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM items", 2).await;
    assert_eq!(Fixture::count(&fx.m, STREAMED_SESSIONS).await, 0);
    assert!(!run.is_finished());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_pooler_in_front_of_a_side_is_refused_before_anything_is_written() {
    let (d, m) = Fixture::databases("pooled", JOBS).await;
    d.batch_execute("INSERT INTO jobs (id, title) VALUES (1, 'desktop row')")
        .await
        .unwrap();
    let p = clusters();
    let proxy = common::Proxy::start(p.mobile.port).await;
    let text = proxy.route(
        &Fixture::config_text("pooled", "tables = [\"public.jobs\"]"),
        "pooled",
    );
    let fx = Fixture::with_config("pooled", d, m, text).await;
    // Mobile's URL now reaches a pooler (a URL copied from a dashboard): SQL passes, replication
    // connections are refused. Before, `run` took its lock and copied desktop's row through it
    // (and with it set the replication origin on the pooler's server connection, where the
    // application's writes would have run under it), and failed only when it streamed mobile.
    proxy.pool(true);
    let config = fx.config_path.to_str().unwrap();
    for command in [
        &["run"][..],
        &["snapshot", "--seed", "desktop"],
        &["repair", "--source", "desktop"],
        &["resolve", "--table", "public.jobs", "--take", "desktop"],
    ] {
        let args = [&["--config", config][..], command].concat();
        let (code, _, err) = common::run_tandem_within(60, &args);
        assert_eq!(code, 1, "{command:?}: {err}");
        assert!(
            err.contains("unsupported startup parameter: replication")
                && err.contains("This looks like a connection pooler"),
            "{command:?}: {err}"
        );
        assert_eq!(
            Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await,
            0,
            "{command:?} wrote through the pooler"
        );
    }
    // A pooler in transaction mode shows itself to SQL by a prepared statement another session
    // has, or lacks: that error is explained too.
    let e = anyhow::Error::from(fx.m.execute("DEALLOCATE s1", &[]).await.unwrap_err())
        .context("mobile: reading tandem.snapshots");
    assert!(
        tandem::db::pooler_hint(&e).is_some_and(|h| h.contains("transaction mode")),
        "{e:#}"
    );
    let e = anyhow::Error::from(fx.m.execute("SELECT 1/0", &[]).await.unwrap_err());
    assert!(tandem::db::pooler_hint(&e).is_none(), "{e:#}");
    // Without the pooler, the same config replicates.
    proxy.pool(false);
    let run = fx.start().await;
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
}

/// A table taken out of `[replication] tables` without running `setup` again is still in the
/// publications: `run` refuses to start, as for a column list or filter that differs, and after
/// `setup` it runs without it. Before, its changes were streamed and dropped without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_taken_out_of_the_config_stops_run_until_setup_takes_it_out() {
    let fx = Fixture::new(
        "shrunk",
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);",
        r#"tables = ["public.a", "public.b"]"#,
    )
    .await;
    let text = std::fs::read_to_string(&fx.config_path).unwrap().replace(
        r#"tables = ["public.a", "public.b"]"#,
        r#"tables = ["public.a"]"#,
    );
    let path = common::scratch().join("tandem-test-shrunk-a.toml");
    std::fs::write(&path, &text).unwrap();
    let (code, _, err) =
        common::run_tandem_within(60, &["--config", path.to_str().unwrap(), "run"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "desktop: publication shrunk_d holds public.b, which [replication] tables does not \
             name (taken out of the config since `tandem setup`?)"
        ),
        "{err}"
    );
    let (d, m) = (
        connect(&clusters().desktop.url("shrunk")).await,
        connect(&clusters().mobile.url("shrunk")).await,
    );
    let only_a = Fixture::with_config("shrunk", d, m, text).await;
    let run = only_a.start().await;
    only_a
        .d
        .batch_execute("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)")
        .await
        .unwrap();
    only_a.wait_equal("a", 30).await;
    assert_eq!(Fixture::count(&only_a.m, "SELECT count(*) FROM b").await, 0);
    run.stop().await;
}

/// A primary key change of a row other rows reference (`ON UPDATE CASCADE`), on a target that
/// checks foreign keys (a plain role, as on Supabase): made in place, as on the source and as
/// native's apply worker makes it. Before, tandem deleted the row and inserted it under its new
/// key: the delete set off the referencing rows' `ON DELETE CASCADE`, which deleted rows the
/// source kept (a grandchild the source never touched was gone for good; found by hand), and
/// where the referencing rows restricted deletes, the change was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_change_of_a_referenced_row_is_made_in_place_not_by_a_delete() {
    let role = "tandem_cascade";
    let (d, m) = Fixture::databases(
        "cascade",
        &format!(
            "CREATE TABLE parent (id int PRIMARY KEY, n text);
             CREATE TABLE child (id int PRIMARY KEY,
                 pid int REFERENCES parent ON UPDATE CASCADE ON DELETE CASCADE, n text);
             CREATE TABLE grand (id int PRIMARY KEY, cid int REFERENCES child ON DELETE CASCADE);
             CREATE TABLE kept (id int PRIMARY KEY, pid int REFERENCES parent ON UPDATE CASCADE);
             {}",
            common::plain_role(role, "cascade", &["parent", "child", "grand", "kept"])
        ),
    )
    .await;
    let text = common::connect_as(
        &Fixture::config_text("cascade", "tables = [\"public.*\"]"),
        role,
        &["mobile"],
    );
    let fx = Fixture::with_config("cascade", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO parent VALUES (1, 'p'), (2, 'q'), (5, 'five');
         INSERT INTO child VALUES (1, 1, 'c'), (2, 1, 'c2'), (3, 2, 'c3');
         INSERT INTO grand VALUES (1, 1), (2, 2), (3, 3);
         INSERT INTO kept VALUES (1, 2)",
    )
    .await
    .unwrap();
    fx.wait_equal("grand", 30).await;
    fx.wait_equal("kept", 30).await;
    // A key change, then two parents exchanging keys through a third in one transaction, and
    // a child's own key change from mobile.
    fx.d.batch_execute("UPDATE parent SET id = 10 WHERE id = 1")
        .await
        .unwrap();
    fx.d.batch_execute(
        "BEGIN; UPDATE parent SET id = 20 WHERE id = 2; UPDATE parent SET id = 2 WHERE id = 10;
         UPDATE parent SET id = 10 WHERE id = 20; COMMIT",
    )
    .await
    .unwrap();
    // Once they are on mobile (a change of the same rows on both sides at once would be a
    // conflict, which this config has no rule for).
    for t in ["parent", "child", "grand", "kept"] {
        fx.wait_equal(t, 30).await;
    }
    fx.m.batch_execute("DELETE FROM grand WHERE id = 3; UPDATE child SET id = 30 WHERE id = 3")
        .await
        .unwrap();
    for t in ["parent", "child", "grand", "kept"] {
        fx.wait_equal(t, 30).await;
    }
    run.stop().await;
    // Where the target lacks the old key's row, the new one is written whole.
    fx.m.batch_execute("DELETE FROM parent WHERE id = 5")
        .await
        .unwrap();
    fx.d.batch_execute("UPDATE parent SET id = 50, n = 'fifty' WHERE id = 5")
        .await
        .unwrap();
    let run = fx.start().await;
    fx.wait_equal("parent", 30).await;
    run.stop().await;
    assert_eq!(
        Fixture::rows(&fx.m, "parent").await,
        ["(10,q)", "(2,p)", "(50,fifty)"]
    );
    assert_eq!(
        Fixture::rows(&fx.m, "child").await,
        ["(1,2,c)", "(2,2,c2)", "(30,10,c3)"]
    );
    assert_eq!(Fixture::rows(&fx.m, "grand").await, ["(1,1)", "(2,2)"]);
    assert_eq!(Fixture::rows(&fx.m, "kept").await, ["(1,10)"]);
    let r = tandem::ops::verify::verify(&fx.cfg, None).await.unwrap();
    assert!(
        r.tables.iter().all(|t| t.is_in_sync()),
        "{}",
        tandem::ops::verify::render(&r)
    );
}

/// A key change that only respells a referenced key (`citext`'s `Foo` to `FOO`, numeric `1.0` to
/// `1.00`): the new key is equal to the old by `=`. Before, the statement making the key change in
/// place first deleted the row it found at the new key, which was the row itself, so the
/// referencing rows' `ON DELETE CASCADE` took the grandchildren the source kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_respelled_in_place_keeps_the_rows_that_reference_it() {
    let role = "tandem_respell";
    let (d, m) = Fixture::databases(
        "respell_move",
        &format!(
            "CREATE EXTENSION IF NOT EXISTS citext;
             CREATE TABLE parent (id citext PRIMARY KEY, n text);
             CREATE TABLE child (id int PRIMARY KEY,
                 pid citext REFERENCES parent ON UPDATE CASCADE ON DELETE CASCADE);
             CREATE TABLE grand (id int PRIMARY KEY, cid int REFERENCES child ON DELETE CASCADE);
             CREATE TABLE amount (id numeric PRIMARY KEY, n text);
             CREATE TABLE line (id int PRIMARY KEY,
                 aid numeric REFERENCES amount ON UPDATE CASCADE ON DELETE CASCADE);
             {}",
            common::plain_role(
                role,
                "respell_move",
                &["parent", "child", "grand", "amount", "line"]
            )
        ),
    )
    .await;
    let text = common::connect_as(
        &Fixture::config_text("respell_move", "tables = [\"public.*\"]"),
        role,
        &["mobile"],
    );
    let fx = Fixture::with_config("respell_move", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO parent VALUES ('Foo', 'p'), ('Bar', 'q');
         INSERT INTO child VALUES (1, 'Foo'), (2, 'Bar');
         INSERT INTO grand VALUES (1, 1), (2, 2);
         INSERT INTO amount VALUES (1.0, 'a'); INSERT INTO line VALUES (1, 1.0)",
    )
    .await
    .unwrap();
    for t in ["grand", "line"] {
        fx.wait_equal(t, 30).await;
    }
    fx.d.batch_execute("UPDATE parent SET id = upper(id); UPDATE amount SET id = 1.00")
        .await
        .unwrap();
    for t in ["parent", "child", "grand", "amount", "line"] {
        fx.wait_equal(t, 30).await;
    }
    run.stop().await;
    assert_eq!(Fixture::rows(&fx.m, "parent").await, ["(BAR,q)", "(FOO,p)"]);
    assert_eq!(Fixture::rows(&fx.m, "child").await, ["(1,FOO)", "(2,BAR)"]);
    assert_eq!(Fixture::rows(&fx.m, "grand").await, ["(1,1)", "(2,2)"]);
    assert_eq!(Fixture::rows(&fx.m, "line").await, ["(1,1.00)"]);
}

/// A tree (a table referencing itself `ON UPDATE CASCADE`) renumbered in one source statement,
/// on a target that fires foreign keys: the source logs each row before its cascade moved the
/// row's parent reference, so a row names its parent's old key. Within one of tandem's statements
/// the target's cascade runs after every row, as on the source; a statement of more rows than
/// `batch_rows` is split, and the later part is refused. `run` stops saying how to get it through,
/// which then works. Before (each key change a statement of its own), every such renumbering was
/// refused, with no hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tree_renumbered_in_one_statement_needs_it_in_one_of_tandems() {
    let role = "tandem_tree";
    let (d, m) = Fixture::databases(
        "tree_moves",
        &format!(
            "CREATE TABLE tree (id int PRIMARY KEY,
                 parent_id int REFERENCES tree ON UPDATE CASCADE ON DELETE CASCADE, n text);
             {}",
            common::plain_role(role, "tree_moves", &["tree"])
        ),
    )
    .await;
    let text = |batch_rows: usize| {
        common::connect_as(
            &Fixture::config_text(
                "tree_moves",
                &format!("tables = [\"public.*\"]\nbatch_rows = {batch_rows}"),
            ),
            role,
            &["mobile"],
        )
    };
    let fx = Fixture::with_config("tree_moves", d, m, text(100)).await;
    let run = fx.start().await;
    // A small tree first: its renumbering fits one statement.
    fx.d.batch_execute(
        "INSERT INTO tree SELECT i, nullif(i / 2, 0), 'n' FROM generate_series(1, 80) i;
         UPDATE tree SET id = id + 1000",
    )
    .await
    .unwrap();
    fx.wait_equal("tree", 30).await;
    fx.d.batch_execute(
        "INSERT INTO tree SELECT i, nullif(i / 2, 0), 'n' FROM generate_series(1, 300) i;
         UPDATE tree SET id = id + 10000 WHERE id < 1000",
    )
    .await
    .unwrap();
    let e = run.failure().await;
    assert!(
        e.contains("tree_parent_id_fkey")
            && e.contains("raise [replication] batch_rows above that statement's row count"),
        "{e}"
    );
    let fx = Fixture {
        cfg: std::sync::Arc::new(tandem::config::Config::parse(&text(1000), |_| None).unwrap()),
        ..fx
    };
    let run = fx.start().await;
    fx.wait_equal("tree", 30).await;
    run.stop().await;
    let ids =
        fx.m.query_one("SELECT count(*), min(id) FROM tree WHERE id > 10000", &[])
            .await
            .unwrap();
    assert_eq!((ids.get::<_, i64>(0), ids.get::<_, i32>(1)), (300, 10001));
}

/// An `UPDATE` that moves a row of a partitioned table to another partition, which PostgreSQL
/// logs as a delete and an insert. Before, tandem applied them so: on a target that fires foreign
/// keys, the delete's `ON DELETE CASCADE` took the rows below the moved row, which the source kept
/// (there the update cascaded). Also where only the source partitions the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_moved_to_another_partition_keeps_the_rows_that_reference_it() {
    let role = "tandem_partition_move";
    let (d, m) = Fixture::databases(
        "partition_move",
        &format!(
            "CREATE TABLE ord (region text, id int, n text, PRIMARY KEY (region, id))
                 PARTITION BY LIST (region);
             CREATE TABLE ord_n PARTITION OF ord FOR VALUES IN ('n');
             CREATE TABLE ord_s PARTITION OF ord FOR VALUES IN ('s');
             CREATE TABLE line (id int PRIMARY KEY, region text, oid int,
                 FOREIGN KEY (region, oid) REFERENCES ord ON UPDATE CASCADE ON DELETE CASCADE);
             CREATE TABLE note (id int PRIMARY KEY, lid int REFERENCES line ON DELETE CASCADE);
             CREATE TABLE job (region text, id int, PRIMARY KEY (region, id))
                 PARTITION BY LIST (region);
             CREATE TABLE job_n PARTITION OF job FOR VALUES IN ('n');
             CREATE TABLE job_s PARTITION OF job FOR VALUES IN ('s');
             CREATE TABLE step (id int PRIMARY KEY, region text, jid int,
                 FOREIGN KEY (region, jid) REFERENCES job ON UPDATE CASCADE ON DELETE CASCADE);
             CREATE TABLE memo (id int PRIMARY KEY, sid int REFERENCES step ON DELETE CASCADE);
             {}",
            common::plain_role(
                role,
                "partition_move",
                &[
                    "ord", "ord_n", "ord_s", "line", "note", "job", "job_n", "job_s", "step",
                    "memo"
                ]
            )
        ),
    )
    .await;
    // `job` is partitioned on desktop only.
    m.batch_execute(&format!(
        "ALTER TABLE step DROP CONSTRAINT step_region_jid_fkey; DROP TABLE job;
         CREATE TABLE job (region text, id int, PRIMARY KEY (region, id));
         ALTER TABLE job OWNER TO {role};
         ALTER TABLE step ADD FOREIGN KEY (region, jid) REFERENCES job
             ON UPDATE CASCADE ON DELETE CASCADE"
    ))
    .await
    .unwrap();
    let text = common::connect_as(
        &Fixture::config_text("partition_move", "tables = [\"public.*\"]"),
        role,
        &["mobile"],
    );
    let fx = Fixture::with_config("partition_move", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO ord VALUES ('n', 1, 'a'), ('n', 2, 'b'), ('n', 3, 'c'), ('n', 4, 'd');
         INSERT INTO line SELECT i, 'n', i FROM generate_series(1, 4) i;
         INSERT INTO note SELECT i, i FROM generate_series(1, 4) i;
         INSERT INTO job VALUES ('n', 1); INSERT INTO step VALUES (1, 'n', 1);
         INSERT INTO memo VALUES (1, 1)",
    )
    .await
    .unwrap();
    fx.wait_equal("note", 30).await;
    fx.wait_equal("memo", 30).await;
    // One row, then two in one statement; and a row deleted with its lines, then one inserted.
    fx.d.batch_execute(
        "UPDATE ord SET region = 's' WHERE id = 1;
         UPDATE ord SET region = 's', n = n || '!' WHERE id IN (2, 3);
         BEGIN; DELETE FROM ord WHERE id = 4; INSERT INTO ord VALUES ('s', 5, 'e'); COMMIT;
         UPDATE job SET region = 's'",
    )
    .await
    .unwrap();
    for t in ["ord", "line", "note", "job", "step", "memo"] {
        fx.wait_equal(t, 30).await;
    }
    run.stop().await;
    assert_eq!(
        Fixture::rows(&fx.m, "ord").await,
        ["(s,1,a)", "(s,2,b!)", "(s,3,c!)", "(s,5,e)"]
    );
    assert_eq!(
        Fixture::rows(&fx.m, "line").await,
        ["(1,s,1)", "(2,s,2)", "(3,s,3)"]
    );
    assert_eq!(
        Fixture::rows(&fx.m, "note").await,
        ["(1,1)", "(2,2)", "(3,3)"]
    );
    assert_eq!(Fixture::rows(&fx.m, "step").await, ["(1,s,1)"]);
    assert_eq!(Fixture::rows(&fx.m, "memo").await, ["(1,1)"]);
}

/// A foreign key mobile's application adds while `run` runs (not through `tandem ddl`): a key
/// change of the table it now references, read by `run` before, is still made in place. Before,
/// `run` decided by what it had read of the table (referenced or not) when it first wrote it:
/// the key change came as a delete, whose cascade took the grandchild rows with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_change_is_made_in_place_whenever_the_foreign_key_was_added() {
    let role = "tandem_cascade_late";
    let schema = |late_fk: &str| {
        format!(
            "CREATE TABLE parent (id int PRIMARY KEY, n text);
             CREATE TABLE child (id int PRIMARY KEY, pid int {late_fk}, n text);
             CREATE TABLE grand (id int PRIMARY KEY, cid int REFERENCES child ON DELETE CASCADE);
             {}",
            common::plain_role(role, "cascade_late", &["parent", "child", "grand"])
        )
    };
    let (d, m) = Fixture::databases(
        "cascade_late",
        &schema("REFERENCES parent ON UPDATE CASCADE ON DELETE CASCADE"),
    )
    .await;
    // Mobile starts without the key from child to parent.
    m.batch_execute("ALTER TABLE child DROP CONSTRAINT child_pid_fkey")
        .await
        .unwrap();
    let text = common::connect_as(
        &Fixture::config_text("cascade_late", "tables = [\"public.*\"]"),
        role,
        &["mobile"],
    );
    let fx = Fixture::with_config("cascade_late", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO parent VALUES (1, 'p'); INSERT INTO child VALUES (1, 1, 'c');
         INSERT INTO grand VALUES (1, 1)",
    )
    .await
    .unwrap();
    fx.wait_equal("grand", 30).await;
    fx.m.batch_execute(
        "ALTER TABLE child ADD FOREIGN KEY (pid) REFERENCES parent \
         ON UPDATE CASCADE ON DELETE CASCADE",
    )
    .await
    .unwrap();
    fx.d.batch_execute("UPDATE parent SET id = 10 WHERE id = 1")
        .await
        .unwrap();
    for t in ["parent", "child", "grand"] {
        fx.wait_equal(t, 30).await;
    }
    run.stop().await;
    assert_eq!(Fixture::rows(&fx.m, "grand").await, ["(1,1)"]);
    assert_eq!(Fixture::rows(&fx.m, "child").await, ["(1,10,c)"]);
}
