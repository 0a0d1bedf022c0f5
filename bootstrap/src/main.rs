//! The `bootstrap` binary: reads options and hands over to the library.

fn main() {
    let config = sri_bootstrap::Config::load();
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
