//! Streamed answers (`Accept: text/event-stream`): one LLM call whose text reaches
//! every streaming request for the key, on every gateway, live; late joiners get the
//! text so far; failures reset to the template; a killed holder's streams still end
//! with a whole narrative. On real Redis (standalone and Cluster), with the simulator
//! streaming like an OpenAI-compatible server.

use std::time::Duration;

use futures::future::join_all;
use llm_sim::{SimConfig, SimHandle};
use serde_json::Value;

use crate::helpers::{
    assert_streamed_to_all, profile, slow_stream, spawn_app, spawn_app_with, unique_version, Reply,
    Streamed, TestApp,
};
use crate::process::spawn_process;

async fn sim(config: SimConfig) -> SimHandle {
    llm_sim::spawn(config).await.expect("simulator starts")
}

/// `streams` streaming and `plain` non-streaming requests for one new profile, spread
/// over `gateways`, all at once, and one more stream a second later (while the text is
/// still being written). Checks what every stream and answer must show, and returns
/// the narrative.
async fn one_call_streamed_to_all(
    gateways: &[&TestApp],
    body: &Value,
    streams: usize,
    plain: usize,
) -> String {
    let streamed =
        join_all((0..streams).map(|i| gateways[i % gateways.len()].stream_narrative(body)));
    let answered = join_all((0..plain).map(|i| gateways[i % gateways.len()].post_narrative(body)));
    let late = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        gateways[gateways.len() - 1].stream_narrative(body).await
    };
    let (streamed, answered, late): (Vec<Streamed>, Vec<Reply>, Streamed) =
        tokio::join!(streamed, answered, late);

    assert_streamed_to_all(&streamed, &answered, &late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_streams_live_to_every_request_in_embedded_mode() {
    let app = spawn_app(slow_stream(), &[]).await;
    one_call_streamed_to_all(&[&app], &profile(1), 200, 20).await;
    assert_eq!(app.llm_calls(), 1, "one LLM call for 221 requests");

    let metrics = app.get("/metrics").await.body;
    let metrics = metrics.as_str().expect("text");
    assert!(
        metrics.contains("narrative_first_delta_seconds_count{source=\"generated\"} 201"),
        "the first delta of each stream is measured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_streams_live_to_every_request_on_two_gateways() {
    let (sim, version) = (sim(slow_stream()).await, unique_version("stream-two"));
    let vars = [
        ("REDIS_URL", test_kit::redis().url.as_str()),
        ("ENGINE_VERSION", version.as_str()),
    ];
    let a = spawn_app_with(sim.clone(), &vars).await;
    let b = spawn_app_with(sim.clone(), &vars).await;
    one_call_streamed_to_all(&[&a, &b], &profile(2), 200, 20).await;
    assert_eq!(
        sim.sim.stats().requests,
        1,
        "one LLM call across both gateways"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_streams_live_to_every_request_on_a_redis_cluster() {
    let (sim, version) = (sim(slow_stream()).await, unique_version("stream-cluster"));
    let vars = [
        ("REDIS_URL", test_kit::redis_cluster().url.as_str()),
        ("REDIS_CLUSTER", "true"),
        ("ENGINE_VERSION", version.as_str()),
    ];
    let a = spawn_app_with(sim.clone(), &vars).await;
    let b = spawn_app_with(sim.clone(), &vars).await;
    one_call_streamed_to_all(&[&a, &b], &profile(3), 100, 10).await;
    assert_eq!(
        sim.sim.stats().requests,
        1,
        "one LLM call across the cluster"
    );
}

#[tokio::test]
async fn a_hit_streams_at_once_from_the_cache() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 5,
            chunk_interval_ms: 1,
            ..SimConfig::default()
        },
        &[],
    )
    .await;
    let body = profile(4);
    let stored = app.post_narrative(&body).await;
    assert_eq!(stored.source(), "generated");

    let hit = app.stream_narrative(&body).await;
    hit.assert_well_formed();
    assert_eq!(hit.meta()["source"], "cache");
    assert_eq!(hit.meta()["cacheKey"], stored.body["cacheKey"]);
    assert_eq!(hit.header("x-cache"), "HIT");
    assert_eq!(hit.header("cache-control"), "private, no-transform");
    assert_eq!(hit.names(), ["meta", "delta", "done"]);
    assert_eq!(hit.done()["source"], "cache");
    assert_eq!(
        hit.done(),
        &stored
            .body
            .as_object()
            .map(|body| {
                let mut body = body.clone();
                body.insert("source".into(), "cache".into());
                Value::Object(body)
            })
            .expect("an object"),
        "done is the body a plain request gets"
    );
    assert_eq!(app.llm_calls(), 1);
}

#[tokio::test]
async fn bad_input_is_a_json_error_not_a_stream() {
    let app = spawn_app(SimConfig::default(), &[]).await;
    let mut body = profile(5);
    body["percentages"] = serde_json::json!({"Lyra": "lots"});
    let refused =
        crate::helpers::read_stream(app.client.post(app.url("/narrative")).json(&body)).await;
    assert_eq!(refused.status, 400);
    assert!(refused
        .header("content-type")
        .starts_with("application/json"));
    let cached_only = crate::helpers::read_stream(
        app.client
            .post(app.url("/narrative"))
            .header("cache-control", "only-if-cached")
            .json(&profile(6)),
    )
    .await;
    assert_eq!(
        cached_only.status, 504,
        "only-if-cached with nothing stored"
    );
    assert_eq!(app.llm_calls(), 0);
}

/// The LLM breaks off after three chunks: every stream that saw its text is told to
/// forget it, then gets the template; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_broken_mid_stream_resets_to_the_template_and_stores_nothing() {
    let (sim, version) = (
        sim(SimConfig {
            latency_ms: 100,
            chunk_chars: 40,
            chunk_interval_ms: 100,
            fail_after_chunks: Some(3),
            ..SimConfig::default()
        })
        .await,
        unique_version("stream-broken"),
    );
    let vars = [
        ("REDIS_URL", test_kit::redis().url.as_str()),
        ("ENGINE_VERSION", version.as_str()),
    ];
    let a = spawn_app_with(sim.clone(), &vars).await;
    let b = spawn_app_with(sim.clone(), &vars).await;
    let body = profile(7);
    let streams =
        join_all((0..20).map(|i| if i % 2 == 0 { &a } else { &b }.stream_narrative(&body))).await;
    let mut took_back = 0;
    for stream in &streams {
        stream.assert_well_formed();
        assert_eq!(stream.done()["source"], "fallback", "{:?}", stream.events);
        assert!(stream.done()["model"]
            .as_str()
            .is_some_and(|m| m.starts_with("template")));
        // A stream that saw the partial text was told to forget it; one whose relay
        // read the text and its reset at once saw neither.
        let names = stream.names();
        match names.iter().position(|name| *name == "reset") {
            Some(reset_at) => {
                assert!(
                    names[..reset_at].contains(&"delta"),
                    "text came before the reset"
                );
                took_back += 1;
            }
            None => assert_eq!(names.len(), 3, "the template alone: {names:?}"),
        }
    }
    assert!(
        took_back > 0,
        "the partial text reached streams and was reset"
    );
    assert_eq!(
        sim.sim.stats().requests,
        1,
        "not retried after text was sent"
    );
    for app in [&a, &b] {
        assert!(!app.is_stored(&body).await, "nothing partial was stored");
    }
}

/// A real gateway process generates (and streams) the key; streams of it on another
/// gateway follow through Redis. The generating process is SIGKILLed mid-stream: the
/// other gateway's streams still end with `done`, with a whole narrative (a
/// takeover's, after a reset) or the template, never with the truncated text; and the
/// key is stored afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_outlive_a_generating_gateway_killed_mid_stream() {
    let (sim, version) = (
        sim(SimConfig {
            latency_ms: 100,
            chunk_chars: 30,
            chunk_interval_ms: 150,
            ..SimConfig::default()
        })
        .await,
        unique_version("stream-killed"),
    );
    let redis = test_kit::redis().url.clone();
    let lock = [("LOCK_TTL", "1s")];
    let (mut holder, holder_url) = spawn_process(&sim, &redis, &version, &lock).await;
    let vars = [
        ("REDIS_URL", redis.as_str()),
        ("ENGINE_VERSION", version.as_str()),
        ("LOCK_TTL", "1s"),
        // The takeover streams a whole narrative (about 4.5 s from this simulator)
        // after the dead holder's lock expires: on a loaded machine that outlasts the
        // default wait, and the followers would get the template. This test is about
        // the takeover, not the wait.
        ("GENERATION_WAIT_MS", "30000"),
    ];
    let other = spawn_app_with(sim.clone(), &vars).await;
    let body = profile(8);

    // The process takes the key (its stream is the first), the other gateway's
    // requests follow it.
    let client = reqwest::Client::new();
    let first = tokio::spawn(crate::helpers::read_stream(
        client.post(format!("{holder_url}/narrative")).json(&body),
    ));
    test_kit::eventually(
        "the process to call the LLM",
        Duration::from_secs(10),
        || async { sim.sim.stats().requests == 1 },
    )
    .await;
    let followers = tokio::spawn({
        let (client, url, body) = (other.client.clone(), other.url("/narrative"), body.clone());
        async move {
            join_all((0..10).map(|_| crate::helpers::read_stream(client.post(&url).json(&body))))
                .await
        }
    });
    // Killed once its text has begun to reach the other gateway.
    let key = other.post_json("/narrative/key", &body).await.key();
    test_kit::eventually(
        "text of the key in its live stream",
        Duration::from_secs(10),
        || {
            let command = format!("XLEN {}", key.live_key());
            async move {
                let reply = test_kit::redis_inline(test_kit::redis().port(), &command);
                reply
                    .trim()
                    .trim_start_matches(':')
                    .parse::<u64>()
                    .unwrap_or(0)
                    >= 3
            }
        },
    )
    .await;
    holder.0.kill().expect("SIGKILL");
    let _ = holder.0.wait();
    drop(first);

    let followers = followers.await.expect("followers");
    for stream in &followers {
        stream.assert_well_formed();
        let done = stream.done();
        let narrative = done["narrative"].as_str().expect("narrative");
        // The other gateway takes the key over once the dead holder's lock expires:
        // its own text, after a reset of the dead holder's.
        assert_eq!(done["source"], "generated", "{:?}", stream.events);
        assert!(stream.resets() >= 1, "{:?}", stream.names());
        assert!(narrative.len() > 300, "a whole narrative: {narrative:?}");
    }
    test_kit::eventually(
        "the key stored after the takeover",
        Duration::from_secs(20),
        || other.is_stored(&body),
    )
    .await;
    assert_eq!(
        sim.sim.stats().requests,
        2,
        "the dead holder's call and one takeover"
    );
}

/// `Prefer: respond-async` answers 202; an `EventSource` on its `Location` follows the
/// generation live, on the gateway that started it and on another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_202_location_streams_the_generation_live_on_any_gateway() {
    let (sim, version) = (sim(slow_stream()).await, unique_version("stream-location"));
    let vars = [
        ("REDIS_URL", test_kit::redis().url.as_str()),
        ("ENGINE_VERSION", version.as_str()),
    ];
    let a = spawn_app_with(sim.clone(), &vars).await;
    let b = spawn_app_with(sim.clone(), &vars).await;
    let accepted = crate::helpers::respond_async(&a, &profile(9)).await;
    assert_eq!(accepted.status, 202);
    let location = accepted.header("location").to_owned();
    let (here, there) = tokio::join!(a.stream_get(&location), b.stream_get(&location));
    for stream in [&here, &there] {
        stream.assert_well_formed();
        assert_eq!(stream.meta()["source"], "generating");
        assert!(stream.deltas() >= 5, "live: {:?}", stream.names());
        assert_eq!(
            stream.done()["source"],
            "cache",
            "what a GET answers once stored"
        );
    }
    assert_eq!(here.text(), there.text());
    assert_eq!(sim.sim.stats().requests, 1);

    let stored = a.stream_get(&location).await;
    stored.assert_well_formed();
    assert_eq!(stored.meta()["source"], "cache");
    let unknown = b.post_json("/narrative/key", &profile(10)).await.key();
    let unknown = format!("/narrative/{}", unknown.to_path_segment());
    let missing = crate::helpers::read_stream(b.client.get(b.url(&unknown))).await;
    assert_eq!(missing.status, 404, "neither stored nor being generated");
}

/// A streamed answer is one request, with its outcome, behind the same door: the
/// client key is checked and the request counted like any other.
#[tokio::test]
async fn a_streamed_answer_is_one_request_behind_the_same_auth() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 5,
            ..SimConfig::default()
        },
        &[("API_KEYS", "web:web-key-0123456789ab")],
    )
    .await;
    let body = profile(11);
    let anonymous =
        crate::helpers::read_stream(app.client.post(app.url("/narrative")).json(&body)).await;
    assert_eq!(anonymous.status, 401, "no stream without a client key");
    let stream = |body: &Value| {
        crate::helpers::read_stream(
            app.client
                .post(app.url("/narrative"))
                .bearer_auth("web-key-0123456789ab")
                .json(body),
        )
    };
    let miss = stream(&body).await;
    miss.assert_well_formed();
    let hit = stream(&body).await;
    hit.assert_well_formed();
    assert_eq!(hit.meta()["source"], "cache");
    let analytics = app
        .client
        .get(app.url("/narrative/analytics"))
        .bearer_auth("web-key-0123456789ab")
        .send()
        .await
        .expect("request")
        .json::<Value>()
        .await
        .expect("json");
    assert_eq!(analytics["totalRequests"], 2, "{analytics}");
    assert_eq!(analytics["cacheHits"], 1);
    assert_eq!(analytics["cacheMisses"], 1);
}

/// No text within `GENERATION_WAIT_MS`: the template streams and `done` says
/// `fallback`, while the generation goes on and is stored for the next request.
#[tokio::test]
async fn without_text_in_time_the_template_streams_and_the_generation_is_stored() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 600,
            ..SimConfig::default()
        },
        &[("GENERATION_WAIT_MS", "200")],
    )
    .await;
    let body = profile(12);
    let late = app.stream_narrative(&body).await;
    late.assert_well_formed();
    assert_eq!(late.meta()["source"], "generating");
    assert_eq!(late.resets(), 0, "nothing was sent to take back");
    assert_eq!(late.done()["source"], "fallback");
    assert!(late.done()["model"]
        .as_str()
        .is_some_and(|m| m.starts_with("template")));
    test_kit::eventually("the generation stored", Duration::from_secs(10), || {
        app.is_stored(&body)
    })
    .await;
    let hit = app.stream_narrative(&body).await;
    assert_eq!(hit.done()["source"], "cache");
    assert_eq!(app.llm_calls(), 1);
}

/// Streaming `GET`s of a key generated on another gateway share one follow, and
/// follows count against `MAX_PENDING_GENERATIONS`: with a limit of one, twenty
/// streams of one key all stream, and a stream of a second key is answered 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_gets_of_a_key_generated_elsewhere_share_one_follow() {
    let (sim, version) = (sim(slow_stream()).await, unique_version("stream-follows"));
    let redis = test_kit::redis().url.clone();
    let vars = [
        ("REDIS_URL", redis.as_str()),
        ("ENGINE_VERSION", version.as_str()),
    ];
    let a = spawn_app_with(sim.clone(), &vars).await;
    let limited = [
        ("REDIS_URL", redis.as_str()),
        ("ENGINE_VERSION", version.as_str()),
        ("MAX_PENDING_GENERATIONS", "1"),
    ];
    let b = spawn_app_with(sim.clone(), &limited).await;
    let first = crate::helpers::respond_async(&a, &profile(13)).await;
    let second = crate::helpers::respond_async(&a, &profile(14)).await;
    assert_eq!((first.status, second.status), (202, 202));
    let (first, second) = (first.header("location"), second.header("location"));

    // The first stream of the first key starts b's one follow, and holds it.
    let opened = b
        .client
        .get(b.url(first))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("request");
    assert_eq!(opened.status(), 200);
    let other_key = b
        .client
        .get(b.url(second))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("request");
    assert_eq!(
        other_key.status(),
        202,
        "the limit holds for a second key's follow"
    );
    let same_key = join_all((0..19).map(|_| b.stream_get(first))).await;
    for stream in &same_key {
        stream.assert_well_formed();
        assert_eq!(
            stream.meta()["source"],
            "generating",
            "{:?}",
            stream.names()
        );
        assert_eq!(stream.done()["source"], "cache");
    }
    drop(opened);
}

/// A miss that asks for both `Prefer: respond-async` and an event stream streams: a
/// stream is the better way not to wait.
#[tokio::test]
async fn an_event_stream_wins_over_respond_async() {
    let app = spawn_app(
        SimConfig {
            latency_ms: 5,
            ..SimConfig::default()
        },
        &[],
    )
    .await;
    let streamed = crate::helpers::read_stream(
        app.client
            .post(app.url("/narrative"))
            .header("prefer", "respond-async")
            .json(&profile(15)),
    )
    .await;
    streamed.assert_well_formed();
    assert_eq!(streamed.done()["source"], "generated");
}

/// While the LLM has written nothing yet, an idle stream still carries a comment every
/// `KEEPALIVE` (15 s), so that proxies and browsers keep it open: read off the wire,
/// before the first token (this test waits those 15 seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_carries_a_keepalive_comment() {
    use futures::StreamExt as _;
    let app = spawn_app(
        SimConfig {
            latency_ms: 18_000,
            ..SimConfig::default()
        },
        &[("GENERATION_WAIT_MS", "60000"), ("LLM_TIMEOUT_MS", "60000")],
    )
    .await;
    let started = std::time::Instant::now();
    let response = app
        .client
        .post(app.url("/narrative"))
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .json(&profile(41))
        .send()
        .await
        .expect("stream");
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains(": keepalive") {
        let chunk = tokio::time::timeout(Duration::from_secs(20), body.next())
            .await
            .expect("something within 20 s")
            .expect("the stream stays open")
            .expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(14),
        "the first keepalive came after {waited:?}, not after 15 s of silence"
    );
    assert!(seen.contains("event: meta"), "{seen}");
    assert!(
        !seen.contains("event: delta"),
        "nothing written yet: {seen}"
    );
    drop(body);
    app.shutdown().await;
}
