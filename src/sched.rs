//! CPU scheduling of tandem's own threads.
//!
//! tandem mostly waits for bytes from a walsender and hands them to a backend, often on the same
//! machine as one of the databases. Under the normal policy, each time data arrives the kernel
//! wakes tandem and preempts whatever runs on that core — very often the walsender producing
//! that data, or the backend applying it. `SCHED_BATCH` tells the kernel tandem is throughput
//! work: it still gets its fair share of CPU, but its wakeups do not preempt a running process.
//! Measured with `tandem bench` on 2 cores (steady load at half of native's W1 rate): the source
//! walsender was switched out 1,260 times a second instead of 17,400, and tandem's replication
//! lag p50/p99 went from 30–100 / 200–550 ms to about 18 / 35–50 ms.

use std::process::Command;

/// Put the calling thread under `SCHED_BATCH` (Linux; elsewhere nothing). Best effort: a
/// refusal leaves the normal policy, which is only slower.
pub fn batch_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let p = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscall on the calling thread (pid 0) with a valid parameter.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &p) };
    }
}

/// The runtime every command runs on: its threads (workers and blocking) under `SCHED_BATCH`.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(batch_this_thread)
        .build()
}

/// A database server tandem starts (demo, bench, tests) must not inherit `SCHED_BATCH` from
/// the thread that spawns it: the policy passes through fork and exec.
pub fn normal_for_child(cmd: &mut Command) -> &mut Command {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only an async-signal-safe syscall runs.
        unsafe {
            cmd.pre_exec(|| {
                let p = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_OTHER, &p);
                Ok(())
            });
        }
    }
    cmd
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn policy_of(pid: i32) -> i32 {
        // SAFETY: plain syscall.
        unsafe { libc::sched_getscheduler(pid) }
    }

    #[test]
    fn runtime_threads_run_as_batch_and_children_do_not_inherit_it() {
        let rt = runtime().unwrap();
        let (worker, blocking, child) = rt.block_on(async {
            let worker = tokio::spawn(async { policy_of(0) }).await.unwrap();
            let blocking = tokio::task::spawn_blocking(|| policy_of(0)).await.unwrap();
            // Spawned from a batch thread, as localpg starts postgres.
            let child = tokio::task::spawn_blocking(|| {
                let mut cmd = Command::new("sleep");
                cmd.arg("5");
                let mut c = normal_for_child(&mut cmd).spawn().unwrap();
                let p = policy_of(c.id() as i32);
                let _ = c.kill();
                let _ = c.wait();
                p
            })
            .await
            .unwrap();
            (worker, blocking, child)
        });
        assert_eq!(worker, libc::SCHED_BATCH);
        assert_eq!(blocking, libc::SCHED_BATCH);
        assert_eq!(child, libc::SCHED_OTHER);
    }
}
