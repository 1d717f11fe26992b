//! A side's replication stream: connect to its slot (`walsender`), check where the server really
//! started, and hand out messages decoded by our own `pgoutput` decoder.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::config::{redact_url, Config, Site};
use crate::lsn::Lsn;
use crate::side::Side;
use crate::source::pgoutput::{self, Message};
use crate::source::streamed::{Live, Streamed, Taken};
use crate::source::walsender::{
    StartOptions, SystemId, WalConfig, WalConnection, WalError, WalFrame, WalStream,
};

/// Startup options pinned on the walsender so text values render one way whatever the server's
/// defaults: ISO dates, `postgres` intervals, shortest-exact floats, hex bytea, and `money` in
/// the C locale (an office server set up in German writes `1.234,56 €`, which a server in
/// English refuses, or takes for another amount). The apply session parses with the same
/// settings (`db::SESSION_SETTINGS`).
const STREAM_OPTIONS: &str = "-c datestyle=ISO,MDY -c intervalstyle=postgres \
     -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C";

/// The most memory the source's walsender decodes a transaction into before streaming it
/// (`logical_decoding_work_mem`, PostgreSQL's default 64 MB). The walsender decodes a block and
/// only then sends it; the target waits meanwhile unless the block fits in what is in flight
/// between them. W2 (two 1M-row transactions), rows/s with 4 runs each: 64 MB 222k, 32 MB 248k,
/// 16 MB 267k, 8 MB 259k, 4 MB 267k, 1 MB 247k, 256 kB 236k (more blocks, each with its own
/// overhead).
const DECODING_MEMORY: u64 = 8 << 20;

/// What the stream hands the applier.
#[derive(Debug)]
pub enum StreamEvent {
    Message(Message),
    /// The server's position while nothing is in flight: everything before it has been sent.
    Keepalive(Lsn),
    /// The streamed transaction applied while in progress.
    Live(Live),
}

/// How a side's stream is asked for.
#[derive(Debug, Clone, Default)]
pub struct StreamMode {
    /// Protocol 2 with in-progress transactions (when the server has it).
    pub streaming: bool,
    /// One streamed transaction at a time may be handed out live (`StreamEvent::Live`).
    pub live: bool,
    /// Streamed transactions that must be spooled even so.
    pub spool_only: std::collections::HashSet<u32>,
    /// Hand out a live transaction's spooled copy with its commit (see [`Live::Commit`]).
    pub keep_copy: bool,
    /// See [`Streamed::live_from`].
    pub live_from: Lsn,
    /// See [`crate::config::Config::receive_timeout`].
    pub receive_timeout: Option<std::time::Duration>,
}

pub struct SourceStream {
    stream: WalStream,
    streamed: Streamed,
    direction: &'static str,
    pub system_id: String,
}

/// The replication connection parameters of `site`'s URL.
fn wal_config(site: &Site, app: String) -> Result<WalConfig> {
    let mut cfg =
        WalConfig::from_url(&site.url).map_err(|e| anyhow!("{}: invalid url: {e}", site.side))?;
    // After the URL's own (a proxy may route by them, as Neon's `endpoint=`): later settings
    // win, so ours hold.
    cfg.options = format!("{} {STREAM_OPTIONS}", cfg.options)
        .trim()
        .to_string();
    cfg.application_name = app;
    Ok(cfg)
}

/// Open a replication connection to `site` (no streaming yet) and identify the system.
pub async fn connect(site: &Site, app: String) -> Result<(WalConnection, SystemId)> {
    let cfg = wal_config(site, app)?;
    let at = redact_url(&site.url);
    let mut conn = WalConnection::connect(&cfg)
        .await
        .with_context(|| format!("{}: opening a replication connection to {at}", site.side))?;
    let system = conn.identify_system().await.with_context(|| {
        format!(
            "{}: IDENTIFY_SYSTEM on {at} (does the role have REPLICATION?)",
            site.side
        )
    })?;
    Ok((conn, system))
}

/// Refuses a connection pooler in front of any of `sides` (PgBouncer, Supavisor: a URL copied
/// from a dashboard), before a command writes anything. tandem's sessions keep state that a
/// pooler hands on to its next client: `run`'s lock, prepared statements, and the replication
/// origin (which `DISCARD ALL` leaves set), under which the application's own writes would be
/// taken for tandem's and never replicated. One in transaction mode let `run` take its lock and
/// then failed it with `prepared statement "s2043" does not exist`, leaving the lock and the
/// origin on the pooler's server connection. No pooler carries a replication connection, so
/// trying one tells; any other failure of it is left to the steps after it.
pub async fn refuse_poolers(cfg: &Config, sides: &[Side]) -> Result<()> {
    for &side in sides {
        if let Err(e) = connect(cfg.site(side), "tandem check".into()).await {
            if e.chain().any(|c| {
                c.downcast_ref::<WalError>()
                    .is_some_and(WalError::is_pooler)
            }) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The slot is still held by another session after a while: one tandem may not end (another
/// role's consumer), or one that has not exited yet. Transient: the direction tries again, as
/// native's apply worker does, instead of stopping `run`, and `/health` says who holds it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{side}: slot {slot} is still held by server process {holder}; trying again until it lets go"
)]
pub struct SlotHeld {
    side: crate::side::Side,
    slot: String,
    holder: String,
}

/// Who holds `site`'s slot: pid, session name, client, and what it waits on if anything.
async fn slot_holder(site: &Site) -> Result<Option<String>> {
    let c = crate::db::connect(site, "tandem check").await?;
    let row = c
        .query_opt(
            "SELECT s.active_pid, coalesce(a.application_name, ''), \
             coalesce(host(a.client_addr), 'local'), coalesce(a.wait_event, '') \
             FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = $1 AND s.active_pid IS NOT NULL",
            &[&site.slot],
        )
        .await?;
    Ok(row.map(|r| {
        let (pid, app, from, wait): (i32, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let app = if app.is_empty() {
            "no name".into()
        } else {
            app
        };
        let wait = if wait.is_empty() {
            String::new()
        } else {
            format!(", waiting on {wait}")
        };
        format!("{pid} ({app}, from {from}{wait})")
    }))
}

/// End the walsender holding `site`'s slot; whether one was ended. A role may end its own
/// role's sessions; where it may not, the caller goes on waiting for the server to.
async fn end_lingering_walsender(site: &Site) -> bool {
    let ended = async {
        let c = crate::db::connect(site, "tandem check").await?;
        let row = c
            .query_opt(
                "SELECT active_pid, pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&site.slot],
            )
            .await?;
        anyhow::Ok(row.map(|r| (r.get::<_, i32>(0), r.get::<_, bool>(1))))
    }
    .await;
    match ended {
        Ok(Some((pid, true))) => {
            tracing::warn!(
                side = %site.side,
                "slot {} was still held by server process {pid}, the walsender of a replication \
                 connection tandem lost; ended it",
                site.slot
            );
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(side = %site.side, "slot {} is held by a lingering walsender that tandem could not end ({e:#}); waiting for the server to", site.slot);
            true
        }
    }
}

impl SourceStream {
    /// Start streaming `site`'s slot at `start` (the checkpoint). A slot still held by a
    /// walsender is waited for: one whose client just went (a killed tandem) ends by itself at
    /// once. One that is still there after `LINGER` serves a connection that went silent (a
    /// NAT or VPN dropped it) and would wait out the server's `wal_sender_timeout`: it is ended.
    /// Only `run` opens streams, and it holds the lock that lets no other `run` of this pair
    /// run, so no other tandem is using the slot.
    ///
    /// Still held after `HELD`, or asked to `stop` meanwhile: [`SlotHeld`], which the caller
    /// retries (the wait goes on, and a stop is not held up by it).
    pub async fn open(
        site: &Site,
        start: Lsn,
        mode: &StreamMode,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<SourceStream> {
        const LINGER: Duration = Duration::from_secs(2);
        const HELD: Duration = Duration::from_secs(30);
        let began = Instant::now();
        let (mut said, mut ended) = (false, false);
        loop {
            match Self::try_open(site, start, mode).await {
                Err(e) if e.to_string().contains("is active for PID") => {
                    if began.elapsed() >= HELD || *stop.borrow() {
                        let holder = slot_holder(site)
                            .await
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| "(gone meanwhile)".into());
                        return Err(SlotHeld {
                            side: site.side,
                            slot: site.slot.clone(),
                            holder,
                        }
                        .into());
                    }
                    if !said {
                        tracing::info!(side = %site.side, "slot {} still held by an old session; waiting", site.slot);
                        said = true;
                    }
                    if !ended && began.elapsed() >= LINGER {
                        ended = end_lingering_walsender(site).await;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_open(site: &Site, start: Lsn, mode: &StreamMode) -> Result<SourceStream> {
        let app = format!("tandem stream {}", site.side.direction_from());
        let (conn, system) = connect(site, app).await?;
        // Protocol 2 (streamed transactions) arrived with PostgreSQL 14.
        let streaming = mode.streaming && conn.server_major >= 14;
        let stream = conn
            .start(StartOptions {
                slot: &site.slot,
                start,
                publication: &site.publication,
                proto_version: if streaming { 2 } else { 1 },
                streaming,
                decoding_memory_cap: streaming.then_some(DECODING_MEMORY),
                receive_timeout: mode.receive_timeout,
            })
            .await
            .map_err(|e| {
                anyhow!(
                    "{}: START_REPLICATION on slot {}: {e}",
                    site.side,
                    site.slot
                )
            })?;
        Ok(SourceStream {
            stream,
            streamed: Streamed::new(mode.live, mode.spool_only.clone())
                .keep_copy(mode.keep_copy)
                // With Kafka (which keeps a copy) an echo's changes are published.
                .drop_echoes(!mode.keep_copy)
                .live_from(mode.live_from),
            direction: site.side.direction_from(),
            system_id: system.system_id,
        })
    }

    /// Everything up to `lsn` is durable on the target: the slot may let it go.
    pub fn confirm(&self, lsn: Lsn) {
        self.stream.confirm(lsn);
    }

    /// The next decoded message or keepalive; a streamed transaction comes out whole (replayed
    /// from its spool) at its commit. Cancel-safe: the receive is a channel read, and a message
    /// is consumed only when it is returned or spooled.
    pub async fn next(&mut self) -> Result<StreamEvent> {
        loop {
            if let Some(m) = self.streamed.next_replayed()? {
                return Ok(StreamEvent::Message(m));
            }
            let frame = self
                .stream
                .recv()
                .await
                .ok_or_else(|| anyhow!("the replication stream ended"))??;
            match frame {
                // Inside a block a keepalive would vouch for nothing more than the block's
                // start did; the next one after the block will do.
                WalFrame::Keepalive { .. } if self.streamed.inside_block() => {}
                WalFrame::Keepalive { wal_end } => return Ok(StreamEvent::Keepalive(wal_end)),
                WalFrame::XLogData { start, data } if self.streamed.inside_block() => {
                    let live = self
                        .streamed
                        .in_block(&data)
                        .with_context(|| format!("streamed change at {start}"))?;
                    if let Some(l) = live {
                        return Ok(StreamEvent::Live(l));
                    }
                }
                WalFrame::XLogData { start, data } => {
                    let msg = pgoutput::decode(&data)
                        .with_context(|| format!("decoding the change at {start}"))?;
                    let commit = matches!(msg, Message::StreamCommit { .. });
                    match self
                        .streamed
                        .take_at(msg, start)
                        .with_context(|| format!("streamed transaction message at {start}"))?
                    {
                        Taken::Pass(m) => return Ok(StreamEvent::Message(m)),
                        Taken::Live(l) => return Ok(StreamEvent::Live(l)),
                        Taken::Held if commit => {
                            metrics::counter!("tandem_streamed_transactions_total",
                                "direction" => self.direction, "applied" => "spooled")
                            .increment(1);
                        }
                        Taken::Held => {}
                    }
                }
            }
        }
    }

    /// Stop streaming, letting the last confirmation reach the server.
    pub async fn close(self) {
        self.stream.close().await;
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
            "SELECT confirmed_flush_lsn::text, wal_status FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&site.slot],
        )
        .await?;
    let Some(row) = row else {
        bail!(
            "{side}: replication slot {slot} does not exist (it was dropped, or {side} failed \
             over to a server without it: PostgreSQL 15 does not copy slots to replicas). \
             {other} holds tandem's checkpoint {checkpoint} for {side}'s changes, and what {side} \
             changed since cannot be streamed any more. Run `tandem setup` to create the slot \
             again, then bring {other} up to date: `tandem verify`, then `tandem repair --source \
             {side}` (or `tandem snapshot --seed {side}`, which merges and so does not carry \
             deletes over)",
            side = site.side,
            slot = site.slot,
            other = site.side.other()
        );
    };
    // The server drops WAL a slot still needs once it is more than max_slot_wal_keep_size
    // behind; START_REPLICATION then only says it "cannot read from" the slot. (A slot close to
    // that, `unreserved`, is warned about by `run`'s watch of the sources.)
    if row.get::<_, Option<String>>(1).as_deref() == Some("lost") {
        bail!(
            "{side}: slot {slot} was invalidated by the server: it fell more than \
             max_slot_wal_keep_size behind and the WAL after tandem's checkpoint {checkpoint} on \
             {other} was removed, so those changes cannot be sent. Nothing was applied. Recreate \
             the slot and resynchronise: `tandem teardown`, `tandem setup`, then `tandem \
             snapshot --seed {side}` (and raise max_slot_wal_keep_size, or keep tandem running)",
            side = site.side,
            slot = site.slot,
            other = site.side.other()
        );
    }
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
