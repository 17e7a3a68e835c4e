"""The Lua scripts shared mode runs in Redis: each is one atomic step of the fleet's state.

A backend's leases are one sorted set: members ``replica|lease|weight`` (the weight travels with
the lease), scores their deadlines in Redis's own clock, so expiry is a range delete and the
slots in use are the sum of the weights left. Every change of that sum is published, so peers
learn it without polling.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "COUNT", "RELEASE", "RENEW", "WAIT"]

_PRELUDE = """
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function used(key, now)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local n = 0
    for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
        n = n + tonumber(string.match(member, '|(%d+)$'))
    end
    return n
end
"""

ACQUIRE = (
    _PRELUDE
    + """
-- KEYS: the backend's leases, the model's waiting line, the balancers' heartbeats.
-- ARGV: capacity, weight, lease member, TTL ms, channel, backend, ticket, arrival ms, force.
-- Returns {admitted, slots used, deferred}: deferred when a live balancer has an older waiter for
-- the same model (the slot is left to it, unless force: this one has waited long enough).
local now = now_ms()
local in_use = used(KEYS[1], now)
local weight = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
if in_use + weight > tonumber(ARGV[1]) then
    return {0, in_use, 0}
end
if ARGV[9] ~= '1' then
    local arrival = tonumber(ARGV[8])
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 7, 'WITHSCORES')
    for i = 1, #oldest, 2 do
        local ticket, score = oldest[i], tonumber(oldest[i + 1])
        if ticket == ARGV[7] or score >= arrival then
            break
        end
        local beat = redis.call('ZSCORE', KEYS[3], string.match(ticket, '^(.*)|'))
        if beat and tonumber(beat) >= now - ttl then
            return {0, in_use, 1}
        end
        redis.call('ZREM', KEYS[2], ticket)  -- its balancer is gone
    end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], 3 * ttl)
redis.call('ZREM', KEYS[2], ARGV[7])
redis.call('PUBLISH', ARGV[5], cjson.encode({k = 'count', b = ARGV[6], n = in_use + weight}))
return {1, in_use + weight, 0}
"""
)

RELEASE = (
    _PRELUDE
    + """
-- KEYS: the backend's leases. ARGV: lease member, channel, backend.
redis.call('ZREM', KEYS[1], ARGV[1])
local in_use = used(KEYS[1], now_ms())
redis.call('PUBLISH', ARGV[2], cjson.encode({k = 'count', b = ARGV[3], n = in_use}))
return in_use
"""
)

COUNT = (
    _PRELUDE
    + """
-- KEYS: every backend's leases. Returns the slots in use on each (expired leases dropped).
local now = now_ms()
local counts = {}
for i, key in ipairs(KEYS) do
    counts[i] = used(key, now)
end
return counts
"""
)

RENEW = (
    _PRELUDE
    + """
-- KEYS: the leases' backends' sets, ARGV: TTL ms, then one member per key.
local deadline = now_ms() + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
    redis.call('ZADD', key, 'XX', deadline, ARGV[i + 1])
end
return deadline
"""
)

WAIT = """
-- KEYS: the model's waiting line. ARGV: ticket, arrival ms, expiry ms of the line.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
