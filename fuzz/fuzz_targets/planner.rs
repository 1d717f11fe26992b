//! The planner against the plainest apply (`tandem::apply::plan::model`): batched must equal row
//! by row for any history, here one the fuzzer's bytes choose (one byte per choice). The first
//! byte picks the table: with a key, or without one (rows found by their values).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::apply::plan::model;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.iter().copied();
    // About four choices per step: an input runs as many steps as it has bytes for.
    let steps = rest.len() / 4;
    let choose = |n: u64| bytes.next().map_or(0, |b| u64::from(b) % n);
    let checked = match first % 2 {
        0 => model::check(choose, steps),
        _ => model::check_keyless(choose, steps),
    };
    if let Err(e) = checked {
        panic!("{e}");
    }
});
