//! A Postgres server for tests, shared by the tests of one test process; each test gets a database
//! of its own ([`database`]), so tests run in parallel without seeing each other's rows.
//!
//! With `CADRE_TEST_POSTGRES_URL` set (`postgres://USER@HOST:PORT/DB`, a user that may
//! `CREATE DATABASE`), that server is used and each test's database is dropped when the test ends.
//! Otherwise a throwaway server is started on first use: `initdb` into a temporary directory and
//! `postgres` on a free loopback port (durability off: nothing here must survive a crash). As
//! root, both run as the `postgres` user (they refuse to run as root). A watchdog process holding
//! a pipe from this process stops the server and removes the directory when this process exits,
//! however it exits. With neither a URL nor server binaries, tests fail, saying what to install.
//!
//! Included with `#[path]` by the test crates that need it.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, PgConnection};

pub const URL_VAR: &str = "CADRE_TEST_POSTGRES_URL";
/// Attempts at starting the throwaway server (a free port may be taken before the server binds it).
const START_ATTEMPTS_MAX: usize = 5;
/// Time a started server has to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const READY_POLL: Duration = Duration::from_millis(50);
/// Connections the throwaway server accepts: parallel tests, each node with its pool.
const SERVER_CONNECTIONS_MAX: u32 = 400;

/// A database of one test.
pub struct TestDb {
    /// Connects to this test's database.
    pub url: String,
    pub name: String,
    admin: String,
    /// On a server we did not start: dropped when the test ends.
    external: bool,
}

static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh database named after `label` on the test server.
pub async fn database(label: &str) -> TestDb {
    let (admin, external) = tokio::task::spawn_blocking(admin_url).await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    let label: String =
        label.chars().filter(|c| c.is_ascii_alphanumeric()).take(24).collect::<String>().to_ascii_lowercase();
    let name = format!("cadre_{label}_{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let mut conn = PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server {}: {e}", redact(&admin)));
    // The name is ASCII letters, digits and '_': nothing to escape.
    for sql in [format!("DROP DATABASE IF EXISTS {name}"), format!("CREATE DATABASE {name}")] {
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let _ = conn.close().await;
    TestDb { url: with_database(&admin, &name), name, admin, external }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if !self.external {
            return;
        }
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Its own thread and runtime: a test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await;
                }
            })
        })
        .join();
    }
}

/// `url` with its database replaced by `db` (user, host, port and parameters kept).
pub fn with_database(url: &str, db: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(start);
    let authority_len = rest.find(['/', '?']).unwrap_or(rest.len());
    let query = rest[authority_len..].find('?').map_or("", |q| &rest[authority_len + q..]);
    format!("{head}{}/{db}{query}", &rest[..authority_len])
}

fn redact(url: &str) -> String {
    cadre::storage::postgres::redact(url)
}

/// A server we started; kept for the life of the process.
struct Server {
    admin_url: String,
    _server: Child,
    /// Its other end is the watchdog's stdin: closed when this process exits.
    _watchdog: ChildStdin,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// The admin URL, and whether the server is external. Blocks while a server starts; a server
/// that could not start fails every test with the same message.
fn admin_url() -> Result<(String, bool), String> {
    if let Some(url) = std::env::var(URL_VAR).ok().filter(|u| !u.is_empty()) {
        return Ok((url, true));
    }
    match SERVER.get_or_init(start_server) {
        Ok(s) => Ok((s.admin_url.clone(), false)),
        Err(e) => Err(e.clone()),
    }
}

fn start_server() -> Result<Server, String> {
    let bin = bin_dir().ok_or_else(|| {
        format!(
            "no PostgreSQL server binaries (initdb, postgres) in `pg_config --bindir`, /usr/lib/postgresql/*/bin \
             or PATH, and {URL_VAR} is not set. Install them (Debian/Ubuntu: `apt-get install postgresql`; \
             Fedora: `dnf install postgresql-server`; macOS: `brew install postgresql`) or set \
             {URL_VAR}=postgres://USER@HOST:PORT/DB (a user that may CREATE DATABASE)"
        )
    })?;
    let owner = server_user()?;
    let mut last = String::new();
    for _ in 0..START_ATTEMPTS_MAX {
        match start_once(&bin, owner) {
            Ok(s) => return Ok(s),
            Err(Attempt::PortTaken(log)) => last = log,
            Err(Attempt::Failed(e)) => return Err(e),
        }
    }
    Err(format!("the test server could not bind a port in {START_ATTEMPTS_MAX} attempts:\n{last}"))
}

/// Where `initdb` and `postgres` are.
fn bin_dir() -> Option<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    // Debian and Ubuntu keep each major version apart, off PATH: newest first.
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    debian.sort_by_key(|d| std::cmp::Reverse(d.0));
    let on_path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    from_pg_config.into_iter().chain(debian.into_iter().map(|(_, d)| d)).chain(on_path).find(|d| has_server(d))
}

/// The user to run the server as: `None` for ourselves, the `postgres` user when we are root.
fn server_user() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id").args([flag, "postgres"]).output().map_err(|e| format!("id: {e}"))?;
        String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|_| {
            "running as root, the test server needs a `postgres` user to run as (PostgreSQL refuses root); \
             `apt-get install postgresql` creates it"
                .to_string()
        })
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

enum Attempt {
    /// Another process took the port: try another.
    PortTaken(String),
    Failed(String),
}

/// One try: a fresh data directory, a free port, a watchdog, then wait until it accepts.
fn start_once(bin: &Path, owner: Option<(u32, u32)>) -> Result<Server, Attempt> {
    let failed = |what: &str, e: &dyn std::fmt::Display| Attempt::Failed(format!("test server: {what}: {e}"));
    let dir = tempfile::Builder::new().prefix("cadre-pg-").tempdir().map_err(|e| failed("temporary dir", &e))?.keep();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| failed("chown", &e))?;
    }
    let data = dir.join("data");
    let log_path = dir.join("server.log");
    let as_owner = |cmd: &mut Command| {
        use std::os::unix::process::CommandExt;
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&dir);
    };
    let mut initdb = Command::new(bin.join("initdb"));
    initdb.arg("-D").arg(&data).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"]);
    as_owner(&mut initdb);
    let out = initdb.output().map_err(|e| failed("initdb", &e))?;
    if !out.status.success() {
        return Err(failed("initdb", &String::from_utf8_lossy(&out.stderr)));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| failed("free port", &e))?
        .port();
    let log = std::fs::File::create(&log_path).map_err(|e| failed("log file", &e))?;
    let mut server = Command::new(bin.join("postgres"));
    server
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
        .arg(&dir)
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
        .args(["-c", &format!("max_connections={SERVER_CONNECTIONS_MAX}")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| failed("log file", &e))?)
        .stderr(log);
    as_owner(&mut server);
    let mut child = server.spawn().map_err(|e| failed("postgres", &e))?;
    let watchdog = watchdog(child.id(), &dir).map_err(|e| failed("watchdog", &e))?;
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = log_text();
            if log.contains("could not bind") || log.contains("already in use") {
                return Err(Attempt::PortTaken(log));
            }
            return Err(Attempt::Failed(format!("test server exited with {status}:\n{log}")));
        }
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            return Ok(Server { admin_url, _server: child, _watchdog: watchdog });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(Attempt::Failed(format!("test server not ready within {READY_TIMEOUT:?}:\n{}", log_text())));
        }
        std::thread::sleep(READY_POLL);
    }
}

/// Stops the server `pid` (fast shutdown) and removes `dir` once stdin closes, that is once this
/// process has exited. Waits at most 10 s for the server to go.
fn watchdog(pid: u32, dir: &Path) -> std::io::Result<ChildStdin> {
    const SCRIPT: &str = r#"cat >/dev/null
kill -INT "$1" 2>/dev/null
i=0
while kill -0 "$1" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
rm -rf "$2""#;
    let mut child = Command::new("sh")
        .args(["-c", SCRIPT, "cadre-pg-watchdog", &pid.to_string()])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(child.stdin.take().expect("piped stdin"))
}
