//! The one error type of the GraphQL boundary: each case carries an
//! `extensions.code`; internal errors are logged in full and reach the client as a
//! generic message.

use aegis_webhook_core::db::StoreError;
use async_graphql::ErrorExtensions as _;

///
/// Deliberately not `Display`: async-graphql turns every `Display` type into an
/// error without a code, and this type must go through the conversion below.
#[derive(Debug)]
pub enum ApiError {
    BadUserInput { field: &'static str, message: String },
    NotFound(&'static str),
    Conflict(String),
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn bad_input(field: &'static str, message: impl std::fmt::Display) -> Self {
        ApiError::BadUserInput {
            field,
            message: message.to_string(),
        }
    }

    /// Maps a store error; `NotFound` names what was looked for.
    pub fn from_store(error: StoreError, what: &'static str) -> Self {
        match error {
            StoreError::NotFound => ApiError::NotFound(what),
            StoreError::Conflict(message) => ApiError::Conflict(message),
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
            ApiError::Internal(inner) => {
                tracing::error!(error = format!("{inner:#}"), "internal error in a GraphQL request");
                async_graphql::Error::new("internal error").extend_with(|_, e| e.set("code", "INTERNAL"))
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Maps a store result at the GraphQL boundary, naming what a `NotFound` was.
pub trait StoreResultExt<T> {
    fn or_not_found(self, what: &'static str) -> ApiResult<T>;
}

impl<T> StoreResultExt<T> for Result<T, StoreError> {
    fn or_not_found(self, what: &'static str) -> ApiResult<T> {
        self.map_err(|error| ApiError::from_store(error, what))
    }
}
