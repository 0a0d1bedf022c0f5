//! The AWS Lambda backend (placeholder; see issue 4).
