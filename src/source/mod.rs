//! The source half: a side's slot and publication, its replication stream, and the decoding of
//! that stream into tagged events.

pub mod assemble;
pub mod pgoutput;
pub mod stream;
pub mod streamed;
pub mod walsender;
