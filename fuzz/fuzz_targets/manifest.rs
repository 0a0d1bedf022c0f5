//! `manifest.yaml` (`connector::manifest`), read from every package.
//!
//! Properties: what is accepted has a valid identity and a Python module entrypoint, and the
//! same fields (`resource.memory` included) written back as YAML parse to the same manifest.
#![no_main]

use connector::manifest::{Manifest, check_identity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(m) = Manifest::parse(text) else {
        return;
    };
    check_identity(&m.author, &m.name, &m.version).expect("an accepted identity checks");
    assert!(
        m.entrypoint
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_')),
        "entrypoint `{}` is not a module name",
        m.entrypoint
    );
    let mut runner = serde_yaml_ng::Mapping::new();
    runner.insert("language".into(), "python".into());
    runner.insert("entrypoint".into(), m.entrypoint.clone().into());
    if let Some(v) = &m.python_version {
        runner.insert("version".into(), v.clone().into());
    }
    let mut meta = serde_yaml_ng::Mapping::new();
    meta.insert("runner".into(), runner.into());
    let mut doc = serde_yaml_ng::Mapping::new();
    doc.insert("author".into(), m.author.clone().into());
    doc.insert("name".into(), m.name.clone().into());
    doc.insert("version".into(), m.version.clone().into());
    doc.insert("meta".into(), meta.into());
    if let Some(bytes) = m.memory_bytes {
        let mut resource = serde_yaml_ng::Mapping::new();
        resource.insert("memory".into(), bytes.into());
        doc.insert("resource".into(), resource.into());
    }
    let again = serde_yaml_ng::to_string(&doc).expect("YAML");
    assert_eq!(Manifest::parse(&again).as_ref(), Ok(&m), "{again}");
});
