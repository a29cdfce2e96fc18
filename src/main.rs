//! `nxknock`: parse the command line, set up logging, run. Errors end here.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = nxknock::cli::Cli::parse();
    // hickory logs every query name at info, and a query name is a knock token:
    // keep its crates at warn unless the operator names them explicitly.
    // Each crate stays at warn unless the operator names that very crate.
    let mut filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    for krate in ["hickory_server", "hickory_net", "hickory_proto"] {
        if !filter.contains(krate) {
            filter.push_str(&format!(",{krate}=warn"));
        }
    }
    let filter = tracing_subscriber::EnvFilter::new(filter);
    use std::io::IsTerminal;
    let log = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format() {
        nxknock::config::LogFormat::Json => log.json().init(),
        nxknock::config::LogFormat::Text => log.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    match nxknock::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nxknock: error: {}", nxknock::cli::render_error(&e));
            // A knock that reached nothing, or the wrong server, says which (3, 4, 5, 6).
            std::process::ExitCode::from(nxknock::cli::exit_code(&e))
        }
    }
}
