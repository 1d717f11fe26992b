//! A side's replication stream: connect to its slot with pgwire-replication, check where the
//! server really started, and hand out messages decoded by our own `pgoutput` decoder.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio_postgres::config::{Host, SslMode};

use crate::config::{redact_url, Site};
use crate::lsn::Lsn;
use crate::source::pgoutput::{self, Begin, Commit, LogicalMessage, Message};

/// Startup options pinned on the walsender so text values render one way whatever the server's
/// defaults: ISO dates, `postgres` intervals, shortest-exact floats, hex bytea. The apply session
/// parses with the same settings (`db::SESSION_SETTINGS`).
const STREAM_OPTIONS: &str =
    "-c datestyle=ISO,MDY -c intervalstyle=postgres -c extra_float_digits=3 -c bytea_output=hex";

/// Events in flight between the socket reader and the applier. Each holds at most one row, so
/// this (with the message-size cap) bounds the stream's memory whatever the transaction size.
/// Small, because a row may be large: with W4's 100 KB rows 512 events made 51 MB of the peak,
/// and W1/W2 drain as fast with 64 (the socket buffers too).
const BUFFER_EVENTS: usize = 64;

/// What the stream hands the applier.
#[derive(Debug)]
pub enum StreamEvent {
    Message(Message),
    /// The server's position while nothing is in flight: everything before it has been sent.
    Keepalive(Lsn),
}

pub struct SourceStream {
    client: ReplicationClient,
    pub system_id: String,
    pub timeline: u32,
}

/// The connection parameters of `site`'s URL, for the replication protocol.
pub fn replication_config(site: &Site, start: Lsn) -> Result<ReplicationConfig> {
    let pg = tokio_postgres::Config::from_str(&site.url)
        .map_err(|e| anyhow!("{}: invalid url: {e}", site.side))?;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let db = pg.get_dbname().unwrap_or(&user).to_string();
    let tls = match pg.get_ssl_mode() {
        SslMode::Disable => TlsConfig::disabled(),
        // pgwire-replication has no "prefer": with TLS configured the SQL side negotiates it,
        // so ask for it here too only when the URL insists.
        SslMode::Require => TlsConfig::require(),
        _ => TlsConfig::disabled(),
    };
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        db,
        &site.slot,
        site.publication.as_str(),
    )
    .with_port(port)
    .with_tls(tls)
    .with_start_lsn(start.into())
    // Confirm nothing beyond the checkpoint until the applier says so.
    .with_ack_lsn(start.into())
    // Confirmations reach the server at most this often: the slot (and the source's WAL) is
    // let go soon after each target commit, as the native apply worker does after its commits.
    .with_status_interval(Duration::from_millis(100))
    .with_wakeup_interval(Duration::from_secs(5))
    .with_buffer_size(BUFFER_EVENTS)
    .with_options(STREAM_OPTIONS)
    .with_application_name(format!("tandem stream {}", site.side.direction_from())))
}

impl SourceStream {
    /// Start streaming `site`'s slot at `start` (the checkpoint). Waits out a slot still held by
    /// a previous tandem process (its walsender lingers briefly after a kill).
    pub async fn open(site: &Site, start: Lsn) -> Result<SourceStream> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match Self::try_open(site, start).await {
                Err(e)
                    if e.to_string().contains("is active for PID") && Instant::now() < deadline =>
                {
                    tracing::info!(side = %site.side, "slot {} still held by an old session; waiting", site.slot);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_open(site: &Site, start: Lsn) -> Result<SourceStream> {
        let cfg = replication_config(site, start)?;
        let at = redact_url(&site.url);
        let mut client = ReplicationClient::connect_gated(cfg)
            .await
            .with_context(|| format!("{}: opening a replication connection to {at}", site.side))?;
        let system = client
            .identify_system()
            .await
            .with_context(|| format!("{}: IDENTIFY_SYSTEM on {at}", site.side))?;
        client.start().await?;
        client.wait_started().await.map_err(|e| {
            anyhow!(
                "{}: START_REPLICATION on slot {}: {e}",
                site.side,
                site.slot
            )
        })?;
        Ok(SourceStream {
            client,
            system_id: system.system_id,
            timeline: system.timeline,
        })
    }

    /// Everything up to `lsn` is durable on the target: the slot may let it go.
    pub fn confirm(&self, lsn: Lsn) {
        self.client.update_applied_lsn(lsn.into());
    }

    /// The next decoded message or keepalive. Cancel-safe (the receive is a channel read).
    pub async fn next(&mut self) -> Result<StreamEvent> {
        loop {
            let ev = self
                .client
                .recv()
                .await?
                .ok_or_else(|| anyhow!("the replication stream ended"))?;
            return Ok(match ev {
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    StreamEvent::Keepalive(wal_end.into())
                }
                // pgwire-replication parses these three itself; map them to our types.
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => StreamEvent::Message(Message::Begin(Begin {
                    final_lsn: final_lsn.into(),
                    commit_ts: commit_time_micros,
                    xid,
                })),
                ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                } => StreamEvent::Message(Message::Commit(Commit {
                    flags: 0,
                    commit_lsn: lsn.into(),
                    end_lsn: end_lsn.into(),
                    commit_ts: commit_time_micros,
                })),
                ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => StreamEvent::Message(Message::Message(LogicalMessage {
                    transactional,
                    lsn: lsn.into(),
                    prefix,
                    content,
                })),
                ReplicationEvent::XLogData {
                    data, wal_start, ..
                } => {
                    StreamEvent::Message(pgoutput::decode(&data).with_context(|| {
                        format!("decoding the change at {}", Lsn::from(wal_start))
                    })?)
                }
                ReplicationEvent::StoppedAt { .. } => continue,
            });
        }
    }

    /// Stop streaming, letting the last confirmation reach the server.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.shutdown()).await;
    }
}

/// After `START_REPLICATION`, the server may have started later than asked (at the slot's
/// `confirmed_flush_lsn`) without saying so. If that is past our checkpoint, transactions in
/// between were confirmed by someone else and are gone: refuse to run rather than lose them.
pub async fn check_no_gap(
    source: &tokio_postgres::Client,
    site: &Site,
    checkpoint: Lsn,
) -> Result<()> {
    let row = source
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&site.slot],
        )
        .await?;
    let Some(row) = row else {
        bail!(
            "{}: replication slot {} does not exist; run `tandem setup`",
            site.side,
            site.slot
        );
    };
    let confirmed: Option<String> = row.get(0);
    if let Some(c) = confirmed {
        let c: Lsn = c.parse()?;
        if c > checkpoint {
            bail!(
                "{side}: slot {slot} has confirmed up to {c}, past tandem's checkpoint {checkpoint} on {other}: \
                 changes between them were consumed elsewhere and would be lost. Nothing was applied. \
                 Recreate the slot and resynchronise: `tandem teardown` then `tandem setup` \
                 (and an initial snapshot)",
                side = site.side,
                slot = site.slot,
                other = site.side.other()
            );
        }
    }
    Ok(())
}
