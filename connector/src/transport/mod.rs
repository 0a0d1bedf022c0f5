//! How an invocation reaches a function. The gateway and the client library only see a
//! [`Target`]; the backend that deployed the function decides which kind it is.
//!
//! - [`Target::Http`]: plain HTTP/1.1 to `bootstrap serve` (other platforms, a proxy between).
//! - [`Target::H2c`]: HTTP/2 without TLS to a `bootstrap serve` the connector runs itself (the
//!   local backend): all streams to one function share one connection.
//! - [`Target::FunctionUrl`]: a Lambda Function URL with `AuthType: AWS_IAM`, so every request
//!   carries SigV4 (service `lambda`) on top of the SRI v1 signature.
//! - [`Target::InvokeStream`]: the Lambda API's `InvokeWithResponseStream`, for deployments that
//!   do not expose a Function URL at all.
//!
//! The submodules hold what only the AWS transports need: [`sigv4`] (Function URL signing) and
//! [`invoke_stream`] (the `InvokeWithResponseStream` event and its response stream); the HTTP
//! path itself is shared by `Http` and `FunctionUrl` in [`crate::client`].

#[cfg(feature = "lambda")]
pub mod invoke_stream;
#[cfg(feature = "lambda")]
pub mod sigv4;
pub mod wire;

/// Where and how the connector sends an SRI v1 invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A base URL served by `bootstrap serve`.
    Http {
        /// Base URL (`/invoke` is appended).
        url: String,
    },
    /// A base URL served by `bootstrap serve`, spoken to in HTTP/2 with prior knowledge (h2c).
    ///
    /// Every stream to the function then shares one connection, instead of one connection (two
    /// sockets, two sets of buffers) each: what lets the gateway hold ten thousand idle streams
    /// cheaply. Only for a `bootstrap serve` reached directly; a proxy in between may not speak
    /// h2c.
    H2c {
        /// Base URL (`/invoke` is appended).
        url: String,
    },
    /// A Lambda Function URL (`AuthType: AWS_IAM`, `InvokeMode: RESPONSE_STREAM`).
    FunctionUrl {
        /// The Function URL (`https://<id>.lambda-url.<region>.on.aws/`).
        url: String,
        /// The function's region (part of the SigV4 scope).
        region: String,
        /// The Lambda function's name (what its `AWS_LAMBDA_FUNCTION_NAME` says; SRI v2 binds it).
        function: String,
    },
    /// `InvokeWithResponseStream` on a function version or alias.
    InvokeStream {
        /// Function name or ARN.
        function: String,
        /// Version or alias.
        qualifier: String,
    },
}

impl Target {
    /// A plain-HTTP target.
    pub fn http(url: impl Into<String>) -> Self {
        Self::Http { url: url.into() }
    }

    /// An h2c target (see [`Target::H2c`]).
    pub fn h2c(url: impl Into<String>) -> Self {
        Self::H2c { url: url.into() }
    }

    /// The function name an SRI v2 signature for this target binds, when the target carries
    /// it (Lambda targets: the function's own name); `None` for `bootstrap serve` targets,
    /// whose name is the caller's to give.
    pub fn signed_name(&self) -> Option<&str> {
        match self {
            Self::Http { .. } | Self::H2c { .. } => None,
            Self::FunctionUrl { function, .. } => Some(function),
            // `InvokeWithResponseStream` takes a name or an ARN; the function knows its name.
            Self::InvokeStream { function, .. } => Some(match function.strip_prefix("arn:") {
                // arn:aws:lambda:<region>:<account>:function:<name>[:<qualifier>]
                Some(rest) => rest.split(':').nth(5).unwrap_or(function),
                None => function,
            }),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http { url } => write!(f, "{url}"),
            Self::H2c { url } => write!(f, "{url} (h2c)"),
            Self::FunctionUrl { url, .. } => write!(f, "{url} (Function URL, SigV4)"),
            Self::InvokeStream {
                function,
                qualifier,
            } => {
                write!(f, "{function}:{qualifier} (InvokeWithResponseStream)")
            }
        }
    }
}

/// The query of an invoke request, `action=<action>`, percent-encoded the way SigV4 canonicalises
/// it (RFC 3986 unreserved characters kept, everything else `%XX`), so the query that is sent is
/// byte for byte the one that is signed, on every transport.
pub fn invoke_query(action: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(action.len() + 7);
    out.push_str("action=");
    for b in action.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            write!(out, "%{b:02X}").expect("writing to a String");
        }
    }
    out
}

/// Largest request Lambda takes through a Function URL or an invoke (6 MB); the emulator does
/// not enforce it, so the connector does, for both, before sending.
pub const LAMBDA_MAX_REQUEST_BYTES: usize = 6 * 1024 * 1024;

/// Refuses, as Lambda would (413), a request of `len` bytes over [`LAMBDA_MAX_REQUEST_BYTES`]
/// for a Lambda target; `Ok` for every other target.
pub fn check_request_size(target: &Target, len: usize) -> Result<(), String> {
    let lambda = matches!(
        target,
        Target::FunctionUrl { .. } | Target::InvokeStream { .. }
    );
    if lambda && len > LAMBDA_MAX_REQUEST_BYTES {
        return Err(format!(
            "the request is {len} bytes, over Lambda's {LAMBDA_MAX_REQUEST_BYTES}-byte invocation \
             payload limit; lower MAX_SERVERLESS_REQUEST_BYTES so the daemon refuses it first"
        ));
    }
    Ok(())
}

/// What to do about an error answered by AWS itself (not by the function) for `target`, when
/// the status says more than AWS's own text; `None` when there is nothing to add.
pub fn aws_hint(status: u16, target: &Target) -> Option<String> {
    let (permissions, qualified) = match target {
        Target::Http { .. } | Target::H2c { .. } => return None,
        Target::FunctionUrl { url, .. } => (
            "lambda:InvokeFunctionUrl and lambda:InvokeFunction",
            url.clone(),
        ),
        Target::InvokeStream {
            function,
            qualifier,
        } => ("lambda:InvokeFunction", format!("{function}:{qualifier}")),
    };
    Some(match status {
        401 | 403 => format!(
            "the connector's IAM identity lacks {permissions} on {qualified}, or its credentials \
             are invalid or expired, or its clock is skewed (SigV4 allows 5 minutes)"
        ),
        404 => format!(
            "{qualified} does not exist (deleted, or the version or alias is gone): redeploy the \
             plugin"
        ),
        413 => "the request is over Lambda's 6 MB invocation payload limit".to_owned(),
        429 => format!(
            "Lambda throttled {qualified}: its reserved concurrency or the account's concurrency \
             limit is reached"
        ),
        500 | 502 => "the function failed before streaming anything (crash, timeout or init \
                      error): see its CloudWatch logs"
            .to_owned(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_targets_refuse_requests_over_6_mb() {
        let url = Target::FunctionUrl {
            url: "http://127.0.0.1:1/lambda-url/f".into(),
            region: "us-east-1".into(),
            function: "f".into(),
        };
        assert!(check_request_size(&url, LAMBDA_MAX_REQUEST_BYTES).is_ok());
        let e = check_request_size(&url, LAMBDA_MAX_REQUEST_BYTES + 1).unwrap_err();
        assert!(e.contains("MAX_SERVERLESS_REQUEST_BYTES"), "{e}");
        assert!(check_request_size(&Target::http("http://h"), usize::MAX).is_ok());
    }

    #[test]
    fn invoke_query_encodes_like_sigv4() {
        assert_eq!(invoke_query("invoke_tool"), "action=invoke_tool");
        assert_eq!(invoke_query("a b/é~"), "action=a%20b%2F%C3%A9~");
    }

    #[test]
    fn lambda_targets_sign_for_the_function_name() {
        let by = |function: &str| Target::InvokeStream {
            function: function.into(),
            qualifier: "3".into(),
        };
        assert_eq!(by("sri-a-b").signed_name(), Some("sri-a-b"));
        assert_eq!(
            by("arn:aws:lambda:eu-west-1:123456789012:function:sri-a-b:live").signed_name(),
            Some("sri-a-b")
        );
        assert_eq!(Target::http("http://h").signed_name(), None);
    }

    #[test]
    fn hints_name_the_permissions_to_grant() {
        let url = Target::FunctionUrl {
            url: "https://x.lambda-url.eu-west-1.on.aws/".into(),
            region: "eu-west-1".into(),
            function: "sri-a-b".into(),
        };
        let hint = aws_hint(403, &url).unwrap();
        assert!(
            hint.contains("lambda:InvokeFunctionUrl and lambda:InvokeFunction"),
            "{hint}"
        );
        assert!(hint.contains("clock"), "{hint}");
        let stream = Target::InvokeStream {
            function: "f".into(),
            qualifier: "live".into(),
        };
        assert!(aws_hint(404, &stream).unwrap().contains("f:live"));
        assert_eq!(aws_hint(403, &Target::http("http://h")), None);
        assert_eq!(aws_hint(400, &stream), None);
    }
}
