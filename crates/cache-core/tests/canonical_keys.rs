//! Pins the canonical form and the key derivation.
//!
//! `golden_keys.json` holds profiles with their expected canonical bytes and keys under
//! a fixed secret. The expected keys were computed outside Rust (Python's `hmac`) from
//! hand-written canonical bytes. If this test fails, the canonical form drifted: every
//! deployed cache entry would become unreachable. Change the vectors only together with
//! an `ENGINE_VERSION` bump.

use cache_core::{
    CacheKeySecret, EngineVersion, KeyDeriver, ProfileInput, PromptHash, QuantizationStep,
};
use proptest::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Golden {
    secret: String,
    engine_version: String,
    prompt_hash: String,
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    step: String,
    body: serde_json::Value,
    canonical: String,
    key: String,
}

#[test]
fn golden_vectors_pin_canonical_bytes_and_keys() {
    let golden: Golden =
        serde_json::from_str(include_str!("golden_keys.json")).expect("fixture parses");
    assert!(golden.vectors.len() >= 12);
    for vector in &golden.vectors {
        let deriver = KeyDeriver::new(
            &CacheKeySecret::new(golden.secret.as_bytes().to_vec()),
            EngineVersion::parse(&golden.engine_version).expect("version"),
            PromptHash::parse(&golden.prompt_hash).expect("hash"),
            vector.step.parse().expect("step"),
        );
        let body = serde_json::to_vec(&vector.body).expect("body");
        let input =
            ProfileInput::from_json(&body).unwrap_or_else(|e| panic!("{}: {e}", vector.name));
        let keyed = deriver
            .derive(&input)
            .unwrap_or_else(|e| panic!("{}: {e}", vector.name));
        assert_eq!(
            &*keyed.canonical_json, vector.canonical,
            "canonical bytes of {:?}",
            vector.name
        );
        assert_eq!(keyed.key.as_str(), vector.key, "key of {:?}", vector.name);
    }
}

// ---- properties ----

const SYSTEMS: [&str; 10] = [
    "Pleiades",
    "Sirius",
    "Arcturus",
    "Lyra",
    "Orion",
    "Andromeda",
    "Vega",
    "Alpha Centauri",
    "Tau Ceti",
    "Zeta Reticuli",
];

fn deriver(step: &str, version: &str, template: &str, model: &str) -> KeyDeriver {
    KeyDeriver::new(
        &CacheKeySecret::new(b"property-secret".to_vec()),
        EngineVersion::parse(version).expect("version"),
        PromptHash::of_parts(&[
            ("template", template.as_bytes()),
            ("model", model.as_bytes()),
        ]),
        step.parse().expect("step"),
    )
}

fn default_deriver() -> KeyDeriver {
    deriver("0.5", "narrative@1.0.0", "template", "gpt-4o-mini")
}

/// A profile as `(system, thousandths)` pairs summing to exactly 100%.
fn shares() -> impl Strategy<Value = Vec<(&'static str, u32)>> {
    (2usize..=6).prop_flat_map(|n| {
        (Just(n), proptest::collection::vec(1u32..=1000, n), Just(())).prop_map(
            |(n, weights, ())| {
                let total: u32 = weights.iter().sum();
                let mut values: Vec<u32> = weights.iter().map(|w| w * 100_000 / total).collect();
                let assigned: u32 = values.iter().sum();
                values[n - 1] += 100_000 - assigned;
                SYSTEMS.iter().copied().zip(values).collect::<Vec<_>>()
            },
        )
    })
}

fn body(systems: &[(String, f64)], primary: &str) -> Vec<u8> {
    let percentages: Vec<String> = systems
        .iter()
        .map(|(name, value)| {
            format!(
                "{}:{value}",
                serde_json::to_string(name).unwrap_or_default()
            )
        })
        .collect();
    format!(
        r#"{{"classification":"primary","primary":{},"percentages":{{{}}},"hdData":{{"type":"Projector","authority":"Splenic","profile":"1/3","gates":[1,2,3]}}}}"#,
        serde_json::to_string(primary).unwrap_or_default(),
        percentages.join(",")
    )
    .into_bytes()
}

fn as_pct(shares: &[(&str, u32)]) -> Vec<(String, f64)> {
    shares
        .iter()
        .map(|(name, t)| ((*name).to_owned(), f64::from(*t) / 1000.0))
        .collect()
}

fn key_of(deriver: &KeyDeriver, body: &[u8]) -> String {
    let input = ProfileInput::from_json(body).expect("parses");
    deriver.derive(&input).expect("valid").key.to_string()
}

/// Random case and extra whitespace around and inside a name.
fn scramble(name: &str, seed: u64) -> String {
    let mut out = String::from(if seed & 1 == 1 { "  " } else { "\t" });
    for (i, c) in name.chars().enumerate() {
        let flip = (seed >> (i % 60)) & 1 == 1;
        out.extend(if flip {
            c.to_uppercase().collect::<Vec<_>>()
        } else {
            c.to_lowercase().collect()
        });
        if c == ' ' && seed & 2 == 2 {
            out.push_str("   ");
        }
    }
    out.push(' ');
    out
}

proptest! {
    #[test]
    fn order_case_and_whitespace_never_change_the_key(shares in shares(), seed in any::<u64>(), rotate in 0usize..6) {
        let deriver = default_deriver();
        let plain = as_pct(&shares);
        let primary = plain[0].0.clone();
        let mut scrambled: Vec<(String, f64)> =
            plain.iter().map(|(name, value)| (scramble(name, seed), *value)).collect();
        let len = scrambled.len();
        scrambled.rotate_left(rotate % len);
        prop_assert_eq!(
            key_of(&deriver, &body(&plain, &primary)),
            key_of(&deriver, &body(&scrambled, &scramble(&primary, seed.rotate_left(7))))
        );
    }

    #[test]
    fn moves_inside_a_bucket_keep_the_key_and_crossing_one_changes_it(
        shares in shares(),
        // Steps up to 1: a move within one bucket then keeps the sum within +/-1.
        step_hundredths in prop::sample::select(vec![10u32, 25, 50, 100]),
        offset_a in 0u32..1000,
        offset_b in 0u32..1000,
    ) {
        let step = format!("{}", f64::from(step_hundredths) / 100.0);
        let deriver = deriver(&step, "narrative@1.0.0", "template", "gpt-4o-mini");
        let width = step_hundredths * 10;
        let mut plain = shares.clone();
        // Put the first system at the bottom of its bucket plus an offset within it.
        let base = (plain[0].1 / width) * width;
        let (a, b) = (base + offset_a % width, base + offset_b % width);
        plain[0].1 = a;
        let key_a = key_of(&deriver, &body(&as_pct(&plain), plain[0].0));
        plain[0].1 = b;
        let key_b = key_of(&deriver, &body(&as_pct(&plain), plain[0].0));
        prop_assert_eq!(&key_a, &key_b, "same bucket");
        // One bucket up.
        prop_assume!(base + width <= 100_000);
        plain[0].1 = base + width;
        let key_c = key_of(&deriver, &body(&as_pct(&plain), plain[0].0));
        prop_assert_ne!(&key_a, &key_c, "next bucket");
    }

    #[test]
    fn version_prompt_model_and_step_always_change_the_key(shares in shares()) {
        let plain = as_pct(&shares);
        let profile = body(&plain, &plain[0].0);
        let base = key_of(&default_deriver(), &profile);
        for other in [
            deriver("0.5", "narrative@1.0.1", "template", "gpt-4o-mini"),
            deriver("0.5", "narrative@1.0.0", "template v2", "gpt-4o-mini"),
            deriver("0.5", "narrative@1.0.0", "template", "gpt-4o"),
            deriver("1", "narrative@1.0.0", "template", "gpt-4o-mini"),
            deriver("0.25", "narrative@1.0.0", "template", "gpt-4o-mini"),
        ] {
            prop_assert_ne!(&base, &key_of(&other, &profile));
        }
    }

    /// Whatever JSON arrives, parsing and canonicalizing never panics.
    #[test]
    fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(input) = ProfileInput::from_json(&bytes) {
            let _ = input.canonicalize(QuantizationStep::DEFAULT);
        }
    }
}

#[test]
fn canonical_json_reads_back_into_the_same_profile() {
    let golden: Golden =
        serde_json::from_str(include_str!("golden_keys.json")).expect("fixture parses");
    for vector in &golden.vectors {
        let profile = cache_core::CanonicalProfile::from_json(&vector.canonical)
            .unwrap_or_else(|e| panic!("{}: {e}", vector.name));
        assert_eq!(profile.to_json(), vector.canonical);
    }
    let reordered = r#"{"hdData":{"authority":"Sacral","profile":"2/4","type":"Generator"},"classification":"primary","percentages":{"Sirius":100},"primary":"Sirius","quantizationStep":0.5}"#;
    assert!(
        cache_core::CanonicalProfile::from_json(reordered).is_err(),
        "same meaning, but not the canonical bytes"
    );
    let unquantized = r#"{"classification":"primary","hdData":{"authority":"Sacral","profile":"2/4","type":"Generator"},"percentages":{"Sirius":100.2},"primary":"Sirius","quantizationStep":0.5}"#;
    assert!(cache_core::CanonicalProfile::from_json(unquantized).is_err());
}
