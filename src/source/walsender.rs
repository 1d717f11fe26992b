//! Our client of a walsender: the streaming replication protocol on postgres-protocol's codec.
//!
//! pgwire-replication served until #6 needed `proto_version '2'` with `streaming 'on'`: it pins
//! protocol 1 and parses Begin/Commit/Message itself in protocol 1's layout. This client only
//! frames: it connects (TCP or Unix socket, TLS as the SQL side does it, password/MD5/SCRAM),
//! runs `IDENTIFY_SYSTEM` and `START_REPLICATION` with the options we choose, and then splits
//! in two tasks — a reader handing `XLogData` payloads and keepalives out through a small bounded
//! channel, and a writer sending standby status updates with what the applier confirmed. The
//! writer never waits on the reader, so status keeps flowing while the applier is busy and the
//! channel is full.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use crate::lsn::Lsn;

/// What can go wrong on a replication connection.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("replication connection: {0}")]
    Io(#[from] io::Error),
    /// The server's ErrorResponse: its text (severity, message, SQLSTATE, detail, hint) and
    /// SQLSTATE.
    #[error("{text}")]
    Server { text: String, code: String },
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// Nothing came from the server for this long, not even the reply to a ping: a network
    /// that dropped the connection without a word, or a server that hangs.
    #[error(
        "replication connection: nothing from the server in {} s, not even an answer to a \
         ping ([replication] receive_timeout); taking the connection as lost",
        .0.as_secs()
    )]
    Silent(Duration),
}

impl WalError {
    /// The server's error in one line, its detail and hint included: the message alone can hide
    /// the reason ("cannot read from logical replication slot" says why only in its detail).
    fn server(b: &backend::ErrorResponseBody) -> WalError {
        let (mut severity, mut message, mut code) = (String::new(), String::new(), String::new());
        let (mut detail, mut hint) = (String::new(), String::new());
        let mut fields = b.fields();
        while let Ok(Some(f)) = fields.next() {
            let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'S' => severity = v,
                b'M' => message = v,
                b'C' => code = v,
                b'D' => detail = format!(" {v}"),
                b'H' => hint = format!(" Hint: {v}"),
                _ => {}
            }
        }
        WalError::Server {
            text: format!("{severity}: {message} (SQLSTATE {code}).{detail}{hint}"),
            code,
        }
    }

    /// Worth reconnecting for: a lost connection, or a server stopping, starting or
    /// recovering (the SQL side's [`crate::db::is_transient`] classes). Not a protocol violation
    /// (08P01: what a pooler says to a replication connection, every time), nor a slot active
    /// for another walsender: [`crate::source::stream::SourceStream::open`] waits that out for
    /// a while, and past that another process is using the slot.
    pub fn is_transient(&self) -> bool {
        match self {
            WalError::Io(_) | WalError::Silent(_) => true,
            WalError::Server { code, .. } => crate::db::transient_sqlstate(code) && code != "08P01",
            WalError::Protocol(_) => false,
        }
    }
}

/// Where and how to connect, from a libpq-style URL.
#[derive(Clone)]
pub struct WalConfig {
    /// Servers to try in order, as libpq (and tokio-postgres for the SQL side) do: `host` and
    /// `port` lists, and `hostaddr`, which is connected to while `host` still names the server
    /// for TLS.
    targets: Vec<Target>,
    user: String,
    password: Option<Vec<u8>>,
    dbname: String,
    ssl: SslMode,
    tls: crate::tls::Tls,
    connect_timeout: Duration,
    /// Startup `options` (`-c name=value …`): the URL's, to which tandem adds its own.
    pub options: String,
    pub application_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    host: Host,
    port: u16,
    addr: Option<std::net::IpAddr>,
}

/// The servers of a URL in the order to try them.
fn targets(pg: &tokio_postgres::Config) -> Vec<Target> {
    let addrs = pg.get_hostaddrs();
    let hosts: Vec<Host> = match pg.get_hosts() {
        [] if addrs.is_empty() => vec![Host::Tcp("localhost".into())],
        [] => addrs.iter().map(|a| Host::Tcp(a.to_string())).collect(),
        h => h.to_vec(),
    };
    let ports = pg.get_ports();
    hosts
        .into_iter()
        .enumerate()
        .map(|(i, host)| Target {
            host,
            // One port for all hosts, or one each.
            port: ports.get(i).or(ports.first()).copied().unwrap_or(5432),
            addr: addrs.get(i).copied(),
        })
        .collect()
}

impl WalConfig {
    pub fn from_url(url: &str) -> Result<WalConfig, String> {
        let crate::tls::Url { pg, tls, .. } = crate::tls::parse_url(url)?;
        let user = pg.get_user().unwrap_or("postgres").to_string();
        Ok(WalConfig {
            targets: targets(&pg),
            password: pg.get_password().map(<[u8]>::to_vec),
            dbname: pg.get_dbname().unwrap_or(&user).to_string(),
            user,
            ssl: pg.get_ssl_mode(),
            tls,
            connect_timeout: pg
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(10)),
            options: pg.get_options().unwrap_or_default().to_string(),
            application_name: "tandem".into(),
        })
    }
}

trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}
type Stream = Box<dyn Socket>;

/// A replication connection before `START_REPLICATION`: commands run one at a time.
pub struct WalConnection {
    io: Stream,
    buf: BytesMut,
    /// The server's major version (`server_version` at startup; 0 if it did not say).
    pub server_major: u32,
}

/// The server's answer to `IDENTIFY_SYSTEM`.
pub struct SystemId {
    pub system_id: String,
    pub timeline: u32,
}

/// `START_REPLICATION … LOGICAL` options.
pub struct StartOptions<'a> {
    pub slot: &'a str,
    pub start: Lsn,
    pub publication: &'a str,
    pub proto_version: u32,
    /// Ask for in-progress transactions (protocol 2 and up).
    pub streaming: bool,
    /// Lower the walsender's `logical_decoding_work_mem` to this many bytes when it is higher.
    pub decoding_memory_cap: Option<u64>,
    /// See [`crate::config::Config::receive_timeout`].
    pub receive_timeout: Option<Duration>,
}

impl WalConnection {
    pub async fn connect(cfg: &WalConfig) -> Result<WalConnection, WalError> {
        // Each server in turn until one answers (as libpq); once one has, its answer stands:
        // a refused login is not retried on the next.
        let mut last = None;
        for t in &cfg.targets {
            let timed_out = |_| {
                WalError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", cfg.connect_timeout),
                ))
            };
            let open = tokio::time::timeout(cfg.connect_timeout, Self::open(cfg, t)).await;
            match open.map_err(timed_out) {
                Ok(Ok(io)) => {
                    return tokio::time::timeout(cfg.connect_timeout, Self::start_up(cfg, io))
                        .await
                        .map_err(timed_out)?
                }
                Ok(Err(e)) | Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| WalError::Protocol("no host to connect to".into())))
    }

    /// The socket to `t`, TLS negotiated.
    async fn open(cfg: &WalConfig, t: &Target) -> Result<Stream, WalError> {
        Ok(match &t.host {
            Host::Tcp(h) => {
                let s = match t.addr {
                    Some(ip) => tokio::net::TcpStream::connect((ip, t.port)).await?,
                    None => tokio::net::TcpStream::connect((h.as_str(), t.port)).await?,
                };
                s.set_nodelay(true)?;
                tls(cfg, h, s).await?
            }
            Host::Unix(dir) => {
                let path = Path::new(dir).join(format!(".s.PGSQL.{}", t.port));
                Box::new(tokio::net::UnixStream::connect(path).await?)
            }
        })
    }

    async fn start_up(cfg: &WalConfig, io: Stream) -> Result<WalConnection, WalError> {
        let mut c = WalConnection {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
            server_major: 0,
        };
        let mut out = BytesMut::new();
        let params = [
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("replication", "database"),
            ("application_name", cfg.application_name.as_str()),
            // pgoutput's text values and names are converted to it from the server's encoding,
            // as the SQL side's are (tokio-postgres asks for UTF8 too).
            ("client_encoding", "UTF8"),
            ("options", cfg.options.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut out)?;
        c.send(&mut out).await?;
        c.authenticate(cfg).await.map_err(pooler_hint)?;
        // ParameterStatus and BackendKeyData until the server is ready.
        loop {
            match c.read().await.map_err(pooler_hint)? {
                Some(backend::Message::ReadyForQuery(_)) => return Ok(c),
                Some(backend::Message::ParameterStatus(p))
                    if p.name().ok() == Some("server_version") =>
                {
                    let v = p.value().unwrap_or_default();
                    let major = v.split(|ch: char| !ch.is_ascii_digit()).next();
                    c.server_major = major.and_then(|m| m.parse().ok()).unwrap_or(0);
                }
                _ => {}
            }
        }
    }

    async fn authenticate(&mut self, cfg: &WalConfig) -> Result<(), WalError> {
        let password = || {
            cfg.password.as_deref().ok_or_else(|| {
                WalError::Protocol(
                    "the server asks for a password and none is given: put it in the URL \
                     (postgresql://user:password@host/db) or in the password file (~/.pgpass, or \
                     the file PGPASSFILE names)"
                        .into(),
                )
            })
        };
        let mut out = BytesMut::new();
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let msg = self.read().await?.ok_or_else(|| {
                WalError::Protocol("CopyBothResponse during authentication".into())
            })?;
            match msg {
                backend::Message::AuthenticationOk => return Ok(()),
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?, &mut out)?;
                }
                backend::Message::AuthenticationMd5Password(b) => {
                    let h = md5_hash(cfg.user.as_bytes(), password()?, b.salt());
                    frontend::password_message(h.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationSasl(b) => {
                    let mut mechs = b.mechanisms();
                    let mut found = false;
                    while let Some(m) = mechs.next()? {
                        found |= m == sasl::SCRAM_SHA_256;
                    }
                    if !found {
                        return Err(WalError::Protocol(
                            "the server offers no SASL mechanism tandem supports (SCRAM-SHA-256)"
                                .into(),
                        ));
                    }
                    let s =
                        sasl::ScramSha256::new(password()?, sasl::ChannelBinding::unsupported());
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(b) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        WalError::Protocol("SASL continue without SASL start".into())
                    })?;
                    s.update(b.data())?;
                    frontend::sasl_response(s.message(), &mut out)?;
                }
                backend::Message::AuthenticationSaslFinal(b) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        WalError::Protocol("SASL final without SASL start".into())
                    })?;
                    s.finish(b.data())?;
                    continue;
                }
                _ => {
                    return Err(WalError::Protocol(
                        "unsupported authentication method (use password, md5 or scram-sha-256)"
                            .into(),
                    ))
                }
            }
            self.send(&mut out).await?;
        }
    }

    async fn send(&mut self, out: &mut BytesMut) -> Result<(), WalError> {
        self.io.write_all(out).await?;
        self.io.flush().await?;
        out.clear();
        Ok(())
    }

    /// The next backend message; an ErrorResponse becomes `WalError::Server`. `None` stands for
    /// CopyBothResponse, which postgres-protocol does not parse (it serves no replication).
    async fn read(&mut self) -> Result<Option<backend::Message>, WalError> {
        loop {
            if self.buf.len() >= 5 && self.buf[0] == b'W' {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if self.buf.len() > len {
                    self.buf.advance(len + 1);
                    return Ok(None);
                }
            }
            match backend::Message::parse(&mut self.buf)? {
                Some(backend::Message::ErrorResponse(b)) => return Err(WalError::server(&b)),
                Some(backend::Message::NoticeResponse(_)) => continue,
                Some(m) => return Ok(Some(m)),
                None => {
                    if self.io.read_buf(&mut self.buf).await? == 0 {
                        return Err(WalError::Io(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
    }

    /// Run one SQL statement (a logical replication connection takes SQL too), ignoring rows.
    async fn execute(&mut self, sql: &str) -> Result<(), WalError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.send(&mut out).await?;
        while !matches!(self.read().await?, Some(backend::Message::ReadyForQuery(_))) {}
        Ok(())
    }

    pub async fn identify_system(&mut self) -> Result<SystemId, WalError> {
        let mut out = BytesMut::new();
        frontend::query("IDENTIFY_SYSTEM", &mut out)?;
        self.send(&mut out).await?;
        let mut row = None;
        loop {
            match self.read().await? {
                Some(backend::Message::DataRow(d)) => {
                    let mut cols = Vec::new();
                    let mut ranges = d.ranges();
                    while let Some(r) = ranges.next()? {
                        cols.push(
                            r.map(|r| String::from_utf8_lossy(&d.buffer()[r]).into_owned())
                                .unwrap_or_default(),
                        );
                    }
                    row = Some(cols);
                }
                Some(backend::Message::ReadyForQuery(_)) => break,
                _ => {}
            }
        }
        let row = row
            .filter(|r| r.len() >= 2)
            .ok_or_else(|| WalError::Protocol("IDENTIFY_SYSTEM returned no system row".into()))?;
        Ok(SystemId {
            timeline: row[1].parse().map_err(|_| {
                WalError::Protocol(format!("IDENTIFY_SYSTEM timeline {:?}", row[1]))
            })?,
            system_id: row[0].clone(),
        })
    }

    /// Start streaming. Slot and publication names were validated as plain identifiers when the
    /// config was loaded; quotes are doubled anyway.
    pub async fn start(mut self, o: StartOptions<'_>) -> Result<WalStream, WalError> {
        if let Some(cap) = o.decoding_memory_cap {
            // A setting of the session (or the database's, or the role's) that is lower already
            // stays: it was chosen for the source's memory.
            self.execute(&format!(
                "SELECT set_config('logical_decoding_work_mem', '{}kB', false) \
                 WHERE pg_size_bytes(current_setting('logical_decoding_work_mem')) > {cap}",
                cap / 1024
            ))
            .await?;
        }
        let mut opts = format!(
            "proto_version '{}', publication_names '{}', messages 'true'",
            o.proto_version,
            o.publication.replace('\'', "''")
        );
        if o.streaming {
            opts.push_str(", streaming 'on'");
        }
        let sql = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL {} ({opts})",
            o.slot.replace('"', "\"\""),
            o.start
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out)?;
        self.send(&mut out).await?;
        loop {
            if self.read().await?.is_none() {
                break;
            }
        }
        Ok(WalStream::spawn(self, o.start, o.receive_timeout))
    }
}

async fn tls(cfg: &WalConfig, host: &str, s: tokio::net::TcpStream) -> Result<Stream, WalError> {
    if cfg.ssl == SslMode::Disable {
        return Ok(Box::new(s));
    }
    let mut s = s;
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    s.write_all(&out).await?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        if cfg.ssl == SslMode::Require {
            return Err(WalError::Protocol(
                "sslmode=require, but the server does not offer TLS".into(),
            ));
        }
        return Ok(Box::new(s));
    }
    let mut make = cfg.tls.connector().map_err(WalError::Protocol)?;
    let connect = MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut make, host)
        .map_err(|e| WalError::Protocol(format!("TLS: {e}")))?;
    let stream = connect.connect(s).await.map_err(|e| {
        let problem = crate::tls::certificate_problem(&e).unwrap_or_else(|| e.to_string());
        WalError::Protocol(format!("TLS handshake: {problem}"))
    })?;
    Ok(Box::new(stream))
}

/// A connection pooler in front of the server (PgBouncer, Supavisor) refuses the `replication`
/// startup parameter, and the URL that works for SQL is the likely cause: say so, and where to
/// point instead.
fn pooler_hint(e: WalError) -> WalError {
    match e {
        WalError::Server { text, code } if is_pooler_refusal(&text) => WalError::Server {
            text: format!(
                "{text} This looks like a connection pooler (PgBouncer, Supavisor), which \
                 cannot carry replication: give the database's own address (on Supabase, the \
                 direct connection on port 5432, not the pooler's)"
            ),
            code,
        },
        e => e,
    }
}

fn is_pooler_refusal(text: &str) -> bool {
    text.contains("unsupported startup parameter")
}

impl WalError {
    /// A connection pooler's refusal of the `replication` startup parameter: the URL reaches a
    /// pooler, not the server.
    pub fn is_pooler(&self) -> bool {
        matches!(self, WalError::Server { text, .. } if is_pooler_refusal(text))
    }
}

/// What the reader hands out.
#[derive(Debug)]
pub enum WalFrame {
    /// A pgoutput message starting at WAL position `start`.
    XLogData { start: Lsn, data: Bytes },
    /// The server's WAL end while it has nothing more to send.
    Keepalive { wal_end: Lsn },
}

/// Frames in flight between the socket reader and the consumer. Each holds at most one row, so
/// this bounds the stream's memory whatever the transaction size. Small, because a row may be
/// large: with W4's 100 KB rows 512 frames made 51 MB of the peak, and W1/W2 drain as fast with
/// 64 (the socket buffers too).
const BUFFER_FRAMES: usize = 64;

/// Socket reads ask for at least this much room.
const READ_CHUNK: usize = 128 * 1024;

/// The writer looks this often whether the server needs a ping or a heartbeat. A confirmation
/// that moves goes out at once (see [`WalStream::confirm`]).
const STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// A status update goes out at least this often even when nothing changed, well inside the
/// server's `wal_sender_timeout`.
const STATUS_HEARTBEAT: Duration = Duration::from_secs(5);

/// A started replication stream.
pub struct WalStream {
    rx: mpsc::Receiver<Result<WalFrame, WalError>>,
    confirmed: Arc<AtomicU64>,
    /// Wakes the writer when `confirmed` moves.
    advanced: Arc<Notify>,
    stop: Arc<Notify>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

/// When the server was last heard from, shared by the reader (which hears) and the writer
/// (which pings the server when it has been quiet for half the timeout).
#[derive(Clone)]
struct Heard {
    epoch: tokio::time::Instant,
    /// Milliseconds after `epoch`.
    at: Arc<AtomicU64>,
    timeout: Option<Duration>,
}

impl Heard {
    fn now(&self) {
        self.at
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn quiet(&self) -> Duration {
        let at = Duration::from_millis(self.at.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(at)
    }
}

impl WalStream {
    fn spawn(c: WalConnection, start: Lsn, timeout: Option<Duration>) -> WalStream {
        let (rd, wr) = tokio::io::split(c.io);
        let (tx, rx) = mpsc::channel(BUFFER_FRAMES);
        let confirmed = Arc::new(AtomicU64::new(start.0));
        let advanced = Arc::new(Notify::new());
        let reply = Arc::new(Notify::new());
        let stop = Arc::new(Notify::new());
        let heard = Heard {
            epoch: tokio::time::Instant::now(),
            at: Arc::new(AtomicU64::new(0)),
            timeout,
        };
        let reader = tokio::spawn(read_frames(rd, c.buf, tx, reply.clone(), heard.clone()));
        let writer = tokio::spawn(write_status(
            wr,
            (confirmed.clone(), advanced.clone()),
            reply,
            stop.clone(),
            heard,
        ));
        WalStream {
            rx,
            confirmed,
            advanced,
            stop,
            reader,
            writer,
        }
    }

    /// Everything up to `lsn` is durable where it went: the slot may let it go. Never moves back.
    /// It goes out at once: these move at most once per target commit or flush, and every
    /// moment the slot holds what is already durable keeps the source's WAL (and, after a burst,
    /// shows the source as behind).
    pub fn confirm(&self, lsn: Lsn) {
        if self.confirmed.fetch_max(lsn.0, Ordering::Relaxed) < lsn.0 {
            self.advanced.notify_one();
        }
    }

    /// The next frame; `None` once the server ended the stream. Cancel-safe (a channel read).
    pub async fn recv(&mut self) -> Option<Result<WalFrame, WalError>> {
        self.rx.recv().await
    }

    /// Send the last confirmation and end the stream (CopyDone, Terminate).
    pub async fn close(mut self) {
        self.stop.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.writer).await;
    }
}

impl Drop for WalStream {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

async fn read_frames(
    mut rd: ReadHalf<Stream>,
    mut buf: BytesMut,
    tx: mpsc::Sender<Result<WalFrame, WalError>>,
    reply: Arc<Notify>,
    heard: Heard,
) {
    let fail = |e: WalError| async { tx.send(Err(e)).await.ok() };
    loop {
        let msg = match backend::Message::parse(&mut buf) {
            Ok(Some(m)) => m,
            Ok(None) => {
                // Read in large chunks: `parse` reserves only what the current message lacks,
                // and a few bytes per read made a syscall per message.
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
                // Only the read is timed: while the applier is behind, the channel is full and
                // nothing is read, however much the server sent.
                let read = match heard.timeout {
                    Some(t) => match tokio::time::timeout(t, rd.read_buf(&mut buf)).await {
                        Ok(r) => r,
                        Err(_) => {
                            fail(WalError::Silent(t)).await;
                            return;
                        }
                    },
                    None => rd.read_buf(&mut buf).await,
                };
                match read {
                    Ok(0) => return, // the channel closes: "the stream ended"
                    Ok(_) => {
                        heard.now();
                        continue;
                    }
                    Err(e) => {
                        fail(e.into()).await;
                        return;
                    }
                }
            }
            Err(e) => {
                fail(e.into()).await;
                return;
            }
        };
        let frame = match msg {
            backend::Message::CopyData(d) => match copy_data(d.into_bytes()) {
                Ok((frame, wants_reply)) => {
                    if wants_reply {
                        reply.notify_one();
                    }
                    frame
                }
                Err(e) => {
                    fail(e).await;
                    return;
                }
            },
            backend::Message::ErrorResponse(b) => {
                fail(WalError::server(&b)).await;
                return;
            }
            backend::Message::CopyDone => return,
            _ => continue,
        };
        if tx.send(Ok(frame)).await.is_err() {
            return;
        }
    }
}

/// One CopyData payload: `w` XLogData or `k` keepalive (and whether the server wants a reply).
fn copy_data(mut b: Bytes) -> Result<(WalFrame, bool), WalError> {
    let short = || WalError::Protocol("truncated replication message".into());
    if b.is_empty() {
        return Err(short());
    }
    match b.get_u8() {
        b'w' => {
            if b.len() < 24 {
                return Err(short());
            }
            let start = Lsn(b.get_u64());
            b.advance(16); // WAL end, send time
            Ok((WalFrame::XLogData { start, data: b }, false))
        }
        b'k' => {
            if b.len() < 17 {
                return Err(short());
            }
            let wal_end = Lsn(b.get_u64());
            b.advance(8);
            Ok((WalFrame::Keepalive { wal_end }, b.get_u8() != 0))
        }
        t => Err(WalError::Protocol(format!(
            "unexpected replication message type {:?}",
            t as char
        ))),
    }
}

async fn write_status(
    mut wr: WriteHalf<Stream>,
    (confirmed, advanced): (Arc<AtomicU64>, Arc<Notify>),
    reply: Arc<Notify>,
    stop: Arc<Notify>,
    heard: Heard,
) {
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    let mut sent_at = tokio::time::Instant::now();
    let mut out = BytesMut::new();
    let mut pinged = false;
    loop {
        // The server asks for a reply (a keepalive at half its `wal_sender_timeout`) and ends
        // the connection when none comes by the whole: answered at once, as the native
        // walreceiver does, not at the next heartbeat (a 3 s timeout ended every stream).
        let (stopping, asked) = tokio::select! {
            _ = tick.tick() => (false, false),
            _ = reply.notified() => (false, true),
            _ = advanced.notified() => (false, false),
            _ = stop.notified() => (true, false),
        };
        let lsn = confirmed.load(Ordering::Relaxed);
        // A source with nothing to send and everything confirmed sends nothing, so a quiet
        // connection is asked for a keepalive before it counts as lost (as the native
        // walreceiver does at half its wal_receiver_timeout).
        let ping = match heard.timeout {
            Some(t) if heard.quiet() >= t / 2 => !std::mem::replace(&mut pinged, true),
            _ => {
                pinged = false;
                false
            }
        };
        if stopping || asked || ping || lsn != sent || sent_at.elapsed() >= STATUS_HEARTBEAT {
            status_update(lsn, ping, &mut out);
            sent = lsn;
            sent_at = tokio::time::Instant::now();
        }
        if stopping {
            frontend::copy_done(&mut out);
            frontend::terminate(&mut out);
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            out.clear();
        }
        if stopping {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

/// Standby status update: written, flushed and applied all at `lsn` (the slot's
/// `confirmed_flush_lsn` follows "flushed"); `reply` asks the server to answer at once.
fn status_update(lsn: u64, reply: bool, out: &mut BytesMut) {
    let now = crate::event::pg_now_micros();
    let mut body = Vec::with_capacity(34);
    body.push(b'r');
    for _ in 0..3 {
        body.extend_from_slice(&lsn.to_be_bytes());
    }
    body.extend_from_slice(&now.to_be_bytes());
    body.push(u8::from(reply));
    out.extend_from_slice(b"d");
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ErrorResponse with these fields, as the server sends it.
    fn error_response(fields: &[(u8, &str)]) -> backend::ErrorResponseBody {
        let mut body = Vec::new();
        for (t, v) in fields {
            body.push(*t);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut frame = BytesMut::new();
        frame.extend_from_slice(b"E");
        frame.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        frame.extend_from_slice(&body);
        let Ok(Some(backend::Message::ErrorResponse(e))) = backend::Message::parse(&mut frame)
        else {
            panic!("not an ErrorResponse");
        };
        e
    }

    #[test]
    fn a_server_error_reads_with_its_detail_and_hint() {
        let e = error_response(&[
            (b'S', "ERROR"),
            (b'C', "55000"),
            (b'M', "cannot read from logical replication slot \"s\""),
            (
                b'D',
                "This slot has been invalidated because it exceeded the maximum reserved size.",
            ),
            (b'H', "Drop it."),
        ]);
        assert_eq!(
            WalError::server(&e).to_string(),
            "ERROR: cannot read from logical replication slot \"s\" (SQLSTATE 55000). This slot \
             has been invalidated because it exceeded the maximum reserved size. Hint: Drop it."
        );
        // An invalidated slot does not come back by reconnecting.
        assert!(!WalError::server(&e).is_transient());
    }

    #[test]
    fn a_server_stopping_starting_or_recovering_is_reconnected_to_and_a_refusal_is_not() {
        let server = |code: &str, message: &str| {
            WalError::server(&error_response(&[
                (b'S', "FATAL"),
                (b'C', code),
                (b'M', message),
            ]))
        };
        for (code, message) in [
            (
                "57P01",
                "terminating connection due to administrator command",
            ),
            (
                "57P02",
                "terminating connection because of crash of another server process",
            ),
            ("57P03", "the database system is starting up"),
            ("53300", "sorry, too many clients already"),
        ] {
            assert!(server(code, message).is_transient(), "{code} {message}");
        }
        for (code, message) in [
            (
                "28P01",
                "password authentication failed for user \"tandem\"",
            ),
            ("42704", "replication slot \"s\" does not exist"),
            ("55006", "replication slot \"s\" is active for PID 42"),
            ("08P01", "unsupported startup parameter: replication"),
        ] {
            assert!(!server(code, message).is_transient(), "{code} {message}");
        }
        let io = WalError::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(io.is_transient());
        assert!(!WalError::Protocol("truncated replication message".into()).is_transient());
    }

    #[tokio::test]
    async fn a_pooler_refusing_replication_is_named_and_not_retried() {
        // PgBouncer's answer to a replication connection (Supabase's pooler port answers alike).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.unwrap();
            let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            s.read_exact(&mut startup).await.unwrap();
            let mut body = Vec::new();
            for (t, v) in [
                (b'S', "FATAL"),
                (b'C', "08P01"),
                (b'M', "unsupported startup parameter: replication"),
            ] {
                body.push(t);
                body.extend_from_slice(v.as_bytes());
                body.push(0);
            }
            body.push(0);
            let mut frame = vec![b'E'];
            frame.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            frame.extend_from_slice(&body);
            s.write_all(&frame).await.unwrap();
        });
        let cfg = WalConfig::from_url(&format!(
            "postgresql://app@127.0.0.1:{port}/db?sslmode=disable"
        ))
        .unwrap();
        let Err(e) = WalConnection::connect(&cfg).await else {
            panic!("a pooler does not replicate");
        };
        let text = e.to_string();
        assert!(
            text.starts_with("FATAL: unsupported startup parameter: replication (SQLSTATE 08P01).")
                && text.contains("This looks like a connection pooler (PgBouncer, Supavisor)"),
            "{text}"
        );
        assert!(!e.is_transient());
    }

    #[test]
    fn servers_are_tried_in_url_order_with_their_ports_and_hostaddr() {
        let t = |url: &str| targets(&crate::tls::parse_url(url).unwrap().pg);
        let tcp = |h: &str, port, addr: Option<&str>| Target {
            host: Host::Tcp(h.into()),
            port,
            addr: addr.map(|a| a.parse().unwrap()),
        };
        assert_eq!(
            t("postgresql://u@a:5433,b:5434/db"),
            [tcp("a", 5433, None), tcp("b", 5434, None)]
        );
        // One port for every host.
        assert_eq!(
            t("host=a,b port=6000 dbname=db"),
            [tcp("a", 6000, None), tcp("b", 6000, None)]
        );
        // hostaddr is where to connect; host still names the server (for TLS).
        assert_eq!(
            t("postgresql://u@db.example.com/db?hostaddr=10.0.0.5"),
            [tcp("db.example.com", 5432, Some("10.0.0.5"))]
        );
        assert_eq!(
            t("hostaddr=10.0.0.6 dbname=db"),
            [tcp("10.0.0.6", 5432, Some("10.0.0.6"))]
        );
        assert_eq!(t("dbname=db"), [tcp("localhost", 5432, None)]);
    }

    #[test]
    fn copy_data_reads_xlogdata_and_keepalives_and_rejects_short_or_unknown_frames() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x10u64.to_be_bytes());
        w.extend_from_slice(&[0; 16]);
        w.extend_from_slice(b"Bxyz");
        match copy_data(Bytes::from(w)).unwrap() {
            (WalFrame::XLogData { start, data }, false) => {
                assert_eq!(start, Lsn(0x10));
                assert_eq!(&data[..], b"Bxyz");
            }
            other => panic!("{other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x20u64.to_be_bytes());
        k.extend_from_slice(&[0; 8]);
        k.push(1);
        assert!(matches!(
            copy_data(Bytes::from(k)).unwrap(),
            (WalFrame::Keepalive { wal_end: Lsn(0x20) }, true)
        ));
        for bad in [&b""[..], b"w\0\0", b"k\0", b"x"] {
            assert!(copy_data(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_status_update_is_one_copydata_frame_with_the_lsn_three_times() {
        let mut out = BytesMut::new();
        status_update(0x0102_0304_0506_0708, false, &mut out);
        assert_eq!(out[0], b'd');
        assert_eq!(
            i32::from_be_bytes(out[1..5].try_into().unwrap()) as usize,
            out.len() - 1
        );
        assert_eq!(out[5], b'r');
        for i in 0..3 {
            let at = 6 + i * 8;
            assert_eq!(
                u64::from_be_bytes(out[at..at + 8].try_into().unwrap()),
                0x0102_0304_0506_0708
            );
        }
        assert_eq!(*out.last().unwrap(), 0, "no reply requested");
        let mut ping = BytesMut::new();
        status_update(0x0102_0304_0506_0708, true, &mut ping);
        assert_eq!(ping.len(), out.len());
        assert_eq!(*ping.last().unwrap(), 1, "a ping asks for a reply");
    }
}
