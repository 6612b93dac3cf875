//! A month of profile traffic, reproducible from a seed.
//!
//! Assumptions (written out in `docs/capacity.md` too):
//! - Profiles come from a catalogue of `archetypes` distinct underlying profiles whose
//!   popularity follows a Zipf law with exponent `zipf_exponent`.
//! - Each user holds one archetype. Their percentages are the archetype's plus normal
//!   noise of `jitter` points per system, renormalized to 100 and written with one
//!   decimal, as an app computing them from a chart would send them. Their Human
//!   Design data is the archetype's exactly (it is categorical).
//! - A user makes `1 + Geometric` requests (mean `requests_per_user`), always with
//!   the same profile; all requests of the month arrive in random order.
//! - Star systems are drawn with weights (Pleiades, Sirius, Arcturus and Lyra most
//!   common); a profile names 2 to 4 of them; Human Design types follow their usual
//!   shares (Generator 37%, Manifesting Generator 33%, Projector 20%, Manifestor 9%,
//!   Reflector 1%) with the authorities each type can have.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct TrafficShape {
    /// Which users come, what they hold, and in what order.
    pub seed: u64,
    /// Which archetypes exist: the same from month to month, whatever `seed`.
    pub catalogue_seed: u64,
    pub monthly_users: u64,
    pub requests_per_user: f64,
    pub archetypes: u64,
    pub zipf_exponent: f64,
    /// Standard deviation, in percentage points, of a user's shares around their
    /// archetype's.
    pub jitter: f64,
}

impl TrafficShape {
    /// The shape `docs/capacity.md` uses, for `users` monthly users.
    pub fn standard(users: u64) -> Self {
        Self {
            seed: 2026,
            catalogue_seed: 1,
            monthly_users: users,
            requests_per_user: 3.0,
            archetypes: 20_000,
            zipf_exponent: 1.1,
            jitter: 0.3,
        }
    }
}

/// One request: the body a client sends, and who sent it.
#[derive(Debug, Clone)]
pub struct Request {
    pub user: u64,
    pub body: Value,
}

/// Star systems and how often they lead a profile.
const SYSTEMS: [(&str, f64); 12] = [
    ("Pleiades", 18.0),
    ("Sirius", 16.0),
    ("Arcturus", 13.0),
    ("Lyra", 12.0),
    ("Andromeda", 9.0),
    ("Orion", 8.0),
    ("Vega", 6.0),
    ("Alpha Centauri", 5.0),
    ("Polaris", 4.0),
    ("Antares", 3.5),
    ("Aldebaran", 3.0),
    ("Tau Ceti", 2.5),
];

/// Types, their shares, and the authorities each can have.
const TYPES: [(&str, f64, &[&str]); 5] = [
    ("Generator", 37.0, &["Sacral", "Emotional"]),
    ("Manifesting Generator", 33.0, &["Sacral", "Emotional"]),
    (
        "Projector",
        20.0,
        &["Emotional", "Splenic", "Self-Projected", "Ego", "Mental"],
    ),
    ("Manifestor", 9.0, &["Emotional", "Splenic", "Ego"]),
    ("Reflector", 1.0, &["Lunar"]),
];

const PROFILES: [&str; 12] = [
    "1/3", "1/4", "2/4", "2/5", "3/5", "3/6", "4/6", "4/1", "5/1", "5/2", "6/2", "6/3",
];
const DEFINITIONS: [&str; 4] = ["Single", "Split", "Triple Split", "Quadruple Split"];

/// An underlying profile: systems with shares (summing to 100), Human Design data.
#[derive(Debug, Clone)]
struct Archetype {
    shares: Vec<(&'static str, f64)>,
    hd: Value,
}

fn weighted<'a, T>(rng: &mut StdRng, items: &'a [T], weight: impl Fn(&T) -> f64) -> &'a T {
    let total: f64 = items.iter().map(&weight).sum();
    let mut pick = rng.random::<f64>() * total;
    for item in items {
        pick -= weight(item);
        if pick <= 0.0 {
            return item;
        }
    }
    &items[items.len() - 1]
}

fn archetype(rng: &mut StdRng) -> Archetype {
    let count = *weighted(rng, &[(2usize, 0.3), (3, 0.45), (4, 0.25)], |c| c.1);
    let mut names: Vec<&'static str> = Vec::new();
    while names.len() < count.0 {
        let name = weighted(rng, &SYSTEMS, |s| s.1).0;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    // The first system leads: its weight is drawn larger.
    let weights: Vec<f64> = (0..names.len())
        .map(|i| {
            let base = if i == 0 { 2.0 } else { 1.0 };
            base + rng.random::<f64>() * 1.5
        })
        .collect();
    let total: f64 = weights.iter().sum();
    let shares = names
        .into_iter()
        .zip(weights)
        .map(|(name, w)| (name, w / total * 100.0))
        .collect();
    let (hd_type, _, authorities) = *weighted(rng, &TYPES, |t| t.1);
    let authority = authorities[rng.random_range(0..authorities.len())];
    let mut hd = json!({
        "type": hd_type,
        "authority": authority,
        "profile": PROFILES[rng.random_range(0..PROFILES.len())],
    });
    if hd_type != "Reflector" {
        hd["definition"] = json!(DEFINITIONS[rng.random_range(0..DEFINITIONS.len())]);
    }
    Archetype { shares, hd }
}

/// A standard normal draw (Box-Muller).
pub(crate) fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Shares in tenths of a point summing to exactly 1000, from positive weights.
fn tenths(shares: &[f64]) -> Vec<i64> {
    let total: f64 = shares.iter().sum();
    let mut out: Vec<i64> = shares
        .iter()
        .map(|s| (s / total * 1000.0).round() as i64)
        .collect();
    let error = 1000 - out.iter().sum::<i64>();
    if let Some(largest) = (0..out.len()).max_by_key(|i| out[*i]) {
        out[largest] += error;
    }
    out
}

/// The request body of a user holding `archetype`.
fn body(rng: &mut StdRng, archetype: &Archetype, jitter: f64, user: u64) -> Value {
    let jittered: Vec<f64> = archetype
        .shares
        .iter()
        .map(|(_, share)| (share + standard_normal(rng) * jitter).max(0.5))
        .collect();
    let tenths = tenths(&jittered);
    let mut percentages = serde_json::Map::new();
    let mut ranked: Vec<(&str, i64)> = archetype
        .shares
        .iter()
        .map(|(name, _)| *name)
        .zip(tenths)
        .collect();
    for (name, t) in &ranked {
        percentages.insert((*name).to_owned(), json!(*t as f64 / 10.0));
    }
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut profile = json!({
        "percentages": percentages,
        "hdData": archetype.hd,
        "userId": format!("sim-user-{user}"),
    });
    // A clear leader makes a primary profile; otherwise the top two are a hybrid.
    if ranked[0].1 >= 400 || ranked.len() < 2 {
        profile["classification"] = json!("primary");
        profile["primary"] = json!(ranked[0].0);
    } else {
        profile["classification"] = json!("hybrid");
        profile["hybrid"] = json!([ranked[0].0, ranked[1].0]);
    }
    profile
}

/// Cumulative Zipf weights over `n` ranks.
fn zipf_cdf(n: u64, exponent: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n as usize);
    let mut total = 0.0;
    for rank in 1..=n {
        total += 1.0 / (rank as f64).powf(exponent);
        cdf.push(total);
    }
    for value in &mut cdf {
        *value /= total;
    }
    cdf
}

/// The month's requests, in the order they arrive.
pub fn month(shape: &TrafficShape) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(shape.seed);
    let mut catalogue = StdRng::seed_from_u64(shape.catalogue_seed);
    let archetypes: Vec<Archetype> = (0..shape.archetypes)
        .map(|_| archetype(&mut catalogue))
        .collect();
    let cdf = zipf_cdf(shape.archetypes, shape.zipf_exponent);
    // Geometric number of extra requests: mean requests_per_user - 1.
    let stop = 1.0 / shape.requests_per_user.max(1.0);
    let mut requests = Vec::new();
    for user in 0..shape.monthly_users {
        let draw = rng.random::<f64>();
        let rank = cdf.partition_point(|c| *c < draw).min(archetypes.len() - 1);
        let body = body(&mut rng, &archetypes[rank], shape.jitter, user);
        loop {
            requests.push(Request {
                user,
                body: body.clone(),
            });
            if rng.random::<f64>() < stop {
                break;
            }
        }
    }
    requests.shuffle(&mut rng);
    requests
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache_core::{ProfileInput, QuantizationStep};

    fn small() -> TrafficShape {
        TrafficShape {
            monthly_users: 2_000,
            ..TrafficShape::standard(2_000)
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_traffic() {
        let (a, b) = (month(&small()), month(&small()));
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.body == y.body));
        let other = month(&TrafficShape { seed: 7, ..small() });
        assert!(a.iter().zip(&other).any(|(x, y)| x.body != y.body));
    }

    #[test]
    fn every_profile_is_valid_and_requests_average_as_asked() {
        let traffic = month(&small());
        for request in &traffic {
            let bytes = request.body.to_string();
            let input = ProfileInput::from_json(bytes.as_bytes()).expect("parses");
            input
                .canonicalize(QuantizationStep::DEFAULT)
                .unwrap_or_else(|e| panic!("{e:?}: {bytes}"));
        }
        let mean = traffic.len() as f64 / 2_000.0;
        assert!((2.7..3.3).contains(&mean), "{mean} requests per user");
    }

    #[test]
    fn popularity_is_skewed() {
        let traffic = month(&small());
        let mut by_user_profile = std::collections::HashMap::new();
        for request in &traffic {
            *by_user_profile
                .entry(
                    request.body["hdData"].to_string()
                        + &request.body["classification"].to_string(),
                )
                .or_insert(0u64) += 1;
        }
        let max = by_user_profile.values().max().copied().unwrap_or(0);
        assert!(
            max as f64 > traffic.len() as f64 * 0.02,
            "the head is heavy: {max}"
        );
    }
}
