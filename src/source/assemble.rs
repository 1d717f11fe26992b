//! Turns decoded pgoutput messages into transaction boundaries and tagged [`Event`]s.
//!
//! Pure and streaming: it holds the relation map and the current transaction header, never the
//! transaction's changes, so memory does not grow with transaction size.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::TableName;
use crate::event::{Change, Event, SourceTable};
use crate::lsn::Lsn;
use crate::side::Side;
use crate::source::pgoutput::{Begin, LogicalMessage, Message};

/// Prefix of the transactional logical message tandem writes first in every transaction it
/// applies; a transaction that carries it came from tandem and must not travel back.
pub const MARKER_PREFIX: &str = "tandem";

/// Is `m` tandem's marker ([`MARKER_PREFIX`], transactional)?
pub fn is_marker(m: &LogicalMessage) -> bool {
    m.transactional && m.prefix == MARKER_PREFIX
}
/// Prefix of the transactional logical message `tandem ddl` writes with a schema change (content:
/// the id of its row in that side's `tandem.ddl`), to be run on the other side at that point.
pub const DDL_PREFIX: &str = "tandem-ddl";
/// Replication origins tandem applies under are named `tandem_from_D_<slot>` / `tandem_from_M_<slot>`.
pub const ORIGIN_PREFIX: &str = "tandem_";

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Begin {
        commit_lsn: Lsn,
        xid: u32,
        /// Commit time, microseconds since 2000-01-01 (PostgreSQL's epoch).
        commit_ts: i64,
    },
    Change(Event),
    /// A `tandem ddl` message ([`Change::Ddl`], its statement not read yet): a schema change to
    /// run on the other side before the changes after it. Only a claim until its row in the
    /// source's `tandem.ddl` is found, written by this very transaction.
    Ddl(Event),
    /// A change of a transaction tandem itself wrote: never applied back, only reported (Kafka).
    Echo(Event),
    /// End of a transaction. `echo` when tandem itself wrote it (its changes were withheld).
    /// `changes`: how many it had, ordinals `0..changes`.
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        echo: bool,
        changes: u32,
        xid: u32,
        commit_ts: i64,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssembleError {
    #[error("{side}: pgoutput sent {what} outside a transaction")]
    OutsideTransaction { side: Side, what: &'static str },
    #[error("{side}: a streamed-transaction message reached the assembler unspooled")]
    Streamed { side: Side },
    #[error("{side}: pgoutput sent Begin while transaction {xid} was still open")]
    NestedBegin { side: Side, xid: u32 },
    #[error("{side}: change for relation {rel} before its Relation message")]
    UnknownRelation { side: Side, rel: u32 },
    #[error("{side}: row for {table} has {got} columns, its Relation message said {want}")]
    ColumnCount {
        side: Side,
        table: TableName,
        got: usize,
        want: usize,
    },
}

/// The configured name of each streamed table, by its OID on the source.
pub type Names = Arc<HashMap<u32, TableName>>;

pub struct Assembler {
    side: Side,
    relations: HashMap<u32, Arc<SourceTable>>,
    txn: Option<Txn>,
    names: Names,
}

struct Txn {
    begin: Begin,
    echo: bool,
    ordinal: u32,
}

impl Assembler {
    pub fn new(side: Side) -> Self {
        Assembler {
            side,
            relations: HashMap::new(),
            txn: None,
            names: Names::default(),
        }
    }

    /// Tables go by the names in `names` rather than the ones in the stream. Decoding reads the
    /// catalog as it was at each change, so a table renamed on the source arrives under its new
    /// name from the rename on (and, after a restart, under its old one until it): under either
    /// it is the table tandem was set up to stream, and its changes go to the target table of
    /// that name instead of being left out as an unlisted table's.
    pub fn with_names(mut self, names: Names) -> Self {
        self.names = names;
        self
    }

    /// [`Assembler::with_names`] from here on (relations sent after this).
    pub fn set_names(&mut self, names: Names) {
        self.names = names;
    }

    /// The relations `other` learned (a streamed transaction's, assembled apart) become known
    /// here: once a streamed transaction commits, pgoutput counts its Relation messages as sent
    /// for every later transaction.
    pub fn learn_relations(&mut self, other: Assembler) {
        self.relations.extend(other.relations);
    }

    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    fn table(&self, rel: u32) -> Result<Arc<SourceTable>, AssembleError> {
        self.relations
            .get(&rel)
            .cloned()
            .ok_or(AssembleError::UnknownRelation {
                side: self.side,
                rel,
            })
    }

    fn check_width(&self, t: &SourceTable, n: usize) -> Result<(), AssembleError> {
        if n != t.columns.len() {
            return Err(AssembleError::ColumnCount {
                side: self.side,
                table: t.name.clone(),
                got: n,
                want: t.columns.len(),
            });
        }
        Ok(())
    }

    /// Feed one message; returns what it means for the apply side, if anything.
    pub fn push(&mut self, msg: Message) -> Result<Option<Item>, AssembleError> {
        let side = self.side;
        let change = match msg {
            Message::Begin(b) => {
                if let Some(t) = &self.txn {
                    return Err(AssembleError::NestedBegin {
                        side,
                        xid: t.begin.xid,
                    });
                }
                self.txn = Some(Txn {
                    begin: b,
                    echo: false,
                    ordinal: 0,
                });
                return Ok(Some(Item::Begin {
                    commit_lsn: b.final_lsn,
                    xid: b.xid,
                    commit_ts: b.commit_ts,
                }));
            }
            Message::Commit(c) => {
                let t = self.txn.take().ok_or(AssembleError::OutsideTransaction {
                    side,
                    what: "Commit",
                })?;
                return Ok(Some(Item::Commit {
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    echo: t.echo,
                    changes: t.ordinal,
                    xid: t.begin.xid,
                    commit_ts: t.begin.commit_ts,
                }));
            }
            Message::Origin { name, .. } => {
                if name.starts_with(ORIGIN_PREFIX) {
                    if let Some(t) = self.txn.as_mut() {
                        t.echo = true;
                    }
                }
                return Ok(None);
            }
            Message::Message(m) => {
                let Some(t) = self.txn.as_mut().filter(|_| m.transactional) else {
                    return Ok(None);
                };
                if is_marker(&m) {
                    t.echo = true;
                    return Ok(None);
                }
                // The row's id; anything else is no message of `tandem ddl`'s.
                let id = std::str::from_utf8(&m.content)
                    .ok()
                    .and_then(|c| c.parse().ok());
                match id {
                    Some(id) if m.prefix == DDL_PREFIX && !t.echo => Change::Ddl {
                        id,
                        sql: String::new(),
                        search_path: String::new(),
                    },
                    _ => return Ok(None),
                }
            }
            Message::Relation(r) => {
                let sent = TableName::new(r.namespace, r.name);
                let name = match self.names.get(&r.id) {
                    Some(known) if *known != sent => {
                        tracing::warn!(
                            %side,
                            "{side} calls {known} (relation {}) {sent} in this part of its \
                             history: it was renamed. Its changes go on to {known} on the other \
                             side. Rename it there too and write the name {side} has now in \
                             [replication] tables, then run `tandem setup` and restart",
                            r.id
                        );
                        known.clone()
                    }
                    _ => sent,
                };
                let t = SourceTable {
                    oid: r.id,
                    name,
                    columns: r.columns,
                };
                self.relations.insert(r.id, Arc::new(t));
                return Ok(None);
            }
            Message::Type { .. } => return Ok(None),
            // `SourceStream` turns streamed transactions into whole ones before they get here.
            Message::StreamStart { .. }
            | Message::StreamStop
            | Message::StreamCommit { .. }
            | Message::StreamAbort { .. } => return Err(AssembleError::Streamed { side }),
            Message::Insert { rel, new } => {
                let table = self.table(rel)?;
                self.check_width(&table, new.len())?;
                Change::Insert { table, new }
            }
            Message::Update { rel, old, new } => {
                let table = self.table(rel)?;
                self.check_width(&table, new.len())?;
                if let Some(o) = &old {
                    self.check_width(&table, o.tuple.len())?;
                }
                Change::Update { table, old, new }
            }
            Message::Delete { rel, old } => {
                let table = self.table(rel)?;
                self.check_width(&table, old.tuple.len())?;
                Change::Delete { table, old }
            }
            Message::Truncate(t) => Change::Truncate {
                tables: t
                    .rels
                    .iter()
                    .map(|r| self.table(*r))
                    .collect::<Result<_, _>>()?,
                cascade: t.cascade,
                restart_identity: t.restart_identity,
            },
        };
        let txn = self.txn.as_mut().ok_or(AssembleError::OutsideTransaction {
            side,
            what: "a row change",
        })?;
        let ev = Event {
            source: side,
            commit_lsn: txn.begin.final_lsn,
            commit_ts: txn.begin.commit_ts,
            xid: txn.begin.xid,
            ordinal: txn.ordinal,
            change,
        };
        txn.ordinal += 1;
        Ok(Some(if matches!(ev.change, Change::Ddl { .. }) {
            Item::Ddl(ev)
        } else if txn.echo {
            Item::Echo(ev)
        } else {
            Item::Change(ev)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::{Commit, LogicalMessage, RelColumn, Relation, Value};
    use bytes::Bytes;

    fn rel() -> Message {
        Message::Relation(Relation {
            id: 7,
            namespace: "public".into(),
            name: "jobs".into(),
            replica_identity: b'd',
            columns: vec![RelColumn {
                key: true,
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
            }],
        })
    }
    fn begin(lsn: u64) -> Message {
        Message::Begin(Begin {
            final_lsn: Lsn(lsn),
            commit_ts: 1,
            xid: 9,
        })
    }
    fn commit(lsn: u64) -> Message {
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 8),
            commit_ts: 1,
        })
    }
    fn insert(v: &'static str) -> Message {
        Message::Insert {
            rel: 7,
            new: vec![Value::Text(Bytes::from_static(v.as_bytes()))],
        }
    }

    #[test]
    fn a_table_renamed_on_the_source_keeps_its_configured_name() {
        // The table an insert lands in, after a Relation message naming it `jobs_renamed`.
        let lands_in = |mut a: Assembler| {
            let Message::Relation(mut r) = rel() else {
                unreachable!()
            };
            r.name = "jobs_renamed".into();
            assert!(a.push(Message::Relation(r)).unwrap().is_none());
            a.push(begin(100)).unwrap();
            match a.push(insert("1")).unwrap() {
                Some(Item::Change(Event {
                    change: Change::Insert { table, .. },
                    ..
                })) => table.name.clone(),
                other => panic!("an insert, not {other:?}"),
            }
        };
        let names: Names = Arc::new(HashMap::from([(7, TableName::new("public", "jobs"))]));
        assert_eq!(
            lands_in(Assembler::new(Side::Desktop).with_names(names)),
            TableName::new("public", "jobs")
        );
        // A relation tandem has no name for keeps the stream's.
        assert_eq!(
            lands_in(Assembler::new(Side::Desktop)),
            TableName::new("public", "jobs_renamed")
        );
    }

    #[test]
    fn changes_are_tagged_with_side_lsn_xid_and_ordinal() {
        let mut a = Assembler::new(Side::Mobile);
        assert_eq!(a.push(rel()).unwrap(), None);
        assert!(matches!(
            a.push(begin(100)).unwrap(),
            Some(Item::Begin { .. })
        ));
        for i in 0..3 {
            match a.push(insert("1")).unwrap() {
                Some(Item::Change(e)) => {
                    assert_eq!(
                        (e.source, e.commit_lsn, e.xid, e.ordinal),
                        (Side::Mobile, Lsn(100), 9, i)
                    );
                    assert_eq!(e.change.op(), "insert");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            a.push(commit(100)).unwrap(),
            Some(Item::Commit {
                commit_lsn: Lsn(100),
                end_lsn: Lsn(108),
                echo: false,
                changes: 3,
                xid: 9,
                commit_ts: 1,
            })
        );
        assert!(!a.in_transaction());
    }

    #[test]
    fn a_marked_transaction_yields_echo_items_and_is_flagged_echo() {
        for marker in [
            Message::Message(LogicalMessage {
                transactional: true,
                lsn: Lsn(1),
                prefix: MARKER_PREFIX.into(),
                content: Bytes::from_static(b"D 0/1"),
            }),
            Message::Origin {
                commit_lsn: Lsn(1),
                name: "tandem_from_D".into(),
            },
        ] {
            let mut a = Assembler::new(Side::Mobile);
            a.push(rel()).unwrap();
            a.push(begin(100)).unwrap();
            a.push(marker).unwrap();
            assert!(matches!(
                a.push(insert("1")).unwrap(),
                Some(Item::Echo(Event { ordinal: 0, .. }))
            ));
            assert!(matches!(
                a.push(commit(100)).unwrap(),
                Some(Item::Commit {
                    echo: true,
                    changes: 1,
                    ..
                })
            ));
            // The next transaction is not echo.
            a.push(begin(200)).unwrap();
            assert!(matches!(
                a.push(insert("2")).unwrap(),
                Some(Item::Change(_))
            ));
        }
    }

    #[test]
    fn other_messages_and_origins_do_not_mark_echo() {
        let mut a = Assembler::new(Side::Desktop);
        a.push(rel()).unwrap();
        a.push(begin(1)).unwrap();
        a.push(Message::Origin {
            commit_lsn: Lsn(1),
            name: "pg_16400".into(),
        })
        .unwrap();
        a.push(Message::Message(LogicalMessage {
            transactional: true,
            lsn: Lsn(1),
            prefix: "app".into(),
            content: Bytes::new(),
        }))
        .unwrap();
        assert!(matches!(
            a.push(insert("1")).unwrap(),
            Some(Item::Change(_))
        ));
    }

    #[test]
    fn a_ddl_message_is_an_item_in_its_transaction_unless_tandem_wrote_it() {
        let ddl = |transactional| {
            Message::Message(LogicalMessage {
                transactional,
                lsn: Lsn(1),
                prefix: DDL_PREFIX.into(),
                content: Bytes::from_static(b"42"),
            })
        };
        let mut a = Assembler::new(Side::Desktop);
        a.push(rel()).unwrap();
        assert_eq!(a.push(ddl(false)).unwrap(), None);
        a.push(begin(100)).unwrap();
        assert_eq!(a.push(ddl(false)).unwrap(), None, "not transactional");
        assert_eq!(
            a.push(ddl(true)).unwrap(),
            Some(Item::Ddl(Event {
                source: Side::Desktop,
                commit_lsn: Lsn(100),
                commit_ts: 1,
                xid: 9,
                ordinal: 0,
                change: Change::Ddl {
                    id: 42,
                    sql: String::new(),
                    search_path: String::new()
                }
            }))
        );
        a.push(commit(100)).unwrap();
        // In a transaction tandem wrote (its marker first), it is not taken.
        a.push(begin(200)).unwrap();
        a.push(Message::Message(LogicalMessage {
            transactional: true,
            lsn: Lsn(1),
            prefix: MARKER_PREFIX.into(),
            content: Bytes::new(),
        }))
        .unwrap();
        assert_eq!(a.push(ddl(true)).unwrap(), None);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut a = Assembler::new(Side::Desktop);
        assert_eq!(
            a.push(insert("1")).unwrap_err(),
            AssembleError::UnknownRelation {
                side: Side::Desktop,
                rel: 7
            }
        );
        a.push(rel()).unwrap();
        assert!(matches!(
            a.push(insert("1")),
            Err(AssembleError::OutsideTransaction { .. })
        ));
        a.push(begin(1)).unwrap();
        assert!(matches!(
            a.push(begin(2)),
            Err(AssembleError::NestedBegin { .. })
        ));
        let wide = Message::Insert {
            rel: 7,
            new: vec![Value::Null, Value::Null],
        };
        assert!(matches!(
            a.push(wide),
            Err(AssembleError::ColumnCount {
                got: 2,
                want: 1,
                ..
            })
        ));
    }
}
