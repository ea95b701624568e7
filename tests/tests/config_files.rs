//! End-to-end tests of credentials kept in files (the Kubernetes layout: the
//! tenant registry in a ConfigMap, passwords and tokens in a Secret) against
//! the real MariaDB and Redis of `scripts/stack.sh`: a service started before
//! its config exists, tenants appearing when the files are written, and
//! tokens rotated by rewriting the tokens file alone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thumbup_core::config::{Config, TenantConfig};
use thumbup_core::keys::Keys;
use thumbup_e2e::*;
use thumbup_service::pb;
use thumbup_service::pb::thumbup_client::ThumbupClient;
use thumbup_service::tenants::POLL_INTERVAL;
use tonic::Code;
use tonic::transport::Channel;

const BIZ: i64 = 1;

/// How long a change may take to be served: a few polls.
fn pickup_deadline() -> Instant {
    Instant::now() + POLL_INTERVAL * 10
}

/// Writes `text` to `path` by renaming a finished file over it, so that a
/// poll never reads half a file (Kubernetes swaps a symlink, to the same end).
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A test's directory: `config.yaml` and `secrets/`, nothing written yet.
struct Files {
    dir: PathBuf,
    config: PathBuf,
    secrets: PathBuf,
}

impl Files {
    fn new(test: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("thumbup-e2e-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        Files { config: dir.join("config.yaml"), secrets, dir }
    }

    /// The tenant's YAML with its credentials in files: the Redis password
    /// and the tokens relative to the secrets dir, the DB password by
    /// absolute path.
    fn tenant_yaml(&self, name: &str) -> String {
        let db_pw = self.secrets.join(name).join("db-password");
        tenant_yaml(name, &[BIZ], "")
            .replace(&format!("tokens: [tok-{name}-0001]"), &format!("tokens_file: {name}/tokens"))
            .replace(&format!("password: pw-{name}-redis"), &format!("password_file: {name}/redis-password"))
            .replace(&format!("password: pw-{name}-db"), &format!("password_file: \"{}\"", db_pw.display()))
    }

    /// Writes the tenant's credential files (the same credentials that
    /// [`tenant_yaml`] gives inline) with `tokens` in the tokens file.
    fn write_secrets(&self, name: &str, tokens: &[&str]) {
        let d = self.secrets.join(name);
        std::fs::create_dir_all(&d).unwrap();
        write_atomically(&d.join("redis-password"), &format!("pw-{name}-redis\n"));
        write_atomically(&d.join("db-password"), &format!("pw-{name}-db\n"));
        self.write_tokens(name, tokens);
    }

    fn write_tokens(&self, name: &str, tokens: &[&str]) {
        write_atomically(&self.secrets.join(name).join("tokens"), &format!("\n{}\n", tokens.join("\n  ")));
    }
}

/// Resets and provisions a tenant from the inline form of its config.
async fn provision(name: &str) -> TenantConfig {
    let cfg = Config::parse(&format!("tenants:\n{}", tenant_yaml(name, &[BIZ], "")), "test").unwrap();
    let t = cfg.tenants.into_iter().next().unwrap();
    reset_tenant(&t).await;
    t
}

/// The service running in-process on port 0.
struct Service {
    addr: String,
    shutdown: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Service {
    async fn start(files: &Files, optional: bool) -> Service {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
        let opts = thumbup_service::Options {
            config: files.config.clone(),
            redis_timeout: Duration::from_millis(1000),
            ready: None,
            limits: Default::default(),
        };
        let cf =
            thumbup_service::ConfigFiles { secrets_dir: Some(files.secrets.clone()), optional, ..Default::default() };
        let server = tokio::spawn(thumbup_service::run_with(opts, cf, listener, async {
            let _ = rx.await;
        }));
        Service { addr, shutdown, server }
    }

    async fn client(&self, tenant: &str, token: &str) -> Client {
        let channel = Channel::from_shared(self.addr.clone()).unwrap().connect().await.expect("connect to service");
        Client { inner: ThumbupClient::new(channel), tenant: tenant.to_string(), token: token.to_string() }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        let result = tokio::time::timeout(Duration::from_secs(10), self.server).await;
        assert!(matches!(result, Ok(Ok(Ok(())))), "service stopped cleanly: {result:?}");
    }
}

/// Sends Likes until one succeeds; every failure before must have `while_code`.
async fn like_until_served(c: &Client, mid: i64, while_code: Code) -> pb::LikeReply {
    let deadline = pickup_deadline();
    loop {
        match c.act(BIZ, 1, mid, 9, pb::Action::Like).await {
            Ok(r) => return r,
            Err(s) if s.code() == while_code && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("not served within {:?}: {s:?}", POLL_INTERVAL * 10),
        }
    }
}

/// The job binary run with `--secrets-dir`, killed on drop.
struct JobProcess(Child);

impl JobProcess {
    fn start(files: &Files, tenant: &str) -> JobProcess {
        let log = std::fs::File::create(files.dir.join(format!("job-{tenant}.log"))).unwrap();
        let child = Command::new(job_binary())
            .arg("--config")
            .arg(&files.config)
            .arg("--secrets-dir")
            .arg(&files.secrets)
            .args(["--tenant", tenant, "--window-ms", "100", "--consumer", "e2e-job", "--admin-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn thumbup-job");
        JobProcess(child)
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_is_served_once_its_config_and_credential_files_appear_after_start() {
    let name = "e2e-cf-late";
    let files = Files::new("cf-late");
    let t = provision(name).await;
    let svc = Service::start(&files, true).await;
    let token = format!("tok-{name}-0001");
    let c = svc.client(name, &token).await;
    assert!(!files.config.exists());
    let refused = c.act(BIZ, 1, 1, 9, pb::Action::Like).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "no config yet: the tenant is unknown ({refused:?})");

    // Secrets first, then the registry, as the volumes may update in either order.
    files.write_secrets(name, &[&token]);
    write_atomically(&files.config, &format!("tenants:\n{}", files.tenant_yaml(name)));
    let reply = like_until_served(&c, 1, Code::Unauthenticated).await;
    assert_eq!(reply.state, pb::State::Like as i32);

    // The job reads the same files, only its own tenant's.
    let _job = JobProcess::start(&files, name);
    wait_drained(&Keys::new(name, t.stream.shards), Duration::from_secs(30)).await;
    assert_eq!(records(&t).await.get(&(1, BIZ, 1)), Some(&(pb::State::Like as i64)), "the job applied the Like");
    svc.stop().await;
    let _ = std::fs::remove_dir_all(&files.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_tokens_file_alone_rotates_the_token_and_losing_it_keeps_the_last_tokens() {
    let name = "e2e-cf-rotate";
    let files = Files::new("cf-rotate");
    provision(name).await;
    let (old, new) = (format!("tok-{name}-0001"), format!("tok-{name}-0002"));
    files.write_secrets(name, &[&old]);
    let yaml = format!("tenants:\n{}", files.tenant_yaml(name));
    write_atomically(&files.config, &yaml);
    let svc = Service::start(&files, false).await;
    let (old_client, new_client) = (svc.client(name, &old).await, svc.client(name, &new).await);
    old_client.act(BIZ, 1, 1, 9, pb::Action::Like).await.expect("the old token is accepted");
    let refused = new_client.act(BIZ, 1, 2, 9, pb::Action::Like).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "the new token is not accepted yet");

    files.write_tokens(name, &[&new]);
    let reply = like_until_served(&new_client, 2, Code::Unauthenticated).await;
    assert_eq!(reply.state, pb::State::Like as i32);
    let refused = old_client.act(BIZ, 1, 3, 9, pb::Action::Like).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "the old token is refused after the rotation");
    assert_eq!(std::fs::read_to_string(&files.config).unwrap(), yaml, "the config file was not touched");

    // A tokens file that goes missing fails the reload: the tenant keeps its tokens.
    let failed = || thumbup_service::metrics::RELOADS.with_label_values(&["error"]).get();
    let before = failed();
    std::fs::remove_file(files.secrets.join(name).join("tokens")).unwrap();
    let deadline = pickup_deadline();
    while failed() == before {
        assert!(Instant::now() < deadline, "the missing tokens file was never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    new_client.act(BIZ, 1, 4, 9, pb::Action::Like).await.expect("the tenant keeps its last tokens");
    svc.stop().await;
    let _ = std::fs::remove_dir_all(&files.dir);
}

#[tokio::test]
async fn missing_config_file_fails_the_start_unless_optional() {
    let files = Files::new("cf-missing");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = thumbup_service::Options {
        config: files.config.clone(),
        redis_timeout: Duration::from_millis(1000),
        ready: None,
        limits: Default::default(),
    };
    let cf = thumbup_service::ConfigFiles { secrets_dir: None, optional: false, ..Default::default() };
    let err = thumbup_service::run_with(opts, cf, listener, std::future::pending()).await.unwrap_err().to_string();
    assert!(err.contains(&files.config.display().to_string()), "{err}");

    let svc = Service::start(&files, true).await;
    let c = svc.client("e2e-cf-missing", "tok-e2e-cf-missing-0001").await;
    let refused = c.states(BIZ, 1, &[1]).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "serving, with no tenants");
    svc.stop().await;
    let _ = std::fs::remove_dir_all(&files.dir);
}
