//! Wire bytes must never panic the process: feed arbitrary byte strings, split into messages,
//! through the pgoutput decoder and the assembler.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tandem::side::Side;
use tandem::source::assemble::Assembler;
use tandem::source::pgoutput::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let mut asm = Assembler::new(Side::Desktop);
    // Messages separated by 0xFF, so one input exercises a stream (relations, then rows).
    for part in data.split(|&b| b == 0xFF).filter(|p| !p.is_empty()) {
        let bytes = Bytes::copy_from_slice(part);
        if let Ok(msg) = decode(&bytes) {
            // Re-encoding what decoded gives the same message back (unknown flag bits aside).
            assert_eq!(decode(&encode::message(&msg)).as_ref(), Ok(&msg));
            let _ = asm.push(msg);
        }
    }
});
