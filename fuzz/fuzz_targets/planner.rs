//! Batched apply equals row by row (see `tandem::fuzz::planner`). The body lives in the
//! library so that the stable tests replay `fuzz/seeds/planner.hex` through it too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem::fuzz::planner(data));
