//! The `Event` every stage speaks: one row change from one source transaction.

use std::sync::Arc;

use crate::config::TableName;
use crate::lsn::Lsn;
use crate::side::Side;
use crate::source::pgoutput::{OldTuple, RelColumn, Tuple};

/// A source relation as the source described it (pgoutput `Relation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    pub oid: u32,
    pub name: TableName,
    pub columns: Vec<RelColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Insert {
        table: Arc<SourceTable>,
        new: Tuple,
    },
    Update {
        table: Arc<SourceTable>,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        table: Arc<SourceTable>,
        old: OldTuple,
    },
    Truncate {
        tables: Vec<Arc<SourceTable>>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A schema change `tandem ddl` made (its row in the source's `tandem.ddl`): run by `run` on
    /// the other side with the `search_path` it was made with, and published to Kafka like a
    /// change (op `ddl`). `sql` and `search_path` are empty until that row is read.
    Ddl {
        id: i64,
        sql: String,
        search_path: String,
    },
}

impl Change {
    pub fn op(&self) -> &'static str {
        match self {
            Change::Insert { .. } => "insert",
            Change::Update { .. } => "update",
            Change::Delete { .. } => "delete",
            Change::Truncate { .. } => "truncate",
            Change::Ddl { .. } => "ddl",
        }
    }
}

/// One change, tagged with where and when it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub source: Side,
    /// LSN of the source transaction's commit record.
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC (PostgreSQL's epoch).
    pub commit_ts: i64,
    pub xid: u32,
    /// Position of the change within its transaction, from 0.
    pub ordinal: u32,
    pub change: Change,
}

/// PostgreSQL's epoch, 2000-01-01, in microseconds after the Unix one: commit times on the wire
/// count from it.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Now, in PostgreSQL's microseconds (this machine's clock).
pub fn pg_now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
        - PG_EPOCH_UNIX_MICROS
}
