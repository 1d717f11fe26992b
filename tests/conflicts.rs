//! Conflicts: both sides change the same rows before either change has crossed, then tandem runs.
//! The sides converge to the row the policy names, and every conflict is in `tandem.conflicts`.
//! Mobile connects as a plain role (LOGIN, REPLICATION, owner of its tables), as on managed cloud
//! PostgreSQL: no replication origin, no session_replication_role.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{run_tandem, scrape, wait_count, wait_for, wait_for_explained, Fixture};
use tokio_postgres::Client;

/// `(value, version)` of a row; `None` for no row.
type Row = Option<(String, i64)>;

#[derive(Clone, Debug)]
enum Op {
    Set(String, i64),
    Delete,
}

/// A deterministic generator, so a failing seed can be rerun.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

const ITEMS: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text, version bigint NOT NULL);
     INSERT INTO items SELECT g, 'base', 1 FROM generate_series(1, 40) g;";

/// Schema plus a plain role owning the table on both sides.
fn schema(db: &str, extra: &str) -> String {
    format!(
        "DO $$ BEGIN CREATE ROLE tandem_cf LOGIN REPLICATION PASSWORD 'cf-pw'; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         GRANT CREATE ON DATABASE {db} TO tandem_cf;
         {ITEMS}
         {extra}
         ALTER TABLE items OWNER TO tandem_cf;"
    )
}

async fn fixture(db: &str, extra_schema: &str, conflicts: &str) -> Fixture {
    fixture_as(db, extra_schema, conflicts, true).await
}

/// `plain`: mobile connects as the plain role (else both sides as superuser).
async fn fixture_as(db: &str, extra_schema: &str, conflicts: &str, plain: bool) -> Fixture {
    fixture_of(db, "public.items", extra_schema, conflicts, plain).await
}

/// [`fixture_as`] with `tables` (a pattern) in the config.
async fn fixture_of(
    db: &str,
    tables: &str,
    extra_schema: &str,
    conflicts: &str,
    plain: bool,
) -> Fixture {
    let (d, m) = Fixture::databases(db, &schema(db, extra_schema)).await;
    let text = Fixture::config_text(
        db,
        &format!("tables = [\"{tables}\"]\ninitial_snapshot = false"),
    );
    // Only the mobile URL switches to the plain role.
    let (desktop, mobile) = text.split_at(text.find("[mobile]").unwrap());
    let mobile = if plain {
        mobile.replacen("postgresql://postgres@", "postgresql://tandem_cf:cf-pw@", 1)
    } else {
        mobile.to_string()
    };
    assert_eq!(mobile.contains("tandem_cf:cf-pw@"), plain);
    let text = format!("{desktop}{mobile}\n{conflicts}\n");
    Fixture::with_config(db, d, m, text).await
}

async fn state(c: &Client) -> BTreeMap<i64, (String, i64)> {
    c.query("SELECT id, v, version FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

async fn run_op(c: &Client, id: i64, op: &Op) {
    match op {
        Op::Set(v, ver) => c
            .execute(
                "INSERT INTO items VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, version = EXCLUDED.version",
                &[&id, v, ver],
            )
            .await
            .unwrap(),
        Op::Delete => c
            .execute("DELETE FROM items WHERE id = $1", &[&id])
            .await
            .unwrap(),
    };
}

/// Changes on both sides while tandem is stopped (so none has crossed: all concurrent), then
/// tandem runs; returns the keys both sides changed. `expect` gives the converged row.
async fn concurrent(
    fx: &Fixture,
    seed: u64,
    expect: impl Fn(Row, Option<&Op>, Option<&Op>) -> Row,
) -> BTreeSet<i64> {
    let mut rng = Lcg(seed);
    let mut want = BTreeMap::new();
    let mut both = BTreeSet::new();
    for id in (1..=40i64).chain(101..=112) {
        let base: Row = (id <= 40).then(|| ("base".to_string(), 1));
        let mut pick = |tag: &str| -> Option<Op> {
            let r = rng.next(10);
            let ver = 2 + rng.next(4) as i64;
            match (base.is_some(), r) {
                (true, 0..=3) | (false, 0..=4) => None,
                (true, 4..=7) | (false, _) => Some(Op::Set(format!("{tag}{id}-{ver}"), ver)),
                (true, _) => Some(Op::Delete),
            }
        };
        let (d, m) = (pick("D"), pick("M"));
        if let Some(op) = &d {
            run_op(&fx.d, id, op).await;
        }
        if let Some(op) = &m {
            run_op(&fx.m, id, op).await;
        }
        if d.is_some() && m.is_some() {
            both.insert(id);
        }
        if let Some(row) = expect(base, d.as_ref(), m.as_ref()) {
            want.insert(id, row);
        }
    }
    assert!(both.len() >= 8, "seed {seed}: too few conflicts to test");
    let run = fx.start().await;
    wait_for(60, "both sides converge to the policy's rows", || async {
        state(&fx.d).await == want && state(&fx.m).await == want
    })
    .await;
    run.stop().await;
    both
}

fn apply(base: Row, op: Option<&Op>) -> Row {
    match op {
        None => base,
        Some(Op::Set(v, ver)) => Some((v.clone(), *ver)),
        Some(Op::Delete) => None,
    }
}

/// Keys with a conflict logged on `c`, and how many rows.
async fn logged(c: &Client) -> (BTreeSet<i64>, i64) {
    let rows = c
        .query(
            "SELECT (key->>'id')::int8 FROM tandem.conflicts WHERE table_name = 'public.items'",
            &[],
        )
        .await
        .unwrap();
    (rows.iter().map(|r| r.get(0)).collect(), rows.len() as i64)
}

/// Every logged conflict carries the remote row, and the local one wherever a local row existed.
async fn assert_rows_logged(c: &Client) {
    let incomplete = Fixture::count(
        c,
        "SELECT count(*) FROM tandem.conflicts WHERE remote_row IS NULL \
         OR (local_row IS NULL AND kind NOT IN ('update_missing', 'update_deleted', 'delete_missing')) \
         OR (local_row IS NOT NULL AND kind IN ('update_missing', 'update_deleted', 'delete_missing'))",
    )
    .await;
    assert_eq!(incomplete, 0, "conflict rows without their row images");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn last_write_wins_converges_on_the_greater_version_without_old_rows() {
    let fx = fixture(
        "cf_lww",
        "",
        "[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"version\"",
    )
    .await;
    let both = concurrent(&fx, 7, |base, d, m| match (d, m) {
        (Some(Op::Delete), Some(_)) | (Some(_), Some(Op::Delete)) => None,
        (Some(Op::Set(dv, dver)), Some(Op::Set(mv, mver))) => {
            // Tie: desktop first.
            Some(if mver > dver {
                (mv.clone(), *mver)
            } else {
                (dv.clone(), *dver)
            })
        }
        (d, None) => apply(base, d),
        (None, m) => apply(base, m),
    })
    .await;
    // Without old rows (default replica identity) each concurrent key is still detected on at
    // least one side (where the remote version lost, or the row was gone), and nothing else is.
    let (dk, _) = logged(&fx.d).await;
    let (mk, _) = logged(&fx.m).await;
    assert_eq!(&dk | &mk, both);
    for c in [&fx.d, &fx.m] {
        assert_rows_logged(c).await;
    }
    let policy: String =
        fx.m.query_one(
            "SELECT string_agg(DISTINCT policy, ',') FROM tandem.conflicts",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(policy, "last_write_wins");
}

async fn site_wins(db: &str, winner: &str, seed: u64) {
    let fx = fixture(
        db,
        "ALTER TABLE items REPLICA IDENTITY FULL;",
        &format!("[conflicts]\npolicy = \"{winner}_wins\""),
    )
    .await;
    let desktop = winner == "desktop";
    let both = concurrent(&fx, seed, |base, d, m| match (d, m) {
        (Some(d), Some(m)) => apply(None, Some(if desktop { d } else { m })),
        (d, None) => apply(base, d),
        (None, m) => apply(base, m),
    })
    .await;
    // With old rows every concurrent key is detected on both sides, exactly once each.
    for c in [&fx.d, &fx.m] {
        let (keys, n) = logged(c).await;
        assert_eq!(keys, both);
        assert_eq!(n, both.len() as i64);
        assert_rows_logged(c).await;
        // With old rows a missing row is known to have been deleted there.
        assert_eq!(
            Fixture::count(
                c,
                "SELECT count(*) FROM tandem.conflicts WHERE kind = 'update_missing'"
            )
            .await,
            0
        );
    }
    let deleted = Fixture::count(
        &fx.d,
        "SELECT (SELECT count(*) FROM tandem.conflicts WHERE kind = 'update_deleted')",
    )
    .await
        + Fixture::count(
            &fx.m,
            "SELECT count(*) FROM tandem.conflicts WHERE kind = 'update_deleted'",
        )
        .await;
    assert!(deleted > 0, "seed {seed} has update/delete pairs");
    // The winner's side kept its rows; the loser's side took the winner's.
    let (w, l) = if desktop {
        (&fx.d, &fx.m)
    } else {
        (&fx.m, &fx.d)
    };
    let applied_on_winner = Fixture::count(
        w,
        "SELECT count(*) FROM tandem.conflicts WHERE resolution = 'applied_remote'",
    )
    .await;
    assert_eq!(applied_on_winner, 0, "the loser's change never lands");
    let kept_on_loser = Fixture::count(
        l,
        "SELECT count(*) FROM tandem.conflicts WHERE resolution = 'kept_local'",
    )
    .await;
    assert_eq!(kept_on_loser, 0, "the winner's change always lands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn desktop_wins_converges_on_desktop_rows() {
    site_wins("cf_dwins", "desktop", 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mobile_wins_converges_on_mobile_rows() {
    site_wins("cf_mwins", "mobile", 23).await;
}

/// Under `desktop_wins`, desktop updates a row's version while its 1 MiB value, stored out of
/// line, stays unchanged (so the source sends the new row without it), and mobile deletes the
/// row meanwhile: desktop's update recreates the row on mobile, value included, since under
/// `REPLICA IDENTITY FULL` the old row carries that value inline. Before, an update missing a
/// value could not recreate a row, and only desktop kept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_winners_update_leaving_a_toasted_value_unchanged_recreates_the_row_the_loser_deleted()
{
    // 1 MiB of md5 text, the same on every evaluation.
    let mib = "(SELECT string_agg(md5(g::text), '' ORDER BY g) FROM generate_series(1, 32768) g)";
    let fx = fixture(
        "cf_toast",
        &format!(
            "ALTER TABLE items REPLICA IDENTITY FULL;
             ALTER TABLE items ALTER COLUMN v SET STORAGE EXTERNAL;
             UPDATE items SET v = {mib} WHERE id = 1;"
        ),
        "[conflicts]\npolicy = \"desktop_wins\"",
    )
    .await;
    fx.d.batch_execute("UPDATE items SET version = 2 WHERE id = 1")
        .await
        .unwrap();
    fx.m.batch_execute("DELETE FROM items WHERE id = 1")
        .await
        .unwrap();
    let run = fx.start().await;
    wait_count(
        30,
        &fx.m,
        &format!(
            "SELECT count(*) FROM items WHERE id = 1 AND version = 2 AND length(v) = 1048576 \
             AND md5(v) = md5({mib})"
        ),
        1,
    )
    .await;
    // Mobile's delete lost on desktop too, and each side logged its decision.
    wait_count(
        30,
        &fx.d,
        "SELECT count(*) FROM tandem.conflicts WHERE kind = 'delete_origin_differs' \
         AND resolution = 'kept_local'",
        1,
    )
    .await;
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM tandem.conflicts WHERE kind = 'update_deleted' \
             AND resolution = 'applied_remote'"
        )
        .await,
        1
    );
    assert_eq!(
        Fixture::count(
            &fx.d,
            "SELECT count(*) FROM items WHERE id = 1 AND version = 2"
        )
        .await,
        1
    );
    run.stop().await;
}

const ONE_WAY: &str = "[replication.direction]\n\"public.items\" = \"desktop_to_mobile\"";

/// Rows 1 and 2 are `base` on both sides; mobile changes row 1 (and fills row 3) behind tandem's
/// back, desktop then updates 1 and 2 and inserts 3; returns mobile's rows 1..3.
async fn one_way_case(
    db: &str,
    policy: &str,
    extra: &str,
) -> (Fixture, Vec<(i64, Option<String>)>) {
    let fx = fixture(
        db,
        extra,
        &format!("[conflicts]\npolicy = \"{policy}\"")
            .replace("[conflicts]", &format!("{}\n[conflicts]", ONE_WAY)),
    )
    .await;
    fx.m.batch_execute(
        "UPDATE items SET v = 'mobile' WHERE id = 1; INSERT INTO items VALUES (41, NULL, 9);",
    )
    .await
    .unwrap();
    let run = fx.start().await;
    fx.d.batch_execute(
        "UPDATE items SET v = 'desktop', version = 2 WHERE id IN (1, 2); \
         INSERT INTO items VALUES (41, 'filled', 2);",
    )
    .await
    .unwrap();
    wait_for(30, "desktop's changes handled on mobile", || async {
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM items WHERE id = 2 AND v = 'desktop'",
        )
        .await
            == 1
            && Fixture::count(&fx.m, "SELECT count(*) FROM tandem.conflicts").await == 2
    })
    .await;
    run.stop().await;
    let rows =
        fx.m.query(
            "SELECT id, v FROM items WHERE id IN (1, 2, 41) ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    (fx, rows)
}

/// `tandem resolve --table public.items --take <take>` with `config`: exit code, stdout, stderr.
fn resolve_items(config: &str, take: &str) -> (i32, String, String) {
    run_tandem(
        &[
            "--config",
            config,
            "resolve",
            "--table",
            "public.items",
            "--take",
            take,
        ],
        &[],
    )
}

async fn resolutions(c: &Client) -> Vec<String> {
    common::strings(
        c,
        "SELECT kind || ' ' || resolution FROM tandem.conflicts ORDER BY kind",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_local_apply_remote_and_fill_missing_behave_as_named() {
    let s = |x: &str| Some(x.to_string());
    let full = "ALTER TABLE items REPLICA IDENTITY FULL;";

    let (fx, rows) = one_way_case("cf_keep", "keep_local", full).await;
    assert_eq!(rows, vec![(1, s("mobile")), (2, s("desktop")), (41, None)]);
    assert_eq!(
        resolutions(&fx.m).await,
        [
            "insert_exists kept_local",
            "update_origin_differs kept_local"
        ]
    );

    let (fx, rows) = one_way_case("cf_remote", "apply_remote", full).await;
    assert_eq!(
        rows,
        vec![(1, s("desktop")), (2, s("desktop")), (41, s("filled"))]
    );
    assert_eq!(
        resolutions(&fx.m).await,
        [
            "insert_exists applied_remote",
            "update_origin_differs applied_remote"
        ]
    );

    // fill_missing: row 1 keeps mobile's non-NULL value; row 41's NULL is filled.
    let (fx, rows) = one_way_case("cf_fill", "fill_missing", full).await;
    assert_eq!(
        rows,
        vec![(1, s("mobile")), (2, s("desktop")), (41, s("filled"))]
    );
    assert_eq!(
        resolutions(&fx.m).await,
        ["insert_exists merged", "update_origin_differs merged"]
    );
    // Row 41's other column: mobile's version 9 was not NULL, so it stayed.
    assert_eq!(
        Fixture::count(&fx.m, "SELECT version FROM items WHERE id = 41").await,
        9
    );
    assert_rows_logged(&fx.m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn setup_checks_what_policies_need_and_fixes_identity_and_sequences_when_asked() {
    let extra = "CREATE TABLE seqs (id bigserial PRIMARY KEY, v text);
                 INSERT INTO seqs (v) SELECT 'x' FROM generate_series(1, 5);";
    let (d, m) = Fixture::databases("cf_setup", &schema("cf_setup", extra)).await;
    drop((d, m));
    let text = Fixture::config_text("cf_setup", "tables = [\"public.items\", \"public.seqs\"]")
        + "[conflicts]\npolicy = \"last_write_wins\"\n[conflicts.tables.\"public.items\"]\npolicy = \"desktop_wins\"\n";
    let path = common::scratch().join("tandem-cf-setup.toml");
    std::fs::write(&path, &text).unwrap();
    let config = path.to_str().unwrap();

    // Mobile as the plain role: it may not use replication origins, so commit timestamps cannot
    // stand in for the missing version column.
    let (desktop, mobile) = text.split_at(text.find("[mobile]").unwrap());
    let plain = format!(
        "{desktop}{}",
        mobile.replacen("postgresql://postgres@", "postgresql://tandem_cf:cf-pw@", 1)
    );
    std::fs::write(&path, &plain).unwrap();
    let (code, out, err) = run_tandem(&["--config", config, "setup"], &[]);
    assert_ne!(code, 0, "{out}");
    for want in [
        "desktop: table public.items uses conflict policy desktop_wins, which needs the old row of every change; run `tandem setup --replica-identity-full`",
        "mobile: table public.items uses conflict policy desktop_wins",
        "desktop: table public.seqs has no column `updated_at`, which last_write_wins compares",
        "mobile: table public.seqs has no column `updated_at`",
        "or compare commit timestamps: `track_commit_timestamp = on` on both sides and a role that may use replication origins",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }

    let text = text.replace(
        "policy = \"last_write_wins\"\n",
        "policy = \"last_write_wins\"\nversion_column = \"id\"\n",
    );
    std::fs::write(&path, &text).unwrap();
    let (code, out, err) = run_tandem(
        &[
            "--config",
            config,
            "setup",
            "--replica-identity-full",
            "--sequences",
            "odd-even",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    for want in [
        "desktop: table public.items now has REPLICA IDENTITY FULL",
        "mobile: table public.items now has REPLICA IDENTITY FULL",
        "desktop: sequence public.seqs_id_seq of public.seqs now gives odd values from 7 (step 2)",
        "mobile: sequence public.seqs_id_seq of public.seqs now gives even values from 6 (step 2)",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    let fx_d = common::connect(&common::clusters().desktop.url("cf_setup")).await;
    let fx_m = common::connect(&common::clusters().mobile.url("cf_setup")).await;
    fx_d.batch_execute("INSERT INTO seqs (v) VALUES ('d'), ('d')")
        .await
        .unwrap();
    fx_m.batch_execute("INSERT INTO seqs (v) VALUES ('m'), ('m')")
        .await
        .unwrap();
    assert_eq!(
        Fixture::count(&fx_d, "SELECT sum(id)::int8 FROM seqs WHERE v = 'd'").await,
        7 + 9
    );
    assert_eq!(
        Fixture::count(&fx_m, "SELECT sum(id)::int8 FROM seqs WHERE v = 'm'").await,
        6 + 8
    );
    // A second run changes nothing and says so.
    let (code, out, _) = run_tandem(
        &[
            "--config",
            config,
            "setup",
            "--replica-identity-full",
            "--sequences",
            "odd-even",
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.contains("already odd-even"), "{out}");
    assert!(!out.contains("now has REPLICA IDENTITY FULL"), "{out}");
    run_tandem(&["--config", config, "teardown"], &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_pauses_one_table_while_others_flow_and_resolve_continues_it() {
    let fx = fixture(
        "cf_error",
        "ALTER TABLE items REPLICA IDENTITY FULL;
         CREATE TABLE notes (id int PRIMARY KEY, v text); ALTER TABLE notes OWNER TO tandem_cf;",
        "[conflicts]\npolicy = \"apply_remote\"\n[conflicts.tables.\"public.items\"]\npolicy = \"error\"",
    )
    .await;
    // The fixture lists only items; notes flows too.
    assert!(fx.cfg.tables.len() == 1);
    let text = std::fs::read_to_string(&fx.config_path).unwrap().replace(
        "tables = [\"public.items\"]",
        "tables = [\"public.items\", \"public.notes\"]",
    );
    std::fs::write(&fx.config_path, &text).unwrap();
    let fx = Fixture::with_config("cf_error", fx.d, fx.m, text).await;
    let config = fx.config_path.to_str().unwrap().to_string();

    fx.d.batch_execute("UPDATE items SET v = 'D1' WHERE id = 1")
        .await
        .unwrap();
    fx.m.batch_execute("UPDATE items SET v = 'M1' WHERE id = 1")
        .await
        .unwrap();
    let run = fx.start().await;
    for c in [&fx.d, &fx.m] {
        wait_count(30, c, "SELECT count(*) FROM tandem.paused", 1).await;
    }
    // Behind the pause: desktop's next change of items waits; notes keep flowing both ways.
    fx.d.batch_execute(
        "BEGIN; UPDATE items SET v = 'D2' WHERE id = 2; INSERT INTO notes VALUES (1, 'd'); COMMIT",
    )
    .await
    .unwrap();
    fx.m.batch_execute("INSERT INTO notes VALUES (2, 'm')")
        .await
        .unwrap();
    wait_for(30, "notes flow", || async {
        Fixture::count(&fx.d, "SELECT count(*) FROM notes").await == 2
            && Fixture::count(&fx.m, "SELECT count(*) FROM notes").await == 2
    })
    .await;
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM items WHERE id = 2 AND v = 'base'"
        )
        .await,
        1
    );
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM tandem.held").await,
        2
    );
    let (code, out, err) = run_tandem(&["--config", &config, "status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("PAUSED public.items").count(), 2, "{out}");
    assert!(out.contains("1 change(s) waiting"), "{out}");
    assert!(out.contains("update_origin_differs paused: 1"), "{out}");

    // Resolved while `run` keeps running.
    let (code, out, err) = resolve_items(&config, "desktop");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("mobile: public.items (D>M) resumed: conflict"),
        "{out}"
    );
    assert!(
        out.contains("applied_remote, 1 held change(s) after it, 2 written"),
        "{out}"
    );
    assert!(out.contains("desktop: public.items (M>D) resumed"), "{out}");
    assert!(
        out.contains("kept_local, 0 held change(s) after it, 0 written"),
        "{out}"
    );
    fx.d.batch_execute("UPDATE items SET v = 'D3' WHERE id = 3")
        .await
        .unwrap();
    wait_for(30, "items converge on desktop's rows", || async {
        Fixture::rows(&fx.d, "items").await == Fixture::rows(&fx.m, "items").await
            && Fixture::count(
                &fx.m,
                "SELECT count(*) FROM items WHERE v IN ('D1', 'D2', 'D3')",
            )
            .await
                == 3
    })
    .await;
    run.stop().await;
    for (c, res) in [(&fx.m, "applied_remote"), (&fx.d, "kept_local")] {
        assert_eq!(
            Fixture::count(c, "SELECT count(*) FROM tandem.paused").await,
            0
        );
        assert_eq!(
            Fixture::count(c, "SELECT count(*) FROM tandem.held").await,
            0
        );
        let got: String = c
            .query_one(
                "SELECT kind || ' ' || resolution FROM tandem.conflicts",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, format!("update_origin_differs {res}"));
    }
    let (code, _, err) = resolve_items(&config, "skip");
    assert_eq!(code, 1);
    assert!(
        err.contains("public.items is not paused in either direction"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_are_counted_in_prometheus_metrics() {
    let fx = fixture(
        "cf_metrics",
        "",
        "[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"version\"",
    )
    .await;
    // insert/insert of one key: mobile's greater version wins on both sides.
    fx.d.batch_execute("INSERT INTO items VALUES (100, 'd', 2)")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO items VALUES (100, 'm', 3)")
        .await
        .unwrap();
    let (mut child, port) = fx.run_with_metrics();
    let line = |body: &str, kind: &str, res: &str| {
        common::metric(
            body,
            "tandem_conflicts_total",
            &[
                ("kind", kind),
                ("resolution", res),
                ("table", "public.items"),
            ],
        )
    };
    // Counted at decision time; the checkpoint gauges follow at the commits.
    wait_for(
        30,
        "both decisions counted, both checkpoints reported",
        || async {
            scrape(port).is_some_and(|b| {
                line(&b, "insert_exists", "kept_local").as_deref() == Some("1")
                    && line(&b, "insert_exists", "applied_remote").as_deref() == Some("1")
                    && b.contains("tandem_changes_total{direction=\"D>M\"}")
                    && b.contains("tandem_checkpoint_lsn{direction=\"M>D\"}")
                    && b.contains("tandem_checkpoint_lsn{direction=\"D>M\"}")
            })
        },
    )
    .await;
    wait_for(30, "mobile's row on desktop", || async {
        state(&fx.d).await.get(&100) == Some(&("m".to_string(), 3))
    })
    .await;
    // The commit that brought it measured its lag from the source's commit: a small,
    // non-negative number of seconds (both clusters share this machine's clock).
    let lag = common::metric(
        &scrape(port).unwrap(),
        "tandem_lag_seconds",
        &[("direction", "M>D")],
    )
    .and_then(|v| v.parse::<f64>().ok());
    assert!(lag.is_some_and(|l| (0.0..30.0).contains(&l)), "{lag:?}");
    // Both directions stream: the health probe says so.
    let health = common::http_get(port, "/health").unwrap();
    assert!(
        health.starts_with("HTTP/1.1 200")
            && health.contains("D>M streaming checkpoint ")
            && health.contains("M>D streaming checkpoint "),
        "{health}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `note` of row `id`; `None` also while the column does not exist.
async fn note(c: &Client, id: i64) -> Option<String> {
    c.query_one("SELECT note FROM items WHERE id = $1", &[&id])
        .await
        .ok()
        .and_then(|r| r.get::<_, Option<String>>(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_column_added_with_tandem_ddl_flows_and_its_conflicts_are_decided_by_the_rule() {
    // Mobile is the plain role (owner of its table): `tandem ddl` runs there as it.
    let fx = fixture(
        "cf_ddl",
        "",
        "[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"version\"",
    )
    .await;
    let cfg = fx.config_path.to_str().unwrap();
    let run = fx.start().await;
    let (code, _, err) = run_tandem(
        &[
            "--config",
            cfg,
            "ddl",
            "--on",
            "mobile",
            "ALTER TABLE items ADD COLUMN note text",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    // Each side writes the new column at once; the other side's lookups and writes take it.
    fx.m.batch_execute("UPDATE items SET note = 'm2', version = 9 WHERE id = 2")
        .await
        .unwrap();
    let (d, m) = (&fx.d, &fx.m);
    wait_for(30, "mobile's note on desktop", || async {
        note(d, 2).await.as_deref() == Some("m2")
    })
    .await;
    fx.d.batch_execute("UPDATE items SET note = 'd3', version = 9 WHERE id = 3")
        .await
        .unwrap();
    wait_for(30, "desktop's note on mobile", || async {
        note(m, 3).await.as_deref() == Some("d3")
    })
    .await;
    run.stop().await;
    assert_eq!(logged(&fx.d).await.1 + logged(&fx.m).await.1, 0);

    // Both change the same row's new column while tandem is stopped: the greater version wins
    // on both sides, and the conflict is logged with the new column in its rows.
    fx.d.batch_execute("UPDATE items SET note = 'd1', version = 5 WHERE id = 1")
        .await
        .unwrap();
    fx.m.batch_execute("UPDATE items SET note = 'm1', version = 7 WHERE id = 1")
        .await
        .unwrap();
    let run = fx.start().await;
    wait_for(30, "mobile's version on both", || async {
        note(d, 1).await.as_deref() == Some("m1") && note(m, 1).await.as_deref() == Some("m1")
    })
    .await;
    run.stop().await;
    // Without old rows it is told where the remote version lost: on mobile.
    assert_eq!(logged(&fx.m).await.0, BTreeSet::from([1]));
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM tandem.conflicts \
             WHERE remote_row->>'note' = 'd1' AND local_row->>'note' = 'm1' AND resolution = 'kept_local'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_tandem_ddl_creates_needs_what_its_rule_compares_and_then_its_conflicts_are_decided(
) {
    // `public.*`: a table mobile's plain role makes with `tandem ddl` is taken in at once.
    let fx = fixture_of(
        "cf_ddlnew",
        "public.*",
        "GRANT CREATE ON SCHEMA public TO tandem_cf;",
        "[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"version\"",
        true,
    )
    .await;
    let cfg = fx.config_path.to_str().unwrap();
    let ddl = |sql: &str| run_tandem(&["--config", cfg, "ddl", "--on", "mobile", sql], &[]);
    let run = fx.start().await;
    // Without the version column, and without commit timestamps for the plain role to fall back
    // on, last_write_wins could not decide its conflicts: refused, nothing made.
    let (code, _, err) = ddl("CREATE TABLE notes (id bigint PRIMARY KEY, body text)");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "mobile: public.notes has no column `version`, which last_write_wins compares"
        ),
        "{err}"
    );
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'notes'"
        )
        .await,
        0
    );
    let (code, out, err) =
        ddl("CREATE TABLE notes (id bigint PRIMARY KEY, body text, version bigint NOT NULL)");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("added to publication cf_ddlnew_m"), "{out}");
    fx.m.batch_execute("INSERT INTO notes VALUES (1, 'm', 1)")
        .await
        .unwrap();
    wait_for(30, "mobile's row on desktop", || async {
        fx.d.query_one("SELECT count(*) FROM notes", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 1)
    })
    .await;
    run.stop().await;

    // Both change the row while tandem is stopped: the greater version wins on both sides, and
    // mobile, where the remote version lost, logs it under the new table.
    fx.d.batch_execute("UPDATE notes SET body = 'd', version = 5")
        .await
        .unwrap();
    fx.m.batch_execute("UPDATE notes SET body = 'm', version = 7")
        .await
        .unwrap();
    let run = fx.start().await;
    wait_count(30, &fx.d, "SELECT count(*) FROM notes WHERE body = 'm'", 1).await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM notes WHERE body = 'm'").await,
        1
    );
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM tandem.conflicts WHERE table_name = 'public.notes' \
         AND resolution = 'kept_local'",
        1,
    )
    .await;

    // Desktop (superuser, commit timestamps on) may compare commit times instead of the missing
    // column; mobile's plain role may not, so mobile refuses the change like any transaction it
    // cannot take: named, with its `tandem skip` command, nothing of it made there.
    let (code, _, err) = run_tandem(
        &[
            "--config",
            cfg,
            "ddl",
            "--on",
            "desktop",
            "CREATE TABLE later (id bigint PRIMARY KEY)",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let (e, _) = common::rejected(run).await;
    assert!(
        e.contains("was rejected by mobile")
            && e.contains("mobile: public.later has no column `version`"),
        "{e}"
    );
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'later'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn last_write_wins_by_commit_timestamp_without_a_version_column() {
    // No `updated_at` column: with track_commit_timestamp and replication origins (superuser on
    // both sides), commit times decide, and a replicated row carries its source's commit time.
    let fx = fixture_as(
        "cf_commit_ts",
        "",
        "[conflicts]\npolicy = \"last_write_wins\"",
        false,
    )
    .await;
    let ts = "SELECT pg_xact_commit_timestamp(xmin)::text FROM items WHERE id = $1";
    // Each side's local commit times, as the rows they wrote show them.
    let (mut d_ts, mut m_ts) = (BTreeSet::new(), BTreeSet::new());
    for (desktop, id, v) in [
        (true, 1i64, "D-first"),
        (false, 1, "M-later"),
        (false, 2, "M-first"),
        (true, 2, "D-later"),
        (true, 3, "D-only"),
    ] {
        let c = if desktop { &fx.d } else { &fx.m };
        c.execute("UPDATE items SET v = $2 WHERE id = $1", &[&id, &v])
            .await
            .unwrap();
        let t: String = c.query_one(ts, &[&id]).await.unwrap().get(0);
        if desktop { &mut d_ts } else { &mut m_ts }.insert(t);
    }
    let run = fx.start().await;
    let want: BTreeMap<i64, String> = [(1, "M-later"), (2, "D-later"), (3, "D-only")]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    wait_for(30, "the later commit wins on both sides", || async {
        let mut ok = true;
        for c in [&fx.d, &fx.m] {
            let s = state(c).await;
            ok &= want.iter().all(|(k, v)| s.get(k).map(|r| &r.0) == Some(v));
        }
        ok
    })
    .await;
    run.stop().await;
    // A replicated row carries a commit time of its source side (the last source commit of the
    // target transaction), not the time tandem applied it.
    for (c, id, source) in [(&fx.d, 1i64, &m_ts), (&fx.m, 2, &d_ts), (&fx.m, 3, &d_ts)] {
        let got: String = c.query_one(ts, &[&id]).await.unwrap().get(0);
        assert!(source.contains(&got), "row {id}: {got} not in {source:?}");
    }
    let (keys, _) = logged(&fx.d).await;
    assert!(
        keys.contains(&2),
        "desktop kept its later row 2: a logged conflict"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unique_collisions_on_another_key_converge_under_last_write_wins() {
    let fx = fixture(
        "cf_unique",
        "CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE, version int NOT NULL);
         INSERT INTO users VALUES (10, 'a@', 1), (11, 'b@', 1);
         ALTER TABLE users OWNER TO tandem_cf;",
        "[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"version\"",
    )
    .await;
    // The fixture lists items only: list users instead (mobile stays the plain role).
    let text = std::fs::read_to_string(&fx.config_path)
        .unwrap()
        .replace("tables = [\"public.items\"]", "tables = [\"public.users\"]");
    let fx = Fixture::with_config("cf_unique", fx.d, fx.m, text).await;
    // Different keys claim one email on each side: the greater version keeps it, the other row
    // goes on both sides (it is in the conflict log).
    fx.d.batch_execute(
        "INSERT INTO users VALUES (1, 'x@', 2); UPDATE users SET email = 'c@', version = 5 WHERE id = 10;",
    )
    .await
    .unwrap();
    fx.m.batch_execute(
        "INSERT INTO users VALUES (2, 'x@', 3); UPDATE users SET email = 'c@', version = 4 WHERE id = 11;",
    )
    .await
    .unwrap();
    let run = fx.start().await;
    // Ordered as text.
    let want = vec!["(10,c@,5)".to_string(), "(2,x@,3)".to_string()];
    wait_for(30, "the winners on both sides", || async {
        Fixture::rows(&fx.d, "users").await == want && Fixture::rows(&fx.m, "users").await == want
    })
    .await;
    run.stop().await;
    for (c, want) in [
        (
            &fx.d,
            ["insert_exists applied_remote", "update_exists kept_local"],
        ),
        (
            &fx.m,
            ["insert_exists kept_local", "update_exists applied_remote"],
        ),
    ] {
        assert_eq!(resolutions(c).await, want);
        assert_rows_logged(c).await;
    }
}

/// An application moves values of a UNIQUE column between rows: a swap through a temporary
/// value on each side, and a chain (row 3 gives its email up, row 4 takes it) on desktop. The
/// conflict lookup compares each incoming row with the target as it was before the batch, so
/// each row of the swap, and row 4 of the chain, seemed to collide with a row the batch itself
/// rewrites, and `last_write_wins` deleted the "losers": rows 1, 2, 3, 5 and 6 were gone. None
/// is a conflict: nothing is logged, and both sides end with every row. Nor is a row the same
/// source transaction changed before, in the same target transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_moving_values_of_another_unique_key_among_them_are_no_collision() {
    let fx = fixture(
        "cf_swap",
        "CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE NOT NULL, version int NOT NULL);
         INSERT INTO users SELECT g, chr(96 + g) || '@', 1 FROM generate_series(1, 6) g;
         ALTER TABLE users OWNER TO tandem_cf;",
        "[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"version\"",
    )
    .await;
    let text = std::fs::read_to_string(&fx.config_path).unwrap().replace(
        "tables = [\"public.items\"]",
        "tables = [\"public.users\", \"public.items\"]",
    );
    let fx = Fixture::with_config("cf_swap", fx.d, fx.m, text).await;
    let run = fx.start().await;
    let swap = |a: i32, b: i32| {
        format!(
            "BEGIN; UPDATE users SET email = 'tmp', version = 2 WHERE id = {a}; \
             UPDATE users SET email = chr(96 + {a}) || '@', version = 2 WHERE id = {b}; \
             UPDATE users SET email = chr(96 + {b}) || '@' WHERE id = {a}; COMMIT;"
        )
    };
    fx.d.batch_execute(&format!(
        "{} BEGIN; UPDATE users SET email = 'z@', version = 2 WHERE id = 3; \
         UPDATE users SET email = 'c@', version = 2 WHERE id = 4; COMMIT;",
        swap(1, 2)
    ))
    .await
    .unwrap();
    fx.m.batch_execute(&swap(5, 6)).await.unwrap();
    let want = [
        "(1,b@,2)", "(2,a@,2)", "(3,z@,2)", "(4,c@,2)", "(5,f@,2)", "(6,e@,2)",
    ];
    wait_for(30, "every row on both sides", || async {
        Fixture::rows(&fx.d, "users").await == want && Fixture::rows(&fx.m, "users").await == want
    })
    .await;
    // One transaction changes a row twice with one version (as `updated_at = now()` does), a
    // row of another table between, so two batches: the second met the first's row, written in
    // the same target transaction, and lost the tie to it (desktop has priority).
    fx.m.batch_execute(
        "BEGIN; UPDATE users SET email = 'y@', version = 3 WHERE id = 4; \
         UPDATE items SET v = 'between', version = 2 WHERE id = 1; \
         UPDATE users SET email = 'w@', version = 3 WHERE id = 4; COMMIT",
    )
    .await
    .unwrap();
    wait_for(30, "the transaction's last change on desktop", || async {
        Fixture::rows(&fx.d, "items").await == Fixture::rows(&fx.m, "items").await
            && Fixture::rows(&fx.d, "users").await == Fixture::rows(&fx.m, "users").await
    })
    .await;
    assert!(Fixture::rows(&fx.d, "users")
        .await
        .contains(&"(4,w@,3)".to_string()));
    run.stop().await;
    for c in [&fx.d, &fx.m] {
        assert_eq!(resolutions(c).await, Vec::<String>::new(), "no conflict");
    }
}

/// `tandem resolve` writes the changes held behind a pause through the same lookup: a local
/// insert racing it there fails the command with nothing written and the table still paused, and
/// the command run again decides that row as the conflict it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resolve_meeting_a_racing_local_insert_writes_nothing_and_can_run_again() {
    let fx = fixture(
        "cf_race_resolve",
        "ALTER TABLE items REPLICA IDENTITY FULL;",
        "[conflicts]\npolicy = \"error\"",
    )
    .await;
    let config = fx.config_path.to_str().unwrap().to_string();
    fx.d.batch_execute("UPDATE items SET v = 'D1' WHERE id = 1")
        .await
        .unwrap();
    fx.m.batch_execute("UPDATE items SET v = 'M1' WHERE id = 1")
        .await
        .unwrap();
    let run = fx.start().await;
    wait_count(30, &fx.m, "SELECT count(*) FROM tandem.paused", 1).await;
    fx.d.batch_execute("INSERT INTO items VALUES (300, 'd', 1)")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM tandem.held", 2).await;
    run.stop().await;

    let app = common::connect(&common::clusters().mobile.url(&fx.name)).await;
    app.batch_execute("BEGIN; INSERT INTO items VALUES (300, 'app', 1)")
        .await
        .unwrap();
    let resolve = |config: String| std::thread::spawn(move || resolve_items(&config, "desktop"));
    let first = resolve(config.clone());
    wait_count(30, &fx.m, &common::apply_lock_waits(&fx.name), 1).await;
    app.batch_execute("COMMIT").await.unwrap();
    let (code, out, err) = first.join().unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("public.items stays paused from desktop, nothing of it written: run the same `tandem resolve` again")
            && err.contains("1 of 1 rows of public.items appeared at their keys after the conflict lookup found none"),
        "{err}"
    );
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM tandem.held").await,
        2
    );
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM items WHERE v IN ('D1', 'app')").await,
        1,
        "the conflict's own change was not written either"
    );

    let (code, out, err) = resolve(config).join().unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    // The conflict's own change, then the held insert meeting the local row: paused again.
    assert!(
        out.contains("applied_remote, 1 held change(s) after it, 1 written; paused again"),
        "{out}"
    );
    assert_eq!(
        resolutions(&fx.m).await,
        [
            "insert_exists paused",
            "update_origin_differs applied_remote"
        ]
    );
    assert_eq!(state(&fx.m).await.get(&300), Some(&("app".to_string(), 1)));
}

/// A local insert on mobile, not yet committed when tandem looks up desktop's insert of the same
/// key there, commits while tandem's write of that key waits on it. The lookup found no row, so
/// the write must not take the local row over unlogged: under mobile_wins both sides end on
/// mobile's row, each side logging its insert_exists. (Before, an upsert wrote desktop's row over
/// mobile's without a conflict, while desktop took mobile's: the sides swapped rows.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_insert_racing_the_lookup_is_a_logged_conflict_not_overwritten() {
    let fx = fixture(
        "cf_race",
        "ALTER TABLE items REPLICA IDENTITY FULL;",
        "[conflicts]\npolicy = \"mobile_wins\"",
    )
    .await;
    let (mut child, port) = fx.run_with_metrics();
    wait_for(30, "both directions streaming", || async {
        common::http_get(port, "/health").is_some_and(|h| h.starts_with("HTTP/1.1 200"))
    })
    .await;
    let app = common::connect(&common::clusters().mobile.url(&fx.name)).await;
    app.batch_execute("BEGIN; INSERT INTO items VALUES (100, 'm', 1)")
        .await
        .unwrap();
    fx.d.batch_execute("INSERT INTO items VALUES (100, 'd', 1)")
        .await
        .unwrap();
    // tandem's lookup did not see the uncommitted row; its write of key 100 waits on it.
    wait_count(30, &fx.m, &common::apply_lock_waits(&fx.name), 1).await;
    app.batch_execute("COMMIT").await.unwrap();
    let row = |c| async move { state(c).await.get(&100).cloned() };
    wait_for_explained(
        30,
        "mobile's row on both sides, each side's conflict logged",
        || async {
            row(&fx.d).await == Some(("m".to_string(), 1))
                && row(&fx.m).await == Some(("m".to_string(), 1))
                && resolutions(&fx.m).await == ["insert_exists kept_local"]
                && resolutions(&fx.d).await == ["insert_exists applied_remote"]
        },
        || async {
            format!(
                "desktop {:?} {:?}, mobile {:?} {:?}",
                row(&fx.d).await,
                resolutions(&fx.d).await,
                row(&fx.m).await,
                resolutions(&fx.m).await
            )
        },
    )
    .await;
    // Found by the write's count, once: the direction started over a single time.
    let races = common::metric(
        &scrape(port).unwrap(),
        "tandem_conflict_races_total",
        &[("direction", "D>M")],
    );
    assert_eq!(races.as_deref(), Some("1"));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_from_the_checkpoint_reaches_the_same_decisions_once() {
    // Mobile's first apply commit fails (a deferred trigger, once): the decisions and their log
    // roll back with it; `run` starts over from the checkpoint (one source transaction per
    // commit, to find a refused one) and decides the same, once.
    let fx = fixture(
        "cf_replay",
        "ALTER TABLE items REPLICA IDENTITY FULL;",
        "[conflicts]\npolicy = \"desktop_wins\"",
    )
    .await;
    common::fail_first_apply_commit(&fx.m, "items", 0.0).await;
    for id in 1..=5i64 {
        fx.d.execute("UPDATE items SET v = 'D' WHERE id = $1", &[&id])
            .await
            .unwrap();
        fx.m.execute("UPDATE items SET v = 'M' WHERE id = $1", &[&id])
            .await
            .unwrap();
    }
    let run = fx.start().await;
    wait_for(30, "desktop's rows on both sides", || async {
        Fixture::count(&fx.m, "SELECT count(*) FROM items WHERE v = 'D'").await == 5
            && Fixture::rows(&fx.d, "items").await == Fixture::rows(&fx.m, "items").await
    })
    .await;
    run.stop().await;
    assert!(
        Fixture::count(&fx.m, "SELECT last_value FROM once").await >= 2,
        "the first commit failed and the changes were applied again"
    );
    assert_eq!(
        resolutions(&fx.m).await,
        vec!["update_origin_differs applied_remote"; 5]
    );
    assert_eq!(
        resolutions(&fx.d).await,
        vec!["update_origin_differs kept_local"; 5]
    );
}

/// A change the seed commits while the initial snapshot copies its table: the copy does not hold
/// it, so the stream brings it after the snapshot's commit. Under last_write_wins by commit time
/// the snapshot's rows must not count as the target's own newer writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_made_during_the_initial_snapshot_is_not_lost_to_last_write_wins() {
    let db = "cf_snap_window";
    let (d, m) = Fixture::databases(db, "CREATE TABLE big (id bigint PRIMARY KEY, v text);").await;
    d.batch_execute("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 300000) g")
        .await
        .unwrap();
    let text = Fixture::config_text(db, "tables = [\"public.big\"]")
        + "[conflicts]\npolicy = \"last_write_wins\"\n";
    let fx = Fixture::with_config(db, d, m, text).await;
    let copying =
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tandem snapshot' \
                   AND query LIKE 'COPY%' AND state = 'active'";
    let during = async {
        wait_count(30, &fx.d, copying, 1).await;
        fx.d.execute("UPDATE big SET v = 'during the copy' WHERE id = 1", &[])
            .await
            .unwrap();
        // Committed while the copy still ran, so the copy did not see it.
        assert_eq!(
            Fixture::count(&fx.d, copying).await,
            1,
            "the copy ended first"
        );
    };
    let (run, ()) = tokio::join!(fx.start(), during);
    wait_count(30, &fx.m, "SELECT count(*) FROM big", 300_000).await;
    wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM big WHERE id = 1 AND v = 'during the copy'",
        1,
    )
    .await;
    run.stop().await;
}

/// `REPLICA IDENTITY FULL` dropped on mobile while `run` runs, under a policy that decides by
/// old rows: mobile's next change of the table stops `run`, nothing of it applied, naming the
/// fix and the `tandem skip` and `repair` that get past it. Before, it applied as no conflict
/// whatever desktop had meanwhile (`conflict::decide` does not guess), so a concurrent change
/// of the row would leave each side with the other's version, unsaid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_rows_a_policy_decides_by_stopping_midway_stop_run_at_the_first_change_without_them() {
    let fx = fixture(
        "cf_noold",
        "ALTER TABLE items REPLICA IDENTITY FULL;",
        "[conflicts]\npolicy = \"desktop_wins\"",
    )
    .await;
    let run = fx.start().await;
    fx.m.batch_execute(
        "ALTER TABLE items REPLICA IDENTITY DEFAULT; UPDATE items SET v = 'm' WHERE id = 1",
    )
    .await
    .unwrap();
    let (e, _) = common::rejected(run).await;
    for want in [
        "was rejected by desktop: public.items's conflict policy desktop_wins decides by the \
         source's old row, but the source logs its changes without it (its replica identity is \
         no longer FULL)",
        "run `ALTER TABLE \"public\".\"items\" REPLICA IDENTITY FULL` on the source",
        "No change on desktop makes it apply as mobile logged it",
    ] {
        assert!(e.contains(want), "{want}\n\nnot in:\n{e}");
    }
    assert_eq!(
        Fixture::count(&fx.d, "SELECT count(*) FROM items WHERE v <> 'base'").await,
        0
    );
}
