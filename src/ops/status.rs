//! `tandem status`: per direction, how far the target is and how far the source slot is confirmed,
//! which tables are paused by a conflict, and the conflicts recorded.

use std::fmt::Write;

use anyhow::Result;
use tokio_postgres::Client;

use crate::config::Config;
use crate::db;
use crate::side::Side;

/// One direction's lines. `s` and `t` are the source and target connections; `None` for a side
/// that could not be reached, whose part is then said to be unknown.
async fn one(
    out: &mut String,
    cfg: &Config,
    source: Side,
    s: Option<&Client>,
    t: Option<&Client>,
) -> Result<()> {
    let dir = source.direction_from();
    let target = source.other();
    let cp = match t {
        Some(t) => t
            .query_opt(
                "SELECT lsn::text FROM tandem.checkpoints WHERE direction = $1",
                &[&dir],
            )
            .await?
            .map_or("none (run setup)".to_string(), |r| r.get(0)),
        None => format!("unknown ({target} unreachable)"),
    };
    let slot = &cfg.site(source).slot;
    let lag = match s {
        Some(s) => Some(
            s.query_opt(
                "SELECT confirmed_flush_lsn::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, \
                        wal_status, safe_wal_size \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await?,
        ),
        None => None,
    };
    writeln!(
        out,
        "{dir} ({source} → {target}): checkpoint {cp} on {target}; slot {slot} {}",
        match lag {
            None => format!("unknown ({source} unreachable)"),
            Some(Some(r)) => format!(
                "confirmed {}, {} bytes behind {source}'s WAL{}",
                r.get::<_, Option<String>>(0).unwrap_or_default(),
                r.get::<_, Option<i64>>(1).unwrap_or(0),
                match (
                    r.get::<_, Option<String>>(2).as_deref(),
                    r.get::<_, Option<i64>>(3)
                ) {
                    (Some("lost"), _) => "; INVALIDATED by the server (WAL it needed was \
                                          removed): `tandem run` says how to resynchronise"
                        .to_string(),
                    (Some("unreserved"), _) => "; past max_slot_wal_keep_size: the server \
                                                removes WAL it needs at its next checkpoint"
                        .to_string(),
                    // Only set under max_slot_wal_keep_size.
                    (_, Some(safe)) => format!(", {safe} bytes before max_slot_wal_keep_size"),
                    _ => String::new(),
                }
            ),
            Some(None) => format!(
                "MISSING: what {source} wrote after the checkpoint cannot be streamed; run \
                 `tandem setup`, then `tandem verify` and `tandem repair --source {source}`"
            ),
        }
    )?;
    let Some(t) = t else {
        return Ok(());
    };
    // Old control schemas lack the column: nothing can be pending there.
    if let Ok(Some(lsn)) = crate::apply::checkpoint::skip_lsn(t, source).await {
        writeln!(
            out,
            "  SKIP PENDING: the {source} transaction committing at {lsn} will be left out of \
             {target} when `tandem run` reaches it (`tandem skip --from {source} --clear` \
             withdraws it)"
        )?;
    }
    match crate::apply::checkpoint::refusal(t, source).await {
        Ok(Some(r)) => {
            let head = if r.stopped {
                format!("REFUSED: `tandem run` stopped at {} on it", r.last_at)
            } else {
                format!(
                    "STALLED since {}, {} {}, the last at {} ([replication] on_refusal = \
                     \"retry\": `run` tries it again while it runs)",
                    r.since,
                    r.tries,
                    if r.tries == 1 { "try" } else { "tries" },
                    r.last_at
                )
            };
            writeln!(out, "  {head}:")?;
            for line in r.error.lines() {
                writeln!(out, "    {line}")?;
            }
        }
        Ok(None) => {}
        // Control schemas before migration 7: `run` would not have started on them.
        Err(e) if db::caused_by(&e, &tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {}
        Err(e) => return Err(e),
    }
    let unpublished = match s {
        Some(s) => crate::sync::unpublished(cfg, s, source).await?,
        None => Vec::new(),
    };
    for table in unpublished {
        writeln!(
            out,
            "  NOT PUBLISHED {table}: it matches [replication] tables but is not in publication \
             {}, so its changes are not sent; run `tandem setup`",
            cfg.site(source).publication
        )?;
    }
    for r in t
        .query(
            "SELECT p.table_name, p.since::text, p.conflict_id, c.kind, c.key::text, \
             (SELECT count(*) FROM tandem.held h WHERE h.direction = p.direction AND h.table_name = p.table_name) \
             FROM tandem.paused p LEFT JOIN tandem.conflicts c ON c.id = p.conflict_id \
             WHERE p.direction = $1 ORDER BY 1",
            &[&dir],
        )
        .await?
    {
        let table: String = r.get(0);
        writeln!(
            out,
            "  PAUSED {table} since {}: conflict {} ({} at key {}), {} change(s) waiting; \
             run `tandem resolve --table {table} --take desktop|mobile|skip`",
            r.get::<_, String>(1),
            r.get::<_, i64>(2),
            r.get::<_, Option<String>>(3).unwrap_or_default(),
            r.get::<_, Option<String>>(4).unwrap_or_default(),
            r.get::<_, i64>(5)
        )?;
    }
    for r in t
        .query(
            "SELECT table_name, kind, resolution, count(*) FROM tandem.conflicts \
             WHERE source_side = $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            &[&source.tag().to_string()],
        )
        .await?
    {
        writeln!(
            out,
            "  conflicts on {target}: {} {} {}: {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i64>(3)
        )?;
    }
    Ok(())
}

/// The report, and the error of a side that could not be reached: what the other side holds is
/// still worth seeing during an outage. Both unreachable is an error of its own.
pub async fn status(cfg: &Config) -> Result<(String, Option<anyhow::Error>)> {
    let d = db::connect(&cfg.desktop, "tandem status").await;
    let m = db::connect(&cfg.mobile, "tandem status").await;
    let (d, m, unreachable) = match (d, m) {
        (Ok(d), Ok(m)) => (Some(d), Some(m), None),
        (Ok(d), Err(e)) => (Some(d), None, Some(e)),
        (Err(e), Ok(m)) => (None, Some(m), Some(e)),
        (Err(e), Err(_)) => return Err(e),
    };
    let mut out = String::new();
    // The lock is held on both sides: either tells.
    if let Some(c) = d.as_ref().or(m.as_ref()) {
        match crate::lease::holder(c, cfg).await {
            Ok(Some(who)) => writeln!(out, "run: running ({who})")?,
            Ok(None) => writeln!(out, "run: not running")?,
            Err(e) => writeln!(out, "run: unknown ({e})")?,
        }
    }
    let report = async {
        one(&mut out, cfg, Side::Desktop, d.as_ref(), m.as_ref()).await?;
        one(&mut out, cfg, Side::Mobile, m.as_ref(), d.as_ref()).await
    }
    .await;
    match (report, unreachable) {
        (Ok(()), unreachable) => Ok((out, unreachable)),
        // Nothing to show of the reachable side either (no setup there, say): the unreachable
        // side is the error that explains most.
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e),
    }
}
