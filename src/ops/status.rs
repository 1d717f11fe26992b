//! `tandem status`: per direction, how far the target is and how far the source slot is confirmed,
//! what the target refuses, which tables are paused by a conflict, and the conflicts recorded.
//! Gathered into a [`Report`] first, then written as text ([`Report::text`]) or JSON.

use std::fmt::Write;

use anyhow::Result;
use serde::Serialize;
use tokio_postgres::Client;

use crate::apply::checkpoint::Refusal;
use crate::config::Config;
use crate::db;
use crate::side::Side;

#[derive(Debug, Serialize)]
pub struct Report {
    /// `running`, `not running` or `unknown`.
    pub run: &'static str,
    /// The session holding run's lock, or why that could not be read.
    pub run_detail: Option<String>,
    pub directions: Vec<Direction>,
}

/// One direction. A part is `None` when the side it is read from could not be reached
/// (`source_reachable`, `target_reachable`).
#[derive(Debug, Serialize)]
pub struct Direction {
    /// `D>M` or `M>D`.
    pub direction: &'static str,
    pub source: Side,
    pub target: Side,
    pub source_reachable: bool,
    pub target_reachable: bool,
    /// The checkpoint on the target; `None` there also when setup never made one.
    pub checkpoint: Option<String>,
    pub slot: Slot,
    /// The source's publication, which lists the tables that flow from it.
    pub publication: String,
    pub skip_pending: Option<String>,
    pub refusal: Option<Refusal>,
    pub not_published: Vec<String>,
    pub paused: Vec<Paused>,
    pub conflicts: Vec<Conflicts>,
}

#[derive(Debug, Serialize)]
pub struct Slot {
    pub name: String,
    /// On the source: `None` when it could not be reached.
    pub exists: Option<bool>,
    /// The slot's state below: `None` also when it does not exist.
    pub confirmed_flush_lsn: Option<String>,
    /// The source's WAL written past `confirmed_flush_lsn`.
    pub behind_bytes: Option<i64>,
    /// `pg_replication_slots.wal_status`: `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes left before `max_slot_wal_keep_size` (only set under it).
    pub safe_wal_size: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Paused {
    pub table: String,
    pub since: String,
    pub conflict_id: i64,
    pub kind: Option<String>,
    pub key: Option<String>,
    /// Changes of the table waiting in `tandem.held`.
    pub waiting: i64,
}

#[derive(Debug, Serialize)]
pub struct Conflicts {
    pub table: String,
    pub kind: String,
    pub resolution: String,
    pub count: i64,
}

/// One direction's part. `s` and `t` are the source and target connections; `None` for a side
/// that could not be reached.
async fn one(
    cfg: &Config,
    source: Side,
    s: Option<&Client>,
    t: Option<&Client>,
) -> Result<Direction> {
    let dir = source.direction_from();
    let mut d = Direction {
        direction: dir,
        source,
        target: source.other(),
        source_reachable: s.is_some(),
        target_reachable: t.is_some(),
        checkpoint: None,
        slot: Slot {
            name: cfg.site(source).slot.clone(),
            exists: None,
            confirmed_flush_lsn: None,
            behind_bytes: None,
            wal_status: None,
            safe_wal_size: None,
        },
        publication: cfg.site(source).publication.clone(),
        skip_pending: None,
        refusal: None,
        not_published: Vec::new(),
        paused: Vec::new(),
        conflicts: Vec::new(),
    };
    if let Some(s) = s {
        let row = s
            .query_opt(
                "SELECT confirmed_flush_lsn::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, \
                        wal_status, safe_wal_size \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&d.slot.name],
            )
            .await?;
        d.slot.exists = Some(row.is_some());
        if let Some(r) = row {
            d.slot.confirmed_flush_lsn = r.get(0);
            d.slot.behind_bytes = r.get(1);
            d.slot.wal_status = r.get(2);
            d.slot.safe_wal_size = r.get(3);
        }
        d.not_published = crate::sync::unpublished(cfg, s, source)
            .await?
            .iter()
            .map(ToString::to_string)
            .collect();
    }
    let Some(t) = t else {
        return Ok(d);
    };
    d.checkpoint = t
        .query_opt(
            "SELECT lsn::text FROM tandem.checkpoints WHERE direction = $1",
            &[&dir],
        )
        .await?
        .map(|r| r.get(0));
    // Old control schemas lack the column: nothing can be pending there.
    if let Ok(lsn) = crate::apply::checkpoint::skip_lsn(t, source).await {
        d.skip_pending = lsn.map(|l| l.to_string());
    }
    d.refusal = match crate::apply::checkpoint::refusal(t, source).await {
        Ok(r) => r,
        // Control schemas before migration 7: `run` would not have started on them.
        Err(e) if db::caused_by(&e, &tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(e),
    };
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
        d.paused.push(Paused {
            table: r.get(0),
            since: r.get(1),
            conflict_id: r.get(2),
            kind: r.get(3),
            key: r.get(4),
            waiting: r.get(5),
        });
    }
    for r in t
        .query(
            "SELECT table_name, kind, resolution, count(*) FROM tandem.conflicts \
             WHERE source_side = $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            &[&source.tag().to_string()],
        )
        .await?
    {
        d.conflicts.push(Conflicts {
            table: r.get(0),
            kind: r.get(1),
            resolution: r.get(2),
            count: r.get(3),
        });
    }
    Ok(d)
}

impl Report {
    /// The report for a person: one line per direction, then what needs attention.
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write_text(&mut out).expect("writing to a String");
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        match (self.run, &self.run_detail) {
            (state, Some(detail)) => writeln!(out, "run: {state} ({detail})")?,
            (state, None) => writeln!(out, "run: {state}")?,
        }
        for d in &self.directions {
            let (source, target) = (d.source, d.target);
            let cp = match (&d.checkpoint, d.target_reachable) {
                (_, false) => format!("unknown ({target} unreachable)"),
                (None, true) => "none (run setup)".to_string(),
                (Some(lsn), true) => lsn.clone(),
            };
            let slot = &d.slot;
            let state = match slot.exists {
                None => format!("unknown ({source} unreachable)"),
                Some(false) => format!(
                    "MISSING: what {source} wrote after the checkpoint cannot be streamed; run \
                     `tandem setup`, then `tandem verify` and `tandem repair --source {source}`"
                ),
                Some(true) => format!(
                    "confirmed {}, {} bytes behind {source}'s WAL{}",
                    slot.confirmed_flush_lsn.as_deref().unwrap_or_default(),
                    slot.behind_bytes.unwrap_or(0),
                    match (slot.wal_status.as_deref(), slot.safe_wal_size) {
                        (Some("lost"), _) => "; INVALIDATED by the server (WAL it needed was \
                                              removed): `tandem run` says how to resynchronise"
                            .to_string(),
                        (Some("unreserved"), _) => "; past max_slot_wal_keep_size: the server \
                                                    removes WAL it needs at its next checkpoint"
                            .to_string(),
                        (_, Some(safe)) => {
                            format!(", {safe} bytes before max_slot_wal_keep_size")
                        }
                        _ => String::new(),
                    }
                ),
            };
            writeln!(
                out,
                "{} ({source} → {target}): checkpoint {cp} on {target}; slot {} {state}",
                d.direction, slot.name
            )?;
            if let Some(lsn) = &d.skip_pending {
                writeln!(
                    out,
                    "  SKIP PENDING: the {source} transaction committing at {lsn} will be left \
                     out of {target} when `tandem run` reaches it (`tandem skip --from {source} \
                     --clear` withdraws it)"
                )?;
            }
            if let Some(r) = &d.refusal {
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
            for table in &d.not_published {
                writeln!(
                    out,
                    "  NOT PUBLISHED {table}: it matches [replication] tables but is not in \
                     publication {}, so its changes are not sent; run `tandem setup`",
                    d.publication
                )?;
            }
            for p in &d.paused {
                writeln!(
                    out,
                    "  PAUSED {} since {}: conflict {} ({} at key {}), {} change(s) waiting; \
                     run `tandem resolve --table {} --take desktop|mobile|skip`",
                    p.table,
                    p.since,
                    p.conflict_id,
                    p.kind.as_deref().unwrap_or_default(),
                    p.key.as_deref().unwrap_or_default(),
                    p.waiting,
                    p.table
                )?;
            }
            for c in &d.conflicts {
                writeln!(
                    out,
                    "  conflicts on {target}: {} {} {}: {}",
                    c.table, c.kind, c.resolution, c.count
                )?;
            }
        }
        Ok(())
    }
}

/// The report, and the error of a side that could not be reached: what the other side holds is
/// still worth seeing during an outage. Both unreachable is an error of its own.
pub async fn status(cfg: &Config) -> Result<(Report, Option<anyhow::Error>)> {
    let d = db::connect(&cfg.desktop, "tandem status").await;
    let m = db::connect(&cfg.mobile, "tandem status").await;
    let (d, m, unreachable) = match (d, m) {
        (Ok(d), Ok(m)) => (Some(d), Some(m), None),
        (Ok(d), Err(e)) => (Some(d), None, Some(e)),
        (Err(e), Ok(m)) => (None, Some(m), Some(e)),
        (Err(e), Err(_)) => return Err(e),
    };
    // The lock is held on both sides: either tells.
    let c = d.as_ref().or(m.as_ref()).expect("one side reached");
    let (run, run_detail) = match crate::lease::holder(c, cfg).await {
        Ok(Some(who)) => ("running", Some(who)),
        Ok(None) => ("not running", None),
        Err(e) => ("unknown", Some(e.to_string())),
    };
    let directions = async {
        Ok::<_, anyhow::Error>(vec![
            one(cfg, Side::Desktop, d.as_ref(), m.as_ref()).await?,
            one(cfg, Side::Mobile, m.as_ref(), d.as_ref()).await?,
        ])
    }
    .await;
    match (directions, unreachable) {
        (Ok(directions), unreachable) => Ok((
            Report {
                run,
                run_detail,
                directions,
            },
            unreachable,
        )),
        // Nothing to show of the reachable side either (no setup there, say): the unreachable
        // side is the error that explains most.
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e),
    }
}
