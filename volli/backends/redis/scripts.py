"""The Lua scripts of the Redis backend (each runs atomically in Redis) and their codes.

Every key a script touches is in its KEYS or built from a prefix in its ARGV that names the
same group (keys.py), so on a cluster each script runs in one hash slot. Scripts that
publish use PUBLISH, or SPUBLISH on a cluster (``for_cluster``): a plain PUBLISH there goes
to every shard.
"""

from __future__ import annotations

from ..base import Claim
from .wire import LUA_NODE_VERSION

# Lua: `now`, the server's clock in ms (every node's scripts share one clock).
_NOW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
"""
# Lua: `primary`, the replication ID of the Redis running the script: a replica promoted by a
# failover takes a new one (so does a restart). '' where INFO is denied (an ACL without
# +info): failovers then go unseen, as before.
_PRIMARY = """
local info = redis.pcall('INFO', 'replication')
local primary = type(info) == 'string' and string.match(info, 'master_replid:(%x+)') or ''
"""


# Lua: announce(watchers key, userId, '1'/'0', holder node, channel prefix, P header) tells
# every node that watches the user (until a time still to come) of a change of its
# presence, from inside the script that made it: changes reach watchers in the order they
# ran. Only nodes that read P watch, so the header is always the versioned one.
_ANNOUNCE = """
local function announce(watchers, user, online, node, prefix, header)
  local t = redis.call('TIME')
  local at = t[1] * 1000 + math.floor(t[2] / 1000)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', watchers, at, '+inf')) do
    redis.call('PUBLISH', prefix .. w, header .. user .. '\\n' .. online .. '\\n' .. node)
  end
end
"""


def _peer_header(node: str, versioned: int, legacy: int) -> str:
    """Lua: the header of a message to the node named by ``node`` (wire.version_for):
    ARGV[versioned] if its id says it reads versions, else ARGV[legacy]."""
    return f"(string.find({node}, '{LUA_NODE_VERSION}') and ARGV[{versioned}] or ARGV[{legacy}])"


# The store's epoch: a hash <prefix>epoch {id, until, beat, born, seq, primary}, gone 20 TTLs
# after the last node stopped. Every node's heartbeat (each TTL/4) stamps `beat`. A store
# found without it (restarted empty), with no beat for half a TTL (paused, or every node
# cut off: a node's presences, renewed at most a TTL/4 before the last beat of any node,
# may expire under live users a TTL/4 later), or on another primary than the one that
# stamped it (a failover: the old primary took writes its replica never got, and nodes
# still writing there left their presences and alive keys to expire on the new one) gets
# a new id, and registrations are refused until `until` (a TTL later) while every node,
# seeing the new id, announces its live users again. A node that had users can tell (it
# knew the old id); a new node cannot, so an old node that finds a young epoch begun
# without a window opens it. Shared by BEAT and CLAIM: KEYS[EPOCH], ARGV[TTL] ms, ARGV[NEW]
# a new id, MINE the node's epoch, RECOVER whether to open a window.
_EPOCH = _NOW + _PRIMARY + """
local e = redis.call('HMGET', KEYS[EPOCH], 'id', 'until', 'beat', 'born', 'primary')
local lost = not e[1] or now - tonumber(e[3] or 0) > ARGV[TTL] / 2
  or (e[5] and e[5] ~= primary)
if lost then
  local u = 0
  if RECOVER then u = now + ARGV[TTL] end
  redis.call('HSET', KEYS[EPOCH], 'id', ARGV[NEW], 'until', u, 'beat', now, 'born', now,
             'primary', primary)
  e = {ARGV[NEW], u}
else
  if not e[5] then  -- stamped by a version that did not record it
    redis.call('HSET', KEYS[EPOCH], 'primary', primary)
  end
  if MINE ~= '' and MINE ~= e[1] and tonumber(e[2]) < tonumber(e[4]) + ARGV[TTL] then
    -- A node from before sees a young epoch that a new node began without a window.
    e[2] = tonumber(e[4]) + ARGV[TTL]
    redis.call('HSET', KEYS[EPOCH], 'until', e[2])
  end
end
"""


def _epoch(epoch: int, ttl: int, new: int, mine: int, recover: str) -> str:
    return (_EPOCH.replace("EPOCH", str(epoch)).replace("TTL", str(ttl))
            .replace("NEW", str(new)).replace("MINE", f"ARGV[{mine}]")
            .replace("RECOVER", recover))


# A node's heartbeat: KEYS epoch, the node's alive key (half a TTL: two heartbeats);
# ARGV ttl ms, new id, the node's epoch ("" when it has
# none yet: a new node opens no recovery window). Returns the epoch id (the node announces
# all its users again when it changed) and the deployment's TTL, which the first node of
# an epoch sets: thresholds and windows assume one TTL for all.
BEAT = _epoch(1, 1, 2, 3, "ARGV[3] ~= ''") + """
if lost or not redis.call('HGET', KEYS[1], 'ttl') then
  redis.call('HSET', KEYS[1], 'ttl', ARGV[1])
end
redis.call('HSET', KEYS[1], 'beat', now)
redis.call('PEXPIRE', KEYS[1], ARGV[1] * 20)
redis.call('SET', KEYS[2], '1', 'PX', math.floor(ARGV[1] / 2))
return {e[1], redis.call('HGET', KEYS[1], 'ttl')}
"""

# The claim rule of base.Claim, atomically. KEYS: presence, binding, bindings index (a
# sorted set userId -> expiry ms that counts bindings for the cap), watchers, epoch. ARGV: node,
# session, publicKey, ttl ms, signed "1"/"0", refresh "1"/"0" (the heartbeat announcing a
# live user again: never takes over, allowed while recovering, never refused by the cap),
# binding retention ms, max bindings, userId, the node's epoch, a new epoch id, channel
# prefix, the takeover message's header (versioned, legacy), the presence change's header,
# the published encryption key and its signature ('' none).
# The user's watchers are told it is online. Only a signed claim writes
# the binding (with the retention as its TTL) and its encryption key. A binding hash without bound=1 is a
# leftover of an older version and goes. A takeover tells the old holder's node (its
# channel) in the same script. A successful claim gets the next number of the epoch's
# claim counter (`seq`): replies can arrive out of the order the claims ran in, and of
# two of one node's sessions the higher number is the holder. KEYS[6], the user's held
# offers, is only looked at: whether any are held (1/0, last in the reply) spares the
# registration a round trip for them when none are. Returns
# {1, seq, held} ok, {2, seq, old node, old session, held} taken over, {0} taken, {-1} bound, {-2} key
# mismatch, {-3} full, {-4, epoch} the node's epoch is not the store's, {-5} recovering.
CLAIM = _ANNOUNCE + _epoch(5, 4, 11, 10, "true") + """
if lost or e[1] ~= ARGV[10] then return {-4, e[1]} end
local refresh = ARGV[6] == '1'
if not refresh and tonumber(e[2]) > now then return {-5} end
local b = redis.call('HMGET', KEYS[2], 'publicKey', 'bound')
local signed = ARGV[5] == '1'
if b[2] == '1' then
  if not signed then return {-1} end
  if b[1] ~= ARGV[3] then return {-2} end
elseif b[1] then
  redis.call('DEL', KEYS[2])
end
local h = redis.call('HMGET', KEYS[1], 'session', 'publicKey', 'node')
local taken_over = false
if h[1] == '' then  -- unbound by an operator (see UNBIND)
  if refresh then return {0} end
elseif h[1] and h[1] ~= ARGV[2] then
  if refresh or not signed or h[2] ~= ARGV[3] then return {0} end
  taken_over = true
end
if signed and b[2] ~= '1' and not refresh then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[8]) then return {-3} end
end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'session', ARGV[2], 'publicKey', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local seq = redis.call('HINCRBY', KEYS[5], 'seq', 1)
if signed then
  redis.call('HSET', KEYS[2], 'publicKey', ARGV[3], 'bound', '1')
  if (ARGV[16] or '') ~= '' then
    redis.call('HSET', KEYS[2], 'encKey', ARGV[16], 'encSig', ARGV[17])
  else
    redis.call('HDEL', KEYS[2], 'encKey', 'encSig')
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  redis.call('ZADD', KEYS[3], now + ARGV[7], ARGV[9])
end
announce(KEYS[4], ARGV[9], '1', ARGV[1], ARGV[12], ARGV[15])
if taken_over then
  if h[3] ~= ARGV[1] then
    redis.call('PUBLISH', ARGV[12] .. h[3], """ + _peer_header("h[3]", 13, 14) + """ .. h[1])
  end
  return {2, seq, h[3], h[1], redis.call('EXISTS', KEYS[6])}
end
return {1, seq, redis.call('EXISTS', KEYS[6])}
"""

# The heartbeat's compare-and-renew, for a batch of presences: KEYS presences; ARGV ttl ms,
# then the session each should name. Per key: 1 renewed, 0 gone, -1 names another session.
REFRESH = """
local out = {}
for i, key in ipairs(KEYS) do
  local s = redis.call('HGET', key, 'session')
  if s == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  elseif s then
    out[i] = -1
  else
    out[i] = 0
  end
end
return out
"""

# Key rotation, only by the session the presence names (one just replaced cannot bind a
# key under the new holder): KEYS binding, presence; ARGV old key, new key, session, the
# encryption key signed by the new key and its signature ('' none: the old one goes).
REBIND = """
if redis.call('HGET', KEYS[2], 'session') ~= ARGV[3] then return 0 end
local b = redis.call('HMGET', KEYS[1], 'publicKey', 'bound')
if b[2] ~= '1' or b[1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'publicKey', ARGV[2])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'encKey', ARGV[4], 'encSig', ARGV[5])
else
  redis.call('HDEL', KEYS[1], 'encKey', 'encSig')
end
redis.call('HSET', KEYS[2], 'publicKey', ARGV[2])
return 1
"""

# Renews a binding that still exists (never recreates one an operator unbound): KEYS
# presence, binding, bindings index; ARGV retention ms, userId.
_RENEW_BINDING = """
if redis.call('PEXPIRE', KEYS[2], ARGV[{retention}]) == 1 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], 'XX', t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[{retention}],
             ARGV[{user}])
end
"""
# The heartbeat's renewal of an online signed user's binding (it never expires while in
# use). Same KEYS; ARGV retention ms, userId.
RENEW = _RENEW_BINDING.format(retention=1, user=2)

# Compare-and-delete: only the session that holds the userId may release it; its binding
# (if any) is kept for the retention from now, and its watchers are told. KEYS presence,
# binding, bindings index, watchers; ARGV session, retention ms, userId, channel prefix,
# the presence change's header.
RELEASE = _ANNOUNCE + """
local h = redis.call('HMGET', KEYS[1], 'session', 'node')
if h[1] == ARGV[1] then
""" + _RENEW_BINDING.format(retention=2, user=3) + """
  redis.call('DEL', KEYS[1])
  announce(KEYS[4], ARGV[3], '0', h[2], ARGV[4], ARGV[5])
  return 1
end
return 0
"""

# An operator's unbind: KEYS presence, binding, bindings index, watchers; ARGV userId,
# channel prefix, the presence change's header (its watchers are told). The holder's
# presence keeps its TTL but names no session (a tombstone): whether or not the notice to
# its node arrives, that node's heartbeat then finds its user's presence naming another
# session and closes it; meanwhile the ID reads offline and a new claim may take it, a
# re-announce may not. Returns {had binding, node, session} of the holder to close (nil
# when nobody holds it).
UNBIND = _ANNOUNCE + """
local had = redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'node', 'session')
if not h[2] or h[2] == '' then return {had} end
redis.call('HSET', KEYS[1], 'session', '')
announce(KEYS[4], ARGV[1], '0', h[1], ARGV[2], ARGV[3])
return {had, h[1], h[2]}
"""

# {-1}: offline. {0}: its node has no listener; if the node's heartbeat has stopped too
# (its <prefix>alive:<node> key expired: the worker died) the stale presence goes, else
# (a listener reconnecting) it stays: deleting it would free a live user's ID. It stays
# too while the epoch recovers or the primary changed (a failover): a node still writing
# to the old primary is alive though its key here expired. A presence deleted is told to
# the user's watchers. {n, node}: handed to n subscribers of that node's channel. KEYS
# presence, epoch, watchers; ARGV channel prefix, the message's body, alive-key prefix,
# its header (versioned, legacy), userId, the presence change's header.
ROUTE = _ANNOUNCE + """
local node = redis.call('HGET', KEYS[1], 'node')
if not node then return {-1} end
local n = redis.call('PUBLISH', ARGV[1] .. node, """ + _peer_header("node", 4, 5) + """ .. ARGV[2])
if n == 0 and redis.call('EXISTS', ARGV[3] .. node) == 0 then
""" + _NOW + _PRIMARY + """
  local e = redis.call('HMGET', KEYS[2], 'until', 'primary')
  if tonumber(e[1] or 0) <= now and (not e[2] or e[2] == primary) then
    redis.call('DEL', KEYS[1])
    announce(KEYS[3], ARGV[6], '0', node, ARGV[1], ARGV[7])
  end
end
return {n, node}
"""

# A node starts watching a user, or renews its watch, and reads the user's presence: KEYS
# watchers, presence, binding; ARGV node, ttl ms, alive-key prefix. Returns {holder node
# or '', whether it is online (1: it names a live session of a node whose heartbeat goes
# on), live key or '', bound key or '', its encryption key or '', that key's signature
# or ''}.
WATCH = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)  -- nodes that stopped watching
redis.call('ZADD', KEYS[1], now + ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local h = redis.call('HMGET', KEYS[2], 'node', 'session', 'publicKey')
local b = redis.call('HMGET', KEYS[3], 'publicKey', 'bound', 'encKey', 'encSig')
local online = 0
if h[1] and h[2] and h[2] ~= '' and redis.call('EXISTS', ARGV[3] .. h[1]) == 1 then
  online = 1
end
if b[2] ~= '1' then return {h[1] or '', online, h[3] or '', '', '', ''} end
return {h[1] or '', online, h[3] or '', b[1], b[3] or '', b[4] or ''}
"""

# The heartbeat's renewal of this node's watches, for a batch of one group: KEYS each
# user's watchers and presence, in pairs; ARGV node, ttl ms, alive-key prefix, then the
# node each user was last seen on ('' none). Per user: 1 it is there (a live session's
# presence, that node's heartbeat going on), 0 it is not (look the user up: its node
# stopped, or its presence expired without a release), -1 no node to check.
RENEW_WATCH = _NOW + """
local out = {}
for i = 1, #KEYS / 2 do
  local key, presence = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('ZADD', key, now + ARGV[2], ARGV[1])
  redis.call('PEXPIRE', key, ARGV[2])
  local holder = ARGV[i + 3]
  if holder == '' then
    out[i] = -1
  else
    local s = redis.call('HGET', presence, 'session')
    if s and s ~= '' and redis.call('EXISTS', ARGV[3] .. holder) == 1 then
      out[i] = 1
    else
      out[i] = 0
    end
  end
end
return out
"""

# Offers held for an offline callee (held.py). KEYS held-meta, held (and presence for
# HOLD); times on Redis's clock. An expired offer stays until its caller's node drops it
# (it then tells the caller `expired`) or, if that node died, until the keys expire a
# minute after their last offer. HOLD: ARGV caller, session, frame, ms, max callers per
# callee, the caller's node -> 1 held, 0 the callee is online, -1 full (of offers not
# expired), 2 held in place of this caller's offer not expired.
HOLD = _NOW + """
local s = redis.call('HGET', KEYS[3], 'session')
if s and s ~= '' then return 0 end
local metas = redis.call('HGETALL', KEYS[1])
local n, replaced = 0, 1
for i = 1, #metas, 2 do
  if cjson.decode(metas[i + 1]).exp > now then
    if metas[i] ~= ARGV[1] then n = n + 1 else replaced = 2 end
  end
end
if n >= tonumber(ARGV[5]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({s = ARGV[2], at = now, node = ARGV[6],
                                                   exp = now + tonumber(ARGV[4]), n = 1}))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local keep = tonumber(ARGV[4]) + 60000
for i = 1, 2 do
  if redis.call('PTTL', KEYS[i]) < keep then redis.call('PEXPIRE', KEYS[i], keep) end
end
return replaced
"""

# A candidate with the caller's held offer: ARGV caller, session, frame, max frames ->
# 1 added, 0 no offer of that session held, -1 full.
HOLD_CANDIDATE = _NOW + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local m = cjson.decode(raw)
if m.s ~= ARGV[2] or m.exp <= now then return 0 end
if m.n >= tonumber(ARGV[4]) then return -1 end
m.n = m.n + 1
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(m))
redis.call('HSET', KEYS[2], ARGV[1], redis.call('HGET', KEYS[2], ARGV[1]) .. '\\n' .. ARGV[3])
return 1
"""

# The callee registered: every offer held for it and not expired, {caller, at, held for
# ms, frames} each, taken (expired ones stay for their callers' nodes to drop). An offer
# whose caller's node died (its alive key, ARGV[1] prefix, is gone) goes undelivered: its
# caller left without a close that could cancel it.
TAKE_HELD = _NOW + """
local metas = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #metas, 2 do
  local m = cjson.decode(metas[i + 1])
  if m.exp > now and m.node and redis.call('EXISTS', ARGV[1] .. m.node) == 0 then
    redis.call('HDEL', KEYS[1], metas[i])
    redis.call('HDEL', KEYS[2], metas[i])
  elseif m.exp > now then
    out[#out + 1] = {metas[i], m.at, now - m.at, redis.call('HGET', KEYS[2], metas[i])}
    redis.call('HDEL', KEYS[1], metas[i])
    redis.call('HDEL', KEYS[2], metas[i])
  end
end
return out
"""

# A caller's offer goes (its time is up, or the caller left), if that session holds it:
# ARGV caller, session -> 1 dropped, 0 not held.
DROP_HELD = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw or cjson.decode(raw).s ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# A Web Push subscription of a bound ID: KEYS push hash; ARGV endpoint, the subscription
# (JSON), how many to keep, retention ms. The oldest go beyond the cap; the hash lives as
# long as a binding.
PUSH_SUBSCRIBE = _NOW + """
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({sub = ARGV[2], at = now}))
local all = redis.call('HGETALL', KEYS[1])
local count = #all / 2
while count > tonumber(ARGV[3]) do
  local oldest, at = nil, nil
  for i = 1, #all, 2 do
    local e = cjson.decode(all[i + 1])
    if redis.call('HEXISTS', KEYS[1], all[i]) == 1 and (not at or e.at < at) then
      oldest, at = all[i], e.at
    end
  end
  redis.call('HDEL', KEYS[1], oldest)
  count = count - 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

CLAIM_CODES = {1: Claim.OK, 2: Claim.TAKEN_OVER, 0: Claim.TAKEN, -1: Claim.BOUND,
               -2: Claim.KEY_MISMATCH, -3: Claim.FULL}
EPOCH_CHANGED, RECOVERING = -4, -5


def for_cluster(script: str) -> str:
    """The script for a cluster: its channel is in its slot, published on that shard only."""
    return script.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
