//! The `narrative-prewarm` binary against a real gateway on a random port.

use std::process::Command;

use api_gateway::{run, App, Settings};
use cache_core::config::Vars;
use llm_sim::SimConfig;

const TOKEN: &str = "admin-token-0123456789";

fn profile(lead: f64) -> serde_json::Value {
    serde_json::json!({
        "classification": "primary", "primary": "Lyra",
        "percentages": {"Lyra": lead, "Vega": 100.0 - lead},
        "hdData": {"type": "Projector", "authority": "Splenic", "profile": "5/1"}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_profiles_is_warmed_and_summarized() {
    let sim = llm_sim::spawn(SimConfig {
        latency_ms: 5,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let base_url = sim.base_url();
    let settings = Settings::from_vars(&Vars::from_pairs([
        ("LLM_BASE_URL", base_url.as_str()),
        ("LLM_API_KEY", "sk-test"),
        ("ADMIN_TOKEN", TOKEN),
        ("PREWARM_RATE", "100"),
    ]))
    .expect("settings");
    let app = App::build(settings).expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(run(listener, app, std::future::pending()));

    let client = reqwest::Client::new();
    let cached = client
        .post(format!("{url}/narrative"))
        .json(&profile(60.0))
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 200);
    let file = std::env::temp_dir().join(format!("cli-profiles-{}.json", std::process::id()));
    let list = serde_json::json!([profile(60.0), profile(61.0), profile(62.0), profile(63.0)]);
    std::fs::write(&file, list.to_string()).unwrap();

    let bin = env!("CARGO_BIN_EXE_narrative-prewarm");
    let (url_arg, file_arg) = (url.clone(), file.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["--url", &url_arg, "--file"])
            .arg(&file_arg)
            .env("ADMIN_TOKEN", TOKEN)
            .output()
            .expect("narrative-prewarm runs")
    })
    .await
    .unwrap();
    std::fs::remove_file(&file).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("4 requested, 3 queued, 3 sent, 1 skipped"),
        "{stdout}"
    );
    assert_eq!(
        sim.sim.stats().requests,
        4,
        "one call for the cached one, three warmed"
    );
    for lead in [61.0, 62.0, 63.0] {
        let answer = client
            .post(format!("{url}/narrative"))
            .json(&profile(lead))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.headers()["x-cache"], "HIT");
    }

    let refused = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["--url", &url, "--top", "5"])
            .env("ADMIN_TOKEN", "not-the-token-at-all")
            .output()
            .expect("narrative-prewarm runs")
    })
    .await
    .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
