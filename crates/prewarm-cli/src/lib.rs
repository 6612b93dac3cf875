//! `narrative-prewarm`: starts a pre-warm run on a gateway (`POST /narrative/prewarm`)
//! and follows it (`GET /narrative/prewarm/{run}`) with a progress bar until every
//! profile is through, then prints a summary.
//!
//! ```text
//! ADMIN_TOKEN=... narrative-prewarm --url http://127.0.0.1:8080 --top 100
//! ADMIN_TOKEN=... narrative-prewarm --file profiles.json      # a JSON array of profiles
//! ```
//!
//! The token comes from the environment, never a flag (flags show in `ps`). A file's
//! profiles are sent in as many requests as the gateway's 64 KiB body limit needs; the
//! summary adds their runs up. The exit code is 0 when nothing failed, 1 otherwise,
//! and 2 for bad arguments.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

pub const USAGE: &str =
    "usage: narrative-prewarm [--url URL] (--top N | --file PROFILES.json) [--no-wait]
  --url      the gateway (default http://127.0.0.1:8080)
  --top N    warm the N most requested profiles
  --file F   warm the profiles of a JSON array
  --no-wait  start the run(s) and print what was queued, without following them
  ADMIN_TOKEN (environment) is the gateway's admin token";

/// The gateway's body limit, less room for the request's own framing.
const MAX_BODY: usize = 60 * 1024;
const POLL_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, PartialEq)]
pub enum What {
    Top(u64),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub url: String,
    pub what: What,
    pub wait: bool,
    pub token: String,
}

impl Options {
    pub fn parse(args: &[String], token: Option<String>) -> anyhow::Result<Self> {
        let mut url = "http://127.0.0.1:8080".to_owned();
        let mut what = None;
        let mut wait = true;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value"))
            };
            match arg.as_str() {
                "--url" => url = value("--url")?.trim_end_matches('/').to_owned(),
                "--top" => {
                    let n = value("--top")?;
                    what = Some(What::Top(
                        n.parse()
                            .with_context(|| format!("--top {n:?} is not a number"))?,
                    ));
                }
                "--file" => what = Some(What::File(PathBuf::from(value("--file")?))),
                "--no-wait" => wait = false,
                other => bail!("unknown argument {other:?}"),
            }
        }
        let what = what.context("give --top N or --file PROFILES.json")?;
        let token = token
            .filter(|t| !t.trim().is_empty())
            .context("ADMIN_TOKEN is not set")?;
        Ok(Self {
            url,
            what,
            wait,
            token,
        })
    }
}

/// What the runs came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub runs: Vec<String>,
    pub requested: u64,
    pub queued: u64,
    pub skipped: u64,
    pub sent: u64,
    pub failed: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "prewarm: {} requested, {} queued, {} sent, {} skipped (already cached or in flight), {} failed; run {}",
            self.requested,
            self.queued,
            self.sent,
            self.skipped,
            self.failed,
            self.runs.join(", ")
        )
    }
}

/// The request bodies for `what`: one for a top N, as many as the body limit needs
/// for a file.
pub fn bodies(what: &What) -> anyhow::Result<Vec<Vec<u8>>> {
    let profiles = match what {
        What::Top(n) => {
            return Ok(vec![serde_json::json!({ "top": n })
                .to_string()
                .into_bytes()])
        }
        What::File(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            match serde_json::from_str::<Value>(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?
            {
                Value::Array(profiles) if !profiles.is_empty() => profiles,
                _ => bail!(
                    "{} must hold a non-empty JSON array of profiles",
                    path.display()
                ),
            }
        }
    };
    let mut bodies = Vec::new();
    let mut chunk: Vec<String> = Vec::new();
    let mut size = 0;
    let envelope = br#"{"profiles":[]}"#.len();
    for profile in profiles {
        let text = profile.to_string();
        if envelope + text.len() > MAX_BODY {
            bail!(
                "a profile of {} bytes does not fit in one request",
                text.len()
            );
        }
        if !chunk.is_empty() && envelope + size + text.len() + 1 > MAX_BODY {
            bodies.push(join(&chunk));
            chunk.clear();
            size = 0;
        }
        size += text.len() + 1;
        chunk.push(text);
    }
    if !chunk.is_empty() {
        bodies.push(join(&chunk));
    }
    Ok(bodies)
}

fn join(profiles: &[String]) -> Vec<u8> {
    format!(r#"{{"profiles":[{}]}}"#, profiles.join(",")).into_bytes()
}

/// Starts the run(s), follows them unless told not to, and reports on `progress`.
pub async fn run(options: &Options, progress: &mut dyn Write) -> anyhow::Result<Summary> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut summary = Summary::default();
    let mut locations = Vec::new();
    for body in bodies(&options.what)? {
        let response = client
            .post(format!("{}/narrative/prewarm", options.url))
            .bearer_auth(&options.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", options.url))?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if status.as_u16() != 202 {
            bail!("the gateway answered {status}: {}", error_text(&answer));
        }
        summary.runs.push(text(&answer, "runId"));
        summary.queued += number(&answer, "queued");
        summary.skipped += number(&answer, "skipped");
        summary.requested += number(&answer, "queued") + number(&answer, "skipped");
        locations.push(text(&answer, "location"));
    }
    if !options.wait {
        return Ok(summary);
    }
    let bar = Bar::new(progress, summary.queued);
    let finals = follow(&client, options, &locations, bar).await?;
    summary.skipped = finals.iter().map(|f| number(f, "skipped")).sum();
    summary.sent = finals.iter().map(|f| number(f, "sent")).sum();
    summary.failed = finals.iter().map(|f| number(f, "failed")).sum();
    Ok(summary)
}

/// Polls every run until all are done; returns their last progress.
async fn follow(
    client: &reqwest::Client,
    options: &Options,
    locations: &[String],
    mut bar: Bar<'_>,
) -> anyhow::Result<Vec<Value>> {
    loop {
        let mut states = Vec::new();
        for location in locations {
            let response = client
                .get(format!("{}{location}", options.url))
                .bearer_auth(&options.token)
                .send()
                .await
                .with_context(|| format!("cannot reach {}", options.url))?;
            let status = response.status();
            let state: Value = response.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!("following {location}: {status}: {}", error_text(&state));
            }
            states.push(state);
        }
        let through: u64 = states
            .iter()
            .map(|s| number(s, "queued").saturating_sub(number(s, "remaining")))
            .sum();
        let failed: u64 = states.iter().map(|s| number(s, "failed")).sum();
        bar.draw(through, failed)?;
        if states.iter().all(|s| s["state"] == "done") {
            bar.finish()?;
            return Ok(states);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

fn number(value: &Value, field: &str) -> u64 {
    value[field].as_u64().unwrap_or(0)
}

fn text(value: &Value, field: &str) -> String {
    value[field].as_str().unwrap_or_default().to_owned()
}

fn error_text(answer: &Value) -> String {
    match &answer["error"] {
        Value::Null => answer.to_string(),
        error => format!(
            "{} ({})",
            error["message"].as_str().unwrap_or("?"),
            error["code"].as_str().unwrap_or("?")
        ),
    }
}

/// A progress bar on a terminal; on anything else, a line at each tenth.
struct Bar<'a> {
    out: &'a mut dyn Write,
    total: u64,
    terminal: bool,
    last_tenth: Option<u64>,
}

impl<'a> Bar<'a> {
    fn new(out: &'a mut dyn Write, total: u64) -> Self {
        Self {
            out,
            total,
            terminal: std::io::stderr().is_terminal(),
            last_tenth: None,
        }
    }

    fn draw(&mut self, through: u64, failed: u64) -> std::io::Result<()> {
        const WIDTH: u64 = 30;
        let total = self.total.max(1);
        let filled = (through.min(total) * WIDTH / total) as usize;
        let line = format!(
            "[{}{}] {through}/{} through, {failed} failed",
            "#".repeat(filled),
            "-".repeat(WIDTH as usize - filled),
            self.total
        );
        if self.terminal {
            write!(self.out, "\r{line}")?;
        } else {
            let tenth = through * 10 / total;
            if self.last_tenth != Some(tenth) {
                writeln!(self.out, "{line}")?;
                self.last_tenth = Some(tenth);
            }
        }
        self.out.flush()
    }

    fn finish(&mut self) -> std::io::Result<()> {
        if self.terminal {
            writeln!(self.out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn arguments_and_the_token() {
        let options = Options::parse(
            &args(&["--url", "http://gw:8080/", "--top", "25"]),
            Some("t".into()),
        )
        .unwrap();
        assert_eq!(options.url, "http://gw:8080");
        assert_eq!(options.what, What::Top(25));
        assert!(options.wait);
        assert!(Options::parse(&args(&["--top", "25"]), None).is_err());
        assert!(Options::parse(&args(&["--top", "many"]), Some("t".into())).is_err());
        assert!(Options::parse(&args(&[]), Some("t".into())).is_err());
        assert!(Options::parse(&args(&["--token", "x"]), Some("t".into())).is_err());
    }

    #[test]
    fn a_long_file_is_split_under_the_body_limit() {
        let profile = serde_json::json!({
            "classification": "primary", "primary": "Sirius",
            "percentages": {"Sirius": 60, "Lyra": 40},
            "hdData": {"type": "Generator", "authority": "Sacral", "profile": "2/4"}
        });
        let list = Value::Array(vec![profile; 600]);
        let path = std::env::temp_dir().join(format!("prewarm-{}.json", std::process::id()));
        std::fs::write(&path, list.to_string()).unwrap();
        let bodies = bodies(&What::File(path.clone())).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(bodies.len() > 1);
        let mut count = 0;
        for body in &bodies {
            assert!(body.len() <= MAX_BODY, "{}", body.len());
            let value: Value = serde_json::from_slice(body).unwrap();
            count += value["profiles"].as_array().unwrap().len();
        }
        assert_eq!(count, 600);
    }
}
