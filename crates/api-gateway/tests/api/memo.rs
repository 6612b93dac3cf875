//! The body memo (`service/memo.rs`) answers exactly what deriving answers: for any
//! bodies, whatever was memoized before, and never across settings that change the
//! canonical form.

use api_gateway::{App, Settings};
use axum::body::Bytes;
use cache_core::config::Vars;
use cache_core::ProfileInput;
use proptest::prelude::*;

fn service(vars: &[(&str, &str)]) -> std::sync::Arc<api_gateway::service::NarrativeService> {
    let mut pairs = vec![("CACHE_KEY_SECRET", "memo-secret-0123456789")];
    pairs.extend_from_slice(vars);
    let settings = Settings::from_vars(&Vars::from_pairs(pairs)).expect("settings");
    std::sync::Arc::clone(&App::build(settings).expect("app").state().service)
}

/// What deriving `body` gives without the memo: key, canonical bytes, user hash, or
/// the error's field.
fn fresh(
    service: &api_gateway::service::NarrativeService,
    body: &[u8],
) -> Result<(String, String, Option<String>), String> {
    let input = ProfileInput::from_json(body).map_err(|e| e.field)?;
    let keyed = service.derive(&input).map_err(|e| e.field)?;
    let user = input
        .user_id
        .as_deref()
        .map(|id| service.deriver().user_hash(id));
    Ok((
        keyed.key.to_string(),
        keyed.canonical_json.to_string(),
        user,
    ))
}

fn memoized(
    service: &api_gateway::service::NarrativeService,
    body: &[u8],
) -> Result<(String, String, Option<String>), String> {
    let derived = service
        .derive_body(&Bytes::copy_from_slice(body))
        .map_err(|e| e.field)?;
    Ok((
        derived.keyed.key.to_string(),
        derived.keyed.canonical_json.to_string(),
        derived.user_hash.as_deref().map(str::to_owned),
    ))
}

/// Profiles that differ in small ways (a share, a system, the user, the spacing), and
/// now and then one that is not valid.
fn body() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec!["Lyra", "Sirius", "Pleiades", "Arcturus"]),
        0u32..200,
        prop::option::of(prop::sample::select(vec!["u-1", "u-2"])),
        prop::bool::ANY,
        prop::sample::select(vec!["Generator", "Projector", "Nobody"]),
    )
        .prop_map(|(primary, tenths, user, spaced, kind)| {
            let share = 50.0 + f64::from(tenths) / 10.0;
            let mut profile = serde_json::json!({
                "classification": "primary",
                "primary": primary,
                "percentages": {primary: share, "Orion": 100.0 - share},
                "hdData": {"type": kind, "authority": "Sacral", "profile": "1/3"},
            });
            if let Some(user) = user {
                profile["userId"] = user.into();
            }
            if spaced {
                serde_json::to_vec_pretty(&profile).expect("json")
            } else {
                serde_json::to_vec(&profile).expect("json")
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_memo_answers_what_deriving_answers(bodies in prop::collection::vec(body(), 1..12)) {
        let service = service(&[]);
        // Twice over: the second round answers from the memo.
        for body in bodies.iter().chain(bodies.iter()) {
            prop_assert_eq!(memoized(&service, body), fresh(&service, body));
        }
    }

    #[test]
    fn a_memo_never_answers_for_other_settings(body in body()) {
        let base = service(&[]);
        let _ = memoized(&base, &body);
        for other in [
            service(&[("QUANTIZATION_STEP", "1")]),
            service(&[("ENGINE_VERSION", "narrative@2.0.0")]),
            service(&[("CACHE_KEY_SECRET", "another-secret-0123456789")]),
        ] {
            prop_assert_eq!(memoized(&other, &body), fresh(&other, &body));
        }
    }
}

/// A memo entry keeps the answer it last sent, rendered: once the stored entry is
/// replaced, a hit from the same body sends the new entry, never the bytes kept for
/// the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_after_its_entry_is_replaced_sends_the_new_entry() {
    let app = crate::helpers::spawn_app(
        llm_sim::SimConfig {
            latency_ms: 20,
            ..llm_sim::SimConfig::default()
        },
        &[("REVALIDATE_MIN_INTERVAL", "0s")],
    )
    .await;
    let body = crate::helpers::profile(1);
    let generated = app.post_narrative(&body).await;
    assert_eq!(generated.source(), "generated");
    // Twice: the first hit renders and keeps its body, the second sends it.
    for _ in 0..2 {
        let hit = app.post_narrative(&body).await;
        assert_eq!(hit.source(), "cache");
        assert_eq!(hit.body["generatedAt"], generated.body["generatedAt"]);
    }

    let request = app
        .client
        .post(app.url("/narrative"))
        .header("cache-control", "no-cache")
        .json(&body);
    let replaced = crate::helpers::reply(request.send().await.expect("send")).await;
    assert_eq!(replaced.source(), "generated");
    assert_ne!(
        replaced.body["generatedAt"], generated.body["generatedAt"],
        "a new entry"
    );

    let hit = app.post_narrative(&body).await;
    assert_eq!(hit.source(), "cache");
    assert_eq!(
        hit.body["generatedAt"], replaced.body["generatedAt"],
        "the new entry's body, not the one kept for the old entry"
    );
    assert_eq!(app.llm_calls(), 2);
}
