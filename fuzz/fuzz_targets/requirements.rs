//! `requirements.txt` and `[project] dependencies` (`connector::requirements`): package text
//! that an installer would otherwise read as a command line.
//!
//! Properties: the requirements file handed to the installer holds no option but `--hash`, and
//! parses back to the same requirements (the parse is a fixed point).
#![no_main]

use connector::requirements::{Dependencies, parse_pyproject, parse_requirements_txt};
use libfuzzer_sys::fuzz_target;

fn check(deps: &Dependencies) {
    let txt = deps.to_requirements_txt();
    for line in txt.lines().filter(|l| !l.starts_with('#')) {
        let mut words = line.split_whitespace();
        let spec = words.next().unwrap_or_default();
        assert!(
            !spec.starts_with('-'),
            "an option reaches the installer: {line}"
        );
        for w in words {
            assert!(
                w.starts_with("--hash=") || !w.starts_with('-'),
                "an option reaches the installer: {line}"
            );
        }
    }
    let again =
        parse_requirements_txt(&txt).unwrap_or_else(|e| panic!("own output refused: {e}\n{txt}"));
    let key = |d: &Dependencies| -> Vec<(String, Vec<String>)> {
        d.requirements
            .iter()
            .map(|r| (r.spec.clone(), r.hashes.clone()))
            .collect()
    };
    assert_eq!(key(&again), key(deps), "{txt}");
}

fuzz_target!(|data: (bool, &str)| {
    let (toml, text) = data;
    let parsed = if toml {
        parse_pyproject(text)
    } else {
        parse_requirements_txt(text)
    };
    if let Ok(deps) = parsed {
        check(&deps);
    }
});
