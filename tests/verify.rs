//! `verify` and `repair`: exact counts, repair through the apply path without echo, divergence
//! made behind tandem's back, and changes in flight re-checked instead of reported.

mod common;

use common::{run_tandem, wait_count, Fixture};
use tandem::ops::{repair, verify};
use tandem::side::Side;

const SCHEMA: &str = "CREATE TABLE jobs (id bigint PRIMARY KEY, title text, n int);
                      CREATE TABLE tags (a int, b text, label text, PRIMARY KEY (a, b));";
const TABLES: &str = r#"tables = ["public.jobs", "public.tags"]"#;

fn table<'a>(r: &'a verify::Report, name: &str) -> &'a verify::TableReport {
    r.tables.iter().find(|t| t.table == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_counts_exactly_and_repair_makes_the_target_equal_without_echo() {
    let (d, m) = Fixture::databases("verify_pre", SCHEMA).await;
    for c in [&d, &m] {
        c.batch_execute(
            "INSERT INTO jobs SELECT g, 'job ' || g, g % 7 FROM generate_series(1, 5000) g;
             INSERT INTO tags SELECT g % 10, 'b' || g, 'l' FROM generate_series(1, 300) g;",
        )
        .await
        .unwrap();
    }
    // Mobile drifts: 10 rows missing, 15 changed (one to NULL), 7 extra; a composite-key change.
    m.batch_execute(
        "DELETE FROM jobs WHERE id BETWEEN 11 AND 20;
         UPDATE jobs SET title = 'changed' WHERE id BETWEEN 21 AND 34; UPDATE jobs SET n = NULL WHERE id = 35;
         INSERT INTO jobs SELECT g, 'extra', 0 FROM generate_series(90001, 90007) g;
         UPDATE tags SET label = 'x' WHERE a = 3 AND b = 'b13';",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "verify_pre",
        d,
        m,
        Fixture::config_text("verify_pre", TABLES),
    )
    .await;
    let config = fx.config_path.to_str().unwrap();

    let (code, out, err) = run_tandem(&["--config", config, "verify", "--json"], &[]);
    assert_eq!(code, 1, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let jobs = json["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.jobs")
        .unwrap();
    assert_eq!(
        (
            &jobs["in_sync"],
            &jobs["only_desktop"],
            &jobs["only_mobile"],
            &jobs["differs"]
        ),
        (
            &serde_json::json!(4975),
            &serde_json::json!(10),
            &serde_json::json!(7),
            &serde_json::json!(15)
        )
    );
    assert_eq!(jobs["samples"]["only_mobile"].as_array().unwrap().len(), 5);
    assert!(jobs["samples"]["only_desktop"][0]["id"].as_i64().unwrap() <= 20);
    let tags = json["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.tags")
        .unwrap();
    assert_eq!(
        (&tags["in_sync"], &tags["differs"]),
        (&serde_json::json!(299), &serde_json::json!(1))
    );
    assert_eq!(
        tags["samples"]["differs"][0],
        serde_json::json!({"a": 3, "b": "b13"})
    );

    // Dry run: says what it would do, changes nothing.
    let (code, out, err) = run_tandem(
        &[
            "--config",
            config,
            "repair",
            "--source",
            "desktop",
            "--dry-run",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("public.jobs: would upsert 25 rows, would delete 7 rows on mobile"),
        "{out}"
    );
    assert!(
        out.contains("would delete public.jobs {\"id\" : 90001} on mobile"),
        "{out}"
    );
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(table(&r, "public.jobs").differs, 15);

    let (code, out, err) = run_tandem(&["--config", config, "repair", "--source", "desktop"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("public.jobs: upserted 25 rows, deleted 7 rows on mobile"),
        "{out}"
    );
    let (code, out, _) = run_tandem(&["--config", config, "verify"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("public.jobs") && out.contains("5000 in sync") && !out.contains("DIFFERENT"),
        "{out}"
    );
    assert_eq!(
        Fixture::rows(&fx.d, "jobs").await,
        Fixture::rows(&fx.m, "jobs").await
    );

    // The repair carried tandem's marker: starting replication now sends none of it back.
    let run = fx.start().await;
    fx.m.batch_execute("INSERT INTO jobs VALUES (77777, 'sentinel', 0)")
        .await
        .unwrap();
    wait_count(30, &fx.d, "SELECT count(*) FROM jobs WHERE id = 77777", 1).await;
    run.stop().await;
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM jobs").await,
        5001
    );
}

/// repair writes each table after the tables it references, and deletes in the reverse order:
/// `child` comes before `parent` in the configured order; the child row desktop has references a
/// parent row mobile lacks, and the child row only mobile has references a parent row only
/// mobile has. Mobile connects as a plain role, as on a managed cloud database: it may not set
/// `session_replication_role`, so the foreign key is checked as tandem writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repair_writes_a_table_after_the_tables_it_references() {
    let (d, m) = Fixture::databases(
        "repair_fk",
        &format!(
            "{}{}",
            common::PARENT_CHILD,
            common::plain_role("tandem_fk", "repair_fk", &["parent", "child"])
        ),
    )
    .await;
    let text = common::connect_as(
        &Fixture::config_text("repair_fk", r#"tables = ["public.child", "public.parent"]"#),
        "tandem_fk",
        &["mobile"],
    );
    let fx = Fixture::with_config("repair_fk", d, m, text).await;
    // Written while tandem does not run: mobile lacks desktop's rows, and desktop mobile's.
    common::parent_and_child_on_each_side(&fx.d, &fx.m).await;
    common::repair_from_desktop(fx.config_path.to_str().unwrap());
    assert_eq!(Fixture::rows(&fx.m, "parent").await, ["(1,d)"]);
    assert_eq!(Fixture::rows(&fx.m, "child").await, ["(10,1)"]);
}

/// Rows exchanging values of a unique constraint that is not their key (two users' emails
/// swapped), a value a row only the target has holds (c@x), and a chain (user 6 takes x@x from
/// user 5, who takes q@x; user 6's y@x is held by mobile's own user 7): no order of row writes
/// passes PostgreSQL's row-by-row check. repair rewrites the rows holding the values in one
/// statement, deleting those desktop lacks: orders referencing users (NO ACTION) stay, and
/// mobile's own column keeps its values. A foreign key that would cascade the delete stops it,
/// with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repair_rewrites_rows_exchanging_unique_values() {
    let (d, m, text) = common::unique_swap_databases("repair_swap", "tandem_swap", "", &[]).await;
    let fx = Fixture::with_config("repair_swap", d, m, text).await;
    // Written while tandem does not run.
    fx.d.batch_execute(
        "INSERT INTO users VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B'), (3, 'c@x', 'C'), \
           (5, 'q@x', 'E'), (6, 'x@x', 'F'); \
         INSERT INTO orders VALUES (1, 1), (2, 2); \
         INSERT INTO tags VALUES (1, 'red'), (2, 'blue'); INSERT INTO post_tags VALUES (1, 1);",
    )
    .await
    .unwrap();
    fx.m.batch_execute(
        "INSERT INTO users VALUES (1, 'b@x', 'A', 7), (2, 'a@x', 'B', 8), (4, 'c@x', 'D', 9), \
           (5, 'x@x', 'E', 1), (6, 'y@x', 'F', 2), (7, 'q@x', 'G', 3); \
         INSERT INTO orders VALUES (1, 1), (2, 2); \
         INSERT INTO tags VALUES (1, 'blue'), (2, 'red'); INSERT INTO post_tags VALUES (1, 1);",
    )
    .await
    .unwrap();
    let config = fx.config_path.to_str().unwrap();
    let repair = |table: &str| {
        run_tandem(
            &[
                "--config", config, "repair", "--source", "desktop", "--table", table,
            ],
            &[],
        )
    };
    let (code, _, err) = repair("public.tags");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("that would set off post_tags_tag_id_fkey of post_tags (ON DELETE CASCADE); change the rows on mobile so that none holds a value desktop gives another"),
        "{err}"
    );
    assert_eq!(Fixture::rows(&fx.m, "tags").await, ["(1,blue)", "(2,red)"]);
    assert_eq!(Fixture::rows(&fx.m, "post_tags").await, ["(1,1)"]);

    let (code, _, err) = repair("public.users");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("written again in one statement"), "{err}");
    assert_eq!(
        Fixture::rows(&fx.m, "users").await,
        [
            "(1,a@x,A,7)",
            "(2,b@x,B,8)",
            "(3,c@x,C,)",
            "(5,q@x,E,1)",
            "(6,x@x,F,2)"
        ]
    );
    assert_eq!(Fixture::rows(&fx.m, "orders").await, ["(1,1)", "(2,2)"]);
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    for t in ["public.users", "public.orders"] {
        assert!(table(&r, t).is_in_sync(), "{}", verify::render(&r));
    }
}

/// Keys whose equal values may be spelled otherwise (`citext`, a case-insensitive collation,
/// `numeric`'s scale, `interval`'s units): `Pear@x` on desktop and `PEAR@X` on mobile are one row,
/// as are `1.0` and `1.00`. The initial snapshot's merge and
/// repair's upsert give mobile desktop's spelling; before, they kept mobile's (an upsert sets no
/// key column), verify found each spelling on its side only, and repair changed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_spelled_otherwise_takes_the_sources_spelling() {
    let schema = "CREATE EXTENSION IF NOT EXISTS citext; \
                  CREATE TABLE profiles (email citext PRIMARY KEY, name text); \
                  CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', \
                    deterministic = false); \
                  CREATE TABLE tags (name text COLLATE ci PRIMARY KEY, n int); \
                  CREATE TABLE prices (code numeric PRIMARY KEY, n int); \
                  CREATE TABLE spans (span interval PRIMARY KEY, n int);";
    let (d, m) = Fixture::databases("respell", schema).await;
    d.batch_execute(
        "INSERT INTO profiles VALUES ('Pear@x', 'p'); INSERT INTO tags VALUES ('Red', 1); \
         INSERT INTO prices VALUES (1.0, 1); INSERT INTO spans VALUES ('1 day', 1)",
    )
    .await
    .unwrap();
    m.batch_execute(
        "INSERT INTO profiles VALUES ('PEAR@X', 'p'); INSERT INTO tags VALUES ('RED', 1); \
         INSERT INTO prices VALUES (1.00, 1); INSERT INTO spans VALUES ('24 hours', 1)",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "respell",
        d,
        m,
        Fixture::config_text("respell", r#"tables = ["public.*"]"#),
    )
    .await;
    let all_in_sync = |r: &verify::Report| {
        for t in [
            "public.profiles",
            "public.tags",
            "public.prices",
            "public.spans",
        ] {
            assert!(table(r, t).is_in_sync(), "{}", verify::render(r));
        }
    };
    let run = fx.start().await;
    run.stop().await;
    assert_eq!(Fixture::rows(&fx.m, "profiles").await, ["(Pear@x,p)"]);
    assert_eq!(Fixture::rows(&fx.m, "tags").await, ["(Red,1)"]);
    assert_eq!(Fixture::rows(&fx.m, "prices").await, ["(1.0,1)"]);
    assert_eq!(Fixture::rows(&fx.m, "spans").await, ["(\"1 day\",1)"]);
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    all_in_sync(&r);
    // Respelled on desktop while tandem does not run.
    fx.d.batch_execute(
        "UPDATE profiles SET email = 'pear@x'; UPDATE tags SET name = 'red'; \
         UPDATE prices SET code = 1.000; UPDATE spans SET span = '86400 seconds'",
    )
    .await
    .unwrap();
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    assert_eq!(
        table(&r, "public.tags").only_mobile,
        1,
        "{}",
        verify::render(&r)
    );
    common::repair_from_desktop(fx.config_path.to_str().unwrap());
    assert_eq!(Fixture::rows(&fx.m, "profiles").await, ["(pear@x,p)"]);
    assert_eq!(Fixture::rows(&fx.m, "tags").await, ["(red,1)"]);
    assert_eq!(Fixture::rows(&fx.m, "prices").await, ["(1.000,1)"]);
    assert_eq!(Fixture::rows(&fx.m, "spans").await, ["(24:00:00,1)"]);
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    all_in_sync(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_exits_2_on_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = Fixture::config_text("verify_err", TABLES).replacen(
        &format!(":{}/", common::clusters().desktop.port),
        &format!(":{port}/"),
        1,
    );
    let path = common::scratch().join("tandem-verify-err.toml");
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run_tandem(&["--config", path.to_str().unwrap(), "verify"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("desktop: cannot reach"), "{err}");
}

/// Patterns that match no table (the config changed since `setup`, a schema misspelt) leave
/// nothing to compare: an error, not "in sync". Before, verify printed nothing and exited 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_and_repair_over_no_table_are_an_error_not_in_sync() {
    let fx = Fixture::new(
        "verify_none",
        "CREATE TABLE jobs (id int PRIMARY KEY);",
        r#"tables = ["public.jobs"]"#,
    )
    .await;
    let text = std::fs::read_to_string(&fx.config_path)
        .unwrap()
        .replace(r#"tables = ["public.jobs"]"#, r#"tables = ["pubic.*"]"#);
    let path = common::scratch().join("tandem-verify-none.toml");
    std::fs::write(&path, text).unwrap();
    let want = "desktop: [replication] tables (pubic.*) match no table; nothing to compare";
    for (args, exit) in [
        (&["verify"][..], 2),
        (&["repair", "--source", "desktop"], 1),
    ] {
        let (code, out, err) = run_tandem(
            &[&["--config", path.to_str().unwrap()][..], args].concat(),
            &[],
        );
        assert_eq!(code, exit, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn divergence_behind_tandems_back_is_found_and_repaired_while_running() {
    let fx = Fixture::new("behind_back", SCHEMA, TABLES).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'job', 0 FROM generate_series(1, 500) g")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    // Changes on mobile that bypass replication (they carry the marker tandem's own writes use).
    fx.m.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'tandem', 'manual');
         DELETE FROM jobs WHERE id <= 5; UPDATE jobs SET title = 'drift' WHERE id BETWEEN 6 AND 8;
         INSERT INTO jobs VALUES (9999, 'stray', 0); COMMIT;",
    )
    .await
    .unwrap();
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    let j = table(&r, "public.jobs");
    assert_eq!(
        (j.in_sync, j.only_desktop, j.only_mobile, j.differs),
        (492, 5, 1, 3)
    );
    let done = repair::repair(fx.cfg.clone(), Side::Desktop, None, false)
        .await
        .unwrap();
    assert_eq!(
        done.iter()
            .find(|t| t.table == "public.jobs")
            .map(|t| (t.upserted, t.deleted)),
        Some((8, 1))
    );
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    assert!(r.tables.iter().all(|t| t.is_in_sync()), "{r:?}");
    run.stop().await;
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM jobs WHERE id = 9999").await,
        0
    );
}

/// The source changes a row again while repair writes the version it read of it: the stream
/// applies the new version after the repair, not before it (where the repair would set it back
/// and the sides would differ). Mobile's trigger holds the repair's write for 3 s; desktop's
/// change comes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_the_source_makes_while_repair_writes_arrives_after_it() {
    let fx = Fixture::new("repair_race", SCHEMA, TABLES).await;
    let run = fx.start().await;
    fx.d.execute("INSERT INTO jobs VALUES (1, 'd1', 0)", &[])
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    fx.m.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'tandem', 'manual');
         UPDATE jobs SET title = 'drift' WHERE id = 1; COMMIT;
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.title = 'd1' THEN PERFORM pg_sleep(3); END IF; RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION slow();
         ALTER TABLE jobs ENABLE ALWAYS TRIGGER slow;",
    )
    .await
    .unwrap();
    // Once the repair's write sleeps, desktop changes the row again.
    let change = async {
        wait_count(
            30,
            &fx.m,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event = 'PgSleep'",
            1,
        )
        .await;
        fx.d.execute("UPDATE jobs SET title = 'd2' WHERE id = 1", &[])
            .await
            .unwrap();
    };
    let (done, ()) = tokio::join!(
        repair::repair(fx.cfg.clone(), Side::Desktop, None, false),
        change
    );
    let done = done.unwrap();
    assert_eq!(
        done.iter()
            .find(|t| t.table == "public.jobs")
            .map(|t| (t.upserted, t.deleted)),
        Some((1, 0))
    );
    fx.d.execute("INSERT INTO jobs VALUES (2, 'after', 0)", &[])
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id = 2", 1).await;
    run.stop().await;
    for c in [&fx.d, &fx.m] {
        let title: String = c
            .query_one("SELECT title FROM jobs WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(title, "d2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_changed_in_flight_are_rechecked_not_reported() {
    let fx = Fixture::new("in_flight", SCHEMA, TABLES).await;
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'job', 0 FROM generate_series(1, 50000) g")
        .await
        .unwrap();
    let run = fx.start().await;
    fx.wait_equal("jobs", 60).await;
    // A large change commits on desktop just before verify reads: mobile is still applying it.
    fx.d.batch_execute("UPDATE jobs SET n = n + 1")
        .await
        .unwrap();
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    let j = table(&r, "public.jobs");
    assert!(j.is_in_sync(), "{j:?}");
    assert_eq!(j.in_sync, 50_000);
    assert!(
        j.rechecked > 0,
        "the update was expected to be in flight when verify first looked: {j:?}"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drift_across_many_buckets_is_counted_exactly_and_repaired_over_several_rounds() {
    // 150,000 rows make 256 buckets; drift in every one of them takes four drill-down rounds,
    // read from each side's staged copy of the differing buckets.
    let (d, m) = Fixture::databases("verify_wide", SCHEMA).await;
    for c in [&d, &m] {
        c.batch_execute(
            "INSERT INTO jobs SELECT g, 'job ' || g, g % 7 FROM generate_series(1, 150000) g",
        )
        .await
        .unwrap();
    }
    m.batch_execute(
        "DELETE FROM jobs WHERE id % 100 = 0;
         UPDATE jobs SET title = 'changed' WHERE id % 97 = 0 AND id % 100 <> 0;
         INSERT INTO jobs SELECT g, 'extra', 0 FROM generate_series(200001, 200300) g;",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "verify_wide",
        d,
        m,
        Fixture::config_text("verify_wide", r#"tables = ["public.jobs"]"#),
    )
    .await;
    // Multiples of 97 that are not multiples of 100 (9700 is both, and so is 9700·k).
    let changed = (1..=150_000u64)
        .filter(|i| i % 97 == 0 && i % 100 != 0)
        .count() as u64;
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    let t = table(&r, "public.jobs");
    assert_eq!(
        (t.in_sync, t.only_desktop, t.only_mobile, t.differs),
        (150_000 - 1_500 - changed, 1_500, 300, changed)
    );
    let config = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(&["--config", config, "repair", "--source", "desktop"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "public.jobs: upserted {} rows, deleted 300 rows on mobile",
            1_500 + changed
        )),
        "{out}"
    );
    assert_eq!(
        Fixture::rows(&fx.d, "jobs").await,
        Fixture::rows(&fx.m, "jobs").await
    );
    // And verify agrees.
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    assert!(table(&r, "public.jobs").is_in_sync());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_without_a_key_is_compared_copy_by_copy_and_repaired_while_running() {
    // No key: a row is known by its values, and each side's copies of it are counted.
    let schema = "CREATE TABLE links (job int, worker int, note text);
                  ALTER TABLE links REPLICA IDENTITY FULL;";
    let fx = Fixture::new("verify_keyless", schema, r#"tables = ["public.links"]"#).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO links SELECT g, g % 10, CASE WHEN g % 3 > 0 THEN 'n' END \
         FROM generate_series(1, 40000) g, generate_series(1, 2)",
    )
    .await
    .unwrap();
    fx.wait_equal("links", 30).await;
    // Behind tandem's back on mobile: one of two copies of jobs 1-5 gone, both of job 6, three
    // more copies of job 7, a row of NULLs only mobile has, one copy of job 8 changed; and one
    // copy of 400 jobs across the table, so that more buckets differ than one round takes (the
    // rows are staged once per side).
    fx.m.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'tandem', 'manual');
         DELETE FROM links WHERE ctid IN (SELECT min(ctid) FROM links WHERE job <= 5 GROUP BY job);
         DELETE FROM links WHERE ctid IN (SELECT min(ctid) FROM links WHERE job % 100 = 50 GROUP BY job);
         DELETE FROM links WHERE job = 6;
         INSERT INTO links SELECT 7, 7, 'n' FROM generate_series(1, 3);
         INSERT INTO links VALUES (NULL, NULL, NULL);
         UPDATE links SET note = 'changed' WHERE ctid = (SELECT min(ctid) FROM links WHERE job = 8);
         COMMIT;",
    )
    .await
    .unwrap();
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    let l = table(&r, "public.links");
    assert_eq!(
        (l.in_sync, l.only_desktop, l.only_mobile, l.differs),
        (79592, 408, 5, 0),
        "{l:?}"
    );
    assert!(l.rechecked >= 413, "{l:?}");
    assert!(
        l.samples
            .only_mobile
            .contains(&serde_json::json!({"job": null, "worker": null, "note": null})),
        "{l:?}"
    );
    let done = repair::repair(fx.cfg.clone(), Side::Desktop, None, false)
        .await
        .unwrap();
    assert_eq!(
        done.iter()
            .find(|t| t.table == "public.links")
            .map(|t| (t.upserted, t.deleted)),
        Some((408, 5))
    );
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    assert!(r.tables.iter().all(|t| t.is_in_sync()), "{r:?}");
    run.stop().await;
    assert_eq!(
        Fixture::rows(&fx.d, "links").await,
        Fixture::rows(&fx.m, "links").await
    );
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM links WHERE job = 7").await,
        2
    );
}

/// A table without a key is known by all its columns, and a function takes at most 100
/// arguments: past 50 columns, verify failed with `cannot pass more than 100 arguments to a
/// function`, naming no table (found by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_without_a_key_of_sixty_columns_is_verified_and_repaired() {
    let cols: Vec<String> = (0..60).map(|i| format!("c{i} int")).collect();
    let schema = format!(
        "CREATE TABLE wide ({}); ALTER TABLE wide REPLICA IDENTITY FULL;",
        cols.join(", ")
    );
    let fx = Fixture::new("verify_wide", &schema, r#"tables = ["public.wide"]"#).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO wide (c0, c59) SELECT g, g FROM generate_series(1, 3) g")
        .await
        .unwrap();
    fx.wait_equal("wide", 30).await;
    fx.m.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'tandem', 'manual');
         DELETE FROM wide WHERE c0 = 1; INSERT INTO wide (c1, c58) VALUES (7, 8); COMMIT;",
    )
    .await
    .unwrap();
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    let w = table(&r, "public.wide");
    assert_eq!(
        (w.in_sync, w.only_desktop, w.only_mobile, w.differs),
        (2, 1, 1, 0),
        "{w:?}"
    );
    let only_mobile = &w.samples.only_mobile[0];
    assert_eq!(
        (&only_mobile["c1"], &only_mobile["c58"], &only_mobile["c59"]),
        (
            &serde_json::json!(7),
            &serde_json::json!(8),
            &serde_json::Value::Null
        ),
        "{w:?}"
    );
    let done = repair::repair(fx.cfg.clone(), Side::Desktop, None, false)
        .await
        .unwrap();
    assert_eq!((done[0].upserted, done[0].deleted), (1, 1));
    run.stop().await;
    assert_eq!(
        Fixture::rows(&fx.d, "wide").await,
        Fixture::rows(&fx.m, "wide").await
    );
}

/// An extension's types where each side installed it: `citext` and `hstore` in `public` on
/// desktop (an office server), in `extensions` on mobile (Supabase's layout), so PostgreSQL
/// writes them `citext` on one side and `extensions.citext` on the other. Before, `setup`
/// refused them as different types; and verify's re-check cast mobile's keys to desktop's
/// `citext`, a type mobile's search path does not find (found by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_extensions_types_in_another_schema_on_each_side_replicate_and_verify() {
    let (d, m) = Fixture::databases("verify_ext", "").await;
    d.batch_execute(
        "CREATE EXTENSION citext; CREATE EXTENSION hstore;
         CREATE TABLE people (email citext PRIMARY KEY, attrs hstore, tags citext[]);",
    )
    .await
    .unwrap();
    m.batch_execute(
        "CREATE SCHEMA extensions;
         CREATE EXTENSION citext SCHEMA extensions; CREATE EXTENSION hstore SCHEMA extensions;
         CREATE TABLE people (email extensions.citext PRIMARY KEY, attrs extensions.hstore,
                              tags extensions.citext[]);",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config(
        "verify_ext",
        d,
        m,
        Fixture::config_text("verify_ext", r#"tables = ["public.people"]"#),
    )
    .await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO people VALUES ('Ann@Example.com', 'a=>1', '{X,y}'), ('bob@example.com', NULL, NULL)",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM people", 2).await;
    fx.m.batch_execute(
        "INSERT INTO people VALUES ('Cy@example.com', 'c=>3', '{Z}');
         UPDATE people SET attrs = 'b=>2' WHERE email = 'bob@example.com'",
    )
    .await
    .unwrap();
    wait_count(
        30,
        &fx.d,
        "SELECT count(*) FROM people WHERE attrs = 'b=>2' OR email = 'cy@EXAMPLE.com'",
        2,
    )
    .await;
    fx.wait_equal("people", 30).await;
    // Behind tandem's back on mobile: re-checked while run runs, then repaired. (Mobile's search
    // path lacks `extensions`, so its `=` on these columns is text's: exact case.)
    fx.m.batch_execute(
        "BEGIN; SELECT pg_logical_emit_message(true, 'tandem', 'manual');
         UPDATE people SET tags = '{changed}' WHERE email = 'Ann@Example.com'; COMMIT;",
    )
    .await
    .unwrap();
    let r = verify::verify(&fx.cfg, None).await.unwrap();
    let p = table(&r, "public.people");
    assert_eq!((p.in_sync, p.differs), (2, 1), "{p:?}");
    assert!(p.rechecked >= 1, "{p:?}");
    let done = repair::repair(fx.cfg.clone(), Side::Desktop, None, false)
        .await
        .unwrap();
    assert_eq!((done[0].upserted, done[0].deleted), (1, 0));
    run.stop().await;
    assert_eq!(
        Fixture::rows(&fx.d, "people").await,
        Fixture::rows(&fx.m, "people").await
    );
}

/// Keys in verify's samples are the rows' own values: a `numeric` key of 30 digits, and one
/// spelled `1.000` on one side and `1.0` on the other. Before, they went through a 64-bit
/// float: `1.2345678901234567e+19` and `1.0` for both spellings, keys no row had.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_shows_numeric_keys_as_the_rows_have_them() {
    let (d, m) = Fixture::databases(
        "exact_keys",
        "CREATE TABLE prices (code numeric PRIMARY KEY, n int);",
    )
    .await;
    let fx = Fixture::with_config(
        "exact_keys",
        d,
        m,
        Fixture::config_text("exact_keys", r#"tables = ["public.prices"]"#),
    )
    .await;
    fx.d.batch_execute("INSERT INTO prices VALUES (12345678901234567890.123456789, 1), (1.000, 1)")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO prices VALUES (1.0, 2)")
        .await
        .unwrap();
    let config = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(&["--config", config, "verify"], &[]);
    assert_eq!(code, 1, "{err}");
    for want in [
        "{\"code\":1.000}",
        "{\"code\":12345678901234567890.123456789}",
        "only mobile: {\"code\":1.0}",
    ] {
        assert!(out.contains(want), "{want}\n\nnot in:\n{out}");
    }
    let (code, out, err) = run_tandem(&["--config", config, "verify", "--json"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains("\"code\": 12345678901234567890.123456789"),
        "{out}"
    );
}
