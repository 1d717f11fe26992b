//! `tandem setup`, `teardown` and start-up checks: every problem is one clear error naming side,
//! object and fix, the exit code is non-zero, and a failed setup leaves nothing behind.

mod common;

use std::sync::OnceLock;

use common::{clusters, connect, leftovers, run_tandem, Fixture};
use tandem::localpg::LocalCluster;

fn write_config(name: &str, text: &str) -> String {
    let path = common::scratch().join(format!("tandem-setup-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

const T: &str = "CREATE TABLE jobs (id bigint PRIMARY KEY, title text);";

async fn assert_nothing_left(name: &str) {
    let p = clusters();
    for c in [&p.desktop, &p.mobile] {
        let admin = connect(&c.url("postgres")).await;
        assert_eq!(leftovers(&admin, name).await, Vec::<String>::new());
        if let Ok((db, conn)) = tokio_postgres::connect(&c.url(name), tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            assert_eq!(leftovers(&db, name).await, Vec::<String>::new());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_host_is_one_clear_error_and_nothing_is_created() {
    let (_d, _m) = Fixture::databases("unreach", T).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = Fixture::config_text("unreach", r#"tables = ["public.jobs"]"#).replacen(
        &format!(":{}/", clusters().desktop.port),
        &format!(":{port}/"),
        1,
    );
    let (code, _, err) = run_tandem(&["--config", &write_config("unreach", &text), "setup"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "desktop: cannot reach postgres@127.0.0.1:{port}/unreach"
        )),
        "{err}"
    );
    assert!(err.contains("check the host and port"), "{err}");
    assert_nothing_left("unreach").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_reported_without_the_password() {
    let (_d, m) = Fixture::databases("authfail", T).await;
    m.batch_execute(
        "DO $$ BEGIN CREATE ROLE tandem_pw LOGIN REPLICATION PASSWORD 'right-pass'; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    .await
    .unwrap();
    let secret = "wr0ng-s3cret-value";
    let text = Fixture::config_text("authfail", r#"tables = ["public.jobs"]"#);
    let url = format!(
        "postgresql://tandem_pw:{secret}@127.0.0.1:{}/authfail",
        clusters().mobile.port
    );
    let (code, out, err) = run_tandem(
        &["--config", &write_config("authfail", &text), "setup"],
        &[("TANDEM_MOBILE_URL", &url), ("RUST_LOG", "debug")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("mobile: authentication failed for tandem_pw@127.0.0.1"),
        "{err}"
    );
    assert!(
        !err.contains(secret) && !out.contains(secret),
        "password leaked:\n{err}"
    );
    assert_nothing_left("authfail").await;
    // `run` waits for a server that is down, but not for what waiting cannot fix: it exits
    // with the same error.
    let (code, out, err) = run_tandem(
        &["--config", &write_config("authfail", &text), "run"],
        &[("TANDEM_MOBILE_URL", &url), ("RUST_LOG", "debug")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("mobile: authentication failed for tandem_pw@127.0.0.1")
            && !err.contains("cannot start yet"),
        "{err}"
    );
    assert!(
        !err.contains(secret) && !out.contains(secret),
        "password leaked:\n{err}"
    );
}

fn replica_cluster() -> &'static LocalCluster {
    static C: OnceLock<LocalCluster> = OnceLock::new();
    C.get_or_init(|| {
        LocalCluster::start_with(
            "test-nolog",
            "wal_level = replica\nmax_wal_senders = 0\nmax_replication_slots = 0\n",
        )
        .unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_settings_and_role_problems_are_all_reported_at_once() {
    let (_d, m) = Fixture::databases("settings", T).await;
    let rc = replica_cluster();
    let admin = connect(&rc.url("postgres")).await;
    admin
        .batch_execute("DROP DATABASE IF EXISTS settings")
        .await
        .unwrap();
    // SQL_ASCII: bytes of no declared encoding.
    admin
        .batch_execute("CREATE DATABASE settings ENCODING 'SQL_ASCII' TEMPLATE template0")
        .await
        .unwrap();
    connect(&rc.url("settings"))
        .await
        .batch_execute(T)
        .await
        .unwrap();
    m.batch_execute(
        "DO $$ BEGIN CREATE ROLE tandem_norepl LOGIN PASSWORD 'pw'; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$; GRANT SELECT ON jobs TO tandem_norepl",
    )
    .await
    .unwrap();
    let text = Fixture::config_text("settings", r#"tables = ["public.jobs"]"#);
    let (code, _, err) = run_tandem(
        &["--config", &write_config("settings", &text), "setup"],
        &[
            ("TANDEM_DESKTOP_URL", &rc.url("settings")),
            (
                "TANDEM_MOBILE_URL",
                &format!(
                    "postgresql://tandem_norepl:pw@127.0.0.1:{}/settings",
                    clusters().mobile.port
                ),
            ),
        ],
    );
    assert_eq!(code, 1, "{err}");
    for want in [
        "setup found 6 problem(s); nothing was created",
        "desktop: database encoding is SQL_ASCII, which says nothing of what its text bytes mean",
        "desktop: wal_level is `replica`; run `ALTER SYSTEM SET wal_level = logical`",
        "desktop: max_replication_slots is 0 and all 0 are in use; raise it",
        "desktop: max_wal_senders is 0 and 0 are in use; raise it",
        "mobile: role tandem_norepl lacks the REPLICATION attribute; run `ALTER ROLE \"tandem_norepl\" REPLICATION`",
        "mobile: role tandem_norepl may not create the control schema and the publication in \
         database settings; run `GRANT CREATE ON DATABASE \"settings\" TO \"tandem_norepl\"`",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert_nothing_left("settings").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_problems_name_side_table_and_fix() {
    let (d, m) = Fixture::databases("tables", "").await;
    d.batch_execute(
        "CREATE TABLE only_desktop (id int PRIMARY KEY);
         CREATE TABLE no_pk (id int, v text);
         CREATE TABLE no_pk_listed (id int, v text);
         CREATE TABLE pk_one_side (id int, v text);
         CREATE TABLE pk_differs (a int, b int, PRIMARY KEY (a));
         CREATE TABLE type_differs (id int PRIMARY KEY, amount numeric(10,2), extra text);
         CREATE TABLE Customers (id int PRIMARY KEY);
         CREATE TABLE lines (id int PRIMARY KEY, qty int, price int, total int GENERATED ALWAYS AS (qty * price) STORED);
         CREATE VIEW a_view AS SELECT 1 AS id; CREATE SEQUENCE a_seq;
         CREATE MATERIALIZED VIEW a_matview AS SELECT 1 AS id;",
    )
    .await
    .unwrap();
    m.batch_execute(
        "CREATE TABLE no_pk (id int, v text);
         CREATE TABLE no_pk_listed (id int, v text);
         CREATE TABLE pk_one_side (id int PRIMARY KEY, v text);
         CREATE TABLE pk_differs (a int, b int, PRIMARY KEY (a, b));
         CREATE TABLE type_differs (id int PRIMARY KEY, amount real);
         CREATE TABLE Customers (id int PRIMARY KEY);
         CREATE TABLE lines (id int PRIMARY KEY, qty int, price int, total int);
         CREATE VIEW a_view AS SELECT 1 AS id; CREATE SEQUENCE a_seq;",
    )
    .await
    .unwrap();
    let text = Fixture::config_text(
        "tables",
        r#"tables = ["public.only_desktop", "public.no_pk", "public.no_pk_listed", "public.pk_one_side", "public.pk_differs", "public.type_differs", "public.Customers", "public.lines", "public.a_view", "public.a_seq", "public.a_matview"]
[replication.columns]
"public.no_pk_listed" = ["id"]"#,
    );
    let (code, _, err) = run_tandem(&["--config", &write_config("tables", &text), "setup"], &[]);
    assert_eq!(code, 1, "{err}");
    for want in [
        "mobile: table public.only_desktop does not exist; create it with the same columns as on desktop",
        // Without a key, rows are found by their values: that needs whole old rows.
        "desktop: table public.no_pk has no primary key (or replica identity index), so tandem \
         finds its rows by all their values, which needs REPLICA IDENTITY FULL on the side it \
         flows from; run `tandem setup --replica-identity-full` or `ALTER TABLE … REPLICA \
         IDENTITY FULL` on public.no_pk, or add a primary key",
        "mobile: table public.no_pk has no primary key (or replica identity index)",
        "table public.no_pk_listed has no primary key, so its rows are found by all their values \
         (REPLICA IDENTITY FULL), and PostgreSQL 15 then sends updates and deletes only when \
         every column flows; take it out of [replication.columns] or add a primary key",
        "table public.pk_one_side: primary key differs: desktop (none) vs mobile (id); make them the same",
        "table public.pk_differs: primary key differs: desktop (a) vs mobile (a, b); make them the same",
        "table public.type_differs: column `amount` is numeric(10,2) on desktop but real on mobile",
        "table public.type_differs: column `extra` exists on desktop but not on mobile; add it to mobile",
        // Created unquoted, so folded to lower case.
        "desktop: table public.Customers does not exist; there is public.customers: names are \
         case-sensitive here, so write \"public.customers\" in the config",
        "mobile: table public.Customers does not exist; there is public.customers",
        "table public.lines: column `total` is generated on desktop but not on mobile, and \
         logical replication does not send generated columns, so mobile's would stay empty",
        // Not tables (before: "does not exist; create it on both sides").
        "desktop: public.a_view is a view: its rows are its tables' rows, which replicate when \
         the config names those tables; take it out of [replication] tables",
        "mobile: public.a_view is a view",
        "mobile: public.a_seq is a sequence: logical replication does not carry sequences",
        "desktop: public.a_matview is a materialized view: logical replication does not carry \
         it; name the tables it reads, and refresh it on each side",
        "mobile: table public.a_matview does not exist",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert_nothing_left("tables").await;
}

/// A `DEFERRABLE` primary key is no replica identity to PostgreSQL: before, `setup` took it for a
/// key and published the table, and the office application's next `UPDATE` failed on desktop
/// ("does not have a replica identity and publishes updates"). Refused with the fix, which then
/// works; and a replica identity index on its columns is refused too, since `ON CONFLICT` by them
/// meets the deferrable constraint and refuses it (found by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferrable_primary_key_is_refused_before_it_breaks_the_applications_updates() {
    let schema = "CREATE TABLE orders (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text);";
    let (d, m) = Fixture::databases("defpk", schema).await;
    d.batch_execute("INSERT INTO orders VALUES (1, 'a')")
        .await
        .unwrap();
    let text = Fixture::config_text("defpk", r#"tables = ["public.orders"]"#);
    let cfg = write_config("defpk", &text);
    let (code, out, err) = run_tandem(&["--config", &cfg, "setup"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    for side in ["desktop", "mobile"] {
        assert!(
            err.contains(&format!(
                "{side}: table public.orders has a DEFERRABLE primary key, which PostgreSQL takes \
                 neither as the replica identity"
            )) && err.contains("run `tandem setup --replica-identity-full`"),
            "{err}"
        );
    }
    assert_nothing_left("defpk").await;
    // The application still updates its rows.
    d.batch_execute("UPDATE orders SET v = 'b' WHERE id = 1")
        .await
        .unwrap();
    for c in [&d, &m] {
        c.batch_execute(
            "CREATE UNIQUE INDEX orders_id ON orders (id);
             ALTER TABLE orders REPLICA IDENTITY USING INDEX orders_id;",
        )
        .await
        .unwrap();
    }
    let (code, out, err) = run_tandem(&["--config", &cfg, "setup"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(
            "desktop: table public.orders's key (id) is also a DEFERRABLE unique constraint's, \
             which PostgreSQL's ON CONFLICT refuses as an arbiter"
        ),
        "{err}"
    );
    assert_nothing_left("defpk").await;
    // The first refusal's fix: rows found by all their values.
    for c in [&d, &m] {
        c.batch_execute("ALTER TABLE orders REPLICA IDENTITY DEFAULT; DROP INDEX orders_id")
            .await
            .unwrap();
    }
    let (code, out, err) = run_tandem(&["--config", &cfg, "setup", "--replica-identity-full"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    d.batch_execute("UPDATE orders SET v = 'a' WHERE id = 1")
        .await
        .unwrap();
    let fx = Fixture::with_config("defpk", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "UPDATE orders SET v = 'c' WHERE id = 1; INSERT INTO orders VALUES (2, 'd')",
    )
    .await
    .unwrap();
    fx.m.batch_execute(
        "INSERT INTO orders VALUES (3, 'm'); UPDATE orders SET v = 'n' WHERE id = 3",
    )
    .await
    .unwrap();
    fx.wait_equal("orders", 30).await;
    assert_eq!(
        Fixture::rows(&fx.m, "orders").await,
        ["(1,c)", "(2,d)", "(3,n)"]
    );
    run.stop().await;
    let (code, out, err) = run_tandem(&["--config", &cfg, "verify"], &[]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_over_a_schema_a_side_lacks_is_refused_and_quoted_names_are_taken_as_in_sql() {
    let schema = "CREATE TABLE jobs (id bigint PRIMARY KEY, title text);
         CREATE SCHEMA \"Sales\";
         CREATE TABLE \"Sales\".\"Order Items\" (id int PRIMARY KEY);
         CREATE SCHEMA later;";
    let (d, _m) = Fixture::databases("patterns", schema).await;
    d.batch_execute("CREATE SCHEMA desk_only").await.unwrap();
    let text = Fixture::config_text(
        "patterns",
        r#"tables = ["public.jobs", "sales.*", "nowhere.*", "desk_only.*"]"#,
    );
    let (code, _, err) = run_tandem(
        &["--config", &write_config("patterns", &text), "setup"],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    for side in ["desktop", "mobile"] {
        for want in [
            format!(
                "{side}: [replication] tables pattern sales.* takes in nothing: there is no schema \
                 sales, but there is Sales: names are case-sensitive here, so write \"Sales.*\" in \
                 the config"
            ),
            format!(
                "{side}: [replication] tables pattern nowhere.* takes in nothing: there is no \
                 schema nowhere; create it, or correct or remove the pattern"
            ),
        ] {
            assert!(err.contains(&want), "missing {want:?} in:\n{err}");
        }
    }
    assert!(
        err.contains("mobile: [replication] tables pattern desk_only.* takes in nothing: there is no schema desk_only"),
        "{err}"
    );
    assert!(
        !err.contains("desktop: [replication] tables pattern desk_only"),
        "{err}"
    );
    assert_nothing_left("patterns").await;

    // SQL's quoted form names the table it names in SQL; a pattern over a schema both sides have,
    // with no table yet, is only a warning.
    let text = Fixture::config_text(
        "patterns",
        r#"tables = ["public.jobs", "\"Sales\".*", "later.*"]"#,
    );
    let (code, out, err) = run_tandem(
        &["--config", &write_config("patterns", &text), "setup"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("warning: [replication] tables pattern later.* matches no table yet"),
        "{out}"
    );
    let published = common::strings(
        &d,
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables \
         WHERE pubname = 'patterns_d' ORDER BY 1",
    )
    .await;
    assert_eq!(published, ["Sales.Order Items", "public.jobs"]);
    let (code, _, err) = run_tandem(
        &["--config", &write_config("patterns", &text), "teardown"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_that_applies_to_tandems_role_is_refused_before_it_hides_rows() {
    let (d, m) = Fixture::databases(
        "rls",
        &format!(
            "CREATE TABLE notes (id int PRIMARY KEY, owner text);
             ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
             CREATE POLICY alice ON notes USING (owner = 'alice');
             {}",
            common::plain_role("tandem_rls", "rls", &["notes"])
        ),
    )
    .await;
    m.batch_execute("INSERT INTO notes VALUES (1, 'alice'), (2, 'bob')")
        .await
        .unwrap();
    let text = common::connect_as(
        &Fixture::config_text("rls", r#"tables = ["public.notes"]"#),
        "tandem_rls",
        &["mobile"],
    );
    let path = write_config("rls", &text);
    // The owner is not subject to its table's policies unless they are forced on it.
    let fx = Fixture::with_config("rls", d, m, text).await;
    fx.m.batch_execute("ALTER TABLE notes FORCE ROW LEVEL SECURITY")
        .await
        .unwrap();
    let want = "mobile: row-level security applies to role tandem_rls on public.notes: its \
                policies would hide rows from tandem's reads and refuse rows it writes, and the \
                sides would differ unnoticed; connect as a role that bypasses it (`ALTER ROLE \
                tandem_rls BYPASSRLS`), or as the owner of the table without FORCE ROW LEVEL \
                SECURITY";
    // Before: the snapshot copied only alice's row to desktop, and verify found the sides equal.
    let e = fx.refused().await;
    assert!(e.contains(want), "{e}");
    assert_eq!(Fixture::rows(&fx.d, "notes").await, Vec::<String>::new());
    let (code, _, err) = run_tandem(&["--config", &path, "verify"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(want), "{err}");
    for args in [
        &["snapshot", "--seed", "mobile"][..],
        &["repair", "--source", "mobile"],
    ] {
        let (code, _, err) = run_tandem(&[&["--config", &path][..], args].concat(), &[]);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(Fixture::rows(&fx.d, "notes").await, Vec::<String>::new());
    let (code, _, err) = run_tandem(&["--config", &path, "teardown"], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_tandem(&["--config", &path, "setup"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(want), "{err}");
    assert_nothing_left("rls").await;
}

/// Rules (`CREATE RULE`) on a table tandem writes: PostgreSQL refuses `INSERT … ON CONFLICT` on
/// a table with an UPDATE rule or an INSERT rule that fires, so `run` stopped at the table's
/// first row. Refused by `setup`, `run` and `snapshot`, naming the rule and the fix; a rule that
/// does not fire for tandem's writes (an ordinary one, under `session_replication_role =
/// replica`) is left alone, and does not fire for replicated rows, as in native replication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_that_would_refuse_tandems_writes_are_named_before_they_stop_run() {
    let (d, m) = Fixture::databases(
        "rules",
        &format!(
            "CREATE TABLE items (id int PRIMARY KEY, qty int);
             CREATE TABLE stock (id int PRIMARY KEY, qty int);
             CREATE TABLE items_log (op text, id int);
             CREATE RULE items_ins AS ON INSERT TO items
                 DO ALSO INSERT INTO items_log VALUES ('I', NEW.id);
             {}",
            common::plain_role("tandem_rules", "rules", &["items", "stock", "items_log"])
        ),
    )
    .await;
    m.batch_execute(
        "CREATE RULE stock_upd AS ON UPDATE TO stock DO ALSO INSERT INTO items_log VALUES ('U', NEW.id);
         ALTER TABLE stock DISABLE RULE stock_upd;
         CREATE RULE keep AS ON DELETE TO items DO INSTEAD NOTHING;
         ALTER TABLE items ENABLE ALWAYS RULE items_ins;",
    )
    .await
    .unwrap();
    // Desktop as a superuser (its INSERT rule does not fire for tandem's writes), mobile as a
    // role that may not set session_replication_role (its INSERT rule would).
    let text = common::connect_as(
        &Fixture::config_text("rules", r#"tables = ["public.items", "public.stock"]"#),
        "tandem_rules",
        &["mobile"],
    );
    let path = write_config("rules", &text);
    let (code, out, err) = run_tandem(&["--config", &path, "setup"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let update_rule = "mobile: rule stock_upd on public.stock is an UPDATE rule, and PostgreSQL \
                       refuses INSERT … ON CONFLICT, which tandem applies rows with, on a table \
                       with one (even disabled); replace it with a trigger or drop it";
    assert!(err.contains(update_rule), "{err}");
    // An ordinary rule would not fire if the role could set session_replication_role; one
    // that fires ALWAYS would.
    for want in [
        "mobile: rule items_ins on public.items is an INSERT rule that fires for tandem's writes, \
         and PostgreSQL refuses INSERT … ON CONFLICT, which tandem applies rows with, on a table \
         with one; replace it with a trigger or drop it\n",
        "mobile: rule keep on public.items is a DELETE rule that fires for tandem's writes: it \
         rewrites the deletes tandem applies, and PostgreSQL refuses the statement tandem changes \
         a key with on a table with one; replace it with a trigger or drop it, or let tandem's \
         role set session_replication_role (as a superuser, `GRANT SET ON PARAMETER \
         session_replication_role TO` the role), under which an ordinary rule does not fire for \
         replicated rows",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(!err.contains("desktop: rule"), "{err}");
    assert_nothing_left("rules").await;

    m.batch_execute(
        "DROP RULE stock_upd ON stock; DROP RULE keep ON items; DROP RULE items_ins ON items",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config("rules", d, m, text).await;
    let run = fx.start().await;
    fx.m.batch_execute("INSERT INTO items VALUES (1, 5); INSERT INTO stock VALUES (1, 7)")
        .await
        .unwrap();
    common::wait_count(30, &fx.d, "SELECT count(*) FROM stock", 1).await;
    fx.d.batch_execute("INSERT INTO items VALUES (2, 6); UPDATE stock SET qty = 8 WHERE id = 1")
        .await
        .unwrap();
    fx.wait_equal("items", 30).await;
    fx.wait_equal("stock", 30).await;
    assert_eq!(Fixture::rows(&fx.m, "items").await, ["(1,5)", "(2,6)"]);
    assert_eq!(Fixture::rows(&fx.d, "stock").await, ["(1,8)"]);
    // Desktop's rule fired for its application's row, not for the one tandem applied.
    assert_eq!(Fixture::rows(&fx.d, "items_log").await, ["(I,2)"]);
    // One made while run runs stops it at the table's next row, naming the way out.
    fx.m.batch_execute("CREATE RULE late AS ON UPDATE TO stock DO ALSO NOTHING")
        .await
        .unwrap();
    fx.d.batch_execute("INSERT INTO stock VALUES (2, 1)")
        .await
        .unwrap();
    let e = run.failure().await;
    assert!(
        e.contains(
            "Upsert rows to mobile.public.stock: a rule on the table stands in the way of \
             tandem's writes; replace it with a trigger or drop it (`tandem setup` names it)"
        ),
        "{e}"
    );
    fx.m.batch_execute("DROP RULE late ON stock").await.unwrap();

    // A rule made on desktop since, which fires under session_replication_role = replica too.
    fx.d.batch_execute("ALTER TABLE items ENABLE ALWAYS RULE items_ins")
        .await
        .unwrap();
    let always = "desktop: rule items_ins on public.items is an INSERT rule that fires for \
                  tandem's writes, and PostgreSQL refuses INSERT … ON CONFLICT, which tandem \
                  applies rows with, on a table with one; replace it with a trigger or drop it";
    let e = fx.refused().await;
    assert!(e.ends_with(always), "{e}");
    let (code, _, err) = run_tandem(&["--config", &path, "snapshot", "--seed", "mobile"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(always), "{err}");
}

/// Both URLs reaching one database, by two names for its host, is refused by `setup` and by
/// `run` (a config changed after `setup`), naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_database_on_both_sides_is_refused() {
    let (d, m) = Fixture::databases("samedb", T).await;
    let desktop = clusters().desktop.url("samedb");
    let same = desktop.replacen("127.0.0.1", "localhost", 1);
    let text = Fixture::config_text("samedb", r#"tables = ["public.jobs"]"#);
    let want = |url: &str| {
        format!(
            "desktop (postgres@127.0.0.1:{0}/samedb) and mobile (postgres@{url}:{0}/samedb) are \
             the same database; point one of the URLs at the other side's database",
            clusters().desktop.port
        )
    };
    let pointed = text.replacen(&clusters().mobile.url("samedb"), &same, 1);
    assert!(pointed.contains(&same), "{pointed}");
    let (code, _, err) = run_tandem(
        &["--config", &write_config("samedb", &pointed), "setup"],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&want("localhost")), "{err}");
    assert_nothing_left("samedb").await;
    // Set up as two databases, then the config's mobile URL copied from desktop's line.
    let _fx = Fixture::with_config("samedb", d, m, text.clone()).await;
    let pointed = text.replacen(&clusters().mobile.url("samedb"), &desktop, 1);
    // Before: it waited for itself, taken for another `run` of these databases.
    let (code, _, err) =
        common::run_tandem_within(60, &["--config", &write_config("samedb", &pointed), "run"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&want("127.0.0.1")), "{err}");
}

/// An unlogged table writes no WAL: a pattern leaves it out with a warning (before: setup
/// failed creating the publication, with PostgreSQL's "cannot add relation"), and one named in
/// the config is refused with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlogged_table_is_left_out_by_a_pattern_and_refused_by_name() {
    let (d, _m) = Fixture::databases(
        "unlogged",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, title text);
         CREATE UNLOGGED TABLE cache (id int PRIMARY KEY);",
    )
    .await;
    let text = Fixture::config_text("unlogged", r#"tables = ["public.*"]"#);
    let path = write_config("unlogged", &text);
    let (code, out, err) = run_tandem(&["--config", &path, "setup"], &[]);
    assert_eq!(code, 0, "{err}");
    for side in ["desktop", "mobile"] {
        let want = format!(
            "warning: {side}: table public.cache is UNLOGGED, so the pattern public.* leaves it \
             out (its changes are not written to the WAL); `ALTER TABLE \"public\".\"cache\" SET \
             LOGGED` and `tandem setup` to sync it"
        );
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(
        Fixture::count(
            &d,
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'unlogged_d'"
        )
        .await,
        1
    );
    let (code, _, err) = run_tandem(&["--config", &path, "teardown"], &[]);
    assert_eq!(code, 0, "{err}");
    let text = Fixture::config_text("unlogged", r#"tables = ["public.jobs", "public.cache"]"#);
    let (code, _, err) = run_tandem(
        &["--config", &write_config("unlogged", &text), "setup"],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    for side in ["desktop", "mobile"] {
        let want = format!(
            "{side}: table public.cache is UNLOGGED, so its changes are not written to the WAL and \
             logical replication cannot send them; run `ALTER TABLE \"public\".\"cache\" SET \
             LOGGED`, or remove it from [replication] tables"
        );
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    assert_nothing_left("unlogged").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_key_names_the_nearest_valid_one() {
    let text = Fixture::config_text("cfgkey", r#"tabels = ["public.jobs"]"#);
    let (code, _, err) = run_tandem(&["--config", &write_config("cfgkey", &text), "setup"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown key `replication.tabels`; did you mean `tables`?"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_while_creating_rolls_back_what_this_setup_created() {
    let (_d, m) = Fixture::databases("rollback", T).await;
    // Mobile's slot name is taken by a slot of another database: detected only when creating,
    // after desktop's publication and slot already exist.
    let admin = connect(&clusters().mobile.url("postgres")).await;
    admin
        .batch_execute(
            "SELECT pg_drop_replication_slot('rollback_m') FROM pg_replication_slots WHERE slot_name = 'rollback_m';
             SELECT pg_create_logical_replication_slot('rollback_m', 'pgoutput');",
        )
        .await
        .unwrap();
    let text = Fixture::config_text("rollback", r#"tables = ["public.jobs"]"#);
    let (code, _, err) = run_tandem(
        &["--config", &write_config("rollback", &text), "setup"],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("mobile: a replication slot named rollback_m already exists for postgres"),
        "{err}"
    );
    admin
        .batch_execute("SELECT pg_drop_replication_slot('rollback_m')")
        .await
        .unwrap();
    assert_nothing_left("rollback").await;
    drop(m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_twice_is_harmless_and_teardown_leaves_nothing_keeping_wal() {
    let fx = Fixture::new("twice", T, r#"tables = ["public.jobs"]"#).await;
    let cp =
        "SELECT string_agg(direction || lsn::text, ',' ORDER BY direction) FROM tandem.checkpoints";
    let before: String = fx.d.query_one(cp, &[]).await.unwrap().get(0);
    let (code, out, err) = run_tandem(
        &["--config", fx.config_path.to_str().unwrap(), "setup"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("setup complete") && !out.contains("created replication slot"),
        "{out}"
    );
    let after: String = fx.d.query_one(cp, &[]).await.unwrap().get(0);
    assert_eq!(before, after, "a second setup must not move the checkpoint");
    assert_eq!(
        leftovers(&fx.d, "twice").await,
        vec!["slot twice_d", "publication twice_d"]
    );

    let (code, out, err) = run_tandem(
        &["--config", fx.config_path.to_str().unwrap(), "teardown"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("desktop: dropped replication slot twice_d"),
        "{out}"
    );
    assert_nothing_left("twice").await;
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'tandem'"
        )
        .await,
        1
    );
    let (code, _, err) = run_tandem(
        &[
            "--config",
            fx.config_path.to_str().unwrap(),
            "teardown",
            "--purge",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'tandem'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_to_start_when_the_slot_was_advanced_past_the_checkpoint() {
    let fx = Fixture::new("gap", T, r#"tables = ["public.jobs"]"#).await;
    // Someone else consumes desktop's slot: changes tandem never saw are confirmed away.
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, 'lost')")
        .await
        .unwrap();
    fx.d.batch_execute("SELECT pg_replication_slot_advance('gap_d', pg_current_wal_lsn())")
        .await
        .unwrap();
    let (code, _, err) = run_tandem(&["--config", fx.config_path.to_str().unwrap(), "run"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("desktop: slot gap_d has confirmed up to"),
        "{err}"
    );
    assert!(err.contains("past tandem's checkpoint"), "{err}");
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await,
        0,
        "nothing applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_against_an_older_control_schema_says_to_run_setup_and_setup_updates_it() {
    let fx = Fixture::new("oldschema", T, r#"tables = ["public.jobs"]"#).await;
    let latest = tandem::ops::setup::MIGRATIONS.last().unwrap().0;
    // As a control schema made by the tandem before the latest migration left it.
    fx.m.execute(
        "DELETE FROM tandem.schema_migrations WHERE version = $1",
        &[&latest],
    )
    .await
    .unwrap();
    let cfg = fx.config_path.to_str().unwrap();
    let (code, _, err) = run_tandem(&["--config", cfg, "run"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "mobile: the tandem control schema is at version {}, this tandem needs {latest}: run `tandem setup`",
            latest - 1
        )),
        "{err}"
    );
    let (code, _, err) = run_tandem(&["--config", cfg, "setup"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT max(version)::bigint FROM tandem.schema_migrations"
        )
        .await,
        latest as i64
    );
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, 'after setup')")
        .await
        .unwrap();
    common::wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 1).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_with_one_side_unreachable_shows_the_other_and_exits_1_in_text_and_json() {
    let fx = Fixture::new("status_down", T, r#"tables = ["public.jobs"]"#).await;
    let cfg = fx.config_path.to_str().unwrap();
    let (code, out, err) = run_tandem(&["--config", cfg, "status"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("D>M (desktop → mobile): checkpoint "), "{out}");
    let json = |out: &str| -> serde_json::Value {
        serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: not JSON: {out}"))
    };
    let (code, out, err) = run_tandem(&["--config", cfg, "status", "--json"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let v = json(&out);
    let checkpoint: String =
        fx.m.query_one(
            "SELECT lsn::text FROM tandem.checkpoints WHERE direction = 'D>M'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let dm = &v["directions"][0];
    assert_eq!(v["run"], "not running", "{v}");
    assert_eq!(dm["direction"], "D>M", "{v}");
    assert_eq!(dm["source"], "desktop", "{v}");
    assert_eq!(dm["checkpoint"], checkpoint.as_str(), "{v}");
    assert_eq!(dm["slot"]["name"], "status_down_d", "{v}");
    assert_eq!(dm["slot"]["exists"], true, "{v}");
    assert!(
        dm["slot"]["behind_bytes"].as_i64().is_some_and(|b| b >= 0),
        "{v}"
    );
    assert!(
        dm["refusal"].is_null() && dm["paused"] == serde_json::json!([]),
        "{v}"
    );
    assert_eq!(v["directions"][1]["direction"], "M>D", "{v}");
    // Mobile is down: what desktop holds still shows, and the exit says something is wrong.
    let down = [(
        "TANDEM_MOBILE_URL",
        "postgresql://postgres@127.0.0.1:1/status_down",
    )];
    let (code, out, err) = run_tandem(&["--config", cfg, "status"], &down);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("D>M (desktop → mobile): checkpoint unknown (mobile unreachable) on mobile; slot status_down_d confirmed "),
        "{out}"
    );
    assert!(
        out.contains("M>D (mobile → desktop): checkpoint ")
            && out.contains("on desktop; slot status_down_m unknown (mobile unreachable)"),
        "{out}"
    );
    assert!(err.contains("mobile: cannot reach"), "{err}");
    let (code, out, err) = run_tandem(&["--config", cfg, "status", "--json"], &down);
    assert_eq!(code, 1, "{out}{err}");
    let v = json(&out);
    let (dm, md) = (&v["directions"][0], &v["directions"][1]);
    assert!(
        dm["target_reachable"] == false
            && dm["checkpoint"].is_null()
            && dm["slot"]["exists"] == true,
        "{v}"
    );
    assert!(
        md["source_reachable"] == false
            && md["slot"]["exists"].is_null()
            && md["checkpoint"].is_string(),
        "{v}"
    );
    assert!(err.contains("mobile: cannot reach"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_for_log_collectors() {
    use std::io::{BufRead, BufReader};
    let fx = Fixture::new("json_logs", T, r#"tables = ["public.jobs"]"#).await;
    let mut child = std::process::Command::new(common::tandem_bin())
        .args(["--config", fx.config_path.to_str().unwrap(), "run"])
        .env("TANDEM_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut streaming = None;
    for line in lines {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}"));
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        if message.starts_with("streaming desktop → mobile") {
            streaming = Some(v);
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let v = streaming.expect("a streaming line");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["source"], "desktop");
    assert!(
        v["timestamp"].is_string() && v["target"] == "tandem::sync",
        "{v}"
    );
}

/// Lines a child writes to stderr, collected as they come.
fn collect_stderr(child: &mut std::process::Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::io::{BufRead, BufReader};
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (lines, into) = (BufReader::new(child.stderr.take().unwrap()), text.clone());
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            let mut t = into.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
        }
    });
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_waits_for_the_first_and_takes_over_when_it_stops() {
    let fx = Fixture::new("second_run", T, r#"tables = ["public.jobs"]"#).await;
    let cfg = fx.config_path.to_str().unwrap();
    let spawn = || {
        std::process::Command::new(common::tandem_bin())
            .args(["--config", cfg, "run"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    let first_log = collect_stderr(&mut first);
    let streams = |log: &std::sync::Arc<std::sync::Mutex<String>>| {
        let l = log.lock().unwrap();
        l.contains("streaming desktop → mobile") && l.contains("streaming mobile → desktop")
    };
    common::wait_for(60, "the first run streams", || async {
        streams(&first_log)
    })
    .await;

    let mut second = spawn();
    let second_log = collect_stderr(&mut second);
    // It names the run it waits for: the process, by host and pid.
    let holder = format!(":{}, server process ", first.id());
    common::wait_for(30, "the second run says it waits", || async {
        second_log.lock().unwrap().contains(&holder)
    })
    .await;
    fx.d.execute("INSERT INTO jobs VALUES (1, 'by the first run')", &[])
        .await
        .unwrap();
    common::wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 1).await;
    assert!(!streams(&second_log), "{}", second_log.lock().unwrap());
    assert!(second.try_wait().unwrap().is_none(), "the second run ended");

    // Who runs is in `status`, and commands that need the databases to themselves refuse.
    let (code, out, err) = run_tandem(&["--config", cfg, "status"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("run: running (tandem run ") && out.contains(&holder),
        "{out}"
    );
    for (command, rest) in [
        ("snapshot", &["--seed", "desktop"][..]),
        ("teardown", &[][..]),
    ] {
        let mut args = vec!["--config", cfg, command];
        args.extend(rest);
        let (code, out, err) = run_tandem(&args, &[]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains("a `tandem run` is running for these databases (tandem run ")
                && err.contains(&format!("stop it before `tandem {command}`")),
            "{err}"
        );
    }
    assert_eq!(common::leftovers(&fx.d, "second_run").await.len(), 2);

    // The first stops: the second starts from where it left off, with no gap reported.
    assert!(common::sigterm_and_wait(&mut first).success());
    common::wait_for(60, "the second run streams", || async {
        streams(&second_log)
    })
    .await;
    fx.m.execute("INSERT INTO jobs VALUES (2, 'by the second run')", &[])
        .await
        .unwrap();
    fx.d.execute("UPDATE jobs SET title = 'updated' WHERE id = 1", &[])
        .await
        .unwrap();
    common::wait_count(30, &fx.d, "SELECT count(*) FROM jobs", 2).await;
    common::wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM jobs WHERE title = 'updated'",
        1,
    )
    .await;
    assert!(common::sigterm_and_wait(&mut second).success());
    let log = second_log.lock().unwrap().clone();
    assert!(
        !log.contains("ERROR") && !log.contains("confirmed up to"),
        "{log}"
    );
    let (_, out, _) = run_tandem(&["--config", cfg, "status"], &[]);
    assert!(out.starts_with("run: not running\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_lock_another_took_while_its_connection_was_gone_stops() {
    let fx = Fixture::new("lock_taken", T, r#"tables = ["public.jobs"]"#).await;
    let run = fx.start().await;
    let held = "FROM pg_locks WHERE locktype = 'advisory' AND database = \
                (SELECT oid FROM pg_database WHERE datname = current_database())";
    let holder: i32 =
        fx.d.query_one(&format!("SELECT pid {held} AND granted"), &[])
            .await
            .unwrap()
            .get(0);
    // Another session queues for the same lock, so it has it the moment `run`'s connection
    // goes: before `run` could take it again.
    let other = connect(&clusters().desktop.url("lock_taken")).await;
    let sql = format!("SELECT pg_advisory_lock(classid::int8::int4, objid::int8::int4) {held}");
    let taker = tokio::spawn(async move {
        other.execute(&sql, &[]).await.unwrap();
        other
    });
    common::wait_count(
        10,
        &fx.d,
        &format!("SELECT count(*) {held} AND NOT granted"),
        1,
    )
    .await;
    fx.d.execute("SELECT pg_terminate_backend($1)", &[&holder])
        .await
        .unwrap();
    let other = tokio::time::timeout(std::time::Duration::from_secs(10), taker)
        .await
        .expect("the lock went to the waiting session")
        .unwrap();
    let e = tokio::time::timeout(std::time::Duration::from_secs(10), run.outcome())
        .await
        .expect("run stops")
        .unwrap_err();
    assert!(
        format!("{e:#}").contains(
            "desktop: while desktop was unreachable another `tandem run` started for these \
             databases (a session, server process"
        ),
        "{e:#}"
    );
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_gone_missing_is_never_papered_over_by_setup() {
    let fx = Fixture::new("slot_gone", T, r#"tables = ["public.jobs"]"#).await;
    let cfg = fx.config_path.to_str().unwrap();
    let run = fx.start().await;
    fx.d.execute("INSERT INTO jobs VALUES (1, 'streamed')", &[])
        .await
        .unwrap();
    common::wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 1).await;
    run.stop().await;
    // The walsender lets go of the slot as it exits, a moment after run's connection closed.
    common::wait_slot_active(&fx.d, "slot_gone_d", false).await;
    // The slot goes (dropped by hand, or a failover to a server that never had it), and
    // desktop writes on.
    fx.d.batch_execute(
        "SELECT pg_drop_replication_slot('slot_gone_d'); \
         INSERT INTO jobs VALUES (2, 'while the slot was missing')",
    )
    .await
    .unwrap();
    let (_, out, _) = run_tandem(&["--config", cfg, "status"], &[]);
    assert!(
        out.contains(
            "slot slot_gone_d MISSING: what desktop wrote after the checkpoint cannot be streamed"
        ),
        "{out}"
    );
    let (code, out, err) = run_tandem(&["--config", cfg, "run"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("desktop: replication slot slot_gone_d does not exist")
            && err.contains("mobile holds tandem's checkpoint ")
            && err.contains("`tandem repair --source desktop`"),
        "{err}"
    );
    // setup makes a new slot, and says the changes before it are the user's to bring over.
    let (code, out, err) = run_tandem(&["--config", cfg, "setup"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("WARNING desktop: slot slot_gone_d was created again, but mobile held")
            && out.contains("`tandem repair --source desktop`"),
        "{out}"
    );
    // Indeed: streaming carries on from the new slot only; verify and repair close the gap.
    let run = fx.start().await;
    fx.d.execute("INSERT INTO jobs VALUES (3, 'after the new slot')", &[])
        .await
        .unwrap();
    common::wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id = 3", 1).await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM jobs WHERE id = 2").await,
        0
    );
    let (code, out, err) = run_tandem(&["--config", cfg, "verify"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("1 only desktop") && out.contains(r#"only desktop: {"id":2}"#),
        "{out}"
    );
    common::repair_from_desktop(cfg);
    fx.wait_equal("jobs", 30).await;
    // A second setup has nothing to warn about.
    let (code, out, err) = run_tandem(&["--config", cfg, "setup"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("WARNING"), "{out}");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_and_text_columns_of_different_widths_replicate_with_a_warning() {
    let schema = "CREATE TYPE mood AS ENUM ('sad', 'ok'); CREATE TYPE pt AS (x int, y int);
                  CREATE TABLE parts (id int PRIMARY KEY, name varchar(10), n int, m mood, ms mood[], p pt)";
    let (d, m) = Fixture::databases("widths", schema).await;
    m.batch_execute(
        "ALTER TABLE parts ALTER id TYPE bigint, ALTER name TYPE text, ALTER n TYPE bigint;
         ALTER TYPE mood ADD VALUE 'meh'",
    )
    .await
    .unwrap();
    d.batch_execute("ALTER TYPE mood ADD VALUE 'happy'; ALTER TYPE mood ADD VALUE 'glad'")
        .await
        .unwrap();
    let text = Fixture::config_text("widths", r#"tables = ["public.parts"]"#);
    let fx = Fixture::with_config("widths", d, m, text).await;
    let cfg = fx.config_path.to_str().unwrap();
    // The narrower side is named for each column, with what may happen.
    let (code, out, err) = run_tandem(&["--config", cfg, "setup"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    for (col, d_type, m_type) in [
        ("id", "integer", "bigint"),
        ("name", "character varying(10)", "text"),
        ("n", "integer", "bigint"),
    ] {
        assert!(
            out.contains(&format!(
                "warning: table public.parts: column `{col}` is {d_type} on desktop and {m_type} \
                 on mobile: a value from mobile that {d_type} cannot hold is refused by desktop"
            )),
            "{out}"
        );
    }
    // An enum lacking labels the other side's has, each way and for an array of it too.
    for want in [
        "warning: table public.parts: column `m`'s enum type has 'happy', 'glad' on desktop but \
         not on mobile: a row from desktop holding one is refused by mobile and stops `run` \
         naming its transaction; add them on mobile (`ALTER TYPE mood ADD VALUE 'happy'; ALTER \
         TYPE mood ADD VALUE 'glad'`)",
        "warning: table public.parts: column `m`'s enum type has 'meh' on mobile but not on desktop",
        "warning: table public.parts: column `ms`'s enum type has 'happy', 'glad' on desktop",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    // Other pairs are still refused, and so is a column generated on one side only, whatever
    // its types.
    // A composite type of one name with its attributes in another order (a value crosses by
    // position: before, mobile's city held desktop's street, and verify found them equal), here
    // in an array, held by another composite.
    fx.m.batch_execute(
        "ALTER TABLE parts ADD COLUMN at timestamptz, ADD COLUMN twice bigint;
         CREATE TYPE addr AS (city text, street text); CREATE TYPE site AS (a addr[], p pt);
         ALTER TABLE parts ADD COLUMN s site",
    )
    .await
    .unwrap();
    fx.d.batch_execute(
        "ALTER TABLE parts ADD COLUMN at timestamp, \
         ADD COLUMN twice int GENERATED ALWAYS AS (n * 2) STORED;
         CREATE TYPE addr AS (street text, city text); CREATE TYPE site AS (a addr[], p pt);
         ALTER TABLE parts ADD COLUMN s site",
    )
    .await
    .unwrap();
    let (code, out, err) = run_tandem(&["--config", cfg, "setup"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("column `at` is timestamp without time zone on desktop but timestamp with time zone on mobile"),
        "{err}"
    );
    assert!(
        err.contains("column `twice` is generated on desktop but not on mobile"),
        "{err}"
    );
    assert!(
        err.contains(
            "table public.parts: column `s`'s composite type is site (a addr[], p pt), holding \
             addr (street text, city text), holding pt (x integer, y integer) on desktop but site \
             (a addr[], p pt), holding addr (city text, street text), holding pt (x integer, y \
             integer) on mobile, and a composite value crosses field by field in order; make the \
             types' attributes the same, in the same order"
        ),
        "{err}"
    );
    assert!(!err.contains("column `p`"), "{err}");
    for c in [&fx.m, &fx.d] {
        c.batch_execute("ALTER TABLE parts DROP COLUMN at, DROP COLUMN twice, DROP COLUMN s")
            .await
            .unwrap();
    }

    let mut run = fx.start().await;
    fx.d.batch_execute("INSERT INTO parts VALUES (1, 'bolt', 5, 'ok', '{sad,ok}', '(1,2)')")
        .await
        .unwrap();
    fx.m.batch_execute("INSERT INTO parts VALUES (2, 'nut', 7, 'sad')")
        .await
        .unwrap();
    common::wait_count(30, &fx.m, "SELECT count(*) FROM parts", 2).await;
    common::wait_count(30, &fx.d, "SELECT count(*) FROM parts", 2).await;
    let (code, out, err) = run_tandem(&["--config", cfg, "verify"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    fx.m.batch_execute("INSERT INTO parts VALUES (4, 'pin', 9)")
        .await
        .unwrap();
    common::wait_count(30, &fx.d, "SELECT count(*) FROM parts WHERE id = 4", 1).await;
    // A value desktop's column cannot hold is a refusal naming its transaction, which `tandem
    // skip` gets past: an integer out of range (before: retried for ever as a lost connection),
    // and a text too long for its varchar(10), inserted or updated to (before: desktop took its
    // first ten characters unsaid).
    for (sql, refusal) in [
        (
            "INSERT INTO parts VALUES (3, 'washer', 5000000000)",
            "value 5000000000 is out of range for type integer",
        ),
        (
            "INSERT INTO parts VALUES (5, 'hex-socket-bolt', 1)",
            "value too long for type character varying(10)",
        ),
        (
            "UPDATE parts SET name = 'taper-pin-long' WHERE id = 4",
            "value too long for type character varying(10)",
        ),
    ] {
        fx.m.batch_execute(sql).await.unwrap();
        let (e, lsn) = common::rejected(run).await;
        assert!(e.contains(refusal), "{e}");
        let (code, out, err) = run_tandem(
            &["--config", cfg, "skip", "--from", "mobile", "--lsn", &lsn],
            &[],
        );
        assert_eq!(code, 0, "{out}{err}");
        run = fx.start().await;
    }
    fx.m.batch_execute("INSERT INTO parts VALUES (6, 'nut', 1)")
        .await
        .unwrap();
    common::wait_count(30, &fx.d, "SELECT count(*) FROM parts WHERE id = 6", 1).await;
    // Neither the rows nor the update, cut short or whole.
    assert_eq!(
        Fixture::rows(&fx.d, "parts").await[2..],
        ["(4,pin,9,,,)", "(6,nut,1,,,)"]
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_off_from_its_sessions_takes_its_lock_back_from_its_own_lost_one() {
    let (d, m) = Fixture::databases("lock_lost", T).await;
    let p = clusters();
    let proxy = common::Proxy::start(p.desktop.port).await;
    let text = proxy.route(
        &Fixture::config_text("lock_lost", r#"tables = ["public.jobs"]"#),
        "lock_lost",
    );
    let fx = Fixture::with_config("lock_lost", d, m, text).await;
    let run = fx.start().await;
    let lock_pid = || async {
        fx.d.query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = \
             (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get::<_, i32>(0))
    };
    let before = lock_pid().await.expect("run holds its lock");
    // The network drops every connection to desktop: tandem sees them closed, while desktop
    // keeps their sessions, the lock's among them, as it does until its keepalives notice.
    proxy.cut_clients();
    common::wait_for(30, "the lock held by a new session of run's", || async {
        lock_pid().await.is_some_and(|pid| pid != before)
    })
    .await;
    assert!(
        !run.is_finished(),
        "run stopped, taking its own lost session for another run"
    );
    fx.d.execute("INSERT INTO jobs VALUES (1, 'after the cut')", &[])
        .await
        .unwrap();
    fx.m.execute("INSERT INTO jobs VALUES (2, 'after the cut too')", &[])
        .await
        .unwrap();
    common::wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 2).await;
    common::wait_count(30, &fx.d, "SELECT count(*) FROM jobs", 2).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_session_an_earlier_run_left_inside_a_transaction_is_ended() {
    let fx = Fixture::new("leftover", T, r#"tables = ["public.jobs"]"#).await;
    // What an earlier `run` leaves on mobile when the network went before it was killed: its
    // apply session, inside a transaction holding a row (the key desktop is about to insert).
    let key = tandem::lease::pair_key(&fx.cfg);
    let left = connect(&clusters().mobile.url("leftover")).await;
    left.batch_execute(&format!(
        "SET application_name = 'tandem apply D>M {key} gone:1'; \
         BEGIN; INSERT INTO jobs VALUES (1, 'uncommitted')"
    ))
    .await
    .unwrap();
    let run = fx.start().await;
    fx.d.execute("INSERT INTO jobs VALUES (1, 'from desktop')", &[])
        .await
        .unwrap();
    common::wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM jobs WHERE title = 'from desktop'",
        1,
    )
    .await;
    assert!(
        left.batch_execute("SELECT 1").await.is_err(),
        "the leftover session was ended"
    );
    run.stop().await;
}

/// A control schema an earlier `setup` made as another role (a superuser, before the config moved
/// to a plain role), and a role that may not create it, are refused naming the side, the owner
/// and the fix; the fix given works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_schema_another_role_owns_is_refused_with_the_fix() {
    let (d, m) = Fixture::databases(
        "ctlowner",
        &format!(
            "{T}\n{}",
            common::plain_role("tandem_owner", "ctlowner", &["jobs"])
        ),
    )
    .await;
    let text = Fixture::config_text("ctlowner", r#"tables = ["public.jobs"]"#);
    // Set up as postgres: the control schema is postgres's on both sides.
    let fx = Fixture::with_config("ctlowner", d, m, text.clone()).await;
    let path = write_config(
        "ctlowner-plain",
        &common::connect_as(&text, "tandem_owner", &["mobile"]),
    );
    let want = "mobile: tandem's control schema `tandem` and publication ctlowner_m there belong \
                to postgres, not to role tandem_owner (an earlier `tandem setup` ran as postgres)";
    // Before: `permission denied for schema tandem`, naming neither side nor fix. `run` changes
    // no publication.
    let run_want = "mobile: tandem's control schema `tandem` there belongs to postgres, not to \
                    role tandem_owner";
    for (command, want) in [("setup", want), ("run", run_want)] {
        let (code, _, err) = common::run_tandem_within(60, &["--config", &path, command]);
        assert_eq!(code, 1, "{command}: {err}");
        assert!(err.contains(want), "{command}: {err}");
    }
    let (_, _, err) = run_tandem(&["--config", &path, "setup"], &[]);
    let fix = err
        .split("give them to tandem_owner: `")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .unwrap_or_else(|| panic!("no fix in: {err}"));
    assert!(
        fix.contains("ALTER TABLE tandem.checkpoints OWNER TO tandem_owner"),
        "{fix}"
    );
    fx.m.batch_execute(fix).await.unwrap();
    // setup (as the plain role on mobile) passes now, and run replicates.
    let plain = Fixture::with_config(
        "ctlowner",
        connect(&clusters().desktop.url("ctlowner")).await,
        connect(&clusters().mobile.url("ctlowner")).await,
        common::connect_as(&text, "tandem_owner", &["mobile"]),
    )
    .await;
    let run = plain.start().await;
    fx.d.batch_execute("INSERT INTO jobs (id, title) VALUES (1, 'a')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    run.stop().await;

    // A role without CREATE on a database tandem's schema is not in yet.
    let (d, m) = Fixture::databases("ctlcreate", T).await;
    m.batch_execute(
        "DO $$ BEGIN CREATE ROLE tandem_nocreate LOGIN REPLICATION PASSWORD 'tandem_nocreate'; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$; \
         ALTER TABLE jobs OWNER TO tandem_nocreate",
    )
    .await
    .unwrap();
    drop((d, m));
    let path = write_config(
        "ctlcreate",
        &common::connect_as(
            &Fixture::config_text("ctlcreate", r#"tables = ["public.jobs"]"#),
            "tandem_nocreate",
            &["mobile"],
        ),
    );
    let (code, _, err) = run_tandem(&["--config", &path, "setup"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "mobile: role tandem_nocreate may not create the control schema and the publication \
             in database ctlcreate; run `GRANT CREATE ON DATABASE \"ctlcreate\" TO \"tandem_nocreate\"`"
        ),
        "{err}"
    );
    assert_nothing_left("ctlcreate").await;
}

/// A second config pairing desktop's database with another mobile database is refused: the
/// control schema there serves the first pair. Before, its `setup` deleted the first pair's
/// checkpoint as a slot's leftover and wrote its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pair_sharing_a_database_is_refused_and_the_first_keeps_its_checkpoint() {
    let fx = Fixture::new("pairone", T, r#"tables = ["public.jobs"]"#).await;
    let checkpoint = || async { Fixture::rows(&fx.d, "tandem.checkpoints").await.join("\n") };
    let before = checkpoint().await;
    assert!(before.contains("pairone_m"), "{before}");
    drop(Fixture::databases("pairtwo", T).await);
    let p = clusters();
    let text = Fixture::config_text("pairtwo", r#"tables = ["public.jobs"]"#)
        .replace(&p.desktop.url("pairtwo"), &p.desktop.url("pairone"));
    let (code, _, err) = run_tandem(&["--config", &write_config("pairtwo", &text), "setup"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "desktop: tandem's control schema there already serves another pair of databases: \
             its checkpoint for mobile's changes is for slot pairone_m of mobile's database \
             pairone, not for slot pairtwo_m of database pairtwo in this config"
        ) && err.contains("`SELECT pg_drop_replication_slot('pairone_m')`"),
        "{err}"
    );
    assert_eq!(checkpoint().await, before);
    assert_nothing_left("pairtwo").await;
    // The first pair replicates as before.
    let run = fx.start().await;
    fx.m.batch_execute("INSERT INTO jobs VALUES (1, 'from mobile')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
}

/// Hub and spoke across servers: a second config pairs desktop's database with a mobile database
/// on another server, under the first pair's mobile slot name. The checkpoint there is the first pair's, taken
/// against another database system; before, `setup` took it over with a warning about a missing
/// slot, and the first pair's `run` then stopped. Refused, unless the operator says mobile moved
/// (`--replaced mobile`), and `run` of the pair left behind names that way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_another_database_system_is_kept_unless_the_source_was_replaced() {
    let fx = Fixture::new("hub", T, r#"tables = ["public.jobs"]"#).await;
    let run = fx.start().await;
    fx.m.batch_execute("INSERT INTO jobs VALUES (1, 'from the first mobile')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
    let checkpoint = || async {
        common::strings(
            &fx.d,
            "SELECT source_system_id || ' ' || slot_name || ' ' || lsn::text \
             FROM tandem.checkpoints WHERE direction = 'M>D'",
        )
        .await
    };
    let before = checkpoint().await;
    // The second mobile: a database on desktop's server, another database system than mobile's.
    let (spoke, _) = Fixture::databases("spoke", T).await;
    let p = clusters();
    // Desktop's slot and publication of its own: sharing hub_d, the second pair's stream would
    // move the first pair's slot (the first pair's run then refuses that gap instead).
    let text = std::fs::read_to_string(&fx.config_path)
        .unwrap()
        .replace(&p.mobile.url("hub"), &p.desktop.url("spoke"))
        .replace("\"hub_d\"", "\"spoke_d\"");
    let cfg2 = write_config("spoke", &text);
    let (code, out, err) = run_tandem(&["--config", &cfg2, "setup"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(
            "desktop: tandem's control schema there holds the checkpoint of mobile's \
             changes from slot hub_m of database system "
        ) && err.contains("`tandem setup --replaced mobile`"),
        "{err}"
    );
    assert_eq!(checkpoint().await, before);
    let slots = common::strings(
        &fx.d,
        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'hub%' ORDER BY 1",
    )
    .await;
    assert_eq!(slots, ["hub_d"], "desktop server's slots");
    let made = common::strings(
        &spoke,
        "SELECT (to_regclass('tandem.checkpoints') IS NOT NULL)::text",
    )
    .await;
    assert_eq!(made, ["false"], "spoke's control schema");
    // Told that mobile moved there, setup takes the checkpoint over, and says what that loses.
    let (code, out, err) = run_tandem(&["--config", &cfg2, "setup", "--replaced", "mobile"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("WARNING mobile: mobile is now database system ")
            && out.contains("`tandem repair --source mobile`"),
        "{out}"
    );
    let after = checkpoint().await;
    assert_ne!(after, before);
    assert!(after[0].contains(" hub_m "), "{after:?}");
    // The first config's run now meets a checkpoint of another system, and names the way out.
    let cfg1 = fx.config_path.to_str().unwrap();
    let (code, out, err) = common::run_tandem_within(60, &["--config", cfg1, "run"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("mobile: this is database system ")
            && err.contains("`tandem setup --replaced mobile`"),
        "{err}"
    );
    let moved =
        Fixture::with_config("spoke", connect(&p.desktop.url("hub")).await, spoke, text).await;
    let run = moved.start().await;
    moved
        .m
        .batch_execute("INSERT INTO jobs VALUES (2, 'from the moved mobile')")
        .await
        .unwrap();
    common::wait_count(30, &moved.d, "SELECT count(*) FROM jobs WHERE id = 2", 1).await;
    run.stop().await;
    for cfg in [&cfg2[..], cfg1] {
        let (code, _, err) = run_tandem(&["--config", cfg, "teardown"], &[]);
        assert_eq!(code, 0, "{err}");
    }
}

/// A slot renamed in the config is renamed on the server: copied at its position, the checkpoint
/// moved with it, the old one dropped. Before, `setup` made a new slot at the current position,
/// dropped the checkpoint (what mobile wrote since was never sent) and left the old slot holding
/// mobile's WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_renamed_in_the_config_is_renamed_on_the_server_and_nothing_is_lost() {
    let fx = Fixture::new("slotrename", T, r#"tables = ["public.jobs"]"#).await;
    let run = fx.start().await;
    fx.m.batch_execute("INSERT INTO jobs VALUES (1, 'streamed')")
        .await
        .unwrap();
    fx.wait_equal("jobs", 30).await;
    run.stop().await;
    // Written while run is stopped: only the slot has it.
    fx.m.batch_execute("INSERT INTO jobs VALUES (2, 'while stopped')")
        .await
        .unwrap();
    let text = std::fs::read_to_string(&fx.config_path)
        .unwrap()
        .replace("slot = \"slotrename_m\"", "slot = \"slotrename_m2\"");
    let path = write_config("slotrename-2", &text);
    let (code, out, err) = run_tandem(&["--config", &path, "setup"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("mobile: renamed replication slot slotrename_m to slotrename_m2"),
        "{out}"
    );
    assert!(!out.contains("WARNING"), "{out}");
    let slots = common::strings(
        &fx.m,
        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'slotrename%' \
         ORDER BY 1",
    )
    .await;
    assert_eq!(slots, ["slotrename_m2"], "mobile's slots");
    let renamed = Fixture::with_config(
        "slotrename",
        connect(&clusters().desktop.url("slotrename")).await,
        connect(&clusters().mobile.url("slotrename")).await,
        text,
    )
    .await;
    let run = renamed.start().await;
    renamed.wait_equal("jobs", 30).await;
    assert_eq!(
        Fixture::count(&renamed.d, "SELECT count(*) FROM jobs").await,
        2
    );
    run.stop().await;
    let (code, _, err) = run_tandem(&["--config", &path, "teardown"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_nothing_left("slotrename").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_identity_index_without_the_key_is_refused_and_changes_logged_under_it_named() {
    // `REPLICA IDENTITY USING INDEX` on a unique column beside the primary key: PostgreSQL logs
    // an update's or delete's old row with that index's columns alone, and none at all for an
    // update of the key alone. Before, such an update arrived as a new row (the old one left
    // beside it on the other side) and the next delete stopped `run` with "key column `id` is
    // NULL or missing".
    let (d, m) = Fixture::databases(
        "identidx",
        "CREATE TABLE acct (id int PRIMARY KEY, email text NOT NULL UNIQUE, n int);
         INSERT INTO acct VALUES (1, 'a@x', 0), (2, 'b@x', 0);
         CREATE TABLE visits (id int, region text NOT NULL, email text NOT NULL,
                              PRIMARY KEY (id, region), UNIQUE (email, region))
             PARTITION BY LIST (region);
         CREATE TABLE visits_eu PARTITION OF visits FOR VALUES IN ('eu');",
    )
    .await;
    let using_index = "ALTER TABLE acct REPLICA IDENTITY USING INDEX acct_email_key";
    d.batch_execute(using_index).await.unwrap();
    m.batch_execute(
        "ALTER TABLE visits_eu REPLICA IDENTITY USING INDEX visits_eu_email_region_key",
    )
    .await
    .unwrap();
    let text = Fixture::config_text("identidx", r#"tables = ["public.*"]"#);
    let path = write_config("identidx", &text);
    let (code, _, err) = run_tandem(&["--config", &path, "setup"], &[]);
    assert_eq!(code, 1, "{err}");
    for want in [
        "desktop: table public.acct's replica identity is an index that leaves out its key \
         (id): acct_email_key of public.acct; its updates and deletes would reach the other \
         side without the key, and an update of the key alone as a new row beside the old one. \
         Run `ALTER TABLE … REPLICA IDENTITY DEFAULT` (or FULL) on desktop for public.acct",
        "mobile: table public.visits's replica identity is an index that leaves out its key \
         (id, region): visits_eu_email_region_key of public.visits_eu;",
    ] {
        assert!(err.contains(want), "{want}\n\nnot in:\n{err}");
    }
    assert_nothing_left("identidx").await;

    d.batch_execute("ALTER TABLE acct REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    m.batch_execute("ALTER TABLE visits_eu REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    let fx = Fixture::with_config("identidx", d, m, text).await;
    // Through `tandem ddl`: refused, nothing changed (before, `run` met the next change).
    let (code, _, err) = run_tandem(
        &[
            "--config",
            &path,
            "ddl",
            "--on",
            "desktop",
            &format!("{using_index}; ALTER TABLE acct ADD COLUMN note text"),
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "nothing was changed on either side: desktop: table public.acct's replica \
                      identity is an index that leaves out its key (id)"
        ),
        "{err}"
    );
    assert_eq!(
        common::strings(
            &fx.d,
            "SELECT relreplident::text FROM pg_class WHERE oid = 'acct'::regclass \
             UNION ALL SELECT count(*)::text FROM pg_attribute \
             WHERE attrelid = 'acct'::regclass AND attname = 'note'"
        )
        .await,
        ["d", "0"]
    );
    // Made while tandem was stopped: `run` refuses at its start.
    fx.d.batch_execute(using_index).await.unwrap();
    let e = fx.refused().await;
    assert!(
        e.contains("desktop: table public.acct's replica identity is an index that leaves out"),
        "{e}"
    );
    // Made while it runs: the first change logged so is named, nothing of it applied, with
    // what to do (no fix on mobile helps: the WAL has it without the key).
    fx.d.batch_execute("ALTER TABLE acct REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    let run = fx.start().await;
    fx.d.batch_execute(using_index).await.unwrap();
    fx.d.batch_execute("UPDATE acct SET id = 10 WHERE id = 1")
        .await
        .unwrap();
    let (e, lsn) = common::rejected(run).await;
    for want in [
        "the source's replica identity of public.acct (email) leaves out key column `id`",
        "No change on mobile makes it apply as desktop logged it: leave that one transaction \
         out of mobile",
        "then `tandem repair --source desktop` brings mobile's rows in line",
    ] {
        assert!(e.contains(want), "{want}\n\nnot in:\n{e}");
    }
    assert_eq!(
        Fixture::rows(&fx.m, "acct").await,
        ["(1,a@x,0)", "(2,b@x,0)"]
    );
    // As it says: fixed on desktop, left out, repaired; later changes go by the key again.
    fx.d.batch_execute("ALTER TABLE acct REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    let cfg = fx.config_path.to_str().unwrap();
    for args in [
        &["--config", cfg, "skip", "--from", "desktop", "--lsn", &lsn][..],
        &["--config", cfg, "repair", "--source", "desktop"],
    ] {
        let (code, _, err) = run_tandem(args, &[]);
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    let run = fx.start().await;
    fx.d.batch_execute("UPDATE acct SET id = 20 WHERE id = 10; DELETE FROM acct WHERE id = 2")
        .await
        .unwrap();
    fx.wait_equal("acct", 30).await;
    run.stop().await;
    assert_eq!(Fixture::rows(&fx.m, "acct").await, ["(20,a@x,0)"]);
}

/// Logical decoding writes no large object: a column that may name one (`oid`, or a domain over
/// it as the `lo` extension's type is) is pointed out once per table, whichever way it flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_that_may_name_large_objects_are_pointed_out_once() {
    let (_d, _m) = Fixture::databases(
        "lobs",
        "CREATE DOMAIN blob_ref AS oid;
         CREATE TABLE docs (id int PRIMARY KEY, body oid, scan blob_ref, note text);
         CREATE TABLE inbox (id int PRIMARY KEY, photo oid);
         CREATE TABLE plain (id int PRIMARY KEY, note text);",
    )
    .await;
    let text = Fixture::config_text(
        "lobs",
        "tables = [\"public.*\"]\n[replication.direction]\n\"public.inbox\" = \"mobile_to_desktop\"",
    );
    let (code, out, err) = run_tandem(&["--config", &write_config("lobs", &text), "setup"], &[]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("large objects"))
        .collect();
    let said = |column: &str, table: &str, ty: &str| {
        format!(
            "warning: column {column} of public.{table} is of type {ty}: if it holds large \
             objects (`lo_import`, `lo_from_bytea`), their contents do not replicate (logical \
             decoding writes none), only the numbers naming them, which name nothing on the \
             other side (or another object there); keep such contents in a `bytea` column"
        )
    };
    assert_eq!(
        lines,
        [
            said("body", "docs", "oid"),
            said("scan", "docs", "blob_ref"),
            said("photo", "inbox", "oid"),
        ],
        "{out}"
    );
}

/// A URL without a password takes it from libpq's password file (`PGPASSFILE`, or `~/.pgpass`),
/// for the SQL and the replication connections alike, as psql and native subscriptions do.
/// Before, tandem read no such file: "cannot reach … (invalid configuration: password
/// missing); check the host and port, and that the server is running".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_without_a_password_takes_the_password_files() {
    use std::os::unix::fs::PermissionsExt;
    let (d, m) = Fixture::databases(
        "pgpass",
        &format!(
            "{T}{}",
            common::plain_role("tandem_pgpass", "pgpass", &["jobs"])
        ),
    )
    .await;
    let port = clusters().mobile.port;
    let text = Fixture::config_text("pgpass", r#"tables = ["public.jobs"]"#).replacen(
        &format!("postgresql://postgres@127.0.0.1:{port}/"),
        &format!("postgresql://tandem_pgpass@127.0.0.1:{port}/"),
        1,
    );
    let path = write_config("pgpass", &text);
    let file = common::scratch().join("tandem-pgpass");
    let file_s = file.to_str().unwrap().to_string();
    let setup = |mode: Option<u32>, contents: &str| {
        std::fs::write(&file, contents).unwrap();
        std::fs::set_permissions(
            &file,
            std::fs::Permissions::from_mode(mode.unwrap_or(0o600)),
        )
        .unwrap();
        run_tandem(&["--config", &path, "setup"], &[("PGPASSFILE", &file_s)])
    };
    let (code, _, err) = setup(None, "# nothing for it\n");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "mobile: tandem_pgpass@127.0.0.1:{port}/pgpass asks for a password and none is \
             given: put it in the url (postgresql://user:password@host/db) or in the password \
             file (~/.pgpass, or the file PGPASSFILE names)"
        )),
        "{err}"
    );
    let right = format!("# mobile\n127.0.0.1:{port}:pgpass:tandem_pgpass:tandem_pgpass\n");
    // Readable by others: ignored, as libpq ignores it, and said.
    let (code, out, err) = setup(Some(0o644), &right);
    assert_eq!(code, 1, "{err}");
    assert!(
        format!("{out}{err}").contains(&format!(
            "password file {file_s} is readable by group or others, so it is ignored (as libpq \
             ignores it); run `chmod 0600 {file_s}`"
        )),
        "{out}{err}"
    );
    let (code, _, err) = setup(
        None,
        &format!("# mobile\n127.0.0.1:{port}:pgpass:tandem_pgpass:wr0ng\n{right}"),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "authentication failed for tandem_pgpass@127.0.0.1:{port}/pgpass: password \
             authentication failed for user \"tandem_pgpass\"; the password is from line 2 of \
             {file_s}: check it there"
        )) && !err.contains("wr0ng"),
        "{err}"
    );
    // Another database's line first, then wildcards and an escaped colon in another's.
    let (code, _, err) = setup(
        None,
        &format!(
            "127.0.0.1:{port}:other:tandem_pgpass:nope\n\
             h\\:x:*:*:*:nope\n\
             *:{port}:*:tandem_pgpass:tandem_pgpass\n"
        ),
    );
    assert_eq!(code, 0, "{err}");
    // `run` streams through a replication connection that took it too.
    let mut child = std::process::Command::new(common::tandem_bin())
        .args(["--config", &path, "run"])
        .env("PGPASSFILE", &file_s)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    m.batch_execute("INSERT INTO jobs VALUES (1, 'from mobile')")
        .await
        .unwrap();
    d.batch_execute("INSERT INTO jobs VALUES (2, 'from desktop')")
        .await
        .unwrap();
    common::wait_count(60, &d, "SELECT count(*) FROM jobs", 2).await;
    common::wait_count(60, &m, "SELECT count(*) FROM jobs", 2).await;
    assert!(common::sigterm_and_wait(&mut child).success());
    let (code, _, err) = run_tandem(&["--config", &path, "teardown"], &[("PGPASSFILE", &file_s)]);
    assert_eq!(code, 0, "{err}");
}
