//! The apply half: plan a source's changes into multi-row statements, run them on the target in
//! one transaction per group of source transactions, and commit the checkpoint with them.

pub mod checkpoint;
pub mod conflict;
pub mod copied;
pub mod pipeline;
pub mod plan;
pub mod sql;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use pipeline::{Pipeline, TextArray};

use crate::catalog;
use crate::config::{Config, TableName};
use crate::db;
use crate::event::{Change, Event, SourceTable};
use crate::lsn::Lsn;
use crate::side::Side;
use crate::source::assemble::{MARKER_PREFIX, ORIGIN_PREFIX};
use conflict::{Action, Observed, Rule};
use copied::{Copied, CopiedTables};
use plan::{Batch, BindError, Binding, Op, Planner, TargetTable};

/// Most bytes of values in one statement. Binds only for wide rows (small ones meet `batch_rows`
/// first), where a statement is encoded again by the client and up to `PIPELINE_DEPTH` are out:
/// with W4's 100 KB rows 4 MiB applied faster than 16 MiB (668–685 against 631–650 rows/s) and
/// took the process's peak from 147 to 81 MiB.
const BATCH_BYTES: usize = 4 << 20;
/// Batch statements sent ahead of their results: two keep the target busy while the next batch is
/// planned, and each holds at most one batch's encoded values (`BATCH_BYTES`). A group's opening
/// and commit go ahead too (see [`Applier::commit_ahead`]) and do not count: they are a few
/// bytes. Measured with `tandem bench` on 2 cores (machine of 2026-12-01): W1 drained in
/// 0.96–1.07 s waiting for each small transaction's batch and for each commit, 0.94–0.99 s with
/// batches sent ahead, 0.88–0.97 s with commits too; depths of 3 and 4 read the same.
const PIPELINE_DEPTH: usize = 2;

/// What a statement sent ahead stands for, checked when its result comes back.
enum Ahead {
    Batch(SentBatch),
    /// A group's `BEGIN` and marker.
    Begin,
    /// A commit of the checkpoint `lsn`: a group's, with its changes and the commit time of the
    /// last source transaction in it (for `tandem_lag_seconds`, set once the commit is done),
    /// or a record's alone (`None`).
    Commit {
        lsn: Lsn,
        group: Option<i64>,
    },
}

/// What a sent batch statement is checked against when its result comes back.
struct SentBatch {
    op: Op,
    /// What an upsert did with a row at its key: `Fail` for a plain INSERT (see
    /// [`Batch::fresh`]), `Keep` for `ON CONFLICT DO NOTHING` (see [`Batch::absent`]).
    at_key: sql::Existing,
    /// Sent as a plain UPDATE (see [`Batch::existing`]).
    existing: bool,
    rows: usize,
    table: TableName,
    /// Key changes of a table referencing itself with an `ON UPDATE` action.
    tree_moves: bool,
}

/// A plain statement found the target disagreeing with the source about a table (a local write
/// without conflict detection, a repair that raced, an overlapping snapshot): a plain INSERT of
/// rows the source had just inserted met a row already there, or a plain UPDATE of rows the
/// source had missed some. Nothing of the group is kept; the stream restarts from the checkpoint
/// and writes that table's rows as upserts from then on.
#[derive(Debug, thiserror::Error)]
#[error("{target}: {what} in {table}")]
pub struct SidesDisagree {
    pub table: TableName,
    pub target: Side,
    pub what: String,
}

/// A row the conflict lookup found absent on the target was there when tandem wrote it: a local
/// transaction inserted it in between (the lookup locks the rows it finds, not the gaps). Nothing
/// of the group is kept, so the local row is not written over; the stream restarts from the
/// checkpoint, where the lookup finds that row and the table's rule decides it as a conflict.
#[derive(Debug, thiserror::Error)]
#[error(
    "{target}: {raced} of {rows} rows of {table} appeared at their keys after the conflict lookup \
     found none (inserted by a local transaction meanwhile); not written over"
)]
pub struct LocalRace {
    pub table: TableName,
    pub target: Side,
    pub raced: u64,
    pub rows: usize,
}

/// The target table was dropped there with `tandem ddl`: the source's changes of it written
/// before the drop reached the source are left out, not refused for a table that is gone.
#[derive(Debug, thiserror::Error)]
#[error("{0} was dropped here with `tandem ddl`: its changes written before the drop reached the source are left out")]
struct DroppedHere(TableName);

/// Changes of table `t` from `source` are applied: it is listed, and flows that way.
fn flows(cfg: &Config, source: Side, ignore_direction: bool, t: &TableName) -> bool {
    cfg.lists(t) && (ignore_direction || cfg.direction(t).flows_from(source))
}

/// A change from `source` is applied rather than skipped, before any conflict rule: its table
/// flows, or for a truncate one of its tables does and truncates are applied at all. The applier
/// decides by this, and so does the Kafka outcome of a transaction published from its copy.
fn applies(cfg: &Config, source: Side, ignore_direction: bool, change: &Change) -> bool {
    let flows = |t: &TableName| flows(cfg, source, ignore_direction, t);
    match change {
        Change::Insert { table, .. }
        | Change::Update { table, .. }
        | Change::Delete { table, .. } => flows(&table.name),
        Change::Truncate { tables, .. } => {
            cfg.apply_truncate && tables.iter().any(|t| flows(&t.name))
        }
        // Whatever it touches: the operator asked for it on both sides.
        Change::Ddl { .. } => true,
    }
}

/// Counters for logs, the demo and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub changes: u64,
    pub transactions: u64,
    pub commits: u64,
    /// Updates whose row was not on the target (an unchanged-TOAST update cannot recreate it).
    pub missing_rows: u64,
    /// Conflicts detected (each one is a row in `tandem.conflicts`).
    pub conflicts: u64,
}

pub struct Applier {
    client: Arc<Client>,
    /// Statements sent, results not yet read: batches, and groups' openings and commits.
    pipeline: Pipeline<Ahead>,
    /// The highest checkpoint whose commit came back since [`Applier::take_committed`].
    committed: Option<Lsn>,
    cfg: Arc<Config>,
    source: Side,
    tables: HashMap<TableName, Arc<TargetTable>>,
    bindings: HashMap<u32, (Arc<SourceTable>, Arc<Binding>)>,
    /// Source relations (by OID) of tables `tandem ddl` dropped here: their changes written
    /// before the drop reached the source are left out.
    dropped: std::collections::HashSet<u32>,
    statements: HashMap<(TableName, Op, sql::Existing, Vec<usize>), Option<Statement>>,
    /// Large fresh and existing batches are written with plain INSERTs and UPDATEs (the stream),
    /// except for these tables.
    plain_writes: Option<std::collections::HashSet<TableName>>,
    /// The source's partitioned tables (see [`Applier::load_source_partitioned`]).
    source_partitioned: Arc<std::collections::HashSet<TableName>>,
    /// See [`Applier::set_names`].
    names: crate::source::assemble::Names,
    lookups: HashMap<(TableName, Op, Vec<usize>, bool), Statement>,
    planner: Planner,
    in_txn: bool,
    /// Whether the session runs under a replication origin (echo filtering by origin as well).
    pub origin: bool,
    /// Whether the session runs with `session_replication_role = replica`.
    replica_role: bool,
    /// Commit time of the latest source change applied (µs since 2000-01-01).
    last_commit_ts: i64,
    /// Tables an initial snapshot copied while this direction stood, and what the copy holds.
    copied: CopiedTables,
    /// Kafka audit stream, when configured.
    publisher: Option<crate::sink::kafka::Publisher>,
    /// Source transactions whose end event (`[kafka] transactions`) waits for their changes
    /// still in the planner: published once it is empty, so that it comes after them.
    ends: Vec<crate::sink::kafka::TxnEnd>,
    /// Apply every configured table whatever its direction (repair writes where it is told to).
    pub ignore_direction: bool,
    /// Run the `[conflicts]` rules (off for repair: the operator chose whose rows win).
    pub detect_conflicts: bool,
    pub stats: ApplyStats,
    /// Stream commits run with `synchronous_commit = off`, as the native apply worker's do: each
    /// is `(its end in the target's WAL, the source LSN it checkpointed)` until the target's WAL
    /// is flushed past it. Only then may the source slot let the source LSN go.
    unflushed: std::collections::VecDeque<(Lsn, Lsn)>,
    /// The highest checkpointed source LSN known flushed on the target.
    durable: Lsn,
    /// `tandem_changes_total` of this direction, looked up once rather than per change.
    changes_total: metrics::Counter,
}

impl Applier {
    /// Connect to the side opposite `source`, as an apply session (for `repair`, `resolve` and
    /// `replay`; `run` uses [`Applier::connect_for_run`]).
    pub async fn connect(cfg: Arc<Config>, source: Side) -> Result<Applier> {
        let name = format!("tandem apply {}", source.direction_from());
        let client = db::connect(cfg.site(source.other()), &name).await?;
        Self::with_client(cfg, source, true, client).await
    }

    /// `run`'s apply session of the direction, named after the pair and the process
    /// (`tandem apply D>M PAIR HOST:PID`, `PAIR` being the run lock's key).
    /// `with_origin = false`: a second one, for a streamed transaction applied while it is in
    /// progress, without the replication origin (PostgreSQL 15 lets one session hold an origin
    /// at a time, so the main session lends it for the commit, `origin_session`).
    ///
    /// Another session of this pair and kind is one the network cut off, of this process or of
    /// one before it, which the target keeps until its keepalives notice (hours), maybe inside a
    /// transaction whose row locks this session would wait on forever (tandem turns lock
    /// timeouts off): it is ended first. `run` holds the lock that lets no other `run` of the
    /// pair apply.
    pub async fn connect_for_run(
        cfg: Arc<Config>,
        source: Side,
        with_origin: bool,
    ) -> Result<Applier> {
        let target = source.other();
        let kind = |streamed: bool| {
            format!(
                "tandem apply {}{} {}",
                source.direction_from(),
                if streamed { " streamed" } else { "" },
                crate::lease::pair_key(&cfg)
            )
        };
        let name = crate::lease::session_name(&kind(!with_origin));
        let client = db::connect(cfg.site(target), &name).await?;
        // The main session connects first in each of the direction's attempts, so every session
        // of the direction is stale then, streamed ones too: a transaction that was streamed
        // when the network cut its session off may come again whole, applied by this session,
        // which would wait on the stale one's rows forever.
        let ended = client
            .query(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE (starts_with(application_name, $1) \
                        OR ($3 AND starts_with(application_name, $2))) \
                   AND pid <> pg_backend_pid() AND datname = current_database()",
                &[
                    &format!("{} ", kind(!with_origin)),
                    &format!("{} ", kind(true)),
                    &with_origin,
                ],
            )
            .await
            .context("looking for apply sessions the network cut off")?;
        for r in ended {
            tracing::warn!(%target, "ended server process {}, an apply session of this pair that the network cut off", r.get::<_, i32>(0));
        }
        Self::with_client(cfg, source, with_origin, client).await
    }

    async fn with_client(
        cfg: Arc<Config>,
        source: Side,
        with_origin: bool,
        client: tokio_postgres::Client,
    ) -> Result<Applier> {
        let target = source.other();
        // As PostgreSQL's own apply worker does: user triggers (and FK triggers) do not fire for
        // replicated rows, so a trigger that stamps or rewrites rows cannot make the sides diverge.
        // Needs superuser; without it the target's triggers fire as for any client.
        // Commits need not wait for the target's WAL flush: the source slot is confirmed only
        // past commits the target reports flushed (see `unflushed`), as the native apply worker
        // does. A crash of the target loses the commit and its checkpoint together.
        client.batch_execute("SET synchronous_commit = off").await?;
        let replica_role = client
            .batch_execute("SET session_replication_role = replica")
            .await
            .is_ok();
        if !replica_role {
            tracing::info!(%target, "apply role may not set session_replication_role; target triggers will fire");
        }
        let origin_ok = if with_origin {
            take_origin(&client, &origin_name(&cfg, source))
                .await
                .map_err(|e| {
                    tracing::info!(%target, "applying without a replication origin ({}); the marker message alone prevents echo",
                        e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string()));
                })
                .is_ok()
        } else {
            false
        };
        Ok(Applier {
            client: Arc::new(client),
            pipeline: Pipeline::new(PIPELINE_DEPTH),
            committed: None,
            plain_writes: None,
            source_partitioned: Default::default(),
            names: Default::default(),
            planner: Planner::new(cfg.batch_rows, BATCH_BYTES),
            cfg,
            source,
            tables: HashMap::new(),
            bindings: HashMap::new(),
            dropped: Default::default(),
            statements: HashMap::new(),
            lookups: HashMap::new(),
            in_txn: false,
            origin: origin_ok,
            replica_role,
            last_commit_ts: 0,
            copied: CopiedTables::new(),
            publisher: None,
            ends: Vec::new(),
            ignore_direction: false,
            detect_conflicts: true,
            stats: ApplyStats::default(),
            unflushed: Default::default(),
            durable: Lsn(0),
            changes_total: metrics::counter!("tandem_changes_total", "direction" => source.direction_from()),
        })
    }

    /// Cancels this session's statement in flight (see [`db::Canceller`]).
    pub fn canceller(&self) -> Result<db::Canceller> {
        db::Canceller::new(self.cfg.site(self.source.other()), &self.client)
    }

    /// The side whose changes this session applies (to the other).
    pub fn source(&self) -> Side {
        self.source
    }

    /// Run `sql` (a `SET`) in this session, in order behind the statements out.
    pub async fn set(&mut self, sql: &str) -> Result<()> {
        self.pipeline
            .alongside(self.client.batch_execute(sql))
            .await
            .with_context(|| format!("{sql} on {}", self.source.other()))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn in_txn(&self) -> bool {
        self.in_txn
    }

    /// Open the target transaction if it is not open: `BEGIN`, then tandem's marker as the very
    /// first thing in it, so the target's own stream recognises the transaction before any of its
    /// changes and never sends it back.
    async fn ensure_txn(&mut self, commit_lsn: Lsn) -> Result<()> {
        if self.in_txn {
            return Ok(());
        }
        // BEGIN and the marker (our own tag and LSN, quoted) together, sent ahead: its answer
        // is read with the statements after it.
        let content = format!("{} {}", self.source.tag(), commit_lsn);
        let sql = format!(
            "{}; SELECT pg_logical_emit_message(true, {}, {})",
            self.begin_sql(),
            crate::config::quote_literal(MARKER_PREFIX),
            crate::config::quote_literal(&content)
        );
        self.in_txn = true;
        self.send(pipeline::simple(&self.client, sql), Ahead::Begin, false)
            .await
    }

    /// `BEGIN` of a target transaction, with a check that the newest commit sent ahead happened
    /// when its result is still out. A COMMIT the target refuses (a deferred constraint or
    /// trigger) ends its transaction, so the server runs what was sent behind it in a new one:
    /// unchecked, a later group would commit, and its checkpoint pass the refused group's rows.
    /// Checked, this transaction fails, the server refuses the rest of it (its commit too), and
    /// the refused commit is the failure reported (results are read oldest first).
    fn begin_sql(&self) -> String {
        let out = self.pipeline.newest(|w| match w {
            Ahead::Commit { lsn, .. } => Some(*lsn),
            _ => None,
        });
        match out {
            Some(lsn) => format!("BEGIN; {}", checkpoint::reached_sql(self.source, lsn)),
            None => "BEGIN".into(),
        }
    }

    /// Send a statement ahead and settle whatever came back meanwhile.
    async fn send(&mut self, done: pipeline::Done, what: Ahead, heavy: bool) -> Result<()> {
        for (what, r) in self.pipeline.send(done, what, heavy).await {
            self.settle(what, r)?;
        }
        Ok(())
    }

    fn flows(&self, t: &TableName) -> bool {
        flows(&self.cfg, self.source, self.ignore_direction, t)
    }

    async fn target_table(&mut self, name: &TableName) -> Result<Arc<TargetTable>> {
        if let Some(t) = self.tables.get(name) {
            return Ok(t.clone());
        }
        let mut t = self
            .pipeline
            .alongside(catalog::table(&*self.client, name))
            .await?;
        if t.is_none() {
            // Renamed here with `tandem ddl`: the source's rows written under the old name
            // before the rename reached the source go to the table under its name now.
            let now = self
                .pipeline
                .alongside(self.client.query_opt(
                    "SELECT n.nspname::text, c.relname::text FROM tandem.renamed r \
                     JOIN pg_class c ON c.oid = r.table_oid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE r.old_name = $1",
                    &[&name.to_string()],
                ))
                .await
                .context("reading tandem.renamed")?
                .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)));
            if let Some(now) = now {
                t = self
                    .pipeline
                    .alongside(catalog::table(&*self.client, &now))
                    .await?;
                if t.is_some() {
                    tracing::info!(source = %self.source, was = %name, %now,
                        "rows of a table renamed here with `tandem ddl` go to it under its new name");
                }
            }
        }
        if t.is_none() {
            let dropped = self
                .pipeline
                .alongside(self.client.query_opt(
                    "SELECT 1 FROM tandem.dropped WHERE table_name = $1",
                    &[&name.to_string()],
                ))
                .await
                .context("reading tandem.dropped")?;
            if dropped.is_some() {
                return Err(DroppedHere(name.clone()).into());
            }
        }
        let mut t = t.ok_or_else(|| {
            anyhow!(
                "{}: table {name} does not exist; create it there (same columns and key) and rerun `tandem setup`",
                self.source.other()
            )
        })?;
        // Columns renamed or dropped here with `tandem ddl`: the source's rows written before
        // the change reached it still name them so.
        let former = self
            .pipeline
            .alongside(self.client.query(
                "SELECT r.old_name, CASE WHEN NOT a.attisdropped THEN a.attname::text END \
                 FROM tandem.renamed_columns r JOIN pg_attribute a \
                 ON a.attrelid = r.table_oid AND a.attnum = r.attnum \
                 WHERE r.table_oid = $1::text::regclass",
                &[&t.name.quoted()],
            ))
            .await
            .context("reading tandem.renamed_columns")?;
        for r in former {
            let now: Option<String> = r.get(1);
            let at = now.and_then(|now| t.columns.iter().position(|c| c.name == now));
            t.former.push((r.get(0), at));
        }
        let t = Arc::new(t);
        self.tables.insert(name.clone(), t.clone());
        Ok(t)
    }

    async fn binding(&mut self, src: &Arc<SourceTable>) -> Result<Arc<Binding>> {
        if let Some((s, b)) = self.bindings.get(&src.oid) {
            if Arc::ptr_eq(s, src) || **s == **src {
                return Ok(b.clone());
            }
            // The source's Relation changed (DDL): reread the target too.
            self.tables.remove(&src.name);
        }
        let target = self.target_table(&src.name).await?;
        // The direction is named by the caller's context (sync: "desktop → mobile").
        let mut b = Binding::new(src, target)?;
        b.partitioned |= self.source_partitioned.contains(&src.name);
        // Without a key there is no telling which row a change meets (setup warns).
        b.detect =
            self.detect_conflicts && !b.keyless() && self.cfg.conflicts_for(&src.name).is_some();
        // `REPLICA IDENTITY FULL` dropped on the source since `run` checked it: without old rows
        // such a policy applies every change as none (`conflict::decide`), and the sides part.
        if let Some(tc) = self.cfg.conflicts_for(&src.name) {
            if b.detect && tc.policy.needs_old_row() && !src.columns.iter().all(|c| c.key) {
                return Err(BindError::NoOldRows {
                    table: src.name.clone(),
                    quoted: src.name.quoted(),
                    policy: tc.policy.as_str(),
                }
                .into());
            }
        }
        // A trigger that fires in this session sees each row change: then every change is
        // applied as such, not collapsed into the key's latest image.
        let modes: &[&str] = if self.replica_role {
            &["A", "R"]
        } else {
            &["O", "A"]
        };
        let fires: bool = self
            .pipeline
            .alongside(self.client.query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass \
                 AND NOT tgisinternal AND tgenabled::text = ANY($2))",
                &[&b.target.name.quoted(), &modes],
            ))
            .await
            .with_context(|| format!("reading the triggers of {}", b.target.name))?
            .get(0);
        // `Binding::new` already left a keyless table's rows uncollapsed.
        b.collapse &= !fires;
        let b = Arc::new(b);
        self.bindings.insert(src.oid, (src.clone(), b.clone()));
        Ok(b)
    }

    /// Where a row change of `table` goes (a table that flows here, see [`applies`]), with the
    /// target transaction open.
    ///
    /// `None`: the table was dropped here with `tandem ddl`, and the change is left out (its
    /// transaction still joins the group, so the checkpoint passes it).
    async fn row_target(
        &mut self,
        table: &Arc<SourceTable>,
        commit_lsn: Lsn,
    ) -> Result<Option<Arc<Binding>>> {
        let b = match self.dropped.contains(&table.oid) {
            true => None,
            false => match self.binding(table).await {
                Err(e) if e.is::<DroppedHere>() => {
                    tracing::info!(source = %self.source, table = %table.name, "{e}");
                    self.dropped.insert(table.oid);
                    None
                }
                b => Some(b?),
            },
        };
        self.ensure_txn(commit_lsn).await?;
        Ok(b)
    }

    /// Apply one change inside the open group (opening it if needed).
    pub async fn apply(&mut self, ev: &Event) -> Result<()> {
        match self.apply_one(ev).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// An error while statements are outstanding may only be the echo of one of them failing
    /// ("current transaction is aborted"): report the statement that failed.
    async fn explain(&mut self, e: anyhow::Error) -> anyhow::Error {
        let echo = crate::db::caused_by(
            &e,
            &tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION,
        );
        if !echo {
            // The first failure itself (results are read oldest first).
            self.pipeline.clear();
            return e;
        }
        match self.settle_all().await {
            Err(first) => first,
            Ok(()) => e,
        }
    }

    /// Wait for every statement sent ahead (commits too) and check its result; the first
    /// failure is the error.
    pub async fn settle_all(&mut self) -> Result<()> {
        while let Some((what, r)) = self.pipeline.next().await {
            if let Err(e) = self.settle(what, r) {
                self.pipeline.clear();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Statements were sent ahead and not all answered.
    pub fn outstanding(&self) -> bool {
        !self.pipeline.is_empty()
    }

    /// Wait for the oldest statement sent ahead and check its result. Cancel-safe: for a
    /// `select!` next to the stream, so results (a commit's above all) are read as they come.
    pub async fn settle_next(&mut self) -> Result<()> {
        let (what, r) = self.pipeline.ready().await;
        let settled = self.settle(what, r);
        if settled.is_err() {
            self.pipeline.clear();
        }
        settled
    }

    /// The checkpoint of the latest commit that came back since the last call: durable on the
    /// target once flushed (see [`Applier::ack_limit`]).
    pub fn take_committed(&mut self) -> Option<Lsn> {
        self.committed.take()
    }

    fn settle(
        &mut self,
        what: Ahead,
        r: Result<pipeline::Answer, tokio_postgres::Error>,
    ) -> Result<()> {
        match what {
            Ahead::Batch(b) => {
                let r = r.map(|a| match a {
                    pipeline::Answer::Count(n) => n,
                    pipeline::Answer::Messages(_) => 0,
                });
                self.settle_batch(b, r)
            }
            Ahead::Begin => {
                r.context("opening the apply transaction with tandem's marker message")?;
                Ok(())
            }
            Ahead::Commit { lsn, group } => {
                let what = if group.is_some() {
                    "committing the apply transaction with its checkpoint"
                } else {
                    "recording the checkpoint"
                };
                let msgs = match r.context(what)? {
                    pipeline::Answer::Messages(m) => m,
                    pipeline::Answer::Count(_) => Vec::new(),
                };
                let row = db::last_row_of(&msgs).context(what)?;
                let parse = |i: usize| -> Result<Lsn> { Ok(row[i].parse::<Lsn>()?) };
                let (end, flushed) = (parse(0)?, parse(1)?);
                self.unflushed.push_back((end, lsn));
                self.settle_flushed(flushed);
                self.committed = Some(self.committed.map_or(lsn, |c| c.max(lsn)));
                let dir = self.source.direction_from();
                metrics::gauge!("tandem_checkpoint_lsn", "direction" => dir).set(lsn.0 as f64);
                if let Some(source_committed) = group {
                    // Measured at the target's commit, not when it was sent: what a reader of
                    // the target sees.
                    metrics::gauge!("tandem_lag_seconds", "direction" => dir)
                        .set(seconds_since_pg_micros(source_committed));
                    self.stats.commits += 1;
                    metrics::counter!("tandem_target_commits_total", "direction" => dir)
                        .increment(1);
                    // The group's changes may go out to Kafka now, and no later ones.
                    if let Some(p) = &mut self.publisher {
                        p.committed(lsn);
                    }
                }
                Ok(())
            }
        }
    }

    fn settle_batch(
        &mut self,
        what: SentBatch,
        r: Result<u64, tokio_postgres::Error>,
    ) -> Result<()> {
        let r = match r {
            Err(e)
                if what.at_key == sql::Existing::Fail
                    && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                return Err(SidesDisagree {
                    table: what.table,
                    target: self.source.other(),
                    what: format!("a row inserted on the source already exists ({e})"),
                }
                .into())
            }
            r => r,
        };
        let n = r.map_err(|e| {
            let mut doing = format!(
                "applying {} {:?} rows to {}.{}",
                what.rows,
                what.op,
                self.source.other(),
                what.table
            );
            // A tree renumbered in one source statement: each row was logged before the
            // source's cascade moved its parent reference, and the target's cascade of an
            // earlier statement of tandem's has moved it already. In one statement, the
            // cascade runs after every row, as on the source.
            let stale_parent = e.as_db_error().is_some_and(|d| {
                d.code() == &tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION
                    && d.table() == Some(what.table.name.as_str())
                    && d.schema() == Some(what.table.schema.as_str())
            });
            if what.tree_moves && stale_parent {
                doing.push_str(&format!(
                    " (key changes of a table that references itself: a source statement that \
                     changed more keys than one of tandem's statements holds logged rows naming \
                     their parents' old keys, which {}'s own cascade had changed; raise \
                     [replication] batch_rows above that statement's row count and start `tandem \
                     run` again, or let tandem's role set session_replication_role)",
                    self.source.other()
                ));
            }
            with_rule_hint(e, doing)
        })?;
        if what.at_key == sql::Existing::Keep && (n as usize) < what.rows {
            return Err(LocalRace {
                table: what.table,
                target: self.source.other(),
                raced: what.rows as u64 - n,
                rows: what.rows,
            }
            .into());
        }
        if what.existing && (n as usize) < what.rows {
            return Err(SidesDisagree {
                table: what.table,
                target: self.source.other(),
                what: format!(
                    "{} of {} rows updated on the source are missing",
                    what.rows as u64 - n,
                    what.rows
                ),
            }
            .into());
        }
        if matches!(what.op, Op::Update | Op::Rekey | Op::Replace) && (n as usize) < what.rows {
            let missing = what.rows as u64 - n;
            self.stats.missing_rows += missing;
            tracing::warn!(table = %what.table, missing, "update for rows missing on {}; skipped", self.source.other());
        }
        Ok(())
    }

    async fn apply_one(&mut self, ev: &Event) -> Result<()> {
        self.planner.set_position(ev.commit_lsn, ev.commit_ts);
        self.last_commit_ts = ev.commit_ts;
        self.passed(ev.commit_lsn);
        if !applies(&self.cfg, self.source, self.ignore_direction, &ev.change) {
            return self.publish(ev.clone(), "skipped").await;
        }
        if change_held(&self.copied, ev, |t| self.flows(t)) {
            // Its transaction still joins the group, so the checkpoint (and the slot) passes it
            // with the group's commit. Left to the idle record it would wait for 64 KiB more of
            // the source's WAL: after an initial snapshot, maybe for good.
            self.ensure_txn(ev.commit_lsn).await?;
            return self.publish(ev.clone(), "copied").await;
        }
        match &ev.change {
            Change::Insert { table, new } => {
                let Some(b) = self.row_target(table, ev.commit_lsn).await? else {
                    return self.publish(ev.clone(), "skipped").await;
                };
                self.planner.set_event(ev);
                self.planner.insert(&b, new)?;
            }
            Change::Update { table, old, new } => {
                let Some(b) = self.row_target(table, ev.commit_lsn).await? else {
                    return self.publish(ev.clone(), "skipped").await;
                };
                self.planner.set_event(ev);
                self.planner.update(&b, old.as_ref(), new)?;
            }
            Change::Delete { table, old } => {
                let Some(b) = self.row_target(table, ev.commit_lsn).await? else {
                    return self.publish(ev.clone(), "skipped").await;
                };
                self.planner.set_event(ev);
                self.planner.delete(&b, old)?;
            }
            // A schema change `tandem ddl` made on the source, run here at the same point of the
            // source's history: in the open group, after every change before it and before any
            // after it. A failure is the target refusing that source transaction, named and
            // skippable like any other.
            Change::Ddl {
                id,
                sql,
                search_path,
            } => {
                self.ensure_txn(ev.commit_lsn).await?;
                self.run_ready(true).await?;
                self.settle_all().await?;
                // The session's settings and role, to put back after the statement: a `SET` in
                // it (`client_encoding`, `default_transaction_read_only`, `ROLE`, as pasted from
                // a migration or a pg_dump) would otherwise hold for the rest of this session.
                let settings = "SELECT name, setting FROM pg_settings \
                                WHERE context IN ('user', 'superuser')";
                let before: HashMap<String, String> = self
                    .client
                    .query(settings, &[])
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                let role: String = self
                    .client
                    .query_one("SELECT current_user::text", &[])
                    .await?
                    .get(0);
                let tables_before = crate::ops::ddl::before(&self.cfg, &*self.client).await?;
                // Unqualified names as the source's session read them, for this statement only.
                self.client
                    .execute("SELECT set_config('search_path', $1, true)", &[search_path])
                    .await?;
                self.client
                    .batch_execute(sql)
                    .await
                    // By its id, not its text: a statement may carry a password (`ALTER ROLE …`).
                    .with_context(|| {
                        format!(
                            "running {0}'s schema change {id} (its statement: tandem.ddl on {0})",
                            self.source
                        )
                    })?;
                if self
                    .client
                    .query_one("SELECT current_user::text", &[])
                    .await?
                    .get::<_, String>(0)
                    != role
                {
                    self.client.batch_execute("RESET ROLE").await?;
                }
                for r in self.client.query(settings, &[]).await? {
                    let (name, now): (String, String) = (r.get(0), r.get(1));
                    if let Some(was) = before.get(&name).filter(|was| **was != now) {
                        self.client
                            .execute("SELECT set_config($1, $2, false)", &[&name, was])
                            .await?;
                    }
                }
                // A table it made that the config takes in flows from here too, at once; one it
                // dropped is no longer recorded as synchronised.
                let created = crate::ops::ddl::after_statement(
                    &self.cfg,
                    &*self.client,
                    self.source.other(),
                    &tables_before,
                    true,
                )
                .await
                .with_context(|| format!("{}'s schema change {id}", self.source))?;
                for line in created {
                    tracing::info!(ddl = id, "{line}");
                }
                // Tables, their columns and the statements prepared against them may have changed.
                self.tables.clear();
                self.bindings.clear();
                self.statements.clear();
                self.lookups.clear();
                // Not a row change: counted apart (`tandem_ddl_total`).
                return self.publish(ev.clone(), "applied").await;
            }
            Change::Truncate {
                tables,
                cascade,
                restart_identity,
            } => {
                let mut names: Vec<String> = Vec::new();
                for t in tables {
                    if self.flows(&t.name) && !copy_holds(&self.copied, &t.name, ev) {
                        // By the target's name for it (renamed there, see `target_table`).
                        // `ONLY` an inheritance parent: the source sends each table it truncated
                        // (a `TRUNCATE ONLY` there leaves the children out of the message).
                        names.push(self.target_table(&t.name).await?.rows());
                    }
                }
                self.ensure_txn(ev.commit_lsn).await?;
                self.run_ready(true).await?;
                // A truncate supersedes whatever waits behind a paused conflict of that table.
                let paused: Vec<String> = tables
                    .iter()
                    .filter(|t| self.pauses(&t.name))
                    .map(|t| t.name.to_string())
                    .collect();
                for name in paused {
                    self.pipeline
                        .alongside(self.client.execute(
                            "WITH p AS (DELETE FROM tandem.paused WHERE direction = $1 AND table_name = $2) \
                             DELETE FROM tandem.held WHERE direction = $1 AND table_name = $2",
                            &[&self.source.direction_from(), &name],
                        ))
                        .await?;
                }
                let sql = format!(
                    "TRUNCATE {}{}{}",
                    names.join(", "),
                    if *restart_identity {
                        " RESTART IDENTITY"
                    } else {
                        ""
                    },
                    if *cascade { " CASCADE" } else { "" }
                );
                self.pipeline
                    .alongside(self.client.batch_execute(&sql))
                    .await
                    .with_context(|| format!("{sql} on {}", self.source.other()))?;
                self.publish(ev.clone(), "applied").await?;
            }
        }
        self.stats.changes += 1;
        self.changes_total.increment(1);
        self.run_ready(false).await
    }

    /// Run the planner's finished batches (all of them, with `flush`). Each waits on round trips
    /// of its own (a statement prepared, a conflict lookup) behind the statements sent ahead, so
    /// its failure may be the echo of one of theirs: reported as the one that failed first, for
    /// every caller (a change, a group's commit, a savepoint, a repair's commit).
    async fn run_ready(&mut self, flush: bool) -> Result<()> {
        match self.run_batches(flush).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.explain(e).await),
        }
    }

    async fn run_batches(&mut self, flush: bool) -> Result<()> {
        if flush {
            self.planner.flush();
        }
        for mut batch in self.planner.take_ready() {
            let events = std::mem::take(&mut batch.events);
            let outcomes = if batch.meta.is_empty() {
                self.execute(&batch).await?;
                vec!["applied"; batch.rows.len()]
            } else if self.pauses(batch.table()) && self.is_paused(batch.table()).await? {
                // Behind a paused conflict: wait in order.
                self.hold(&batch, 0).await?;
                vec!["paused"; batch.rows.len()]
            } else if matches!(batch.op, Op::Rekey | Op::Move) {
                // Not decided by the table's rule: the conflict lookups find rows by the new
                // key. Applied as the source did it, rather than lose the row.
                self.execute(&batch).await?;
                vec!["applied"; batch.rows.len()]
            } else {
                let (batches, outcomes) = self.resolve(&batch).await?;
                for b in batches {
                    self.execute(&b).await?;
                }
                outcomes
            };
            // In the source's order: a batch holds each row's changes together, and a topic of
            // one partition is then read in each site's order (`replay` applies it so; rows
            // swapping unique values collide in any other).
            let mut published: Vec<(Event, &str)> = events
                .into_iter()
                .zip(outcomes)
                .flat_map(|(evs, outcome)| evs.into_iter().map(move |ev| (ev, outcome)))
                .collect();
            published.sort_by_key(|(ev, _)| (ev.commit_lsn, ev.ordinal));
            for (ev, outcome) in published {
                self.publish(ev, outcome).await?;
            }
        }
        self.publish_ends()
    }

    /// Kafka (`[kafka] transactions`): every change of source transaction `end` was applied or
    /// published; its end event follows them once the planner holds none of them.
    pub fn end_transaction(&mut self, end: crate::sink::kafka::TxnEnd) -> Result<()> {
        if self
            .publisher
            .as_ref()
            .is_some_and(|p| p.ends_transactions())
        {
            self.ends.push(end);
            self.publish_ends()?;
        }
        Ok(())
    }

    fn publish_ends(&mut self) -> Result<()> {
        if self.ends.is_empty() || !self.planner.is_empty() {
            return Ok(());
        }
        if let Some(p) = &mut self.publisher {
            for end in self.ends.drain(..) {
                p.end(end)?;
            }
        }
        Ok(())
    }

    /// Kafka: publish one change with what became of it.
    async fn publish(&mut self, ev: Event, outcome: &'static str) -> Result<()> {
        match &mut self.publisher {
            Some(p) => p.publish(ev, outcome).await,
            None => Ok(()),
        }
    }

    /// Read what initial snapshots took in while this direction stood at `checkpoint` (see
    /// [`copied`]): copies from this direction's source (recorded on the target), and merges
    /// that read its source as their target (recorded on `source`). Their changes are left out.
    pub async fn load_copied(&mut self, source: &Client, checkpoint: Lsn) -> Result<()> {
        let sql = |which: &str| {
            format!(
                "SELECT table_name, {which}_snapshot, {which}_lsn::text FROM tandem.snapshots \
                 WHERE seed = $1 AND state = 'done' AND {which}_lsn > $2::text::pg_lsn"
            )
        };
        let checkpoint = checkpoint.to_string();
        let copies = self
            .pipeline
            .alongside(
                self.client
                    .query(&sql("seed"), &[&self.source.tag().to_string(), &checkpoint]),
            )
            .await
            .with_context(|| format!("reading tandem.snapshots on {}", self.source.other()))?;
        let merges = source
            .query(
                &sql("back"),
                &[&self.source.other().tag().to_string(), &checkpoint],
            )
            .await
            .with_context(|| format!("reading tandem.snapshots on {}", self.source))?;
        let mut copied = CopiedTables::new();
        for (r, what) in copies
            .iter()
            .map(|r| (r, "copy"))
            .chain(merges.iter().map(|r| (r, "merge")))
        {
            let (table, snapshot, lsn): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let c = Copied::parse(&snapshot, lsn.parse()?)
                .with_context(|| format!("tandem.snapshots row of {table}"))?;
            tracing::info!(%table, until = %c.lsn(), "leaving out the changes its initial snapshot's {what} holds");
            copied.entry(table).or_default().push(c);
        }
        self.copied = copied;
        Ok(())
    }

    /// Read which tables the source partitions: a row it moves to another partition arrives as
    /// a delete and an insert, which the planner makes one key change where the target table
    /// is not partitioned too (each side may partition a table its own way).
    pub async fn load_source_partitioned(&mut self, source: &Client) -> Result<()> {
        let rows = source
            .query(
                "SELECT n.nspname, c.relname FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'p'",
                &[],
            )
            .await
            .with_context(|| format!("reading {}'s partitioned tables", self.source))?;
        self.source_partitioned = Arc::new(
            rows.iter()
                .map(|r| TableName::new(r.get::<_, &str>(0), r.get::<_, &str>(1)))
                .collect(),
        );
        Ok(())
    }

    /// The source's partitioned tables as the direction's main session read them.
    pub fn source_partitioned(&self) -> Arc<std::collections::HashSet<TableName>> {
        self.source_partitioned.clone()
    }

    pub fn set_source_partitioned(&mut self, tables: Arc<std::collections::HashSet<TableName>>) {
        self.source_partitioned = tables;
    }

    pub fn copied(&self) -> &CopiedTables {
        &self.copied
    }

    /// The copies as the direction's main session knows them (a live session's changes carry no
    /// commit LSN to tell when the stream is past a copy).
    pub fn set_copied(&mut self, copied: CopiedTables) {
        self.copied = copied;
    }

    /// The stream reached a commit at `lsn`: copies read before it hold nothing from here on.
    pub fn passed(&mut self, lsn: Lsn) {
        if !self.copied.is_empty() && lsn != Lsn::ZERO {
            self.copied.retain(|_, cs| {
                cs.retain(|c| lsn < c.lsn());
                !cs.is_empty()
            });
        }
    }

    /// Kafka: a change of a transaction `tandem skip` left out.
    pub async fn publish_left_out(&mut self, ev: Event) -> Result<()> {
        self.publish(ev, "skipped").await
    }

    /// Kafka: a change applied before a restart, sent again because Kafka had not acknowledged
    /// it (consumers dedupe by id).
    pub async fn publish_again(&mut self, ev: Event) -> Result<()> {
        let outcome = self.outcome_on_record(&ev).await?;
        self.publish(ev, outcome).await
    }

    /// What became of an already-applied change: the resolution `tandem.conflicts` holds for its
    /// row in its source transaction (the final one, after a `resolve`), else "applied". Keys
    /// match by their text forms.
    async fn outcome_on_record(&mut self, ev: &Event) -> Result<&'static str> {
        let (table, row) = match &ev.change {
            Change::Insert { table, new } | Change::Update { table, new, .. } => (table, new),
            Change::Delete { table, old } => (table, &old.tuple),
            Change::Truncate { .. } | Change::Ddl { .. } => return Ok("applied"),
        };
        if self.cfg.conflicts_for(&table.name).is_none() {
            return Ok("applied");
        }
        let key: serde_json::Map<String, serde_json::Value> =
            crate::sink::kafka::image(table, row, true)
                .into_iter()
                .map(|(c, v)| (c, serde_json::json!(v)))
                .collect();
        let found: Option<String> = self
            .pipeline
            .alongside(self.client.query_opt(
                "SELECT resolution FROM tandem.conflicts c WHERE source_side = $1 \
                 AND source_commit_lsn = $2::text::pg_lsn AND table_name = $3 \
                 AND NOT EXISTS (SELECT 1 FROM jsonb_each_text($4::text::jsonb) k \
                                 WHERE c.key ->> k.key IS DISTINCT FROM k.value) \
                 ORDER BY id DESC LIMIT 1",
                &[
                    &self.source.tag().to_string(),
                    &ev.commit_lsn.to_string(),
                    &table.name.to_string(),
                    &serde_json::Value::Object(key).to_string(),
                ],
            ))
            .await
            .context("reading tandem.conflicts for an event sent again")?
            .map(|r| r.get(0));
        Ok(match found.as_deref() {
            Some("applied_remote") => "applied_remote",
            Some("kept_local") => "kept_local",
            Some("merged") => "merged",
            Some("skipped") => "skipped",
            Some("paused") => "paused",
            _ => "applied",
        })
    }

    /// Kafka: wait a little for outstanding acknowledgements (graceful stop).
    pub async fn drain_kafka(&mut self) -> Result<()> {
        if let Some(p) = &mut self.publisher {
            p.drain(std::time::Duration::from_secs(10)).await?;
        }
        Ok(())
    }

    /// Kafka: a whole transaction from its spooled copy, once it committed (it was applied
    /// while streamed, where no event could carry its commit yet); see
    /// [`crate::sink::kafka::Publisher::publish_copy`].
    pub fn publish_copy(&mut self, copy: crate::source::streamed::Replay) -> Result<()> {
        let Some(p) = &mut self.publisher else {
            return Ok(());
        };
        let (cfg, source, ignore) = (self.cfg.clone(), self.source, self.ignore_direction);
        let copied = self.copied.clone();
        // Applied while streamed means no conflict rules: `applies` alone decided each change,
        // and the copies its session was given (this session's, as the stream reached its commit).
        let outcome = move |ev: &Event| {
            if !applies(&cfg, source, ignore, &ev.change) {
                "skipped"
            } else if change_held(&copied, ev, |t| flows(&cfg, source, ignore, t)) {
                "copied"
            } else {
                "applied"
            }
        };
        p.publish_copy(copy, source, self.names.clone(), Arc::new(outcome))
    }

    /// Kafka: a change of a transaction tandem itself wrote (not applied back).
    pub async fn publish_echo(&mut self, ev: Event) -> Result<()> {
        self.publish(ev, "skipped_echo").await
    }

    /// Kafka: everything published so far belongs to source commits up to `lsn`. Waits for the
    /// commits sent ahead: what they cover goes out before anything after them.
    pub async fn barrier(&mut self, lsn: Lsn) -> Result<()> {
        if self.publisher.is_some() {
            self.settle_all().await?;
        }
        if let Some(p) = &mut self.publisher {
            p.barrier(lsn);
        }
        Ok(())
    }

    /// How far the source slot may be confirmed, given the target holds up to `checkpoint`:
    /// with `[kafka] required`, no further than what Kafka acknowledged.
    pub fn ack_limit(&mut self, checkpoint: Lsn) -> Result<Lsn> {
        // Not past what the target has flushed: an asynchronous commit may still be lost.
        let checkpoint = match self.unflushed.front() {
            Some(_) => checkpoint.min(self.durable),
            None => checkpoint.max(self.durable),
        };
        match &mut self.publisher {
            Some(p) if p.required => Ok(checkpoint.min(p.delivered()?)),
            Some(p) => {
                p.delivered()?;
                Ok(checkpoint)
            }
            None => Ok(checkpoint),
        }
    }

    /// Some checkpointed commit is not yet known flushed on the target.
    pub fn flush_pending(&self) -> bool {
        !self.unflushed.is_empty()
    }

    /// Make the target flush its WAL past every commit so far, and settle them (the stream is
    /// quiet, or stopping). The WAL writer alone may never get there: it flushes asynchronous
    /// commits, but not a tail of other records written after ours, and our commits are tracked
    /// by the insert position read after them. A synchronous commit of a transaction that wrote
    /// WAL flushes everything before it.
    pub async fn poll_flush(&mut self) -> Result<()> {
        if self.in_txn {
            return Ok(());
        }
        // Commits sent ahead first: they are what is to be flushed.
        self.settle_all().await?;
        // It must write WAL: a commit that wrote none is never flushed synchronously.
        let row = db::last_row(
            &self.client,
            &format!(
                "BEGIN; SET LOCAL synchronous_commit = on; \
                 UPDATE tandem.checkpoints SET updated_at = now() WHERE direction = '{}'; COMMIT; \
                 SELECT pg_current_wal_flush_lsn()::text",
                self.source.direction_from()
            ),
        )
        .await
        .context("flushing the target's WAL")?;
        let flushed = &row[0];
        self.settle_flushed(flushed.parse()?);
        Ok(())
    }

    fn settle_flushed(&mut self, flushed: Lsn) {
        while let Some(&(target, source)) = self.unflushed.front() {
            if target > flushed {
                break;
            }
            self.durable = self.durable.max(source);
            self.unflushed.pop_front();
        }
    }

    /// Send `sql` (ending in a commit of the checkpoint at `lsn`) ahead, to be tracked once it
    /// comes back (see [`Ahead::Commit`]) until the target's WAL is flushed past it.
    async fn send_commit(&mut self, sql: &str, lsn: Lsn, group: Option<i64>) -> Result<()> {
        // The last row: statements before it (the origin's xact setup) return rows too.
        let sql = format!(
            "{sql}; SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
        );
        let done = pipeline::simple(&self.client, sql);
        self.send(done, Ahead::Commit { lsn, group }, false).await
    }

    /// Publish every change (Kafka on): the planner carries each change to its row.
    pub fn set_publisher(&mut self, p: crate::sink::kafka::Publisher) {
        self.planner.carry = true;
        self.publisher = Some(p);
    }

    /// Kafka acknowledgements are outstanding: the slot may be confirmed further once they come.
    pub fn kafka_pending(&self) -> bool {
        self.publisher.as_ref().is_some_and(|p| p.pending())
    }

    /// Write a large transaction's fresh batches (rows the source just inserted) with plain
    /// INSERTs and its existing ones (rows the source had, updated whole) with plain UPDATEs,
    /// except for the tables in `except`; a [`SidesDisagree`] then ends the group. Only for the
    /// stream, which can start over from its checkpoint.
    pub fn write_plainly(&mut self, except: std::collections::HashSet<TableName>) {
        self.plain_writes = Some(except);
    }

    /// Configured table names by source OID, for the Kafka task's reading of spooled copies.
    pub fn set_names(&mut self, names: crate::source::assemble::Names) {
        self.names = names;
    }

    /// The target has table `t` now (inside the open group: after its schema changes).
    pub async fn target_has(&mut self, t: &TableName) -> Result<bool> {
        Ok(self
            .pipeline
            .alongside(
                self.client
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.quoted()]),
            )
            .await?
            .get(0))
    }

    /// Each change its own statement (see [`Planner::set_singly`]), or batched again.
    pub fn apply_singly(&mut self, on: bool) {
        self.planner.set_singly(on);
    }

    pub fn kafka_required(&self) -> bool {
        self.publisher.as_ref().is_some_and(|p| p.required)
    }

    async fn execute(&mut self, batch: &Batch) -> Result<()> {
        let target = &batch.binding.target;
        let plain = batch.op == Op::Upsert
            && batch.large
            && self
                .plain_writes
                .as_ref()
                .is_some_and(|except| !except.contains(&target.name));
        let fresh = plain && batch.fresh;
        // An UPDATE that would set nothing (every column is the key) cannot tell a missing row.
        let existing =
            plain && batch.existing && batch.cols.iter().any(|&c| sql::settable(target, c));
        let op = if existing { Op::Update } else { batch.op };
        let absent = batch.absent && op == Op::Upsert && !target.key.is_empty();
        let at_key = if fresh {
            sql::Existing::Fail
        } else if absent {
            sql::Existing::Keep
        } else {
            sql::Existing::Replace
        };
        let key = (target.name.clone(), op, at_key, batch.cols.clone());
        let stmt = match self.statements.get(&key) {
            Some(s) => s.clone(),
            None => {
                let s = match sql::statement(target, op, &batch.cols, at_key) {
                    Some(text) => Some(
                        self.pipeline
                            .alongside(self.client.prepare(&text))
                            .await
                            .map_err(|e| {
                                let what =
                                    format!("preparing the {op:?} statement for {}", target.name);
                                with_rule_hint(e, what)
                            })?,
                    ),
                    None => None,
                };
                self.statements.insert(key, s.clone());
                s
            }
        };
        let Some(stmt) = stmt else { return Ok(()) };
        let params = text_arrays(target, &batch.cols, batch.rows.iter().map(Some))?;
        let what = SentBatch {
            op,
            at_key,
            existing,
            rows: batch.rows.len(),
            table: target.name.clone(),
            tree_moves: target.tree && matches!(op, Op::Move | Op::Rekey),
        };
        let done = pipeline::execute(&self.client, &stmt, params);
        self.send(done, Ahead::Batch(what), true).await
    }

    /// The locking lookup ([`sql::lookup`]) of the batch's rows at `rows`, in that order.
    async fn look_up(
        &mut self,
        batch: &Batch,
        version: &sql::Version,
        details: bool,
        rows: &[usize],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let target = &batch.binding.target;
        let old_cols = &batch.binding.bound;
        let key = (target.name.clone(), batch.op, batch.cols.clone(), details);
        let stmt = match self.lookups.get(&key) {
            Some(s) => s.clone(),
            None => {
                let text = sql::lookup(target, batch.op, &batch.cols, old_cols, version, details);
                let s = self
                    .pipeline
                    .alongside(self.client.prepare(&text))
                    .await
                    .with_context(|| {
                        format!("preparing the conflict lookup for {}", target.name)
                    })?;
                self.lookups.insert(key, s.clone());
                s
            }
        };
        let incoming = text_arrays(
            target,
            &batch.cols,
            rows.iter().map(|&i| Some(&batch.rows[i])),
        )?;
        let olds = text_arrays(
            target,
            old_cols,
            rows.iter().map(|&i| batch.meta[i].old.as_ref()),
        )?;
        let has_old: Vec<bool> = rows.iter().map(|&i| batch.meta[i].old.is_some()).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = incoming
            .iter()
            .chain(&olds)
            .map(|c| c as &(dyn ToSql + Sync))
            .collect();
        params.push(&has_old);
        let commit_ts: Vec<i64> = rows.iter().map(|&i| batch.meta[i].commit_ts).collect();
        if matches!(version, sql::Version::CommitTs(_)) {
            params.push(&commit_ts);
        }
        self.pipeline
            .alongside(self.client.query(&stmt, &params))
            .await
            .with_context(|| format!("looking up {} rows of {}", rows.len(), target.name))
    }

    /// Detect and resolve conflicts for a batch: lock and compare the target's rows, decide each
    /// row by the table's rule, log the conflicts, and return what is left to write.
    async fn resolve(&mut self, batch: &Batch) -> Result<(Vec<Batch>, Vec<&'static str>)> {
        let target = batch.binding.target.clone();
        let tc = self
            .cfg
            .conflicts_for(&target.name)
            .cloned()
            .ok_or_else(|| anyhow!("{}: no conflict rule", target.name))?;
        let rule = Rule {
            policy: tc.policy,
            priority: self
                .cfg
                .conflicts
                .as_ref()
                .map_or(Side::Desktop, |c| c.priority),
        };
        let version = if tc.policy != conflict::Policy::LastWriteWins {
            sql::Version::None
        } else {
            // No such column: setup allowed commit timestamps instead.
            tc.version_column
                .as_ref()
                .and_then(|v| target.columns.iter().position(|c| &c.name == v))
                .map_or_else(
                    || sql::Version::CommitTs(origin_name(&self.cfg, self.source)),
                    sql::Version::Column,
                )
        };
        let all: Vec<usize> = (0..batch.rows.len()).collect();
        let mut found = self.look_up(batch, &version, false, &all).await?;
        // A row whose decision is logged (a conflict, or a collision on another unique key) or
        // merged needs the target's row, the key and the incoming row as text: looked up again
        // with those, for these rows only. The first lookup locked them, so the second sees the
        // same rows; their decisions are taken from it.
        let detailed: Vec<usize> = found
            .iter()
            .zip(&batch.meta)
            .enumerate()
            .filter(|(_, (r, meta))| {
                let (action, conflict) =
                    conflict::decide(rule, self.source, meta.op, observed(r, meta));
                let collided = r.get::<_, Option<String>>(8).is_some();
                conflict.is_some()
                    || action == Action::Merge
                    || (action == Action::Apply && collided)
            })
            .map(|(i, _)| i)
            .collect();
        if !detailed.is_empty() {
            let rows = self.look_up(batch, &version, true, &detailed).await?;
            for (i, r) in detailed.into_iter().zip(rows) {
                found[i] = r;
            }
        }
        let mut kept = Vec::with_capacity(batch.rows.len());
        // Upserts of keys the lookup found no row at (see `Batch::absent`).
        let mut absent = Vec::new();
        // Keys of target rows that lost a unique-constraint collision.
        let mut deletes: Vec<Vec<Option<bytes::Bytes>>> = Vec::new();
        let key_pos: Vec<usize> = target
            .key
            .iter()
            .map(|k| {
                batch
                    .cols
                    .iter()
                    .position(|c| c == k)
                    .expect("key columns are always sent")
            })
            .collect();
        let mut log = ConflictLog::default();
        let mut paused_at = None;
        let mut outcomes = vec!["applied"; batch.rows.len()];
        for (i, ((row, meta), r)) in batch.rows.iter().zip(&batch.meta).zip(&found).enumerate() {
            let seen = observed(r, meta);
            let (mut action, conflict) = conflict::decide(rule, self.source, meta.op, seen);
            // (kind, resolution, the local row it was decided against)
            let mut decided: Vec<_> = conflict
                .map(|(k, res)| (k, res, r.get::<_, Option<String>>(4)))
                .into_iter()
                .collect();
            let collided: Option<String> = r.get(8);
            if let (Action::Apply | Action::Merge, Some(other)) = (action, collided) {
                let version = r.get::<_, Option<i32>>(10).map(|v| v.cmp(&0));
                let (what, (kind, res)) =
                    conflict::decide_collision(rule, self.source, meta.op, version);
                decided.push((kind, res, Some(other)));
                match what {
                    conflict::Collision::ReplaceLocal => {
                        let k: Vec<Option<String>> = r.get(9);
                        deletes.push(k.into_iter().map(|v| v.map(bytes::Bytes::from)).collect());
                    }
                    conflict::Collision::DropIncoming { delete_own } => {
                        action = Action::Skip;
                        if delete_own && seen.found {
                            deletes.push(key_pos.iter().map(|&p| row[p].clone()).collect());
                        }
                    }
                    conflict::Collision::Pause => action = Action::Pause,
                }
            }
            match action {
                Action::Apply if !seen.found && batch.op == Op::Upsert => absent.push(row.clone()),
                Action::Apply => kept.push(row.clone()),
                Action::Skip => {}
                Action::Pause => paused_at = Some(i),
                Action::Merge => {
                    let local: Option<Vec<Option<String>>> = r.get(5);
                    let local = local.unwrap_or_default();
                    kept.push(
                        row.iter()
                            .enumerate()
                            .map(|(i, v)| match local.get(i) {
                                Some(Some(l)) => Some(bytes::Bytes::from(l.clone())),
                                _ => v.clone(),
                            })
                            .collect(),
                    );
                }
            }
            if let Some((_, res, _)) = decided.last() {
                outcomes[i] = res.as_str();
            }
            for (kind, resolution, local) in decided {
                let key_json: String = r.get(6);
                tracing::info!(table = %target.name, kind = kind.as_str(), resolution = resolution.as_str(),
                    key = %key_json, source = %self.source, "conflict");
                metrics::counter!("tandem_conflicts_total",
                    "direction" => self.source.direction_from(), "table" => target.name.to_string(),
                    "kind" => kind.as_str(), "resolution" => resolution.as_str())
                .increment(1);
                log.kind.push(kind.as_str());
                log.key.push(key_json);
                log.local.push(local);
                log.remote.push(r.get(7));
                log.lsn.push(meta.commit_lsn.to_string());
                log.ts.push(meta.commit_ts);
                log.resolution.push(resolution.as_str());
            }
            if paused_at.is_some() {
                // Later rows wait behind the conflict; they are decided when they run.
                break;
            }
        }
        let mut last_conflict = None;
        if !log.kind.is_empty() {
            self.stats.conflicts += log.kind.len() as u64;
            let ids = self
                .pipeline
                .alongside(self.client.query(
                    "INSERT INTO tandem.conflicts (kind, table_name, key, local_row, remote_row, source_side, \
                     source_commit_lsn, source_commit_ts, policy, resolution) \
                     SELECT k, $2, key::jsonb, l::jsonb, r::jsonb, $3, lsn::pg_lsn, \
                     timestamptz '2000-01-01 00:00:00+00' + ts * interval '1 microsecond', $4, res \
                     FROM unnest($1::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::int8[], $10::text[]) \
                     AS u(k, key, l, r, lsn, ts, res) RETURNING id",
                    &[
                        &log.kind,
                        &target.name.to_string(),
                        &self.source.tag().to_string(),
                        &rule.policy.as_str(),
                        &log.key,
                        &log.local,
                        &log.remote,
                        &log.lsn,
                        &log.ts,
                        &log.resolution,
                    ],
                ))
                .await
                .context("writing tandem.conflicts")?;
            last_conflict = ids.iter().map(|r| r.get::<_, i64>(0)).max();
        }
        if let Some(i) = paused_at {
            for o in &mut outcomes[i..] {
                *o = "paused";
            }
            let id = last_conflict.expect("a pause is a logged conflict");
            self.hold(batch, i).await?;
            self.pipeline
                .alongside(self.client.execute(
                    "INSERT INTO tandem.paused (direction, table_name, conflict_id) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                    &[&self.source.direction_from(), &target.name.to_string(), &id],
                ))
                .await?;
            tracing::error!(table = %target.name, direction = self.source.direction_from(), conflict = id,
                "conflict under policy `error`: table paused here (other tables keep flowing); \
                 see tandem.conflicts id {id}, then run `tandem resolve --table {} --take desktop|mobile|skip`",
                target.name);
        }
        let mut out = Vec::new();
        if !deletes.is_empty() {
            out.push(Batch::of(
                batch.binding.clone(),
                Op::Delete,
                target.key.clone(),
                deletes,
            ));
        }
        // The rows found go first: their keys differ from the absent ones', and a unique value
        // an update gives up is then free for an insert of the same batch to take. The lookup
        // locked them, so they are still there: an upsert's are written with a plain UPDATE,
        // without `ON CONFLICT`'s probe for each row.
        if !kept.is_empty() {
            let op = match batch.op {
                Op::Upsert => Op::Update,
                op => op,
            };
            out.push(Batch::of(
                batch.binding.clone(),
                op,
                batch.cols.clone(),
                kept,
            ));
        }
        if !absent.is_empty() {
            let mut b = Batch::of(batch.binding.clone(), batch.op, batch.cols.clone(), absent);
            b.absent = true;
            out.push(b);
        }
        Ok((out, outcomes))
    }

    /// Whether `table` is paused in this direction; locks the pause row (shared) so that a
    /// concurrent `tandem resolve` and this transaction see each other's held rows in order.
    async fn is_paused(&mut self, table: &TableName) -> Result<bool> {
        Ok(self
            .pipeline
            .alongside(self.client.query_opt(
                "SELECT 1 FROM tandem.paused WHERE direction = $1 AND table_name = $2 FOR SHARE",
                &[&self.source.direction_from(), &table.to_string()],
            ))
            .await
            .context("reading tandem.paused")?
            .is_some())
    }

    fn pauses(&self, table: &TableName) -> bool {
        self.detect_conflicts
            && self
                .cfg
                .conflicts_for(table)
                .is_some_and(|c| c.policy == conflict::Policy::Error)
    }

    /// Keep rows `from..` of a batch in `tandem.held`, in order, behind a paused conflict.
    async fn hold(&mut self, batch: &Batch, from: usize) -> Result<()> {
        let t = &batch.binding.target;
        let names = |cols: &[usize]| -> Vec<String> {
            cols.iter().map(|&c| t.columns[c].name.clone()).collect()
        };
        let json = |r: &[Option<bytes::Bytes>]| {
            serde_json::to_string(
                &r.iter()
                    .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
                    .collect::<Vec<_>>(),
            )
            .expect("strings serialise")
        };
        let rows = &batch.rows[from..];
        let meta = &batch.meta[from..];
        metrics::counter!("tandem_held_changes_total",
            "direction" => self.source.direction_from(), "table" => t.name.to_string())
        .increment(rows.len() as u64);
        let vals: Vec<String> = rows.iter().map(|r| json(r)).collect();
        let olds: Vec<Option<String>> = meta.iter().map(|m| m.old.as_deref().map(json)).collect();
        let ops: Vec<&str> = meta.iter().map(|m| m.op.as_str()).collect();
        let lsns: Vec<String> = meta.iter().map(|m| m.commit_lsn.to_string()).collect();
        let tss: Vec<i64> = meta.iter().map(|m| m.commit_ts).collect();
        self.pipeline
            .alongside(self.client.execute(
                "INSERT INTO tandem.held (direction, table_name, op, source_op, cols, vals, old_cols, old_vals, \
                 commit_lsn, commit_ts) \
                 SELECT $1, $2, $3, so, $4, v::jsonb, $5, o::jsonb, l::pg_lsn, ts \
                 FROM unnest($6::text[], $7::text[], $8::text[], $9::text[], $10::int8[]) WITH ORDINALITY \
                 AS u(so, v, o, l, ts, n) ORDER BY n",
                &[
                    &self.source.direction_from(),
                    &t.name.to_string(),
                    &batch.op.as_str(),
                    &names(&batch.cols),
                    &names(&batch.binding.bound),
                    &ops,
                    &vals,
                    &olds,
                    &lsns,
                    &tss,
                ],
            ))
            .await
            .context("writing tandem.held")?;
        Ok(())
    }

    /// `tandem resolve`: continue `table` paused in this direction. The conflicting change is
    /// applied (`take` names the source side), or dropped (`take` names the target, or `None`
    /// for skip); the held changes after it then run through the normal rules, which may pause
    /// the table again at a later conflict. Returns what happened, or `None` when not paused.
    pub async fn resume(
        &mut self,
        table: &TableName,
        take: Option<Side>,
    ) -> Result<Option<String>> {
        let dir = self.source.direction_from();
        let name = table.to_string();
        self.ensure_txn(Lsn::ZERO).await?;
        let Some(p) = self
            .pipeline
            .alongside(self.client.query_opt(
                "DELETE FROM tandem.paused WHERE direction = $1 AND table_name = $2 RETURNING conflict_id",
                &[&dir, &name],
            ))
            .await?
        else {
            self.rollback().await?;
            return Ok(None);
        };
        let conflict_id: i64 = p.get(0);
        let held = self
            .pipeline
            .alongside(self.client.query(
                "DELETE FROM tandem.held WHERE direction = $1 AND table_name = $2 \
                 RETURNING id, op, source_op, cols, vals::text, old_cols, old_vals::text, commit_lsn::text, commit_ts",
                &[&dir, &name],
            ))
            .await?;
        let mut held: Vec<_> = held.into_iter().collect();
        held.sort_by_key(|r| r.get::<_, i64>(0));
        let target = self.target_table(table).await?;
        let index = |n: &String| {
            target
                .columns
                .iter()
                .position(|c| &c.name == n)
                .ok_or_else(|| {
                    anyhow!("{table}: column `{n}` of a held change is gone from the target")
                })
        };
        let parse = |j: Option<String>| -> Result<Option<Vec<Option<bytes::Bytes>>>> {
            j.map(|j| {
                let v: Vec<Option<String>> = serde_json::from_str(&j)?;
                Ok(v.into_iter().map(|x| x.map(bytes::Bytes::from)).collect())
            })
            .transpose()
        };
        let (mut applied, mut paused_again) = (0usize, false);
        let resolution = if take == Some(self.source) {
            "applied_remote"
        } else if take.is_some() {
            "kept_local"
        } else {
            "skipped"
        };
        for (i, r) in held.iter().enumerate() {
            let cols: Vec<usize> = r
                .get::<_, Vec<String>>(3)
                .iter()
                .map(index)
                .collect::<Result<_>>()?;
            let bound: Vec<usize> = r
                .get::<_, Vec<String>>(5)
                .iter()
                .map(index)
                .collect::<Result<_>>()?;
            let op = Op::parse(r.get(1)).ok_or_else(|| anyhow!("bad held op"))?;
            let source_op =
                conflict::SourceOp::parse(r.get(2)).ok_or_else(|| anyhow!("bad held op"))?;
            let binding = Arc::new(Binding {
                partitioned: target.partitioned,
                target: target.clone(),
                to_target: Vec::new(),
                key_source: Vec::new(),
                bound,
                detect: true,
                collapse: true,
            });
            let row = parse(Some(r.get(4)))?.unwrap_or_default();
            let meta = plan::RowMeta {
                op: source_op,
                commit_lsn: r.get::<_, String>(7).parse()?,
                commit_ts: r.get(8),
                old: parse(r.get(6))?,
            };
            let mut batch = Batch::of(binding, op, cols, vec![row]);
            batch.meta = vec![meta];
            if i == 0 {
                // The conflict itself: the operator's choice, no rule (`execute` writes the row
                // as it is; only `resolve` reads its metadata).
                if resolution == "applied_remote" {
                    self.execute(&batch).await?;
                    applied += 1;
                }
                continue;
            }
            if paused_again || self.is_paused(table).await? {
                paused_again = true;
                self.hold(&batch, 0).await?;
            } else if matches!(batch.op, Op::Rekey | Op::Move) {
                self.execute(&batch).await?;
            } else {
                let (batches, outcomes) = self.resolve(&batch).await?;
                // This change's own conflict paused the table again: the rest waits behind it.
                paused_again |= outcomes.contains(&"paused");
                for b in batches {
                    self.execute(&b).await?;
                    // Not the deletes of rows a collision lost.
                    if b.op != Op::Delete || op == Op::Delete {
                        applied += b.rows.len();
                    }
                }
            }
        }
        self.pipeline
            .alongside(self.client.execute(
                "UPDATE tandem.conflicts SET resolution = $2 WHERE id = $1",
                &[&conflict_id, &resolution],
            ))
            .await?;
        self.commit_outside_stream().await?;
        let target_side = self.source.other();
        Ok(Some(format!(
            "{target_side}: {table} ({dir}) resumed: conflict {conflict_id} {resolution}, {} held change(s) after it, {applied} written{}",
            held.len().saturating_sub(1),
            if paused_again { "; paused again at a later conflict (see tandem status)" } else { "" }
        )))
    }

    /// Finish the group: run what is pending, advance the checkpoint to `lsn` in the same
    /// transaction, and commit. Returns once the commit came back (durable once flushed).
    pub async fn commit(&mut self, lsn: Lsn) -> Result<()> {
        self.commit_ahead(lsn).await?;
        self.settle_all().await
    }

    /// [`Applier::commit`] without waiting: the group's last statements and its commit are sent,
    /// and the next group may open behind them while the target runs them. The commit is known
    /// once [`Applier::take_committed`] returns its checkpoint. The server runs a session's
    /// statements in order, and after a failure refuses everything up to a rollback; a group
    /// opened behind a commit that fails is refused too (see [`Applier::begin_sql`]).
    pub async fn commit_ahead(&mut self, lsn: Lsn) -> Result<()> {
        if !self.in_txn {
            return self.record(lsn).await;
        }
        self.run_ready(true).await?;
        // A plain UPDATE's count, and a conflict-checked insert's, is checked here, not by the
        // server: its group must not commit before that check passed (a shortfall starts the
        // group over: with upserts, or to decide a raced row as a conflict).
        if self
            .pipeline
            .any(|w| matches!(w, Ahead::Batch(b) if b.existing || b.at_key == sql::Existing::Keep))
        {
            self.settle_all().await?;
        }
        // One round trip for checkpoint, origin progress and COMMIT: at a steady trickle a group
        // is a few source transactions, and every round trip is lag.
        let mut sql = checkpoint::advance_sql(self.source, lsn);
        if self.origin {
            // The commit carries the source's origin LSN and commit time, so the target's commit
            // timestamp of a replicated row is the source's (last_write_wins by commit time).
            sql.push_str(&format!(
                "; SELECT pg_replication_origin_xact_setup('{lsn}'::pg_lsn, \
                 timestamptz '2000-01-01 00:00:00+00' + {}::int8 * interval '1 microsecond')",
                self.last_commit_ts
            ));
        }
        sql.push_str("; COMMIT");
        self.in_txn = false;
        if let Some(p) = &mut self.publisher {
            // What was published so far waits for this commit; what follows, for later ones.
            p.cut();
        }
        self.send_commit(&sql, lsn, Some(self.last_commit_ts))
            .await?;
        Ok(())
    }

    /// Lock `table` on the target against other writers until this transaction commits, in a
    /// transaction opened for changes that do not come from the stream (repair). Taken before
    /// the source's rows are read, it keeps the stream from applying a later change of the
    /// table between that read and this transaction's writes, which would then set it back.
    pub async fn lock_table(&mut self, table: &TableName) -> Result<()> {
        self.ensure_txn(Lsn::ZERO).await?;
        self.run_ready(true).await?;
        self.settle_all().await?;
        self.client
            .batch_execute(&format!(
                "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
                table.quoted()
            ))
            .await
            .with_context(|| format!("locking {table} on {}", self.source.other()))?;
        Ok(())
    }

    /// Commit what was applied without moving the checkpoint: for changes that do not come from
    /// the stream (repair), which still carry the marker and so never travel back.
    pub async fn commit_outside_stream(&mut self) -> Result<()> {
        if !self.in_txn {
            return Ok(());
        }
        self.run_ready(true).await?;
        self.settle_all().await?;
        // Not from the stream, so no flush tracking: wait for durability as any client would.
        self.client
            .batch_execute("SET LOCAL synchronous_commit = on; COMMIT")
            .await
            .context("committing the repair transaction")?;
        self.in_txn = false;
        if let Some(p) = &mut self.publisher {
            p.release();
        }
        self.stats.commits += 1;
        Ok(())
    }

    /// Abandon the open group; the stream will deliver it again from the checkpoint. Groups
    /// committed ahead of it are kept: their commits are read first.
    pub async fn rollback(&mut self) -> Result<()> {
        self.planner.flush();
        self.planner.take_ready();
        let mut failed = false;
        while let Some((what, r)) = self.pipeline.next().await {
            // After a failure the server refused the rest: nothing after it is committed.
            if !failed && matches!(what, Ahead::Commit { .. }) {
                failed = self.settle(what, r).is_err();
            } else {
                failed |= r.is_err();
            }
        }
        if self.in_txn || failed {
            self.in_txn = false;
            self.client.batch_execute("ROLLBACK").await?;
        }
        // Its changes come again from the slot: none of them is on the audit stream yet.
        if let Some(p) = &mut self.publisher {
            p.discard();
        }
        self.ends.clear();
        Ok(())
    }

    /// Advance the checkpoint alone (progress through transactions that needed nothing applied).
    pub async fn record(&mut self, lsn: Lsn) -> Result<()> {
        self.record_with(lsn, None).await
    }

    /// Move the checkpoint past a source transaction `tandem skip` left out, and clear the
    /// request, in one target transaction: a crash before it leaves the request standing, so
    /// the transaction is left out again, never applied.
    pub async fn record_left_out(&mut self, lsn: Lsn) -> Result<()> {
        let clear = checkpoint::clear_skip_sql(self.source);
        self.record_with(lsn, Some(&clear)).await
    }

    /// [`Applier::record`], with `also` committed in the same transaction. Returns once it
    /// came back, with whatever was sent before it.
    async fn record_with(&mut self, lsn: Lsn, also: Option<&str>) -> Result<()> {
        // Its own transaction, so the position read after it is past its commit record.
        let also = also.map_or(String::new(), |sql| format!("{sql}; "));
        let sql = format!(
            "{}; {}; {also}COMMIT",
            self.begin_sql(),
            checkpoint::advance_sql(self.source, lsn)
        );
        self.send_commit(&sql, lsn, None).await?;
        self.settle_all().await
    }

    pub fn count_transaction(&mut self) {
        self.stats.transactions += 1;
    }

    /// Take up (`true`) or let go of the direction's replication origin for this session; only
    /// one session may hold it. Outside a transaction when letting go.
    pub async fn origin_session(&mut self, hold: bool) -> Result<()> {
        let sql = if hold {
            format!(
                "SELECT pg_replication_origin_session_setup({})",
                crate::config::quote_literal(&origin_name(&self.cfg, self.source))
            )
        } else {
            "SELECT pg_replication_origin_session_reset()".to_string()
        };
        self.pipeline
            .alongside(self.client.batch_execute(&sql))
            .await
            .context("moving the replication origin between apply sessions")?;
        self.origin = hold;
        Ok(())
    }

    /// The source commit time the next commit records (a streamed transaction's, known only
    /// at its end).
    pub fn set_commit_ts(&mut self, ts: i64) {
        self.last_commit_ts = ts;
    }

    /// Commits still to be seen flushed move to `to`, which confirms the source slot.
    pub fn hand_over_unflushed(&mut self, to: &mut Applier) {
        to.unflushed.extend(self.unflushed.drain(..));
    }

    /// Mark where a subtransaction's changes start, after running everything before it. Opens
    /// the target transaction if nothing did yet, so the savepoint always exists.
    pub async fn savepoint(&mut self, name: &str) -> Result<()> {
        self.ensure_txn(Lsn::ZERO).await?;
        self.run_ready(true).await?;
        self.settle_all().await?;
        self.client
            .batch_execute(&format!("SAVEPOINT {name}"))
            .await
            .context("marking a streamed subtransaction")?;
        Ok(())
    }

    /// Forget everything since `savepoint(name)`: the subtransaction rolled back on the source.
    pub async fn rollback_to(&mut self, name: &str) -> Result<()> {
        // Nothing pending predates the savepoint (it ran everything first): drop it unsent.
        self.planner.flush();
        self.planner.take_ready();
        self.pipeline.clear();
        self.client
            .batch_execute(&format!("ROLLBACK TO SAVEPOINT {name}"))
            .await
            .context("rolling back a streamed subtransaction")?;
        Ok(())
    }
}

/// Whether initial snapshots took in `ev`'s change already: of its table, or of every table
/// of a truncate that `flows` here.
fn change_held(copied: &CopiedTables, ev: &Event, flows: impl Fn(&TableName) -> bool) -> bool {
    match &ev.change {
        Change::Insert { table, .. }
        | Change::Update { table, .. }
        | Change::Delete { table, .. } => copy_holds(copied, &table.name, ev),
        Change::Truncate { tables, .. } => tables
            .iter()
            .filter(|t| flows(&t.name))
            .all(|t| copy_holds(copied, &t.name, ev)),
        Change::Ddl { .. } => false,
    }
}

/// Whether an initial snapshot took in `ev`'s change of `table` already (see [`copied`]).
fn copy_holds(copied: &CopiedTables, table: &TableName, ev: &Event) -> bool {
    !copied.is_empty()
        && copied
            .get(&table.to_string())
            .is_some_and(|cs| cs.iter().any(|c| c.holds(ev.xid, ev.commit_lsn)))
}

/// Create `origin` if it is missing and run this session's commits under it.
pub async fn take_origin(
    client: &tokio_postgres::Client,
    origin: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "SELECT pg_replication_origin_create({0}) WHERE NOT EXISTS \
             (SELECT 1 FROM pg_replication_origin WHERE roname = {0}); \
             SELECT pg_replication_origin_session_setup({0});",
            crate::config::quote_literal(origin)
        ))
        .await
}

/// The replication origin the apply session for changes from `source` runs under. Origins are
/// cluster-wide, so the name carries the source slot's (unique per source cluster) too: two tandems
/// syncing different databases of one cluster do not take each other's origin.
pub fn origin_name(cfg: &Config, source: Side) -> String {
    format!(
        "{ORIGIN_PREFIX}from_{}_{}",
        source.tag(),
        cfg.site(source).slot
    )
}

/// Conflict rows of one batch, column by column for one multi-row insert.
#[derive(Default)]
struct ConflictLog {
    kind: Vec<&'static str>,
    key: Vec<String>,
    local: Vec<Option<String>>,
    remote: Vec<Option<String>>,
    lsn: Vec<String>,
    ts: Vec<i64>,
    resolution: Vec<&'static str>,
}

/// What a conflict lookup's row says of the target's row, for [`conflict::decide`].
fn observed(r: &tokio_postgres::Row, meta: &plan::RowMeta) -> Observed {
    let found = r.get(0);
    Observed {
        found,
        same_as_incoming: r.get(1),
        same_as_old: if found {
            r.get(2)
        } else {
            meta.old.as_ref().map(|_| false)
        },
        version: r.get::<_, Option<i32>>(3).map(|v| v.cmp(&0)),
        ours: found && r.get::<_, bool>(11),
    }
}

/// Rows of text values (a `None` row: all NULL) as one owned `text[]` parameter per column
/// (values shared, not copied).
fn text_arrays<'a>(
    target: &TargetTable,
    cols: &[usize],
    rows: impl Iterator<Item = Option<&'a Vec<Option<bytes::Bytes>>>>,
) -> Result<Vec<TextArray>> {
    let mut columns: Vec<Vec<Option<bytes::Bytes>>> = vec![Vec::new(); cols.len()];
    for row in rows {
        for (i, column) in columns.iter_mut().enumerate() {
            let v = row.and_then(|r| r[i].as_ref());
            if v.is_some_and(|b| std::str::from_utf8(b).is_err()) {
                return Err(anyhow!(
                    "{}: a value of column `{}` is not valid UTF-8; tandem needs UTF8 databases",
                    target.name,
                    target.columns[cols[i]].name
                ));
            }
            column.push(v.cloned());
        }
    }
    Ok(columns.into_iter().map(TextArray).collect())
}

/// Seconds from a source commit time to now, on this machine's clock: never negative, however
/// the two clocks disagree.
fn seconds_since_pg_micros(ts: i64) -> f64 {
    (crate::event::pg_now_micros() - ts).max(0) as f64 / 1e6
}

/// `e` in the context of `doing`; where a rule on the table refused tandem's statement (one made
/// since `run` checked at its start: see [`catalog::rules`]), with the way out.
fn with_rule_hint(e: tokio_postgres::Error, doing: String) -> anyhow::Error {
    let rule = e.as_db_error().is_some_and(|d| {
        d.code() == &tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED
            && d.message().contains(" rules")
    });
    anyhow::Error::new(e).context(match rule {
        true => format!(
            "{doing}: a rule on the table stands in the way of tandem's writes; replace it with \
             a trigger or drop it (`tandem setup` names it)"
        ),
        false => doing,
    })
}
