//! What an initial snapshot already copied. The copy reads the seed at some snapshot S while the
//! seed→target direction stands at its checkpoint C; streaming then resumes at C. Transactions S
//! saw committed are in the copied rows already: applying them again is idempotent for the rows,
//! but not for what watches them (a trigger on the target fires twice), and a row the target's
//! application changed after the copy committed would be set back to an older value of the
//! seed's, which then never comes back (the target's change does go to the seed: the sides
//! differ). So a change of a copied table whose transaction S saw is left out, as native logical
//! replication's table sync leaves out what its slot snapshot held.
//!
//! S is `txid_current_snapshot()` of the copy's REPEATABLE READ transaction and `lsn` the seed's
//! WAL insert position read right after it was taken: every transaction S saw committed before
//! `lsn`, so a commit at or past it is never in the copy.

use std::collections::HashMap;

use anyhow::{anyhow, Context, Result};

use crate::lsn::Lsn;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    xmin: u64,
    xmax: u64,
    /// In progress when S was taken (full 64-bit ids).
    xip: Vec<u64>,
    lsn: Lsn,
}

/// Per copied table (its name as `tandem.snapshots` has it), for one direction: the copy of it
/// from this direction's source, and the merge that read it on this direction's source when it
/// was the target of a copy the other way (changes either holds are left out).
pub type CopiedTables = HashMap<String, Vec<Copied>>;

impl Copied {
    /// `snapshot` as `txid_current_snapshot()::text` prints it: `xmin:xmax:xip,xip,…`.
    pub fn parse(snapshot: &str, lsn: Lsn) -> Result<Copied> {
        let bad = || anyhow!("snapshot {snapshot:?} is not xmin:xmax:xip-list");
        let mut parts = snapshot.split(':');
        let (Some(xmin), Some(xmax), Some(xip), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let id = |s: &str| s.parse::<u64>().with_context(bad);
        let xip = xip
            .split(',')
            .filter(|s| !s.is_empty())
            .map(id)
            .collect::<Result<Vec<_>>>()?;
        let (xmin, xmax) = (id(xmin)?, id(xmax)?);
        if xmin > xmax || xip.iter().any(|&x| x < xmin || x >= xmax) {
            return Err(bad());
        }
        Ok(Copied {
            xmin,
            xmax,
            xip,
            lsn,
        })
    }

    /// The seed's WAL position past every transaction the copy holds.
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// Whether the copy holds transaction `xid` (top-level, 32 bits as pgoutput sends it),
    /// committed at `commit_lsn` (`Lsn::ZERO` while not yet known: a transaction streamed while in
    /// progress). Only meaningful within 2^31 transactions of S: drop this once the stream is past
    /// [`Copied::lsn`].
    pub fn holds(&self, xid: u32, commit_lsn: Lsn) -> bool {
        if commit_lsn != Lsn::ZERO && commit_lsn >= self.lsn {
            return false;
        }
        let full = widen(xid, self.xmax);
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// The 64-bit transaction id with `xid`'s low 32 bits nearest to `near`.
fn widen(xid: u32, near: u64) -> u64 {
    let candidate = (near & !0xFFFF_FFFF) | u64::from(xid);
    const HALF: u64 = 1 << 31;
    if candidate > near.saturating_add(HALF) && candidate >= 1 << 32 {
        candidate - (1 << 32)
    } else if candidate.saturating_add(HALF) < near {
        candidate + (1 << 32)
    } else {
        candidate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_what_the_snapshot_saw_committed_before_its_lsn() {
        let c = Copied::parse("100:110:102,105", Lsn(5000)).unwrap();
        for (xid, held) in [
            (99, true),
            (100, true),
            (101, true),
            (102, false),
            (105, false),
            (109, true),
            (110, false),
            (200, false),
        ] {
            assert_eq!(c.holds(xid, Lsn(4000)), held, "xid {xid}");
            assert_eq!(c.holds(xid, Lsn::ZERO), held, "xid {xid}, commit not known");
        }
        // A commit at or past the position read after S is never in the copy.
        assert!(!c.holds(101, Lsn(5000)));
        assert!(!c.holds(99, Lsn(9000)));
    }

    #[test]
    fn thirty_two_bit_ids_are_read_in_the_snapshot_epoch() {
        // S taken just after the 32-bit counter wrapped into epoch 1.
        let base = 1u64 << 32;
        let c = Copied::parse(&format!("{}:{}:", base - 5, base + 5), Lsn(1)).unwrap();
        assert!(c.holds(u32::MAX - 1, Lsn::ZERO), "epoch 0, before xmin");
        assert!(c.holds(2, Lsn::ZERO), "epoch 1, below xmax");
        assert!(!c.holds(7, Lsn::ZERO), "epoch 1, past xmax");
        assert_eq!(widen(3, base - 10), base + 3);
        assert_eq!(widen(u32::MAX, base + 10), base - 1);
        assert_eq!(widen(7, 100), 7);
    }

    #[test]
    fn refuses_what_is_not_a_snapshot() {
        for bad in ["", "1:2", "1:2:3:4", "a:2:", "5:3:", "1:5:7", "1:5:0"] {
            assert!(Copied::parse(bad, Lsn(1)).is_err(), "{bad:?}");
        }
        assert_eq!(
            Copied::parse("3:9:", Lsn(1)).unwrap().xip,
            Vec::<u64>::new()
        );
    }
}
