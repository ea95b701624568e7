//! Redis client side: connecting with a tenant's ACL user, calling the
//! project's Redis functions ([`crate::functions`]: the atomic transition,
//! versioned cache writes, the applied watermark), and reading entries back.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, IntoConnectionInfo, RedisError};

use crate::config::{RedisConfig, RedisTls, TenantConfig};
use crate::domain::{Action, State};
use crate::functions::{self, Function};
use crate::keys::Keys;

fn client_and_config(
    cfg: &RedisConfig,
    response_timeout: Duration,
) -> Result<(redis::Client, ConnectionManagerConfig), RedisError> {
    let info = cfg.url.as_str().into_connection_info()?;
    let settings = info.redis_settings().clone().set_username(&cfg.username).set_password(&cfg.password);
    let client = client(info.set_redis_settings(settings), cfg.tls.as_ref())?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    Ok((client, config))
}

/// A client of the server at `info`: over TLS checked against `tls`'s CA
/// when given (the URL must be `rediss://`), else as the URL says
/// (`rediss://` trusts the system's roots).
pub fn client(info: impl IntoConnectionInfo, tls: Option<&RedisTls>) -> Result<redis::Client, RedisError> {
    let Some(tls) = tls else { return redis::Client::open(info) };
    // The content read with the config, else the file (a config built in code).
    let ca = match (&tls.ca_pem, &tls.ca_file) {
        (Some(pem), _) => Some(pem.clone()),
        (None, Some(file)) => Some(std::fs::read(file).map_err(|e| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "reading redis.tls.ca_file",
                format!("{file}: {e}"),
            ))
        })?),
        (None, None) => None,
    };
    redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: ca })
}

/// The URL parameter of an admin Redis URL that names the CA file of a
/// `rediss://` server: `rediss://user:pw@host:6380/?ssl-ca=/etc/ca.crt` (as
/// sqlx's `ssl-ca` for the DB). The Redis client has no such parameter: it
/// is taken out of the URL here.
pub const ADMIN_CA_PARAM: &str = "ssl-ca";

/// A client for an admin URL, which is a single string (a flag, the
/// operator's config): its [`ADMIN_CA_PARAM`] parameter, when present, is
/// the CA file that the server's certificate must chain to.
pub fn admin_client(url: &str) -> Result<redis::Client, RedisError> {
    let Some((base, query)) = url.split_once('?') else { return redis::Client::open(url) };
    let prefix = format!("{ADMIN_CA_PARAM}=");
    let (ca, rest): (Vec<&str>, Vec<&str>) = query.split('&').partition(|kv| kv.starts_with(&prefix));
    let Some(ca_file) = ca.last().map(|kv| &kv[prefix.len()..]) else { return redis::Client::open(url) };
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    client(url.as_str(), Some(&RedisTls { ca_file: Some(ca_file.to_string()), ca_pem: None }))
}

/// Opens a managed (auto-reconnecting) connection with the tenant's ACL user.
///
/// Commands time out after `response_timeout`, so a dead Redis is noticed
/// in bounded time and the caller can take the DB path.
pub async fn connect(cfg: &RedisConfig, response_timeout: Duration) -> Result<ConnectionManager, RedisError> {
    let (client, config) = client_and_config(cfg, response_timeout)?;
    ConnectionManager::new_with_config(client, config).await
}

/// Like [`connect`], but returns at once; the first command connects, so a
/// process starts while Redis is down.
pub fn connect_lazy(cfg: &RedisConfig, response_timeout: Duration) -> Result<ConnectionManager, RedisError> {
    let (client, config) = client_and_config(cfg, response_timeout)?;
    ConnectionManager::new_lazy_with_config(client, config)
}

/// True when the error means Redis could not be reached (as opposed to an
/// error reply from a running server).
pub fn is_unreachable(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() || e.code().is_none()
}

/// Parses the millisecond part of a stream entry id `"<ms>-<seq>"`.
pub fn entry_ms(id: &str) -> Option<i64> {
    id.split_once('-').map_or(id, |(ms, _)| ms).parse().ok()
}

/// Outcome of the transition function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The state is not cached: load it from the DB and call again with a seed.
    NeedSeed,
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
    },
}

/// The project's Redis functions, called by their versioned names (the
/// library of this build, [`functions::library`]). A call to a function
/// that is not loaded fails with [`functions::is_not_loaded`] and ran nothing.
pub struct Scripts {
    transition: String,
    set_if_newer: String,
    watermark: String,
}

impl Default for Scripts {
    fn default() -> Self {
        let lib = functions::library();
        Scripts {
            transition: lib.function(Function::Transition),
            set_if_newer: lib.function(Function::SetIfNewer),
            watermark: lib.function(Function::Watermark),
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
        con: &mut ConnectionManager,
        f: Function,
        name: &str,
        keys: &[&str],
        args: impl redis::ToRedisArgs,
    ) -> Result<T, RedisError> {
        let mut cmd = redis::cmd(f.command());
        cmd.arg(name).arg(keys.len()).arg(keys).arg(args);
        cmd.query_async(con).await.map_err(functions::explain)
    }

    /// Runs the atomic transition for one record.
    pub async fn transition(
        &self,
        con: &mut ConnectionManager,
        keys: &Keys,
        tenant: &TenantConfig,
        a: TransitionArgs,
    ) -> Result<Transition, RedisError> {
        let seed = match a.seed {
            Seed::NotLoaded => String::new(),
            Seed::Loaded(s, v) => format!("{}:{v}", s.code()),
        };
        let keys = [
            keys.state(a.mid, a.business_id, a.message_id),
            keys.liked_list(a.mid, a.business_id),
            keys.stream_of(a.mid),
        ];
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
        let keys = keys.each_ref().map(String::as_str);
        let reply: Vec<String> = Self::call(con, Function::Transition, &self.transition, &keys, args).await?;
        let bad = || RedisError::from((redis::ErrorKind::UnexpectedReturnType, "transition function reply"));
        let int = |i: usize| reply.get(i).and_then(|s| s.parse::<i64>().ok()).ok_or_else(bad);
        let state = |i: usize| int(i).and_then(|c| State::from_code(c).ok_or_else(bad));
        match reply.first().map(String::as_str) {
            Some("SEED") => Ok(Transition::NeedSeed),
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
                })
            }
            _ => Err(bad()),
        }
    }

    /// The applied watermark of stream shard `stream` for consumer group
    /// `group` (Unix ms, Redis clock): every entry below it is acknowledged.
    pub async fn watermark(&self, con: &mut ConnectionManager, stream: &str, group: &str) -> Result<i64, RedisError> {
        Self::call(con, Function::Watermark, &self.watermark, &[stream], group).await
    }

    /// Caches a versioned pair unless a newer one is cached. Returns whether
    /// it was written.
    pub async fn set_if_newer(
        &self,
        con: &mut ConnectionManager,
        key: &str,
        pair: (i64, i64),
        version: i64,
        ttl_secs: u64,
    ) -> Result<bool, RedisError> {
        let value = format!("{}:{}:{version}", pair.0, pair.1);
        let written: i64 =
            Self::call(con, Function::SetIfNewer, &self.set_if_newer, &[key], (value, version, ttl_secs)).await?;
        Ok(written == 1)
    }
}

/// Parses a cached state `"<state>:<version>"`.
pub fn parse_state(value: &str) -> Option<(State, i64)> {
    let (s, v) = value.split_once(':')?;
    Some((State::from_code(s.parse().ok()?)?, v.parse().ok()?))
}

/// Parses a cached pair `"<a>:<b>:<version>"`.
pub fn parse_pair(value: &str) -> Option<(i64, i64, i64)> {
    let mut it = value.splitn(3, ':');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Reads several string keys at once; `None` for a missing key.
pub async fn mget(con: &mut ConnectionManager, keys: &[String]) -> Result<Vec<Option<String>>, RedisError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // One GET per key in a pipeline, not MGET: in Redis Cluster the keys of a
    // batch live in different slots.
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.get(k);
    }
    pipe.query_async(con).await
}

/// Up to `count` entries of a liked list (`Keys::liked_list`), newest
/// first, skipping `offset`, with like times at most `max_ms` (all when
/// `None`): (Unix ms, message id).
pub async fn liked_newest(
    con: &mut ConnectionManager,
    key: &str,
    max_ms: Option<i64>,
    offset: usize,
    count: usize,
) -> Result<Vec<(i64, i64)>, RedisError> {
    let max = max_ms.map_or("+inf".to_string(), |ms| ms.to_string());
    let chunk: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
        .arg(key)
        .arg(&max)
        .arg("-inf")
        .arg("WITHSCORES")
        .arg("LIMIT")
        .arg(offset)
        .arg(count)
        .query_async(con)
        .await?;
    Ok(chunk.into_iter().filter_map(|(m, s)| Some((s as i64, m.parse().ok()?))).collect())
}

/// Whether each of `messages` is in a liked list: its like time if it is.
pub async fn liked_times(
    con: &mut ConnectionManager,
    key: &str,
    messages: &[i64],
) -> Result<Vec<Option<f64>>, RedisError> {
    redis::cmd("ZMSCORE").arg(key).arg(messages).query_async(con).await
}

/// True when Redis answers a PING.
pub async fn ping(con: &mut ConnectionManager) -> bool {
    redis::cmd("PING").query_async::<String>(con).await.is_ok()
}

/// Deletes keys (used when invalidating after the DB path ran).
pub async fn delete(con: &mut ConnectionManager, keys: &[String]) -> Result<(), RedisError> {
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
    fn cached_values_parse_and_garbage_is_rejected() {
        assert_eq!(parse_state("1:42"), Some((State::Like, 42)));
        assert_eq!(parse_state("7:42"), None);
        assert_eq!(parse_pair("3:4:99"), Some((3, 4, 99)));
        assert_eq!(parse_pair("3:x:99"), None);
    }
}
