//! What the backends that run functions on this machine (`local`, `emulator`) keep about each
//! function, and the one rule both apply when collecting old ones. One record format and one
//! rule, so `gc` and restart re-adoption behave the same whichever of the two runs a plugin.

use std::collections::HashMap;
use std::path::Path;

use super::Function;

/// A function's `meta.json`: what it is and when it was made.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// The function.
    pub function: Function,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// Of `metas`, the ones `gc` removes: all but the newest `keep` (at least one) of each plugin.
pub fn superseded(metas: impl IntoIterator<Item = Meta>, keep: usize) -> Vec<Meta> {
    let mut by_plugin: HashMap<String, Vec<Meta>> = HashMap::new();
    for m in metas {
        let plugin = m
            .function
            .identifier
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        by_plugin.entry(plugin).or_default().push(m);
    }
    let mut old = Vec::new();
    for (_, mut metas) in by_plugin {
        metas.sort_by_key(|m| std::cmp::Reverse(m.created_at));
        old.extend(metas.into_iter().skip(keep.max(1)));
    }
    old
}

/// The directories in `dir` that interrupted launches left (`.{name}.tmp-…`), with their names.
pub async fn leftovers(dir: &Path) -> std::io::Result<Vec<(String, std::path::PathBuf)>> {
    let mut found = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Ok(Some(e)) = entries.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            found.push((name, e.path()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(identifier: &str, created_at: u64) -> Meta {
        Meta {
            function: Function {
                name: format!("f{created_at}"),
                identifier: identifier.into(),
                checksum: String::new(),
            },
            created_at,
        }
    }

    #[test]
    fn keeps_the_newest_of_each_plugin() {
        let all = vec![
            meta("a/p:1@x", 1),
            meta("a/p:2@y", 3),
            meta("a/p:3@z", 2),
            meta("b/q:1@x", 1),
        ];
        let mut old: Vec<u64> = superseded(all.clone(), 1)
            .into_iter()
            .map(|m| m.created_at)
            .collect();
        old.sort();
        assert_eq!(old, vec![1, 2]);
        assert_eq!(
            superseded(all.clone(), 0).len(),
            2,
            "keep 0 still keeps one"
        );
        assert!(superseded(all, 2).iter().all(|m| m.created_at == 1));
    }
}
