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

-- The transition. KEYS: state, liked list, stream shard. ARGV: action, mid,
-- business, message, up_mid, state ttl, liked list max, seed
-- ("<state>:<version>" from the DB, or empty when not loaded), deadline
-- (Unix ms).
--
-- A call that starts after its deadline does nothing and replies
-- {'EXPIRED'}. Replies {'SEED'} when the state is not cached and no seed was
-- given, {'REFUSED', state} for a transition the table forbids, or
-- {'OK', new, version, mtime_ms, prev, stream_id} after it set the state,
-- updated the liked list and appended the event, all in one atomic step.
local function transition(keys, args)
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if ms > tonumber(args[9]) then return {'EXPIRED'} end
  local cur = redis.call('GET', keys[1])
  if not cur then
    if args[8] == '' then return {'SEED'} end
    cur = args[8]
  end
  local a = tonumber(args[1])
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
  local v = (ms - __EPOCH_MS__) * 4096
  if v <= ver then v = ver + 1 end
  local vs = string.format('%.0f', v)
  local mss = string.format('%.0f', ms)
  redis.call('SET', keys[1], new .. ':' .. vs, 'EX', args[6])
  if new == 1 then
    redis.call('ZADD', keys[2], ms, args[4])
    redis.call('ZREMRANGEBYRANK', keys[2], 0, -(tonumber(args[7]) + 1))
    redis.call('EXPIRE', keys[2], args[6])
  else
    redis.call('ZREM', keys[2], args[4])
  end
  local id = redis.call('XADD', keys[3], '*', 'mid', args[2], 'biz', args[3], 'msg', args[4], 'up', args[5],
    'st', new, 'prev', st, 'ver', vs, 'mt', mss)
  return {'OK', tostring(new), vs, mss, tostring(st), id}
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
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
redis.register_function{
  function_name = 'thumbup_watermark___VERSION__',
  callback = watermark,
  flags = {'no-writes'},
}
