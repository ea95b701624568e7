//! The three scenarios of issue 5 and their baselines. Each function runs its
//! measurements `--runs` times and returns the report section and the latency
//! series (medians over the runs).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng;
use redis::aio::MultiplexedConnection;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use thumbup_core::config::schema_for;
use thumbup_core::keys::Keys;
use thumbup_service::pb;
use thumbup_service::pb::thumbup_client::ThumbupClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::Args;
use crate::load::{Measurement, closed_loop, open_loop};
use crate::report::{Latency, Metric, Section, Target};
use crate::stats::median;

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
    /// The service.
    pub service: Service,
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
        let channel = Channel::from_shared(args.addr.clone())
            .context("service address")?
            .connect()
            .await
            .with_context(|| format!("connect to thumbup-service at {}", args.addr))?;
        let service = Service {
            client: ThumbupClient::new(channel),
            tenant: MetadataValue::try_from(args.tenant.as_str()).context("tenant metadata")?,
            auth: MetadataValue::try_from(format!("Bearer {}", args.token)).context("token metadata")?,
            business: args.business,
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
        Ok(Context { service, redis, admin_db, count_keys })
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

async fn service_reads(ctx: &Context, args: &Args, batch: usize) -> Measurement {
    let svc = ctx.service.clone();
    closed_loop(&args.load(batch), move |_, _, ids| {
        let svc = svc.clone();
        async move { svc.counts(ids).await }
    })
    .await
}

/// One batch-1 GetCounts measurement: the maximum read rate for `mixed`.
pub async fn read_max(ctx: &Context, args: &Args) -> anyhow::Result<f64> {
    let m = service_reads(ctx, args, 1).await;
    progress("read max (GetCounts batch 1)", 0, &m);
    Ok(m.rate())
}

/// Scenario a: GetCounts batch 1 and batch `--batch` against Redis GET/MGET.
/// Returns the section, the latency series and the median batch-1 rate.
pub async fn reads(ctx: &Context, args: &Args) -> anyhow::Result<(Section, Vec<Latency>, f64)> {
    // Fill the cache of every item through the service (cache-aside), so the
    // baseline reads the same keys the service serves from.
    let svc = ctx.service.clone();
    let ids: Vec<i64> = (1..=args.items as i64).map(|k| args.item_base + k).collect();
    for chunk in ids.chunks(100) {
        svc.counts(chunk.to_vec()).await.map_err(anyhow::Error::msg).context("prefill GetCounts")?;
    }
    let mut cached = 0u64;
    let mut con = ctx.redis.clone();
    for chunk in ctx.count_keys.chunks(1000) {
        let n: u64 = redis::cmd("EXISTS").arg(chunk).query_async(&mut con).await.context("EXISTS")?;
        cached += n;
    }
    let batch = args.batch.max(1);
    let base = args.item_base;
    let (mut s1, mut r1, mut sb, mut rb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut s1i, mut sbi, mut rbi) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ls1, mut lr1, mut lsb, mut lrb) =
        (Percentiles::default(), Percentiles::default(), Percentiles::default(), Percentiles::default());
    let mut errors = Vec::new();
    for run in 0..args.runs.max(1) {
        let mut m = service_reads(ctx, args, 1).await;
        progress("a GetCounts batch 1", run, &m);
        s1.push(m.rate());
        s1i.push(m.item_rate());
        ls1.push(&mut m);
        let mut errs = m.errors;

        let keys = Arc::clone(&ctx.count_keys);
        let con = ctx.redis.clone();
        let mut m = closed_loop(&args.load(1), move |_, _, ids| {
            let key = keys[(ids[0] - base - 1) as usize].clone();
            let mut con = con.clone();
            async move {
                let _: Option<String> =
                    redis::cmd("GET").arg(key).query_async(&mut con).await.map_err(|e| e.to_string())?;
                Ok(1)
            }
        })
        .await;
        progress("a Redis GET", run, &m);
        r1.push(m.rate());
        lr1.push(&mut m);
        errs += m.errors;

        let mut m = service_reads(ctx, args, batch).await;
        progress(&format!("a GetCounts batch {batch}"), run, &m);
        sb.push(m.rate());
        sbi.push(m.item_rate());
        lsb.push(&mut m);
        errs += m.errors;

        let con = ctx.redis.clone();
        let all = Arc::clone(&ctx.count_keys);
        let mut m = closed_loop(&args.load(batch), move |_, _, ids| {
            let keys: Vec<String> = ids.iter().map(|id| all[(id - base - 1) as usize].clone()).collect();
            let mut con = con.clone();
            async move {
                let n = keys.len();
                let _: Vec<Option<String>> =
                    redis::cmd("MGET").arg(keys).query_async(&mut con).await.map_err(|e| e.to_string())?;
                Ok(n)
            }
        })
        .await;
        progress(&format!("a Redis MGET {batch}"), run, &m);
        rb.push(m.rate());
        rbi.push(m.item_rate());
        lrb.push(&mut m);
        errs += m.errors;
        errors.push(errs as f64);
    }
    let ratio = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x / y.max(1e-9)).collect::<Vec<f64>>();
    let ratio1 = ratio(&s1, &r1);
    let ratiob = ratio(&sbi, &rbi);
    let section = Section {
        title: "a. Count reads: GetCounts vs raw Redis".into(),
        about: format!(
            "Closed loop, {c} tasks sharing one tonic Channel (service) or one multiplexed Redis connection \
             (baseline), zipf s={z} over {n} items ({cached} of their counts keys were in Redis after the \
             prefill). Baseline: GET (batch 1) and MGET (batch {batch}) of the same `thumbup:<tenant>:cnt:<biz>:<msg>` \
             keys with the admin user. Ratios are service/baseline within the run.",
            c = args.concurrency,
            z = args.zipf,
            n = args.items,
        ),
        metrics: vec![
            Metric::new("service GetCounts batch 1 (requests/s)", s1.clone()),
            Metric::new("Redis GET (requests/s)", r1),
            Metric::new("ratio batch 1 service/Redis", ratio1.clone()),
            Metric::new(format!("service GetCounts batch {batch} (requests/s)"), sb),
            Metric::new(format!("service GetCounts batch {batch} (item-counts/s)"), sbi.clone()),
            Metric::new(format!("Redis MGET {batch} (requests/s)"), rb),
            Metric::new(format!("Redis MGET {batch} (item-counts/s)"), rbi),
            Metric::new(format!("ratio batch {batch} service/Redis (item-counts/s)"), ratiob),
            Metric::new("failed requests (all four)", errors),
        ],
        targets: {
            let r = median(&ratio1);
            let mut t = vec![Target {
                name: format!("batch-1 GetCounts / Redis GET (hot-key cache TTL {} ms)", args.hot_ttl_ms),
                measured: r,
                target: ">= 0.5x".into(),
                pass: r >= 0.5,
            }];
            if args.hot_ttl_ms > 0 && (args.zipf - 1.1).abs() < 1e-9 {
                t.push(Target {
                    name: "same, with the hot-key cache on zipf(1.1)".into(),
                    measured: r,
                    target: ">= 1.0x".into(),
                    pass: r >= 1.0,
                });
            }
            if batch == 20 {
                let items = median(&sbi);
                t.push(Target {
                    name: "batch-20 GetCounts item-counts/s".into(),
                    measured: items,
                    target: ">= 200000".into(),
                    pass: items >= 200_000.0,
                });
            }
            t
        },
    };
    let lat = vec![
        ls1.latency("a service GetCounts b1"),
        lr1.latency("a Redis GET"),
        lsb.latency(&format!("a service GetCounts b{batch}")),
        lrb.latency(&format!("a Redis MGET {batch}")),
    ];
    Ok((section, lat, median(&s1)))
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
    let (mut ls, mut ln) = (Percentiles::default(), Percentiles::default());
    for run in 0..args.runs.max(1) {
        // A message of its own per run: the users start from NONE on it.
        let message = 7_000_000_000_000 + stamp * 10 + run as i64;
        let before = counts_version(ctx, args, message).await?;
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
        naive_upd.push(updates.load(Ordering::Relaxed) as f64 / n.total_ok.max(1) as f64 * 10_000.0);
        ln.push(&mut n);
        errs += n.errors;
        errors.push(errs as f64);

        // Let the job apply the last window before reading the version.
        let settle = Duration::from_millis(args.job_window_ms + 3000);
        tokio::time::sleep(settle.saturating_sub(svc_done.elapsed())).await;
        let after = counts_version(ctx, args, message).await?;
        let per10k = (after - before) as f64 / svc_ok.max(1) as f64 * 10_000.0;
        eprintln!(
            "thumbup-bench: b run {}: counts-row version {before} -> {after} over {svc_ok} likes: {per10k:.2} UPDATEs per 10,000 likes",
            run + 1
        );
        svc_upd.push(per10k);
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
             thumbup's counts-row UPDATEs are the growth of `like_counts.version` (one per job window that \
             changes the row), read {w} ms + 3 s after the load; the naive ones are the UPDATEs it ran.",
            c = args.concurrency,
            w = args.job_window_ms,
        ),
        metrics: vec![
            Metric::new("service likes/s", svc_rate),
            Metric::new("naive DB likes/s", naive_rate),
            Metric::new("ratio service/naive", ratio),
            Metric::new("thumbup counts-row UPDATEs per 10,000 likes", svc_upd),
            Metric::new("naive counts-row UPDATEs per 10,000 likes", naive_upd),
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

/// Scenario c: 95% GetCounts / 5% Like at `rate` requests/s, open loop.
pub async fn mixed(ctx: &Context, args: &Args, rate: f64) -> anyhow::Result<(Section, Vec<Latency>)> {
    // Every write is a new user's first like, so it is always valid.
    let next_mid = Arc::new(AtomicI64::new(3_000_000_000_000 + jiff::Timestamp::now().as_second() * 100_000));
    let (mut reads, mut writes, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let (mut lr, mut lw) = (Percentiles::default(), Percentiles::default());
    for run in 0..args.runs.max(1) {
        let svc = ctx.service.clone();
        let next = Arc::clone(&next_mid);
        let [mut r, mut w] =
            open_loop(
                &args.load(1),
                rate,
                |rng| usize::from(rng.random::<f64>() < 0.05),
                move |class, _, ids| {
                    let svc = svc.clone();
                    let mid = if class == 1 { next.fetch_add(1, Ordering::Relaxed) } else { 0 };
                    async move {
                        if class == 1 { svc.act(mid, ids[0], pb::Action::Like).await } else { svc.counts(ids).await }
                    }
                },
            )
            .await;
        progress("c reads", run, &r);
        progress("c writes", run, &w);
        reads.push(r.rate());
        writes.push(w.rate());
        errors.push((r.errors + w.errors) as f64);
        lr.push(&mut r);
        lw.push(&mut w);
    }
    let p99r = median(&lr.at(2));
    let p99w = median(&lw.at(2));
    let section = Section {
        title: "c. Mixed: 95% GetCounts / 5% Like at a fixed rate".into(),
        about: format!(
            "Open loop at {rate:.0} requests/s offered (half of scenario a's batch-1 maximum unless \
             --mixed-rate was given); latency measured from the scheduled send time. Reads are GetCounts batch 1 \
             on zipf s={z}; writes are a fresh user's Like of a zipf item.",
            z = args.zipf
        ),
        metrics: vec![
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
}
