//! Scenario a: GetCounts through the service against Redis GET/MGET and
//! the gRPC floor, with the CPU time per request of each side.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tonic_health::pb::HealthCheckRequest;

use super::measure::{Percentiles, progress};
use super::{Context, Service, prefill_counts};
use crate::Args;
use crate::cpu;
use crate::load::{Load, Measurement, closed_loop};
use crate::report::{Latency, Metric, Section, Target};
use crate::stats::median;

/// The service name whose health the gRPC floor measurement checks.
const HEALTH_SERVICE: &str = "thumbup.v1.Thumbup";

/// The gRPC floor: an empty unary RPC of the same server over the same
/// connection (`grpc.health.v1.Health/Check`), in a closed loop of `load`.
pub async fn grpc_floor(ctx: &Context, load: &Load) -> Measurement {
    let health = ctx.health.clone();
    closed_loop(load, move |_, _, _| {
        let mut health = health.clone();
        async move {
            let req = HealthCheckRequest { service: HEALTH_SERVICE.into() };
            health.check(req).await.map(|_| 1).map_err(|s| format!("Health/Check: {s}"))
        }
    })
    .await
}

async fn service_reads(svc: &Service, args: &Args, batch: usize) -> Measurement {
    service_reads_with(svc, args.load(batch)).await
}

async fn service_reads_with(svc: &Service, load: Load) -> Measurement {
    let svc = svc.clone();
    closed_loop(&load, move |_, _, ids| {
        let svc = svc.clone();
        async move { svc.counts(ids).await }
    })
    .await
}

/// Runs `f` and returns its measurement with the CPU time per request (all
/// requests, warmup included) of each side.
async fn with_cpu<F>(ctx: &Context, args: &Args, f: F) -> (Measurement, cpu::PerRequest)
where
    F: Future<Output = Measurement>,
{
    let before = cpu::Snapshot::take(args.service_pid, &ctx.redis, &args.redis_url).await;
    let m = f.await;
    let after = cpu::Snapshot::take(args.service_pid, &ctx.redis, &args.redis_url).await;
    let per = before.per_request(&after, m.total_ok);
    (m, per)
}

/// The figures of one closed-loop measurement across runs.
#[derive(Default)]
struct Series {
    rate: Vec<f64>,
    items: Vec<f64>,
    lat: Percentiles,
    cpu: [Vec<f64>; 3],
    errors: u64,
}

impl Series {
    fn push(&mut self, label: &str, run: usize, (mut m, cpu): (Measurement, cpu::PerRequest)) {
        progress(label, run, &m);
        self.rate.push(m.rate());
        self.items.push(m.item_rate());
        self.lat.push(&mut m);
        self.errors += m.errors;
        for (v, side) in self.cpu.iter_mut().zip([cpu.service, cpu.bench, cpu.redis]) {
            if let Some(x) = side {
                v.push(x);
            }
        }
    }

    /// Rows "<what>: CPU us per request, <side>" for the sides measured.
    fn cpu_metrics(&self, what: &str) -> Vec<Metric> {
        ["thumbup-service", "thumbup-bench", "redis-server"]
            .iter()
            .zip(&self.cpu)
            .filter(|(_, v)| !v.is_empty())
            .map(|(side, v)| Metric::new(format!("{what}: {side} CPU us per request"), v.clone()))
            .collect()
    }
}

fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y.max(1e-9)).collect()
}

/// Scenario a: GetCounts batch 1 (hot-key cache on, and off on
/// `--cold-tenant`) and batch `--batch` against Redis GET/MGET.
pub async fn reads(ctx: &Context, args: &Args) -> anyhow::Result<(Section, Vec<Latency>)> {
    // The baseline reads the same keys the service serves from.
    prefill_counts(ctx, args).await?;
    let mut cached = 0u64;
    let mut con = ctx.redis.clone();
    for chunk in ctx.count_keys.chunks(1000) {
        let n: u64 = redis::cmd("EXISTS").arg(chunk).query_async(&mut con).await.context("EXISTS")?;
        cached += n;
    }
    let batch = args.batch.max(1);
    let base = args.item_base;
    // Batch 20 goes through the cache-aside path when there is one.
    let plain = ctx.cold.as_ref().unwrap_or(&ctx.service);
    let [mut hot1, mut cold1, mut floor, mut get, mut svcb, mut mget]: [Series; 6] = Default::default();
    let mut errors = Vec::new();
    let (load1, loadb) = (args.load(1), args.load(batch));
    for run in 0..args.runs.max(1) {
        if let Some(cold) = &ctx.cold {
            cold1.push(
                "a GetCounts batch 1, hot-key cache off",
                run,
                with_cpu(ctx, args, service_reads(cold, args, 1)).await,
            );
        }
        let mut load = args.load(1);
        if args.hot_ttl_ms > 0 {
            load.warmup = load.warmup.max(Duration::from_secs(args.hot_warmup_secs));
        }
        hot1.push("a GetCounts batch 1", run, with_cpu(ctx, args, service_reads_with(&ctx.service, load)).await);

        floor.push("a gRPC floor (Health/Check)", run, with_cpu(ctx, args, grpc_floor(ctx, &load1)).await);

        let keys = Arc::clone(&ctx.count_keys);
        let con = ctx.redis.clone();
        let m = closed_loop(&load1, move |_, _, ids| {
            let key = keys[(ids[0] - base - 1) as usize].clone();
            let mut con = con.clone();
            async move {
                let _: Option<String> =
                    redis::cmd("GET").arg(key).query_async(&mut con).await.map_err(|e| e.to_string())?;
                Ok(1)
            }
        });
        get.push("a Redis GET", run, with_cpu(ctx, args, m).await);

        svcb.push(
            &format!("a GetCounts batch {batch}"),
            run,
            with_cpu(ctx, args, service_reads(plain, args, batch)).await,
        );

        let con = ctx.redis.clone();
        let all = Arc::clone(&ctx.count_keys);
        let m = closed_loop(&loadb, move |_, _, ids| {
            let keys: Vec<String> = ids.iter().map(|id| all[(id - base - 1) as usize].clone()).collect();
            let mut con = con.clone();
            async move {
                let n = keys.len();
                let _: Vec<Option<String>> =
                    redis::cmd("MGET").arg(keys).query_async(&mut con).await.map_err(|e| e.to_string())?;
                Ok(n)
            }
        });
        mget.push(&format!("a Redis MGET {batch}"), run, with_cpu(ctx, args, m).await);
        errors.push((hot1.errors + cold1.errors + floor.errors + get.errors + svcb.errors + mget.errors) as f64);
    }
    let ttl = args.hot_ttl_ms;
    let hot_label = if ttl > 0 { format!("hot-key cache on, TTL {ttl} ms") } else { "hot-key cache off".into() };
    let ratio_hot = ratios(&hot1.rate, &get.rate);
    let ratio_cold = ratios(&cold1.rate, &get.rate);
    // The cache-aside path: the cold tenant, or the only one if its cache is off.
    let cache_aside =
        if ctx.cold.is_some() { Some((&cold1, &ratio_cold)) } else { (ttl == 0).then_some((&hot1, &ratio_hot)) };
    let mut metrics =
        vec![Metric::new(format!("service GetCounts batch 1, {hot_label} (requests/s)"), hot1.rate.clone())];
    if ctx.cold.is_some() {
        metrics.push(Metric::new("service GetCounts batch 1, hot-key cache off (requests/s)", cold1.rate.clone()));
    }
    metrics.push(Metric::new("gRPC floor: Health/Check on the same connection (requests/s)", floor.rate.clone()));
    metrics.push(Metric::new("Redis GET (requests/s)", get.rate.clone()));
    metrics.push(Metric::new("ratio gRPC floor/Redis GET", ratios(&floor.rate, &get.rate)));
    if let Some((series, _)) = cache_aside {
        metrics.push(Metric::new(
            "ratio batch 1 GetCounts (cache-aside path)/gRPC floor",
            ratios(&series.rate, &floor.rate),
        ));
    }
    metrics.push(Metric::new(format!("ratio batch 1 service/Redis, {hot_label}"), ratio_hot.clone()));
    if ctx.cold.is_some() {
        metrics.push(Metric::new("ratio batch 1 service/Redis, hot-key cache off", ratio_cold.clone()));
    }
    metrics.extend([
        Metric::new(format!("service GetCounts batch {batch} (requests/s)"), svcb.rate.clone()),
        Metric::new(format!("service GetCounts batch {batch} (item-counts/s)"), svcb.items.clone()),
        Metric::new(format!("Redis MGET {batch} (requests/s)"), mget.rate.clone()),
        Metric::new(format!("Redis MGET {batch} (item-counts/s)"), mget.items.clone()),
        Metric::new(format!("ratio batch {batch} service/Redis (item-counts/s)"), ratios(&svcb.items, &mget.items)),
        Metric::new("failed requests (all measurements)", errors),
    ]);
    metrics.extend(hot1.cpu_metrics(&format!("GetCounts batch 1, {hot_label}")));
    if ctx.cold.is_some() {
        metrics.extend(cold1.cpu_metrics("GetCounts batch 1, hot-key cache off"));
    }
    metrics.extend(floor.cpu_metrics("gRPC floor (Health/Check)"));
    metrics.extend(get.cpu_metrics("Redis GET"));
    metrics.extend(svcb.cpu_metrics(&format!("GetCounts batch {batch}")));
    metrics.extend(mget.cpu_metrics(&format!("Redis MGET {batch}")));

    let mut targets = Vec::new();
    if let Some(r) = cache_aside.map(|(_, r)| median(r)) {
        targets.push(Target {
            name: "batch-1 GetCounts / Redis GET, hot-key cache off".into(),
            measured: r,
            target: ">= 0.5x".into(),
            pass: r >= 0.5,
        });
    }
    if ttl > 0 && (args.zipf - 1.1).abs() < 1e-9 {
        let r = median(&ratio_hot);
        targets.push(Target {
            name: format!("batch-1 GetCounts / Redis GET, hot-key cache on (TTL {ttl} ms), zipf(1.1)"),
            measured: r,
            target: ">= 1.0x".into(),
            pass: r >= 1.0,
        });
    }
    if ttl > 0 {
        // Issue 16: the hot-key cache against the floor of any RPC here.
        let r = median(&ratios(&hot1.rate, &floor.rate));
        targets.push(Target {
            name: format!("batch-1 GetCounts, hot-key cache on (TTL {ttl} ms) / gRPC floor"),
            measured: r,
            target: ">= 0.9x".into(),
            pass: r >= 0.9,
        });
    }
    if batch == 20 {
        let items = median(&svcb.items);
        targets.push(Target {
            name: "batch-20 GetCounts item-counts/s".into(),
            measured: items,
            target: ">= 200000".into(),
            pass: items >= 200_000.0,
        });
        let r = median(&ratios(&svcb.items, &mget.items));
        targets.push(Target {
            name: "batch-20 GetCounts / Redis MGET, item-counts/s".into(),
            measured: r,
            target: ">= 0.4x".into(),
            pass: r >= 0.4,
        });
    }
    let section = Section {
        title: "a. Count reads: GetCounts vs raw Redis".into(),
        about: format!(
            "Closed loop, {c} tasks sharing one tonic Channel (service) or one multiplexed Redis connection \
             (baseline), zipf s={z} over {n} items ({cached} of their counts keys were in Redis after the \
             prefill). Batch 1 runs on tenant {t} ({hot_label}{hw}){cold}; batch {batch} on {p}. Baseline: GET \
             (batch 1) and MGET (batch {batch}) of the same `thumbup:<tenant>:cnt:<biz>:<msg>` keys with the \
             admin user. The gRPC floor is grpc.health.v1.Health/Check on the same Channel: an empty unary \
             RPC of the same server, what any RPC costs before the service does anything. Ratios are \
             service/baseline within the run. CPU per request is the CPU time each \
             process used over the measurement (warmup included) divided by its requests.",
            c = args.concurrency,
            z = args.zipf,
            n = args.items,
            t = args.tenant,
            hw = if ttl > 0 {
                format!(", warmup {} s so the hot set is picked", args.hot_warmup_secs.max(args.warmup_secs))
            } else {
                String::new()
            },
            cold = args
                .cold_tenant
                .as_ref()
                .map(|c| format!(" and on tenant {c} (hot-key cache off)"))
                .unwrap_or_default(),
            p = plain.tenant_name(),
        ),
        metrics,
        targets,
    };
    let mut lat = vec![hot1.lat.latency("a service GetCounts b1")];
    if ctx.cold.is_some() {
        lat.push(cold1.lat.latency("a service GetCounts b1, cache off"));
    }
    lat.extend([
        floor.lat.latency("a gRPC floor (Health/Check)"),
        get.lat.latency("a Redis GET"),
        svcb.lat.latency(&format!("a service GetCounts b{batch}")),
        mget.lat.latency(&format!("a Redis MGET {batch}")),
    ]);
    Ok((section, lat))
}
