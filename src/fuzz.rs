//! The fuzz targets' bodies (`fuzz/fuzz_targets/*` call these), so that the stable test suite
//! can run them too: each target's minimized corpus is kept in `fuzz/seeds/<target>.hex` (one
//! input per line, hex; `scripts/fuzz-seeds` refreshes it) and replayed, with seeded mutations of
//! every input, by this module's tests. CI has no nightly toolchain for coverage-guided fuzzing;
//! this keeps what the fuzzers found from regressing there. Each body panics on a finding.

use bytes::Bytes;

use crate::apply::conflict::model::{exchange, legal, reuses, History, CONVERGING};
use crate::apply::conflict::{Rule, SourceOp};
use crate::apply::plan::model;
use crate::lsn::Lsn;
use crate::side::Side;
use crate::source::assemble::Assembler;
use crate::source::pgoutput::{decode, decode_in, encode};
use crate::source::streamed::{Streamed, Taken};

/// Wire bytes must never panic the process: arbitrary byte strings, split into messages at 0xFF,
/// go through the pgoutput decoder (inside and outside stream blocks), the streamed-transaction
/// spool and the assembler; what decodes re-encodes to the same message.
pub fn pgoutput(data: &[u8]) {
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
}

/// The planner against the plainest apply ([`model`]): batched must equal row by row for the
/// history the bytes choose (one byte per choice). The first byte picks the table: with a key,
/// or without one (rows found by their values).
pub fn planner(data: &[u8]) {
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
}

/// The converging conflict policies on histories longer than the unit test's
/// ([`crate::apply::conflict::model`]): the bytes choose the start, the policy and up to 8
/// changes per side; unless a side used the key twice, both sides must end with the row the
/// policy names.
pub fn conflicts(data: &[u8]) {
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
}

/// A seeded xorshift for randomized tests: `rnd(n)` is a number below `n` (`n` > 0).
#[cfg(test)]
pub(crate) fn seeded(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fuzz/seeds/<target>.hex`: one input per line.
    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let path = format!("{}/fuzz/seeds/{target}.hex", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.lines()
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(i, l)| {
                (0..l.len())
                    .step_by(2)
                    .map(|j| u8::from_str_radix(&l[j..j + 2], 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .unwrap_or_else(|e| panic!("{path}:{}: {e}", i + 1))
            })
            .collect()
    }

    /// Every seed as kept, then `rounds` seeded mutations of it (bytes changed, cut off, put in
    /// or taken out, as libFuzzer's simplest mutators do). A finding names the seed's line and
    /// the mutated input in hex, to keep as a new seed once fixed.
    fn replay(target: &str, body: fn(&[u8]), rounds: usize) -> usize {
        let seeds = seeds(target);
        let mut rnd = seeded(0x7A4D_E11A_5EED_0001);
        for (line, seed) in seeds.iter().enumerate() {
            for round in 0..=rounds {
                // The seed itself, then each round one to four mutations of it.
                let mut input = seed.clone();
                let mutations = if round == 0 { 0 } else { 1 + rnd(4) };
                for _ in 0..mutations {
                    mutate(&mut input, &mut rnd);
                }
                let run = std::panic::catch_unwind(|| body(&input));
                if run.is_err() {
                    let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
                    panic!(
                        "fuzz/seeds/{target}.hex line {}, mutation {round}: {hex}",
                        line + 1
                    );
                }
            }
        }
        seeds.len()
    }

    fn mutate(input: &mut Vec<u8>, rnd: &mut impl FnMut(u64) -> u64) {
        let at = rnd(input.len() as u64 + 1) as usize;
        match rnd(8) {
            0..=2 if at < input.len() => input[at] ^= 1 << rnd(8),
            3 if at < input.len() => input.truncate(at),
            4 | 5 if at < input.len() => {
                input.remove(at);
            }
            _ => input.insert(at, rnd(256) as u8),
        }
    }

    #[test]
    fn pgoutput_seeds_and_their_mutations() {
        assert!(replay("pgoutput", pgoutput, 100) > 100);
    }

    #[test]
    fn planner_seeds_and_their_mutations() {
        assert!(replay("planner", planner, 100) > 100);
    }

    #[test]
    fn conflicts_seeds_and_their_mutations() {
        assert!(replay("conflicts", conflicts, 1000) > 50);
    }
}
