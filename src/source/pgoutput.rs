//! Pure decoder for PostgreSQL's `pgoutput` logical replication protocol, versions 1 and 2
//! (version 2 adds streamed in-progress transactions).
//!
//! Bytes in, typed messages out: no I/O, no allocation beyond the message itself, and no panic on
//! any input (fuzzed by `fuzz/fuzz_targets/pgoutput.rs`). Column values are zero-copy slices of the
//! input buffer. Layouts follow PostgreSQL's `src/backend/replication/logical/proto.c`.

use bytes::Bytes;

use crate::lsn::Lsn;

/// One pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        rel: u32,
        new: Tuple,
    },
    Update {
        rel: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        rel: u32,
        old: OldTuple,
    },
    Truncate(Truncate),
    /// A logical decoding message from `pg_logical_emit_message`.
    Message(LogicalMessage),
    /// Protocol 2: a block of an in-progress transaction's changes follows, up to `StreamStop`.
    /// Inside the block every change message carries the (sub)transaction id (`decode_in`).
    StreamStart {
        xid: u32,
        first: bool,
    },
    StreamStop,
    /// The streamed transaction `xid` committed.
    StreamCommit {
        xid: u32,
        commit: Commit,
    },
    /// The streamed transaction `xid` (when `subxid == xid`) or its subtransaction `subxid`
    /// rolled back: its changes are void.
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00 UTC.
    pub commit_ts: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position a consumer confirms once the transaction is durable.
    pub end_lsn: Lsn,
    pub commit_ts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The old row image of an update or delete.
#[derive(Debug, Clone, PartialEq)]
pub struct OldTuple {
    /// `true` for `O` (the whole old row, `REPLICA IDENTITY FULL`), `false` for `K` (key columns only).
    pub full: bool,
    pub tuple: Tuple,
}

pub type Tuple = Vec<Value>;

/// One column of a row image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    /// A TOASTed value the update did not change; PostgreSQL does not send it, so it must never be
    /// written (the target keeps its own copy).
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub rels: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// What was wrong with a message, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error("pgoutput `{tag}` message ends early at byte {at}: needed {needed} more bytes")]
    Truncated { tag: char, at: usize, needed: usize },
    #[error("pgoutput `{tag}` message: {what} at byte {at}")]
    Invalid { tag: char, at: usize, what: String },
    #[error(
        "pgoutput message type `{0}` is not part of protocol version 2 \
         (two-phase transactions are not enabled by tandem)"
    )]
    Unsupported(char),
    #[error("pgoutput `{tag}` message has {extra} unexpected trailing bytes")]
    Trailing { tag: char, extra: usize },
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: char,
}

impl<'a> Reader<'a> {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        let left = self.buf.len() - self.pos;
        if left < n {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                at: self.pos,
                needed: n - left,
            });
        }
        Ok(())
    }

    fn invalid(&self, what: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            tag: self.tag,
            at: self.pos,
            what: what.into(),
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        let v = self.buf[self.pos];
        self.pos += 1;
        Ok(v)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array()?)))
    }

    /// A NUL-terminated string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.invalid("string without NUL terminator"))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| self.invalid("string is not valid UTF-8"))?
            .to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        self.need(len)?;
        let b = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(b)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16()?;
        if n < 0 {
            return Err(self.invalid(format!("negative column count {n}")));
        }
        // Each column takes at least one byte: refuse counts the buffer cannot hold before
        // reserving memory for them.
        self.need(n as usize)?;
        let mut cols = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let v = match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(self.invalid(format!("negative value length {len}")));
                    }
                    let data = self.bytes(len as usize)?;
                    if kind == b't' {
                        Value::Text(data)
                    } else {
                        Value::Binary(data)
                    }
                }
                other => {
                    return Err(self.invalid(format!(
                        "unknown column kind 0x{other:02x} (expected n, u, t or b)"
                    )))
                }
            };
            cols.push(v);
        }
        Ok(cols)
    }

    fn old_tuple(&mut self, kind: u8) -> Result<OldTuple, DecodeError> {
        Ok(OldTuple {
            full: kind == b'O',
            tuple: self.tuple()?,
        })
    }

    fn finish(self) -> Result<(), DecodeError> {
        let extra = self.buf.len() - self.pos;
        if extra != 0 {
            return Err(DecodeError::Trailing {
                tag: self.tag,
                extra,
            });
        }
        Ok(())
    }
}

/// Decode one pgoutput message (the payload of one `XLogData`) outside a stream block.
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    decode_in(buf, false).map(|(_, m)| m)
}

/// The message types that carry their transaction's id inside a stream block.
pub const STREAMED_XID: &[u8] = b"RYIUDTM";

/// Decode one pgoutput message; inside a stream block (`StreamStart` … `StreamStop`), change
/// messages start with their (sub)transaction id, returned with the message.
pub fn decode_in(buf: &Bytes, in_block: bool) -> Result<(Option<u32>, Message), DecodeError> {
    let tag_byte = *buf.first().ok_or(DecodeError::Empty)?;
    let tag = tag_byte as char;
    let mut r = Reader { buf, pos: 1, tag };
    let xid = if in_block && STREAMED_XID.contains(&tag_byte) {
        Some(r.u32()?)
    } else {
        None
    };
    let msg = match tag_byte {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn()?,
            commit_ts: r.i64()?,
            xid: r.u32()?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_ts: r.i64()?,
        }),
        b'O' => Message::Origin {
            commit_lsn: r.lsn()?,
            name: r.string()?,
        },
        b'R' => {
            let id = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            if n < 0 {
                return Err(r.invalid(format!("negative column count {n}")));
            }
            r.need(n as usize)?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                columns.push(RelColumn {
                    key: r.u8()? & 1 == 1,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32()?,
            namespace: r.string()?,
            name: r.string()?,
        },
        b'I' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    rel,
                    new: r.tuple()?,
                },
                k => {
                    return Err(r.invalid(format!("expected `N` before the new row, got 0x{k:02x}")))
                }
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let (old, n) = match r.u8()? {
                k @ (b'K' | b'O') => {
                    let old = r.old_tuple(k)?;
                    (Some(old), r.u8()?)
                }
                k => (None, k),
            };
            if n != b'N' {
                return Err(r.invalid(format!("expected `N` before the new row, got 0x{n:02x}")));
            }
            Message::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32()?;
            match r.u8()? {
                k @ (b'K' | b'O') => Message::Delete {
                    rel,
                    old: r.old_tuple(k)?,
                },
                k => {
                    return Err(r.invalid(format!(
                        "expected `K` or `O` before the old row, got 0x{k:02x}"
                    )))
                }
            }
        }
        b'T' => {
            let n = r.i32()?;
            if n < 0 {
                return Err(r.invalid(format!("negative relation count {n}")));
            }
            let options = r.u8()?;
            r.need(4 * n as usize)?;
            let mut rels = Vec::with_capacity(n as usize);
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            Message::Truncate(Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                rels,
            })
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = r.lsn()?;
            let prefix = r.string()?;
            let len = r.i32()?;
            if len < 0 {
                return Err(r.invalid(format!("negative content length {len}")));
            }
            Message::Message(LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len as usize)?,
            })
        }
        b'S' => Message::StreamStart {
            xid: r.u32()?,
            first: r.u8()? == 1,
        },
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit {
            xid: r.u32()?,
            commit: Commit {
                flags: r.u8()?,
                commit_lsn: r.lsn()?,
                end_lsn: r.lsn()?,
                commit_ts: r.i64()?,
            },
        },
        b'A' => Message::StreamAbort {
            xid: r.u32()?,
            subxid: r.u32()?,
        },
        other => return Err(DecodeError::Unsupported(other as char)),
    };
    r.finish()?;
    Ok((xid, msg))
}

/// Encoders for tests and fuzz seeds: the inverse of [`decode`].
pub mod encode {
    use super::*;

    fn tuple(out: &mut Vec<u8>, t: &Tuple) {
        out.extend_from_slice(&(t.len() as i16).to_be_bytes());
        for v in t {
            match v {
                Value::Null => out.push(b'n'),
                Value::UnchangedToast => out.push(b'u'),
                Value::Text(b) | Value::Binary(b) => {
                    out.push(if matches!(v, Value::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn commit(o: &mut Vec<u8>, c: &Commit) {
        o.push(c.flags);
        o.extend_from_slice(&c.commit_lsn.0.to_be_bytes());
        o.extend_from_slice(&c.end_lsn.0.to_be_bytes());
        o.extend_from_slice(&c.commit_ts.to_be_bytes());
    }

    /// `m` as sent inside a stream block by (sub)transaction `xid`.
    pub fn streamed(xid: u32, m: &Message) -> Bytes {
        let plain = message(m);
        if !STREAMED_XID.contains(&plain[0]) {
            return plain;
        }
        let mut o = Vec::with_capacity(plain.len() + 4);
        o.push(plain[0]);
        o.extend_from_slice(&xid.to_be_bytes());
        o.extend_from_slice(&plain[1..]);
        Bytes::from(o)
    }

    pub fn message(m: &Message) -> Bytes {
        let mut o = Vec::new();
        match m {
            Message::Begin(b) => {
                o.push(b'B');
                o.extend_from_slice(&b.final_lsn.0.to_be_bytes());
                o.extend_from_slice(&b.commit_ts.to_be_bytes());
                o.extend_from_slice(&b.xid.to_be_bytes());
            }
            Message::Commit(c) => {
                o.push(b'C');
                commit(&mut o, c);
            }
            Message::StreamStart { xid, first } => {
                o.push(b'S');
                o.extend_from_slice(&xid.to_be_bytes());
                o.push(*first as u8);
            }
            Message::StreamStop => o.push(b'E'),
            Message::StreamCommit { xid, commit: c } => {
                o.push(b'c');
                o.extend_from_slice(&xid.to_be_bytes());
                commit(&mut o, c);
            }
            Message::StreamAbort { xid, subxid } => {
                o.push(b'A');
                o.extend_from_slice(&xid.to_be_bytes());
                o.extend_from_slice(&subxid.to_be_bytes());
            }
            Message::Origin { commit_lsn, name } => {
                o.push(b'O');
                o.extend_from_slice(&commit_lsn.0.to_be_bytes());
                cstr(&mut o, name);
            }
            Message::Relation(r) => {
                o.push(b'R');
                o.extend_from_slice(&r.id.to_be_bytes());
                cstr(&mut o, &r.namespace);
                cstr(&mut o, &r.name);
                o.push(r.replica_identity);
                o.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
                for c in &r.columns {
                    o.push(c.key as u8);
                    cstr(&mut o, &c.name);
                    o.extend_from_slice(&c.type_oid.to_be_bytes());
                    o.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type {
                oid,
                namespace,
                name,
            } => {
                o.push(b'Y');
                o.extend_from_slice(&oid.to_be_bytes());
                cstr(&mut o, namespace);
                cstr(&mut o, name);
            }
            Message::Insert { rel, new } => {
                o.push(b'I');
                o.extend_from_slice(&rel.to_be_bytes());
                o.push(b'N');
                tuple(&mut o, new);
            }
            Message::Update { rel, old, new } => {
                o.push(b'U');
                o.extend_from_slice(&rel.to_be_bytes());
                if let Some(old) = old {
                    o.push(if old.full { b'O' } else { b'K' });
                    tuple(&mut o, &old.tuple);
                }
                o.push(b'N');
                tuple(&mut o, new);
            }
            Message::Delete { rel, old } => {
                o.push(b'D');
                o.extend_from_slice(&rel.to_be_bytes());
                o.push(if old.full { b'O' } else { b'K' });
                tuple(&mut o, &old.tuple);
            }
            Message::Truncate(t) => {
                o.push(b'T');
                o.extend_from_slice(&(t.rels.len() as i32).to_be_bytes());
                o.push(t.cascade as u8 | (t.restart_identity as u8) << 1);
                for r in &t.rels {
                    o.extend_from_slice(&r.to_be_bytes());
                }
            }
            Message::Message(m) => {
                o.push(b'M');
                o.push(m.transactional as u8);
                o.extend_from_slice(&m.lsn.0.to_be_bytes());
                cstr(&mut o, &m.prefix);
                o.extend_from_slice(&(m.content.len() as i32).to_be_bytes());
                o.extend_from_slice(&m.content);
            }
        }
        Bytes::from(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Begin(Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_ts: 786_000_000_123,
                xid: 742,
            }),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x16_B374_D848),
                end_lsn: Lsn(0x16_B374_D878),
                commit_ts: 786_000_000_123,
            }),
            Message::Origin {
                commit_lsn: Lsn(99),
                name: "tandem_from_D".into(),
            },
            Message::Relation(Relation {
                id: 16384,
                namespace: "public".into(),
                name: "jobs".into(),
                replica_identity: b'd',
                columns: vec![
                    RelColumn {
                        key: true,
                        name: "id".into(),
                        type_oid: 20,
                        type_modifier: -1,
                    },
                    RelColumn {
                        key: false,
                        name: "note".into(),
                        type_oid: 25,
                        type_modifier: -1,
                    },
                ],
            }),
            Message::Type {
                oid: 90000,
                namespace: "public".into(),
                name: "mood".into(),
            },
            Message::Insert {
                rel: 16384,
                new: vec![text("1"), Value::Null],
            },
            Message::Update {
                rel: 16384,
                old: Some(OldTuple {
                    full: false,
                    tuple: vec![text("1"), Value::Null],
                }),
                new: vec![text("2"), Value::UnchangedToast],
            },
            Message::Update {
                rel: 16384,
                old: None,
                new: vec![text("2"), text("x")],
            },
            Message::Delete {
                rel: 16384,
                old: OldTuple {
                    full: true,
                    tuple: vec![text("2"), Value::Binary(Bytes::from_static(b"\0\x01"))],
                },
            },
            Message::Truncate(Truncate {
                cascade: true,
                restart_identity: false,
                rels: vec![1, 2, 3],
            }),
            Message::Message(LogicalMessage {
                transactional: true,
                lsn: Lsn(5),
                prefix: "tandem".into(),
                content: Bytes::from_static(b"D 0/5"),
            }),
            Message::StreamStart {
                xid: 900,
                first: true,
            },
            Message::StreamStop,
            Message::StreamCommit {
                xid: 900,
                commit: Commit {
                    flags: 0,
                    commit_lsn: Lsn(0x20_0000_0010),
                    end_lsn: Lsn(0x20_0000_0040),
                    commit_ts: 786_000_000_999,
                },
            },
            Message::StreamAbort {
                xid: 900,
                subxid: 901,
            },
        ]
    }

    #[test]
    fn inside_a_stream_block_changes_carry_their_xid_and_boundaries_do_not() {
        for m in samples() {
            let bytes = encode::streamed(901, &m);
            let (xid, back) = decode_in(&bytes, true).unwrap();
            assert_eq!(back, m, "{bytes:?}");
            let carries = matches!(
                m,
                Message::Relation(_)
                    | Message::Type { .. }
                    | Message::Insert { .. }
                    | Message::Update { .. }
                    | Message::Delete { .. }
                    | Message::Truncate(_)
                    | Message::Message(_)
            );
            assert_eq!(xid, carries.then_some(901), "{m:?}");
            if carries {
                // The same bytes outside a block are misread or refused, never the same message.
                assert_ne!(decode(&bytes).ok(), Some(m));
            }
        }
    }

    #[test]
    fn every_message_kind_round_trips() {
        for m in samples() {
            let bytes = encode::message(&m);
            assert_eq!(decode(&bytes).unwrap(), m, "{bytes:?}");
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for m in samples() {
            let bytes = encode::message(&m);
            for cut in 0..bytes.len() {
                let err = decode(&bytes.slice(..cut));
                assert!(err.is_err(), "{m:?} cut at {cut} decoded as {err:?}");
            }
        }
    }

    #[test]
    fn errors_say_what_and_where() {
        let mut b = encode::message(&Message::Insert {
            rel: 1,
            new: vec![text("abc")],
        })
        .to_vec();
        b[8] = b'x'; // column kind
        let e = decode(&Bytes::from(b)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pgoutput `I` message: unknown column kind 0x78 (expected n, u, t or b) at byte 9"
        );
        assert!(matches!(
            decode(&Bytes::from_static(b"P\0\0\0\x01")),
            Err(DecodeError::Unsupported('P'))
        ));
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        let mut ok = encode::message(&samples()[0]).to_vec();
        ok.push(0);
        assert_eq!(
            decode(&Bytes::from(ok)),
            Err(DecodeError::Trailing { tag: 'B', extra: 1 })
        );
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        // A relation claiming 32767 columns in a 20-byte message.
        let b = Bytes::from_static(b"I\0\0\0\x01N\x7f\xff");
        assert!(matches!(decode(&b), Err(DecodeError::Truncated { .. })));
        let t = Bytes::from_static(b"T\x7f\xff\xff\xff\0");
        assert!(matches!(decode(&t), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        // Cheap in-tree complement to the cargo-fuzz target.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let len = (x % 64) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            if let Some(first) = v.first_mut() {
                *first = b"BCORYIUDTMSEcA"[(x % 14) as usize];
            }
            let v = Bytes::from(v);
            let _ = decode(&v);
            let _ = decode_in(&v, true);
        }
    }
}
