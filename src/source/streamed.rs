//! Streamed in-progress transactions (pgoutput protocol 2, `streaming 'on'`), kept on local disk
//! until they commit and then handed on as ordinary whole transactions.
//!
//! Why: without streaming, the source's walsender decodes a large transaction, spills it to its
//! own disk, and only at commit reads it back and sends it — two passes on the source, and
//! nothing reaches us until the end. Streaming sends the changes while they are decoded. We keep
//! them in a file per transaction (never in memory, whatever the size), as PostgreSQL 15's own
//! apply worker does, and replay the file at the transaction's commit: the rest of tandem sees a
//! normal `Begin … Commit` with the commit's LSN and time, so ordering, conflict rules, Kafka and
//! checkpoints work exactly as for any transaction. A subtransaction rolled back while streaming
//! is cut off the file's end (its changes are the file's tail from its first change on, as
//! PostgreSQL's `subxact` bookkeeping also assumes). Files are unlinked as soon as they are
//! created, so a crash leaves nothing behind; after a restart the server streams the
//! transaction again from its first change.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};

use crate::lsn::Lsn;
use crate::source::pgoutput::{self, Begin, Commit, Message};

/// Where spool files go: the system temp dir (unlinked at once, so only their open handles hold
/// space).
fn spool_dir() -> PathBuf {
    std::env::temp_dir()
}

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

struct Spool {
    file: BufWriter<File>,
    len: u64,
    /// A transaction tandem wrote (its marker first), spooled without its changes (see
    /// [`Streamed::drop_echoes`]).
    echo: bool,
    /// Each subtransaction's first change: `(subxid, offset)`, in order of appearance.
    subxacts: Vec<(u32, u64)>,
}

/// A streamed transaction applied while in progress ("live"), as the stream hands it out.
#[derive(Debug)]
pub enum Live {
    /// A block of `xid` begins; `first` for its first block.
    Start { xid: u32, first: bool },
    /// One of its messages; `sub` is the (sub)transaction that made it.
    Message { sub: u32, msg: Message },
    /// The block ends.
    Stop,
    Commit {
        xid: u32,
        commit: Commit,
        /// With [`Streamed::keep_copy`]: its messages, to read again as a whole transaction.
        copy: Option<Replay>,
    },
    /// Its subtransaction `subxid` (or the whole of it, when `subxid == xid`) rolled back.
    Abort { xid: u32, subxid: u32 },
}

/// The in-progress transactions of one stream, and the one being replayed.
#[derive(Default)]
pub struct Streamed {
    open: HashMap<u32, Spool>,
    /// The transaction whose stream block is being received.
    block: Option<u32>,
    replay: Option<Replay>,
    /// One streamed transaction at a time may be applied live instead of spooled.
    live_allowed: bool,
    live: Option<u32>,
    /// Also spool the live transaction, for those who need it again after its commit (Kafka's
    /// events carry the commit's LSN and time, known only at the end).
    keep_copy: bool,
    live_copy: Option<Spool>,
    /// Only a transaction whose first change is at or after this goes live (see
    /// [`Streamed::live_from`]).
    live_from: Lsn,
    /// Transactions to spool even when live would be allowed (a live attempt was blocked).
    spool_only: HashSet<u32>,
    /// Spool tandem's own transactions without their changes (see [`Streamed::drop_echoes`]).
    drop_echoes: bool,
}

/// What became of a message received outside a block.
#[derive(Debug)]
pub enum Taken {
    /// Not about streaming: handle it as usual.
    Pass(Message),
    Live(Live),
    /// Spooled or bookkeeping only.
    Held,
}

/// A committed streamed transaction read back from its spool file: `Begin`, its changes, `Commit`.
pub struct Replay {
    begin: Option<Begin>,
    file: BufReader<File>,
    left: u64,
    commit: Option<Commit>,
    /// Messages are read into this and split off it, so that one allocation serves many (a
    /// message's values are slices of it); one allocation per message showed in the Kafka
    /// task's profile.
    buf: BytesMut,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replay({} bytes left)", self.left)
    }
}

impl Replay {
    /// The next message; `None` after the `Commit`.
    pub fn next_message(&mut self) -> Result<Option<Message>> {
        if let Some(b) = self.begin.take() {
            return Ok(Some(Message::Begin(b)));
        }
        if self.left > 0 {
            let mut len = [0u8; 4];
            self.file
                .read_exact(&mut len)
                .context("reading a spooled change")?;
            let len = u32::from_be_bytes(len) as usize;
            if self.buf.capacity() < len {
                self.buf.reserve(len.max(64 * 1024));
            }
            self.buf.resize(len, 0);
            self.file
                .read_exact(&mut self.buf)
                .context("reading a spooled change")?;
            self.left -= 4 + len as u64;
            let (_, msg) = pgoutput::decode_in(&self.buf.split().freeze(), true)
                .context("decoding a spooled change")?;
            return Ok(Some(msg));
        }
        Ok(self.commit.take().map(Message::Commit))
    }
}

impl Streamed {
    /// `live_allowed`: the first streamed transaction while none is live is handed out live
    /// (unless it is in `spool_only`); the others are spooled.
    pub fn new(live_allowed: bool, spool_only: HashSet<u32>) -> Streamed {
        Streamed {
            live_allowed,
            spool_only,
            ..Default::default()
        }
    }

    /// Only a transaction whose first change comes at or after `lsn` may go live. The stream
    /// may start before the target's checkpoint (Kafka lags it): a transaction begun before the
    /// checkpoint may have been applied already, which only its commit tells, and the live path
    /// would write its rows again before learning it; spooled, it is skipped at its commit.
    pub fn live_from(mut self, lsn: Lsn) -> Streamed {
        self.live_from = lsn;
        self
    }

    /// Spool a transaction tandem itself wrote (its marker first: an echo, left out once
    /// replayed) without its changes: only its marker and the relation and type messages,
    /// which later transactions rely on (pgoutput does not send a relation again after a
    /// streamed transaction that sent it committed). For a large apply on this side, such as an
    /// initial snapshot's copy or a big transaction from the other side, the spool then holds a
    /// few messages instead of every row. Not when something reads an echo's changes (Kafka
    /// publishes them as `skipped_echo`).
    pub fn drop_echoes(mut self, on: bool) -> Streamed {
        self.drop_echoes = on;
        self
    }

    /// Keep a spooled copy of each live transaction, handed out with its [`Live::Commit`].
    pub fn keep_copy(mut self, on: bool) -> Streamed {
        self.keep_copy = on;
        self
    }

    /// Inside a stream block: messages carry their xid (and go to the spool, unless live).
    pub fn inside_block(&self) -> bool {
        self.block.is_some()
    }

    /// In-progress transactions held (for status and tests).
    pub fn open_transactions(&self) -> usize {
        self.open.len()
    }

    /// The next message of a committed streamed transaction being handed on, if any.
    pub fn next_replayed(&mut self) -> Result<Option<Message>> {
        let Some(r) = &mut self.replay else {
            return Ok(None);
        };
        let msg = r.next_message()?;
        if matches!(msg, None | Some(Message::Commit(_))) {
            self.replay = None;
        }
        Ok(msg)
    }

    /// The transaction applied live right now, if any.
    pub fn live(&self) -> Option<u32> {
        self.live
    }

    /// [`Streamed::take_at`] for tests: positions do not matter.
    #[cfg(test)]
    pub fn take(&mut self, msg: Message) -> Result<Taken> {
        self.take_at(msg, Lsn(u64::MAX))
    }

    /// Take one message received outside a stream block, sent at WAL position `at` (for a
    /// block's Stream Start, its first change).
    pub fn take_at(&mut self, msg: Message, at: Lsn) -> Result<Taken> {
        match msg {
            Message::StreamStart { xid, first } => {
                if let Some(x) = self.block {
                    bail!("pgoutput started a stream block for {xid} inside the block of {x}");
                }
                let live_now = self.live == Some(xid);
                if first
                    && self.live.is_none()
                    && self.live_allowed
                    && at >= self.live_from
                    && !self.spool_only.contains(&xid)
                {
                    self.live = Some(xid);
                    self.block = Some(xid);
                    self.live_copy = if self.keep_copy {
                        Some(Spool::create(xid)?)
                    } else {
                        None
                    };
                    return Ok(Taken::Live(Live::Start { xid, first }));
                }
                if live_now {
                    if first {
                        bail!("pgoutput streamed transaction {xid} twice from its start");
                    }
                    self.block = Some(xid);
                    return Ok(Taken::Live(Live::Start { xid, first }));
                }
                if first {
                    if self.open.contains_key(&xid) {
                        bail!("pgoutput streamed transaction {xid} twice from its start");
                    }
                    self.open.insert(xid, Spool::create(xid)?);
                } else if !self.open.contains_key(&xid) {
                    bail!("pgoutput continued streamed transaction {xid} that never started");
                }
                self.block = Some(xid);
                Ok(Taken::Held)
            }
            Message::StreamStop => bail!("pgoutput sent Stream Stop outside a stream block"),
            Message::StreamCommit { xid, commit } if self.live == Some(xid) => {
                self.live = None;
                let copy = match self.live_copy.take() {
                    Some(spool) => Some(spool.replay(xid, commit)?),
                    None => None,
                };
                Ok(Taken::Live(Live::Commit { xid, commit, copy }))
            }
            Message::StreamAbort { xid, subxid } if self.live == Some(xid) => {
                if subxid == xid {
                    self.live = None;
                    self.live_copy = None;
                } else if let Some(s) = &mut self.live_copy {
                    s.cut(subxid)?;
                }
                Ok(Taken::Live(Live::Abort { xid, subxid }))
            }
            Message::StreamCommit { xid, commit } => {
                let spool = self.open.remove(&xid).ok_or_else(|| {
                    anyhow!("pgoutput committed unknown streamed transaction {xid}")
                })?;
                if self.replay.is_some() {
                    bail!("pgoutput committed {xid} while another was being handed on");
                }
                self.replay = Some(spool.replay(xid, commit)?);
                Ok(Taken::Held)
            }
            Message::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    // Unknown is fine: a transaction may abort before any change was streamed.
                    self.open.remove(&xid);
                } else if let Some(s) = self.open.get_mut(&xid) {
                    s.cut(subxid)?;
                }
                Ok(Taken::Held)
            }
            other => Ok(Taken::Pass(other)),
        }
    }

    /// One message inside the current stream block (raw, as received): spooled, or handed out
    /// when its transaction is live.
    pub fn in_block(&mut self, data: &Bytes) -> Result<Option<Live>> {
        let xid = self.block.expect("in_block is called inside a block");
        if data.first() == Some(&b'E') {
            self.block = None;
            return Ok((self.live == Some(xid)).then_some(Live::Stop));
        }
        if self.live == Some(xid) {
            let (sub, msg) = pgoutput::decode_in(data, true)?;
            if let Some(copy) = &mut self.live_copy {
                copy.add(xid, data)?;
            }
            return Ok(Some(Live::Message {
                sub: sub.unwrap_or(xid),
                msg,
            }));
        }
        let spool = self.open.get_mut(&xid).expect("the block's spool is open");
        if self.drop_echoes && spool.len == 0 && is_marker(data) {
            spool.echo = true;
        }
        if spool.echo && data.first().is_some_and(|t| b"IUDT".contains(t)) {
            return Ok(None);
        }
        spool.add(xid, data)?;
        Ok(None)
    }
}

/// Is this streamed message tandem's marker?
fn is_marker(data: &Bytes) -> bool {
    matches!(
        pgoutput::decode_in(data, true),
        Ok((_, Message::Message(m))) if crate::source::assemble::is_marker(&m)
    )
}

impl Spool {
    fn create(xid: u32) -> Result<Spool> {
        let path = spool_dir().join(format!(
            "tandem-{}-{xid}-{}.spool",
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {} for a streamed transaction", path.display()))?;
        let _ = std::fs::remove_file(&path);
        Ok(Spool {
            file: BufWriter::with_capacity(64 * 1024, file),
            len: 0,
            echo: false,
            subxacts: Vec::new(),
        })
    }

    /// One message of transaction `xid`'s stream blocks.
    fn add(&mut self, xid: u32, data: &Bytes) -> Result<()> {
        // Messages carry their (sub)transaction right after the tag (checked when replayed).
        // Relation messages count too: after any abort pgoutput sends the relation again.
        if let (Some(t), Some(sub)) = (data.first(), data.get(1..5)) {
            let sub = u32::from_be_bytes(sub.try_into().expect("4 bytes"));
            let carries = pgoutput::STREAMED_XID.contains(t);
            if carries && sub != xid && !self.subxacts.iter().any(|s| s.0 == sub) {
                self.subxacts.push((sub, self.len));
            }
        }
        self.write(data)
    }

    fn write(&mut self, data: &Bytes) -> Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| anyhow!("a streamed change over 4 GiB"))?;
        self.file
            .write_all(&len.to_be_bytes())
            .and_then(|_| self.file.write_all(data))
            .context("spooling a streamed change to the temp dir (is it full?)")?;
        self.len += 4 + data.len() as u64;
        Ok(())
    }

    /// Drop subtransaction `subxid`'s changes and everything after them.
    fn cut(&mut self, subxid: u32) -> Result<()> {
        let Some(i) = self.subxacts.iter().position(|s| s.0 == subxid) else {
            return Ok(()); // it changed nothing
        };
        let at = self.subxacts[i].1;
        self.subxacts.truncate(i);
        self.file.flush()?;
        self.file.get_mut().set_len(at)?;
        self.file.seek(SeekFrom::Start(at))?;
        self.len = at;
        Ok(())
    }

    fn replay(self, xid: u32, commit: Commit) -> Result<Replay> {
        let mut file = self
            .file
            .into_inner()
            .map_err(|e| anyhow!("flushing a spooled transaction: {}", e.error()))?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Replay {
            begin: Some(Begin {
                final_lsn: commit.commit_lsn,
                commit_ts: commit.commit_ts,
                xid,
            }),
            file: BufReader::with_capacity(64 * 1024, file),
            left: self.len,
            commit: Some(commit),
            buf: BytesMut::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::encode;
    use crate::source::pgoutput::Value;

    fn insert(id: &str) -> Message {
        Message::Insert {
            rel: 7,
            new: vec![Value::Text(Bytes::copy_from_slice(id.as_bytes()))],
        }
    }

    fn logical(prefix: &str) -> Message {
        Message::Message(pgoutput::LogicalMessage {
            transactional: true,
            lsn: Lsn(1),
            prefix: prefix.into(),
            content: Bytes::from_static(b"D 0/1"),
        })
    }

    fn relation() -> Message {
        Message::Relation(pgoutput::Relation {
            id: 7,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![pgoutput::RelColumn {
                key: true,
                name: "id".into(),
                type_oid: 25,
                type_modifier: -1,
            }],
        })
    }

    /// Message kinds by their tag, for comparing what a replay gave.
    fn tags(ms: &[Message]) -> String {
        ms.iter().map(|m| encode::message(m)[0] as char).collect()
    }

    #[test]
    fn an_echo_is_spooled_without_its_changes_unless_they_are_wanted() {
        use crate::source::assemble::{DDL_PREFIX, MARKER_PREFIX};
        for drop in [true, false] {
            let mut s = Streamed::new(false, HashSet::new()).drop_echoes(drop);
            // tandem's own: its marker first, then a relation and rows, over two blocks with a
            // subtransaction.
            block(
                &mut s,
                5,
                true,
                &[
                    (5, logical(MARKER_PREFIX)),
                    (5, relation()),
                    (5, insert("a")),
                ],
            );
            block(&mut s, 5, false, &[(51, insert("b"))]);
            // Not tandem's: a row first (a marker later does not make it one), or another
            // prefix first.
            block(
                &mut s,
                6,
                true,
                &[(6, insert("c")), (6, logical(MARKER_PREFIX))],
            );
            block(
                &mut s,
                8,
                true,
                &[(8, logical(DDL_PREFIX)), (8, insert("d"))],
            );
            let echo = commit(&mut s, 5, 100);
            assert_eq!(tags(&echo), if drop { "BMRC" } else { "BMRIIC" });
            assert_eq!(tags(&commit(&mut s, 6, 200)), "BIMC");
            assert_eq!(tags(&commit(&mut s, 8, 300)), "BMIC");
        }
    }

    fn block(s: &mut Streamed, xid: u32, first: bool, changes: &[(u32, Message)]) {
        assert!(matches!(
            s.take(Message::StreamStart { xid, first }).unwrap(),
            Taken::Held
        ));
        assert!(s.inside_block());
        for (sub, m) in changes {
            assert!(s.in_block(&encode::streamed(*sub, m)).unwrap().is_none());
        }
        let stop = s.in_block(&encode::message(&Message::StreamStop)).unwrap();
        assert!(stop.is_none());
        assert!(!s.inside_block());
    }

    fn commit(s: &mut Streamed, xid: u32, lsn: u64) -> Vec<Message> {
        let c = Commit {
            flags: 0,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 8),
            commit_ts: 42,
        };
        assert!(matches!(
            s.take(Message::StreamCommit { xid, commit: c }).unwrap(),
            Taken::Held
        ));
        let mut out = Vec::new();
        while let Some(m) = s.next_replayed().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn interleaved_transactions_replay_whole_at_their_commits_without_aborted_subtransactions() {
        let mut s = Streamed::default();
        block(&mut s, 10, true, &[(10, insert("a")), (11, insert("b"))]);
        block(&mut s, 20, true, &[(20, insert("x"))]);
        // Subtransaction 12 comes after 11; rolling back 11 drops both (nested savepoints).
        block(&mut s, 10, false, &[(12, insert("c"))]);
        assert!(matches!(
            s.take(Message::StreamAbort {
                xid: 10,
                subxid: 11
            })
            .unwrap(),
            Taken::Held
        ));
        block(&mut s, 10, false, &[(10, insert("d"))]);
        // A whole transaction in between passes straight through.
        assert!(matches!(s.take(insert("t")).unwrap(), Taken::Pass(m) if m == insert("t")));
        assert_eq!(s.open_transactions(), 2);

        let x = commit(&mut s, 20, 0x100);
        assert_eq!(x.len(), 3);
        assert!(
            matches!(&x[0], Message::Begin(b) if b.xid == 20 && b.final_lsn == Lsn(0x100) && b.commit_ts == 42)
        );
        assert_eq!(x[1], insert("x"));
        assert!(matches!(&x[2], Message::Commit(c) if c.end_lsn == Lsn(0x108)));

        let t = commit(&mut s, 10, 0x200);
        assert_eq!(&t[1..t.len() - 1], &[insert("a"), insert("d")]);
        assert_eq!(s.open_transactions(), 0);
    }

    #[test]
    fn one_transaction_at_a_time_is_live_the_others_spool() {
        let mut s = Streamed::new(true, [30].into_iter().collect());
        let start = |s: &mut Streamed, xid, first| s.take(Message::StreamStart { xid, first });
        assert!(matches!(
            start(&mut s, 10, true).unwrap(),
            Taken::Live(Live::Start {
                xid: 10,
                first: true
            })
        ));
        match s.in_block(&encode::streamed(11, &insert("a"))).unwrap() {
            Some(Live::Message { sub: 11, msg }) => assert_eq!(msg, insert("a")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.in_block(&encode::message(&Message::StreamStop)).unwrap(),
            Some(Live::Stop)
        ));
        // While 10 is live, 20 spools; 30 spools whatever (a live attempt was blocked).
        block(&mut s, 20, true, &[(20, insert("x"))]);
        assert_eq!(s.live(), Some(10));
        assert!(matches!(
            start(&mut s, 10, false).unwrap(),
            Taken::Live(Live::Start {
                xid: 10,
                first: false
            })
        ));
        s.in_block(&encode::message(&Message::StreamStop)).unwrap();
        assert!(matches!(
            s.take(Message::StreamAbort {
                xid: 10,
                subxid: 11
            })
            .unwrap(),
            Taken::Live(Live::Abort {
                xid: 10,
                subxid: 11
            })
        ));
        let c = Commit {
            flags: 0,
            commit_lsn: Lsn(5),
            end_lsn: Lsn(6),
            commit_ts: 1,
        };
        assert!(matches!(
            s.take(Message::StreamCommit { xid: 10, commit: c })
                .unwrap(),
            Taken::Live(Live::Commit { xid: 10, .. })
        ));
        assert_eq!(s.live(), None);
        block(&mut s, 30, true, &[(30, insert("y"))]);
        assert_eq!(s.live(), None);
        assert_eq!(s.open_transactions(), 2);
    }

    #[test]
    fn a_live_transaction_comes_with_its_copy_when_asked_without_rolled_back_subtransactions() {
        let mut s = Streamed::new(true, HashSet::new()).keep_copy(true);
        let live_block = |s: &mut Streamed, first, changes: &[(u32, Message)]| {
            assert!(matches!(
                s.take(Message::StreamStart { xid: 10, first }).unwrap(),
                Taken::Live(Live::Start { xid: 10, .. })
            ));
            for (sub, m) in changes {
                let got = s.in_block(&encode::streamed(*sub, m)).unwrap();
                assert!(matches!(got, Some(Live::Message { msg, .. }) if msg == *m));
            }
            s.in_block(&encode::message(&Message::StreamStop)).unwrap();
        };
        live_block(&mut s, true, &[(10, insert("a")), (11, insert("b"))]);
        live_block(&mut s, false, &[(12, insert("c"))]);
        s.take(Message::StreamAbort {
            xid: 10,
            subxid: 11,
        })
        .unwrap();
        live_block(&mut s, false, &[(10, insert("d"))]);
        let c = Commit {
            flags: 0,
            commit_lsn: Lsn(0x300),
            end_lsn: Lsn(0x308),
            commit_ts: 7,
        };
        let Taken::Live(Live::Commit {
            copy: Some(mut copy),
            ..
        }) = s
            .take(Message::StreamCommit { xid: 10, commit: c })
            .unwrap()
        else {
            panic!("a live commit with its copy");
        };
        let mut out = Vec::new();
        while let Some(m) = copy.next_message().unwrap() {
            out.push(m);
        }
        assert!(
            matches!(&out[0], Message::Begin(b) if b.xid == 10 && b.final_lsn == Lsn(0x300) && b.commit_ts == 7)
        );
        assert_eq!(&out[1..3], &[insert("a"), insert("d")]);
        assert_eq!(out[3], Message::Commit(c));
        assert_eq!(out.len(), 4);

        // A transaction begun before `live_from` is spooled; one begun at it goes live.
        let mut s = Streamed::new(true, HashSet::new()).live_from(Lsn(0x500));
        assert!(matches!(
            s.take_at(
                Message::StreamStart {
                    xid: 7,
                    first: true
                },
                Lsn(0x4ff)
            )
            .unwrap(),
            Taken::Held
        ));
        s.in_block(&encode::message(&Message::StreamStop)).unwrap();
        assert!(matches!(
            s.take_at(
                Message::StreamStart {
                    xid: 8,
                    first: true
                },
                Lsn(0x500)
            )
            .unwrap(),
            Taken::Live(Live::Start { xid: 8, .. })
        ));
        s.in_block(&encode::message(&Message::StreamStop)).unwrap();
        assert_eq!((s.live(), s.open_transactions()), (Some(8), 1));

        // Without asking, no copy.
        let mut s = Streamed::new(true, HashSet::new());
        s.take(Message::StreamStart {
            xid: 5,
            first: true,
        })
        .unwrap();
        s.in_block(&encode::message(&Message::StreamStop)).unwrap();
        assert!(matches!(
            s.take(Message::StreamCommit { xid: 5, commit: c }).unwrap(),
            Taken::Live(Live::Commit { copy: None, .. })
        ));
    }

    #[test]
    fn an_aborted_transaction_leaves_nothing_and_protocol_breaches_are_errors() {
        let mut s = Streamed::default();
        block(&mut s, 10, true, &[(10, insert("a"))]);
        s.take(Message::StreamAbort {
            xid: 10,
            subxid: 10,
        })
        .unwrap();
        assert_eq!(s.open_transactions(), 0);
        // Abort of a transaction that streamed nothing: fine.
        s.take(Message::StreamAbort {
            xid: 99,
            subxid: 99,
        })
        .unwrap();

        let e = s
            .take(Message::StreamStart {
                xid: 5,
                first: false,
            })
            .unwrap_err();
        assert!(e.to_string().contains("never started"), "{e}");
        let e = s
            .take(Message::StreamCommit {
                xid: 6,
                commit: Commit {
                    flags: 0,
                    commit_lsn: Lsn(1),
                    end_lsn: Lsn(2),
                    commit_ts: 0,
                },
            })
            .unwrap_err();
        assert!(
            e.to_string().contains("unknown streamed transaction 6"),
            "{e}"
        );
        assert!(s.take(Message::StreamStop).is_err());
    }
}
