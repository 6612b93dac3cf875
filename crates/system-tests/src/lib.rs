//! Tests and benches only: see `tests/` and `benches/`. What the benches share is here.

use api_gateway::{run, App, Settings};
use cache_core::config::Vars;

/// A valid profile; different `n` (below 6,400) give different keys.
pub fn profile(n: u32) -> serde_json::Value {
    let lead = 30.0 + f64::from(n % 100) * 0.5;
    serde_json::json!({
        "classification": "primary", "primary": "Pleiades",
        "percentages": {"Pleiades": lead, "Sirius": 100.0 - lead},
        "hdData": {"type": "Generator", "authority": "Sacral", "profile": "2/4", "gates": [1 + (n / 100) % 64]},
    })
}

/// A gateway with `vars`, served on a random loopback port until the process ends;
/// returns its base URL.
pub async fn gateway(vars: &[(&str, &str)]) -> String {
    let settings = Settings::from_vars(&Vars::from_pairs(vars.iter().copied())).expect("settings");
    let app = App::build(settings).expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(run(listener, app, std::future::pending()));
    url
}

/// The value at quantile `q` (0 to 1) of `sorted` values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// `POST /narrative` of `body` to the gateway at `url`: its JSON answer.
pub async fn post_narrative(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    client
        .post(format!("{url}/narrative"))
        .json(body)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}
