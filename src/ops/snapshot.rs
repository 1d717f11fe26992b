//! Initial snapshot: bring a table's existing rows on the target in line with the seed side.
//!
//! Per table, in one target transaction: tandem's marker (so the target's stream never sends the
//! rows back), a temporary staging table filled by `COPY` straight from a REPEATABLE READ read on
//! the seed, then a merge into the real table and the table's `done` row in `tandem.snapshots`.
//! A failure or a kill anywhere before that commit leaves the target table untouched.
//!
//! Why this is consistent with streaming without an exported snapshot: the seed→target direction
//! is not running during the copy, so its checkpoint C stays where it is, and the copy reads the
//! seed at some snapshot S after C. Streaming later resumes at C. The transactions S saw are in
//! the copy: the direction leaves their changes of this table out (S and the WAL position after
//! it are recorded with the table's `done` row; [`crate::apply::copied`]), and applies the rest,
//! committed during or after the copy. Nothing written during the copy is lost (it is after C and
//! not in S) or applied twice (in S, left out).
//!
//! The copy runs under the seed's replication origin where the role may: last_write_wins by
//! commit time then takes the copied rows as the seed's, older than anything its stream brings.
//! The merge's read of the target is recorded the same way: the target→seed stream leaves out the
//! target's changes of this table that the merge saw (it replaced them with the seed's rows, or
//! copied them to the seed).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{pin_mut, SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};

use crate::apply::{origin_name, take_origin};
use crate::catalog;
use crate::config::{quote_ident, Config, Direction, TableName};
use crate::db;
use crate::ops::rewrite;
use crate::side::Side;
use crate::source::assemble::MARKER_PREFIX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Missing rows inserted, differing rows take the seed's version, target-only rows stay (and
    /// are copied to the seed for two-way tables, so both end with the union).
    Merge,
    /// The target becomes an exact copy: target-only rows are deleted.
    Mirror,
    /// Missing rows inserted and differing rows updated; nothing deleted, copied back or
    /// recorded: a mirror's first pass, over the tables others reference (see [`snapshot`]).
    Fill,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Merge => "merge",
            Mode::Mirror => "mirror",
            Mode::Fill => "fill",
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub table: String,
    pub copied: u64,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Target-only rows copied to the seed side (merge of a two-way table).
    pub copied_back: u64,
    /// Already done by an earlier, interrupted run.
    pub skipped: bool,
}

struct Sides {
    d: Client,
    m: Client,
}

impl Sides {
    fn get(&self, s: Side) -> &Client {
        match s {
            Side::Desktop => &self.d,
            Side::Mobile => &self.m,
        }
    }
}

async fn connect(cfg: &Config) -> Result<Sides> {
    let sides = Sides {
        d: db::connect(&cfg.desktop, "tandem snapshot").await?,
        m: db::connect(&cfg.mobile, "tandem snapshot").await?,
    };
    // The rows a copy writes are replicated rows, like those the apply sessions write: where
    // the role may, the target's user triggers do not fire for them either, as in native's
    // table sync. Before, a trigger stamping `updated_at` fired for every copied row while it
    // fires for no streamed one, and the sides differed from the start.
    for c in [&sides.d, &sides.m] {
        let _ = c
            .batch_execute("SET session_replication_role = replica")
            .await;
    }
    Ok(sides)
}

async fn state(c: &Client, t: &TableName) -> Result<Option<String>> {
    Ok(c.query_opt(
        "SELECT state FROM tandem.snapshots WHERE table_name = $1",
        &[&t.to_string()],
    )
    .await
    .context("reading tandem.snapshots (run `tandem setup` to create it)")?
    .map(|r| r.get(0)))
}

/// Record on `here` that `t`, which a `tandem ddl` schema change created on both sides, is
/// synchronised: the same on both from its start, with nothing for an initial snapshot to copy.
/// Written by `run` as it makes the table `here`, with `here` as its seed, which no copy writes (a
/// copy's row is on its target, naming the other side), so [`unsynchronised`] tells the two apart.
pub(crate) async fn mark_created(c: &impl GenericClient, t: &TableName, here: Side) -> Result<()> {
    mark(c, t, here, Mode::Merge, "done", Some(0), None, None).await
}

/// Record `t`'s snapshot state; when done, with `rows` copied as `seed_read` saw the seed, and
/// merged as `back_read` saw the target.
#[allow(clippy::too_many_arguments)]
async fn mark(
    c: &impl GenericClient,
    t: &TableName,
    seed: Side,
    mode: Mode,
    state: &str,
    rows: Option<i64>,
    seed_read: Option<&Read>,
    back_read: Option<&Read>,
) -> Result<()> {
    c.execute(
        "INSERT INTO tandem.snapshots (table_name, seed, mode, state, rows, seed_snapshot, seed_lsn, \
         back_snapshot, back_lsn) VALUES ($1, $2, $3, $4, $5, $6, $7::text::pg_lsn, $8, $9::text::pg_lsn) \
         ON CONFLICT (table_name) DO UPDATE SET seed = EXCLUDED.seed, mode = EXCLUDED.mode, \
         state = EXCLUDED.state, rows = EXCLUDED.rows, seed_snapshot = EXCLUDED.seed_snapshot, \
         seed_lsn = EXCLUDED.seed_lsn, back_snapshot = EXCLUDED.back_snapshot, \
         back_lsn = EXCLUDED.back_lsn, updated_at = now()",
        &[
            &t.to_string(),
            &seed.tag().to_string(),
            &mode.name(),
            &state,
            &rows,
            &seed_read.map(|r| r.snapshot.as_str()),
            &seed_read.map(|r| r.lsn.as_str()),
            &back_read.map(|r| r.snapshot.as_str()),
            &back_read.map(|r| r.lsn.as_str()),
        ],
    )
    .await?;
    Ok(())
}

/// Where a read saw one side (see [`crate::apply::copied`]): the snapshot of the statement, and
/// that side's WAL insert position read in it, after the snapshot was taken.
struct Read {
    snapshot: String,
    lsn: String,
}

/// What a statement selects (from column `at` on) to give its [`Read`].
const READ_COLUMNS: &str = "txid_current_snapshot()::text, pg_current_wal_insert_lsn()::text";

impl Read {
    fn from_row(r: &tokio_postgres::Row, at: usize) -> Read {
        Read {
            snapshot: r.get(at),
            lsn: r.get(at + 1),
        }
    }
}

/// [`Read`] of a statement of its own on `c`: in a REPEATABLE READ transaction's first statement,
/// the transaction's snapshot.
async fn read_position(c: &Client) -> Result<Read> {
    let r = c.query_one(&format!("SELECT {READ_COLUMNS}"), &[]).await?;
    Ok(Read::from_row(&r, 0))
}

/// Open the seed's REPEATABLE READ transaction the copy reads in, and note where it reads.
async fn begin_read(s: &Client) -> Result<Read> {
    s.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    read_position(s).await
}

/// Refuse while `tandem run` streams either side: the copy must not race the stream.
async fn require_stopped(cfg: &Config, sides: &Sides) -> Result<()> {
    for side in Side::BOTH {
        let slot = &cfg.site(side).slot;
        let active = sides
            .get(side)
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await?
            .is_some_and(|r| r.get::<_, bool>(0));
        if active {
            bail!(
                "{side}: slot {slot} is in use: stop `tandem run` first (run itself snapshots \
                 never-synchronised tables when it starts)"
            );
        }
    }
    Ok(())
}

/// `tandem snapshot`: every configured table (or `only`), seeded from `seed`. Resumes an
/// interrupted run: tables it finished are not redone.
pub async fn snapshot(
    cfg: Arc<Config>,
    only: Option<&TableName>,
    seed: Side,
    mode: Mode,
) -> Result<Vec<Outcome>> {
    let sides = connect(&cfg).await?;
    require_stopped(&cfg, &sides).await?;
    let target = sides.get(seed.other());
    let mut tables = catalog::expand(sides.get(seed), &cfg.tables).await?;
    tables = copy_order(tables, &sides).await?;
    if let Some(t) = only {
        if !tables.contains(t) {
            bail!("table {t} is not among the configured tables");
        }
        tables = vec![t.clone()];
    }
    for side in Side::BOTH {
        let c = sides.get(side);
        if let Some(problem) = catalog::row_security(c, side, &tables).await? {
            bail!(problem);
        }
        let rules = catalog::rules(c, side, &cfg.arriving(side, &tables)).await?;
        if !rules.is_empty() {
            bail!(rules.join("\n"));
        }
    }
    let pending: Vec<String> = target
        .query(
            "SELECT table_name FROM tandem.snapshots WHERE state = 'pending' ORDER BY 1",
            &[],
        )
        .await
        .context("reading tandem.snapshots (run `tandem setup` to create it)")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let resuming = !pending.is_empty() && tables.iter().any(|t| pending.contains(&t.to_string()));
    if resuming {
        tracing::info!(
            "resuming an unfinished snapshot: {} table(s) left",
            pending.len()
        );
    } else {
        for t in &tables {
            mark(target, t, seed, mode, "pending", None, None, None).await?;
        }
    }
    let mut out = Vec::new();
    if mode == Mode::Mirror {
        // A mirror deletes the target's rows the seed lacks. Table by table in reference order,
        // such a row another table's row still references stopped it (a foreign-key error). So
        // first the tables others reference get the seed's rows (nothing deleted), then each
        // table is mirrored after the tables that reference it: those no longer point at the rows
        // it deletes, and the rows it gives them to point at are already there.
        let referenced = catalog::referenced_within(&tables, &sides.d, &sides.m).await?;
        for t in tables.iter().filter(|t| referenced.contains(t)) {
            if !(resuming && state(target, t).await?.as_deref() == Some("done")) {
                copy_table(&cfg, &sides, t, seed, Mode::Fill).await?;
            }
        }
        tables.reverse();
    }
    for t in &tables {
        if resuming && state(target, t).await?.as_deref() == Some("done") {
            out.push(Outcome {
                table: t.to_string(),
                skipped: true,
                ..Default::default()
            });
            continue;
        }
        out.push(copy_table(&cfg, &sides, t, seed, mode).await?);
    }
    Ok(out)
}

/// `run`'s start: snapshot (merge) every table that was never synchronised, from its seed; with
/// `only`, those of them it names (tables published since `run` started).
pub async fn initial(cfg: &Config, only: Option<&[TableName]>) -> Result<Vec<Outcome>> {
    let sides = connect(cfg).await?;
    // A stop drops this future mid-copy: the copy's statements are cancelled with it.
    let cancel = db::CancelOnDrop::new(vec![
        db::Canceller::new(&cfg.desktop, &sides.d)?,
        db::Canceller::new(&cfg.mobile, &sides.m)?,
    ]);
    let r = initial_tables(cfg, &sides, only).await;
    cancel.disarm();
    r
}

async fn initial_tables(
    cfg: &Config,
    sides: &Sides,
    only: Option<&[TableName]>,
) -> Result<Vec<Outcome>> {
    let mut pending: Vec<(TableName, Side)> = unsynchronised(cfg, &sides.d, &sides.m)
        .await?
        .into_iter()
        .filter(|(t, _)| only.is_none_or(|only| only.contains(t)))
        .collect();
    let order = copy_order(pending.iter().map(|(t, _)| t.clone()).collect(), sides).await?;
    pending.sort_by_key(|(t, _)| order.iter().position(|o| o == t));
    let mut out = Vec::new();
    for (t, seed) in pending {
        out.push(copy_table(cfg, sides, &t, seed, Mode::Merge).await?);
    }
    Ok(out)
}

/// The configured tables (as desktop has them) that `run`'s initial snapshot copies, with their
/// seeds: never synchronised (no `done` record on the target), not made by a `tandem ddl` schema
/// change (a `done` record on the side `run` made it on, naming that side as the seed), and not
/// `snapshot_seed = "none"`.
pub(crate) async fn unsynchronised(
    cfg: &Config,
    d: &Client,
    m: &Client,
) -> Result<Vec<(TableName, Side)>> {
    // Each side's `done` records, as (table, seed).
    let mut done = Vec::new();
    for c in [d, m] {
        let rows = c
            .query(
                "SELECT table_name, seed FROM tandem.snapshots WHERE state = 'done'",
                &[],
            )
            .await
            .context("reading tandem.snapshots (run `tandem setup` to create it)")?;
        done.push(
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect::<std::collections::HashMap<_, _>>(),
        );
    }
    let seed_on = |side: Side, t: &str| {
        done[match side {
            Side::Desktop => 0,
            Side::Mobile => 1,
        }]
        .get(t)
        .cloned()
    };
    let mut out = Vec::new();
    for t in catalog::expand(d, &cfg.tables).await? {
        let Some(seed) = cfg.seed_for(&t) else {
            continue;
        };
        let name = t.to_string();
        let copied = seed_on(seed.other(), &name).is_some();
        let made = Side::BOTH
            .into_iter()
            .any(|side| seed_on(side, &name) == Some(side.tag().to_string()));
        if !copied && !made {
            out.push((t, seed));
        }
    }
    Ok(out)
}

/// `tables` in the order they are copied: each after the tables it references on either side,
/// so that its copy (into the target) and its copy back (into the seed) find the rows its foreign
/// keys reference already there. Copied in the configured order, a table sorted before the one it
/// references failed its copy on its first row that referenced one the target lacked.
async fn copy_order(tables: Vec<TableName>, sides: &Sides) -> Result<Vec<TableName>> {
    catalog::reference_order(tables, &sides.d, &sides.m).await
}

fn progress(t: &TableName, estimate: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = if estimate > 0 {
        ProgressBar::new(estimate)
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(t.to_string());
    Some(bar)
}

/// Bytes of COPY data sent to the target at a time.
const COPY_PIECE: usize = 64 * 1024;

/// Stream `COPY … TO STDOUT` on `from` into `COPY … FROM STDIN` on `to`, counting rows.
async fn pipe(
    from: &Client,
    out_sql: &str,
    to: &Client,
    in_sql: &str,
    t: &TableName,
    estimate: u64,
) -> Result<u64> {
    let bar = progress(t, estimate);
    let started = Instant::now();
    let mut last_log = Instant::now();
    let out = from
        .copy_out(out_sql)
        .await
        .with_context(|| out_sql.to_string())?;
    let sink = to
        .copy_in(in_sql)
        .await
        .with_context(|| in_sql.to_string())?;
    pin_mut!(out);
    pin_mut!(sink);
    let mut rows = 0u64;
    // COPY OUT yields one row per message. Sent on as they come, each row was a flush of its
    // own, a message to the connection task and a write (tandem at 100% of a core, ~65k rows/s):
    // rows go on in pieces of COPY_PIECE bytes instead.
    let mut piece = bytes::BytesMut::with_capacity(COPY_PIECE);
    while let Some(chunk) = out.next().await {
        let chunk = chunk?;
        // Text COPY ends every row with a newline and escapes newlines inside values.
        rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        piece.extend_from_slice(&chunk);
        if piece.len() < COPY_PIECE {
            continue;
        }
        sink.send(piece.split().freeze()).await?;
        match &bar {
            Some(b) => b.set_position(rows),
            None if last_log.elapsed() >= Duration::from_secs(2) => {
                let rate = rows as f64 / started.elapsed().as_secs_f64();
                tracing::info!(table = %t, rows, estimate, rows_per_s = rate as u64, "snapshot copying");
                last_log = Instant::now();
            }
            None => {}
        }
    }
    if !piece.is_empty() {
        sink.send(piece.freeze()).await?;
    }
    sink.finish().await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(rows)
}

/// A direct copy into an empty target table met a row the target's application wrote meanwhile.
#[derive(Debug, thiserror::Error)]
#[error("a row written on the target during the direct copy collided with a copied one")]
struct DirectCollided;

/// Let go of the replication origins [`copy_table_via`] took: one session holds an origin at a
/// time, and the apply sessions take them next.
async fn release_origins(held: &[&Client]) {
    for c in held {
        if let Err(e) = c
            .batch_execute("SELECT pg_replication_origin_session_reset()")
            .await
        {
            tracing::debug!("letting go of a replication origin: {e}");
        }
    }
}

/// tandem's marker, first in a transaction: that side's own stream leaves the transaction out.
async fn marker(c: &Client, what: &str) -> Result<()> {
    c.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&MARKER_PREFIX, &what],
    )
    .await?;
    Ok(())
}

/// How many times the merge is tried again after meeting a row the target's application
/// changed after the merge's read.
const MERGE_ATTEMPTS: u32 = 20;

/// Did the merge meet a row changed after its read (see [`copy_table_via`])?
fn merge_again(e: &tokio_postgres::Error) -> bool {
    [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::UNIQUE_VIOLATION,
    ]
    .iter()
    .any(|c| e.code() == Some(c))
}

/// Snapshot one table from `seed` into the other side: straight into the table when it is
/// empty, else through a staging table and a merge (and after a direct copy that collided).
async fn copy_table(
    cfg: &Config,
    sides: &Sides,
    t: &TableName,
    seed: Side,
    mode: Mode,
) -> Result<Outcome> {
    match copy_table_via(cfg, sides, t, seed, mode, true).await {
        Err(e) if e.downcast_ref::<DirectCollided>().is_some() => {
            tracing::warn!(
                table = %t,
                error = %e.root_cause(),
                "a row written on the target during the direct copy has a key the seed has too; \
                 copying through a staging table instead"
            );
            copy_table_via(cfg, sides, t, seed, mode, false).await
        }
        r => r,
    }
}

/// [`copy_table`]; `direct`: COPY straight into the table if it is empty, as native logical
/// replication's table sync does (2M rows: 2.6–3.9 s, native 3.8–4.5 s; through the staging
/// table and the merge 5.1 s).
async fn copy_table_via(
    cfg: &Config,
    sides: &Sides,
    t: &TableName,
    seed: Side,
    mode: Mode,
    direct: bool,
) -> Result<Outcome> {
    let (s, x) = (sides.get(seed), sides.get(seed.other()));
    let meta = catalog::table(x, t)
        .await?
        .ok_or_else(|| anyhow!("{}: table {t} does not exist", seed.other()))?;
    // Without a key a row is known by its values alone: the merge counts equal rows (below).
    let keyless = meta.key.is_empty();
    // Only what flows: with a column list the others are each side's own.
    let cols: Vec<String> = meta
        .columns
        .iter()
        .filter(|c| !c.generated && cfg.column_flows(t, &c.name))
        .map(|c| quote_ident(&c.name))
        .collect();
    let list = cols.join(", ");
    let keys: Vec<String> = meta
        .key
        .iter()
        .map(|&k| quote_ident(&meta.columns[k].name))
        .collect();
    let overriding = if meta.columns.iter().any(|c| c.identity_always) {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    let table = t.quoted();
    // Reads, updates and deletes of a table others inherit from take its own rows (`ONLY`), on
    // each side as it has them; `COPY … FROM` and `INSERT` write only the table named anyway.
    let rows = meta.rows();
    let seed_from = t.rows(catalog::inherited(s, t).await?);
    let estimate: i64 = s
        .query_one(
            "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1::text::regclass",
            &[&table],
        )
        .await?
        .get(0);
    let started = Instant::now();
    let mut outcome = Outcome {
        table: t.to_string(),
        ..Default::default()
    };

    // The copy's rows are the seed's, written as its apply session writes them: under its
    // replication origin, so last_write_wins by commit time takes them as older than any change
    // the seed's stream brings next. Without, a change the seed committed during the copy (not in
    // it) lost to the copy's later commit time on the target. Without the privilege, nothing to do:
    // that rule then needs origins (setup says so).
    let origins = [
        (x, origin_name(cfg, seed)),
        (s, origin_name(cfg, seed.other())),
    ];
    let mut held = Vec::new();
    for (c, origin) in &origins {
        match take_origin(c, origin).await {
            Ok(()) => held.push(*c),
            Err(e) => {
                tracing::debug!(table = %t, "snapshot without replication origin {origin}: {e}")
            }
        }
    }
    let result = async {
        // A row filter: the seed's rows that flow, and nothing of the target's outside it.
        let seed_rows = cfg
            .filter(t, seed)
            .map_or(String::new(), |f| format!(" WHERE ({f})"));
        let copy_out = format!("COPY (SELECT {list} FROM {seed_from}{seed_rows}) TO STDOUT");
        if direct {
            x.batch_execute("BEGIN").await?;
            marker(x, &format!("snapshot {} {t}", seed.tag())).await?;
            // The target's transactions this statement sees are all of the table it holds: the
            // target→seed stream leaves their changes of it out (the copy replaces them).
            let r = x
                .query_one(
                    &format!("SELECT NOT EXISTS (SELECT 1 FROM {rows}), {READ_COLUMNS}"),
                    &[],
                )
                .await?;
            if r.get::<_, bool>(0) {
                let back = Read::from_row(&r, 1);
                // Rows the target's application inserts meanwhile go to the seed through the
                // target's own stream; one with a key the seed has too fails the COPY (unique
                // violation), and the table is done again through the staging table.
                let read = begin_read(s).await?;
                let copy_in = format!("COPY {table} ({list}) FROM STDIN");
                outcome.copied = pipe(s, &copy_out, x, &copy_in, t, estimate as u64)
                    .await
                    .map_err(|e| match db::caused_by(&e, &SqlState::UNIQUE_VIOLATION) {
                        true => e.context(DirectCollided),
                        false => e,
                    })?;
                s.batch_execute("COMMIT").await?;
                outcome.inserted = outcome.copied;
                if mode != Mode::Fill {
                    mark(x, t, seed, mode, "done", Some(outcome.copied as i64), Some(&read), Some(&back))
                        .await?;
                }
                x.batch_execute("COMMIT").await?;
                return anyhow::Ok(());
            }
            x.batch_execute("ROLLBACK").await?;
        }
        // The staging table outlives its transaction: the merge below may be tried more than
        // once over the same copy, each time in a transaction of its own.
        x.batch_execute(&format!(
            "DROP TABLE IF EXISTS pg_temp.tandem_stage; \
             CREATE TEMP TABLE tandem_stage AS SELECT {list} FROM {table} WITH NO DATA"
        ))
        .await?;
        let read = begin_read(s).await?;
        outcome.copied = pipe(
            s,
            &copy_out,
            x,
            &format!("COPY pg_temp.tandem_stage ({list}) FROM STDIN"),
            t,
            estimate as u64,
        )
        .await?;
        s.batch_execute("COMMIT").await?;
        x.batch_execute(&match keyless {
            false => format!(
                "CREATE INDEX ON pg_temp.tandem_stage ({}); ANALYZE pg_temp.tandem_stage",
                keys.join(", ")
            ),
            true => "ANALYZE pg_temp.tandem_stage".into(),
        })
        .await?;
        let back_rows = cfg
            .filter(t, seed.other())
            .map_or(String::new(), |f| format!("({f}) AND "));
        let qualify =
            |p: &str| cols.iter().map(|c| format!("{p}.{c}")).collect::<Vec<_>>().join(", ");
        // Without a key: the rows of `from` (alias `a`, rows where `cond`) beyond as many equal
        // rows as `than` (alias `b`) holds, numbered among their equals; with `address`, only
        // their partition and physical address (`rel`, `tid`).
        let beyond = |from: &str, a: &str, cond: &str, than: &str, b: &str, address: bool| {
            let (inner, outer) = match address {
                true => (format!(", {a}.tableoid AS rel, {a}.ctid AS tid"), "w.rel, w.tid".into()),
                false => (String::new(), qualify("w")),
            };
            format!(
                "SELECT {outer} FROM (SELECT {a}.*{inner}, ROW({ra})::text AS tandem_r, row_number() \
                 OVER (PARTITION BY ROW({ra})::text) AS tandem_n FROM {from} {a}{cond}) w LEFT JOIN \
                 (SELECT ROW({rb})::text AS tandem_r, count(*) AS tandem_c FROM {than} {b} GROUP BY 1) h \
                 ON h.tandem_r = w.tandem_r WHERE w.tandem_n > coalesce(h.tandem_c, 0)",
                ra = qualify(a),
                rb = qualify(b),
            )
        };
        let target_only = match keyless {
            false => format!(
                "SELECT {list} FROM {rows} t WHERE {back_rows}NOT EXISTS (SELECT 1 FROM pg_temp.tandem_stage s WHERE {})",
                meta.key_match("s", "t")
            ),
            true => beyond(
                &rows,
                "t",
                &cfg.filter(t, seed.other()).map_or(String::new(), |f| format!(" WHERE ({f})")),
                "pg_temp.tandem_stage",
                "s",
                false,
            ),
        };
        // Two statements, not one INSERT … ON CONFLICT DO UPDATE: its speculative insertion
        // cost twice a plain insert per new row, and as much again per row already there (2M
        // rows: 5.4 s into an empty table against 2.5 s; 5.2 s over an equal one against 3.2 s).
        let settable: Vec<&str> = meta
            .columns
            .iter()
            .enumerate()
            .filter(|&(i, c)| {
                !c.generated && crate::apply::sql::settable(&meta, i) && cfg.column_flows(t, &c.name)
            })
            .map(|(_, c)| c.name.as_str())
            .collect();
        // Rows already equal are left alone: no rewrite, no trigger, no WAL.
        let differs = |a: &str, b: &str| {
            format!("ROW({})::text IS DISTINCT FROM ROW({})::text", qualify(a), qualify(b))
        };
        let update = (!settable.is_empty() && !keyless).then(|| {
            let sets: Vec<String> = settable
                .iter()
                .map(|c| format!("{0} = s.{0}", quote_ident(c)))
                .collect();
            format!(
                "UPDATE {rows} AS t SET {} FROM pg_temp.tandem_stage s WHERE {} AND {}",
                sets.join(", "),
                meta.key_match("t", "s"),
                differs("t", "s")
            )
        });
        let insert_missing = match keyless {
            false => format!(
                "INSERT INTO {table} AS t ({list}){overriding} SELECT {} FROM pg_temp.tandem_stage s \
                 WHERE NOT EXISTS (SELECT 1 FROM {rows} t WHERE {})",
                qualify("s"),
                meta.key_match("t", "s")
            ),
            // As many of each row as the seed has.
            true => format!(
                "INSERT INTO {table} ({list}){overriding} {}",
                beyond("pg_temp.tandem_stage", "s", "", &rows, "t", false)
            ),
        };
        let delete = (mode == Mode::Mirror).then(|| match keyless {
            false => format!(
                "DELETE FROM {rows} t WHERE {}NOT EXISTS (SELECT 1 FROM pg_temp.tandem_stage s WHERE {})",
                cfg.filter(t, seed).map_or(String::new(), |f| format!("({f}) AND ")),
                meta.key_match("s", "t")
            ),
            // The target's rows beyond as many as the seed has, by partition and address.
            true => format!(
                "DELETE FROM {rows} t USING ({}) x WHERE t.tableoid = x.rel AND t.ctid = x.tid",
                beyond(
                    &rows,
                    "t",
                    &cfg.filter(t, seed).map_or(String::new(), |f| format!(" WHERE ({f})")),
                    "pg_temp.tandem_stage",
                    "s",
                    true,
                )
            ),
        });
        // The merge reads the target in a REPEATABLE READ transaction of its own, so its UPDATE,
        // INSERT and DELETE see exactly what its recorded read saw, and the target→seed stream
        // leaves out the table's changes by the transactions that read saw. A row the target's
        // application changed after that read (committed meanwhile, or held by an open
        // transaction the merge waited for) fails the statement that meets it (could not
        // serialize, or a unique violation), and the merge is tried again over the same copy with
        // a later read. Under READ COMMITTED it went through instead: the UPDATE gave such a row
        // the seed's version while the stream, the change not being in the read, sent the
        // application's version to the seed, and the sides differed on that row.
        //
        // Rows exchanging values of another unique constraint (or taking one a row the target
        // alone has holds) fail the UPDATE or INSERT the same way at every read: the merge is then
        // tried once more with those rows rewritten (see [`rewrite`]). A mirror (and its first
        // pass) deletes the target's own rows in that statement too, or those holding a value.
        let its_own = format!(
            "{}NOT EXISTS (SELECT 1 FROM pg_temp.tandem_stage s WHERE {})",
            cfg.filter(t, seed).map_or(String::new(), |f| format!("({f}) AND ")),
            meta.key_match("s", "t")
        );
        let also = match mode {
            Mode::Merge => None,
            Mode::Mirror => Some(its_own),
            Mode::Fill => rewrite::holds_a_value_of(&meta, "pg_temp.tandem_stage", &cols)
                .map(|holds| format!("{its_own} AND ({holds})")),
        };
        let rewritten = rewrite::statement(&meta, "pg_temp.tandem_stage", &cols, also.as_deref());
        let mut rewriting = false;
        let mut attempts = 0;
        let mut last_unique = None;
        let back = loop {
            x.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await?;
            let back = read_position(x).await?;
            marker(x, &format!("snapshot {} {t}", seed.tag())).await?;
            let merged = async {
                if rewriting {
                    let r = x.query_one(&rewritten, &[]).await?;
                    let (gone, again) = (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64);
                    let inserted = x.execute(&insert_missing, &[]).await?;
                    return Ok((again, inserted, gone - again));
                }
                let updated = match &update {
                    Some(update) => x.execute(update, &[]).await?,
                    None => 0,
                };
                let inserted = x.execute(&insert_missing, &[]).await?;
                let deleted = match &delete {
                    Some(delete) => x.execute(delete, &[]).await?,
                    None => 0,
                };
                Ok::<_, tokio_postgres::Error>((updated, inserted, deleted))
            }
            .await;
            match merged {
                Ok((updated, inserted, deleted)) => {
                    (outcome.updated, outcome.inserted, outcome.deleted) =
                        (updated, inserted, deleted);
                    break back;
                }
                Err(e) => {
                    // The same unique violation again, at a later read, is no change made
                    // meanwhile: a seed's row collides with one of the target's on another
                    // unique constraint. Once rows are rewritten, its own error says so.
                    let unique = e
                        .as_db_error()
                        .filter(|d| d.code() == &SqlState::UNIQUE_VIOLATION)
                        .map(|d| (d.constraint().map(str::to_string), d.detail().map(str::to_string)));
                    let again = unique.is_some() && unique == last_unique;
                    // A second unique violation in a row, the same or not (which row a statement
                    // meets first may vary): the rows that differ are rewritten.
                    if unique.is_some() && last_unique.is_some() && !rewriting && !keyless {
                        x.batch_execute("ROLLBACK").await?;
                        let blocked = rewrite::blocked_by(x, t).await?;
                        if !blocked.is_empty() {
                            return Err(anyhow::Error::new(e).context(format!(
                                "{target} holds the value in another row of {t}. Rows \
                                 exchanging values of a unique constraint are deleted and \
                                 written again in one statement, which would set off {}; \
                                 change the rows on {target} so that none holds a value {seed} \
                                 gives another, then snapshot again",
                                blocked.join(", "),
                                target = seed.other(),
                            )));
                        }
                        tracing::warn!(
                            table = %t, error = db::said(&e),
                            "the seed's rows take values of a unique constraint that other rows \
                             hold on the target, so merging again with the rows that differ deleted \
                             and written again in one statement (their DELETE and INSERT triggers \
                             fire, not UPDATE ones)"
                        );
                        rewriting = true;
                        last_unique = None;
                        continue;
                    }
                    if again {
                        let target = seed.other();
                        let hint = match mode {
                            Mode::Merge => format!(
                                "a row only {target} has holds a value one of {seed}'s rows \
                                 takes, and a merge keeps such rows: change or delete it on \
                                 {target}, or make {target} an exact copy of {seed} with \
                                 `tandem snapshot --seed {seed} --mirror` (it deletes the rows \
                                 only {target} has)"
                            ),
                            _ => format!(
                                "{seed}'s rows themselves break a unique constraint {target} \
                                 has: does {seed} lack it?"
                            ),
                        };
                        return Err(anyhow::Error::new(e).context(hint));
                    }
                    let referenced = e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION);
                    if rewriting && mode == Mode::Fill && referenced {
                        // A mirror deletes rows referencing this table's after this pass.
                        let target = seed.other();
                        return Err(anyhow::Error::new(e).context(format!(
                            "a row only {target} has holds a value one of {seed}'s rows takes, \
                             and rows of {target}'s still reference it (the mirror deletes or \
                             repoints them after this table's pass): delete that row, or the rows \
                             referencing it, on {target} first, then snapshot again"
                        )));
                    }
                    if !merge_again(&e) {
                        return Err(e.into());
                    }
                    if attempts == MERGE_ATTEMPTS {
                        return Err(anyhow::Error::new(e).context(format!(
                            "the application on {} changed rows of {t} during each of {} merges; \
                             run the snapshot again when it writes less to {t}",
                            seed.other(),
                            MERGE_ATTEMPTS + 1
                        )));
                    }
                    attempts += 1;
                    last_unique = unique;
                    tracing::info!(table = %t, "{}; merging again", db::said(&e));
                    x.batch_execute("ROLLBACK").await?;
                }
            }
        };
        // Merge of a two-way table: the target's own rows go to the seed as well (marked, so the
        // seed's stream does not send them back), before the target commits; a rerun after a
        // failure repeats this harmlessly (DO NOTHING).
        if mode == Mode::Merge && cfg.direction(t) == Direction::Both {
            s.batch_execute("BEGIN").await?;
            marker(s, &format!("snapshot back {} {t}", seed.other().tag())).await?;
            s.batch_execute(&format!(
                "CREATE TEMP TABLE tandem_back ON COMMIT DROP AS SELECT {list} FROM {table} WITH NO DATA"
            ))
            .await?;
            pipe(x, &format!("COPY ({target_only}) TO STDOUT"), s, &format!("COPY pg_temp.tandem_back ({list}) FROM STDIN"), t, 0)
                .await?;
            outcome.copied_back = s
                .execute(
                    &format!(
                        "INSERT INTO {table} ({list}){overriding} SELECT {list} FROM pg_temp.tandem_back{}",
                        match keyless {
                            false => format!(" ON CONFLICT ({}) DO NOTHING", keys.join(", ")),
                            // The seed was read after its copy back of an earlier attempt (if
                            // any) committed: `target_only` already counts those rows.
                            true => String::new(),
                        }
                    ),
                    &[],
                )
                .await?;
            s.batch_execute("COMMIT").await?;
        }
        if mode != Mode::Fill {
            mark(x, t, seed, mode, "done", Some(outcome.copied as i64), Some(&read), Some(&back))
                .await?;
        }
        x.batch_execute("DROP TABLE pg_temp.tandem_stage; COMMIT").await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = x.batch_execute("ROLLBACK").await;
        let _ = s.batch_execute("ROLLBACK").await;
        release_origins(&held).await;
        return Err(e.context(format!(
            "snapshot of {t} from {seed}; {} is unchanged",
            seed.other()
        )));
    }
    release_origins(&held).await;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        table = %t, %seed, mode = mode.name(), copied = outcome.copied, inserted = outcome.inserted,
        updated = outcome.updated, deleted = outcome.deleted, copied_back = outcome.copied_back,
        rows_per_s = (outcome.copied as f64 / secs.max(1e-3)) as u64, "snapshot done"
    );
    Ok(outcome)
}
