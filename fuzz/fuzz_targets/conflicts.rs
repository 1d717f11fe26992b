//! The converging conflict policies converge (see `tandem::fuzz::conflicts`). The body lives in the
//! library so that the stable tests replay `fuzz/seeds/conflicts.hex` through it too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem::fuzz::conflicts(data));
