//! The one error type of the API's use cases and of the GraphQL boundary: each case carries an
//! `extensions.code`; internal errors are logged in full and reach the client as a
//! generic message.

use aegis_webhook_storage::StoreError;
use async_graphql::ErrorExtensions as _;

///
/// Deliberately not `Display`: async-graphql turns every `Display` type into an
/// error without a code, and this type must go through the conversion below.
#[derive(Debug)]
pub enum ApiError {
    BadUserInput {
        field: &'static str,
        message: String,
    },
    NotFound(&'static str),
    Conflict(String),
    /// The caller's key lacks the scope the operation needs.
    Forbidden(String),
    /// A per-tenant quota would be passed.
    QuotaExceeded(String),
    /// What was asked for has passed the tenant's data retention and is gone.
    Expunged(String),
    /// The database had no connection free in time: retry shortly (HTTP 503).
    Busy,
    Internal(anyhow::Error),
}

/// The `extensions.code` of a busy answer, which the HTTP layer turns into 503.
pub const BUSY_CODE: &str = "BUSY";

impl ApiError {
    pub fn bad_input(field: &'static str, message: impl std::fmt::Display) -> Self {
        ApiError::BadUserInput {
            field,
            message: message.to_string(),
        }
    }
}

/// A store error by what it means, for calls that look nothing up by id
/// (create, list): a `NotFound` there is a bug, not the client's doing.
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::Internal(anyhow::anyhow!(
                "a store call that looks nothing up by id answered not found"
            )),
            StoreError::Conflict(message) => ApiError::Conflict(message),
            StoreError::Invalid(message) => ApiError::BadUserInput {
                field: "input",
                message,
            },
            StoreError::Busy => ApiError::Busy,
            StoreError::Unexpected(error) => ApiError::Internal(error),
        }
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(error: ApiError) -> Self {
        match &error {
            ApiError::BadUserInput { field, message } => {
                async_graphql::Error::new(message.clone()).extend_with(|_, e| {
                    e.set("code", "BAD_USER_INPUT");
                    e.set("field", *field);
                })
            }
            ApiError::NotFound(what) => {
                async_graphql::Error::new(format!("{what} not found")).extend_with(|_, e| e.set("code", "NOT_FOUND"))
            }
            ApiError::Conflict(message) => {
                async_graphql::Error::new(message.clone()).extend_with(|_, e| e.set("code", "CONFLICT"))
            }
            ApiError::Forbidden(message) => {
                async_graphql::Error::new(message.clone()).extend_with(|_, e| e.set("code", "FORBIDDEN"))
            }
            ApiError::QuotaExceeded(message) => {
                async_graphql::Error::new(message.clone()).extend_with(|_, e| e.set("code", "QUOTA_EXCEEDED"))
            }
            ApiError::Expunged(message) => {
                async_graphql::Error::new(message.clone()).extend_with(|_, e| e.set("code", "EXPUNGED"))
            }
            ApiError::Busy => async_graphql::Error::new("the service is busy; retry in a moment")
                .extend_with(|_, e| e.set("code", BUSY_CODE)),
            ApiError::Internal(inner) => {
                tracing::error!(error = format!("{inner:#}"), "internal error in a GraphQL request");
                async_graphql::Error::new("internal error").extend_with(|_, e| e.set("code", "INTERNAL"))
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Maps the result of a store call that looks `what` up by id: its `NotFound`
/// is the client's (`NOT_FOUND`, also for another tenant's id); every other
/// error maps as [`From<StoreError>`] does.
pub trait StoreResultExt<T> {
    fn or_not_found(self, what: &'static str) -> ApiResult<T>;
}

impl<T> StoreResultExt<T> for Result<T, StoreError> {
    fn or_not_found(self, what: &'static str) -> ApiResult<T> {
        self.map_err(|error| match error {
            StoreError::NotFound => ApiError::NotFound(what),
            other => ApiError::from(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(error: ApiError) -> String {
        let error: async_graphql::Error = error.into();
        let extensions = error.extensions.expect("every error has a code");
        extensions.get("code").expect("code").to_string()
    }

    #[test]
    fn store_errors_map_by_what_they_mean() {
        let lookup = |error: StoreError| code(Err::<(), _>(error).or_not_found("webhook").expect_err("an error"));
        assert_eq!(lookup(StoreError::NotFound), "\"NOT_FOUND\"");
        assert_eq!(lookup(StoreError::Conflict("taken".to_owned())), "\"CONFLICT\"");
        assert_eq!(lookup(StoreError::Invalid("no name".to_owned())), "\"BAD_USER_INPUT\"");
        assert_eq!(
            lookup(StoreError::Unexpected(anyhow::anyhow!("disk full"))),
            "\"INTERNAL\""
        );
        assert_eq!(lookup(StoreError::Busy), "\"BUSY\"");

        // Where nothing is looked up by id, a not-found is the server's fault.
        assert_eq!(code(ApiError::from(StoreError::NotFound)), "\"INTERNAL\"");
        assert_eq!(
            code(ApiError::from(StoreError::Invalid("no name".to_owned()))),
            "\"BAD_USER_INPUT\""
        );
        assert_eq!(
            code(ApiError::from(StoreError::Conflict("taken".to_owned()))),
            "\"CONFLICT\""
        );
    }
}
