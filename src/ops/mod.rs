//! Operator commands around the replication core.

pub mod demo;
pub mod repair;
pub mod setup;
pub mod teardown;
pub mod verify;
