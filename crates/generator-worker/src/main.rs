//! `generator-worker`: read settings, start telemetry, consume jobs until SIGTERM.

use std::process::ExitCode;

use cache_core::config::Vars;
use generator_worker::app::{run, WorkerApp};
use generator_worker::settings::WorkerSettings;

#[tokio::main]
async fn main() -> ExitCode {
    cache_core::telemetry::init();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("generator-worker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let settings = WorkerSettings::from_vars(&Vars::from_env())?;
    let listener = tokio::net::TcpListener::bind(settings.bind_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on BIND_ADDR {}: {e}", settings.bind_addr))?;
    run(listener, WorkerApp::build(settings)?, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    cache_core::shutdown::signal().await;
    tracing::info!("shutdown signal received; finishing jobs in flight");
}
