//! The server's own bounds, in front of every tenant's limits: how long a
//! request may take, how many are served at once, and how much metadata a
//! request may carry.
//!
//! - Metadata: HTTP/2 decodes a request's whole header block even to refuse
//!   it (the header compression state is shared by the connection), and
//!   h2 ends the whole connection (GOAWAY) for a block over the size it
//!   advertised, taking every request on it down. So the server advertises
//!   a generous [`HEADER_LIST_BYTES`], and [`MetadataLimitLayer`] refuses a
//!   request over [`ServerLimits::max_metadata_bytes`] with
//!   RESOURCE_EXHAUSTED for that request alone. Only a block over
//!   `HEADER_LIST_BYTES` is a stream reset, and one far over it (h2's
//!   flood guard) the connection.
//! - Time: a request's answer comes within [`ServerLimits::request_timeout`]
//!   (or the client's shorter `grpc-timeout`). A write runs on a task of its
//!   own, so a deadline or a client that goes away never stops it between
//!   its Redis call and its bookkeeping; past the deadline the client gets
//!   UNAVAILABLE (outcome unknown, with RetryInfo) while the write
//!   finishes.
//! - Concurrency: at most [`ServerLimits::max_in_flight`] requests in the
//!   process, more are refused at once with RESOURCE_EXHAUSTED (tower's
//!   global concurrency limit with load shedding), and at most
//!   [`ServerLimits::max_streams_per_connection`] on one HTTP/2 connection
//!   (the client queues the rest).

use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{Either, Ready, ready};
use tonic::Status;
use tower::{Layer, Service};

/// The HTTP/2 header list size the server advertises and decodes in full.
/// Above it h2 resets the stream, and above about 1.25 times it (the
/// CONTINUATION flood guard) ends the connection: 2 MiB keeps a 1 MB
/// metadata value a refusal of that request alone.
pub const HEADER_LIST_BYTES: u32 = 2 << 20;

/// The server's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// How long a request may take before it is answered: a read past it
    /// is CANCELLED (tonic's deadline), a write UNAVAILABLE with its outcome
    /// unknown (it still finishes).
    pub request_timeout: Duration,
    /// Requests served at once by the process; more get RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Concurrent streams on one HTTP/2 connection.
    pub max_streams_per_connection: u32,
    /// Bytes of metadata (names, values and 32 bytes each, as HTTP/2
    /// counts them) a request may carry; more is RESOURCE_EXHAUSTED.
    pub max_metadata_bytes: usize,
    /// How long the server keeps serving once shutdown is asked for, with
    /// its gRPC health NOT_SERVING and its readiness cleared, before it
    /// stops taking requests and finishes those in flight. None by default
    /// (a server in a test stops at once); the binary's `--drain-seconds`
    /// defaults to 5.
    pub drain: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            request_timeout: Duration::from_secs(5),
            max_in_flight: 4096,
            max_streams_per_connection: 256,
            max_metadata_bytes: 16 << 10,
            drain: Duration::ZERO,
        }
    }
}

/// The size of a header list as HTTP/2 counts it (RFC 9113 6.5.2).
pub fn metadata_bytes(headers: &http::HeaderMap) -> usize {
    headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum()
}

/// Refuses requests whose metadata is over a limit.
#[derive(Debug, Clone, Copy)]
pub struct MetadataLimitLayer {
    max: usize,
}

impl MetadataLimitLayer {
    /// A layer refusing more than `max` bytes of metadata.
    pub fn new(max: usize) -> MetadataLimitLayer {
        MetadataLimitLayer { max }
    }
}

impl<S> Layer<S> for MetadataLimitLayer {
    type Service = MetadataLimit<S>;

    fn layer(&self, inner: S) -> MetadataLimit<S> {
        MetadataLimit { inner, max: self.max }
    }
}

/// The service of [`MetadataLimitLayer`].
#[derive(Debug, Clone)]
pub struct MetadataLimit<S> {
    inner: S,
    max: usize,
}

impl<S, B> Service<http::Request<B>> for MetadataLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let size = metadata_bytes(req.headers());
        if size > self.max {
            crate::metrics::SERVER_REFUSED.with_label_values(&["metadata_too_large"]).inc();
            let status = Status::resource_exhausted(format!(
                "request metadata is {size} bytes, over this server's limit of {} bytes",
                self.max
            ));
            return Either::Left(ready(Ok(status.into_http())));
        }
        Either::Right(self.inner.call(req))
    }
}
