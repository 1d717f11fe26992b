//! `tandem demo`: two throwaway clusters, a jobs/tasks schema on both, live sync both ways, and a
//! line on screen for every change showing where it went and how long it took.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Config;
use crate::localpg::LocalCluster;
use crate::ops::setup;
use crate::sync::{self, Status};

const SCHEMA: &str = "
CREATE TABLE jobs (
    id         bigint PRIMARY KEY,
    title      text NOT NULL,
    status     text NOT NULL DEFAULT 'open',
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE tasks (
    id     bigint PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    note   text NOT NULL,
    done   boolean NOT NULL DEFAULT false
);";

async fn connect(url: &str) -> Result<Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// Wait until `sql` (returning one text) gives `want` on `c`; how long it took.
async fn arrival(c: &Client, sql: &str, want: &str, started: Instant) -> Result<Duration> {
    let deadline = started + Duration::from_secs(30);
    loop {
        let got: Option<String> = c.query_opt(sql, &[]).await?.map(|r| r.get(0));
        if got.as_deref() == Some(want) {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            bail!("change did not arrive within 30 s ({sql})");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Row count and a checksum of a table's contents.
async fn summary(c: &Client, table: &str) -> Result<String> {
    let sql = format!(
        "SELECT count(*) || ' rows, md5 ' || left(coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '-'), 8) FROM {table} x"
    );
    Ok(c.query_one(&sql, &[]).await?.get(0))
}

pub async fn run(duration: Option<Duration>, mut stop: watch::Receiver<bool>) -> Result<()> {
    println!("tandem demo: starting two throwaway PostgreSQL clusters (desktop and mobile)…");
    let (dc, mc) = tokio::task::spawn_blocking(|| -> Result<_> {
        Ok((
            LocalCluster::start("demo-desktop")?,
            LocalCluster::start("demo-mobile")?,
        ))
    })
    .await??;
    println!("  desktop  {}", dc.url("postgres"));
    println!("  mobile   {}", mc.url("postgres"));
    let d = connect(&dc.url("postgres")).await?;
    let m = connect(&mc.url("postgres")).await?;
    d.batch_execute(SCHEMA).await?;
    m.batch_execute(SCHEMA).await?;
    let cfg = Arc::new(
        Config::parse(
            &format!(
                "[desktop]\nurl = \"{}\"\n[mobile]\nurl = \"{}\"\n[replication]\ntables = [\"public.jobs\", \"public.tasks\"]\n",
                dc.url("postgres"),
                mc.url("postgres")
            ),
            |_| None,
        )
        .map_err(|e| anyhow::anyhow!(e.0))?,
    );
    for line in setup::setup(cfg.clone()).await.context("setup")? {
        println!("  {line}");
    }
    let (tx, rx) = watch::channel(false);
    let status = Arc::new(Status::default());
    let sync_task = tokio::spawn(sync::run(cfg.clone(), rx, status.clone()));
    println!("\nsync running both ways. Office (D) and field (M) now write; each line shows where the change went.\n");

    let until = duration.map(|d| Instant::now() + d);
    let mut n: i64 = 0;
    let titles = [
        "Replace boiler",
        "Inspect roof",
        "Fix gate",
        "Service HVAC",
        "Paint hallway",
    ];
    loop {
        if until.is_some_and(|u| Instant::now() >= u) || *stop.borrow() {
            break;
        }
        n += 1;
        let job = 1000 + n;
        let title = titles[(n as usize) % titles.len()];
        // Office creates a job…
        let t = Instant::now();
        d.execute(
            "INSERT INTO jobs (id, title) VALUES ($1, $2)",
            &[&job, &title],
        )
        .await?;
        let took = arrival(
            &m,
            &format!("SELECT title FROM jobs WHERE id = {job}"),
            title,
            t,
        )
        .await?;
        println!(
            "D → M  insert jobs    #{job} {title:?}  arrived in {} ms",
            took.as_millis()
        );
        // …the field adds a task to it…
        let task = 2000 + n;
        let note = format!("on site for job {job}");
        let t = Instant::now();
        m.execute(
            "INSERT INTO tasks (id, job_id, note) VALUES ($1, $2, $3)",
            &[&task, &job, &note],
        )
        .await?;
        let took = arrival(
            &d,
            &format!("SELECT note FROM tasks WHERE id = {task}"),
            &note,
            t,
        )
        .await?;
        println!(
            "M → D  insert tasks   #{task} for job #{job}  arrived in {} ms",
            took.as_millis()
        );
        // …completes it, and the office closes the job.
        let t = Instant::now();
        m.execute("UPDATE tasks SET done = true WHERE id = $1", &[&task])
            .await?;
        let took = arrival(
            &d,
            &format!("SELECT done::text FROM tasks WHERE id = {task}"),
            "true",
            t,
        )
        .await?;
        println!(
            "M → D  update tasks   #{task} done=true  arrived in {} ms",
            took.as_millis()
        );
        let t = Instant::now();
        d.execute(
            "UPDATE jobs SET status = 'closed', updated_at = now() WHERE id = $1",
            &[&job],
        )
        .await?;
        let took = arrival(
            &m,
            &format!("SELECT status FROM jobs WHERE id = {job}"),
            "closed",
            t,
        )
        .await?;
        println!(
            "D → M  update jobs    #{job} status=closed  arrived in {} ms",
            took.as_millis()
        );
        if n == 2 {
            // The office adds a column with `tandem ddl`: the field has it before any row that
            // carries it, and writes it back.
            let t = Instant::now();
            crate::ops::ddl::ddl(
                &cfg,
                crate::side::Side::Desktop,
                "ALTER TABLE jobs ADD COLUMN priority int NOT NULL DEFAULT 3",
            )
            .await?;
            let took = arrival(
                &m,
                "SELECT count(*)::text FROM information_schema.columns \
                 WHERE table_name = 'jobs' AND column_name = 'priority'",
                "1",
                t,
            )
            .await?;
            println!(
                "D → M  schema jobs    + priority int (tandem ddl)  arrived in {} ms",
                took.as_millis()
            );
            let t = Instant::now();
            m.execute("UPDATE jobs SET priority = 1 WHERE id = $1", &[&job])
                .await?;
            let took = arrival(
                &d,
                &format!("SELECT priority::text FROM jobs WHERE id = {job}"),
                "1",
                t,
            )
            .await?;
            println!(
                "M → D  update jobs    #{job} priority=1  arrived in {} ms",
                took.as_millis()
            );
        }
        if n % 3 == 0 {
            let t = Instant::now();
            m.execute("DELETE FROM jobs WHERE id = $1", &[&(job - 2)])
                .await?;
            let took = arrival(
                &d,
                &format!("SELECT count(*)::text FROM jobs WHERE id = {}", job - 2),
                "0",
                t,
            )
            .await?;
            println!(
                "M → D  delete jobs    #{} (and its tasks)  arrived in {} ms",
                job - 2,
                took.as_millis()
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(700)) => {}
            _ = stop.changed() => {}
        }
    }

    let _ = tx.send(true);
    sync_task.await??;
    println!("\nstopped. Final state:");
    for t in ["jobs", "tasks"] {
        let (a, b) = (summary(&d, t).await?, summary(&m, t).await?);
        println!(
            "  {t:6} desktop: {a}   mobile: {b}   {}",
            if a == b { "equal" } else { "DIFFERENT" }
        );
    }
    println!(
        "  changes applied: D → M {}, M → D {}",
        status
            .from_desktop
            .changes
            .load(std::sync::atomic::Ordering::Relaxed),
        status
            .from_mobile
            .changes
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    drop((d, m));
    drop((dc, mc));
    println!("clusters removed.");
    Ok(())
}
