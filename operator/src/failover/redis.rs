//! What the failover controller does to the datacenters' Redis servers when
//! the Redis tier moves with the route (`failover.redis_tier`): dc-b's
//! Redis is a replica of dc-a's, a like is acknowledged once that replica
//! holds it (the tenants' `replica_acks`), and a flip promotes the standby's
//! Redis and makes the old one a replica of it.
//!
//! Every call opens its own admin connection under a deadline, as the DB
//! actions do: a dead server never holds the controller up. The commands
//! are the engine's own (`REPLICAOF`, `CLIENT PAUSE`, `INFO replication`).

use std::time::{Duration, Instant};

use redis::{Cmd, Value};
use thumbup_core::cache::{self, Conn};

use super::cluster::{ClusterProbe, ClusterSide};

/// A Redis action that failed; the text says which server and step.
#[derive(Debug, thiserror::Error)]
pub enum RedisActionError {
    /// The deadline passed.
    #[error("{dc} Redis: {step} timed out after {after:?}")]
    Timeout {
        /// Datacenter.
        dc: String,
        /// What was being done.
        step: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// No node of a datacenter's part of the cluster answered.
    #[error("{dc} Redis: none of its cluster nodes answers (first: {first})")]
    Down {
        /// Datacenter.
        dc: String,
        /// The first node's failure.
        first: String,
    },
    /// The server refused or failed.
    #[error("{dc} Redis: {step}: {source}")]
    Redis {
        /// Datacenter.
        dc: String,
        /// What was being done.
        step: &'static str,
        /// The client's error.
        source: redis::RedisError,
    },
}

/// One datacenter's Redis, as the controller reaches it.
#[derive(Debug, Clone)]
pub struct RedisServer {
    /// Datacenter name.
    pub dc: String,
    /// `redis://admin:password@host:port` (the operator's own address).
    pub admin_url: String,
    /// `host:port` as the other datacenter's Redis and the proxies reach it.
    pub address: String,
    /// The admin user and password, which a replica of this server
    /// authenticates with (`masteruser` / `masterauth`).
    pub auth: (String, String),
}

/// What a probe saw: `INFO replication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisProbe {
    /// `role:master`.
    pub master: bool,
    /// A replica's `master_link_status:up`.
    pub link_up: bool,
    /// `master_repl_offset` (a master: what it has written; a replica: what
    /// it has received).
    pub offset: i64,
    /// A replica's `master_host:master_port`.
    pub master_address: Option<String>,
}

impl RedisProbe {
    /// Parses `INFO replication`.
    pub fn parse(info: &str) -> RedisProbe {
        let field =
            |k: &str| info.lines().find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix(':'))).map(str::trim);
        let master_address = match (field("master_host"), field("master_port")) {
            (Some(h), Some(p)) => Some(format!("{h}:{p}")),
            _ => None,
        };
        RedisProbe {
            master: field("role") == Some("master"),
            link_up: field("master_link_status") == Some("up"),
            offset: field("master_repl_offset").and_then(|v| v.parse().ok()).unwrap_or(0),
            master_address,
        }
    }

    /// Whether this server is a replica of `active` whose link is up.
    pub fn linked_to(&self, active: &str) -> bool {
        !self.master && self.link_up && self.master_address.as_deref() == Some(active)
    }

    /// `Ok` when this server can take over from the active one, else why not.
    pub fn standby_health(&self, active: &str) -> Result<(), String> {
        if self.master {
            return Err("its Redis is a master, not a replica of the active datacenter's".into());
        }
        if self.master_address.as_deref() != Some(active) {
            return Err(format!(
                "its Redis replicates from {}, not from the active datacenter's {active}",
                self.master_address.as_deref().unwrap_or("nowhere")
            ));
        }
        Ok(())
    }
}

impl RedisServer {
    /// This node as the way into its whole cluster (its admin URL with
    /// [`cache::ADMIN_CLUSTER_PARAM`]).
    pub fn as_cluster_entry(&self) -> RedisServer {
        let sep = if self.admin_url.contains('?') { '&' } else { '?' };
        RedisServer { admin_url: format!("{}{sep}{}=true", self.admin_url, cache::ADMIN_CLUSTER_PARAM), ..self.clone() }
    }

    async fn within<T>(
        &self,
        step: &'static str,
        after: Duration,
        f: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, RedisActionError> {
        match tokio::time::timeout(after, f).await {
            Ok(r) => r.map_err(|source| RedisActionError::Redis { dc: self.dc.clone(), step, source }),
            Err(_) => Err(RedisActionError::Timeout { dc: self.dc.clone(), step, after }),
        }
    }

    pub(super) async fn run(
        &self,
        step: &'static str,
        after: Duration,
        cmds: Vec<Cmd>,
    ) -> Result<Vec<Value>, RedisActionError> {
        self.within(step, after, async {
            let mut con: Conn = cache::admin_connect(&self.admin_url, after).await?;
            let mut out = Vec::new();
            for c in cmds {
                out.push(c.query_async::<Value>(&mut con).await?);
            }
            Ok(out)
        })
        .await
    }

    /// `INFO replication` within `timeout`.
    pub async fn probe(&self, timeout: Duration) -> Result<RedisProbe, RedisActionError> {
        let mut info = redis::cmd("INFO");
        info.arg("replication");
        let out = self.run("probe", timeout, vec![info]).await?;
        let text: String = redis::from_redis_value(out.into_iter().next().unwrap_or(Value::Nil))
            .map_err(|e| RedisActionError::Redis { dc: self.dc.clone(), step: "probe", source: e.into() })?;
        Ok(RedisProbe::parse(&text))
    }

    /// Makes this Redis a master (`REPLICAOF NO ONE`): it keeps its data
    /// and takes writes. Idempotent.
    pub async fn promote(&self, timeout: Duration) -> Result<(), RedisActionError> {
        let mut c = redis::cmd("REPLICAOF");
        c.arg("NO").arg("ONE");
        self.run("promote", timeout, vec![c]).await.map(drop)
    }

    /// Makes this Redis a replica of `master` (its writes are refused from
    /// now on, and it resynchronises from `master`, dropping what it holds
    /// that `master` does not: nothing acknowledged, since a like is
    /// acknowledged only once the replica has it). Idempotent.
    pub async fn follow(&self, master: &RedisServer, timeout: Duration) -> Result<(), RedisActionError> {
        let (host, port) = master.address.rsplit_once(':').unwrap_or((master.address.as_str(), "6379"));
        let mut auth = redis::cmd("CONFIG");
        auth.arg("SET").arg("masteruser").arg(&master.auth.0).arg("masterauth").arg(&master.auth.1);
        let mut replicaof = redis::cmd("REPLICAOF");
        replicaof.arg(host).arg(port);
        // A paused server (an interrupted switchover) takes writes again
        // only as a replica, which refuses them.
        let unpause = redis::cmd("CLIENT").arg("UNPAUSE").clone();
        self.run("follow", timeout, vec![auth, replicaof, unpause]).await.map(drop)
    }

    /// Pauses the clients' writes for `pause` (`CLIENT PAUSE ... WRITE`);
    /// returns the replication offset reached, which no client write passes
    /// while the pause lasts.
    pub async fn pause_writes(&self, pause: Duration, timeout: Duration) -> Result<i64, RedisActionError> {
        let mut p = redis::cmd("CLIENT");
        p.arg("PAUSE").arg(pause.as_millis() as u64).arg("WRITE");
        let mut info = redis::cmd("INFO");
        info.arg("replication");
        let out = self.run("pause writes", timeout, vec![p, info]).await?;
        let text: String = redis::from_redis_value(out.into_iter().nth(1).unwrap_or(Value::Nil))
            .map_err(|e| RedisActionError::Redis { dc: self.dc.clone(), step: "pause writes", source: e.into() })?;
        Ok(RedisProbe::parse(&text).offset)
    }

    /// Ends a pause (`CLIENT UNPAUSE`).
    pub async fn unpause(&self, timeout: Duration) -> Result<(), RedisActionError> {
        let mut c = redis::cmd("CLIENT");
        c.arg("UNPAUSE");
        self.run("unpause", timeout, vec![c]).await.map(drop)
    }

    /// Sets (`Some(epoch)`) or deletes (`None`) every tenant's solo flag
    /// ([`thumbup_core::cache::Solo`]) on this Redis.
    pub async fn set_solo(
        &self,
        tenants: &[String],
        epoch: Option<u64>,
        timeout: Duration,
    ) -> Result<(), RedisActionError> {
        let cmds = tenants
            .iter()
            .map(|t| {
                let key = thumbup_core::keys::Keys::new(t, 1).solo();
                match epoch {
                    Some(e) => redis::cmd("SET").arg(key).arg(e).clone(),
                    None => redis::cmd("DEL").arg(key).clone(),
                }
            })
            .collect();
        self.run("solo flag", timeout, cmds).await.map(drop)
    }

    /// Waits until this replica has received everything up to `offset`.
    pub async fn wait_offset(&self, offset: i64, within: Duration) -> Result<(), RedisActionError> {
        let started = Instant::now();
        loop {
            let left = within.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(RedisActionError::Timeout { dc: self.dc.clone(), step: "catch up", after: within });
            }
            let p = self.probe(left.min(Duration::from_secs(2))).await?;
            if p.link_up && p.offset >= offset {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One datacenter's Redis tier: one server, or its nodes of a cluster
/// spanning the datacenters.
#[derive(Debug, Clone)]
pub enum Tier {
    /// One server (`REPLICAOF` moves it).
    Server(RedisServer),
    /// Nodes of the one cluster (`CLUSTER FAILOVER` moves them).
    Cluster(ClusterSide),
}

/// What a probe of a datacenter's Redis tier saw. A cluster datacenter
/// fails its probe only when none of its nodes answers.
#[derive(Debug)]
pub enum TierProbe {
    /// `INFO replication` of the server.
    Server(RedisProbe),
    /// Each node.
    Cluster(ClusterProbe),
}

impl Tier {
    /// The datacenter.
    pub fn dc(&self) -> &str {
        match self {
            Tier::Server(s) => &s.dc,
            Tier::Cluster(c) => &c.dc,
        }
    }

    /// Probes the server, or every node at once.
    pub async fn probe(&self, timeout: Duration) -> Result<TierProbe, RedisActionError> {
        match self {
            Tier::Server(s) => s.probe(timeout).await.map(TierProbe::Server),
            Tier::Cluster(c) => {
                let p = c.probe(timeout).await;
                match p.down() {
                    Some(e) => Err(RedisActionError::Down { dc: c.dc.clone(), first: e.to_string() }),
                    None => Ok(TierProbe::Cluster(p)),
                }
            }
        }
    }

    /// Sets (`Some(epoch)`) or deletes (`None`) every tenant's solo flag.
    pub async fn set_solo(
        &self,
        tenants: &[String],
        epoch: Option<u64>,
        timeout: Duration,
    ) -> Result<(), RedisActionError> {
        match self {
            Tier::Server(s) => s.set_solo(tenants, epoch, timeout).await,
            Tier::Cluster(c) => c.set_solo(tenants, epoch, timeout).await,
        }
    }

    /// Makes this datacenter's Redis take writes, at once: `REPLICAOF NO
    /// ONE`, or every slot to its nodes (coordinated where the old master
    /// answers, a takeover where it does not). Idempotent.
    pub async fn promote(&self, timeout: Duration) -> Result<(), RedisActionError> {
        match self {
            Tier::Server(s) => s.promote(timeout).await,
            Tier::Cluster(c) => c.take_slots(false, ACTION_WAIT.max(timeout), timeout).await,
        }
    }
}

impl Tier {
    /// Makes this (the old active datacenter's) Redis a replica of
    /// `master`'s. A cluster's old masters need nothing: when they answer
    /// again they learn that their slots moved and follow the new owners.
    pub async fn follow(&self, master: &Tier, timeout: Duration) -> Result<(), RedisActionError> {
        match (self, master) {
            (Tier::Server(s), Tier::Server(m)) => s.follow(m, timeout).await,
            _ => Ok(()),
        }
    }

    /// A planned switchover's move of the Redis tier from `old` to this
    /// datacenter, losing nothing: one server pauses its clients' writes
    /// (for `pause`), this one receives everything up to there and is
    /// promoted; a cluster's nodes here each run a coordinated `CLUSTER
    /// FAILOVER` (the engine's own pause and catch-up), within `catch_up`.
    pub async fn switch_from(
        &self,
        old: &Tier,
        pause: Duration,
        catch_up: Duration,
        timeout: Duration,
    ) -> Result<(), RedisActionError> {
        match (self, old) {
            (Tier::Server(new), Tier::Server(old)) => {
                let offset = old.pause_writes(pause, timeout).await?;
                new.wait_offset(offset, catch_up).await?;
                new.promote(timeout).await
            }
            (Tier::Cluster(new), _) => new.take_slots(true, catch_up, timeout).await,
            (Tier::Server(new), Tier::Cluster(_)) => Err(RedisActionError::Redis {
                dc: new.dc.clone(),
                step: "switch over",
                source: redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "one datacenter is a cluster, the other not",
                )),
            }),
        }
    }

    /// Undoes an interrupted [`Tier::switch_from`]: `old` takes writes
    /// again and this datacenter's Redis replicates it.
    pub async fn undo_switch(&self, old: &Tier, catch_up: Duration, timeout: Duration) -> Vec<RedisActionError> {
        let mut failed = Vec::new();
        match (self, old) {
            (Tier::Server(new), Tier::Server(old)) => {
                // The target may have been promoted: it follows the active
                // Redis again, which takes writes again.
                failed.extend(new.follow(old, timeout).await.err());
                failed.extend(old.unpause(timeout).await.err());
            }
            (_, Tier::Cluster(old)) => failed.extend(old.take_slots(true, catch_up, timeout).await.err()),
            _ => {}
        }
        failed
    }
}

/// How long a cluster's takeover may take before the promotion is retried.
const ACTION_WAIT: Duration = Duration::from_secs(10);

impl TierProbe {
    /// `Ok` when this datacenter's Redis can take over from the active one
    /// (at `active_address` for one server), else why not.
    pub fn standby_health(&self, active_address: &str) -> Result<(), String> {
        match self {
            TierProbe::Server(p) => p.standby_health(active_address),
            TierProbe::Cluster(p) => p.standby_health(),
        }
    }

    /// Whether this standby's Redis holds every like the active one
    /// (`active`, at `active_address`) takes before it is acknowledged:
    /// its replica link(s) up.
    pub fn links(&self, active: &TierProbe, active_address: &str) -> bool {
        match (self, active) {
            (TierProbe::Server(p), _) => p.linked_to(active_address),
            (TierProbe::Cluster(p), TierProbe::Cluster(a)) => p.links(a),
            (TierProbe::Cluster(_), TierProbe::Server(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_replication_of_a_master_and_of_a_replica() {
        let m = RedisProbe::parse("# Replication\r\nrole:master\r\nconnected_slaves:1\r\nmaster_repl_offset:1234\r\n");
        assert_eq!((m.master, m.link_up, m.offset, m.master_address.as_deref()), (true, false, 1234, None));
        assert!(m.standby_health("a:1").unwrap_err().contains("is a master"));
        let r = RedisProbe::parse(
            "role:slave\r\nmaster_host:10.0.0.1\r\nmaster_port:6379\r\nmaster_link_status:up\r\nmaster_repl_offset:99\r\n",
        );
        assert_eq!((r.master, r.link_up, r.offset), (false, true, 99));
        assert_eq!(r.standby_health("10.0.0.1:6379"), Ok(()));
        assert!(r.standby_health("10.0.0.2:6379").unwrap_err().contains("replicates from 10.0.0.1:6379"));
    }
}
