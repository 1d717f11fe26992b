//! The Kafka audit stream: every decoded change of either side, once per source change, with what
//! tandem did with it. Encoding is pure ([`records`]); [`Publisher`] sends and tracks deliveries so
//! the source slot is confirmed only past what Kafka acknowledged (`required = true`).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use prost::Message as _;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};

use crate::config::{KafkaConfig, KafkaFormat, TableName};
use crate::event::{Change, Event, SourceTable};
use crate::lsn::Lsn;
use crate::side::Side;
use crate::sink::spool::{Spool, Spooled};
use crate::source::assemble::{Assembler, Item, Names};
use crate::source::pgoutput::{Tuple, Value};
use crate::source::streamed::Replay;

/// Generated from `proto/tandem/v1/event.proto`.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/tandem.v1.rs"));
}

/// Unsent or unacknowledged messages before publishing waits for acknowledgements (and so
/// replication pauses while Kafka is away).
const MAX_IN_FLIGHT: usize = 50_000;

use crate::event::PG_EPOCH_UNIX_MICROS;

/// One Kafka message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    /// `schema.table` and the key values: all changes of a row land in one partition, in order.
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub site: String,
    pub commit_lsn: String,
    pub xid: u32,
}

/// `(column, value)` of a row image, without copying; unchanged-TOAST columns are left out.
/// `keys_only`: the image is the replica identity only (pgoutput `K`), so non-key columns are not
/// part of it.
fn columns<'a>(
    t: &'a SourceTable,
    row: &'a Tuple,
    keys_only: bool,
) -> impl Iterator<Item = (&'a str, Option<Cow<'a, str>>)> + Clone + 'a {
    t.columns
        .iter()
        .zip(row)
        .filter(move |(c, v)| (!keys_only || c.key) && **v != Value::UnchangedToast)
        .map(|(c, v)| {
            let text = match v {
                Value::Text(b) | Value::Binary(b) => Some(utf8(b)),
                _ => None,
            };
            (c.name.as_str(), text)
        })
}

/// A value as text. `from_utf8` first: it checks valid text (all of it from a UTF-8 database)
/// several times faster than `from_utf8_lossy`, which was the largest single cost of encoding
/// an event (perf, W1 with Kafka).
fn utf8(b: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(b),
    }
}

/// [`columns`], owned.
pub(crate) fn image(
    t: &SourceTable,
    row: &Tuple,
    keys_only: bool,
) -> Vec<(String, Option<String>)> {
    columns(t, row, keys_only)
        .map(|(c, v)| (c.to_string(), v.map(Cow::into_owned)))
        .collect()
}

/// RFC 3339 (UTC, microseconds) of a PostgreSQL-epoch timestamp in microseconds.
pub fn rfc3339(pg_micros: i64) -> String {
    let unix = pg_micros + PG_EPOCH_UNIX_MICROS;
    let (secs, micros) = (unix.div_euclid(1_000_000), unix.rem_euclid(1_000_000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// The messages for one change (one; a truncate of several tables gives one per table, the
/// later ones with `/n` after the id). `outcome`: "applied", "skipped_echo", a conflict
/// resolution, or "error". The same bytes as [`Encoder`], which the producer uses.
pub fn records(ev: &Event, outcome: &str, format: KafkaFormat) -> Vec<Record> {
    let mut enc = Encoder::default();
    (0..message_count(ev))
        .map(|i| {
            let m = enc.encode(ev, i, outcome, format);
            Record {
                id: m.id.to_string(),
                key: m.key.to_vec(),
                payload: m.payload.to_vec(),
                site: m.site.to_string(),
                commit_lsn: m.commit_lsn.to_string(),
                xid: ev.xid,
            }
        })
        .collect()
}

/// How many messages a change gives: one per table of a truncate, else one.
fn message_count(ev: &Event) -> usize {
    match &ev.change {
        Change::Truncate { tables, .. } => tables.len(),
        _ => 1,
    }
}

/// One encoded message, borrowed from its [`Encoder`].
pub struct Encoded<'a> {
    pub id: &'a str,
    pub key: &'a [u8],
    pub payload: &'a [u8],
    /// Header values.
    pub site: &'a str,
    pub commit_lsn: &'a str,
    pub xid: &'a str,
}

/// Encodes messages one at a time into buffers it reuses, and makes the text every message of a
/// transaction repeats (site, commit LSN, xid) once per transaction: per message, these
/// allocations and formatting were about a third of encoding (perf, W1 with Kafka).
#[derive(Default)]
pub struct Encoder {
    /// The transaction the texts below belong to.
    txn: Option<(Side, Lsn, u32)>,
    site: String,
    commit_lsn: String,
    xid: String,
    id: String,
    key: Vec<u8>,
    payload: Vec<u8>,
}

impl Encoder {
    /// Message `i` (below [`message_count`]) of a change.
    pub fn encode(
        &mut self,
        ev: &Event,
        i: usize,
        outcome: &str,
        format: KafkaFormat,
    ) -> Encoded<'_> {
        use std::fmt::Write as _;
        self.texts(ev.source, ev.commit_lsn, ev.xid);
        self.id.clear();
        write!(self.id, "{}:{}:{}", self.site, self.commit_lsn, ev.ordinal)
            .expect("writing to a String");
        if i > 0 {
            write!(self.id, "/{i}").expect("writing to a String");
        }
        let part = match &ev.change {
            Change::Insert { table, new } => Part {
                table,
                key: Some(new),
                before: None,
                after: Some(new),
            },
            Change::Update { table, old, new } => Part {
                table,
                key: Some(new),
                before: old.as_ref().map(|o| (&o.tuple, !o.full)),
                after: Some(new),
            },
            Change::Delete { table, old } => Part {
                table,
                key: Some(&old.tuple),
                before: Some((&old.tuple, !old.full)),
                after: None,
            },
            Change::Truncate { tables, .. } => Part {
                table: &tables[i],
                key: None,
                before: None,
                after: None,
            },
            Change::Ddl { .. } => Part {
                table: &DDL_TABLE,
                key: None,
                before: None,
                after: None,
            },
        };
        // `schema.table:[json values]`, written in place (no string per column).
        let t = &part.table.name;
        let key = &mut self.key;
        key.clear();
        key.extend_from_slice(t.schema.as_bytes());
        key.push(b'.');
        key.extend_from_slice(t.name.as_bytes());
        key.extend_from_slice(b":[");
        for (n, (_, v)) in part.columns(part.key, true).enumerate() {
            if n > 0 {
                key.push(b',');
            }
            serde_json::to_writer(&mut *key, &v.as_deref()).expect("strings serialise");
        }
        key.push(b']');
        let head = Head {
            id: &self.id,
            site: &self.site,
            op: ev.change.op(),
            commit_lsn: &self.commit_lsn,
            outcome,
            commit_ts: ev.commit_ts,
            xid: ev.xid,
            ordinal: ev.ordinal,
            ddl: ddl_text(ev),
            changes: None,
        };
        write_payload(format, &part, &head, &mut self.payload);
        self.encoded()
    }

    /// The message last written.
    fn encoded(&self) -> Encoded<'_> {
        Encoded {
            id: &self.id,
            key: &self.key,
            payload: &self.payload,
            site: &self.site,
            commit_lsn: &self.commit_lsn,
            xid: &self.xid,
        }
    }

    /// The texts of transaction `(source, commit_lsn, xid)`, made when it changes.
    fn texts(&mut self, source: Side, commit_lsn: Lsn, xid: u32) {
        use std::fmt::Write as _;
        if self.txn != Some((source, commit_lsn, xid)) {
            self.txn = Some((source, commit_lsn, xid));
            for s in [&mut self.site, &mut self.commit_lsn, &mut self.xid] {
                s.clear();
            }
            self.site.push(source.tag());
            write!(self.commit_lsn, "{commit_lsn}").expect("writing to a String");
            write!(self.xid, "{xid}").expect("writing to a String");
        }
    }

    /// The event that closes a source transaction's events (`[kafka] transactions`): op
    /// `commit`, table `tandem.transaction`, id `<site>:<commit_lsn>:commit`, and how many changes
    /// the transaction had in `changes` (its events' ordinals), so a consumer knows when it has
    /// them all.
    pub fn encode_end(&mut self, end: &TxnEnd, format: KafkaFormat) -> Encoded<'_> {
        use std::fmt::Write as _;
        self.texts(end.source, end.commit_lsn, end.xid);
        self.id.clear();
        write!(self.id, "{}:{}:commit", self.site, self.commit_lsn).expect("writing to a String");
        self.key.clear();
        self.key.extend_from_slice(b"tandem.transaction:[]");
        let part = Part {
            table: &TXN_TABLE,
            key: None,
            before: None,
            after: None,
        };
        let head = Head {
            id: &self.id,
            site: &self.site,
            op: "commit",
            commit_lsn: &self.commit_lsn,
            outcome: "",
            commit_ts: end.commit_ts,
            xid: end.xid,
            ordinal: 0,
            ddl: "",
            changes: Some(end.changes),
        };
        write_payload(format, &part, &head, &mut self.payload);
        self.encoded()
    }
}

/// One message to send: message `.1` of a change, or a transaction's end.
#[derive(Clone, Copy)]
enum Msg<'a> {
    Change(&'a Event, usize, &'a str),
    End(&'a TxnEnd),
}

/// A source transaction whose events went out: the end event to send after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnEnd {
    pub source: Side,
    pub commit_lsn: Lsn,
    pub commit_ts: i64,
    pub xid: u32,
    /// How many changes it had: its events carry ordinals `0..changes` (a truncate of several
    /// tables is one change, with one event per table).
    pub changes: u32,
}

impl TxnEnd {
    /// The end of the transaction `item` closes, when it is a commit.
    pub fn of(source: Side, item: &Item) -> Option<TxnEnd> {
        match *item {
            Item::Commit {
                commit_lsn,
                changes,
                xid,
                commit_ts,
                ..
            } => Some(TxnEnd {
                source,
                commit_lsn,
                commit_ts,
                xid,
                changes,
            }),
            _ => None,
        }
    }
}

/// A table of tandem's own that an event without a row names.
fn tandem_table(name: &str) -> Arc<SourceTable> {
    Arc::new(SourceTable {
        oid: 0,
        name: TableName::new("tandem", name),
        columns: Vec::new(),
    })
}

/// What a transaction's end event names as its table.
static TXN_TABLE: std::sync::LazyLock<Arc<SourceTable>> =
    std::sync::LazyLock::new(|| tandem_table("transaction"));

/// What a schema change's event names as its table: where it is recorded (`tandem.ddl`).
static DDL_TABLE: std::sync::LazyLock<Arc<SourceTable>> =
    std::sync::LazyLock::new(|| tandem_table("ddl"));

/// The statement of a schema change's event; empty for a row change.
fn ddl_text(ev: &Event) -> &str {
    match &ev.change {
        Change::Ddl { sql, .. } => sql,
        _ => "",
    }
}

/// The rows of one message: where its key, before and after images come from.
struct Part<'a> {
    table: &'a SourceTable,
    key: Option<&'a Tuple>,
    /// The old row, and whether it is the replica identity only.
    before: Option<(&'a Tuple, bool)>,
    after: Option<&'a Tuple>,
}

impl<'a> Part<'a> {
    /// [`columns`] of this message's table; none without a row.
    fn columns(
        &self,
        row: Option<&'a Tuple>,
        keys_only: bool,
    ) -> impl Iterator<Item = (&'a str, Option<Cow<'a, str>>)> + Clone + 'a {
        let table = self.table;
        row.into_iter()
            .flat_map(move |r| columns(table, r, keys_only))
    }

    /// Columns the new row leaves as they were (only an update's can).
    fn unchanged_toast(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.table
            .columns
            .iter()
            .zip(self.after.into_iter().flatten())
            .filter(|(_, v)| **v == Value::UnchangedToast)
            .map(|(c, _)| c.name.as_str())
    }
}

/// The fields every message repeats.
struct Head<'a> {
    id: &'a str,
    site: &'a str,
    op: &'a str,
    commit_lsn: &'a str,
    outcome: &'a str,
    commit_ts: i64,
    xid: u32,
    ordinal: u32,
    /// A schema change's statement; empty otherwise.
    ddl: &'a str,
    /// A transaction's end (`op` `commit`): how many changes it had.
    changes: Option<u32>,
}

fn write_payload(format: KafkaFormat, part: &Part, head: &Head, buf: &mut Vec<u8>) {
    buf.clear();
    match format {
        KafkaFormat::Json => json_payload(part, head, buf),
        KafkaFormat::Protobuf => proto_payload(part, head, buf),
    }
}

fn json_payload(part: &Part, head: &Head, buf: &mut Vec<u8>) {
    let obj = |cols: &mut dyn Iterator<Item = (&str, Option<Cow<str>>)>| {
        serde_json::Value::Object(
            cols.map(|(c, v)| (c.to_string(), serde_json::json!(v)))
                .collect(),
        )
    };
    let mut v = serde_json::json!({
        "id": head.id,
        "site": head.site,
        "op": head.op,
        "schema": part.table.name.schema,
        "table": part.table.name.name,
        "key": obj(&mut part.columns(part.key, true)),
        "before": part.before.map(|(row, keys)| obj(&mut part.columns(Some(row), keys))),
        "after": part.after.map(|row| obj(&mut part.columns(Some(row), false))),
        "unchanged_toast": part.unchanged_toast().collect::<Vec<_>>(),
        "commit_lsn": head.commit_lsn,
        "commit_ts": rfc3339(head.commit_ts),
        "xid": head.xid,
        "ordinal": head.ordinal,
        "outcome": head.outcome,
    });
    // Row events keep their shape; a schema change's carries its statement, a transaction's end
    // its number of changes.
    if head.op == "ddl" {
        v["ddl"] = serde_json::json!(head.ddl);
    }
    if let Some(n) = head.changes {
        v["changes"] = serde_json::json!(n);
    }
    serde_json::to_writer(buf, &v).expect("JSON values serialise");
}

/// `tandem.v1.Event` (see `proto/`), written straight from the change: the bytes prost would
/// write for the same message, except that map entries come in column order. Building a
/// `proto::Event` first costs a map and two string copies per column, and was the largest part
/// of Kafka's cost per change.
fn proto_payload(part: &Part, head: &Head, buf: &mut Vec<u8>) {
    use prost::encoding::{encoded_len_varint, WireType};
    type Cols<'a> = (&'a str, Option<Cow<'a, str>>);
    fn len_delimited(len: usize) -> usize {
        encoded_len_varint(len as u64) + len
    }
    // prost's `encode_varint` goes through `BufMut` a byte at a time; this was 12% of encoding.
    fn varint(mut v: u64, buf: &mut Vec<u8>) {
        while v >= 0x80 {
            buf.push(v as u8 | 0x80);
            v >>= 7;
        }
        buf.push(v as u8);
    }
    // A field's key: one byte for the numbers below 16, two for `changes` (16).
    fn key(tag: u32, wire: WireType, buf: &mut Vec<u8>) {
        varint(u64::from(tag << 3 | wire as u32), buf);
    }
    fn put_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
        key(tag, WireType::LengthDelimited, buf);
        varint(s.len() as u64, buf);
        buf.extend_from_slice(s.as_bytes());
    }
    // A field at its default value is not written (proto3).
    fn put_nonempty(tag: u32, s: &str, buf: &mut Vec<u8>) {
        if !s.is_empty() {
            put_str(tag, s, buf);
        }
    }
    fn put_uint(tag: u32, v: u64, buf: &mut Vec<u8>) {
        if v != 0 {
            key(tag, WireType::Varint, buf);
            varint(v, buf);
        }
    }
    // Value: `null = 1` (true) or `text = 2`; a oneof member is written even at its default.
    fn value_len(v: &Option<Cow<str>>) -> usize {
        match v {
            None => 2,
            Some(t) => 1 + len_delimited(t.len()),
        }
    }
    fn entry_len((name, v): &Cols) -> usize {
        1 + len_delimited(name.len()) + 1 + len_delimited(value_len(v))
    }
    // Map entries `{key = 1: column, value = 2: Value}` under field `tag`.
    fn put_entries<'a>(tag: u32, cols: impl Iterator<Item = Cols<'a>>, buf: &mut Vec<u8>) {
        for col in cols {
            key(tag, WireType::LengthDelimited, buf);
            varint(entry_len(&col) as u64, buf);
            put_str(1, col.0, buf);
            key(2, WireType::LengthDelimited, buf);
            varint(value_len(&col.1) as u64, buf);
            match &col.1 {
                None => {
                    key(1, WireType::Varint, buf);
                    varint(1, buf);
                }
                Some(t) => put_str(2, t, buf),
            }
        }
    }
    // Row `{columns = 1: map}` under field `tag`, present even when empty. Its length comes
    // first but is known only after the entries: written in one pass (each value turned into
    // text once), a one-byte length is patched, and a longer one shifts the row along.
    fn put_row<'a>(tag: u32, cols: impl Iterator<Item = Cols<'a>>, buf: &mut Vec<u8>) {
        key(tag, WireType::LengthDelimited, buf);
        let at = buf.len();
        buf.push(0);
        put_entries(1, cols, buf);
        let len = buf.len() - at - 1;
        if len < 0x80 {
            buf[at] = len as u8;
        } else {
            let mut prefix = Vec::with_capacity(10);
            varint(len as u64, &mut prefix);
            buf.splice(at..at + 1, prefix);
        }
    }
    let t = &part.table.name;
    put_nonempty(1, head.id, buf);
    put_nonempty(2, head.site, buf);
    put_nonempty(3, head.op, buf);
    put_nonempty(4, &t.schema, buf);
    put_nonempty(5, &t.name, buf);
    put_entries(6, part.columns(part.key, true), buf);
    if let Some((row, keys)) = part.before {
        put_row(7, part.columns(Some(row), keys), buf);
    }
    if let Some(row) = part.after {
        put_row(8, part.columns(Some(row), false), buf);
    }
    for c in part.unchanged_toast() {
        put_str(9, c, buf);
    }
    put_nonempty(10, head.commit_lsn, buf);
    // int64: two's complement as a varint.
    put_uint(11, (head.commit_ts + PG_EPOCH_UNIX_MICROS) as u64, buf);
    put_uint(12, u64::from(head.xid), buf);
    put_uint(13, u64::from(head.ordinal), buf);
    put_nonempty(14, head.outcome, buf);
    put_nonempty(15, head.ddl, buf);
    put_uint(16, u64::from(head.changes.unwrap_or(0)), buf);
}

/// `(column, text value or NULL)` of a row image, in column-name order.
pub type Columns = Vec<(String, Option<String>)>;

/// An event read back from the topic (either format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub id: String,
    pub site: String,
    pub op: String,
    pub schema: String,
    pub table: String,
    pub key: Columns,
    pub before: Option<Columns>,
    pub after: Option<Columns>,
    pub unchanged_toast: Vec<String>,
    pub commit_lsn: Lsn,
    /// RFC 3339, UTC.
    pub commit_ts: String,
    pub xid: u32,
    pub ordinal: u32,
    pub outcome: String,
    /// A schema change's statement (op `ddl`); empty for a row change.
    pub ddl: String,
    /// A transaction's end (op `commit`): how many changes it had; 0 otherwise.
    pub changes: u32,
}

/// Decode a message payload: JSON (starts with `{`) or protobuf. Bad bytes are an error, never a
/// panic.
pub fn decode(payload: &[u8]) -> Result<Decoded> {
    fn sorted<I: IntoIterator<Item = (String, Option<String>)>>(i: I) -> Columns {
        let mut v: Vec<_> = i.into_iter().collect();
        v.sort();
        v
    }
    if payload.first() == Some(&b'{') {
        let v: serde_json::Value =
            serde_json::from_slice(payload).context("an event that is not valid JSON")?;
        let s = |k: &str| -> Result<String> {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("event JSON lacks the string field `{k}`"))
        };
        let map = |k: &str| -> Result<Option<Columns>> {
            match &v[k] {
                serde_json::Value::Null => Ok(None),
                serde_json::Value::Object(o) => {
                    Ok(Some(sorted(o.iter().map(|(c, x)| {
                        (c.clone(), x.as_str().map(str::to_string))
                    }))))
                }
                _ => Err(anyhow!("event JSON field `{k}` is not an object")),
            }
        };
        return Ok(Decoded {
            id: s("id")?,
            site: s("site")?,
            op: s("op")?,
            schema: s("schema")?,
            table: s("table")?,
            key: map("key")?.unwrap_or_default(),
            before: map("before")?,
            after: map("after")?,
            unchanged_toast: v["unchanged_toast"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            commit_lsn: s("commit_lsn")?
                .parse()
                .map_err(|e| anyhow!("commit_lsn: {e}"))?,
            commit_ts: s("commit_ts")?,
            xid: v["xid"].as_u64().unwrap_or(0) as u32,
            ordinal: v["ordinal"].as_u64().unwrap_or(0) as u32,
            outcome: s("outcome")?,
            ddl: v["ddl"].as_str().unwrap_or_default().to_string(),
            changes: v["changes"].as_u64().unwrap_or(0) as u32,
        });
    }
    let p = proto::Event::decode(payload).context("an event that is neither JSON nor protobuf")?;
    let map = |m: HashMap<String, proto::Value>| {
        sorted(m.into_iter().map(|(c, v)| {
            let t = match v.kind {
                Some(proto::value::Kind::Text(t)) => Some(t),
                _ => None,
            };
            (c, t)
        }))
    };
    Ok(Decoded {
        id: p.id,
        site: p.site,
        op: p.op,
        schema: p.schema,
        table: p.table,
        key: map(p.key),
        before: p.before.map(|r| map(r.columns)),
        after: p.after.map(|r| map(r.columns)),
        unchanged_toast: p.unchanged_toast,
        commit_lsn: p
            .commit_lsn
            .parse()
            .map_err(|e| anyhow!("commit_lsn: {e}"))?,
        commit_ts: rfc3339(p.commit_ts_micros - PG_EPOCH_UNIX_MICROS),
        xid: p.xid,
        ordinal: p.ordinal,
        outcome: p.outcome,
        ddl: p.ddl,
        changes: p.changes,
    })
}

/// A message's delivery report, as librdkafka's polling thread passed it on.
enum Report {
    Delivered,
    /// Why, and the message (for the spool).
    Failed(String, Spooled),
}

/// A delivery report for the message numbered `seq`.
struct Ack {
    seq: u64,
    report: Report,
}

/// Hands librdkafka's delivery reports to the Kafka task. A message carries its sequence number
/// as the delivery opaque instead of a boxed future (`FutureProducer`), and a delivered one is
/// not copied back out of librdkafka (`FutureProducer` detaches key, payload and headers of
/// every message into an `OwnedMessage`): only a failed message is copied, for the spool.
struct Acks(tokio::sync::mpsc::UnboundedSender<Ack>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        use rdkafka::message::{Headers, Message};
        let report = match result {
            Ok(_) => Report::Delivered,
            Err((e, m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                Report::Failed(
                    e.to_string(),
                    Spooled {
                        key: m.key().unwrap_or_default().to_vec(),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        headers,
                    },
                )
            }
        };
        // The task is gone only when the producer is being dropped with it.
        let _ = self.0.send(Ack {
            seq: seq as u64,
            report,
        });
    }
}

type KafkaProducer = ThreadedProducer<Acks>;

/// One direction's producer, owned by its [`Publisher`]'s task.
struct Producer {
    producer: Arc<KafkaProducer>,
    acks: tokio::sync::mpsc::UnboundedReceiver<Ack>,
    topic: Arc<str>,
    format: KafkaFormat,
    encoder: Encoder,
    /// Messages sent and not yet settled, oldest first: when each was sent, and its report once
    /// it came. The front one is number `first_seq`.
    unsettled: VecDeque<(Instant, Option<Report>)>,
    first_seq: u64,
    /// Once every message numbered below `.0` is settled, Kafka holds the source's changes up
    /// to `.1`.
    barriers: VecDeque<(u64, Lsn)>,
    delivered: Lsn,
    /// When messages sent now count as sent: read once per handover and after each wait, not
    /// per message (the clock read was a few percent of Kafka's cost per change).
    clock: Instant,
    /// `required = false`: where undelivered events wait.
    spool: Option<Spool>,
    /// When the last delivery failed: the spool is resent only once Kafka answers again.
    last_failure: Option<Instant>,
    // Per message: looked up once, not on every acknowledgement.
    produced: metrics::Counter,
    produce_seconds: metrics::Histogram,
}

/// librdkafka settings for `k`'s brokers: tandem's own (`ours`) first, then
/// `[kafka.properties]`, which may override any of them.
pub fn client_config(k: &KafkaConfig, ours: impl FnOnce(&mut ClientConfig)) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    ours(&mut c);
    for (key, v) in &k.properties {
        c.set(key, v);
    }
    c
}

impl Producer {
    fn new(cfg: &KafkaConfig, start: Lsn, direction: &str) -> Result<Producer> {
        let c = client_config(cfg, |c| {
            c.set("enable.idempotence", "true")
                .set("compression.type", "lz4")
                // librdkafka would buffer up to 1 GiB unsent; past this, `publish` waits for
                // acknowledgements (memory stays bounded in bytes; `[kafka.properties]` may
                // change it).
                .set("queue.buffering.max.kbytes", "65536")
                // Fewer, larger produce requests than librdkafka's 5 ms give: W3 with Kafka
                // used ~6% less tandem CPU per row (README, Kafka). An event reaches Kafka at
                // most 25 ms later; the target's commits do not wait for it.
                .set("linger.ms", "25");
            if cfg.required {
                // Never give up on a message: replication waits for Kafka instead.
                c.set("message.timeout.ms", "0");
            }
        });

        let (tx, acks) = tokio::sync::mpsc::unbounded_channel();
        let producer: KafkaProducer = c
            .create_with_context(Acks(tx))
            .map_err(|e| anyhow!("[kafka]: cannot create the producer: {e}"))?;
        let spool = if cfg.required {
            None
        } else {
            let name = direction.replace('>', "").to_lowercase();
            let s = Spool::open(
                format!("{}.{name}.bin", cfg.spool_path).into(),
                cfg.spool_max_bytes,
            )?;
            if s.pending() > 0 {
                tracing::warn!(
                    direction,
                    bytes = s.pending(),
                    "[kafka]: events from an earlier run wait in the spool; sending them"
                );
            }
            Some(s)
        };
        Ok(Producer {
            producer: Arc::new(producer),
            acks,
            topic: cfg.topic.as_str().into(),
            format: cfg.format,
            encoder: Encoder::default(),
            unsettled: VecDeque::new(),
            first_seq: 0,
            barriers: VecDeque::new(),
            delivered: start,
            clock: Instant::now(),
            spool,
            last_failure: None,
            produced: metrics::counter!("tandem_kafka_produced_total"),
            produce_seconds: metrics::histogram!("tandem_kafka_produce_seconds"),
        })
    }

    /// The number the next message sent gets.
    fn next_seq(&self) -> u64 {
        self.first_seq + self.unsettled.len() as u64
    }

    /// Hand one message to librdkafka, numbered as the next unsettled one.
    fn try_send(
        &mut self,
        key: &[u8],
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(), KafkaError> {
        let record = BaseRecord::with_opaque_to(&self.topic, self.next_seq() as usize)
            .key(key)
            .payload(payload);
        let record = record.headers(headers);
        match self.producer.send(record) {
            Ok(()) => {
                self.unsettled.push_back((self.clock, None));
                Ok(())
            }
            Err((e, _)) => Err(e),
        }
    }

    /// Send the messages of one change (waiting while too many are unacknowledged).
    async fn publish(&mut self, ev: &Event, outcome: &str) -> Result<()> {
        for i in 0..message_count(ev) {
            self.send_message(Msg::Change(ev, i, outcome)).await?;
        }
        self.wait_for_room().await
    }

    /// Send a source transaction's end event (after its events).
    async fn publish_end(&mut self, end: &TxnEnd) -> Result<()> {
        self.send_message(Msg::End(end)).await?;
        self.wait_for_room().await
    }

    async fn wait_for_room(&mut self) -> Result<()> {
        while self.unsettled.len() > MAX_IN_FLIGHT {
            self.wait_one().await?;
        }
        Ok(())
    }

    /// Hand one message to librdkafka, waiting for acknowledgements while its queue is full.
    async fn send_message(&mut self, msg: Msg<'_>) -> Result<()> {
        loop {
            // Taken out while its message is borrowed, so that `try_send` may borrow `self`.
            let mut enc = std::mem::take(&mut self.encoder);
            let m = match msg {
                Msg::Change(ev, i, outcome) => enc.encode(ev, i, outcome, self.format),
                Msg::End(end) => enc.encode_end(end, self.format),
            };
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: "site",
                    value: Some(m.site),
                })
                .insert(Header {
                    key: "commit_lsn",
                    value: Some(m.commit_lsn),
                })
                .insert(Header {
                    key: "xid",
                    value: Some(m.xid),
                });
            let sent = self
                .try_send(m.key, m.payload, headers)
                .map_err(|e| match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => None,
                    e => Some(anyhow!("[kafka]: producing {}: {e}", m.id)),
                });
            self.encoder = enc;
            match sent {
                Ok(()) => return Ok(()),
                // librdkafka's queue is full: wait for acknowledgements, then encode again.
                Err(None) => self.wait_one().await?,
                Err(Some(e)) => return Err(e),
            }
        }
    }

    fn barrier(&mut self, lsn: Lsn) {
        let next = self.next_seq();
        self.barriers.push_back((next, lsn));
    }

    fn pending(&self) -> bool {
        !self.unsettled.is_empty() || !self.barriers.is_empty()
    }

    /// File a delivery report with its message.
    fn note(&mut self, a: Ack) {
        // Below `first_seq`: already settled (cannot happen; librdkafka reports a message once).
        if let Some(i) = a.seq.checked_sub(self.first_seq) {
            if let Some(slot) = self.unsettled.get_mut(i as usize) {
                slot.1 = Some(a.report);
            }
        }
    }

    /// Settle the reported messages at the front, in order, and pass the barriers behind them.
    fn settle_reported(&mut self) -> Result<()> {
        while let Ok(a) = self.acks.try_recv() {
            self.note(a);
        }
        let now = Instant::now();
        while let Some((_, Some(_))) = self.unsettled.front() {
            let (sent, report) = self.unsettled.pop_front().expect("checked");
            self.first_seq += 1;
            self.settle(
                report.expect("checked"),
                now.saturating_duration_since(sent),
            )?;
        }
        while let Some(&(seq, lsn)) = self.barriers.front() {
            if seq > self.first_seq {
                break;
            }
            self.delivered = self.delivered.max(lsn);
            self.barriers.pop_front();
        }
        Ok(())
    }

    /// Up to where Kafka acknowledged everything (without waiting).
    fn delivered(&mut self) -> Result<Lsn> {
        self.settle_reported()?;
        self.resend_spooled()?;
        Ok(self.delivered)
    }

    /// Send spooled events again once Kafka has been answering for a second.
    fn resend_spooled(&mut self) -> Result<()> {
        let Some(spool) = &mut self.spool else {
            return Ok(());
        };
        if spool.pending() == 0
            || self
                .last_failure
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            || self.unsettled.len() > MAX_IN_FLIGHT / 2
        {
            if self.unsettled.is_empty() {
                spool.settle()?;
            }
            return Ok(());
        }
        for r in spool.take(500)? {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            if self.try_send(&r.key, &r.payload, headers).is_err() {
                // The local queue is full: keep it for the next round.
                let spool = self.spool.as_mut().expect("checked above");
                if !spool.push(&r)? {
                    Self::spool_full();
                }
            }
        }
        Ok(())
    }

    fn spool_full() {
        metrics::counter!("tandem_kafka_spool_full_total").increment(1);
        tracing::error!(
            "[kafka]: the spool is full (spool_max_bytes): an event is DROPPED from the audit stream; \
             bring Kafka back or raise spool_max_bytes"
        );
    }

    /// Wait (up to `limit`) until every message sent is acknowledged; returns the delivered LSN.
    async fn drain(&mut self, limit: Duration) -> Result<Lsn> {
        let deadline = Instant::now() + limit;
        while !self.unsettled.is_empty() && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(100), self.wait_one()).await;
        }
        self.delivered()
    }

    /// Wait for the oldest message's report, then settle what is reported. Cancel-safe (`drain`
    /// times it out): a report is filed as soon as it is received, and a message leaves the
    /// queue only once settled, so its barrier cannot pass without it.
    async fn wait_one(&mut self) -> Result<()> {
        if self.unsettled.is_empty() {
            self.settle_reported()?;
            tokio::time::sleep(Duration::from_millis(10)).await;
            return Ok(());
        }
        while matches!(self.unsettled.front(), Some((_, None))) {
            match self.acks.recv().await {
                Some(a) => self.note(a),
                None => bail!("[kafka]: the producer went away"),
            }
        }
        self.clock = Instant::now();
        self.settle_reported()
    }

    /// `took`: from sending the message until its report was settled.
    fn settle(&mut self, report: Report, took: Duration) -> Result<()> {
        let (e, msg) = match report {
            Report::Delivered => {
                self.produced.increment(1);
                self.produce_seconds.record(took.as_secs_f64());
                return Ok(());
            }
            Report::Failed(e, m) => (e, m),
        };
        metrics::counter!("tandem_kafka_failed_total").increment(1);
        self.last_failure = Some(Instant::now());
        match &mut self.spool {
            Some(spool) => {
                if spool.push(&msg)? {
                    metrics::counter!("tandem_kafka_spooled_total").increment(1);
                } else {
                    Self::spool_full();
                }
                Ok(())
            }
            None => Err(anyhow!("[kafka]: a message was not delivered: {e}"))
                .context("Kafka is required ([kafka] required = true)"),
        }
    }
}

/// KiB of changes queued for a direction's Kafka task before `publish` waits: the apply loop
/// runs ahead of encoding and sending by at most this much (plus one unpaid handover, see
/// `barrier`). In bytes, not changes: a change may carry megabytes of TOASTed values.
const MAX_QUEUED_KIB: usize = 32 * 1024;
/// Changes handed to the Kafka task together: one channel send (and wakeup) per this many.
const HANDOVER: usize = 256;

/// What became of a change that was applied without a decision per row (no conflict rules).
pub type Outcome = Arc<dyn Fn(&Event) -> &'static str + Send + Sync>;

enum Command {
    /// Changes to send once released: the task holds them until then, so that a change whose
    /// target transaction rolls back (a refused transaction, a lost connection) is never
    /// published as applied.
    Hold(Held),
    /// Send what is held: the target committed it (or it needs no commit).
    Release,
    /// What is held from here on waits for a later commit than what is held before it (a group
    /// was committed without waiting for it, and the next one opened behind it).
    Cut,
    /// Send what is held up to the oldest cut: the commit it waited for came back.
    ReleaseOldest,
    /// Drop what is held: the target rolled it back.
    Discard,
    Barrier(Lsn),
    Drain(Duration, tokio::sync::oneshot::Sender<Result<Lsn>>),
}

enum Held {
    /// Changes with their outcomes, and how many queue permits they hold.
    Publish(Vec<(Event, &'static str)>, usize),
    /// A committed transaction of this source read back from disk, with what became of its
    /// changes. It holds no queue room: it is a file, read as it is published. With `.4`
    /// (`[kafka] transactions`), its end event follows.
    PublishCopy(Replay, Side, Names, Outcome, bool),
    /// A source transaction's end event, after its events (`[kafka] transactions`).
    End(TxnEnd),
}

/// Queue room a change takes: its values' size in KiB, at least 1.
fn kib(ev: &Event) -> usize {
    let bytes = |row: &Tuple| -> usize {
        row.iter()
            .map(|v| match v {
                Value::Text(b) | Value::Binary(b) => b.len(),
                _ => 0,
            })
            .sum()
    };
    let size = match &ev.change {
        Change::Insert { new, .. } => bytes(new),
        Change::Update { old, new, .. } => bytes(new) + old.as_ref().map_or(0, |o| bytes(&o.tuple)),
        Change::Delete { old, .. } => bytes(&old.tuple),
        Change::Truncate { .. } => 0,
        Change::Ddl { sql, .. } => sql.len(),
    };
    1 + size / 1024
}

/// What the Kafka task reports back to the apply loop.
#[derive(Default)]
struct Shared {
    delivered: AtomicU64,
    /// Commands sent and not yet handled.
    queued: AtomicUsize,
    /// Messages sent and not yet acknowledged.
    unacknowledged: AtomicBool,
    /// Why the task stopped (a delivery failed with `required = true`).
    failed: std::sync::Mutex<Option<String>>,
}

/// One direction's audit stream. Encoding and producing run on a task of their own, fed in order
/// through a channel, so they overlap with the apply loop's waits on the target instead of adding
/// to them; barriers travel the same channel, so "delivered" still means every change up to that
/// source LSN was acknowledged.
pub struct Publisher {
    /// Changes not yet handed over.
    buffer: Vec<(Event, &'static str)>,
    commands: tokio::sync::mpsc::UnboundedSender<Command>,
    /// Room for queued changes (bounds the queue's memory).
    room: Arc<tokio::sync::Semaphore>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// Changes handed over since the last release, which the task holds.
    unreleased: bool,
    pub required: bool,
    /// `[kafka] transactions`: each source transaction's events are followed by its end.
    transactions: bool,
}

impl Publisher {
    /// `start`: what Kafka is known to hold already (the slot's confirmed position); `direction`
    /// names the spool file.
    pub fn new(cfg: &KafkaConfig, start: Lsn, direction: &str) -> Result<Publisher> {
        let producer = Producer::new(cfg, start, direction)?;
        let (commands, rx) = tokio::sync::mpsc::unbounded_channel();
        let room = Arc::new(tokio::sync::Semaphore::new(MAX_QUEUED_KIB));
        let shared = Arc::new(Shared {
            delivered: AtomicU64::new(start.0),
            ..Default::default()
        });
        let task = tokio::spawn(work(producer, rx, room.clone(), shared.clone()));
        Ok(Publisher {
            buffer: Vec::with_capacity(HANDOVER),
            commands,
            room,
            shared,
            task,
            unreleased: false,
            required: cfg.required,
            transactions: cfg.transactions,
        })
    }

    /// Queue the messages of one change (waiting while the queue is full).
    pub async fn publish(&mut self, ev: Event, outcome: &'static str) -> Result<()> {
        self.buffer.push((ev, outcome));
        if self.buffer.len() >= HANDOVER {
            let n = self
                .buffer
                .iter()
                .map(|(ev, _)| kib(ev))
                .sum::<usize>()
                .min(MAX_QUEUED_KIB);
            // The queue is full of changes the target has not committed yet (a group or
            // transaction larger than the queue): send them now instead of waiting forever for
            // room. Memory stays bounded; such a transaction's events go out before its commit.
            if self.unreleased && self.room.available_permits() < n {
                self.release();
            }
            self.room
                .acquire_many(n as u32)
                .await
                .map_err(|_| self.stopped())?
                .forget();
            let changes = std::mem::replace(&mut self.buffer, Vec::with_capacity(HANDOVER));
            self.send(Command::Hold(Held::Publish(changes, n)))?;
            self.unreleased = true;
        }
        Ok(())
    }

    /// What was published so far may go out: the target committed it, or it needed no commit.
    pub fn release(&mut self) {
        self.hand_over_unpaid();
        if std::mem::take(&mut self.unreleased) {
            let _ = self.send(Command::Release);
        }
    }

    /// What was published so far waits for the commit just sent; what follows, for later ones.
    pub fn cut(&mut self) {
        self.hand_over_unpaid();
        let _ = self.send(Command::Cut);
    }

    /// The oldest commit sent (see [`Publisher::cut`]) came back: what waited for it goes out,
    /// and it all belongs to source commits up to `lsn`.
    pub fn committed(&mut self, lsn: Lsn) {
        let _ = self.send(Command::ReleaseOldest);
        let _ = self.send(Command::Barrier(lsn));
    }

    /// What was published since the last release is void: the target rolled it back (it comes
    /// again from the slot).
    pub fn discard(&mut self) {
        self.buffer.clear();
        self.unreleased = false;
        // Even with nothing held: it also forgets the cuts of commits that failed.
        let _ = self.send(Command::Discard);
    }

    /// Publish a whole transaction from its spooled copy (a streamed transaction applied while
    /// it was in progress), in order after what was published before. Its events carry the
    /// commit's LSN and time like any other. The Kafka task reads the file itself, so applying
    /// goes on meanwhile; later changes queue behind it within the queue's bound.
    pub fn publish_copy(
        &mut self,
        copy: Replay,
        source: Side,
        names: Names,
        outcome: Outcome,
    ) -> Result<()> {
        self.hold(Held::PublishCopy(
            copy,
            source,
            names,
            outcome,
            self.transactions,
        ))
    }

    /// Queue `h` behind what is buffered, held until a release.
    fn hold(&mut self, h: Held) -> Result<()> {
        self.hand_over_unpaid();
        self.unreleased = true;
        self.send(Command::Hold(h))
    }

    /// `[kafka] transactions`.
    pub fn ends_transactions(&self) -> bool {
        self.transactions
    }

    /// A source transaction's events were all published: its end event follows them
    /// (`[kafka] transactions`), held and released with them.
    pub fn end(&mut self, end: TxnEnd) -> Result<()> {
        if !self.transactions {
            return Ok(());
        }
        self.hold(Held::End(end))
    }

    /// Everything published so far belongs to source commits up to `lsn`, and is released.
    pub fn barrier(&mut self, lsn: Lsn) {
        self.release();
        // A stopped task reports why at the next `delivered`.
        let _ = self.send(Command::Barrier(lsn));
    }

    /// Hand over what is buffered without waiting for room: fewer than `HANDOVER` changes, so
    /// the queue's bound holds within that.
    fn hand_over_unpaid(&mut self) {
        if !self.buffer.is_empty() {
            let changes = std::mem::replace(&mut self.buffer, Vec::with_capacity(HANDOVER));
            let _ = self.send(Command::Hold(Held::Publish(changes, 0)));
            self.unreleased = true;
        }
    }

    /// Acknowledgements are outstanding (or changes not yet sent).
    pub fn pending(&self) -> bool {
        !self.buffer.is_empty()
            || self.shared.queued.load(Ordering::Acquire) > 0
            || self.shared.unacknowledged.load(Ordering::Acquire)
    }

    /// Up to where Kafka acknowledged everything (without waiting).
    pub fn delivered(&mut self) -> Result<Lsn> {
        if let Some(e) = self.failure() {
            return Err(anyhow!(e));
        }
        Ok(Lsn(self.shared.delivered.load(Ordering::Acquire)))
    }

    /// Wait (up to `limit`) until every message sent is acknowledged; returns the delivered LSN.
    pub async fn drain(&mut self, limit: Duration) -> Result<Lsn> {
        self.hand_over_unpaid();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Drain(limit, tx))?;
        rx.await.map_err(|_| self.stopped())?
    }

    fn send(&self, c: Command) -> Result<()> {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        self.commands.send(c).map_err(|_| self.stopped())
    }

    fn failure(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn stopped(&self) -> anyhow::Error {
        anyhow!(self
            .failure()
            .unwrap_or_else(|| "[kafka]: the producer task stopped".into()))
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        // It may be waiting on Kafka forever (`required`); its producer goes with it.
        self.task.abort();
    }
}

/// The Kafka task: handle commands in order; after each burst, publish what is delivered.
async fn work(
    mut p: Producer,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Command>,
    room: Arc<tokio::sync::Semaphore>,
    shared: Arc<Shared>,
) {
    // While acknowledgements are outstanding, look for them this often even with no commands.
    const ACK_POLL: Duration = Duration::from_millis(5);
    // Concurrently with the first commands (they queue in librdkafka meanwhile).
    tokio::task::spawn_blocking({
        let (producer, topic) = (p.producer.clone(), p.topic.clone());
        move || request_producer_id(&producer, &topic)
    });
    // Changes the target has not committed yet, by the commit they wait for (see `Cut`), oldest
    // first: sent at `Release` (all) or `ReleaseOldest`, dropped at `Discard`. Never empty.
    let mut held: std::collections::VecDeque<Vec<Held>> = [Vec::new()].into();
    let result: Result<()> = async {
        loop {
            let first = if p.pending() {
                tokio::select! {
                    c = rx.recv() => c,
                    _ = tokio::time::sleep(ACK_POLL) => {
                        report(&mut p, &shared)?;
                        continue;
                    }
                }
            } else {
                rx.recv().await
            };
            let Some(mut c) = first else { return Ok(()) };
            // A burst of what is queued, then one look at the acknowledgements.
            for more in (0..16).rev() {
                match c {
                    Command::Hold(h) => held.back_mut().expect("never empty").push(h),
                    // The cuts stay: each still pairs with the `ReleaseOldest` of its commit.
                    Command::Release => {
                        for segment in held.iter_mut() {
                            for h in segment.drain(..) {
                                send_now(&mut p, h, &room).await?;
                            }
                        }
                    }
                    Command::Cut => held.push_back(Vec::new()),
                    Command::ReleaseOldest => {
                        let oldest = match held.len() {
                            1 => std::mem::take(&mut held[0]),
                            _ => held.pop_front().expect("never empty"),
                        };
                        for h in oldest {
                            send_now(&mut p, h, &room).await?;
                        }
                    }
                    // Every commit sent was read before a rollback: no cut waits any more.
                    Command::Discard => {
                        for h in held.drain(..).flatten() {
                            if let Held::Publish(_, permits) = h {
                                room.add_permits(permits);
                            }
                        }
                        held.push_back(Vec::new());
                    }
                    Command::Barrier(l) => p.barrier(l),
                    Command::Drain(limit, reply) => {
                        let _ = reply.send(p.drain(limit).await);
                    }
                }
                shared.queued.fetch_sub(1, Ordering::AcqRel);
                // Take the next one only if this burst will handle it.
                match (more > 0).then(|| rx.try_recv().ok()).flatten() {
                    Some(next) => c = next,
                    None => break,
                }
            }
            report(&mut p, &shared)?;
        }
    }
    .await;
    if let Err(e) = result {
        *shared.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
        // Wake a publisher waiting for room: it finds the failure.
        room.close();
    }
}

/// Hand a released command's changes to librdkafka.
async fn send_now(p: &mut Producer, h: Held, room: &tokio::sync::Semaphore) -> Result<()> {
    match h {
        Held::Publish(changes, permits) => {
            p.clock = Instant::now();
            for (ev, outcome) in changes {
                p.publish(&ev, outcome).await?;
            }
            room.add_permits(permits);
        }
        Held::PublishCopy(mut copy, source, names, outcome, ends) => {
            p.clock = Instant::now();
            let mut asm = Assembler::new(source).with_names(names);
            while let Some(msg) = copy.next_message()? {
                match asm.push(msg)? {
                    Some(Item::Change(ev)) => p.publish(&ev, outcome(&ev)).await?,
                    Some(Item::Echo(ev)) => p.publish(&ev, "skipped_echo").await?,
                    Some(item) if ends => {
                        if let Some(end) = TxnEnd::of(source, &item) {
                            p.publish_end(&end).await?;
                        }
                    }
                    _ => {}
                }
            }
        }
        Held::End(end) => {
            p.clock = Instant::now();
            p.publish_end(&end).await?;
        }
    }
    Ok(())
}

/// librdkafka requests the idempotent producer's id when a metadata answer arrives. The first
/// answer comes over the bootstrap connection, which it then drops for the broker that answer
/// names; with no connection up at that moment it waits 500 ms to try again, and nothing is
/// delivered until then (measured: first acknowledgement at 503 ms, against 6 ms without
/// idempotence). A second metadata request is answered by the named broker once it is up, and the
/// id is requested at once (acquired at about 55 ms). Best effort: when Kafka is away,
/// librdkafka's own retries carry on.
fn request_producer_id(producer: &KafkaProducer, topic: &str) {
    use rdkafka::producer::Producer as _;
    for _ in 0..2 {
        if let Err(e) = producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(2))
        {
            tracing::debug!("[kafka]: metadata for {topic}: {e}");
            return;
        }
    }
}

/// Before `run` streams: a topic the brokers lack, and will not create on first use, shows
/// otherwise only as undelivered messages after librdkafka's 30 s of waiting for it to appear,
/// while with `required` the slot holds. Brokers that cannot be reached are left to the
/// producer (replication waits for Kafka while it is away, or spools).
pub async fn check_topic(cfg: &KafkaConfig) -> Result<()> {
    use rdkafka::producer::{BaseProducer, Producer as _};
    let c = client_config(cfg, |_| {});
    let (brokers, topic) = (cfg.brokers.clone(), cfg.topic.clone());
    let missing = tokio::task::spawn_blocking(move || {
        let p: BaseProducer = c
            .create()
            .map_err(|e| anyhow!("[kafka]: cannot create the producer: {e}"))?;
        Ok::<_, anyhow::Error>(
            match p
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
            {
                Ok(md) => md.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error().map(RDKafkaErrorCode::from)
                            == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
                }),
                Err(e) => {
                    tracing::warn!("[kafka]: no answer from {brokers} about topic {topic}: {e}");
                    false
                }
            },
        )
    })
    .await??;
    if missing {
        bail!(
            "[kafka]: topic {} does not exist on {} (and the brokers do not create topics on first \
             use); create it, with as many partitions as its consumers need (events of one row \
             share a key, so they stay in order within a partition), or set [kafka] topic to one \
             that exists",
            cfg.topic,
            cfg.brokers
        );
    }
    Ok(())
}

fn report(p: &mut Producer, shared: &Shared) -> Result<()> {
    let l = p.delivered()?;
    shared.delivered.store(l.0, Ordering::Release);
    shared.unacknowledged.store(p.pending(), Ordering::Release);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TableName;
    use crate::side::Side;
    use crate::source::pgoutput::{OldTuple, RelColumn};
    use bytes::Bytes;
    use std::sync::Arc;

    fn ev(change: Change) -> Event {
        Event {
            source: Side::Mobile,
            commit_lsn: Lsn(0x1_0000_0010),
            commit_ts: 0,
            xid: 42,
            ordinal: 3,
            change,
        }
    }
    fn table() -> Arc<SourceTable> {
        let col = |n: &str, key| RelColumn {
            key,
            name: n.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        Arc::new(SourceTable {
            oid: 1,
            name: TableName::new("public", "jobs"),
            columns: vec![col("id", true), col("note", false), col("big", false)],
        })
    }
    fn t(s: &str) -> Value {
        Value::Text(Bytes::from(s.to_string()))
    }

    #[test]
    fn an_encoder_reused_across_transactions_writes_each_ones_own_texts() {
        let first = ev(Change::Insert {
            table: table(),
            new: vec![t("7"), t("a"), t("b")],
        });
        let other_txn = |change| Event {
            source: Side::Desktop,
            commit_lsn: Lsn(0x2_0000_0020),
            xid: 7,
            ..ev(change)
        };
        let truncate = other_txn(Change::Truncate {
            tables: vec![table(), table()],
            cascade: false,
            restart_identity: false,
        });
        let delete = other_txn(Change::Delete {
            table: table(),
            old: OldTuple {
                full: false,
                tuple: vec![t("9"), Value::Null, Value::Null],
            },
        });
        let mut enc = Encoder::default();
        let mut seen = vec![];
        for (e, format) in [
            (&first, KafkaFormat::Protobuf),
            (&truncate, KafkaFormat::Json),
            (&delete, KafkaFormat::Protobuf),
            (&first, KafkaFormat::Json),
        ] {
            let fresh = records(e, "applied", format);
            assert_eq!(fresh.len(), message_count(e));
            for (i, r) in fresh.iter().enumerate() {
                let m = enc.encode(e, i, "applied", format);
                assert_eq!(
                    (m.id, m.key, m.payload, m.site, m.commit_lsn),
                    (&*r.id, &*r.key, &*r.payload, &*r.site, &*r.commit_lsn)
                );
                seen.push(format!("{} {} {}", m.id, m.commit_lsn, m.xid));
            }
        }
        assert_eq!(
            seen,
            [
                "M:1/10:3 1/10 42",
                "D:2/20:3 2/20 7",
                "D:2/20:3/1 2/20 7",
                "D:2/20:3 2/20 7",
                "M:1/10:3 1/10 42"
            ]
        );
    }

    #[test]
    fn json_carries_every_documented_field() {
        let e = ev(Change::Update {
            table: table(),
            old: None,
            new: vec![t("7"), Value::Null, Value::UnchangedToast],
        });
        let r = records(&e, "applied", KafkaFormat::Json);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, "M:1/10:3");
        assert_eq!(String::from_utf8_lossy(&r[0].key), "public.jobs:[\"7\"]");
        let v: serde_json::Value = serde_json::from_slice(&r[0].payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "M:1/10:3", "site": "M", "op": "update", "schema": "public", "table": "jobs",
                "key": {"id": "7"}, "before": null, "after": {"id": "7", "note": null},
                "unchanged_toast": ["big"], "commit_lsn": "1/10", "commit_ts": "2000-01-01T00:00:00.000000Z",
                "xid": 42, "ordinal": 3, "outcome": "applied"
            })
        );
    }

    #[test]
    fn protobuf_round_trips_and_deletes_carry_the_old_key() {
        let e = ev(Change::Delete {
            table: table(),
            old: OldTuple {
                full: false,
                tuple: vec![t("9"), Value::Null, Value::Null],
            },
        });
        let r = records(&e, "skipped_echo", KafkaFormat::Protobuf);
        let p = proto::Event::decode(&r[0].payload[..]).unwrap();
        assert_eq!(
            (p.op.as_str(), p.outcome.as_str()),
            ("delete", "skipped_echo")
        );
        assert_eq!(p.key.len(), 1);
        assert_eq!(p.key["id"].kind, Some(proto::value::Kind::Text("9".into())));
        assert_eq!(p.before.unwrap().columns.len(), 1, "key-only old row");
        assert!(p.after.is_none());
        assert_eq!(p.commit_ts_micros, PG_EPOCH_UNIX_MICROS);
    }

    /// The message as prost writes it from a `proto::Event` built field by field.
    fn prost_reference(ev: &Event, outcome: &str) -> Vec<u8> {
        let map = |cols: Vec<(String, Option<String>)>| -> HashMap<String, proto::Value> {
            cols.into_iter()
                .map(|(c, v)| {
                    let kind = match v {
                        Some(t) => proto::value::Kind::Text(t),
                        None => proto::value::Kind::Null(true),
                    };
                    (c, proto::Value { kind: Some(kind) })
                })
                .collect()
        };
        let (t, key, before, after, unchanged) = match &ev.change {
            Change::Insert { table, new } => (
                table,
                image(table, new, true),
                None,
                Some(image(table, new, false)),
                vec![],
            ),
            Change::Update { table, old, new } => (
                table,
                image(table, new, true),
                old.as_ref().map(|o| image(table, &o.tuple, !o.full)),
                Some(image(table, new, false)),
                table
                    .columns
                    .iter()
                    .zip(new)
                    .filter(|(_, v)| **v == Value::UnchangedToast)
                    .map(|(c, _)| c.name.clone())
                    .collect(),
            ),
            Change::Delete { table, old } => (
                table,
                image(table, &old.tuple, true),
                Some(image(table, &old.tuple, !old.full)),
                None,
                vec![],
            ),
            Change::Truncate { tables, .. } => (&tables[0], vec![], None, None, vec![]),
            Change::Ddl { .. } => (&*DDL_TABLE, vec![], None, None, vec![]),
        };
        proto::Event {
            id: format!("{}:{}:{}", ev.source.tag(), ev.commit_lsn, ev.ordinal),
            site: ev.source.tag().to_string(),
            op: ev.change.op().into(),
            schema: t.name.schema.clone(),
            table: t.name.name.clone(),
            key: map(key),
            before: before.map(|b| proto::Row { columns: map(b) }),
            after: after.map(|a| proto::Row { columns: map(a) }),
            unchanged_toast: unchanged,
            commit_lsn: ev.commit_lsn.to_string(),
            commit_ts_micros: ev.commit_ts + PG_EPOCH_UNIX_MICROS,
            xid: ev.xid,
            ordinal: ev.ordinal,
            outcome: outcome.into(),
            ddl: ddl_text(ev).into(),
            changes: 0,
        }
        .encode_to_vec()
    }

    #[test]
    fn protobuf_written_directly_decodes_like_prost_own_encoding() {
        let full = |tuple| OldTuple { full: true, tuple };
        let changes = vec![
            Change::Insert {
                table: table(),
                new: vec![t("1"), t(""), Value::Null],
            },
            Change::Update {
                table: table(),
                old: Some(full(vec![t("1"), t("é ✓"), Value::Null])),
                new: vec![t("1"), t("x"), Value::UnchangedToast],
            },
            Change::Update {
                table: table(),
                old: Some(OldTuple {
                    full: false,
                    tuple: vec![t("1"), Value::Null, Value::Null],
                }),
                new: vec![t("2"), Value::Null, t(&"y".repeat(300))],
            },
            Change::Update {
                table: table(),
                old: None,
                new: vec![t("3"), t("z"), t("w")],
            },
            Change::Delete {
                table: table(),
                old: full(vec![t("4"), t("gone"), Value::Null]),
            },
            // Rows whose length takes a three-byte varint (written after the row, see `put_row`).
            Change::Update {
                table: table(),
                old: Some(full(vec![t("5"), t(&"o".repeat(20_000)), Value::Null])),
                new: vec![t("5"), t(&"n".repeat(20_000)), t("w")],
            },
            Change::Truncate {
                tables: vec![table()],
                cascade: false,
                restart_identity: false,
            },
            Change::Ddl {
                id: 3,
                sql: "ALTER TABLE jobs ADD COLUMN note text".into(),
                search_path: "public".into(),
            },
        ];
        for (i, change) in changes.into_iter().enumerate() {
            let mut e = ev(change);
            // Negative and zero times, xids and ordinals are the defaults prost leaves out.
            e.commit_ts = [-5, 0, 1 << 40][i % 3];
            e.xid = [0, 7][i % 2];
            e.ordinal = i as u32;
            let ours = &records(&e, "kept_local", KafkaFormat::Protobuf)[0].payload;
            let theirs = prost_reference(&e, "kept_local");
            assert_eq!(
                decode(ours).unwrap(),
                decode(&theirs).unwrap(),
                "change {i}"
            );
            assert_eq!(ours.len(), theirs.len(), "change {i}");
        }
    }

    #[test]
    fn a_schema_change_is_an_event_of_its_own_carrying_its_statement() {
        let mut e = ev(Change::Ddl {
            id: 3,
            sql: "ALTER TABLE jobs ADD COLUMN note text".into(),
            search_path: "public".into(),
        });
        e.ordinal = 2;
        for format in [KafkaFormat::Json, KafkaFormat::Protobuf] {
            let r = &records(&e, "applied", format)[0];
            let d = decode(&r.payload).unwrap();
            assert_eq!(
                (d.op.as_str(), d.schema.as_str(), d.table.as_str()),
                ("ddl", "tandem", "ddl")
            );
            assert_eq!(d.ddl, "ALTER TABLE jobs ADD COLUMN note text");
            assert!(d.key.is_empty() && d.before.is_none() && d.after.is_none());
            assert_eq!(d.id, format!("M:{}:2", e.commit_lsn));
            assert_eq!(r.key, b"tandem.ddl:[]");
        }
        // A row change's JSON has no `ddl` field, as before.
        let row = ev(Change::Insert {
            table: table(),
            new: vec![t("1"), t("a"), Value::Null],
        });
        let json = &records(&row, "applied", KafkaFormat::Json)[0].payload;
        assert!(!String::from_utf8_lossy(json).contains("\"ddl\""));
        assert_eq!(decode(json).unwrap().ddl, "");
    }

    /// `[kafka]` for topic `audit` of a mock cluster, Kafka required.
    fn mock_config(
        cluster: &rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        format: KafkaFormat,
        transactions: bool,
    ) -> KafkaConfig {
        KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            topic: "audit".into(),
            format,
            required: true,
            transactions,
            properties: Default::default(),
            spool_path: String::new(),
            spool_max_bytes: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_that_times_out_keeps_its_barrier_behind_the_unacknowledged_message() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::DefaultProducerContext;
        let cluster = MockCluster::<DefaultProducerContext>::new(1).unwrap();
        cluster.create_topic("audit", 1, 1).unwrap();
        let cfg = mock_config(&cluster, KafkaFormat::Protobuf, false);
        let mut p = Producer::new(&cfg, Lsn(10), "D>M").unwrap();
        // The broker answers every produce request with a retriable error, as while it is away.
        // (Not `broker_down`: librdkafka's mock then closes and binds its port again, and aborts
        // the test process when another socket took the port in between; it did once in CI.)
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 10_000],
        );
        let insert = ev(Change::Insert {
            table: table(),
            new: vec![t("1"), t("x"), Value::Null],
        });
        p.publish(&insert, "applied").await.unwrap();
        p.barrier(Lsn(100));
        // Each drain gives up waiting (many times over) while the broker is away: the message
        // must still stand before its barrier.
        for _ in 0..3 {
            assert_eq!(p.drain(Duration::from_millis(350)).await.unwrap(), Lsn(10));
        }
        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        assert_eq!(p.drain(Duration::from_secs(30)).await.unwrap(), Lsn(100));
    }

    #[test]
    fn both_formats_decode_to_the_same_event_and_garbage_is_an_error() {
        let e = ev(Change::Update {
            table: table(),
            old: Some(OldTuple {
                full: true,
                tuple: vec![t("7"), t("a"), Value::Null],
            }),
            new: vec![t("7"), Value::Null, Value::UnchangedToast],
        });
        let j = decode(&records(&e, "applied", KafkaFormat::Json)[0].payload).unwrap();
        let p = decode(&records(&e, "applied", KafkaFormat::Protobuf)[0].payload).unwrap();
        assert_eq!(j, p);
        assert_eq!(j.id, "M:1/10:3");
        assert_eq!(
            j.after,
            Some(vec![("id".into(), Some("7".into())), ("note".into(), None)])
        );
        assert_eq!(j.unchanged_toast, vec!["big".to_string()]);
        assert!(decode(b"{\"id\": 1}").is_err());
        assert!(decode(&[0xff, 0x00, 0x13]).is_err());
    }

    #[test]
    fn a_transaction_end_is_an_event_of_its_own_with_its_number_of_events() {
        let end = TxnEnd {
            source: Side::Desktop,
            commit_lsn: Lsn(0x1_0000_0020),
            commit_ts: 1 << 40,
            xid: 77,
            changes: 300,
        };
        let mut enc = Encoder::default();
        for format in [KafkaFormat::Json, KafkaFormat::Protobuf] {
            let m = enc.encode_end(&end, format);
            assert_eq!(m.key, b"tandem.transaction:[]");
            assert_eq!((m.site, m.commit_lsn, m.xid), ("D", "1/20", "77"));
            let d = decode(m.payload).unwrap();
            assert_eq!(
                (d.op.as_str(), d.schema.as_str(), d.table.as_str()),
                ("commit", "tandem", "transaction")
            );
            assert_eq!(
                (d.id.as_str(), d.changes, d.xid),
                ("D:1/20:commit", 300, 77)
            );
            assert_eq!(d.commit_lsn, end.commit_lsn);
            assert_eq!(d.commit_ts, rfc3339(1 << 40));
            assert!(d.key.is_empty() && d.before.is_none() && d.after.is_none());
        }
        // As prost writes it (field 16 takes a two-byte key).
        let ours = enc.encode_end(&end, KafkaFormat::Protobuf).payload.to_vec();
        let theirs = proto::Event {
            id: "D:1/20:commit".into(),
            site: "D".into(),
            op: "commit".into(),
            schema: "tandem".into(),
            table: "transaction".into(),
            commit_lsn: "1/20".into(),
            commit_ts_micros: (1 << 40) + PG_EPOCH_UNIX_MICROS,
            xid: 77,
            changes: 300,
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(ours, theirs);
        // A row's JSON has no `changes` field, and decodes with 0.
        let row = ev(Change::Insert {
            table: table(),
            new: vec![t("1"), t("a"), Value::Null],
        });
        let json = &records(&row, "applied", KafkaFormat::Json)[0].payload;
        assert!(!String::from_utf8_lossy(json).contains("\"changes\""));
        assert_eq!(decode(json).unwrap().changes, 0);
    }

    /// With `transactions`, each source transaction's end event follows its events, held and
    /// released with them: one whose target transaction rolled back is not sent, and comes again
    /// with its events.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_end_is_held_and_released_with_its_events() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::DefaultProducerContext;
        use rdkafka::Message as _;
        let cluster = MockCluster::<DefaultProducerContext>::new(1).unwrap();
        cluster.create_topic("audit", 1, 1).unwrap();
        let cfg = mock_config(&cluster, KafkaFormat::Json, true);
        let mut p = Publisher::new(&cfg, Lsn(10), "M>D").unwrap();
        let at = |lsn: u64, ordinal: u32| Event {
            commit_lsn: Lsn(lsn),
            ordinal,
            ..ev(Change::Insert {
                table: table(),
                new: vec![t(&ordinal.to_string()), t("x"), Value::Null],
            })
        };
        let end = |lsn: u64, changes: u32| TxnEnd {
            source: Side::Mobile,
            commit_lsn: Lsn(lsn),
            commit_ts: 0,
            xid: 9,
            changes,
        };
        for o in 0..3 {
            p.publish(at(100, o), "applied").await.unwrap();
        }
        p.end(end(100, 3)).unwrap();
        p.release();
        // Rolled back on the target: neither its events nor its end go out.
        for o in 0..2 {
            p.publish(at(200, o), "applied").await.unwrap();
        }
        p.end(end(200, 2)).unwrap();
        p.discard();
        // It comes again from the slot.
        for o in 0..2 {
            p.publish(at(200, o), "applied").await.unwrap();
        }
        p.end(end(200, 2)).unwrap();
        p.barrier(Lsn(300));
        assert_eq!(p.drain(Duration::from_secs(30)).await.unwrap(), Lsn(300));

        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "ends")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        c.subscribe(&["audit"]).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && got.len() < 7 {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let d = decode(m.payload().unwrap()).unwrap();
                got.push(match d.op.as_str() {
                    "commit" => format!("end {} {}", d.commit_lsn, d.changes),
                    op => format!("{op} {} {}", d.commit_lsn, d.ordinal),
                });
            }
        }
        // Nothing more: the rolled-back attempt sent nothing.
        assert!(c.poll(Duration::from_millis(500)).is_none());
        let want = [
            "insert 0/64 0",
            "insert 0/64 1",
            "insert 0/64 2",
            "end 0/64 3",
            "insert 0/C8 0",
            "insert 0/C8 1",
            "end 0/C8 2",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "2000-01-01T00:00:00.000000Z");
        // 2026-11-25 09:30:00.5 UTC
        let unix = 1_795_599_000_500_000i64;
        assert_eq!(
            rfc3339(unix - PG_EPOCH_UNIX_MICROS),
            "2026-11-25T09:30:00.500000Z"
        );
        assert_eq!(rfc3339(-1), "1999-12-31T23:59:59.999999Z");
    }
}
