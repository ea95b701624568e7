//! CPU time spent by each side of a measurement: this load generator, the
//! service (when its pid is known) and Redis (from `INFO cpu`, summed over
//! a cluster's nodes). On a machine
//! where all of them share the same cores, CPU per request tells where the
//! time goes better than the request rate alone.

use thumbup_core::cache::Conn;

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds used so far by each side; `None` where it cannot be read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    bench: Option<f64>,
    service: Option<f64>,
    redis: Option<f64>,
}

/// CPU microseconds per request of each side over one measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerRequest {
    /// The load generator (this process).
    pub bench: Option<f64>,
    /// thumbup-service.
    pub service: Option<f64>,
    /// redis-server (all its threads).
    pub redis: Option<f64>,
}

/// User plus system CPU seconds of process `pid` ("self" for this one), all
/// threads, from `/proc/<pid>/stat`.
pub fn process_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

/// `used_cpu_user + used_cpu_sys` of an `INFO cpu` reply.
pub fn redis_seconds(info: &str) -> Option<f64> {
    let field = |name: &str| {
        info.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':'))?.trim().parse::<f64>().ok())
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// `INFO <section>` of every Redis server the connection reaches: the
/// server, or every node of a cluster (masters and replicas: a replica
/// applies every write too), each over a connection of its own made from
/// the admin URL `url`.
pub async fn info_each(url: &str, con: &mut Conn, section: &str) -> redis::RedisResult<Vec<String>> {
    if !con.is_cluster() {
        return Ok(vec![redis::cmd("INFO").arg(section).query_async(con).await?]);
    }
    let mut out = Vec::new();
    for (host, port) in con.nodes().await? {
        let timeout = std::time::Duration::from_secs(10);
        let mut node = thumbup_core::cache::admin_node_connect(url, &host, port, timeout).await?;
        out.push(redis::cmd("INFO").arg(section).query_async(&mut node).await?);
    }
    Ok(out)
}

impl Snapshot {
    /// Reads every side now (Redis: the sum over its servers; `url` is the
    /// admin URL of `redis`).
    pub async fn take(service_pid: Option<u32>, redis: &Conn, url: &str) -> Snapshot {
        let mut con = redis.clone();
        let infos = info_each(url, &mut con, "cpu").await.ok();
        Snapshot {
            bench: process_seconds("self"),
            service: service_pid.and_then(|p| process_seconds(&p.to_string())),
            redis: infos.and_then(|all| all.iter().map(|i| redis_seconds(i)).sum::<Option<f64>>()),
        }
    }

    /// CPU microseconds per request between `self` and `later` over
    /// `requests` requests.
    pub fn per_request(&self, later: &Snapshot, requests: u64) -> PerRequest {
        let n = requests.max(1) as f64;
        let per = |a: Option<f64>, b: Option<f64>| Some((b? - a?).max(0.0) * 1e6 / n);
        PerRequest {
            bench: per(self.bench, later.bench),
            service: per(self.service, later.service),
            redis: per(self.redis, later.redis),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_cpu_sums_user_and_sys_seconds() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:9.0\r\n";
        assert_eq!(redis_seconds(info), Some(3.75));
        assert_eq!(redis_seconds("# CPU\r\nused_cpu_sys:1.0\r\n"), None);
    }

    #[test]
    fn own_cpu_time_is_readable_and_grows_with_work() {
        // Work until the counter shows 0.05 s more: on a loaded machine a
        // fixed stretch of wall time may get almost no CPU.
        let before = process_seconds("self").expect("/proc/self/stat");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after - before < 0.05 {
            assert!(start.elapsed() < std::time::Duration::from_secs(60), "no growth in 60 s: {before} -> {after}");
            for _ in 0..1_000_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            std::hint::black_box(x);
            after = process_seconds("self").expect("/proc/self/stat");
        }
    }

    #[test]
    fn per_request_divides_the_growth_and_skips_unknown_sides() {
        let a = Snapshot { bench: Some(1.0), service: Some(2.0), redis: None };
        let b = Snapshot { bench: Some(1.5), service: Some(4.0), redis: Some(1.0) };
        let p = a.per_request(&b, 1000);
        assert_eq!(p.bench, Some(500.0));
        assert_eq!(p.service, Some(2000.0));
        assert_eq!(p.redis, None);
    }
}
