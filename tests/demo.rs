//! `tandem demo`, the README's first command: two throwaway clusters, live sync both ways, and
//! nothing left behind once it stops, by its `--duration` or by Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn demo(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The demo's stdout, a line at a time, read on a thread so that waits can have a deadline.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Every line until the demo closes its stdout, or panic after `secs`.
fn rest(rx: &mpsc::Receiver<String>, secs: u64) -> Vec<String> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut all = Vec::new();
    loop {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(l) => all.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => return all,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the demo went on: {all:#?}"),
        }
    }
}

/// Its clusters' directories (`tandem-demo-<side>-<pid>-<n>` in the temp dir) still there.
fn leftovers(pid: u32) -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tandem-demo-") && n.contains(&format!("-{pid}-")))
        .collect()
}

/// Changes went both ways, the final state is equal on both sides, and nothing is left behind.
fn ended_well(out: &[String], pid: u32) {
    let text = out.join("\n");
    for kind in [
        "D → M  insert jobs",
        "M → D  insert tasks",
        "M → D  update tasks",
        "D → M  update jobs",
    ] {
        assert!(text.contains(kind), "no `{kind}` line in:\n{text}");
    }
    for table in ["jobs", "tasks"] {
        let line = out
            .iter()
            .find(|l| l.trim_start().starts_with(table) && l.contains("desktop:"))
            .unwrap_or_else(|| panic!("no final state of {table} in:\n{text}"));
        assert!(line.ends_with("equal"), "{line}");
    }
    let applied = out
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("changes applied: D → M "))
        .unwrap_or_else(|| panic!("no count of changes in:\n{text}"));
    let (to_m, to_d) = applied.split_once(", M → D ").unwrap();
    assert!(
        to_m.parse::<u64>().unwrap() > 0 && to_d.parse::<u64>().unwrap() > 0,
        "{applied}"
    );
    assert_eq!(out.last().map(String::as_str), Some("clusters removed."));
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

#[test]
fn the_demo_syncs_both_ways_and_removes_its_clusters_when_its_time_is_up() {
    let mut child = demo(&["--duration", "5"]);
    let (pid, rx) = (child.id(), lines(&mut child));
    let out = rest(&rx, 120);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {out:#?}");
    ended_well(&out, pid);
    // The office's schema change, and the field writing the new column back.
    let text = out.join("\n");
    for kind in [
        "D → M  schema jobs    + priority int (tandem ddl)",
        "priority=1  arrived in",
    ] {
        assert!(text.contains(kind), "no `{kind}` line in:\n{text}");
    }
}

#[test]
fn ctrl_c_stops_the_demo_cleanly_and_removes_its_clusters() {
    let mut child = demo(&[]);
    let (pid, rx) = (child.id(), lines(&mut child));
    // One whole round of changes first.
    let until = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    while !out
        .iter()
        .any(|l: &String| l.starts_with("D → M  update jobs"))
    {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(l) => out.push(l),
            Err(e) => panic!("{e}: {out:#?}"),
        }
    }
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    out.extend(rest(&rx, 60));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {out:#?}");
    ended_well(&out, pid);
}
