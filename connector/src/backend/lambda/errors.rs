//! AWS errors as this crate's [`Error`], with the hint an operator needs to fix them. One place,
//! so every Lambda and S3 call reports failures alike.

use aws_sdk_lambda::error::{DisplayErrorContext, ProvideErrorMetadata};

use crate::Error;

/// `e` from `operation` as [`Error::Aws`], with a hint for the usual causes.
pub(super) fn aws_err<E>(operation: impl Into<String>, e: &E) -> Error
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    let operation = operation.into();
    let code = e.code().unwrap_or_default();
    let hint = match code {
        "AccessDeniedException" | "AccessDenied" | "UnrecognizedClientException" => {
            "; attach infra/'s connector policy to the connector's identity (its actions are scoped to `{prefix}-*`)"
        }
        "InvalidParameterValueException" if operation.contains("Function") => {
            "; check SRI_LAMBDA_ROLE_ARN (a role Lambda can assume) and the function settings"
        }
        "TooManyRequestsException" | "ThrottlingException" => "; retry shortly",
        _ => "",
    };
    Error::Aws {
        operation,
        detail: format!("{}{hint}", DisplayErrorContext(e)),
    }
}

/// Whether AWS said the resource does not exist.
pub(super) fn is_not_found<E: ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("ResourceNotFoundException")
}

/// The account id in an ARN (`arn:aws:iam::123456789012:role/x`).
pub(super) fn account_of(arn: &str) -> Option<&str> {
    arn.split(':').nth(4).filter(|a| !a.is_empty())
}

/// A waiter's outcome as this crate's error.
pub(super) fn waited<T, E: std::error::Error + 'static>(
    operation: String,
    outcome: Result<T, E>,
) -> Result<(), Error> {
    outcome.map(|_| ()).map_err(|e| Error::Aws {
        operation,
        detail: DisplayErrorContext(&e).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_come_from_arns() {
        assert_eq!(
            account_of("arn:aws:iam::123456789012:role/x"),
            Some("123456789012")
        );
        assert_eq!(account_of("arn:aws:iam:::role/x"), None);
    }
}
