//! The Redis tier as one Redis Cluster spanning the datacenters
//! (`failover.redis_tier` with every datacenter's `redis.cluster`): each
//! datacenter lists its own nodes of the one cluster (`redis.url` and
//! `redis.seeds`); the active datacenter's nodes are the masters and each
//! has a replica among the standby's nodes. A like is acknowledged once its
//! master's replica holds it (the tenants' `replica_acks`, `WAIT` on the
//! master), so the standby's nodes hold every acknowledged like.
//!
//! The engine's own commands move the masters: `CLUSTER FAILOVER` (the
//! master pauses its clients until the replica has everything, then hands
//! its slots over: nothing is lost) when a replica's link to its master is
//! up, `CLUSTER FAILOVER TAKEOVER` when it is not (the master is gone; no
//! vote of the other masters is needed, which a datacenter holding half of
//! them could not win). An old master that answers again learns the newer
//! configuration epoch of its slots and becomes a replica of the node that
//! took them; the cluster fences it by itself.
//!
//! Node identities come from `CLUSTER NODES` (ids, not addresses: a node's
//! gossip address need not be the one the config names).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use redis::Value;

use super::redis::{RedisActionError, RedisProbe, RedisServer};

/// How long the engine lets a coordinated `CLUSTER FAILOVER` run before it
/// gives up (and a little more).
const MANUAL_FAILOVER_TIMEOUT: Duration = Duration::from_secs(6);

/// One datacenter's nodes of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSide {
    /// Datacenter name.
    pub dc: String,
    /// Its nodes, each reached on its own (`redis://admin:pw@host:port`).
    pub nodes: Vec<RedisServer>,
    /// The whole cluster through each of this datacenter's nodes (its
    /// admin URL with `cluster=true`), tried in turn: the solo flags are
    /// written through the cluster client, each to its slot's master, and
    /// any node that answers leads the client to the others.
    pub cluster: Vec<RedisServer>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLine {
    /// Node id.
    pub id: String,
    /// The node says this line is itself.
    pub myself: bool,
    /// A master.
    pub master: bool,
    /// A replica's master id.
    pub master_id: Option<String>,
    /// Holds at least one slot.
    pub slots: bool,
}

impl NodeLine {
    /// Parses `CLUSTER NODES`.
    pub fn parse_all(text: &str) -> Vec<NodeLine> {
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 8 {
                    return None;
                }
                let flags: Vec<&str> = f[2].split(',').collect();
                Some(NodeLine {
                    id: f[0].to_string(),
                    myself: flags.contains(&"myself"),
                    master: flags.contains(&"master"),
                    master_id: (f[3] != "-").then(|| f[3].to_string()),
                    // Slot fields come after the link state; importing or
                    // migrating markers ("[...]") are not owned slots.
                    slots: f[8..].iter().any(|s| !s.starts_with('[')),
                })
            })
            .collect()
    }
}

/// What one node answered: its own line of `CLUSTER NODES`, the whole view,
/// and `INFO replication`.
#[derive(Debug, Clone)]
pub struct NodeProbe {
    /// This node's line.
    pub me: NodeLine,
    /// Every node as this one sees the cluster.
    pub view: Vec<NodeLine>,
    /// `INFO replication`.
    pub replication: RedisProbe,
}

/// A probe of one datacenter's nodes: each configured address with what it
/// answered.
#[derive(Debug)]
pub struct ClusterProbe {
    /// Per configured node.
    pub nodes: Vec<(String, Result<NodeProbe, RedisActionError>)>,
}

impl ClusterProbe {
    fn answered(&self) -> impl Iterator<Item = &NodeProbe> {
        self.nodes.iter().filter_map(|(_, r)| r.as_ref().ok())
    }

    /// The ids of this datacenter's nodes that answered.
    pub fn ids(&self) -> BTreeSet<&str> {
        self.answered().map(|n| n.me.id.as_str()).collect()
    }

    /// The first failure when no node answered (the datacenter's Redis
    /// tier is down), else None.
    pub fn down(&self) -> Option<&RedisActionError> {
        if self.answered().next().is_some() {
            return None;
        }
        self.nodes.iter().find_map(|(_, r)| r.as_ref().err())
    }

    /// The masters that hold slots, as the first node that answered sees
    /// the cluster.
    fn slot_masters(&self) -> Vec<&str> {
        self.answered()
            .next()
            .map(|n| n.view.iter().filter(|l| l.master && l.slots).map(|l| l.id.as_str()).collect())
            .unwrap_or_default()
    }

    /// Whether every slot is served by a master of this datacenter, as
    /// every node of it that answered sees the cluster (a client that asks
    /// any of them for the slot map then finds only live masters).
    pub fn serves_every_slot(&self) -> bool {
        let mine = self.ids();
        self.answered().all(|n| {
            let mut masters = n.view.iter().filter(|l| l.master && l.slots).peekable();
            masters.peek().is_some() && masters.all(|l| mine.contains(l.id.as_str()))
        }) && self.answered().next().is_some()
    }

    /// `Ok` when this datacenter can take over every slot: each of its
    /// nodes answers, and every master that holds slots is one of its
    /// nodes or has one of them as a replica. Read from this datacenter's
    /// own view, so that it holds with the active datacenter gone.
    pub fn standby_health(&self) -> Result<(), String> {
        if let Some((addr, Err(e))) = self.nodes.iter().find(|(_, r)| r.is_err()) {
            return Err(format!("its Redis node {addr} does not answer: {e}"));
        }
        let mine = self.ids();
        let replicated: BTreeSet<&str> = self.answered().filter_map(|n| n.me.master_id.as_deref()).collect();
        let masters = self.slot_masters();
        if masters.is_empty() {
            return Err("its Redis nodes see no master holding slots".into());
        }
        let orphans: Vec<&str> = masters.into_iter().filter(|m| !mine.contains(m) && !replicated.contains(m)).collect();
        if orphans.is_empty() {
            Ok(())
        } else {
            Err(format!("no Redis node of it replicates the master(s) {}", orphans.join(", ")))
        }
    }

    /// Whether every like can be waited for: every master of `active` that
    /// holds slots has a replica in this datacenter whose link is up, and
    /// every other master holding slots (one of this datacenter's nodes
    /// that the cluster's own failover promoted when its master in `active`
    /// failed alone) has a linked replica anywhere. Otherwise the likes of
    /// some slots wait for a replica in vain.
    pub fn links(&self, active: &ClusterProbe) -> bool {
        let active_ids = active.ids();
        let linked = |p: &ClusterProbe| -> BTreeSet<String> {
            p.answered().filter(|n| n.replication.link_up).filter_map(|n| n.me.master_id.clone()).collect()
        };
        let here = linked(self);
        let anywhere: BTreeSet<String> = here.union(&linked(active)).cloned().collect();
        let masters = active.slot_masters();
        !masters.is_empty()
            && masters.iter().all(|m| if active_ids.contains(m) { here.contains(*m) } else { anywhere.contains(*m) })
    }

    /// This datacenter's nodes that are masters holding slots (a standby's
    /// node that took over by the cluster's own failover).
    pub fn masters_here(&self) -> Vec<&str> {
        self.answered().filter(|n| n.me.master && n.me.slots).map(|n| n.me.id.as_str()).collect()
    }
}

impl ClusterSide {
    /// Sets (`Some(epoch)`) or deletes (`None`) every tenant's solo flag
    /// through the cluster client, entering it by the first of this
    /// datacenter's nodes that answers.
    pub async fn set_solo(
        &self,
        tenants: &[String],
        epoch: Option<u64>,
        timeout: Duration,
    ) -> Result<(), RedisActionError> {
        let mut last = None;
        for entry in &self.cluster {
            match entry.set_solo(tenants, epoch, timeout).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(RedisActionError::Down { dc: self.dc.clone(), first: "no node configured".into() }))
    }

    /// Probes every node (`CLUSTER NODES`, `INFO replication`) at once.
    pub async fn probe(&self, timeout: Duration) -> ClusterProbe {
        let nodes = futures::future::join_all(self.nodes.iter().map(|n| async move {
            let mut info = redis::cmd("INFO");
            info.arg("replication");
            let mut nodes = redis::cmd("CLUSTER");
            nodes.arg("NODES");
            let r = n.run("probe", timeout, vec![nodes, info]).await.and_then(|out| {
                let mut out = out.into_iter();
                let text = |v: Option<Value>| -> Result<String, RedisActionError> {
                    redis::from_redis_value(v.unwrap_or(Value::Nil)).map_err(|e| RedisActionError::Redis {
                        dc: n.dc.clone(),
                        step: "probe",
                        source: e.into(),
                    })
                };
                let view = NodeLine::parse_all(&text(out.next())?);
                let replication = RedisProbe::parse(&text(out.next())?);
                let me = view.iter().find(|l| l.myself).cloned().ok_or_else(|| RedisActionError::Redis {
                    dc: n.dc.clone(),
                    step: "probe",
                    source: redis::RedisError::from((redis::ErrorKind::Client, "CLUSTER NODES has no myself line")),
                })?;
                Ok(NodeProbe { me, view, replication })
            });
            (n.address.clone(), r)
        }))
        .await;
        ClusterProbe { nodes }
    }

    /// Makes this datacenter's nodes the masters of every slot: each
    /// replica runs `CLUSTER FAILOVER` when its link to its master is up
    /// (coordinated: nothing is lost), else `CLUSTER FAILOVER TAKEOVER`
    /// unless `coordinated_only`. Waits until this datacenter serves every
    /// slot, within `within`.
    pub async fn take_slots(
        &self,
        coordinated_only: bool,
        within: Duration,
        timeout: Duration,
    ) -> Result<(), RedisActionError> {
        let started = Instant::now();
        let mut asked: std::collections::BTreeMap<String, Instant> = Default::default();
        loop {
            let probe = self.probe(timeout).await;
            if probe.serves_every_slot() {
                return Ok(());
            }
            for (node, (_, p)) in self.nodes.iter().zip(&probe.nodes) {
                let Ok(p) = p else { continue };
                if p.me.master {
                    continue;
                }
                let link_up = p.replication.link_up;
                if !link_up && coordinated_only {
                    return Err(RedisActionError::Redis {
                        dc: self.dc.clone(),
                        step: "cluster failover",
                        source: redis::RedisError::from((
                            redis::ErrorKind::Client,
                            "a replica's link to its master is down",
                            node.address.clone(),
                        )),
                    });
                }
                // A coordinated failover runs for up to the engine's own
                // timeout (5 s); asked again only after that.
                if link_up && asked.get(&node.address).is_some_and(|at| at.elapsed() < MANUAL_FAILOVER_TIMEOUT) {
                    continue;
                }
                asked.insert(node.address.clone(), Instant::now());
                let mut c = redis::cmd("CLUSTER");
                c.arg("FAILOVER");
                if !link_up {
                    c.arg("TAKEOVER");
                }
                node.run("cluster failover", timeout, vec![c]).await?;
            }
            if started.elapsed() >= within {
                return Err(RedisActionError::Timeout { dc: self.dc.clone(), step: "take the slots", after: within });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Hands the slots that `standby`'s nodes serve back to `active`'s nodes
/// that replicate them (coordinated `CLUSTER FAILOVER` on each, nothing
/// lost): after a master of the active datacenter failed alone, the
/// cluster's own failover promoted its replica in the other datacenter, and
/// once the old master answers again (as that node's replica) the active
/// datacenter serves its slots again. A node asked within the engine's
/// timeout of a coordinated failover (`asked`) is not asked again: asking
/// restarts the handshake.
pub async fn hand_back(
    active: &ClusterSide,
    active_probe: &ClusterProbe,
    standby_probe: &ClusterProbe,
    asked: &mut std::collections::BTreeMap<String, Instant>,
    timeout: Duration,
) -> Vec<Result<String, RedisActionError>> {
    let masters: BTreeSet<&str> = standby_probe.masters_here().into_iter().collect();
    let mut out = Vec::new();
    asked.retain(|_, at| at.elapsed() < MANUAL_FAILOVER_TIMEOUT);
    for (node, (_, p)) in active.nodes.iter().zip(&active_probe.nodes) {
        let Ok(p) = p else { continue };
        if !p.me.master
            && p.replication.link_up
            && p.me.master_id.as_deref().is_some_and(|m| masters.contains(m))
            && !asked.contains_key(&node.address)
        {
            asked.insert(node.address.clone(), Instant::now());
            let mut c = redis::cmd("CLUSTER");
            c.arg("FAILOVER");
            out.push(node.run("cluster failover", timeout, vec![c]).await.map(|_| node.address.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922 [100->-b1]
b1 127.0.0.1:7004@17004 slave a1 0 0 1 connected
b2 127.0.0.1:7005@17005 slave,fail a2 0 0 2 disconnected
x 127.0.0.1:7009@17009 master - 0 0 0 connected
";

    fn node(view: &str, me: &str, link_up: bool) -> (String, Result<NodeProbe, RedisActionError>) {
        let view: Vec<NodeLine> = NodeLine::parse_all(view)
            .into_iter()
            .map(|mut l| {
                l.myself = l.id == me;
                l
            })
            .collect();
        let me = view.iter().find(|l| l.myself).unwrap().clone();
        let info = if me.master {
            "role:master\r\n".to_string()
        } else {
            format!(
                "role:slave\r\nmaster_host:h\r\nmaster_port:1\r\nmaster_link_status:{}\r\n",
                if link_up { "up" } else { "down" }
            )
        };
        (me.id.clone(), Ok(NodeProbe { me, view, replication: RedisProbe::parse(&info) }))
    }

    #[test]
    fn cluster_nodes_lines_give_roles_masters_and_owned_slots() {
        let lines = NodeLine::parse_all(NODES);
        let got: Vec<(&str, bool, bool, Option<&str>, bool)> =
            lines.iter().map(|l| (l.id.as_str(), l.myself, l.master, l.master_id.as_deref(), l.slots)).collect();
        assert_eq!(
            got,
            vec![
                ("a1", true, true, None, true),
                ("a2", false, true, None, true),
                ("b1", false, false, Some("a1"), false),
                ("b2", false, false, Some("a2"), false),
                ("x", false, true, None, false),
            ]
        );
    }

    #[test]
    fn a_standby_is_healthy_when_it_replicates_every_master_and_linked_when_every_link_is_up() {
        let active = ClusterProbe { nodes: vec![node(NODES, "a1", true), node(NODES, "a2", true)] };
        let standby = ClusterProbe { nodes: vec![node(NODES, "b1", true), node(NODES, "b2", true)] };
        assert_eq!(standby.standby_health(), Ok(()));
        assert!(standby.links(&active));
        assert!(active.serves_every_slot() && !standby.serves_every_slot());
        // One link down: healthy (it can take over) but not linked (a like
        // on a2 would wait in vain).
        let half = ClusterProbe { nodes: vec![node(NODES, "b1", true), node(NODES, "b2", false)] };
        assert_eq!(half.standby_health(), Ok(()));
        assert!(!half.links(&active));
        // The cluster's own failover moved a2's slots to b2 (a2 failed
        // alone): b2 has no replica until a2 is back as its replica.
        const MOVED: &str = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:7002@17002 master,fail - 0 0 2 disconnected
b1 127.0.0.1:7004@17004 slave a1 0 0 1 connected
b2 127.0.0.1:7005@17005 master - 0 0 3 connected 5461-10922
";
        let a_moved = ClusterProbe { nodes: vec![node(MOVED, "a1", true)] };
        let b_moved = ClusterProbe { nodes: vec![node(MOVED, "b1", true), node(MOVED, "b2", true)] };
        assert!(!b_moved.links(&a_moved), "b2's likes would wait for a replica it does not have");
        assert_eq!(b_moved.masters_here(), ["b2"]);
        let back = MOVED.replace(
            "a2 127.0.0.1:7002@17002 master,fail - 0 0 2 disconnected",
            "a2 127.0.0.1:7002@17002 slave b2 0 0 3 connected",
        );
        let a_back = ClusterProbe { nodes: vec![node(&back, "a1", true), node(&back, "a2", true)] };
        let b_back = ClusterProbe { nodes: vec![node(&back, "b1", true), node(&back, "b2", true)] };
        assert!(b_back.links(&a_back), "a2 is back as b2's replica");
        // A master with no replica here: not a standby.
        let one = ClusterProbe { nodes: vec![node(NODES, "b1", true)] };
        assert!(one.standby_health().unwrap_err().contains("replicates the master(s) a2"));
        // A node that does not answer.
        let mut dead = ClusterProbe { nodes: vec![node(NODES, "b1", true)] };
        dead.nodes.push((
            "127.0.0.1:7005".into(),
            Err(RedisActionError::Timeout { dc: "dc-b".into(), step: "probe", after: Duration::from_secs(1) }),
        ));
        assert!(dead.standby_health().unwrap_err().contains("7005 does not answer"));
        assert!(dead.down().is_none());
        let gone = ClusterProbe { nodes: vec![dead.nodes.pop().unwrap()] };
        assert!(gone.down().is_some());
    }
}
