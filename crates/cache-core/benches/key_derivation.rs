//! Time to turn a request body into a cache key, the work every request does.

use cache_core::{
    CacheKeySecret, EngineVersion, KeyDeriver, ProfileInput, PromptHash, QuantizationStep,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

const BODY: &str = r#"{"classification":"hybrid","hybrid":["Pleiades","Sirius"],
  "percentages":{"Pleiades":42.4,"Sirius":31.7,"Arcturus":15.2,"Lyra":10.7},
  "hdData":{"type":"Manifesting Generator","authority":"Sacral","profile":"3/5","definition":"Split",
    "centers":["Sacral","Throat","Root"],"channels":["34-20"],"gates":[34,20,5,15]},
  "userId":"user-123"}"#;

fn bench(c: &mut Criterion) {
    let deriver = KeyDeriver::new(
        &CacheKeySecret::new(b"bench-secret".to_vec()),
        EngineVersion::default(),
        PromptHash::of_parts(&[("template", b"bench")]),
        QuantizationStep::DEFAULT,
    );
    let input = ProfileInput::from_json(BODY.as_bytes()).expect("valid body");
    c.bench_function("derive_key (parsed profile)", |b| {
        b.iter(|| deriver.derive(black_box(&input)))
    });
    c.bench_function("parse_and_derive_key (JSON body)", |b| {
        b.iter(|| {
            let input = ProfileInput::from_json(black_box(BODY.as_bytes())).expect("valid body");
            deriver.derive(&input)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
