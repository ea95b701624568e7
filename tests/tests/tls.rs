//! TLS on every hop, against the servers of `scripts/stack.sh` (which runs
//! TLS beside plaintext with its own CA): the gRPC service with a
//! certificate serves TLS only, Redis is reached on its TLS port with the
//! CA, and a tenant whose DB TLS is required is encrypted and refused
//! plaintext by the server itself. scripts/test.sh also runs the exact-counts,
//! bad-input and isolation tests of data_plane.rs in TLS mode.

use std::time::Duration;

use sqlx::{ConnectOptions, Connection, Row};
use thumbup_core::config::{Config, RedisTls};
use thumbup_core::{cache, db, provision};
use thumbup_e2e::*;
use thumbup_service::pb;
use thumbup_test_support::stack::{admin_db_url, admin_redis_url, redis_tls_port, stack_ca};

/// A tenant reaching Redis (TLS port, the stack's CA) and the DB
/// (verify-identity, the stack's CA) over TLS, whatever the test mode.
fn tls_tenant(name: &str) -> String {
    let ca = stack_ca().display().to_string();
    let user = name.replace('-', "_");
    format!(
        r#"  - name: {name}
    businesses: [{{ name: b1, id: 1 }}]
    tokens: [tok-{name}-0001]
    redis: {{ url: "rediss://127.0.0.1:{rp}", username: thumbup-{name}, password: pw-{name}-redis, tls: {{ ca_file: "{ca}" }} }}
    db: {{ url: "mysql://127.0.0.1:{dp}", username: thumbup_{user}, password: pw-{name}-db, tls: {{ mode: verify-identity, ca_file: "{ca}" }} }}
"#,
        rp = redis_tls_port(),
        dp = std::env::var("THUMBUP_DB_PORT").unwrap_or_else(|_| "23306".into()),
    )
}

/// Serves the API with the stack's certificate on port 0; returns the port.
async fn tls_service(test: &str, tenants: &str) -> (u16, tokio::sync::oneshot::Sender<()>) {
    tls_service_with(test, tenants, stack_server_tls()).await
}

/// [`tls_service`] with the certificate files `tls`.
async fn tls_service_with(
    test: &str,
    tenants: &str,
    tls: thumbup_service::ServerTls,
) -> (u16, tokio::sync::oneshot::Sender<()>) {
    let dir = world_dir(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, format!("tenants:\n{tenants}")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let opts = thumbup_service::Options {
        config: path,
        redis_timeout: Duration::from_millis(1000),
        ready: None,
        limits: Default::default(),
    };
    let files = thumbup_service::ConfigFiles { tls: Some(tls), ..Default::default() };
    tokio::spawn(thumbup_service::run_with(opts, files, listener, async {
        let _ = rx.await;
    }));
    (port, tx)
}

async fn counts_call(addr: &str, ca: Option<&std::path::Path>, tenant: &str) -> Result<pb::GetCountsReply, String> {
    let endpoint = thumbup_service::client_endpoint(addr, ca).map_err(|e| e.to_string())?;
    let channel = endpoint.connect_timeout(Duration::from_secs(5)).connect().await.map_err(|e| format!("{e:?}"))?;
    let mut client = pb::thumbup_client::ThumbupClient::new(channel);
    let mut req = tonic::Request::new(pb::GetCountsRequest { business_id: 1, message_ids: vec![1] });
    req.metadata_mut().insert("x-thumbup-tenant", tenant.parse().unwrap());
    req.metadata_mut().insert("authorization", format!("Bearer tok-{tenant}-0001").parse().unwrap());
    client.get_counts(req).await.map(|r| r.into_inner()).map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_with_a_certificate_serves_tls_only_and_refuses_plaintext_clients() {
    let yaml = tls_tenant("e2e-tls-grpc");
    let config = Config::parse(&format!("tenants:\n{yaml}"), "test").unwrap();
    reset_tenant(&config.tenants[0]).await;
    let (port, stop) = tls_service("tls-grpc", &yaml).await;
    let ca = stack_ca();
    // Both names of the certificate.
    for host in ["127.0.0.1", "localhost"] {
        let reply = counts_call(&format!("https://{host}:{port}"), Some(&ca), "e2e-tls-grpc").await;
        assert!(reply.is_ok(), "TLS client with the CA, via {host}: {reply:?}");
    }
    // A plaintext client gets no answer: the server only speaks TLS.
    let plain = counts_call(&format!("http://127.0.0.1:{port}"), None, "e2e-tls-grpc").await;
    assert!(plain.is_err(), "a plaintext client was answered: {plain:?}");
    // A client that does not trust the stack's CA refuses the server.
    let untrusted = counts_call(&format!("https://127.0.0.1:{port}"), None, "e2e-tls-grpc").await;
    let err = untrusted.expect_err("a client without the CA accepted the certificate");
    assert!(err.to_lowercase().contains("certificate") || err.contains("invalid peer"), "{err}");
    // And a CA file is refused for a plaintext address.
    assert!(thumbup_service::client_endpoint(&format!("http://127.0.0.1:{port}"), Some(&ca)).is_err());
    let _ = stop.send(());
}

#[tokio::test]
async fn redis_over_tls_checks_the_servers_certificate_against_the_ca() {
    let yaml = tls_tenant("e2e-tls-redis");
    let config = Config::parse(&format!("tenants:\n{yaml}"), "test").unwrap();
    let t = &config.tenants[0];
    reset_tenant(t).await;
    assert!(t.redis.url.starts_with("rediss://") && t.redis.tls.as_ref().unwrap().ca_pem.is_some());
    // The tenant's ACL user over TLS.
    let mut con = cache::connect(&t.redis, Duration::from_secs(5)).await.expect("TLS connection with the CA");
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    // The system's roots do not hold the stack's CA: refused.
    let mut untrusted = t.redis.clone();
    untrusted.tls = Some(RedisTls::default());
    let err = match cache::connect(&untrusted, Duration::from_secs(5)).await {
        Ok(_) => panic!("a certificate outside the system roots was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // A plaintext client on the TLS port gets no answer.
    let plain = t.redis.url.replacen("rediss://", "redis://", 1);
    let info = redis::IntoConnectionInfo::into_connection_info(plain.as_str()).unwrap();
    let settings = info.redis_settings().clone().set_username(&t.redis.username);
    let info = info.set_redis_settings(settings);
    let client = redis::Client::open(info).unwrap();
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    assert!(client.get_multiplexed_async_connection_with_config(&config).await.is_err());
    // The admin URL form: rediss:// with the CA as ssl-ca.
    let admin = admin_redis_url().replacen("redis://", "rediss://", 1).replace(
        &format!(":{}", std::env::var("THUMBUP_REDIS_PORT").unwrap_or_else(|_| "26379".into())),
        &format!(":{}", redis_tls_port()),
    );
    let admin = format!("{admin}/?{}={}", cache::ADMIN_CA_PARAM, stack_ca().display());
    assert!(provision::provision_redis(&admin, t).await.is_ok(), "admin over TLS: {admin}");
}

#[tokio::test]
async fn a_tenant_with_db_tls_is_encrypted_and_refused_plaintext_by_the_server() {
    let yaml = tls_tenant("e2e-tls-db");
    let config = Config::parse(&format!("tenants:\n{yaml}"), "test").unwrap();
    let t = &config.tenants[0];
    // reset_tenant provisions the user REQUIRE SSL and checks both.
    reset_tenant(t).await;
    assert_db_tls_enforced(t).await;
    // verify-identity checks the name: the certificate names 127.0.0.1 and
    // localhost, and the same server by another of its names passes too.
    let mut by_name = t.clone();
    by_name.db.url = by_name.db.url.replace("127.0.0.1", "localhost");
    let mut con = db::connect_options(&by_name).unwrap().connect().await.expect("verify-identity via localhost");
    let cipher: String = sqlx::query("SHOW SESSION STATUS LIKE 'Ssl_cipher'").fetch_one(&mut con).await.unwrap().get(1);
    assert!(!cipher.is_empty());
    con.close().await.unwrap();
    // Without the CA the server's certificate is refused.
    let mut no_ca = t.clone();
    no_ca.db.tls.as_mut().unwrap().ca_pem = None;
    no_ca.db.tls.as_mut().unwrap().ca_file = None;
    let e = db::connect_options(&no_ca).unwrap().connect().await.expect_err("unknown CA accepted");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // A tenant configured without TLS is provisioned REQUIRE NONE again.
    let mut plain = t.clone();
    plain.db.tls = None;
    provision::provision_db(&admin_db_url(), &plain).await.unwrap();
    let opts = db::connect_options(&plain).unwrap().ssl_mode(sqlx::mysql::MySqlSslMode::Disabled);
    opts.connect().await.expect("REQUIRE NONE accepts plaintext").close().await.unwrap();
}

/// A CA of its own and a certificate for 127.0.0.1 signed by it, made with
/// openssl in `dir`: (ca.crt, server.crt, server.key).
fn other_ca(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(&[&["req", "-x509"][..], &ec, &["-days", "2", "-subj", "/CN=other CA", "-keyout", "ca.key", "-out", "ca.crt"]]
        .concat());
    run(&[&["req", "-new"][..], &ec, &["-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"]]
        .concat());
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext",
        "-out",
        "server.crt",
    ]);
    ["ca.crt", "server.crt", "server.key"].map(|f| dir.join(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_grpc_certificate_is_served_to_new_connections_without_a_restart() {
    let yaml = tls_tenant("e2e-tls-rotate");
    let config = Config::parse(&format!("tenants:\n{yaml}"), "test").unwrap();
    reset_tenant(&config.tenants[0]).await;
    let dir = world_dir("tls-rotate-files");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let files = thumbup_service::ServerTls { cert_file: dir.join("tls.crt"), key_file: dir.join("tls.key") };
    let stack = stack_server_tls();
    std::fs::copy(&stack.cert_file, &files.cert_file).unwrap();
    std::fs::copy(&stack.key_file, &files.key_file).unwrap();
    let (port, stop) = tls_service_with("tls-rotate", &yaml, files.clone()).await;
    let addr = format!("https://127.0.0.1:{port}");
    let old_ca = stack_ca();
    assert!(counts_call(&addr, Some(&old_ca), "e2e-tls-rotate").await.is_ok());
    // A connection opened before the rotation.
    let endpoint = thumbup_service::client_endpoint(&addr, Some(&old_ca)).unwrap();
    let open = endpoint.connect().await.unwrap();

    // The renewal: a certificate from another CA, key first (a half-written
    // pair is not taken: the old one is served until the pair matches).
    let [new_ca, cert, key] = other_ca(&dir);
    std::fs::copy(&key, &files.key_file).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(counts_call(&addr, Some(&old_ca), "e2e-tls-rotate").await.is_ok(), "a mismatched pair was taken");
    std::fs::copy(&cert, &files.cert_file).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counts_call(&addr, Some(&new_ca), "e2e-tls-rotate").await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old = counts_call(&addr, Some(&old_ca), "e2e-tls-rotate").await;
    assert!(old.is_err(), "the old certificate is still served to new connections: {old:?}");
    // The connection opened before keeps working.
    let mut client = pb::thumbup_client::ThumbupClient::new(open);
    let mut req = tonic::Request::new(pb::GetCountsRequest { business_id: 1, message_ids: vec![1] });
    req.metadata_mut().insert("x-thumbup-tenant", "e2e-tls-rotate".parse().unwrap());
    req.metadata_mut().insert("authorization", "Bearer tok-e2e-tls-rotate-0001".parse().unwrap());
    assert!(client.get_counts(req).await.is_ok(), "an open connection survives the rotation");
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}
