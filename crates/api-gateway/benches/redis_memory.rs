//! Redis memory per cache entry against the raw narrative size.
//!
//! Starts its own redis-server (test kit), writes 100,000 entries for distinct profiles
//! through the real `RedisStore` (zstd, and AES-GCM when sealed), and reports how much
//! `used_memory` grew per entry next to the average narrative's length. Narratives come
//! from the template engine: real sentences, but not LLM prose, which is less
//! repetitive and so compresses somewhat less.
//!
//! `cargo bench -p api-gateway --bench redis_memory [-- entries]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use cache_core::{
    CacheKeySecret, CacheStore, EngineVersion, Envelope, KeyDeriver, ProfileInput, PromptHash,
    QuantizationStep,
};
use cache_redis::backend::{RedisBackend, RedisTarget, RedisTimeouts};
use cache_redis::codec::{EncryptionKeys, ValueCodec};
use cache_redis::RedisStore;
use futures::future::join_all;

const SYSTEMS: [&str; 8] = [
    "Pleiades",
    "Sirius",
    "Arcturus",
    "Lyra",
    "Orion",
    "Andromeda",
    "Vega",
    "Alpha Centauri",
];
const TYPES: [&str; 5] = [
    "Generator",
    "Manifesting Generator",
    "Projector",
    "Manifestor",
    "Reflector",
];
const AUTHORITIES: [&str; 5] = ["Sacral", "Emotional", "Splenic", "Self-Projected", "Lunar"];

fn profile(n: usize) -> ProfileInput {
    let a = SYSTEMS[n % 8];
    let b = SYSTEMS[(n / 8 + 1 + n % 7) % 8];
    let b = if a == b { SYSTEMS[(n + 3) % 8] } else { b };
    let share = 50.0 + (n % 90) as f64 * 0.5;
    let json = format!(
        r#"{{"classification":"primary","primary":"{a}","percentages":{{"{a}":{share},"{b}":{}}},
            "hdData":{{"type":"{}","authority":"{}","profile":"2/4","gates":[{},{}]}}}}"#,
        100.0 - share,
        TYPES[n % 5],
        AUTHORITIES[(n / 5) % 5],
        1 + (n / 90) % 64,
        1 + (n / 5760) % 64,
    );
    ProfileInput::from_json(json.as_bytes()).expect("valid profile")
}

async fn used_memory(url: &str) -> u64 {
    let mut conn = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

async fn measure(label: &str, codec: ValueCodec, entries: usize) {
    let server = test_kit::RedisServer::start();
    let timeouts = RedisTimeouts {
        call: Duration::from_secs(5),
        ..RedisTimeouts::default()
    };
    let backend = Arc::new(RedisBackend::new(
        RedisTarget::parse(&server.url, false).expect("url"),
        timeouts,
    ));
    let store = Arc::new(RedisStore::new(backend, codec));
    let deriver = KeyDeriver::new(
        &CacheKeySecret::new(b"bench-secret-0123456789".to_vec()),
        EngineVersion::default(),
        PromptHash::of_parts(&[("bench", b"1")]),
        QuantizationStep::DEFAULT,
    );
    let before = used_memory(&server.url).await;
    let started = Instant::now();
    let mut raw_bytes = 0usize;
    let mut keys = std::collections::HashSet::new();
    for chunk in (0..entries).collect::<Vec<_>>().chunks(500) {
        let writes = chunk.iter().map(|&n| {
            let keyed = deriver.derive(&profile(n)).expect("valid");
            let body = narrative_gen::template::render(&keyed.profile);
            raw_bytes += body.len();
            keys.insert(keyed.key.clone());
            let envelope = Envelope {
                body,
                created_at_ms: cache_core::now_ms(),
                engine_version: "narrative@1.0.0".into(),
                prompt_hash: deriver.prompt_hash().to_string(),
                model: "gpt-4o-mini".into(),
                tokens_in: 420,
                tokens_out: 360,
                cost_usd: 0.000_279,
                generation_ms: 2100,
            };
            let store = Arc::clone(&store);
            async move {
                store
                    .put(
                        &keyed.key,
                        Arc::new(envelope),
                        Duration::from_secs(30 * 86_400),
                    )
                    .await
                    .expect("put")
            }
        });
        join_all(writes.collect::<Vec<_>>()).await;
    }
    let after = used_memory(&server.url).await;
    let stored = keys.len();
    let per_entry = (after - before) as f64 / stored as f64;
    let raw = raw_bytes as f64 / entries as f64;
    println!(
        "{label}: entries={stored} written_in={:.1}s redis_bytes_per_entry={per_entry:.0} raw_narrative_bytes={raw:.0} ratio={:.2}",
        started.elapsed().as_secs_f64(),
        per_entry / raw,
    );
}

#[tokio::main]
async fn main() {
    let entries = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    measure("compressed", ValueCodec::default(), entries).await;
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let keys = EncryptionKeys::parse(&format!("k1:{key}")).expect("key");
    measure("compressed+sealed", ValueCodec::new(Some(keys)), entries).await;
}
