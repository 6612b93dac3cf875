//! A real `api-gateway` process, for tests that signal, kill or freeze it. Apart from
//! `helpers` because the fleet tests share that module, and only this crate's tests
//! have the gateway binary.

use std::time::Duration;

use llm_sim::SimHandle;

/// A real `api-gateway` process (which can be signalled, killed or frozen).
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts an `api-gateway` process sharing `redis_url`, with `vars` on top of the
/// test defaults, and waits until it listens. Returns it and its base URL.
pub async fn spawn_process(
    sim: &SimHandle,
    redis_url: &str,
    version: &str,
    vars: &[(&str, &str)],
) -> (Process, String) {
    let port = test_kit::free_port();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_api-gateway"));
    command
        .env_clear()
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("REDIS_URL", redis_url)
        .env("ENGINE_VERSION", version)
        .env("CACHE_KEY_SECRET", "test-secret-0123456789")
        .env("LLM_BASE_URL", sim.base_url())
        .env("LLM_API_KEY", "sk-test")
        .env("RUST_LOG", "error")
        .envs(vars.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let process = Process(command.spawn().expect("api-gateway starts"));
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    test_kit::eventually(
        "the gateway process to listen",
        Duration::from_secs(10),
        || async { client.get(format!("{url}/healthz")).send().await.is_ok() },
    )
    .await;
    (process, url)
}
