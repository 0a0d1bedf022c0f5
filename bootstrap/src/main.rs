//! The `bootstrap` binary: reads options and hands over to the library.

fn main() {
    // SAFETY: the first statements of `main`: no other thread exists yet, so changing the
    // environment cannot race a reader (the runtime's threads start in `start`).
    // The Runtime API's address is sealed too: a plugin that knew it could answer invocations.
    if let Err(e) = unsafe { connector::harden::seal(&[sri_bootstrap::RUNTIME_API_ENV]) } {
        eprintln!("error: cannot protect the runtime's secrets: {e}");
        std::process::exit(1);
    }
    let config = sri_bootstrap::Config::load();
    // SAFETY: still single-threaded (see above). The options hold what was read; the secrets
    // leave the environment before anything can inherit them.
    unsafe { connector::harden::forget() };
    if let Err(e) = start(config) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn start(config: sri_bootstrap::Config) -> anyhow::Result<()> {
    sri_bootstrap::init::become_child_of_init()?;
    connector::logging::init(config.plugin.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(sri_bootstrap::run(config))?;
    Ok(())
}
