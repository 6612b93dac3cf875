//! `narrative-prewarm`: see the library for what it does.

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match prewarm_cli::Options::parse(&args, std::env::var("ADMIN_TOKEN").ok()) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("narrative-prewarm: {error:#}\n\n{}", prewarm_cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match prewarm_cli::run(&options, &mut std::io::stderr()).await {
        Ok(summary) => {
            println!("{summary}");
            if summary.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("narrative-prewarm: {error:#}");
            ExitCode::FAILURE
        }
    }
}
