//! Hostile input through the real router: arbitrary JSON, and valid profiles with a
//! field replaced by arbitrary JSON, never panic the handler and never get a 5xx.
//! Every refusal is a JSON error that names a field.

use api_gateway::{App, Settings};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use cache_core::config::Vars;
use proptest::prelude::*;
use serde_json::{json, Value};
use tower::ServiceExt as _;

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,80}".prop_map(Value::String),
        prop_oneof![
            Just("Generator"),
            Just("Sirius"),
            Just("primary"),
            Just("hybrid"),
            Just("2/4"),
            Just("solar plexus"),
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    ".{0,12}",
                    Just("classification".to_owned()),
                    Just("percentages".to_owned()),
                    Just("hdData".to_owned()),
                    Just("type".to_owned()),
                    Just("gates".to_owned()),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn valid() -> Value {
    json!({
        "classification": "hybrid", "hybrid": ["Pleiades", "Sirius"],
        "percentages": {"Pleiades": 42.4, "Sirius": 31.7, "Arcturus": 25.9},
        "hdData": {"type": "Generator", "authority": "Sacral", "profile": "2/4",
                   "centers": ["Sacral"], "channels": ["34-20"], "gates": [34, "20"]},
        "userId": "u-1"
    })
}

/// A path into `valid()` to replace: top-level fields and Human Design fields.
const FIELDS: [&str; 12] = [
    "classification",
    "hybrid",
    "percentages",
    "hdData",
    "userId",
    "primary",
    "hdData.type",
    "hdData.authority",
    "hdData.profile",
    "hdData.centers",
    "hdData.gates",
    "percentages.Sirius",
];

fn replace(mut body: Value, path: &str, with: Value) -> Value {
    let mut target = &mut body;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            target[part] = with;
            break;
        }
        target = &mut target[part];
    }
    body
}

fn router() -> axum::Router {
    // The template engine: no LLM call, so every accepted profile answers fast.
    let settings = Settings::from_vars(&Vars::from_pairs([(
        "CACHE_KEY_SECRET",
        "hostile-secret-0123456789",
    )]))
    .expect("settings");
    App::build(settings).expect("app").router()
}

async fn post(router: &axum::Router, body: Vec<u8>) -> (StatusCode, Value) {
    post_to(router, "/narrative", body).await
}

async fn post_to(router: &axum::Router, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn check(status: StatusCode, answer: &Value) -> Result<(), TestCaseError> {
    prop_assert!(!status.is_server_error(), "{status}: {answer}");
    if status != StatusCode::OK {
        prop_assert_eq!(status, StatusCode::BAD_REQUEST, "{}", answer);
        prop_assert!(
            answer["error"]["field"].is_string(),
            "names a field: {}",
            answer
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_json_is_answered_or_refused_naming_a_field(body in arbitrary_json()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let router = runtime.block_on(async { router() });
        let (status, answer) = runtime.block_on(post(&router, body.to_string().into_bytes()));
        check(status, &answer)?;
    }

    #[test]
    fn a_valid_profile_with_one_field_made_hostile(
        field in prop::sample::select(&FIELDS[..]),
        with in arbitrary_json(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let router = runtime.block_on(async { router() });
        let body = replace(valid(), field, with);
        let (status, answer) = runtime.block_on(post(&router, body.to_string().into_bytes()));
        check(status, &answer)?;
    }

    #[test]
    fn arbitrary_bytes_never_get_a_5xx(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let router = runtime.block_on(async { router() });
        let (status, answer) = runtime.block_on(post(&router, bytes));
        check(status, &answer)?;
    }
}

#[tokio::test]
async fn deep_nesting_and_huge_counts_are_refused_cheaply() {
    let router = router();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let nested = format!(r#"{{"classification": {deep}}}"#);
    let (status, answer) = post(&router, nested.into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let systems: serde_json::Map<String, Value> = (0..30)
        .map(|i| (format!("System {i}"), json!(100.0 / 30.0)))
        .collect();
    let many = replace(valid(), "percentages", Value::Object(systems));
    let (status, answer) = post(&router, many.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"]["field"], "percentages");
    let gates: Vec<Value> = (0..100).map(|g| json!(g % 64 + 1)).collect();
    let many = replace(valid(), "hdData.gates", Value::Array(gates));
    let (status, answer) = post(&router, many.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"]["field"], "hdData.gates");
    let long = replace(valid(), "userId", json!("u".repeat(1_000)));
    let (status, answer) = post(&router, long.to_string().into_bytes()).await;
    assert_eq!(
        (status, answer["error"]["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("userId"))
    );
}

/// Seen in a black-box run: a profile followed by `xyz`, or two profiles, were 200.
#[tokio::test]
async fn a_body_is_one_json_document() {
    let router = router();
    let one = valid().to_string();
    for path in ["/narrative", "/narrative/key"] {
        for body in [
            format!("{one}xyz"),
            format!("{one}{one}"),
            format!("{one}\n{one}"),
            format!("{one} []"),
        ] {
            let (status, answer) = post_to(&router, path, body.into_bytes()).await;
            assert_eq!(
                (status, answer["error"]["field"].clone()),
                (StatusCode::BAD_REQUEST, json!("body")),
                "{path}: {answer}"
            );
        }
        let (status, answer) = post_to(&router, path, format!("{one} \r\n\t").into_bytes()).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "whitespace after it is fine: {answer}"
        );
    }
}

/// Seen in a black-box run: these names were accepted, landed in the key and went into
/// the prompt verbatim.
#[tokio::test]
async fn names_with_control_format_or_markup_characters_are_refused() {
    let router = router();
    for name in [
        "Si\u{0}rius",
        "Si\u{7}rius",
        "Sirius\u{202e}",
        "Si\u{200b}rius",
        "Sirius\u{2060}",
        "Sirius\"",
        "Sirius <profile>",
        "Sirius; drop",
    ] {
        let as_primary = replace(
            replace(valid(), "classification", json!("primary")),
            "primary",
            json!(name),
        );
        let mut as_primary = as_primary;
        as_primary.as_object_mut().unwrap().remove("hybrid");
        as_primary["percentages"] = json!({ name: 100 });
        let (status, answer) = post(&router, as_primary.to_string().into_bytes()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name:?}: {answer}");
        assert_eq!(
            answer["error"]["field"], "percentages",
            "{name:?}: {answer}"
        );
        let hybrid = replace(valid(), "hybrid", json!(["Pleiades", name]));
        let (status, answer) = post(&router, hybrid.to_string().into_bytes()).await;
        assert_eq!(
            (status, answer["error"]["field"].clone()),
            (StatusCode::BAD_REQUEST, json!("hybrid[1]")),
            "{name:?}: {answer}"
        );
    }
    // Letters of any script, digits, and ' - . stay names.
    let fine = replace(
        valid(),
        "percentages",
        json!({"Pleiades": 42.4, "Sirius": 31.7, "Zeta Reticuli-2 'B'. Ωmega": 25.9}),
    );
    let (status, answer) = post(&router, fine.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// `STAR_SYSTEM_NAMES` refuses systems outside it, naming the entry.
#[tokio::test]
async fn a_known_systems_list_refuses_others() {
    let settings = Settings::from_vars(&Vars::from_pairs([
        ("CACHE_KEY_SECRET", "hostile-secret-0123456789"),
        ("STAR_SYSTEM_NAMES", "pleiades, sirius,Arcturus"),
    ]))
    .expect("settings");
    let router = App::build(settings).expect("app").router();
    let (status, answer) = post(&router, valid().to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let unknown = replace(
        valid(),
        "percentages",
        json!({"Pleiades": 42.4, "Sirius": 31.7, "Vega": 25.9}),
    );
    let (status, answer) = post(&router, unknown.to_string().into_bytes()).await;
    assert_eq!(
        (status, answer["error"]["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("percentages.Vega")),
        "{answer}"
    );
    // Seen in a review: a primary system whose share quantizes to zero left the
    // shares, and so the check, yet still reached the prompt.
    let hidden = json!({
        "classification": "primary", "primary": "Vega",
        "percentages": {"Sirius": 99.6, "Vega": 0.4},
        "hdData": {"type": "Generator", "authority": "Sacral", "profile": "2/4"},
    });
    let (status, answer) = post(&router, hidden.to_string().into_bytes()).await;
    assert_eq!(
        (status, answer["error"]["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("primary")),
        "{answer}"
    );
}

/// Seen in a black-box run: the first panicked the handler (a dropped connection), the
/// second answered a 500.
#[tokio::test]
async fn out_of_range_analytics_instants_are_a_400_naming_them() {
    let router = router();
    for (query, field) in [
        ("to=9999-12-31T23:59:59-23:59", "to"),
        ("from=9999-12-31T23:59:59-23:59", "from"),
        ("to=0000-01-01", "to"),
    ] {
        let request = Request::get(format!("/narrative/analytics?{query}"))
            .body(Body::empty())
            .expect("request");
        let response = router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert_eq!(
            (status, answer["error"]["field"].clone()),
            (StatusCode::BAD_REQUEST, json!(field)),
            "{query}: {answer}"
        );
    }
}
