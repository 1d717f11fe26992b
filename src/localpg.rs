//! Throwaway PostgreSQL clusters from the machine's own server binaries, for tests, `demo` and
//! `bench`. `initdb` and `postgres` refuse to run as root, so as root they run as the `postgres`
//! user, in a data directory under the system temp dir that is chowned to it.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A running throwaway cluster with `wal_level = logical`. Stopped and deleted on drop; a
/// watchdog process also removes it if this process dies without dropping it.
pub struct LocalCluster {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

/// Where the PostgreSQL server binaries are: `$TANDEM_PG_BINDIR`, `pg_config --bindir`, the newest
/// `/usr/lib/postgresql/*/bin`, or `initdb` on the PATH.
pub fn bindir() -> Result<PathBuf> {
    if let Ok(d) = std::env::var("TANDEM_PG_BINDIR") {
        return Ok(PathBuf::from(d));
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(d) = candidates
        .into_iter()
        .rev()
        .find(|d| d.join("initdb").exists())
    {
        return Ok(d);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if d.join("initdb").exists() {
            return Ok(d);
        }
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        if Path::new(dir).join("initdb").exists() {
            return Ok(PathBuf::from(dir));
        }
    }
    bail!(
        "no PostgreSQL server binaries found (initdb, postgres); install them, e.g. \
         `apt-get install -y postgresql-15`, or set TANDEM_PG_BINDIR"
    )
}

/// The uid/gid to run the server as: `postgres` when we are root, ourselves otherwise.
fn server_user() -> Result<Option<(u32, u32)>> {
    // SAFETY: getuid has no preconditions; getpwnam returns a pointer into static storage that
    // we read immediately, before any other call could overwrite it.
    unsafe {
        if libc::getuid() != 0 {
            return Ok(None);
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        if pw.is_null() {
            bail!(
                "running as root, and initdb/postgres refuse root, but there is no `postgres` user \
                 to run them as; create one (`useradd -r postgres`) or run as another user"
            );
        }
        Ok(Some(((*pw).pw_uid, (*pw).pw_gid)))
    }
}

/// Run `cmd` as the server user, under the normal CPU policy (not tandem's own, see `sched`).
fn as_server_user(cmd: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    crate::sched::normal_for_child(cmd);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The role that authenticates by client certificate on a local cluster (`cert` in pg_hba).
pub const CERT_ROLE: &str = "tandem_cert";

const EC_CURVE: &str = "ec_paramgen_curve:prime256v1";

/// A CA of this cluster's own (`<dir>/ca.crt`, see [`LocalCluster::ca_cert`]) and a server
/// certificate it signed for the name `localhost`, so that TLS can be exercised locally in every
/// `sslmode`, verification included. False when `openssl` is missing or fails: no TLS then.
fn certificates(dir: &Path, data: &Path) -> bool {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            EC_CURVE,
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=tandem test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    ) && issue(
        dir,
        "localhost",
        "subjectAltName = DNS:localhost",
        &data.join("server.key"),
        &data.join("server.crt"),
    )
}

/// A key (`key`) and a certificate for `cn` (`crt`) signed by the CA in `dir`, with the X.509v3
/// extension `ext` (webpki refuses version 1 certificates).
fn issue(dir: &Path, cn: &str, ext: &str, key: &Path, crt: &Path) -> bool {
    let (ext_file, csr) = (format!("{cn}.ext"), format!("{cn}.csr"));
    let (key, crt) = (&*key.to_string_lossy(), &*crt.to_string_lossy());
    std::fs::write(dir.join(&ext_file), format!("{ext}\n")).is_ok()
        && openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                EC_CURVE,
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                key,
                "-out",
                &csr,
            ],
        )
        && openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                &ext_file,
                "-out",
                crt,
            ],
        )
}

fn openssl(dir: &Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl LocalCluster {
    /// initdb and start a cluster named `label` (for the directory name and logs).
    pub fn start(label: &str) -> Result<LocalCluster> {
        Self::start_with(label, "")
    }

    /// Like [`LocalCluster::start`], with extra `postgresql.conf` lines (they win over the defaults).
    pub fn start_with(label: &str, extra_conf: &str) -> Result<LocalCluster> {
        let bin = bindir()?;
        let user = server_user()?;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tandem-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let out = as_server_user(&mut Command::new(bin.join("initdb")), user)
            .current_dir(&dir)
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .with_context(|| format!("running {}", bin.join("initdb").display()))?;
        if !out.status.success() {
            bail!(
                "initdb failed for {label}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let port = free_port()?;
        let conf = format!(
            "\n# tandem throwaway cluster\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{dir}'\nwal_level = logical\nmax_replication_slots = 64\n\
             max_wal_senders = 64\nmax_connections = 200\nfsync = off\nfull_page_writes = off\n\
             logging_collector = off\nlog_min_messages = warning\n",
            dir = dir.display()
        );
        let ssl = certificates(&dir, &data);
        if ssl {
            std::fs::set_permissions(
                data.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
            if let Some((uid, gid)) = user {
                for f in ["server.key", "server.crt"] {
                    std::os::unix::fs::chown(data.join(f), Some(uid), Some(gid))?;
                }
            }
        }
        // The superuser `postgres` connects without a password on loopback; every other role
        // needs one, as on a real server (tests use such roles for auth and privilege cases),
        // except `CERT_ROLE`, which logs in with a client certificate over TLS (see
        // [`LocalCluster::client_cert`]).
        let cert_auth = match ssl {
            true => format!(
                "hostssl all {CERT_ROLE} 127.0.0.1/32 cert\n\
                 hostssl replication {CERT_ROLE} 127.0.0.1/32 cert\n"
            ),
            false => String::new(),
        };
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
                 host replication postgres 127.0.0.1/32 trust\n{cert_auth}\
                 host all all 127.0.0.1/32 scram-sha-256\n\
                 host replication all 127.0.0.1/32 scram-sha-256\n"
            ),
        )?;
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf);
        if ssl {
            text.push_str(&format!(
                "ssl = on\nssl_ca_file = '{}'\n",
                dir.join("ca.crt").display()
            ));
        }
        text.push_str(extra_conf);
        std::fs::write(&conf_path, text)?;

        std::fs::File::create(dir.join("server.log"))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.join("server.log"), Some(uid), Some(gid))?;
        }
        let child = Self::postmaster(&dir)?;
        // Watchdog: when this process goes away without dropping us (test binary exit, kill -9),
        // stop the server immediately and remove its files. The postmaster's pid is read from
        // its pid file, so a server restarted by [`LocalCluster::restart`] is stopped too.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
                 kill -QUIT $(head -1 '{data}/postmaster.pid') 2>/dev/null; sleep 3; rm -rf '{dir}'",
                me = std::process::id(),
                data = data.display(),
                dir = dir.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        let mut cluster = LocalCluster {
            port,
            dir,
            child: Some(child),
        };
        // The port was free when picked, but nothing held it since: another socket (an outgoing
        // connection's ephemeral port) may take it before the server binds, as one CI run saw.
        // Then the server starts again on another port (the last `port` line of the conf wins).
        let mut retries = 5;
        loop {
            match cluster.wait_ready(Duration::from_secs(60)) {
                Err(e) if retries > 0 && e.to_string().contains("Address already in use") => {
                    retries -= 1;
                    cluster.port = free_port()?;
                    let mut conf = std::fs::OpenOptions::new().append(true).open(&conf_path)?;
                    std::io::Write::write_all(
                        &mut conf,
                        format!("port = {}\n", cluster.port).as_bytes(),
                    )?;
                    // Truncated (its owner kept), so the next failure is read on its own.
                    std::fs::File::create(cluster.dir.join("server.log"))?;
                    cluster.child = Some(Self::postmaster(&cluster.dir)?);
                }
                r => return r.map(|()| cluster),
            }
        }
    }

    /// Start the server of the cluster in `dir`, its output appended to `server.log`.
    fn postmaster(dir: &Path) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("server.log"))?;
        as_server_user(
            &mut Command::new(bindir()?.join("postgres")),
            server_user()?,
        )
        .current_dir(dir)
        .arg("-D")
        .arg(dir.join("data"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting postgres")
    }

    /// Stop the server as a crash does (immediate shutdown: nothing is written on the way out,
    /// so commits not yet written from the WAL buffers are lost). [`LocalCluster::restart`]
    /// starts it again.
    pub fn crash(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill with a pid we spawned and have not reaped.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGQUIT);
            }
            child.wait()?;
        }
        Ok(())
    }

    /// Start a crashed server again on the same port and data (it runs crash recovery).
    /// Returns once it answers queries.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_none() {
            self.child = Some(Self::postmaster(&self.dir)?);
        }
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    let log =
                        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                    bail!("postgres exited with {status} while starting:\n{log}");
                }
            }
            // Ready when a query succeeds, not merely when the port accepts (it does during recovery).
            let ok = Command::new(bindir()?.join("psql"))
                .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-p"])
                .arg(self.port.to_string())
                .args(["-Atqc", "select 1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "postgres on port {} not ready after {timeout:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The certificate of the CA that signed this cluster's server certificate (for `localhost`),
    /// for `sslrootcert`; `None` when the cluster has no TLS.
    pub fn ca_cert(&self) -> Option<PathBuf> {
        Some(self.dir.join("ca.crt")).filter(|p| p.exists())
    }

    /// A client certificate and key for `role` (its common name), signed by this cluster's CA,
    /// for `sslcert`/`sslkey`: [`CERT_ROLE`] logs in with one instead of a password.
    pub fn client_cert(&self, role: &str) -> Result<(PathBuf, PathBuf)> {
        let crt = self.dir.join(format!("{role}.crt"));
        let key = self.dir.join(format!("{role}.key"));
        if !issue(&self.dir, role, "extendedKeyUsage = clientAuth", &key, &crt) {
            bail!("openssl could not make a client certificate for {role}");
        }
        Ok((crt, key))
    }

    /// Connection URL for database `db` as the superuser `postgres` (trust auth, loopback only).
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// CPU time so far of this server's processes: the postmaster, its live children, and its
    /// children that ended (which the kernel adds to the postmaster's own children's time once
    /// it reaps them). `None` when they cannot be read (not Linux, no pid file).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid_file = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
        let mut total = 0.0;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // A process may end between the listing and the read.
            let Some(t) = proc_times(pid) else {
                continue;
            };
            if pid == postmaster {
                total += t.own + t.children;
            } else if t.ppid == postmaster {
                total += t.own;
            }
        }
        Some(total)
    }

    /// Stop immediately (SIGQUIT) and remove the files.
    pub fn stop(&mut self) {
        if self.child.is_some() {
            let _ = self.crash();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process's CPU seconds from `/proc/<pid>/stat`: its own, and its reaped children's.
pub struct ProcTimes {
    pub ppid: u32,
    pub own: f64,
    pub children: f64,
}

pub fn proc_times(pid: u32) -> Option<ProcTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    proc_times_of(&stat)
}

fn proc_times_of(stat: &str) -> Option<ProcTimes> {
    // The fields after the command name, which is in parentheses and may hold spaces: state,
    // ppid, …, utime, stime, cutime, cstime are the 1st, 2nd, 12th to 15th of them.
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |i: usize| f.get(i)?.parse::<f64>().ok();
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ProcTimes {
        ppid: f.get(1)?.parse().ok()?,
        own: (num(11)? + num(12)?) / ticks,
        children: (num(13)? + num(14)?) / ticks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_read_after_the_command_name() {
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // A command name may hold spaces and parentheses; only the last `)` ends it.
        let t = proc_times_of(
            "4242 (postgres: a) b) S 77 4242 4242 0 -1 4194560 10 0 0 0 300 100 50 25 20 0 1",
        )
        .unwrap();
        assert_eq!(t.ppid, 77);
        assert_eq!(t.own, 400.0 / ticks);
        assert_eq!(t.children, 75.0 / ticks);
        assert!(proc_times_of("4242 (truncated) S 77").is_none());
        // This process: its parent is the one that started it.
        assert_eq!(
            proc_times(std::process::id()).unwrap().ppid,
            std::os::unix::process::parent_id()
        );
    }
}
