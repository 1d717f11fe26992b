//! `tandem repair`: make the other side equal to a source side for every difference `verify`
//! finds, through the normal apply path (marked, so the change never travels back).

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::apply::Applier;
use crate::config::{quote_ident, Config, TableName};
use crate::event::{Change, Event, SourceTable};
use crate::lsn::Lsn;
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
    let mut ordinal = 0u32;
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
                // The table stays locked on the target from before the source's rows are read until
                // they are written: a change the stream applied in between (the source's next
                // version of a row) would be set back to the version read, while the source kept
                // the next one. Locked, the stream applies it after the repair commits. Writers on
                // the target, the application's included, wait meanwhile.
                a.lock_table(&s.name).await?;
                // With a key, each key of the round gets the source's state once the table is
                // locked: its row, or its absence (a row verify saw on one side only may have come
                // or gone since, and the stream may have brought that here already). Without a
                // primary key a key is a whole row, one per missing copy: nothing to fetch.
                let (rows, gone): (Vec<Vec<Value>>, Vec<&Key>) = match s.meta.key.is_empty() {
                    false => {
                        let asked: Vec<&Key> = upserts.iter().chain(only_target).collect();
                        let found = fetch(src, source, s, &table, &asked).await?;
                        let present: std::collections::HashSet<&Vec<Option<String>>> =
                            found.iter().map(|(k, _)| k).collect();
                        let gone = asked
                            .into_iter()
                            .filter(|k| !present.contains(&k.values))
                            .collect();
                        (found.into_iter().map(|(_, row)| row).collect(), gone)
                    }
                    true => (
                        upserts.iter().map(|k| key_tuple(s, &table, k)).collect(),
                        only_target.iter().collect(),
                    ),
                };
                let mut event = |change: Change| {
                    ordinal += 1;
                    Event {
                        source,
                        commit_lsn: at,
                        commit_ts: now_us,
                        xid: 0,
                        ordinal,
                        change,
                    }
                };
                for new in rows {
                    a.apply(&event(Change::Insert {
                        table: table.clone(),
                        new,
                    }))
                    .await?;
                    done.upserted += 1;
                }
                for k in gone {
                    let old = OldTuple {
                        // Without a primary key, the whole row: one copy of it goes.
                        full: s.meta.key.is_empty(),
                        tuple: key_tuple(s, &table, k),
                    };
                    a.apply(&event(Change::Delete {
                        table: table.clone(),
                        old,
                    }))
                    .await?;
                    done.deleted += 1;
                }
                a.commit_outside_stream().await
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
