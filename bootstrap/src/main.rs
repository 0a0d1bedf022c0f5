//! The `bootstrap` binary: reads options and hands over to the library.

fn main() -> anyhow::Result<()> {
    let config = sri_bootstrap::Config::load();
    sri_bootstrap::init::become_child_of_init()?;
    sri_bootstrap::logging::init(config.plugin.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(sri_bootstrap::run(config))?;
    Ok(())
}
