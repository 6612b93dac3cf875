//! What `deploy/` ships is checked against the code: every SQL query of the Grafana
//! dashboards runs against the migrated schema with sample data and returns rows;
//! the Prometheus config and rules pass `promtool` (and its rule unit tests); every
//! metric the dashboards and alerts name is one the code exports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use analytics::event::{GenerationOutcome, RequestOutcome, Trigger};
use analytics::{new_event_id, Batch, GenerationEvent, PgStore, RequestEvent};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo().join("deploy/grafana/dashboards");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/grafana/dashboards") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("read");
            let json: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            found.push((path.display().to_string(), json));
        }
    }
    assert!(!found.is_empty(), "no dashboards in {}", dir.display());
    found
}

/// Every query target of every panel: (panel title, target).
fn targets(dashboard: &Value) -> Vec<(String, Value)> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            all.push((title.clone(), target.clone()));
        }
    }
    all
}

/// Grafana's Postgres macros, as Grafana expands them for the range `[from, to]`.
fn expand_macros(sql: &str, from: OffsetDateTime, to: OffsetDateTime) -> String {
    let (from, to) = (
        from.format(&Rfc3339).expect("format"),
        to.format(&Rfc3339).expect("format"),
    );
    let mut out = sql
        .replace("$__timeFrom()", &format!("'{from}'"))
        .replace("$__timeTo()", &format!("'{to}'"));
    while let Some(start) = out.find("$__timeFilter(") {
        let open = start + "$__timeFilter(".len();
        let close = open + out[open..].find(')').expect("closing parenthesis");
        let column = out[open..close].trim().to_owned();
        out.replace_range(
            start..=close,
            &format!("{column} BETWEEN '{from}' AND '{to}'"),
        );
    }
    out
}

fn sample(at: OffsetDateTime) -> Batch {
    let mut batch = Batch::new();
    let outcomes = RequestOutcome::ALL;
    batch.requests = (0..60)
        .map(|i| RequestEvent {
            id: new_event_id(),
            at,
            outcome: outcomes[i % outcomes.len()],
            latency_us: 50 + 97 * i as u64,
            engine_version: "narrative@1.0.0".into(),
            prompt_hash: "e589996ee664".into(),
            classification: if i % 3 == 0 { "hybrid" } else { "primary" }.into(),
            primary_system: ["Sirius", "Pleiades", "Lyra", "Orion"][i % 4].into(),
            client: "anonymous".into(),
            user_hash: Some(format!("{i:032x}").into()),
            key_digest: format!("{:064x}", i % 7).into(),
            profile: format!(
                r#"{{"classification":"primary","primary":"Sirius","n":{}}}"#,
                i % 7
            )
            .into(),
            entry_tokens: 700,
            entry_cost_usd: 0.0021,
            // Some of them streamed.
            first_delta_us: (i % 5 == 0).then_some(300_000 + 1_000 * i as u64),
        })
        .collect();
    batch.generations = (0..10)
        .map(|i| GenerationEvent {
            id: new_event_id(),
            at,
            model: "gpt-4o-mini".to_owned(),
            tokens_in: 400,
            tokens_out: 300,
            cost_usd: 0.0021,
            duration_ms: 1_000 + 100 * i,
            attempts: 1,
            outcome: if i == 0 {
                GenerationOutcome::Failed
            } else {
                GenerationOutcome::Ok
            },
            trigger: if i == 1 {
                Trigger::Prewarm
            } else {
                Trigger::Miss
            },
            key_digest: format!("{:064x}", i % 7),
        })
        .collect();
    batch
}

#[tokio::test]
async fn every_dashboard_query_runs_on_the_schema_and_returns_rows() {
    let url = test_kit::postgres().database("dashboards");
    let store = PgStore::connect_lazy(&url, 2, Duration::from_secs(5)).expect("store");
    store.migrate().await.expect("migrate");
    let now = OffsetDateTime::now_utc();
    store
        .ensure_partitions(now.date(), 1)
        .await
        .expect("partitions");
    for at in [
        now - time::Duration::days(1),
        now - time::Duration::minutes(5),
    ] {
        store.insert(&sample(at)).await.expect("sample data");
    }

    let (from, to) = (
        now - time::Duration::days(7),
        now + time::Duration::hours(1),
    );
    let mut checked = 0;
    for (file, dashboard) in dashboards() {
        for (title, target) in targets(&dashboard) {
            let Some(raw) = target["rawSql"].as_str() else {
                continue;
            };
            let sql = expand_macros(raw, from, to);
            assert!(
                !sql.contains("$__"),
                "{file}, {title}: a Grafana macro this test does not expand: {sql}"
            );
            let rows = sqlx::query(&sql)
                .fetch_all(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{file}, {title}: {e}\n{sql}"));
            assert!(!rows.is_empty(), "{file}, {title}: no rows\n{sql}");
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} SQL queries found");
}

/// The queries of `docs/analytics.md`: every `sql` block that reads (SELECT or WITH).
fn documented_queries() -> Vec<String> {
    let doc = std::fs::read_to_string(repo().join("docs/analytics.md")).expect("docs/analytics.md");
    let mut queries = Vec::new();
    let mut block: Option<String> = None;
    for line in doc.lines() {
        match (&mut block, line.trim()) {
            (None, "```sql") => block = Some(String::new()),
            (Some(text), "```") => {
                let upper = text.trim_start().to_ascii_uppercase();
                if upper.starts_with("SELECT") || upper.starts_with("WITH") {
                    queries.push(text.clone());
                }
                block = None;
            }
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    queries
}

#[tokio::test]
async fn the_documented_queries_run_and_return_rows() {
    let url = test_kit::postgres().database("documented");
    let store = PgStore::connect_lazy(&url, 2, Duration::from_secs(5)).expect("store");
    store.migrate().await.expect("migrate");
    let now = OffsetDateTime::now_utc();
    for at in [
        now - time::Duration::days(1),
        now - time::Duration::minutes(5),
    ] {
        store.insert(&sample(at)).await.expect("sample data");
    }
    let queries = documented_queries();
    assert_eq!(
        queries.len(),
        11,
        "docs/analytics.md promises eleven queries"
    );
    for sql in queries {
        let rows = sqlx::query(&sql)
            .fetch_all(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{e}\n{sql}"));
        assert!(!rows.is_empty(), "no rows:\n{sql}");
    }
}

#[test]
fn dashboards_use_the_provisioned_data_sources() {
    let provisioned = std::fs::read_to_string(
        repo().join("deploy/grafana/provisioning/datasources/narrative-cache.yml"),
    )
    .expect("datasources");
    for (file, dashboard) in dashboards() {
        for (title, target) in targets(&dashboard) {
            let uid = target["datasource"]["uid"].as_str().unwrap_or("");
            assert!(
                provisioned.contains(&format!("uid: {uid}")),
                "{file}, {title}: data source {uid:?} is not provisioned"
            );
        }
    }
}

/// Metric names in a PromQL expression (ours all start with one of these).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| {
            ["narrative_", "worker_", "llm_"]
                .iter()
                .any(|prefix| word.starts_with(prefix))
        })
        .map(str::to_owned)
        .collect()
}

fn exported_by_code(name: &str) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    let quoted = format!("\"{base}\"");
    let crates = repo().join("crates");
    let mut stack = vec![crates];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("tests") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs")
                && std::fs::read_to_string(&path).is_ok_and(|text| text.contains(&quoted))
            {
                return true;
            }
        }
    }
    false
}

#[test]
fn every_metric_in_dashboards_and_alerts_is_exported_by_the_code() {
    let mut names = Vec::new();
    for (_, dashboard) in dashboards() {
        for (_, target) in targets(&dashboard) {
            if let Some(expr) = target["expr"].as_str() {
                names.extend(metric_names(expr));
            }
        }
    }
    let alerts =
        std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).expect("alerts");
    for line in alerts.lines().filter(|l| !l.trim_start().starts_with('#')) {
        names.extend(metric_names(line));
    }
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "{names:?}");
    let missing: Vec<_> = names.iter().filter(|n| !exported_by_code(n)).collect();
    assert!(missing.is_empty(), "named but never exported: {missing:?}");
}

fn promtool(args: &[&str]) {
    let dir = repo().join("deploy/prometheus");
    let output = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool: {e} (Debian's prometheus package ships it; scripts/test.sh installs it)"
            )
        });
    assert!(
        output.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "rules", "alerts.yml"]);
    // The rules' own unit tests: each alert fires on the series it is for.
    promtool(&["test", "rules", "alerts.test.yml"]);
}
