//! `tandem setup`: check both sides completely, report every problem at once, and only then
//! create the control schema, the publications, the slots and the checkpoints.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_postgres::{Client, GenericClient};

use crate::apply::checkpoint::{self, Checkpoint};
use crate::apply::plan::TargetTable;
use crate::catalog;
use crate::config::{quote_ident, Config, Site, TableName};
use crate::db;
use crate::lsn::Lsn;
use crate::side::Side;

/// Everything wrong with the two sides, each with its side, object and fix.
#[derive(Debug)]
pub struct Problems(pub Vec<String>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "setup found {} problem(s); nothing was created:",
            self.0.len()
        )?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// The migrations of the `tandem` schema, in order.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_control_schema.sql")),
    (2, include_str!("../../migrations/0002_snapshots.sql")),
    (3, include_str!("../../migrations/0003_conflicts.sql")),
    (4, include_str!("../../migrations/0004_paused.sql")),
    (5, include_str!("../../migrations/0005_skip.sql")),
    (
        6,
        include_str!("../../migrations/0006_snapshot_position.sql"),
    ),
    (7, include_str!("../../migrations/0007_refusals.sql")),
    (8, include_str!("../../migrations/0008_ddl.sql")),
    (9, include_str!("../../migrations/0009_renamed.sql")),
    (10, include_str!("../../migrations/0010_changed_by_ddl.sql")),
];

/// Tables as both sides have them, after validation.
pub struct Plan {
    pub tables: Vec<TableName>,
    /// Per side, the relations (a table, or a partitioned table's tree; schema-qualified names,
    /// quoted where needed) to switch to `REPLICA IDENTITY FULL` (asked for with the option).
    pub identity_full: Vec<(Side, Vec<String>)>,
    /// Key sequences of tables written on both sides: `(table, column, desktop seq, mobile seq)`.
    pub sequences: Vec<(TableName, String, String, String)>,
    /// Warnings to print with the report.
    pub warnings: Vec<String>,
    /// Decisions to print with the report.
    pub notes: Vec<String>,
}

/// What `setup` may change in the user's schema besides creating its own objects.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Set `REPLICA IDENTITY FULL` on tables whose conflict policy needs old rows.
    pub replica_identity_full: bool,
    /// Make key sequences of two-way tables disjoint: desktop odd, mobile even.
    pub sequences_odd_even: bool,
    /// This side's database now lives on another server (a dump restored into a new cluster):
    /// take over the checkpoint of the one it replaced, which `setup` refuses otherwise.
    pub replaced: Option<Side>,
}

async fn connect_checked(site: &Site, problems: &mut Vec<String>) -> Option<Client> {
    match db::connect(site, "tandem setup").await {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(format!("{e:#}"));
            None
        }
    }
}

async fn check_server(c: &Client, site: &Site, problems: &mut Vec<String>) -> Result<()> {
    let side = site.side;
    let r = c
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int, \
                    (SELECT count(*)::int FROM pg_replication_slots), \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
                    current_setting('max_wal_senders')::int, \
                    (SELECT count(*)::int FROM pg_stat_replication), \
                    r.rolname::text, r.rolsuper, r.rolreplication, \
                    pg_encoding_to_char(d.encoding)::text \
             FROM pg_roles r, pg_database d \
             WHERE r.rolname = current_user AND d.datname = current_database()",
            &[&site.slot],
        )
        .await?;
    let wal_level: String = r.get(0);
    if wal_level != "logical" {
        problems.push(format!(
            "{side}: wal_level is `{wal_level}`; run `ALTER SYSTEM SET wal_level = logical` (or set it in \
             postgresql.conf) and restart the server"
        ));
    }
    let (max_slots, used_slots, ours): (i32, i32, bool) = (r.get(1), r.get(2), r.get(3));
    if !ours && used_slots >= max_slots {
        problems.push(format!(
            "{side}: max_replication_slots is {max_slots} and all {used_slots} are in use; raise it \
             (`ALTER SYSTEM SET max_replication_slots = {}`) and restart",
            max_slots + 2
        ));
    }
    let (max_senders, used_senders): (i32, i32) = (r.get(4), r.get(5));
    if used_senders >= max_senders {
        problems.push(format!(
            "{side}: max_wal_senders is {max_senders} and {used_senders} are in use; raise it \
             (`ALTER SYSTEM SET max_wal_senders = {}`) and restart",
            max_senders + 2
        ));
    }
    let (role, superuser, replication): (String, bool, bool) = (r.get(6), r.get(7), r.get(8));
    if !superuser && !replication {
        problems.push(format!(
            "{side}: role {role} lacks the REPLICATION attribute; run `ALTER ROLE {} REPLICATION` as an admin",
            quote_ident(&role)
        ));
    }
    // Text crosses as UTF8 (the servers convert from and to their own encodings); SQL_ASCII
    // declares none, so nothing says what its bytes mean.
    let encoding: String = r.get(9);
    if encoding == "SQL_ASCII" {
        problems.push(format!(
            "{side}: database encoding is SQL_ASCII, which says nothing of what its text bytes \
             mean, so they cannot be converted for the other side; move the data to a database \
             created with the encoding it is really in (e.g. `CREATE DATABASE … ENCODING 'WIN1252' \
             TEMPLATE template0`, then pg_dump and restore)"
        ));
    }
    if let Some(problem) = control_schema_access(c, side, Some(&site.publication)).await? {
        problems.push(problem);
    }
    Ok(())
}

/// What keeps this role from tandem's control schema on `site`, if anything. tandem writes its
/// checkpoints there and `setup`'s migrations change its tables, so they must be the role's.
/// One an earlier `setup` made as another role (a superuser, say, before the config moved to a
/// plain one) failed with only `permission denied for schema tandem`, naming neither side nor
/// fix; a role without CREATE on the database, likewise, with `permission denied for database`
/// (checked with `publication`, the side's, which `setup` creates with the schema).
async fn control_schema_access(
    c: &Client,
    side: Side,
    publication: Option<&str>,
) -> Result<Option<String>> {
    let r = c
        .query_one(
            "WITH o AS ( \
                 SELECT nspowner AS owner, 0 AS k, \
                        format('ALTER SCHEMA tandem OWNER TO %I', current_user) AS fix \
                 FROM pg_namespace WHERE nspname = 'tandem' \
                 UNION ALL \
                 SELECT c.relowner, 1, \
                        format('ALTER TABLE tandem.%I OWNER TO %I', c.relname, current_user) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'tandem' AND c.relkind IN ('r', 'p') \
                 UNION ALL \
                 SELECT pubowner, 2, format('ALTER PUBLICATION %I OWNER TO %I', pubname, \
                        current_user) \
                 FROM pg_publication WHERE pubname = $1), \
             theirs AS (SELECT * FROM o WHERE NOT pg_has_role(owner, 'MEMBER')) \
             SELECT current_user::text, current_database()::text, \
                    has_database_privilege(current_database(), 'CREATE'), \
                    EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'tandem') \
                      AND EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1), \
                    (SELECT string_agg(DISTINCT pg_get_userbyid(owner), ', ') FROM theirs), \
                    (SELECT string_agg(fix, '; ' ORDER BY k, fix) FROM theirs), \
                    (SELECT string_agg(DISTINCT CASE WHEN k < 2 \
                       THEN 'control schema `tandem`' ELSE format('publication %s', $1) END, \
                       ' and ') FROM theirs)",
            &[&publication],
        )
        .await?;
    let (role, db, may_create, made): (String, String, bool, bool) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    let (owners, fix, what): (Option<String>, Option<String>, Option<String>) =
        (r.get(4), r.get(5), r.get(6));
    if let (Some(owners), Some(fix), Some(what)) = (owners, fix, what) {
        return Ok(Some(format!(
            "{side}: tandem's {what} there {belong} to {owners}, not to role {role} (an earlier \
             `tandem setup` ran as {owners}); tandem writes its checkpoints in the schema and \
             `setup` changes its tables and the publication. As {owners} or a superuser, give \
             them to {role}: `{fix}`; or connect as {owners}",
            belong = if what.contains(" and ") {
                "belong"
            } else {
                "belongs"
            }
        )));
    }
    if publication.is_some() && !may_create && !made {
        return Ok(Some(format!(
            "{side}: role {role} may not create the control schema and the publication in \
             database {db}; run `GRANT CREATE ON DATABASE {} TO {}` as an admin",
            quote_ident(&db),
            quote_ident(&role)
        )));
    }
    Ok(None)
}

/// Two different column types tandem takes: ones whose values are written alike as text, so
/// that applying (cast to the target's type), the snapshot's `COPY` and verify's row hashes all
/// see the same values. The integer types among themselves, and `varchar(n)`, `varchar` and
/// `text` among themselves (not `char(n)`, which pads). `None`: not such a pair.
/// `Some(Some(side))`: `side`'s type holds fewer values; `Some(None)`: they hold the same.
fn same_values(desktop: &str, mobile: &str) -> Option<Option<Side>> {
    fn rank(ty: &str) -> Option<(u8, u64)> {
        match ty {
            "smallint" => Some((0, 2)),
            "integer" => Some((0, 4)),
            "bigint" => Some((0, 8)),
            "text" | "character varying" => Some((1, u64::MAX)),
            _ => ty
                .strip_prefix("character varying(")?
                .strip_suffix(')')?
                .parse()
                .ok()
                .map(|n| (1, n)),
        }
    }
    let ((fd, d), (fm, m)) = (rank(desktop)?, rank(mobile)?);
    if fd != fm {
        return None;
    }
    Some(match d.cmp(&m) {
        std::cmp::Ordering::Less => Some(Side::Desktop),
        std::cmp::Ordering::Greater => Some(Side::Mobile),
        std::cmp::Ordering::Equal => None,
    })
}

/// A type as `format_type` writes it, without the schema it qualifies it by when that schema is
/// not on the session's search path: an extension's type (`citext`, `hstore`) is the same type
/// whether the extension went into `public` (an office server) or into `extensions` (Supabase).
/// Before, `setup` refused `citext` against `extensions.citext` as different types. Built-in
/// types are never qualified, and an unquoted name holds no dot.
fn unqualified(ty: &str) -> &str {
    let mut quoted = false;
    for (i, ch) in ty.char_indices() {
        match ch {
            '"' => quoted = !quoted,
            '.' if !quoted => return &ty[i + 1..],
            '(' | '[' | ' ' if !quoted => return ty,
            _ => {}
        }
    }
    ty
}

fn describe_columns(t: &TargetTable) -> String {
    if t.key.is_empty() {
        return "none".into();
    }
    t.key_names().join(", ")
}

/// The relations of `t` whose changes are logged without their old row: `t` itself, or for a
/// partitioned table every partition in its tree. The old row is logged by the partition that
/// holds the row, whatever the partitioned table says, even when it publishes via the root.
pub(crate) async fn not_identity_full(
    c: &impl GenericClient,
    t: &TableName,
) -> Result<Vec<String>> {
    // pg_partition_tree lists nothing for a table that is not partitioned.
    Ok(c.query(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM (SELECT $1::text::regclass AS r, 0 AS level \
         UNION ALL SELECT relid, level FROM pg_partition_tree($1::text::regclass) \
         WHERE level > 0) x JOIN pg_class c ON c.oid = x.r JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relreplident <> 'f' ORDER BY x.level, 1",
        &[&t.quoted()],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

pub(crate) async fn replica_identity(
    c: &impl GenericClient,
    t: &TableName,
) -> Result<Option<String>> {
    let row = c
        .query_opt(
            "SELECT c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&t.schema, &t.name],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The relations of `t` (itself, or each partition of its tree) whose replica identity is an
/// index leaving out a column of `tt`'s key, each with that index. Their updates and deletes are
/// logged with the index's columns alone, so the other side could not tell which row one
/// changes, and an update of the key alone (the index's columns unchanged) came as a new row,
/// the old one left in place.
pub(crate) async fn identity_short_of_key(
    c: &impl GenericClient,
    t: &TableName,
    tt: &TargetTable,
) -> Result<Vec<(String, String)>> {
    if tt.key.is_empty() {
        return Ok(Vec::new());
    }
    let key = tt.key_names();
    Ok(c.query(
        "SELECT format('%I.%I', n.nspname, c.relname), ic.relname::text \
         FROM (SELECT $1::text::regclass AS r, 0 AS level UNION ALL \
               SELECT relid, level FROM pg_partition_tree($1::text::regclass) WHERE level > 0) x \
         JOIN pg_class c ON c.oid = x.r JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_index i ON i.indrelid = c.oid AND i.indisreplident \
         JOIN pg_class ic ON ic.oid = i.indexrelid \
         WHERE c.relreplident = 'i' AND NOT (SELECT coalesce(array_agg(a.attname::text), '{}') \
               FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum = ANY (i.indkey::int2[])) \
               @> $2::text[] \
         ORDER BY x.level, 1",
        &[&t.quoted(), &key],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// What `setup`, `run` and `tandem ddl` say of what [`identity_short_of_key`] found.
pub(crate) fn identity_short_problem(
    side: Side,
    t: &TableName,
    tt: &TargetTable,
    short: &[(String, String)],
) -> String {
    let indexes: Vec<String> = short.iter().map(|(r, i)| format!("{i} of {r}")).collect();
    let relations: Vec<&str> = short.iter().map(|(r, _)| r.as_str()).collect();
    format!(
        "{side}: table {t}'s replica identity is an index that leaves out its key ({}): {}; its \
         updates and deletes would reach the other side without the key, and an update of the \
         key alone as a new row beside the old one. Run `ALTER TABLE … REPLICA IDENTITY \
         DEFAULT` (or FULL) on {side} for {}",
        describe_columns(tt),
        indexes.join(", "),
        relations.join(", ")
    )
}

/// User types are compared by name with the other columns; here, what the name hides.
/// - A composite type whose attributes differ: a value crosses as text, its fields by position,
///   so the same name with its attributes in another order put each value into the other's
///   field, and verify (comparing the text) found the sides equal. Refused.
/// - An enum whose type lacks, on one side, labels the other side's has: a row from that side
///   holding one is refused and stops `run` naming its transaction. Warned about as for a
///   narrower integer or varchar (the application may never write them), naming the labels and
///   the `ALTER TYPE` that adds them.
async fn check_user_types(
    cfg: &Config,
    d: &Client,
    m: &Client,
    t: &TableName,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    // Without the schema each side may qualify a type by (see `unqualified`).
    let shape = |types: &[catalog::Composite]| {
        types
            .iter()
            .map(|c| {
                let attrs: Vec<String> = c
                    .attributes
                    .iter()
                    .map(|(n, ty)| format!("{n} {}", unqualified(ty)))
                    .collect();
                format!("{} ({})", unqualified(&c.name), attrs.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", holding ")
    };
    let (dc, mc) = (
        catalog::composites(d, t).await?,
        catalog::composites(m, t).await?,
    );
    for (col, d_types) in &dc {
        let Some(m_types) = mc.get(col) else {
            continue;
        };
        let (ds, ms) = (shape(d_types), shape(m_types));
        if ds != ms && cfg.column_flows(t, col) {
            problems.push(format!(
                "table {t}: column `{col}`'s composite type is {ds} on desktop but {ms} on \
                 mobile, and a composite value crosses field by field in order; make the \
                 types' attributes the same, in the same order"
            ));
        }
    }
    let (dl, ml) = (
        catalog::enum_labels(d, t).await?,
        catalog::enum_labels(m, t).await?,
    );
    for (col, (d_type, d_labels)) in &dl {
        let Some((m_type, m_labels)) = ml.get(col) else {
            continue; // Not an enum on mobile: the types are compared with the other columns.
        };
        if !cfg.column_flows(t, col) {
            continue;
        }
        for (from, has, (to_type, lacks)) in [
            (Side::Desktop, d_labels, (m_type, m_labels)),
            (Side::Mobile, m_labels, (d_type, d_labels)),
        ] {
            let missing: Vec<String> = has
                .iter()
                .filter(|l| !lacks.contains(l))
                .map(|l| crate::config::quote_literal(l))
                .collect();
            if missing.is_empty() || !cfg.direction(t).flows_from(from) {
                continue;
            }
            let adds: Vec<String> = missing
                .iter()
                .map(|l| format!("ALTER TYPE {to_type} ADD VALUE {l}"))
                .collect();
            warnings.push(format!(
                "table {t}: column `{col}`'s enum type has {} on {from} but not on {to}: a row \
                 from {from} holding one is refused by {to} and stops `run` naming its \
                 transaction; add them on {to} (`{}`)",
                missing.join(", "),
                adds.join("; "),
                to = from.other()
            ));
        }
    }
    Ok(())
}

/// Unlogged tables write no WAL, so logical replication has nothing of them to send: one named in
/// the config that flows from `side` is refused (CREATE PUBLICATION would refuse it), and one a
/// pattern leaves out ([`catalog::expand`]) is pointed out.
async fn check_unlogged(
    cfg: &Config,
    c: &Client,
    side: Side,
    tables: &[TableName],
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let schemas: Vec<&str> = cfg
        .tables
        .iter()
        .filter(|p| p.is_wildcard())
        .map(|p| p.schema.as_str())
        .collect();
    let rows = c
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    for r in rows {
        let t = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        if tables.contains(&t) {
            if cfg.direction(&t).flows_from(side) {
                problems.push(format!(
                    "{side}: table {t} is UNLOGGED, so its changes are not written to the WAL \
                     and logical replication cannot send them; run `ALTER TABLE {} SET LOGGED`, \
                     or remove it from [replication] tables",
                    t.quoted()
                ));
            }
        } else if schemas.contains(&t.schema.as_str()) {
            warnings.push(format!(
                "{side}: table {t} is UNLOGGED, so the pattern {}.* leaves it out (its changes \
                 are not written to the WAL); `ALTER TABLE {} SET LOGGED` and `tandem setup` \
                 to sync it",
                t.schema,
                t.quoted()
            ));
        }
    }
    Ok(())
}

/// Each `schema.*` pattern that takes in none of `tables`: a problem on a side that lacks the
/// schema (most likely a misspelt or mis-cased name, which would otherwise leave its tables out
/// unsaid, then or later), else a warning.
async fn check_patterns(
    cfg: &Config,
    d: &Client,
    m: &Client,
    tables: &[TableName],
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    for p in cfg.tables.iter().filter(|p| p.is_wildcard()) {
        if tables.iter().any(|t| t.schema == p.schema) {
            continue;
        }
        let before = problems.len();
        for (side, c) in [(Side::Desktop, d), (Side::Mobile, m)] {
            let near = c
                .query(
                    "SELECT nspname::text, nspname = $1 FROM pg_namespace \
                     WHERE lower(nspname) = lower($1) ORDER BY 2 DESC, 1 LIMIT 1",
                    &[&p.schema],
                )
                .await?;
            match near.first().map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1))) {
                Some((_, true)) => {}
                Some((near, false)) => problems.push(format!(
                    "{side}: [replication] tables pattern {p} takes in nothing: there is no schema \
                     {0}, but there is {near}: names are case-sensitive here, so write \"{near}.*\" \
                     in the config",
                    p.schema
                )),
                None => problems.push(format!(
                    "{side}: [replication] tables pattern {p} takes in nothing: there is no schema \
                     {0}; create it, or correct or remove the pattern",
                    p.schema
                )),
            }
        }
        if problems.len() == before {
            warnings.push(format!(
                "[replication] tables pattern {p} matches no table yet; a table created there \
                 later flows once `tandem setup` publishes it"
            ));
        }
    }
    Ok(())
}

/// Compare the configured tables on both sides.
async fn check_tables(
    cfg: &Config,
    d: &Client,
    m: &Client,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<Vec<TableName>> {
    let mut tables = catalog::expand(d, &cfg.tables).await?;
    for t in catalog::expand(m, &cfg.tables).await? {
        if !tables.contains(&t) {
            tables.push(t);
        }
    }
    if tables.is_empty() {
        problems.push(
            "the table patterns in [replication] tables match no table on either side".into(),
        );
    }
    for (side, c) in [(Side::Desktop, d), (Side::Mobile, m)] {
        problems.extend(catalog::row_security(c, side, &tables).await?);
        check_unlogged(cfg, c, side, &tables, problems, warnings).await?;
        // Said once of a table: by desktop where it flows from there.
        let leaving: Vec<TableName> = tables
            .iter()
            .filter(|t| {
                let flows = cfg.direction(t);
                flows.flows_from(side) && (side == Side::Desktop || !flows.flows_from(side.other()))
            })
            .cloned()
            .collect();
        warnings.extend(catalog::large_object_columns(c, &leaving).await?);
        let arriving = cfg.arriving(side, &tables);
        problems.extend(catalog::rules(c, side, &arriving).await?);
    }
    check_patterns(cfg, d, m, &tables, problems, warnings).await?;
    for t in &tables {
        let dt = catalog::table(d, t).await?;
        let mt = catalog::table(m, t).await?;
        for (side, this, other, c) in [(Side::Desktop, &dt, &mt, d), (Side::Mobile, &mt, &dt, m)] {
            if this.is_none() {
                // Not a table: what it is, and what to name instead (before: "does not exist;
                // create it on both sides", for a view the application reads).
                let kind = c
                    .query_opt(
                        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n \
                         ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                        &[&t.schema, &t.name],
                    )
                    .await?
                    .map(|r| r.get::<_, String>(0));
                let what = match kind.as_deref() {
                    Some("v") => Some(
                        "a view: its rows are its tables' rows, which replicate when the config \
                         names those tables",
                    ),
                    Some("m") => Some(
                        "a materialized view: logical replication does not carry it; name the \
                         tables it reads, and refresh it on each side",
                    ),
                    Some("S") => Some(
                        "a sequence: logical replication does not carry sequences (`tandem setup \
                         --sequences odd-even` keeps two sides' keys apart)",
                    ),
                    Some("f") => Some(
                        "a foreign table: its rows live on another server; replicate them there",
                    ),
                    _ => None,
                };
                if let Some(what) = what {
                    problems.push(format!(
                        "{side}: {t} is {what}; take it out of [replication] tables"
                    ));
                    continue;
                }
                // Unquoted names fold to lower case in SQL, but the config's are taken as written.
                let folded = c
                    .query_opt(
                        "SELECT n.nspname::text, c.relname::text FROM pg_class c \
                         JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE lower(n.nspname) = lower($1) AND lower(c.relname) = lower($2) \
                         AND c.relkind IN ('r', 'p') LIMIT 1",
                        &[&t.schema, &t.name],
                    )
                    .await?;
                let hint = if let Some(r) = folded {
                    let near = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
                    format!(
                        "there is {near}: names are case-sensitive here, so write \"{near}\" in \
                         the config"
                    )
                } else if other.is_some() {
                    format!("create it with the same columns as on {}", side.other())
                } else {
                    "create it on both sides, or remove it from [replication] tables".into()
                };
                problems.push(format!("{side}: table {t} does not exist; {hint}"));
            }
        }
        let (Some(dt), Some(mt)) = (dt, mt) else {
            continue;
        };
        for (side, tt, c) in [(Side::Desktop, &dt, d), (Side::Mobile, &mt, m)] {
            if !tt.key.is_empty() && deferrable_over_key(c, t).await? {
                problems.push(format!(
                    "{side}: table {t}'s key ({}) is also a DEFERRABLE unique constraint's, \
                     which PostgreSQL's ON CONFLICT refuses as an arbiter, so no row could be \
                     upserted by it; make that constraint NOT DEFERRABLE, or run `ALTER TABLE {} \
                     REPLICA IDENTITY FULL` on both sides (tandem then finds rows by all their \
                     values)",
                    describe_columns(tt),
                    t.quoted()
                ));
            }
            let short = identity_short_of_key(c, t, tt).await?;
            if !short.is_empty() {
                problems.push(identity_short_problem(side, t, tt, &short));
            }
            // A table without a key is checked by `check_keyless`.
            if !tt.key.is_empty() && replica_identity(c, t).await?.as_deref() == Some("n") {
                problems.push(format!(
                    "{side}: table {t} has REPLICA IDENTITY NOTHING, so its updates and deletes cannot be \
                     replicated; run `ALTER TABLE {} REPLICA IDENTITY DEFAULT`",
                    t.quoted()
                ));
            }
        }
        if describe_columns(&dt) != describe_columns(&mt) {
            problems.push(format!(
                "table {t}: primary key differs: desktop ({}) vs mobile ({}); make them the same",
                describe_columns(&dt),
                describe_columns(&mt)
            ));
        }
        if let (true, Some(_)) = (dt.key.is_empty(), cfg.columns_of(t)) {
            problems.push(format!(
                "table {t} has no primary key, so its rows are found by all their values (REPLICA \
                 IDENTITY FULL), and PostgreSQL 15 then sends updates and deletes only when every \
                 column flows; take it out of [replication.columns] or add a primary key"
            ));
        }
        if let Some(listed) = cfg.columns_of(t) {
            // Missing on one side only is reported with the types below.
            for n in listed {
                if ![&dt, &mt]
                    .iter()
                    .any(|tt| tt.columns.iter().any(|c| &c.name == n))
                {
                    problems.push(format!(
                        "table {t} has no column `{n}` on either side, yet [replication.columns] \
                         lists it; take it off the list"
                    ));
                }
            }
            // PostgreSQL 15 refuses the source's own UPDATE and DELETE on a table whose column
            // list leaves out part of the replica identity: check before that can happen.
            let unlisted = unlisted_key(&dt, listed);
            if !unlisted.is_empty() {
                problems.push(format!(
                    "table {t}: [replication.columns] must list its key column(s) {}: without them \
                     neither side could update or delete its rows",
                    unlisted.join(", ")
                ));
            }
        }
        for (side, c) in [(Side::Desktop, d), (Side::Mobile, m)] {
            if let Some(cond) = cfg.filter(t, side) {
                problems.extend(check_filter(c, side, t, cond).await?);
            }
        }
        check_user_types(cfg, d, m, t, problems, warnings).await?;
        // Only the columns that flow must match; the others are each side's own.
        let names: BTreeSet<&str> = dt
            .columns
            .iter()
            .chain(&mt.columns)
            .map(|c| c.name.as_str())
            .filter(|n| cfg.column_flows(t, n))
            .collect();
        for n in names {
            let a = dt.columns.iter().find(|c| c.name == n);
            let b = mt.columns.iter().find(|c| c.name == n);
            match (a, b) {
                (Some(a), Some(b)) => {
                    if unqualified(&a.type_sql) != unqualified(&b.type_sql) {
                        match same_values(&a.type_sql, &b.type_sql) {
                            None => problems.push(format!(
                                "table {t}: column `{n}` is {} on desktop but {} on mobile; make \
                                 the types the same (tandem takes different types only among the \
                                 integer types, and among varchar and text)",
                                a.type_sql, b.type_sql
                            )),
                            Some(None) => {}
                            Some(Some(narrow)) => {
                                let (wide, narrow_type) = match narrow {
                                    Side::Desktop => (Side::Mobile, &a.type_sql),
                                    Side::Mobile => (Side::Desktop, &b.type_sql),
                                };
                                if cfg.direction(t).flows_from(wide) && cfg.column_flows(t, n) {
                                    warnings.push(format!(
                                        "table {t}: column `{n}` is {} on desktop and {} on \
                                         mobile: a value from {wide} that {narrow_type} cannot \
                                         hold is refused by {narrow} and stops `run` naming its \
                                         transaction (see \"When the target refuses a change\"); \
                                         make the types the same to rule that out",
                                        a.type_sql, b.type_sql
                                    ));
                                }
                            }
                        }
                    }
                    // PostgreSQL 15 sends no generated column: the plain one would stay empty.
                    // Checked whatever the types: a pair of types tandem takes must not hide it.
                    if a.generated != b.generated {
                        let (gen, plain) = if a.generated {
                            (Side::Desktop, Side::Mobile)
                        } else {
                            (Side::Mobile, Side::Desktop)
                        };
                        problems.push(format!(
                            "table {t}: column `{n}` is generated on {gen} but not on {plain}, and \
                             logical replication does not send generated columns, so {plain}'s \
                             would stay empty for rows from {gen}; make it generated on {plain} \
                             too (with the same expression), or plain on both"
                        ));
                    }
                }
                (Some(_), None) | (None, Some(_)) => {
                    let (has, lacks) = if a.is_some() {
                        (Side::Desktop, Side::Mobile)
                    } else {
                        (Side::Mobile, Side::Desktop)
                    };
                    let fix = if cfg.columns_of(t).is_some() {
                        format!("take it off [replication.columns] to keep it {has}'s own")
                    } else {
                        format!(
                            "drop it from {has}, or keep it {has}'s own with [replication.columns]"
                        )
                    };
                    problems.push(format!(
                        "table {t}: column `{n}` exists on {has} but not on {lacks}; add it to {lacks} \
                         (or {fix})"
                    ));
                }
                _ => {}
            }
        }
        if cfg.columns_of(t).is_some() {
            // A side's own column that insists on a value nobody sends: every row arriving
            // from the other side would be refused.
            for (side, c) in [(Side::Desktop, d), (Side::Mobile, m)] {
                if !cfg.direction(t).flows_from(side.other()) {
                    continue;
                }
                let required = c
                    .query(
                        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass \
                         AND attnum > 0 AND NOT attisdropped AND attnotnull AND NOT atthasdef \
                         AND attidentity = '' AND attgenerated = '' ORDER BY attnum",
                        &[&t.quoted()],
                    )
                    .await?;
                for r in required {
                    let n: String = r.get(0);
                    if !cfg.column_flows(t, &n) {
                        problems.push(format!(
                            "{side}: column `{n}` of {t} is NOT NULL without a default and \
                             [replication.columns] leaves it out, so no row from {} could be \
                             inserted; give it one (`ALTER TABLE {} ALTER COLUMN {} SET DEFAULT …`) \
                             or list it",
                            side.other(),
                            t.quoted(),
                            quote_ident(&n)
                        ));
                    }
                }
            }
        }
    }
    Ok(tables)
}

/// Is the key tandem upserts `t` by (its primary key or replica identity index, not deferrable)
/// also a deferrable unique constraint's (a `DEFERRABLE` primary key beside a replica identity
/// index on its columns)? `ON CONFLICT` infers every unique index on those columns, and refuses a
/// deferrable one.
async fn deferrable_over_key(c: &Client, t: &TableName) -> Result<bool> {
    Ok(c.query_one(
        "WITH k AS (SELECT (SELECT array_agg(a ORDER BY a) FROM unnest(i.indkey) a) AS cols \
                        FROM pg_index i WHERE i.indrelid = $1::text::regclass AND i.indimmediate \
                        AND (i.indisprimary OR i.indisreplident) \
                        ORDER BY i.indisprimary DESC LIMIT 1) \
             SELECT EXISTS (SELECT 1 FROM pg_index i, k WHERE i.indrelid = $1::text::regclass \
                            AND i.indisunique AND NOT i.indimmediate \
                            AND (SELECT array_agg(a ORDER BY a) FROM unnest(i.indkey) a) = k.cols)",
        &[&t.quoted()],
    )
    .await?
    .get(0))
}

/// The key columns of `t` a column list leaves out.
pub(crate) fn unlisted_key<'a>(t: &'a TargetTable, listed: &[String]) -> Vec<&'a str> {
    t.key_names()
        .into_iter()
        .filter(|k| !listed.iter().any(|n| n == k))
        .collect()
}

/// Row filter `cond` on `t` as PostgreSQL takes it, from a publication created in a transaction
/// that is rolled back: written back as PostgreSQL shows it (`pg_get_expr`), or the server's
/// refusal. `identity`: also start a DELETE that touches no row, which PostgreSQL refuses when
/// the filter uses a column outside the replica identity (its check runs as the statement
/// starts) — as it would refuse every UPDATE and DELETE on the table, the application's own.
pub(crate) async fn try_filter(
    c: &Client,
    t: &TableName,
    cond: &str,
    identity: bool,
) -> Result<Result<String, tokio_postgres::Error>> {
    c.batch_execute("BEGIN").await?;
    let r: Result<String, tokio_postgres::Error> = async {
        c.batch_execute(&format!(
            "CREATE PUBLICATION tandem_filter_probe FOR TABLE {} WHERE ({cond}) \
             WITH (publish_via_partition_root = true)",
            t.quoted()
        ))
        .await?;
        if identity {
            c.batch_execute(&format!("DELETE FROM {} WHERE false", t.quoted()))
                .await?;
        }
        let row = c
            .query_one(
                "SELECT pg_get_expr(pr.prqual, pr.prrelid) FROM pg_publication_rel pr \
                 JOIN pg_publication p ON p.oid = pr.prpubid WHERE p.pubname = 'tandem_filter_probe'",
                &[],
            )
            .await?;
        Ok(row.get::<_, String>(0))
    }
    .await;
    c.batch_execute("ROLLBACK").await?;
    match r {
        Err(e) if e.as_db_error().is_none() => Err(e.into()),
        r => Ok(r),
    }
}

/// A row filter PostgreSQL does not take, or one on columns outside the replica identity: the
/// problem, with the fix.
async fn check_filter(c: &Client, side: Side, t: &TableName, cond: &str) -> Result<Option<String>> {
    let Err(e) = try_filter(c, t, cond, true).await? else {
        return Ok(None);
    };
    let message = e.as_db_error().map_or("", |db| db.message());
    let key = format!("[replication.filter.\"{t}\"] {}", side.direction_key());
    Ok(Some(if message.starts_with("cannot delete from table") {
        format!(
            "{side}: {key} uses a column outside the replica identity of {t}, so PostgreSQL \
             would refuse every UPDATE and DELETE on it; filter on key columns only, or run \
             `ALTER TABLE {} REPLICA IDENTITY FULL` on {side}",
            t.quoted()
        )
    } else {
        format!("{side}: {key} is not a condition a publication takes: {message}")
    }))
}

/// Triggers that will fire for the rows tandem applies. PostgreSQL's own apply worker runs with
/// `session_replication_role = replica`, so only `ENABLE REPLICA`/`ALWAYS` triggers fire for
/// replicated rows; tandem does the same when its role may set it. When it may not, an ordinary
/// trigger that stamps or rewrites rows makes the sides differ: warned about, with both fixes.
async fn check_triggers(
    cfg: &Config,
    d: &Client,
    m: &Client,
    tables: &[TableName],
    plan: &mut Plan,
) -> Result<()> {
    for (side, c) in [(Side::Desktop, d), (Side::Mobile, m)] {
        if catalog::may_replica(c).await? {
            continue;
        }
        let role: String = c.query_one("SELECT current_user::text", &[]).await?.get(0);
        for t in &cfg.arriving(side, tables) {
            // A partitioned table's rows land in its partitions, whose own triggers fire too.
            // One defined on the partitioned table is cloned to each partition (`tgparentid`):
            // named once, where it was defined.
            let triggers = c
                .query(
                    "SELECT tg.tgname::text, n.nspname::text, c.relname::text, \
                            tg.tgrelid <> $1::text::regclass \
                     FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE (tg.tgrelid = $1::text::regclass \
                            OR tg.tgrelid IN (SELECT relid FROM pg_partition_tree($1::text::regclass))) \
                       AND NOT tg.tgisinternal AND tg.tgenabled = 'O' AND tg.tgparentid = 0 \
                     ORDER BY 2, 3, 1",
                    &[&t.quoted()],
                )
                .await?;
            for r in triggers {
                let (name, partition): (String, bool) = (r.get(0), r.get(3));
                let on = TableName::new(r.get::<_, String>(1), r.get::<_, String>(2));
                let on_what = match partition {
                    true => format!("{on} (a partition of {t})"),
                    false => t.to_string(),
                };
                plan.warnings.push(format!(
                    "{side}: trigger {name} on {on_what} will fire for the rows tandem applies (role \
                     {role} may not set session_replication_role), and if it changes them the sides \
                     differ; as a superuser run `GRANT SET ON PARAMETER session_replication_role TO \
                     {}` on {side} (PostgreSQL 15+) to apply as PostgreSQL's own replication does, or, \
                     if it is meant to fire for replicated rows too, `ALTER TABLE {} ENABLE ALWAYS \
                     TRIGGER {}`",
                    quote_ident(&role),
                    on.quoted(),
                    quote_ident(&name)
                ));
            }
        }
    }
    Ok(())
}

/// Every side `t` flows from must log whole old rows: with `--replica-identity-full` its
/// relations that do not are planned for it, otherwise `problem(side, relations)` says so.
async fn require_identity_full(
    cfg: &Config,
    opts: Options,
    (d, m): (&Client, &Client),
    t: &TableName,
    plan: &mut Plan,
    problems: &mut Vec<String>,
    problem: impl Fn(Side, &str) -> String,
) -> Result<()> {
    for (side, c) in [(Side::Desktop, d), (Side::Mobile, m)] {
        if !cfg.direction(t).flows_from(side) {
            continue;
        }
        let partial = not_identity_full(c, t).await?;
        if partial.is_empty() {
            continue;
        }
        if opts.replica_identity_full {
            plan.identity_full.push((side, partial));
        } else {
            problems.push(problem(side, &partial.join(", ")));
        }
    }
    Ok(())
}

/// A table without a primary key (or replica identity index) on either side: tandem finds its
/// rows by all their values, as native logical replication does, so every side it flows from
/// must log whole old rows. It is also what lets the source's application update and delete
/// them at all once they are published (PostgreSQL refuses that for a table without a replica
/// identity).
async fn check_keyless(
    cfg: &Config,
    opts: Options,
    (d, m): (&Client, &Client),
    t: &TableName,
    plan: &mut Plan,
    problems: &mut Vec<String>,
) -> Result<()> {
    let mut deferrable = Vec::new();
    for (side, c) in [(Side::Desktop, d), (Side::Mobile, m)] {
        let r = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = $1::text::regclass \
                 AND indisprimary AND NOT indimmediate)",
                &[&t.quoted()],
            )
            .await?;
        if r.get(0) {
            deferrable.push(side);
        }
    }
    require_identity_full(cfg, opts, (d, m), t, plan, problems, |side, relations| {
        match deferrable.contains(&side) {
            // Before, taken as a key: the source's application could no longer update or
            // delete its rows once setup published it.
            true => format!(
                "{side}: table {t} has a DEFERRABLE primary key, which PostgreSQL takes \
                 neither as the replica identity (once published, updates and deletes of the \
                 table would fail on {side}: 'does not have a replica identity') nor as a key \
                 to upsert by (ON CONFLICT refuses deferrable constraints); run `tandem setup \
                 --replica-identity-full` (or `ALTER TABLE … REPLICA IDENTITY FULL` on \
                 {relations}), and tandem finds its rows by all their values, or make the \
                 primary key NOT DEFERRABLE"
            ),
            false => format!(
                "{side}: table {t} has no primary key (or replica identity index), so tandem \
                 finds its rows by all their values, which needs REPLICA IDENTITY FULL on the \
                 side it flows from; run `tandem setup --replica-identity-full` or `ALTER TABLE \
                 … REPLICA IDENTITY FULL` on {relations}, or add a primary key"
            ),
        }
    })
    .await?;
    if cfg.conflicts_for(t).is_some() {
        plan.warnings.push(format!(
            "table {t} has no primary key: conflicts on it are not detected (a row is known \
             only by its values), its changes apply as they come; add a primary key to have \
             [conflicts] decide them"
        ));
    }
    Ok(())
}

/// last_write_wins may compare commit timestamps on this side instead of a version column: it
/// tracks them, and the role may apply under a replication origin (which carries the source's
/// commit time onto the target).
pub(crate) async fn commit_timestamps_usable(c: &impl GenericClient) -> Result<bool> {
    Ok(c.query_one(
        "SELECT current_setting('track_commit_timestamp') = 'on' \
         AND has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE') \
         AND has_function_privilege('pg_replication_origin_xact_setup(pg_lsn, timestamptz)', 'EXECUTE') \
         AND has_function_privilege('pg_replication_origin_create(text)', 'EXECUTE')",
        &[],
    )
    .await?
    .get(0))
}

/// Conflict rules that need something of the tables: a version column, old rows; key
/// sequences that collide when both sides insert; and tables without a key ([`check_keyless`]).
async fn check_conflicts(
    cfg: &Config,
    opts: Options,
    d: &Client,
    m: &Client,
    tables: &[TableName],
    plan: &mut Plan,
    problems: &mut Vec<String>,
) -> Result<()> {
    for t in tables {
        // Tables missing on a side are reported by check_tables already.
        let (Some(dt), Some(mt)) = (catalog::table(d, t).await?, catalog::table(m, t).await?)
        else {
            continue;
        };
        if dt.key.is_empty() && mt.key.is_empty() {
            // No conflicts detected there, and no key sequence.
            check_keyless(cfg, opts, (d, m), t, plan, problems).await?;
            continue;
        }
        let two_way = cfg.direction(t) == crate::config::Direction::Both;
        if two_way {
            let key: Vec<_> = dt
                .key
                .iter()
                .map(|&k| (dt.columns[k].name.clone(), dt.columns[k].type_sql.clone()))
                .collect();
            for (col, ty) in key {
                let (mut seqs, quoted) = (Vec::new(), t.quoted());
                for c in [d, m] {
                    let r = c
                        .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&quoted, &col])
                        .await?;
                    seqs.push(r.get::<_, Option<String>>(0));
                }
                match (seqs[0].take(), seqs[1].take()) {
                    (Some(ds), Some(ms)) => {
                        if opts.sequences_odd_even {
                            plan.sequences.push((t.clone(), col.clone(), ds, ms));
                        } else {
                            plan.warnings.push(format!(
                                "table {t}: key column `{col}` comes from a sequence on both sides, so rows \
                                 inserted on both sides collide; run `tandem setup --sequences odd-even` \
                                 (desktop odd, mobile even) or use UUID keys"
                            ));
                        }
                    }
                    _ if ty == "uuid" => plan.warnings.push(format!(
                        "table {t}: key column `{col}` is a UUID: safe to insert on both sides"
                    )),
                    _ => {}
                }
            }
        }
        let Some(tc) = cfg.conflicts_for(t) else {
            continue;
        };
        let policy = tc.policy.as_str();
        if tc.policy == crate::apply::conflict::Policy::LastWriteWins {
            let v = tc.version_column.clone().unwrap_or_default();
            if dt.columns.iter().any(|c| c.name == v) && !cfg.column_flows(t, &v) {
                problems.push(format!(
                    "table {t}: last_write_wins compares `{v}`, which [replication.columns] leaves out; \
                     add it to the list"
                ));
            }
            let lacking: Vec<Side> = [(Side::Desktop, &dt), (Side::Mobile, &mt)]
                .into_iter()
                .filter(|(_, tt)| !tt.columns.iter().any(|col| col.name == v))
                .map(|(s, _)| s)
                .collect();
            if !lacking.is_empty() {
                // Commit timestamps instead: both sides track them and the role may apply under a
                // replication origin (which carries the source's commit time onto the target).
                let mut ok = true;
                for c in [d, m] {
                    ok &= commit_timestamps_usable(c).await?;
                }
                if ok {
                    plan.notes.push(format!(
                        "table {t}: last_write_wins compares commit timestamps (no column `{v}`)"
                    ));
                } else {
                    for side in lacking {
                        problems.push(format!(
                            "{side}: table {t} has no column `{v}`, which last_write_wins compares; add it \
                             (a timestamp or number every change increases), set [conflicts.tables.\"{t}\"] \
                             version_column, choose another policy for it, or compare commit timestamps: \
                             `track_commit_timestamp = on` on both sides and a role that may use replication \
                             origins (superuser, or EXECUTE on pg_replication_origin_create, _session_setup \
                             and _xact_setup)"
                        ));
                    }
                }
            }
        }
        if tc.policy.needs_old_row() && cfg.columns_of(t).is_some() {
            problems.push(format!(
                "table {t}: conflict policy {policy} needs the old row of every change (REPLICA \
                 IDENTITY FULL), which PostgreSQL 15 sends only when every column flows; take it \
                 out of [replication.columns] or give it last_write_wins"
            ));
            continue;
        }
        if tc.policy.needs_old_row() {
            require_identity_full(cfg, opts, (d, m), t, plan, problems, |side, relations| {
                format!(
                    "{side}: table {t} uses conflict policy {policy}, which needs the old row of \
                     every change; run `tandem setup --replica-identity-full` or \
                     `ALTER TABLE … REPLICA IDENTITY FULL` on {relations}"
                )
            })
            .await?;
        }
    }
    Ok(())
}

/// Switch identities and sequences as planned; one report line each.
async fn change_schema(
    plan: &Plan,
    d: &Client,
    m: &Client,
    report: &mut Vec<String>,
) -> Result<()> {
    for (side, relations) in &plan.identity_full {
        let c = if *side == Side::Desktop { d } else { m };
        for r in relations {
            c.batch_execute(&format!("ALTER TABLE {r} REPLICA IDENTITY FULL"))
                .await
                .with_context(|| format!("{side}: setting REPLICA IDENTITY FULL on {r}"))?;
            report.push(format!("{side}: table {r} now has REPLICA IDENTITY FULL"));
        }
    }
    for (t, col, ds, ms) in &plan.sequences {
        // Past every value either side has used, then desktop odd, mobile even.
        let mut high = 0i64;
        for (c, seq) in [(d, ds), (m, ms)] {
            let r = c
                .query_one(
                    &format!(
                        "SELECT greatest((SELECT last_value FROM {seq}), \
                         (SELECT coalesce(max({})::int8, 0) FROM {}))",
                        quote_ident(col),
                        t.quoted()
                    ),
                    &[],
                )
                .await?;
            high = high.max(r.get(0));
        }
        for (side, c, seq, parity) in [(Side::Desktop, d, ds, 1), (Side::Mobile, m, ms, 0)] {
            let (inc, last): (i64, i64) = {
                let r = c
                    .query_one(
                        &format!(
                            "SELECT seqincrement, (SELECT last_value FROM {seq}) FROM pg_sequence \
                             WHERE seqrelid = $1::text::regclass"
                        ),
                        &[seq],
                    )
                    .await?;
                (r.get(0), r.get(1))
            };
            if inc == 2 && last.rem_euclid(2) == parity {
                report.push(format!("{side}: sequence {seq} of {t} already odd-even"));
                continue;
            }
            let start = if (high + 1).rem_euclid(2) == parity {
                high + 1
            } else {
                high + 2
            };
            // Identity sequences are changed through their column.
            c.batch_execute(&format!(
                "DO $$ BEGIN \
                   IF (SELECT attidentity FROM pg_attribute WHERE attrelid = {tl}::regclass AND attname = {cl}) <> '' THEN \
                     ALTER TABLE {tq} ALTER COLUMN {ci} SET INCREMENT BY 2 RESTART WITH {start}; \
                   ELSE \
                     ALTER SEQUENCE {seq} INCREMENT BY 2 RESTART WITH {start}; \
                   END IF; END $$",
                tl = crate::config::quote_literal(&t.quoted()),
                cl = crate::config::quote_literal(col),
                tq = t.quoted(),
                ci = quote_ident(col),
            ))
            .await
            .with_context(|| format!("{side}: changing sequence {seq}"))?;
            report.push(format!(
                "{side}: sequence {seq} of {t} now gives {} values from {start} (step 2)",
                if parity == 1 { "odd" } else { "even" }
            ));
        }
    }
    Ok(())
}

/// Validate both sides; `Err(Problems)` lists everything wrong.
pub async fn validate(cfg: &Config) -> Result<(Client, Client, Plan)> {
    validate_with(cfg, Options::default()).await
}

/// [`validate`], planning the schema changes `opts` allows.
pub async fn validate_with(cfg: &Config, opts: Options) -> Result<(Client, Client, Plan)> {
    let mut problems = Vec::new();
    let d = connect_checked(&cfg.desktop, &mut problems).await;
    let m = connect_checked(&cfg.mobile, &mut problems).await;
    for (c, site) in [(&d, &cfg.desktop), (&m, &cfg.mobile)] {
        if let Some(c) = c {
            check_server(c, site, &mut problems).await?;
        }
    }
    let mut plan = Plan {
        tables: Vec::new(),
        identity_full: Vec::new(),
        sequences: Vec::new(),
        warnings: Vec::new(),
        notes: Vec::new(),
    };
    if let (Some(d), Some(m)) = (&d, &m) {
        if let Some(problem) = same_database(cfg, d, m).await? {
            return Err(Problems(vec![problem]).into());
        }
        // Reads the control schemas, which the role may not (a problem already found).
        if problems.is_empty() {
            check_pairing(cfg, opts, d, m, &mut problems).await?;
        }
        plan.tables = check_tables(cfg, d, m, &mut problems, &mut plan.warnings).await?;
        let tables = plan.tables.clone();
        check_conflicts(cfg, opts, d, m, &tables, &mut plan, &mut problems).await?;
        check_triggers(cfg, d, m, &tables, &mut plan).await?;
    }
    match (d, m) {
        (Some(d), Some(m)) if problems.is_empty() => Ok((d, m, plan)),
        _ => Err(Problems(problems).into()),
    }
}

/// A control schema serves one pair of databases: its checkpoints are per direction, and its
/// lock and echo marker per database. A second config pairing one of these databases with a
/// third (an office database shared by two field databases, a copied config) took over the
/// first pair's checkpoint: `setup` deleted it as a slot's leftover and wrote its own, the first
/// `run` then streamed from the wrong position (or stopped, told to run `setup` again, which
/// took it back). Refused while the checkpoint's slot still lives, in another database of the
/// source's cluster; and while it was taken against another database system (the second pair's
/// source on another server, under the same slot name), unless the operator says the source was
/// moved there (`--replaced`): only they can tell that from a second pair.
async fn check_pairing(
    cfg: &Config,
    opts: Options,
    d: &Client,
    m: &Client,
    problems: &mut Vec<String>,
) -> Result<()> {
    for (source, src, tgt) in [(Side::Desktop, d, m), (Side::Mobile, m, d)] {
        let site = cfg.site(source);
        let Some(cp) = checkpoint_if_made(tgt, source).await? else {
            continue;
        };
        if !cp.source_system_id.is_empty() && opts.replaced != Some(source) {
            let (system_id, _) = identify(site).await?;
            if system_id != cp.source_system_id {
                problems.push(format!(
                    "{target}: tandem's control schema there holds the checkpoint of {source}'s \
                     changes from slot {slot} of database system {theirs}, but this config's \
                     {source} is database system {system_id}: another server. One control \
                     schema serves one pair of databases (its checkpoints, lock and echo marker \
                     are the pair's): if that pair still runs, sync this {source} with a \
                     {target} database of its own; if {source}'s database was moved to this \
                     server and the old one is gone, run `tandem setup --replaced {source}`, \
                     which starts {source}'s changes afresh from here",
                    target = source.other(),
                    slot = cp.slot_name,
                    theirs = cp.source_system_id,
                ));
                continue;
            }
        }
        if cp.slot_name == site.slot {
            continue;
        }
        let other = src
            .query_opt(
                "SELECT database::text, current_database()::text FROM pg_replication_slots \
                 WHERE slot_name = $1 AND database IS DISTINCT FROM current_database()",
                &[&cp.slot_name],
            )
            .await?;
        if let Some(r) = other {
            let (theirs, ours): (Option<String>, String) = (r.get(0), r.get(1));
            let theirs = theirs.unwrap_or_else(|| "another database".into());
            problems.push(format!(
                "{target}: tandem's control schema there already serves another pair of \
                 databases: its checkpoint for {source}'s changes is for slot {slot} of {source}'s \
                 database {theirs}, not for slot {ours_slot} of database {ours} in this config. \
                 One control schema serves one pair (its checkpoints, lock and echo marker are \
                 the pair's): sync {ours} with a database of its own; or, if the pair of {theirs} \
                 is gone, drop its slot on {source} (`SELECT pg_drop_replication_slot({lit})`) and \
                 run `tandem setup` again",
                target = source.other(),
                slot = cp.slot_name,
                ours_slot = site.slot,
                lit = crate::config::quote_literal(&cp.slot_name),
            ));
        }
    }
    Ok(())
}

/// The checkpoint of `source`'s changes on `target`, if the control schema is there yet.
async fn checkpoint_if_made(target: &Client, source: Side) -> Result<Option<Checkpoint>> {
    let made: bool = target
        .query_one("SELECT to_regclass('tandem.checkpoints') IS NOT NULL", &[])
        .await?
        .get(0);
    if !made {
        return Ok(None);
    }
    checkpoint::load(target, source).await
}

/// Both URLs reaching one database (`localhost` and `127.0.0.1`, a copied line) would sync it
/// with itself, both checkpoints in one control schema: refused before anything else is said of
/// it (by `setup`, and by `run`'s lock, taken on one database twice, whose config may have changed
/// since: it waited for itself).
pub async fn same_database(cfg: &Config, d: &Client, m: &Client) -> Result<Option<String>> {
    Ok(db::same_database(d, m).await?.then(|| {
        format!(
            "desktop ({}) and mobile ({}) are the same database; point one of the URLs at the \
             other side's database",
            crate::config::redact_url(&cfg.desktop.url),
            crate::config::redact_url(&cfg.mobile.url)
        )
    }))
}

/// The control schema on `target` (named `side`) has every migration this tandem knows: a newer
/// tandem started against an older schema would otherwise fail on its first query of a new
/// table or column, far from the cause.
pub async fn require_migrated(target: &Client, side: Side) -> Result<()> {
    if let Some(problem) = control_schema_access(target, side, None).await? {
        anyhow::bail!(problem);
    }
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    let have: Option<i32> = target
        .query_one("SELECT max(version) FROM tandem.schema_migrations", &[])
        .await
        .with_context(|| format!("{side}: reading tandem.schema_migrations; run `tandem setup`"))?
        .get(0);
    let have = have.unwrap_or(0);
    if have < latest {
        anyhow::bail!(
            "{side}: the tandem control schema is at version {have}, this tandem needs {latest}: \
             run `tandem setup` (it adds only what is missing; rows and checkpoints stay)"
        );
    }
    Ok(())
}

/// Apply the control-schema migrations not yet applied.
pub async fn migrate(c: &mut Client) -> Result<Vec<i32>> {
    let tx = c.transaction().await?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(7262373); \
         CREATE SCHEMA IF NOT EXISTS tandem; \
         CREATE TABLE IF NOT EXISTS tandem.schema_migrations \
            (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let mut applied = Vec::new();
    for (v, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM tandem.schema_migrations WHERE version = $1",
                &[v],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("migration {v}"))?;
            tx.execute(
                "INSERT INTO tandem.schema_migrations (version) VALUES ($1)",
                &[v],
            )
            .await?;
            applied.push(*v);
        }
    }
    tx.commit().await?;
    Ok(applied)
}

/// `t` as a publication on `side` lists it: with its column list and row filter.
pub(crate) fn publication_entry(cfg: &Config, t: &TableName, side: Side) -> String {
    // With a column list, the other columns are never sent: each side keeps its own.
    let cols = cfg.columns_of(t).map_or(String::new(), |cols| {
        let cols: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
        format!(" ({})", cols.join(", "))
    });
    // Rows that do not meet the filter are not sent; an update that moves a row out of it is
    // sent as a delete, one that moves it in as an insert.
    let rows = cfg
        .filter(t, side)
        .map_or(String::new(), |f| format!(" WHERE ({f})"));
    // `ONLY`: a table others inherit from is published alone (without, its children's changes
    // came under names the config may not hold, and `run` refused them for ever).
    format!("ONLY {}{cols}{rows}", t.quoted())
}

async fn sync_publication(
    cfg: &Config,
    c: &Client,
    site: &Site,
    tables: &[TableName],
) -> Result<bool> {
    let exists = c
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&site.publication],
        )
        .await?
        .is_some();
    let list = tables
        .iter()
        .map(|t| publication_entry(cfg, t, site.side))
        .collect::<Vec<_>>()
        .join(", ");
    let name = quote_ident(&site.publication);
    // A partitioned table's changes are sent as changes of the table itself, not of whichever
    // partition holds the row: the target applies them to its own table, partitioned the same
    // way or not (PostgreSQL 13+; without it they came under the partitions' names, which are
    // not configured).
    const VIA_ROOT: &str = "publish_via_partition_root = true";
    if !exists {
        let sql = if tables.is_empty() {
            format!("CREATE PUBLICATION {name} WITH ({VIA_ROOT})")
        } else {
            format!("CREATE PUBLICATION {name} FOR TABLE {list} WITH ({VIA_ROOT})")
        };
        c.batch_execute(&sql)
            .await
            .with_context(|| format!("{}: {sql}", site.side))?;
        return Ok(true);
    }
    c.batch_execute(&format!("ALTER PUBLICATION {name} SET ({VIA_ROOT})"))
        .await
        .with_context(|| format!("{}: updating publication {}", site.side, site.publication))?;
    if tables.is_empty() {
        let current = c
            .query("SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = $1", &[&site.publication])
            .await?;
        if !current.is_empty() {
            let names: Vec<String> = current.iter().map(|r| r.get(0)).collect();
            c.batch_execute(&format!(
                "ALTER PUBLICATION {name} DROP TABLE {}",
                names.join(", ")
            ))
            .await?;
        }
    } else {
        c.batch_execute(&format!("ALTER PUBLICATION {name} SET TABLE {list}"))
            .await
            .with_context(|| format!("{}: updating publication {}", site.side, site.publication))?;
    }
    Ok(false)
}

/// A config naming another slot for `site` than the one its checkpoint (on `target`) belongs to,
/// while that one still lives in this database: the slot is renamed. PostgreSQL has no rename, so
/// it is copied under the new name at its position, the checkpoint moves to the copy, and the old
/// one is dropped; nothing between the checkpoint and now is lost, and no slot is left behind.
/// Before, `setup` made a new slot at the current position, deleted the checkpoint (losing what
/// the source wrote since it, with a warning blaming a missing slot) and left the old slot keeping
/// the source's WAL for ever. Each step may be done again after a crash: a copy already made is
/// taken.
async fn rename_slot(src: &Client, target: &Client, site: &Site) -> Result<Option<String>> {
    let side = site.side;
    let Some(cp) = checkpoint_if_made(target, side).await? else {
        return Ok(None);
    };
    if cp.slot_name == site.slot {
        return Ok(None);
    }
    let old = src
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 \
             AND database = current_database() AND plugin = 'pgoutput'",
            &[&cp.slot_name],
        )
        .await?;
    let Some(old) = old else {
        return Ok(None);
    };
    if let Some(pid) = old.get::<_, Option<i32>>(0) {
        anyhow::bail!(
            "{side}: renaming slot {} to {}: server process {pid} is streaming it (a `tandem \
             run` with the old config?); stop it and run `tandem setup` again",
            cp.slot_name,
            site.slot
        );
    }
    let copied = src
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&site.slot],
        )
        .await?
        .is_some();
    if !copied {
        src.execute(
            "SELECT pg_copy_logical_replication_slot($1, $2)",
            &[&cp.slot_name, &site.slot],
        )
        .await
        .with_context(|| format!("{side}: copying slot {} to {}", cp.slot_name, site.slot))?;
    }
    checkpoint::move_to_slot(target, side, &site.slot).await?;
    src.execute("SELECT pg_drop_replication_slot($1)", &[&cp.slot_name])
        .await
        .with_context(|| format!("{side}: dropping slot {} once renamed", cp.slot_name))?;
    Ok(Some(format!(
        "{side}: renamed replication slot {} to {} (copied at its position; the checkpoint \
         moved with it)",
        cp.slot_name, site.slot
    )))
}

/// The slot's position, creating the slot when missing. `(lsn, created)`.
async fn ensure_slot(c: &Client, site: &Site) -> Result<(Lsn, bool)> {
    let row = c
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&site.slot],
        )
        .await?;
    if let Some(r) = row {
        let (plugin, db, lsn): (Option<String>, Option<String>, Option<String>) =
            (r.get(0), r.get(1), r.get(2));
        let here: String = c
            .query_one("SELECT current_database()::text", &[])
            .await?
            .get(0);
        if plugin.as_deref() != Some("pgoutput") || db.as_deref() != Some(here.as_str()) {
            anyhow::bail!(
                "{}: a replication slot named {} already exists for {} (plugin {}); choose another `slot` in [{}]",
                site.side,
                site.slot,
                db.unwrap_or_else(|| "a physical standby".into()),
                plugin.unwrap_or_else(|| "none".into()),
                site.side
            );
        }
        return Ok((lsn.unwrap_or_else(|| "0/0".into()).parse()?, false));
    }
    // Its own autocommit statement: a slot cannot be created in a transaction that has written.
    let r = c
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&site.slot],
        )
        .await
        .with_context(|| format!("{}: creating replication slot {}", site.side, site.slot))?;
    Ok((r.get::<_, String>(0).parse()?, true))
}

async fn identify(site: &Site) -> Result<(String, u32)> {
    let (_, system) = crate::source::stream::connect(site, "tandem setup".into()).await?;
    Ok((system.system_id, system.timeline))
}

/// Validate, then create everything. Returns what it did, a line each.
pub async fn setup(cfg: Arc<Config>) -> Result<Vec<String>> {
    setup_with(cfg, Options::default()).await
}

/// [`setup`], with the schema changes `opts` allows.
pub async fn setup_with(cfg: Arc<Config>, opts: Options) -> Result<Vec<String>> {
    let (mut d, mut m, plan) = validate_with(&cfg, opts).await?;
    let mut report: Vec<String> = plan
        .warnings
        .iter()
        .map(|w| format!("warning: {w}"))
        .collect();
    report.extend(plan.notes.iter().cloned());
    change_schema(&plan, &d, &m, &mut report).await?;
    for (c, side) in [(&mut d, Side::Desktop), (&mut m, Side::Mobile)] {
        let applied = migrate(c).await?;
        if !applied.is_empty() {
            report.push(format!(
                "{side}: created the tandem control schema (migrations {applied:?})"
            ));
        }
    }
    let mut created: Vec<(Side, &'static str, String)> = Vec::new();
    let result = create_replication(&cfg, &plan, &d, &m, &mut created, &mut report).await;
    if let Err(e) = result {
        // Leave nothing behind that keeps WAL or names tables.
        for (side, kind, name) in created.iter().rev() {
            let c = if *side == Side::Desktop { &d } else { &m };
            let sql = if *kind == "slot" {
                format!("SELECT pg_drop_replication_slot('{name}')")
            } else {
                format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name))
            };
            if let Err(err) = c.batch_execute(&sql).await {
                tracing::warn!(%side, "could not remove {kind} {name} after the failed setup: {err}");
            }
        }
        return Err(e);
    }
    Ok(report)
}

async fn create_replication(
    cfg: &Config,
    plan: &Plan,
    d: &Client,
    m: &Client,
    created: &mut Vec<(Side, &'static str, String)>,
    report: &mut Vec<String>,
) -> Result<()> {
    for side in Side::BOTH {
        let site = cfg.site(side);
        let c = if side == Side::Desktop { d } else { m };
        let target = if side == Side::Desktop { m } else { d };
        let from_here: Vec<TableName> = plan
            .tables
            .iter()
            .filter(|t| cfg.direction(t).flows_from(side))
            .cloned()
            .collect();
        if sync_publication(cfg, c, site, &from_here).await? {
            created.push((side, "publication", site.publication.clone()));
            report.push(format!(
                "{side}: created publication {} ({} tables)",
                site.publication,
                from_here.len()
            ));
        } else {
            report.push(format!(
                "{side}: publication {} lists {} tables",
                site.publication,
                from_here.len()
            ));
        }
        if let Some(line) = rename_slot(c, target, site).await? {
            report.push(line);
        }
        let (lsn, new_slot) = ensure_slot(c, site).await?;
        if new_slot {
            created.push((side, "slot", site.slot.clone()));
            report.push(format!(
                "{side}: created replication slot {} at {lsn}",
                site.slot
            ));
        }
        let (system_id, timeline) = identify(site).await?;
        let cp = Checkpoint {
            source_system_id: system_id,
            source_timeline: timeline as i32,
            slot_name: site.slot.clone(),
            lsn,
        };
        let old = checkpoint::load(target, side).await?;
        // Another database system's checkpoint is here only with `--replaced` (checked above).
        let replaced = old.as_ref().is_some_and(|o| {
            !o.source_system_id.is_empty() && o.source_system_id != cp.source_system_id
        });
        if new_slot || replaced {
            // A new slot starts a new history: any older checkpoint belonged to another slot.
            // One that was there means tandem streamed this side before, and what it wrote
            // between that checkpoint and the new slot will never be streamed.
            if let Some(old) = old {
                let what = if replaced {
                    format!(
                        "{side} is now database system {}, but {other} held tandem's checkpoint \
                         {at} for the changes of system {}",
                        cp.source_system_id,
                        old.source_system_id,
                        other = side.other(),
                        at = old.lsn,
                    )
                } else {
                    format!(
                        "slot {slot} was created again, but {other} held tandem's checkpoint \
                         {at} for {side}'s changes",
                        slot = site.slot,
                        other = side.other(),
                        at = old.lsn,
                    )
                };
                report.push(format!(
                    "WARNING {side}: {what}: what {side} changed after it (while the slot was \
                     missing, after a teardown, on a failover, or on the server it replaced) was \
                     never streamed to {other} and will not be. Once `tandem run` streams, bring \
                     {other} up to date: `tandem verify`, then `tandem repair --source {side}` \
                     (or `tandem snapshot --seed {side}` while run is stopped, which merges and \
                     so does not carry deletes over)",
                    other = side.other(),
                ));
            }
            checkpoint::delete(target, side).await?;
        }
        if checkpoint::init(target, side, &cp).await? {
            report.push(format!(
                "{}: checkpoint for {} starts at {lsn}",
                side.other(),
                side.direction_from()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_type_is_compared_without_the_schema_it_is_qualified_by() {
        use super::unqualified;
        for (ty, want) in [
            ("citext", "citext"),
            ("extensions.citext", "citext"),
            ("extensions.citext[]", "citext[]"),
            ("\"My Ext\".\"Odd.Type\"", "\"Odd.Type\""),
            ("\"Odd.Type\"[]", "\"Odd.Type\"[]"),
            ("numeric(10,2)", "numeric(10,2)"),
            ("timestamp(3) with time zone", "timestamp(3) with time zone"),
            ("character varying(20)[]", "character varying(20)[]"),
        ] {
            assert_eq!(unqualified(ty), want, "{ty}");
        }
    }

    #[test]
    fn integer_and_varchar_text_types_pair_up_and_the_narrower_side_is_named() {
        use super::same_values;
        use crate::side::Side;
        assert_eq!(same_values("integer", "bigint"), Some(Some(Side::Desktop)));
        assert_eq!(same_values("bigint", "smallint"), Some(Some(Side::Mobile)));
        assert_eq!(
            same_values("character varying(50)", "text"),
            Some(Some(Side::Desktop))
        );
        assert_eq!(
            same_values("character varying(80)", "character varying(50)"),
            Some(Some(Side::Mobile))
        );
        assert_eq!(same_values("text", "character varying"), Some(None));
        for (a, b) in [
            ("integer", "text"),
            ("integer", "numeric"),
            ("timestamp without time zone", "timestamp with time zone"),
            ("character(5)", "text"),
            ("real", "double precision"),
            ("integer[]", "bigint[]"),
            ("character varying(x)", "text"),
        ] {
            assert_eq!(same_values(a, b), None, "{a} / {b}");
        }
    }

    #[test]
    fn migrations_are_ascii_so_a_database_in_any_encoding_takes_them() {
        // The server converts the whole statement, comments included, to its encoding: a LATIN1
        // database refused migration 5 for an ellipsis in a comment.
        for (version, sql) in super::MIGRATIONS {
            assert!(sql.is_ascii(), "migration {version} has non-ASCII text");
        }
    }
}
