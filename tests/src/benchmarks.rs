//! `BENCHMARKS.md` is shared by the benchmarks (`tests/examples/bench*.rs`): each one rewrites
//! only its own section, the text between `<!-- bench:NAME:begin -->` and
//! `<!-- bench:NAME:end -->`, and leaves everything else in the file as it was.

use std::path::Path;

fn markers(name: &str) -> (String, String) {
    (
        format!("<!-- bench:{name}:begin -->"),
        format!("<!-- bench:{name}:end -->"),
    )
}

/// `doc` with section `name` set to `body`. A section that is absent is appended at the end;
/// a section with only one of its markers, or with them out of order, is an error (nothing is
/// guessed).
pub fn replace_section(doc: &str, name: &str, body: &str) -> Result<String, String> {
    let (begin, end) = markers(name);
    // Blank lines around the body: the markers are HTML blocks of their own in Markdown.
    let section = format!("{begin}\n\n{}\n\n{end}", body.trim_matches('\n'));
    match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            Ok(format!("{}{section}{}", &doc[..b], &doc[e + end.len()..]))
        }
        (None, None) => {
            let mut out = doc.trim_end().to_owned();
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            out.push_str(&section);
            out.push('\n');
            Ok(out)
        }
        _ => Err(format!(
            "the markers of section `{name}` are broken (want `{begin}` … `{end}`, once each, in \
             this order); fix them by hand"
        )),
    }
}

/// Rewrites section `name` of the file at `path` (created when missing), atomically.
pub fn write_section(path: &Path, name: &str, body: &str) -> std::io::Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let new = replace_section(&doc, name, body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let tmp = path.with_extension(format!("md.tmp-{}", std::process::id()));
    std::fs::write(&tmp, new)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_created_then_replaced_alone() {
        let doc = replace_section("", "a", "# A\n\nfirst").unwrap();
        assert_eq!(
            doc,
            "<!-- bench:a:begin -->\n\n# A\n\nfirst\n\n<!-- bench:a:end -->\n"
        );
        let doc = replace_section(&doc, "b", "## B\n").unwrap();
        let doc = replace_section(&doc, "a", "# A\n\nsecond\n").unwrap();
        assert_eq!(
            doc,
            "<!-- bench:a:begin -->\n\n# A\n\nsecond\n\n<!-- bench:a:end -->\n\n\
             <!-- bench:b:begin -->\n\n## B\n\n<!-- bench:b:end -->\n"
        );
        // Text outside the markers is kept as it is.
        let framed = format!("intro\n{doc}outro\n");
        let out = replace_section(&framed, "b", "## B2").unwrap();
        assert!(out.starts_with("intro\n<!-- bench:a:begin -->"));
        assert!(out.ends_with("## B2\n\n<!-- bench:b:end -->\noutro\n"));
        assert!(out.contains("second"));
    }

    #[test]
    fn broken_markers_are_refused() {
        assert!(replace_section("<!-- bench:a:end -->\n<!-- bench:a:begin -->", "a", "x").is_err());
        assert!(replace_section("<!-- bench:a:begin -->\n", "a", "x").is_err());
    }
}
