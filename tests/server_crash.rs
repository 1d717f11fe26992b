//! A crash of either PostgreSQL server while tandem replicates both ways, with the target's
//! commits asynchronous (`synchronous_commit = off`, as the native apply worker's): the commits
//! the crash loses are the ones tandem had not yet confirmed to the source slot, so after
//! recovery both sides end equal and every change landed exactly once.
//!
//! Its own binary: it restarts its clusters, which no other test may share.

mod common;

use std::time::Duration;

use common::{audit_sql, connect, wait_for, Fixture, Running};
use tandem::localpg::LocalCluster;
use tokio_postgres::Client;

const ROWS: i64 = 3000;

/// Insert `from..from + ROWS` one transaction each (and update every tenth), reconnecting
/// through crashes. A statement whose connection died may or may not have committed, so inserts
/// are `ON CONFLICT DO NOTHING` and updates set a value, not add to it.
async fn writer(url: String, from: i64) {
    let mut c: Option<Client> = None;
    let mut id = from;
    while id < from + ROWS {
        let Some(client) = &c else {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    c = Some(client);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            continue;
        };
        let sql = if id % 10 == 9 {
            format!("UPDATE items SET v = 'updated {id}' WHERE id = {}", id - 5)
        } else {
            format!("INSERT INTO items VALUES ({id}, 'row {id}') ON CONFLICT DO NOTHING")
        };
        match client.batch_execute(&sql).await {
            Ok(()) => id += 1,
            Err(_) => c = None,
        }
    }
}

/// Wait until `url` holds `n` rows from `from` on, failing at once if `run` ended.
async fn applied_on(run: &Running, url: &str, from: i64, n: i64) {
    let c = connect(url).await;
    wait_for(60, "the other side's rows arriving", || async {
        assert!(!run.is_finished(), "run ended after a crash");
        c.query_one("SELECT count(*) FROM items WHERE id >= $1", &[&from])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) >= n)
    })
    .await;
}

async fn rows(url: &str) -> Option<Vec<String>> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    c.query("SELECT t::text FROM items t ORDER BY id", &[])
        .await
        .ok()
        .map(|r| r.iter().map(|r| r.get(0)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_of_either_server_loses_and_doubles_nothing() {
    // The WAL writer writes asynchronous commits only every 10 s here, so a crash takes away
    // every commit not yet flushed on purpose: confirming the source slot past one of those
    // would lose it (the next start would find the slot past the checkpoint).
    let conf = "wal_writer_delay = 10s";
    let (mut desktop, mut mobile) = tokio::task::spawn_blocking(|| {
        (
            LocalCluster::start_with("crash-desktop", conf).unwrap(),
            LocalCluster::start_with("crash-mobile", conf).unwrap(),
        )
    })
    .await
    .unwrap();
    let schema = format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text);\n{}",
        audit_sql("items")
    );
    let mut clients = Vec::new();
    for c in [&desktop, &mobile] {
        connect(&c.url("postgres"))
            .await
            .batch_execute("CREATE DATABASE crashes")
            .await
            .unwrap();
        let db = connect(&c.url("crashes")).await;
        db.batch_execute(&schema).await.unwrap();
        clients.push(db);
    }
    let (d_url, m_url) = (desktop.url("crashes"), mobile.url("crashes"));
    let text = format!(
        "[desktop]\nurl = \"{d_url}\"\nslot = \"crash_d\"\npublication = \"crash_d\"\n\
         [mobile]\nurl = \"{m_url}\"\nslot = \"crash_m\"\npublication = \"crash_m\"\n\
         [replication]\ntables = [\"public.items\"]\n"
    );
    let m = clients.pop().unwrap();
    let d = clients.pop().unwrap();
    let fx = Fixture::with_config("crashes", d, m, text).await;
    let run = fx.start().await;
    // Mobile crashes while desktop's rows are being applied to it. One side writes at a time:
    // a local synchronous commit would flush tandem's asynchronous ones before it.
    // Three times each (a crash catches unflushed commits only some of the time); once the
    // server stays down for 3 s, so tandem's reconnects find nothing listening.
    let crash = |c: &mut LocalCluster, down: u64| {
        tokio::task::block_in_place(|| {
            c.crash().unwrap();
            std::thread::sleep(Duration::from_secs(down));
            c.restart().unwrap();
        })
    };
    let w = tokio::spawn(writer(d_url.clone(), 1));
    for (n, down) in [(400, 0), (1200, 3), (2000, 0)] {
        applied_on(&run, &m_url, 1, n).await;
        crash(&mut mobile, down);
    }
    w.await.unwrap();
    // Then desktop, while mobile's rows are being applied to it.
    let w = tokio::spawn(writer(m_url.clone(), 1_000_000));
    for (n, down) in [(400, 0), (1200, 3), (2000, 0)] {
        applied_on(&run, &d_url, 1_000_000, n).await;
        crash(&mut desktop, down);
    }
    w.await.unwrap();
    wait_for(120, "both sides equal after the crashes", || async {
        match (rows(&d_url).await, rows(&m_url).await) {
            (Some(a), Some(b)) => a.len() as i64 == 2 * (ROWS - ROWS / 10) && a == b,
            _ => false,
        }
    })
    .await;
    assert!(!run.is_finished(), "run must ride out both crashes");
    // Each crash took `run`'s lock on that server with it; it was taken again.
    for url in [&d_url, &m_url] {
        let c = connect(url).await;
        wait_for(10, "run's lock held again", || async {
            tandem::lease::holder(&c, &fx.cfg).await.unwrap().is_some()
        })
        .await;
    }
    run.stop().await;
    // Every insert and update of either side happened exactly once on each side: the rows a
    // crash took away with tandem's unflushed commits were applied again, and no more.
    let per_side = 2 * ROWS;
    for url in [&d_url, &m_url] {
        let c = connect(url).await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM audit WHERE tbl = 'items'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, per_side, "{url}: changes applied");
    }

    // A `run` started while a server is down waits for it, saying why on /health, instead of
    // exiting (as native's apply worker retries); it starts once the server is back.
    tokio::task::block_in_place(|| mobile.crash().unwrap());
    let late = fx.start_nowait();
    wait_for(30, "run waiting for mobile", || async {
        let (code, body) = tandem::metrics::health(&late.status);
        assert!(!late.is_finished(), "run exited while mobile was down");
        code == 503 && body.contains("not started, waiting for the databases: mobile: cannot reach")
    })
    .await;
    connect(&d_url)
        .await
        .batch_execute("INSERT INTO items VALUES (5000000, 'written while mobile was down')")
        .await
        .unwrap();
    tokio::task::block_in_place(|| mobile.restart().unwrap());
    let c = connect(&m_url).await;
    wait_for(
        60,
        "desktop's row reaching mobile once it is back",
        || async {
            assert!(!late.is_finished(), "run exited");
            c.query_one("SELECT count(*) FROM items WHERE id = 5000000", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        },
    )
    .await;
    let (code, body) = tandem::metrics::health(&late.status);
    assert!(code == 200 && !body.contains("not started"), "{body}");
    late.stop().await;
}

/// The port a throwaway cluster picked is taken before its server binds it (an outgoing
/// connection's ephemeral port once took one in CI, and every test of that binary failed): the
/// server starts again on another port.
#[test]
fn a_cluster_whose_port_is_taken_before_its_server_binds_starts_on_another() {
    // Bound and not listening, without SO_REUSEADDR: what an outgoing connection's local port is
    // to a server binding it.
    // SAFETY: plain socket calls on a socket this test owns, closed at the end.
    let (fd, taken) = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let r = libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len);
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let mut len = len;
        let r = libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len);
        assert_eq!(r, 0, "getsockname: {}", std::io::Error::last_os_error());
        (fd, u16::from_be(addr.sin_port))
    };
    // The extra line wins over the port the cluster picked: its first start meets the taken one.
    let cluster = LocalCluster::start_with("port-taken", &format!("port = {taken}\n"))
        .expect("the server starts on another port");
    assert_ne!(cluster.port, taken);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let one: i32 = rt.block_on(async {
        connect(&cluster.url("postgres"))
            .await
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get(0)
    });
    assert_eq!(one, 1);
    // SAFETY: this test's own socket, closed once.
    unsafe { libc::close(fd) };
}
