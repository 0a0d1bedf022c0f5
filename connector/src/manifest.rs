//! The parts of a plugin's `manifest.yaml` the runtime needs: who it is and how to start it.
//!
//! Two ways in, one set of rules ([`Manifest::validate`]): the YAML a package ships (feature
//! `manifest-yaml`: the connector's intake, `bootstrap serve`), and the record of it the packager
//! writes at a function zip's root ([`RECORD_FILE`], JSON), which lets the Lambda build of the
//! bootstrap leave a YAML parser out of every function.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::Error;

/// The validated manifest as the packager records it at a function's root (beside `plugin/`).
pub const RECORD_FILE: &str = "sri-plugin.json";

/// A plugin's identity and runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `author`.
    pub author: String,
    /// `name`.
    pub name: String,
    /// `version`.
    pub version: String,
    /// `meta.runner.entrypoint`: the module run as `python -m <entrypoint>`.
    pub entrypoint: String,
    /// `meta.runner.version`: the Python version the plugin asks for.
    pub python_version: Option<String>,
    /// `resource.memory`: the memory the plugin declares it needs, in bytes (the local
    /// sandbox's memory limit, the Lambda function's memory size).
    pub memory_bytes: Option<u64>,
}

#[cfg(feature = "manifest-yaml")]
mod yaml {
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub(super) struct Raw {
        pub author: Option<String>,
        pub name: Option<String>,
        pub version: Option<serde_yaml_ng::Value>,
        pub meta: Option<Meta>,
        pub resource: Option<Resource>,
    }

    #[derive(Deserialize)]
    pub(super) struct Resource {
        pub memory: Option<serde_yaml_ng::Value>,
    }

    #[derive(Deserialize)]
    pub(super) struct Meta {
        pub runner: Option<Runner>,
    }

    #[derive(Deserialize)]
    pub(super) struct Runner {
        pub language: Option<String>,
        pub version: Option<serde_yaml_ng::Value>,
        pub entrypoint: Option<String>,
    }

    pub(super) fn scalar(v: serde_yaml_ng::Value) -> Option<String> {
        match v {
            serde_yaml_ng::Value::String(s) => Some(s),
            serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

impl Manifest {
    /// Reads `<dir>/manifest.yaml`.
    #[cfg(feature = "manifest-yaml")]
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = dir.join("manifest.yaml");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Manifest {
            path: path.display().to_string(),
            reason: format!("cannot read it ({e}); is SRI_PLUGIN_DIR the plugin's directory?"),
        })?;
        Self::parse(&text).map_err(|reason| Error::Manifest {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Reads a [`RECORD_FILE`] the packager wrote, held to the same rules as the YAML.
    pub fn load_record(path: &Path) -> Result<Self, Error> {
        let err = |reason: String| Error::Manifest {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read it ({e})")))?;
        let m: Self = serde_json::from_slice(&bytes).map_err(|e| {
            err(format!(
                "not a manifest record ({e}); rebuild the function with `sri package`"
            ))
        })?;
        m.validate().map_err(err)?;
        Ok(m)
    }

    /// The record [`load_record`](Self::load_record) reads.
    pub fn record(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest serializes")
    }

    /// Parses manifest text.
    #[cfg(feature = "manifest-yaml")]
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: yaml::Raw =
            serde_yaml_ng::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
        let runner = raw
            .meta
            .and_then(|m| m.runner)
            .ok_or("`meta.runner` is missing")?;
        match runner.language.as_deref() {
            Some("python") => {}
            Some(other) => {
                return Err(format!(
                    "`meta.runner.language` is `{other}`; only `python` plugins are supported"
                ));
            }
            None => return Err("`meta.runner.language` is missing".into()),
        }
        let present =
            |v: Option<String>, name: &str| v.ok_or_else(|| format!("`{name}` is missing"));
        let memory_bytes = match raw.resource.and_then(|r| r.memory) {
            None | Some(serde_yaml_ng::Value::Null) => None,
            Some(v) => match yaml::scalar(v).and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(0) => None,
                Some(b) => Some(b),
                None => {
                    return Err(
                        "`resource.memory` is not a whole number of bytes (e.g. 268435456)".into(),
                    );
                }
            },
        };
        let m = Self {
            entrypoint: present(runner.entrypoint, "meta.runner.entrypoint")?,
            author: present(raw.author, "author")?,
            name: present(raw.name, "name")?,
            version: present(raw.version.and_then(yaml::scalar), "version")?,
            python_version: runner.version.and_then(yaml::scalar),
            memory_bytes,
        };
        m.validate()?;
        Ok(m)
    }

    /// The rules every manifest meets, whichever way it came in: the fields are present, the
    /// entrypoint is a Python module name, the identity is one the daemon accepts.
    pub fn validate(&self) -> Result<(), String> {
        for (v, name) in [
            (&self.entrypoint, "meta.runner.entrypoint"),
            (&self.author, "author"),
            (&self.name, "name"),
            (&self.version, "version"),
        ] {
            if v.trim().is_empty() {
                return Err(format!("`{name}` is missing"));
            }
        }
        let entrypoint = &self.entrypoint;
        if !entrypoint
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'))
        {
            return Err(format!(
                "`meta.runner.entrypoint` `{entrypoint}` is not a Python module name"
            ));
        }
        check_identity(&self.author, &self.name, &self.version)
    }

    /// `author/name:version`, as Dify names a plugin.
    pub fn identity(&self) -> String {
        format!("{}/{}:{}", self.author, self.name, self.version)
    }
}

/// Checks a plugin's identity against the daemon's own patterns (`AuthorRegex`,
/// `PluginNameRegex` and the version part of the unique identifier's regex in the daemon's
/// `pkg/entities/plugin_entities/`): a package the daemon would refuse is refused here too,
/// and nothing else can reach a function name, a path or a log line through these fields.
pub fn check_identity(author: &str, name: &str, version: &str) -> Result<(), String> {
    let word = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    let shown = |s: &str| {
        s.chars()
            .flat_map(char::escape_debug)
            .take(140)
            .collect::<String>()
    };
    if author.is_empty() || author.len() > 64 || !word(author) {
        return Err(format!(
            "`author` `{}` must be 1 to 64 of a-z, 0-9, `_` and `-` (the daemon's rule)",
            shown(author)
        ));
    }
    if name.is_empty() || name.len() > 128 || !word(name) {
        return Err(format!(
            "`name` `{}` must be 1 to 128 of a-z, 0-9, `_` and `-` (the daemon's rule)",
            shown(name)
        ));
    }
    if !is_version(version) {
        return Err(format!(
            "`version` `{}` must look like 1.2.3 or 1.2.3-beta1: 2 to 4 numbers of 1 to 4 \
             digits, and an optional suffix of 1 to 16 letters, digits or `_` (the daemon's rule)",
            shown(version)
        ));
    }
    Ok(())
}

/// `^[0-9]{1,4}(\.[0-9]{1,4}){1,3}(-\w{1,16})?$`, the daemon's version pattern.
fn is_version(v: &str) -> bool {
    let (numbers, suffix) = match v.split_once('-') {
        Some((n, s)) => (n, Some(s)),
        None => (v, None),
    };
    let parts: Vec<&str> = numbers.split('.').collect();
    (2..=4).contains(&parts.len())
        && parts
            .iter()
            .all(|p| (1..=4).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && suffix.is_none_or(|s| {
            (1..=16).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    const OK: &str = "version: 0.1.0\ntype: plugin\nauthor: sri\nname: sample\nmeta:\n  version: 0.0.1\n  runner:\n    language: python\n    version: \"3.12\"\n    entrypoint: main\n";

    #[test]
    fn reads_identity_and_runner() {
        let m = Manifest::parse(OK).unwrap();
        assert_eq!(m.identity(), "sri/sample:0.1.0");
        assert_eq!(m.entrypoint, "main");
        assert_eq!(m.python_version.as_deref(), Some("3.12"));
        for v in ["0.0.1", "1.2", "1.2.3.4", "1.0.0-beta_1", "2025.1.1"] {
            assert!(is_version(v), "{v}");
        }
        check_identity("acme-foo", "foo_bar", "1.0.0").unwrap();
        assert_eq!(m.memory_bytes, None);
    }

    #[test]
    fn reads_the_declared_memory() {
        let with = |v: &str| Manifest::parse(&format!("{OK}resource:\n  memory: {v}\n"));
        assert_eq!(with("268435456").unwrap().memory_bytes, Some(268_435_456));
        assert_eq!(with("\"1048576\"").unwrap().memory_bytes, Some(1_048_576));
        assert_eq!(with("0").unwrap().memory_bytes, None);
        let err = with("lots").unwrap_err();
        assert!(err.contains("resource.memory"), "{err}");
    }

    #[test]
    fn says_what_is_wrong() {
        for (text, needle) in [
            (OK.replace("python", "go"), "only `python`"),
            (
                OK.replace("entrypoint: main", "entrypoint: ../x"),
                "not a Python module",
            ),
            (
                OK.replace("    entrypoint: main\n", ""),
                "entrypoint` is missing",
            ),
            (OK.replace("author: sri\n", ""), "`author` is missing"),
            ("meta: [".to_string(), "not valid YAML"),
            (OK.replace("author: sri", "author: Sri"), "`author` `Sri`"),
            (OK.replace("author: sri", "author: \"a/../b\""), "`author`"),
            (
                OK.replace("name: sample", "name: foo.bar"),
                "`name` `foo.bar`",
            ),
            (
                OK.replace("name: sample", &format!("name: {}", "n".repeat(129))),
                "1 to 128",
            ),
            (OK.replace("version: 0.1.0", "version: 1"), "`version` `1`"),
            (
                OK.replace("version: 0.1.0", "version: 1.2.3.4.5"),
                "`version`",
            ),
            (
                OK.replace("version: 0.1.0", "version: 1.2.3-b@d"),
                "`version`",
            ),
            (
                OK.replace("version: 0.1.0", "version: 12345.0"),
                "`version`",
            ),
        ] {
            let err = Manifest::parse(&text).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn the_record_round_trips_and_meets_the_same_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RECORD_FILE);
        let m = Manifest::parse(&format!("{OK}resource:\n  memory: 268435456\n")).unwrap();
        std::fs::write(&path, m.record()).unwrap();
        assert_eq!(Manifest::load_record(&path).unwrap(), m);
        for (edit, needle) in [
            (r#""entrypoint": "main""#, r#""entrypoint": "../x""#),
            (r#""author": "sri""#, r#""author": "Sri""#),
            (r#""author": "sri""#, r#""author": "sri", "extra": 1"#),
            (r#""name": "sample""#, r#""name": " ""#),
        ] {
            let text = String::from_utf8(m.record()).unwrap().replace(edit, needle);
            assert_ne!(text.as_bytes(), m.record(), "{edit} is in the record");
            std::fs::write(&path, text).unwrap();
            let e = Manifest::load_record(&path).unwrap_err().to_string();
            assert!(e.contains(RECORD_FILE), "{e}");
        }
    }
}
