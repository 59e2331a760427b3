//! Child node processes for the demo, the benchmarks and the real-process tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// A port on loopback that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A `cadre node` child process; killed if dropped while running.
pub struct NodeProc {
    pub name: String,
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

pub struct NodeSpec<'a> {
    /// The `cadre` executable.
    pub exe: &'a Path,
    pub name: &'a str,
    pub seeds: &'a [SocketAddr],
    pub dir: &'a Path,
    pub secret: &'a str,
    /// Extra command-line arguments.
    pub extra: &'a [&'a str],
}

impl NodeProc {
    pub fn spawn(spec: NodeSpec<'_>) -> Result<NodeProc> {
        Self::spawn_at(spec, loopback(free_port()?), loopback(free_port()?))
    }

    /// Starts a node on the given transport and HTTP addresses (a restart where it was).
    pub fn spawn_at(spec: NodeSpec<'_>, addr: SocketAddr, http: SocketAddr) -> Result<NodeProc> {
        Self::spawn_in(spec, None, addr, http)
    }

    /// Starts a node on the given addresses, inside the network namespace `netns` when given
    /// (through `ip netns exec NETNS`, which execs the node: the child, its pid and the signals
    /// sent to it are the node's own).
    pub fn spawn_in(spec: NodeSpec<'_>, netns: Option<&str>, addr: SocketAddr, http: SocketAddr) -> Result<NodeProc> {
        Self::spawn_cmd(spec, "node", netns, addr, http)
    }

    /// Starts `cadre SUBCOMMAND` with the flags of `cadre node` (a node with extra behaviour,
    /// such as a benchmark's peer), on free loopback ports.
    pub fn spawn_as(spec: NodeSpec<'_>, subcommand: &str) -> Result<NodeProc> {
        Self::spawn_cmd(spec, subcommand, None, loopback(free_port()?), loopback(free_port()?))
    }

    fn spawn_cmd(
        spec: NodeSpec<'_>,
        subcommand: &str,
        netns: Option<&str>,
        addr: SocketAddr,
        http: SocketAddr,
    ) -> Result<NodeProc> {
        let data_dir = spec.dir.join(spec.name);
        let log = spec.dir.join(format!("{}.log", spec.name));
        let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(spec.exe);
                cmd
            }
            None => Command::new(spec.exe),
        };
        cmd.arg(subcommand)
            .args(["--name", spec.name, "--listen", &addr.to_string(), "--http", &http.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .env("CADRE_SECRET", spec.secret)
            .env_remove("CADRE_SECRET_FILE")
            .env("RUST_LOG", std::env::var("CADRE_CHILD_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        cmd.args(spec.extra);
        for s in spec.seeds {
            cmd.args(["--seed", &s.to_string()]);
        }
        let child = cmd.spawn().context("cannot start a node process")?;
        Ok(NodeProc { name: spec.name.to_string(), addr, http, log, child })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal (SIGTERM, SIGKILL, SIGSTOP, ...).
    pub fn signal(&self, sig: i32) -> Result<()> {
        let Some(pid) = self.child.id() else { bail!("{} has already exited", self.name) };
        // SAFETY: kill(2) with a pid we spawned and still own; no memory is involved.
        let rc = unsafe { libc::kill(pid as i32, sig) };
        if rc != 0 {
            bail!("kill({pid}, {sig}) failed: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!("{} did not exit within {timeout:?}", self.name),
        }
    }

    /// The last lines of the node's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

/// Polls `/readyz` until it answers 200.
pub async fn wait_ready(http: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok((200, _)) = cadre::api::client::get(http, "/readyz", Duration::from_secs(1)).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("node at {http} not ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `GET path` on `http` until its JSON answer satisfies `cond`; the error names `what` and
/// shows the last answer.
pub async fn await_json(
    http: SocketAddr,
    path: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match cadre::api::client::get(http, path, Duration::from_secs(2)).await {
            Ok((200, body)) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) if cond(&v) => return Ok(()),
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            },
            other => format!("{other:?}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not reached within {timeout:?} (last answer of {http}{path}: {last})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
