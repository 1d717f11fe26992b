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

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use crate::config::{Config, Site};
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
    tx.execute(
        "UPDATE tandem.ddl SET complete = true WHERE id = $1",
        &[&id],
    )
    .await?;
    tx.commit().await?;
    Ok(format!(
        "{on}: ran it (schema change {id}); `tandem run` runs it on {other} right after the \
         {on} changes committed before it, and before any after it"
    ))
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
