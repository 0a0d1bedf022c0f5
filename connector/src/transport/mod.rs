//! How an invocation reaches a function. The gateway and the client library only see a
//! [`Target`]; the backend that deployed the function decides which kind it is.
//!
//! - [`Target::Http`]: plain HTTP to `bootstrap serve` (local backend, other platforms).
//! - [`Target::FunctionUrl`]: a Lambda Function URL with `AuthType: AWS_IAM`, so every request
//!   carries SigV4 (service `lambda`) on top of the SRI v1 signature.
//! - [`Target::InvokeStream`]: the Lambda API's `InvokeWithResponseStream`, for deployments that
//!   do not expose a Function URL at all.

/// Where and how the connector sends an SRI v1 invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A base URL served by `bootstrap serve`.
    Http {
        /// Base URL (`/invoke` is appended).
        url: String,
    },
    /// A Lambda Function URL (`AuthType: AWS_IAM`, `InvokeMode: RESPONSE_STREAM`).
    FunctionUrl {
        /// The Function URL (`https://<id>.lambda-url.<region>.on.aws/`).
        url: String,
        /// The function's region (part of the SigV4 scope).
        region: String,
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
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http { url } => write!(f, "{url}"),
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
