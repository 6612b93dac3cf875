//! `GET /console` in a real browser: Debian's headless Chromium driven over WebDriver
//! (test-kit's `chromedriver`), against a gateway on a random port with the simulator
//! streaming. What a person sees is read off the page and compared with the JSON
//! routes it is drawn from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use llm_sim::SimConfig;
use serde_json::{json, Value};

use crate::helpers::{profile, slow_stream, spawn_app, spawn_app_with, unique_version, TestApp};

/// A browser session of its own on the shared chromedriver, logging the page's
/// console so that a test can tell it logged no error.
struct Browser {
    client: Client,
    session: String,
}

impl Browser {
    async fn open() -> Self {
        let driver = test_kit::chromedriver();
        let capabilities = json!({
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": test_kit::chromium_binary(),
                // As root, without a GPU, and without the background connections a
                // closed network refuses.
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                    "--window-size=1100,1500",
                ],
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("an object")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&driver.url)
            .await
            .expect("a chromium session");
        let session = client
            .session_id()
            .await
            .expect("session id")
            .expect("a session");
        Self { client, session }
    }

    async fn goto(&self, app: &TestApp, path: &str) {
        self.client.goto(&app.url(path)).await.expect("page loads");
    }

    async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
    }

    /// The mode the header shows (`embedded`, `distributed`), once it shows one.
    async fn mode(&self) -> Option<String> {
        self.find("#mode[data-mode]")
            .await
            .attr("data-mode")
            .await
            .expect("attribute")
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("text")
    }

    async fn script(&self, body: &str) -> Value {
        self.client
            .execute(body, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{body}"))
    }

    /// Polls `check` (a script returning true or false) every 25 ms for up to `limit`.
    async fn until(&self, what: &str, limit: Duration, check: &str) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.script(check).await == Value::Bool(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out after {limit:?} waiting for {what}");
    }

    /// What the page logged to its console since the last call (chromedriver's log
    /// endpoint: the W3C protocol has none).
    async fn console_log(&self) -> Vec<Value> {
        let url = format!(
            "{}/session/{}/se/log",
            test_kit::chromedriver().url,
            self.session
        );
        let answer: Value = reqwest::Client::new()
            .post(url)
            .json(&json!({"type": "browser"}))
            .send()
            .await
            .expect("log endpoint")
            .json()
            .await
            .expect("log JSON");
        answer["value"].as_array().cloned().unwrap_or_default()
    }

    async fn assert_no_console_errors(&self) {
        let errors: Vec<Value> = self
            .console_log()
            .await
            .into_iter()
            .filter(|entry| entry["level"] == "SEVERE" || entry["level"] == "WARNING")
            .collect();
        assert!(errors.is_empty(), "the console logged: {errors:#?}");
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = target_dir();
        std::fs::create_dir_all(&dir).expect("target dir");
        std::fs::write(dir.join(name), png).expect("screenshot saved");
    }

    async fn close(self) {
        self.client.close().await.expect("session closes");
    }
}

/// The workspace's `target/` (or `CARGO_TARGET_DIR`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    )
}

/// Reads every `[data-figure]` of the page as shown.
const FIGURES: &str = "return Object.fromEntries([...document.querySelectorAll('[data-figure]')]\
     .map((e) => [e.dataset.figure, e.textContent]));";

/// The rows of a table body as shown, cell by cell.
fn table(id: &str) -> String {
    format!(
        "return [...document.querySelectorAll('#{id} tr')].map((tr) => \
         [...tr.children].map((td) => td.textContent));"
    )
}

/// The number a figure shows: `$0.000169`, `1,024`, `66.7%`, `819 ms`.
fn shown_number(text: &str) -> Option<f64> {
    let digits: String = text
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

/// Whether every figure the page shows is what `/narrative/stats` and
/// `/narrative/analytics` say, as each is rounded for display; the first mismatch
/// otherwise.
fn mismatch(shown: &Value, stats: &Value, summary: &Value) -> Option<String> {
    let count = |name: &str, want: &Value| (name.to_owned(), want.as_f64(), 0.0);
    let checks = [
        (
            "hitRate".to_owned(),
            stats["hitRate"].as_f64().map(|r| r * 100.0),
            0.05,
        ),
        count("hits", &stats["hits"]),
        count("misses", &stats["misses"]),
        count("fallbacks", &stats["fallbacks"]),
        count("inFlight", &stats["inFlight"]),
        count("keys", &stats["keys"]),
        count("totalRequests", &summary["totalRequests"]),
        count("uniqueUsers", &summary["uniqueUsers"]),
        count("generations", &summary["generations"]),
        count("failedGenerations", &summary["failedGenerations"]),
        count("tokensIn", &summary["tokensIn"]),
        count("tokensOut", &summary["tokensOut"]),
        count("tokensSaved", &summary["tokensSaved"]),
        (
            "avgGenerationTime".to_owned(),
            summary["avgGenerationTime"].as_f64(),
            0.5,
        ),
        (
            "estimatedCost".to_owned(),
            summary["estimatedCost"].as_f64(),
            5e-7,
        ),
        ("costSaved".to_owned(), summary["costSaved"].as_f64(), 5e-7),
    ];
    for (name, want, tolerance) in checks {
        let text = shown[&name].as_str().unwrap_or_default();
        let ok = match want {
            Some(want) => shown_number(text).is_some_and(|got| (got - want).abs() <= tolerance),
            None => text == "—",
        };
        if !ok {
            return Some(format!("{name}: shown {text:?}, the route says {want:?}"));
        }
    }
    if shown["memoryUsed"] != stats["memoryUsed"] || shown["store"] != stats["store"] {
        return Some(format!("memory: shown {shown}, stats {stats}"));
    }
    None
}

async fn json(app: &TestApp, path: &str, key: Option<&str>) -> Value {
    let mut request = app.client.get(app.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request
        .send()
        .await
        .expect("route answers")
        .json()
        .await
        .expect("JSON")
}

/// Waits until the page's figures, tables and last answers are those of the routes
/// (the page refreshes every few seconds), then returns what it showed.
async fn assert_figures_match(browser: &Browser, app: &TestApp, key: Option<&str>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let shown = browser.script(FIGURES).await;
        let (stats, summary) = (
            json(app, "/narrative/stats", key).await,
            json(app, "/narrative/analytics", key).await,
        );
        let systems: Vec<Value> = summary["topSystems"]
            .as_array()
            .expect("topSystems")
            .iter()
            .map(|top| json!([top["system"], top["count"].to_string()]))
            .collect();
        let versions: Vec<Value> = stats["entriesByVersion"]
            .as_object()
            .expect("entriesByVersion")
            .iter()
            .map(|(version, n)| json!([version, n.to_string()]))
            .collect();
        let recent: Vec<Value> = stats["recent"]
            .as_array()
            .expect("recent")
            .iter()
            .map(|answer| answer["source"].clone())
            .collect();
        let shown_recent: Vec<Value> = browser
            .script(&table("recent"))
            .await
            .as_array()
            .expect("rows")
            .iter()
            .map(|row| row[1].clone())
            .collect();
        let (shown_systems, shown_versions) = (
            browser.script(&table("top-systems")).await,
            browser.script(&table("entries-by-version")).await,
        );
        let problem = if let Some(problem) = mismatch(&shown, &stats, &summary) {
            Some(problem)
        } else if shown_systems != Value::Array(systems.clone()) {
            Some(format!("top systems: shown {shown_systems}, {systems:?}"))
        } else if shown_versions != Value::Array(versions.clone()) {
            Some(format!(
                "entries by version: shown {shown_versions}, {versions:?}"
            ))
        } else if shown_recent != recent {
            Some(format!("last answers: shown {shown_recent:?}, {recent:?}"))
        } else {
            None
        };
        match problem {
            None => return shown,
            Some(problem) if Instant::now() > deadline => {
                panic!("the console never showed the routes' figures: {problem}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Sets an input's value as a person would: cleared, then typed.
async fn type_into(browser: &Browser, css: &str, text: &str) {
    let input = browser.find(css).await;
    input.clear().await.expect("clear");
    input.send_keys(text).await.expect("type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_routes_figures_and_streams_a_narrative() {
    let app = spawn_app(slow_stream(), &[]).await;
    // Traffic to show: two profiles generated, one of them hit twice.
    for body in [profile(11), profile(11), profile(12), profile(11)] {
        assert_eq!(app.post_narrative(&body).await.status, 200);
    }

    let browser = Browser::open().await;
    browser.goto(&app, "/console").await;
    browser.find("#figures:not([hidden])").await;
    assert_eq!(browser.mode().await.as_deref(), Some("embedded"));
    let shown = assert_figures_match(&browser, &app, None).await;
    assert_eq!(
        shown["hits"], "2",
        "the figures are this traffic's: {shown}"
    );
    let chart_points = browser
        .script("return document.querySelectorAll('#chart canvas').length")
        .await;
    assert_eq!(chart_points, json!(1), "the hourly chart is drawn");
    browser.assert_no_console_errors().await;

    // The playground, from the keyboard: a profile nobody asked for, streamed.
    type_into(&browser, "#shares li:nth-child(1) .share-value", "60").await;
    type_into(&browser, "#shares li:nth-child(2) .share-value", "27.5").await;
    browser
        .find("#generate")
        .await
        .send_keys(&Key::Enter.to_string())
        .await
        .expect("Enter on Generate");
    let mut lengths = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let final_state = loop {
        let seen = browser
            .script(
                "return [document.getElementById('answer').dataset.state, \
                 document.getElementById('narrative').textContent.length];",
            )
            .await;
        let state = seen[0].as_str().unwrap_or_default().to_owned();
        if state == "streaming" {
            lengths.push(seen[1].as_u64().expect("length"));
        }
        if state == "done" || state == "error" || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(final_state, "done", "the stream ended");
    lengths.dedup();
    let growing: Vec<u64> = lengths.iter().copied().filter(|n| *n > 0).collect();
    assert!(
        growing.len() >= 3 && growing.windows(2).all(|w| w[0] < w[1]),
        "the narrative grows while it streams: {lengths:?}"
    );
    assert_eq!(browser.text("#answer-source").await, "generated");
    assert_eq!(browser.text("#answer-x-cache").await, "MISS");
    assert!(browser
        .text("#answer-cache-status")
        .await
        .starts_with("narrative-cache; fwd=miss"));
    let narrative = browser.text("#narrative").await;
    let stored = app
        .post_narrative(&json!({
            "classification": "primary", "primary": "Pleiades",
            "percentages": {"Pleiades": 60, "Sirius": 27.5, "Arcturus": 12.5},
            "hdData": {"type": "Generator", "authority": "Sacral", "profile": "2/4"},
        }))
        .await;
    assert_eq!(
        stored.source(),
        "cache",
        "the streamed narrative was stored"
    );
    assert_eq!(
        narrative.trim(),
        stored.body["narrative"].as_str().expect("narrative").trim()
    );
    assert_eq!(app.llm_calls(), 3, "one call per profile");
    // The figures follow: the generation is among the last answers.
    let shown = assert_figures_match(&browser, &app, None).await;
    assert_eq!(shown["generations"], "3", "{shown}");
    browser.assert_no_console_errors().await;
    // The whole page, figures and answer, for the docs.
    browser
        .client
        .set_window_size(1000, 2300)
        .await
        .expect("resize");
    browser.script("window.scrollTo(0, 0); return true;").await;
    browser.screenshot("console.png").await;

    // A share out of range: the gateway's error, next to that share.
    type_into(&browser, "#shares li:nth-child(2) .share-value", "150").await;
    browser
        .find("#generate")
        .await
        .click()
        .await
        .expect("click");
    browser
        .until(
            "the error",
            Duration::from_secs(10),
            "return document.getElementById('answer').dataset.state === 'error';",
        )
        .await;
    let placed = browser
        .script(
            "const row = document.querySelector('#shares li:nth-child(2)'); \
             return [row.querySelector('.field-error').textContent, \
                     row.querySelector('.share-value').getAttribute('aria-invalid'), \
                     document.activeElement === row.querySelector('.share-value'), \
                     document.querySelector('#shares li:nth-child(1) .field-error').textContent];",
        )
        .await;
    assert!(
        placed[0]
            .as_str()
            .unwrap_or_default()
            .starts_with("percentages.Sirius: "),
        "the error is next to the Sirius share: {placed}"
    );
    assert_eq!(placed[1], "true");
    assert_eq!(
        placed[2], true,
        "the focus moves to the input the error names"
    );
    assert_eq!(placed[3], "", "and nowhere else");
    // The one thing the console logged is the browser's own note of the 400.
    let logged = browser.console_log().await;
    assert!(
        logged.iter().all(|entry| entry["message"]
            .as_str()
            .is_some_and(|m| m.contains("/narrative") && m.contains("400"))),
        "{logged:#?}"
    );

    // Readable on a phone: nothing wider than a 400 px window.
    browser
        .client
        .set_window_size(400, 900)
        .await
        .expect("resize");
    browser
        .until(
            "the layout at 400 px",
            Duration::from_secs(5),
            "return window.innerWidth <= 400;",
        )
        .await;
    let overflow = browser
        .script("return document.documentElement.scrollWidth - window.innerWidth;")
        .await;
    assert!(
        overflow.as_i64().is_some_and(|px| px <= 0),
        "the page scrolls sideways by {overflow} px at 400 px"
    );
    browser.close().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_the_figures_wait_for_a_key_kept_in_the_tab() {
    const KEY: &str = "console-key-0123456789";
    let app = spawn_app(
        SimConfig::default(),
        &[("API_KEYS", "ops:console-key-0123456789")],
    )
    .await;
    let browser = Browser::open().await;
    browser.goto(&app, "/console").await;
    browser.find("#auth:not([hidden])").await;
    let before = browser
        .script(
            "return [document.getElementById('figures').hidden, \
             document.getElementById('figures').dataset.refreshes || null, \
             document.querySelector('[data-figure=hits]').textContent];",
        )
        .await;
    assert_eq!(before, json!([true, null, "—"]), "no figures without a key");

    let input = browser.find("#auth-key").await;
    input.send_keys(KEY).await.expect("type the key");
    input
        .send_keys(&Key::Enter.to_string())
        .await
        .expect("submit");
    browser.find("#figures:not([hidden])").await;
    assert_figures_match(&browser, &app, Some(KEY)).await;
    let kept = browser
        .script(
            "return [sessionStorage.getItem('narrative-cache.client-key'), localStorage.length, \
             document.cookie];",
        )
        .await;
    assert_eq!(
        kept,
        json!([KEY, 0, ""]),
        "the key is kept for the tab only"
    );
    browser.assert_no_console_errors().await;
    browser.close().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_distributed_mode() {
    let sim = llm_sim::spawn(SimConfig::default())
        .await
        .expect("simulator");
    let version = unique_version("console");
    let app = spawn_app_with(
        sim,
        &[
            ("REDIS_URL", &test_kit::redis().url),
            ("ENGINE_VERSION", &version),
        ],
    )
    .await;
    for _ in 0..3 {
        assert_eq!(app.post_narrative(&profile(21)).await.status, 200);
    }
    let browser = Browser::open().await;
    browser.goto(&app, "/console").await;
    browser.find("#figures:not([hidden])").await;
    let backends: BTreeMap<String, String> = serde_json::from_value(
        browser
            .script(
                "return Object.fromEntries([...document.querySelectorAll('[data-backend]')]\
                 .map((li) => [li.dataset.backend, li.textContent]));",
            )
            .await,
    )
    .expect("backends");
    assert_eq!(browser.mode().await.as_deref(), Some("distributed"));
    assert!(
        backends["cache"].starts_with("cache: redis up"),
        "{backends:?}"
    );
    assert_figures_match(&browser, &app, None).await;
    browser.assert_no_console_errors().await;
    browser.close().await;
    app.shutdown().await;
}
