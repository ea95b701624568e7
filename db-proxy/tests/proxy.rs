//! The built proxy against the local stack's MariaDB servers: sessions
//! reach the active datacenter, a newer epoch moves new sessions and kills
//! old ones, stale and conflicting routes change nothing, and the limits
//! (no route, max sessions, a DB that is down) close clients at once.

mod common;

use std::time::Duration;

use common::*;
use thumbup_test_support::stack::{admin_db_url, admin_db_url_b, admin_redis_url, admin_redis_url_b};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const SESSIONS_A: &str = "thumbup_db_proxy_sessions{datacenter=\"dc-a\"}";
const SESSIONS_B: &str = "thumbup_db_proxy_sessions{datacenter=\"dc-b\"}";

fn rejected(reason: &str) -> String {
    format!("thumbup_db_proxy_route_rejected_total{{reason=\"{reason}\"}}")
}

fn refused(reason: &str) -> String {
    format!("thumbup_db_proxy_refused_total{{reason=\"{reason}\"}}")
}

/// Connects and waits for the proxy to close the connection: true when it
/// closes (EOF or reset) within 2 s without sending a byte.
async fn closed_at_once(proxy: &Proxy) -> bool {
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn a_session_reaches_the_active_datacenter_and_moves_the_session_and_byte_metrics() {
    let proxy = Proxy::following("reach", 1, "dc-a", &[]).await;
    assert_eq!(proxy.http("GET", "/readyz", "").await.0, 200);
    assert_eq!(proxy.http("GET", "/healthz", "").await.0, 200);
    let mut conn = proxy.connect().await.unwrap();
    assert_eq!(server_port(&mut conn).await.unwrap(), port(&admin_db_url()));
    assert_eq!(proxy.metric(SESSIONS_A).await, 1.0);
    assert_eq!(proxy.metric("thumbup_db_proxy_sessions_total{datacenter=\"dc-a\"}").await, 1.0);
    assert_eq!(proxy.metric("thumbup_db_proxy_route_epoch").await, 1.0);
    let up = proxy.metric("thumbup_db_proxy_bytes_total{direction=\"client_to_db\"}").await;
    let down = proxy.metric("thumbup_db_proxy_bytes_total{direction=\"db_to_client\"}").await;
    assert!(up > 0.0 && down > 0.0, "bytes up {up}, down {down}");
    // A bigger answer moves the counter by at least its size.
    let blob: String = sqlx::query_scalar("SELECT REPEAT('x', 100000)").fetch_one(&mut conn).await.unwrap();
    assert_eq!(blob.len(), 100_000);
    let down_after = proxy.metric("thumbup_db_proxy_bytes_total{direction=\"db_to_client\"}").await;
    assert!(down_after >= down + 100_000.0, "{down} -> {down_after}");
    quit(conn).await;
    proxy.wait_metric(SESSIONS_A, 0.0).await;
    assert_eq!(proxy.metric("thumbup_db_proxy_flips_total").await, 0.0);
}

#[tokio::test]
async fn a_newer_epoch_sends_new_sessions_to_dc_b_and_kills_an_idle_session_opened_before() {
    require_dc_b().await;
    let proxy = Proxy::following("flip", 1, "dc-a", &[]).await;
    let mut before = proxy.connect().await.unwrap();
    assert_eq!(server_port(&mut before).await.unwrap(), port(&admin_db_url()));

    proxy.write_route(&stack_route(2, "dc-b"));
    proxy.wait_epoch(2).await;
    let held = proxy.route().await.unwrap();
    assert_eq!(held["activeDatacenter"], "dc-b");

    // The session opened under epoch 1 is gone: its next query fails, and
    // fails promptly rather than hanging.
    let next = tokio::time::timeout(Duration::from_secs(2), server_port(&mut before)).await;
    assert!(matches!(next, Ok(Err(_))), "a query on a pre-flip session gave {next:?}");
    let mut after = proxy.connect().await.unwrap();
    assert_eq!(server_port(&mut after).await.unwrap(), port(&admin_db_url_b()));

    assert_eq!(proxy.metric("thumbup_db_proxy_flips_total").await, 1.0);
    assert_eq!(proxy.metric("thumbup_db_proxy_sessions_killed_total").await, 1.0);
    assert_eq!(proxy.metric("thumbup_db_proxy_route_epoch").await, 2.0);
    proxy.wait_metric(SESSIONS_A, 0.0).await;
    assert_eq!(proxy.metric(SESSIONS_B).await, 1.0);
    assert_eq!(proxy.metric("thumbup_db_proxy_sessions_total{datacenter=\"dc-b\"}").await, 1.0);
    quit(after).await;
}

#[tokio::test]
async fn a_stale_epoch_from_the_file_or_put_is_refused_and_changes_nothing() {
    let proxy = Proxy::following("stale", 2, "dc-a", &[]).await;
    let mut conn = proxy.connect().await.unwrap();

    proxy.write_route(&stack_route(1, "dc-b"));
    proxy.wait_metric(&rejected("stale"), 1.0).await;
    let (status, body) = proxy.put_route(&stack_route(1, "dc-b")).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.starts_with("stale"), "{body}");
    assert_eq!(proxy.metric(&rejected("stale")).await, 2.0);

    // Nothing moved: the route, the open session, where new sessions go.
    let held = proxy.route().await.unwrap();
    assert_eq!((held["epoch"].as_u64(), held["activeDatacenter"].as_str()), (Some(2), Some("dc-a")));
    assert_eq!(proxy.metric("thumbup_db_proxy_route_epoch").await, 2.0);
    assert_eq!(server_port(&mut conn).await.unwrap(), port(&admin_db_url()));
    let mut fresh = proxy.connect().await.unwrap();
    assert_eq!(server_port(&mut fresh).await.unwrap(), port(&admin_db_url()));
    assert_eq!(proxy.metric("thumbup_db_proxy_flips_total").await, 0.0);
    assert_eq!(proxy.metric("thumbup_db_proxy_sessions_killed_total").await, 0.0);
    // The stale file is counted once, not once per poll.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(proxy.metric(&rejected("stale")).await, 2.0);
    quit(conn).await;
    quit(fresh).await;
}

#[tokio::test]
async fn a_route_offered_without_the_route_token_is_refused_and_changes_nothing() {
    let proxy = Proxy::following("unauthenticated", 2, "dc-a", &[]).await;
    let mut conn = proxy.connect().await.unwrap();
    let newer = stack_route(9, "dc-b");
    for (token, why) in [
        (None, "no credential"),
        (Some("route-token-of-the-tests-0002"), "a wrong token"),
        (Some("route-token-of-the-tests-000"), "a prefix of the token"),
        (Some(""), "an empty token"),
    ] {
        let (status, body) = proxy.http_as("PUT", "/route", &newer, token).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert!(body.starts_with("unauthenticated"), "{why}: {body}");
    }
    // A proxy without a token file refuses every PUT, whatever it carries.
    let closed = Proxy::following("no-token-file", 2, "dc-a", &[NO_ROUTE_TOKEN]).await;
    let (status, body) = closed.http_as("PUT", "/route", &newer, Some(ROUTE_TOKEN)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.starts_with("route_updates_disabled"), "{body}");

    // Nothing moved on either: the route, the open session, new sessions.
    for p in [&proxy, &closed] {
        let held = p.route().await.unwrap();
        assert_eq!((held["epoch"].as_u64(), held["activeDatacenter"].as_str()), (Some(2), Some("dc-a")));
        assert_eq!(p.metric("thumbup_db_proxy_flips_total").await, 0.0);
        assert_eq!(p.metric("thumbup_db_proxy_sessions_killed_total").await, 0.0);
        let mut fresh = p.connect().await.unwrap();
        assert_eq!(server_port(&mut fresh).await.unwrap(), port(&admin_db_url()));
        quit(fresh).await;
    }
    assert_eq!(proxy.metric(&rejected("unauthenticated")).await, 4.0);
    assert_eq!(closed.metric(&rejected("unauthenticated")).await, 1.0);
    assert_eq!(server_port(&mut conn).await.unwrap(), port(&admin_db_url()));

    quit(conn).await;
    // The token itself is taken.
    let (status, body) = proxy.put_route(&newer).await;
    assert_eq!((status, body.starts_with("adopted")), (200, true), "{body}");
}

#[tokio::test]
async fn the_same_epoch_naming_another_datacenter_is_refused_as_a_conflict() {
    let proxy = Proxy::following("conflict", 3, "dc-a", &[]).await;
    let mut conn = proxy.connect().await.unwrap();

    let (status, body) = proxy.put_route(&stack_route(3, "dc-b")).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.starts_with("conflict"), "{body}");
    // The file says it too: refused the same way.
    proxy.write_route(&stack_route(3, "dc-b"));
    proxy.wait_metric(&rejected("conflict"), 2.0).await;

    let (status, body) = proxy.put_route(&stack_route(3, "dc-a")).await;
    assert_eq!((status, body.starts_with("same")), (200, true), "{body}");
    let (status, body) = proxy.put_route("epoch: three").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.starts_with("invalid"), "{body}");
    assert_eq!(proxy.metric(&rejected("invalid")).await, 1.0);

    assert_eq!(proxy.route().await.unwrap()["activeDatacenter"], "dc-a");
    assert_eq!(server_port(&mut conn).await.unwrap(), port(&admin_db_url()));
    assert_eq!(proxy.metric("thumbup_db_proxy_sessions_killed_total").await, 0.0);
    quit(conn).await;
}

#[tokio::test]
async fn before_any_route_connections_are_closed_at_once_and_readyz_is_503() {
    let proxy = Proxy::start("no-route", None, &[]);
    assert_eq!(proxy.http("GET", "/readyz", "").await.0, 503);
    assert_eq!(proxy.http("GET", "/healthz", "").await.0, 200);
    assert!(proxy.route().await.is_none());
    assert!(closed_at_once(&proxy).await, "a connection before any route stayed open");
    assert!(proxy.connect().await.is_err());
    assert_eq!(proxy.metric(&refused("no_route")).await, 2.0);
    assert_eq!(proxy.metric("thumbup_db_proxy_route_epoch").await, 0.0);

    // JSON is YAML: the admin endpoint takes either.
    let json = format!(
        r#"{{"epoch": 1, "activeDatacenter": "dc-a", "datacenters": {{"dc-a": "{}", "dc-b": "{}"}}}}"#,
        address(&admin_db_url()),
        address(&admin_db_url_b())
    );
    let (status, body) = proxy.put_route(&json).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("adopted"), "{body}");
    assert_eq!(proxy.http("GET", "/readyz", "").await.0, 200);
    let mut conn = proxy.connect().await.unwrap();
    assert_eq!(server_port(&mut conn).await.unwrap(), port(&admin_db_url()));
    assert_eq!(proxy.metric(&refused("no_route")).await, 2.0);
    quit(conn).await;
}

#[tokio::test]
async fn no_more_than_max_sessions_are_open_at_once() {
    let proxy = Proxy::following("max", 1, "dc-a", &["--max-sessions", "2"]).await;
    let mut one = proxy.connect().await.unwrap();
    let mut two = proxy.connect().await.unwrap();
    assert!(closed_at_once(&proxy).await, "a third connection stayed open");
    assert!(proxy.connect().await.is_err(), "a third session was served");
    assert_eq!(proxy.metric(&refused("max_sessions")).await, 2.0);
    assert_eq!(proxy.metric(SESSIONS_A).await, 2.0);
    assert_eq!(server_port(&mut one).await.unwrap(), port(&admin_db_url()));

    // A closed session frees its place.
    quit(two).await;
    proxy.wait_metric(SESSIONS_A, 1.0).await;
    two = proxy.connect().await.unwrap();
    assert_eq!(server_port(&mut two).await.unwrap(), port(&admin_db_url()));
    quit(one).await;
    quit(two).await;
}

#[tokio::test]
async fn a_datacenter_that_is_down_closes_the_client_and_counts_a_connect_error() {
    // A port that nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let route = route_yaml(1, "dc-a", &closed.to_string(), &address(&admin_db_url_b()));
    let proxy = Proxy::start("down", Some(&route), &["--connect-timeout-ms", "500"]);
    proxy.wait_epoch(1).await;
    assert!(closed_at_once(&proxy).await, "the client stayed open with its DB down");
    assert!(proxy.connect().await.is_err());
    proxy.wait_metric("thumbup_db_proxy_connect_errors_total{datacenter=\"dc-a\"}", 2.0).await;
    proxy.wait_metric(SESSIONS_A, 0.0).await;
    // The route is held, so the proxy is ready even though its DB is not.
    assert_eq!(proxy.http("GET", "/readyz", "").await.0, 200);
}

#[tokio::test]
async fn sigterm_stops_the_proxy_and_closes_its_sessions() {
    let mut proxy = Proxy::following("sigterm", 1, "dc-a", &[]).await;
    let mut conn = proxy.connect().await.unwrap();
    assert_eq!(server_port(&mut conn).await.unwrap(), port(&admin_db_url()));
    let kill = std::process::Command::new("kill").args(["-TERM", &proxy.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    let next = tokio::time::timeout(Duration::from_secs(2), server_port(&mut conn)).await;
    assert!(matches!(next, Ok(Err(_))), "a query after the shutdown gave {next:?}");
    assert!(TcpStream::connect(proxy.listen).await.is_err(), "still accepting after the shutdown");
}

/// The address of a Redis URL.
fn redis_address(url: &str) -> String {
    let info = redis::IntoConnectionInfo::into_connection_info(url).unwrap();
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        other => panic!("not a TCP Redis URL: {other:?}"),
    }
}

/// The stack's two MariaDB servers and its two Redis servers, `active` at `epoch`.
fn route_with_redis(epoch: u64, active: &str) -> String {
    format!(
        "{}redis:\n  dc-a: \"{}\"\n  dc-b: \"{}\"\n",
        stack_route(epoch, active),
        redis_address(&admin_redis_url()),
        redis_address(&admin_redis_url_b())
    )
}

/// The port the Redis server behind `con` listens on.
async fn redis_server_port(con: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<u16> {
    let (_, port): (String, u16) = redis::cmd("CONFIG").arg("GET").arg("port").query_async(con).await?;
    Ok(port)
}

/// An admin connection to the stack's Redis through the proxy's Redis listener.
async fn redis_through(proxy: &Proxy) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let url = admin_redis_url().replace(&redis_address(&admin_redis_url()), &proxy.redis.unwrap().to_string());
    let client = redis::Client::open(url)?;
    tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection())
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))?
}

#[tokio::test]
async fn the_redis_listener_follows_the_route_and_a_flip_ends_its_sessions_with_the_db_sessions() {
    require_dc_b().await;
    let proxy = Proxy::start("redis-flip", Some(&route_with_redis(1, "dc-a")), &["--redis-listen", "127.0.0.1:0"]);
    proxy.wait_epoch(1).await;
    let mut before = redis_through(&proxy).await.expect("a Redis session through the proxy");
    assert_eq!(redis_server_port(&mut before).await.unwrap(), port_of_redis(&admin_redis_url()));
    let mut db_before = proxy.connect().await.unwrap();
    assert_eq!(server_port(&mut db_before).await.unwrap(), port(&admin_db_url()));

    proxy.write_route(&route_with_redis(2, "dc-b"));
    proxy.wait_epoch(2).await;
    // Both sessions opened under epoch 1 are gone, at once.
    let next = tokio::time::timeout(Duration::from_secs(2), redis_server_port(&mut before)).await;
    assert!(matches!(next, Ok(Err(_))), "a command on a pre-flip Redis session gave {next:?}");
    let next = tokio::time::timeout(Duration::from_secs(2), server_port(&mut db_before)).await;
    assert!(matches!(next, Ok(Err(_))), "a query on a pre-flip DB session gave {next:?}");
    // New sessions of both tiers reach dc-b.
    let mut after = redis_through(&proxy).await.expect("a Redis session after the flip");
    assert_eq!(redis_server_port(&mut after).await.unwrap(), port_of_redis(&admin_redis_url_b()));
    let mut db_after = proxy.connect().await.unwrap();
    assert_eq!(server_port(&mut db_after).await.unwrap(), port(&admin_db_url_b()));
    assert_eq!(proxy.metric("thumbup_db_proxy_sessions_killed_total").await, 2.0);
    quit(db_after).await;
}

#[tokio::test]
async fn a_redis_connection_under_a_route_without_redis_addresses_is_closed_and_counted() {
    let proxy = Proxy::start("redis-none", Some(&stack_route(1, "dc-a")), &["--redis-listen", "127.0.0.1:0"]);
    proxy.wait_epoch(1).await;
    let mut s = TcpStream::connect(proxy.redis.unwrap()).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
    proxy.wait_metric(&refused("no_redis_route"), 1.0).await;
}

fn port_of_redis(url: &str) -> u16 {
    redis_address(url).rsplit_once(':').unwrap().1.parse().unwrap()
}
