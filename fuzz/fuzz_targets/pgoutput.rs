//! Wire bytes must never panic the process: feed arbitrary byte strings, split into messages,
//! through the pgoutput decoder (inside and outside stream blocks), the streamed-transaction
//! spool, and the assembler.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tandem::lsn::Lsn;
use tandem::side::Side;
use tandem::source::assemble::Assembler;
use tandem::source::pgoutput::{decode, decode_in, encode};
use tandem::source::streamed::{Streamed, Taken};

fuzz_target!(|data: &[u8]| {
    let mut asm = Assembler::new(Side::Desktop);
    // Live on: the first streamed transaction's messages come back out instead of spooled.
    let mut streamed = Streamed::new(true, Default::default());
    // Messages separated by 0xFF, so one input exercises a stream (relations, then rows).
    for part in data.split(|&b| b == 0xFF).filter(|p| !p.is_empty()) {
        let bytes = Bytes::copy_from_slice(part);
        if let Ok((xid, msg)) = decode_in(&bytes, true) {
            let again = match xid {
                Some(x) => encode::streamed(x, &msg),
                None => encode::message(&msg),
            };
            assert_eq!(decode_in(&again, true).as_ref(), Ok(&(xid, msg)));
        }
        // As the source stream does: spool inside a block, otherwise decode and hand on.
        if streamed.inside_block() {
            let _ = streamed.in_block(&bytes);
            continue;
        }
        if let Ok(msg) = decode(&bytes) {
            // Re-encoding what decoded gives the same message back (unknown flag bits aside).
            assert_eq!(decode(&encode::message(&msg)).as_ref(), Ok(&msg));
            if let Ok(Taken::Pass(m)) = streamed.take_at(msg, Lsn(u64::MAX)) {
                let _ = asm.push(m);
            }
            while let Ok(Some(m)) = streamed.next_replayed() {
                let _ = asm.push(m);
            }
        }
    }
});
