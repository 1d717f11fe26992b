//! Sinks beside the data flow: where decoded changes go besides the other database.

pub mod kafka;
pub mod spool;
