//! thumbup-bench end to end, in miniature: every scenario against the real
//! servers and the service, with one short run each, so that `make bench`
//! keeps working. It checks that each scenario measured both sides, that no
//! request failed, that the counts-row UPDATEs were counted, and that the
//! report and the chart were written. Speed is not asserted here.

use clap::Parser;
use thumbup_bench::report::Section;
use thumbup_e2e::*;
use thumbup_test_support::stack::{admin_db_url, admin_redis_url};

fn metric(section: &Section, starts: &str) -> f64 {
    section
        .metrics
        .iter()
        .find(|m| m.name.starts_with(starts))
        .unwrap_or_else(|| {
            panic!("metric {starts:?} in {:?}", section.metrics.iter().map(|m| &m.name).collect::<Vec<_>>())
        })
        .median()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_measures_service_and_baseline_and_writes_the_report() {
    let (hot, cold) = ("bench-smoke", "bench-smoke-cold");
    let yaml = tenant_yaml(hot, &[1], "    cache: { hot_ttl_ms: 1000 }\n") + &tenant_yaml(cold, &[1], "");
    let w = World::start("bench-smoke", &yaml).await;
    let mut job = w.job(hot, 1000);
    let out = w.dir.join("bench-results");
    let args = thumbup_bench::Args::parse_from([
        "thumbup-bench".to_string(),
        format!("--addr={}", w.addr),
        format!("--tenant={hot}"),
        format!("--token=tok-{hot}-0001"),
        format!("--cold-tenant={cold}"),
        format!("--cold-token=tok-{cold}-0001"),
        format!("--redis-url={}", admin_redis_url()),
        format!("--db-url={}", admin_db_url()),
        "--hot-ttl-ms=1000".into(),
        "--hot-warmup-secs=0".into(),
        "--job-window-ms=1000".into(),
        "--shards=4".into(),
        "--concurrency=8".into(),
        "--duration-secs=1".into(),
        "--warmup-secs=0".into(),
        "--runs=1".into(),
        "--items=200".into(),
        "--users=400".into(),
        "--fresh-samples=4".into(),
        "--memory-likes=2000".into(),
        "--memory-users=200".into(),
        "--memory-items=200".into(),
        "--recovery-events=6000".into(),
        "--recovery-window-secs=6".into(),
        "--recovery-lag-secs=2".into(),
        format!("--out={}", out.display()),
    ]);
    let report = thumbup_bench::run(args).await.expect("thumbup-bench run");
    let titles: Vec<&str> = report.sections.iter().map(|s| s.title.as_str()).collect();
    let order: Vec<&str> = titles.iter().map(|t| &t[..2]).collect();
    assert_eq!(order, ["a.", "b.", "c.", "d.", "e.", "g.", "f.", "h."], "{titles:?}");
    let (a, b, c) = (&report.sections[0], &report.sections[1], &report.sections[2]);
    let (d, e, g, f) = (&report.sections[3], &report.sections[4], &report.sections[5], &report.sections[6]);

    // a: both tenants, the gRPC floor, both Redis commands, CPU of the bench and of Redis.
    for m in [
        "service GetCounts batch 1, hot-key cache on",
        "service GetCounts batch 1, hot-key cache off",
        "Redis GET (requests/s)",
        "gRPC floor: Health/Check on the same connection (requests/s)",
        "ratio batch 1 GetCounts (cache-aside path)/gRPC floor",
        "service GetCounts batch 20 (item-counts/s)",
        "Redis MGET 20 (item-counts/s)",
        "GetCounts batch 1, hot-key cache off: thumbup-bench CPU",
        "Redis GET: redis-server CPU",
    ] {
        assert!(metric(a, m) > 0.0, "{m}: {}", metric(a, m));
    }
    assert_eq!(metric(a, "failed requests"), 0.0);
    assert!(a.metrics.iter().all(|m| !m.name.contains("thumbup-service CPU")), "no --service-pid, no service CPU rows");
    let goals: Vec<&str> = a.targets.iter().map(|t| t.target.as_str()).collect();
    assert_eq!(goals, [">= 0.5x", ">= 1.0x", ">= 0.9x", ">= 200000", ">= 0.4x"]);

    // b: the naive design updates the counts row once per like; thumbup's
    // job far less often (MariaDB's table statistics, read after a window).
    assert!(metric(b, "service likes/s") > 0.0 && metric(b, "naive DB likes/s") > 0.0);
    assert_eq!(metric(b, "naive counts-row UPDATEs per 10,000 likes"), 10_000.0);
    let ours = metric(b, "thumbup counts-row UPDATEs per 10,000 likes");
    assert!(ours > 0.0 && ours < 10_000.0, "thumbup counts-row UPDATEs per 10,000 likes: {ours}");
    // MariaDB's count of changed counts rows agrees with the row's version
    // (one per job window) and with what the naive UPDATEs reported.
    assert_eq!(ours, metric(b, "thumbup counts-row version growth"));
    assert_eq!(metric(b, "naive UPDATEs that changed a row"), 10_000.0);
    assert_eq!(metric(b, "failed requests"), 0.0);

    // c: half of the mix's own maximum is offered, and both classes ran.
    let (max, offered) = (metric(c, "mix maximum"), metric(c, "offered"));
    assert!(max > 0.0 && (offered - max / 2.0).abs() < 1e-6 * max, "max {max}, offered {offered}");
    assert!(metric(c, "reads done") > 0.0 && metric(c, "writes done") > 0.0);
    assert_eq!(metric(c, "failed requests"), 0.0);

    // d and e: both sides measured, nothing failed.
    assert!(metric(d, "service likes/s") > 0.0 && metric(d, "naive DB likes/s") > 0.0);
    assert_eq!(metric(d, "failed requests"), 0.0);
    assert!(metric(e, "service likes/s") > 0.0 && metric(e, "Redis-only likes/s") > 0.0);
    assert!(metric(e, "gRPC floor (Health/Check, same load)") > 0.0, "e measures the gRPC floor beside");
    assert_eq!(metric(e, "failed requests"), 0.0);
    // g: every sample's like showed in both reads.
    assert!(metric(g, "GetCounts shows it, p99") > 0.0 && metric(g, "ListItemLikers shows it, p99") > 0.0);
    assert_eq!(metric(g, "reads that never showed it"), 0.0);
    // f: every like acknowledged, and Redis and the DB grew by something.
    assert_eq!(metric(f, "likes acknowledged"), 2000.0);
    assert_eq!(metric(f, "failed likes"), 0.0);
    assert!(metric(f, "MEMORY USAGE of the scenario's keys per like") > 0.0);
    assert!(metric(f, "DB like_records bytes per record") > 0.0);
    // h: the replay read the window from the watermarks on and applied
    // exactly what the standby lacked (the last 2 of 6 s).
    let h = &report.sections[7];
    assert_eq!(metric(h, "events applied"), 2000.0);
    assert!(metric(h, "events read") >= 2000.0 && metric(h, "replay time (s)") > 0.0);

    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("| target | measured (median) | goal | verdict |"), "{md}");
    let svg = std::fs::read_to_string(out.join("latency.svg")).expect("latency.svg");
    assert!(svg.starts_with("<svg") && svg.contains("c mixed writes"), "{svg}");
    assert!(job.terminate(), "job stops on SIGTERM");
    w.stop().await;
}
