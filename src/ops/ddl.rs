//! `tandem ddl`: a schema change made on one side and run on the other at the same point of the
//! stream, as pglogical's `replicate_ddl_command` does. Logical replication carries no DDL, so
//! otherwise the operator must change the receiving side first by hand, and a change written
//! with a new column before the other side has it is refused.
//!
//! One transaction on the side named records the statement in that side's `tandem.ddl`, writes a
//! `tandem-ddl` logical message with the row's id, and runs the statement. `run` meets the
//! message in that side's stream after every change committed before it, and runs the statement
//! on the other side inside the group that applies them, before any change after it (those the
//! statement itself made included).

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};
use tokio_postgres::{Client, GenericClient};

use crate::apply::conflict::Policy;
use crate::config::{quote_ident, Config, Direction, Site, TableName};
use crate::db;
use crate::event::Change;
use crate::side::Side;
use crate::source::assemble::DDL_PREFIX;

/// Run `sql` on `on` and queue it for the other side. One line saying what was done.
pub async fn ddl(cfg: &Config, on: Side, sql: &str) -> Result<String> {
    let other = on.other();
    if sql.trim().is_empty() {
        bail!("no statement given: pass the schema change, e.g. `tandem ddl --on {on} \"ALTER TABLE public.jobs ADD COLUMN note text\"`");
    }
    if !cfg.streams(on) {
        bail!(
            "no configured table flows from {on}, so `tandem run` does not stream {on} and would \
             never carry this change to {other}: run it with `--on {other}`"
        );
    }
    let site = cfg.site(on);
    let mut c = db::connect(site, "tandem ddl").await?;
    crate::ops::setup::require_migrated(&c, on).await?;
    let slot: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&site.slot],
        )
        .await?
        .get(0);
    if !slot {
        bail!(
            "{on}: replication slot {} does not exist, so nothing would carry this change to \
             {other}; run `tandem setup` first",
            site.slot
        );
    }
    let tx = c.transaction().await?;
    let (id, xid): (i64, String) = tx
        .query_one(
            "INSERT INTO tandem.ddl (sql) VALUES ($1) RETURNING id, xid::text",
            &[&sql],
        )
        .await
        .context("recording the schema change in tandem.ddl")
        .map(|r| (r.get(0), r.get(1)))?;
    // The message before the statement: rows the statement itself writes (an UPDATE filling a
    // new column) come after it in the stream, when the other side has the column.
    tx.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&DDL_PREFIX, &id.to_string()],
    )
    .await?;
    let before = before(cfg, &tx).await?;
    // Not its text in the error: a statement may carry a password (`ALTER ROLE …`).
    tx.batch_execute(sql).await.with_context(|| {
        format!("{on}: the statement failed; nothing was changed on either side")
    })?;
    // A COMMIT or ROLLBACK in the text ended this transaction part way: on the other side it
    // would end `run`'s (its rows and checkpoint, and the marker that keeps them from coming
    // back). Its row then stays incomplete, and `run` never runs it.
    let now: Option<String> = tx
        .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
        .await?
        .get(0);
    if now.as_deref() != Some(xid.as_str()) {
        drop(tx);
        bail!(
            "{on}: the statement ended tandem's transaction (a COMMIT or ROLLBACK in it), so \
             part of it may be committed on {on} on its own; none of it will be run on \
             {other}. Pass statements without transaction control: they run in one \
             transaction on each side"
        );
    }
    let created = after_statement(cfg, &tx, on, &before, false)
        .await
        .map_err(|e| {
            e.context("the schema change was rolled back; nothing was changed on either side")
        })?;
    tx.execute(
        "UPDATE tandem.ddl SET complete = true WHERE id = $1",
        &[&id],
    )
    .await?;
    tx.commit().await?;
    let mut out = format!(
        "{on}: ran it (schema change {id}); `tandem run` runs it on {other} right after the \
         {on} changes committed before it, and before any after it"
    );
    for line in created {
        out.push('\n');
        out.push_str(&line);
    }
    Ok(out)
}

/// The schema change (with its statement) a `tandem-ddl` message in transaction `xid` names,
/// when `tandem ddl` wrote it: its row in the source's `tandem.ddl`, written by that very
/// transaction and complete. Any role may write a logical message, but only tandem's may add rows
/// there, so a message without its row (or one naming another transaction's row, to run it
/// again) is not taken.
pub async fn issued(site: &Site, xid: u32, id: i64) -> Result<Option<Change>> {
    let c: Client = db::connect(site, "tandem ddl").await?;
    let row = c
        .query_opt(
            "SELECT sql, search_path FROM tandem.ddl \
             WHERE id = $1 AND (xid::text::numeric % 4294967296)::int8 = $2 AND complete",
            &[&id, &i64::from(xid)],
        )
        .await
        .with_context(|| format!("{}: reading tandem.ddl", site.side))?;
    Ok(row.map(|r| Change::Ddl {
        id,
        sql: r.get(0),
        search_path: r.get(1),
    }))
}

/// A table a schema change created (or whose replica identity it changed) that the config takes
/// in, but could not flow as it is (no key, no old rows its conflict policy needs, …): on the
/// other side, a refusal of that transaction.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unpublishable(pub String);

/// The tables as a schema change found them: every table's OID (what is not among them after it
/// was created by it), the configured ones by OID (those gone after it were dropped by it), and
/// those ones' columns by number (`(table OID, attnum, name)`: renamed or dropped by it, after).
pub(crate) struct Before {
    oids: HashSet<u32>,
    configured: Vec<(u32, TableName)>,
    columns: (Vec<u32>, Vec<i16>, Vec<String>),
    /// Those ones' replica identities (see [`identities`]): one it changed is checked after it.
    identities: HashMap<u32, String>,
}

/// Read [`Before`], in the schema change's transaction before its statement.
pub(crate) async fn before(cfg: &Config, c: &impl GenericClient) -> Result<Before> {
    let configured = configured(cfg, c).await?;
    let oids: Vec<u32> = configured.iter().map(|(oid, _)| *oid).collect();
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for r in c
        .query(
            "SELECT attrelid, attnum, attname::text FROM pg_attribute \
             WHERE attrelid = ANY ($1::oid[]) AND attnum > 0 AND NOT attisdropped",
            &[&oids],
        )
        .await?
    {
        columns.0.push(r.get(0));
        columns.1.push(r.get(1));
        columns.2.push(r.get(2));
    }
    Ok(Before {
        oids: table_oids(c).await?,
        identities: identities(c, &oids).await?,
        configured,
        columns,
    })
}

/// For each of `oids`, its replica identity and its partitions' (`relreplident` and the index's
/// OID), in one string: what an `ALTER TABLE … REPLICA IDENTITY` changes.
async fn identities(c: &impl GenericClient, oids: &[u32]) -> Result<HashMap<u32, String>> {
    Ok(c.query(
        "SELECT u.oid, string_agg(c.relreplident::text || coalesce(i.indexrelid::text, ''), ',' \
                                  ORDER BY c.oid) \
         FROM unnest($1::oid[]) u(oid) \
         CROSS JOIN LATERAL (SELECT u.oid AS r UNION ALL \
                             SELECT relid FROM pg_partition_tree(u.oid::regclass) WHERE level > 0) x \
         JOIN pg_class c ON c.oid = x.r \
         LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisreplident \
         GROUP BY u.oid",
        &[&oids],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// The configured tables there are, with their OIDs (in one query, however many).
async fn configured(cfg: &Config, c: &impl GenericClient) -> Result<Vec<(u32, TableName)>> {
    let tables = crate::catalog::expand(c, &cfg.tables).await?;
    let quoted: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let oids: Vec<Option<u32>> = c
        .query(
            "SELECT to_regclass(t)::oid FROM unnest($1::text[]) WITH ORDINALITY u(t, i) ORDER BY i",
            &[&quoted],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(oids
        .into_iter()
        .zip(tables)
        .filter_map(|(oid, t)| Some((oid?, t)))
        .collect())
}

async fn table_oids(c: &impl GenericClient) -> Result<HashSet<u32>> {
    let oids: Vec<u32> = c
        .query_one(
            "SELECT coalesce(array_agg(oid), '{}') FROM pg_class WHERE relkind IN ('r', 'p')",
            &[],
        )
        .await?
        .get(0);
    Ok(oids.into_iter().collect())
}

/// After a schema change on `side`, in its transaction:
/// - each table it created that the config's patterns (`public.*`) take in is put in `side`'s
///   publication when it flows from `side`, as `setup` would have put it, and, `by_run` on the
///   other side, recorded as synchronised (it starts the same on both sides, made by the same
///   statement), so that it flows at once, without `setup`, a restart or an initial snapshot.
///   What it lacks for that (a key, old rows its conflict policy compares, the version column)
///   is an error, before anything is committed;
/// - each configured table it dropped is no longer recorded as synchronised here (one made again
///   later otherwise than with `tandem ddl` is copied by the next initial snapshot), and one it
///   renamed is recorded under its new name (not copied again).
///
/// One line per table created, saying what was done.
pub(crate) async fn after_statement(
    cfg: &Config,
    c: &impl GenericClient,
    side: Side,
    before: &Before,
    by_run: bool,
) -> Result<Vec<String>> {
    // The record of a table's initial snapshot goes with the table: under its new name when
    // the statement renamed it, away when it dropped it (or renamed it out of the config).
    let now = configured(cfg, c).await?;
    let forget = "DELETE FROM tandem.snapshots WHERE table_name = $1";
    for (oid, was) in &before.configured {
        match now.iter().find(|(o, _)| o == oid) {
            Some((_, name)) if name == was => {}
            Some((_, name)) => {
                // A record under the new name is an earlier table's of that name.
                c.execute(forget, &[&name.to_string()]).await?;
                c.execute(
                    "UPDATE tandem.snapshots SET table_name = $2 WHERE table_name = $1",
                    &[&was.to_string(), &name.to_string()],
                )
                .await?;
            }
            None => {
                c.execute(forget, &[&was.to_string()]).await?;
                // The other side's changes of it still on their way are left out here
                // (`Applier::target_table`), not refused for a table that is gone.
                c.execute(
                    "INSERT INTO tandem.dropped (table_name) VALUES ($1) \
                     ON CONFLICT (table_name) DO UPDATE SET dropped_at = now()",
                    &[&was.to_string()],
                )
                .await?;
            }
        }
    }
    // Renamed, in the config or out of it: the other side's rows still under the old name until
    // the rename reaches it go to the table by its OID (`Applier::target_table`). One statement
    // for all of them, however many tables the config takes in.
    let (oids, olds): (Vec<u32>, Vec<String>) = before
        .configured
        .iter()
        .map(|(oid, was)| (*oid, was.to_string()))
        .unzip();
    c.execute(
        "INSERT INTO tandem.renamed (old_name, new_name, table_oid) \
         SELECT u.was, format('%s.%s', n.nspname, c.relname), c.oid \
         FROM unnest($1::oid[], $2::text[]) AS u(oid, was) JOIN pg_class c ON c.oid = u.oid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE format('%s.%s', n.nspname, c.relname) <> u.was \
         ON CONFLICT (old_name) DO UPDATE SET new_name = EXCLUDED.new_name, \
         table_oid = EXCLUDED.table_oid, renamed_at = now()",
        &[&oids, &olds],
    )
    .await?;
    // Likewise the other side's rows naming a column the statement renamed or dropped: they go
    // to the column under its name now, or leave the value out (`Applier::target_table`).
    let (tables, numbers, names) = &before.columns;
    c.execute(
        "INSERT INTO tandem.renamed_columns (table_oid, old_name, attnum) \
         SELECT u.rel, u.was, u.num FROM unnest($1::oid[], $2::int2[], $3::text[]) AS u(rel, num, was) \
         JOIN pg_attribute a ON a.attrelid = u.rel AND a.attnum = u.num \
         WHERE a.attisdropped OR a.attname::text <> u.was \
         ON CONFLICT (table_oid, old_name) DO UPDATE SET attnum = EXCLUDED.attnum, changed_at = now()",
        &[tables, numbers, names],
    )
    .await?;
    // A table whose replica identity it changed: what `setup` would refuse of it now (`NOTHING`,
    // an index without the key, not `FULL` where old rows are needed) is refused here, before
    // `run` meets the table's next change logged so, which no fix could apply then.
    let kept: Vec<u32> = now
        .iter()
        .map(|(oid, _)| *oid)
        .filter(|oid| before.identities.contains_key(oid))
        .collect();
    for (oid, identity) in identities(c, &kept).await? {
        if before.identities.get(&oid) == Some(&identity) {
            continue;
        }
        let Some((_, t)) = now.iter().find(|(o, _)| *o == oid) else {
            continue;
        };
        if let Some(problem) = check_created(cfg, c, side, t).await? {
            return Err(Unpublishable(problem).into());
        }
    }
    let mut lines = Vec::new();
    for (oid, t) in now {
        if before.oids.contains(&oid) {
            continue;
        }
        let publication = &cfg.site(side).publication;
        let direction = cfg.direction(&t);
        // On both sides whichever way it flows: the first side then refuses what the other
        // would, before anything is committed.
        if let Some(problem) = check_created(cfg, c, side, &t).await? {
            return Err(Unpublishable(problem).into());
        }
        // The statement may have added it itself.
        let listed: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p \
                 ON p.oid = pr.prpubid WHERE p.pubname = $1 AND pr.prrelid = $2)",
                &[publication, &oid],
            )
            .await?
            .get(0);
        if direction.flows_from(side) && !listed {
            let entry = crate::ops::setup::publication_entry(cfg, &t, side);
            c.batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {entry}",
                quote_ident(publication)
            ))
            .await
            .with_context(|| format!("{side}: adding {t}, which the schema change created, to publication {publication}"))?;
            if cfg.filter(&t, side).is_some() {
                // PostgreSQL refuses the application's every UPDATE and DELETE of a table whose
                // row filter reads columns outside its replica identity: refuse it here first.
                c.batch_execute(&format!("DELETE FROM {} WHERE false", t.quoted()))
                    .await
                    .with_context(|| {
                        format!(
                            "{side}: [replication.filter.\"{t}\"] {} uses a column outside \
                             the replica identity of {t}, so PostgreSQL would refuse every UPDATE \
                             and DELETE on it; filter on key columns, or make the table REPLICA \
                             IDENTITY FULL in the same statement",
                            side.direction_key()
                        )
                    })?;
            }
        }
        // Only `run` records it synchronised: that it made the table from the stream proves its
        // configuration takes the table in, so every change after the statement is applied.
        // (One started before the table was added to an explicit list would leave them out.)
        if by_run {
            crate::ops::snapshot::mark_created(c, &t, side).await?;
        }
        let flows = match direction {
            Direction::Both => "both ways",
            Direction::DesktopToMobile => "from desktop to mobile",
            Direction::MobileToDesktop => "from mobile to desktop",
        };
        lines.push(if direction.flows_from(side) {
            format!("{side}: {t} was created and flows {flows}: added to publication {publication}")
        } else {
            format!("{side}: {t} was created and flows {flows}")
        });
        if direction == Direction::Both {
            if let Some(col) = sequence_key(c, &t).await? {
                lines.push(format!(
                    "{side}: {t}'s key column `{col}` comes from a sequence, so rows inserted on \
                     both sides collide; run `tandem setup --sequences odd-even` (desktop odd, \
                     mobile even) once it is on both sides, or use UUID keys"
                ));
            }
        }
    }
    Ok(lines)
}

/// What `setup` would have refused of a table it puts in `side`'s publication, one side's part
/// of it (the other side checks its own when it runs the statement).
async fn check_created(
    cfg: &Config,
    c: &impl GenericClient,
    side: Side,
    t: &TableName,
) -> Result<Option<String>> {
    let Some(tt) = crate::catalog::table(c, t).await? else {
        return Ok(None);
    };
    let identity_full = crate::ops::setup::not_identity_full(c, t).await?.is_empty();
    if tt.key.is_empty() {
        if cfg.columns_of(t).is_some() {
            return Ok(Some(format!(
                "{side}: {t} has no primary key, so its rows are found by all their values, and \
                 PostgreSQL 15 then sends updates and deletes only when every column flows, yet \
                 [replication.columns] lists some: give it a primary key in the statement"
            )));
        }
        if !identity_full {
            return Ok(Some(format!(
                "{side}: {t} has no primary key (or replica identity index), so tandem finds its \
                 rows by all their values, which needs REPLICA IDENTITY FULL: add a primary key, \
                 or `ALTER TABLE {} REPLICA IDENTITY FULL` to the statement",
                t.quoted()
            )));
        }
        return Ok(None);
    }
    if crate::ops::setup::replica_identity(c, t).await?.as_deref() == Some("n") {
        return Ok(Some(format!(
            "{side}: {t} has REPLICA IDENTITY NOTHING, so its updates and deletes cannot be \
             replicated; leave that out of the statement"
        )));
    }
    let short = crate::ops::setup::identity_short_of_key(c, t, &tt).await?;
    if !short.is_empty() {
        return Ok(Some(crate::ops::setup::identity_short_problem(
            side, t, &tt, &short,
        )));
    }
    if let Some(listed) = cfg.columns_of(t) {
        let unlisted = crate::ops::setup::unlisted_key(&tt, listed);
        if !unlisted.is_empty() {
            return Ok(Some(format!(
                "{side}: [replication.columns] of {t} must list its key column(s) {}: without \
                 them neither side could update or delete its rows",
                unlisted.join(", ")
            )));
        }
    }
    let Some(tc) = cfg.conflicts_for(t) else {
        return Ok(None);
    };
    if tc.policy.needs_old_row() && !identity_full {
        return Ok(Some(format!(
            "{side}: {t} uses conflict policy {}, which needs the old row of every change: add \
             `ALTER TABLE {} REPLICA IDENTITY FULL` to the statement",
            tc.policy.as_str(),
            t.quoted()
        )));
    }
    if tc.policy == Policy::LastWriteWins {
        let v = tc.version_column.clone().unwrap_or_default();
        if !tt.columns.iter().any(|col| col.name == v) {
            if !crate::ops::setup::commit_timestamps_usable(c).await? {
                return Ok(Some(format!(
                    "{side}: {t} has no column `{v}`, which last_write_wins compares: add it to \
                     the statement (a timestamp or number every change increases), or give the \
                     table another policy or version column in [conflicts.tables]"
                )));
            }
        } else if !cfg.column_flows(t, &v) {
            return Ok(Some(format!(
                "{side}: last_write_wins compares `{v}` of {t}, which [replication.columns] \
                 leaves out; add it to the list"
            )));
        }
    }
    Ok(None)
}

/// The key column of `t` that a sequence fills (serial, identity), if any.
async fn sequence_key(c: &impl GenericClient, t: &TableName) -> Result<Option<String>> {
    let Some(tt) = crate::catalog::table(c, t).await? else {
        return Ok(None);
    };
    for &k in &tt.key {
        let col = &tt.columns[k].name;
        let seq: Option<String> = c
            .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&t.quoted(), col])
            .await?
            .get(0);
        if seq.is_some() {
            return Ok(Some(col.clone()));
        }
    }
    Ok(None)
}
