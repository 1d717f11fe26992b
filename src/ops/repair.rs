//! `tandem repair`: make the other side equal to a source side for every difference `verify`
//! finds, through the normal apply path (marked, so the change never travels back).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::apply::Applier;
use crate::config::{quote_ident, Config, TableName};
use crate::db;
use crate::event::{Change, Event, SourceTable};
use crate::lsn::Lsn;
use crate::ops::rewrite;
use crate::ops::verify::{self, Key, Shape};
use crate::side::Side;
use crate::source::pgoutput::{OldTuple, RelColumn, Value};

/// What repair did (or, with `dry_run`, would do) to one table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repaired {
    pub table: String,
    pub upserted: u64,
    pub deleted: u64,
}

fn source_table(s: &Shape, oid: u32) -> Arc<SourceTable> {
    let columns = s
        .meta
        .columns
        .iter()
        .enumerate()
        // What verify compared: a column only one side has, or one a column list keeps local,
        // is left alone.
        .filter(|(_, c)| !c.generated && s.compared_columns.contains(&c.name))
        .map(|(i, c)| RelColumn {
            key: s.meta.key.contains(&i),
            name: c.name.clone(),
            type_oid: 0,
            type_modifier: -1,
        })
        .collect();
    Arc::new(SourceTable {
        oid,
        name: s.name.clone(),
        columns,
    })
}

/// The source's current rows for `keys`, as tuples in `table`'s column order, each with the key
/// values it was found by (as given).
async fn fetch(
    c: &Client,
    side: Side,
    s: &Shape,
    table: &SourceTable,
    keys: &[&Key],
) -> Result<Vec<(Vec<Option<String>>, Vec<Value>)>> {
    let n = table.columns.len();
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("t.{}::text", quote_ident(&c.name)))
        .chain((1..=s.key_cols.len()).map(|i| format!("u.v{i}")))
        .collect();
    let sql = format!(
        "SELECT {} FROM {} t {}",
        cols.join(", "),
        s.from(side),
        s.key_join(side)
    );
    let key_cols = s.key_params(keys);
    let p: Vec<&(dyn ToSql + Sync)> = key_cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    Ok(c.query(&sql, &p)
        .await?
        .iter()
        .map(|r| {
            let key = (n..n + s.key_cols.len()).map(|i| r.get(i)).collect();
            let row = (0..n)
                .map(|i| match r.get::<_, Option<String>>(i) {
                    Some(v) => Value::Text(v.into()),
                    None => Value::Null,
                })
                .collect();
            (key, row)
        })
        .collect())
}

/// The row of `table` a key names: its key values, the rest NULL (without a primary key, the
/// key is the whole row).
fn key_tuple(s: &Shape, table: &SourceTable, key: &Key) -> Vec<Value> {
    let mut t = vec![Value::Null; table.columns.len()];
    for (i, &k) in s.key_cols.iter().enumerate() {
        let name = &s.meta.columns[k].name;
        if let (Some(pos), Some(v)) = (
            table.columns.iter().position(|c| &c.name == name),
            &key.values[i],
        ) {
            t[pos] = Value::Text(v.clone().into());
        }
    }
    t
}

/// Where repair events come from: the source's WAL position when repair started, its time,
/// and a running ordinal.
struct Ids {
    at: Lsn,
    now_us: i64,
    ordinal: u32,
}

impl Ids {
    fn event(&mut self, source: Side, change: Change) -> Event {
        self.ordinal += 1;
        Event {
            source,
            commit_lsn: self.at,
            commit_ts: self.now_us,
            xid: 0,
            ordinal: self.ordinal,
            change,
        }
    }
}

/// One drill-down round of differences of a table: the keys the target lacks or has otherwise,
/// and those only it has (in the delete pass).
struct Round<'a> {
    src: &'a Client,
    source: Side,
    s: &'a Shape,
    table: &'a Arc<SourceTable>,
    upserts: &'a [Key],
    only_target: &'a [Key],
}

impl Round<'_> {
    /// Give the round's keys their source state in one target transaction; with `aside`,
    /// after rewriting the rows that hold values of a unique constraint the round's rows take
    /// (see [`Round::move_aside`]). Returns the rows written and deleted.
    async fn write(&self, a: &mut Applier, ids: &mut Ids, aside: bool) -> Result<(u64, u64)> {
        let (s, table) = (self.s, self.table);
        // The table stays locked on the target from before the source's rows are read until
        // they are written: a change the stream applied in between (the source's next version
        // of a row) would be set back to the version read, while the source kept the next one.
        // Locked, the stream applies it after the repair commits. Writers on the target, the
        // application's included, wait meanwhile.
        a.lock_table(&s.name).await?;
        // With a key, each key of the round gets the source's state once the table is locked:
        // its row, or its absence (a row verify saw on one side only may have come or gone
        // since, and the stream may have brought that here already). Without a primary key a
        // key is a whole row, one per missing copy: nothing to fetch.
        let (mut rows, mut gone): (Vec<Vec<Value>>, Vec<Key>) = match s.meta.key.is_empty() {
            false => {
                let asked: Vec<&Key> = self.upserts.iter().chain(self.only_target).collect();
                self.state(&asked).await?
            }
            true => (
                self.upserts
                    .iter()
                    .map(|k| key_tuple(s, table, k))
                    .collect(),
                self.only_target.to_vec(),
            ),
        };
        if aside {
            self.move_aside(a, &mut rows, &mut gone)
                .await
                .with_context(|| {
                    format!(
                        "moving rows of {} that hold values of a unique constraint aside on {} \
                         (deleted and written again in one statement)",
                        s.name,
                        self.source.other()
                    )
                })?;
        }
        let written = (rows.len() as u64, gone.len() as u64);
        for new in rows {
            let table = table.clone();
            a.apply(&ids.event(self.source, Change::Insert { table, new }))
                .await?;
        }
        for k in gone {
            let old = OldTuple {
                // Without a primary key, the whole row: one copy of it goes.
                full: s.meta.key.is_empty(),
                tuple: key_tuple(s, table, &k),
            };
            let table = table.clone();
            a.apply(&ids.event(self.source, Change::Delete { table, old }))
                .await?;
        }
        a.commit_outside_stream().await?;
        Ok(written)
    }

    /// The source's rows for `keys` (in the table's column order), and the keys it has no row
    /// for.
    async fn state(&self, keys: &[&Key]) -> Result<(Vec<Vec<Value>>, Vec<Key>)> {
        let found = fetch(self.src, self.source, self.s, self.table, keys).await?;
        let present: std::collections::HashSet<&Vec<Option<String>>> =
            found.iter().map(|(k, _)| k).collect();
        let gone = keys
            .iter()
            .filter(|k| !present.contains(&k.values))
            .map(|&k| k.clone())
            .collect();
        Ok((found.into_iter().map(|(_, row)| row).collect(), gone))
    }

    /// Rows of the round exchange values of a unique constraint with each other, or take one
    /// a row outside it holds on the target. Those holders join the round (their source rows,
    /// or their absence; until no row outside holds a value of one in it), and the target's
    /// rows of the round that differ, and those the source lacks, are deleted and written
    /// again in one statement ([`rewrite`]). The round's writes after it find every value free.
    async fn move_aside(
        &self,
        a: &mut Applier,
        rows: &mut Vec<Vec<Value>>,
        gone: &mut Vec<Key>,
    ) -> Result<()> {
        let (s, target) = (self.s, self.source.other());
        let meta = s.meta_of(target);
        let blocked = rewrite::blocked_by(a.client(), &s.name).await?;
        if !blocked.is_empty() {
            bail!(
                "that would set off {}; change the rows on {target} so that none holds a value \
                 {} gives another, then repair again",
                blocked.join(", "),
                self.source
            );
        }
        let written: Vec<String> = self
            .table
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let keys: Vec<String> = meta
            .key
            .iter()
            .map(|&k| quote_ident(&meta.columns[k].name))
            .collect();
        let table = s.name.quoted();
        a.client()
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS pg_temp.tandem_repair, pg_temp.tandem_repair_gone; \
                 CREATE TEMP TABLE tandem_repair ON COMMIT DROP AS SELECT {} FROM {table} WITH NO DATA; \
                 CREATE TEMP TABLE tandem_repair_gone ON COMMIT DROP AS SELECT {} FROM {table} WITH NO DATA",
                written.join(", "),
                keys.join(", ")
            ))
            .await?;
        let columns = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .map(|n| {
                    let c = meta.columns.iter().find(|c| &quote_ident(&c.name) == n);
                    c.map_or("text".into(), |c| c.cast_sql.clone())
                })
                .collect()
        };
        let (row_types, key_types) = (columns(&written), columns(&keys));
        let c = a.client();
        let mut new_rows: Vec<Vec<Value>> = rows.clone();
        let mut new_gone: Vec<Vec<Option<String>>> =
            gone.iter().map(|k| k.values.clone()).collect();
        let holds = rewrite::holds_a_value_of(meta, "pg_temp.tandem_repair", &written);
        loop {
            let texts: Vec<Vec<Option<String>>> = new_rows
                .iter()
                .map(|r| r.iter().map(text).collect())
                .collect();
            fill(c, "pg_temp.tandem_repair", &written, &row_types, &texts).await?;
            fill(
                c,
                "pg_temp.tandem_repair_gone",
                &keys,
                &key_types,
                &new_gone,
            )
            .await?;
            let Some(holds) = &holds else { break };
            let holders: Vec<Key> = c
                .query(
                    &format!(
                        "SELECT {} FROM {} t WHERE NOT EXISTS (SELECT 1 FROM pg_temp.tandem_repair s \
                         WHERE {}) AND NOT EXISTS (SELECT 1 FROM pg_temp.tandem_repair_gone s \
                         WHERE {}) AND ({holds})",
                        s.key_of_t(),
                        meta.rows(),
                        meta.key_match("s", "t"),
                        meta.key_match("s", "t"),
                    ),
                    &[],
                )
                .await
                .context("finding the rows that hold the values")?
                .iter()
                .map(|r| Key {
                    values: r.get(0),
                    json: r.get(1),
                })
                .collect();
            if holders.is_empty() {
                break;
            }
            let (found, absent) = self.state(&holders.iter().collect::<Vec<_>>()).await?;
            new_gone = absent.iter().map(|k| k.values.clone()).collect();
            gone.extend(absent);
            new_rows = found.clone();
            rows.extend(found);
        }
        let rewritten = rewrite::statement(
            meta,
            "pg_temp.tandem_repair",
            &written,
            Some(&format!(
                "EXISTS (SELECT 1 FROM pg_temp.tandem_repair_gone s WHERE {})",
                meta.key_match("s", "t")
            )),
        );
        c.batch_execute(&rewritten).await?;
        Ok(())
    }
}

/// A value as text, for a parameter.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(b) | Value::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Null | Value::UnchangedToast => None,
    }
}

/// Add `rows` (text values of `columns`, in order) to the temporary table `into`, each value
/// cast to its column's type (`types`).
async fn fill(
    c: &Client,
    into: &str,
    columns: &[String],
    types: &[String],
    rows: &[Vec<Option<String>>],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let params: Vec<String> = (1..=columns.len())
        .map(|i| format!("${i}::text[]"))
        .collect();
    let values: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("u.c{}::{ty}", i + 1))
        .collect();
    let aliases: Vec<String> = (1..=columns.len()).map(|i| format!("c{i}")).collect();
    let arrays: Vec<Vec<Option<&str>>> = (0..columns.len())
        .map(|i| rows.iter().map(|r| r[i].as_deref()).collect())
        .collect();
    let p: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    c.execute(
        &format!(
            "INSERT INTO {into} ({}) SELECT {} FROM unnest({}) AS u({})",
            columns.join(", "),
            values.join(", "),
            params.join(", "),
            aliases.join(", ")
        ),
        &p,
    )
    .await
    .with_context(|| format!("filling {into}"))?;
    Ok(())
}

pub async fn repair(
    cfg: Arc<Config>,
    source: Side,
    only: Option<&TableName>,
    dry_run: bool,
) -> Result<Vec<Repaired>> {
    let (d, m) = verify::connect_pair(&cfg).await?;
    let src = if source == Side::Desktop { &d } else { &m };
    let mut applier = if dry_run {
        None
    } else {
        let mut a = Applier::connect(cfg.clone(), source).await?;
        a.ignore_direction = true;
        a.detect_conflicts = false;
        if let Some(k) = &cfg.kafka {
            // Repairs are changes too: on the audit stream, as changes of the source side.
            a.set_publisher(crate::sink::kafka::Publisher::new(
                k,
                Lsn::ZERO,
                &format!("repair-{}", source.direction_from()),
            )?);
        }
        Some(a)
    };
    // Repair events get ids of their own: the source's WAL position now, and a running ordinal.
    let at: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let at: Lsn = at.parse()?;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64 - 946_684_800_000_000)
        .unwrap_or(0);
    let mut ids = Ids {
        at,
        now_us,
        ordinal: 0,
    };
    // Each table after the ones it references, so that a row repaired in finds the row it
    // references repaired in already (as the initial snapshot copies them).
    let mut shapes = verify::shapes(&cfg, &d, &m, only).await?;
    let names = shapes.iter().map(|s| s.name.clone()).collect();
    let order = crate::catalog::reference_order(names, &d, &m).await?;
    shapes.sort_by_key(|s| order.iter().position(|t| *t == s.name));
    let mut out: Vec<Repaired> = shapes
        .iter()
        .map(|s| Repaired {
            table: s.name.to_string(),
            ..Default::default()
        })
        .collect();
    // Rows the target lacks or has otherwise are written first, in that order; rows only the
    // target has are deleted in a second pass, in the reverse order, so that a row goes before
    // the rows it references (a second comparison, of the tables that had such rows). A dry
    // run writes nothing: one pass says both.
    let mut deletes_left = vec![false; shapes.len()];
    for deleting in [false, true] {
        let tables: Vec<usize> = match deleting {
            false if dry_run => continue,
            false => (0..shapes.len()).collect(),
            true if dry_run => (0..shapes.len()).collect(),
            true => (0..shapes.len())
                .rev()
                .filter(|&i| deletes_left[i])
                .collect(),
        };
        for i in tables {
            let s = &shapes[i];
            let table = source_table(s, i as u32 + 1);
            let done = &mut out[i];
            let left = &mut deletes_left[i];
            verify::compare(&cfg, &d, &m, s, async |diff| {
                let (only_src, only_target) = match source {
                    Side::Desktop => (&diff.only_desktop, &diff.only_mobile),
                    Side::Mobile => (&diff.only_mobile, &diff.only_desktop),
                };
                let none = Vec::new();
                let only_target = match deleting {
                    true => only_target,
                    false => {
                        *left |= !only_target.is_empty();
                        &none
                    }
                };
                let upserts: Vec<Key> = only_src.iter().chain(&diff.differs).cloned().collect();
                if dry_run {
                    for k in &upserts {
                        println!("would upsert {} {} on {}", s.name, k.json, source.other());
                    }
                    for k in only_target {
                        println!("would delete {} {} on {}", s.name, k.json, source.other());
                    }
                    done.upserted += upserts.len() as u64;
                    done.deleted += only_target.len() as u64;
                    return Ok(());
                }
                let Some(a) = applier.as_mut() else {
                    return Ok(());
                };
                if upserts.is_empty() && only_target.is_empty() {
                    return Ok(());
                }
                let round = Round {
                    src,
                    source,
                    s,
                    table: &table,
                    upserts: &upserts,
                    only_target,
                };
                let written = match round.write(a, &mut ids, false).await {
                    // Rows exchanging values of a unique constraint (a swap, or a value a row
                    // of the target's own holds): no order of writes passes. Again, with the
                    // rows that hold those values rewritten first.
                    Err(e)
                        if db::caused_by(&e, &SqlState::UNIQUE_VIOLATION)
                            && !s.meta.key.is_empty() =>
                    {
                        a.rollback().await?;
                        tracing::warn!(
                            table = %s.name, error = %e.root_cause(),
                            "rows take values of a unique constraint that other rows hold on {}; \
                             repairing again with those rows deleted and written again in one \
                             statement (their DELETE and INSERT triggers fire, not UPDATE ones)",
                            source.other()
                        );
                        round.write(a, &mut ids, true).await?
                    }
                    r => r?,
                };
                done.upserted += written.0;
                done.deleted += written.1;
                Ok(())
            })
            .await
            .with_context(|| format!("repairing {}", s.name))?;
        }
    }
    for done in &out {
        tracing::info!(table = %done.table, upserted = done.upserted, deleted = done.deleted, target = %source.other(), dry_run, "repair");
    }
    if let Some(a) = applier.as_mut() {
        a.drain_kafka().await?;
    }
    Ok(out)
}
