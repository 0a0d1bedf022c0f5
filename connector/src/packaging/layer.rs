//! The shared SDK layer: `dify_plugin` and its dependencies built once per (SDK version, Python
//! minor, architecture) as a Lambda layer, so that a plugin's own zip carries only the plugin and
//! what the layer does not already hold byte for byte.
//!
//! The layer zip is `python/…` (Lambda mounts it at `/opt`, so `/opt/python`) plus
//! `sri-layer.json`, the [`Manifest`] of the distributions it holds. It is installed with the
//! same flags, platform and bytecode as a function's `vendor/` ([`super::wheels`],
//! [`super::bytecode`]), zipped deterministically ([`super::archive`]) and cached under
//! `cache_dir/layers/` by its inputs; its identity is the sha256 of the zip.
//!
//! The resolution stays the plugin's own: the function's dependencies are installed into
//! `vendor/` exactly as without a layer, the SDK version is the one that resolution chose, and
//! [`trim`] then removes from `vendor/` only the distributions the layer holds with the same
//! name, version and installed files (their `RECORD` hashes). Everything else stays in
//! `vendor/`, which comes first on `PYTHONPATH` ([`PYTHONPATH`]), so a plugin pinning another
//! version of a layer package imports its own copy.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use super::archive::{self, io_err};
use super::{Options, Target, bytecode, human, wheels};
use crate::Error;
use crate::backend::Progress;
use crate::requirements::{Dependencies, Requirement};

/// The distribution whose version names a layer.
pub const SDK_DIST: &str = "dify-plugin";
/// Where a layer's packages are, relative to the layer's root (`/opt` on Lambda).
pub const SITE: &str = "python";
/// The manifest's name inside the layer.
pub const MANIFEST: &str = "sri-layer.json";
/// A function's `SRI_PYTHONPATH` on Lambda when it uses a layer: its own `vendor/` first.
pub const PYTHONPATH: &str = "/var/task/vendor:/opt/python";
/// Bumped whenever the layer's layout changes for the same inputs.
const LAYER_LAYOUT: &str = "sri-sdk-layer/1";

/// What a function records about the layer it needs (`sri-function.json`'s `layer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// Hex sha256 of the layer zip: its identity.
    pub sha256: String,
    /// The `dify_plugin` version the layer holds.
    pub sdk_version: String,
}

/// One distribution installed in a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dist {
    /// Its version, as its metadata states it.
    pub version: String,
    /// Hex sha256 over its `RECORD`'s (path, hash) lines, sorted: the files as installed.
    pub record: String,
}

/// What a layer holds (`sri-layer.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The `dify_plugin` version.
    pub sdk_version: String,
    /// What it was built for.
    pub target: Target,
    /// Normalised distribution name (PEP 503) → what is installed.
    pub distributions: BTreeMap<String, Dist>,
}

impl Manifest {
    /// What the layer whose packages are installed in `site` holds.
    fn of(sdk_version: &str, target: Target, site: &Path) -> Result<Self, Error> {
        Ok(Self {
            sdk_version: sdk_version.to_owned(),
            target,
            distributions: installed(site)?
                .into_iter()
                .map(|d| {
                    let dist = Dist {
                        version: d.version,
                        record: d.record,
                    };
                    (d.name, dist)
                })
                .collect(),
        })
    }
}

/// A built layer zip.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layer {
    /// The zip (in the cache directory: copy it, do not move it).
    pub zip: PathBuf,
    /// Its cache key.
    pub key: String,
    /// Hex sha256 of the zip: the layer's identity.
    pub sha256: String,
    /// Size of the zip.
    pub zipped_bytes: u64,
    /// Sum of the sizes of its files (counts against Lambda's unzipped limit of every function
    /// that uses it).
    pub unzipped_bytes: u64,
    /// What it holds.
    pub manifest: Manifest,
    /// Whether it came from the cache.
    #[serde(skip)]
    pub cache_hit: bool,
}

impl Layer {
    /// What a function using this layer records.
    pub fn reference(&self) -> LayerRef {
        LayerRef {
            sha256: self.sha256.clone(),
            sdk_version: self.manifest.sdk_version.clone(),
        }
    }

    /// Whether the zip must be uploaded through S3.
    pub fn needs_s3(&self) -> bool {
        self.zipped_bytes > super::DIRECT_UPLOAD_LIMIT
    }
}

/// A distribution found installed in a site directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Normalised name (PEP 503).
    pub name: String,
    /// Version from its metadata.
    pub version: String,
    /// Its `*.dist-info` directory.
    pub dist_info: PathBuf,
    /// See [`Dist::record`].
    pub record: String,
}

/// PEP 503's normalised form of a distribution name (`Foo.Bar_baz` → `foo-bar-baz`).
pub fn normalize(name: &str) -> String {
    match pep508_rs::PackageName::from_str(name.trim()) {
        Ok(n) => n.to_string(),
        // Not a valid name: still compared the way PEP 503 says, so it matches nothing valid.
        Err(_) => name.trim().to_ascii_lowercase(),
    }
}

/// The distributions installed in `site` (a `--target` directory), from their `*.dist-info`.
/// Entries that are not real directories (links) or lack a name or version are ignored.
pub fn installed(site: &Path) -> Result<Vec<Installed>, Error> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(site) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(site, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err(site, e))?;
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if !is_dir || !entry.file_name().to_string_lossy().ends_with(".dist-info") {
            continue;
        }
        // A dependency's wheel writes these files: read no more of them than a real one needs.
        let Some(metadata) = read_capped(&path.join("METADATA"), MAX_METADATA_HEAD) else {
            continue;
        };
        let (mut name, mut version) = (None, None);
        // The headers end at the first empty line; the description follows.
        for line in metadata.lines().take_while(|l| !l.is_empty()) {
            if let Some(v) = line.strip_prefix("Name:") {
                name = Some(normalize(v));
            } else if let Some(v) = line.strip_prefix("Version:") {
                version = Some(v.trim().to_owned());
            }
        }
        let (Some(name), Some(version)) = (name, version) else {
            continue;
        };
        // An oversized RECORD matches no layer's: its distribution is never trimmed.
        let record = match read_capped(&path.join("RECORD"), MAX_RECORD) {
            Some(r) if r.len() < MAX_RECORD => record_digest(&r),
            _ => "oversized".to_owned(),
        };
        out.push(Installed {
            name,
            version,
            record,
            dist_info: path,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// How much of a `METADATA` is read: its headers come first, and real ones fit many times over.
const MAX_METADATA_HEAD: usize = 256 * 1024;
/// Largest `RECORD` read (real ones, thousands of files, are well under 1 MiB).
const MAX_RECORD: usize = 16 * 1024 * 1024;

/// At most `cap` bytes of the file at `path` (lossy UTF-8), or `None` when it cannot be read.
fn read_capped(path: &Path, cap: usize) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(cap as u64)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Longest SDK version accepted (it names the layer and goes into its description).
const MAX_VERSION: usize = 64;

/// The `dify_plugin` version installed in `site`, if any. It comes from a package's resolution,
/// and becomes a requirement, a layer name and a description, so it must be a PEP 440 version
/// (what any real release has); anything else is refused.
pub fn sdk_version(site: &Path) -> Result<Option<String>, Error> {
    let Some(v) = installed(site)?
        .into_iter()
        .find(|d| d.name == SDK_DIST)
        .map(|d| d.version)
    else {
        return Ok(None);
    };
    check_version(&v).map(Some)
}

/// `v` when it is a PEP 440 version of at most [`MAX_VERSION`] characters.
fn check_version(v: &str) -> Result<String, Error> {
    let parsed = pep508_rs::pep440_rs::Version::from_str(v).ok();
    match parsed {
        Some(p) if v.len() <= MAX_VERSION => Ok(p.to_string()),
        _ => Err(Error::Packaging(format!(
            "the dependencies installed dify_plugin with the version `{}`, which is not a PEP 440 \
             version of at most {MAX_VERSION} characters, so no SDK layer can be built for it; \
             depend on a released dify_plugin, or set SRI_LAMBDA_SDK_LAYER=false",
            v.chars().take(MAX_VERSION).collect::<String>()
        ))),
    }
}

/// The paths a `RECORD` lists (first CSV field; quoted fields may hold commas).
fn record_rows(record: &str) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for line in record.lines() {
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    cur.push('"');
                    chars.next();
                }
                '"' => quoted = !quoted,
                ',' if !quoted => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if !fields[0].is_empty() {
            let hash = fields.get(1).cloned().unwrap_or_default();
            rows.push((fields.swap_remove(0), hash));
        }
    }
    rows
}

/// See [`Dist::record`]: only lines with a hash (the files themselves, not `RECORD` or
/// bytecode an installer may list without one), sorted.
fn record_digest(record: &str) -> String {
    let mut lines: Vec<String> = record_rows(record)
        .into_iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(p, h)| format!("{p},{h}"))
        .collect();
    lines.sort();
    hex::encode(Sha256::digest(lines.join("\n").as_bytes()))
}

/// Removes from `vendor` every distribution the layer holds identically (same normalised name,
/// version and installed files): the files its `RECORD` lists, then its `*.dist-info`, then the
/// directories that became empty. Returns `name==version` of what was removed. A `RECORD` path
/// leaving `vendor` (absolute, `..`) or through a link is never followed.
pub fn trim(vendor: &Path, layer: &Manifest) -> Result<Vec<String>, Error> {
    let (same, kept): (Vec<Installed>, Vec<Installed>) =
        installed(vendor)?.into_iter().partition(|d| {
            layer
                .distributions
                .get(&d.name)
                .is_some_and(|l| l.version == d.version && l.record == d.record)
        });
    // Files a distribution that stays also lists (a shared `__init__.py`, two builds of one
    // package): taking them away would break it, so their owner is not trimmed either.
    let shared: std::collections::HashSet<String> = kept
        .iter()
        .flat_map(|d| record_rows(&read_record(&d.dist_info)))
        .map(|(path, _)| path)
        .collect();
    let mut removed = Vec::new();
    for d in same {
        let record = read_record(&d.dist_info);
        let rows = record_rows(&record);
        // Trimmed whole or not at all: a half-removed package would shadow the layer's copy.
        let intact = rows
            .iter()
            .all(|(path, hash)| !shared.contains(path) && as_installed(vendor, path, hash));
        if !intact {
            continue;
        }
        let mut parents = Vec::new();
        for (path, _) in rows {
            let rel = Path::new(&path);
            if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                continue;
            }
            let full = vendor.join(rel);
            if through_link(vendor, rel) {
                continue;
            }
            match std::fs::symlink_metadata(&full) {
                Ok(m) if !m.is_dir() => {
                    std::fs::remove_file(&full).map_err(|e| io_err(&full, e))?;
                    if let Some(p) = full.parent() {
                        parents.push(p.to_path_buf());
                    }
                }
                _ => {}
            }
        }
        std::fs::remove_dir_all(&d.dist_info).map_err(|e| io_err(&d.dist_info, e))?;
        // Deepest first; a directory another distribution shares (a namespace) stays.
        parents.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        parents.dedup();
        for p in parents {
            prune_empty(vendor, &p);
        }
        removed.push(format!("{}=={}", d.name, d.version));
    }
    Ok(removed)
}

/// A distribution's `RECORD`, within [`MAX_RECORD`].
fn read_record(dist_info: &Path) -> String {
    read_capped(&dist_info.join("RECORD"), MAX_RECORD).unwrap_or_default()
}

/// Whether the file `rel` under `root` is as its `RECORD` line says (`sha256=` urlsafe base64,
/// unpadded). A line without a hash (the `RECORD` itself, bytecode) says nothing to check; a
/// path that leaves `root` or passes through a link is not checked here (never removed).
fn as_installed(root: &Path, rel: &str, hash: &str) -> bool {
    use base64::Engine;
    if hash.is_empty() {
        return true;
    }
    let rel_path = Path::new(rel);
    if !rel_path
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
        || through_link(root, rel_path)
    {
        return true;
    }
    let Some(want) = hash.strip_prefix("sha256=") else {
        return false;
    };
    let full = root.join(rel_path);
    match std::fs::symlink_metadata(&full) {
        Ok(m) if m.is_file() => {}
        // Gone already, or a link: nothing of the file's content to protect.
        Ok(_) | Err(_) => return true,
    }
    let Ok(mut file) = std::fs::File::open(&full) else {
        return false;
    };
    let mut hasher = Sha256::new();
    if std::io::copy(&mut file, &mut hasher).is_err() {
        return false;
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hasher.finalize()) == want
}

/// Whether any directory between `root` and `root/rel` is a link.
fn through_link(root: &Path, rel: &Path) -> bool {
    let mut at = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for c in &parts[..parts.len().saturating_sub(1)] {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => return true,
            _ => {}
        }
    }
    false
}

/// Removes `dir` and its ancestors below `root` while they are empty (`__pycache__` left by an
/// installer counts as empty).
fn prune_empty(root: &Path, dir: &Path) {
    let mut at = dir.to_path_buf();
    while at.starts_with(root) && at != root {
        let cache = at.join("__pycache__");
        if cache.is_dir() && !cache.is_symlink() {
            let only_pyc = std::fs::read_dir(&cache).is_ok_and(|mut e| {
                e.all(|f| f.is_ok_and(|f| f.file_name().to_string_lossy().ends_with(".pyc")))
            });
            if only_pyc && let Ok(mut rest) = std::fs::read_dir(&at) {
                let only_cache = rest.all(|f| f.is_ok_and(|f| f.file_name() == "__pycache__"));
                if only_cache {
                    let _ = std::fs::remove_dir_all(&cache);
                }
            }
        }
        if std::fs::remove_dir(&at).is_err() {
            return;
        }
        if !at.pop() {
            return;
        }
    }
}

/// The cache key of the layer of `sdk_version` for `opts` with bytecode by `bytecode`.
fn key(opts: &Options, sdk_version: &str, bytecode: Option<&str>) -> Result<String, Error> {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &str| {
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value.as_bytes());
    };
    field("layout", LAYER_LAYOUT);
    field("packager", env!("CARGO_PKG_VERSION"));
    field("sdk", sdk_version);
    field("arch", opts.target.arch.lambda_name());
    field("python", opts.target.python.as_str());
    field("platform", &opts.target.uv_platform());
    field("offline", if opts.offline { "1" } else { "0" });
    field("bytecode", bytecode.unwrap_or("none"));
    field("index", opts.index_url.as_deref().unwrap_or(""));
    field(
        "wheelhouse",
        &match &opts.wheelhouse {
            Some(dir) => super::cache::wheelhouse_listing(dir)?,
            None => String::new(),
        },
    );
    Ok(hex::encode(h.finalize()))
}

fn cache_dir(opts: &Options) -> PathBuf {
    opts.cache_dir.join("layers")
}

/// Whether `s` is a hex sha256 (what names a layer, also as a directory name).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The cached layer for `key`, if a complete one exists.
pub fn load(cache: &Path, key: &str) -> Option<Layer> {
    let (zip, json) = super::cache::paths(&cache.join("layers"), key);
    let mut layer: Layer = serde_json::from_slice(&std::fs::read(&json).ok()?).ok()?;
    if !is_sha256(&layer.sha256) || std::fs::metadata(&zip).ok()?.len() != layer.zipped_bytes {
        return None;
    }
    layer.zip = zip;
    layer.cache_hit = true;
    Some(layer)
}

/// Builds (or finds in the cache) the layer of `dify_plugin==sdk_version` for `opts.target`,
/// with bytecode by `interpreter`.
pub async fn build(
    opts: &Options,
    sdk_version: &str,
    interpreter: Option<&bytecode::Interpreter>,
    progress: &Progress,
) -> Result<Layer, Error> {
    let say = |msg: String| {
        let _ = progress.send(("layer", msg));
    };
    let key = key(opts, sdk_version, interpreter.map(|i| i.version.as_str()))?;
    let dir = cache_dir(opts);
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let _turn = super::cache::lock(&dir, &key).await?;
    if let Some(hit) = load(&opts.cache_dir, &key) {
        say(format!(
            "cached SDK layer dify_plugin {sdk_version} ({})",
            human(hit.zipped_bytes)
        ));
        return Ok(hit);
    }
    let work = opts.cache_dir.join("tmp").join(format!(
        "layer-{}-{}-{}",
        &key[..16],
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = build_in(opts, sdk_version, interpreter, &work, &key, &say).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn build_in(
    opts: &Options,
    sdk_version: &str,
    interpreter: Option<&bytecode::Interpreter>,
    work: &Path,
    key: &str,
    say: &(dyn Fn(String) + Sync),
) -> Result<Layer, Error> {
    let root = work.join("root");
    let site = root.join(SITE);
    std::fs::create_dir_all(&site).map_err(|e| io_err(&site, e))?;
    say(format!(
        "building the SDK layer: dify_plugin=={sdk_version} for {}",
        opts.target
    ));
    let deps = Dependencies {
        file: "requirements.txt",
        requirements: vec![Requirement {
            spec: format!("dify_plugin=={sdk_version}"),
            hashes: Vec::new(),
            line: 1,
        }],
    };
    wheels::install(opts, &deps, &site, work).await?;
    let scripts = site.join("bin");
    if scripts.is_dir() {
        std::fs::remove_dir_all(&scripts).map_err(|e| io_err(&scripts, e))?;
    }
    if let Some(py) = interpreter
        && let Some(failures) = bytecode::compile(py, &root, &[SITE], "/opt").await?
    {
        tracing::warn!(python = %py.version, output = %failures, "some layer files did not compile");
    }
    let manifest = Manifest::of(sdk_version, opts.target, &site)?;
    let manifest_path = root.join(MANIFEST);
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).expect("manifest serializes"),
    )
    .map_err(|e| io_err(&manifest_path, e))?;
    let entries = archive::entries(&root)?;
    let unzipped_bytes: u64 = entries.iter().map(|e| e.size).sum();
    let tmp_zip = work.join("layer.zip");
    let tmp = tmp_zip.clone();
    let (zipped_bytes, _) = tokio::task::spawn_blocking(move || archive::write_zip(&entries, &tmp))
        .await
        .map_err(|e| Error::Packaging(format!("layer zip task failed: {e}")))??;
    let sha256 = file_sha256(&tmp_zip)?;
    let (zip, json) = super::cache::paths(&cache_dir(opts), key);
    std::fs::rename(&tmp_zip, &zip).map_err(|e| io_err(&zip, e))?;
    let layer = Layer {
        zip,
        key: key.to_owned(),
        sha256,
        zipped_bytes,
        unzipped_bytes,
        manifest,
        cache_hit: false,
    };
    let tmp_json = json.with_extension(format!("json.tmp{}", std::process::id()));
    std::fs::write(
        &tmp_json,
        serde_json::to_vec_pretty(&layer).expect("layer serializes"),
    )
    .map_err(|e| io_err(&tmp_json, e))?;
    std::fs::rename(&tmp_json, &json).map_err(|e| io_err(&json, e))?;
    say(format!(
        "built the SDK layer dify_plugin {sdk_version}: {} distributions, {} ({} unzipped)",
        layer.manifest.distributions.len(),
        human(zipped_bytes),
        human(unzipped_bytes)
    ));
    Ok(layer)
}

/// Hex sha256 of a file.
pub fn file_sha256(path: &Path) -> Result<String, Error> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| io_err(path, e))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packaging::{Arch, PythonVersion};

    /// Installs a fake distribution the way an installer lays one out.
    fn install(site: &Path, name: &str, dist_dir: &str, version: &str, files: &[(&str, &str)]) {
        let info = site.join(format!("{dist_dir}-{version}.dist-info"));
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(
            info.join("METADATA"),
            format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nName: not-this\n"),
        )
        .unwrap();
        let mut record = String::new();
        for (path, content) in files {
            let p = site.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
            let quoted = if path.contains(',') {
                format!("\"{path}\"")
            } else {
                (*path).to_owned()
            };
            record.push_str(&format!(
                "{quoted},sha256={},{}\n",
                base64::Engine::encode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    Sha256::digest(content.as_bytes())
                ),
                content.len()
            ));
        }
        record.push_str(&format!("{dist_dir}-{version}.dist-info/RECORD,,\n"));
        std::fs::write(info.join("RECORD"), record).unwrap();
    }

    fn manifest_of(site: &Path) -> Manifest {
        Manifest::of(
            "0.10.2",
            Target {
                arch: Arch::X86_64,
                python: PythonVersion::Py312,
            },
            site,
        )
        .unwrap()
    }

    #[test]
    fn only_pep_440_sdk_versions_name_a_layer() {
        assert_eq!(check_version("0.10.2").unwrap(), "0.10.2");
        assert_eq!(check_version("1.0rc1").unwrap(), "1.0rc1");
        for bad in [
            "0.10.2 --index-url=http://evil/",
            "0.10.2; rm",
            "",
            &"1.".repeat(40),
        ] {
            let e = check_version(bad).unwrap_err().to_string();
            assert!(
                e.contains("PEP 440") && e.contains("SRI_LAMBDA_SDK_LAYER=false"),
                "{e}"
            );
        }
    }

    #[test]
    fn names_are_normalised_as_pep_503_says() {
        assert_eq!(normalize("Foo.Bar__baz"), "foo-bar-baz");
        assert_eq!(normalize(" dify_plugin"), "dify-plugin");
        assert_eq!(normalize("PyYAML"), "pyyaml");
        assert_eq!(normalize("zope.interface"), "zope-interface");
    }

    #[test]
    fn trimming_removes_identical_distributions_and_keeps_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let (layer, vendor) = (tmp.path().join("layer"), tmp.path().join("vendor"));
        // The layer: the SDK, `packaging` 26.3 and a namespace package.
        install(
            &layer,
            "dify_plugin",
            "dify_plugin",
            "0.10.2",
            &[("dify_plugin/__init__.py", "sdk")],
        );
        install(
            &layer,
            "packaging",
            "packaging",
            "26.3",
            &[("packaging/__init__.py", "v26.3")],
        );
        install(
            &layer,
            "Zope.Interface",
            "zope.interface",
            "8.7",
            &[
                ("zope/interface/__init__.py", "zi"),
                ("zope/odd,name.py", "x"),
            ],
        );
        install(
            &layer,
            "same-version",
            "same_version",
            "1.0",
            &[("sv.py", "layer build")],
        );
        let manifest = manifest_of(&layer);
        assert_eq!(manifest.distributions["zope-interface"].version, "8.7");

        // The plugin's resolution: the same SDK, another `packaging`, the namespace package
        // spelled otherwise, its own sibling in the namespace, a package of its own, and one
        // of the same version whose files differ (another build).
        install(
            &vendor,
            "dify-plugin",
            "dify_plugin",
            "0.10.2",
            &[("dify_plugin/__init__.py", "sdk")],
        );
        install(
            &vendor,
            "packaging",
            "packaging",
            "26.2",
            &[("packaging/__init__.py", "v26.2")],
        );
        install(
            &vendor,
            "zope_interface",
            "zope.interface",
            "8.7",
            &[
                ("zope/interface/__init__.py", "zi"),
                ("zope/odd,name.py", "x"),
            ],
        );
        install(
            &vendor,
            "zope.event",
            "zope.event",
            "6.2",
            &[("zope/event/__init__.py", "ze")],
        );
        install(&vendor, "mine", "mine", "1.0", &[("mine.py", "mine")]);
        install(
            &vendor,
            "same_version",
            "same_version",
            "1.0",
            &[("sv.py", "other build")],
        );
        std::fs::create_dir_all(vendor.join("dify_plugin/__pycache__")).unwrap();
        std::fs::write(
            vendor.join("dify_plugin/__pycache__/__init__.cpython-312.pyc"),
            "",
        )
        .unwrap();

        let mut removed = trim(&vendor, &manifest).unwrap();
        removed.sort();
        assert_eq!(removed, ["dify-plugin==0.10.2", "zope-interface==8.7"]);
        assert!(
            !vendor.join("dify_plugin").exists(),
            "emptied package dir pruned"
        );
        assert!(!vendor.join("dify_plugin-0.10.2.dist-info").exists());
        assert!(!vendor.join("zope/interface").exists());
        assert!(
            !vendor.join("zope/odd,name.py").exists(),
            "quoted RECORD path"
        );
        assert!(
            vendor.join("zope/event/__init__.py").exists(),
            "namespace sibling kept"
        );
        assert_eq!(
            std::fs::read_to_string(vendor.join("packaging/__init__.py")).unwrap(),
            "v26.2",
            "another version stays"
        );
        assert!(vendor.join("packaging-26.2.dist-info/RECORD").exists());
        assert!(vendor.join("mine.py").exists());
        assert_eq!(
            std::fs::read_to_string(vendor.join("sv.py")).unwrap(),
            "other build",
            "same version, other files: kept"
        );
        assert_eq!(sdk_version(&layer).unwrap().as_deref(), Some("0.10.2"));
        assert_eq!(sdk_version(&vendor).unwrap(), None);
    }

    /// Found in review: a distribution was trimmed by its RECORD alone, taking away files that
    /// a distribution staying in `vendor/` also installed or had overwritten.
    #[test]
    fn only_whole_unshared_unchanged_distributions_are_trimmed() {
        let tmp = tempfile::tempdir().unwrap();
        let (layer, vendor) = (tmp.path().join("layer"), tmp.path().join("vendor"));
        for site in [&layer, &vendor] {
            install(site, "shared", "shared", "1.0", &[("ns/__init__.py", "")]);
            install(
                site,
                "changed",
                "changed",
                "1.0",
                &[("changed.py", "as built")],
            );
            install(site, "plain", "plain", "1.0", &[("plain.py", "p")]);
        }
        // Staying in vendor/ (not in the layer): lists the same `ns/__init__.py`.
        install(
            &vendor,
            "other",
            "other",
            "2.0",
            &[("ns/__init__.py", ""), ("ns/o.py", "o")],
        );
        // Overwritten after `changed` was installed (a later distribution wrote it).
        std::fs::write(vendor.join("changed.py"), "overwritten").unwrap();
        let removed = trim(&vendor, &manifest_of(&layer)).unwrap();
        assert_eq!(removed, ["plain==1.0"]);
        assert!(vendor.join("ns/__init__.py").exists(), "shared file kept");
        assert!(
            vendor.join("shared-1.0.dist-info").exists(),
            "its owner kept whole"
        );
        assert_eq!(
            std::fs::read_to_string(vendor.join("changed.py")).unwrap(),
            "overwritten"
        );
        assert!(vendor.join("changed-1.0.dist-info").exists());
        assert!(!vendor.join("plain.py").exists());
    }

    /// Found in review: METADATA and RECORD come from a dependency's wheel and were read whole.
    #[test]
    fn oversized_metadata_and_records_are_read_only_so_far() {
        let tmp = tempfile::tempdir().unwrap();
        let (layer, vendor) = (tmp.path().join("layer"), tmp.path().join("vendor"));
        for site in [&layer, &vendor] {
            install(site, "big", "big", "1.0", &[("big.py", "b")]);
        }
        let info = vendor.join("big-1.0.dist-info");
        let mut metadata = std::fs::read_to_string(info.join("METADATA")).unwrap();
        metadata.push_str(&"description\n".repeat(MAX_METADATA_HEAD));
        std::fs::write(info.join("METADATA"), metadata).unwrap();
        let listed = installed(&vendor).unwrap();
        assert_eq!(
            (listed[0].name.as_str(), listed[0].version.as_str()),
            ("big", "1.0")
        );
        let mut record = std::fs::read_to_string(info.join("RECORD")).unwrap();
        record.push_str(&"x.py,,\n".repeat(MAX_RECORD / 6));
        std::fs::write(info.join("RECORD"), record).unwrap();
        assert!(trim(&vendor, &manifest_of(&layer)).unwrap().is_empty());
        assert!(
            vendor.join("big.py").exists(),
            "an oversized RECORD is never trimmed by"
        );
    }

    #[test]
    fn a_record_never_reaches_outside_vendor() {
        let tmp = tempfile::tempdir().unwrap();
        let (layer, vendor) = (tmp.path().join("layer"), tmp.path().join("vendor"));
        let outside = tmp.path().join("outside.txt");
        std::fs::write(&outside, "keep").unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("f.py"), "keep").unwrap();
        for site in [&layer, &vendor] {
            install(site, "evil", "evil", "1.0", &[("evil.py", "e")]);
            let rec = site.join("evil-1.0.dist-info/RECORD");
            let mut text = std::fs::read_to_string(&rec).unwrap();
            text.push_str(&format!(
                "../outside.txt,sha256=x,1\n{},sha256=y,1\nlink/f.py,sha256=z,1\n",
                outside.display()
            ));
            std::fs::write(&rec, text).unwrap();
        }
        std::os::unix::fs::symlink(&elsewhere, vendor.join("link")).unwrap();
        let removed = trim(&vendor, &manifest_of(&layer)).unwrap();
        assert_eq!(removed, ["evil==1.0"]);
        assert!(!vendor.join("evil.py").exists());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        assert_eq!(
            std::fs::read_to_string(elsewhere.join("f.py")).unwrap(),
            "keep"
        );
    }
}
