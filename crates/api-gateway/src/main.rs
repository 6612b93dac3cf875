//! `api-gateway`: read settings, start telemetry, serve until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use api_gateway::{run, App, Settings};
use cache_core::config::Vars;

#[tokio::main]
async fn main() -> ExitCode {
    cache_core::telemetry::init();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("api-gateway: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let settings = Settings::from_vars(&Vars::from_env())?;
    let listener = tokio::net::TcpListener::bind(settings.bind_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on BIND_ADDR {}: {e}", settings.bind_addr))?;
    let app = App::build(settings)?;
    run(listener, app, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    cache_core::shutdown::signal().await;
    tracing::info!("shutdown signal received; draining");
}
