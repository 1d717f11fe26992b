//! The apply planner: turns a source's ordered changes into multi-row statements for the target.
//!
//! Pure. Consecutive changes of the same table and the same shape (operation and column set) are
//! merged into one batch, in order. A batch never holds the same key twice, because one
//! `INSERT … ON CONFLICT DO UPDATE` may not touch a row twice: a repeated key of the same shape
//! replaces its earlier row (the later full image wins; when a target trigger would observe each
//! change, [`Binding::collapse`] is off and it starts a new batch instead), and any other operation
//! on it has another shape and so starts a new batch. Executing the batches in order therefore
//! gives the same final rows as applying the changes one by one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use crate::apply::conflict::SourceOp;
use crate::config::TableName;
use crate::event::SourceTable;
use crate::lsn::Lsn;
use crate::source::pgoutput::{OldTuple, Tuple, Value};

#[doc(hidden)]
pub mod model;

/// A target table as the target's catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTable {
    pub name: TableName,
    pub columns: Vec<TargetColumn>,
    /// Indexes into `columns` of the primary key (or replica identity index) columns.
    pub key: Vec<usize>,
    /// Other unique constraints (indexes into `columns`, sorted): rows may collide on these.
    pub unique: Vec<Vec<usize>>,
    /// Names columns had before a `tandem ddl` schema change here renamed them (`Some`: the
    /// column under its name now) or dropped them (`None`): the other side's rows written before
    /// the change reached it still name them so.
    pub former: Vec<(String, Option<usize>)>,
    /// An ordinary table others inherit from (`INHERITS`, not partitions): a query of it reads
    /// their rows too, and an `UPDATE` or `DELETE` writes them, so its own rows are `ONLY` it.
    pub inherited: bool,
    /// A foreign key here references it: a key change is made in place ([`Op::Move`]) under
    /// conflict rules too, since a delete would set off the referencing rows' `ON DELETE`
    /// actions (see [`Binding::moves_keys`]).
    pub referenced: bool,
    /// A partitioned table: an `UPDATE` that moves a row to another partition is logged as a
    /// delete and an insert (see [`Binding::partitioned`]).
    pub partitioned: bool,
    /// A foreign key of the table references the table itself with an `ON UPDATE` action (a
    /// tree): a key change's row may name its parent by a key the target's cascade has already
    /// changed (see the README's "Key changes").
    pub tree: bool,
}

impl TargetTable {
    /// The key columns' names, in key order.
    pub fn key_names(&self) -> Vec<&str> {
        self.key
            .iter()
            .map(|&k| self.columns[k].name.as_str())
            .collect()
    }

    /// The table's own rows in a `FROM`, `UPDATE` or `DELETE`: `ONLY` it when others inherit from
    /// it (native logical replication, too, copies and applies each table of a tree by itself).
    pub fn rows(&self) -> String {
        self.name.rows(self.inherited)
    }

    /// `a.k1 = b.k1 AND …` over the key columns: rows of two aliases with the same key.
    pub fn key_match(&self, a: &str, b: &str) -> String {
        self.key
            .iter()
            .map(|&k| {
                let c = crate::config::quote_ident(&self.columns[k].name);
                format!("{a}.{c} = {b}.{c}")
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetColumn {
    pub name: String,
    /// `format_type()` of the column, with its modifier (`character varying(10)`).
    pub type_sql: String,
    /// The type without its modifier (`character varying`, `bpchar`): what a text value is cast
    /// to. Written into the column, it then meets the modifier as an assignment, which refuses a
    /// value too long where an explicit cast to `varchar(10)`, `char(3)` or `bit(4)` cuts it
    /// short: before, mobile's 10-character text landed in desktop's `varchar(5)` as its first
    /// five, unsaid, and verify's re-check cast the keys the same way.
    pub cast_sql: String,
    /// `GENERATED ALWAYS AS (…) STORED`: computed by the target, never written.
    pub generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: written with `OVERRIDING SYSTEM VALUE`, never updated.
    pub identity_always: bool,
    /// The type (or a domain's base type) has a default btree operator class: `=` compares it.
    pub equality: bool,
    /// The column leads a btree index (no predicate): a lookup by it can use the index.
    pub indexed: bool,
    /// Values equal by the column's `=` may be written otherwise (`citext`, a nondeterministic
    /// collation: `Pear` and `PEAR`; `numeric`'s `1.0` and `1.00`, a float's `0` and `-0`,
    /// `interval`'s `1 day` and `24:00:00`). A key column of this kind is set by an upsert too, so the
    /// row takes the source's spelling; an upsert keeps the target's key otherwise, and verify,
    /// which compares keys as text, then finds each side's spelling on that side only.
    pub respelled: bool,
}

/// How a source relation's columns land in a target table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub target: Arc<TargetTable>,
    /// For each source column, the target column it is written to (`None`: generated there).
    pub to_target: Vec<Option<usize>>,
    /// For each target key column (in `target.key` order), its source column.
    pub key_source: Vec<usize>,
    /// Target columns the source writes, in source order: the columns of an old row image.
    pub bound: Vec<usize>,
    /// Conflicts are detected for this table: batches carry a [`RowMeta`] per row.
    pub detect: bool,
    /// A repeated key may replace its earlier row in a batch (nothing on the target observes
    /// the intermediate row: no trigger fires there).
    pub collapse: bool,
    /// The table is partitioned on either side: a delete and the insert right after it may be
    /// the source's `UPDATE` moving a row to another partition (see [`Planner::insert`]).
    pub partitioned: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindError {
    #[error(
        "column `{column}` of {table} exists on the source side but not on the target; \
         add it to the target (same type) or drop it from the source"
    )]
    MissingColumn { table: TableName, column: String },
    #[error(
        "key column `{column}` of {table} on the target is not sent by the source; \
         both sides need the same primary key"
    )]
    MissingKey { table: TableName, column: String },
    #[error(
        "the source's replica identity of {table} ({identity}) leaves out key column `{column}`: \
         its updates and deletes come without the key (an update of the key alone as a new row); \
         run `ALTER TABLE {quoted} REPLICA IDENTITY DEFAULT` (or FULL) on the source (changes \
         logged before that still lack it)"
    )]
    IdentityWithoutKey {
        table: TableName,
        quoted: String,
        identity: String,
        column: String,
    },
    #[error(
        "{table}'s conflict policy {policy} decides by the source's old row, but the source logs \
         its changes without it (its replica identity is no longer FULL), so a change made there \
         could not be told from one meeting a concurrent change here; run `ALTER TABLE {quoted} \
         REPLICA IDENTITY FULL` on the source (changes logged before that still lack it)"
    )]
    NoOldRows {
        table: TableName,
        quoted: String,
        policy: &'static str,
    },
}

impl BindError {
    /// The source logged the change without what the target needs: no fix on the target
    /// helps, only leaving the changes logged so out (and repairing).
    pub fn logged(&self) -> bool {
        matches!(
            self,
            BindError::IdentityWithoutKey { .. } | BindError::NoOldRows { .. }
        )
    }
}

impl Binding {
    /// A key change is made in place ([`Op::Move`]), as on the source and as native's apply
    /// worker makes it: always without conflict rules (a target trigger sees an update, and a
    /// foreign key referencing the table, whenever it was added, sees no delete), and under them
    /// where foreign keys reference the table (elsewhere the rules decide the old key's delete
    /// and the new key's insert, each as a change of its own). Not for a key that is an
    /// identity `GENERATED ALWAYS`, which an `UPDATE` may set only to its default.
    pub fn moves_keys(&self) -> bool {
        let t = &self.target;
        (t.referenced || !self.detect) && t.key.iter().all(|&k| !t.columns[k].identity_always)
    }

    /// The target table has no key (nor replica identity index): a row is found by all its
    /// values, as native logical replication does under `REPLICA IDENTITY FULL`.
    pub fn keyless(&self) -> bool {
        self.target.key.is_empty()
    }

    pub fn new(source: &SourceTable, target: Arc<TargetTable>) -> Result<Binding, BindError> {
        let mut to_target = Vec::with_capacity(source.columns.len());
        for c in &source.columns {
            let now = || {
                target
                    .former
                    .iter()
                    .find(|(was, _)| *was == c.name)
                    .map(|f| f.1)
            };
            match target
                .columns
                .iter()
                .position(|t| t.name == c.name)
                .map(Some)
                .or_else(now)
            {
                Some(Some(i)) if target.columns[i].generated => to_target.push(None),
                Some(Some(i)) => to_target.push(Some(i)),
                // Dropped here: its value goes nowhere.
                Some(None) => to_target.push(None),
                None => {
                    return Err(BindError::MissingColumn {
                        table: target.name.clone(),
                        column: c.name.clone(),
                    })
                }
            }
        }
        let key_source: Vec<usize> = target
            .key
            .iter()
            .map(|&k| {
                to_target
                    .iter()
                    .position(|t| *t == Some(k))
                    .ok_or_else(|| BindError::MissingKey {
                        table: target.name.clone(),
                        column: target.columns[k].name.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        // An identity index without the key (`REPLICA IDENTITY USING INDEX`, made since setup):
        // old rows would carry its columns alone. No column marked: inserts only can come.
        let identity: Vec<&str> = source
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.as_str())
            .collect();
        if let Some(&s) = key_source
            .iter()
            .find(|&&s| !identity.is_empty() && !source.columns[s].key)
        {
            return Err(BindError::IdentityWithoutKey {
                table: target.name.clone(),
                quoted: source.name.quoted(),
                identity: identity.join(", "),
                column: source.columns[s].name.clone(),
            });
        }
        let bound = to_target.iter().flatten().copied().collect();
        // Without a key, equal rows are one key: never collapsed into one (see `Planner::push`).
        let collapse = !target.key.is_empty();
        Ok(Binding {
            partitioned: target.partitioned,
            target,
            to_target,
            key_source,
            bound,
            detect: false,
            collapse,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Insert, or update every column of an existing row (an insert, or an update that sent
    /// every value).
    Upsert,
    /// Update the given columns of an existing row (an update with unchanged-TOAST columns).
    Update,
    /// Delete by key.
    Delete,
    /// Update the row of an old key in place, giving it a new key: a key change whose new image
    /// has unchanged-TOAST columns, which the target holds only in the old key's row. `cols` is
    /// the new image's columns followed by the key's again, for the old key's values.
    Rekey,
    /// A key change with the whole new image (where [`Binding::moves_keys`]): the old key's row
    /// takes the new key and values in place, as on the source and as native's apply worker
    /// does (a delete and an insert would set off the referencing rows' `ON DELETE` actions: a
    /// cascade deleted rows the source kept). Where the target lacks the old key's row, the new
    /// image is upserted. `cols` as for [`Op::Rekey`].
    Move,
    /// A table without a key: update one row equal to the old row (the source's `REPLICA
    /// IDENTITY FULL` image) to the new image. `cols` is the new image's columns followed by
    /// the old row's.
    Replace,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Rekey => "rekey",
            Op::Move => "move",
            Op::Replace => "replace",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        [
            Op::Upsert,
            Op::Update,
            Op::Delete,
            Op::Rekey,
            Op::Move,
            Op::Replace,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// One multi-row statement's worth of rows: `cols` are target column indexes, and each row holds
/// one text value (or NULL) per column.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub binding: Arc<Binding>,
    pub op: Op,
    pub cols: Vec<usize>,
    pub rows: Vec<Vec<Option<Bytes>>>,
    /// One per row when the binding detects conflicts, else empty.
    pub meta: Vec<RowMeta>,
    /// When events are carried (Kafka): per row, the source changes it stands for (several when
    /// a repeated key replaced its row), published once the row's outcome is known.
    pub events: Vec<Vec<crate::event::Event>>,
    /// Every row of this upsert batch stands for a key the source had no row for before (a source
    /// insert, or a key change's new key, perhaps updated after in the same batch). While the
    /// sides agree, the target has no row for any of them either, so a plain INSERT does it,
    /// without `ON CONFLICT`'s second index probe and speculative-insertion lock.
    pub fresh: bool,
    /// Every row of this upsert batch is a whole new image of a key the source had a row for
    /// before the batch (an update that kept its key, perhaps updated again). While the sides
    /// agree, the target has each of those rows, so a plain `UPDATE … FROM unnest` does it,
    /// without `ON CONFLICT`'s probe for a conflicting row and its tuple lock.
    pub existing: bool,
    /// The batch was closed by a size limit with every row from one source transaction: it is a
    /// part of a large transaction.
    pub large: bool,
    /// Every row of this upsert batch had no row at its key on the target at the conflict lookup
    /// (which locked the rows it found, not the gaps). It is written with `ON CONFLICT DO
    /// NOTHING`: a row left out met one a local transaction inserted since, which must be decided
    /// as a conflict, not written over.
    pub absent: bool,
    /// The one source transaction (commit LSN) all rows come from, `None` once they are several.
    txn: Option<Lsn>,
}

/// Where a batched row came from, for conflict detection and the conflict log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowMeta {
    pub op: SourceOp,
    pub commit_lsn: Lsn,
    pub commit_ts: i64,
    /// The source's old row over [`Binding::bound`] (`REPLICA IDENTITY FULL`), if it sent one.
    pub old: Option<Vec<Option<Bytes>>>,
}

impl Batch {
    /// `rows` to write as they are: no conflict metadata, no events, never a plain INSERT.
    pub fn of(
        binding: Arc<Binding>,
        op: Op,
        cols: Vec<usize>,
        rows: Vec<Vec<Option<Bytes>>>,
    ) -> Batch {
        Batch {
            binding,
            op,
            cols,
            rows,
            meta: Vec::new(),
            events: Vec::new(),
            fresh: false,
            existing: false,
            large: false,
            absent: false,
            txn: None,
        }
    }

    pub fn table(&self) -> &TableName {
        &self.binding.target.name
    }

    /// A row of the source transaction committed at `lsn` joins the batch.
    fn joined_by_txn(&mut self, lsn: Lsn) {
        if self.txn != Some(lsn) {
            self.txn = None;
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{table}: key column `{column}` is NULL or missing in a {op} from the source")]
    NullKey {
        table: TableName,
        column: String,
        op: &'static str,
    },
    #[error("{table}: column `{column}` arrived in binary format, which tandem does not request")]
    Binary { table: TableName, column: String },
    #[error(
        "{table} has no primary key, so tandem finds its rows by all their values, but the source \
         sent a {op} without the old row; run `ALTER TABLE {quoted} REPLICA IDENTITY FULL` on the \
         source (`tandem setup --replica-identity-full` does it), or add a primary key"
    )]
    NoOldRow {
        table: TableName,
        quoted: String,
        op: &'static str,
    },
}

/// Accumulates changes into [`Batch`]es; the caller takes finished ones with [`Planner::take_ready`].
pub struct Planner {
    max_rows: usize,
    max_bytes: usize,
    current: Option<Batch>,
    bytes: usize,
    /// Keys in the open batch, with their row's index.
    keys: HashMap<Vec<Option<Bytes>>, usize>,
    /// The old keys of the open batch's key changes ([`Op::Move`], [`Op::Rekey`]).
    old_keys: HashSet<Key>,
    ready: Vec<Batch>,
    /// The change being planned: its transaction's commit LSN and time.
    at: (Lsn, i64),
    /// Carry each change's [`crate::event::Event`] with its row (Kafka is on).
    pub carry: bool,
    /// The change being planned, until a row takes it.
    event: Option<crate::event::Event>,
    /// Each change its own statement, in source order, as native's apply worker does.
    singly: bool,
    /// The change being planned: its transaction's xid (with `at`, which transaction it is).
    xid: u32,
    /// A delete of a partitioned table, held back until the next change: when that is an
    /// insert into the table in the same transaction, the two were the source's `UPDATE` moving
    /// a row to another partition (logged so), and are made as one key change in place.
    held: Option<Held>,
    /// The events of a held delete that became a key change, carried with its row.
    carried: Vec<crate::event::Event>,
}

/// A delete [`Planner::delete`] holds back (see `Planner::held`).
struct Held {
    binding: Arc<Binding>,
    at: (Lsn, i64),
    xid: u32,
    key: Key,
    old: OldTuple,
    meta: Option<RowMeta>,
    event: Option<crate::event::Event>,
}

type Key = Vec<Option<Bytes>>;

/// What the source held at a row's key just before the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Before {
    Absent,
    Present,
    /// Not known, or of no use to the batch (deletes, partial updates).
    Unknown,
}

impl Planner {
    pub fn new(max_rows: usize, max_bytes: usize) -> Planner {
        Planner {
            max_rows: max_rows.max(1),
            max_bytes,
            current: None,
            bytes: 0,
            keys: HashMap::new(),
            old_keys: HashSet::new(),
            ready: Vec::new(),
            at: (Lsn::ZERO, 0),
            carry: false,
            event: None,
            singly: false,
            xid: 0,
            held: None,
            carried: Vec::new(),
        }
    }

    /// Plan each change as a statement of its own from now on (`true`), or batch again. A
    /// constraint over several rows (a UNIQUE column other than the key, an exclusion
    /// constraint) is checked row by row as a statement writes: a source transaction that
    /// swaps two rows' values through a third passes only in its own order, which a batch's
    /// merged rows (and an `UPDATE … FROM`'s join) do not keep.
    pub fn set_singly(&mut self, singly: bool) {
        // Asked at every transaction: a batch stays open across them unless the mode changes.
        if singly != self.singly {
            self.flush();
            self.singly = singly;
        }
    }

    /// Close the open batch, if any.
    pub fn flush(&mut self) {
        self.release();
        if let Some(b) = self.current.take() {
            self.ready.push(b);
        }
        self.keys.clear();
        self.old_keys.clear();
        self.bytes = 0;
    }

    /// Batches that are complete, in the order they must run.
    pub fn take_ready(&mut self) -> Vec<Batch> {
        std::mem::take(&mut self.ready)
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_none() && self.ready.is_empty() && self.held.is_none()
    }

    /// The source transaction of the changes that follow (recorded when conflicts are detected).
    pub fn set_position(&mut self, commit_lsn: Lsn, commit_ts: i64) {
        self.at = (commit_lsn, commit_ts);
    }

    /// The change that follows, carried with its (first) row when [`Planner::carry`] is on.
    pub fn set_event(&mut self, ev: &crate::event::Event) {
        self.set_position(ev.commit_lsn, ev.commit_ts);
        self.xid = ev.xid;
        if self.carry {
            self.event = Some(ev.clone());
        }
    }

    fn meta(&self, b: &Binding, op: SourceOp, old: Option<&OldTuple>) -> Option<RowMeta> {
        if !b.detect {
            return None;
        }
        let old = old.filter(|o| o.full).and_then(|o| {
            o.tuple
                .iter()
                .zip(&b.to_target)
                .filter(|(_, t)| t.is_some())
                .map(|(v, _)| match v {
                    Value::Null => Some(None),
                    Value::Text(x) => Some(Some(x.clone())),
                    // Not known: no old row to compare with.
                    Value::UnchangedToast | Value::Binary(_) => None,
                })
                .collect::<Option<Vec<_>>>()
        });
        Some(RowMeta {
            op,
            commit_lsn: self.at.0,
            commit_ts: self.at.1,
            old,
        })
    }

    pub fn insert(&mut self, b: &Arc<Binding>, new: &Tuple) -> Result<(), PlanError> {
        // The delete right before it, of the same partitioned table in the same transaction,
        // with another key: the source's `UPDATE` moved the row to another partition, which
        // PostgreSQL logs as a delete and an insert. Made in place, as the source made it: a
        // delete would set off the referencing rows' `ON DELETE CASCADE` (they were kept there).
        if let Some(h) = self.held.take() {
            let same = Arc::ptr_eq(&h.binding, b) && h.at.0 == self.at.0 && h.xid == self.xid;
            if same && key_of(b, new, "insert")? != h.key {
                self.carried = h.event.into_iter().collect();
                return self.rekey(b, &h.old, h.key, new, Op::Move);
            }
            self.held = Some(h);
        }
        let meta = self.meta(b, SourceOp::Insert, None);
        self.row(b, Op::Upsert, new, "insert", meta, Before::Absent)
    }

    pub fn update(
        &mut self,
        b: &Arc<Binding>,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<(), PlanError> {
        // Under `REPLICA IDENTITY FULL` the old row carries every value, TOASTed ones inline
        // (PostgreSQL flattens them when it logs the old row): an unchanged value is the old one.
        // Under conflict rules the update is then whole, so a policy may recreate the row the
        // target lost (`update_deleted`). Not otherwise: writing the value again would cost the
        // target a new TOAST copy per update, as native's apply worker does not.
        let filled: Tuple;
        let new = match old {
            Some(o)
                if (b.detect || b.keyless()) && o.full && new.contains(&Value::UnchangedToast) =>
            {
                filled = new
                    .iter()
                    .zip(
                        o.tuple
                            .iter()
                            .chain(std::iter::repeat(&Value::UnchangedToast)),
                    )
                    .map(|(n, o)| match (n, o) {
                        (Value::UnchangedToast, Value::Text(_) | Value::Null) => o.clone(),
                        _ => n.clone(),
                    })
                    .collect();
                &filled
            }
            _ => new,
        };
        if b.keyless() {
            let old = old
                .filter(|o| o.full)
                .ok_or_else(|| no_old_row(b, "update"))?;
            return self.replace(b, old, new);
        }
        let mut key_changed = false;
        let partial = new.contains(&Value::UnchangedToast);
        if let Some(old) = old {
            let old_key = key_of(b, &old.tuple, "update")?;
            let new_key = key_of(b, new, "update")?;
            if old_key != new_key && partial {
                // The unchanged values are only in the old key's row on the target: a delete and
                // an update of the new key (which has no row) would lose the row.
                return self.rekey(b, old, old_key, new, Op::Rekey);
            }
            if old_key != new_key && b.moves_keys() {
                // Rows referencing it must not see a delete (`ON DELETE CASCADE`), and a
                // trigger sees the update the source made.
                return self.rekey(b, old, old_key, new, Op::Move);
            }
            if old_key != new_key {
                // Key change: the old row goes first, so the new key lands as a fresh row.
                key_changed = true;
                let meta = self.meta(b, SourceOp::Delete, Some(old));
                self.push_delete(b, old_key, meta);
            }
        }
        let op = match (key_changed, partial) {
            (true, _) => SourceOp::Insert,
            (false, true) => SourceOp::PartialUpdate,
            (false, false) => SourceOp::Update,
        };
        let meta = self.meta(b, op, old.filter(|_| !key_changed));
        self.row(
            b,
            if partial { Op::Update } else { Op::Upsert },
            new,
            "update",
            meta,
            if key_changed {
                Before::Absent
            } else {
                Before::Present
            },
        )
    }

    pub fn delete(&mut self, b: &Arc<Binding>, old: &OldTuple) -> Result<(), PlanError> {
        if b.keyless() {
            if !old.full {
                return Err(no_old_row(b, "delete"));
            }
            // One row equal to the old one goes; an equal row in the same batch would find the
            // same row, so it starts a new batch (`collapse` is off).
            let image = image(b, &old.tuple)?;
            let key = image.1.clone();
            self.push(b, Op::Delete, image, key, None, Before::Unknown);
            return Ok(());
        }
        let key = key_of(b, &old.tuple, "delete")?;
        let meta = self.meta(b, SourceOp::Delete, Some(old));
        if b.partitioned && b.moves_keys() {
            self.release();
            self.held = Some(Held {
                binding: b.clone(),
                at: self.at,
                xid: self.xid,
                key,
                old: old.clone(),
                meta,
                event: self.event.take(),
            });
            return Ok(());
        }
        self.push_delete(b, key, meta);
        Ok(())
    }

    /// Plan the held delete, if any, as the delete it is.
    fn release(&mut self) {
        if let Some(h) = self.held.take() {
            let at = std::mem::replace(&mut self.at, h.at);
            let event = std::mem::replace(&mut self.event, h.event);
            // (Its `push` finds nothing held: taken above.)
            self.push_delete(&h.binding, h.key, h.meta);
            self.at = at;
            self.event = event;
        }
    }

    /// A key change made in place ([`Op::Rekey`], [`Op::Move`]): the old key's row takes the new
    /// key and the sent values, as on the source. Key changes share a statement while their keys
    /// do not meet: a key one of them leaves or takes that another leaves or takes starts a new
    /// batch, since a statement checks the key's unique index row by row, in an order of its own
    /// (`1→2` and `2→3` together would collide at 2), and its delete of a row at a new key would
    /// take a row another moves. Keys equal by `=` though spelled otherwise (`citext`,
    /// `numeric`) are not told apart by their bytes here: such a table's key changes go one
    /// statement each.
    fn rekey(
        &mut self,
        b: &Arc<Binding>,
        old: &OldTuple,
        old_key: Key,
        new: &Tuple,
        op: Op,
    ) -> Result<(), PlanError> {
        let key = key_of(b, new, "update")?;
        let (mut cols, mut vals) = image(b, new)?;
        cols.extend(b.target.key.iter().copied());
        vals.extend(old_key.iter().cloned());
        let meta = self.meta(b, SourceOp::Update, Some(old));
        let shared = !b.target.key.iter().any(|&k| b.target.columns[k].respelled);
        let meets = |p: &Planner, k: &Key| p.keys.contains_key(k) || p.old_keys.contains(k);
        if !shared || meets(self, &key) || meets(self, &old_key) {
            self.flush();
        }
        self.push(b, op, (cols, vals), key, meta, Before::Unknown);
        match (shared, &self.current) {
            // The row is the open batch's last (a full batch was closed).
            (true, Some(_)) => {
                self.old_keys.insert(old_key);
            }
            (true, None) => {}
            (false, _) => self.flush(),
        }
        Ok(())
    }

    /// An update of a table without a key, as one statement of its own: one row equal to the old
    /// row takes the new values. Alone in its batch, so a later change of the same row never
    /// looks for it before this one has changed it.
    fn replace(&mut self, b: &Arc<Binding>, old: &OldTuple, new: &Tuple) -> Result<(), PlanError> {
        let (mut cols, mut vals) = image(b, new)?;
        let (old_cols, old_vals) = image(b, &old.tuple)?;
        // Both whole (an unchanged TOASTed value was taken from the old row above), so the
        // statement splits its columns in half.
        if old_cols != cols {
            return Err(no_old_row(b, "update"));
        }
        cols.extend(old_cols);
        vals.extend(old_vals);
        let key = vals.clone();
        self.flush();
        self.push(b, Op::Replace, (cols, vals), key, None, Before::Unknown);
        self.flush();
        Ok(())
    }

    fn push_delete(&mut self, b: &Arc<Binding>, key: Key, meta: Option<RowMeta>) {
        let image = (b.target.key.clone(), key.clone());
        self.push(b, Op::Delete, image, key, meta, Before::Unknown);
    }

    fn row(
        &mut self,
        b: &Arc<Binding>,
        op: Op,
        tuple: &Tuple,
        what: &'static str,
        meta: Option<RowMeta>,
        before: Before,
    ) -> Result<(), PlanError> {
        let key = key_of(b, tuple, what)?;
        let image = image(b, tuple)?;
        self.push(b, op, image, key, meta, before);
        Ok(())
    }

    /// Add a row: `image` is the target columns written and their values. A held delete goes
    /// first.
    fn push(
        &mut self,
        b: &Arc<Binding>,
        op: Op,
        image: (Vec<usize>, Key),
        key: Key,
        meta: Option<RowMeta>,
        before: Before,
    ) {
        self.release();
        self.add(b, op, image, key, meta, before);
    }

    fn add(
        &mut self,
        b: &Arc<Binding>,
        op: Op,
        (cols, vals): (Vec<usize>, Key),
        key: Key,
        meta: Option<RowMeta>,
        before: Before,
    ) {
        let same_shape = self
            .current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.binding, b) && c.op == op && c.cols == cols);
        // Rows of a table without a key are inserted as they come, equal ones included: their
        // keys are not tracked.
        let tracked = !(b.keyless() && op == Op::Upsert);
        let repeated = if tracked {
            self.keys.get(&key).copied()
        } else {
            None
        };
        if !same_shape || (repeated.is_some() && !b.collapse) {
            self.flush();
        } else if let Some(i) = repeated {
            // Same shape, same key: nothing else touched this key since (another shape would
            // have closed the batch), so the later image supersedes the earlier one.
            let batch = self
                .current
                .as_mut()
                .expect("same shape implies an open batch");
            self.bytes += vals
                .iter()
                .map(|v| v.as_ref().map_or(1, |x| x.len() + 1))
                .sum::<usize>();
            batch.rows[i] = vals;
            batch.joined_by_txn(self.at.0);
            if let Some(evs) = batch.events.get_mut(i) {
                evs.append(&mut self.carried);
                evs.extend(self.event.take());
            }
            if let (Some(m), Some(new)) = (batch.meta.get_mut(i), meta) {
                // The row's first change keeps its kind and old row (what the target should
                // still hold); the position moves to the latest change.
                m.commit_lsn = new.commit_lsn;
                m.commit_ts = new.commit_ts;
            }
            return;
        }
        let size: usize = vals
            .iter()
            .map(|v| v.as_ref().map_or(1, |x| x.len() + 1))
            .sum();
        let batch = self.current.get_or_insert_with(|| Batch {
            fresh: true,
            existing: true,
            txn: Some(self.at.0),
            ..Batch::of(b.clone(), op, cols, Vec::new())
        });
        batch.joined_by_txn(self.at.0);
        // A repeated key (above) keeps what its row's first change found: the key was absent (or
        // present) before the batch.
        batch.fresh &= before == Before::Absent;
        batch.existing &= before == Before::Present;
        batch.rows.push(vals);
        batch.meta.extend(meta);
        if self.carry {
            let mut events = std::mem::take(&mut self.carried);
            events.extend(self.event.take());
            batch.events.push(events);
        }
        self.bytes += size;
        if tracked {
            self.keys.insert(key, batch.rows.len() - 1);
        }
        if batch.rows.len() >= self.max_rows || self.bytes >= self.max_bytes {
            batch.large = batch.txn.is_some();
            self.flush();
        } else if self.singly {
            self.flush();
        }
    }
}

/// The target columns a tuple writes and their values.
fn image(b: &Binding, tuple: &Tuple) -> Result<(Vec<usize>, Key), PlanError> {
    let mut cols = Vec::with_capacity(tuple.len());
    let mut vals = Vec::with_capacity(tuple.len());
    for (i, v) in tuple.iter().enumerate() {
        let Some(t) = b.to_target[i] else { continue };
        match v {
            // Never written: the target keeps the value it has.
            Value::UnchangedToast => continue,
            Value::Null => vals.push(None),
            Value::Text(x) => vals.push(Some(x.clone())),
            Value::Binary(_) => {
                return Err(PlanError::Binary {
                    table: b.target.name.clone(),
                    column: b.target.columns[t].name.clone(),
                })
            }
        }
        cols.push(t);
    }
    Ok((cols, vals))
}

fn no_old_row(b: &Binding, op: &'static str) -> PlanError {
    PlanError::NoOldRow {
        table: b.target.name.clone(),
        quoted: b.target.name.quoted(),
        op,
    }
}

fn key_of(b: &Binding, tuple: &Tuple, op: &'static str) -> Result<Key, PlanError> {
    b.key_source
        .iter()
        .zip(&b.target.key)
        .map(|(&s, &t)| match tuple.get(s) {
            Some(Value::Text(x)) => Ok(Some(x.clone())),
            _ => Err(PlanError::NullKey {
                table: b.target.name.clone(),
                column: b.target.columns[t].name.clone(),
                op,
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::seeded;

    use super::model::{binding, source};

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }
    fn row(id: &str, a: Value) -> Tuple {
        vec![t(id), a, t("ignored")]
    }
    fn b(s: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn binding_maps_by_name_and_skips_generated_columns() {
        let b = binding();
        assert_eq!(b.to_target, vec![Some(2), Some(1), None]);
        assert_eq!(b.key_source, vec![0]);
    }

    #[test]
    fn binding_names_a_missing_column() {
        let e = Binding::new(&source(&["zz"]), binding().target.clone()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("column `zz` of public.t exists on the source side"),
            "{e}"
        );
    }

    #[test]
    fn an_identity_without_the_key_is_refused_and_one_with_it_bound() {
        let mut src = source(&["id", "a", "g"]);
        // `REPLICA IDENTITY USING INDEX` on `a` alone: an old row would have no `id`.
        src.columns[0].key = false;
        src.columns[1].key = true;
        let e = Binding::new(&src, binding().target.clone()).unwrap_err();
        assert_eq!(
            e,
            BindError::IdentityWithoutKey {
                table: TableName::new("public", "t"),
                quoted: "\"public\".\"t\"".into(),
                identity: "a".into(),
                column: "id".into(),
            }
        );
        assert!(e.to_string().contains("REPLICA IDENTITY DEFAULT"), "{e}");
        // Over the key (an index on both), or every column (FULL): the old row has the key.
        src.columns[0].key = true;
        assert!(Binding::new(&src, binding().target.clone()).is_ok());
        // None marked (no identity): only inserts can be sent.
        for c in &mut src.columns {
            c.key = false;
        }
        assert!(Binding::new(&src, binding().target.clone()).is_ok());
    }

    #[test]
    fn a_column_renamed_or_dropped_here_is_bound_by_its_former_name() {
        let mut target = (*binding().target).clone();
        // `a` was `old_a`, `gone` was dropped, and a column named `a` before (since dropped)
        // does not take `a` from the column named so now.
        target.former = vec![
            ("old_a".into(), Some(1)),
            ("gone".into(), None),
            ("a".into(), None),
        ];
        let target = Arc::new(target);
        let b = Binding::new(&source(&["id", "old_a", "gone"]), target.clone()).unwrap();
        assert_eq!(b.to_target, vec![Some(2), Some(1), None]);
        assert_eq!(b.bound, vec![2, 1]);
        let b = Binding::new(&source(&["id", "a"]), target).unwrap();
        assert_eq!(b.to_target, vec![Some(2), Some(1)]);
    }

    #[test]
    fn consecutive_same_shape_rows_merge_and_a_repeated_key_keeps_its_latest_image() {
        let bd = binding();
        let mut p = Planner::new(100, 1 << 20);
        p.insert(&bd, &row("1", t("x"))).unwrap();
        p.insert(&bd, &row("2", t("y"))).unwrap();
        p.update(&bd, None, &row("1", t("z"))).unwrap(); // same key, same shape: replaces
        let old = OldTuple {
            full: false,
            tuple: vec![t("2"), Value::Null, Value::Null],
        };
        p.delete(&bd, &old).unwrap(); // another shape: new batch
        p.insert(&bd, &row("2", t("w"))).unwrap(); // and again
        p.flush();
        let r = p.take_ready();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].op, Op::Upsert);
        assert_eq!(r[0].cols, vec![2, 1]);
        assert_eq!(r[0].rows, vec![vec![b("1"), b("z")], vec![b("2"), b("y")]]);
        assert_eq!(
            (r[1].op, r[1].rows.clone()),
            (Op::Delete, vec![vec![b("2")]])
        );
        assert_eq!(r[2].rows, vec![vec![b("2"), b("w")]]);
    }

    #[test]
    fn singly_each_change_is_a_statement_of_its_own_in_source_order_until_batching_again() {
        // A swap of two rows' unique values through a third: row 1 to -1, row 2 to 1, row 1 to 2.
        let bd = binding();
        let mut p = Planner::new(100, 1 << 20);
        p.set_singly(true);
        for (k, v) in [("1", "-1"), ("2", "1"), ("1", "2")] {
            p.update(&bd, None, &row(k, t(v))).unwrap();
        }
        let r = p.take_ready();
        let rows: Vec<_> = r.iter().map(|b| b.rows.clone()).collect();
        assert_eq!(
            rows,
            [
                vec![vec![b("1"), b("-1")]],
                vec![vec![b("2"), b("1")]],
                vec![vec![b("1"), b("2")]]
            ]
        );
        assert!(r.iter().all(|b| b.existing && !b.large));
        for (k, v) in [("1", "-1"), ("2", "1"), ("1", "2")] {
            // Asked at each source transaction's begin, as the stream does: batching across
            // them is kept (a flush here halved W1's rows/s).
            p.set_singly(false);
            p.update(&bd, None, &row(k, t(v))).unwrap();
        }
        p.flush();
        let r = p.take_ready();
        assert_eq!(r.len(), 1, "batched, the key's latest image");
        assert_eq!(r[0].rows, vec![vec![b("1"), b("2")], vec![b("2"), b("1")]]);
    }

    #[test]
    fn with_an_observing_trigger_a_repeated_key_starts_a_new_batch() {
        let mut bd = (*binding()).clone();
        bd.collapse = false;
        let bd = Arc::new(bd);
        let mut p = Planner::new(100, 1 << 20);
        p.insert(&bd, &row("1", t("x"))).unwrap();
        p.insert(&bd, &row("2", t("y"))).unwrap();
        p.update(&bd, None, &row("1", t("z"))).unwrap();
        p.flush();
        let r = p.take_ready();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].rows, vec![vec![b("1"), b("x")], vec![b("2"), b("y")]]);
        assert_eq!(r[1].rows, vec![vec![b("1"), b("z")]]);
    }

    #[test]
    fn unchanged_toast_is_never_written() {
        let bd = binding();
        let mut p = Planner::new(100, 1 << 20);
        p.update(&bd, None, &row("1", Value::UnchangedToast))
            .unwrap();
        p.flush();
        let r = p.take_ready();
        assert_eq!(
            (r[0].op, r[0].cols.clone(), r[0].rows.clone()),
            (Op::Update, vec![2], vec![vec![b("1")]])
        );
    }

    #[test]
    fn under_conflict_rules_an_unchanged_toast_value_is_taken_from_a_full_old_row() {
        let bd = Arc::new(Binding {
            detect: true,
            ..(*binding()).clone()
        });
        let mut p = Planner::new(100, 1 << 20);
        let full = |id: &str| OldTuple {
            full: true,
            tuple: vec![t(id), t("big"), t("g")],
        };
        // Whole: an upsert of every column, also when the key changes (no rekey needed).
        p.update(&bd, Some(&full("1")), &row("1", Value::UnchangedToast))
            .unwrap();
        p.update(&bd, Some(&full("1")), &row("2", Value::UnchangedToast))
            .unwrap();
        // A key-only old row has no value to take: still an update of the sent columns. So is
        // any such update without conflict rules.
        let key_only = OldTuple {
            full: false,
            tuple: vec![t("3"), Value::Null, Value::Null],
        };
        p.update(&bd, Some(&key_only), &row("3", Value::UnchangedToast))
            .unwrap();
        p.update(
            &binding(),
            Some(&full("4")),
            &row("4", Value::UnchangedToast),
        )
        .unwrap();
        p.flush();
        let r: Vec<_> = p
            .take_ready()
            .into_iter()
            .map(|b| (b.op, b.cols, b.rows))
            .collect();
        assert_eq!(
            r,
            vec![
                (Op::Upsert, vec![2, 1], vec![vec![b("1"), b("big")]]),
                (Op::Delete, vec![2], vec![vec![b("1")]]),
                (Op::Upsert, vec![2, 1], vec![vec![b("2"), b("big")]]),
                (Op::Update, vec![2], vec![vec![b("3")]]),
                (Op::Update, vec![2], vec![vec![b("4")]]),
            ]
        );
    }

    #[test]
    fn key_change_moves_the_row_or_under_conflict_rules_deletes_the_old_key_first() {
        let old = OldTuple {
            full: false,
            tuple: vec![t("1"), Value::Null, Value::Null],
        };
        // In place, as on the source: the new image, then the old key.
        let mut p = Planner::new(100, 1 << 20);
        p.update(&binding(), Some(&old), &row("2", t("x"))).unwrap();
        p.flush();
        let r = p.take_ready();
        assert_eq!(
            r.iter().map(|b| (b.op, b.rows.clone())).collect::<Vec<_>>(),
            [(Op::Move, vec![vec![b("2"), b("x"), b("1")]])]
        );
        // Under conflict rules (a table nothing references), each part is decided as a change.
        let bd = Arc::new(Binding {
            detect: true,
            ..(*binding()).clone()
        });
        let mut p = Planner::new(100, 1 << 20);
        p.update(&bd, Some(&old), &row("2", t("x"))).unwrap();
        p.flush();
        let r = p.take_ready();
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].op, r[0].rows.clone()),
            (Op::Delete, vec![vec![b("1")]])
        );
        assert_eq!(
            (r[1].op, r[1].rows.clone()),
            (Op::Upsert, vec![vec![b("2"), b("x")]])
        );
    }

    #[test]
    fn a_key_change_with_unchanged_toast_moves_the_old_row_in_place() {
        let bd = binding();
        let mut p = Planner::new(100, 1 << 20);
        p.insert(&bd, &row("9", t("x"))).unwrap();
        let old = OldTuple {
            full: false,
            tuple: vec![t("1"), Value::Null, Value::Null],
        };
        p.update(&bd, Some(&old), &row("2", Value::UnchangedToast))
            .unwrap();
        p.insert(&bd, &row("8", t("y"))).unwrap();
        p.flush();
        let r = p.take_ready();
        let ops: Vec<Op> = r.iter().map(|b| b.op).collect();
        // No delete of the old key: its row is the one that moves.
        assert_eq!(ops, vec![Op::Upsert, Op::Rekey, Op::Upsert]);
        let k = bd.target.key[0];
        assert_eq!(r[1].cols, vec![k, k], "the new key, then the old key");
        assert_eq!(r[1].rows, vec![vec![b("2"), b("1")]]);
    }

    #[test]
    fn null_key_is_an_error_naming_the_column() {
        let bd = binding();
        let mut p = Planner::new(100, 1 << 20);
        let e = p
            .insert(&bd, &vec![Value::Null, t("x"), t("g")])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "public.t: key column `id` is NULL or missing in a insert from the source"
        );
    }

    /// Randomized histories (see [`model::check`]): batched equals row by row.
    #[test]
    fn batched_apply_equals_row_by_row_for_random_histories() {
        let mut rnd = seeded(0x5EED);
        let mut existing_batches = 0;
        for round in 0..300 {
            existing_batches +=
                model::check(&mut rnd, 60).unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        assert!(
            existing_batches > 100,
            "{existing_batches} existing-rows batches"
        );
    }

    /// Randomized histories of a table without a key (see [`model::check_keyless`]).
    #[test]
    fn batched_apply_equals_row_by_row_without_a_key() {
        let mut rnd = seeded(0x4E7);
        let mut multi = 0;
        for round in 0..300 {
            multi +=
                model::check_keyless(&mut rnd, 60).unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        assert!(multi > 500, "{multi} batches of more than one row");
    }

    #[test]
    fn without_a_key_equal_rows_insert_together_and_each_update_or_delete_finds_one_row() {
        let bd = model::keyless_binding();
        let full = |a: &str| OldTuple {
            full: true,
            tuple: vec![t(a), Value::Null],
        };
        let mut p = Planner::new(100, 1 << 20);
        p.insert(&bd, &vec![t("x"), Value::Null]).unwrap();
        p.insert(&bd, &vec![t("x"), Value::Null]).unwrap();
        p.delete(&bd, &full("x")).unwrap();
        p.delete(&bd, &full("y")).unwrap();
        p.delete(&bd, &full("x")).unwrap();
        // An update leaving `b` unchanged (TOASTed) takes it from the old row.
        p.update(
            &bd,
            Some(&OldTuple {
                full: true,
                tuple: vec![t("y"), t("big")],
            }),
            &vec![t("z"), Value::UnchangedToast],
        )
        .unwrap();
        p.flush();
        let got: Vec<(Op, Vec<usize>, usize)> = p
            .take_ready()
            .iter()
            .map(|b| (b.op, b.cols.clone(), b.rows.len()))
            .collect();
        // Target columns: b is 0, a is 1. Both inserts in one batch; the second delete of `x`
        // in a batch of its own; the update alone, new values then old.
        assert_eq!(
            got,
            vec![
                (Op::Upsert, vec![1, 0], 2),
                (Op::Delete, vec![1, 0], 2),
                (Op::Delete, vec![1, 0], 1),
                (Op::Replace, vec![1, 0, 1, 0], 1),
            ]
        );
        let e = p.delete(
            &bd,
            &OldTuple {
                full: false,
                tuple: vec![t("x"), Value::Null],
            },
        );
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("public.k has no primary key, so tandem finds its rows by all their values, but the source sent a delete without the old row; run `ALTER TABLE \"public\".\"k\" REPLICA IDENTITY FULL`"),
        );
    }

    #[test]
    fn a_partitioned_tables_delete_and_insert_right_after_it_are_one_key_change() {
        let base = binding();
        // Partitioned on the source, the target, or both.
        let bd = Arc::new(Binding {
            partitioned: true,
            ..(*base).clone()
        });
        let src = source(&["id", "a", "g"]);
        use crate::event::Change;
        let event = |xid: u32, commit: u64, change: Change| crate::event::Event {
            source: crate::side::Side::Desktop,
            commit_lsn: Lsn(commit),
            commit_ts: 0,
            xid,
            ordinal: 0,
            change,
        };
        let old = |id: &str| OldTuple {
            full: false,
            tuple: vec![t(id), Value::Null, Value::Null],
        };
        let mut p = Planner::new(100, 1 << 20);
        p.carry = true;
        let delete = |p: &mut Planner, xid: u32, id: &str| {
            let o = old(id);
            p.set_event(&event(
                xid,
                100 + xid as u64,
                Change::Delete {
                    table: Arc::new(src.clone()),
                    old: o.clone(),
                },
            ));
            p.delete(&bd, &o).unwrap();
        };
        let insert = |p: &mut Planner, xid: u32, id: &str| {
            let new = row(id, t("x"));
            p.set_event(&event(
                xid,
                100 + xid as u64,
                Change::Insert {
                    table: Arc::new(src.clone()),
                    new: new.clone(),
                },
            ));
            p.insert(&bd, &new).unwrap();
        };
        let shapes = |p: &mut Planner| {
            p.flush();
            p.take_ready()
                .iter()
                .map(|b| (b.op, b.rows.len(), b.events.iter().map(Vec::len).collect()))
                .collect::<Vec<(Op, usize, Vec<usize>)>>()
        };
        // Moved to another partition (key 1 to 2): in place, both events with the row.
        delete(&mut p, 1, "1");
        insert(&mut p, 1, "2");
        delete(&mut p, 1, "3");
        insert(&mut p, 1, "4");
        assert_eq!(shapes(&mut p), vec![(Op::Move, 2, vec![2, 2])]);
        // The same key again (a delete and an insert of it), another transaction, a delete
        // last: as they are.
        delete(&mut p, 2, "1");
        insert(&mut p, 2, "1");
        delete(&mut p, 3, "2");
        insert(&mut p, 4, "5");
        delete(&mut p, 5, "6");
        assert_eq!(
            shapes(&mut p),
            vec![
                (Op::Delete, 1, vec![1]),
                (Op::Upsert, 1, vec![1]),
                (Op::Delete, 1, vec![1]),
                (Op::Upsert, 1, vec![1]),
                (Op::Delete, 1, vec![1]),
            ]
        );
        assert!(p.is_empty());
        // Not partitioned: a delete and an insert.
        let mut q = Planner::new(100, 1 << 20);
        q.delete(&base, &old("1")).unwrap();
        q.insert(&base, &row("2", t("x"))).unwrap();
        q.flush();
        let ops: Vec<Op> = q.take_ready().iter().map(|b| b.op).collect();
        assert_eq!(ops, vec![Op::Delete, Op::Upsert]);
    }

    #[test]
    fn key_changes_share_a_statement_until_their_keys_meet() {
        let bd = binding();
        let change = |p: &mut Planner, bd: &Arc<Binding>, from: &str, to: &str| {
            let old = OldTuple {
                full: false,
                tuple: vec![t(from), Value::Null, Value::Null],
            };
            p.update(bd, Some(&old), &row(to, t("v"))).unwrap();
        };
        let sizes = |p: &mut Planner| {
            p.flush();
            p.take_ready()
                .iter()
                .map(|b| (b.op, b.rows.len()))
                .collect::<Vec<_>>()
        };
        let mut p = Planner::new(100, 1 << 20);
        // A renumbering: no key taken that another left.
        for (from, to) in [("1", "11"), ("2", "12"), ("3", "13")] {
            change(&mut p, &bd, from, to);
        }
        assert_eq!(sizes(&mut p), vec![(Op::Move, 3)]);
        // A key the batch's changes left (11) taken, then one they took (23) left: each starts
        // a batch.
        change(&mut p, &bd, "11", "21");
        change(&mut p, &bd, "12", "11");
        change(&mut p, &bd, "13", "23");
        change(&mut p, &bd, "21", "1");
        change(&mut p, &bd, "23", "3");
        assert_eq!(
            sizes(&mut p),
            vec![(Op::Move, 1), (Op::Move, 3), (Op::Move, 1)]
        );
        // Keys equal by `=` though spelled otherwise cannot be told apart by their bytes.
        let mut target = (*bd.target).clone();
        target.columns[target.key[0]].respelled = true;
        let bd = Arc::new(Binding {
            target: Arc::new(target),
            ..(*bd).clone()
        });
        change(&mut p, &bd, "1", "11");
        change(&mut p, &bd, "2", "12");
        assert_eq!(sizes(&mut p), vec![(Op::Move, 1), (Op::Move, 1)]);
    }

    #[test]
    fn a_batch_is_existing_only_when_every_row_updated_a_row_the_source_had() {
        let bd = binding();
        let kinds = |p: &mut Planner| {
            p.flush();
            p.take_ready()
                .iter()
                .map(|b| (b.op, b.fresh, b.existing))
                .collect::<Vec<_>>()
        };
        let mut p = Planner::new(100, 1 << 20);
        p.update(&bd, None, &row("1", t("a"))).unwrap();
        p.update(&bd, None, &row("2", t("b"))).unwrap();
        p.update(&bd, None, &row("1", t("c"))).unwrap();
        assert_eq!(kinds(&mut p), vec![(Op::Upsert, false, true)]);
        // Inserted, then updated in the same batch: the row was not there before it.
        p.insert(&bd, &row("3", t("a"))).unwrap();
        p.update(&bd, None, &row("3", t("b"))).unwrap();
        assert_eq!(kinds(&mut p), vec![(Op::Upsert, true, false)]);
        // Mixed: neither.
        p.update(&bd, None, &row("1", t("d"))).unwrap();
        p.insert(&bd, &row("4", t("a"))).unwrap();
        assert_eq!(kinds(&mut p), vec![(Op::Upsert, false, false)]);
        // A key change moves the row in place: neither.
        let old = OldTuple {
            full: false,
            tuple: vec![t("1"), Value::Null, Value::Null],
        };
        p.update(&bd, Some(&old), &row("5", t("e"))).unwrap();
        assert_eq!(kinds(&mut p), vec![(Op::Move, false, false)]);
        // Under conflict rules it lands as a new row.
        let bd = Arc::new(Binding {
            detect: true,
            ..(*binding()).clone()
        });
        p.update(&bd, Some(&old), &row("5", t("e"))).unwrap();
        assert_eq!(
            kinds(&mut p),
            vec![(Op::Delete, false, false), (Op::Upsert, true, false)]
        );
    }

    #[test]
    fn only_a_batch_cut_from_one_large_transaction_is_large() {
        let bd = binding();
        let mut p = Planner::new(3, 1 << 20);
        p.set_position(Lsn(100), 0);
        for i in 0..4 {
            p.insert(&bd, &row(&i.to_string(), t("x"))).unwrap();
        }
        // Three rows of one transaction filled a batch; the fourth waits in the open one.
        p.set_position(Lsn(200), 0);
        p.insert(&bd, &row("9", t("y"))).unwrap(); // another transaction joins it
        p.insert(&bd, &row("8", t("y"))).unwrap(); // full, but mixed
        p.set_position(Lsn(300), 0);
        p.insert(&bd, &row("7", t("z"))).unwrap(); // small transaction, closed by a flush
        p.flush();
        let r = p.take_ready();
        assert_eq!(
            r.iter()
                .map(|b| (b.rows.len(), b.large))
                .collect::<Vec<_>>(),
            vec![(3, true), (3, false), (1, false)]
        );
        assert!(r.iter().all(|b| b.fresh));
    }

    #[test]
    fn batches_are_bounded_by_rows_and_bytes() {
        let bd = binding();
        let mut p = Planner::new(3, 1 << 20);
        for i in 0..7 {
            p.insert(&bd, &row(&i.to_string(), t("x"))).unwrap();
        }
        assert_eq!(
            p.take_ready()
                .iter()
                .map(|b| b.rows.len())
                .collect::<Vec<_>>(),
            vec![3, 3]
        );
        let mut p = Planner::new(1000, 100);
        let big = "y".repeat(60);
        for i in 0..4 {
            p.insert(&bd, &row(&i.to_string(), t(&big))).unwrap();
        }
        assert_eq!(
            p.take_ready()
                .iter()
                .map(|b| b.rows.len())
                .collect::<Vec<_>>(),
            vec![2, 2]
        );
    }
}
