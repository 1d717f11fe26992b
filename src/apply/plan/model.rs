//! A check of the planner against the plainest apply: a history of changes to one table, as a
//! source makes them, planned into batches; the batches executed in order (each batch's rows in
//! reverse, to show their order within it does not matter) must leave the rows the history left.
//! The unit test feeds it seeded random histories, the `planner` fuzz target the fuzzer's bytes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use super::{Binding, Op, Planner, TargetColumn, TargetTable};
use crate::config::TableName;
use crate::event::SourceTable;
use crate::source::pgoutput::{OldTuple, RelColumn, Value};

/// Source columns `id` (the key), `a`, `g`; the target has them as `g` (generated there, so
/// never written), `a`, `id`.
pub fn binding() -> Arc<Binding> {
    let src = SourceTable {
        oid: 1,
        name: TableName::new("public", "t"),
        columns: ["id", "a", "g"]
            .iter()
            .map(|n| RelColumn {
                key: *n == "id",
                name: n.to_string(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    };
    let col = |n: &str, generated| TargetColumn {
        name: n.into(),
        type_sql: "text".into(),
        generated,
        identity_always: false,
    };
    let target = TargetTable {
        name: TableName::new("public", "t"),
        columns: vec![col("g", true), col("a", false), col("id", false)],
        key: vec![2],
        unique: vec![],
    };
    Arc::new(Binding::new(&src, Arc::new(target)).expect("the model's binding"))
}

fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// One history of `steps` changes on 8 keys, each choice made by `choose(n)` (a number below
/// `n`): inserts, updates, updates leaving the value unchanged (TOAST), deletes and key changes,
/// values sometimes NULL, old rows key-only or whole, conflict detection on or off, batches of
/// 1–6 rows. `Ok` with how many batches were marked as updating existing rows only; `Err` says
/// what went wrong.
pub fn check(mut choose: impl FnMut(u64) -> u64, steps: usize) -> Result<usize, String> {
    type Table = BTreeMap<Bytes, Option<Bytes>>;
    // With conflict detection on or off (an unchanged value is then taken from a whole old row).
    let bd = Arc::new(Binding {
        detect: choose(2) == 0,
        ..(*binding()).clone()
    });
    let mut truth: Table = BTreeMap::new();
    let mut p = Planner::new(1 + choose(6) as usize, 1 << 20);
    let mut batches = Vec::new();
    // The old row as the source sends it: the key only, or (`REPLICA IDENTITY FULL`) whole.
    let old_of = |key: &Bytes, truth: &Table, full: bool| OldTuple {
        full,
        tuple: vec![
            Value::Text(key.clone()),
            match truth.get(key) {
                Some(Some(v)) if full => Value::Text(v.clone()),
                _ => Value::Null,
            },
            if full { text("g") } else { Value::Null },
        ],
    };
    let fail = |e: super::PlanError| e.to_string();
    for step in 0..steps {
        let key = Bytes::from(format!("{}", choose(8)));
        let val = if choose(4) == 0 {
            Value::Null
        } else {
            text(&format!("v{step}"))
        };
        let val_b = match &val {
            Value::Text(b) => Some(b.clone()),
            _ => None,
        };
        match choose(5) {
            // As on a source: a key is inserted only where it has no row.
            0 | 1 if !truth.contains_key(&key) => {
                p.insert(&bd, &vec![Value::Text(key.clone()), val, text("g")])
                    .map_err(fail)?;
                truth.insert(key, val_b);
            }
            0 | 1 => {
                p.update(&bd, None, &vec![Value::Text(key.clone()), val, text("g")])
                    .map_err(fail)?;
                truth.insert(key, val_b);
            }
            2 => {
                // Unchanged-TOAST update: only existing rows change, and keep their value. With
                // a whole old row (only a row that is there has one) it is taken from there.
                let old = (truth.contains_key(&key) && choose(2) == 0)
                    .then(|| old_of(&key, &truth, true));
                p.update(
                    &bd,
                    old.as_ref(),
                    &vec![Value::Text(key.clone()), Value::UnchangedToast, text("g")],
                )
                .map_err(fail)?;
            }
            3 => {
                p.delete(&bd, &old_of(&key, &truth, choose(2) == 0))
                    .map_err(fail)?;
                truth.remove(&key);
            }
            _ => {
                let to = Bytes::from(format!("{}", choose(8)));
                if !truth.contains_key(&key) || (to != key && truth.contains_key(&to)) {
                    // As on a source: only a row that is there is updated, and the key is
                    // unique (no key change onto another row).
                    continue;
                }
                // Now and then the value is TOASTed and left unchanged: it moves along.
                let (val, val_b) = if choose(3) == 0 {
                    (Value::UnchangedToast, truth[&key].clone())
                } else {
                    (val, val_b)
                };
                p.update(
                    &bd,
                    Some(&old_of(&key, &truth, choose(2) == 0)),
                    &vec![Value::Text(to.clone()), val, text("g")],
                )
                .map_err(fail)?;
                truth.remove(&key);
                truth.insert(to, val_b);
            }
        }
        batches.extend(p.take_ready());
    }
    p.flush();
    batches.extend(p.take_ready());
    let mut got: Table = BTreeMap::new();
    let mut existing_batches = 0;
    for b in &batches {
        let key_of = |row: &[Option<Bytes>]| {
            row[0]
                .clone()
                .ok_or_else(|| format!("a row without its key: {b:?}"))
        };
        if b.fresh && b.op == Op::Upsert {
            for row in &b.rows {
                if got.contains_key(&key_of(row)?) {
                    return Err(format!("a fresh batch meets a row already there: {b:?}"));
                }
            }
        }
        if b.existing && b.op == Op::Upsert {
            existing_batches += 1;
            for row in &b.rows {
                if !got.contains_key(&key_of(row)?) {
                    return Err(format!("an existing-rows batch misses a row: {b:?}"));
                }
            }
        }
        let mut keys = HashSet::new();
        for row in b.rows.iter().rev() {
            let key = key_of(row)?;
            if !keys.insert(key.clone()) {
                return Err(format!("a batch holds a key twice: {b:?}"));
            }
            match b.op {
                Op::Upsert => {
                    got.insert(key, row[1].clone());
                }
                Op::Update => {
                    if let Some(v) = got.get_mut(&key) {
                        if b.cols.len() > 1 {
                            *v = row[1].clone();
                        }
                    }
                }
                Op::Delete => {
                    got.remove(&key);
                }
                Op::Rekey => {
                    let from = row
                        .last()
                        .cloned()
                        .flatten()
                        .ok_or_else(|| format!("a key change without its old key: {b:?}"))?;
                    if let Some(v) = got.remove(&from) {
                        got.insert(key, v);
                    }
                }
            }
        }
    }
    if got != truth {
        return Err(format!(
            "batched: {got:?}\nrow by row: {truth:?}\nbatches: {batches:#?}"
        ));
    }
    Ok(existing_batches)
}
