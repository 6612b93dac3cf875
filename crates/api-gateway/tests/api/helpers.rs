use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api_gateway::{run, App, AppState, Settings};
use cache_core::config::Vars;
use cache_core::CacheKey;
use llm_sim::{SimConfig, SimHandle};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub sim: SimHandle,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

/// A gateway in embedded mode wired to a fresh simulator, with `vars` on top of the
/// test defaults.
pub async fn spawn_app(sim_config: SimConfig, vars: &[(&str, &str)]) -> TestApp {
    let sim = llm_sim::spawn(sim_config).await.expect("simulator starts");
    spawn_app_with(sim, vars).await
}

/// A gateway using an existing simulator: several instances can share one, so its
/// counter sees every LLM call they make together.
pub async fn spawn_app_with(sim: SimHandle, vars: &[(&str, &str)]) -> TestApp {
    let base_url = sim.base_url();
    let mut pairs = vec![
        ("LLM_BASE_URL", base_url.as_str()),
        ("LLM_API_KEY", "sk-test"),
        ("CACHE_KEY_SECRET", "test-secret-0123456789"),
        ("LLM_BACKOFF_BASE", "5ms"),
        ("LLM_BACKOFF_MAX", "50ms"),
    ];
    pairs.extend_from_slice(vars);
    let settings = Settings::from_vars(&Vars::from_pairs(pairs)).expect("valid settings");
    let app = App::build(settings).expect("app builds");
    let state = Arc::clone(app.state());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (shutdown, signal) = oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, app, async {
        let _ = signal.await;
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("client");
    TestApp {
        addr,
        client,
        sim,
        state,
        shutdown: Some(shutdown),
        server: Some(server),
    }
}

/// The streaming issue's simulator: first token at 400 ms, 60-character chunks every
/// 80 ms (a narrative of about 900 characters takes some 1.5 s).
pub fn slow_stream() -> SimConfig {
    SimConfig {
        latency_ms: 400,
        chunk_chars: 60,
        chunk_interval_ms: 80,
        ..SimConfig::default()
    }
}

/// A valid profile; different `n` (below 6,400) give different keys.
pub fn profile(n: u32) -> Value {
    let lead = 30.0 + f64::from(n % 100) * 0.5;
    serde_json::json!({
        "classification": "primary",
        "primary": "Pleiades",
        "percentages": {"Pleiades": lead, "Sirius": 100.0 - lead},
        "hdData": {"type": "Generator", "authority": "Sacral", "profile": "2/4", "gates": [1 + (n / 100) % 64]},
        "userId": format!("user-{n}"),
    })
}

/// An `ENGINE_VERSION` no other test uses, so tests sharing one Redis never share keys.
pub fn unique_version(label: &str) -> String {
    test_kit::unique_prefix(label)
        .trim_end_matches(':')
        .to_owned()
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn source(&self) -> &str {
        self.body["source"].as_str().unwrap_or("")
    }

    pub fn key(&self) -> CacheKey {
        CacheKey::parse(self.body["cacheKey"].as_str().expect("cacheKey")).expect("valid key")
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        reply(response).await
    }

    pub async fn post_narrative_owned(&self, body: Value) -> Reply {
        self.post_narrative(&body).await
    }

    pub async fn post_narrative(&self, body: &Value) -> Reply {
        self.post_json("/narrative", body).await
    }

    /// A POST with a body and content type of the test's choosing.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let request = self
            .client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body);
        reply(request.send().await.expect("request")).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        reply(
            self.client
                .get(self.url(path))
                .send()
                .await
                .expect("request"),
        )
        .await
    }

    pub async fn stats(&self) -> Value {
        self.get("/narrative/stats").await.body
    }

    /// Completion requests the simulator has received.
    pub fn llm_calls(&self) -> u64 {
        self.sim.sim.stats().requests
    }

    /// Stops the server the way SIGTERM does and waits for it to drain.
    pub async fn shutdown(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server ran");
        }
    }
}

pub async fn reply(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// Concurrent requests for keys being generated: every one is answered 200 with the
/// generated narrative, either by waiting on the generation or, for a request that
/// reached the gateway after it was stored (opening hundreds of connections can
/// outlast a short generation on a loaded machine), from the cache. None fell back.
pub fn assert_served_without_fallback(replies: &[Reply]) {
    let mut sources = std::collections::BTreeMap::new();
    for reply in replies {
        *sources
            .entry((reply.status, reply.source().to_owned()))
            .or_insert(0) += 1;
    }
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && matches!(r.source(), "generated" | "cache")),
        "all 200, generated or stored by the one generation: {sources:?}"
    );
    assert!(
        sources.contains_key(&(200, "generated".to_owned())),
        "some waited on the generation: {sources:?}"
    );
}

// Erasure: the admin route and the requests around it.

/// The admin token every test gateway is given.
pub const ADMIN: &str = "admin-token-0123456789";

pub fn as_user(n: u32, user: &str) -> Value {
    let mut body = profile(n);
    body["userId"] = json!(user);
    body
}

pub fn anonymous(n: u32) -> Value {
    let mut body = profile(n);
    body.as_object_mut().expect("object").remove("userId");
    body
}

pub async fn erase(app: &TestApp, user: &str) -> Reply {
    let request = app
        .client
        .delete(app.url(&format!("/narrative/user/{user}")))
        .bearer_auth(ADMIN);
    reply(request.send().await.expect("request")).await
}

pub async fn respond_async(app: &TestApp, body: &Value) -> Reply {
    let request = app
        .client
        .post(app.url("/narrative"))
        .header("prefer", "respond-async")
        .json(body);
    reply(request.send().await.expect("request")).await
}

// Pre-warming: the admin route and its runs.

pub async fn post_prewarm(app: &TestApp, token: Option<&str>, body: &Value) -> Reply {
    let mut request = app.client.post(app.url("/narrative/prewarm")).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    reply(request.send().await.expect("request")).await
}

/// Follows a run until the gateway says it is done; returns its last progress.
pub async fn until_done(app: &TestApp, location: &str) -> Value {
    let progress = || async {
        let request = app.client.get(app.url(location)).bearer_auth(ADMIN);
        reply(request.send().await.expect("request")).await.body
    };
    test_kit::eventually(
        "the prewarm run to finish",
        Duration::from_secs(30),
        || async { progress().await["state"] == "done" },
    )
    .await;
    progress().await
}

/// Requests for profiles 0..30, profile n `30 - n` times: 0 is the most popular.
pub fn skewed_traffic() -> Vec<u32> {
    (0..30u32)
        .flat_map(|n| std::iter::repeat_n(n, (30 - n) as usize))
        .collect()
}

/// A gateway of an earlier version, `old`, sharing `redis_url`, stores `bodies` and
/// stops: what a rollout starts from. Returns its replies and the
/// `PREVIOUS_VERSIONS` pair that names it.
pub async fn stored_by_previous_version(
    sim: &SimHandle,
    redis_url: &str,
    old: &str,
    bodies: &[Value],
) -> (Vec<Reply>, String) {
    let previous = spawn_app_with(
        sim.clone(),
        &[("REDIS_URL", redis_url), ("ENGINE_VERSION", old)],
    )
    .await;
    let mut replies = Vec::with_capacity(bodies.len());
    for body in bodies {
        let reply = previous.post_narrative(body).await;
        assert_eq!(reply.source(), "generated", "{:?}", reply.body);
        replies.push(reply);
    }
    let pair = format!(
        "{old}:{}",
        previous.stats().await["promptHash"]
            .as_str()
            .expect("promptHash")
    );
    previous.shutdown().await;
    (replies, pair)
}

/// A streamed answer (`Accept: text/event-stream`) as its client saw it.
#[derive(Debug)]
pub struct Streamed {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// Every event in order: its name and its data, parsed as JSON.
    pub events: Vec<(String, Value)>,
}

impl Streamed {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn names(&self) -> Vec<&str> {
        self.events.iter().map(|(name, _)| name.as_str()).collect()
    }

    pub fn meta(&self) -> &Value {
        let (name, data) = self.events.first().expect("an event");
        assert_eq!(name, "meta", "meta comes first: {:?}", self.names());
        data
    }

    pub fn done(&self) -> &Value {
        let (name, data) = self.events.last().expect("an event");
        assert_eq!(name, "done", "done comes last: {:?}", self.names());
        data
    }

    pub fn deltas(&self) -> usize {
        self.events
            .iter()
            .filter(|(name, _)| name == "delta")
            .count()
    }

    pub fn resets(&self) -> usize {
        self.events
            .iter()
            .filter(|(name, _)| name == "reset")
            .count()
    }

    /// The concatenated deltas since the last reset: what the client shows at the end.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for (name, data) in &self.events {
            match name.as_str() {
                "delta" => text.push_str(data["text"].as_str().expect("delta text")),
                "reset" => text.clear(),
                _ => {}
            }
        }
        text
    }

    /// The contract every stream keeps: 200, `meta` first, `done` last and once, and
    /// `done`'s narrative exactly the text since the last reset.
    pub fn assert_well_formed(&self) {
        assert_eq!(self.status, 200, "{:?}", self.events);
        assert!(
            self.header("content-type").starts_with("text/event-stream"),
            "{:?}",
            self.headers
        );
        self.meta();
        assert_eq!(
            self.names().iter().filter(|name| **name == "done").count(),
            1,
            "one done: {:?}",
            self.names()
        );
        assert_eq!(
            self.done()["narrative"].as_str().expect("narrative"),
            self.text(),
            "done's narrative is the text since the last reset"
        );
    }
}

/// Reads a whole event stream from `request`.
pub async fn read_stream(request: reqwest::RequestBuilder) -> Streamed {
    use futures::StreamExt as _;
    let response = request
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut events = Vec::new();
    let mut parsed = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
    while let Some(event) = parsed.next().await {
        let event = event.expect("a well-formed event stream");
        let data = serde_json::from_str(&event.data).unwrap_or(Value::String(event.data));
        events.push((event.event, data));
    }
    Streamed {
        status,
        headers,
        events,
    }
}

impl TestApp {
    /// `POST /narrative` streamed.
    pub async fn stream_narrative(&self, body: &Value) -> Streamed {
        read_stream(self.client.post(self.url("/narrative")).json(body)).await
    }

    /// `GET` of `path` streamed.
    pub async fn stream_get(&self, path: &str) -> Streamed {
        read_stream(self.client.get(self.url(path))).await
    }

    /// Whether `body`'s narrative is stored: `only-if-cached` answers 200, not 504.
    pub async fn is_stored(&self, body: &Value) -> bool {
        let reply = self
            .client
            .post(self.url("/narrative"))
            .header("cache-control", "only-if-cached")
            .json(body)
            .send()
            .await;
        reply.is_ok_and(|reply| reply.status() == 200)
    }
}

/// One generation streamed to many: every stream in `streamed` came live (`meta`
/// `generating`, at least five deltas, no reset, `done` `generated`), every answer in
/// `answered` is the same narrative, and `late`, started while the text was being
/// written, got all of it too. Returns the narrative.
pub fn assert_streamed_to_all(
    streamed: &[Streamed],
    answered: &[Reply],
    late: &Streamed,
) -> String {
    late.assert_well_formed();
    assert_eq!(
        late.meta()["source"],
        "generating",
        "joined while it was written"
    );
    // The text so far came first, at once: more than one chunk in its first delta.
    let (name, first) = &late.events[1];
    assert_eq!(name, "delta", "{:?}", late.names());
    let first = first["text"].as_str().expect("text");
    assert!(first.len() > 60, "the text so far first: {first:?}");
    assert!(
        late.deltas() >= 2,
        "then the rest, live: {:?}",
        late.names()
    );
    let narrative = late.text();
    assert!(narrative.len() > 300, "a whole narrative: {narrative:?}");
    for stream in streamed {
        stream.assert_well_formed();
        assert_eq!(
            stream.meta()["source"],
            "generating",
            "{:?}",
            stream.names()
        );
        assert_eq!(stream.header("x-cache"), "MISS");
        assert!(
            stream.deltas() >= 5,
            "the text came live, in pieces: {:?}",
            stream.names()
        );
        assert_eq!(stream.resets(), 0);
        assert_eq!(stream.done()["source"], "generated");
        assert_eq!(stream.text(), narrative, "every stream got the same text");
    }
    for reply in answered {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.source(), "generated", "{:?}", reply.body);
        assert_eq!(reply.body["narrative"], narrative.as_str());
    }
    narrative
}
