//! The service's error type and its one mapping to gRPC status codes.

use thumbup_core::domain::Forbidden;
use tonic::{Code, Status};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `x-thumbup-tenant` metadata.
    #[error("missing x-thumbup-tenant metadata")]
    MissingTenant,
    /// The tenant is not configured here, or the token (none, or a wrong
    /// one) is not one of its: the two read the same, so that tenant names
    /// cannot be probed without a token.
    #[error("tenant {0:?}: unknown tenant or missing or wrong token (send authorization: Bearer <token>)")]
    Unauthenticated(String),
    /// The business is not one of the tenant's.
    #[error("tenant {tenant:?}: unknown business {business}")]
    UnknownBusiness {
        /// Tenant.
        tenant: String,
        /// Business id asked for.
        business: i64,
    },
    /// A field is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The state table forbids the action.
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    /// A rate limit was hit.
    #[error("tenant {tenant:?}: rate limit exceeded: {limit}")]
    RateLimited {
        /// Tenant.
        tenant: String,
        /// Which limit.
        limit: &'static str,
    },
    /// The DB failed and nothing else could answer.
    #[error("tenant {tenant:?}: database unavailable: {source}")]
    Db {
        /// Tenant.
        tenant: String,
        /// Cause (shared: readers waiting for one load get its error).
        source: std::sync::Arc<sqlx::Error>,
    },
    /// The DB failed moments ago and is skipped for now.
    #[error("tenant {0:?}: database unavailable (recent connection failure; retry shortly)")]
    DbDown(String),
    /// The write cannot be decided against its record's newest acknowledged
    /// state now (the write fence is moving, the DB may lag), and nothing was
    /// written; or its Redis call failed midway and its outcome is unknown
    /// (`why` says which). Retryable.
    #[error("tenant {tenant:?}: write not acknowledged: {why}")]
    Unavailable {
        /// Tenant.
        tenant: String,
        /// Why.
        why: String,
    },
    /// Redis answered with an error (not an outage, which takes the DB path).
    #[error("tenant {tenant:?}: redis error: {source}")]
    Redis {
        /// Tenant.
        tenant: String,
        /// Cause.
        source: redis::RedisError,
    },
}

impl Error {
    /// The gRPC code of the error.
    pub fn code(&self) -> Code {
        match self {
            Error::MissingTenant | Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::UnknownBusiness { .. } => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Forbidden(_) => Code::FailedPrecondition,
            Error::RateLimited { .. } => Code::ResourceExhausted,
            Error::Db { .. } | Error::DbDown(_) | Error::Unavailable { .. } => Code::Unavailable,
            Error::Redis { source, .. } if thumbup_core::cache::is_unreachable(source) => Code::Unavailable,
            Error::Redis { .. } => Code::Internal,
        }
    }
}

/// What an UNAVAILABLE reply suggests as the client's retry delay
/// (`google.rpc.RetryInfo`): the write fence moves within a few hundred
/// milliseconds, a DB flip within seconds.
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = e.code();
        if code == Code::Unavailable {
            // Every UNAVAILABLE is retryable and wrote nothing: say so.
            let details = tonic_types::ErrorDetails::with_retry_info(Some(RETRY_AFTER));
            return <Status as tonic_types::StatusExt>::with_error_details(code, e.to_string(), details);
        }
        Status::new(code, e.to_string())
    }
}

/// Shorthand for an INVALID_ARGUMENT error.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}
