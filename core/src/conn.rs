//! One Redis connection type for a single server and for Redis Cluster, so
//! that every caller (service, job, provisioning, failover replay, bench)
//! runs the same code on both.
//!
//! A single server is reached through the redis crate's `ConnectionManager`
//! (one multiplexed connection, reconnecting); a cluster through its
//! cluster client, which discovers the nodes from the seeds, routes each
//! command to the master of its key's slot, follows MOVED and ASK, and
//! refreshes the slot map after a failover or a resharding.
//!
//! A cluster connection that stops working is replaced ([`Cluster`]). After
//! a master was killed and its address came back as a new node, the cluster
//! client's slot refresh was seen never to finish, and from then on its
//! calls failed (the write fence's PING, every few hundred milliseconds, for
//! minutes) while a fresh client reached every node at once. So each call
//! on a cluster is bounded here as well, and a call that runs out, or
//! [`REPLACE_AFTER`] calls in a row that fail with the cluster unreachable,
//! swap in a fresh client connection, which finds the cluster from the
//! seeds again (at most once per [`REPLACE_EVERY`]).
//!
//! Pipelines: the cluster client sends a pipeline to one node, refuses one
//! whose keys lie in several slots, and does not follow a MOVED inside a
//! pipeline's replies (a pipeline to a slot that a resharding moved kept
//! failing). The pipelines of this project are not transactions (a round
//! trip saved, no atomicity promised), so on a cluster [`Conn`] sends a
//! pipeline's commands each on its own, concurrently (each routed,
//! redirected and retried by the cluster client; the per-node connection
//! still pipelines them on the wire), and answers in the pipeline's order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// A connection to a single Redis or to a Redis Cluster; cheap to clone
/// (clones share the underlying connections).
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Single(ConnectionManager),
    /// A cluster, through the redis crate's cluster client.
    Cluster(Cluster),
}

/// Calls in a row failing with the cluster unreachable that replace a
/// cluster connection.
pub const REPLACE_AFTER: u32 = 5;

/// Least time between two replacements of a cluster connection.
pub const REPLACE_EVERY: Duration = Duration::from_secs(2);

/// A cluster client connection that is replaced when a call on it gets no
/// answer within `limit`, or calls keep failing with the cluster unreachable
/// (see the module docs); clones share it.
#[derive(Clone)]
pub struct Cluster(Arc<ClusterShared>);

struct ClusterShared {
    client: ClusterClient,
    config: ClusterConfig,
    limit: Duration,
    /// The connection in use, its generation and when it was made.
    current: std::sync::RwLock<Current>,
    /// Calls in a row that failed with the cluster unreachable.
    failures: AtomicU32,
}

struct Current {
    generation: u64,
    since: Instant,
    con: ClusterConnection,
}

impl Cluster {
    /// `first` made by `client` with `config`; a call bounded by `limit`.
    pub fn new(client: ClusterClient, config: ClusterConfig, first: ClusterConnection, limit: Duration) -> Cluster {
        let current = Current { generation: 0, since: Instant::now(), con: first };
        Cluster(Arc::new(ClusterShared {
            client,
            config,
            limit,
            current: std::sync::RwLock::new(current),
            failures: AtomicU32::new(0),
        }))
    }

    /// A connection that connects on its first call.
    pub fn lazy(client: ClusterClient, config: ClusterConfig, limit: Duration) -> Cluster {
        let first = client.get_pending_async_connection_with_config(config.clone());
        Cluster::new(client, config, first, limit)
    }

    /// How many times the connection was replaced.
    pub fn replaced(&self) -> u64 {
        self.0.current.read().unwrap_or_else(|e| e.into_inner()).generation
    }

    fn current(&self) -> (u64, ClusterConnection) {
        let cur = self.0.current.read().unwrap_or_else(|e| e.into_inner());
        (cur.generation, cur.con.clone())
    }

    /// Replaces generation `stale` (once: calls that failed together
    /// replace it once), unless it is younger than [`REPLACE_EVERY`].
    fn replace(&self, stale: u64, why: &dyn std::fmt::Display) {
        let mut cur = self.0.current.write().unwrap_or_else(|e| e.into_inner());
        if cur.generation == stale && cur.since.elapsed() >= REPLACE_EVERY {
            tracing::warn!(error = %why, "redis cluster calls keep failing: replacing the cluster connection");
            let con = self.0.client.get_pending_async_connection_with_config(self.0.config.clone());
            *cur = Current { generation: stale + 1, since: Instant::now(), con };
            self.0.failures.store(0, Ordering::Release);
        }
    }

    /// Runs `call` on the current connection within the limit.
    async fn bounded<T>(
        &self,
        call: impl AsyncFnOnce(ClusterConnection) -> Result<T, RedisError>,
    ) -> Result<T, RedisError> {
        let (generation, con) = self.current();
        let out = match tokio::time::timeout(self.0.limit, call(con)).await {
            Ok(out) => out,
            Err(_) => {
                let e = RedisError::from((
                    redis::ErrorKind::Io,
                    "redis cluster call got no answer",
                    format!("within {:?}", self.0.limit),
                ));
                self.replace(generation, &e);
                return Err(e);
            }
        };
        match &out {
            Ok(_) => self.0.failures.store(0, Ordering::Release),
            Err(e) if is_unreachable(e) => {
                if self.0.failures.fetch_add(1, Ordering::AcqRel) + 1 >= REPLACE_AFTER {
                    self.replace(generation, e);
                }
            }
            // An error reply of a working server (NOPERM, a script's error).
            Err(_) => self.0.failures.store(0, Ordering::Release),
        }
        out
    }
}

/// True when the error means Redis could not be reached (as opposed to an
/// error reply from a running server).
///
/// In a cluster, a slot whose master is down (CLUSTERDOWN, TRYAGAIN during
/// a resharding after the client's retries, MASTERDOWN) is unreachable too:
/// it answers again once the cluster has promoted a replica.
pub fn is_unreachable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(e.code(), None | Some("MASTERDOWN") | Some("LOADING"))
}

/// Whether the server refused a write because it is a replica (`READONLY`):
/// the Redis tier moved (a planned switchover or a failover made this
/// server a replica) and the command never ran.
pub fn is_read_only(e: &RedisError) -> bool {
    e.code() == Some("READONLY")
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_cluster() { "Conn::Cluster" } else { "Conn::Single" })
    }
}

impl Conn {
    /// Which connection calls go through now: a cluster connection's
    /// replacements count up (a single server's: always 0). A `WAIT`
    /// counts only the writes of the connection it is sent on, so a write
    /// and its `WAIT` must see the same generation.
    pub fn generation(&self) -> u64 {
        match self {
            Conn::Single(_) => 0,
            Conn::Cluster(c) => c.replaced(),
        }
    }

    /// True for a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Sends `cmd` to the master that owns `key`'s slot (a single server:
    /// to the server), on the connection that the key's own commands use.
    pub async fn on_key_master(&mut self, key: &str, cmd: Cmd) -> Result<Value, RedisError> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => {
                let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                c.bounded(async |mut c| c.route_command(cmd, routing).await).await
            }
        }
    }

    /// Sends `cmd` to the node at `host:port` of a cluster (a single
    /// server: to the server).
    pub async fn on_node(&mut self, host: &str, port: u16, cmd: Cmd) -> Result<Value, RedisError> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => {
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.to_string(), port });
                c.bounded(async |mut c| c.route_command(cmd, routing).await).await
            }
        }
    }

    /// Every node of a cluster, masters and replicas, that the cluster
    /// counts as connected (`CLUSTER NODES`), as `(host, port)`; a single
    /// server: empty.
    pub async fn nodes(&mut self) -> Result<Vec<(String, u16)>, RedisError> {
        if !self.is_cluster() {
            return Ok(Vec::new());
        }
        let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(self).await?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                let (addr, flags, link) = (f.get(1)?, f.get(2)?, f.get(7)?);
                let down = ["fail", "handshake", "noaddr"].iter().any(|d| flags.contains(d));
                if down || *link != "connected" {
                    return None;
                }
                let (host, port) = addr.split('@').next()?.rsplit_once(':')?;
                Some((host.to_string(), port.parse().ok()?))
            })
            .collect())
    }

    /// The masters of a cluster as `(host, port)`, from `CLUSTER SLOTS`
    /// (a single server: empty).
    pub async fn masters(&mut self) -> Result<Vec<(String, u16)>, RedisError> {
        if !self.is_cluster() {
            return Ok(Vec::new());
        }
        // CLUSTER SLOTS: [start, end, [ip, port, id], replicas...] per range.
        let ranges: Vec<Vec<Value>> = redis::cmd("CLUSTER").arg("SLOTS").query_async(self).await?;
        let mut masters: Vec<(String, u16)> = Vec::new();
        for range in ranges {
            let Some(Value::Array(node)) = range.get(2) else { continue };
            let host: String = node.first().map(redis::from_redis_value_ref).transpose()?.unwrap_or_default();
            let port: u16 = node.get(1).map(redis::from_redis_value_ref).transpose()?.unwrap_or_default();
            if !masters.iter().any(|(h, p)| *h == host && *p == port) {
                masters.push((host, port));
            }
        }
        Ok(masters)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => async move { c.bounded(async |mut c| c.req_packed_command(cmd).await).await }.boxed(),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => async move {
                if pipeline.is_transaction() {
                    return c.bounded(async |mut c| c.req_packed_commands(pipeline, offset, count).await).await;
                }
                let each = pipeline.cmd_iter().map(|cmd| c.bounded(async |mut c| c.req_packed_command(cmd).await));
                let values = futures::future::try_join_all(each).await?;
                Ok(values.into_iter().skip(offset).take(count).collect())
            }
            .boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.current().1.get_db(),
        }
    }
}

/// Group commit of `WAIT`: a write (already answered by its master) waits
/// until `acks` replicas of that master hold it. One `WAIT` is in flight
/// per lane (a stream shard: its users' keys share one slot, so one
/// master and one connection); writes that finish while it is in flight
/// are covered by the next one, so a busy lane sends one `WAIT` per
/// replica round trip instead of one per write.
///
/// `WAIT` counts the writes of the connection it is sent on, which is the
/// connection of the key's slot that the write itself went through.
pub struct Replication {
    acks: u32,
    timeout: Duration,
    lanes: Vec<Lane>,
}

struct Lane {
    /// Writes that finished, numbered.
    finished: AtomicU64,
    /// Every write numbered up to this is known to be on `acks` replicas.
    covered: AtomicU64,
    /// Held while a `WAIT` of the lane is in flight.
    sending: tokio::sync::Mutex<()>,
}

/// Why a write is not known to be on its replicas.
#[derive(Debug, thiserror::Error)]
pub enum NotReplicated {
    /// `WAIT` answered with fewer replicas than asked for.
    #[error("{got} of {want} replicas confirmed the write within {timeout:?}")]
    Missed {
        /// Replicas that confirmed.
        got: u32,
        /// Replicas asked for.
        want: u32,
        /// The wait.
        timeout: Duration,
    },
    /// `WAIT` failed.
    #[error("WAIT failed: {0}")]
    Failed(#[from] RedisError),
    /// The cluster connection was replaced between the write and its
    /// `WAIT`, which would count the new connection's writes only.
    #[error("the redis cluster connection was replaced between the write and its WAIT")]
    Replaced,
}

impl Replication {
    /// `acks` replicas per write within `timeout`, over `lanes` lanes.
    pub fn new(acks: u32, timeout: Duration, lanes: u32) -> Arc<Replication> {
        let lanes = (0..lanes.max(1))
            .map(|_| Lane {
                finished: AtomicU64::new(0),
                covered: AtomicU64::new(0),
                sending: tokio::sync::Mutex::new(()),
            })
            .collect();
        Arc::new(Replication { acks, timeout, lanes })
    }

    /// Replicas asked for per write (0: no wait).
    pub fn acks(&self) -> u32 {
        self.acks
    }

    /// Waits until the write that just finished on `key`'s master (in lane
    /// `lane`) is on the replicas. Returns how many `WAIT`s this call sent
    /// (0 when another call's covered it).
    ///
    /// `written` is [`Conn::generation`] from before the write: a
    /// connection replaced since then may not have carried it to its
    /// master's replication stream the way a `WAIT` on the new one counts
    /// (NotReplicated::Replaced).
    pub async fn replicated(&self, con: &mut Conn, lane: u32, key: &str, written: u64) -> Result<u32, NotReplicated> {
        if self.acks == 0 {
            return Ok(0);
        }
        let lane = &self.lanes[lane as usize % self.lanes.len()];
        let mine = lane.finished.fetch_add(1, Ordering::AcqRel) + 1;
        let _sending = lane.sending.lock().await;
        // Under the lane's lock no WAIT is out: one that covered this write
        // was sent on the generation seen here.
        if con.generation() != written {
            return Err(NotReplicated::Replaced);
        }
        if lane.covered.load(Ordering::Acquire) >= mine {
            return Ok(0);
        }
        // Every write numbered up to here has finished on the master, so a
        // WAIT sent now on the same connection covers it.
        let upto = lane.finished.load(Ordering::Acquire);
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.acks).arg(self.timeout.as_millis() as u64);
        // The lane is held while the WAIT is out; the call is bounded as
        // every call on the connection is (a stuck cluster connection is
        // replaced, see [`Cluster`]).
        let reply = con.on_key_master(key, wait).await?;
        let got: u32 = redis::from_redis_value(reply).map_err(RedisError::from)?;
        if con.generation() != written {
            return Err(NotReplicated::Replaced);
        }
        if got < self.acks {
            return Err(NotReplicated::Missed { got, want: self.acks, timeout: self.timeout });
        }
        lane.covered.fetch_max(upto, Ordering::AcqRel);
        Ok(1)
    }
}
