//! The project's Redis function library across releases, each scenario on
//! a private Redis that the test starts (so that loading and missing
//! libraries never disturb the shared stack): a write sent before the
//! library is loaded is UNAVAILABLE, says what to run and writes nothing;
//! two releases' libraries live side by side, and provisioning one leaves
//! the other alone; counts are read by a tenant user that an older release
//! provisioned without MGET.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use thumbup_core::cache::{self, Scripts};
use thumbup_core::config::{Config, TenantConfig};
use thumbup_core::functions::{self, Function};
use thumbup_core::provision;
use thumbup_e2e::*;
use thumbup_service::pb;
use tonic::Code;

const BIZ: i64 = 1;
const ADMIN_PASSWORD: &str = "hb-private-admin";

/// A `redis-server` child on a free port, without persistence; killed
/// when dropped.
struct PrivateRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    fn start(test: &str) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("thumbup-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--requirepass", ADMIN_PASSWORD])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (installed with the local stack)");
        let r = PrivateRedis { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "private redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn admin_url(&self) -> String {
        format!("redis://default:{ADMIN_PASSWORD}@127.0.0.1:{}", self.port)
    }

    async fn admin(&self) -> MultiplexedConnection {
        redis::Client::open(self.admin_url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    /// The names of the loaded libraries.
    async fn libraries(&self) -> Vec<String> {
        let libs: Vec<std::collections::HashMap<String, redis::Value>> =
            redis::cmd("FUNCTION").arg("LIST").query_async(&mut self.admin().await).await.unwrap();
        let mut names: Vec<String> =
            libs.iter().filter_map(|l| redis::from_redis_value_ref(l.get("library_name")?).ok()).collect();
        names.sort();
        names
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Tenant `name` of the shared stack's DB, with its Redis on `redis`.
fn tenant_on(name: &str, redis: &PrivateRedis) -> String {
    let shared = std::env::var("THUMBUP_REDIS_PORT").unwrap_or_else(|_| "26379".into());
    tenant_yaml(name, &[BIZ], "")
        .replace(&format!("redis://127.0.0.1:{shared}"), &format!("redis://127.0.0.1:{}", redis.port))
}

/// The tenant's ACL user alone, as provisioning makes it, without loading
/// the library: what a Redis looks like to a release whose library nobody
/// has loaded yet.
async fn acl_user_only(redis: &PrivateRedis, t: &TenantConfig) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&t.redis.username)
        .arg(provision::acl_rules(&t.name, &t.redis.password))
        .query_async(&mut redis.admin().await)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_before_the_function_library_is_loaded_is_unavailable_names_provision_and_writes_nothing() {
    let name = "hb-fn-missing";
    let redis = PrivateRedis::start(name);
    let yaml = tenant_on(name, &redis);
    let cfg = Config::parse(&format!("tenants:\n{yaml}"), "test").unwrap();
    acl_user_only(&redis, cfg.tenant(name).unwrap()).await;
    let w = World::start(name, &yaml).await;
    let t = w.tenant(name);
    let c = w.client_of(name).await;

    let e = c.act(BIZ, 1, 5, 9, pb::Action::Like).await.expect_err("no function to run");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let lib = functions::library().name();
    for said in [lib.as_str(), "not loaded", "provision", "nothing was written"] {
        assert!(e.message().contains(said), "the message says {said:?}: {}", e.message());
    }
    assert!(has_retry_info(&e), "retryable: {e:?}");
    assert!(records(t).await.is_empty(), "nothing in the DB");
    let keys: i64 = redis::cmd("DBSIZE").query_async(&mut redis.admin().await).await.unwrap();
    assert_eq!(keys, 0, "nothing in Redis");

    // Provisioning loads the library; the same write then goes through.
    provision::provision_redis(&redis.admin_url(), t).await.unwrap();
    assert_eq!(redis.libraries().await, vec![lib]);
    let done = c.act(BIZ, 1, 5, 9, pb::Action::Like).await.expect("written once the library is loaded");
    assert_eq!(done.state, pb::State::Like as i32);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_releases_libraries_are_loaded_side_by_side_and_provisioning_one_keeps_the_other() {
    let name = "hb-fn-rolling";
    let redis = PrivateRedis::start(name);
    let cfg = Config::parse(&format!("tenants:\n{}", tenant_on(name, &redis)), "test").unwrap();
    let t = cfg.tenant(name).unwrap();
    // Another release's library: other names (its version), its own code.
    let this = functions::library();
    let old_version = "0123456789abcdef";
    assert_ne!(this.version(), old_version);
    let old_source = this.source().replace(this.version(), old_version);
    let _: String =
        redis::cmd("FUNCTION").arg("LOAD").arg(&old_source).query_async(&mut redis.admin().await).await.unwrap();
    provision::provision_redis(&redis.admin_url(), t).await.unwrap();
    let mut both = vec![format!("thumbup_{old_version}"), this.name()];
    both.sort();
    assert_eq!(redis.libraries().await, both, "provisioning this release left the other's library");

    // A pod of each release calls its own functions with the tenant's user.
    let mut con = cache::connect(&t.redis, Duration::from_secs(2)).await.unwrap();
    let k = thumbup_core::keys::Keys::new(&t.name, t.stream.shards);
    let old_set = this.function(Function::SetIfNewer).replace(this.version(), old_version);
    let written: i64 = redis::cmd("FCALL")
        .arg(&old_set)
        .arg(1)
        .arg(k.counts(BIZ, 1))
        .arg("1:0:5")
        .arg(5)
        .arg(60)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(written, 1, "the old release's set-if-newer");
    let scripts = Scripts::default();
    assert!(!scripts.set_if_newer(&mut con, &k.counts(BIZ, 1), (0, 0), 4, 60).await.unwrap(), "older version");
    assert!(scripts.set_if_newer(&mut con, &k.counts(BIZ, 1), (2, 0), 6, 60).await.unwrap(), "newer version");
    // Many at once (the job's refresh of a window): each key keeps the
    // newer of its cached and offered values, over more than one pipeline.
    let n = thumbup_core::cache::PIPELINE_CHUNK as i64 + 5;
    let many: Vec<_> = (1..=n).map(|m| (k.counts(BIZ, m), (m, 0), if m == 1 { 5 } else { 7 })).collect();
    scripts.set_if_newer_many(&mut con, &many, 60).await.unwrap();
    for (m, want) in [(1, "2:0:6"), (2, "2:0:7"), (n, &format!("{n}:0:7") as &str)] {
        let got: String = redis::cmd("GET").arg(k.counts(BIZ, m)).query_async(&mut con).await.unwrap();
        assert_eq!(got, want, "item {m}");
    }
    let w = scripts.watermark(&mut con, &k.stream(0), thumbup_core::keys::JOB_GROUP).await.unwrap();
    assert!(w > 0, "the read-only watermark through FCALL_RO");

    // Provisioning again converges: the same two libraries, this one's code
    // unchanged.
    provision::provision_redis(&redis.admin_url(), t).await.unwrap();
    assert_eq!(redis.libraries().await, both);
    let code: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(this.name())
        .arg("WITHCODE")
        .query_async(&mut redis.admin().await)
        .await
        .unwrap();
    let loaded: String = redis::from_redis_value_ref(&code[0]["library_code"]).unwrap();
    assert_eq!(loaded, this.source());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_read_by_a_tenant_user_provisioned_before_mget_was_allowed() {
    let name = "hb-no-mget";
    let redis = PrivateRedis::start(name);
    let cfg = Config::parse(&format!("tenants:\n{}", tenant_on(name, &redis)), "test").unwrap();
    let t = cfg.tenant(name).unwrap();
    // The user as a release before MGET was allowed provisioned it.
    let rules: Vec<String> = provision::acl_rules(&t.name, &t.redis.password);
    assert!(rules.iter().any(|r| r == "+mget"), "this release allows MGET: {rules:?}");
    let old: Vec<String> = rules.into_iter().filter(|r| r != "+mget").collect();
    let mut admin = redis.admin().await;
    let _: () =
        redis::cmd("ACL").arg("SETUSER").arg(&t.redis.username).arg(&old).query_async(&mut admin).await.unwrap();
    let keys = thumbup_core::keys::Keys::new(&t.name, 1);
    let names: Vec<String> = (1..=3).map(|m| keys.counts(BIZ, m)).collect();
    let _: () = redis::cmd("SET").arg(&names[0]).arg("4:1:7").query_async(&mut admin).await.unwrap();
    let _: () = redis::cmd("SET").arg(&names[2]).arg("9:0:8").query_async(&mut admin).await.unwrap();

    let mut con = cache::connect(&t.redis, Duration::from_secs(2)).await.unwrap();
    let refused: Result<Vec<Option<String>>, _> = redis::cmd("MGET").arg(&names).query_async(&mut con).await;
    let e = refused.expect_err("this user may not run MGET");
    assert_eq!(e.code(), Some("NOPERM"), "{e}");
    let want = vec![Some("4:1:7".to_string()), None, Some("9:0:8".to_string())];
    assert_eq!(cache::mget(&mut con, &names).await.unwrap(), want, "read as GETs");

    // Provisioned by this release: the same answer, by MGET.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&t.redis.username)
        .arg(provision::acl_rules(&t.name, &t.redis.password))
        .query_async(&mut admin)
        .await
        .unwrap();
    let direct: Vec<Option<String>> = redis::cmd("MGET").arg(&names).query_async(&mut con).await.unwrap();
    assert_eq!(direct, want);
    assert_eq!(cache::mget(&mut con, &names).await.unwrap(), want);
    // A key of another tenant is still refused, not read as GETs.
    let foreign = thumbup_core::keys::Keys::new("hb-other", 1).counts(BIZ, 1);
    let e = cache::mget(&mut con, &[names[0].clone(), foreign]).await.expect_err("another tenant's key");
    assert_eq!(e.code(), Some("NOPERM"), "{e}");
}
