//! thumbup-bench: measures thumbup's read and hot-item write paths against
//! the baselines a team would otherwise build, in one invocation on the same
//! servers (issue 5).
//!
//! Scenarios, each run `--runs` times (the report shows every run and the
//! median):
//! - `read`: GetCounts batch 1 and batch `--batch` on a zipf workload, closed
//!   loop, against raw Redis GET / MGET of the same counts keys through one
//!   multiplexed connection.
//! - `hot-write`: every client likes and unlikes one message through the
//!   Like RPC, against the naive design (record upsert plus a per-like
//!   `UPDATE counts SET likes = likes + 1`, one transaction, same MariaDB);
//!   also counts-row UPDATEs per 10,000 likes for both.
//! - `mixed`: 95% GetCounts / 5% Like; the mix's maximum throughput (closed
//!   loop), then latency per class at a fixed offered rate (open loop) of half
//!   that maximum.
//! - `fresh-write` (d): every like by a user never seen, against the naive
//!   design.
//! - `redis-only` (e): b's workload against a Redis-only like (one script:
//!   state check and counter, no stream, no DB), the ceiling of a
//!   Redis-backed write.
//! - `freshness` (g): time from an acknowledged like to GetCounts and
//!   ListItemLikers showing it.
//! - `memory` (f): Redis bytes per cached like (stream apart) and DB bytes
//!   per record over a million likes, run once.
//!
//! Output: `<out>/report.md` and `<out>/latency.svg`. `--reset` instead
//! empties the bench tenants ([`reset`]).

pub mod cpu;
pub mod load;
pub mod report;
pub mod reset;
pub mod scenarios;
pub mod stats;
pub mod zipf;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use crate::load::Load;
use crate::report::Report;
use crate::zipf::Zipf;

/// Which scenarios to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// a: count reads against raw Redis.
    Read,
    /// b: hot-item writes against the naive DB design.
    HotWrite,
    /// c: 95% reads / 5% writes at a fixed rate.
    Mixed,
    /// d: fresh users' likes against the naive DB design.
    FreshWrite,
    /// e: hot-item likes against a Redis-only like.
    RedisOnly,
    /// g: freshness of counts and likers after a like.
    Freshness,
    /// f: memory per like in Redis and the DB (a million likes, one run).
    Memory,
    /// h: the failover controller's replay of a 120 s window at 15k likes/s.
    Recovery,
    /// All of them: a, b, c, d, e, g, f, then h.
    All,
}

/// Command line of thumbup-bench.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "thumbup-bench",
    about = "Load generator and baselines for thumbup (issue 5)",
    args_override_self = true
)]
pub struct Args {
    /// gRPC address of thumbup-service (https:// for a TLS service).
    #[arg(long, env = "THUMBUP_ADDR", default_value = "http://127.0.0.1:50151")]
    pub addr: String,
    /// PEM CA file that the service's certificate must chain to (https://
    /// only; default: the system's roots).
    #[arg(long, env = "THUMBUP_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Tenant to load (sent as x-thumbup-tenant).
    #[arg(long, env = "THUMBUP_TENANT", default_value = "bench")]
    pub tenant: String,
    /// Bearer token of the tenant.
    #[arg(long, env = "THUMBUP_TOKEN", default_value = "bench-token-0001")]
    pub token: String,
    /// A second tenant, configured like `--tenant` but with the hot-key cache
    /// off: scenario a measures batch-1 GetCounts on it too, for the
    /// cache-aside target (0.5x Redis GET).
    #[arg(long)]
    pub cold_tenant: Option<String>,
    /// Bearer token of `--cold-tenant`.
    #[arg(long, default_value = "bench-token-0001")]
    pub cold_token: String,
    /// Unmeasured seconds before the batch-1 measurement on `--tenant` when
    /// its hot-key cache is on: the cache picks its hot set when a half of
    /// its window (default 10 s) closes, so a shorter warmup would measure
    /// a cache that has not started yet.
    #[arg(long, default_value_t = 6)]
    pub hot_warmup_secs: u64,
    /// pid of thumbup-service, to report its CPU time per request.
    #[arg(long)]
    pub service_pid: Option<u32>,
    /// Stream shards of `--tenant` (its `stream.shards`): the hot-write
    /// scenario waits until the job has applied every shard.
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// Business id of the items.
    #[arg(long, env = "THUMBUP_BUSINESS", default_value_t = 1)]
    pub business: i64,
    /// Concurrent client tasks (closed loop), for service and baseline alike.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Measured seconds per measurement.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Unmeasured seconds before each measurement.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Items per request of the batched read measurement.
    #[arg(long, default_value_t = 20)]
    pub batch: usize,
    /// Users of the write scenarios (split between the client tasks).
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Distinct items of the read workload.
    #[arg(long, default_value_t = 10_000)]
    pub items: usize,
    /// Zipf skew s of item popularity; 0 is uniform.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Message id of item 1 minus one.
    #[arg(long, default_value_t = 9_000_000)]
    pub item_base: i64,
    /// Admin Redis URL (raw-Redis baseline).
    #[arg(long, env = "THUMBUP_ADMIN_REDIS_URL", default_value = "redis://default:thumbup-admin@127.0.0.1:26379")]
    pub redis_url: String,
    /// Admin MariaDB URL (naive-DB baseline, and the tenant's counts versions).
    #[arg(long, env = "THUMBUP_ADMIN_DB_URL", default_value = "mysql://thumbup_admin:thumbup-admin@127.0.0.1:23306")]
    pub db_url: String,
    /// Window of the running thumbup-job in ms: after the hot-write scenario
    /// the bench waits a window and a bit for the job to apply it.
    #[arg(long, default_value_t = thumbup_core::config::DEFAULT_WINDOW_MS)]
    pub job_window_ms: u64,
    /// TTL of the service's local hot-key cache in ms (0 = off), as the
    /// tenant is configured; the report names it and picks the read target.
    #[arg(long, default_value_t = 0)]
    pub hot_ttl_ms: u64,
    /// Offered rate of the mixed scenario in requests/s; 0 means half of the
    /// maximum throughput of the same 95/5 mix, measured (closed loop) in
    /// each run just before.
    #[arg(long, default_value_t = 0.0)]
    pub mixed_rate: f64,
    /// Likes per run of the freshness scenario (g), started evenly over a
    /// job window and a second.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub fresh_samples: u64,
    /// Likes of the memory scenario (f).
    #[arg(long, default_value_t = 1_000_000)]
    pub memory_likes: u64,
    /// Users of the memory scenario (f): each likes `--memory-likes /
    /// --memory-users` distinct items.
    #[arg(long, default_value_t = 100_000)]
    pub memory_users: u64,
    /// Items of the memory scenario (f).
    #[arg(long, default_value_t = 100_000)]
    pub memory_items: u64,
    /// Events in the replayed window of the recovery scenario (h): 120 s at
    /// 15,000 likes a second.
    #[arg(long, default_value_t = 1_800_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub recovery_events: i64,
    /// Seconds the window spans (the default `failover.replay_window_ms`).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub recovery_window_secs: u64,
    /// Seconds of it the standby's DB lacks (the default `failover.max_lag_ms`).
    #[arg(long, default_value_t = 30)]
    pub recovery_lag_secs: u64,
    /// Stream shards of the recovery scenario's tenant.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub recovery_shards: u32,
    /// Output folder of report.md and latency.svg.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Scenario(s) to run.
    #[arg(long, value_enum, default_value = "all")]
    pub scenario: Scenario,
    /// Runs per scenario; the report gives the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Empty the bench tenants instead of benchmarking: drop the schemas of
    /// `--tenant`, `--cold-tenant` and the naive design, delete their Redis
    /// keys, compact the AOF, and exit (bench/run.sh does this before it
    /// provisions, so every run starts from the same state).
    #[arg(long)]
    pub reset: bool,
}

impl Args {
    /// The closed-loop load of these arguments with `batch` items a request.
    pub fn load(&self, batch: usize) -> Load {
        Load {
            concurrency: self.concurrency.max(1),
            warmup: Duration::from_secs(self.warmup_secs),
            duration: Duration::from_secs(self.duration_secs.max(1)),
            batch: batch.max(1),
            zipf: Arc::new(Zipf::new(self.items, self.zipf)),
            item_base: self.item_base,
        }
    }
}

/// The machine line of the report: CPU model and logical CPUs.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{model}, {cpus} logical CPUs")
}

/// Runs the selected scenarios and writes the report.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let ctx = scenarios::Context::connect(&args).await?;
    let mut report = Report {
        preamble: vec![
            format!("date: {}", jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC")),
            format!("machine: {} (service, job, MariaDB, Redis and the bench share it)", machine()),
            format!(
                "load: concurrency {}, {} s measured after {} s warmup, {} runs, {} items zipf s={}, {} users, business {}",
                args.concurrency,
                args.duration_secs,
                args.warmup_secs,
                args.runs,
                args.items,
                args.zipf,
                args.users,
                args.business
            ),
            format!(
                "service {} tenant {} (hot-key cache TTL {} ms, 0 = off){}; job window {} ms",
                args.addr,
                args.tenant,
                args.hot_ttl_ms,
                args.cold_tenant.as_ref().map(|c| format!(", tenant {c} (hot-key cache off)")).unwrap_or_default(),
                args.job_window_ms,
            ),
        ],
        ..Report::default()
    };
    let all = args.scenario == Scenario::All;
    if all || args.scenario == Scenario::Read {
        let (section, lat) = scenarios::reads(&ctx, &args).await?;
        report.sections.push(section);
        report.latencies.extend(lat);
    }
    if all || args.scenario == Scenario::HotWrite {
        let (section, lat) = scenarios::hot_writes(&ctx, &args).await?;
        report.sections.push(section);
        report.latencies.extend(lat);
    }
    if all || args.scenario == Scenario::Mixed {
        let (section, lat) = scenarios::mixed(&ctx, &args).await?;
        report.sections.push(section);
        report.latencies.extend(lat);
    }
    if all || args.scenario == Scenario::FreshWrite {
        scenarios::quiesce(&ctx, &args).await?;
        let (section, lat) = scenarios::fresh_writes(&ctx, &args).await?;
        report.sections.push(section);
        report.latencies.extend(lat);
    }
    if all || args.scenario == Scenario::RedisOnly {
        scenarios::quiesce(&ctx, &args).await?;
        let (section, lat) = scenarios::redis_only(&ctx, &args).await?;
        report.sections.push(section);
        report.latencies.extend(lat);
    }
    if all || args.scenario == Scenario::Freshness {
        scenarios::quiesce(&ctx, &args).await?;
        report.sections.push(scenarios::freshness(&ctx, &args).await?);
    }
    if all || args.scenario == Scenario::Memory {
        report.sections.push(scenarios::memory(&ctx, &args).await?);
    }
    if all || args.scenario == Scenario::Recovery {
        report.sections.push(scenarios::recovery(&ctx, &args).await?);
    }
    if let Some(spread) = cluster_spread(&ctx, &args).await? {
        report.preamble.push(spread);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let md = args.out.join("report.md");
    std::fs::write(&md, report::render_markdown(&report)).with_context(|| format!("write {}", md.display()))?;
    let svg = args.out.join("latency.svg");
    std::fs::write(&svg, report::render_svg(&report.latencies)).with_context(|| format!("write {}", svg.display()))?;
    Ok(report)
}

/// On a Redis Cluster, where the bench tenant lives: the master of each
/// stream shard's slot (a shard's users' caches share it) and the tenant's
/// keys per master, after the run. `None` on a single Redis.
async fn cluster_spread(ctx: &scenarios::Context, args: &Args) -> anyhow::Result<Option<String>> {
    let mut con = ctx.redis.clone();
    if !con.is_cluster() {
        return Ok(None);
    }
    let keys = thumbup_core::keys::Keys::new(&args.tenant, args.shards);
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut con).await?;
    let master_of = |slot: i64| -> Option<u16> {
        ranges.iter().find_map(|r| {
            let lo: i64 = redis::from_redis_value_ref(r.first()?).ok()?;
            let hi: i64 = redis::from_redis_value_ref(r.get(1)?).ok()?;
            let redis::Value::Array(node) = r.get(2)? else { return None };
            (lo..=hi).contains(&slot).then(|| redis::from_redis_value_ref(node.get(1)?).ok()).flatten()
        })
    };
    let mut shards = Vec::new();
    for shard in 0..args.shards {
        let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(keys.stream(shard)).query_async(&mut con).await?;
        shards.push(format!("shard {shard} slot {slot} on {}", master_of(slot).map_or("?".into(), |p| p.to_string())));
    }
    let pattern = format!("{}*", keys.prefix());
    let mut per_master = Vec::new();
    for node in thumbup_core::cache::scan_nodes(&mut con).await? {
        let (mut cursor, mut n) = (0u64, 0usize);
        loop {
            let (next, found) = thumbup_core::cache::scan_page(&mut con, &node, cursor, &pattern, 5000).await?;
            n += found.len();
            if next == 0 {
                break;
            }
            cursor = next;
        }
        per_master.push(format!("{}: {n} keys", node.1));
    }
    Ok(Some(format!(
        "Redis Cluster spread of tenant {}: {}; keys per master: {}",
        args.tenant,
        shards.join(", "),
        per_master.join(", ")
    )))
}
