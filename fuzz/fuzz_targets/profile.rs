//! Any bytes as a request body: parsing, validation and canonicalization never panic,
//! and whatever is accepted has a canonical form that reads back to itself and keeps
//! its key under re-formatting.
#![no_main]

use cache_core::{
    CacheKeySecret, CanonicalProfile, EngineVersion, KeyDeriver, PromptHash, ProfileInput,
    QuantizationStep,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Canonical forms read back from elsewhere (jobs, popularity) must not panic either.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = CanonicalProfile::from_json(text);
        let _ = CanonicalProfile::requantize(text, QuantizationStep::DEFAULT);
    }
    let Ok(input) = ProfileInput::from_json(data) else {
        return;
    };
    for step in ["0.5", "1", "0.01", "10"] {
        let step: QuantizationStep = step.parse().expect("valid step");
        let Ok(profile) = input.canonicalize(step) else {
            continue;
        };
        let canonical = profile.to_json();
        let read_back = CanonicalProfile::from_json(&canonical).expect("canonical reads back");
        assert_eq!(read_back, profile, "{canonical}");
        let value: serde_json::Value = serde_json::from_str(&canonical).expect("canonical is JSON");
        let pretty = serde_json::to_string_pretty(&value).expect("serializes");
        assert_eq!(
            CanonicalProfile::requantize(&pretty, step).expect("re-formatted reads"),
            profile
        );
        let deriver = KeyDeriver::new(
            &CacheKeySecret::new(b"fuzz-secret-0123456789".to_vec()),
            EngineVersion::default(),
            PromptHash::of_parts(&[("fuzz", b"fuzz")]),
            step,
        );
        let keyed = deriver.key_for(profile);
        assert!(cache_core::CacheKey::parse(keyed.key.as_str()).is_ok());
    }
});
