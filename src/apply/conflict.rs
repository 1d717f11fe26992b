//! Conflict rules: given what the target holds for a key and what arrives from the source, decide
//! what to do and whether that was a conflict. Pure; the applier gathers the [`Observed`] facts
//! with one locking lookup per batch and carries out the [`Action`].
//!
//! Signals, strongest first: the source's old row (`REPLICA IDENTITY FULL`; equal to the target's
//! row means the source changed exactly what the target still has, so no conflict), then the
//! version column (last-write-wins). Without an old row a target row that differs from an incoming
//! update cannot be told apart from an ordinary update, so policies that must know (site wins,
//! keep_local) need `REPLICA IDENTITY FULL`; `setup` refuses them otherwise.
//!
//! Deletes win over concurrent updates under last_write_wins and apply_remote (as in PostgreSQL's
//! own apply worker, an update whose row is gone is skipped), so both sides agree without
//! tombstones: the delete is applied where the row was updated, and the update is skipped where
//! the row was deleted.

use serde::Deserialize;

use crate::side::Side;

#[doc(hidden)]
pub mod model;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    LastWriteWins,
    DesktopWins,
    MobileWins,
    KeepLocal,
    ApplyRemote,
    FillMissing,
    /// Pause the table (in that direction) at the conflicting change until an operator runs
    /// `tandem resolve`; later changes of the table wait, other tables keep flowing.
    Error,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::LastWriteWins => "last_write_wins",
            Policy::DesktopWins => "desktop_wins",
            Policy::MobileWins => "mobile_wins",
            Policy::KeepLocal => "keep_local",
            Policy::ApplyRemote => "apply_remote",
            Policy::FillMissing => "fill_missing",
            Policy::Error => "error",
        }
    }

    /// Policies that cannot decide without the source's old row.
    pub fn needs_old_row(self) -> bool {
        matches!(
            self,
            Policy::DesktopWins | Policy::MobileWins | Policy::KeepLocal | Policy::Error
        )
    }

    fn winner(self) -> Option<Side> {
        match self {
            Policy::DesktopWins => Some(Side::Desktop),
            Policy::MobileWins => Some(Side::Mobile),
            _ => None,
        }
    }
}

/// PostgreSQL 18's conflict kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InsertExists,
    /// The updated row would collide with another row on a unique constraint.
    UpdateExists,
    UpdateOriginDiffers,
    UpdateMissing,
    /// The updated row was deleted on the target (known from the source's old row).
    UpdateDeleted,
    DeleteOriginDiffers,
    DeleteMissing,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InsertExists => "insert_exists",
            Kind::UpdateExists => "update_exists",
            Kind::UpdateOriginDiffers => "update_origin_differs",
            Kind::UpdateMissing => "update_missing",
            Kind::UpdateDeleted => "update_deleted",
            Kind::DeleteOriginDiffers => "delete_origin_differs",
            Kind::DeleteMissing => "delete_missing",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    AppliedRemote,
    KeptLocal,
    Merged,
    Skipped,
    Paused,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::AppliedRemote => "applied_remote",
            Resolution::KeptLocal => "kept_local",
            Resolution::Merged => "merged",
            Resolution::Skipped => "skipped",
            Resolution::Paused => "paused",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write the incoming row (or delete).
    Apply,
    /// Leave the target as it is.
    Skip,
    /// Write the incoming values only into the target's NULL columns.
    Merge,
    /// Stop applying this table here (policy `error`).
    Pause,
}

/// What the source did to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceOp {
    Insert,
    /// An update carrying every column.
    Update,
    /// An update with unchanged-TOAST columns: it cannot create a missing row.
    PartialUpdate,
    Delete,
}

impl SourceOp {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceOp::Insert => "insert",
            SourceOp::Update => "update",
            SourceOp::PartialUpdate => "partial_update",
            SourceOp::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<SourceOp> {
        [
            SourceOp::Insert,
            SourceOp::Update,
            SourceOp::PartialUpdate,
            SourceOp::Delete,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// What the target holds for the key, compared with the incoming change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub found: bool,
    /// The target row equals the incoming values (on the columns sent).
    pub same_as_incoming: bool,
    /// The target row equals the source's old row (`false` when there is no target row);
    /// `None` without an old row.
    pub same_as_old: Option<bool>,
    /// The target's version compared with the incoming one (NULL counts as oldest); `None`
    /// when there is no version to compare.
    pub version: Option<std::cmp::Ordering>,
    /// The target row was written by the target transaction applying this change: by an
    /// earlier change of the same source, in its order, so no conflict.
    pub ours: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub policy: Policy,
    /// Who wins a last_write_wins tie.
    pub priority: Side,
}

/// What to do when the incoming row collides with a *different* target row on a unique
/// constraint other than the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collision {
    /// Delete the colliding target row, then write the incoming one.
    ReplaceLocal,
    /// Do not write the incoming row; with `delete_own`, also delete the target's row with the
    /// incoming key, so the losing row is gone on both sides (the winner side deletes it too) and
    /// the sides converge. The deleted rows are in the conflict log.
    DropIncoming {
        delete_own: bool,
    },
    Pause,
}

/// The decision for a unique-constraint collision; `version` compares the colliding target row
/// with the incoming one.
pub fn decide_collision(
    rule: Rule,
    source: Side,
    op: SourceOp,
    version: Option<std::cmp::Ordering>,
) -> (Collision, (Kind, Resolution)) {
    let kind = if op == SourceOp::Insert {
        Kind::InsertExists
    } else {
        Kind::UpdateExists
    };
    let seen = Observed {
        found: true,
        same_as_incoming: false,
        same_as_old: Some(false),
        version,
        ours: false,
    };
    let converge = matches!(
        rule.policy,
        Policy::LastWriteWins | Policy::DesktopWins | Policy::MobileWins
    );
    match decide(rule, source, SourceOp::Update, seen).0 {
        Action::Apply => (Collision::ReplaceLocal, (kind, Resolution::AppliedRemote)),
        Action::Pause => (Collision::Pause, (kind, Resolution::Paused)),
        Action::Skip | Action::Merge => (
            Collision::DropIncoming {
                delete_own: converge,
            },
            (kind, Resolution::KeptLocal),
        ),
    }
}

/// The decision for one incoming row change from `source`.
pub fn decide(
    rule: Rule,
    source: Side,
    op: SourceOp,
    seen: Observed,
) -> (Action, Option<(Kind, Resolution)>) {
    use std::cmp::Ordering::*;
    if seen.found && seen.ours {
        // A source transaction changing a row twice (`updated_at = now()` both times: equal
        // versions), split into two batches; or two of one group. Compared as the other side's
        // row, the earlier change won a tie against the later one, and the later was lost.
        let action = if seen.same_as_incoming && op != SourceOp::Delete {
            Action::Skip
        } else {
            Action::Apply
        };
        return (action, None);
    }
    let policy = rule.policy;
    let source_wins = policy.winner().map(|w| w == source);
    // Resolve a conflict on an existing row.
    let resolve = |kind: Kind| -> (Action, Option<(Kind, Resolution)>) {
        let (action, res) = match policy {
            Policy::Error => (Action::Pause, Resolution::Paused),
            Policy::ApplyRemote => (Action::Apply, Resolution::AppliedRemote),
            Policy::KeepLocal => (Action::Skip, Resolution::KeptLocal),
            Policy::DesktopWins | Policy::MobileWins => {
                if source_wins == Some(true) {
                    (Action::Apply, Resolution::AppliedRemote)
                } else {
                    (Action::Skip, Resolution::KeptLocal)
                }
            }
            Policy::FillMissing if op == SourceOp::Delete => {
                (Action::Apply, Resolution::AppliedRemote)
            }
            Policy::FillMissing => (Action::Merge, Resolution::Merged),
            Policy::LastWriteWins if op == SourceOp::Delete => {
                (Action::Apply, Resolution::AppliedRemote)
            }
            Policy::LastWriteWins => {
                let remote_newer = match seen.version {
                    Some(Less) => true,
                    Some(Greater) => false,
                    Some(Equal) | None => source == rule.priority,
                };
                if remote_newer {
                    (Action::Apply, Resolution::AppliedRemote)
                } else {
                    (Action::Skip, Resolution::KeptLocal)
                }
            }
        };
        (action, Some((kind, res)))
    };

    if op == SourceOp::Delete {
        return if !seen.found {
            (
                Action::Skip,
                Some((Kind::DeleteMissing, Resolution::Skipped)),
            )
        } else if seen.same_as_old == Some(false) {
            resolve(Kind::DeleteOriginDiffers)
        } else {
            (Action::Apply, None)
        };
    }
    if !seen.found {
        if op == SourceOp::Insert {
            return (Action::Apply, None);
        }
        // The row is gone on the target. With the source's old row we know the source had it
        // as the target did (nothing is lost on the way), so the target deleted it:
        // update_deleted. Without, it cannot be told: update_missing.
        let kind = if seen.same_as_old.is_some() {
            Kind::UpdateDeleted
        } else {
            Kind::UpdateMissing
        };
        // Recreate it only when the policy says the source's version must end on both sides and
        // the change carries the whole row.
        if policy == Policy::Error {
            return (Action::Pause, Some((kind, Resolution::Paused)));
        }
        let recreate = match policy {
            Policy::ApplyRemote | Policy::FillMissing => true,
            Policy::Error => false,
            Policy::DesktopWins | Policy::MobileWins => source_wins == Some(true),
            Policy::KeepLocal | Policy::LastWriteWins => false,
        } && op == SourceOp::Update;
        return if recreate {
            (Action::Apply, Some((kind, Resolution::AppliedRemote)))
        } else {
            (Action::Skip, Some((kind, Resolution::Skipped)))
        };
    }
    if seen.same_as_incoming {
        // Already what the source says (a replay, or both sides made the same change).
        return (Action::Skip, None);
    }
    match (op, seen.same_as_old) {
        (SourceOp::Insert, _) => resolve(Kind::InsertExists),
        (_, Some(true)) => (Action::Apply, None),
        (_, Some(false)) => resolve(Kind::UpdateOriginDiffers),
        // No old row: whether the target changed since cannot be known.
        (_, None) => match policy {
            // The versions decide; a rejected update is a conflict the target's version won.
            Policy::LastWriteWins => match resolve(Kind::UpdateOriginDiffers) {
                (Action::Apply, _) => (Action::Apply, None),
                other => other,
            },
            // Filling only empty columns is what this table asked for on every update.
            Policy::FillMissing => resolve(Kind::UpdateOriginDiffers),
            // The others need old rows (setup insists); without one, do not guess.
            _ => (Action::Apply, None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering::*;

    const D: Side = Side::Desktop;
    const M: Side = Side::Mobile;

    fn rule(policy: Policy) -> Rule {
        Rule {
            policy,
            priority: D,
        }
    }
    fn found(same_in: bool, same_old: Option<bool>, v: Option<std::cmp::Ordering>) -> Observed {
        Observed {
            found: true,
            same_as_incoming: same_in,
            same_as_old: same_old,
            version: v,
            ours: false,
        }
    }
    const MISSING: Observed = Observed {
        found: false,
        same_as_incoming: false,
        same_as_old: None,
        version: None,
        ours: false,
    };

    #[test]
    fn a_row_the_applying_transaction_wrote_is_never_a_conflict() {
        use std::cmp::Ordering::*;
        for policy in [
            Policy::LastWriteWins,
            Policy::DesktopWins,
            Policy::KeepLocal,
            Policy::Error,
        ] {
            for op in [SourceOp::Insert, SourceOp::Update, SourceOp::Delete] {
                for (old, v) in [
                    (None, Some(Equal)),
                    (Some(false), Some(Greater)),
                    (None, None),
                ] {
                    let seen = Observed {
                        ours: true,
                        ..found(false, old, v)
                    };
                    assert_eq!(decide(rule(policy), M, op, seen), (Action::Apply, None));
                }
                let same = Observed {
                    ours: true,
                    ..found(true, None, Some(Equal))
                };
                let want = if op == SourceOp::Delete {
                    Action::Apply
                } else {
                    Action::Skip
                };
                assert_eq!(decide(rule(policy), M, op, same), (want, None));
            }
        }
        // Not ours: the tie goes to the priority side, desktop, against mobile's change.
        assert_eq!(
            decide(
                rule(Policy::LastWriteWins),
                M,
                SourceOp::Update,
                found(false, None, Some(Equal))
            )
            .0,
            Action::Skip
        );
    }

    #[test]
    fn no_conflict_when_the_target_holds_the_old_row() {
        for p in [
            Policy::LastWriteWins,
            Policy::DesktopWins,
            Policy::KeepLocal,
            Policy::FillMissing,
        ] {
            let seen = found(false, Some(true), Some(Less));
            assert_eq!(
                decide(rule(p), M, SourceOp::Update, seen),
                (Action::Apply, None)
            );
            assert_eq!(
                decide(rule(p), M, SourceOp::Delete, seen),
                (Action::Apply, None)
            );
        }
    }

    #[test]
    fn site_wins_both_ways_round() {
        let seen = found(false, Some(false), None);
        let p = rule(Policy::DesktopWins);
        assert_eq!(
            decide(p, D, SourceOp::Update, seen),
            (
                Action::Apply,
                Some((Kind::UpdateOriginDiffers, Resolution::AppliedRemote))
            )
        );
        assert_eq!(
            decide(p, M, SourceOp::Update, seen),
            (
                Action::Skip,
                Some((Kind::UpdateOriginDiffers, Resolution::KeptLocal))
            )
        );
        // With an old row, a missing row was deleted on the target.
        assert_eq!(
            decide(
                p,
                D,
                SourceOp::Update,
                Observed {
                    same_as_old: Some(false),
                    ..MISSING
                }
            ),
            (
                Action::Apply,
                Some((Kind::UpdateDeleted, Resolution::AppliedRemote))
            )
        );
        // The winner's update recreates the row the loser deleted; the loser's does not.
        assert_eq!(decide(p, D, SourceOp::Update, MISSING).0, Action::Apply);
        assert_eq!(decide(p, M, SourceOp::Update, MISSING).0, Action::Skip);
        // The loser's delete of a row the winner changed is refused.
        assert_eq!(
            decide(p, M, SourceOp::Delete, seen),
            (
                Action::Skip,
                Some((Kind::DeleteOriginDiffers, Resolution::KeptLocal))
            )
        );
        // mobile_wins mirrors it.
        assert_eq!(
            decide(rule(Policy::MobileWins), M, SourceOp::Insert, seen).0,
            Action::Apply
        );
    }

    #[test]
    fn last_write_wins_by_version_then_priority() {
        let p = rule(Policy::LastWriteWins);
        let older_local = found(false, None, Some(Less));
        let newer_local = found(false, None, Some(Greater));
        let tie = found(false, Some(false), Some(Equal));
        assert_eq!(
            decide(p, M, SourceOp::Update, older_local),
            (Action::Apply, None)
        );
        assert_eq!(
            decide(p, M, SourceOp::Update, newer_local),
            (
                Action::Skip,
                Some((Kind::UpdateOriginDiffers, Resolution::KeptLocal))
            )
        );
        assert_eq!(decide(p, D, SourceOp::Insert, tie).0, Action::Apply);
        assert_eq!(decide(p, M, SourceOp::Insert, tie).0, Action::Skip);
        // With an old row, a newer remote version is still logged as a conflict.
        assert_eq!(
            decide(
                p,
                M,
                SourceOp::Update,
                found(false, Some(false), Some(Less))
            ),
            (
                Action::Apply,
                Some((Kind::UpdateOriginDiffers, Resolution::AppliedRemote))
            )
        );
        // Deletes win; updates of deleted rows are skipped.
        assert_eq!(
            decide(p, M, SourceOp::Delete, found(false, Some(false), None)).0,
            Action::Apply
        );
        assert_eq!(
            decide(p, M, SourceOp::Update, MISSING),
            (
                Action::Skip,
                Some((Kind::UpdateMissing, Resolution::Skipped))
            )
        );
    }

    #[test]
    fn unique_collisions_replace_or_drop_the_loser_on_both_sides() {
        let lww = rule(Policy::LastWriteWins);
        assert_eq!(
            decide_collision(lww, M, SourceOp::Insert, Some(Less)),
            (
                Collision::ReplaceLocal,
                (Kind::InsertExists, Resolution::AppliedRemote)
            )
        );
        assert_eq!(
            decide_collision(lww, M, SourceOp::Update, Some(Greater)),
            (
                Collision::DropIncoming { delete_own: true },
                (Kind::UpdateExists, Resolution::KeptLocal)
            )
        );
        assert_eq!(
            decide_collision(rule(Policy::KeepLocal), M, SourceOp::Update, None).0,
            Collision::DropIncoming { delete_own: false }
        );
        assert_eq!(
            decide_collision(rule(Policy::FillMissing), M, SourceOp::Update, None).0,
            Collision::DropIncoming { delete_own: false }
        );
        assert_eq!(
            decide_collision(rule(Policy::MobileWins), M, SourceOp::Update, None).0,
            Collision::ReplaceLocal
        );
        assert_eq!(
            decide_collision(rule(Policy::Error), M, SourceOp::Update, None).0,
            Collision::Pause
        );
    }

    #[test]
    fn error_pauses_on_every_kind_but_a_missing_delete() {
        let p = rule(Policy::Error);
        for (op, seen) in [
            (SourceOp::Insert, found(false, None, None)),
            (SourceOp::Update, found(false, Some(false), None)),
            (SourceOp::Update, MISSING),
            (SourceOp::Delete, found(false, Some(false), None)),
        ] {
            assert_eq!(decide(p, D, op, seen).0, Action::Pause, "{op:?}");
        }
        assert_eq!(
            decide(p, D, SourceOp::Update, found(false, Some(true), None)),
            (Action::Apply, None)
        );
        // A delete of a row already gone needs no decision.
        assert_eq!(decide(p, D, SourceOp::Delete, MISSING).0, Action::Skip);
    }

    #[test]
    fn fill_missing_keep_local_apply_remote() {
        let differs = found(false, None, None);
        assert_eq!(
            decide(rule(Policy::FillMissing), D, SourceOp::Insert, differs),
            (
                Action::Merge,
                Some((Kind::InsertExists, Resolution::Merged))
            )
        );
        assert_eq!(
            decide(rule(Policy::KeepLocal), D, SourceOp::Insert, differs).0,
            Action::Skip
        );
        assert_eq!(
            decide(rule(Policy::ApplyRemote), D, SourceOp::Insert, differs).0,
            Action::Apply
        );
        assert_eq!(
            decide(
                rule(Policy::ApplyRemote),
                D,
                SourceOp::PartialUpdate,
                MISSING
            ),
            (
                Action::Skip,
                Some((Kind::UpdateMissing, Resolution::Skipped))
            )
        );
        assert_eq!(
            decide(rule(Policy::KeepLocal), D, SourceOp::Delete, MISSING),
            (
                Action::Skip,
                Some((Kind::DeleteMissing, Resolution::Skipped))
            )
        );
        // Equal rows are never a conflict.
        assert_eq!(
            decide(
                rule(Policy::KeepLocal),
                D,
                SourceOp::Insert,
                found(true, None, None)
            ),
            (Action::Skip, None)
        );
    }

    /// Two sites, one key (see [`model`]): for every pair of concurrent histories of up to two
    /// changes per side and every order of their versions (ties included), the converging
    /// policies leave both sides with the row the policy names, except where one side used the
    /// key twice within the window (deleted its row and inserted one again, or inserted one and
    /// deleted it). Without tombstones the other side cannot tell that key's new row from a
    /// concurrent change of the old one (README, Conflicts).
    #[test]
    fn converging_policies_converge_for_every_pair_of_concurrent_histories() {
        use model::{exchange, legal, reuses, History, Row, CONVERGING};
        // Every legal history of up to two changes from `start`, at increasing versions 1–4.
        let histories = |start: Row| {
            let mut all: Vec<History> = vec![vec![]];
            let mut frontier = vec![(vec![], start.is_some(), 0u8)];
            for _ in 0..2 {
                let mut next = vec![];
                for (h, present, last) in frontier {
                    for t in last + 1..=4 {
                        for op in [SourceOp::Insert, SourceOp::Update, SourceOp::Delete] {
                            if legal(present, op) {
                                let mut h2: History = h.clone();
                                h2.push((op, t));
                                all.push(h2.clone());
                                next.push((h2, op != SourceOp::Delete, t));
                            }
                        }
                    }
                }
                frontier = next;
            }
            all
        };
        let (mut checked, mut reused) = (0, 0);
        let mut failures = vec![];
        for start in [None, Some((0, 0))] {
            for hd in histories(start) {
                for hm in histories(start) {
                    for (policy, full) in CONVERGING {
                        for priority in [D, M] {
                            if reuses(&hd) || reuses(&hm) {
                                reused += 1;
                                continue;
                            }
                            checked += 1;
                            if let Err(e) =
                                exchange(start, &hd, &hm, Rule { policy, priority }, full)
                            {
                                failures.push(e);
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 3000 && reused > 3000, "{checked} and {reused}");
        assert!(
            failures.is_empty(),
            "{} of {checked} end where the policy does not say:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
