//! The binaries as operators run them, against the real MariaDB and Redis
//! of `scripts/stack.sh`: the service drains on SIGTERM (gRPC health
//! NOT_SERVING and /readyz 503 while requests are still served, then exit
//! 0), answers reflection v1alpha beside v1, logs JSON lines with
//! `THUMBUP_LOG_FORMAT=json` and shows its build info on /metrics; every
//! binary refuses an unknown log format at start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use thumbup_e2e::*;
use thumbup_service::pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TENANT: &str = "e2e-drain";

/// A binary of the workspace next to the test binary (`cargo build
/// --workspace --bins`).
fn binary(name: &str) -> PathBuf {
    let bin = job_binary().with_file_name(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
    bin
}

/// One HTTP/1.1 GET of the admin endpoint: status and body.
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("admin {addr}: {e}"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), body.to_string())
}

/// The service binary with JSON logs, its stderr lines as they come, and
/// the addresses it logged.
struct Service {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<serde_json::Value>,
    grpc: String,
    admin: String,
}

impl Service {
    async fn start(config: &Path, drain_seconds: u64) -> Service {
        let mut child = tokio::process::Command::new(binary("thumbup-service"))
            .arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--drain-seconds", &drain_seconds.to_string()])
            .env("THUMBUP_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn thumbup-service");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = Service { child, lines, seen: Vec::new(), grpc: String::new(), admin: String::new() };
        s.admin = s.field_of("admin endpoint", "admin_addr").await;
        s.grpc = format!("http://{}", s.field_of("serving thumbup.v1.Thumbup", "addr").await);
        s
    }

    /// The next log line, which must be a JSON object.
    async fn next_line(&mut self) -> Option<serde_json::Value> {
        let line = tokio::time::timeout(Duration::from_secs(30), self.lines.recv()).await.ok()??;
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(), "{v}");
        self.seen.push(v.clone());
        Some(v)
    }

    /// Field `field` of the first logged event whose message is `message`.
    async fn field_of(&mut self, message: &str, field: &str) -> String {
        loop {
            let v = self.next_line().await.unwrap_or_else(|| panic!("no {message:?} logged: {:#?}", self.seen));
            if v["message"] == message {
                return v[field].as_str().unwrap_or_else(|| panic!("{field} in {v}")).to_string();
            }
        }
    }

    async fn sigterm(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        assert!(status.success());
    }
}

async fn health(addr: &str) -> HealthClient<tonic::transport::Channel> {
    let channel = thumbup_service::client_endpoint(addr, None).unwrap().connect().await.expect("connect");
    HealthClient::new(channel)
}

async fn client(addr: &str) -> Client {
    let channel = thumbup_service::client_endpoint(addr, None).unwrap().connect().await.expect("connect");
    Client {
        inner: pb::thumbup_client::ThumbupClient::new(channel),
        tenant: TENANT.into(),
        token: format!("tok-{TENANT}-0001"),
    }
}

async fn status_of(h: &mut HealthClient<tonic::transport::Channel>, service: &str) -> ServingStatus {
    let r = h.check(HealthCheckRequest { service: service.into() }).await.expect("health check").into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// The services that reflection v1alpha lists.
async fn v1alpha_services(addr: &str) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let channel = thumbup_service::client_endpoint(addr, None).unwrap().connect().await.expect("connect");
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .expect("reflection v1alpha answers")
        .into_inner();
    let reply = replies.message().await.expect("a reply").expect("one reply");
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("not a service list: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_health_goes_not_serving_and_readyz_503_while_requests_are_still_served_then_it_exits_0() {
    let w = World::start("drain", &tenant_yaml(TENANT, &[1], "")).await;
    // Long enough to do the checks below inside it; they do not depend on it
    // otherwise (each waits for an event, not for a time).
    let mut s = Service::start(&w.config_path, 15).await;
    let c = client(&s.grpc).await;
    let mut h = health(&s.grpc).await;
    assert_eq!(c.act(1, 1, 1, 9, pb::Action::Like).await.expect("served").state, pb::State::Like as i32);
    assert_eq!(status_of(&mut h, "").await, ServingStatus::Serving);
    assert_eq!(status_of(&mut h, "thumbup.v1.Thumbup").await, ServingStatus::Serving);
    assert_eq!(http_get(&s.admin, "/readyz").await.0, 200);
    let mut watch =
        h.watch(HealthCheckRequest { service: "thumbup.v1.Thumbup".into() }).await.expect("watch").into_inner();
    let first = watch.message().await.unwrap().expect("the current status");
    assert_eq!(ServingStatus::try_from(first.status).unwrap(), ServingStatus::Serving);

    // Reflection answers in v1alpha too, listing every service served.
    assert_eq!(
        v1alpha_services(&s.grpc).await,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "thumbup.v1.Thumbup"
        ]
    );

    // The build info and the tenant label of the process's own metrics.
    let (code, metrics) = http_get(&s.admin, "/metrics").await;
    assert_eq!(code, 200);
    let build = metrics.lines().find(|l| l.starts_with("thumbup_build_info{")).unwrap_or_else(|| panic!("{metrics}"));
    assert!(build.contains("binary=\"thumbup-service\"") && build.ends_with("} 1"), "{build}");
    assert!(build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))), "{build}");
    let liked = format!("thumbup_service_requests_total{{code=\"Ok\",rpc=\"Like\",tenant=\"{TENANT}\"}} 1");
    assert!(metrics.lines().any(|l| l == liked), "{liked} in:\n{metrics}");

    let term = Instant::now();
    s.sigterm().await;
    let next = watch.message().await.expect("the watch goes on").expect("a status change");
    assert_eq!(ServingStatus::try_from(next.status).unwrap(), ServingStatus::NotServing, "{next:?}");
    let drained_at = term.elapsed();
    assert_eq!(status_of(&mut h, "").await, ServingStatus::NotServing, "the server as a whole");
    // Draining: still served, on the open connection and on a new one.
    let r = c.act(1, 2, 1, 9, pb::Action::Like).await.expect("a write while draining is served");
    assert_eq!(r.state, pb::State::Like as i32);
    let fresh = client(&s.grpc).await;
    assert!(fresh.counts(1, &[1, 2]).await.expect("a read on a new connection while draining").contains_key(&2));
    let (code, body) = http_get(&s.admin, "/readyz").await;
    assert_eq!(code, 503, "/readyz while draining: {body}");
    // Then the drain ends and the process exits cleanly.
    let status = tokio::time::timeout(Duration::from_secs(60), s.child.wait()).await.expect("exits").unwrap();
    println!("NOT_SERVING {drained_at:?} after SIGTERM; exited after {:?} (drain 15 s)", term.elapsed());
    assert!(status.success(), "{status}");
    while s.next_line().await.is_some() {}
    let logged = |m: &str| s.seen.iter().any(|v| v["message"] == m);
    assert!(logged("draining: health NOT_SERVING, requests still served"), "{:#?}", s.seen);
    // The health watch was still open: the server closed it.
    assert!(logged("streams still open after the drain and the request timeout: closing them"), "{:#?}", s.seen);
    w.stop().await;
}

#[tokio::test]
async fn every_binary_refuses_an_unknown_log_format_at_start_naming_the_choices() {
    for bin in ["thumbup-service", "thumbup-job", "thumbup-operator", "thumbup-db-proxy"] {
        // --version would print and exit 0: the format is checked before.
        let out = tokio::process::Command::new(binary(bin))
            .arg("--version")
            .env("THUMBUP_LOG_FORMAT", "yaml")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} started with THUMBUP_LOG_FORMAT=yaml: {stderr}");
        assert!(
            stderr.contains("THUMBUP_LOG_FORMAT=\"yaml\" is not a log format: use text (the default) or json"),
            "{bin}: {stderr}"
        );
        let ok = tokio::process::Command::new(binary(bin)).arg("--version").env("THUMBUP_LOG_FORMAT", "json").output();
        assert!(ok.await.unwrap().status.success(), "{bin} takes json");
    }
}
