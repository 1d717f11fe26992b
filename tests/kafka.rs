//! The Kafka audit stream against librdkafka's in-process mock cluster: every source change is on
//! the topic once (by id) with the documented fields; tandem's own applied transactions appear as
//! `skipped_echo` from the other site.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{
    audit_sql, mock_kafka, slot_confirmed, stream_from_a_few_hundred_rows, streamed_txns,
    wait_count, wait_for, Fixture, STREAMED_SESSIONS, TOPIC,
};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message};
use tandem::sink::spool::Spool;
use tokio_postgres::Client;

/// Kafka goes away: the broker answers every produce request with a retriable error until
/// [`kafka_back`], so nothing is acknowledged and deliveries fail at `message.timeout.ms`. Not
/// `broker_down`: librdkafka's mock then closes and binds its listener's port again, and aborts
/// the whole test process when another socket took the port in between (it did once in CI).
fn kafka_away(cluster: &MockCluster<'static, DefaultProducerContext>) {
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 100_000],
    );
}

fn kafka_back(cluster: &MockCluster<'static, DefaultProducerContext>) {
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
}

/// Every message on the topic, from its start to its end as Kafka holds it now (each partition's
/// high watermark): not "until a quiet spell", which a broker pausing cut short.
async fn consume_all(brokers: &str) -> Vec<serde_json::Value> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", format!("t{}", std::process::id()));
    let mut rx = tandem::ops::replay::messages(c, TOPIC, false, |m| {
        let mut v: serde_json::Value = serde_json::from_slice(m.payload().unwrap())?;
        let headers = m
            .headers()
            .map(|h| {
                use rdkafka::message::Headers;
                (0..h.count())
                    .map(|i| {
                        let x = h.get(i);
                        (
                            x.key.to_string(),
                            String::from_utf8_lossy(x.value.unwrap()).into_owned(),
                        )
                    })
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        v["_headers"] = serde_json::json!(headers);
        v["_key"] = serde_json::json!(String::from_utf8_lossy(m.key().unwrap()));
        Ok(v)
    })
    .unwrap();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(v)) => out.push(v.unwrap()),
            Ok(None) => return out,
            Err(_) => panic!("the topic's end not reached in 60 s; {} read", out.len()),
        }
    }
}

/// `tandem replay --from-kafka --to mobile` with `more` arguments, which must exit 0: its stdout.
fn replay_into_mobile(config: &str, more: &[&str]) -> String {
    let mut args = vec![
        "--config",
        config,
        "replay",
        "--from-kafka",
        "--to",
        "mobile",
    ];
    args.extend(more);
    let (code, out, err) = common::run_tandem(&args, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    out
}

/// 40 inserts, 10 updates, 5 deletes, one transaction each; returns the change count.
async fn workload(c: &Client, base: i64) -> usize {
    for i in 1..=40i64 {
        c.execute("INSERT INTO jobs VALUES ($1, 'new', 0)", &[&(base + i)])
            .await
            .unwrap();
    }
    for i in 1..=10i64 {
        c.execute(
            "UPDATE jobs SET n = n + 1, note = 'upd' WHERE id = $1",
            &[&(base + i)],
        )
        .await
        .unwrap();
    }
    for i in 36..=40i64 {
        c.execute("DELETE FROM jobs WHERE id = $1", &[&(base + i)])
            .await
            .unwrap();
    }
    55
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_change_of_both_sites_is_on_the_topic_once() {
    let (_cluster, brokers) = mock_kafka(3);
    let (d, m) = Fixture::databases(
        "kafka_all",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let text = Fixture::config_text("kafka_all", "tables = [\"public.jobs\"]")
        + &format!("[kafka]\nbrokers = \"{brokers}\"\nformat = \"json\"\nrequired = true\n");
    let fx = Fixture::with_config("kafka_all", d, m, text).await;
    let run = fx.start().await;
    let (nd, nm) = tokio::join!(workload(&fx.d, 0), workload(&fx.m, 1000));
    fx.wait_equal("jobs", 60).await;
    // The slots are confirmed only past what Kafka acknowledged: wait until both caught up.
    wait_for(30, "slots confirmed past the workload", || async {
        let lag =
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots \
                   WHERE slot_name LIKE 'kafka_all%'";
        let mut ok = true;
        for c in [&fx.d, &fx.m] {
            ok &= Fixture::count(c, &format!("SELECT max(x) FROM ({lag}) s(x)")).await < 1 << 20;
        }
        ok
    })
    .await;
    // Echoes: tandem's own transactions, reported from the site they were applied on. A slot
    // near its end does not say they were streamed yet (under load, once, none were by the stop).
    wait_for(30, "echoes from both sites on the topic", || async {
        let msgs = consume_all(&brokers).await;
        ["D", "M"].iter().all(|site| {
            msgs.iter()
                .any(|m| m["site"] == *site && m["outcome"] == "skipped_echo")
        })
    })
    .await;
    run.stop().await;

    let msgs = consume_all(&brokers).await;
    let own: Vec<_> = msgs
        .iter()
        .filter(|m| m["outcome"] != "skipped_echo")
        .collect();
    let ids: BTreeSet<&str> = own.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), nd + nm, "one distinct id per source change");
    for site in ["D", "M"] {
        let n = own.iter().filter(|m| m["site"] == site).count();
        assert_eq!(n, 55, "{site}: its 55 changes, each once");
    }
    // One known change, field by field.
    let upd = own
        .iter()
        .find(|m| m["site"] == "D" && m["op"] == "update" && m["key"]["id"] == "3")
        .expect("desktop's update of row 3");
    assert_eq!(upd["schema"], "public");
    assert_eq!(upd["table"], "jobs");
    assert_eq!(
        upd["after"],
        serde_json::json!({"id": "3", "note": "upd", "n": "1"})
    );
    assert_eq!(upd["outcome"], "applied");
    assert_eq!(upd["_key"], "public.jobs:[\"3\"]");
    assert_eq!(upd["_headers"]["site"], "D");
    assert_eq!(upd["_headers"]["commit_lsn"], upd["commit_lsn"]);
    assert!(upd["commit_ts"].as_str().unwrap().ends_with('Z'));
    let del = own
        .iter()
        .find(|m| m["site"] == "M" && m["op"] == "delete" && m["key"]["id"] == "1036")
        .expect("mobile's delete of row 1036");
    assert_eq!(del["after"], serde_json::Value::Null);
    assert_eq!(del["before"], serde_json::json!({"id": "1036"}));

    // Operators read it; a wiped table is rebuilt from it, and a second replay changes nothing.
    let config = fx.config_path.to_str().unwrap();
    let (code, out, err) = common::run_tandem(
        &[
            "--config",
            config,
            "audit",
            "tail",
            "--site",
            "D",
            "--table",
            "public.jobs",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().count() >= 55, "{out}");
    assert!(
        out.contains(" D update   public.jobs [id=3] applied id=D:"),
        "{out}"
    );
    let want = Fixture::rows(&fx.d, "jobs").await;
    fx.m.batch_execute("DELETE FROM jobs").await.unwrap();
    let out = replay_into_mobile(config, &["--dry-run"]);
    assert!(out.contains("110 would be applied"), "{out}");
    assert_eq!(Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await, 0);
    for _ in 0..2 {
        let out = replay_into_mobile(config, &[]);
        assert!(out.contains("110 applied"), "{out}");
        assert_eq!(Fixture::rows(&fx.m, "jobs").await, want);
    }
}

/// Two users' emails swapped through a temporary value, replayed into a database as it was
/// before the swap (restored from a backup): merged into their latest versions, the replay's
/// batch gave user 1 user 2's email while user 2 still held it, a unique violation at every
/// try. The replay applies the part that failed again change by change, in the topic's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_swap_of_unique_values_replays_over_the_rows_from_before_it() {
    let (_cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_swap",
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE);",
    )
    .await;
    let text = Fixture::config_text("kafka_swap", "tables = [\"public.users\"]")
        + &format!("[kafka]\nbrokers = \"{brokers}\"\nformat = \"json\"\nrequired = true\n");
    let fx = Fixture::with_config("kafka_swap", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x'), (3, 'c@x')")
        .await
        .unwrap();
    fx.d.batch_execute(
        "BEGIN; UPDATE users SET email = 'tmp' WHERE id = 1; \
         UPDATE users SET email = 'a@x' WHERE id = 2; \
         UPDATE users SET email = 'b@x' WHERE id = 1; COMMIT",
    )
    .await
    .unwrap();
    fx.wait_equal("users", 30).await;
    wait_for(30, "desktop's six changes on the topic", || async {
        consume_all(&brokers)
            .await
            .iter()
            .filter(|m| m["site"] == "D")
            .count()
            == 6
    })
    .await;
    run.stop().await;
    // On the topic in desktop's order, though one batch held both rows' changes (each row's
    // together).
    let swap: Vec<String> = consume_all(&brokers)
        .await
        .iter()
        .filter(|m| m["site"] == "D" && m["op"] == "update")
        .map(|m| format!("{}={}", m["key"]["id"], m["after"]["email"]))
        .collect();
    assert_eq!(swap, [r#""1"="tmp""#, r#""2"="a@x""#, r#""1"="b@x""#]);
    // Mobile as a backup from before the swap has it.
    fx.m.batch_execute(
        "UPDATE users SET email = 'tmp' WHERE id = 1; UPDATE users SET email = 'b@x' WHERE id = 2; \
         UPDATE users SET email = 'a@x' WHERE id = 1",
    )
    .await
    .unwrap();
    let config = fx.config_path.to_str().unwrap();
    let out = replay_into_mobile(config, &[]);
    assert!(out.contains("6 applied"), "{out}");
    assert_eq!(
        Fixture::rows(&fx.m, "users").await,
        ["(1,b@x)", "(2,a@x)", "(3,c@x)"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_without_a_key_is_on_the_topic_by_its_values_and_not_replayed() {
    let (_cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_keyless",
        "CREATE TABLE links (job int, note text); ALTER TABLE links REPLICA IDENTITY FULL;",
    )
    .await;
    let text = Fixture::config_text("kafka_keyless", "tables = [\"public.links\"]")
        + &format!("[kafka]\nbrokers = \"{brokers}\"\nformat = \"json\"\nrequired = true\n");
    let fx = Fixture::with_config("kafka_keyless", d, m, text).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "INSERT INTO links VALUES (1, 'a'), (1, 'a'); \
         UPDATE links SET note = 'b' WHERE ctid = (SELECT min(ctid) FROM links); \
         DELETE FROM links WHERE note = 'a'",
    )
    .await
    .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM links WHERE note = 'b'", 1).await;
    fx.wait_equal("links", 30).await;
    let d_slot = fx.cfg.desktop.slot.clone();
    let end = wal_now(&fx.d).await;
    wait_for(30, "desktop's slot confirmed past the changes", || async {
        slot_confirmed(&fx.d, &d_slot).await >= end
    })
    .await;
    run.stop().await;
    let own: Vec<serde_json::Value> = consume_all(&brokers)
        .await
        .into_iter()
        .filter(|m| m["site"] == "D")
        .collect();
    let ops: Vec<(&str, &serde_json::Value, &serde_json::Value)> = own
        .iter()
        .map(|m| (m["op"].as_str().unwrap(), &m["before"], &m["after"]))
        .collect();
    let row = |job: &str, note: &str| serde_json::json!({"job": job, "note": note});
    let none = serde_json::Value::Null;
    assert_eq!(
        ops,
        [
            ("insert", &none, &row("1", "a")),
            ("insert", &none, &row("1", "a")),
            ("update", &row("1", "a"), &row("1", "b")),
            ("delete", &row("1", "a"), &none),
        ]
    );
    // The row is its identity (REPLICA IDENTITY FULL): the message key carries every value.
    assert_eq!(own[3]["key"], row("1", "a"));
    let (code, out, err) = common::run_tandem(
        &[
            "--config",
            fx.config_path.to_str().unwrap(),
            "replay",
            "--from-kafka",
            "--to",
            "mobile",
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("mobile: table public.links has no primary key, so its events cannot be replayed without doubling rows"),
        "{err}"
    );
    assert_eq!(Fixture::count(&fx.m, "SELECT count(*) FROM links").await, 1);
}

fn config(name: &str, brokers: &str) -> String {
    Fixture::config_text(name, "tables = [\"public.jobs\"]")
        + &format!("[kafka]\nbrokers = \"{brokers}\"\nformat = \"json\"\nrequired = true\n")
}

async fn wal_now(c: &Client) -> u64 {
    let s: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    s.parse::<tandem::lsn::Lsn>().unwrap().0
}

fn own_ids(msgs: &[serde_json::Value], site: &str) -> BTreeSet<String> {
    msgs.iter()
        .filter(|m| m["site"] == site && m["outcome"] != "skipped_echo")
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_kafka_required_an_outage_holds_the_slot_and_a_restart_resends() {
    let (cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_down",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let fx = Fixture::with_config("kafka_down", d, m, config("kafka_down", &brokers)).await;
    let run = fx.start().await;
    kafka_away(&cluster);
    for i in 1..=30i64 {
        fx.d.execute("INSERT INTO jobs VALUES ($1, 'during outage', 0)", &[&i])
            .await
            .unwrap();
    }
    let end = wal_now(&fx.d).await;
    // The target keeps applying, but desktop's slot stays behind the unacknowledged events for
    // the whole 30 s outage (its WAL is kept).
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 30).await;
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        assert!(
            slot_confirmed(&fx.d, "kafka_down_d").await < end,
            "slot confirmed past events Kafka never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Stopped while Kafka is still away: the target has the rows, Kafka does not. The restart
    // starts from the slot (not the target's checkpoint) and sends them.
    run.stop().await;
    assert!(slot_confirmed(&fx.d, "kafka_down_d").await < end);
    kafka_back(&cluster);
    let run = fx.start().await;
    wait_for(60, "slot confirmed once Kafka is back", || async {
        slot_confirmed(&fx.d, "kafka_down_d").await >= end
    })
    .await;
    run.stop().await;
    let msgs = consume_all(&brokers).await;
    assert_eq!(own_ids(&msgs, "D").len(), 30, "all 30 changes on the topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_kill_9_and_restart_consumers_deduping_by_id_see_each_change_once() {
    let (_cluster, brokers) = mock_kafka(3);
    let (d, m) = Fixture::databases(
        "kafka_kill",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let fx = Fixture::with_config("kafka_kill", d, m, config("kafka_kill", &brokers)).await;
    let path = fx.config_path.to_str().unwrap().to_string();
    let spawn = || {
        std::process::Command::new(common::tandem_bin())
            .args(["--config", &path, "run"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    // 400 single-row transactions on desktop; tandem is killed after about half of them.
    let writer = {
        let url = common::clusters().desktop.url("kafka_kill");
        tokio::spawn(async move {
            let c = common::connect(&url).await;
            for i in 1..=400i64 {
                c.execute("INSERT INTO jobs VALUES ($1, 'x', 0)", &[&i])
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    };
    wait_for(60, "some rows across", || async {
        Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await >= 150
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    writer.await.unwrap();
    let mut child = spawn();
    wait_count(60, &fx.m, "SELECT count(*) FROM jobs", 400).await;
    let end = wal_now(&fx.d).await;
    wait_for(60, "slot confirmed past the writes", || async {
        slot_confirmed(&fx.d, "kafka_kill_d").await >= end
    })
    .await;
    assert!(common::sigterm_and_wait(&mut child).success());
    let msgs = consume_all(&brokers).await;
    let ids = own_ids(&msgs, "D");
    assert_eq!(
        ids.len(),
        400,
        "every change is there (some possibly twice)"
    );
    let inserted: BTreeSet<String> = msgs
        .iter()
        .filter(|m| m["site"] == "D" && m["op"] == "insert")
        .map(|m| m["key"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(inserted.len(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_kafka_required_events_wait_in_the_spool_and_drain() {
    let (cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_spool",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let spool = common::scratch().join("tandem-spool");
    let spool_file = format!("{}.dm.bin", spool.display());
    let _ = std::fs::remove_file(&spool_file);
    let text = Fixture::config_text("kafka_spool", "tables = [\"public.jobs\"]")
        + &format!(
            "[kafka]\nbrokers = \"{brokers}\"\nformat = \"json\"\nrequired = false\n\
             spool_path = \"{}\"\n[kafka.properties]\n\"message.timeout.ms\" = \"2000\"\n",
            spool.display()
        );
    let fx = Fixture::with_config("kafka_spool", d, m, text).await;
    // tandem runs in this process: its metrics land in this recorder (other tests of this
    // binary may add to the counters, so only lower bounds are asserted).
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let run = fx.start().await;
    kafka_away(&cluster);
    for i in 1..=20i64 {
        fx.d.execute("INSERT INTO jobs VALUES ($1, 'spooled', 0)", &[&i])
            .await
            .unwrap();
    }
    let end = wal_now(&fx.d).await;
    // Replication goes on (the slot follows the target), the events wait in the spool.
    wait_for(30, "applied and confirmed without Kafka", || async {
        Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await == 20
            && slot_confirmed(&fx.d, "kafka_spool_d").await >= end
    })
    .await;
    let size = || std::fs::metadata(&spool_file).map(|m| m.len()).unwrap_or(0);
    // Every change failed and waits in the spool before Kafka comes back: one still in
    // librdkafka's own retries then (under message.timeout.ms) would be delivered without failing.
    let spooled_keys = || {
        // A record being appended as it is read fails the read: count none, poll again.
        let Ok(records) = Spool::open(spool_file.clone().into(), u64::MAX)
            .and_then(|mut spool| spool.take(usize::MAX))
        else {
            return 0;
        };
        records
            .iter()
            .map(|r| {
                serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["key"]["id"]
                    .to_string()
            })
            .collect::<BTreeSet<_>>()
            .len()
    };
    wait_for(30, "all 20 changes in the spool", || async {
        spooled_keys() == 20
    })
    .await;
    kafka_back(&cluster);
    wait_for(60, "the spool drains", || async { size() == 0 }).await;
    run.stop().await;
    let msgs = consume_all(&brokers).await;
    assert_eq!(
        own_ids(&msgs, "D").len(),
        20,
        "all 20 changes reached Kafka"
    );
    // Metrics: each failed delivery was counted and spooled, each resend produced, with latency.
    let body = recorder.render();
    let counter = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    for name in [
        "tandem_kafka_failed_total",
        "tandem_kafka_spooled_total",
        "tandem_kafka_produced_total",
    ] {
        assert!(counter(name) >= 20.0, "{name} in:\n{body}");
    }
    assert!(
        body.contains("tandem_kafka_produce_seconds"),
        "produce latency in:\n{body}"
    );
    let _ = std::fs::remove_file(&spool_file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repairs_are_published_too() {
    let (_cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_repair",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let fx = Fixture::with_config("kafka_repair", d, m, config("kafka_repair", &brokers)).await;
    // Divergence behind tandem's back (it is not running): 5 rows only on desktop.
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'only here', 0 FROM generate_series(1, 5) g")
        .await
        .unwrap();
    let (code, out, err) = common::run_tandem(
        &[
            "--config",
            fx.config_path.to_str().unwrap(),
            "repair",
            "--source",
            "desktop",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await, 5);
    let msgs = consume_all(&brokers).await;
    let repaired: BTreeSet<String> = msgs
        .iter()
        .filter(|m| m["site"] == "D" && m["op"] == "insert" && m["outcome"] == "applied")
        .map(|m| m["key"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(repaired.len(), 5, "{msgs:?}");
    let ids: BTreeSet<&str> = msgs.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), msgs.len(), "distinct ids");
}

/// A schema change made with `tandem ddl` is an event of its own (op `ddl`, its statement), before
/// the changes that carry its column; `replay` says it does not run it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_change_is_published_with_its_statement_and_not_replayed() {
    let (_cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_ddl",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let fx = Fixture::with_config("kafka_ddl", d, m, config("kafka_ddl", &brokers)).await;
    let cfg = fx.config_path.to_str().unwrap();
    let run = fx.start().await;
    let sql = "ALTER TABLE jobs ADD COLUMN due date";
    let (code, _, err) = common::run_tandem(&["--config", cfg, "ddl", "--on", "desktop", sql], &[]);
    assert_eq!(code, 0, "{err}");
    fx.d.batch_execute("INSERT INTO jobs VALUES (1, 'a', 0, '2026-12-24')")
        .await
        .unwrap();
    common::wait_count(
        30,
        &fx.m,
        "SELECT count(*) FROM jobs j WHERE to_jsonb(j) ->> 'due' IS NOT NULL",
        1,
    )
    .await;
    run.stop().await;
    let msgs = consume_all(&brokers).await;
    let ddl: Vec<_> = msgs.iter().filter(|m| m["op"] == "ddl").collect();
    assert_eq!(ddl.len(), 1, "{msgs:?}");
    let (ddl, insert) = (
        ddl[0],
        msgs.iter()
            .find(|m| m["op"] == "insert")
            .expect("the insert"),
    );
    assert_eq!(
        (
            &ddl["site"],
            &ddl["schema"],
            &ddl["table"],
            &ddl["ddl"],
            &ddl["outcome"]
        ),
        (
            &serde_json::json!("D"),
            &serde_json::json!("tandem"),
            &serde_json::json!("ddl"),
            &serde_json::json!(sql),
            &serde_json::json!("applied")
        )
    );
    let lsn = |m: &serde_json::Value| {
        m["commit_lsn"]
            .as_str()
            .unwrap()
            .parse::<tandem::lsn::Lsn>()
            .unwrap()
    };
    assert!(lsn(ddl) < lsn(insert), "{ddl} {insert}");
    assert_eq!(insert["after"]["due"], "2026-12-24");
    let out = replay_into_mobile(cfg, &[]);
    assert!(
        out.contains(&format!(
            "not replayed: schema change {} ({sql})",
            ddl["id"].as_str().unwrap()
        )),
        "{out}"
    );
    let (code, out, err) = common::run_tandem(&["--config", cfg, "audit", "tail"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!(" D ddl      {sql} applied id=")),
        "{out}"
    );
}

/// Changes desktop made between `setup` and the first `run` are in the initial snapshot's copy:
/// the stream leaves them out and publishes each once as `copied`, those of a transaction applied
/// while streamed (published from its spooled copy after its commit) too; the next one is
/// `applied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_the_initial_snapshot_copied_are_published_as_copied() {
    let (_cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_copied",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let fx = Fixture::with_config("kafka_copied", d, m, config("kafka_copied", &brokers)).await;
    common::stream_from_a_few_hundred_rows(&fx.d).await;
    fx.d.batch_execute(
        "INSERT INTO jobs SELECT g, 'before run', 0 FROM generate_series(1, 5) g;
         UPDATE jobs SET n = 1 WHERE id = 1;
         INSERT INTO jobs SELECT g, 'streamed', 0 FROM generate_series(101, 2100) g;",
    )
    .await
    .unwrap();
    let run = fx.start().await;
    fx.d.execute("INSERT INTO jobs VALUES (6, 'after', 0)", &[])
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs", 2006).await;
    run.stop().await;
    assert!(common::streamed_txns(&fx.d, "kafka_copied_d").await >= 1);
    let msgs = consume_all(&brokers).await;
    let of_desktop: Vec<(String, String, String)> = msgs
        .iter()
        .filter(|m| m["site"] == "D")
        .map(|m| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            (s(&m["op"]), s(&m["key"]["id"]), s(&m["outcome"]))
        })
        .collect();
    let event =
        |op: &str, id: i64, outcome: &str| (op.to_string(), id.to_string(), outcome.to_string());
    let mut want: Vec<(String, String, String)> =
        (1..=5).map(|id| event("insert", id, "copied")).collect();
    want.push(event("update", 1, "copied"));
    want.extend((101..=2100).map(|id| event("insert", id, "copied")));
    want.push(event("insert", 6, "applied"));
    assert_eq!(of_desktop.len(), want.len());
    assert_eq!(of_desktop, want);
}

/// `tandem skip` the desktop transaction committing at `lsn`, then run until the row `id` that
/// desktop writes after it reached mobile.
async fn skip_and_go_on(fx: &Fixture, lsn: &str, id: i64) {
    let cfg = fx.config_path.to_str().unwrap();
    let (code, _, err) = common::run_tandem(
        &["--config", cfg, "skip", "--from", "desktop", "--lsn", lsn],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let run = fx.start().await;
    fx.d.execute("INSERT INTO jobs VALUES ($1, 'after', 0)", &[&id])
        .await
        .unwrap();
    let arrived = format!("SELECT count(*) FROM jobs WHERE id = {id}");
    wait_count(30, &fx.m, &arrived, 1).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_left_out_by_tandem_skip_is_published_as_skipped() {
    let (_cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_skip",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    // Slow to refuse, so that what the transaction wrote before has time to reach Kafka.
    m.batch_execute(
        "CREATE FUNCTION ok_note(t text) RETURNS bool LANGUAGE plpgsql IMMUTABLE AS $$ \
         BEGIN IF t = 'bad' THEN PERFORM pg_sleep(1); RETURN false; END IF; RETURN true; END $$; \
         ALTER TABLE jobs ADD CONSTRAINT no_bad CHECK (ok_note(note))",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config("kafka_skip", d, m, config("kafka_skip", &brokers)).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (5001, 'before', 0), (5002, 'before', 0)")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id > 5000", 2).await;
    run.stop().await;
    // Its inserts are written (a statement of their own, the delete being another) and given
    // to the Kafka task before the update is refused: they must not reach the topic as
    // applied, since the target rolled them back.
    fx.d.batch_execute(
        "BEGIN; INSERT INTO jobs SELECT g, 'ok', 0 FROM generate_series(1, 1000) g; \
         DELETE FROM jobs WHERE id = 5002; UPDATE jobs SET note = 'bad' WHERE id = 5001; COMMIT",
    )
    .await
    .unwrap();
    let (_, lsn) = common::rejected(fx.start_nowait()).await;
    skip_and_go_on(&fx, &lsn, 5000).await;
    let msgs = consume_all(&brokers).await;
    let of_it: Vec<_> = msgs
        .iter()
        .filter(|m| m["site"] == "D" && m["commit_lsn"] == lsn)
        .collect();
    // Once per change, as skipped: a consumer keeping the first message of an id is right.
    let applied = of_it.iter().filter(|m| m["outcome"] != "skipped").count();
    assert_eq!(applied, 0, "published as applied, though rolled back");
    assert_eq!(of_it.len(), 1002);
    let ids: BTreeSet<&str> = of_it.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1002);
    let keys: BTreeSet<&str> = of_it
        .iter()
        .map(|m| m["key"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 1002);
    assert!(
        msgs.iter()
            .any(|m| m["key"]["id"] == "5000" && m["outcome"] == "applied"),
        "{msgs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_committed_ahead_is_published_and_the_refused_group_behind_it_is_not() {
    let (_cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_ahead",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    // Every statement of the first transaction's on mobile takes 0.3 s (each batch holds one
    // row whose id is 1 modulo 2000), so the second transaction is planned, published to the
    // Kafka task and committed behind the first while the first's commit is still on its way.
    // The second's are quick: refused, it is applied once more change by change.
    m.batch_execute(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$; \
         CREATE TRIGGER slow AFTER INSERT OR UPDATE ON jobs FOR EACH ROW \
         WHEN (NEW.id % 2000 = 1 AND NEW.id <= 20001) EXECUTE FUNCTION slow(); \
         ALTER TABLE jobs ENABLE ALWAYS TRIGGER slow; \
         ALTER TABLE jobs ADD CONSTRAINT no_bad CHECK (note <> 'bad')",
    )
    .await
    .unwrap();
    let fx = Fixture::with_config("kafka_ahead", d, m, config("kafka_ahead", &brokers)).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs VALUES (0, 'first', 0)")
        .await
        .unwrap();
    wait_count(30, &fx.m, "SELECT count(*) FROM jobs WHERE id = 0", 1).await;
    run.stop().await;
    // The first is a group of its own (20,001 changes close a group at its commit); the second,
    // refused by mobile, has more changes than are handed to the Kafka task at once (256).
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'ok', 0 FROM generate_series(1, 20001) g")
        .await
        .unwrap();
    fx.d.batch_execute(
        "BEGIN; INSERT INTO jobs SELECT g, 'ok', 0 FROM generate_series(30001, 30300) g; \
         UPDATE jobs SET note = 'bad' WHERE id = 30001; COMMIT",
    )
    .await
    .unwrap();
    let (e, lsn) = common::rejected(fx.start_nowait()).await;
    assert!(e.contains("no_bad"), "{e}");
    skip_and_go_on(&fx, &lsn, 40000).await;
    assert_eq!(
        Fixture::count(
            &fx.m,
            "SELECT count(*) FROM jobs WHERE id BETWEEN 1 AND 20001"
        )
        .await,
        20001
    );
    let msgs = consume_all(&brokers).await;
    let applied = |lo: i64, hi: i64| -> BTreeSet<String> {
        msgs.iter()
            .filter(|m| m["site"] == "D" && m["outcome"] == "applied")
            .filter(|m| {
                let id: i64 = m["key"]["id"].as_str().unwrap().parse().unwrap();
                (lo..=hi).contains(&id)
            })
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    // The first transaction's changes went out once its commit came back, every one of them
    // (by id; with `required`, a restart may send some again)...
    assert_eq!(applied(1, 20001).len(), 20001);
    // ...and none of the refused one's as applied, though they reached the Kafka task before.
    assert_eq!(applied(30001, 30300).len(), 0);
    let of_it = msgs
        .iter()
        .filter(|m| m["site"] == "D" && m["commit_lsn"] == lsn)
        .count();
    assert_eq!(
        of_it, 301,
        "each change of the refused transaction, as skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_larger_than_the_kafka_queue_is_published_before_its_commit() {
    // Events wait for their target commit, within the Kafka queue's bound (32 MiB, at least
    // 1 KiB a change): one transaction of more changes than that sends them early instead of
    // waiting forever for room.
    let (_cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_big",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let fx = Fixture::with_config("kafka_big", d, m, config("kafka_big", &brokers)).await;
    let run = fx.start().await;
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'big', 0 FROM generate_series(1, 40000) g")
        .await
        .unwrap();
    wait_count(120, &fx.m, "SELECT count(*) FROM jobs", 40_000).await;
    run.stop().await;
    let msgs = consume_all(&brokers).await;
    let ids: BTreeSet<&str> = msgs
        .iter()
        .filter(|m| m["site"] == "D" && m["outcome"] == "applied")
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 40_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_sent_again_after_a_restart_keep_their_conflict_outcome() {
    let (cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_again",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);
         INSERT INTO jobs VALUES (1, 'base', 0);",
    )
    .await;
    // The row is already on both sides: no initial snapshot.
    let text = Fixture::config_text(
        "kafka_again",
        "tables = [\"public.jobs\"]\ninitial_snapshot = false",
    ) + &format!(
        "[kafka]\nbrokers = \"{brokers}\"\nformat = \"json\"\nrequired = true\n"
    ) + "[conflicts]\npolicy = \"last_write_wins\"\nversion_column = \"n\"\n";
    let fx = Fixture::with_config("kafka_again", d, m, text).await;
    // The same row changed on both sides before either crossed: mobile's version is newer.
    fx.d.batch_execute("UPDATE jobs SET n = 1, note = 'desktop' WHERE id = 1")
        .await
        .unwrap();
    fx.m.batch_execute("UPDATE jobs SET n = 5, note = 'mobile' WHERE id = 1")
        .await
        .unwrap();
    let (d_end, m_end) = (wal_now(&fx.d).await, wal_now(&fx.m).await);
    // Decided and applied while Kafka is away, so the events never reach it…
    kafka_away(&cluster);
    let run = fx.start().await;
    wait_for(30, "the conflict decided on both sides", || async {
        Fixture::count(&fx.m, "SELECT count(*) FROM tandem.conflicts").await == 1
            && Fixture::count(&fx.d, "SELECT count(*) FROM jobs WHERE n = 5").await == 1
    })
    .await;
    run.stop().await;
    // …and are sent again after the restart, from the slots, with the outcome on record.
    kafka_back(&cluster);
    let run = fx.start().await;
    wait_for(60, "both slots confirmed once Kafka is back", || async {
        slot_confirmed(&fx.d, "kafka_again_d").await >= d_end
            && slot_confirmed(&fx.m, "kafka_again_m").await >= m_end
    })
    .await;
    run.stop().await;
    let msgs = consume_all(&brokers).await;
    let outcome = |site: &str| {
        msgs.iter()
            .filter(|m| m["site"] == site && m["op"] == "update" && m["outcome"] != "skipped_echo")
            .map(|m| m["outcome"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(outcome("D"), vec!["kept_local"], "{msgs:?}");
    assert_eq!(outcome("M"), vec!["applied"], "{msgs:?}");
}

/// With Kafka, a streamed transaction is still applied while in progress, and a copy of it is
/// spooled and published after its commit: each of its changes once, with its commit's LSN, and
/// none of a rolled-back subtransaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_transaction_is_applied_live_and_published_once_after_its_commit() {
    let (_cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_streamed",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let text = Fixture::config_text(
        "kafka_streamed",
        // Streaming is on by default with Kafka (not with conflict rules).
        "tables = [\"public.jobs\"]",
    ) + &format!("[kafka]\nbrokers = \"{brokers}\"\nformat = \"json\"\n");
    let fx = Fixture::with_config("kafka_streamed", d, m, text).await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "BEGIN; INSERT INTO jobs SELECT g, 'kept', 0 FROM generate_series(1, 2000) g; \
         SAVEPOINT s; INSERT INTO jobs SELECT g, 'rolled back', 0 FROM generate_series(2001, 2500) g; \
         ROLLBACK TO s; UPDATE jobs SET n = 1 WHERE id <= 500; COMMIT",
    )
    .await
    .unwrap();
    fx.wait_equal("jobs", 60).await;
    assert!(streamed_txns(&fx.d, "kafka_streamed_d").await >= 1);
    // It was applied while in progress, by the second apply session.
    assert_eq!(Fixture::count(&fx.m, STREAMED_SESSIONS).await, 1);
    run.stop().await;
    let msgs = consume_all(&brokers).await;
    let mine: Vec<_> = msgs
        .iter()
        .filter(|m| m["site"] == "D" && m["outcome"] != "skipped_echo")
        .collect();
    assert_eq!(mine.len(), 2500, "2,000 inserts and 500 updates, each once");
    assert_eq!(own_ids(&msgs, "D").len(), 2500);
    let lsns: BTreeSet<String> = mine
        .iter()
        .map(|m| m["commit_lsn"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(lsns.len(), 1, "one commit: {lsns:?}");
    assert!(!lsns.contains("0/0"), "the commit's own LSN");
    assert!(mine.iter().all(|m| m["outcome"] == "applied"));
}

/// `[kafka] transactions = true`: after each source transaction's events comes one more, op
/// `commit`, saying how many there were, so a consumer knows when it has a transaction whole:
/// for small transactions, for one streamed while in progress (published from its copy), and
/// for the echoes, whose transactions end the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_transactions_each_source_transaction_ends_with_an_event_counting_its_events() {
    let (_cluster, brokers) = mock_kafka(3);
    let (d, m) = Fixture::databases(
        "kafka_txn",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let text = config("kafka_txn", &brokers) + "transactions = true\n";
    let fx = Fixture::with_config("kafka_txn", d, m, text).await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    let run = fx.start().await;
    fx.d.batch_execute(
        "BEGIN; INSERT INTO jobs VALUES (1, 'a', 0), (2, 'b', 0); UPDATE jobs SET n = 1 WHERE id = 1; COMMIT; \
         INSERT INTO jobs SELECT g, 'big', 0 FROM generate_series(10, 1509) g",
    )
    .await
    .unwrap();
    fx.m.batch_execute(
        "BEGIN; INSERT INTO jobs VALUES (5001, 'm', 0); DELETE FROM jobs WHERE id = 5001; COMMIT",
    )
    .await
    .unwrap();
    fx.wait_equal("jobs", 60).await;
    assert!(streamed_txns(&fx.d, "kafka_txn_d").await >= 1);
    wait_for(
        30,
        "desktop's echo of mobile's transaction ended",
        || async {
            consume_all(&brokers)
                .await
                .iter()
                .any(|m| m["site"] == "D" && m["op"] == "commit" && m["changes"] == 2)
        },
    )
    .await;
    run.stop().await;

    let msgs = consume_all(&brokers).await;
    // The ordinals of each transaction's events, and its end(s) by id.
    let mut events: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut ends: BTreeMap<(String, String), BTreeSet<(String, u64)>> = BTreeMap::new();
    for m in &msgs {
        let txn = (m["site"].to_string(), m["commit_lsn"].to_string());
        if m["op"] == "commit" {
            assert_eq!(
                (&m["schema"], &m["table"], &m["_key"]),
                (
                    &serde_json::json!("tandem"),
                    &serde_json::json!("transaction"),
                    &serde_json::json!("tandem.transaction:[]")
                ),
                "{m}"
            );
            ends.entry(txn)
                .or_default()
                .insert((m["id"].to_string(), m["changes"].as_u64().unwrap()));
        } else {
            events
                .entry(txn)
                .or_default()
                .insert(m["ordinal"].to_string());
        }
    }
    // Every end counts its transaction's changes: its events carry ordinals 0 up to that.
    for (txn, e) in &ends {
        let ordinals = events.get(txn).cloned().unwrap_or_default();
        let n = e.first().unwrap().1;
        let want: BTreeSet<String> = (0..n).map(|o| o.to_string()).collect();
        assert_eq!(ordinals, want, "{txn:?}: the events its end counts");
        assert_eq!(
            e.len(),
            1,
            "{txn:?}: one end (by id, sent again or not): {e:?}"
        );
    }
    // Each site's own transactions all ended: desktop's 3-change one, its streamed 1,500, and
    // mobile's 2.
    let own = |site: &str| -> Vec<u64> {
        let mut counts: Vec<u64> = msgs
            .iter()
            .filter(|m| m["op"] == "commit" && m["site"] == site)
            .filter(|m| {
                // Not an echo's end: that transaction's events are echoes.
                let txn = (m["site"].to_string(), m["commit_lsn"].to_string());
                msgs.iter().any(|e| {
                    (e["site"].to_string(), e["commit_lsn"].to_string()) == txn
                        && e["op"] != "commit"
                        && e["outcome"] != "skipped_echo"
                })
            })
            .map(|m| m["changes"].as_u64().unwrap())
            .collect();
        counts.sort();
        counts.dedup();
        counts
    };
    assert_eq!(own("D"), vec![3, 1500]);
    assert_eq!(own("M"), vec![2]);

    // Operators see it; replay takes no end for a change.
    let config = fx.config_path.to_str().unwrap();
    let (code, out, err) =
        common::run_tandem(&["--config", config, "audit", "tail", "--site", "M"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(" M commit   xid "), "{out}");
    assert!(out.contains(": 2 change(s) id=M:"), "{out}");
    let out = replay_into_mobile(config, &["--dry-run"]);
    // Mobile's own 2 and desktop's 1,503 applied there, none of the ends.
    assert!(out.contains("1505 would be applied"), "{out}");
}

/// A streamed transaction applied while Kafka was away: after the restart (behind the target's
/// checkpoint, at what Kafka acknowledged) the source streams it again. It must not be applied
/// a second time, live or otherwise, and its events must reach Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_transaction_applied_while_kafka_was_away_is_published_after_a_restart() {
    let (cluster, brokers) = mock_kafka(1);
    let (d, m) = Fixture::databases(
        "kafka_stream_away",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let fx = Fixture::with_config(
        "kafka_stream_away",
        d,
        m,
        config("kafka_stream_away", &brokers),
    )
    .await;
    stream_from_a_few_hundred_rows(&fx.d).await;
    // Counts the changes mobile's `jobs` takes, rolled-back attempts excluded.
    fx.m.batch_execute(&audit_sql("jobs")).await.unwrap();
    let streamed_sessions = STREAMED_SESSIONS;
    let run = fx.start().await;
    kafka_away(&cluster);
    fx.d.batch_execute(
        "INSERT INTO jobs SELECT g, 'while away', 0 FROM generate_series(1, 2000) g",
    )
    .await
    .unwrap();
    let end = wal_now(&fx.d).await;
    wait_count(60, &fx.m, "SELECT count(*) FROM jobs", 2000).await;
    assert!(streamed_txns(&fx.d, "kafka_stream_away_d").await >= 1);
    assert_eq!(
        Fixture::count(&fx.m, streamed_sessions).await,
        1,
        "applied live"
    );
    run.stop().await;
    assert!(slot_confirmed(&fx.d, "kafka_stream_away_d").await < end);
    kafka_back(&cluster);
    let run = fx.start().await;
    wait_for(60, "slot confirmed once Kafka is back", || async {
        slot_confirmed(&fx.d, "kafka_stream_away_d").await >= end
    })
    .await;
    // Streamed again from before the checkpoint: spooled and skipped at its commit, never
    // opened live (the second session would still be there).
    assert_eq!(Fixture::count(&fx.m, streamed_sessions).await, 0);
    run.stop().await;
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM audit").await,
        2000,
        "each row written once"
    );
    let msgs = consume_all(&brokers).await;
    assert_eq!(own_ids(&msgs, "D").len(), 2000, "every change on the topic");
}

/// Kafka lacked a transaction the target has, so the next run starts behind the checkpoint and
/// the source sends the transaction again. A run stopped before it arrived (a slow link here)
/// must not confirm the slot past it, as if Kafka had it: the run after that publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_stopped_before_the_source_resent_what_kafka_lacks_leaves_it_for_the_next() {
    let (cluster, brokers) = mock_kafka(1);
    let name = "kafka_resend_stop";
    let (d, m) = Fixture::databases(
        name,
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let to_d = common::Proxy::start(common::clusters().desktop.port).await;
    let text = to_d.route(&config(name, &brokers), name);
    let fx = Fixture::with_config(name, d, m, text).await;
    let slot = "kafka_resend_stop_d";
    let run = fx.start().await;
    kafka_away(&cluster);
    fx.d.batch_execute("INSERT INTO jobs SELECT g, 'while away', 0 FROM generate_series(1, 300) g")
        .await
        .unwrap();
    wait_count(60, &fx.m, "SELECT count(*) FROM jobs", 300).await;
    run.stop().await;
    let (held, checkpoint) = Fixture::slot_and_checkpoint(&fx.d, slot, &fx.m, "D>M").await;
    assert!(held < checkpoint, "the slot waits for Kafka");
    kafka_back(&cluster);
    // The source's bytes now take seconds to come; the run stops as soon as it streams.
    to_d.trickle();
    let run = fx.start().await;
    run.stop().await;
    assert!(
        slot_confirmed(&fx.d, slot).await < checkpoint,
        "confirmed past a transaction Kafka never got"
    );
    to_d.flow();
    let run = fx.start().await;
    wait_for(60, "slot confirmed once Kafka has it", || async {
        slot_confirmed(&fx.d, slot).await >= checkpoint
    })
    .await;
    run.stop().await;
    let msgs = consume_all(&brokers).await;
    assert_eq!(own_ids(&msgs, "D").len(), 300, "every change on the topic");
    assert_eq!(
        Fixture::count(&fx.m, "SELECT count(*) FROM jobs").await,
        300
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_brokers_lack_stops_run_at_once_naming_it() {
    // A broker that does not create topics on first use (as production ones are often set).
    let cluster = MockCluster::<DefaultProducerContext>::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let (d, m) = Fixture::databases(
        "kafka_notopic",
        "CREATE TABLE jobs (id bigint PRIMARY KEY);",
    )
    .await;
    let text = Fixture::config_text("kafka_notopic", "tables = [\"public.jobs\"]")
        + &format!(
            "[kafka]\nbrokers = \"{brokers}\"\ntopic = \"missing.events\"\nrequired = true\n\
             [kafka.properties]\n\"allow.auto.create.topics\" = \"false\"\n"
        );
    let fx = Fixture::with_config("kafka_notopic", d, m, text).await;
    // At the start, before streaming: not as an undelivered message after librdkafka's 30 s
    // wait for the topic to appear.
    let (code, out, err) =
        common::run_tandem(&["--config", fx.config_path.to_str().unwrap(), "run"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!(
            "[kafka]: topic missing.events does not exist on {brokers}"
        )),
        "{err}"
    );
    drop(cluster);
}
