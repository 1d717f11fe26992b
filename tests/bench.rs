//! `tandem bench` end to end, at a tiny scale: every contender drains every workload to equal
//! tables (the bench itself fails otherwise), the lag run produces samples, and the JSON report
//! says so. Timings are not asserted: they belong to the benchmark, not to the tests.

use std::process::Command;

#[test]
fn bench_runs_every_contender_to_equal_tables_and_reports_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "bench",
            "--workload",
            "w1,w2,w3,w5",
            "--scale",
            "0.004",
            "--lag-seconds",
            "1",
            "--only",
            "native,pglogical,tandem,tandem-two-way",
            "--json",
        ])
        .output()
        .expect("run tandem bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let ms = report["measurements"].as_array().unwrap();
    let ran = |w: &str, c: &str| {
        ms.iter().any(|m| {
            m["workload"] == w && m["contender"] == c && m["rows_per_s"].as_f64() > Some(0.0)
        })
    };
    for w in ["W1", "W2"] {
        for c in ["NativeText", "Tandem", "TandemTwoWay"] {
            assert!(ran(w, c), "{w} {c} missing in {ms:?}");
        }
    }
    // tandem's CPU per change is measured in its own process; the others run in the servers.
    for m in ms {
        let cpu = m["cpu_us_per_change"].as_f64();
        if m["contender"].as_str().unwrap().starts_with("Tandem") {
            assert!(cpu > Some(0.0), "{m:?}");
        } else {
            assert!(m["cpu_us_per_change"].is_null(), "{m:?}");
        }
        // The source walsender's share of the drain is read for every contender's streaming
        // workloads (W5's copy may end before a walsender streams).
        if m["workload"] != "W5" {
            let busy = m["walsender_busy"].as_f64();
            assert!(busy >= Some(0.0), "{m:?}");
        }
    }
    // Native cannot run both ways on PostgreSQL 15; tandem does.
    assert!(ran("W3", "Tandem"), "{ms:?}");
    assert!(!ms
        .iter()
        .any(|m| m["workload"] == "W3" && m["contender"] == "NativeText"));
    let pglogical_installed = tandem::localpg::bindir()
        .unwrap()
        .parent()
        .unwrap()
        .join("lib/pglogical.so")
        .exists();
    assert_eq!(
        pglogical_installed,
        ran("W3", "Pglogical"),
        "pglogical runs exactly when installed"
    );
    // W5 (initial copy) is native's table sync against tandem's snapshot only.
    for c in ["NativeText", "Tandem"] {
        assert!(ran("W5", c), "W5 {c} missing in {ms:?}");
    }
    assert!(!ms
        .iter()
        .any(|m| m["workload"] == "W5" && m["contender"] == "TandemTwoWay"));
    // Each workload's change count: W1 4 clients × 100 transactions × 3, W2 4,000 rows × 2,
    // W5 8,000 rows copied.
    let changes = |w: &str| {
        ms.iter()
            .find(|m| m["workload"] == w)
            .and_then(|m| m["changes"].as_u64())
    };
    assert_eq!(changes("W1"), Some(1200));
    assert_eq!(changes("W2"), Some(8000));
    assert_eq!(changes("W5"), Some(8000));
    let lag = report["lag"].as_array().unwrap();
    assert!(
        lag.iter()
            .any(|l| l["contender"] == "Tandem" && l["samples"].as_u64() > Some(10)),
        "{lag:?}"
    );
    assert_eq!(report["summary"].as_array().unwrap().len(), 4);
}
