//! The per-direction checkpoint: the last source commit applied to a target, stored in the
//! target's `tandem.checkpoints` and written in the same transaction as the rows it covers.

use anyhow::{Context, Result};
use tokio_postgres::GenericClient;

use crate::lsn::Lsn;
use crate::side::Side;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub source_system_id: String,
    pub source_timeline: i32,
    pub slot_name: String,
    /// End LSN of the last applied (or knowingly skipped) source commit.
    pub lsn: Lsn,
}

/// The checkpoint of the direction that reads `source`, from its target's database.
pub async fn load(c: &impl GenericClient, source: Side) -> Result<Option<Checkpoint>> {
    let row = c
        .query_opt(
            "SELECT source_system_id, source_timeline, slot_name, lsn::text FROM tandem.checkpoints \
             WHERE direction = $1",
            &[&source.direction_from()],
        )
        .await
        .context("reading tandem.checkpoints")?;
    Ok(match row {
        None => None,
        Some(r) => Some(Checkpoint {
            source_system_id: r.get(0),
            source_timeline: r.get(1),
            slot_name: r.get(2),
            lsn: r.get::<_, String>(3).parse()?,
        }),
    })
}

/// [`load`], where a missing checkpoint means setup never ran: an error saying so.
pub async fn require(c: &impl GenericClient, source: Side) -> anyhow::Result<Checkpoint> {
    load(c, source).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no checkpoint for {} in tandem.checkpoints; run `tandem setup` first",
            source.other(),
            source.direction_from()
        )
    })
}

/// Create the row if it is missing (setup); an existing checkpoint is left alone.
pub async fn init(c: &impl GenericClient, source: Side, cp: &Checkpoint) -> Result<bool> {
    let n = c
        .execute(
            "INSERT INTO tandem.checkpoints (direction, source_system_id, source_timeline, slot_name, lsn) \
             VALUES ($1, $2, $3, $4, $5::text::pg_lsn) ON CONFLICT (direction) DO NOTHING",
            &[
                &source.direction_from(),
                &cp.source_system_id,
                &cp.source_timeline,
                &cp.slot_name,
                &cp.lsn.to_string(),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Advance the checkpoint; call inside the transaction that applied the rows up to `lsn`.
pub async fn advance(c: &impl GenericClient, source: Side, lsn: Lsn) -> Result<()> {
    let n = c
        .execute(
            "UPDATE tandem.checkpoints SET lsn = $2::text::pg_lsn, updated_at = now() \
             WHERE direction = $1 AND lsn < $2::text::pg_lsn",
            &[&source.direction_from(), &lsn.to_string()],
        )
        .await?;
    if n == 0 {
        tracing::debug!(%source, %lsn, "checkpoint already at or past this LSN");
    }
    Ok(())
}

/// [`advance`] as one SQL statement, to send along with others in one round trip. Only our own
/// values go into it: a fixed direction name and an LSN.
pub fn advance_sql(source: Side, lsn: Lsn) -> String {
    format!(
        "UPDATE tandem.checkpoints SET lsn = '{lsn}'::pg_lsn, updated_at = now() \
         WHERE direction = '{}' AND lsn < '{lsn}'::pg_lsn",
        source.direction_from()
    )
}

/// A statement that fails unless the checkpoint reached `lsn`: opens a target transaction sent
/// behind a commit of `lsn` whose result has not come back (see `Applier::begin_sql`).
pub fn reached_sql(source: Side, lsn: Lsn) -> String {
    // No row matches when that commit failed: 1 / 0, and the transaction is refused.
    format!(
        "SELECT 1 / count(*)::int FROM tandem.checkpoints \
         WHERE direction = '{}' AND lsn >= '{lsn}'::pg_lsn",
        source.direction_from()
    )
}

/// The source commit `tandem skip` asked this direction to leave out, if any.
pub async fn skip_lsn(c: &impl GenericClient, source: Side) -> Result<Option<Lsn>> {
    let row = c
        .query_opt(
            "SELECT skip_lsn::text FROM tandem.checkpoints WHERE direction = $1",
            &[&source.direction_from()],
        )
        .await
        .context("reading tandem.checkpoints.skip_lsn")?;
    row.and_then(|r| r.get::<_, Option<String>>(0))
        .map(|l| {
            l.parse::<Lsn>()
                .map_err(|e| anyhow::anyhow!("skip_lsn {l}: {e}"))
        })
        .transpose()
}

/// Ask `run` to leave out the source transaction committing at `lsn` (`None` withdraws it).
pub async fn set_skip(c: &impl GenericClient, source: Side, lsn: Option<Lsn>) -> Result<()> {
    c.execute(
        "UPDATE tandem.checkpoints SET skip_lsn = $2::text::pg_lsn WHERE direction = $1",
        &[&source.direction_from(), &lsn.map(|l| l.to_string())],
    )
    .await
    .context("writing tandem.checkpoints.skip_lsn")?;
    Ok(())
}

/// What the target refused at checkpoint `at` (see `migrations/0007_refusals.sql`), for `tandem
/// status`: the tries count on while the refusal stays at one checkpoint.
pub async fn record_refusal(
    c: &impl GenericClient,
    source: Side,
    at: Lsn,
    error: &str,
    stopped: bool,
) -> Result<()> {
    // A cause can quote a whole row (a constraint's "Failing row contains …").
    let error: String = error.chars().take(8000).collect();
    c.execute(
        "INSERT INTO tandem.refusals AS r (direction, checkpoint, stopped, error) \
         VALUES ($1, $2::text::pg_lsn, $3, $4) \
         ON CONFLICT (direction) DO UPDATE SET \
           tries = CASE WHEN r.checkpoint = excluded.checkpoint THEN r.tries + 1 ELSE 1 END, \
           since = CASE WHEN r.checkpoint = excluded.checkpoint THEN r.since ELSE now() END, \
           checkpoint = excluded.checkpoint, last_at = now(), stopped = excluded.stopped, \
           error = excluded.error",
        &[&source.direction_from(), &at.to_string(), &stopped, &error],
    )
    .await
    .context("writing tandem.refusals")?;
    Ok(())
}

/// A refusal the direction has not moved past (its checkpoint is still at the refusal's), as
/// `tandem status` shows it (text and JSON).
#[derive(Debug, serde::Serialize)]
pub struct Refusal {
    /// `on_refusal = "stop"` stopped `run` on it; otherwise `run` tries it again.
    pub stopped: bool,
    pub since: String,
    pub last_at: String,
    pub tries: i64,
    pub error: String,
}

pub async fn refusal(c: &impl GenericClient, source: Side) -> Result<Option<Refusal>> {
    let row = c
        .query_opt(
            "SELECT date_trunc('second', r.since)::text, date_trunc('second', r.last_at)::text, \
                    r.tries, r.stopped, r.error \
             FROM tandem.refusals r JOIN tandem.checkpoints c USING (direction) \
             WHERE r.direction = $1 AND c.lsn <= r.checkpoint",
            &[&source.direction_from()],
        )
        .await
        .context("reading tandem.refusals")?;
    Ok(row.map(|r| Refusal {
        since: r.get(0),
        last_at: r.get(1),
        tries: r.get(2),
        stopped: r.get(3),
        error: r.get(4),
    }))
}

/// Clear the skip request, in the transaction that moves the checkpoint past its transaction (or
/// past the point where it could still come).
pub fn clear_skip_sql(source: Side) -> String {
    format!(
        "UPDATE tandem.checkpoints SET skip_lsn = NULL WHERE direction = '{}'",
        source.direction_from()
    )
}

/// The checkpoint now belongs to the slot named `slot` (setup renaming a slot).
pub async fn move_to_slot(c: &impl GenericClient, source: Side, slot: &str) -> Result<()> {
    c.execute(
        "UPDATE tandem.checkpoints SET slot_name = $2 WHERE direction = $1",
        &[&source.direction_from(), &slot],
    )
    .await?;
    Ok(())
}

pub async fn delete(c: &impl GenericClient, source: Side) -> Result<()> {
    c.execute(
        "DELETE FROM tandem.checkpoints WHERE direction = $1",
        &[&source.direction_from()],
    )
    .await?;
    Ok(())
}
