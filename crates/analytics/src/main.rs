//! `analytics`: read settings, start telemetry, ingest events until SIGTERM.

use std::process::ExitCode;

use analytics::app::{run, AnalyticsApp};
use analytics::settings::AnalyticsSettings;
use cache_core::config::Vars;

#[tokio::main]
async fn main() -> ExitCode {
    cache_core::telemetry::init();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("analytics: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let settings = AnalyticsSettings::from_vars(&Vars::from_env())?;
    let listener = tokio::net::TcpListener::bind(settings.bind_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on BIND_ADDR {}: {e}", settings.bind_addr))?;
    run(listener, AnalyticsApp::build(settings)?, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    cache_core::shutdown::signal().await;
    tracing::info!("shutdown signal received");
}
