//! tandem keeps two PostgreSQL databases in sync, both ways, through logical replication.
//!
//! The data flow, in module order: [`source`] (slot → pgoutput stream → decoded messages) →
//! [`event`] (tagged changes) → [`apply`] (planned statements on the other side, with the
//! [`apply::checkpoint`] in the same transaction) → the source slot is confirmed. [`sync`] runs
//! that loop for both directions; [`ops`] holds the operator commands around it.

pub mod apply;
pub mod catalog;
pub mod config;
pub mod db;
pub mod event;
#[doc(hidden)]
pub mod fuzz;
pub mod lease;
pub mod localpg;
pub mod lsn;
pub mod metrics;
pub mod ops;
pub mod pgpass;
pub mod sched;
pub mod side;
pub mod sink;
pub mod source;
pub mod sync;
pub mod tls;
