//! The plugin's memory limit, and where it came from: kept apart because the same figure is
//! written to the cgroup and quoted, with its source, in the error of a plugin killed at it.

use super::{MIB, Options};

/// The memory limit and where it came from.
#[derive(Debug, Clone)]
pub(super) struct Memory {
    /// The limit.
    pub(super) bytes: u64,
    /// The setting it came from, as the operator knows it.
    pub(super) source: String,
}

/// The memory limit: the operator's override, else the manifest's `resource.memory`, never
/// above the ceiling; with where it came from, for the error of a plugin killed at it.
pub(super) fn memory_limit(manifest: Option<u64>, o: &Options) -> Memory {
    let ceiling = o.memory_max_mb.saturating_mul(MIB);
    let (bytes, source) = match (o.memory_mb, manifest) {
        (Some(mb), _) => (mb.saturating_mul(MIB), "SRI_SANDBOX_MEMORY_MB".to_owned()),
        (None, Some(b)) => (b, "the manifest's resource.memory".to_owned()),
        (None, None) => (
            ceiling,
            "SRI_SANDBOX_MEMORY_MAX_MB (the manifest declares no resource.memory)".to_owned(),
        ),
    };
    if bytes > ceiling {
        return Memory {
            bytes: ceiling,
            source: format!(
                "the ceiling SRI_SANDBOX_MEMORY_MAX_MB ({source} asks for {} MiB)",
                bytes.div_ceil(MIB)
            ),
        };
    }
    Memory { bytes, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::Mode;

    fn opts() -> Options {
        Options {
            mode: Mode::Auto,
            memory_mb: None,
            memory_max_mb: 1024,
            pids: 10,
            nofile: 10,
            fsize_mb: 1,
            tmp_mb: 1,
            hide: Vec::new(),
        }
    }

    #[test]
    fn the_memory_limit_says_where_it_came_from() {
        let o = opts();
        let m = memory_limit(Some(256 * MIB), &o);
        assert_eq!(m.bytes, 256 * MIB);
        assert!(m.source.contains("resource.memory"), "{}", m.source);
        let m = memory_limit(Some(4096 * MIB), &o);
        assert_eq!(m.bytes, 1024 * MIB);
        assert!(m.source.contains("SRI_SANDBOX_MEMORY_MAX_MB") && m.source.contains("4096"));
        let m = memory_limit(
            Some(256 * MIB),
            &Options {
                memory_mb: Some(300),
                ..o.clone()
            },
        );
        assert_eq!(m.bytes, 300 * MIB);
        assert!(m.source.contains("SRI_SANDBOX_MEMORY_MB"));
        let m = memory_limit(None, &o);
        assert_eq!(m.bytes, 1024 * MIB);
        assert!(m.source.contains("declares no resource.memory"));
    }
}
