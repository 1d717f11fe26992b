//! The converging conflict policies on histories longer than the unit test's (`tandem::apply::
//! conflict::model`): the fuzzer's bytes choose the start, the policy and up to 8 changes per
//! side; unless a side used the key twice, both sides must end with the row the policy names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::apply::conflict::model::{exchange, legal, reuses, History, CONVERGING};
use tandem::apply::conflict::{Rule, SourceOp};
use tandem::side::Side;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.iter().copied();
    let mut choose = |n: u8| bytes.next().map_or(0, |b| b % n);
    let start = (choose(2) == 1).then_some((0, 0));
    let (policy, full) = CONVERGING[usize::from(choose(4))];
    let priority = if choose(2) == 0 {
        Side::Desktop
    } else {
        Side::Mobile
    };
    let history = |choose: &mut dyn FnMut(u8) -> u8| {
        let mut h: History = vec![];
        let (mut present, mut version) = (start.is_some(), 0u8);
        for _ in 0..choose(9) {
            let op = [SourceOp::Insert, SourceOp::Update, SourceOp::Delete][usize::from(choose(3))];
            if !legal(present, op) {
                continue;
            }
            // Versions increase on each side; the two sides' interleave (and tie) as chosen.
            version = version.saturating_add(1 + choose(3));
            h.push((op, version));
            present = op != SourceOp::Delete;
        }
        h
    };
    let hd = history(&mut choose);
    let hm = history(&mut choose);
    if reuses(&hd) || reuses(&hm) {
        return;
    }
    if let Err(e) = exchange(start, &hd, &hm, Rule { policy, priority }, full) {
        panic!("{e}");
    }
});
