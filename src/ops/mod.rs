//! Operator commands around the replication core.

pub mod bench;
pub mod ddl;
pub mod demo;
pub mod repair;
pub mod replay;
pub mod resolve;
pub mod rewrite;
pub mod setup;
pub mod skip;
pub mod snapshot;
pub mod status;
pub mod teardown;
pub mod verify;
