//! End to end against a real Kafka-protocol broker process (tansu, memory storage): protobuf
//! events from both sites reach the topic once each, and decode back.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Fixture};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use tokio_postgres::Client;

struct Broker(Child);
impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tansu() -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    [format!("{home}/.cargo/bin/tansu"), "tansu".into()]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--help")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
        .expect("tansu is not installed: run scripts/ensure-tansu (scripts/test does)")
}

fn start_broker() -> (Broker, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let log = std::fs::File::create(std::env::temp_dir().join("tandem-tansu.log")).unwrap();
    let child = Command::new(tansu())
        .args([
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tansu");
    let broker = Broker(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "tansu did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (broker, format!("127.0.0.1:{port}"))
}

async fn writes(c: &Client, base: i64) {
    for i in 1..=30i64 {
        c.execute("INSERT INTO jobs VALUES ($1, 'e2e', 0)", &[&(base + i)])
            .await
            .unwrap();
    }
    for i in 1..=10i64 {
        c.execute("UPDATE jobs SET n = 1 WHERE id = $1", &[&(base + i)])
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn protobuf_events_reach_a_real_broker_once_each() {
    let (_broker, brokers) = start_broker();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(
                "tandem.events",
                3,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let (d, m) = Fixture::databases(
        "kafka_e2e",
        "CREATE TABLE jobs (id bigint PRIMARY KEY, note text, n int);",
    )
    .await;
    let text = Fixture::config_text("kafka_e2e", "tables = [\"public.jobs\"]")
        + &format!("[kafka]\nbrokers = \"{brokers}\"\nformat = \"protobuf\"\nrequired = true\n");
    let fx = Fixture::with_config("kafka_e2e", d, m, text).await;
    let run = fx.start().await;
    tokio::join!(writes(&fx.d, 0), writes(&fx.m, 1000));
    fx.wait_equal("jobs", 60).await;
    // Each slot confirmed up to the checkpoint of its rows: with `required = true` that is only
    // once Kafka acknowledged their events. (A stop drains Kafka for at most 10 s; what is still
    // unacknowledged then waits in the slot for the next run, which this test does not start.)
    wait_for(
        60,
        "slots confirmed to their checkpoints (Kafka acknowledged)",
        || async {
            let (d, dm) = Fixture::slot_and_checkpoint(&fx.d, "kafka_e2e_d", &fx.m, "D>M").await;
            let (m, md) = Fixture::slot_and_checkpoint(&fx.m, "kafka_e2e_m", &fx.d, "M>D").await;
            d >= dm && m >= md
        },
    )
    .await;
    run.stop().await;

    let events = tokio::task::spawn_blocking(move || {
        let consumer = |group: &str| -> BaseConsumer {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", group)
                .set("auto.offset.reset", "earliest")
                .create()
                .unwrap();
            c.subscribe(&["tandem.events"]).unwrap();
            c
        };
        // Until every site's own changes are in (or the deadline): a quiet spell of one
        // partition is no end of the topic. A reader that stops getting anything for 10 s
        // with changes missing is replaced by one of a new group, reading from the start: once
        // (a CI run on a loaded machine read all of one partition's desktop events and none of
        // its mobile ones, which a rerun never showed); the broker must still have them all.
        let mut c = consumer("e2e");
        let mut out: Vec<tandem::sink::kafka::Decoded> = Vec::new();
        let mut own = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        let (mut progress, mut readers) = (Instant::now(), 1);
        while own.len() < 80 && Instant::now() < deadline {
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let e = tandem::sink::kafka::decode(m.payload().unwrap()).unwrap();
                    if e.outcome != "skipped_echo" && own.insert(e.id.clone()) {
                        progress = Instant::now();
                    }
                    out.push(e);
                }
                Some(Err(e)) => eprintln!("reading tandem.events: {e}"),
                None => {}
            }
            if progress.elapsed() > Duration::from_secs(10) && readers < 2 {
                eprintln!(
                    "no new event for 10 s with {} of 80: a new reader",
                    own.len()
                );
                readers += 1;
                c = consumer("e2e-again");
                progress = Instant::now();
            }
        }
        // What the broker holds, for a failure's message: records per partition.
        let held: Vec<_> = (0..3)
            .map(|p| c.fetch_watermarks("tandem.events", p, Duration::from_secs(5)))
            .collect();
        (out, held)
    })
    .await
    .unwrap();
    let (events, held) = events;
    let own: Vec<_> = events
        .iter()
        .filter(|e| e.outcome != "skipped_echo")
        .collect();
    let ids: BTreeSet<&str> = own.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids.len(),
        80,
        "40 changes per site, each once by id; the broker's partitions hold {held:?}; got: {:?}",
        own.iter()
            .map(|e| format!("{} {} {:?}", e.id, e.outcome, e.key))
            .collect::<Vec<_>>()
    );
    assert!(own.iter().all(|e| e.outcome == "applied"));
    let upd = own
        .iter()
        .find(|e| {
            e.site == "M" && e.op == "update" && e.key == vec![("id".into(), Some("1001".into()))]
        })
        .expect("mobile's update of 1001");
    assert_eq!(
        upd.after
            .as_ref()
            .unwrap()
            .iter()
            .find(|(c, _)| c == "n")
            .unwrap()
            .1
            .as_deref(),
        Some("1")
    );
}
