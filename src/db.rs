//! SQL connections to either side, with errors that name the side and never the password.

use anyhow::{anyhow, Result};
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{redact_url, Site};

/// Session settings for every tandem SQL session: text values are parsed the way the replication
/// stream renders them (see `source::stream`). And no timeouts, as pg_dump sets: a database- or
/// role-wide timeout meant for the application would cut short a copy, a large batch, a wait on
/// an application's row lock, or a streamed transaction's session idling between the source's
/// blocks; an idle-session timeout would end `run`'s lock session and its apply sessions at every
/// quiet spell (a reconnect each time, and the lock let go meanwhile). A stricter default
/// isolation made tandem's writes fail on every row an application changed since they began
/// (`could not serialize access`); a snapshot asks for its own level. tandem sets the lock
/// timeout it wants itself, where it wants one. `idle_session_timeout` is PostgreSQL 14's, so it
/// is set only where it exists. xml is taken as content, as pg_dump takes it: a database set to
/// `xmloption = document` refused the other side's content (text around an element).
pub const SESSION_SETTINGS: &str =
    "SET datestyle = 'ISO, MDY'; SET intervalstyle = 'postgres'; SET extra_float_digits = 3; \
     SET bytea_output = 'hex'; SET lc_monetary = 'C'; SET xmloption = content; \
     SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0; SET default_transaction_isolation = 'read committed'; \
     SELECT set_config(name, '0', false) FROM pg_settings WHERE name = 'idle_session_timeout'";

/// Connect to `site` with `application_name` set, spawning the connection task.
pub async fn connect(site: &Site, app: &str) -> Result<Client> {
    let url = parse(site)?;
    let tls = connector(site, &url)?;
    let password_from = url.password_from;
    let mut cfg = url.pg;
    cfg.application_name(app);
    network_defaults(&mut cfg);
    let side = site.side;
    let connected = match tls {
        None => cfg
            .connect(tokio_postgres::NoTls)
            .await
            .map(|(c, conn)| drive(side, c, conn)),
        Some(tls) => cfg.connect(tls).await.map(|(c, conn)| drive(side, c, conn)),
    };
    let client = connected.map_err(|error| ConnectError {
        message: format!(
            "{side}: {}",
            describe_connect_error(&error, &site.url, password_from.as_ref())
        ),
        error,
    })?;
    client.batch_execute(SESSION_SETTINGS).await?;
    // Not in SESSION_SETTINGS: a failure there would undo the others (one implicit transaction).
    // Before PostgreSQL 14 the parameter does not exist (nothing is set), and a platform without
    // the check refuses the value: the session then goes without it.
    let _ = client.batch_execute(CONNECTION_CHECK).await;
    Ok(client)
}

fn parse(site: &Site) -> Result<crate::tls::Url> {
    crate::tls::parse_url(&site.url).map_err(|e| anyhow!("{}: invalid url: {e}", site.side))
}

/// The TLS connector `site`'s URL asks for (`None`: `sslmode=disable`), for its sessions and for
/// the cancel requests sent to them.
fn connector(site: &Site, url: &crate::tls::Url) -> Result<Option<MakeRustlsConnect>> {
    match url.pg.get_ssl_mode() {
        SslMode::Disable => Ok(None),
        _ => url
            .tls
            .connector()
            .map(Some)
            .map_err(|e| anyhow!("{}: {e}", site.side)),
    }
}

/// While a statement runs, the server checks every 5 s that tandem is still connected. Without
/// it, a statement of a tandem that was killed (kill -9, an out-of-memory kill, an operator's
/// Ctrl-C) goes on until it next reads or writes the socket: one waiting on an application's
/// lock stays queued there, keeping the rows its transaction already locked, until the
/// application lets go.
const CONNECTION_CHECK: &str = "SELECT set_config(name, '5s', false) FROM pg_settings \
     WHERE name = 'client_connection_check_interval'";

/// Asks `site`'s server to cancel what one session is running, as libpq's `PQcancel` (psql's
/// Ctrl-C) does, over a connection of its own. A statement waiting on an application's lock is
/// otherwise left running when tandem lets go of its session: the server notices the closed
/// socket only when the statement next reads or writes it, and meanwhile the session keeps the
/// row locks it took.
#[derive(Clone)]
pub struct Canceller {
    side: crate::side::Side,
    token: tokio_postgres::CancelToken,
    tls: Option<MakeRustlsConnect>,
}

impl Canceller {
    /// For a session `connect` opened to `site`.
    pub fn new(site: &Site, client: &Client) -> Result<Canceller> {
        Ok(Canceller {
            side: site.side,
            token: client.cancel_token(),
            tls: connector(site, &parse(site)?)?,
        })
    }

    /// Best effort: a session with nothing running ignores it, and a failure is only logged.
    pub async fn cancel(&self) {
        let r = match &self.tls {
            None => self.token.cancel_query(tokio_postgres::NoTls).await,
            Some(tls) => self.token.cancel_query(tls.clone()).await,
        };
        if let Err(e) = r {
            tracing::warn!(side = %self.side, "could not ask the server to cancel a statement: {e}");
        }
    }
}

/// Cancels its sessions' statements if dropped before [`CancelOnDrop::disarm`]: for work that a
/// stop abandons by dropping its future (`run`'s initial snapshot), whose statement may wait on
/// an application's lock long after its connection is gone.
pub struct CancelOnDrop(Vec<Canceller>);

impl CancelOnDrop {
    pub fn new(sessions: Vec<Canceller>) -> CancelOnDrop {
        CancelOnDrop(sessions)
    }

    /// The work ended by itself: nothing to cancel.
    pub fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let sessions = std::mem::take(&mut self.0);
        if sessions.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for c in sessions {
                    c.cancel().await;
                }
            });
        }
    }
}

/// Unless the URL says otherwise: a connect gives up after 10 s, and a connection the network
/// dropped without a word (a NAT's or VPN's) is found within about a minute, not after the
/// kernel's ~15 minutes of retransmissions. Data sent stays unacknowledged at most 60 s
/// (`tcp_user_timeout`), and an idle connection, such as one waiting for a long statement's
/// answer, is probed after 30 s (keepalives; their default is 2 hours). The peer's kernel answers
/// probes however busy its server is, so a slow statement is not cut short.
pub fn network_defaults(cfg: &mut tokio_postgres::Config) {
    use std::time::Duration;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(10));
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(Duration::from_secs(60));
    }
    // tokio-postgres' own default: the URL did not set it.
    if cfg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        cfg.keepalives_idle(Duration::from_secs(30));
    }
    if cfg.get_keepalives_interval().is_none() {
        cfg.keepalives_interval(Duration::from_secs(10));
    }
    if cfg.get_keepalives_retries().is_none() {
        cfg.keepalives_retries(3);
    }
}

/// A connection attempt that failed: one line saying what to do, and the driver's error, kept to
/// tell a server that is down or restarting (reconnect) from a refused login (stop).
#[derive(Debug)]
pub struct ConnectError {
    message: String,
    pub error: tokio_postgres::Error,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The message already says what the driver's error said.
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConnectError {}

impl ConnectError {
    /// The server is down, out of reach for now, or not yet taking connections (starting up, in
    /// recovery, out of connection slots): trying again later may get through. Not so a refused
    /// login, an unknown host or database, or a TLS problem: waiting would not fix those.
    pub fn server_away(&self) -> bool {
        if let Some(db) = self.error.as_db_error() {
            return transient_sqlstate(db.code().code());
        }
        if crate::tls::certificate_problem(&self.error).is_some() {
            return false;
        }
        let mut cause = std::error::Error::source(&self.error);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::*;
                return matches!(
                    io.kind(),
                    ConnectionRefused
                        | ConnectionReset
                        | ConnectionAborted
                        | NotConnected
                        | TimedOut
                        | HostUnreachable
                        | NetworkUnreachable
                        | NetworkDown
                        | UnexpectedEof
                ) || io
                    .to_string()
                    .contains("Temporary failure in name resolution");
            }
            cause = c.source();
        }
        // Closed during the startup exchange: a server shutting down.
        self.error.is_closed()
    }
}

/// Run a connection's I/O in the background for as long as the client lives.
fn drive<F>(side: crate::side::Side, client: Client, conn: F) -> Client
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%side, "connection closed: {e}");
        }
    });
    client
}

/// One line saying what failed and what to do, without the password. `password_from`: the
/// password file's line the password came from, if it did.
pub fn describe_connect_error(
    e: &tokio_postgres::Error,
    url: &str,
    password_from: Option<&crate::pgpass::Source>,
) -> String {
    let at = redact_url(url);
    if let Some(db) = e.as_db_error() {
        return match db.code().code() {
            "28P01" | "28000" if db.message().contains("certificate") => format!(
                "authentication failed for {at}: {}; give a client certificate signed by a CA \
                 the server trusts, with the user as its common name: sslcert=… and sslkey=… \
                 in the url",
                db.message()
            ),
            "28P01" | "28000" => match password_from {
                Some(from) => format!(
                    "authentication failed for {at}: {}; the password is from line {} of {}: \
                     check it there, or give one in the url",
                    db.message(),
                    from.line,
                    from.file.display()
                ),
                None => format!(
                    "authentication failed for {at}: {}; check the user and password in the url",
                    db.message()
                ),
            },
            "3D000" => format!("{at}: {}; create the database or fix the url", db.message()),
            _ => format!("cannot connect to {at}: {}", db.message()),
        };
    }
    if let Some(problem) = crate::tls::certificate_problem(e) {
        return format!("TLS to {at}: {problem}");
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    // tokio-postgres's words for a server asking for a password the config lacks.
    if msg.ends_with("password missing") {
        return format!(
            "{at} asks for a password and none is given: put it in the url \
             (postgresql://user:password@host/db) or in the password file (~/.pgpass, or the \
             file PGPASSFILE names), as for psql"
        );
    }
    format!("cannot reach {at} ({msg}); check the host and port, and that the server is running")
}

/// Do `a` and `b` reach the same database, whatever the URLs say (`localhost` and `127.0.0.1`, a
/// name and its address)? `a` holds an advisory lock on a random key that `b` then finds taken:
/// locks are per database, so a copy of the cluster (same system identifier and OIDs) is told
/// apart too, and no privilege is needed.
pub async fn same_database(a: &Client, b: &Client) -> Result<bool> {
    let key: i64 = a
        .query_one(
            "SELECT k FROM (SELECT (random() * 9e18)::int8 AS k) r WHERE pg_try_advisory_lock(k)",
            &[],
        )
        .await?
        .get(0);
    let free: bool = b
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await?
        .get(0);
    if free {
        b.execute("SELECT pg_advisory_unlock($1)", &[&key]).await?;
    }
    a.execute("SELECT pg_advisory_unlock($1)", &[&key]).await?;
    Ok(!free)
}

/// What the server said (its message, and its detail where it has one), for a log line:
/// tokio-postgres's own `Display` of a server error is only "db error".
pub fn said(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{} ({detail})", d.message()),
            None => d.message().to_string(),
        },
        None => e.to_string(),
    }
}

/// Did a PostgreSQL error with SQLSTATE `state` cause `e` (anywhere in its chain)?
pub fn caused_by(e: &anyhow::Error, state: &tokio_postgres::error::SqlState) -> bool {
    codes(e).any(|c| c == state)
}

/// The SQLSTATEs of the server errors in `e`'s chain.
fn codes(e: &anyhow::Error) -> impl Iterator<Item = &tokio_postgres::error::SqlState> {
    e.chain().filter_map(|c| {
        c.downcast_ref::<tokio_postgres::Error>()
            .and_then(|p| p.code())
    })
}

/// The server rolled the transaction back (SQLSTATE class 40: a deadlock, a serialization
/// failure): transient, but no connection was lost.
pub fn transaction_rollback(e: &anyhow::Error) -> bool {
    codes(e).any(|c| c.code().starts_with("40"))
}

/// tokio-postgres prepares each statement under a name of its session's own (`s12`); tandem
/// prepares nothing by SQL. A pooler in transaction mode (PgBouncer, Supavisor's port 6543)
/// runs each transaction on whichever server connection is free, where the name is unknown
/// (26000) or another client's (42P05), and PostgreSQL's message names neither the pooler nor
/// the fix: this does.
pub fn pooler_hint(e: &anyhow::Error) -> Option<&'static str> {
    use tokio_postgres::error::SqlState;
    let prepared = caused_by(e, &SqlState::INVALID_SQL_STATEMENT_NAME)
        || caused_by(e, &SqlState::DUPLICATE_PSTATEMENT);
    prepared.then_some(
        "This looks like a connection pooler in transaction mode (PgBouncer, Supavisor) between \
         tandem and the database, which cannot keep tandem's sessions: give the database's own \
         address (on Supabase, the direct connection on port 5432, not the pooler's)",
    )
}

/// Is this a lost connection or a passing condition (worth reconnecting) rather than a refusal?
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => transient_sqlstate(db.code().code()),
        // A value that could not be encoded, or a column decoded, has a cause too, and fails
        // the same way on every connection.
        None if e.to_string().starts_with("error serializing")
            || e.to_string().starts_with("error deserializing") =>
        {
            false
        }
        None => e.is_closed() || std::error::Error::source(e).is_some(),
    }
}

/// 08: connection exception; 57: operator intervention (terminated backend, shutdown, a server
/// starting up or in crash recovery); 53: insufficient resources; 40: serialization failure or
/// deadlock.
pub fn transient_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "57" | "53" | "40"))
}

/// Run `sql` (several statements, simple protocol) and return the text of each column of the
/// last row any of them returned: earlier statements may return rows of their own.
pub async fn last_row(c: &Client, sql: &str) -> Result<Vec<String>> {
    let msgs = c.simple_query(sql).await?;
    last_row_of(&msgs).map_err(|e| anyhow!("{e} by: {sql}"))
}

/// The last row among a simple query's messages, as text.
pub fn last_row_of(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Result<Vec<String>> {
    let row = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .last()
        .ok_or_else(|| anyhow::anyhow!("no row returned"))?;
    (0..row.len())
        .map(|i| {
            row.get(i)
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("NULL in the row returned"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_dropped_network_is_noticed_in_a_minute_unless_the_url_says_otherwise() {
        let mut c: tokio_postgres::Config = "postgresql://u@h/db".parse().unwrap();
        network_defaults(&mut c);
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(10)));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(60)));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(10)));
        assert_eq!(c.get_keepalives_retries(), Some(3));
        let mut c: tokio_postgres::Config = "postgresql://u@h/db?keepalives_idle=300&tcp_user_timeout=5&connect_timeout=2&keepalives_retries=9"
            .parse()
            .unwrap();
        network_defaults(&mut c);
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(300));
        assert_eq!(c.get_keepalives_retries(), Some(9));
    }
}
