use llm_sim::SimConfig;
use serde_json::json;

use crate::helpers::{profile, reply, spawn_app};

#[tokio::test]
async fn bad_profiles_are_400_naming_the_field() {
    let app = spawn_app(SimConfig::default(), &[]).await;
    let mut cases = Vec::new();
    let mut unknown = profile(1);
    unknown["birthDate"] = "1990-01-01".into();
    cases.push((unknown, "birthDate"));
    let mut nested = profile(1);
    nested["hdData"]["birthPlace"] = "Paris".into();
    cases.push((nested, "hdData.birthPlace"));
    let mut bad_sum = profile(1);
    bad_sum["percentages"]["Sirius"] = json!(5);
    cases.push((bad_sum, "percentages"));
    let mut bad_type = profile(1);
    bad_type["hdData"]["type"] = "Wizard".into();
    cases.push((bad_type, "hdData.type"));
    let mut wrong_kind = profile(1);
    wrong_kind["percentages"]["Sirius"] = "a lot".into();
    cases.push((wrong_kind, "percentages.Sirius"));
    cases.push((json!([1, 2]), "body"));

    for (body, field) in cases {
        let reply = app.post_narrative(&body).await;
        assert_eq!(reply.status, 400, "{body}");
        assert_eq!(reply.body["error"]["code"], "invalid_profile");
        assert_eq!(reply.body["error"]["field"], field, "{body}");
        assert!(reply.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(app.llm_calls(), 0);
}

#[tokio::test]
async fn body_limits_media_type_and_unknown_routes_answer_json() {
    let app = spawn_app(SimConfig::default(), &[]).await;
    let big = format!("{{\"classification\":\"{}\"}}", "x".repeat(70 * 1024));
    let too_large = app.post_raw("/narrative", "application/json", big).await;
    assert_eq!(too_large.status, 413);
    assert_eq!(too_large.body["error"]["code"], "payload_too_large");

    let not_json = app.post_raw("/narrative", "text/plain", "{}").await;
    assert_eq!(not_json.status, 415);
    assert_eq!(not_json.body["error"]["code"], "unsupported_media_type");

    let malformed = app
        .post_raw("/narrative", "application/json", "{\"classification\": ")
        .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.body["error"]["field"], "body");

    let bad_key = app.get("/narrative/not-a-key").await;
    assert_eq!(bad_key.status, 400);
    assert_eq!(bad_key.body["error"]["field"], "key");

    assert_eq!(app.get("/no/such/route").await.status, 404);
    let wrong_method = reply(
        app.client
            .delete(app.url("/narrative/stats"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.body["error"]["code"], "method_not_allowed");
}
