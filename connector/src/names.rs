//! The one grammar for function names, checked wherever a name comes from outside (a URL path,
//! the command line) before it is used as a map key, a Lambda name or a directory.
//!
//! Every name the backends make ([`crate::backend::function_name`], the Lambda backend's
//! deployment names) is lowercase letters, digits and `-`, so a name outside that grammar cannot
//! be a function: refusing it early means a name such as `..` or `/etc` never reaches a path.
//! [`crate::backend::is_function_name`] recognises the exact shape the backends generate (for
//! parsing their own names back); every such name passes [`check`].

/// The longest function name accepted (the Lambda backend's are at most 77 characters).
pub const MAX_NAME: usize = 128;

/// What a name must look like, for error messages.
pub const GRAMMAR: &str =
    "1 to 128 characters of lowercase letters, digits and `-`, starting with a letter or digit";

use crate::Error;

/// `name` when it follows the function-name grammar; else [`Error::InvalidName`] showing the
/// name shortened and escaped (it came from a caller).
pub fn check(name: &str) -> Result<&str, Error> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(name)
    } else {
        let shown: String = name
            .chars()
            .take(64)
            .flat_map(char::escape_default)
            .collect();
        Err(Error::InvalidName(format!(
            "`{shown}` is not a function name ({GRAMMAR}); `sri list` shows the deployed ones"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn every_generated_name_passes() {
        let checksum = "ab".repeat(32);
        for (author, name) in [("acme", "foo_bar"), ("a", &"n".repeat(128) as &str)] {
            let n = crate::backend::local_function_name(author, name, &checksum);
            assert!(crate::backend::is_function_name(&n), "{n}");
            assert_eq!(check(&n).unwrap(), n);
        }
    }

    #[test]
    fn only_the_grammar_passes() {
        for good in [
            "fn1",
            "sri-langgenius-tavily-0123456789ab",
            "a",
            &"a".repeat(128),
        ] {
            assert_eq!(check(good).unwrap(), good);
        }
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "/etc",
            "a/b",
            "a%2Fb",
            "-x",
            "A",
            "a b",
            "a\0",
            "a.b",
            "é",
            "a_b",
            "a,b",
            "a=b",
            &"a".repeat(129),
        ] {
            let e = check(bad).unwrap_err().to_string();
            assert!(e.contains("not a function name"), "{bad:?}: {e}");
        }
    }
}
