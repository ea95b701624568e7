//! The three scenarios of issue 5 and their baselines. Each function runs its
//! measurements `--runs` times and returns the report section and the latency
//! series (medians over the runs).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng;
use redis::aio::MultiplexedConnection;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use thumbup_core::names::schema_for;
use thumbup_core::keys::{JOB_GROUP, Keys};
use thumbup_service::pb;
use thumbup_service::pb::thumbup_client::ThumbupClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::Args;
use crate::cpu;
use crate::load::{Load, Measurement, closed_loop, open_loop};
use crate::report::{Latency, Metric, Section, Target};
use crate::stats::median;

/// The service name whose health the gRPC floor measurement checks.
const HEALTH_SERVICE: &str = "thumbup.v1.Thumbup";

/// The scratch schema of the naive design.
pub const NAIVE_SCHEMA: &str = "thumbup_bench_naive";

/// A gRPC client of the service that adds the tenant's metadata.
#[derive(Clone)]
pub struct Service {
    client: ThumbupClient<Channel>,
    tenant: MetadataValue<Ascii>,
    auth: MetadataValue<Ascii>,
    business: i64,
}

impl Service {
    fn new(client: ThumbupClient<Channel>, tenant: &str, token: &str, business: i64) -> anyhow::Result<Service> {
        Ok(Service {
            client,
            tenant: MetadataValue::try_from(tenant).with_context(|| format!("tenant {tenant:?} as metadata"))?,
            auth: MetadataValue::try_from(format!("Bearer {token}")).context("token metadata")?,
            business,
        })
    }

    fn tenant_name(&self) -> &str {
        self.tenant.to_str().unwrap_or("?")
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("x-thumbup-tenant", self.tenant.clone());
        r.metadata_mut().insert("authorization", self.auth.clone());
        r
    }

    /// GetCounts of `ids`; the number of items asked for.
    pub async fn counts(&self, ids: Vec<i64>) -> Result<usize, String> {
        let n = ids.len();
        let req = self.request(pb::GetCountsRequest { business_id: self.business, message_ids: ids });
        self.client.clone().get_counts(req).await.map(|_| n).map_err(|s| format!("GetCounts: {s}"))
    }

    /// One action of `mid` on `message`.
    pub async fn act(&self, mid: i64, message: i64, action: pb::Action) -> Result<usize, String> {
        let req = self.request(pb::LikeRequest {
            business_id: self.business,
            message_id: message,
            mid,
            up_mid: 42,
            action: action as i32,
        });
        self.client.clone().like(req).await.map(|_| 1).map_err(|s| format!("Like: {s}"))
    }
}

/// Connections shared by the scenarios.
pub struct Context {
    /// The service, as `--tenant`.
    pub service: Service,
    /// The service, as `--cold-tenant` (hot-key cache off).
    pub cold: Option<Service>,
    /// gRPC health checks on the same connection as `service`: an empty
    /// unary RPC, the floor that any RPC of the service costs.
    pub health: HealthClient<Channel>,
    /// Admin Redis connection (baseline).
    pub redis: MultiplexedConnection,
    /// Admin MariaDB pool (tenant schema reads; naive schema setup).
    pub admin_db: MySqlPool,
    /// The counts key of item k (index k - 1).
    pub count_keys: Arc<Vec<String>>,
}

impl Context {
    /// Connects to the service, Redis and MariaDB.
    pub async fn connect(args: &Args) -> anyhow::Result<Context> {
        let channel = thumbup_service::client_endpoint(&args.addr, args.ca_file.as_deref())
            .context("service address")?
            .connect()
            .await
            .with_context(|| format!("connect to thumbup-service at {}", args.addr))?;
        let health = HealthClient::new(channel.clone());
        let client = ThumbupClient::new(channel);
        let service = Service::new(client.clone(), &args.tenant, &args.token, args.business)?;
        let cold = match &args.cold_tenant {
            Some(t) => Some(Service::new(client, t, &args.cold_token, args.business)?),
            None => None,
        };
        let redis = redis::Client::open(args.redis_url.as_str())
            .context("Redis URL")?
            .get_multiplexed_async_connection()
            .await
            .context("connect to Redis")?;
        let admin_db = MySqlPoolOptions::new()
            .max_connections(4)
            .connect(&args.db_url)
            .await
            .context("connect to MariaDB with the admin URL")?;
        let keys = Keys::new(&args.tenant, 1);
        let count_keys =
            Arc::new((1..=args.items.max(1)).map(|k| keys.counts(args.business, args.item_base + k as i64)).collect());
        Ok(Context { service, cold, health, redis, admin_db, count_keys })
    }
}

fn progress(what: &str, run: usize, m: &Measurement) {
    eprintln!(
        "thumbup-bench: {what} run {}: {:.0} req/s, {:.0} items/s, p99 {:.3} ms, {} errors{}",
        run + 1,
        m.rate(),
        m.item_rate(),
        m.samples.clone().quantile_ms(0.99),
        m.errors,
        m.first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default()
    );
}

/// Collects the percentiles of one measurement across runs.
#[derive(Default)]
struct Percentiles {
    runs: Vec<[f64; 4]>,
}

impl Percentiles {
    fn push(&mut self, m: &mut Measurement) {
        self.runs.push(m.samples.percentiles_ms());
    }

    fn at(&self, i: usize) -> Vec<f64> {
        self.runs.iter().map(|p| p[i]).collect()
    }

    fn latency(&self, label: &str) -> Latency {
        Latency { label: label.into(), ms: [0, 1, 2, 3].map(|i| median(&self.at(i))) }
    }
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
    let before = cpu::Snapshot::take(args.service_pid, &ctx.redis).await;
    let m = f.await;
    let after = cpu::Snapshot::take(args.service_pid, &ctx.redis).await;
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

/// Reads every item once through the service on both tenants, so their
/// counts keys are in Redis (cache-aside fills them): a scenario measures a
/// warm cache whichever scenarios ran before it.
async fn prefill_counts(ctx: &Context, args: &Args) -> anyhow::Result<()> {
    let ids: Vec<i64> = (1..=args.items as i64).map(|k| args.item_base + k).collect();
    for svc in std::iter::once(&ctx.service).chain(&ctx.cold) {
        for chunk in ids.chunks(100) {
            svc.counts(chunk.to_vec()).await.map_err(anyhow::Error::msg).context("prefill GetCounts")?;
        }
    }
    Ok(())
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

        let health = ctx.health.clone();
        let m = closed_loop(&load1, move |_, _, _| {
            let mut health = health.clone();
            async move {
                let req = HealthCheckRequest { service: HEALTH_SERVICE.into() };
                health.check(req).await.map(|_| 1).map_err(|s| format!("Health/Check: {s}"))
            }
        });
        floor.push("a gRPC floor (Health/Check)", run, with_cpu(ctx, args, m).await);

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
    if batch == 20 {
        let items = median(&svcb.items);
        targets.push(Target {
            name: "batch-20 GetCounts item-counts/s".into(),
            measured: items,
            target: ">= 200000".into(),
            pass: items >= 200_000.0,
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

async fn counts_version(ctx: &Context, args: &Args, message: i64) -> anyhow::Result<i64> {
    let sql = format!(
        "SELECT version FROM `{}`.like_counts WHERE business_id = ? AND message_id = ?",
        schema_for(&args.tenant)
    );
    let v: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(args.business)
        .bind(message)
        .fetch_optional(&ctx.admin_db)
        .await
        .context("read the tenant's like_counts version")?;
    Ok(v.unwrap_or(0))
}

/// Whether the job has applied and acknowledged every entry of `stream`:
/// its group has been handed the stream's last entry and nothing is pending.
async fn stream_drained(con: &mut MultiplexedConnection, stream: &str) -> anyhow::Result<bool> {
    let field = |m: &HashMap<String, redis::Value>, k: &str| -> Option<String> {
        m.get(k).and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
    };
    let exists: bool = redis::cmd("EXISTS").arg(stream).query_async(con).await?;
    if !exists {
        return Ok(true);
    }
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO").arg("STREAM").arg(stream).query_async(con).await?;
    let groups: Vec<HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(con).await?;
    let Some(group) = groups.iter().find(|g| field(g, "name").as_deref() == Some(JOB_GROUP)) else {
        return Ok(false);
    };
    let pending: i64 = group.get("pending").and_then(|v| redis::from_redis_value_ref(v).ok()).unwrap_or(-1);
    Ok(pending == 0 && field(group, "last-delivered-id") == field(&info, "last-generated-id"))
}

/// Waits until the job has applied every stream shard of the tenant.
async fn wait_drained(ctx: &Context, args: &Args, within: Duration) -> anyhow::Result<()> {
    let keys = Keys::new(&args.tenant, args.shards.max(1));
    let mut con = ctx.redis.clone();
    let deadline = Instant::now() + within;
    loop {
        let mut all = true;
        for shard in 0..keys.shards() {
            all &= stream_drained(&mut con, &keys.stream(shard)).await.context("read the job's stream progress")?;
        }
        if all {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "thumbup-job has not applied tenant {}'s streams within {within:?} (is it running?)",
            args.tenant
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Rows that MariaDB counted as changed in `schema`.`table` so far
/// (`information_schema.TABLE_STATISTICS`, kept while `userstat` is on).
async fn rows_changed(ctx: &Context, schema: &str, table: &str) -> anyhow::Result<i64> {
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT CAST(SUM(ROWS_CHANGED) AS SIGNED) FROM information_schema.TABLE_STATISTICS \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
    )
    .bind(schema)
    .bind(table)
    .fetch_one(&ctx.admin_db)
    .await
    .with_context(|| format!("read MariaDB's TABLE_STATISTICS of {schema}.{table}"))?;
    Ok(n.unwrap_or(0))
}

/// Turns on MariaDB's per-table statistics (`userstat`); returns whether
/// they were on already, to restore afterwards.
async fn userstat_on(ctx: &Context) -> anyhow::Result<bool> {
    let was: i64 = sqlx::query_scalar("SELECT CAST(@@GLOBAL.userstat AS SIGNED)")
        .fetch_one(&ctx.admin_db)
        .await
        .context("read @@GLOBAL.userstat")?;
    sqlx::query("SET GLOBAL userstat = 1").execute(&ctx.admin_db).await.context(
        "SET GLOBAL userstat = 1 (MariaDB's table statistics count the counts-row UPDATEs; the admin user needs SUPER)",
    )?;
    Ok(was != 0)
}

async fn naive_pool(args: &Args) -> anyhow::Result<MySqlPool> {
    let mut admin = MySqlPoolOptions::new().max_connections(1).connect(&args.db_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE IF NOT EXISTS `{NAIVE_SCHEMA}`")))
        .execute(&admin)
        .await
        .context("create the naive schema")?;
    admin.close().await;
    admin = MySqlPoolOptions::new()
        .max_connections(args.concurrency.max(1) as u32)
        .connect_with(MySqlConnectOptions::from_str(&args.db_url)?.database(NAIVE_SCHEMA))
        .await
        .context("connect to the naive schema")?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS records (
            mid BIGINT NOT NULL, business_id BIGINT NOT NULL, message_id BIGINT NOT NULL,
            state TINYINT NOT NULL, mtime BIGINT NOT NULL,
            PRIMARY KEY (mid, business_id, message_id));
         CREATE TABLE IF NOT EXISTS counts (
            business_id BIGINT NOT NULL, message_id BIGINT NOT NULL,
            likes BIGINT NOT NULL, dislikes BIGINT NOT NULL,
            PRIMARY KEY (business_id, message_id));",
    )
    .execute(&admin)
    .await
    .context("create the naive tables")?;
    Ok(admin)
}

/// The action of client `task`'s `seq`-th request in the hot-write scenario:
/// the client walks its own users, liking on even passes and unliking on odd
/// ones, so every transition is valid. Returns (mid, like?).
pub fn hot_action(task: usize, seq: u64, users_per_task: usize) -> (i64, bool) {
    let u = users_per_task.max(1) as u64;
    let mid = 1 + (task as u64 * u + seq % u) as i64;
    (mid, (seq / u).is_multiple_of(2))
}

/// Scenario b: every client likes and unlikes one message, service vs naive.
pub async fn hot_writes(ctx: &Context, args: &Args) -> anyhow::Result<(Section, Vec<Latency>)> {
    let naive = naive_pool(args).await?;
    let per_task = (args.users / args.concurrency.max(1)).max(1);
    let stamp = jiff::Timestamp::now().as_second();
    let (mut svc_rate, mut naive_rate, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let (mut svc_upd, mut naive_upd, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let (mut svc_version, mut naive_issued) = (Vec::new(), Vec::new());
    let schema = schema_for(&args.tenant);
    let userstat_was_on = userstat_on(ctx).await?;
    let (mut ls, mut ln) = (Percentiles::default(), Percentiles::default());
    for run in 0..args.runs.max(1) {
        // A message of its own per run: the users start from NONE on it.
        let message = 7_000_000_000_000 + stamp * 10 + run as i64;
        let before = counts_version(ctx, args, message).await?;
        let changed_before = rows_changed(ctx, &schema, "like_counts").await?;
        let svc = ctx.service.clone();
        let mut m = closed_loop(&args.load(1), move |task, seq, _| {
            let svc = svc.clone();
            let (mid, like) = hot_action(task, seq, per_task);
            let action = if like { pb::Action::Like } else { pb::Action::Unlike };
            async move { svc.act(mid, message, action).await }
        })
        .await;
        let svc_done = Instant::now();
        progress("b service Like (hot item)", run, &m);
        let svc_ok = m.total_ok;
        svc_rate.push(m.rate());
        ls.push(&mut m);
        let mut errs = m.errors;

        sqlx::raw_sql("DELETE FROM records; DELETE FROM counts;").execute(&naive).await?;
        sqlx::query("INSERT INTO counts (business_id, message_id, likes, dislikes) VALUES (?, ?, 0, 0)")
            .bind(args.business)
            .bind(message)
            .execute(&naive)
            .await?;
        let naive_before = rows_changed(ctx, NAIVE_SCHEMA, "counts").await?;
        let updates = Arc::new(AtomicU64::new(0));
        let (pool, upd, biz) = (naive.clone(), Arc::clone(&updates), args.business);
        let mut n = closed_loop(&args.load(1), move |task, seq, _| {
            let (pool, upd) = (pool.clone(), Arc::clone(&upd));
            let (mid, like) = hot_action(task, seq, per_task);
            async move { naive_like(&pool, &upd, biz, message, mid, like).await.map_err(|e| e.to_string()) }
        })
        .await;
        progress("b naive DB like (hot item)", run, &n);
        naive_rate.push(n.rate());
        ratio.push(m.rate() / n.rate().max(1e-9));
        let naive_changed = rows_changed(ctx, NAIVE_SCHEMA, "counts").await? - naive_before;
        naive_upd.push(naive_changed as f64 / n.total_ok.max(1) as f64 * 10_000.0);
        naive_issued.push(updates.load(Ordering::Relaxed) as f64 / n.total_ok.max(1) as f64 * 10_000.0);
        ln.push(&mut n);
        errs += n.errors;
        errors.push(errs as f64);

        // Let the job apply the last window before reading the version.
        let settle = Duration::from_millis(args.job_window_ms + 3000);
        tokio::time::sleep(settle.saturating_sub(svc_done.elapsed())).await;
        wait_drained(ctx, args, Duration::from_millis(args.job_window_ms * 6).max(Duration::from_secs(60))).await?;
        let after = counts_version(ctx, args, message).await?;
        let changed = rows_changed(ctx, &schema, "like_counts").await? - changed_before;
        let per10k = changed as f64 / svc_ok.max(1) as f64 * 10_000.0;
        eprintln!(
            "thumbup-bench: b run {}: {changed} like_counts row changes (MariaDB TABLE_STATISTICS), version \
             {before} -> {after}, over {svc_ok} likes: {per10k:.2} counts-row UPDATEs per 10,000 likes",
            run + 1
        );
        svc_upd.push(per10k);
        svc_version.push((after - before) as f64 / svc_ok.max(1) as f64 * 10_000.0);
    }
    if !userstat_was_on {
        sqlx::query("SET GLOBAL userstat = 0").execute(&ctx.admin_db).await.context("restore userstat")?;
    }
    let r = median(&ratio);
    let u = median(&svc_upd);
    let section = Section {
        title: "b. Hot-item writes: Like RPC vs naive DB".into(),
        about: format!(
            "Closed loop, {c} clients, all on one message (a new one per run); each client walks its own {per_task} \
             users, liking then unliking. Naive design: schema `{NAIVE_SCHEMA}` in the same MariaDB, per like one \
             transaction of `INSERT ... ON DUPLICATE KEY UPDATE` of the record and \
             `UPDATE counts SET likes = likes +/- 1` of the one counts row, pool of {c} connections. \
             Counts-row UPDATEs are MariaDB's own count of changed rows of the counts table \
             (`information_schema.TABLE_STATISTICS`, `userstat` on for the scenario): `like_counts` of the \
             tenant's schema, read {w} ms + 3 s after the load, once the job has applied every entry of the tenant's streams, and the \
             naive `counts`. The cross-check rows are the growth of `like_counts.version` (one per job window \
             that changes the row) and the rows the naive UPDATEs reported changed.",
            c = args.concurrency,
            w = args.job_window_ms,
        ),
        metrics: vec![
            Metric::new("service likes/s", svc_rate),
            Metric::new("naive DB likes/s", naive_rate),
            Metric::new("ratio service/naive", ratio),
            Metric::new("thumbup counts-row UPDATEs per 10,000 likes", svc_upd),
            Metric::new("naive counts-row UPDATEs per 10,000 likes", naive_upd),
            Metric::new("thumbup counts-row version growth per 10,000 likes (cross-check)", svc_version),
            Metric::new("naive UPDATEs that changed a row per 10,000 likes (cross-check)", naive_issued),
            Metric::new("failed requests (both)", errors),
        ],
        targets: vec![
            Target { name: "likes/s service / naive".into(), measured: r, target: ">= 5x".into(), pass: r >= 5.0 },
            Target {
                name: "thumbup counts-row UPDATEs per 10,000 likes".into(),
                measured: u,
                target: "<= 10 (10 s window)".into(),
                pass: u <= 10.0,
            },
        ],
    };
    Ok((section, vec![ls.latency("b service Like (hot)"), ln.latency("b naive DB like (hot)")]))
}

async fn naive_like(
    pool: &MySqlPool,
    updates: &AtomicU64,
    business: i64,
    message: i64,
    mid: i64,
    like: bool,
) -> Result<usize, sqlx::Error> {
    let now = jiff::Timestamp::now().as_millisecond();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO records (mid, business_id, message_id, state, mtime) VALUES (?, ?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE state = VALUES(state), mtime = VALUES(mtime)",
    )
    .bind(mid)
    .bind(business)
    .bind(message)
    .bind(if like { 1i8 } else { 0i8 })
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let r = sqlx::query("UPDATE counts SET likes = likes + ? WHERE business_id = ? AND message_id = ?")
        .bind(if like { 1i64 } else { -1i64 })
        .bind(business)
        .bind(message)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    updates.fetch_add(r.rows_affected(), Ordering::Relaxed);
    Ok(1)
}

/// Whether request `seq` of closed-loop task `task` of the mixed scenario
/// is a write: every 20th request of each task (5%), staggered by task.
pub fn mixed_write(task: usize, seq: u64) -> bool {
    (seq + task as u64).is_multiple_of(20)
}

/// Scenario c: 95% GetCounts / 5% Like. Each run measures the mix's maximum
/// throughput (closed loop), then offers half of it (or `--mixed-rate`) in an
/// open loop and measures latency per class.
pub async fn mixed(ctx: &Context, args: &Args) -> anyhow::Result<(Section, Vec<Latency>)> {
    // Every write is a new user's first like, so it is always valid.
    let next_mid = Arc::new(AtomicI64::new(3_000_000_000_000 + jiff::Timestamp::now().as_second() * 100_000));
    let (mut maxima, mut offered, mut reads, mut writes, mut errors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut lr, mut lw) = (Percentiles::default(), Percentiles::default());
    prefill_counts(ctx, args).await?;
    let op = {
        let svc = ctx.service.clone();
        let next = Arc::clone(&next_mid);
        move |write: bool, ids: Vec<i64>| {
            let svc = svc.clone();
            let mid = if write { next.fetch_add(1, Ordering::Relaxed) } else { 0 };
            async move { if write { svc.act(mid, ids[0], pb::Action::Like).await } else { svc.counts(ids).await } }
        }
    };
    for run in 0..args.runs.max(1) {
        let max_op = op.clone();
        // The open loop follows at once, so this warms the hot-key cache for it too.
        let mut load = args.load(1);
        if args.hot_ttl_ms > 0 {
            load.warmup = load.warmup.max(Duration::from_secs(args.hot_warmup_secs));
        }
        let m = closed_loop(&load, move |task, seq, ids| max_op(mixed_write(task, seq), ids)).await;
        progress("c mix maximum (closed loop)", run, &m);
        maxima.push(m.rate());
        let rate = if args.mixed_rate > 0.0 { args.mixed_rate } else { m.rate() * 0.5 };
        offered.push(rate);
        let open_op = op.clone();
        let [mut r, mut w] = open_loop(
            &args.load(1),
            rate,
            |rng| usize::from(rng.random::<f64>() < 0.05),
            move |class, _, ids| open_op(class == 1, ids),
        )
        .await;
        progress("c reads", run, &r);
        progress("c writes", run, &w);
        reads.push(r.rate());
        writes.push(w.rate());
        errors.push((m.errors + r.errors + w.errors) as f64);
        lr.push(&mut r);
        lw.push(&mut w);
    }
    let p99r = median(&lr.at(2));
    let p99w = median(&lw.at(2));
    let section = Section {
        title: "c. Mixed: 95% GetCounts / 5% Like at a fixed rate".into(),
        about: format!(
            "Each run first measures the maximum throughput of the mix (closed loop, {c} tasks, every 20th \
             request of a task a write), then offers {what} in an open loop; latency is measured from the \
             scheduled send time. Reads are GetCounts batch 1 on zipf s={z} on tenant {t} (hot-key cache TTL \
             {ttl} ms); writes are a fresh user's Like of a zipf item.",
            c = args.concurrency,
            what = if args.mixed_rate > 0.0 {
                format!("{:.0} requests/s (--mixed-rate)", args.mixed_rate)
            } else {
                "half of that maximum".into()
            },
            z = args.zipf,
            t = args.tenant,
            ttl = args.hot_ttl_ms,
        ),
        metrics: vec![
            Metric::new("mix maximum, closed loop (requests/s)", maxima),
            Metric::new("offered (requests/s)", offered),
            Metric::new("reads done (requests/s)", reads),
            Metric::new("writes done (requests/s)", writes),
            Metric::new("read p50 (ms)", lr.at(0)),
            Metric::new("read p90 (ms)", lr.at(1)),
            Metric::new("read p99 (ms)", lr.at(2)),
            Metric::new("write p50 (ms)", lw.at(0)),
            Metric::new("write p90 (ms)", lw.at(1)),
            Metric::new("write p99 (ms)", lw.at(2)),
            Metric::new("failed requests", errors),
        ],
        targets: vec![
            Target { name: "read p99 (ms)".into(), measured: p99r, target: "< 5 ms".into(), pass: p99r < 5.0 },
            Target { name: "write p99 (ms)".into(), measured: p99w, target: "< 10 ms".into(), pass: p99w < 10.0 },
        ],
    };
    Ok((section, vec![lr.latency("c mixed reads"), lw.latency("c mixed writes")]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_action_alternates_like_and_unlike_per_user_and_keeps_clients_apart() {
        assert_eq!(hot_action(0, 0, 3), (1, true));
        assert_eq!(hot_action(0, 2, 3), (3, true));
        assert_eq!(hot_action(0, 3, 3), (1, false));
        assert_eq!(hot_action(0, 6, 3), (1, true));
        assert_eq!(hot_action(1, 0, 3), (4, true));
    }

    #[test]
    fn mixed_closed_loop_writes_one_request_in_twenty_per_task() {
        for task in 0..3 {
            let writes: Vec<u64> = (0..60).filter(|seq| mixed_write(task, *seq)).collect();
            assert_eq!(writes.len(), 3, "task {task}: {writes:?}");
        }
        assert!(mixed_write(0, 0) && !mixed_write(1, 0) && mixed_write(1, 19));
    }
}
