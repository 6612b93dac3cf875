//! `workload-sim`: prints the capacity tables (see the library).
//!
//! `workload-sim [--quick]`: `--quick` runs 1k and 10k users only.

use cache_core::QuantizationStep;
use workload_sim::{simulate, SimSettings, TrafficShape};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let users: &[u64] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let shape = TrafficShape::standard(0);
    println!(
        "traffic: {} archetypes, Zipf exponent {}, jitter {} points, {} requests per user on average, seed {}",
        shape.archetypes, shape.zipf_exponent, shape.jitter, shape.requests_per_user, shape.seed
    );
    println!("llm: log-normal latency, median 2.5 s, sigma 0.35; gpt-4o-mini prices; GENERATION_WAIT_MS 4500");
    println!();
    println!("| users/month | step | pre-warm | requests | distinct keys | hit rate | LLM calls (pre-warm + misses) | LLM cost/month | cost saved | fallbacks | p50 | p99 |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &monthly_users in users {
        for step in ["0.5", "1"] {
            for prewarm in [0usize, 1_000, 5_000] {
                let step: QuantizationStep = step.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
                let report = simulate(
                    &TrafficShape::standard(monthly_users),
                    &SimSettings::new(step, prewarm),
                )
                .await;
                println!(
                    "| {monthly_users} | {step} | {prewarm} | {} | {} | {:.2}% | {} ({} + {}) | ${:.2} | ${:.2} | {} | {:.0} µs | {:.0} ms |",
                    report.requests,
                    report.distinct_keys,
                    report.hit_rate * 100.0,
                    report.llm_calls(),
                    report.prewarm_calls,
                    report.miss_calls,
                    report.llm_cost,
                    report.cost_saved,
                    report.fallbacks,
                    report.p50_ms * 1000.0,
                    report.p99_ms,
                );
            }
        }
    }
    Ok(())
}
