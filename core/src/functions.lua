#!lua name=thumbup___VERSION__
-- The project's Redis code: one Redis Functions library, loaded with the
-- admin account by provisioning (core/src/functions.rs) and called by
-- tenants with FCALL / FCALL_RO. Tenants cannot load, replace or delete it.
--
-- The library and function names end with a hash of this file (filled in
-- when it is loaded, with the version epoch), so a release with other code
-- loads its functions under new names beside the old ones: pods of the old
-- release keep calling theirs during a rolling upgrade.
--
-- Every function touches only the keys passed as KEYS, which lie in one hash
-- slot (Redis Cluster), and every redis.call is checked against the calling
-- tenant's ACL.

-- A user's cache (per business): one sorted set, `Keys::user`. Member: a
-- message id; score: the like time in Unix ms for LIKE, minus the dislike
-- time for DISLIKE, and __NONE_BASE__ (2^50) plus the time for NONE. One
-- more member, at score 0, holds the user's version floor: 'v<floor>' when
-- the set holds every LIKE and DISLIKE of the user (complete: a missing
-- member is NONE, so NONE members are not kept), 'v<floor>p<trimmed>' when
-- older ones were trimmed or never loaded (partial: a missing member is
-- unknown, and a record that goes to NONE keeps a member). <trimmed> is the
-- newest time (Unix ms) of a trimmed entry: the DB holds the state of a
-- record missing from a partial cache once the job has applied the stream
-- past it. The floor is at least every version any of the user's records
-- has, so a new version above it is newer for every record.

-- Redis's clock in Unix ms: every time a function compares or stores.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The meta member of a user's cache: floor, partial, trimmed, the member
-- itself; nil when the user is not cached.
local function user_meta(key)
  local m = redis.call('ZRANGEBYSCORE', key, 0, 0)
  if #m == 0 then return nil end
  local floor, p, trimmed = string.match(m[1], '^v(%d+)(p?)(%d*)$')
  if not floor or (p == 'p') ~= (trimmed ~= '') then error('malformed state cache ' .. m[1]) end
  return tonumber(floor), p == 'p', tonumber(trimmed) or 0, m[1]
end

-- The newest-user bound of a stream shard and business (`Keys::newest`),
-- which proves that a user has no record without a DB read. Its value is
-- either '<bound>': no user of the shard and business whose mid is above
-- <bound> has a record in the DB or an event in the stream; or
-- 'p<created>:<max>' while it is being established: <max> is the largest
-- mid whose transition ran, with its cache absent at the start, since Unix
-- ms <created>. The service establishes it ('establish' below) once the job
-- has applied the shard past <created>, with the DB's largest mid. A user
-- whose cache exists had a transition when the cache was made, so only
-- users whose cache is absent can move the bound. Whatever writes records
-- outside this library (the DB path while Redis is down) deletes it.

-- Decimal strings of positive integers (no leading zeros): a > b, exact
-- for every int64, unlike Lua's doubles.
local function gt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- The transition. KEYS: the user's cache, stream shard, the shard's
-- newest-user bound for the business. ARGV: action, mid,
-- business, message, up_mid, ttl, liked list max, seed ("<state>:<version>"
-- of the record from the DB, or empty), deadline (Unix ms), warm ("" or
-- "<floor>:<complete 0|1>" of the user from the DB), then the warm entries
-- as message, signed ms pairs.
--
-- A call that starts after its deadline does nothing and replies
-- {'EXPIRED'}. Replies {'WARM'} when the user is not cached, neither a
-- warm nor a seed was given and the bound does not prove the user new
-- ({'WARM', created} while the bound is being established since <created>:
-- the caller establishes it; the first transition of a user who was not
-- cached, while there is no bound, begins one), {'SEED', trimmed} when the
-- user's cache is
-- partial, the record is not in it and no seed was given, {'REFUSED', state} for a
-- transition the table forbids, or {'OK', new, version, mtime_ms, prev,
-- stream_id, proved} after it updated the user's cache and appended the
-- event, all in one atomic step (proved is '1' when the bound proved the
-- user new, else '0').
local function transition(keys, args)
  local ms = now_ms()
  if ms > tonumber(args[9]) then return {'EXPIRED'} end
  local ok, floor, partial, trimmed, meta = pcall(user_meta, keys[1])
  local warmed, proved, cold = false, false, false
  local bound
  if not ok then return redis.error_reply('ERR ' .. tostring(floor)) end
  if not floor then
    trimmed = 0
    cold = true
    bound = redis.call('GET', keys[3])
    if args[10] ~= '' then
      local f, c = string.match(args[10], '^(%d+):([01])$')
      if not f then return redis.error_reply('ERR malformed warm ' .. args[10]) end
      floor = tonumber(f)
      partial = c == '0'
      for i = 11, #args - 1, 2 do
        redis.call('ZADD', keys[1], args[i + 1], args[i])
      end
      warmed = true
    elseif args[8] ~= '' then
      -- A seed of one record: the user's other records are unknown, and
      -- as the user's cache expired (or never was), none was written here
      -- for a TTL.
      floor = 0
      partial = true
      trimmed = ms - tonumber(args[6]) * 1000
    elseif bound and string.match(bound, '^%d+$') and gt(args[2], bound) then
      -- No record and no event of this user anywhere: a complete empty
      -- cache, and any version is newer.
      floor = 0
      partial = false
      warmed = true
      proved = true
    else
      local created = bound and string.match(bound, '^p(%d+):')
      if created then return {'WARM', created} end
      return {'WARM'}
    end
  end
  local st
  local score = redis.call('ZSCORE', keys[1], args[4])
  if score then
    score = tonumber(score)
    if score >= __NONE_BASE__ then st = 0 elseif score > 0 then st = 1 else st = 2 end
  elseif not partial then
    st = 0
  elseif args[8] ~= '' then
    local s, v = string.match(args[8], '^(%d+):(%d+)$')
    if not s then return redis.error_reply('ERR malformed seed ' .. args[8]) end
    st = tonumber(s)
    if tonumber(v) > floor then floor = tonumber(v) end
  else
    -- Asked again with the seed (and the same warm): leave nothing behind.
    if warmed then redis.call('DEL', keys[1]) end
    return {'SEED', string.format('%.0f', trimmed)}
  end
  local a = tonumber(args[1])
  local new
  if a == 1 and (st == 0 or st == 2) then new = 1
  elseif a == 3 and (st == 0 or st == 1) then new = 2
  elseif (a == 2 and st == 1) or (a == 4 and st == 2) then new = 0
  else
    -- A refused call changes nothing: not even the warm it brought.
    if warmed then redis.call('DEL', keys[1]) end
    return {'REFUSED', tostring(st)}
  end
  local v = (ms - __EPOCH_MS__) * 4096
  if v <= floor then v = floor + 1 end
  local vs = string.format('%.0f', v)
  local mss = string.format('%.0f', ms)
  if new == 1 then
    redis.call('ZADD', keys[1], mss, args[4])
  elseif new == 2 then
    redis.call('ZADD', keys[1], '-' .. mss, args[4])
  elseif partial then
    redis.call('ZADD', keys[1], string.format('%.0f', __NONE_BASE__ + ms), args[4])
  else
    redis.call('ZREM', keys[1], args[4])
  end
  -- Trim to the newest entries: the oldest NONE members go first, then the
  -- oldest likes, then the oldest dislikes; the cache is partial from then
  -- on and remembers the newest time it trimmed.
  local extra = redis.call('ZCARD', keys[1]) - (meta and 1 or 0) - tonumber(args[7])
  if extra > 0 then
    local ranges = {
      {'(__NONE_BASE__', '+inf', false, function(s) return s - __NONE_BASE__ end},
      {'(0', '(__NONE_BASE__', false, function(s) return s end},
      {'(0', '-inf', true, function(s) return -s end},
    }
    for _, r in ipairs(ranges) do
      if extra > 0 then
        local old
        if r[3] then
          old = redis.call('ZREVRANGEBYSCORE', keys[1], r[1], r[2], 'WITHSCORES', 'LIMIT', 0, extra)
        else
          old = redis.call('ZRANGEBYSCORE', keys[1], r[1], r[2], 'WITHSCORES', 'LIMIT', 0, extra)
        end
        for i = 1, #old, 2 do
          redis.call('ZREM', keys[1], old[i])
          local at = r[4](tonumber(old[i + 1]))
          if at > trimmed then trimmed = at end
        end
        extra = extra - #old / 2
      end
    end
    -- A complete cache dropped its NONE members as they came (at this
    -- call's time at the latest): turning partial, it covers them too.
    if not partial and ms > trimmed then trimmed = ms end
    partial = true
  end
  if meta then redis.call('ZREM', keys[1], meta) end
  local tag = ''
  if partial then tag = 'p' .. string.format('%.0f', trimmed) end
  redis.call('ZADD', keys[1], 0, 'v' .. vs .. tag)
  redis.call('EXPIRE', keys[1], args[6])
  local id = redis.call('XADD', keys[2], '*', 'mid', args[2], 'biz', args[3], 'msg', args[4], 'up', args[5],
    'st', new, 'prev', st, 'ver', vs, 'mt', mss)
  if cold and not bound then
    -- The first transition of a user who was not cached since the shard
    -- has no bound: the bound begins.
    redis.call('SET', keys[3], 'p' .. mss .. ':' .. args[2])
  elseif cold then
    -- The user was not cached: a user above the bound (or above the
    -- largest one seen while it is established) moves it.
    local created, max = string.match(bound, '^p(%d+):(%d+)$')
    if created then
      if gt(args[2], max) then redis.call('SET', keys[3], 'p' .. created .. ':' .. args[2]) end
    elseif string.match(bound, '^%d+$') and gt(args[2], bound) then
      redis.call('SET', keys[3], args[2])
    end
  end
  return {'OK', tostring(new), vs, mss, tostring(st), id, proved and '1' or '0'}
end

-- Forgets records of a user's cache that were written elsewhere (the DB
-- path, while Redis was down): their members go, and the cache turns
-- partial with <trimmed> now, so each of them is read from the DB (a seed)
-- once the job has applied the user's shard past now, which also covers
-- every event of the user still in the stream. The user's other records
-- keep their cached states, newer than the DB's until the job applies
-- them. KEYS: the user's cache. ARGV: the message ids. Replies 1, or 0
-- when the user is not cached.
local function forget(keys, args)
  local ok, floor, partial, trimmed, meta = pcall(user_meta, keys[1])
  if not ok then return redis.error_reply('ERR ' .. tostring(floor)) end
  if not floor then return 0 end
  local ms = now_ms()
  for i = 1, #args do redis.call('ZREM', keys[1], args[i]) end
  if ms > trimmed then trimmed = ms end
  redis.call('ZREM', keys[1], meta)
  redis.call('ZADD', keys[1], 0, 'v' .. string.format('%.0f', floor) .. 'p' .. string.format('%.0f', trimmed))
  return 1
end

-- Establishes a newest-user bound (see above). KEYS: the bound. ARGV: the
-- <created> it was being established since, the DB's largest mid, read
-- after the job had applied the shard past <created>. Replies 1 when it
-- established the bound, 0 when the bound is no longer the one being
-- established since <created> (established already, or deleted and made
-- again).
local function establish(keys, args)
  local cur = redis.call('GET', keys[1])
  if not cur then return 0 end
  local created, max = string.match(cur, '^p(%d+):(%d+)$')
  if created ~= args[1] then return 0 end
  if gt(args[2], max) then max = args[2] end
  redis.call('SET', keys[1], max)
  return 1
end

-- Sets a versioned value "<a>:<b>:<version>" unless the cached one is as
-- new or newer. KEYS: the key. ARGV: value, version, ttl. Replies 1 when it
-- wrote, else 0.
local function set_if_newer(keys, args)
  local cur = redis.call('GET', keys[1])
  if cur then
    local v = tonumber(string.match(cur, ':(%d+)$'))
    if v and v >= tonumber(args[2]) then return 0 end
  end
  redis.call('SET', keys[1], args[1], 'EX', args[3])
  return 1
end

-- The applied watermark of a stream shard, from the consumer group's own
-- state, read atomically with the Redis clock. KEYS: the shard. ARGV: the
-- job's group. Replies Unix ms W such that every entry with an id below W
-- has been acknowledged by the group, which the job does only after the DB
-- commit: the oldest pending entry when there is one; else now when
-- everything was delivered (a later entry gets an id of now or later); else
-- the last delivered entry. A shard without a stream has no entry at all.
local function watermark(keys, args)
  local now = now_ms()
  local info = redis.pcall('XINFO', 'STREAM', keys[1])
  if info['err'] then
    if string.find(info['err'], 'no such key') then return now end
    return redis.error_reply(info['err'])
  end
  local last
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
  local delivered
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', keys[1])) do
    local name, ld
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] end
      if g[i] == 'last-delivered-id' then ld = g[i + 1] end
    end
    if name == args[1] then delivered = ld end
  end
  local function id_ms(id) return tonumber(string.match(id, '^(%d+)')) end
  if not delivered then
    if last == '0-0' then return now end
    return 0
  end
  local p = redis.call('XPENDING', keys[1], args[1])
  if tonumber(p[1]) > 0 then return id_ms(p[2]) end
  if delivered == last then return now end
  return id_ms(delivered)
end

redis.register_function('thumbup_transition___VERSION__', transition)
redis.register_function('thumbup_set_if_newer___VERSION__', set_if_newer)
redis.register_function('thumbup_establish___VERSION__', establish)
redis.register_function('thumbup_forget___VERSION__', forget)
redis.register_function{
  function_name = 'thumbup_watermark___VERSION__',
  callback = watermark,
  flags = {'no-writes'},
}
