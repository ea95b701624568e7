//! End-to-end tests of the gateway's promises against the real MariaDB and
//! Redis of `scripts/stack.sh`: who may ask (an unknown tenant reads as a
//! wrong token), page tokens bound to the list they came from, and the
//! server's own bounds (metadata size, request time, requests in flight),
//! each checked per reply.

use std::time::Duration;

use thumbup_e2e::*;
use thumbup_service::limits::ServerLimits;
use thumbup_service::pb;
use tonic::Code;
use tonic::metadata::MetadataValue;

const BIZ: i64 = 1;
const BIZ2: i64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_tenant_and_a_wrong_token_get_the_same_unauthenticated_answer() {
    let w = World::start("gw-auth", &tenant_yaml("e2e-gw-auth", &[BIZ], "")).await;
    let wrong = w.client("e2e-gw-auth", "tok-not-this-one-0001").await;
    let unknown = w.client("e2e-gw-nosuch", "tok-e2e-gw-nosuch-0001").await;
    let missing = w.client("e2e-gw-nosuch", "").await;
    let mut answers = Vec::new();
    for (who, c) in [("wrong token", &wrong), ("unknown tenant", &unknown), ("unknown tenant, no token", &missing)] {
        let like = c.act(BIZ, 1, 1, 9, pb::Action::Like).await.unwrap_err();
        let read = c.counts(BIZ, &[1]).await.unwrap_err();
        for s in [&like, &read] {
            assert_eq!(s.code(), Code::Unauthenticated, "{who}: {s:?}");
            answers.push((who, s.message().replace(&c.tenant, "<tenant>")));
        }
    }
    // The same words whichever it was: the answer does not tell whether the
    // tenant exists.
    assert!(answers.windows(2).all(|p| p[0].1 == p[1].1), "{answers:#?}");
    w.stop().await;
}

fn list(biz: i64, mid: i64, token: &str) -> pb::ListUserLikesRequest {
    pb::ListUserLikesRequest { business_id: biz, mid, page_size: 2, page_token: token.into() }
}

fn likers(biz: i64, msg: i64, token: &str) -> pb::ListItemLikersRequest {
    pb::ListItemLikersRequest { business_id: biz, message_id: msg, page_size: 1, page_token: token.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_tokens_are_refused_when_forged_truncated_or_used_on_another_list() {
    let yaml = format!("{}{}", tenant_yaml("e2e-gw-pt-a", &[BIZ, BIZ2], ""), tenant_yaml("e2e-gw-pt-b", &[BIZ], ""));
    let w = World::start("gw-pages", &yaml).await;
    let (a, b) = (w.client_of("e2e-gw-pt-a").await, w.client_of("e2e-gw-pt-b").await);
    // Users 7 and 8 like items 1..=5 in both businesses of a, and in b.
    for c in [&a, &b] {
        for mid in [7, 8] {
            for msg in 1..=5 {
                c.act(BIZ, msg, mid, 99, pb::Action::Like).await.unwrap();
                if c.tenant == a.tenant {
                    c.act(BIZ2, msg, mid, 99, pb::Action::Like).await.unwrap();
                }
            }
        }
    }
    // Item likers are read from the DB: let the jobs apply the likes.
    let (_ja, _jb) = (w.job("e2e-gw-pt-a", 100), w.job("e2e-gw-pt-b", 100));
    for name in ["e2e-gw-pt-a", "e2e-gw-pt-b"] {
        let t = w.tenant(name);
        wait_drained(&thumbup_core::keys::Keys::new(&t.name, t.stream.shards), Duration::from_secs(30)).await;
    }
    let page = |c: &Client, r: pb::ListUserLikesRequest| {
        let c = c.clone();
        async move { c.inner.clone().list_user_likes(c.req(r)).await.map(|r| r.into_inner()) }
    };
    let liker_page = |c: &Client, r: pb::ListItemLikersRequest| {
        let c = c.clone();
        async move { c.inner.clone().list_item_likers(c.req(r)).await.map(|r| r.into_inner()) }
    };
    let first = page(&a, list(BIZ, 7, "")).await.unwrap();
    let token = first.next_page_token.clone();
    assert!(!token.is_empty(), "five likes in pages of two have a second page");
    let item_token = liker_page(&a, likers(BIZ, 1, "")).await.unwrap().next_page_token;
    assert!(!item_token.is_empty());
    // The real token pages on: items 3 and 2 after 5 and 4.
    let second = page(&a, list(BIZ, 7, &token)).await.unwrap();
    let ids = |p: &pb::ListUserLikesReply| p.items.iter().map(|i| i.message_id).collect::<Vec<_>>();
    assert_eq!((ids(&first), ids(&second)), (vec![5, 4], vec![3, 2]));

    // The unsigned format the service used to issue, hex of v1:<ms>:<id>.
    let unsigned: String = format!("v1:{}:3", first.items[1].liked_at_ms).bytes().map(|b| format!("{b:02x}")).collect();
    let mut flipped = token.clone().into_bytes();
    let at = flipped.len() / 2;
    flipped[at] = if flipped[at] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    let cases: Vec<(&str, Result<pb::ListUserLikesReply, tonic::Status>)> = vec![
        ("forged unsigned token", page(&a, list(BIZ, 7, &unsigned)).await),
        ("truncated", page(&a, list(BIZ, 7, &token[..token.len() - 2])).await),
        ("one digit changed", page(&a, list(BIZ, 7, &flipped)).await),
        ("another user's token", page(&a, list(BIZ, 8, &token)).await),
        ("another business's token", page(&a, list(BIZ2, 7, &token)).await),
        ("another tenant's token", page(&b, list(BIZ, 7, &token)).await),
        ("a ListItemLikers token", page(&a, list(BIZ, 7, &item_token)).await),
    ];
    for (what, got) in cases {
        let s = got.expect_err(what);
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(s.message().contains("page_token"), "{what}: {s:?}");
    }
    let s = liker_page(&a, likers(BIZ, 1, &token)).await.expect_err("a ListUserLikes token on ListItemLikers");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = liker_page(&a, likers(BIZ, 2, &item_token)).await.expect_err("another item's token");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    w.stop().await;
}

/// A GetCounts request of item 1 carrying `padding` bytes of extra metadata.
fn padded(c: &Client, padding: usize) -> tonic::Request<pb::GetCountsRequest> {
    let mut r = c.req(pb::GetCountsRequest { business_id: BIZ, message_ids: vec![1] });
    if padding > 0 {
        r.metadata_mut().insert("x-padding", MetadataValue::try_from("a".repeat(padding)).unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_metadata_refuses_that_request_alone_and_the_connection_keeps_serving() {
    let w = World::start("gw-metadata", &tenant_yaml("e2e-gw-md", &[BIZ], "")).await;
    let c = w.client_of("e2e-gw-md").await;
    let limit = ServerLimits::default().max_metadata_bytes;

    // One connection: 1 MB of metadata in the middle of a stream of normal
    // requests on it, then over the limit by a little, then under it.
    for padding in [1_000_000, 1 << 20, limit + 1, limit / 2] {
        let normal: Vec<_> = (0..64)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.inner.clone().get_counts(padded(&c, 0)).await })
            })
            .collect();
        let big = c.inner.clone().get_counts(padded(&c, padding)).await;
        if padding > limit {
            let s = big.expect_err("oversized metadata is refused");
            assert_eq!(s.code(), Code::ResourceExhausted, "{padding} bytes: {s:?}");
            assert!(s.message().contains("metadata"), "{s:?}");
        } else {
            assert!(big.unwrap().into_inner().counts.contains_key(&1), "{padding} bytes of metadata is fine");
        }
        for (i, h) in normal.into_iter().enumerate() {
            let reply = h.await.unwrap().unwrap_or_else(|s| panic!("request {i} beside {padding} bytes: {s:?}"));
            assert!(reply.into_inner().counts.contains_key(&1));
        }
        // The same connection still serves.
        assert!(c.counts(BIZ, &[1]).await.unwrap().contains_key(&1), "after {padding} bytes");
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_request_timeout_answers_unavailable_and_still_takes_effect() {
    // A zero deadline: every write outlives it, deterministically.
    let limits = ServerLimits { request_timeout: Duration::ZERO, ..ServerLimits::default() };
    let w = World::start_with("gw-timeout", &tenant_yaml("e2e-gw-to", &[BIZ], ""), limits).await;
    let c = w.client_of("e2e-gw-to").await;
    let _job = w.job("e2e-gw-to", 100);
    for msg in 1..=20 {
        let s = c.act(BIZ, msg, 5, 9, pb::Action::Like).await.expect_err("past the deadline");
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(has_retry_info(&s), "{s:?}");
        assert!(s.message().contains("request timeout") && s.message().contains("unknown"), "{s:?}");
    }
    // Each write went on and was applied: the job wrote every record.
    let t = w.tenant("e2e-gw-to");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = records(t).await;
        if rows.len() == 20 {
            assert!(rows.keys().all(|(mid, biz, _)| (*mid, *biz) == (5, BIZ)), "{rows:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "records written: {}", rows.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_exact(t).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_over_the_in_flight_limit_are_refused_at_once_and_the_rest_are_served() {
    let limits = ServerLimits { max_in_flight: 2, ..ServerLimits::default() };
    let w = World::start_with("gw-inflight", &tenant_yaml("e2e-gw-if", &[BIZ], ""), limits).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(w.client_of("e2e-gw-if").await);
    }
    let calls: Vec<_> = (0..400)
        .map(|i| {
            let c = clients[i % clients.len()].clone();
            tokio::spawn(async move { c.counts(BIZ, &[1, 2, 3]).await })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    for h in calls {
        match h.await.unwrap() {
            Ok(counts) => {
                assert_eq!(counts.len(), 3);
                served += 1;
            }
            Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
            Err(s) => panic!("over the limit a request is served or RESOURCE_EXHAUSTED, not {s:?}"),
        }
    }
    assert!(served > 0 && refused > 0, "served {served}, refused {refused}");
    // Once the burst is over, requests are served again.
    assert_eq!(clients[1].counts(BIZ, &[1]).await.unwrap().len(), 1);
    w.stop().await;
}

/// The samples of `thumbup_service_requests_total` in this process's
/// registry (the in-process service registers there): labels -> count.
fn request_samples() -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for family in prometheus::gather().iter().filter(|f| f.name() == "thumbup_service_requests_total") {
        for m in family.get_metric() {
            let labels = m.get_label().iter().map(|l| (l.name().to_string(), l.value().to_string())).collect();
            out.push((labels, m.get_counter().get_value()));
        }
    }
    out
}

fn requests(rpc: &str, tenant: &str, code: &str) -> f64 {
    request_samples()
        .into_iter()
        .filter(|(l, _)| l["rpc"] == rpc && l["tenant"] == tenant && l["code"] == code)
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_carry_the_authenticated_tenant_and_callers_cannot_add_label_values() {
    let w = World::start("gw-metrics", &tenant_yaml("e2e-gw-metrics", &[BIZ], "")).await;
    let c = w.client_of("e2e-gw-metrics").await;
    let unauthenticated = thumbup_service::api::UNAUTHENTICATED_TENANT;
    let before = requests("GetCounts", unauthenticated, "Unauthenticated");
    for msg in 1..=3 {
        c.act(BIZ, msg, 1, 9, pb::Action::Like).await.unwrap();
    }
    assert_eq!(c.counts(BIZ, &[0]).await.unwrap_err().code(), Code::InvalidArgument);
    // 20 made-up tenants, and the real one with a wrong token.
    let made_up: Vec<String> = (0..20).map(|i| format!("e2e-gw-madeup-{i}")).collect();
    for name in &made_up {
        let s = w.client(name, "tok-whatever-0001").await.counts(BIZ, &[1]).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
    }
    let s = w.client("e2e-gw-metrics", "tok-wrong-0001").await.counts(BIZ, &[1]).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    // The tenant's own requests, per RPC and code, under its name.
    assert_eq!(requests("Like", "e2e-gw-metrics", "Ok"), 3.0);
    assert_eq!(requests("GetCounts", "e2e-gw-metrics", "InvalidArgument"), 1.0);
    // The 21 that did not authenticate under the one fixed value (other
    // tests of this binary may add theirs), none under a name they sent.
    assert!(requests("GetCounts", unauthenticated, "Unauthenticated") >= before + 21.0);
    assert_eq!(requests("GetCounts", "e2e-gw-metrics", "Unauthenticated"), 0.0, "a wrong token is not the tenant");
    let samples = request_samples();
    for (labels, _) in &samples {
        assert!(!labels["tenant"].starts_with("e2e-gw-madeup-"), "a caller's tenant became a label: {labels:?}");
    }
    // The latency histogram is labelled alike.
    let latency = prometheus::gather()
        .into_iter()
        .find(|f| f.name() == "thumbup_service_request_duration_seconds")
        .expect("latency histogram");
    let tenants: std::collections::BTreeSet<String> = latency
        .get_metric()
        .iter()
        .flat_map(|m| m.get_label().iter().filter(|l| l.name() == "tenant").map(|l| l.value().to_string()))
        .collect();
    assert!(tenants.contains("e2e-gw-metrics") && tenants.contains(unauthenticated), "{tenants:?}");
    assert!(!tenants.iter().any(|t| t.starts_with("e2e-gw-madeup-")), "{tenants:?}");
    w.stop().await;
}
