//! Prometheus metrics, a sink beside the data flow: `tandem run --metrics-addr ADDR` serves them
//! at `http://ADDR/metrics`, and `http://ADDR/health` for orchestrators' probes (200 while both
//! directions stream, 503 otherwise). Without it the counters cost nothing (no recorder is
//! installed).
//!
//! | metric | labels |
//! | --- | --- |
//! | `tandem_changes_total` | `direction` (`D>M`, `M>D`) |
//! | `tandem_target_commits_total` | `direction` |
//! | `tandem_checkpoint_lsn` (gauge) | `direction` |
//! | `tandem_conflicts_total` | `direction`, `table`, `kind`, `resolution` |
//! | `tandem_held_changes_total` | `direction`, `table` |
//! | `tandem_streamed_transactions_total` | `direction`, `applied` (`live`, `spooled`) |
//! | `tandem_live_blocked_total` | `direction` |
//! | `tandem_reconnects_total` | `direction` |
//! | `tandem_slot_held_total` | `direction` |
//! | `tandem_transactions_left_out_total` | `direction` |

use std::net::SocketAddr;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::side::Side;
use crate::sync::Status;

/// `/health`: 200 while both directions stream (connected, checked for gaps) and neither waits on
/// a transaction its target refuses, else 503; one line per direction either way.
pub fn health(status: &Status) -> (StatusCode, String) {
    let mut all = true;
    let mut body = String::new();
    if let Some(why) = &*status.starting.lock().unwrap_or_else(|p| p.into_inner()) {
        body.push_str(&format!("not started, waiting for the databases: {why}\n"));
    }
    if status.waiting.load(Ordering::Relaxed) {
        body.push_str("waiting for another `tandem run` of these databases to stop\n");
    }
    for side in Side::BOTH {
        let p = status.from(side);
        let streaming = p.streaming.load(Ordering::Relaxed);
        let refused = p.refused();
        all &= streaming && refused.is_none();
        body.push_str(&format!(
            "{} {} checkpoint {}",
            side.direction_from(),
            if streaming {
                "streaming"
            } else {
                "not streaming"
            },
            p.checkpoint()
        ));
        match (
            refused,
            &*p.retrying.lock().unwrap_or_else(|p| p.into_inner()),
        ) {
            // It reconnects to try again: stalled all the same until the target takes it.
            (Some(why), _) => body.push_str(&format!("; stalled, refused by the target: {why}\n")),
            (None, Some(why)) if !streaming => {
                body.push_str(&format!("; reconnecting after: {why}\n"))
            }
            _ => body.push('\n'),
        }
    }
    let code = match all {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, body)
}

/// Install the recorder and serve `/metrics` and `/health` on `addr` in the background.
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow!("installing the metrics recorder: {e}"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move { h.render() }
            }),
        )
        .route(
            "/health",
            get(move || {
                let s = status.clone();
                async move { health(&s) }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr {addr}: cannot listen there"))?;
    let bound = listener.local_addr()?;
    tracing::info!("metrics at http://{bound}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_ok_only_while_both_directions_stream() {
        let status = Status::default();
        status.from_desktop.streaming.store(true, Ordering::Relaxed);
        status
            .from_desktop
            .checkpoint
            .store(0x1_0000_0010, Ordering::Relaxed);
        let (code, body) = health(&status);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "D>M streaming checkpoint 1/10\nM>D not streaming checkpoint 0/0\n"
        );
        status.from_mobile.streaming.store(true, Ordering::Relaxed);
        assert_eq!(health(&status).0, StatusCode::OK);
        // Streaming again to try it, but the target still refuses what follows the checkpoint.
        status
            .from_desktop
            .set_refused(crate::lsn::Lsn(0x1_0000_0010), "no_bad".into());
        assert_eq!(
            health(&status),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "D>M streaming checkpoint 1/10; stalled, refused by the target: no_bad\n\
                 M>D streaming checkpoint 0/0\n"
                    .into()
            )
        );
    }
}
