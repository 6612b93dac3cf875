//! HTTP-level fuzzing of the real router (embedded mode, `tower::ServiceExt::oneshot`
//! on the built app): generated methods, paths, query strings, headers and bodies
//! (mutations of valid profiles: wrong types, huge and deep values, odd Unicode,
//! duplicated keys, trailing bytes). Every answer is a JSON error with a 4xx (or the
//! 504 `only-if-cached` asks for), or a well-formed answer; never another 5xx, never
//! a panic.
//!
//! 2,000 cases in the test command; `scripts/fuzz.sh http [cases]` runs more
//! (`HTTP_FUZZ_CASES`). With `HTTP_FUZZ_SHOW` set (and `--nocapture`) each case prints
//! its status, method and path, to see where the cases land: most must reach the
//! handlers, not stop at authentication or routing.

use std::sync::OnceLock;

use api_gateway::{App, Settings};
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use cache_core::config::Vars;
use proptest::prelude::*;
use serde_json::Value;
use tower::ServiceExt as _;

const ADMIN: &str = "fuzz-admin-token-0123456789";
const CLIENT: &str = "fuzz-client-key-0123456789";

fn cases() -> u32 {
    std::env::var("HTTP_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

/// One runtime and one app for every case: building an app per case would be most of
/// the run.
fn app() -> &'static (tokio::runtime::Runtime, axum::Router) {
    static APP: OnceLock<(tokio::runtime::Runtime, axum::Router)> = OnceLock::new();
    APP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let router = runtime.block_on(async {
            let settings = Settings::from_vars(&Vars::from_pairs([
                ("CACHE_KEY_SECRET", "fuzz-secret-0123456789"),
                ("ADMIN_TOKEN", ADMIN),
                ("API_KEYS", &format!("web:{CLIENT}")),
                ("RATE_LIMIT_RPS", "1000000"),
                // The template engine answers misses: no LLM to wait for.
                ("GENERATION_WAIT_MS", "50"),
            ]))
            .expect("settings");
            App::build(settings).expect("app").router()
        });
        (runtime, router)
    })
}

fn valid_profile() -> &'static str {
    r#"{"classification":"hybrid","hybrid":["Pleiades","Sirius"],"percentages":{"Pleiades":42.4,"Sirius":31.7,"Arcturus":25.9},"hdData":{"type":"Generator","authority":"Sacral","profile":"2/4","centers":["Sacral"],"channels":["34-20"],"gates":[34,"20"]},"userId":"u-1"}"#
}

/// Odd text: control and format characters, other scripts, emoji, lone escapes.
fn odd_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        Just("\u{0}".to_owned()),
        Just("Si\u{202e}rius".to_owned()),
        Just("Ple\u{200b}iades".to_owned()),
        Just("\u{feff}Vega".to_owned()),
        Just("🌟✨".to_owned()),
        Just("\\ud800".to_owned()),
        Just("x".repeat(70_000)),
        "[\\p{Cc}\\p{Cf}\\p{Zs}]{1,8}",
    ]
}

/// A JSON value of any shape, rendered as text.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() {
            f.to_string()
        } else {
            "1e999".to_owned()
        }),
        Just("-0".to_owned()),
        Just("1e308".to_owned()),
        odd_text().prop_map(|s| Value::String(s).to_string()),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((odd_text(), inner), 0..5).prop_map(|fields| {
                let fields: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", Value::String(k)))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// A valid profile with one field's value replaced, one field duplicated (raw JSON
/// can say a key twice), or bytes added after it; or any JSON at all.
fn body() -> impl Strategy<Value = Vec<u8>> {
    const FIELDS: [&str; 7] = [
        "classification",
        "hybrid",
        "percentages",
        "hdData",
        "userId",
        "primary",
        "extra",
    ];
    prop_oneof![
        // As valid as sent, under whatever headers the case has.
        3 => Just(valid_profile().as_bytes().to_vec()),
        // A system named oddly, everywhere it is named.
        2 => odd_text().prop_map(|name| {
            let name = Value::String(name).to_string();
            valid_profile().replace("\"Sirius\"", &name).into_bytes()
        }),
        1 => (prop::sample::select(&FIELDS[..]), json_text()).prop_map(|(field, value)| {
            let mut profile: serde_json::Map<String, Value> =
                serde_json::from_str(valid_profile()).expect("valid");
            profile.remove(field);
            let rest = Value::Object(profile).to_string();
            format!("{{\"{field}\":{value},{}", &rest[1..]).into_bytes()
        }),
        1 => (prop::sample::select(&FIELDS[..]), json_text()).prop_map(|(field, value)| {
            // Said twice: once as sent, once replaced.
            format!("{{\"{field}\":{value},{}", &valid_profile()[1..]).into_bytes()
        }),
        1 => ".{0,16}".prop_map(|tail| format!("{}{tail}", valid_profile()).into_bytes()),
        1 => json_text().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => Just(format!("{}{}", "[".repeat(5_000), "]".repeat(5_000)).into_bytes()),
    ]
}

/// A route and its method, mostly ones that exist (so that cases reach handlers),
/// sometimes anything.
fn route() -> impl Strategy<Value = (Method, String)> {
    let key = || {
        prop_oneof![
            Just("narr:narrative@1.0.0:0123456789ab:{".to_owned() + &"ab".repeat(32) + "}"),
            "[a-z0-9:{}%@.]{0,80}",
            odd_text().prop_map(|s| s.chars().filter(|c| !c.is_control() && *c != ' ').collect()),
        ]
        .prop_map(|k| urlencode(&k))
    };
    let known = prop_oneof![
        6 => Just((Method::POST, "/narrative".to_owned())),
        2 => Just((Method::POST, "/narrative/key".to_owned())),
        1 => Just((Method::POST, "/narrative/prewarm".to_owned())),
        1 => Just((Method::GET, "/narrative/stats".to_owned())),
        2 => Just((Method::GET, "/narrative/analytics".to_owned())),
        1 => Just((Method::GET, "/healthz".to_owned())),
        1 => Just((Method::GET, "/readyz".to_owned())),
        1 => Just((Method::GET, "/metrics".to_owned())),
        2 => key().prop_map(|k| (Method::GET, format!("/narrative/{k}"))),
        1 => key().prop_map(|k| (Method::DELETE, format!("/narrative/user/{k}"))),
        1 => key().prop_map(|k| (Method::GET, format!("/narrative/prewarm/{k}"))),
    ];
    let anything = (
        prop::sample::select(vec![Method::GET, Method::POST, Method::DELETE, Method::PUT]),
        "/[a-z/]{0,30}",
    );
    prop_oneof![5 => known, 1 => anything]
}

fn query() -> impl Strategy<Value = String> {
    let instant = prop_oneof![
        Just("9999-12-31T23:59:59-23:59".to_owned()),
        Just("0000-01-01".to_owned()),
        Just("2026-11-25".to_owned()),
        Just("2026-13-45T99:99:99Z".to_owned()),
        "[0-9T:Z+-]{0,30}",
        odd_text(),
    ];
    prop_oneof![
        Just(String::new()),
        (instant.clone(), instant).prop_map(|(from, to)| format!(
            "?from={}&to={}",
            urlencode(&from),
            urlencode(&to)
        )),
        "[a-z=&%0-9]{0,40}".prop_map(|q| format!("?{q}")),
    ]
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("no-cache".to_owned()),
        Just("no-store".to_owned()),
        Just("only-if-cached".to_owned()),
        Just("max-age=0, stale-if-error=18446744073709551616".to_owned()),
        Just("respond-async, wait=99999999999".to_owned()),
        Just("application/json".to_owned()),
        Just("application/json; charset=latin1".to_owned()),
        Just("text/plain".to_owned()),
        Just(format!("Bearer {CLIENT}")),
        Just(format!("Bearer {ADMIN}")),
        Just("Bearer ".to_owned()),
        Just("Basic Zm9vOmJhcg==".to_owned()),
        "[ -~]{0,60}",
    ]
}

/// The request: a method, a path and query, up to six headers, and a body.
#[derive(Debug, Clone)]
struct Case {
    method: Method,
    uri: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn case() -> impl Strategy<Value = Case> {
    const HEADERS: [&str; 6] = [
        "cache-control",
        "prefer",
        "accept",
        "authorization",
        "content-type",
        "x-request-id",
    ];
    // Mostly a caller who gets past authentication and a JSON body, so that most
    // cases reach the handlers; the rest try everything else.
    let auth = prop_oneof![
        4 => Just(Some(format!("Bearer {CLIENT}"))),
        1 => Just(Some(format!("Bearer {ADMIN}"))),
        1 => header_value().prop_map(Some),
        1 => Just(None),
    ];
    let content_type = prop_oneof![
        5 => Just(Some("application/json".to_owned())),
        1 => header_value().prop_map(Some),
        1 => Just(None),
    ];
    (
        route(),
        query(),
        (auth, content_type),
        prop::collection::vec((prop::sample::select(&HEADERS[..]), header_value()), 0..4),
        body(),
    )
        .prop_map(
            |((method, path), query, (auth, content_type), more, body)| {
                let mut headers: Vec<(&'static str, String)> = Vec::new();
                headers.extend(auth.map(|value| ("authorization", value)));
                headers.extend(content_type.map(|value| ("content-type", value)));
                headers.extend(more);
                Case {
                    method,
                    uri: format!("{path}{query}"),
                    headers,
                    body,
                }
            },
        )
}

async fn send(router: &axum::Router, case: &Case) -> Option<(StatusCode, String, Vec<u8>)> {
    let mut request = Request::builder()
        .method(case.method.clone())
        .uri(&case.uri);
    for (name, value) in &case.headers {
        request = request.header(*name, value);
    }
    // A URI or header the http crate refuses never reaches a server either.
    let request = request.body(Body::from(case.body.clone())).ok()?;
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    Some((status, content_type, bytes.to_vec()))
}

fn check(
    case: &Case,
    status: StatusCode,
    content_type: &str,
    body: &[u8],
) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(body);
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if status.is_server_error() {
        // Only what a client asks for with only-if-cached.
        prop_assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{:?}: {}", case, text);
        prop_assert_eq!(
            json.as_ref().map(|j| j["error"]["code"].clone()),
            Some(Value::from("not_cached")),
            "{:?}: {}",
            case,
            text
        );
        return Ok(());
    }
    if status.is_client_error() {
        let json = json.ok_or_else(|| {
            TestCaseError::fail(format!("{case:?}: a {status} that is not JSON: {text}"))
        })?;
        prop_assert!(json["error"]["code"].is_string(), "{:?}: {}", case, text);
        prop_assert!(json["error"]["message"].is_string(), "{:?}: {}", case, text);
        return Ok(());
    }
    // A success: JSON (a narrative answer carries its narrative), or the metrics text.
    if content_type.starts_with("text/plain") {
        return Ok(());
    }
    let json = json.ok_or_else(|| {
        TestCaseError::fail(format!("{case:?}: a {status} that is not JSON: {text}"))
    })?;
    let narrative_route = case.uri.starts_with("/narrative?") || case.uri == "/narrative";
    if narrative_route && case.method == Method::POST && status == StatusCode::OK {
        prop_assert!(
            json["narrative"].as_str().is_some_and(|n| !n.is_empty()),
            "{:?}: {}",
            case,
            text
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn every_request_is_answered_with_json_and_never_a_5xx(case in case()) {
        let (runtime, router) = app();
        if let Some((status, content_type, body)) = runtime.block_on(send(router, &case)) {
            if std::env::var("HTTP_FUZZ_SHOW").is_ok() {
                eprintln!("STATUS {} {} {}", status.as_u16(), case.method, case.uri.split('?').next().unwrap_or(""));
            }
            check(&case, status, &content_type, &body)?;
        }
    }
}
