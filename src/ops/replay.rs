//! `tandem replay --from-kafka` and `tandem audit tail`: read the audit topic back. Replay applies
//! it to a database through the same idempotent apply path (running it twice changes nothing).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::apply::Applier;
use crate::catalog;
use crate::config::{Config, KafkaConfig, TableName};
use crate::event::{Change, Event, SourceTable};
use crate::lsn::Lsn;
use crate::side::Side;
use crate::sink::kafka::{decode, Decoded};
use crate::source::pgoutput::{OldTuple, RelColumn, Value};

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub site: Option<Side>,
    pub table: Option<TableName>,
    pub since_lsn: Option<Lsn>,
    /// RFC 3339 (compared as text: the topic's times are all UTC with microseconds).
    pub since: Option<String>,
}

impl Filter {
    fn keeps(&self, d: &Decoded) -> bool {
        self.site.is_none_or(|s| d.site == s.tag().to_string())
            && self
                .table
                .as_ref()
                .is_none_or(|t| t.schema == d.schema && t.name == d.table)
            && self.since_lsn.is_none_or(|l| d.commit_lsn >= l)
            && self
                .since
                .as_ref()
                .is_none_or(|s| d.commit_ts.as_str() >= s.as_str())
    }
}

/// One line for operators.
pub fn line(d: &Decoded) -> String {
    if d.op == "ddl" {
        return format!(
            "{} {} {:<8} {} {} id={}",
            d.commit_ts, d.site, d.op, d.ddl, d.outcome, d.id
        );
    }
    if d.op == "commit" {
        return format!(
            "{} {} {:<8} xid {}: {} change(s) id={}",
            d.commit_ts, d.site, d.op, d.xid, d.changes, d.id
        );
    }
    let key: Vec<String> = d
        .key
        .iter()
        .map(|(c, v)| format!("{c}={}", v.as_deref().unwrap_or("NULL")))
        .collect();
    format!(
        "{} {} {:<8} {}.{} [{}] {} id={}",
        d.commit_ts,
        d.site,
        d.op,
        d.schema,
        d.table,
        key.join(" "),
        d.outcome,
        d.id
    )
}

/// Read `topic` from the beginning, to its end as it is now (or forever with `follow`), sending
/// decoded events in partition order.
fn read(k: &KafkaConfig, topic: &str, follow: bool) -> Result<mpsc::Receiver<Result<Decoded>>> {
    let c = crate::sink::kafka::client_config(k, |c| {
        c.set("group.id", format!("tandem-read-{}", std::process::id()))
            .set("enable.auto.commit", "false");
    });
    messages(c, topic, follow, |m| {
        decode(m.payload().unwrap_or_default()).with_context(|| {
            format!(
                "message at {}/{} offset {}",
                m.topic(),
                m.partition(),
                m.offset()
            )
        })
    })
}

/// Every message of `topic` from the beginning to its end as it is now (or forever with
/// `follow`), in partition order, each through `f`; the channel closes at the end. `c`: a
/// consumer's settings, `group.id` included (nothing is committed). Runs the
/// blocking consumer on its own thread. Partitions are assigned, not subscribed: no consumer
/// group to join or rebalance, and the end is the high watermarks read at the start, not a quiet
/// spell (a pause of the broker is no end of the topic).
pub fn messages<T: Send + 'static>(
    c: rdkafka::ClientConfig,
    topic: &str,
    follow: bool,
    f: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> Result<T> + Send + 'static,
) -> Result<mpsc::Receiver<Result<T>>> {
    let consumer: BaseConsumer = c
        .create()
        .map_err(|e| anyhow!("[kafka]: cannot create a consumer: {e}"))?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("[kafka]: reading the metadata of topic {topic}"))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("[kafka]: topic {topic} does not exist or has no partitions");
    }
    let mut ends = HashMap::new();
    let mut list = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(10))
            .with_context(|| format!("[kafka]: watermarks of {topic}/{p}"))?;
        if high > low {
            ends.insert(*p, high);
        }
        list.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let (tx, rx) = mpsc::channel(1024);
    std::thread::spawn(move || {
        while follow || !ends.is_empty() {
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(e)) => {
                    let _ = tx.blocking_send(Err(anyhow!("[kafka]: {e}")));
                    return;
                }
                Some(Ok(m)) => {
                    if ends
                        .get(&m.partition())
                        .is_some_and(|&h| m.offset() + 1 >= h)
                    {
                        ends.remove(&m.partition());
                    }
                    if tx.blocking_send(f(&m)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

fn kafka(cfg: &Config) -> Result<&KafkaConfig> {
    cfg.kafka.as_ref().ok_or_else(|| {
        anyhow!("no [kafka] section in the config: add brokers (and topic) to read from")
    })
}

/// `tandem audit tail`.
pub async fn tail(cfg: &Config, topic: Option<&str>, follow: bool, filter: &Filter) -> Result<()> {
    let k = kafka(cfg)?;
    let mut rx = read(k, topic.unwrap_or(&k.topic), follow)?;
    while let Some(d) = rx.recv().await {
        let d = d?;
        if filter.keeps(&d) {
            println!("{}", line(&d));
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
pub struct ReplayReport {
    pub read: u64,
    pub applied: u64,
}

/// `tandem replay --from-kafka --to SIDE`: the target side's own changes and the other side's
/// changes that landed there (applied, or won a conflict), in topic order, through the apply path.
/// Echo events are copies of the other site's changes and are never replayed.
pub async fn replay(
    cfg: Arc<Config>,
    to: Side,
    topic: Option<&str>,
    filter: &Filter,
    dry_run: bool,
    mut print: impl FnMut(&str),
) -> Result<ReplayReport> {
    let k = kafka(&cfg)?.clone();
    let mut rx = read(&k, topic.unwrap_or(&k.topic), false)?;
    let mut a = Applier::connect(cfg.clone(), to.other()).await?;
    a.ignore_direction = true;
    a.detect_conflicts = false;
    let mut tables: HashMap<TableName, Arc<SourceTable>> = HashMap::new();
    let mut report = ReplayReport::default();
    let mut chunk = Chunk::default();
    while let Some(d) = rx.recv().await {
        let d = d?;
        report.read += 1;
        let landed = d.site == to.tag().to_string()
            || matches!(d.outcome.as_str(), "applied" | "applied_remote" | "merged");
        // A transaction's end (`[kafka] transactions`) says how many changes it had: nothing to
        // apply.
        if d.outcome == "skipped_echo" || !landed || !filter.keeps(&d) || d.op == "commit" {
            continue;
        }
        if d.op == "ddl" {
            // Schema changes are not run again: the side already has one it made or took, and
            // running it twice would fail. A target restored from before it lacks it: the
            // statement is in the event.
            print(&format!(
                "not replayed: schema change {} ({}), which {to} must have for the events after it",
                d.id, d.ddl
            ));
            continue;
        }
        if dry_run {
            print(&line(&d));
            report.applied += 1;
            continue;
        }
        let name = TableName::new(&d.schema, &d.table);
        if !tables.contains_key(&name) {
            let t = catalog::table(a.client(), &name).await?.ok_or_else(|| {
                anyhow!("{to}: table {name} does not exist; create it before replaying into it")
            })?;
            if t.key.is_empty() {
                // Replay writes upserts by key, so that running it twice changes nothing.
                bail!(
                    "{to}: table {name} has no primary key, so its events cannot be replayed \
                     without doubling rows (an insert replayed twice is two rows); add a primary \
                     key, or replay the other tables one by one with `--table`"
                );
            }
            let columns = t
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.generated)
                .map(|(i, c)| RelColumn {
                    key: t.key.contains(&i),
                    name: c.name.clone(),
                    type_oid: 0,
                    type_modifier: -1,
                })
                .collect();
            let st = SourceTable {
                oid: 1 + tables.len() as u32,
                name: name.clone(),
                columns,
            };
            tables.insert(name.clone(), Arc::new(st));
        }
        let table = tables[&name].clone();
        let value = |img: &[(String, Option<String>)], col: &RelColumn, absent: Value| match img
            .iter()
            .find(|(c, _)| *c == col.name)
        {
            Some((_, Some(v))) => Value::Text(bytes::Bytes::from(v.clone())),
            Some((_, None)) => Value::Null,
            None => absent,
        };
        let change = match d.op.as_str() {
            "insert" | "update" => {
                let after = d.after.clone().unwrap_or_default();
                let new = table
                    .columns
                    .iter()
                    // A column the event does not carry keeps the target's value.
                    .map(|c| value(&after, c, Value::UnchangedToast))
                    .collect();
                Change::Update {
                    table: table.clone(),
                    old: None,
                    new,
                }
            }
            "delete" => Change::Delete {
                table: table.clone(),
                old: OldTuple {
                    full: false,
                    tuple: table
                        .columns
                        .iter()
                        .map(|c| value(&d.key, c, Value::Null))
                        .collect(),
                },
            },
            "truncate" => Change::Truncate {
                tables: vec![table.clone()],
                cascade: false,
                restart_identity: false,
            },
            other => bail!("event {}: unknown op `{other}`", d.id),
        };
        let ev = Event {
            source: to.other(),
            commit_lsn: d.commit_lsn,
            commit_ts: 0,
            xid: d.xid,
            ordinal: d.ordinal,
            change,
        };
        let applied = a.apply(&ev).await;
        chunk.add(ev);
        match applied {
            Err(e) if collided(&e) => chunk.again(&mut a).await?,
            r => r.with_context(|| format!("replaying event {}", d.id))?,
        }
        report.applied += 1;
        if chunk.full() {
            chunk.commit(&mut a).await?;
        }
    }
    chunk.commit(&mut a).await?;
    Ok(report)
}

/// The events applied since the last commit, kept until it: rows exchanging values of a unique
/// constraint (a swap through a temporary value), merged into their latest versions in one
/// batch, collide where the database has the rows from before (restored from a backup), and
/// are applied again change by change, in the topic's order. Committed every 5,000 events or
/// 16 MiB of values, so memory stays bounded.
#[derive(Default)]
struct Chunk {
    events: Vec<Event>,
    bytes: usize,
}

impl Chunk {
    fn add(&mut self, ev: Event) {
        let values = match &ev.change {
            Change::Insert { new, .. } | Change::Update { new, .. } => &new[..],
            Change::Delete { old, .. } => &old.tuple[..],
            Change::Truncate { .. } | Change::Ddl { .. } => &[],
        };
        self.bytes += values
            .iter()
            .map(|v| match v {
                Value::Text(b) | Value::Binary(b) => b.len(),
                Value::Null | Value::UnchangedToast => 0,
            })
            .sum::<usize>();
        self.events.push(ev);
    }

    fn full(&self) -> bool {
        self.events.len() >= 5000 || self.bytes >= 16 << 20
    }

    async fn commit(&mut self, a: &mut Applier) -> Result<()> {
        match a.commit_outside_stream().await {
            Err(e) if collided(&e) => self.again(a).await,
            r => r,
        }?;
        *self = Chunk::default();
        Ok(())
    }

    /// Roll back, apply the chunk change by change, and commit.
    async fn again(&mut self, a: &mut Applier) -> Result<()> {
        a.rollback().await?;
        a.apply_singly(true);
        let mut r = Ok(());
        for ev in &self.events {
            r = a.apply(ev).await;
            if r.is_err() {
                break;
            }
        }
        if r.is_ok() {
            r = a.commit_outside_stream().await;
        }
        a.apply_singly(false);
        r.context(
            "applied again change by change in the topic's order, the events since the last \
             commit still collide (a topic of more than one partition keeps each row's changes in \
             order, not those of different rows: rows that exchanged values of a unique \
             constraint are then replayed out of order)",
        )?;
        *self = Chunk::default();
        Ok(())
    }
}

fn collided(e: &anyhow::Error) -> bool {
    crate::db::caused_by(e, &tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}
