//! The `sri` binary: reads the command line and hands over to the library.

use clap::Parser;

fn main() {
    // SAFETY: the first statements of `main`, before the runtime's threads exist: nothing can
    // read the environment while it changes (`std::env::set_var`/`remove_var` are unsafe for
    // that reason in edition 2024).
    if let Err(e) = unsafe { connector::harden::seal(&[]) } {
        eprintln!("error: cannot protect the connector's secrets: {e}");
        std::process::exit(1);
    }
    let cli = connector::cli::Cli::parse();
    // SAFETY: still single-threaded (see above); the options now hold what they read.
    unsafe { connector::harden::forget() };
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
