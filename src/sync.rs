//! `tandem run`: one loop per direction — stream the source's slot, assemble events, apply them
//! to the other side, commit the checkpoint with them, then confirm the source slot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::watch;

use crate::apply::plan::BindError;
use crate::apply::{checkpoint, Applier, LocalRace, SidesDisagree};
use crate::config::{Config, OnRefusal, TableName};
use crate::db;
use crate::event::Change;
use crate::lsn::Lsn;
use crate::side::Side;
use crate::sink::kafka::TxnEnd;
use crate::source::assemble::{Assembler, Item, Names, DDL_PREFIX};
use crate::source::pgoutput::{Begin, Message};
use crate::source::stream::{check_no_gap, SourceStream, StreamEvent, StreamMode};
use crate::source::streamed::Live;
use crate::source::walsender::WalError;

/// A group of source transactions shares one target commit for at most this long…
const GROUP_MAX_AGE: Duration = Duration::from_millis(15);
/// …or this many changes.
const GROUP_MAX_CHANGES: u64 = 20_000;
/// Once the source has said it sent everything (a keepalive between transactions), the group
/// commits as soon as it is this old. Not at once: a caught-up walsender sends a keepalive after
/// nearly every transaction, and a target commit per source transaction is exactly the cost
/// batching avoids; this bounds commits to ~100/s while keeping steady-state lag near 10 ms.
const GROUP_IDLE_AGE: Duration = Duration::from_millis(10);
/// Progress through transactions that needed nothing applied (tandem's own echoes, empty or
/// filtered transactions, idle keepalives) is written to the checkpoint only once it is this far
/// ahead. Writing it costs the target a little WAL of its own, which the other direction then
/// sees as progress: a threshold larger than one such write keeps the two directions from
/// bouncing checkpoint writes at each other forever on idle databases.
pub const IDLE_RECORD_BYTES: u64 = 64 * 1024;

/// Live counters of one direction, for status displays and tests.
#[derive(Debug, Default)]
pub struct Progress {
    pub changes: AtomicU64,
    pub transactions: AtomicU64,
    pub checkpoint: AtomicU64,
    /// Streaming (started, checked for gaps) right now.
    pub streaming: AtomicBool,
    /// How many times streaming started (reconnects after the first).
    pub starts: AtomicU64,
    /// Why the direction is reconnecting (the last transient error), until it streams again.
    pub retrying: std::sync::Mutex<Option<String>>,
    /// `on_refusal = "retry"`: what the target refused, and the checkpoint it was refused at.
    /// It stands while the checkpoint is there (moved past, the transaction got through or was
    /// left out), so commits need not clear it.
    refused: std::sync::Mutex<Option<(Lsn, String)>>,
}

impl Progress {
    pub fn checkpoint(&self) -> Lsn {
        Lsn(self.checkpoint.load(Ordering::Relaxed))
    }

    /// The direction's checkpoint and counts after a commit came back.
    fn report(&self, checkpoint: Lsn, stats: &crate::apply::ApplyStats) {
        self.checkpoint.store(checkpoint.0, Ordering::Relaxed);
        self.changes.store(stats.changes, Ordering::Relaxed);
        self.transactions
            .store(stats.transactions, Ordering::Relaxed);
    }

    /// The target refuses what comes after `at`: `/health` says so until the checkpoint moves.
    pub(crate) fn set_refused(&self, at: Lsn, why: String) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some((at, why));
    }

    /// What the target refuses, while this direction waits to try it again (see `refused`).
    pub fn refused(&self) -> Option<String> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused
            .as_ref()
            .filter(|(at, _)| self.checkpoint() <= *at)
            .map(|(_, why)| why.clone())
    }
}

/// Set or clear one of the reasons `/health` shows (a poisoned lock still holds a string).
fn set_reason(slot: &std::sync::Mutex<Option<String>>, why: Option<String>) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = why;
}

/// Progress of both directions, indexed by source side.
#[derive(Debug, Default)]
pub struct Status {
    pub from_desktop: Progress,
    pub from_mobile: Progress,
    /// Waiting for another `tandem run` of the same databases to stop.
    pub waiting: AtomicBool,
    /// Not started yet: why (a server that is down), while `run` waits for it.
    pub starting: std::sync::Mutex<Option<String>>,
}

impl Status {
    pub fn from(&self, side: Side) -> &Progress {
        match side {
            Side::Desktop => &self.from_desktop,
            Side::Mobile => &self.from_mobile,
        }
    }
}

/// Replicate both directions until `shutdown` turns true (or a direction fails for good).
pub async fn run(
    cfg: Arc<Config>,
    shutdown: watch::Receiver<bool>,
    status: Arc<Status>,
) -> Result<()> {
    let Some(lease) = start(&cfg, &shutdown, &status).await? else {
        return Ok(());
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut ext = shutdown.clone();
    let forward = {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            while ext.changed().await.is_ok() {
                if *ext.borrow() {
                    let _ = stop_tx.send(true);
                    return;
                }
            }
        })
    };
    let keeper = {
        let (cfg, rx, stop_tx) = (cfg.clone(), stop_rx.clone(), stop_tx.clone());
        tokio::spawn(async move {
            let r = lease.keep(&cfg, rx).await;
            if r.is_err() {
                let _ = stop_tx.send(true);
            }
            r
        })
    };
    let mut first_err = None;
    // Tables published since `run` started (and never synchronised): both directions stop at a
    // checkpoint, those tables are copied as at the start, and streaming starts again.
    let mut added: Option<Vec<TableName>> = None;
    loop {
        // Before any stream starts, so each direction's checkpoint stays put during the copy;
        // with the lock kept meanwhile (a server restart during a long copy takes it along).
        let snapshotted = if cfg.initial_snapshot {
            initial_snapshot(&cfg, &stop_rx, &status, added.as_deref())
                .await
                .unwrap_or_else(|e| {
                    first_err = Some(e);
                    false
                })
        } else {
            true
        };
        if !snapshotted {
            break;
        }
        let (round_tx, round_rx) = watch::channel(false);
        let (added_tx, mut added_rx) = tokio::sync::mpsc::channel(1);
        let watch = tokio::spawn(watch_sources(cfg.clone(), added_tx));
        let mut tasks = Vec::new();
        for side in Side::BOTH {
            let (cfg, rx, st, stop_tx) = (
                cfg.clone(),
                round_rx.clone(),
                status.clone(),
                stop_tx.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let r = direction(cfg, side, rx, st).await;
                if r.is_err() {
                    // One direction failing stops the other cleanly: better both stopped and
                    // checkpointed than one side silently drifting.
                    let _ = stop_tx.send(true);
                }
                r
            }));
        }
        let mut stop = stop_rx.clone();
        added = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            Some(tables) = added_rx.recv() => Some(tables),
        };
        watch.abort();
        let _ = round_tx.send(true);
        for t in tasks {
            let r = t
                .await
                .map_err(|e| anyhow!("replication task panicked: {e}"))
                .and_then(|r| r);
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        match &added {
            Some(tables) if first_err.is_none() && !*stop_rx.borrow() => {
                let names = TableName::list(tables);
                tracing::info!(
                    "{names}: published since `run` started and never synchronised; both \
                     directions stopped for its initial snapshot, then stream again"
                );
            }
            _ => break,
        }
    }
    forward.abort();
    // Held until here, past every direction's last checkpoint; then let go.
    let _ = stop_tx.send(true);
    match keeper.await {
        Ok(Ok(lease)) => lease.release().await,
        Ok(Err(e)) => {
            first_err.get_or_insert(e);
        }
        Err(e) => {
            first_err.get_or_insert(anyhow!("the lock keeper panicked: {e}"));
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `run`'s start: its lock, then the checks before streaming. A server that is down or not yet
/// taking connections is waited for, as native's apply worker retries, so a `run` started before
/// its databases (a machine booting, a compose file) comes up after them. What waiting cannot fix
/// (a refused login, an unknown host or database, TLS, a refusal of the checks) stops it at once.
/// `None`: asked to stop meanwhile.
async fn start(
    cfg: &Config,
    shutdown: &watch::Receiver<bool>,
    status: &Status,
) -> Result<Option<crate::lease::Lease>> {
    let away = |e: &anyhow::Error| {
        e.chain().any(|c| {
            c.downcast_ref::<db::ConnectError>()
                .is_some_and(db::ConnectError::server_away)
        })
    };
    let attempt = || async {
        crate::source::stream::refuse_poolers(cfg, &Side::BOTH).await?;
        let lease = crate::lease::acquire(cfg, &mut shutdown.clone(), &status.waiting).await?;
        if lease.is_some() {
            preflight(cfg).await?;
        }
        Ok(lease)
    };
    let why = Reason {
        log: "cannot start yet: ",
        health: "",
    };
    Ok(keep_trying(shutdown, status, why, away, attempt)
        .await?
        .flatten())
}

/// `run`'s initial snapshot, started over while a server is away or ends its sessions (a
/// restart, a failover): a table's copy commits whole or not at all, and the tables done are not
/// copied again. `false`: asked to stop (a copy under way is rolled back with its connections).
async fn initial_snapshot(
    cfg: &Config,
    stop: &watch::Receiver<bool>,
    status: &Status,
    only: Option<&[TableName]>,
) -> Result<bool> {
    let why = Reason {
        log: "initial snapshot interrupted (tables copied already are kept): ",
        health: "initial snapshot interrupted: ",
    };
    let copy = || crate::ops::snapshot::initial(cfg, only);
    Ok(keep_trying(stop, status, why, transient, copy)
        .await?
        .is_some())
}

/// How a failed attempt of `run`'s start is introduced in the log and on `/health`.
struct Reason {
    log: &'static str,
    health: &'static str,
}

/// Run `attempt` until it gets through or fails in a way waiting cannot fix (`passing` says
/// which can be waited out), trying again after 1 s, doubling up to `START_BACKOFF`, with
/// `/health`'s `starting` line saying why meanwhile. `None`: asked to stop (an attempt under way
/// is dropped, its connections with it).
async fn keep_trying<T, Fut>(
    stop: &watch::Receiver<bool>,
    status: &Status,
    why: Reason,
    passing: impl Fn(&anyhow::Error) -> bool,
    attempt: impl Fn() -> Fut,
) -> Result<Option<T>>
where
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut stop = stop.clone();
    let mut backoff = Duration::from_secs(1);
    loop {
        let e = tokio::select! {
            r = attempt() => match r {
                Err(e) if passing(&e) => e,
                r => {
                    set_reason(&status.starting, None);
                    return r.map(Some);
                }
            },
            _ = stop.wait_for(|s| *s) => return Ok(None),
        };
        tracing::warn!("{}{e:#}; trying again in {backoff:?}", why.log);
        set_reason(&status.starting, Some(format!("{}{e:#}", why.health)));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return Ok(None),
        }
        backoff = (backoff * 2).min(START_BACKOFF);
    }
}

/// The longest wait between attempts to reach a server that is down at `run`'s start.
const START_BACKOFF: Duration = Duration::from_secs(30);

/// Refuse to touch anything when a direction cannot resume: no checkpoint, or a slot already
/// confirmed past it. (Checked again after START_REPLICATION, which is the authoritative moment.)
async fn preflight(cfg: &Config) -> Result<()> {
    if let Some(k) = &cfg.kafka {
        crate::sink::kafka::check_topic(k).await?;
    }
    for source in Side::BOTH {
        let site = cfg.site(source);
        let target = db::connect(cfg.site(source.other()), "tandem check").await?;
        // First: a control schema this role may not use is named as such, with the fix.
        crate::ops::setup::require_migrated(&target, source.other()).await?;
        let cp = checkpoint::require(&target, source).await?;
        let src = db::connect(site, "tandem check").await?;
        check_no_gap(&src, site, cp.lsn).await?;
        check_published(cfg, &src, source).await?;
        check_publication_matches(cfg, &src, source).await?;
        let tables = crate::catalog::expand(&src, &cfg.tables).await?;
        check_old_rows(cfg, &src, source, &tables).await?;
        if let Some(problem) = crate::catalog::row_security(&src, source, &tables).await? {
            bail!(problem);
        }
        // A rule made on the target since `setup` would stop `run` at the table's first row.
        let arriving = cfg.arriving(source.other(), &tables);
        let rules = crate::catalog::rules(&target, source.other(), &arriving).await?;
        if !rules.is_empty() {
            bail!(rules.join("\n"));
        }
    }
    Ok(())
}

/// The publication sends the columns `[replication.columns]` names (all, without a list) and
/// the rows `[replication.filter]` lets through (all, without one): a list or filter changed in
/// the config but not yet by `setup` would send what the target keeps as its own, or withhold
/// rows and columns it expects, without a word.
async fn check_publication_matches(
    cfg: &Config,
    src: &tokio_postgres::Client,
    source: Side,
) -> Result<()> {
    let site = cfg.site(source);
    let rows = src
        .query(
            "SELECT n.nspname::text, c.relname::text, \
                    (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a \
                     WHERE a.attrelid = pr.prrelid AND a.attnum = ANY (pr.prattrs::int2[])), \
                    pg_get_expr(pr.prqual, pr.prrelid) \
             FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
             JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE p.pubname = $1",
            &[&site.publication],
        )
        .await?;
    let mut wrong = Vec::new();
    for r in rows {
        let table = TableName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        let sent: Option<Vec<String>> = r.get(2);
        let mut want = cfg.columns_of(&table).map(<[String]>::to_vec);
        if let Some(w) = want.as_mut() {
            w.sort();
        }
        if sent != want {
            let show = |c: &Option<Vec<String>>| match c {
                Some(c) => format!("({})", c.join(", ")),
                None => "every column".to_string(),
            };
            wrong.push(format!(
                "{table}: publication {} sends {}, [replication.columns] says {}",
                site.publication,
                show(&sent),
                show(&want)
            ));
        }
        let sent: Option<String> = r.get(3);
        let want = match cfg.filter(&table, source) {
            // As PostgreSQL writes it back, to compare with the publication's.
            Some(cond) => Some(
                crate::ops::setup::try_filter(src, &table, cond, false)
                    .await?
                    .with_context(|| {
                        format!(
                            "[replication.filter] of {table}: run `tandem setup`, which checks it"
                        )
                    })?,
            ),
            None => None,
        };
        if sent != want {
            let show = |c: &Option<String>| c.clone().unwrap_or_else(|| "every row".into());
            wrong.push(format!(
                "{table}: publication {} sends {}, [replication.filter] says {}",
                site.publication,
                show(&sent),
                show(&want)
            ));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "{source}: {}; run `tandem setup` to bring the publication in line",
            wrong.join("; ")
        );
    }
    Ok(())
}

/// Every relation of a table logs the old row's key at least (not an identity index without
/// it), and the whole old row where its conflict policy compares old rows, or where it has no
/// primary key (its rows are found by their old values). `setup` sees to it, but a partition
/// created since logs its changes as its own identity says: without old rows those changes
/// would be taken as conflicts, or as none, wrongly, or could not be applied at all.
async fn check_old_rows(
    cfg: &Config,
    src: &tokio_postgres::Client,
    source: Side,
    tables: &[TableName],
) -> Result<()> {
    for t in tables {
        if !cfg.direction(t).flows_from(source) {
            continue;
        }
        let tt = crate::catalog::table(src, t).await?;
        // An identity index made since `setup` (or an ALTER it let through before it checked).
        if let Some(tt) = &tt {
            let short = crate::ops::setup::identity_short_of_key(src, t, tt).await?;
            if !short.is_empty() {
                bail!(crate::ops::setup::identity_short_problem(
                    source, t, tt, &short
                ));
            }
        }
        // Conflict rules do not apply to a table without a key: that reason comes first.
        let why = if tt.is_some_and(|tt| tt.key.is_empty()) {
            " has no primary key, so tandem finds its rows by their values, and needs"
        } else if cfg
            .conflicts_for(t)
            .is_some_and(|tc| tc.policy.needs_old_row())
        {
            "'s conflict policy needs"
        } else {
            continue;
        };
        let partial = crate::ops::setup::not_identity_full(src, t).await?;
        if !partial.is_empty() {
            bail!(
                "{source}: {t}{why} the old row of every change, but {} \
                 log changes without it (a partition created after `tandem setup`?); run \
                 `tandem setup --replica-identity-full`",
                partial.join(", ")
            );
        }
    }
    Ok(())
}

/// Every configured table that flows from `source` is in its publication. A table created
/// after `setup` that matches a pattern (`public.*`) is not: its changes would never be sent,
/// and the initial snapshot would copy it once and mark it done, so later changes were lost
/// without a word.
async fn check_published(cfg: &Config, src: &tokio_postgres::Client, source: Side) -> Result<()> {
    let published = published(src, &cfg.site(source).publication).await?;
    let missing = not_in(cfg, src, source, &published).await?;
    // The publication follows a table by its OID: one renamed while tandem was stopped is
    // still in it, under a name the config does not have.
    let extra: Vec<TableName> = published
        .iter()
        .filter(|t| !cfg.lists(t))
        .cloned()
        .collect();
    if missing.is_empty() {
        if extra.is_empty() {
            return Ok(());
        }
        // As a column list or filter that differs: before, their changes were streamed and
        // dropped without a word, and naming them again later brought no copy of them.
        bail!(
            "{source}: publication {} holds {}, which [replication] tables does not name (taken \
             out of the config since `tandem setup`?), so their changes would be left out \
             unsaid; run `tandem setup` to take them out of the publication, or name them again",
            cfg.site(source).publication,
            TableName::list(&extra)
        );
    }
    let mut gone = Vec::new();
    for t in &missing {
        let exists: bool = src
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.quoted()])
            .await?
            .get(0);
        if !exists {
            gone.push(t.to_string());
        }
    }
    if !gone.is_empty() && !extra.is_empty() {
        bail!(
            "{source}: {} named in [replication] tables no longer {} on {source}, and \
             publication {} holds {}, which the config does not name: renamed while tandem was \
             stopped? Then rename it on {} too, write its new name in [replication] tables and \
             run `tandem setup`; tandem knows the table by its OID, so what was changed under \
             the old name still arrives",
            gone.join(", "),
            if gone.len() == 1 { "exists" } else { "exist" },
            cfg.site(source).publication,
            TableName::list(&extra),
            source.other()
        );
    }
    bail!(
        "{source}: {} match [replication] tables but are not in publication {} (created \
         after `tandem setup`?), so their changes would not be sent; run `tandem setup` to \
         add them, then `tandem run` again",
        TableName::list(&missing),
        cfg.site(source).publication
    );
}

/// How often a running `run` looks for tables that started to match the configured patterns.
const PUBLICATION_CHECK: Duration = Duration::from_secs(10);

/// While `run` runs, every `PUBLICATION_CHECK`, on each source:
/// - a table created that matches the configured patterns is in no publication until `setup`
///   runs again, and nothing of it is sent: said once per table in the log, and counted in
///   `tandem_unpublished_tables{direction}`;
/// - under `max_slot_wal_keep_size` (Supabase sets one), the WAL the server may still add before
///   it invalidates the slot, `tandem_slot_safe_wal_bytes{direction}`, and a warning once the
///   slot is past it (`unreserved`): what an operator alerts on before a resynchronisation.
///
/// And, with `initial_snapshot` on, a table that `setup` published since (on both sides, as its
/// direction needs) and that was never synchronised goes to `added`, and the watch ends: its rows
/// from before must be copied as at the start (the streams send only its changes from now on), so
/// `run` stops both directions and snapshots it.
async fn watch_sources(cfg: Arc<Config>, added: tokio::sync::mpsc::Sender<Vec<TableName>>) {
    let mut clients: [Option<tokio_postgres::Client>; 2] = [None, None];
    let mut told: Vec<TableName> = Vec::new();
    let mut unreserved = [false; 2];
    loop {
        tokio::time::sleep(PUBLICATION_CHECK).await;
        // Each source's publication as this round read it.
        let mut published_on: [Option<Vec<TableName>>; 2] = [None, None];
        for (i, source) in Side::BOTH.into_iter().enumerate() {
            if clients[i].as_ref().is_none_or(|c| c.is_closed()) {
                clients[i] = db::connect(cfg.site(source), "tandem check").await.ok();
            }
            let Some(c) = &clients[i] else { continue };
            let site = cfg.site(source);
            if let Ok(Some(r)) = c
                .query_opt(
                    "SELECT wal_status, safe_wal_size, \
                            (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&site.slot],
                )
                .await
            {
                let (status, safe): (Option<String>, Option<i64>) = (r.get(0), r.get(1));
                if let Some(behind) = r.get::<_, Option<i64>>(2) {
                    metrics::gauge!("tandem_slot_lag_bytes", "direction" => source.direction_from())
                        .set(behind as f64);
                }
                if let Some(safe) = safe {
                    metrics::gauge!("tandem_slot_safe_wal_bytes", "direction" => source.direction_from())
                        .set(safe as f64);
                }
                let past = status.as_deref() == Some("unreserved");
                if past && !unreserved[i] {
                    tracing::warn!(%source, slot = %site.slot,
                        "the slot is past max_slot_wal_keep_size: the server removes WAL it still \
                         needs at its next checkpoint, and the slot is then lost (resynchronise \
                         with teardown, setup, snapshot); tandem is behind, see `tandem status`");
                }
                unreserved[i] = past;
            }
            let missing = async {
                let p = published_on[i].insert(published(c, &site.publication).await?);
                not_in(&cfg, c, source, p).await
            };
            let missing = match missing.await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(%source, "checking the publication: {e:#}");
                    continue;
                }
            };
            metrics::gauge!("tandem_unpublished_tables", "direction" => source.direction_from())
                .set(missing.len() as f64);
            for t in missing {
                if !told.contains(&t) {
                    tracing::warn!(%source, table = %t,
                        "{t} matches [replication] tables but is not in publication {}: its changes \
                         are not sent; run `tandem setup` to add it, and `run` takes it in without a restart",
                        cfg.site(source).publication);
                    told.push(t);
                }
            }
        }
        if let ([Some(d), Some(m)], [Some(pd), Some(pm)]) = (&clients, &published_on) {
            if cfg.initial_snapshot {
                match published_since(&cfg, d, m, [pd, pm]).await {
                    Ok(tables) if !tables.is_empty() => {
                        let _ = added.send(tables).await;
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("looking for tables published since the start: {e:#}")
                    }
                }
            }
        }
    }
}

/// The configured tables an initial snapshot has yet to copy that both sides have and that are
/// in the publication of each side they flow from (`published_on`, desktop's then mobile's):
/// published by `setup` since `run` started. Looked up in that order (the publications read
/// first), so that a table a `tandem ddl` schema change made is seen with the record that it
/// needs no copy (written with it on the side `run` made it on).
async fn published_since(
    cfg: &Config,
    d: &tokio_postgres::Client,
    m: &tokio_postgres::Client,
    published_on: [&Vec<TableName>; 2],
) -> Result<Vec<TableName>> {
    let mut ready = Vec::new();
    let tables = crate::catalog::expand(d, &cfg.tables).await?;
    let quoted: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let on_mobile: Vec<bool> = m
        .query(
            "SELECT to_regclass(t) IS NOT NULL FROM unnest($1::text[]) WITH ORDINALITY AS u(t, i) \
             ORDER BY i",
            &[&quoted],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (t, on_mobile) in tables.into_iter().zip(on_mobile) {
        let sent = Side::BOTH
            .into_iter()
            .zip(published_on)
            .all(|(side, p)| !cfg.direction(&t).flows_from(side) || p.contains(&t));
        if on_mobile && sent {
            ready.push(t);
        }
    }
    Ok(crate::ops::snapshot::unsynchronised(cfg, d, m)
        .await?
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| ready.contains(t))
        .collect())
}

/// The configured tables that flow from `source` and are not in its publication.
pub(crate) async fn unpublished(
    cfg: &Config,
    src: &tokio_postgres::Client,
    source: Side,
) -> Result<Vec<TableName>> {
    let published = published(src, &cfg.site(source).publication).await?;
    not_in(cfg, src, source, &published).await
}

/// The tables in `publication`, by their names now.
async fn published(src: &tokio_postgres::Client, publication: &str) -> Result<Vec<TableName>> {
    Ok(src
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// The configured tables that flow from `source` and are not among `published`.
async fn not_in(
    cfg: &Config,
    src: &tokio_postgres::Client,
    source: Side,
    published: &[TableName],
) -> Result<Vec<TableName>> {
    Ok(crate::catalog::expand(src, &cfg.tables)
        .await?
        .into_iter()
        .filter(|t| cfg.direction(t).flows_from(source) && !published.contains(t))
        .collect())
}

/// A change of a whole transaction waited on a row lock of the streamed transaction applied
/// alongside it in the other session (a target trigger or constraint the source does not have
/// can make them meet): each session would wait for the other forever. The direction starts
/// over and spools that transaction instead.
#[derive(Debug, thiserror::Error)]
#[error("a change waited on streamed transaction {xid}, applied alongside it")]
pub struct LiveBlocked {
    pub xid: u32,
}

/// A transaction applied on its own was refused, batched: the direction starts over and applies
/// it change by change, in the source's order, as native's apply worker does. A constraint over
/// several rows (a UNIQUE column other than the key, an exclusion constraint) is checked row by
/// row as a statement writes, so a transaction swapping two rows' values through a third passes
/// only in its own order, which a batch's merged rows do not keep.
#[derive(Debug, thiserror::Error)]
#[error("{cause}; starting over from the checkpoint, {from} transaction {xid} change by change")]
pub struct Unbatched {
    from: Side,
    xid: u32,
    cause: String,
}

/// A streamed transaction carries a `tandem ddl` schema change: the direction starts over and
/// spools that transaction until its commit, when its row in the source's `tandem.ddl` can be read.
#[derive(Debug, thiserror::Error)]
#[error("streamed transaction {xid} carries a `tandem ddl` schema change, taken only once it has committed")]
pub struct LiveDdl {
    pub xid: u32,
}

/// A statement named a target table or column that is no longer there by that name (`42P01`,
/// `42703`): renamed with `tandem ddl` while rows of the other side under its old name were on
/// their way. The direction starts over once from that checkpoint with its tables read again,
/// where the old name leads to the table or column by its new one (`tandem.renamed`,
/// `tandem.renamed_columns`); one that is gone is then a refusal as before.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct StaleTable(anyhow::Error);

/// One source transaction the target refused (a constraint, trigger or type the source does not
/// have), found by applying one source transaction per target commit. Nothing of it is applied,
/// everything before it is; the operator fixes the target or leaves it out with `tandem skip`.
#[derive(Debug, thiserror::Error)]
#[error(
    "{from} transaction {xid} (committed {committed} at {commit_lsn}) was rejected by {to}: \
     {cause}\n{}",
    rejected_fix(*.from, *.to, *.commit_lsn, *.retry, *.logged)
)]
pub struct Rejected {
    pub from: Side,
    pub to: Side,
    pub xid: u32,
    pub commit_lsn: Lsn,
    pub committed: String,
    /// The target's error, as text: the fix must come last, after it.
    pub cause: String,
    /// `on_refusal = "retry"`: `run` goes on and tries the transaction again.
    pub retry: bool,
    /// The source logged it without what the target needs (its key): no fix on the target helps.
    pub logged: bool,
}

/// What the operator can do about a [`Rejected`] transaction.
fn rejected_fix(from: Side, to: Side, lsn: Lsn, retry: bool, logged: bool) -> String {
    let skip = format!(
        "leave that one transaction out of {to} (as `ALTER SUBSCRIPTION … SKIP` does): \
         `tandem skip --from {from} --lsn {lsn}`"
    );
    if logged {
        return format!(
            "No change on {to} makes it apply as {from} logged it: {skip}, and each later one \
             logged so, then `tandem repair --source {from}` brings {to}'s rows in line"
        );
    }
    let next = if retry {
        "and `run` applies it at its next try"
    } else {
        "and start `tandem run` again"
    };
    format!("Fix it on {to} (the row, constraint or trigger above) {next}; or {skip}")
}

/// A source transaction being applied on its own (see [`Careful`]).
#[derive(Debug, Clone, Copy)]
struct TxnInfo {
    xid: u32,
    commit_lsn: Lsn,
    commit_ts: i64,
}

/// Finding a rejected transaction, and leaving one out. Groups of many source transactions share
/// one target commit, so when the target refuses a statement, the culprit is not known: the
/// direction starts over from the checkpoint and applies each transaction up to the furthest
/// one begun (`until`) in a commit of its own. The failure then names its transaction, and
/// every one before it is applied.
#[derive(Debug, Default)]
struct Careful {
    /// Source transactions committing at or before this apply one per target commit.
    until: Lsn,
    /// Commit LSN of the furthest transaction begun in this attempt.
    reached: Lsn,
    /// The transaction applied on its own right now: a failure is its.
    current: Option<TxnInfo>,
    /// `tandem skip`: the commit LSN of the transaction to leave out.
    skip: Option<Lsn>,
    /// A transaction applied while in progress was refused: its commit LSN is unknown, so every
    /// transaction comes whole from then on, and the next failure can be found as above.
    whole: bool,
    /// A transaction is being applied while in progress (until its commit is through).
    in_live: bool,
    /// The commit LSN of a transaction refused on its own, batched: applied again change by
    /// change (see [`Planner::set_singly`](crate::apply::plan::Planner::set_singly)) before it
    /// counts as refused.
    singly: Option<Lsn>,
}

/// The main session gives up on a lock after this while a streamed transaction is applied live.
const LIVE_LOCK_TIMEOUT: &str = "2s";

/// While a transaction is live (`on`), the main session gives up waiting on a lock after
/// `LIVE_LOCK_TIMEOUT` instead of never.
async fn live_lock_timeout(main: &mut Applier, on: bool) -> Result<()> {
    let value = if on { LIVE_LOCK_TIMEOUT } else { "0" };
    main.set(&format!("SET lock_timeout = '{value}'")).await
}

fn lock_timed_out(e: &anyhow::Error) -> bool {
    db::caused_by(e, &tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// The server refused what a change carries: its data (22), a constraint (23, 27, 44), a
/// name or privilege (42), a limit (54), or a trigger's own error (P0, 09, 2F, 38, 39); or the
/// target table lacks a column the change carries ([`BindError`], found before sending); or a
/// table a schema change created cannot flow as it is ([`crate::ops::ddl::Unpublishable`]).
/// Not a full disk, a read-only server or an internal error: leaving a transaction out would be
/// the wrong fix for those, and finding one to name costs a restart.
fn refused_by_target(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<crate::apply::pipeline::OutOfRange>()
            || c.is::<BindError>()
            || c.is::<crate::ops::ddl::Unpublishable>()
            || c.downcast_ref::<tokio_postgres::Error>()
                .and_then(|pg| pg.as_db_error())
                .is_some_and(|db| {
                    matches!(
                        &db.code().code()[..2],
                        "22" | "23" | "27" | "44" | "42" | "54" | "P0" | "09" | "2F" | "38" | "39"
                    )
                })
    })
}

/// What the target refuses until someone fixes it (or the source): a transaction found refused
/// ([`Rejected`]), or a table whose columns the target cannot take ([`BindError`]).
fn refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Rejected>() || c.is::<BindError>())
}

/// `on_refusal = "retry"`: the first pause before trying a refused transaction again (native's
/// `wal_retrieve_retry_interval`), doubled at each refusal from the same checkpoint up to
/// `MAX_REFUSAL_PAUSE`.
const REFUSAL_PAUSE: Duration = Duration::from_secs(5);
const MAX_REFUSAL_PAUSE: Duration = Duration::from_secs(30);

/// Restarts after a [`LocalRace`] from one checkpoint before `run` stops with it.
const MAX_RACES: u32 = 5;

/// The longest wait between reconnects: how long tandem may take to notice a server is back.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Is this error worth reconnecting for (a dropped connection) rather than stopping?
fn transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if let Some(pg) = c.downcast_ref::<tokio_postgres::Error>() {
            return db::is_transient(pg);
        }
        if let Some(c) = c.downcast_ref::<db::ConnectError>() {
            return db::is_transient(&c.error);
        }
        if let Some(w) = c.downcast_ref::<WalError>() {
            return w.is_transient();
        }
        c.is::<crate::source::stream::SlotHeld>()
            || c.to_string().contains("the replication stream ended")
    })
}

async fn direction(
    cfg: Arc<Config>,
    source: Side,
    mut stop: watch::Receiver<bool>,
    status: Arc<Status>,
) -> Result<()> {
    let mut backoff = Duration::from_millis(500);
    let mut learned = Learned::default();
    let mut careful = Careful::default();
    let idle = !cfg.streams(source);
    loop {
        let starts = status.from(source).starts.load(Ordering::Relaxed);
        let was_whole = careful.whole;
        let once = if idle {
            idle_direction(&cfg, source, &mut stop, &status).await
        } else {
            direction_once(&cfg, source, &mut stop, &status, &mut learned, &mut careful).await
        };
        // This attempt found a live transaction refused: start over once more, whole.
        let retry_whole = careful.whole && !was_whole;
        match once {
            Ok(()) => return Ok(()),
            Err(e) if e.is::<SidesDisagree>() && !*stop.borrow() => {
                let c = e.downcast::<SidesDisagree>().expect("checked");
                tracing::warn!(%source, table = %c.table,
                    "{c}; starting over from the checkpoint, writing its rows as upserts from now on");
                if !learned.upsert_tables.insert(c.table.clone()) {
                    // Cannot happen: that table's rows are upserts now.
                    bail!("{source} → {}: {c}", source.other());
                }
            }
            Err(e) if e.is::<LocalRace>() && !*stop.borrow() => {
                let r = e.downcast::<LocalRace>().expect("checked");
                // Each race is a local insert landing in the moment between lookup and write:
                // ever again from one checkpoint means something else keeps meeting those rows.
                let at = status.from(source).checkpoint();
                learned.races = match learned.races {
                    (lsn, n) if lsn == at => (at, n + 1),
                    _ => (at, 1),
                };
                if learned.races.1 > MAX_RACES {
                    bail!(
                        "{source} → {}: {r}, {MAX_RACES} times from checkpoint {at}",
                        source.other()
                    );
                }
                tracing::warn!(%source, "{r}; starting over from the checkpoint to decide them as conflicts");
                metrics::counter!("tandem_conflict_races_total", "direction" => source.direction_from())
                    .increment(1);
            }
            Err(e) if e.is::<StaleTable>() && !*stop.borrow() => {
                tracing::info!(%source, "{e:#}; starting over from the checkpoint with {}'s tables read again", source.other());
            }
            Err(e) if e.is::<Unbatched>() && !*stop.borrow() => {
                tracing::info!(%source, "{e:#}");
            }
            Err(e) if e.is::<LiveDdl>() && !*stop.borrow() => {
                let d = e.downcast::<LiveDdl>().expect("checked");
                tracing::info!(%source, "{d}; starting over from the checkpoint, spooling it until its commit");
                learned.spool_only.insert(d.xid);
            }
            Err(e) if e.is::<LiveBlocked>() && !*stop.borrow() => {
                let b = e.downcast::<LiveBlocked>().expect("checked");
                tracing::warn!(%source, "{b}; starting over from the checkpoint, spooling it until its commit");
                metrics::counter!("tandem_live_blocked_total", "direction" => source.direction_from())
                    .increment(1);
                learned.spool_only.insert(b.xid);
            }
            // The target refused something of a group, or a transaction applied while in
            // progress: find which source transaction, once per place it happened.
            Err(e)
                if (careful.reached > careful.until || retry_whole)
                    && refused_by_target(&e)
                    && !transient(&e)
                    && !*stop.borrow() =>
            {
                if retry_whole {
                    tracing::warn!(%source, "{e:#}; starting over from the checkpoint with large transactions applied at their commit, to find the one {} refuses", source.other());
                } else {
                    tracing::warn!(%source, "{e:#}; starting over from the checkpoint, one source transaction per commit up to {}, to find the one {} refuses", careful.reached, source.other());
                }
                careful.until = careful.until.max(careful.reached);
            }
            Err(e) if transient(&e) && !*stop.borrow() => {
                // The last attempt got through: a new outage, not the same one lasting.
                if status.from(source).starts.load(Ordering::Relaxed) > starts {
                    backoff = Duration::from_millis(500);
                }
                if e.chain().any(|c| c.is::<crate::source::stream::SlotHeld>()) {
                    // Not a lost connection: the slot's holder is named in the error.
                    tracing::warn!(%source, "{e:#}; next try in {backoff:?}");
                    metrics::counter!("tandem_slot_held_total", "direction" => source.direction_from())
                        .increment(1);
                } else if db::transaction_rollback(&e) {
                    // The connection is fine: the target ended the transaction (a deadlock with
                    // an application's, a serialization failure) and it is simply tried again.
                    tracing::warn!(%source, "the target rolled back tandem's transaction ({e:#}); starting over from the checkpoint in {backoff:?}");
                } else {
                    tracing::warn!(%source, "connection lost ({e:#}); reconnecting in {backoff:?}");
                    metrics::counter!("tandem_reconnects_total", "direction" => source.direction_from())
                        .increment(1);
                }
                set_reason(&status.from(source).retrying, Some(format!("{e:#}")));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) if cfg.on_refusal == OnRefusal::Retry && refusal(&e) && !*stop.borrow() => {
                // Everything before it is applied (found one transaction per commit), the slot
                // holds it: it is the next thing this direction applies, once the target takes
                // it or `tandem skip` leaves it out (read at each start).
                let at = status.from(source).checkpoint();
                let pause = match learned.refused {
                    (lsn, p) if lsn == at => (p * 2).min(MAX_REFUSAL_PAUSE),
                    _ => REFUSAL_PAUSE,
                };
                learned.refused = (at, pause);
                let e = e.context(format!("{source} → {}", source.other()));
                tracing::error!(%source, "{e:#}\nTrying it again in {pause:?} ([replication] on_refusal = \"retry\"); the other direction goes on meanwhile");
                metrics::counter!("tandem_refusals_total", "direction" => source.direction_from())
                    .increment(1);
                status.from(source).set_refused(at, format!("{e:#}"));
                record_refusal(&cfg, source, at, &e, false).await;
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            // Stopping, and the connection went away meanwhile (a server restart while the
            // direction was idle is first noticed by the final checkpoint write), or the stop
            // cancelled a statement that waited too long (`Cancellers`; 57014 is transient
            // like the rest of class 57). Nothing is
            // lost: the slot was confirmed only to what the target holds durably, and the next
            // start resumes there.
            Err(e) if transient(&e) => {
                tracing::warn!(%source, "stopped without recording the last progress ({e:#}); the next start resumes from the checkpoint");
                return Ok(());
            }
            Err(e) => {
                let e = e.context(format!("{} → {}", source, source.other()));
                if refusal(&e) {
                    let at = status.from(source).checkpoint();
                    record_refusal(&cfg, source, at, &e, true).await;
                }
                return Err(e);
            }
        }
    }
}

/// Keep a refusal on the target (`tandem.refusals`) for `tandem status`, a process of its own
/// that cannot see `/health`. Best effort, in a session of its own: the refusal is logged (or
/// stops `run`) whether or not this write gets through.
async fn record_refusal(cfg: &Config, source: Side, at: Lsn, e: &anyhow::Error, stopped: bool) {
    let write = async {
        let c = db::connect(cfg.site(source.other()), "tandem refusal").await?;
        checkpoint::record_refusal(&c, source, at, &format!("{e:#}"), stopped).await
    };
    let written = tokio::time::timeout(Duration::from_secs(10), write).await;
    if let Err(e) = written.map_err(anyhow::Error::from).and_then(|w| w) {
        tracing::warn!(%source, "could not record the refusal for `tandem status`: {e:#}");
    }
}

/// What a direction learned during this run, kept across its restarts.
#[derive(Default)]
struct Learned {
    /// Tables where a plain INSERT or UPDATE found the target disagreeing: upserted from then on.
    upsert_tables: std::collections::HashSet<TableName>,
    /// The checkpoint of the last [`LocalRace`] and how many in a row started over from it.
    races: (Lsn, u32),
    /// The checkpoint of the last refusal (`on_refusal = "retry"`) and the pause after it.
    refused: (Lsn, Duration),
    /// Streamed transactions a live apply was blocked on: spooled from then on.
    spool_only: std::collections::HashSet<u32>,
    /// The configured name of each published table, by OID, as first seen this run: a table
    /// renamed on the source while `run` runs keeps going to its target table (see
    /// [`Assembler::with_names`]), across reconnects too.
    names: std::collections::HashMap<u32, TableName>,
    /// The checkpoint a [`StaleTable`] last started over from.
    stale_table: Option<Lsn>,
}

impl Learned {
    async fn learn_names(
        &mut self,
        cfg: &Config,
        src: &tokio_postgres::Client,
        site: &crate::config::Site,
    ) -> Result<()> {
        let rows = src
            .query(
                "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_publication_rel pr \
                 JOIN pg_publication p ON p.oid = pr.prpubid JOIN pg_class c ON c.oid = pr.prrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
                &[&site.publication],
            )
            .await
            .context("reading the published tables")?;
        for r in rows {
            let name = TableName::new(r.get::<_, String>(1), r.get::<_, String>(2));
            if cfg.lists(&name) {
                self.names.entry(r.get::<_, u32>(0)).or_insert(name);
            }
        }
        Ok(())
    }
}

async fn direction_once(
    cfg: &Arc<Config>,
    source: Side,
    stop: &mut watch::Receiver<bool>,
    status: &Status,
    learned: &mut Learned,
    careful: &mut Careful,
) -> Result<()> {
    let site = cfg.site(source);
    let progress = status.from(source);
    let mut applier = Applier::connect_for_run(cfg.clone(), source, true).await?;
    applier.write_plainly(learned.upsert_tables.clone());
    let cp = checkpoint::require(applier.client(), source).await?;
    if cp.slot_name != site.slot {
        bail!(
            "{}: the checkpoint belongs to slot {}, but the config names slot {}; run `tandem setup` again",
            source.other(),
            cp.slot_name,
            site.slot
        );
    }
    let source_sql = db::connect(site, "tandem check").await?;
    applier.load_copied(&source_sql, cp.lsn).await?;
    applier.load_source_partitioned(&source_sql).await?;
    let mut start = cp.lsn;
    if let Some(k) = &cfg.kafka {
        // Kafka may lag the target: with `required`, the slot was confirmed only to what Kafka
        // acknowledged, so start there and send again what the target already has.
        if k.required {
            let confirmed: Option<String> = source_sql
                .query_opt(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&site.slot],
                )
                .await?
                .and_then(|r| r.get(0));
            if let Some(c) = confirmed.and_then(|c| c.parse::<Lsn>().ok()) {
                start = start.min(c);
            }
        }
        applier.set_publisher(crate::sink::kafka::Publisher::new(
            k,
            start,
            source.direction_from(),
        )?);
    }
    careful.skip = checkpoint::skip_lsn(applier.client(), source).await?;
    careful.current = None;
    careful.in_live = false;
    learned.learn_names(cfg, &source_sql, site).await?;
    let names: Names = Arc::new(learned.names.clone());
    applier.set_names(names.clone());
    let mut mode = stream_mode(cfg, &learned.spool_only);
    // Leaving a transaction out, or finding a rejected one, goes by commit LSNs, which a live
    // transaction's changes are applied before anyone knows: every transaction comes whole.
    if careful.skip.is_some() || careful.until > Lsn::ZERO || careful.whole {
        mode.live = false;
    }
    // Starting before the checkpoint (Kafka lags it), a transaction begun before the checkpoint
    // may be applied already: only its commit tells, so it is spooled, never applied live.
    if start < cp.lsn {
        mode.live_from = cp.lsn;
    }
    let mut stream = SourceStream::open(site, start, &mode, stop).await?;
    if !cp.source_system_id.is_empty() && cp.source_system_id != stream.system_id {
        bail!(
            "{source}: this is database system {}, but the checkpoint was taken against system {}: \
             the {source} database was replaced (or this config pairs {other} with another \
             {source} database than the checkpoint's). If {source} moved to this server, run \
             `tandem setup --replaced {source}`; else point the config at the {source} database \
             of that system",
            stream.system_id,
            cp.source_system_id,
            other = source.other(),
        );
    }
    check_no_gap(&source_sql, site, cp.lsn).await?;
    drop(source_sql);
    tracing::info!(%source, checkpoint = %cp.lsn, origin = applier.origin, "streaming {} → {}", source, source.other());

    progress.streaming.store(true, Ordering::Relaxed);
    progress.starts.fetch_add(1, Ordering::Relaxed);
    set_reason(&progress.retrying, None);
    let cancellers = Cancellers::default();
    cancellers.add(applier.canceller()?);
    let _watchdog = cancellers.after_stop(stop.clone());
    let mut live = LiveState {
        cfg: cfg.clone(),
        upsert_tables: learned.upsert_tables.clone(),
        names,
        session: None,
        txn: None,
        cancellers,
    };
    let result = stream_loop(
        &mut applier,
        &mut stream,
        cp.lsn,
        stop,
        progress,
        &mut live,
        careful,
    )
    .await;
    let at = status.from(source).checkpoint();
    let result = match (result, live.txn.as_ref(), careful.current.take()) {
        (Err(e), _, _)
            if (db::caused_by(&e, &tokio_postgres::error::SqlState::UNDEFINED_TABLE)
                || db::caused_by(&e, &tokio_postgres::error::SqlState::UNDEFINED_COLUMN))
                && learned.stale_table != Some(at) =>
        {
            learned.stale_table = Some(at);
            Err(StaleTable(e).into())
        }
        (Err(e), Some(t), _) if lock_timed_out(&e) => Err(LiveBlocked { xid: t.xid }.into()),
        (Err(e), _, Some(t))
            if refused_by_target(&e) && !transient(&e) && careful.singly != Some(t.commit_lsn) =>
        {
            careful.singly = Some(t.commit_lsn);
            Err(Unbatched {
                from: source,
                xid: t.xid,
                cause: format!("{e:#}"),
            }
            .into())
        }
        (Err(e), _, Some(t)) if refused_by_target(&e) && !transient(&e) => Err(Rejected {
            from: source,
            to: source.other(),
            xid: t.xid,
            commit_lsn: t.commit_lsn,
            committed: crate::sink::kafka::rfc3339(t.commit_ts),
            cause: format!("{e:#}"),
            retry: cfg.on_refusal == OnRefusal::Retry,
            logged: e
                .chain()
                .any(|c| c.downcast_ref::<BindError>().is_some_and(BindError::logged)),
        }
        .into()),
        (Err(e), _, None) if careful.in_live && !careful.whole && !transient(&e) => {
            careful.whole = true;
            Err(e)
        }
        (r, _, _) => r,
    };
    progress.streaming.store(false, Ordering::Relaxed);
    stream.close().await;
    result
}

/// How to ask for a source's stream. A streamed transaction is applied while in progress only
/// where no row's fate depends on its commit's time or LSN: conflict rules compare them. There it
/// would be spooled to tandem's disk and applied at its commit, which only moves the source's own
/// spill here (and measured slower on one shared machine), so that takes
/// `stream_in_progress = true`. Kafka events carry the commit too, but only once published: with
/// Kafka, a copy of the live transaction is spooled and published after its commit.
fn stream_mode(cfg: &Config, spool_only: &std::collections::HashSet<u32>) -> StreamMode {
    let live = cfg.conflicts.is_none();
    let streaming = cfg.stream_in_progress.unwrap_or(live);
    StreamMode {
        streaming,
        live: streaming && live,
        spool_only: spool_only.clone(),
        keep_copy: cfg.kafka.is_some(),
        live_from: Lsn::ZERO,
        receive_timeout: cfg.receive_timeout,
    }
}

/// Commits still unflushed this long after they were made are flushed on purpose (a synchronous
/// commit of a tiny transaction): at most one fsync per interval instead of one per group, and
/// the source slot is confirmed soon after a burst ends.
const FLUSH_POLL: Duration = Duration::from_millis(50);

/// After a target commit: make the target flush `FLUSH_POLL` from now, unless that is already due.
fn schedule_flush(applier: &Applier, timer: &mut Timer) {
    if applier.flush_pending() && !timer.armed() {
        timer.set(Some(tokio::time::Instant::now() + FLUSH_POLL));
    }
}

/// How often a direction looks for new Kafka acknowledgements between commits.
const KAFKA_ACK_POLL: Duration = Duration::from_millis(20);

/// One timer of the stream loop, kept across its turns and re-armed only when its deadline
/// changes. A `sleep` made afresh in the `select!` read the clock, and registered and dropped a
/// timer, for every event (~5% of tandem's CPU over a drain with Kafka on).
struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: Option<tokio::time::Instant>,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
        }
    }

    /// Fire at `at` (`None`: never).
    fn set(&mut self, at: Option<tokio::time::Instant>) {
        if at != self.armed {
            if let Some(t) = at {
                self.sleep.as_mut().reset(t);
            }
            self.armed = at;
        }
    }

    fn armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Poll only while armed (a `select!` precondition); disarms once fired.
    async fn fired(&mut self) {
        (&mut self.sleep).await;
        self.armed = None;
    }
}

/// How often a direction with no tables moves its slot along.
const IDLE_ADVANCE_EVERY: Duration = Duration::from_secs(5);

/// A direction no table flows in (every table is one-way from the other side): its publication is
/// empty, so streaming it would only make the source's walsender decode all of the source's WAL
/// — including every row tandem applies there — to send nothing. Like a native one-way setup,
/// nothing decodes it; the checkpoint and then the slot are moved to the source's current WAL
/// position now and then (`pg_replication_slot_advance` fast-forwards without decoding rows), so
/// the slot holds no WAL and a later two-way config resumes from there without a gap.
async fn idle_direction(
    cfg: &Arc<Config>,
    source: Side,
    stop: &mut watch::Receiver<bool>,
    status: &Status,
) -> Result<()> {
    let site = cfg.site(source);
    let progress = status.from(source);
    let mut applier = Applier::connect(cfg.clone(), source).await?;
    let cp = checkpoint::require(applier.client(), source).await?;
    let src = db::connect(site, "tandem idle slot").await?;
    check_no_gap(&src, site, cp.lsn).await?;
    tracing::info!(%source, checkpoint = %cp.lsn, "no table flows {} → {}; not streaming {source}, only moving its slot along", source, source.other());
    let mut checkpoint = cp.lsn;
    progress.checkpoint.store(checkpoint.0, Ordering::Relaxed);
    progress.streaming.store(true, Ordering::Relaxed);
    progress.starts.fetch_add(1, Ordering::Relaxed);
    let result = async {
        while !*stop.borrow() {
            let now: String = src
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await?
                .get(0);
            let now: Lsn = now.parse()?;
            if now.0 >= checkpoint.0 + IDLE_RECORD_BYTES {
                // Checkpoint first: the slot must never be confirmed past it.
                applier.record(now).await?;
                checkpoint = now;
                progress.checkpoint.store(checkpoint.0, Ordering::Relaxed);
            }
            if applier.flush_pending() {
                applier.poll_flush().await?;
            }
            let durable = applier.ack_limit(checkpoint)?;
            if let Err(e) = src
                .query_one(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&site.slot, &durable.to_string()],
                )
                .await
            {
                // Typically the slot is still active for a walsender that is ending.
                tracing::debug!(%source, "advancing slot {}: {e}", site.slot);
            }
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                _ = tokio::time::sleep(IDLE_ADVANCE_EVERY) => {}
            }
        }
        Ok(())
    }
    .await;
    progress.streaming.store(false, Ordering::Relaxed);
    result
}

/// How long a stop waits for the target's statements in flight before cancelling them. They
/// take milliseconds, unless one waits on an application's lock: then the stop would wait as
/// long as the application (a container runtime kills after 10 s), and the rows the group wrote
/// would stay locked by a session nobody uses until the server noticed it was gone.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The direction's target sessions, to cancel what they run when a stop waited too long for it.
#[derive(Clone, Default)]
struct Cancellers(Arc<std::sync::Mutex<Vec<db::Canceller>>>);

impl Cancellers {
    fn add(&self, c: db::Canceller) {
        self.0.lock().expect("not poisoned").push(c);
    }

    /// Until the returned guard is dropped: once `stop` turns true and [`STOP_GRACE`] passed,
    /// cancel each session's statement, and again every second (a cancel that reaches a session
    /// between two statements does nothing). The cancelled statement fails its group, which rolls
    /// back and comes again from the checkpoint at the next start.
    fn after_stop(&self, mut stop: watch::Receiver<bool>) -> AbortOnDrop {
        let sessions = self.0.clone();
        AbortOnDrop(tokio::spawn(async move {
            if stop.wait_for(|s| *s).await.is_err() {
                return;
            }
            tokio::time::sleep(STOP_GRACE).await;
            tracing::warn!("stopping: the target's statement did not finish within {STOP_GRACE:?} (waiting on a lock?); cancelling it, its group rolls back and comes again at the next start");
            loop {
                let all = sessions.lock().expect("not poisoned").clone();
                for c in &all {
                    c.cancel().await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }))
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The streamed transaction applied while in progress, in a second apply session.
struct LiveState {
    cfg: Arc<Config>,
    upsert_tables: std::collections::HashSet<crate::config::TableName>,
    names: Names,
    /// Connected at the first live transaction, kept for the next.
    session: Option<Applier>,
    txn: Option<LiveTxn>,
    /// Where the live session's canceller goes once it connects.
    cancellers: Cancellers,
}

struct LiveTxn {
    xid: u32,
    asm: Assembler,
    /// Subtransactions seen, in order; each has a savepoint named by `savepoint_name`.
    subxacts: Vec<u32>,
}

fn savepoint_name(subxid: u32) -> String {
    format!("tandem_sub_{subxid}")
}

/// A table run knows by another name than the stream now gives it (renamed on the source, see
/// [`Assembler::with_names`]) goes by the stream's name once the target lacks the one run knew:
/// a `tandem ddl` schema change renamed it on both sides. Read at its relation message, which
/// comes again after a rename, before its next change.
async fn forget_renamed(
    applier: &mut Applier,
    asm: &mut Assembler,
    live: &mut LiveState,
    oid: u32,
    namespace: &str,
    name: &str,
) -> Result<()> {
    let Some(known) = live.names.get(&oid) else {
        return Ok(());
    };
    if (known.schema.as_str(), known.name.as_str()) == (namespace, name)
        || applier.target_has(known).await?
    {
        return Ok(());
    }
    tracing::info!(source = %applier.source(), was = %known, now = %TableName::new(namespace, name), "a table renamed on both sides goes by its new name");
    let mut names = (*live.names).clone();
    names.remove(&oid);
    live.names = Arc::new(names);
    asm.set_names(live.names.clone());
    applier.set_names(live.names.clone());
    Ok(())
}

/// Apply the stream until `stop`; then finish cleanly at a transaction boundary.
async fn stream_loop(
    applier: &mut Applier,
    stream: &mut SourceStream,
    start: Lsn,
    stop: &mut watch::Receiver<bool>,
    progress: &Progress,
    live: &mut LiveState,
    careful: &mut Careful,
) -> Result<()> {
    let source = applier.source();
    let mut asm = Assembler::new(source).with_names(live.names.clone());
    // Inside the transaction `tandem skip` leaves out.
    let mut leaving = false;
    // Durable on the target: the slot may be confirmed up to here.
    let mut checkpoint = start;
    progress.checkpoint.store(checkpoint.0, Ordering::Relaxed);
    // Everything before this needs nothing more applied, but is not yet recorded.
    let mut safe = start;
    // How far the stream itself has come (keepalives, commits handled). Kafka's barriers go by
    // this, not by `safe`: after a restart behind the checkpoint (Kafka lagged the target), the
    // transactions up to the checkpoint are still to come and be published again, so a barrier
    // at the checkpoint would confirm the slot past events Kafka never got.
    let mut through = Lsn::ZERO;
    let mut skipping = false;
    let mut group_end: Option<Lsn> = None;
    // The checkpoint of the last group commit sent (it may not have come back yet).
    let mut committing = start;
    let mut group_opened: Option<Instant> = None;
    let mut group_changes = 0u64;
    // A `tandem ddl` schema change runs in a target transaction of its own source transaction
    // only: the group before it commits first, and the group it opens commits at its end. In one
    // shared with other transactions it was refused, and refused again at every restart: after
    // rows whose deferred triggers are pending (a deferred foreign key, where the role may not
    // set `session_replication_role`), an `ALTER TABLE` or `TRUNCATE` of their table is
    // ("pending trigger events"); and what some statements make cannot be used in the
    // transaction that made it (an enum label `ALTER TYPE … ADD VALUE` added: "unsafe use of new
    // value").
    let mut ddl_in_group = false;
    // `group_changes` when the source's current transaction began: whether it has applied any.
    let mut changes_at_begin = 0u64;
    // The source sent everything it had since the group opened.
    let mut source_idle = false;
    // When to make the target flush commits the WAL writer has not flushed yet.
    let mut flush_timer = Timer::new();

    // The target committed (or recorded) the checkpoint `end`: confirm the slot as far as is
    // flushed, have the rest flushed soon, report progress.
    macro_rules! checkpointed {
        ($end:expr) => {{
            checkpoint = checkpoint.max($end);
            safe = safe.max(checkpoint);
            stream.confirm(applier.ack_limit(checkpoint)?);
            schedule_flush(applier, &mut flush_timer);
            progress.report(checkpoint, &applier.stats);
        }};
    }

    // Commits that came back since the last look.
    macro_rules! take_committed {
        () => {{
            if let Some(end) = applier.take_committed() {
                checkpointed!(end);
            }
        }};
    }

    // Close the group: its commit is sent, and the next group opens behind it while the target
    // runs it (`take_committed` learns when it came back).
    macro_rules! commit_group {
        () => {{
            let end = group_end
                .take()
                .expect("a group commits at a transaction boundary");
            applier.commit_ahead(end).await?;
            committing = end;
            group_opened = None;
            group_changes = 0;
            source_idle = false;
            take_committed!();
        }};
    }

    // Before the first change of the source's current transaction: close the group, if it
    // holds earlier transactions, so that this one starts a target transaction of its own.
    macro_rules! own_group {
        () => {{
            if group_end.is_some() && group_changes == changes_at_begin {
                commit_group!();
            }
        }};
    }

    // Close the group, if one is open, and wait until every commit sent came back: what
    // follows needs the target to hold it (a live transaction's session, a transaction a
    // failure must be pinned on, a stop).
    macro_rules! commit_group_now {
        () => {{
            if group_end.is_some() {
                commit_group!();
            }
            applier.settle_all().await?;
            take_committed!();
        }};
    }

    let (mut group_timer, mut kafka_timer) = (Timer::new(), Timer::new());
    // Kept across turns too, and polled last: a fresh `changed()` polled first took the watch's
    // lock twice per event. `has_changed` (an atomic read) sees a stop while events keep coming.
    let mut watcher = stop.clone();
    let stopped = watcher.changed();
    tokio::pin!(stopped);
    loop {
        if !matches!(stop.has_changed(), Ok(false)) {
            break;
        }
        // Every wait on the target may read a commit's result (a Kafka barrier's, a flush's),
        // not only the branch below: whichever read it, the checkpoint and slot move now.
        take_committed!();
        let age = if source_idle {
            GROUP_IDLE_AGE
        } else {
            GROUP_MAX_AGE
        };
        group_timer.set(group_opened.map(|t| tokio::time::Instant::from_std(t + age)));
        if !kafka_timer.armed() && applier.kafka_pending() {
            kafka_timer.set(Some(tokio::time::Instant::now() + KAFKA_ACK_POLL));
        }
        let ev = tokio::select! {
            biased;
            _ = group_timer.fired(),
                if group_timer.armed() && !asm.in_transaction() && group_end.is_some() => {
                commit_group!();
                continue;
            }
            // Commits not known flushed on the target for a while: flush, then confirm them.
            _ = flush_timer.fired(), if flush_timer.armed() && !applier.in_txn() => {
                applier.poll_flush().await?;
                stream.confirm(applier.ack_limit(checkpoint)?);
                continue;
            }
            // Kafka acknowledgements trickle in on their own: pass them on to the slot.
            _ = kafka_timer.fired(), if kafka_timer.armed() => {
                stream.confirm(applier.ack_limit(checkpoint)?);
                continue;
            }
            // Results of what was sent ahead, as they come: a commit moves the checkpoint.
            r = applier.settle_next(), if applier.outstanding() => {
                r?;
                continue;
            }
            ev = stream.next() => ev?,
            _ = &mut stopped => break,
        };
        match ev {
            StreamEvent::Keepalive(lsn) => {
                if !asm.in_transaction() {
                    if group_end.is_some() {
                        source_idle = true;
                        if group_opened.is_none_or(|t| t.elapsed() >= GROUP_IDLE_AGE) {
                            commit_group!();
                        }
                    }
                    // Only with nothing uncommitted: the keepalive vouches for what was sent.
                    if group_end.is_none() {
                        safe = safe.max(lsn);
                        through = through.max(lsn);
                        applier.barrier(through).await?;
                    }
                }
                stream.confirm(applier.ack_limit(checkpoint)?);
            }
            StreamEvent::Live(Live::Start { xid, first }) => {
                // Whole transactions received before this block committed before it on the
                // source: commit them first, so the live session never waits on their rows.
                commit_group_now!();
                if first {
                    // The session itself opens at the transaction's first message (below).
                    if let Some(a) = live.session.as_mut() {
                        a.set_copied(applier.copied().clone());
                    }
                    live_lock_timeout(applier, true).await?;
                    let mut asm = Assembler::new(source).with_names(live.names.clone());
                    // Its commit LSN and time are known at its end; nothing needs them before.
                    asm.push(Message::Begin(Begin {
                        final_lsn: Lsn::ZERO,
                        commit_ts: 0,
                        xid,
                    }))?;
                    live.txn = Some(LiveTxn {
                        xid,
                        asm,
                        subxacts: Vec::new(),
                    });
                    careful.in_live = true;
                }
            }
            StreamEvent::Live(Live::Stop) => {}
            StreamEvent::Live(Live::Message { sub, msg }) => {
                let Some(t) = live.txn.as_mut() else {
                    bail!("{source}: a streamed change outside its transaction");
                };
                let ev = match t.asm.push(msg)? {
                    Some(Item::Change(ev)) => ev,
                    Some(Item::Echo(_)) | None => continue,
                    // Its row in tandem.ddl is only visible once the transaction commits.
                    Some(Item::Ddl(_)) => return Err(LiveDdl { xid: t.xid }.into()),
                    Some(other) => {
                        bail!("{source}: {other:?} inside streamed transaction {}", t.xid)
                    }
                };
                // Opened at the first change, not at the stream's start: the walsender streams
                // transactions with nothing to apply too (another database's catalog changes
                // past the decoding memory, such as a migration; tandem's own large writes on
                // this side, whose marker comes first), and those need no session on the target.
                if live.session.is_none() {
                    let mut a = Applier::connect_for_run(live.cfg.clone(), source, false).await?;
                    live.cancellers.add(a.canceller()?);
                    a.write_plainly(live.upsert_tables.clone());
                    a.set_copied(applier.copied().clone());
                    a.set_source_partitioned(applier.source_partitioned());
                    live.session = Some(a);
                }
                let a = live.session.as_mut().expect("opened above");
                // Where a subtransaction's changes start: before its first one.
                if sub != t.xid && !t.subxacts.contains(&sub) {
                    a.savepoint(&savepoint_name(sub)).await?;
                    t.subxacts.push(sub);
                }
                a.apply(&ev).await?;
            }
            StreamEvent::Live(Live::Abort { xid, subxid }) => {
                let Some(t) = live.txn.as_mut() else {
                    bail!("{source}: abort of streamed transaction {xid} that is not open");
                };
                if subxid == xid {
                    if let Some(a) = live.session.as_mut() {
                        a.rollback().await?;
                    }
                    live.txn = None;
                    careful.in_live = false;
                    live_lock_timeout(applier, false).await?;
                } else if let Some(i) = t.subxacts.iter().position(|s| *s == subxid) {
                    // A savepoint exists only where a message of it came, so a session too.
                    if let Some(a) = live.session.as_mut() {
                        a.rollback_to(&savepoint_name(subxid)).await?;
                    }
                    t.subxacts.truncate(i);
                }
            }
            StreamEvent::Live(Live::Commit { xid, commit, copy }) => {
                let Some(t) = live.txn.take() else {
                    bail!("{source}: commit of streamed transaction {xid} that is not open");
                };
                asm.learn_relations(t.asm);
                metrics::counter!("tandem_streamed_transactions_total",
                    "direction" => source.direction_from(), "applied" => "live")
                .increment(1);
                live_lock_timeout(applier, false).await?;
                applier.passed(commit.commit_lsn);
                through = through.max(commit.end_lsn);
                // In commit order: whole transactions received before this commit go first.
                commit_group_now!();
                let applied_before = commit.commit_lsn < checkpoint;
                let session = live
                    .session
                    .as_mut()
                    .filter(|a| a.in_txn() && !applied_before);
                if let Some(a) = session {
                    a.set_commit_ts(commit.commit_ts);
                    // The commit carries the origin like every other (one session may hold it).
                    let lend = applier.origin;
                    if lend {
                        applier.origin_session(false).await?;
                        a.origin_session(true).await?;
                    }
                    a.commit(commit.end_lsn).await?;
                    if lend {
                        a.origin_session(false).await?;
                        applier.origin_session(true).await?;
                    }
                    a.hand_over_unflushed(applier);
                    applier.stats.changes += std::mem::take(&mut a.stats.changes);
                    applier.count_transaction();
                    checkpointed!(commit.end_lsn);
                } else {
                    // Nothing it changed flows here (or tandem's own), or it was applied before
                    // a restart.
                    if let Some(a) = live.session.as_mut() {
                        a.rollback().await?;
                    }
                    safe = safe.max(commit.end_lsn);
                }
                // Kafka, as for a whole transaction: its events now that they have a commit (a
                // transaction applied before a restart only when Kafka may lack it).
                if let Some(copy) = copy {
                    if !applied_before || applier.kafka_required() {
                        applier.publish_copy(copy)?;
                    }
                    applier.barrier(commit.end_lsn).await?;
                }
                careful.in_live = false;
            }
            StreamEvent::Message(msg) => {
                if let Message::Relation(r) = &msg {
                    forget_renamed(applier, &mut asm, live, r.id, &r.namespace, &r.name).await?;
                }
                match asm.push(msg)? {
                    None => {}
                    Some(Item::Begin {
                        commit_lsn,
                        xid,
                        commit_ts,
                    }) => {
                        // Already applied before a restart: the checkpoint is the end of a commit
                        // record, so any commit that starts before it is at or below it.
                        skipping = commit_lsn < checkpoint;
                        if !skipping && commit_lsn <= careful.until {
                            // A failure from here on must be this transaction's: nothing before it
                            // may still be on its way.
                            commit_group_now!();
                        }
                        changes_at_begin = group_changes;
                        if !skipping {
                            careful.reached = careful.reached.max(commit_lsn);
                            leaving = careful.skip == Some(commit_lsn);
                            if careful.skip.is_some_and(|s| s < commit_lsn) {
                                tracing::warn!(%source, "`tandem skip` asked to leave out the transaction committing at {}, but none commits there; the request is withdrawn", careful.skip.unwrap_or_default());
                                careful.skip = None;
                                applier.settle_all().await?;
                                applier
                                    .client()
                                    .batch_execute(&checkpoint::clear_skip_sql(source))
                                    .await?;
                            }
                            careful.current =
                                (commit_lsn <= careful.until && !leaving).then_some(TxnInfo {
                                    xid,
                                    commit_lsn,
                                    commit_ts,
                                });
                            applier.apply_singly(careful.singly == Some(commit_lsn));
                        }
                    }
                    // A schema change is left out, or published again, like any change.
                    Some(Item::Change(ev) | Item::Ddl(ev)) if leaving => {
                        applier.publish_left_out(ev).await?;
                    }
                    Some(commit @ Item::Commit { end_lsn, .. }) if leaving => {
                        if let Some(end) = TxnEnd::of(source, &commit) {
                            applier.end_transaction(end)?;
                        }
                        leaving = false;
                        through = through.max(end_lsn);
                        // The groups before it commit first: the checkpoint passes it in order.
                        commit_group_now!();
                        applier.record_left_out(end_lsn).await?;
                        applier.barrier(end_lsn).await?;
                        take_committed!();
                        tracing::warn!(%source, commit = %careful.skip.unwrap_or_default(), "left out a {source} transaction, as `tandem skip` asked: none of its changes is applied to {}", source.other());
                        metrics::counter!("tandem_transactions_left_out_total", "direction" => source.direction_from())
                        .increment(1);
                        careful.skip = None;
                    }
                    Some(Item::Change(ev) | Item::Ddl(ev))
                        if skipping && applier.kafka_required() =>
                    {
                        applier.publish_again(ev).await?;
                    }
                    Some(Item::Change(_) | Item::Ddl(_)) if skipping => {}
                    Some(Item::Echo(ev)) if !skipping || applier.kafka_required() => {
                        applier.publish_echo(ev).await?;
                    }
                    Some(Item::Echo(_)) => {}
                    Some(Item::Change(ev)) => {
                        // As for a schema change (see `ddl_in_group`): PostgreSQL refuses a
                        // TRUNCATE of a table whose rows' deferred triggers are pending, which
                        // the transactions before it in the group may have left.
                        if matches!(ev.change, Change::Truncate { .. }) {
                            own_group!();
                        }
                        applier.apply(&ev).await?;
                        if applier.in_txn() && group_opened.is_none() {
                            group_opened = Some(Instant::now());
                        }
                        group_changes += 1;
                    }
                    Some(Item::Ddl(mut ev)) => {
                        let Change::Ddl { id, .. } = ev.change else {
                            bail!("{source}: a schema change that is none");
                        };
                        match crate::ops::ddl::issued(live.cfg.site(source), ev.xid, id).await? {
                            Some(change) => {
                                ev.change = change;
                                // Not its text: a statement may carry a password (`ALTER ROLE …`).
                                tracing::info!(%source, id, "running {source}'s schema change {id} on {}", source.other());
                                // Its message comes first in its transaction (`tandem ddl`).
                                own_group!();
                                applier.apply(&ev).await?;
                                if applier.in_txn() && group_opened.is_none() {
                                    group_opened = Some(Instant::now());
                                }
                                group_changes += 1;
                                ddl_in_group = true;
                                metrics::counter!("tandem_ddl_total", "direction" => source.direction_from())
                                .increment(1);
                            }
                            None => {
                                tracing::warn!(%source, "{source} transaction {} carries a `{DDL_PREFIX}` message (schema change {id}) that `tandem ddl` did not write: that row of {source}'s tandem.ddl is not this transaction's; not run on {}", ev.xid, source.other());
                                // On the audit stream as left out, so that the transaction's events
                                // still carry every ordinal its end counts.
                                applier.publish_left_out(ev).await?;
                            }
                        }
                    }
                    Some(commit @ Item::Commit { end_lsn, .. }) => {
                        // Its events went out (or, already applied, were sent again for Kafka).
                        if !skipping || applier.kafka_required() {
                            if let Some(end) = TxnEnd::of(source, &commit) {
                                applier.end_transaction(end)?;
                            }
                        }
                        through = through.max(end_lsn);
                        if skipping {
                            skipping = false;
                            applier.barrier(end_lsn).await?;
                        } else if applier.in_txn() {
                            group_end = Some(end_lsn);
                            applier.count_transaction();
                            let ddl = std::mem::take(&mut ddl_in_group);
                            if careful.current.is_some() {
                                commit_group_now!();
                            } else if group_changes >= GROUP_MAX_CHANGES || ddl {
                                commit_group!();
                            }
                        } else {
                            safe = safe.max(end_lsn);
                            applier.barrier(through).await?;
                        }
                        // Committed (or with nothing to commit): later failures are not its.
                        careful.current = None;
                    }
                }
            }
        }
        // Against the last commit sent too: one on its way usually covers most of `safe`.
        if !applier.in_txn() && safe.0 >= checkpoint.max(committing).0 + IDLE_RECORD_BYTES {
            applier.record(safe).await?;
            take_committed!();
        }
    }

    // Graceful stop: keep whole groups, drop a half-received transaction (it comes again).
    if let Some(a) = live.session.as_mut() {
        a.rollback().await?;
    }
    if applier.in_txn() {
        if let (Some(end), false) = (group_end, asm.in_transaction()) {
            applier.commit(end).await?;
        } else {
            applier.rollback().await?;
        }
    }
    applier.settle_all().await?;
    if let Some(end) = applier.take_committed() {
        checkpoint = checkpoint.max(end);
        safe = safe.max(end);
    }
    if safe > checkpoint {
        applier.record(safe).await?;
        checkpoint = safe;
    }
    applier.barrier(checkpoint.min(through)).await?;
    applier.drain_kafka().await?;
    // The WAL writer flushes asynchronous commits within a few hundred milliseconds.
    let flush_deadline = Instant::now() + Duration::from_secs(2);
    while applier.flush_pending() && Instant::now() < flush_deadline {
        tokio::time::sleep(FLUSH_POLL).await;
        applier.poll_flush().await?;
    }
    stream.confirm(applier.ack_limit(checkpoint)?);
    // The last commits may have come back only here.
    progress.report(checkpoint, &applier.stats);
    tracing::info!(%source, %checkpoint, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_shows_until_a_commit_moves_the_checkpoint_past_it() {
        let p = Progress::default();
        let stats = crate::apply::ApplyStats::default();
        p.set_refused(Lsn(100), "no_bad".into());
        // A commit at the same checkpoint (the retry's transactions before it, already there).
        p.report(Lsn(100), &stats);
        assert_eq!(p.refused().as_deref(), Some("no_bad"));
        p.report(Lsn(101), &stats);
        assert_eq!(p.refused(), None);
        assert_eq!(p.checkpoint(), Lsn(101));
    }

    #[test]
    fn a_missing_column_is_a_refusal_a_lost_connection_is_not() {
        let missing = anyhow::Error::new(BindError::MissingColumn {
            table: "public.t".parse().unwrap(),
            column: "n".into(),
        })
        .context("applying to mobile");
        assert!(refused_by_target(&missing) && refusal(&missing) && !transient(&missing));
        let lost = anyhow!("the replication stream ended");
        assert!(!refused_by_target(&lost) && !refusal(&lost) && transient(&lost));
    }

    #[tokio::test]
    async fn a_server_that_is_down_is_waited_for_and_a_protocol_error_is_not() {
        // Nothing listens on port 1: refused, as while a server restarts. The error still reads
        // as one line with the fix, and `run` reconnects instead of stopping.
        let text = "[desktop]\nurl = \"postgresql://tandem:pw@127.0.0.1:1/db\"\n\
                    [mobile]\nurl = \"postgresql://tandem@127.0.0.1:1/db\"\n\
                    [replication]\ntables = [\"public.t\"]\n";
        let cfg = Config::parse(text, |_| None).unwrap();
        let down = db::connect(cfg.site(Side::Desktop), "test")
            .await
            .unwrap_err();
        let msg = format!("{down:#}");
        assert!(
            msg.starts_with("desktop: cannot reach tandem@127.0.0.1:1/db (")
                && msg.contains("check the host and port, and that the server is running")
                && !msg.contains("pw"),
            "{msg}"
        );
        assert!(down
            .downcast_ref::<db::ConnectError>()
            .is_some_and(db::ConnectError::server_away));
        assert!(transient(&down.context("opening the apply session")));
        // What reconnecting cannot fix stops `run` with its error.
        let refused =
            anyhow::Error::new(WalError::Protocol("truncated replication message".into()));
        assert!(!transient(&refused));
    }
}
