//! `tandem teardown`: drop tandem's slots and publications so nothing keeps WAL; `--purge` also
//! drops the control schema.

use anyhow::{bail, Result};

use crate::config::{quote_ident, quote_literal, Config};
use crate::db;
use crate::side::Side;

pub async fn teardown(cfg: &Config, purge: bool) -> Result<Vec<String>> {
    let mut report = Vec::new();
    let mut problems = Vec::new();
    for side in Side::BOTH {
        let site = cfg.site(side);
        let c = match db::connect(site, "tandem teardown").await {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{e:#}"));
                continue;
            }
        };
        // A walsender outlives its client for a moment: give one that is ending 5 s to go.
        let mut slot = None;
        for _ in 0..50 {
            slot = c
                .query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                    &[&site.slot],
                )
                .await?;
            if slot
                .as_ref()
                .is_none_or(|r| r.get::<_, Option<i32>>(0).is_none())
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        match slot {
            Some(r) if r.get::<_, Option<i32>>(0).is_some() => problems.push(format!(
                "{side}: slot {} is in use by process {}; stop `tandem run` first",
                site.slot,
                r.get::<_, i32>(0)
            )),
            Some(_) => {
                c.execute("SELECT pg_drop_replication_slot($1)", &[&site.slot])
                    .await?;
                report.push(format!("{side}: dropped replication slot {}", site.slot));
            }
            None => {}
        }
        let dropped = c
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&site.publication],
            )
            .await?
            .is_some();
        if dropped {
            c.batch_execute(&format!(
                "DROP PUBLICATION {}",
                quote_ident(&site.publication)
            ))
            .await?;
            report.push(format!("{side}: dropped publication {}", site.publication));
        }
        // Origins need superuser to drop; without it there is nothing to drop either.
        let origin = crate::apply::origin_name(cfg, side.other());
        let _ = c
            .batch_execute(&format!(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = {}",
                quote_literal(&origin)
            ))
            .await;
        if purge {
            c.batch_execute("DROP SCHEMA IF EXISTS tandem CASCADE")
                .await?;
            report.push(format!("{side}: dropped schema tandem"));
        }
    }
    if !problems.is_empty() {
        bail!("teardown incomplete:\n  - {}", problems.join("\n  - "));
    }
    Ok(report)
}
