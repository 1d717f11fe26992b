//! `tandem skip`: leave one source transaction out of a direction, as native
//! `ALTER SUBSCRIPTION … SKIP (lsn = …)` and pglogical's `alter_subscription_skip_changes_upto`
//! do. For a transaction the target refuses: `run` stops naming it and its commit LSN.

use anyhow::{bail, Result};

use crate::apply::checkpoint;
use crate::config::Config;
use crate::db;
use crate::lsn::Lsn;
use crate::side::Side;

/// Record (or with `lsn = None` withdraw) the request on the target of `from`'s direction; `run`
/// reads it when it starts. One line saying what will happen.
pub async fn skip(cfg: &Config, from: Side, lsn: Option<Lsn>) -> Result<String> {
    let to = from.other();
    let t = db::connect(cfg.site(to), "tandem skip").await?;
    crate::ops::setup::require_migrated(&t, to).await?;
    let cp = checkpoint::require(&t, from).await?;
    let Some(lsn) = lsn else {
        checkpoint::set_skip(&t, from, None).await?;
        return Ok(format!(
            "{from} → {to}: no transaction will be left out; the next `tandem run` applies \
             everything from checkpoint {}",
            cp.lsn
        ));
    };
    if lsn < cp.lsn {
        bail!(
            "{from} → {to}: {lsn} is before the checkpoint {} on {to}: the transaction \
             committing there was already applied (or left out). Use the LSN `tandem run` \
             printed for the rejected transaction",
            cp.lsn
        );
    }
    checkpoint::set_skip(&t, from, Some(lsn)).await?;
    Ok(format!(
        "{from} → {to}: the {from} transaction committing at {lsn} will be left out of {to} \
         when `tandem run` reaches it; a running `tandem run` takes this at its next start"
    ))
}
