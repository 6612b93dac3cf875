//! The fleet's own processes: each service is a release binary started with its
//! environment, logging to a file of its own, stopped with a real signal.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

#[derive(Debug)]
pub struct Service {
    pub name: String,
    binary: PathBuf,
    pub port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

/// The settings every service of a fleet shares: `pairs`, and the simulator's URL.
pub fn shared_env(pairs: &[(&str, &str)], sim_port: u16) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .chain([(
            "LLM_BASE_URL".to_owned(),
            format!("http://127.0.0.1:{sim_port}/v1"),
        )])
        .collect()
}

impl Service {
    /// A service of a fleet on a free port of its own (its `BIND_ADDR`), with the
    /// fleet's `shared` settings and its own `extra` ones.
    pub fn member(
        name: &str,
        binary: PathBuf,
        shared: &[(String, String)],
        extra: Vec<(&str, String)>,
        logs: &Path,
    ) -> Self {
        let port = test_kit::free_port();
        let mut env = shared.to_vec();
        env.push(("BIND_ADDR".to_owned(), format!("127.0.0.1:{port}")));
        env.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
        Self::new(name, binary, port, env, logs)
    }

    /// The LLM simulator on a free port, answering every call after `latency_ms`
    /// (± `jitter_ms`).
    pub fn simulator(binary: PathBuf, latency_ms: u64, jitter_ms: u64, logs: &Path) -> Self {
        let port = test_kit::free_port();
        let env = vec![
            ("LLM_SIM_BIND".into(), format!("127.0.0.1:{port}")),
            ("LLM_SIM_LATENCY_MS".into(), latency_ms.to_string()),
            ("LLM_SIM_JITTER_MS".into(), jitter_ms.to_string()),
        ];
        Self::new("llm-sim", binary, port, env, logs)
    }

    pub fn new(
        name: &str,
        binary: PathBuf,
        port: u16,
        env: Vec<(String, String)>,
        logs: &Path,
    ) -> Self {
        Self {
            name: name.to_owned(),
            binary,
            port,
            env,
            log: logs.join(format!("{name}.log")),
            child: None,
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Starts the process (appending to its log, so a restart keeps the first run's).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("{}", self.log.display()))?;
        let child = Command::new(&self.binary)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `path` answers 200: the service is up and its backends are.
    pub async fn wait_ready(&mut self, client: &reqwest::Client, path: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{} exited at start ({status}); see {}",
                        self.name,
                        self.log.display()
                    );
                }
            }
            let answer = client.get(self.url(path)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{} not ready within 90 s; see {}",
            self.name,
            self.log.display()
        )
    }

    /// Sends `signal` (TERM, KILL) and waits for the process to exit; returns how long
    /// it took.
    pub async fn stop(&mut self, signal: &str) -> anyhow::Result<Duration> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        let pid = child.id().context("no pid")?;
        let started = Instant::now();
        let sent = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .await?;
        if !sent.success() {
            bail!("kill -s {signal} {pid} failed");
        }
        tokio::time::timeout(Duration::from_secs(120), child.wait())
            .await
            .with_context(|| format!("{} did not exit within 120 s of SIG{signal}", self.name))??;
        Ok(started.elapsed())
    }
}
