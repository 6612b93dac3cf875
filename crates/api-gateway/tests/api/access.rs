//! Who may call what: the auth matrix, per-client rate limits, security headers.

use llm_sim::SimConfig;
use serde_json::json;

use crate::helpers::{profile, reply, spawn_app, Reply, TestApp, ADMIN};

const MOBILE: &str = "mobile-key-0123456789";

async fn call(app: &TestApp, path: &str, token: Option<&str>, body: &serde_json::Value) -> Reply {
    let mut request = app.client.post(app.url(path)).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    reply(request.send().await.expect("request")).await
}

#[tokio::test]
async fn the_auth_matrix() {
    let keys = format!("mobile:{MOBILE},web:web-key-0123456789ab");
    let app = spawn_app(
        SimConfig::default(),
        &[("API_KEYS", keys.as_str()), ("ADMIN_TOKEN", ADMIN)],
    )
    .await;
    let narrative = profile(1);
    let prewarm = json!({"top": 1});
    // (token, client route status, admin route status)
    let matrix = [
        (None, 401, 401),
        (Some("wrong-key-0123456789"), 401, 401),
        (Some(MOBILE), 200, 403),
        (Some(ADMIN), 200, 202),
    ];
    for (token, client_status, admin_status) in matrix {
        let client = call(&app, "/narrative", token, &narrative).await;
        assert_eq!(
            client.status, client_status,
            "{token:?} on a client route: {}",
            client.body
        );
        let admin = call(&app, "/narrative/prewarm", token, &prewarm).await;
        assert_eq!(
            admin.status, admin_status,
            "{token:?} on an admin route: {}",
            admin.body
        );
        if client_status == 401 {
            assert_eq!(client.body["error"]["code"], "unauthorized");
            assert_eq!(client.header("www-authenticate"), "Bearer");
        }
        if admin_status == 403 {
            assert_eq!(admin.body["error"]["code"], "forbidden");
        }
    }
    // Every client route is covered, not just POST /narrative.
    for path in ["/narrative/stats", "/narrative/analytics"] {
        assert_eq!(app.get(path).await.status, 401, "{path}");
    }
    assert_eq!(
        call(&app, "/narrative/key", None, &narrative).await.status,
        401
    );
    // Operator routes need nothing.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(app.get(path).await.status, 200, "{path}");
    }
    let metrics = app.get("/metrics").await.body;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(
        metrics.contains("narrative_client_requests_total{client=\"mobile\"} 1"),
        "the client's name is in the metrics"
    );
    assert!(!metrics.contains(MOBILE) && !metrics.contains(ADMIN));
    app.shutdown().await;
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let keys = format!("mobile:{MOBILE},web:web-key-0123456789ab");
    let app = spawn_app(
        SimConfig::default(),
        &[
            ("API_KEYS", keys.as_str()),
            ("RATE_LIMIT_RPS", "0.2"),
            ("RATE_LIMIT_BURST", "2"),
        ],
    )
    .await;
    let body = profile(2);
    for _ in 0..2 {
        assert_eq!(
            call(&app, "/narrative", Some(MOBILE), &body).await.status,
            200
        );
    }
    let limited = call(&app, "/narrative", Some(MOBILE), &body).await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.body["error"]["code"], "rate_limited");
    // One token every 5 s: the client is told to come back in 5.
    assert_eq!(limited.header("retry-after"), "5");
    let other = call(&app, "/narrative", Some("web-key-0123456789ab"), &body).await;
    assert_eq!(other.status, 200, "buckets are per client");
    app.shutdown().await;
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let app = spawn_app(SimConfig::default(), &[]).await;
    let answers = [
        app.post_narrative(&profile(3)).await,
        app.get("/no-such-route").await,
        app.post_raw("/narrative", "text/plain", "{}").await,
        app.get("/healthz").await,
    ];
    for answer in &answers {
        assert_eq!(answer.header("x-content-type-options"), "nosniff");
        assert_eq!(answer.header("x-frame-options"), "DENY");
        assert_eq!(
            answer.header("content-security-policy"),
            "default-src 'none'; frame-ancestors 'none'"
        );
        assert_eq!(answer.header("referrer-policy"), "no-referrer");
    }
    assert_eq!(
        answers[1].header("cache-control"),
        "no-store",
        "errors are not kept"
    );
    app.shutdown().await;
}
