//! `tandem resolve`: continue a table that the `error` conflict policy paused.

use std::sync::Arc;

use anyhow::{bail, Result};

use crate::apply::{Applier, LocalRace};
use crate::config::{Config, TableName};
use crate::side::Side;

/// What to do with the conflicting change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// That side's version of the row ends on both sides.
    Side(Side),
    /// Drop the conflicting change; both rows stay as they are.
    Skip,
}

impl std::str::FromStr for Take {
    type Err = String;
    fn from_str(s: &str) -> Result<Take, String> {
        match s {
            "desktop" => Ok(Take::Side(Side::Desktop)),
            "mobile" => Ok(Take::Side(Side::Mobile)),
            "skip" => Ok(Take::Skip),
            _ => Err(format!("`{s}`: use desktop, mobile or skip")),
        }
    }
}

/// Resume `table` in every direction it is paused in; one report line per direction. Safe while
/// `tandem run` is running: the pause row's lock orders the two.
pub async fn resolve(cfg: Arc<Config>, table: &TableName, take: Take) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for source in Side::BOTH {
        let mut a = Applier::connect(cfg.clone(), source).await?;
        let take = match take {
            Take::Side(s) => Some(s),
            Take::Skip => None,
        };
        let resumed = a.resume(table, take).await.map_err(|e| {
            if e.is::<LocalRace>() {
                e.context(format!(
                    "{table} stays paused from {source}, nothing of it written: \
                     run the same `tandem resolve` again"
                ))
            } else {
                e
            }
        })?;
        if let Some(line) = resumed {
            out.push(line);
        }
    }
    if out.is_empty() {
        bail!("{table} is not paused in either direction; `tandem status` lists paused tables");
    }
    Ok(out)
}
