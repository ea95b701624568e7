//! Redis client side: connecting with a tenant's ACL user, calling the
//! project's Redis functions ([`crate::functions`]: the atomic transition,
//! versioned cache writes, the applied watermark), and reading entries back.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::{FromRedisValue, IntoConnectionInfo, RedisError};

use crate::conn::Cluster;
pub use crate::conn::{Conn, is_read_only, is_unreachable};

use crate::config::{RedisConfig, RedisTls, TenantConfig};
use crate::domain::{Action, State};
use crate::functions::{self, Function};
use crate::keys::Keys;

fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

/// The connection info of `url` with the tenant's ACL user.
fn with_user(url: &str, cfg: &RedisConfig) -> Result<redis::ConnectionInfo, RedisError> {
    let info = url.into_connection_info()?;
    let settings = info.redis_settings().clone().set_username(&cfg.username).set_password(&cfg.password);
    Ok(info.set_redis_settings(settings))
}

/// The CA of `tls`: the content read with the config, else the file (a
/// config built in code).
fn ca_of(tls: &RedisTls) -> Result<Option<Vec<u8>>, RedisError> {
    Ok(match (&tls.ca_pem, &tls.ca_file) {
        (Some(pem), _) => Some(pem.clone()),
        (None, Some(file)) => Some(std::fs::read(file).map_err(|e| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "reading redis.tls.ca_file",
                format!("{file}: {e}"),
            ))
        })?),
        (None, None) => None,
    })
}

/// The cluster client of `cfg` (`url` and `seeds` as seed nodes).
fn cluster_client(cfg: &RedisConfig, response_timeout: Duration) -> Result<ClusterClient, RedisError> {
    let nodes =
        std::iter::once(&cfg.url).chain(&cfg.seeds).map(|u| with_user(u, cfg)).collect::<Result<Vec<_>, _>>()?;
    let mut b = ClusterClientBuilder::new(nodes)
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(response_timeout)
        // A MOVED, ASK or TRYAGAIN is retried at once; a node that fails
        // is retried while the cluster promotes its replica, within the
        // caller's overall timeout. The transition carries a deadline, so
        // a retry that comes late does nothing.
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(20)
        .max_retry_wait(200);
    if let Some(tls) = &cfg.tls {
        b = b.certs(redis::TlsCertificates { client_tls: None, root_cert: ca_of(tls)? });
    }
    b.build()
}

/// A client of the server at `info`: over TLS checked against `tls`'s CA
/// when given (the URL must be `rediss://`), else as the URL says
/// (`rediss://` trusts the system's roots).
pub fn client(info: impl IntoConnectionInfo, tls: Option<&RedisTls>) -> Result<redis::Client, RedisError> {
    let Some(tls) = tls else { return redis::Client::open(info) };
    redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: ca_of(tls)? })
}

/// The URL parameter of an admin Redis URL that names the CA file of a
/// `rediss://` server: `rediss://user:pw@host:6380/?ssl-ca=/etc/ca.crt` (as
/// sqlx's `ssl-ca` for the DB). The Redis client has no such parameter: it
/// is taken out of the URL here.
pub const ADMIN_CA_PARAM: &str = "ssl-ca";

/// The URL parameter of an admin Redis URL that says the server is a node
/// of a Redis Cluster (`cluster=true`): the admin connection is then a
/// cluster connection, and provisioning reaches every node.
pub const ADMIN_CLUSTER_PARAM: &str = "cluster";

/// An admin URL taken apart: the URL the client understands, the CA file
/// and whether it names a cluster node.
fn admin_parts(url: &str) -> (String, Option<String>, bool) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_string(), None, false) };
    let (mut ca, mut cluster, mut rest) = (None, false, Vec::new());
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some((k, v)) if k == ADMIN_CA_PARAM => ca = Some(v.to_string()),
            Some((k, v)) if k == ADMIN_CLUSTER_PARAM => cluster = v == "true",
            _ => rest.push(kv),
        }
    }
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    (url, ca, cluster)
}

/// A client for an admin URL, which is a single string (a flag, the
/// operator's config): its [`ADMIN_CA_PARAM`] parameter, when present, is
/// the CA file that the server's certificate must chain to.
pub fn admin_client(url: &str) -> Result<redis::Client, RedisError> {
    let (url, ca_file, _) = admin_parts(url);
    client(url.as_str(), ca_file.map(|f| RedisTls { ca_file: Some(f), ca_pem: None }).as_ref())
}

/// The admin connection of an admin URL: to the server, or with
/// [`ADMIN_CLUSTER_PARAM`] to the cluster that the URL's node belongs to.
pub async fn admin_connect(url: &str, response_timeout: Duration) -> Result<Conn, RedisError> {
    let (base, ca_file, cluster) = admin_parts(url);
    if !cluster {
        let client = admin_client(url)?;
        return Ok(Conn::Single(ConnectionManager::new_with_config(client, manager_config(response_timeout)).await?));
    }
    let mut b = ClusterClientBuilder::new([base.as_str()])
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(response_timeout)
        .retries(CLUSTER_RETRIES);
    if let Some(f) = ca_file {
        b = b.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: ca_of(&RedisTls { ca_file: Some(f), ca_pem: None })?,
        });
    }
    cluster_connect(b.build()?, response_timeout).await
}

/// Bound of one call on a cluster connection ([`crate::conn::Cluster`]):
/// the client's attempts (each within `response_timeout`) and its waits
/// between them, and a second more.
fn cluster_call_limit(response_timeout: Duration) -> Duration {
    response_timeout * (CLUSTER_RETRIES + 1) + Duration::from_secs(1)
}

/// Retries of the cluster client after a failed attempt.
const CLUSTER_RETRIES: u32 = 3;

fn cluster_config(response_timeout: Duration) -> ClusterConfig {
    ClusterConfig::new().set_connection_timeout(Duration::from_secs(2)).set_response_timeout(response_timeout)
}

async fn cluster_connect(client: ClusterClient, response_timeout: Duration) -> Result<Conn, RedisError> {
    let config = cluster_config(response_timeout);
    let limit = cluster_call_limit(response_timeout);
    let first = tokio::time::timeout(limit, client.get_async_connection_with_config(config.clone())).await.map_err(
        |_| RedisError::from((redis::ErrorKind::Io, "no redis cluster connection", format!("within {limit:?}"))),
    )??;
    Ok(Conn::Cluster(Cluster::new(client, config, first, limit)))
}

/// A direct admin connection to the node `host:port` of the cluster that
/// the admin URL `url` names: the URL's credentials and TLS, that node's
/// address. Per-node work (ACL users, which Redis does not replicate) goes
/// straight to each node: the cluster client keeps connections only to the
/// nodes of its slot map, and a replica may not be among them.
pub async fn admin_node_connect(
    url: &str,
    host: &str,
    port: u16,
    response_timeout: Duration,
) -> Result<redis::aio::MultiplexedConnection, RedisError> {
    let (base, ca_file, _) = admin_parts(url);
    let info = base.as_str().into_connection_info()?;
    let addr = match info.addr().clone() {
        redis::ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
            redis::ConnectionAddr::TcpTls { host: host.to_string(), port, insecure, tls_params }
        }
        _ => redis::ConnectionAddr::Tcp(host.to_string(), port),
    };
    let tls = ca_file.map(|f| RedisTls { ca_file: Some(f), ca_pem: None });
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(response_timeout));
    client(info.set_addr(addr), tls.as_ref())?.get_multiplexed_async_connection_with_config(&config).await
}

/// Opens a managed (auto-reconnecting) connection with the tenant's ACL
/// user: to the server, or with `cluster` to the cluster.
///
/// Commands time out after `response_timeout`, so a dead Redis is noticed
/// in bounded time and the caller can take the DB path.
pub async fn connect(cfg: &RedisConfig, response_timeout: Duration) -> Result<Conn, RedisError> {
    if cfg.cluster {
        return cluster_connect(cluster_client(cfg, response_timeout)?, response_timeout).await;
    }
    let client = client(with_user(&cfg.url, cfg)?, cfg.tls.as_ref())?;
    Ok(Conn::Single(ConnectionManager::new_with_config(client, manager_config(response_timeout)).await?))
}

/// Like [`connect`], but returns at once; the first command connects, so a
/// process starts while Redis is down.
pub fn connect_lazy(cfg: &RedisConfig, response_timeout: Duration) -> Result<Conn, RedisError> {
    if cfg.cluster {
        let client = cluster_client(cfg, response_timeout)?;
        let limit = cluster_call_limit(response_timeout);
        return Ok(Conn::Cluster(Cluster::lazy(client, cluster_config(response_timeout), limit)));
    }
    let client = client(with_user(&cfg.url, cfg)?, cfg.tls.as_ref())?;
    ConnectionManager::new_lazy_with_config(client, manager_config(response_timeout)).map(Conn::Single)
}

/// Parses the millisecond part of a stream entry id `"<ms>-<seq>"`.
pub fn entry_ms(id: &str) -> Option<i64> {
    id.split_once('-').map_or(id, |(ms, _)| ms).parse().ok()
}

/// Outcome of the transition function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The user is not cached: load the user from the DB ([`Warm`]) and call
    /// again with it (or with a seed of the record).
    NeedWarm {
        /// Set while the user's shard has no newest-user bound yet: it is
        /// being established since this Unix ms (Redis clock), and the
        /// caller establishes it ([`Scripts::establish`]) once the job has
        /// applied the shard past it.
        establishing: Option<i64>,
    },
    /// The user's cache is partial and does not hold the record: load the
    /// record's state from the DB once the job has applied the user's stream
    /// shard past `trimmed_ms` (Redis clock: the newest entry the cache
    /// trimmed), and call again with a seed.
    NeedSeed {
        /// The newest time of an entry trimmed from the user's cache.
        trimmed_ms: i64,
    },
    /// The table forbids the action in the current state.
    Refused(State),
    /// The call started after its deadline and did nothing.
    Expired,
    /// Applied and appended to the stream.
    Applied {
        /// The state before.
        prev: State,
        /// The state now.
        state: State,
        /// The record version.
        version: i64,
        /// Unix milliseconds of the transition.
        mtime_ms: i64,
        /// The millisecond part of the event's stream entry id: the entry
        /// is applied once its shard's watermark is above it.
        stream_ms: i64,
        /// True when the user was not cached and the shard's newest-user
        /// bound proved it new: no DB read was needed.
        proved_new: bool,
    },
}

/// The project's Redis functions, called by their versioned names (the
/// library of this build, [`functions::library`]). A call to a function
/// that is not loaded fails with [`functions::is_not_loaded`] and ran nothing.
pub struct Scripts {
    transition: String,
    set_if_newer: String,
    watermark: String,
    establish: String,
    forget: String,
}

impl Default for Scripts {
    fn default() -> Self {
        let lib = functions::library();
        Scripts {
            transition: lib.function(Function::Transition),
            set_if_newer: lib.function(Function::SetIfNewer),
            watermark: lib.function(Function::Watermark),
            establish: lib.function(Function::Establish),
            forget: lib.function(Function::Forget),
        }
    }
}

/// What the transition assumes when the state is not cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed {
    /// Nothing: the function answers [`Transition::NeedSeed`].
    NotLoaded,
    /// `(state, version)` loaded from the DB, which must be the record's
    /// newest acknowledged state (the caller proves it; see
    /// [`crate::fence::View::watermark`]).
    Loaded(State, i64),
}

/// Scores of NONE members of a user's cache start here (2^50): a record
/// that went to NONE at Unix ms `t` scores `NONE_BASE + t`; likes score
/// their time (below it), dislikes minus theirs.
pub const NONE_BASE: i64 = 1 << 50;

/// A user's likes and dislikes of a business as the DB holds them, to warm
/// the user's cache with: what one DB read gives ([`crate::db::load_user`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Warm {
    /// The newest version of any of the user's records (NONE ones too).
    pub floor: i64,
    /// True when `entries` are all of the user's LIKE and DISLIKE records.
    pub complete: bool,
    /// (message, state, mtime in Unix ms) of LIKE and DISLIKE records, and
    /// of NONE records when not complete (a partial cache keeps them).
    pub entries: Vec<(i64, State, i64)>,
}

/// Arguments of one transition.
#[derive(Debug, Clone, Copy)]
pub struct TransitionArgs {
    /// Acting user.
    pub mid: i64,
    /// Business.
    pub business_id: i64,
    /// Item.
    pub message_id: i64,
    /// Item owner.
    pub up_mid: i64,
    /// Requested action.
    pub action: Action,
    /// What to assume when the state is not cached.
    pub seed: Seed,
    /// Unix ms after which the call must not take effect.
    pub deadline_ms: i64,
}

impl Scripts {
    /// `FCALL` (or `FCALL_RO`) of `f`, registered as `name`. Every key goes
    /// in KEYS, so the ACL checks them all and Redis Cluster routes the call.
    async fn call<T: FromRedisValue>(
        con: &mut Conn,
        f: Function,
        name: &str,
        keys: &[&str],
        args: impl redis::ToRedisArgs,
    ) -> Result<T, RedisError> {
        Self::cmd(f, name, keys, args).query_async(con).await.map_err(functions::explain)
    }

    /// The command that calls `f` (registered as `name`) on `keys`.
    fn cmd(f: Function, name: &str, keys: &[&str], args: impl redis::ToRedisArgs) -> redis::Cmd {
        let mut cmd = redis::cmd(f.command());
        cmd.arg(name).arg(keys.len()).arg(keys).arg(args);
        cmd
    }

    /// Runs the atomic transition for one record.
    pub async fn transition(
        &self,
        con: &mut Conn,
        keys: &Keys,
        tenant: &TenantConfig,
        a: TransitionArgs,
    ) -> Result<Transition, RedisError> {
        let reply: Vec<String> =
            self.transition_cmd(keys, tenant, a, None).query_async(con).await.map_err(functions::explain)?;
        parse_transition(&reply)
    }

    /// Runs the atomic transition (warming a user that is not cached with
    /// `warm`) and reads the cached counts of the item (`Keys::counts`,
    /// `None` when not cached) in the same round trip: one pipeline, so the
    /// reply's counts cost no second wait. The counts are read by a separate
    /// command (the key lies in another hash slot than the user's), just
    /// after the transition.
    pub async fn transition_and_counts(
        &self,
        con: &mut Conn,
        keys: &Keys,
        tenant: &TenantConfig,
        a: TransitionArgs,
        warm: Option<&Warm>,
    ) -> Result<(Transition, Option<String>), RedisError> {
        let mut pipe = redis::pipe();
        pipe.add_command(self.transition_cmd(keys, tenant, a, warm)).get(keys.counts(a.business_id, a.message_id));
        let (reply, counts): (Vec<String>, Option<String>) =
            pipe.query_async(con).await.map_err(|e| functions::explain(first_failure(e)))?;
        Ok((parse_transition(&reply)?, counts))
    }

    /// The FCALL of the transition for `a`.
    fn transition_cmd(&self, keys: &Keys, tenant: &TenantConfig, a: TransitionArgs, warm: Option<&Warm>) -> redis::Cmd {
        let seed = match a.seed {
            Seed::NotLoaded => String::new(),
            Seed::Loaded(s, v) => format!("{}:{v}", s.code()),
        };
        let keys =
            [keys.user(a.mid, a.business_id), keys.stream_of(a.mid), keys.newest(keys.shard_of(a.mid), a.business_id)];
        let c = &tenant.cache;
        let args = (
            a.action.code(),
            a.mid,
            a.business_id,
            a.message_id,
            a.up_mid,
            c.state_ttl_secs,
            c.liked_list_max,
            seed,
            a.deadline_ms,
        );
        let mut cmd = Self::cmd(Function::Transition, &self.transition, &keys.each_ref().map(String::as_str), args);
        match warm {
            None => {
                cmd.arg("");
            }
            Some(w) => {
                cmd.arg(format!("{}:{}", w.floor, u8::from(w.complete)));
                for (m, s, ms) in &w.entries {
                    cmd.arg(*m).arg(match s {
                        State::Like => *ms,
                        State::Dislike => -ms,
                        State::None => NONE_BASE + ms,
                    });
                }
            }
        }
        cmd
    }

    /// The applied watermark of stream shard `stream` for consumer group
    /// `group` (Unix ms, Redis clock): every entry below it is acknowledged.
    pub async fn watermark(&self, con: &mut Conn, stream: &str, group: &str) -> Result<i64, RedisError> {
        Self::call(con, Function::Watermark, &self.watermark, &[stream], group).await
    }

    /// Establishes the newest-user bound `key` (`Keys::newest`) that is
    /// being established since `created_ms`, with `db_max_mid`, the DB's
    /// largest mid read after the job had applied the shard past
    /// `created_ms`. Returns false when that bound is gone (established by
    /// another caller, or deleted and made again): nothing changed.
    pub async fn establish(
        &self,
        con: &mut Conn,
        key: &str,
        created_ms: i64,
        db_max_mid: i64,
    ) -> Result<bool, RedisError> {
        let done: i64 = Self::call(con, Function::Establish, &self.establish, &[key], (created_ms, db_max_mid)).await?;
        Ok(done == 1)
    }

    /// Forgets records of users' caches that were written elsewhere (the
    /// DB path): per `(user cache key, message ids)`, the members go and
    /// the cache turns partial as of now (see `functions.lua`), pipelined.
    pub async fn forget(&self, con: &mut Conn, records: &[(String, Vec<i64>)]) -> Result<(), RedisError> {
        let cmds = records.iter().map(|(key, messages)| Self::cmd(Function::Forget, &self.forget, &[key], messages));
        pipelined(con, cmds.collect()).await
    }

    /// Caches a versioned pair unless a newer one is cached. Returns whether
    /// it was written.
    pub async fn set_if_newer(
        &self,
        con: &mut Conn,
        key: &str,
        pair: (i64, i64),
        version: i64,
        ttl_secs: u64,
    ) -> Result<bool, RedisError> {
        let written: i64 =
            self.set_if_newer_cmd(key, pair, version, ttl_secs).query_async(con).await.map_err(functions::explain)?;
        Ok(written == 1)
    }

    /// [`Scripts::set_if_newer`] for many `(key, pair, version)`, pipelined
    /// (a pipeline per [`PIPELINE_CHUNK`] of them): one round trip, and on
    /// an `appendfsync always` Redis one disk sync, for a whole window's
    /// items instead of one each.
    pub async fn set_if_newer_many(
        &self,
        con: &mut Conn,
        values: &[(String, (i64, i64), i64)],
        ttl_secs: u64,
    ) -> Result<(), RedisError> {
        let cmds = values.iter().map(|(key, pair, version)| self.set_if_newer_cmd(key, *pair, *version, ttl_secs));
        pipelined(con, cmds.collect()).await
    }

    fn set_if_newer_cmd(&self, key: &str, pair: (i64, i64), version: i64, ttl_secs: u64) -> redis::Cmd {
        let value = format!("{}:{}:{version}", pair.0, pair.1);
        Self::cmd(Function::SetIfNewer, &self.set_if_newer, &[key], (value, version, ttl_secs))
    }
}

/// Caches the DB's counts of `items` and received likes of `owners`
/// (`(business, message)` and `(business, up_mid)`), never over a newer
/// cached value: the job after a window, and the service after the DB path
/// changed them. A write, not a delete: a fill that read the DB before the
/// change and reaches Redis after it (held up by a failover, say) carries
/// an older version and is refused, where it would fill a deleted key.
pub async fn refresh_from_db(
    scripts: &Scripts,
    con: &mut Conn,
    db: &sqlx::MySqlPool,
    keys: &Keys,
    items: &[(i64, i64)],
    owners: &[(i64, i64)],
    ttl_secs: u64,
) -> Result<(), RefreshError> {
    let mut by_business: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for (biz, msg) in items {
        by_business.entry(*biz).or_default().push(*msg);
    }
    let mut values = Vec::with_capacity(items.len() + owners.len());
    for (biz, msgs) in by_business {
        let found = crate::db::load_counts(db, biz, &msgs).await?;
        for msg in msgs {
            let c = found.get(&msg).copied().unwrap_or_default();
            values.push((keys.counts(biz, msg), (c.likes, c.dislikes), c.version));
        }
    }
    let found = crate::db::load_received_many(db, owners).await?;
    for owner in owners {
        let c = found.get(owner).copied().unwrap_or_default();
        values.push((keys.received(owner.0, owner.1), (c.likes, 0), c.version));
    }
    // One pipeline for all of them.
    scripts.set_if_newer_many(con, &values, ttl_secs).await?;
    Ok(())
}

/// Why [`refresh_from_db`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// Loading the counts from the DB failed.
    #[error("db: {0}")]
    Db(#[from] sqlx::Error),
    /// Writing them to Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
}

/// Most calls in one pipeline of [`Scripts::set_if_newer_many`] and
/// [`Scripts::forget`].
pub const PIPELINE_CHUNK: usize = 1000;

/// Sends `cmds` in pipelines of [`PIPELINE_CHUNK`], replies ignored; the
/// first failure ends it, as the failed command alone would have.
async fn pipelined(con: &mut Conn, cmds: Vec<redis::Cmd>) -> Result<(), RedisError> {
    let mut cmds = cmds.into_iter().peekable();
    while cmds.peek().is_some() {
        let mut pipe = redis::pipe();
        for cmd in cmds.by_ref().take(PIPELINE_CHUNK) {
            pipe.add_command(cmd).ignore();
        }
        pipe.query_async::<()>(con).await.map_err(|e| functions::explain(first_failure(e)))?;
    }
    Ok(())
}

/// The error of the first failed command of a pipeline, as the command
/// alone would have failed; other errors unchanged.
fn first_failure(e: RedisError) -> RedisError {
    match e.clone().into_server_errors().and_then(|items| items.first().map(|(_, se)| se.clone())) {
        Some(se) => RedisError::from(se),
        None => e,
    }
}

/// Parses the transition function's reply.
fn parse_transition(reply: &[String]) -> Result<Transition, RedisError> {
    let bad = || RedisError::from((redis::ErrorKind::UnexpectedReturnType, "transition function reply"));
    let int = |i: usize| reply.get(i).and_then(|s| s.parse::<i64>().ok()).ok_or_else(bad);
    let state = |i: usize| int(i).and_then(|c| State::from_code(c).ok_or_else(bad));
    match reply.first().map(String::as_str) {
        Some("WARM") => Ok(Transition::NeedWarm { establishing: if reply.len() > 1 { Some(int(1)?) } else { None } }),
        Some("SEED") => Ok(Transition::NeedSeed { trimmed_ms: int(1)? }),
        Some("EXPIRED") => Ok(Transition::Expired),
        Some("REFUSED") => Ok(Transition::Refused(state(1)?)),
        Some("OK") => {
            let stream_ms = reply.get(5).and_then(|id| entry_ms(id)).ok_or_else(bad)?;
            Ok(Transition::Applied {
                state: state(1)?,
                version: int(2)?,
                mtime_ms: int(3)?,
                prev: state(4)?,
                stream_ms,
                proved_new: reply.get(6).map(String::as_str) == Some("1"),
            })
        }
        _ => Err(bad()),
    }
}

/// What a user's cache (`Keys::user`) says of some records.
#[derive(Debug, Clone, PartialEq)]
pub struct UserView {
    /// True when the cache holds every LIKE and DISLIKE of the user, so a
    /// record it does not hold is NONE.
    pub complete: bool,
    /// Per record asked for: the score (like time, or minus the dislike
    /// time), `None` when the cache does not hold it.
    pub scores: Vec<Option<f64>>,
}

impl UserView {
    /// The state of record `i`, when the cache knows it.
    pub fn state(&self, i: usize) -> Option<State> {
        match self.scores.get(i).copied().flatten() {
            Some(s) if s >= NONE_BASE as f64 => Some(State::None),
            Some(s) if s > 0.0 => Some(State::Like),
            Some(_) => Some(State::Dislike),
            None if self.complete => Some(State::None),
            None => None,
        }
    }
}

/// Reads what the user's cache `key` holds of `messages` (one round trip);
/// `None` when the user is not cached.
pub async fn user_view(con: &mut Conn, key: &str, messages: &[i64]) -> Result<Option<UserView>, RedisError> {
    let mut pipe = redis::pipe();
    pipe.cmd("ZRANGEBYSCORE").arg(key).arg(0).arg(0);
    let (meta, scores): (Vec<String>, Vec<Option<f64>>) = if messages.is_empty() {
        let (meta,): (Vec<String>,) = pipe.query_async(con).await?;
        (meta, Vec::new())
    } else {
        pipe.cmd("ZMSCORE").arg(key).arg(messages);
        pipe.query_async(con).await?
    };
    let Some(meta) = meta.first() else { return Ok(None) };
    let bad = || RedisError::from((redis::ErrorKind::UnexpectedReturnType, "malformed state cache", meta.clone()));
    let rest = meta.strip_prefix('v').ok_or_else(bad)?;
    let (floor, trimmed) = match rest.split_once('p') {
        Some((f, t)) => (f, Some(t)),
        None => (rest, None),
    };
    floor.parse::<u64>().map_err(|_| bad())?;
    if let Some(t) = trimmed {
        t.parse::<u64>().map_err(|_| bad())?;
    }
    Ok(Some(UserView { complete: trimmed.is_none(), scores }))
}

/// Parses a cached pair `"<a>:<b>:<version>"`.
pub fn parse_pair(value: &str) -> Option<(i64, i64, i64)> {
    let mut it = value.splitn(3, ':');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Reads several string keys at once; `None` for a missing key.
pub async fn mget(con: &mut Conn, keys: &[String]) -> Result<Vec<Option<String>>, RedisError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // One MGET: in Redis Cluster the keys of a batch live in different
    // slots, and the redis crate's cluster client splits an MGET by slot
    // (and merges the replies in order). A pipeline of GETs cost Redis and
    // this process about three times the CPU of one MGET of 20 keys.
    match redis::cmd("MGET").arg(keys).query_async(con).await {
        // A tenant user provisioned by a release before MGET was allowed
        // (the service rolled out before the operator re-provisioned it):
        // the same read as a pipeline of GETs.
        Err(e) if e.code() == Some("NOPERM") && e.to_string().to_ascii_lowercase().contains("'mget'") => {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.get(k);
            }
            pipe.query_async(con).await
        }
        other => other,
    }
}

/// Up to `count` liked items of a user's cache (`Keys::user`), newest
/// first, skipping `offset`, with like times at most `max_ms` (all when
/// `None`): (Unix ms, message id).
pub async fn liked_newest(
    con: &mut Conn,
    key: &str,
    max_ms: Option<i64>,
    offset: usize,
    count: usize,
) -> Result<Vec<(i64, i64)>, RedisError> {
    let max = max_ms.map_or(format!("({NONE_BASE}"), |ms| ms.to_string());
    let chunk: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
        .arg(key)
        .arg(&max)
        .arg("(0")
        .arg("WITHSCORES")
        .arg("LIMIT")
        .arg(offset)
        .arg(count)
        .query_async(con)
        .await?;
    Ok(chunk.into_iter().filter_map(|(m, s)| Some((s as i64, m.parse().ok()?))).collect())
}

/// Deletes every key matching `pattern` with SCAN and UNLINK, `batch` keys
/// a round trip (never KEYS, which would block the server); in a cluster,
/// on every master. Returns how many were removed.
pub async fn unlink_matching(con: &mut Conn, pattern: &str, batch: usize) -> Result<u64, RedisError> {
    let mut removed = 0u64;
    for node in scan_nodes(con).await? {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = scan_page(con, &node, cursor, pattern, batch).await?;
            if !keys.is_empty() {
                // In a cluster the client splits a multi-key UNLINK by slot.
                removed += redis::cmd("UNLINK").arg(&keys).query_async::<u64>(con).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(removed)
}

/// The nodes a SCAN must visit: every master of a cluster; the server.
pub async fn scan_nodes(con: &mut Conn) -> Result<Vec<(String, u16)>, RedisError> {
    if con.is_cluster() { con.masters().await } else { Ok(vec![(String::new(), 0)]) }
}

/// One SCAN page of `node` (from [`scan_nodes`]): the next cursor and keys.
pub async fn scan_page(
    con: &mut Conn,
    node: &(String, u16),
    cursor: u64,
    pattern: &str,
    batch: usize,
) -> Result<(u64, Vec<String>), RedisError> {
    let mut scan = redis::cmd("SCAN");
    scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(batch);
    Ok(redis::from_redis_value(con.on_node(&node.0, node.1, scan).await?)?)
}

/// Waits until `acks` replicas of every master hold what this connection
/// wrote (`WAIT`; in a cluster the client sends it to every master and
/// answers the fewest). Nothing to do when `acks` is 0.
pub async fn replicated_everywhere(con: &mut Conn, acks: u32, timeout_ms: u64) -> Result<(), RedisError> {
    if acks == 0 {
        return Ok(());
    }
    let got: u32 = redis::cmd("WAIT").arg(acks).arg(timeout_ms).query_async(con).await?;
    if got < acks {
        return Err(RedisError::from((
            redis::ErrorKind::Io,
            "replicas did not confirm",
            format!("{got} of {acks} replicas within {timeout_ms} ms"),
        )));
    }
    Ok(())
}

/// The failover controller's word that the active datacenter's Redis stands
/// alone: the other datacenter, whose Redis replicated it, is lost (a
/// failover of the Redis tier), or its Redis has not been a linked replica
/// for the controller's failure threshold. The key [`Keys::solo`] then
/// holds the epoch of that decision, and writes are acknowledged without
/// waiting for `redis.replica_acks` replicas: there is none to wait for, and
/// refusing every like would turn the loss of the standby into an outage.
/// The controller deletes the key once a replica is linked again.
///
/// Read at most once per [`SOLO_CHECK`]; an unreadable key counts as not
/// set (the wait stays).
pub struct Solo {
    key: String,
    checked: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

/// How long a read of the solo flag is trusted.
pub const SOLO_CHECK: Duration = Duration::from_secs(1);

impl Solo {
    /// The flag of the tenant with `keys`.
    pub fn new(keys: &Keys) -> Solo {
        Solo { key: keys.solo(), checked: std::sync::Mutex::new(None) }
    }

    /// Whether the flag is set (read again when the last read is older than
    /// [`SOLO_CHECK`]).
    pub async fn is_set(&self, con: &mut Conn) -> bool {
        let last = *self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, set)) = last
            && at.elapsed() < SOLO_CHECK
        {
            return set;
        }
        self.read(con).await
    }

    /// Whether the flag is set, read now: a write whose replicas did not
    /// confirm it asks again, so that the first second after the
    /// controller's word does not refuse likes on a cached "no".
    pub async fn read(&self, con: &mut Conn) -> bool {
        // GET: the tenant's ACL user may run it (EXISTS is not on its list).
        let set = matches!(redis::cmd("GET").arg(&self.key).query_async::<Option<String>>(con).await, Ok(Some(_)));
        *self.checked.lock().unwrap_or_else(|p| p.into_inner()) = Some((std::time::Instant::now(), set));
        set
    }
}

/// True when Redis answers a PING.
pub async fn ping(con: &mut Conn) -> bool {
    redis::cmd("PING").query_async::<String>(con).await.is_ok()
}

/// Deletes keys (used when invalidating after the DB path ran).
pub async fn delete(con: &mut Conn, keys: &[String]) -> Result<(), RedisError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.del(k).ignore();
    }
    pipe.query_async::<()>(con).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_name_the_ca_file_and_a_cluster_apart_from_what_the_client_reads() {
        assert_eq!(admin_parts("redis://u:p@h:1"), ("redis://u:p@h:1".into(), None, false));
        assert_eq!(admin_parts("redis://u:p@h:1?cluster=true"), ("redis://u:p@h:1".into(), None, true));
        assert_eq!(
            admin_parts("rediss://u:p@h:1?ssl-ca=/ca.crt&cluster=true&protocol=resp3"),
            ("rediss://u:p@h:1?protocol=resp3".into(), Some("/ca.crt".into()), true)
        );
        assert!(!admin_parts("redis://u:p@h:1?cluster=false").2, "only cluster=true names a cluster");
    }

    #[test]
    fn cached_values_parse_and_garbage_is_rejected() {
        let view = UserView { complete: true, scores: vec![Some(1.0e12), Some(-1.0e12), None] };
        assert_eq!(
            [view.state(0), view.state(1), view.state(2)],
            [Some(State::Like), Some(State::Dislike), Some(State::None)]
        );
        assert_eq!(UserView { complete: false, ..view.clone() }.state(2), None, "a partial cache does not know");
        let none = UserView { complete: false, scores: vec![Some((NONE_BASE + 1_000) as f64)] };
        assert_eq!(none.state(0), Some(State::None), "a partial cache keeps NONE members");
        assert_eq!(parse_pair("3:4:99"), Some((3, 4, 99)));
        assert_eq!(parse_pair("3:x:99"), None);
    }
}
