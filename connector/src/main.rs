//! The `sri` binary: reads the command line and hands over to the library.

use clap::Parser;

fn main() {
    let cli = connector::cli::Cli::parse();
    connector::logging::init(cli.log_format);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(connector::cli::run(cli)));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
