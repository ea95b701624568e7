//! The admin HTTP endpoint of every binary: `/metrics` (Prometheus text of
//! the default registry), `/healthz` (the process runs) and `/readyz` (it
//! can serve: set by the binary); and what every binary does at start:
//! logging ([`init_tracing`], text or JSON lines) and its build-info metric
//! ([`register_build_info`]).

use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{Encoder, IntGauge, Opts, TextEncoder};

async fn metrics() -> (StatusCode, String) {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&prometheus::gather(), &mut buf) {
        Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&buf).into_owned()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Binds the admin endpoint; returns the bound address and the server future.
pub async fn bind(
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let app = Router::new().route("/metrics", get(metrics)).route("/healthz", get(|| async { "ok" })).route(
        "/readyz",
        get(move || {
            let ready = ready.clone();
            async move {
                if ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await }))
}

/// A running admin endpoint and the stop signal of the process around it:
/// stopped when the given shutdown future completes or when [`Admin::stop`]
/// is called, whichever is first. What the binaries that run controllers
/// beside the endpoint share.
pub struct Admin {
    /// The bound address.
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Admin {
    /// Binds the endpoint on `addr` ([`bind`]) and serves it until stopped.
    pub async fn start(
        addr: SocketAddr,
        ready: Arc<AtomicBool>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<Admin> {
        let (stop, _) = tokio::sync::watch::channel(false);
        let stopped = Admin::wait(stop.subscribe());
        let (addr, server) = bind(addr, ready, stopped).await?;
        let server = tokio::spawn(server);
        let forward = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = forward.send(true);
        });
        Ok(Admin { addr, stop, server })
    }

    async fn wait(mut rx: tokio::sync::watch::Receiver<bool>) {
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Completes once the process is asked to stop.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        Admin::wait(self.stop.subscribe())
    }

    /// Asks the process (and the endpoint) to stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops the endpoint and waits for it to finish.
    pub async fn join(self) {
        self.stop();
        let _ = self.server.await;
    }
}

/// The environment variable choosing the log format ([`LogFormat`]).
pub const LOG_FORMAT_ENV: &str = "THUMBUP_LOG_FORMAT";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object a line, the event's fields at the top level beside
    /// `timestamp`, `level`, `target` and the spans: for log pipelines.
    Json,
}

/// A [`LOG_FORMAT_ENV`] value that names no [`LogFormat`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{LOG_FORMAT_ENV}={0:?} is not a log format: use text (the default) or json")]
pub struct LogFormatError(pub String);

impl FromStr for LogFormat {
    type Err = LogFormatError;

    /// `text` or `json`; the empty string (a variable set to nothing) is
    /// the default, text.
    fn from_str(s: &str) -> Result<LogFormat, LogFormatError> {
        match s {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(LogFormatError(other.to_string())),
        }
    }
}

impl LogFormat {
    /// The format [`LOG_FORMAT_ENV`] names; text when it is unset.
    pub fn from_env() -> Result<LogFormat, LogFormatError> {
        match std::env::var(LOG_FORMAT_ENV) {
            Ok(v) => v.parse(),
            Err(std::env::VarError::NotPresent) => Ok(LogFormat::Text),
            Err(std::env::VarError::NotUnicode(v)) => Err(LogFormatError(v.to_string_lossy().into_owned())),
        }
    }
}

/// The subscriber of [`init_tracing`]: `format` lines to `writer`, filtered
/// by `filter`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

/// Logs to stderr in the format of [`LOG_FORMAT_ENV`] (text by default),
/// with an `EnvFilter` from `RUST_LOG`, `info` by default. An unknown
/// format is an error, for the binary to fail its start with.
pub fn init_tracing() -> Result<(), LogFormatError> {
    let format = LogFormat::from_env()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Already set (a test that called it before): keep that one.
    let _ = tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr));
    Ok(())
}

/// The commit the binaries were built from: the `THUMBUP_GIT_SHA`
/// environment variable at build time (the Dockerfile's build argument of
/// that name), None without it.
pub const GIT_SHA: Option<&str> = match option_env!("THUMBUP_GIT_SHA") {
    Some(sha) if !sha.is_empty() => Some(sha),
    _ => None,
};

/// Registers `thumbup_build_info{binary,version,git_sha}` = 1 in
/// `registry`: which build of which program a scrape comes from (`git_sha`
/// only when [`GIT_SHA`] is known). Every binary calls it once at start.
pub fn register_build_info(registry: &prometheus::Registry, binary: &str, version: &str) -> prometheus::Result<()> {
    let mut opts = Opts::new("thumbup_build_info", "1, labelled with the binary, its version and its commit")
        .const_label("binary", binary)
        .const_label("version", version);
    if let Some(sha) = GIT_SHA {
        opts = opts.const_label("git_sha", sha);
    }
    let gauge = IntGauge::with_opts(opts)?;
    gauge.set(1);
    registry.register(Box::new(gauge))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_are_text_or_json_and_anything_else_is_an_error_naming_the_choices() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("".parse(), Ok(LogFormat::Text));
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        for bad in ["JSON", "logfmt", " json", "json\n"] {
            let e = bad.parse::<LogFormat>().expect_err(bad);
            let text = e.to_string();
            assert!(text.contains(LOG_FORMAT_ENV) && text.contains("text") && text.contains("json"), "{text}");
            assert!(text.contains(&format!("{bad:?}")), "the error quotes the value: {text}");
        }
    }

    /// A writer into a shared buffer, to read what the subscriber wrote.
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Buf {
        type Writer = Buf;
        fn make_writer(&'w self) -> Buf {
            self.clone()
        }
    }

    fn logged(format: LogFormat) -> String {
        let buf = Buf::default();
        let sub = subscriber(format, tracing_subscriber::EnvFilter::new("info"), buf.clone());
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("serve", tenant = "demo");
            let _g = span.enter();
            tracing::info!(addr = "127.0.0.1:1", n = 3, "serving");
            tracing::debug!("filtered out");
        });
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_logs_are_one_object_a_line_with_the_fields_at_the_top_level() {
        let out = logged(LogFormat::Json);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "one event, one line: {out}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON object");
        assert_eq!(v["message"], "serving", "{v}");
        assert_eq!(v["addr"], "127.0.0.1:1", "{v}");
        assert_eq!(v["n"], 3, "{v}");
        assert_eq!(v["level"], "INFO", "{v}");
        assert_eq!(v["span"]["tenant"], "demo", "{v}");
        assert!(v["timestamp"].is_string(), "{v}");
    }

    #[test]
    fn text_logs_are_not_json() {
        let out = logged(LogFormat::Text);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("serving") && out.contains("addr") && out.contains("\"127.0.0.1:1\""), "{out}");
        assert!(serde_json::from_str::<serde_json::Value>(out.trim()).is_err(), "{out}");
    }

    #[test]
    fn build_info_is_one_sample_of_1_labelled_with_binary_and_version() {
        let registry = prometheus::Registry::new();
        register_build_info(&registry, "thumbup-test", "1.2.3").unwrap();
        let families = registry.gather();
        assert_eq!(families.len(), 1);
        let f = &families[0];
        assert_eq!(f.name(), "thumbup_build_info");
        assert_eq!(f.get_metric().len(), 1);
        let m = &f.get_metric()[0];
        assert_eq!(m.get_gauge().get_value(), 1.0);
        let labels: Vec<(&str, &str)> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
        assert!(labels.contains(&("binary", "thumbup-test")), "{labels:?}");
        assert!(labels.contains(&("version", "1.2.3")), "{labels:?}");
        assert_eq!(labels.iter().any(|(n, _)| *n == "git_sha"), GIT_SHA.is_some(), "{labels:?}");
        // Twice in one registry is an error, not a second sample.
        assert!(register_build_info(&registry, "thumbup-test", "1.2.3").is_err());
    }
}
