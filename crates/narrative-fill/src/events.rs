//! What a generation reports to analytics.

use std::time::Duration;

use analytics::{new_event_id, GenerationEvent, GenerationOutcome, Trigger};
use narrative_gen::{GenerateError, Generation};

/// The analytics event for one generator call, wherever it ran (a worker, or the
/// gateway itself). A failed call reports no tokens or cost (none are billed for
/// it) and `attempts: 0`, as the client does not report how many it made.
pub fn generation_event(
    result: Result<&Generation, &GenerateError>,
    model: &str,
    key_digest: &str,
    trigger: Trigger,
    elapsed: Duration,
) -> GenerationEvent {
    let duration_ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let (model, tokens_in, tokens_out, cost_usd, duration_ms, attempts, outcome) = match result {
        Ok(generation) => (
            generation.model.clone(),
            u64::from(generation.tokens_in),
            u64::from(generation.tokens_out),
            generation.cost_usd,
            duration_ms(generation.duration),
            generation.attempts,
            GenerationOutcome::Ok,
        ),
        Err(_) => (
            model.to_owned(),
            0,
            0,
            0.0,
            duration_ms(elapsed),
            0,
            GenerationOutcome::Failed,
        ),
    };
    GenerationEvent {
        id: new_event_id(),
        at: time::OffsetDateTime::now_utc(),
        model,
        tokens_in,
        tokens_out,
        cost_usd,
        duration_ms,
        attempts,
        outcome,
        trigger,
        key_digest: key_digest.to_owned(),
    }
}
