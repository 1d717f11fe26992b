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

/// Source table `public.t` with text columns `names`, `id` the key.
pub fn source(names: &[&str]) -> SourceTable {
    SourceTable {
        oid: 1,
        name: TableName::new("public", "t"),
        columns: names
            .iter()
            .map(|n| RelColumn {
                key: *n == "id",
                name: n.to_string(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    }
}

/// A `text` column of a target table (`generated`: computed there).
pub fn text_column(name: &str, generated: bool) -> TargetColumn {
    TargetColumn {
        name: name.into(),
        type_sql: "text".into(),
        cast_sql: "text".into(),
        generated,
        identity_always: false,
        equality: true,
        indexed: false,
        respelled: false,
    }
}

/// Source columns `id` (the key), `a`, `g`; the target has them as `g` (generated there, so
/// never written), `a`, `id`.
pub fn binding() -> Arc<Binding> {
    let src = source(&["id", "a", "g"]);
    let col = text_column;
    let target = TargetTable {
        name: TableName::new("public", "t"),
        columns: vec![col("g", true), col("a", false), col("id", false)],
        key: vec![2],
        unique: vec![],
        former: vec![],
        inherited: false,
        referenced: false,
        partitioned: false,
        tree: false,
    };
    Arc::new(Binding::new(&src, Arc::new(target)).expect("the model's binding"))
}

fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// One history of `steps` changes on 8 keys, each choice made by `choose(n)` (a number below
/// `n`): inserts, updates, updates leaving the value unchanged (TOAST), deletes and key changes,
/// values sometimes NULL, old rows key-only or whole, conflict detection on or off, the table
/// referenced by a foreign key or not (key changes made in place) and partitioned or not (a delete
/// and the insert right after it made in place), batches of 1–6 rows. `Ok` with how many batches were marked as updating existing rows only; `Err` says
/// what went wrong.
pub fn check(mut choose: impl FnMut(u64) -> u64, steps: usize) -> Result<usize, String> {
    type Table = BTreeMap<Bytes, Option<Bytes>>;
    // With conflict detection on or off (an unchanged value is then taken from a whole old row),
    // the table referenced by a foreign key on the target or not (key changes in place), and
    // partitioned or not.
    let base = binding();
    let bd = Arc::new(Binding {
        detect: choose(2) == 0,
        target: Arc::new(TargetTable {
            referenced: choose(2) == 0,
            ..(*base.target).clone()
        }),
        partitioned: choose(2) == 0,
        ..(*base).clone()
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
                Op::Replace => return Err(format!("a keyed table's batch replaces: {b:?}")),
                Op::Rekey | Op::Move => {
                    let from = row
                        .last()
                        .cloned()
                        .flatten()
                        .ok_or_else(|| format!("a key change without its old key: {b:?}"))?;
                    // One statement checks the unique key row by row, in its own order.
                    if !keys.insert(from.clone()) {
                        return Err(format!("key changes in one statement meet: {b:?}"));
                    }
                    match (got.remove(&from), b.op) {
                        // A move, or without the old key's row an upsert: the new image.
                        (_, Op::Move) => {
                            got.insert(key, row[1].clone());
                        }
                        // The old row moves with its unchanged value; without it, nothing.
                        (Some(v), _) => {
                            got.insert(key, v);
                        }
                        (None, _) => {}
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

/// Source columns `a`, `b` of a table without a key; the target has them as `b`, `a`.
pub fn keyless_binding() -> Arc<Binding> {
    let src = SourceTable {
        oid: 2,
        name: TableName::new("public", "k"),
        columns: ["a", "b"]
            .iter()
            .map(|n| RelColumn {
                // REPLICA IDENTITY FULL: every column is the identity.
                key: true,
                name: n.to_string(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    };
    let col = |n: &str| TargetColumn {
        name: n.into(),
        type_sql: "text".into(),
        cast_sql: "text".into(),
        generated: false,
        identity_always: false,
        equality: true,
        indexed: false,
        respelled: false,
    };
    let target = TargetTable {
        name: TableName::new("public", "k"),
        columns: vec![col("b"), col("a")],
        key: vec![],
        unique: vec![],
        former: vec![],
        inherited: false,
        referenced: false,
        partitioned: false,
        tree: false,
    };
    Arc::new(Binding::new(&src, Arc::new(target)).expect("the keyless model's binding"))
}

/// [`check`] for a table without a key: rows are a multiset (values from a small set, so equal
/// rows are common), and the target changes one row equal to the old one per update or delete,
/// as the statements do. Inserts, updates (now and then leaving `b` unchanged, TOASTed) and
/// deletes, with whole old rows as `REPLICA IDENTITY FULL` sends them. `Ok` with how many
/// batches held more than one row.
pub fn check_keyless(mut choose: impl FnMut(u64) -> u64, steps: usize) -> Result<usize, String> {
    type Row = [Option<Bytes>; 2];
    let bd = keyless_binding();
    let mut p = Planner::new(1 + choose(6) as usize, 1 << 20);
    let value = |choose: &mut dyn FnMut(u64) -> u64| match choose(3) {
        0 => None,
        n => Some(Bytes::from(format!("v{n}"))),
    };
    let as_value = |v: &Option<Bytes>| v.clone().map_or(Value::Null, Value::Text);
    let tuple = |r: &Row| vec![as_value(&r[0]), as_value(&r[1])];
    // The source's rows, as (a, b).
    let mut truth: Vec<Row> = Vec::new();
    let mut batches = Vec::new();
    let fail = |e: super::PlanError| e.to_string();
    for _ in 0..steps {
        let row: Row = [value(&mut choose), value(&mut choose)];
        match choose(4) {
            0 | 1 => {
                p.insert(&bd, &tuple(&row)).map_err(fail)?;
                truth.push(row);
            }
            2 if !truth.is_empty() => {
                let i = choose(truth.len() as u64) as usize;
                let old = OldTuple {
                    full: true,
                    tuple: tuple(&truth[i]),
                };
                let mut new = tuple(&row);
                let mut row = row;
                if choose(3) == 0 {
                    new[1] = Value::UnchangedToast;
                    row[1] = truth[i][1].clone();
                }
                p.update(&bd, Some(&old), &new).map_err(fail)?;
                truth[i] = row;
            }
            3 if !truth.is_empty() => {
                let i = choose(truth.len() as u64) as usize;
                let old = OldTuple {
                    full: true,
                    tuple: tuple(&truth[i]),
                };
                p.delete(&bd, &old).map_err(fail)?;
                truth.remove(i);
            }
            _ => p.flush(),
        }
        batches.extend(p.take_ready());
    }
    p.flush();
    batches.extend(p.take_ready());
    // The target's rows, as (b, a), changed batch by batch.
    let mut got: Vec<Vec<Option<Bytes>>> = Vec::new();
    let mut multi = 0;
    for b in &batches {
        multi += usize::from(b.rows.len() > 1);
        let at = |cols: &[usize], got: &[Vec<Option<Bytes>>], vals: &[Option<Bytes>]| {
            got.iter()
                .position(|r| cols.iter().zip(vals).all(|(&c, v)| &r[c] == v))
        };
        match b.op {
            Op::Upsert => {
                for row in &b.rows {
                    let mut r = vec![None, None];
                    for (&c, v) in b.cols.iter().zip(row) {
                        r[c] = v.clone();
                    }
                    got.push(r);
                }
            }
            Op::Delete => {
                // Each row finds its row before any is deleted (one statement): equal rows in
                // one batch would find the same one.
                let mut found = HashSet::new();
                for row in b.rows.iter().rev() {
                    let i = at(&b.cols, &got, row)
                        .ok_or_else(|| format!("a delete finds no row: {b:?}"))?;
                    if !found.insert(i) {
                        return Err(format!("two deletes of a batch find one row: {b:?}"));
                    }
                }
                let mut found: Vec<usize> = found.into_iter().collect();
                found.sort_unstable();
                for i in found.into_iter().rev() {
                    got.remove(i);
                }
            }
            Op::Replace if b.rows.len() == 1 => {
                let n = b.cols.len() / 2;
                let row = &b.rows[0];
                let i = at(&b.cols[n..], &got, &row[n..])
                    .ok_or_else(|| format!("an update finds no row: {b:?}"))?;
                for (&c, v) in b.cols[..n].iter().zip(&row[..n]) {
                    got[i][c] = v.clone();
                }
            }
            _ => return Err(format!("a keyless batch of this kind: {b:?}")),
        }
    }
    let mut want: Vec<Vec<Option<Bytes>>> = truth
        .iter()
        .map(|[a, b]| vec![b.clone(), a.clone()])
        .collect();
    want.sort();
    got.sort();
    if got != want {
        return Err(format!(
            "batched: {got:?}\nrow by row: {want:?}\nbatches: {batches:#?}"
        ));
    }
    Ok(multi)
}
