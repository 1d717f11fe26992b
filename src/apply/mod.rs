//! The apply half: plan a source's changes into multi-row statements, run them on the target in
//! one transaction per group of source transactions, and commit the checkpoint with them.

pub mod checkpoint;
pub mod plan;
pub mod sql;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::catalog;
use crate::config::{Config, TableName};
use crate::db;
use crate::event::{Change, Event, SourceTable};
use crate::lsn::Lsn;
use crate::side::Side;
use crate::source::assemble::{MARKER_PREFIX, ORIGIN_PREFIX};
use plan::{Batch, Binding, Op, Planner, TargetTable};

/// Most bytes of values in one statement.
const BATCH_BYTES: usize = 16 << 20;

/// Counters for logs, the demo and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub changes: u64,
    pub transactions: u64,
    pub commits: u64,
    /// Updates whose row was not on the target (an unchanged-TOAST update cannot recreate it).
    pub missing_rows: u64,
}

pub struct Applier {
    client: Client,
    cfg: Arc<Config>,
    source: Side,
    tables: HashMap<TableName, Arc<TargetTable>>,
    bindings: HashMap<u32, (Arc<SourceTable>, Arc<Binding>)>,
    statements: HashMap<(TableName, Op, Vec<usize>), Option<Statement>>,
    planner: Planner,
    in_txn: bool,
    /// Whether the session runs under a replication origin (echo filtering by origin as well).
    pub origin: bool,
    /// Apply every configured table whatever its direction (repair writes where it is told to).
    pub ignore_direction: bool,
    pub stats: ApplyStats,
}

impl Applier {
    /// Connect to the side opposite `source`, as an apply session.
    pub async fn connect(cfg: Arc<Config>, source: Side) -> Result<Applier> {
        let target = source.other();
        let client = db::connect(
            cfg.site(target),
            &format!("tandem apply {}", source.direction_from()),
        )
        .await?;
        // As PostgreSQL's own apply worker does: user triggers (and FK triggers) do not fire for
        // replicated rows, so a trigger that stamps or rewrites rows cannot make the sides diverge.
        // Needs superuser; without it the target's triggers fire as for any client.
        if client
            .batch_execute("SET session_replication_role = replica")
            .await
            .is_err()
        {
            tracing::info!(%target, "apply role may not set session_replication_role; target triggers will fire");
        }
        let origin = format!("{ORIGIN_PREFIX}from_{}", source.tag());
        let origin_ok = client
            .batch_execute(&format!(
                "SELECT pg_replication_origin_create({0}) WHERE NOT EXISTS \
                 (SELECT 1 FROM pg_replication_origin WHERE roname = {0}); \
                 SELECT pg_replication_origin_session_setup({0});",
                crate::config::quote_literal(&origin)
            ))
            .await;
        if let Err(e) = &origin_ok {
            tracing::info!(%target, "applying without a replication origin ({}); the marker message alone prevents echo",
                e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string()));
        }
        Ok(Applier {
            client,
            planner: Planner::new(cfg.batch_rows, BATCH_BYTES),
            cfg,
            source,
            tables: HashMap::new(),
            bindings: HashMap::new(),
            statements: HashMap::new(),
            in_txn: false,
            origin: origin_ok.is_ok(),
            ignore_direction: false,
            stats: ApplyStats::default(),
        })
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
        self.client.batch_execute("BEGIN").await?;
        self.in_txn = true;
        let content = format!("{} {}", self.source.tag(), commit_lsn);
        self.client
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&MARKER_PREFIX, &content],
            )
            .await
            .context("writing tandem's marker message")?;
        Ok(())
    }

    fn flows(&self, t: &TableName) -> bool {
        let listed = self
            .cfg
            .tables
            .iter()
            .any(|c| c == t || (c.is_wildcard() && c.schema == t.schema));
        listed && (self.ignore_direction || self.cfg.direction(t).flows_from(self.source))
    }

    async fn target_table(&mut self, name: &TableName) -> Result<Arc<TargetTable>> {
        if let Some(t) = self.tables.get(name) {
            return Ok(t.clone());
        }
        let t = catalog::table(&self.client, name).await?.ok_or_else(|| {
            anyhow!(
                "{}: table {name} does not exist; create it there (same columns and key) and rerun `tandem setup`",
                self.source.other()
            )
        })?;
        if t.key.is_empty() {
            return Err(anyhow!(
                "{}: table {name} has no primary key or replica identity index; add a primary key",
                self.source.other()
            ));
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
        let b = Arc::new(
            Binding::new(src, target)
                .map_err(|e| anyhow!("{} → {}: {e}", self.source, self.source.other()))?,
        );
        self.bindings.insert(src.oid, (src.clone(), b.clone()));
        Ok(b)
    }

    /// Where a row change of `table` goes, with the target transaction open; `None` when the
    /// table does not flow in this direction.
    async fn row_target(
        &mut self,
        table: &Arc<SourceTable>,
        commit_lsn: Lsn,
    ) -> Result<Option<Arc<Binding>>> {
        if !self.flows(&table.name) {
            return Ok(None);
        }
        let b = self.binding(table).await?;
        self.ensure_txn(commit_lsn).await?;
        Ok(Some(b))
    }

    /// Apply one change inside the open group (opening it if needed).
    pub async fn apply(&mut self, ev: &Event) -> Result<()> {
        match &ev.change {
            Change::Insert { table, new } => {
                let Some(b) = self.row_target(table, ev.commit_lsn).await? else {
                    return Ok(());
                };
                self.planner.insert(&b, new)?;
            }
            Change::Update { table, old, new } => {
                let Some(b) = self.row_target(table, ev.commit_lsn).await? else {
                    return Ok(());
                };
                self.planner.update(&b, old.as_ref(), new)?;
            }
            Change::Delete { table, old } => {
                let Some(b) = self.row_target(table, ev.commit_lsn).await? else {
                    return Ok(());
                };
                self.planner.delete(&b, old)?;
            }
            Change::Truncate {
                tables,
                cascade,
                restart_identity,
            } => {
                let names: Vec<String> = tables
                    .iter()
                    .filter(|t| self.flows(&t.name))
                    .map(|t| t.name.quoted())
                    .collect();
                if names.is_empty() || !self.cfg.apply_truncate {
                    return Ok(());
                }
                self.ensure_txn(ev.commit_lsn).await?;
                self.run_ready(true).await?;
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
                self.client
                    .batch_execute(&sql)
                    .await
                    .with_context(|| format!("{sql} on {}", self.source.other()))?;
            }
        }
        self.stats.changes += 1;
        self.run_ready(false).await
    }

    /// Run the planner's finished batches (all of them, with `flush`).
    async fn run_ready(&mut self, flush: bool) -> Result<()> {
        if flush {
            self.planner.flush();
        }
        for batch in self.planner.take_ready() {
            self.execute(&batch).await?;
        }
        Ok(())
    }

    async fn execute(&mut self, batch: &Batch) -> Result<()> {
        let target = &batch.binding.target;
        let key = (target.name.clone(), batch.op, batch.cols.clone());
        let stmt = match self.statements.get(&key) {
            Some(s) => s.clone(),
            None => {
                let s = match sql::statement(target, batch.op, &batch.cols) {
                    Some(text) => Some(self.client.prepare(&text).await.with_context(|| {
                        format!("preparing the {:?} statement for {}", batch.op, target.name)
                    })?),
                    None => None,
                };
                self.statements.insert(key, s.clone());
                s
            }
        };
        let Some(stmt) = stmt else { return Ok(()) };
        let mut columns: Vec<Vec<Option<&str>>> =
            vec![Vec::with_capacity(batch.rows.len()); batch.cols.len()];
        for row in &batch.rows {
            for (i, v) in row.iter().enumerate() {
                columns[i].push(match v {
                    None => None,
                    Some(b) => Some(std::str::from_utf8(b).map_err(|_| {
                        anyhow!(
                            "{}: a value of column `{}` is not valid UTF-8; tandem needs UTF8 databases",
                            target.name,
                            target.columns[batch.cols[i]].name
                        )
                    })?),
                });
            }
        }
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let n = self.client.execute(&stmt, &params).await.with_context(|| {
            format!(
                "applying {} {:?} rows to {}.{}",
                batch.rows.len(),
                batch.op,
                self.source.other(),
                target.name
            )
        })?;
        if batch.op == Op::Update && (n as usize) < batch.rows.len() {
            let missing = batch.rows.len() as u64 - n;
            self.stats.missing_rows += missing;
            tracing::warn!(table = %target.name, missing, "update for rows missing on {}; skipped", self.source.other());
        }
        Ok(())
    }

    /// Finish the group: run what is pending, advance the checkpoint to `lsn` in the same
    /// transaction, and commit. Returns once the commit is durable.
    pub async fn commit(&mut self, lsn: Lsn) -> Result<()> {
        if !self.in_txn {
            return self.record(lsn).await;
        }
        self.run_ready(true).await?;
        checkpoint::advance(&self.client, self.source, lsn).await?;
        self.client
            .batch_execute("COMMIT")
            .await
            .context("committing the apply transaction")?;
        self.in_txn = false;
        self.stats.commits += 1;
        Ok(())
    }

    /// Commit what was applied without moving the checkpoint: for changes that do not come from
    /// the stream (repair), which still carry the marker and so never travel back.
    pub async fn commit_outside_stream(&mut self) -> Result<()> {
        if !self.in_txn {
            return Ok(());
        }
        self.run_ready(true).await?;
        self.client
            .batch_execute("COMMIT")
            .await
            .context("committing the repair transaction")?;
        self.in_txn = false;
        self.stats.commits += 1;
        Ok(())
    }

    /// Abandon the open group; the stream will deliver it again from the checkpoint.
    pub async fn rollback(&mut self) -> Result<()> {
        self.planner.flush();
        self.planner.take_ready();
        if self.in_txn {
            self.in_txn = false;
            self.client.batch_execute("ROLLBACK").await?;
        }
        Ok(())
    }

    /// Advance the checkpoint alone (progress through transactions that needed nothing applied).
    pub async fn record(&mut self, lsn: Lsn) -> Result<()> {
        checkpoint::advance(&self.client, self.source, lsn).await
    }

    pub fn count_transaction(&mut self) {
        self.stats.transactions += 1;
    }
}
