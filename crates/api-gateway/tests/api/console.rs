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

    /// Waits until `check` (a script returning true or false) holds, for up to `limit`.
    async fn until(&self, what: &str, limit: Duration, check: &str) {
        test_kit::eventually(what, limit, || async move {
            self.script(check).await == Value::Bool(true)
        })
        .await;
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

    async fn close(mut self) {
        self.session.clear();
        self.client.clone().close().await.expect("session closes");
    }
}

/// A test that panics before `close` still ends its browser: chromedriver is killed
/// with the test binary, and a browser it started would outlive it.
impl Drop for Browser {
    fn drop(&mut self) {
        if self.session.is_empty() {
            return;
        }
        let port = test_kit::chromedriver().process.port;
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n",
            self.session
        );
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = stream.write_all(request.as_bytes());
            let _ = stream.read(&mut [0; 256]);
        }
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
        let mode = browser.text("#mode").await;
        let problem = if mode.ends_with("retrying") {
            Some(format!("the page says {mode:?}"))
        } else if let Some(problem) = mismatch(&shown, &stats, &summary) {
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
    // A no-cache regenerates at once (by default at most once a minute per key).
    let app = spawn_app(slow_stream(), &[("REVALIDATE_MIN_INTERVAL", "0s")]).await;
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
    // The chart has this hour's bucket (all the traffic is from now).
    let chart = browser
        .script(
            "return [document.querySelectorAll('#chart canvas').length, \
             document.getElementById('chart').dataset.points, \
             document.getElementById('chart-empty').hidden];",
        )
        .await;
    let hours = json(&app, "/narrative/analytics", None).await["hitRateByHour"]
        .as_array()
        .map(Vec::len);
    assert_eq!(hours, Some(1));
    assert_eq!(
        chart,
        json!([1, "1", true]),
        "the hourly chart draws the route's hour"
    );
    // After a second refresh the last interval's rate shows (no requests came).
    browser
        .until(
            "the last interval's hit rate",
            Duration::from_secs(10),
            "return document.querySelector('[data-figure=hitRateNow]').textContent === 'no requests';",
        )
        .await;
    browser.assert_no_console_errors().await;

    // The playground, from the keyboard: a profile nobody asked for, streamed.
    type_into(&browser, "#shares li:nth-child(1) .share-value", "60").await;
    type_into(&browser, "#shares li:nth-child(2) .share-value", "27.5").await;
    // Every length the narrative takes, as the page changes it (not as often as a
    // WebDriver round trip can look).
    browser
        .script(
            "window.lengths = []; \
             new MutationObserver(() => { \
               const answer = document.getElementById('answer'); \
               if (answer.dataset.state === 'streaming') \
                 window.lengths.push(document.getElementById('narrative').textContent.length); \
             }).observe(document.getElementById('narrative'), \
                        {childList: true, characterData: true, subtree: true}); \
             return true;",
        )
        .await;
    browser
        .find("#generate")
        .await
        .send_keys(&Key::Enter.to_string())
        .await
        .expect("Enter on Generate");
    browser
        .until(
            "the stream's end",
            Duration::from_secs(20),
            "const state = document.getElementById('answer').dataset.state; \
             return state === 'done' || state === 'error';",
        )
        .await;
    assert_eq!(
        browser
            .script("return document.getElementById('answer').dataset.state;")
            .await,
        "done"
    );
    let mut lengths: Vec<u64> =
        serde_json::from_value(browser.script("return window.lengths;").await).expect("lengths");
    lengths.dedup();
    assert!(
        lengths.len() >= 5 && lengths.windows(2).all(|w| w[0] < w[1]),
        "the narrative grows while it streams, piece by piece: {lengths:?}"
    );
    assert_eq!(browser.text("#answer-source").await, "generated");
    assert_eq!(browser.text("#answer-x-cache").await, "MISS");
    assert!(browser
        .text("#answer-cache-status")
        .await
        .starts_with("narrative-cache; fwd=miss"));
    let narrative = browser.text("#narrative").await;
    // The profile the form now holds.
    let streamed_profile = json!({
        "classification": "primary", "primary": "Pleiades",
        "percentages": {"Pleiades": 60, "Sirius": 27.5, "Arcturus": 12.5},
        "hdData": {"type": "Generator", "authority": "Sacral", "profile": "2/4"},
    });
    let stored = app.post_narrative(&streamed_profile).await;
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

    // Explain the key: the route's canonical form and key, and nothing generated.
    browser.find("#explain").await.click().await.expect("click");
    browser
        .until(
            "the key explained",
            Duration::from_secs(10),
            "return !document.getElementById('canonical').hidden;",
        )
        .await;
    let explained = app.post_json("/narrative/key", &streamed_profile).await;
    assert_eq!(
        browser.text("#answer-key").await,
        explained.body["cacheKey"].as_str().expect("key")
    );
    let canonical: Value =
        serde_json::from_str(&browser.text("#canonical").await).expect("canonical JSON shown");
    assert_eq!(canonical, explained.body["canonical"]);
    assert_eq!(app.llm_calls(), 3, "explaining generates nothing");

    // The same profile with no-cache: generated again, though it is stored.
    browser
        .find("#generate-fresh")
        .await
        .click()
        .await
        .expect("click");
    browser
        .until(
            "the no-cache answer",
            Duration::from_secs(20),
            "return document.getElementById('answer').dataset.state === 'done';",
        )
        .await;
    assert_eq!(browser.text("#answer-source").await, "generated");
    assert_eq!(browser.text("#answer-x-cache").await, "MISS");
    assert_eq!(app.llm_calls(), 4, "no-cache asked the LLM again");
    browser.assert_no_console_errors().await;

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
    let logged: Vec<Value> = browser
        .console_log()
        .await
        .into_iter()
        .filter(|entry| entry["level"] == "SEVERE" || entry["level"] == "WARNING")
        .collect();
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
    // A Redis of its own: stats count every entry and the fleet's hits in it, and
    // other tests' traffic on the shared one would move them under the comparison.
    let redis = test_kit::RedisServer::start();
    let app = spawn_app_with(
        sim,
        &[("REDIS_URL", &redis.url), ("ENGINE_VERSION", &version)],
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

/// The console's policy, exactly: a test that passes with `'unsafe-inline'` or
/// `'unsafe-eval'` added would not be testing it.
const CONSOLE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_assets_carry_their_policy_and_revalidate_by_etag() {
    let app = spawn_app(SimConfig::default(), &[]).await;
    for (path, kind) in [
        ("/console", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
        (
            "/console/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
        ),
        ("/console/icon.svg", "image/svg+xml"),
    ] {
        let page = app.get(path).await;
        assert_eq!(page.status, 200, "{path}");
        assert_eq!(page.header("content-type"), kind, "{path}");
        assert_eq!(
            page.header("content-security-policy"),
            CONSOLE_POLICY,
            "{path}"
        );
        assert_eq!(page.header("x-content-type-options"), "nosniff");
        assert_eq!(page.header("x-frame-options"), "DENY");
        assert_eq!(page.header("cache-control"), "no-cache");
        let etag = page.header("etag").to_owned();
        assert!(etag.starts_with('"') && etag.len() > 10, "{path}: {etag}");
        for (sent, status) in [
            (etag.clone(), 304),
            (format!("W/{etag}"), 304),
            (format!("\"other\", {etag}"), 304),
            ("\"other\"".to_owned(), 200),
        ] {
            let again = app
                .client
                .get(app.url(path))
                .header("if-none-match", &sent)
                .send()
                .await
                .expect("answer");
            assert_eq!(again.status().as_u16(), status, "{path} with {sent}");
        }
    }
    assert_ne!(
        app.get("/console").await.header("etag"),
        app.get("/console/console.js").await.header("etag"),
        "each asset has its own tag"
    );
    let missing = app.get("/console/secrets.txt").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "no_route");
    // The API's answers keep the API's policy.
    assert_eq!(
        app.get("/readyz").await.header("content-security-policy"),
        "default-src 'none'; frame-ancestors 'none'"
    );
    assert_eq!(app.get("/readyz").await.body["access"], "open");
    app.shutdown().await;

    let keyed = spawn_app(
        SimConfig::default(),
        &[("API_KEYS", "ops:console-key-0123456789")],
    )
    .await;
    assert_eq!(keyed.get("/readyz").await.body["access"], "key");
    assert_eq!(
        keyed.get("/console").await.status,
        200,
        "the page needs no key"
    );
    keyed.shutdown().await;

    let off = spawn_app(SimConfig::default(), &[("CONSOLE", "false")]).await;
    assert_eq!(off.get("/console").await.status, 404);
    assert_eq!(off.get("/console/console.js").await.status, 404);
    off.shutdown().await;
}
