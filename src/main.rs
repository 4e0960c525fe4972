use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = pending_uploads::cli::Cli::parse();
    pending_uploads::cli::init_tracing(&cli.log_format);
    match pending_uploads::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            eprintln!("pending-uploads: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
