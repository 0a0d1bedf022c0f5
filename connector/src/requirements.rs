//! A plugin's dependency list, read as data: `requirements.txt`, or `[project] dependencies` of
//! `pyproject.toml`, parsed here before any installer runs, by both the local backend and the
//! Lambda packaging.
//!
//! Why: installers treat those files as command lines. A package that says `-r /proc/self/environ`
//! makes pip or uv echo the connector's environment into its error (and that error reaches every
//! workspace user through the launch stream); `--index-url`, `--find-links`, `-e`, paths, `git+`
//! URLs and `name @ URL` turn the connector host into the package's network client and file
//! reader. So only what describes *which* distributions to install is accepted:
//!
//! - PEP 508 requirements: name, extras, version specifiers, environment markers;
//! - `--hash=<alg>:<hex>` after a requirement (what `uv export` and `pip-compile` write);
//! - comments and `\` line continuations (pip's rules: a `#` at the start of a line or after
//!   whitespace starts a comment).
//!
//! Everything else is refused with the file, the line and the rule. Installers never see the
//! package's file: they get [`Dependencies::to_requirements_txt`], written by the connector from
//! the parsed requirements in their canonical form (a file rather than arguments because hashes
//! can only be given in a file, and a long `uv export` would not fit a command line). Index,
//! proxy and CA settings come only from the operator (`SRI_INDEX_URL`, uv's and pip's own
//! variables and configuration files).
//!
//! PEP 508 itself is parsed by [`pep508_rs`] 0.9 (the standalone release of the parser uv grew
//! from, by one of uv's maintainers; uv's own fork, `uv-pep508`, is published only as "an
//! internal component crate of uv" with an unstable API and a newer MSRV than ours): the grammar
//! with its marker language and PEP 440 specifiers is large and subtle, and a second
//! hand-written copy would disagree with the installers in edge cases. It is used without its
//! `non-pep508-extensions` feature, so paths and bare URLs are not requirements. Only the
//! requirements-file layer around it (lines, comments, continuations, `--hash`) is ours, because
//! that is exactly where the forbidden forms live. Before it parses, a requirement is bounded
//! (4 KiB, 16 levels of marker parentheses: the parser recurses on them).

use std::path::Path;
use std::str::FromStr;

use crate::Error;

/// Largest dependency file read (a `uv export` with hashes of a large plugin is ~100 KiB).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Longest package text echoed back in an error.
const ECHO_CHARS: usize = 120;

/// One accepted requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// The requirement in canonical PEP 508 form (as [`pep508_rs`] prints it).
    pub spec: String,
    /// Its `--hash=` values (`sha256:<hex>`), in file order.
    pub hashes: Vec<String>,
    /// Where it was declared (1-based line).
    pub line: usize,
}

/// A plugin's dependencies, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependencies {
    /// The file they came from (`requirements.txt` or `pyproject.toml`).
    pub file: &'static str,
    /// The requirements, in file order.
    pub requirements: Vec<Requirement>,
}

impl Dependencies {
    /// Reads the dependencies of an unpacked plugin: `requirements.txt` when there is one, else
    /// `pyproject.toml`; `None` when there is neither. Links are never followed: the file must be
    /// a regular file of the plugin itself.
    pub fn read(plugin: &Path) -> Result<Option<Self>, Error> {
        for file in [REQUIREMENTS_TXT, PYPROJECT_TOML] {
            let path = plugin.join(file);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(refuse(file, 0, format!("cannot be read: {e}"))),
            };
            if !meta.file_type().is_file() {
                return Err(refuse(
                    file,
                    0,
                    "is not a regular file (links are not followed); ship the file itself".into(),
                ));
            }
            if meta.len() > MAX_FILE_BYTES {
                return Err(refuse(
                    file,
                    0,
                    format!(
                        "is {} bytes, over the {MAX_FILE_BYTES}-byte limit for a dependency list",
                        meta.len()
                    ),
                ));
            }
            let bytes = std::fs::read(&path)
                .map_err(|e| refuse(file, 0, format!("cannot be read: {e}")))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| refuse(file, 0, "is not UTF-8 text".into()))?;
            return if file == REQUIREMENTS_TXT {
                parse_requirements_txt(&text).map(Some)
            } else {
                parse_pyproject(&text).map(Some)
            };
        }
        Ok(None)
    }

    /// Whether there is nothing to install.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements file handed to the installer: one canonical requirement per line, with
    /// its hashes. Nothing of the package's own text but what was parsed.
    pub fn to_requirements_txt(&self) -> String {
        let mut out = format!("# {} of the plugin, as parsed by sri\n", self.file);
        for r in &self.requirements {
            out.push_str(&r.spec);
            for h in &r.hashes {
                out.push_str(" --hash=");
                out.push_str(h);
            }
            out.push('\n');
        }
        out
    }
}

const REQUIREMENTS_TXT: &str = "requirements.txt";
const PYPROJECT_TOML: &str = "pyproject.toml";

fn refuse(file: &str, line: usize, rule: String) -> Error {
    Error::Package(if line == 0 {
        format!("{file} {rule}")
    } else {
        format!("{file} line {line}: {rule}")
    })
}

/// Parses a `requirements.txt`.
pub fn parse_requirements_txt(text: &str) -> Result<Dependencies, Error> {
    let file = REQUIREMENTS_TXT;
    let mut requirements = Vec::new();
    let mut logical = Logical::default();
    let lines: Vec<&str> = text.lines().collect();
    for (i, raw) in lines.iter().enumerate() {
        let n = i + 1;
        // pip: a comment line ends a continuation rather than continuing it.
        let comment_only = raw.trim_start().starts_with('#');
        match raw.strip_suffix('\\') {
            Some(body) if !comment_only => logical.push(body, n),
            _ => {
                logical.push(raw, n);
                if let Some(r) = logical.take().parse(file, true)? {
                    requirements.push(r);
                }
            }
        }
    }
    // A continuation on the last line: pip takes what was gathered.
    if let Some(r) = logical.take().parse(file, true)? {
        requirements.push(r);
    }
    Ok(Dependencies { file, requirements })
}

/// Parses the `[project] dependencies` of a `pyproject.toml` (PEP 621).
pub fn parse_pyproject(text: &str) -> Result<Dependencies, Error> {
    #[derive(serde::Deserialize)]
    struct Pyproject {
        project: Option<Project>,
    }
    #[derive(serde::Deserialize)]
    struct Project {
        #[serde(default)]
        dependencies: Vec<toml::Spanned<String>>,
        #[serde(default)]
        dynamic: Vec<String>,
    }
    let file = PYPROJECT_TOML;
    let parsed: Pyproject = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(text, s.start)).max(1);
        refuse(
            file,
            line,
            format!("is not a valid PEP 621 file: {}", e.message()),
        )
    })?;
    let project = parsed.project.ok_or_else(|| {
        refuse(
            file,
            0,
            "has no [project] table: list the plugin's dependencies in [project] dependencies, \
             or ship a requirements.txt"
                .into(),
        )
    })?;
    if project.dynamic.iter().any(|d| d == "dependencies") {
        return Err(refuse(
            file,
            0,
            "declares its dependencies dynamic; list them in [project] dependencies, or ship a \
             requirements.txt"
                .into(),
        ));
    }
    let newlines: Vec<usize> = text
        .bytes()
        .enumerate()
        .filter(|(_, b)| *b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let mut requirements = Vec::new();
    for dep in project.dependencies {
        let line = newlines.partition_point(|nl| *nl < dep.span().start) + 1;
        let mut logical = Logical::default();
        logical.push(dep.get_ref(), line);
        match logical.parse(file, false)? {
            Some(r) => requirements.push(r),
            None => {
                return Err(refuse(
                    file,
                    line,
                    "an empty dependency string: remove it".into(),
                ));
            }
        }
    }
    Ok(Dependencies { file, requirements })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// One logical line: physical lines joined at their continuations, with where each part began.
#[derive(Default)]
struct Logical {
    text: String,
    /// (byte offset in `text`, physical line) of each joined part.
    parts: Vec<(usize, usize)>,
}

/// A whitespace-separated word of a logical line, with its physical line.
struct Word<'a> {
    text: &'a str,
    start: usize,
    line: usize,
}

impl Logical {
    fn push(&mut self, s: &str, line: usize) {
        self.parts.push((self.text.len(), line));
        self.text.push_str(s);
    }

    fn take(&mut self) -> Logical {
        std::mem::take(self)
    }

    /// The physical line of a byte of `text` (`parts` is sorted by offset).
    fn line_at(&self, offset: usize) -> usize {
        let i = self.parts.partition_point(|(start, _)| *start <= offset);
        self.parts.get(i.saturating_sub(1)).map_or(0, |p| p.1)
    }

    /// The requirement on this line, `None` for a blank or comment line. `txt`: the
    /// requirements-file layer applies (comments, `--hash`); a pyproject string is one bare
    /// PEP 508 requirement.
    fn parse(&self, file: &str, txt: bool) -> Result<Option<Requirement>, Error> {
        let mut text = self.text.as_str();
        if txt {
            text = strip_comment(text);
        }
        let words: Vec<Word<'_>> = words(text)
            .map(|(start, w)| Word {
                text: w,
                start,
                line: self.line_at(start),
            })
            .collect();
        let Some(first) = words.first() else {
            return Ok(None);
        };
        // Characters that change what an installer reads, whatever else the line says.
        if let Some((i, c)) = text
            .char_indices()
            .find(|(_, c)| c.is_control() && *c != '\t')
        {
            return Err(refuse(
                file,
                self.line_at(i),
                format!(
                    "control character {c:?} in a requirement: only printable text is accepted; \
                     {FIX}"
                ),
            ));
        }
        if let Some(i) = text.find("${") {
            return Err(refuse(
                file,
                self.line_at(i),
                format!(
                    "environment variable references (`${{…}}`) are not accepted: a package never \
                 reads the connector's environment; write the value itself; {FIX}"
                ),
            ));
        }
        if first.text.starts_with('-') {
            return Err(refuse(file, first.line, option_rule(first.text)));
        }
        // pip's split: the requirement runs up to the first word that is an option.
        let options_at = words
            .iter()
            .position(|w| w.text.starts_with('-'))
            .unwrap_or(words.len());
        let req_end = words[..options_at]
            .last()
            .map_or(0, |w| w.start + w.text.len());
        let req_text = text[first.start..req_end].trim();
        let spec = requirement(req_text).map_err(|rule| refuse(file, first.line, rule))?;
        let mut hashes = Vec::new();
        let mut rest = words[options_at..].iter();
        while let Some(w) = rest.next() {
            let value = match w.text.strip_prefix("--hash") {
                Some(v) if txt && v.starts_with('=') => &v[1..],
                Some("") if txt => match rest.next() {
                    Some(v) => v.text,
                    None => {
                        return Err(refuse(file, w.line, hash_rule("nothing")));
                    }
                },
                _ if txt => return Err(refuse(file, w.line, option_rule(w.text))),
                _ => {
                    return Err(refuse(
                        file,
                        w.line,
                        format!(
                            "`{}` is an installer option; a dependency string is one PEP 508 \
                             requirement, never an option (the index and sources are the \
                             operator's settings, e.g. SRI_INDEX_URL)",
                            echo(w.text)
                        ),
                    ));
                }
            };
            hashes.push(hash(value).map_err(|rule| refuse(file, w.line, rule))?);
        }
        Ok(Some(Requirement {
            spec,
            hashes,
            line: first.line,
        }))
    }
}

/// pip's comment rule: `#` at the start of the line or after whitespace.
fn strip_comment(s: &str) -> &str {
    let b = s.as_bytes();
    for (i, c) in b.iter().enumerate() {
        if *c == b'#' && (i == 0 || b[i - 1].is_ascii_whitespace()) {
            return &s[..i];
        }
    }
    s
}

fn words(s: &str) -> impl Iterator<Item = (usize, &str)> {
    s.split(|c: char| c.is_ascii_whitespace())
        .scan(0usize, |pos, w| {
            let start = *pos;
            *pos += w.len() + 1;
            Some((start, w))
        })
        .filter(|(_, w)| !w.is_empty())
}

/// At most [`ECHO_CHARS`] of package text, for an error message.
fn echo(s: &str) -> String {
    let mut out: String = s.chars().take(ECHO_CHARS).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

const FIX: &str = "a dependency file may only list PEP 508 requirements (name, extras, version \
                   specifiers, markers), each optionally followed by --hash=";

/// The rule an option breaks, with the fix for the common ones.
fn option_rule(word: &str) -> String {
    let name = word.split('=').next().unwrap_or(word);
    let why = match name {
        "-r" | "--requirement" | "-c" | "--constraint" => {
            "including or constraining by another file is not accepted: list those requirements \
             in this file instead"
        }
        "-e" | "--editable" => {
            "editable installs are not accepted (`uv export` writes `-e .` for the project \
             itself: export with --no-emit-project)"
        }
        "-i" | "--index-url" | "--extra-index-url" | "--no-index" | "-f" | "--find-links"
        | "--trusted-host" | "--index" | "--default-index" => {
            "indexes and package sources are the operator's settings (SRI_INDEX_URL, or uv's and \
             pip's own configuration), never the package's: remove the line"
        }
        "--hash" => "`--hash` must follow a requirement on the same (continued) line",
        _ => "installer options are not accepted: remove it",
    };
    format!("`{}` is refused: {why}; {FIX}", echo(name))
}

fn hash_rule(got: &str) -> String {
    format!(
        "`--hash=` takes `sha256:<64 hex digits>` (or sha384 / sha512), not {}",
        echo(got)
    )
}

/// A `--hash` value, checked: `alg:hex` of the right length.
fn hash(value: &str) -> Result<String, String> {
    let (alg, hex) = value
        .split_once(':')
        .ok_or_else(|| hash_rule(&format!("`{value}`")))?;
    let len = match alg {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(hash_rule(&format!("`{value}`"))),
    };
    if hex.len() != len || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(hash_rule(&format!("`{value}`")));
    }
    Ok(format!("{alg}:{}", hex.to_ascii_lowercase()))
}

/// Longest single requirement accepted (real ones, markers included, are a few hundred bytes).
const MAX_REQUIREMENT_BYTES: usize = 4096;

/// Deepest marker nesting accepted (the parser recurses on parentheses).
const MAX_NESTING: usize = 16;

/// One PEP 508 requirement from a name, in canonical form; the rule it breaks otherwise.
fn requirement(text: &str) -> Result<String, String> {
    if text.len() > MAX_REQUIREMENT_BYTES {
        return Err(format!(
            "a requirement of {} bytes, over the {MAX_REQUIREMENT_BYTES}-byte limit; {FIX}",
            text.len()
        ));
    }
    // pep508_rs 0.9 slices marker text at byte offsets it counts as characters, and panics
    // inside a multi-byte one; requirements are ASCII (PyPI names, versions, markers).
    if !text.is_ascii() {
        return Err(format!(
            "`{}` holds non-ASCII characters, which no PEP 508 requirement of an index \
             package needs; {FIX}",
            echo(text)
        ));
    }
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_NESTING {
            return Err(format!(
                "markers nested over {MAX_NESTING} parentheses deep; {FIX}"
            ));
        }
    }
    // pep508_rs 0.9 panics (an `expect`) on a name or extra that ends in `.`, `-` or `_` and is
    // followed by more text (`a.)`, `a[b.]`): refused here before it is asked. Such names are
    // invalid PEP 508 anyway, so nothing valid is refused.
    let head = text
        .split(['(', '<', '>', '=', '!', '~', ';', '@'])
        .next()
        .unwrap_or("");
    let ident = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    let unfinished = head
        .split(|c: char| !ident(c))
        .find(|w| w.ends_with(['.', '-', '_']));
    let looks_like_location = text.starts_with(['.', '/', '~', '\\'])
        || text.contains("://")
        || text
            .split(';')
            .next()
            .is_some_and(|head| head.contains('@'))
        || text.contains('\\')
        || text.as_bytes().get(1) == Some(&b':');
    let location = || {
        format!(
            "`{}` is a path or URL, and only requirements from the index are accepted: \
             depend on a released version (`name==1.2.3`); {FIX}",
            echo(text)
        )
    };
    match unfinished {
        Some(_) if looks_like_location => return Err(location()),
        Some(bad) => {
            return Err(format!(
                "the name or extra `{}` must end with a letter or digit (PEP 508); {FIX}",
                echo(bad)
            ));
        }
        None => {}
    }
    let parsed = pep508_rs::Requirement::<pep508_rs::VerbatimUrl>::from_str(text);
    let req = match parsed {
        Ok(r) => r,
        Err(_) if looks_like_location => return Err(location()),
        Err(e) => {
            return Err(format!(
                "`{}` is not a PEP 508 requirement ({}); {FIX}",
                echo(text),
                e.message
            ));
        }
    };
    if let Some(pep508_rs::VersionOrUrl::Url(url)) = &req.version_or_url {
        let scheme = url.raw().scheme();
        let kind = if ["git", "hg", "svn", "bzr"]
            .iter()
            .any(|v| scheme.starts_with(&format!("{v}+")) || scheme == *v)
        {
            "a VCS reference"
        } else {
            "a direct URL reference"
        };
        return Err(format!(
            "`{} @ …` is {kind}, and only requirements from the index are accepted: depend on \
             a released version (`{}==1.2.3`); {FIX}",
            req.name, req.name
        ));
    }
    let spec = settle(req.to_string()).map_err(|why| format!("`{}` {why}; {FIX}", echo(text)))?;
    // Written out in full (`1.0post` is `1.0.post0`) a requirement can outgrow the limit it
    // was read under; what the installer reads must pass the same limit.
    if spec.len() > MAX_REQUIREMENT_BYTES {
        return Err(format!(
            "a requirement of {} bytes once written out in full (`{}…`), over the \
             {MAX_REQUIREMENT_BYTES}-byte limit; {FIX}",
            spec.len(),
            echo(&spec[..spec.len().min(60)])
        ));
    }
    // The canonical form is what the installer reads: it must stay one plain requirement.
    // pep508_rs prints marker values in single quotes without escaping, so a value holding one
    // (or an option after a space) would end the value early and hand pip the rest as options.
    if spec.starts_with('-')
        || spec.contains(['#', '$', '\\', '\n', '\r', '"'])
        || quotes_unbalanced(&spec)
    {
        return Err(format!(
            "`{}` has characters an installer would read as more than a requirement (`#`, `$`, \
             `\\`, quotes inside a marker value); {FIX}",
            echo(text)
        ));
    }
    Ok(spec)
}

/// pep508_rs's printed form, printed again until it reads back as itself.
///
/// Its printing is not always a fixed point (a marker it prints as `python_version < '0'` reads
/// back as `python_full_version < '0'`, found by fuzzing); what the installer is handed must be
/// what a re-read of that file gives. Printing never changes what a requirement means, and one
/// round has been enough for everything seen; a form that keeps changing is refused.
fn settle(mut spec: String) -> Result<String, String> {
    for _ in 0..3 {
        let again = pep508_rs::Requirement::<pep508_rs::VerbatimUrl>::from_str(&spec)
            .map_err(|e| {
                format!(
                    "prints as `{}`, which does not read back ({})",
                    echo(&spec),
                    e.message
                )
            })?
            .to_string();
        if again == spec {
            return Ok(spec);
        }
        spec = again;
    }
    Err(format!(
        "prints differently every time it is read back (last `{}`)",
        echo(&spec)
    ))
}

/// Whether a canonical requirement has a quote inside a quoted marker value: every value is
/// printed as `'…'`, so a value containing `'` leaves an odd count or text after a closing
/// quote that does not start an operator, `and`, `or` or `)`.
fn quotes_unbalanced(spec: &str) -> bool {
    let Some((_, markers)) = spec.split_once(';') else {
        return false;
    };
    let mut parts = markers.split('\'');
    // Outside, inside, outside, …: every inside part must be followed by an outside part that
    // reads as marker syntax.
    let mut inside = false;
    let mut count = 0;
    for part in parts.by_ref() {
        count += 1;
        if !inside {
            let t = part.trim_start();
            let ok = count == 1
                || t.is_empty()
                || t.starts_with(')')
                || t.starts_with("and ")
                || t.starts_with("or ")
                || t.starts_with(['=', '!', '<', '>', '~'])
                || t.starts_with("in ")
                || t.starts_with("not in ");
            if !ok {
                return true;
            }
        }
        inside = !inside;
    }
    count % 2 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(text: &str) -> Result<Vec<(String, Vec<String>, usize)>, String> {
        parse_requirements_txt(text)
            .map(|d| {
                d.requirements
                    .into_iter()
                    .map(|r| (r.spec, r.hashes, r.line))
                    .collect()
            })
            .map_err(|e| e.to_string())
    }

    fn refused(text: &str) -> String {
        match txt(text) {
            Ok(v) => panic!("{text:?} was accepted: {v:?}"),
            Err(e) => e,
        }
    }

    const H1: &str = "sha256:70761cfe03c773ceb22aa2f671b4757976145175cdfca038c02654d061d6dcc3";
    const H2: &str = "sha256:0fbd8f2fc3d3c8cfa0b1c4c1e9a8d7f6e5d4c3b2a1908f7e6d5c4b3a29180706";

    /// What `uv export --format requirements-txt --no-emit-project` writes: a header, hashes on
    /// continuation lines, markers, `# via` comments.
    /// Found by `fuzz/fuzz_targets/requirements.rs`: pep508_rs panics on these (and the
    /// release build aborts on a panic, so one package line would stop the connector).
    #[test]
    fn names_and_extras_ending_in_punctuation_are_refused_not_a_panic() {
        for line in [
            "dify_plu_plug0.7.)4,<0.11",
            "requests-(>=1)",
            "a_ ==1",
            "a[b.]",
            "a[b, c-] >=1",
        ] {
            let err = refused(line);
            assert!(
                err.contains("must end with a letter or digit"),
                "{line}: {err}"
            );
        }
        assert_eq!(txt("a.b-c_d[e.f] >=1").unwrap().len(), 1);
        // Found by the same target: a multi-byte character after a marker made pep508_rs slice
        // inside it.
        let err = refused("requests[socks]>=2.31 ; python_version >= \"3.11\"\u{723}");
        assert!(err.contains("non-ASCII"), "{err}");
    }

    /// Found by `fuzz/fuzz_targets/requirements.rs` (its 30-minute run, after 3 min): pep508_rs
    /// printed this marker as `python_version < '0'`, which it reads back as
    /// `python_full_version < '0'`, so what the installer got was not what a re-read gives.
    #[test]
    fn the_requirement_handed_on_reads_back_as_itself() {
        for line in [
            "r2.31 ; python_version  ~= \"6.6.12\" ",
            "r2-31 ; python_version < '0'",
        ] {
            let first = txt(line).unwrap();
            let spec = &first[0].0;
            let again = txt(spec).unwrap();
            assert_eq!(&again[0].0, spec, "{line}");
        }
    }

    /// Found by the same target's second 30-minute run (after 26 min): a requirement under the
    /// 4096-byte limit as written grew past it once printed in full, so our own output was
    /// refused when read back.
    #[test]
    fn a_requirement_is_within_the_limit_as_handed_on() {
        let line = format!("a<1.0post{}", ",<1.0post".repeat(449));
        assert!(line.len() <= MAX_REQUIREMENT_BYTES, "{}", line.len());
        let err = refused(&line);
        assert!(err.contains("once written out in full"), "{err}");
    }

    #[test]
    fn a_quote_inside_a_marker_value_is_refused() {
        assert!(quotes_unbalanced("foo ; platform_machine == 'a' --x=1 ''"));
        assert!(!quotes_unbalanced(
            "foo ; platform_machine == 'a' and os_name != 'b'"
        ));
        for text in [
            "foo; platform_machine == \"a' --config-settings=k=v '\"\n",
            "foo; python_version == \"3' or '1\"\n",
            "foo; os_name == \"a' --index-url=http://x '\"\n",
            "foo; extra == \"a' -e . '\"\n",
        ] {
            match txt(text) {
                Err(e) => assert!(e.contains("line 1"), "{e}"),
                // What the installer reads must carry no option whatever the parser kept.
                Ok(reqs) => assert!(
                    reqs.iter()
                        .all(|(spec, _, _)| !quotes_unbalanced(spec) && !spec.contains(" -")),
                    "{text:?} became {reqs:?}"
                ),
            }
        }
        for ok in [
            "foo; platform_machine == \"x86_64\" and python_version >= \"3.8\"\n",
            "foo; sys_platform in \"linux darwin\"\n",
            "foo; (os_name == \"posix\") or extra == \"a\"\n",
        ] {
            txt(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn uv_export_output_with_hashes_and_markers_is_accepted() {
        let text = format!(
            "# This file was autogenerated by uv via the following command:\n\
             #    uv export --format requirements-txt --no-emit-project\n\
             anyio==4.6.2 \\\n    --hash={H1} \\\n    --hash={H2}\n    # via httpx\n\
             colorama==0.4.6 ; sys_platform == 'win32' \\\n    --hash={H1}\n    # via click\n\
             requests==2.32.3 ; python_version >= \"3.8\" \\\n    --hash={H2}\n\
             exceptiongroup==1.2.2 ; python_full_version < '3.11' \\\n    --hash={H1}\n\
             requests[socks]>=2.31,<3 ; (platform_machine == 'aarch64' or platform_machine == 'x86_64') and extra != 'x'\n\
             \n\
             dify_plugin>=0.7.4,<0.11   # inline comment\n"
        );
        let got = txt(&text).unwrap();
        assert_eq!(got.len(), 6, "{got:?}");
        assert_eq!(got[0].0, "anyio==4.6.2");
        assert_eq!(got[0].1, vec![H1.to_owned(), H2.to_owned()]);
        assert_eq!(got[0].2, 3);
        assert!(got[1].0.starts_with("colorama==0.4.6 ; "), "{got:?}");
        assert!(got[1].0.contains("win32"), "{got:?}");
        assert_eq!(got[2].2, 10);
        assert!(
            got[2].0.starts_with("requests==2.32.3 ; python_"),
            "{got:?}"
        );
        assert!(got[4].0.starts_with("requests[socks]"), "{got:?}");
        assert_eq!(got[5], ("dify-plugin>=0.7.4,<0.11".to_owned(), vec![], 16));
        // What the installer reads back is the same list, one requirement per line.
        let deps = parse_requirements_txt(&text).unwrap();
        let written = deps.to_requirements_txt();
        let again = parse_requirements_txt(&written).unwrap();
        assert_eq!(again.requirements.len(), 6, "{written}");
        for (a, b) in deps.requirements.iter().zip(&again.requirements) {
            assert_eq!((&a.spec, &a.hashes), (&b.spec, &b.hashes), "{written}");
        }
        assert!(
            !written.contains('\\') && !written.contains("via"),
            "{written}"
        );
    }

    /// The requirements files the repository's own plugins and template ship.
    #[test]
    fn the_repositorys_plugins_are_accepted() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut seen = 0;
        for dir in [
            "template/plugin",
            "tests/fixtures/plugins/faults",
            "tests/fixtures/plugins/import_error",
            "tests/tooling",
        ] {
            for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("requirements") && name.ends_with(".txt") {
                    let text = std::fs::read_to_string(e.path()).unwrap();
                    let d = parse_requirements_txt(&text)
                        .unwrap_or_else(|err| panic!("{dir}/{name}: {err}"));
                    assert!(!d.is_empty(), "{dir}/{name}");
                    seen += 1;
                }
            }
        }
        assert!(seen >= 4, "only {seen} files found");
    }

    #[test]
    fn every_forbidden_form_is_refused_with_file_line_and_rule() {
        let cases: &[(&str, usize, &[&str])] = &[
            ("-r /proc/self/environ\n", 1, &["`-r`", "another file"]),
            ("--requirement=/etc/passwd\n", 1, &["`--requirement`"]),
            (
                "requests\n-c constraints.txt\n",
                2,
                &["`-c`", "another file"],
            ),
            ("-e .\n", 1, &["`-e`", "--no-emit-project"]),
            ("--editable=git+https://x/y\n", 1, &["`--editable`"]),
            (
                "--index-url https://evil.example/simple\n",
                1,
                &["`--index-url`", "SRI_INDEX_URL"],
            ),
            ("-i https://evil.example/simple\n", 1, &["`-i`", "operator"]),
            (
                "--extra-index-url=https://e.example\n",
                1,
                &["`--extra-index-url`"],
            ),
            ("--find-links /tmp\n", 1, &["`--find-links`"]),
            ("-f file:///tmp\n", 1, &["`-f`"]),
            ("--trusted-host evil.example\n", 1, &["`--trusted-host`"]),
            ("--target=/etc\n", 1, &["`--target`", "not accepted"]),
            ("--no-binary :all:\n", 1, &["`--no-binary`"]),
            ("--pre\n", 1, &["`--pre`"]),
            ("./local/pkg\n", 1, &["path or URL"]),
            ("/abs/path.whl\n", 1, &["path or URL"]),
            ("~/pkg\n", 1, &["path or URL"]),
            ("https://evil.example/p.whl\n", 1, &["path or URL"]),
            ("git+https://github.com/a/b.git\n", 1, &["path or URL"]),
            (
                "foo @ https://evil.example/foo.whl\n",
                1,
                &["direct URL reference", "foo==1.2.3"],
            ),
            ("foo @ file:///etc/passwd\n", 1, &["direct URL reference"]),
            ("foo @ ./vendored/foo\n", 1, &["path or URL"]),
            (
                "foo @ git+https://github.com/a/b.git@main\n",
                1,
                &["VCS reference"],
            ),
            (
                "requests==2 --index-url https://e.example\n",
                1,
                &["`--index-url`"],
            ),
            (
                "requests==2 \\\n  --hash=sha256:abc\n",
                2,
                &["--hash=", "64 hex"],
            ),
            (
                "requests==2 --hash=md5:0123456789abcdef0123456789abcdef\n",
                1,
                &["sha256"],
            ),
            ("requests==2 \\\n  -r /proc/self/environ\n", 2, &["`-r`"]),
            (
                "--hash=sha256:00\n",
                1,
                &["`--hash`", "follow a requirement"],
            ),
            ("requests==${SRI_API_KEY}\n", 1, &["environment variable"]),
            (
                "requests>=2 ; platform_release == '${HOME}'\n",
                1,
                &["environment variable"],
            ),
            ("requests >>= 2\n", 1, &["not a PEP 508 requirement"]),
            (
                "a\nb\n\n# c\nnot valid!\n",
                5,
                &["not a PEP 508 requirement"],
            ),
            ("requests\x07\n", 1, &["control character"]),
        ];
        for (text, line, words) in cases {
            let e = refused(text);
            assert!(
                e.contains(&format!("requirements.txt line {line}: ")),
                "{text:?}: want line {line}: {e}"
            );
            for w in *words {
                assert!(e.contains(w), "{text:?}: {w:?} missing from: {e}");
            }
            assert!(
                e.contains("PEP 508") || e.contains("--hash"),
                "{text:?}: no rule in {e}"
            );
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }

    #[test]
    fn oversized_or_deeply_nested_requirements_are_refused_before_parsing() {
        let deep = format!(
            "a ; {}python_version > '3'{}\n",
            "(".repeat(100_000),
            ")".repeat(100_000)
        );
        let e = refused(&deep);
        assert!(e.contains("line 1: ") && e.contains("limit"), "{e}");
        let deep = format!(
            "a ; {}python_version > '3'{}\n",
            "(".repeat(17),
            ")".repeat(17)
        );
        assert!(refused(&deep).contains("nested"));
        let ok = format!(
            "a ; {}python_version > '3'{}\n",
            "(".repeat(16),
            ")".repeat(16)
        );
        assert_eq!(txt(&ok).unwrap().len(), 1);
    }

    /// A file at the size limit parses in linear time whatever its shape (a debug build takes
    /// about a second; a quadratic walk would take hours).
    #[test]
    fn worst_case_files_parse_quickly() {
        let n = MAX_FILE_BYTES as usize;
        let hash = format!("--hash={H1} ");
        let shapes = [
            "a \\\n".repeat(n / 4),
            "a==1\n".repeat(n / 5),
            format!("a==1 {}\n", hash.repeat(n / hash.len())),
            "# c\n".repeat(n / 4),
        ];
        for text in &shapes {
            let t = std::time::Instant::now();
            let _ = parse_requirements_txt(text);
            assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "{:?}",
                t.elapsed()
            );
        }
        let deps = "\"a\",\n".repeat(n / 5);
        let t = std::time::Instant::now();
        let d = parse_pyproject(&format!("[project]\ndependencies = [\n{deps}]\n")).unwrap();
        assert_eq!(d.requirements.last().unwrap().line, n / 5 + 2);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn refusals_echo_little_of_the_package() {
        let long = format!("-r {}\n", "x".repeat(10_000));
        assert!(refused(&long).len() < 600);
        let bad = format!("{}!\n", "a".repeat(10_000));
        assert!(refused(&bad).len() < 2000, "{}", refused(&bad).len());
    }

    fn pyproject(deps: &str) -> Result<Vec<String>, String> {
        parse_pyproject(&format!(
            "[project]\nname = \"p\"\nversion = \"0.1\"\ndependencies = [\n{deps}\n]\n"
        ))
        .map(|d| d.requirements.into_iter().map(|r| r.spec).collect())
        .map_err(|e| e.to_string())
    }

    #[test]
    fn pyproject_dependencies_are_requirements_never_options() {
        assert_eq!(
            pyproject("  \"dify_plugin>=0.9\",\n  \"httpx ; python_version >= '3.8'\",").unwrap(),
            vec![
                "dify-plugin>=0.9".to_owned(),
                "httpx ; python_full_version >= '3.8'".to_owned()
            ]
        );
        for (dep, words) in [
            (
                "\"--index-url=https://evil.example/simple\"",
                &["`--index-url`", "SRI_INDEX_URL"][..],
            ),
            ("\"-e .\"", &["`-e`"]),
            ("\"-r /proc/self/environ\"", &["`-r`"]),
            ("\"foo @ file:///etc\"", &["direct URL reference"]),
            ("\"foo @ git+https://x/y\"", &["VCS reference"]),
            ("\"./vendored\"", &["path or URL"]),
            ("\"requests --hash=sha256:00\"", &["`--hash=sha256:00`"]),
            ("\"requests # comment\"", &["not a PEP 508"]),
            ("\"\"", &["empty"]),
        ] {
            let e = pyproject(&format!("  \"ok\",\n  {dep},")).unwrap_err();
            assert!(e.contains("pyproject.toml line 6: "), "{dep}: {e}");
            for w in words {
                assert!(e.contains(w), "{dep}: {w:?} missing from {e}");
            }
        }
    }

    #[test]
    fn pyproject_without_a_usable_list_says_how_to_fix_it() {
        assert_eq!(
            parse_pyproject("[project]\nname = \"p\"\n")
                .unwrap()
                .requirements,
            vec![]
        );
        let e = parse_pyproject("[tool.uv]\ndev-dependencies = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [project] table"), "{e}");
        let e = parse_pyproject("[project\nname = ")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid PEP 621 file"), "{e}");
        let e = parse_pyproject("[project]\nname = \"p\"\ndynamic = [\"dependencies\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dynamic") && e.contains("requirements.txt"),
            "{e}"
        );
    }

    #[test]
    fn only_regular_files_of_the_plugin_are_read() {
        let dir = std::env::temp_dir().join(format!("sri-reqs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Dependencies::read(&dir).unwrap(), None);
        std::fs::write(
            dir.join("pyproject.toml"),
            "[project]\ndependencies = [\"a\"]\n",
        )
        .unwrap();
        assert_eq!(
            Dependencies::read(&dir).unwrap().unwrap().file,
            "pyproject.toml"
        );
        std::os::unix::fs::symlink("/proc/self/environ", dir.join("requirements.txt")).unwrap();
        let e = Dependencies::read(&dir).unwrap_err().to_string();
        assert!(e.contains("requirements.txt is not a regular file"), "{e}");
        std::fs::remove_file(dir.join("requirements.txt")).unwrap();
        std::fs::write(
            dir.join("requirements.txt"),
            vec![b'a'; MAX_FILE_BYTES as usize + 1],
        )
        .unwrap();
        let e = Dependencies::read(&dir).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
