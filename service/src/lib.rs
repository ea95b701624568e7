//! thumbup-service: the gRPC front of thumbup.
//!
//! A request passes the gateway ([`api`]: tenant and token from metadata,
//! rate limits, validation), then the write path ([`write`]: an atomic Redis
//! transition that appends the event to the tenant stream, or a synchronous
//! DB transaction while Redis is down) or the read path ([`read`]: Redis,
//! then the DB, filling the cache). Tenants come from a YAML file that is
//! reloaded on change or SIGHUP ([`tenants`]). The job applies the stream
//! to the DB.

pub mod api;
pub mod error;
pub mod metrics;
pub mod read;
pub mod tenants;
pub mod write;

/// Generated gRPC types of `thumbup.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("thumbup.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("thumbup_descriptor");
}

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use thumbup_core::config::Config;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The tenant config file (watched for changes).
    pub config: PathBuf,
    /// How long a Redis command may take before Redis counts as down.
    pub redis_timeout: Duration,
    /// Set once the tenants are loaded and the server accepts requests,
    /// cleared at shutdown (served as `/readyz`).
    pub ready: Option<Arc<AtomicBool>>,
}

/// Serves the gRPC API (with health and reflection) on `listener` until
/// `shutdown` resolves, then finishes in-flight requests.
pub async fn run(
    opts: Options,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let config = Config::load(&opts.config)?;
    let reg = tenants::Registry::new(config, Some(opts.config.clone()), opts.redis_timeout)
        .await
        .map_err(anyhow::Error::msg)?;
    let watcher = tokio::spawn(reg.clone().watch());
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<pb::thumbup_server::ThumbupServer<api::Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    info!(addr = %listener.local_addr()?, "serving thumbup.v1.Thumbup");
    let ready = opts.ready.clone();
    let set_ready = |v: bool| {
        if let Some(r) = &ready {
            r.store(v, Ordering::Relaxed);
        }
    };
    set_ready(true);
    let shutdown = async {
        shutdown.await;
        set_ready(false);
    };
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(256)
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(pb::thumbup_server::ThumbupServer::new(api::Api::new(reg)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    watcher.abort();
    Ok(())
}
