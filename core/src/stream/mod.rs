//! The tenant event stream: its wire formats and every Redis command on it.
//!
//! - [`event`]: the entry the transition script appends to a shard (decoded
//!   here, encoded by the Lua; a test checks one against the other).
//! - [`Downstream`]: the entry the job publishes after applying a transition.
//! - [`DeadLetter`]: the entry an undecodable shard entry becomes.
//! - The consumer group's read ([`read_group`]), the claim of entries dead
//!   consumers left pending ([`claim_stale`]), acknowledgement ([`ack`]) and
//!   the id range the failover replay reads ([`range`]).
//! - [`replay`]: applying a stream window to a promoted DB.
//!
//! The job and the operator's failover replay call these; neither composes
//! stream commands itself.

pub mod event;
pub mod replay;

use std::collections::HashMap;

use redis::RedisError;
use redis::aio::ConnectionLike;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};

use crate::domain::State;
use crate::keys::{JOB_GROUP, Keys};
use event::LikeEvent;

/// One decoded shard entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The shard it was read from.
    pub shard: u32,
    /// Its stream id.
    pub id: String,
    /// The event.
    pub event: LikeEvent,
}

/// What one read gathered: decoded entries and the ones that did not decode.
#[derive(Debug, Default)]
pub struct Batch {
    /// Decoded entries.
    pub entries: Vec<Entry>,
    /// Entries that are not events, kept whole for the dead-letter stream.
    pub malformed: Vec<DeadLetter>,
}

impl Batch {
    /// Entries of either kind.
    pub fn len(&self) -> usize {
        self.entries.len() + self.malformed.len()
    }

    /// Whether nothing was read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, keys: &Keys, shard: u32, sid: StreamId) {
        let fields = entry_fields(&sid.map);
        match LikeEvent::decode(&fields) {
            Ok(event) => self.entries.push(Entry { shard, id: sid.id, event }),
            Err(e) => {
                tracing::error!(tenant = %keys.tenant(), shard, id = %sid.id, error = %e, "malformed stream entry: moved to the dead-letter stream");
                self.malformed.push(DeadLetter { shard, id: sid.id, fields });
            }
        }
    }
}

/// Converts a stream entry's field map to strings.
pub fn entry_fields(map: &HashMap<String, redis::Value>) -> HashMap<String, String> {
    map.iter().filter_map(|(k, v)| redis::from_redis_value_ref::<String>(v).ok().map(|s| (k.clone(), s))).collect()
}

/// A published transition: what downstream consumers read (they
/// deduplicate by version, since a replayed window republishes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downstream {
    /// The event as applied.
    pub event: LikeEvent,
    /// The state the DB held before (the job's view, not the script's).
    pub from: State,
}

impl Downstream {
    /// The field list of the entry: the event's ([`LikeEvent::encode`]),
    /// its state called `to` and the DB's state before it `from`.
    pub fn encode(&self) -> Vec<(&'static str, String)> {
        let mut fields = LikeEvent { prev: self.from, ..self.event.clone() }.encode();
        for (name, _) in &mut fields {
            *name = match *name {
                "st" => "to",
                "prev" => "from",
                other => other,
            };
        }
        fields
    }

    /// Decodes the field map of a downstream entry.
    pub fn decode(fields: &HashMap<String, String>) -> Result<Downstream, event::MalformedEvent> {
        let mut as_event = fields.clone();
        let from = as_event.remove("from").ok_or(event::MalformedEvent { field: "from", problem: "is missing" })?;
        let to = as_event.remove("to").ok_or(event::MalformedEvent { field: "to", problem: "is missing" })?;
        // The downstream entry is the event with `from`/`to` for `prev`/`st`.
        as_event.insert("prev".into(), from);
        as_event.insert("st".into(), to);
        let event = LikeEvent::decode(&as_event).map_err(|e| match e.field {
            "prev" => event::MalformedEvent { field: "from", ..e },
            "st" => event::MalformedEvent { field: "to", ..e },
            _ => e,
        })?;
        Ok(Downstream { from: event.prev, event })
    }
}

/// A shard entry that did not decode, as the dead-letter stream keeps it:
/// its original fields plus where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The shard it was read from.
    pub shard: u32,
    /// Its id there.
    pub id: String,
    /// Its original fields.
    pub fields: HashMap<String, String>,
}

impl DeadLetter {
    /// The field list of the entry.
    pub fn encode(&self) -> Vec<(String, String)> {
        let mut out = vec![("_shard".to_string(), self.shard.to_string()), ("_id".to_string(), self.id.clone())];
        out.extend(self.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }

    /// Decodes a dead-letter entry; None without its origin fields.
    pub fn decode(fields: &HashMap<String, String>) -> Option<DeadLetter> {
        let mut fields = fields.clone();
        let shard = fields.remove("_shard")?.parse().ok()?;
        let id = fields.remove("_id")?;
        Some(DeadLetter { shard, id, fields })
    }
}

/// How far the job's group is on a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupProgress {
    /// Entries not yet delivered to the group (None when Redis cannot tell).
    pub lag: Option<i64>,
    /// The Unix ms of the last delivered entry (0 when none).
    pub delivered_ms: i64,
    /// The Unix ms of the oldest entry delivered and not acknowledged.
    pub oldest_pending_ms: Option<i64>,
}

/// The job group's progress on the shard `key`; `None` when the group does
/// not exist (yet).
pub async fn group_progress<C: ConnectionLike + Send>(
    con: &mut C,
    key: &str,
) -> Result<Option<GroupProgress>, RedisError> {
    let groups: Vec<HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(key).query_async(con).await?;
    let Some(g) = groups.iter().find(|g| {
        g.get("name").and_then(|v| redis::from_redis_value_ref::<String>(v).ok()).as_deref() == Some(JOB_GROUP)
    }) else {
        return Ok(None);
    };
    let int = |k: &str| g.get(k).and_then(|v| redis::from_redis_value_ref::<i64>(v).ok());
    let text = |k: &str| g.get(k).and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
    let id_ms = |id: String| id.split('-').next()?.parse::<i64>().ok();
    let delivered_ms = text("last-delivered-id").and_then(id_ms).unwrap_or(0);
    let pending: (i64, Option<String>, Option<String>, redis::Value) =
        redis::cmd("XPENDING").arg(key).arg(JOB_GROUP).query_async(con).await?;
    Ok(Some(GroupProgress { lag: int("lag"), delivered_ms, oldest_pending_ms: pending.1.and_then(id_ms) }))
}

/// How far one consumer group of the downstream stream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownstreamGroup {
    /// The group's name.
    pub name: String,
    /// Unix ms of the last entry delivered to it (0: none yet).
    pub delivered_ms: i64,
    /// Entries not yet delivered to it (Redis's `lag`; None when Redis
    /// cannot tell, as after entries it never read were trimmed).
    pub lag: Option<i64>,
}

impl DownstreamGroup {
    /// Seconds behind at `now_ms`: the age of the last entry delivered to
    /// it, 0 when it has nothing left to read.
    pub fn behind_secs(&self, now_ms: i64) -> i64 {
        if self.lag == Some(0) { 0 } else { (now_ms - self.delivered_ms).max(0) / 1000 }
    }

    /// Whether it missed entries: its position is older than the oldest
    /// entry kept (`oldest_ms`), so entries it never read were dropped.
    pub fn missed(&self, oldest_ms: Option<i64>) -> bool {
        self.lag != Some(0) && oldest_ms.is_some_and(|first| self.delivered_ms < first)
    }
}

/// The downstream stream's consumer groups, and the Unix ms of its oldest
/// entry (None when it is empty or missing).
pub async fn downstream_groups<C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
) -> Result<(Vec<DownstreamGroup>, Option<i64>), RedisError> {
    // Only commands the tenant's ACL user may run (acl_rules): XLEN,
    // XINFO GROUPS, XINFO STREAM.
    let key = keys.downstream();
    let len: i64 = redis::cmd("XLEN").arg(&key).query_async(con).await?;
    if len == 0 {
        return Ok((Vec::new(), None));
    }
    let groups: Vec<HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(&key).query_async(con).await?;
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO").arg("STREAM").arg(&key).query_async(con).await?;
    let id_ms = |id: &str| id.split('-').next().and_then(|ms| ms.parse::<i64>().ok());
    let oldest = match info.get("first-entry") {
        Some(redis::Value::Array(entry)) => {
            entry.first().and_then(|id| redis::from_redis_value_ref::<String>(id).ok()).and_then(|id| id_ms(&id))
        }
        _ => None,
    };
    let groups = groups
        .iter()
        .map(|g| {
            let text = |k: &str| g.get(k).and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
            DownstreamGroup {
                name: text("name").unwrap_or_default(),
                delivered_ms: text("last-delivered-id").as_deref().and_then(id_ms).unwrap_or(0),
                lag: g.get("lag").and_then(|v| redis::from_redis_value_ref::<i64>(v).ok()),
            }
        })
        .collect();
    Ok((groups, oldest))
}

/// Drops the entries of shard `key` older than `min_ms` (Unix ms;
/// approximately: whole internal nodes only, never a newer entry).
pub async fn trim_before<C: ConnectionLike + Send>(con: &mut C, key: &str, min_ms: i64) -> Result<(), RedisError> {
    let _: i64 = redis::cmd("XTRIM").arg(key).arg("MINID").arg("~").arg(min_ms).query_async(con).await?;
    Ok(())
}

/// The dead-letter stream of a tenant.
pub fn dead_letter_key(keys: &Keys) -> String {
    format!("{}deadletter", keys.prefix())
}

/// Creates the job's consumer group on every shard (and the shard itself).
pub async fn ensure_groups<C: ConnectionLike + Send>(con: &mut C, keys: &Keys) -> Result<(), RedisError> {
    for shard in 0..keys.shards() {
        let r: Result<(), _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.stream(shard))
            .arg(JOB_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(con)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            other => other?,
        }
    }
    Ok(())
}

/// Reads every shard through the job's group starting at `from` (`">"` for
/// new entries: one call per shard, which keeps shards fair; an id for
/// `consumer`'s own pending entries: all of them). Returns entries read.
pub async fn read_group<C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
    consumer: &str,
    from: &str,
    count: usize,
    out: &mut Batch,
) -> Result<usize, RedisError> {
    let mut n = 0;
    for shard in 0..keys.shards() {
        let mut cursor = from.to_string();
        loop {
            let reply: StreamReadReply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(JOB_GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(keys.stream(shard))
                .arg(&cursor)
                .query_async(con)
                .await?;
            let ids: Vec<_> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
            let got = ids.len();
            n += got;
            for sid in ids {
                if cursor != ">" {
                    cursor = sid.id.clone();
                }
                out.push(keys, shard, sid);
            }
            if cursor == ">" || got < count {
                break;
            }
        }
    }
    Ok(n)
}

/// Claims for `consumer` the entries pending on other (dead) consumers for
/// longer than `idle_ms`. Returns entries claimed.
pub async fn claim_stale<C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
    consumer: &str,
    idle_ms: u64,
    count: usize,
    out: &mut Batch,
) -> Result<usize, RedisError> {
    let mut n = 0;
    for shard in 0..keys.shards() {
        let mut start = "0-0".to_string();
        loop {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(keys.stream(shard))
                .arg(JOB_GROUP)
                .arg(consumer)
                .arg(idle_ms)
                .arg(&start)
                .arg("COUNT")
                .arg(count)
                .query_async(con)
                .await?;
            n += reply.claimed.len();
            for sid in reply.claimed {
                out.push(keys, shard, sid);
            }
            if reply.next_stream_id == "0-0" {
                break;
            }
            start = reply.next_stream_id;
        }
    }
    Ok(n)
}

/// Reads one shard's entries from `since_ms` on, `page` per call, outside
/// the consumer group (the replay must not move the job's cursor).
pub async fn range<C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
    shard: u32,
    since_ms: i64,
    page: usize,
    out: &mut Batch,
) -> Result<usize, RedisError> {
    let mut cursor = Cursor::since(since_ms);
    let mut n = 0;
    loop {
        let got = range_page(con, keys, shard, &mut cursor, page, out).await?;
        n += got;
        if got < page {
            return Ok(n);
        }
    }
}

/// Where a paged read of a shard ([`range_page`]) goes on.
#[derive(Debug, Clone)]
pub struct Cursor(String);

impl Cursor {
    /// From the first entry at or after `since_ms` (Unix ms).
    pub fn since(since_ms: i64) -> Cursor {
        Cursor(format!("{since_ms}-0"))
    }
}

/// Reads up to `page` entries of one shard from `cursor` on, outside the
/// consumer group, into `out`, and moves `cursor` past them. Fewer than
/// `page` entries: the end of the shard was reached.
pub async fn range_page<C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
    shard: u32,
    cursor: &mut Cursor,
    page: usize,
    out: &mut Batch,
) -> Result<usize, RedisError> {
    let key = keys.stream(shard);
    let reply: StreamRangeReply =
        redis::cmd("XRANGE").arg(&key).arg(&cursor.0).arg("+").arg("COUNT").arg(page).query_async(con).await?;
    let got = reply.ids.len();
    for sid in reply.ids {
        cursor.0 = format!("({}", sid.id);
        out.push(keys, shard, sid);
    }
    Ok(got)
}

/// Publishes applied transitions downstream, in one pipeline, dropping
/// entries older than `keep_from_ms` (Unix ms; approximately: whole
/// internal nodes only, never a newer entry).
pub async fn publish_downstream<C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
    published: &[Downstream],
    keep_from_ms: i64,
) -> Result<(), RedisError> {
    if published.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for d in published {
        pipe.cmd("XADD")
            .arg(keys.downstream())
            .arg("MINID")
            .arg("~")
            .arg(keep_from_ms.max(0))
            .arg("*")
            .arg(d.encode())
            .ignore();
    }
    pipe.query_async::<()>(con).await
}

/// Appends undecodable entries to the tenant's dead-letter stream.
pub async fn dead_letter<C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
    letters: &[DeadLetter],
) -> Result<(), RedisError> {
    for letter in letters {
        let _: String =
            redis::cmd("XADD").arg(dead_letter_key(keys)).arg("*").arg(letter.encode()).query_async(con).await?;
    }
    Ok(())
}

/// Acknowledges entries to the job's group: `(shard, id)` pairs.
pub async fn ack<'a, C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
    ids: impl IntoIterator<Item = (u32, &'a str)>,
) -> Result<(), RedisError> {
    let mut by_shard: HashMap<u32, Vec<&str>> = HashMap::new();
    for (shard, id) in ids {
        by_shard.entry(shard).or_default().push(id);
    }
    if by_shard.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for (shard, ids) in &by_shard {
        pipe.cmd("XACK").arg(keys.stream(*shard)).arg(JOB_GROUP).arg(ids).ignore();
    }
    pipe.query_async::<()>(con).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> LikeEvent {
        LikeEvent {
            mid: 1,
            business_id: 2,
            message_id: 3,
            up_mid: 4,
            state: State::Like,
            prev: State::Dislike,
            version: 7,
            mtime_ms: 1_700_000_000_000,
        }
    }

    fn map(fields: Vec<(impl Into<String>, String)>) -> HashMap<String, String> {
        fields.into_iter().map(|(k, v)| (k.into(), v)).collect()
    }

    #[test]
    fn downstream_entries_round_trip_with_the_db_side_from_state() {
        let d = Downstream { event: LikeEvent { prev: State::None, ..event() }, from: State::None };
        assert_eq!(Downstream::decode(&map(d.encode())).unwrap(), d);
        let mut m = map(d.encode());
        m.remove("from");
        assert_eq!(Downstream::decode(&m).unwrap_err().field, "from");
        m.insert("from".into(), "0".into());
        m.insert("to".into(), "9".into());
        assert_eq!(Downstream::decode(&m).unwrap_err().field, "to");
    }

    #[test]
    fn dead_letters_keep_the_original_fields_and_their_origin() {
        let l = DeadLetter { shard: 3, id: "5-1".into(), fields: map(vec![("st", "x".to_string())]) };
        assert_eq!(DeadLetter::decode(&map(l.encode())).unwrap(), l);
        assert_eq!(DeadLetter::decode(&map(vec![("st", "x".to_string())])), None);
    }
}
