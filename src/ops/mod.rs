//! Operator commands around the replication core.

pub mod demo;
pub mod setup;
pub mod teardown;
