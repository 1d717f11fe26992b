//! The planner against the plainest apply (`tandem::apply::plan::model`): batched must equal row
//! by row for any history, here one the fuzzer's bytes choose (one byte per choice).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::apply::plan::model;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.iter().copied();
    // About four choices per step: an input runs as many steps as it has bytes for.
    let steps = data.len() / 4;
    let choose = |n: u64| bytes.next().map_or(0, |b| u64::from(b) % n);
    if let Err(e) = model::check(choose, steps) {
        panic!("{e}");
    }
});
