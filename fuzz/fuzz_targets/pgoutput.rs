//! Wire bytes must never panic the process (see `tandem::fuzz::pgoutput`). The body lives in the
//! library so that the stable tests replay `fuzz/seeds/pgoutput.hex` through it too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem::fuzz::pgoutput(data));
