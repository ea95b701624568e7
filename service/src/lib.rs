//! thumbup-service: the gRPC front of thumbup.
//!
//! A request passes the gateway ([`api`]: tenant and token from metadata,
//! rate limits, validation), then the write path ([`write`]: an atomic Redis
//! transition that appends the event to the tenant stream, or a synchronous
//! DB transaction while Redis is down) or the read path ([`read`]: Redis,
//! then the DB, filling the cache). Tenants come from a YAML file, with
//! credentials inline or in files beside it, reloaded when the file or a
//! credential file changes, or on SIGHUP ([`tenants`]); or from the
//! registry ConfigMap and Secret, followed through the Kubernetes API
//! ([`registry_api`]). The job applies
//! the stream to the DB.

pub mod api;
pub mod error;
pub mod fence;
pub mod flight;
pub mod hot;
pub mod limits;
pub mod metrics;
pub mod page;
pub mod read;
pub mod registry_api;
pub mod tenants;
pub mod tls;
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

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::tenants::ConfigSource;
pub use crate::tls::ServerTls;

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
    /// The server's bounds: request time, concurrency, metadata size.
    pub limits: limits::ServerLimits,
}

/// How [`run_with`] reads the config file's credentials, whether the file
/// may be missing, and the server's own certificate files. Kept apart from
/// [`Options`] so that code building `Options` field by field keeps compiling.
#[derive(Debug, Clone, Default)]
pub struct ConfigFiles {
    /// The directory relative `password_file` / `tokens_file` paths resolve
    /// against (default: the config file's directory).
    pub secrets_dir: Option<PathBuf>,
    /// Start with no tenants while the config file does not exist, and
    /// serve it once it appears; otherwise a missing file fails the start.
    pub optional: bool,
    /// Serve TLS only, with this certificate (None: plaintext h2c).
    pub tls: Option<ServerTls>,
    /// Follow the registry ConfigMap and Secret through the Kubernetes API
    /// ([`registry_api`]); the files serve until the API has answered.
    pub registry_api: Option<registry_api::RegistryApi>,
}

/// The client side of [`ServerTls`], shared by thumbupctl, the bench and
/// the tests: an endpoint for `addr`, which is `http://host:port`
/// (plaintext) or `https://host:port` (TLS; the server's certificate must
/// name `host` and chain to `ca_file`, or to the system's roots without one).
pub fn client_endpoint(addr: &str, ca_file: Option<&std::path::Path>) -> anyhow::Result<tonic::transport::Endpoint> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let endpoint = Endpoint::from_shared(addr.to_string())
        .with_context(|| format!("{addr:?} is not a URI (e.g. https://127.0.0.1:50051)"))?;
    if addr.starts_with("http://") {
        anyhow::ensure!(ca_file.is_none(), "a CA file is for https:// addresses, not {addr:?}");
        return Ok(endpoint);
    }
    anyhow::ensure!(addr.starts_with("https://"), "{addr:?} must start with http:// or https://");
    let tls = match ca_file {
        Some(f) => {
            let pem = std::fs::read(f).with_context(|| format!("reading CA file {}", f.display()))?;
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
        }
        None => ClientTlsConfig::new().with_native_roots(),
    };
    endpoint.tls_config(tls).context("TLS settings")
}

/// The gRPC service of [`api::Api`].
type Served = pb::thumbup_server::ThumbupServer<api::Api>;

/// Serves the gRPC API (with health and reflection, v1 and v1alpha) on
/// `listener` until `shutdown` resolves, drains for
/// [`limits::ServerLimits::drain`] (health NOT_SERVING, `ready` cleared,
/// requests still served), then finishes in-flight requests. Credential
/// files resolve next to the config file, which must exist.
pub async fn run(
    opts: Options,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_with(opts, ConfigFiles::default(), listener, shutdown).await
}

/// [`run`], with credential files read from `files.secrets_dir` and,
/// if `files.optional`, a config file that may appear later.
pub async fn run_with(
    opts: Options,
    files: ConfigFiles,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // A certificate that does not load fails the start, before anything else.
    if let Some(tls) = &files.tls {
        tls.check()?;
    }
    let source = ConfigSource { path: opts.config.clone(), secrets_dir: files.secrets_dir, optional: files.optional };
    let reg = tenants::Registry::open(source, opts.redis_timeout).await.map_err(anyhow::Error::msg)?;
    let watcher = tokio::spawn(reg.clone().watch());
    let follower =
        files.registry_api.clone().map(|api| tokio::spawn(registry_api::follow(reg.clone(), api, opts.ready.clone())));
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<Served>().await;
    // Reflection in both versions, each listing every service served:
    // v1alpha is the one that grpcio-reflection's client and older tools
    // speak.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    info!(addr = %listener.local_addr()?, tls = files.tls.is_some(), "serving thumbup.v1.Thumbup");
    let ready = opts.ready.clone();
    let set_ready = |v: bool| {
        if let Some(r) = &ready {
            r.store(v, Ordering::Relaxed);
        }
    };
    set_ready(true);
    let drain = opts.limits.drain;
    let (drained_tx, drained) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        shutdown.await;
        // Before readiness is cleared, so that the follower cannot set it again.
        if let Some(f) = &follower {
            f.abort();
        }
        // The drain: health says NOT_SERVING and /readyz 503, so that
        // clients and endpoints stop sending here, while what still comes
        // (endpoint updates take a while to reach everyone) is served.
        set_ready(false);
        // The server as a whole first: whoever sees the service go
        // NOT_SERVING and then asks about the whole server gets the same.
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        health.set_not_serving::<Served>().await;
        info!(?drain, "draining: health NOT_SERVING, requests still served");
        tokio::time::sleep(drain).await;
        info!("drained: finishing the requests in flight");
        let _ = drained_tx.send(());
    };
    // Replies are small frames: without TCP_NODELAY on accepted sockets,
    // Nagle's algorithm meets the client's delayed ACK and a reply can wait
    // ~40 ms.
    let l = &opts.limits;
    let bounds = tower::ServiceBuilder::new()
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(l.max_in_flight))
        .layer(limits::MetadataLimitLayer::new(l.max_metadata_bytes));
    let router = tonic::transport::Server::builder()
        .http2_max_header_list_size(limits::HEADER_LIST_BYTES)
        .max_concurrent_streams(l.max_streams_per_connection)
        .concurrency_limit_per_connection(l.max_streams_per_connection as usize)
        // A little after the write path's own deadline, so that a late
        // write answers UNAVAILABLE (outcome unknown) rather than CANCELLED.
        .timeout(l.request_timeout + Duration::from_millis(250))
        .layer(bounds)
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(Served::new(api::Api::new(reg.clone(), l.request_timeout)));
    // With a certificate only TLS is served: a plaintext client fails its
    // handshake and is dropped. The certificate is reloaded on change.
    // Every unary request ends within its timeout; what is open after that
    // is long-lived streams (health watches), which would hold the process
    // until it is killed.
    let grace = l.request_timeout + Duration::from_secs(1);
    let served = match &files.tls {
        Some(tls) => {
            let serve = router.serve_with_incoming_shutdown(tls::incoming(listener, tls)?, shutdown);
            bounded(serve, drained, grace).await
        }
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            bounded(router.serve_with_incoming_shutdown(incoming, shutdown), drained, grace).await
        }
    };
    watcher.abort();
    // In-flight requests are done: end this process's write leases, so a
    // Redis outage right after a rolling restart finds no writer to wait for.
    reg.release_all().await;
    served?;
    Ok(())
}

/// Runs the server future `serve` to its end, or to `grace` after `drained`
/// fires (the drain is over and the server finishes what is in flight),
/// then drops it with the streams still open.
async fn bounded<E>(
    serve: impl Future<Output = Result<(), E>>,
    drained: tokio::sync::oneshot::Receiver<()>,
    grace: Duration,
) -> Result<(), E> {
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r,
        Ok(()) = drained => tokio::select! {
            r = &mut serve => r,
            _ = tokio::time::sleep(grace) => {
                info!(?grace, "streams still open after the drain and the request timeout: closing them");
                Ok(())
            }
        },
    }
}
