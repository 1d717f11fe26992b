//! Prometheus metrics, a sink beside the data flow: `tandem run --metrics-addr ADDR` serves them
//! at `http://ADDR/metrics`. Without it the counters cost nothing (no recorder is installed).
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

use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Install the recorder and serve `/metrics` on `addr` in the background.
pub async fn serve(addr: SocketAddr) -> Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow!("installing the metrics recorder: {e}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let h = handle.clone();
            async move { h.render() }
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
