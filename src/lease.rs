//! One `tandem run` per pair of databases.
//!
//! The source slots already let only one walsender stream each direction, but a second `run`
//! would still read checkpoints, look for gaps and snapshot beside the first: it waits 90 s for
//! a slot, then starts from a checkpoint read before the wait and reports the first one's
//! progress as a gap. So `run` holds a session advisory lock on both databases for as long as it
//! runs. A second one waits, naming the holder, and starts once the first has stopped: a rolling
//! restart hands over cleanly. `snapshot` and `teardown` refuse while a `run` holds it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Config;
use crate::db;
use crate::side::Side;

/// The advisory lock's first key: tandem's ("tand").
const CLASS: i32 = 0x7461_6e64;
/// How often a waiting `run` tries again, and how often it says it still waits.
const RETRY: Duration = Duration::from_secs(1);
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The second key: the pair, by its slot names (two pairs may share a database).
pub fn pair_key(cfg: &Config) -> i32 {
    key_of(&cfg.desktop.slot, &cfg.mobile.slot)
}

fn key_of(desktop_slot: &str, mobile_slot: &str) -> i32 {
    // FNV-1a: the same on every build and machine, which std's hasher is not.
    let mut h: u32 = 0x811c_9dc5;
    for b in desktop_slot.bytes().chain([0]).chain(mobile_slot.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff) as i32
}

/// The lock's `application_name`: where the holder runs, for whoever waits on it.
fn app_name() -> String {
    session_name("tandem run")
}

/// `what` and where this process runs (`HOST:PID`), as a session's `application_name`: names
/// `run`'s sessions so that it can tell its own lost ones, and others who runs.
pub fn session_name(what: &str) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let host = match ok {
        true => {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        }
        false => "?".into(),
    };
    let mut name = format!("{what} {host}:{}", std::process::id());
    // PostgreSQL keeps 63 bytes of it.
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// Who holds the lock on the database `c` is connected to, if anyone: one line for messages.
pub async fn holder(c: &Client, cfg: &Config) -> Result<Option<String>> {
    Ok(holding(c, cfg).await?.map(|h| h.line))
}

/// The session holding the lock.
struct Holder {
    pid: i32,
    /// Its `application_name` is this process's: a session of ours the network dropped, which
    /// the server has not noticed yet (its keepalives may take hours).
    ours: bool,
    line: String,
}

async fn holding(c: &Client, cfg: &Config) -> Result<Option<Holder>> {
    let row = c
        .query_opt(
            "SELECT l.pid, a.application_name, host(a.client_addr), \
                    date_trunc('second', a.backend_start)::text \
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid = $1::int4::oid AND l.objid = $2::int4::oid",
            &[&CLASS, &pair_key(cfg)],
        )
        .await?;
    Ok(row.map(|r| {
        let pid: i32 = r.get(0);
        // Another role's session shows little in pg_stat_activity without pg_read_all_stats.
        let app: Option<String> = r.get(1);
        let ours = app.as_deref() == Some(app_name().as_str());
        let from: Option<String> = r.get(2);
        let since: Option<String> = r.get(3);
        let mut s = app
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "a session".into());
        s.push_str(&format!(", server process {pid}"));
        if let Some(from) = from {
            s.push_str(&format!(", from {from}"));
        }
        if let Some(since) = since {
            s.push_str(&format!(", connected since {since}"));
        }
        Holder { pid, ours, line: s }
    }))
}

/// One side's lock: the connection holding it, or who holds it instead.
async fn try_side(cfg: &Config, side: Side) -> Result<Result<Client, Holder>> {
    let c = db::connect(cfg.site(side), &app_name()).await?;
    let got: bool = c
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&CLASS, &pair_key(cfg)],
        )
        .await?
        .get(0);
    if got {
        return Ok(Ok(c));
    }
    // Released between the two statements: the next try takes it.
    Ok(Err(holding(&c, cfg).await?.unwrap_or(Holder {
        pid: 0,
        ours: false,
        line: "one that just stopped".into(),
    })))
}

/// Both sides' locks, desktop's first (the same order in every process, so two never each hold
/// one and wait for the other). On the first side held elsewhere, the ones taken are let go.
async fn try_both(cfg: &Config) -> Result<Result<Lease, (Side, String)>> {
    let mut held = Vec::new();
    for side in Side::BOTH {
        match try_side(cfg, side).await? {
            Ok(c) => held.push((side, c)),
            Err(who) => {
                // Held by a session of this process: maybe the one that took the first side's,
                // both URLs reaching one database. Waiting would be waiting for ourselves.
                if let (true, Some((_, first))) = (who.ours, held.first()) {
                    let c = db::connect(cfg.site(side), "tandem check").await?;
                    if let Some(problem) = crate::ops::setup::same_database(cfg, first, &c).await? {
                        bail!(problem);
                    }
                }
                return Ok(Err((side, who.line)));
            }
        }
    }
    Ok(Ok(Lease { held }))
}

/// The connections holding the lock on both sides; dropping it lets go.
pub struct Lease {
    held: Vec<(Side, Client)>,
}

/// Take the lock for `run`, waiting while another `run` holds it. `None`: asked to stop while
/// waiting. A side that cannot be reached is an error; `run`'s start tries again later.
pub async fn acquire(
    cfg: &Config,
    stop: &mut watch::Receiver<bool>,
    waiting: &std::sync::atomic::AtomicBool,
) -> Result<Option<Lease>> {
    use std::sync::atomic::Ordering;
    let mut warned: Option<Instant> = None;
    loop {
        match try_both(cfg).await? {
            Ok(lease) => {
                if warned.is_some() {
                    tracing::info!("the other `tandem run` stopped; this one starts");
                }
                waiting.store(false, Ordering::Relaxed);
                return Ok(Some(lease));
            }
            Err((side, who)) => {
                waiting.store(true, Ordering::Relaxed);
                if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    tracing::warn!(
                        %side,
                        "another `tandem run` is running for these databases ({who}); waiting \
                         for it to stop (only one may run: it holds the slots and checkpoints)"
                    );
                    warned = Some(Instant::now());
                }
            }
        }
        if *stop.borrow() {
            return Ok(None);
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            r = stop.changed() => if r.is_err() { return Ok(None) },
        }
        if *stop.borrow() {
            return Ok(None);
        }
    }
}

/// For commands that need the databases to themselves: an error naming the `run` holding them.
/// A side that cannot be reached is left to the command, which may go on without it.
pub async fn refuse_while_running(cfg: &Config, what: &str) -> Result<()> {
    for side in Side::BOTH {
        let Ok(c) = db::connect(cfg.site(side), &format!("tandem {what}")).await else {
            continue;
        };
        if let Some(who) = holder(&c, cfg).await? {
            bail!(
                "{side}: a `tandem run` is running for these databases ({who}); stop it before \
                 `tandem {what}`"
            );
        }
    }
    Ok(())
}

impl Lease {
    /// Let go at once, instead of when each server notices its connection closed: a `run`
    /// started right after this one stops does not wait a retry for it.
    pub async fn release(self) {
        for (_, c) in &self.held {
            let _ = c.batch_execute("SELECT pg_advisory_unlock_all()").await;
        }
    }

    /// Keep the lock while `run` runs; handed back once `stop` is set, for the caller to hold
    /// until its last checkpoint is written. A connection lost (the server restarted, say) took
    /// the lock with it: take it again once the server answers. If another `run` took it
    /// meanwhile, this one stops, with an error, and leaves the databases to it.
    pub async fn keep(mut self, cfg: &Config, mut stop: watch::Receiver<bool>) -> Result<Lease> {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.changed() => return Ok(self),
            }
            for i in 0..self.held.len() {
                let side = self.held[i].0;
                while self.held[i].1.is_closed() {
                    match try_side(cfg, side).await {
                        Ok(Ok(c)) => {
                            self.held[i].1 = c;
                            tracing::info!(%side, "reconnected; `run`'s lock on {side} taken again");
                        }
                        // Our own lost session, still there for the server: end it and retry.
                        Ok(Err(h)) if h.ours => {
                            tracing::info!(%side, "`run`'s lock on {side} is still held by its own lost session (server process {}); ending it", h.pid);
                            if let Ok(c) = db::connect(cfg.site(side), "tandem check").await {
                                let _ = c
                                    .execute("SELECT pg_terminate_backend($1)", &[&h.pid])
                                    .await;
                            }
                            tokio::time::sleep(RETRY).await;
                        }
                        Ok(Err(h)) => bail!(
                            "{side}: while {side} was unreachable another `tandem run` started \
                             for these databases ({}); this one stops and leaves them to it",
                            h.line
                        ),
                        // Still down: the directions wait it out too.
                        Err(_) => tokio::select! {
                            _ = tokio::time::sleep(RETRY) => {}
                            _ = stop.changed() => return Ok(self),
                        },
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pair_key_is_stable_and_tells_pairs_apart() {
        let k = key_of("tandem_desktop", "tandem_mobile");
        assert!(k >= 0);
        assert_eq!(k, key_of("tandem_desktop", "tandem_mobile"));
        assert_ne!(k, key_of("tandem_desktop", "tandem_mobile2"));
        // The separator: moving a byte from one name to the other is another pair.
        assert_ne!(key_of("ab", "c"), key_of("a", "bc"));
    }

    #[test]
    fn the_application_name_fits_and_names_the_process() {
        let n = app_name();
        assert!(n.len() <= 63, "{n}");
        assert!(n.starts_with("tandem run "), "{n}");
    }
}
