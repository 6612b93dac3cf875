//! Real servers for tests, started on free loopback ports once per test binary.
//!
//! [`redis()`] starts `redis-server` the first time a test asks and hands every later
//! caller in the same process the same server; each test keeps to its own key prefix
//! ([`unique_prefix`]). Servers are children of a thread that lives as long as the test
//! process, started with a parent-death signal, so they stop when the test binary
//! exits however it exits (pass, fail, panic, kill). Their scratch folders are removed
//! at the next start when the process that made them is gone.
//!
//! RabbitMQ, Postgres and [`chromedriver()`] (for browser tests) join the same way,
//! through [`ServerProcess`].

#![allow(unsafe_code)] // Only for the parent-death signal in `ServerProcess::spawn`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// A server process started for this test binary.
#[derive(Debug)]
pub struct ServerProcess {
    pub pid: u32,
    pub port: u16,
    pub dir: PathBuf,
}

impl ServerProcess {
    /// Starts `command` from a thread that never exits, with `PR_SET_PDEATHSIG`, so
    /// the kernel kills the server when the test process dies. (The signal follows the
    /// thread that forked, which is why a short-lived test thread must not fork.)
    fn spawn(command: Command, port: u16, dir: PathBuf) -> std::io::Result<Self> {
        Self::spawn_as(command, port, dir, None)
    }

    /// Like `spawn`, as another user when `user` is `(uid, gid)` (servers that refuse
    /// to run as root). The parent-death signal is set after the switch, because
    /// changing credentials clears it.
    fn spawn_as(
        mut command: Command,
        port: u16,
        dir: PathBuf,
        user: Option<(u32, u32)>,
    ) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("test-kit-{port}"))
            .spawn(move || {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl and getppid are async-signal-safe; nothing else runs
                // between fork and exec.
                unsafe {
                    command.pre_exec(move || {
                        if let Some((uid, gid)) = user {
                            if libc::setgroups(0, std::ptr::null()) != 0
                                || libc::setgid(gid) != 0
                                || libc::setuid(uid) != 0
                            {
                                return Err(std::io::Error::last_os_error());
                            }
                        }
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let spawned = command.stdin(Stdio::null()).spawn();
                let keep: Option<Child> = match spawned {
                    Ok(child) => {
                        let _ = sender.send(Ok(child.id()));
                        Some(child)
                    }
                    Err(error) => {
                        let _ = sender.send(Err(error));
                        None
                    }
                };
                // Live as long as the process; the child dies with us.
                let _child = keep;
                loop {
                    std::thread::park();
                }
            })?;
        let pid = receiver.recv().map_err(std::io::Error::other)??;
        Ok(Self { pid, port, dir })
    }

    pub fn is_running(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists() && !is_zombie(self.pid)
    }
}

/// A dedicated server stops when dropped; the shared ones live in statics, which are
/// never dropped, and stop with the process.
impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Sends signal `name` (STOP, CONT, TERM, KILL) to process `pid`, as `kill -s` does:
/// to freeze, thaw or stop a server or service a test started.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -s {name} {pid}");
}

/// A port nobody listens on right now. Another process could take it before the
/// server binds it, so callers retry the start on failure.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// Polls `check` every 20 ms until it holds, for up to `limit`; panics naming `what`
/// otherwise. For states of other processes and servers that nothing announces (a
/// process listening, a value appearing in Redis); where a signal exists, wait on it.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// A prefix no other test in this process uses, for keys, queues or schemas.
pub fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}-{name}:",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The scratch folder for one server of this process, after clearing away those of
/// test processes that have exited.
fn scratch_dir(kind: &str) -> PathBuf {
    let root = std::env::temp_dir().join("narrative-cache-test-kit");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(format!("{}-{kind}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn find_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: run `scripts/test.sh`, which installs it, or apt-get install it"
            )
        })
}

/// A `redis-server` on loopback.
#[derive(Debug)]
pub struct RedisServer {
    pub process: ServerProcess,
    pub url: String,
}

/// The redis-server of this test binary, started on first use and shared by its tests.
pub fn redis() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

impl RedisServer {
    /// A server of its own, for a test that stops or breaks it; it stops when dropped.
    pub fn start() -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            match start_redis(free_port()) {
                Ok(server) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("redis-server would not start: {last_error}")
    }

    /// A server on a given port: to bring one back where clients expect it, or to
    /// start one late, after its clients.
    pub fn start_on(port: u16) -> Self {
        start_redis(port).unwrap_or_else(|e| panic!("redis-server would not start on {port}: {e}"))
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }
}

/// `redis-server` on loopback with nothing persisted, logging to its scratch folder.
fn redis_server_command(port: u16, dir: &Path) -> Command {
    let mut command = Command::new(find_binary("redis-server"));
    command
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--protected-mode", "yes", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

fn start_redis(port: u16) -> Result<RedisServer, String> {
    let dir = scratch_dir("redis");
    let command = redis_server_command(port, &dir);
    let process = ServerProcess::spawn(command, port, dir).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if redis_ping(port) {
            return Ok(RedisServer {
                process,
                url: format!("redis://127.0.0.1:{port}"),
            });
        }
        if !process.is_running() {
            let log = std::fs::read_to_string(process.dir.join("redis.log")).unwrap_or_default();
            return Err(format!("exited at start on port {port}: {log}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("no PONG on port {port} within 10 s"))
}

/// A three-master Redis Cluster on loopback, created with `redis-cli --cluster
/// create`: without replicas for the shared one, with them for
/// [`RedisCluster::start_with_replicas`].
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<ServerProcess>,
    /// Seed URLs, one per master, comma-joined as `REDIS_URL` expects.
    pub url: String,
}

/// The Redis Cluster of this test binary, started on first use and shared by its tests.
pub fn redis_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let mut last_error = String::new();
        for _ in 0..3 {
            match start_cluster(0) {
                Ok(cluster) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!("redis cluster would not start: {last_error}")
    })
}

/// A port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// A cluster of its own: three masters with `replicas` replicas each, and a node
    /// timeout of 2 s, so a replica of a killed master is promoted within seconds.
    pub fn start_with_replicas(replicas: usize) -> Self {
        let mut last_error = String::new();
        for _ in 0..3 {
            match start_cluster(replicas) {
                Ok(cluster) => return cluster,
                Err(error) => last_error = error,
            }
        }
        panic!("redis cluster would not start: {last_error}")
    }
}

/// Sends one inline command to the Redis node on `port` and returns the raw reply
/// (empty when it does not answer within 300 ms).
pub fn redis_inline(port: u16, command: &str) -> String {
    redis_command(port, command)
}

fn start_cluster(replicas: usize) -> Result<RedisCluster, String> {
    let mut nodes = Vec::new();
    for _ in 0..3 * (1 + replicas) {
        let port = free_cluster_port();
        let dir = scratch_dir("redis-cluster");
        let mut command = redis_server_command(port, &dir);
        command
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
            .arg("--cluster-config-file")
            .arg(dir.join("nodes.conf"));
        nodes.push(ServerProcess::spawn(command, port, dir).map_err(|e| e.to_string())?);
    }
    for node in &nodes {
        wait_for(|| redis_ping(node.port), "PONG")?;
    }
    let addresses: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let created = Command::new(find_binary("redis-cli"))
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !created.status.success() {
        return Err(format!(
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        ));
    }
    for node in &nodes {
        wait_for(
            || redis_command(node.port, "CLUSTER INFO").contains("cluster_state:ok"),
            "cluster_state:ok",
        )?;
    }
    let url = nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}", n.port))
        .collect::<Vec<_>>()
        .join(",");
    Ok(RedisCluster { nodes, url })
}

fn wait_for(mut ready: impl FnMut() -> bool, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("no {what} within 15 s"))
}

/// Sends one inline command and returns what arrives within a short while.
fn redis_command(port: u16, command: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    if stream
        .write_all(format!("{command}\r\n").as_bytes())
        .is_err()
    {
        return String::new();
    }
    let mut reply = vec![0u8; 4096];
    let n = stream.read(&mut reply).unwrap_or(0);
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

/// A private `rabbitmq-server` node: its own node name, ports and data folder, no
/// plugins. Each test takes its own vhost ([`RabbitServer::vhost`]).
#[derive(Debug)]
pub struct RabbitServer {
    pub process: ServerProcess,
    /// `amqp://guest:guest@127.0.0.1:<port>` (guest may log in over loopback).
    pub url: String,
}

/// The RabbitMQ node of this test binary, started on first use and shared by its tests.
pub fn rabbitmq() -> &'static RabbitServer {
    static SERVER: OnceLock<RabbitServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut last_error = String::new();
        for _ in 0..3 {
            match start_rabbitmq(free_port_pair()) {
                Ok(server) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("rabbitmq-server would not start: {last_error}")
    })
}

impl RabbitServer {
    /// A node of its own, for a test that stops it; it stops when dropped. Tests use its
    /// default vhost (`url` ends in `/%2f`).
    pub fn start() -> Self {
        start_rabbitmq(free_port_pair())
            .unwrap_or_else(|e| panic!("rabbitmq-server would not start: {e}"))
    }

    /// A node on a given port: to bring a broker back where clients expect it.
    pub fn start_on(port: u16) -> Self {
        start_rabbitmq(port)
            .unwrap_or_else(|e| panic!("rabbitmq-server would not start on {port}: {e}"))
    }

    /// The default vhost's URL.
    pub fn default_vhost_url(&self) -> String {
        format!("{}/%2f", self.url)
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// A fresh vhost for one test, and the AMQP URL that uses it.
    pub fn vhost(&self, label: &str) -> String {
        let name = unique_prefix(label).trim_end_matches(':').to_owned();
        let ctl = self.ctl(&["add_vhost", &name]);
        assert!(
            ctl.status.success(),
            "add_vhost: {}",
            String::from_utf8_lossy(&ctl.stderr)
        );
        let ctl = self.ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        assert!(
            ctl.status.success(),
            "set_permissions: {}",
            String::from_utf8_lossy(&ctl.stderr)
        );
        format!("{}/{name}", self.url)
    }

    /// Closes every client connection to the vhost of `url` from the broker's side, as
    /// a broker restart or a network cut would: their channels and unacked deliveries
    /// are gone. Returns how many it closed.
    pub fn close_connections(&self, url: &str) -> usize {
        let vhost = url.rsplit('/').next().unwrap_or_default();
        let listed = self.ctl(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "vhost",
        ]);
        assert!(listed.status.success(), "list_connections");
        let mut closed = 0;
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            let mut fields = line.split('\t');
            let (Some(pid), Some(on)) = (fields.next(), fields.next()) else {
                continue;
            };
            if on.trim() == vhost {
                let ctl = self.ctl(&["close_connection", pid.trim(), "closed by a test"]);
                assert!(ctl.status.success(), "close_connection {pid}");
                closed += 1;
            }
        }
        closed
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl");
        rabbit_env(&mut command, self.process.port, &self.process.dir);
        command
            .args(["-n", &node_name(self.process.port)])
            .args(args);
        command
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("rabbitmqctl: {e}"))
    }
}

const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

fn node_name(port: u16) -> String {
    format!("nctest{port}@localhost")
}

/// Everything the node writes goes under `dir`. Run as the current user through the
/// script in /usr/lib: Debian's /usr/sbin wrapper switches to the `rabbitmq` user, who
/// cannot write our scratch folder.
fn rabbit_env(command: &mut Command, port: u16, dir: &Path) {
    command
        .env("HOME", dir)
        .env("RABBITMQ_NODENAME", node_name(port))
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", (port + 1).to_string())
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_FEATURE_FLAGS_FILE", dir.join("feature_flags"))
        .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins-expand"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
        .env("RABBITMQ_PID_FILE", dir.join("pid"))
        // Makes the start script `exec` the Erlang VM instead of running it as its own
        // child, so the VM itself gets the kit's parent-death signal and dies with the
        // test process. (Nothing systemd-specific happens without NOTIFY_SOCKET.)
        .env("RUNNING_UNDER_SYSTEMD", "true");
}

/// A port whose neighbour (the Erlang distribution port) is free too.
fn free_port_pair() -> u16 {
    loop {
        let port = free_port();
        if port < 65_000 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn start_rabbitmq(port: u16) -> Result<RabbitServer, String> {
    let dir = scratch_dir("rabbitmq");
    std::fs::write(dir.join("enabled_plugins"), "[].").map_err(|e| e.to_string())?;
    let script = Path::new(RABBITMQ_SERVER);
    if !script.is_file() {
        panic!(
            "{RABBITMQ_SERVER} not found: run `scripts/test.sh`, which installs rabbitmq-server"
        );
    }
    let mut command = Command::new(script);
    rabbit_env(&mut command, port, &dir);
    let log = std::fs::File::create(dir.join("stdout.log")).map_err(|e| e.to_string())?;
    command
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    let process = ServerProcess::spawn(command, port, dir).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(RabbitServer {
                process,
                url: format!("amqp://guest:guest@127.0.0.1:{port}"),
            });
        }
        if !process.is_running() {
            let log = std::fs::read_to_string(process.dir.join("stdout.log")).unwrap_or_default();
            return Err(format!("exited at start on port {port}: {log}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no AMQP listener on port {port} within 60 s"))
}

/// A private PostgreSQL cluster (its own data folder, port and socket folder, `trust`
/// authentication on loopback, no fsync). Each test takes its own database
/// ([`PostgresServer::database`]).
#[derive(Debug)]
pub struct PostgresServer {
    /// `None` while stopped ([`PostgresServer::stop`]).
    process: Option<ServerProcess>,
    port: u16,
    dir: PathBuf,
    user: (u32, u32),
    /// `postgres://postgres@127.0.0.1:<port>`; add a database name.
    pub url: String,
}

/// The PostgreSQL cluster of this test binary, started on first use and shared by its
/// tests.
pub fn postgres() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        start_postgres().unwrap_or_else(|e| panic!("postgres would not start: {e}"))
    })
}

impl PostgresServer {
    /// A cluster of its own, for a test that stops and restarts it.
    pub fn start() -> Self {
        start_postgres().unwrap_or_else(|e| panic!("postgres would not start: {e}"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(ServerProcess::is_running)
    }

    /// Shuts the server down (fast shutdown: sessions are cut), keeping its data.
    pub fn stop(&mut self) {
        let Some(process) = self.process.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(process.pid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        wait_for(|| !process.is_running(), "postgres to stop").unwrap_or_else(|e| panic!("{e}"));
        // Exited: dropping it would delete the data folder we want to keep.
        std::mem::forget(process);
    }

    /// Starts the stopped server again on the same port, with the same data.
    pub fn restart(&mut self) {
        if self.process.is_some() {
            return;
        }
        let process = launch_postgres(&self.dir, self.port, self.user)
            .unwrap_or_else(|e| panic!("postgres would not restart: {e}"));
        self.process = Some(process);
    }

    /// A fresh database for one test, and its URL.
    pub fn database(&self, label: &str) -> String {
        let name = unique_prefix(label)
            .trim_end_matches(':')
            .replace(['-', '.'], "_")
            .to_lowercase();
        let created = Command::new(postgres_binary("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-c", &format!("CREATE DATABASE \"{name}\"")])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("psql: {e}"));
        assert!(
            created.status.success(),
            "CREATE DATABASE: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        format!("{}/{name}", self.url)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // A running server's process removes the folder itself.
        if self.process.is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn postgres_binary(name: &str) -> PathBuf {
    let versioned = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin").join(name))
        .find(|path| path.is_file());
    versioned.unwrap_or_else(|| find_binary(name))
}

/// The `postgres` system user, which the Debian package creates: PostgreSQL refuses to
/// run as root.
fn postgres_user() -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| e.to_string())?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| "no postgres user: install postgresql".to_owned())
    };
    Ok((id("-u")?, id("-g")?))
}

fn start_postgres() -> Result<PostgresServer, String> {
    let (uid, gid) = postgres_user()?;
    let port = free_port();
    let dir = scratch_dir("postgres");
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
    let data = dir.join("data");
    let mut initdb = Command::new(postgres_binary("initdb"));
    initdb
        .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
        .arg("-D")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let init = ServerProcess::spawn_as(initdb, port, dir.join("initdb"), Some((uid, gid)))
        .map_err(|e| e.to_string())?;
    wait_for(|| !init.is_running(), "initdb to finish")?;
    // initdb has exited: nothing to kill, and its folder is inside the cluster's.
    std::mem::forget(init);
    if !data.join("PG_VERSION").is_file() {
        return Err("initdb did not create the cluster".to_owned());
    }
    let process = launch_postgres(&dir, port, (uid, gid))?;
    Ok(PostgresServer {
        process: Some(process),
        port,
        dir,
        user: (uid, gid),
        url: format!("postgres://postgres@127.0.0.1:{port}"),
    })
}

/// Starts the postmaster of the cluster in `dir` and waits until it answers queries.
fn launch_postgres(dir: &Path, port: u16, user: (u32, u32)) -> Result<ServerProcess, String> {
    let data = dir.join("data");
    let mut command = Command::new(postgres_binary("postgres"));
    command
        .arg("-D")
        .arg(&data)
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ])
        .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
        .arg("-k")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let process = ServerProcess::spawn_as(command, port, dir.to_path_buf(), Some(user))
        .map_err(|e| e.to_string())?;
    let accepts_queries = || {
        Command::new(postgres_binary("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-Atc",
                "select 1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    wait_for(accepts_queries, "postgres to accept queries")?;
    Ok(process)
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// A `chromedriver` (Debian's `chromium-driver`) on loopback, for browser tests: each
/// test opens its own session on it, each session its own headless `chromium`.
#[derive(Debug)]
pub struct ChromeDriver {
    pub process: ServerProcess,
    /// The WebDriver endpoint, `http://127.0.0.1:<port>`.
    pub url: String,
}

/// The chromedriver of this test binary, started on first use and shared by its tests.
pub fn chromedriver() -> &'static ChromeDriver {
    static DRIVER: OnceLock<ChromeDriver> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let mut last_error = String::new();
        for _ in 0..3 {
            match start_chromedriver(free_port()) {
                Ok(driver) => return driver,
                Err(error) => last_error = error,
            }
        }
        panic!("chromedriver would not start: {last_error}")
    })
}

/// The browser the sessions start, found like the servers are.
pub fn chromium_binary() -> PathBuf {
    find_binary("chromium")
}

fn start_chromedriver(port: u16) -> Result<ChromeDriver, String> {
    let dir = scratch_dir("chromedriver");
    let mut command = Command::new(find_binary("chromedriver"));
    command
        .arg(format!("--port={port}"))
        .arg(format!(
            "--log-path={}",
            dir.join("chromedriver.log").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let process = ServerProcess::spawn(command, port, dir).map_err(|e| e.to_string())?;
    wait_for(
        || http_get(port, "/status").contains("\"ready\":true"),
        "chromedriver",
    )?;
    if !process.is_running() {
        return Err(format!("exited at start on port {port}"));
    }
    Ok(ChromeDriver {
        process,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// The answer to `GET path` on a loopback port (spaces removed), or nothing if it
/// does not answer. Whatever arrives within half a second: chromedriver keeps the
/// connection open after its answer.
fn http_get(port: u16, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    // On a timeout, what was read before it is kept.
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).replace(' ', "")
}
