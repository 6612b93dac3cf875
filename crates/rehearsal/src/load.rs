//! Closed-loop clients behind a load balancer's behaviour: requests go round-robin to
//! the gateways; a connection that fails (refused, reset) takes that gateway out of
//! rotation for a second and the request goes to the next one, as a Kubernetes
//! Service or any HTTP load balancer does for an idempotent request. What reaches the
//! client, every answer and every request no gateway answered, is tallied.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The gateways, and until when each is out of rotation.
#[derive(Debug)]
pub struct Balancer {
    urls: Vec<String>,
    out_until: Mutex<Vec<Option<Instant>>>,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(urls: Vec<String>) -> Self {
        let n = urls.len();
        Self {
            urls,
            out_until: Mutex::new(vec![None; n]),
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> usize {
        let out = self.out_until.lock().expect("balancer");
        let now = Instant::now();
        for _ in 0..self.urls.len() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len();
            if out[i].is_none_or(|until| until <= now) {
                return i;
            }
        }
        // All out: try the next anyway.
        self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len()
    }

    fn take_out(&self, i: usize) {
        self.out_until.lock().expect("balancer")[i] = Some(Instant::now() + Duration::from_secs(1));
    }
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: u64,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// 200 answers by `source` (cache, generated, stale, fallback).
    pub sources: BTreeMap<String, u64>,
    /// Requests that reached a gateway only after a connection to another failed.
    pub rerouted: u64,
    /// Requests no gateway answered.
    pub unanswered: u64,
    /// Profile index to the cache key its answers named.
    pub keys: HashMap<usize, String>,
    pub latencies_ms: Vec<u32>,
}

impl Tally {
    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn ok(&self) -> u64 {
        self.statuses.get(&200).copied().unwrap_or(0)
    }

    pub fn errors(&self) -> u64 {
        self.answered() - self.ok() + self.unanswered
    }

    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        for (source, n) in other.sources {
            *self.sources.entry(source).or_default() += n;
        }
        self.rerouted += other.rerouted;
        self.unanswered += other.unanswered;
        self.keys.extend(other.keys);
        self.latencies_ms.extend(other.latencies_ms);
    }

    pub fn percentile_ms(&mut self, p: f64) -> u32 {
        if self.latencies_ms.is_empty() {
            return 0;
        }
        self.latencies_ms.sort_unstable();
        let rank = ((self.latencies_ms.len() - 1) as f64 * p).round() as usize;
        self.latencies_ms[rank]
    }
}

/// One answer, or none.
enum Sent {
    Answered {
        status: u16,
        body: Value,
        rerouted: bool,
    },
    Unanswered,
}

/// Sends one request through the balancer, moving on after connection failures.
async fn send(client: &reqwest::Client, balancer: &Balancer, body: &Value) -> Sent {
    for attempt in 0..balancer.urls.len() * 3 {
        let i = balancer.pick();
        let request = client
            .post(format!("{}/narrative", balancer.urls[i]))
            .json(body);
        let answer = match request.send().await {
            Ok(response) => response,
            Err(_) => {
                balancer.take_out(i);
                continue;
            }
        };
        let status = answer.status().as_u16();
        // A body cut off by a dying gateway is a failed connection too.
        let Ok(bytes) = answer.bytes().await else {
            balancer.take_out(i);
            continue;
        };
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        return Sent::Answered {
            status,
            body,
            rerouted: attempt > 0,
        };
    }
    Sent::Unanswered
}

/// Zipf-distributed picks of `n` profiles: a few are very popular, most are rare, and
/// identical misses arrive together at different gateways.
#[derive(Debug)]
pub struct Popularity {
    cumulative: Vec<f64>,
}

impl Popularity {
    pub fn zipf(n: usize, exponent: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exponent);
                total
            })
            .collect();
        Self { cumulative }
    }

    fn pick(&self, rng: &mut StdRng) -> usize {
        let total = *self.cumulative.last().expect("profiles");
        let x = rng.random::<f64>() * total;
        self.cumulative.partition_point(|&c| c < x)
    }
}

/// `clients` closed loops until `until`; each picks a profile by popularity.
pub async fn drive(
    client: reqwest::Client,
    balancer: Arc<Balancer>,
    profiles: Arc<Vec<Value>>,
    popularity: Arc<Popularity>,
    clients: usize,
    seed: u64,
    until: Instant,
) -> Tally {
    let loops = (0..clients).map(|c| {
        let (client, balancer, profiles, popularity) = (
            client.clone(),
            Arc::clone(&balancer),
            Arc::clone(&profiles),
            Arc::clone(&popularity),
        );
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(c as u64));
            let mut tally = Tally::default();
            while Instant::now() < until {
                let index = popularity.pick(&mut rng);
                let started = Instant::now();
                tally.sent += 1;
                match send(&client, &balancer, &profiles[index]).await {
                    Sent::Answered {
                        status,
                        body,
                        rerouted,
                    } => {
                        *tally.statuses.entry(status).or_default() += 1;
                        tally.rerouted += u64::from(rerouted);
                        if status == 200 {
                            let source = body["source"].as_str().unwrap_or("?").to_owned();
                            *tally.sources.entry(source).or_default() += 1;
                            if let Some(key) = body["cacheKey"].as_str() {
                                tally.keys.insert(index, key.to_owned());
                            }
                        }
                        let elapsed = started.elapsed().as_millis();
                        tally
                            .latencies_ms
                            .push(u32::try_from(elapsed).unwrap_or(u32::MAX));
                    }
                    Sent::Unanswered => tally.unanswered += 1,
                }
            }
            tally
        })
    });
    // Spawned first, awaited after: all clients run at once. A client that panicked
    // would take its requests out of the count, so its panic ends the run instead.
    let handles: Vec<_> = loops.collect();
    let mut total = Tally::default();
    for handle in handles {
        total.merge(handle.await.expect("a client loop panicked"));
    }
    total
}
