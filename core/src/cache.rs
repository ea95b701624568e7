//! Redis client side: connecting with a tenant's ACL user, the atomic
//! transition script, versioned cache writes, and reading entries back.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError, Script};

use crate::config::{RedisConfig, RedisTls, TenantConfig};
use crate::domain::{Action, State};
use crate::keys::Keys;
use crate::version::EPOCH_MS;

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

/// The transition script. KEYS: state, liked list, stream shard (one hash
/// slot). ARGV: action, mid, business, message, up_mid, state ttl, liked list
/// max, seed (`"<state>:<version>"` from the DB, or empty when not loaded),
/// deadline (Unix ms).
///
/// A script that starts after its deadline does nothing and replies
/// `{"EXPIRED"}`: a call the client already gave up on cannot take effect
/// later, for example after a stall; and none takes effect after the
/// service's write lease ends (see [`crate::fence`]).
///
/// Replies `{"SEED"}` when the state is not cached and no seed was given,
/// `{"REFUSED", state}` for a transition the table forbids, or
/// `{"OK", new, version, mtime_ms, prev, stream_id}` after it set the state,
/// updated the liked list and appended the event, all in one atomic step.
const TRANSITION_LUA: &str = r#"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ms > tonumber(ARGV[9]) then return {'EXPIRED'} end
local cur = redis.call('GET', KEYS[1])
if not cur then
  if ARGV[8] == '' then return {'SEED'} end
  cur = ARGV[8]
end
local a = tonumber(ARGV[1])
local st, ver = string.match(cur, '^(%d+):(%d+)$')
if not st then return redis.error_reply('ERR malformed state ' .. cur) end
st = tonumber(st)
ver = tonumber(ver)
local new
if a == 1 and (st == 0 or st == 2) then new = 1
elseif a == 3 and (st == 0 or st == 1) then new = 2
elseif (a == 2 and st == 1) or (a == 4 and st == 2) then new = 0
else
  return {'REFUSED', tostring(st)}
end
local v = (ms - EPOCH) * 4096
if v <= ver then v = ver + 1 end
local vs = string.format('%.0f', v)
local mss = string.format('%.0f', ms)
redis.call('SET', KEYS[1], new .. ':' .. vs, 'EX', ARGV[6])
if new == 1 then
  redis.call('ZADD', KEYS[2], ms, ARGV[4])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[7]) + 1))
  redis.call('EXPIRE', KEYS[2], ARGV[6])
else
  redis.call('ZREM', KEYS[2], ARGV[4])
end
local id = redis.call('XADD', KEYS[3], '*', 'mid', ARGV[2], 'biz', ARGV[3], 'msg', ARGV[4], 'up', ARGV[5],
  'st', new, 'prev', st, 'ver', vs, 'mt', mss)
return {'OK', tostring(new), vs, mss, tostring(st), id}
"#;

/// Sets a versioned value `"<a>:<b>:<version>"` unless the cached one is as
/// new or newer. ARGV: value, version, ttl.
const SET_IF_NEWER_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local v = tonumber(string.match(cur, ':(%d+)$'))
  if v and v >= tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"#;

/// The applied watermark of a stream shard, from the consumer group's own
/// state, read atomically with the Redis clock. KEYS: the shard. ARGV: the
/// job's group. Replies Unix ms W such that every entry with an id below W
/// has been acknowledged by the group, which the job does only after the DB
/// commit: the oldest pending entry when there is one; else now when
/// everything was delivered (a later entry gets an id of now or later); else
/// the last delivered entry. A shard without a stream has no entry at all.
const WATERMARK_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
if info['err'] then
  if string.find(info['err'], 'no such key') then return now end
  return redis.error_reply(info['err'])
end
local last
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
end
local delivered
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, ld
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then ld = g[i + 1] end
  end
  if name == ARGV[1] then delivered = ld end
end
local function ms(id) return tonumber(string.match(id, '^(%d+)')) end
if not delivered then
  if last == '0-0' then return now end
  return 0
end
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
if tonumber(p[1]) > 0 then return ms(p[2]) end
if delivered == last then return now end
return ms(delivered)
"#;

/// Parses the millisecond part of a stream entry id `"<ms>-<seq>"`.
pub fn entry_ms(id: &str) -> Option<i64> {
    id.split_once('-').map_or(id, |(ms, _)| ms).parse().ok()
}

/// Outcome of the transition script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The state is not cached: load it from the DB and call again with a seed.
    NeedSeed,
    /// The table forbids the action in the current state.
    Refused(State),
    /// The script started after the call's deadline and did nothing.
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

/// The scripts, hashed once.
pub struct Scripts {
    transition: Script,
    set_if_newer: Script,
    watermark: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            transition: Script::new(&TRANSITION_LUA.replace("EPOCH", &EPOCH_MS.to_string())),
            set_if_newer: Script::new(SET_IF_NEWER_LUA),
            watermark: Script::new(WATERMARK_LUA),
        }
    }
}

/// What the transition script assumes when the state is not cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed {
    /// Nothing: the script answers [`Transition::NeedSeed`].
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
    /// Unix ms after which the script must not take effect.
    pub deadline_ms: i64,
}

impl Scripts {
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
        let reply: Vec<String> = self
            .transition
            .key(keys.state(a.mid, a.business_id, a.message_id))
            .key(keys.liked_list(a.mid, a.business_id))
            .key(keys.stream_of(a.mid))
            .arg(a.action.code())
            .arg(a.mid)
            .arg(a.business_id)
            .arg(a.message_id)
            .arg(a.up_mid)
            .arg(tenant.cache.state_ttl_secs)
            .arg(tenant.cache.liked_list_max)
            .arg(seed)
            .arg(a.deadline_ms)
            .invoke_async(con)
            .await?;
        let bad = || RedisError::from((redis::ErrorKind::UnexpectedReturnType, "transition script reply"));
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
        self.watermark.key(stream).arg(group).invoke_async(con).await
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
        let written: i64 = self
            .set_if_newer
            .key(key)
            .arg(format!("{}:{}:{version}", pair.0, pair.1))
            .arg(version)
            .arg(ttl_secs)
            .invoke_async(con)
            .await?;
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

/// Converts a stream entry's field map to strings.
pub fn entry_fields(map: &HashMap<String, redis::Value>) -> HashMap<String, String> {
    map.iter().filter_map(|(k, v)| redis::from_redis_value_ref::<String>(v).ok().map(|s| (k.clone(), s))).collect()
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
