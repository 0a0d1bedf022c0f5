//! The `sri` command line: `serve`, and the same operations from a terminal (`package`,
//! `deploy`, `invoke`, `list`, `remove`, `gc`) against a running `sri serve`. One module per
//! job: `serve` runs the connector, `package` builds a function zip, `remote` talks to a
//! running connector.

mod package;
mod remote;
mod serve;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

use crate::Error;
use crate::logging::{LogFormat, parse_log_format};
use crate::package::Package;

pub use package::PackageOptions;
pub use remote::{InvokeOptions, Remote};
pub use serve::{BackendKind, Installer, ServeOptions, shutdown_signal};

/// The Dify serverless connector: runs plugins as functions for a daemon with
/// `PLATFORM=serverless`.
#[derive(Debug, Parser)]
#[command(name = "sri", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `text` or `json`.
    #[arg(long, global = true, env = "AWS_LAMBDA_LOG_FORMAT", default_value = "text", value_parser = parse_log_format)]
    pub log_format: LogFormat,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the control plane and the gateway (the daemon's DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL).
    Serve(Box<ServeOptions>),
    /// Build the AWS Lambda zip of a plugin (directory or .difypkg) for an architecture and
    /// Python runtime; with `--difypkg`, write the package the daemon would upload instead.
    Package(PackageOptions),
    /// Deploy a plugin through a running connector, showing progress.
    Deploy {
        /// A plugin directory or a `.difypkg`.
        path: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// Invoke a function through the gateway and stream its output.
    Invoke(InvokeOptions),
    /// List the deployed functions.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a function.
    Remove {
        /// Function name.
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove leftovers and superseded versions of each plugin.
    Gc {
        /// Versions kept per plugin.
        #[arg(long, default_value_t = 2)]
        keep: usize,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(o) => serve::serve(*o).await,
        Command::Package(o) => package::package(o).await,
        Command::Deploy { path, remote } => remote::deploy(&path, &remote).await,
        Command::Invoke(o) => remote::invoke(o).await,
        Command::List { remote, json } => remote::list(&remote, json).await,
        Command::Remove { name, remote } => remote::remove(&name, &remote).await,
        Command::Gc { keep, remote } => remote::gc(keep, &remote).await,
    }
}

/// Reads a `.difypkg`, or packs a plugin directory the way the daemon can checksum it
/// ([`crate::package::load`]).
pub fn load(path: &Path) -> Result<Package, Error> {
    crate::package::load(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap only checks the option table (unique ids, valid defaults) when it is built.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
