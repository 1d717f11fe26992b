//! A model of two sites exchanging concurrent changes of one key through the conflict rules, as
//! `run` applies them: each side makes its changes before the other's reach it (a version
//! column, no unchanged-TOAST updates), then applies the other's in order through [`decide`].
//! The unit test checks every pair of short histories, the `conflicts` fuzz target longer ones.

use super::{decide, Action, Observed, Policy, Rule, SourceOp};
use crate::side::Side;

/// A row: its value (each write's own) and its version (the writer's clock).
pub type Row = Option<(u8, u8)>;

/// One side's changes: each one's operation and version, in order.
pub type History = Vec<(SourceOp, u8)>;

/// A change as the source sends it.
#[derive(Clone, Copy, Debug)]
struct Sent {
    op: SourceOp,
    old: Row,
    new: Row,
}

/// Run a history on a site whose row starts as `start` (change `i` writes value `base + i`):
/// its final row and the changes it sends.
fn run(start: Row, h: &[(SourceOp, u8)], base: u8) -> (Row, Vec<Sent>) {
    let mut row = start;
    let mut sent = vec![];
    for (i, &(op, t)) in h.iter().enumerate() {
        let new = (op != SourceOp::Delete).then_some((base.wrapping_add(i as u8), t));
        sent.push(Sent { op, old: row, new });
        row = new;
    }
    (row, sent)
}

/// What the applier does with one incoming change on a target holding `row`.
fn apply(rule: Rule, source: Side, full: bool, row: Row, c: &Sent) -> Result<Row, String> {
    let seen = Observed {
        found: row.is_some(),
        same_as_incoming: row.is_some() && row == c.new,
        same_as_old: full.then_some(row.is_some() && row == c.old),
        version: match (row, c.new) {
            (Some((_, have)), Some((_, comes))) => Some(have.cmp(&comes)),
            _ => None,
        },
        ours: false,
    };
    match decide(rule, source, c.op, seen).0 {
        Action::Apply => Ok(c.new),
        Action::Skip => Ok(row),
        other => Err(format!("{other:?} under {rule:?}")),
    }
}

/// Whether a change can follow a row: an insert only where there is none, an update or a
/// delete only where there is one.
pub fn legal(row_present: bool, op: SourceOp) -> bool {
    (op == SourceOp::Insert) != row_present
}

/// The key was used twice within the window: inserted and deleted, or deleted and inserted.
pub fn reuses(h: &[(SourceOp, u8)]) -> bool {
    h.iter().any(|c| c.0 == SourceOp::Insert) && h.iter().any(|c| c.0 == SourceOp::Delete)
}

/// The policies that converge, with or without the source's old rows (`REPLICA IDENTITY FULL`),
/// as `setup` lets them run.
pub const CONVERGING: [(Policy, bool); 4] = [
    (Policy::LastWriteWins, false),
    (Policy::LastWriteWins, true),
    (Policy::DesktopWins, true),
    (Policy::MobileWins, true),
];

/// Exchange desktop's `hd` and mobile's `hm` (both legal from `start`, versions increasing)
/// under `rule`; `Err` unless both sides end with the row the policy names: a site's own final
/// row where only it changed the key; otherwise the winner's, and under last_write_wins a
/// delete, else the greater version (a tie: `priority`).
pub fn exchange(
    start: Row,
    hd: &[(SourceOp, u8)],
    hm: &[(SourceOp, u8)],
    rule: Rule,
    full: bool,
) -> Result<(), String> {
    let (d_own, d_sent) = run(start, hd, 10);
    let (m_own, m_sent) = run(start, hm, 130);
    let mut d = d_own;
    for c in &m_sent {
        d = apply(rule, Side::Mobile, full, d, c)?;
    }
    let mut m = m_own;
    for c in &d_sent {
        m = apply(rule, Side::Desktop, full, m, c)?;
    }
    let want = match (hd.is_empty(), hm.is_empty(), rule.policy) {
        (_, true, _) => d_own,
        (true, false, _) => m_own,
        (false, false, Policy::DesktopWins) => d_own,
        (false, false, Policy::MobileWins) => m_own,
        (false, false, _) => match (d_own, m_own) {
            (Some((_, vd)), Some((_, vm))) => {
                if vd > vm || (vd == vm && rule.priority == Side::Desktop) {
                    d_own
                } else {
                    m_own
                }
            }
            _ => None,
        },
    };
    if d != want || m != want {
        return Err(format!(
            "{:?} full={full} priority={:?} start={start:?} desktop {hd:?} mobile {hm:?}: \
             desktop ends {d:?}, mobile {m:?}, the policy names {want:?}",
            rule.policy, rule.priority
        ));
    }
    Ok(())
}
