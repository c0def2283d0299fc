"""The Redis side of the shared backend: Lua scripts that run atomically inside Redis.

One script call per admission attempt (``ADMIT``) and one per settlement (``SETTLE``): each reads
and writes every scope of the call in a single round trip, so processes on any number of hosts
see one consistent set of counters. All keys of one limiter share the hash tag ``{prefix}`` so
they live in one Redis Cluster slot (a multi-key script must not span slots).

Layout (``P`` is ``{prefix}``, ``S`` a scope key such as ``model:openai/gpt-4o``):

* ``P:w:S:<limit>``   hash, bucket index -> usage, with ``T`` (their total) and ``O`` (the oldest
  bucket). The same conservative bucketed sliding window as :mod:`._windows` (60 buckets per
  period; a bucket counts until it has wholly left).
* ``P:c:S``           sorted set, call id -> lease expiry: calls in flight (concurrency).
* ``P:rv:S``          hash ``cost``/``req``: worst-case cost and requests reserved by calls in flight.
* ``P:b:S:<kind>``    hash ``start``/``cost``/``req``/``tok``: settled spend in the current calendar
  window of ``kind`` (hour, day, month, run); a different ``start`` means the window rolled over.
* ``P:s:S``           hash: provider signals of a model or API-key scope (cooldown, pacing,
  circuit breaker, learned and adaptive limits); in a model's, ``split`` once a process has seen
  the model served by more than one endpoint (``MOVE``), which ``ADMIT`` and ``SETTLE`` tell the
  processes that have not.
* ``P:l:<call id>``   hash: what an open call reserved, so that an abandoned call (its process
  died) is reclaimed when its lease expires; ``P:leases`` orders them by expiry.
* ``P:mark:...``      budget warnings already sent this window (once across all processes): the limit
  each was sent for (a budget raised or lowered since warns again).
* ``P:once:<process>`` sorted set: the numbers of the writes of one process that Redis applied and
  that process may still send again (a lost answer), so that each is applied once (see ``first_time``).

Every key has a TTL: windows twice their period, spend a little longer than its calendar window,
lease records (and the reservation hashes holding them) twice their lease and a day. Nothing
grows without bound.

"Now" is Redis' own clock (``TIME``) unless the caller passes one (tests with a fake clock): one
clock for every host, so clock skew between hosts cannot let a window admit twice its limit.
"""

from __future__ import annotations

# Shared Lua helpers, prepended to each script.
_COMMON = r"""
local P = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- The arguments after prefix and now come packed in ARGV[3], separated by \31 (packing them
-- costs the client far less than thirty small arguments).
local A = {}
do
  local body, start, n = ARGV[3] or '', 1, 0
  if body ~= '' then
    while true do
      local i = string.find(body, '\31', start, true)
      n = n + 1
      if not i then A[n] = string.sub(body, start); break end
      A[n] = string.sub(body, start, i - 1)
      start = i + 1
    end
  end
end
local pos = 1
local function arg() local v = A[pos]; pos = pos + 1; return v end
local function num() return tonumber(arg()) end
local BUCKETS = 60
local INF = math.huge
-- Numbers go back to the client at full precision (tostring keeps only 14 digits).
local function fmt(x) return string.format('%.17g', x) end
-- A write that a process may send twice (Redis ran it, but its answer was lost to a socket
-- timeout, so the process keeps it and sends it again) is numbered by that process: sid names
-- the process, seq the write. Redis keeps, per process, the numbers it applied from low on (the
-- oldest write whose answer that process has not seen yet; it never sends an older one again),
-- so the set holds the writes in doubt and at most 16 others. True when this write was not
-- applied yet.
local function first_time(sid, seq, low)
  if not sid or sid == '' then return true end
  local k = P .. ':once:' .. sid
  if redis.call('ZADD', k, 'NX', seq, seq) == 0 then return false end
  -- Forget, every 16th write, what the process will not send again (low <= seq: the set is never
  -- emptied, so it keeps its TTL); refresh the TTL every 64th (the first write sets it).
  local n = tonumber(seq)
  if n % 16 == 0 then redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. low) end
  if n % 64 == 1 then
    redis.call('PEXPIRE', k, 604800000)  -- a week: a process gone for good leaves it behind
  end
  return true
end

-- A window hash: bucket index -> usage, plus 'T' (the total of its live buckets) and 'O' (the
-- oldest bucket that may still hold usage). A look at a window reads those two fields and drops
-- only the buckets that left it since the last look; only a blocked call reads every bucket.
-- Bucket b counts until (b + 1) * width + period (conservative, as in _windows.py).
-- Floor division exactly as Python's float // (so both backends put a time in the same bucket).
local function fdiv(a, b)
  local mod = math.fmod(a, b)
  local div = (a - mod) / b
  if mod ~= 0 and ((b < 0) ~= (mod < 0)) then div = div - 1 end
  local fl = math.floor(div)
  if div - fl > 0.5 then fl = fl + 1 end
  return fl
end

local function lowest(period, width) return math.floor((now - period) / width) end

local function window(key, period)
  local width = period / BUCKETS
  local lo = lowest(period, width)
  local v = redis.call('HMGET', key, 'T', 'O')
  local total, oldest = tonumber(v[1]) or 0, tonumber(v[2])
  if oldest and oldest < lo then
    if lo - oldest > BUCKETS + 1 then
      -- not looked at for longer than the window; a settlement or a retry may have added usage
      -- since (those do not move 'O'): keep the buckets still inside it
      local raw = redis.call('HGETALL', key)
      local stale, live = {}, 0
      for j = 1, #raw, 2 do
        local idx = tonumber(raw[j])
        if idx and idx < lo then stale[#stale + 1] = raw[j]
        elseif idx then live = live + tonumber(raw[j + 1]) end
      end
      if live < 1e-9 then
        redis.call('DEL', key)
        return 0, width
      end
      for j = 1, #stale, 100 do redis.call('HDEL', key, unpack(stale, j, math.min(j + 99, #stale))) end
      redis.call('HSET', key, 'T', live, 'O', lo)
      return live, width
    end
    local stale = {}
    for i = oldest, lo - 1 do stale[#stale + 1] = i end
    local vals = redis.call('HMGET', key, unpack(stale))
    for _, x in ipairs(vals) do total = total - (tonumber(x) or 0) end
    redis.call('HDEL', key, unpack(stale))
    if total < 1e-9 then total = 0 end
    redis.call('HSET', key, 'T', total, 'O', lo)
  end
  return total, width
end

-- The earliest time at which amount more fits under limit, assuming no new usage.
local function retry_at(key, total, width, period, amount, limit)
  if amount > limit then return INF end
  local excess = total + amount - limit
  if excess <= 0 then return now end
  local lo = lowest(period, width)
  local raw = redis.call('HGETALL', key)
  local list = {}
  for j = 1, #raw, 2 do
    local idx = tonumber(raw[j])
    if idx and idx >= lo then list[#list + 1] = {idx, tonumber(raw[j + 1])} end
  end
  table.sort(list, function(x, y) return x[1] < y[1] end)
  local freed = 0
  for _, b in ipairs(list) do
    freed = freed + b[2]
    if freed >= excess then return (b[1] + 1) * width + period end
  end
  return now + period
end

-- Change bucket idx by amount (a refund never takes a bucket below zero).
local function bump(key, idx, amount)
  if amount < 0 then
    local cur = tonumber(redis.call('HGET', key, idx)) or 0
    amount = math.max(amount, -cur)
  end
  if amount == 0 then return end
  local v = tonumber(redis.call('HINCRBYFLOAT', key, idx, amount))
  if v <= 1e-9 then redis.call('HDEL', key, idx) end
  local t = tonumber(redis.call('HINCRBYFLOAT', key, 'T', amount))
  if t < 1e-9 then redis.call('HSET', key, 'T', 0) end
  -- (and usage in a bucket older than the oldest, e.g. a settlement in the bucket of an admission
  -- estimated at 0, which left none: window() drops buckets from 'O' on, it must include it.
  -- One read on the usual path, as HSETNX was: this runs for every window of every admission.)
  local o = tonumber(redis.call('HGET', key, 'O'))
  if o == nil or (amount > 0 and idx < o) then redis.call('HSET', key, 'O', idx) end
end

local function add(key, period, at, amount)
  local width = period / BUCKETS
  local idx = fdiv(at, width)
  bump(key, idx, amount)
  redis.call('PEXPIRE', key, math.ceil((2 * period + width) * 1000))
  return idx
end

local function spend_key(scope, kind) return P .. ':b:' .. scope .. ':' .. kind end

-- Settled spend of scope in the window of kind that started at start: cost, req, tok. A newer
-- window already begun by another host (its wall clock a little ahead) is the current one.
local function spent(scope, kind, start)
  local v = redis.call('HMGET', spend_key(scope, kind), 'start', 'cost', 'req', 'tok')
  if v[1] ~= start and not (v[1] and tonumber(v[1]) > tonumber(start)) then return 0, 0, 0 end
  return tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0
end

local function charge(scope, kind, start, ttl, cost, req, tok)
  local k = spend_key(scope, kind)
  local cur = redis.call('HGET', k, 'start')
  -- A call admitted in an earlier window settles late: its spend counts in the current one (as in
  -- memory), and never wipes it. Only a newer window replaces the stored one.
  if cur ~= start and not (cur and tonumber(cur) > tonumber(start)) then
    redis.call('DEL', k)
    redis.call('HSET', k, 'start', start)
  end
  local c = tonumber(redis.call('HINCRBYFLOAT', k, 'cost', cost))
  if c < 0 then redis.call('HSET', k, 'cost', 0) end
  if req ~= 0 then redis.call('HINCRBY', k, 'req', req) end
  if tok ~= 0 then redis.call('HINCRBY', k, 'tok', tok) end
  redis.call('EXPIRE', k, ttl)
end

-- How long the lease record of a call lives (and the keys its slots and reservation are in): its
-- lease twice, and a day more, so that a call abandoned while nobody else calls is still
-- reclaimed (its worst case charged) by the next admission, however late.
local function record_ms(lease) return math.ceil((lease * 2 + 86400) * 1000) end

-- Give a TTL of at least ms to key (never shortens one: processes may use other lease times).
local function keep(key, ms)
  local t = redis.call('PTTL', key)
  if t ~= -2 and t < ms then redis.call('PEXPIRE', key, ms) end
end

-- The id of this Redis dataset, made when the dataset is: after a restart that lost the data,
-- another one. A settlement whose lease record is gone tells by it whether the record was settled
-- or reclaimed (same dataset: nothing more to do) or lost with the data (its spend still counts).
-- It lives as long as the lease records made with it (ms); a record that outlived it unclaimed
-- was never charged either.
local function boot_id(ms)
  local k = P .. ':boot'
  local b = redis.call('GET', k)
  if not b then
    local t = redis.call('TIME')
    b = t[1] .. '.' .. t[2]
    redis.call('SET', k, b, 'PX', ms)
  else
    keep(k, ms)
  end
  return b
end

-- Give back one call's reservation of cost in scope s. A reservation hash that expired is not
-- brought back (negative and without a TTL, it would let later calls over-reserve).
local function unreserve(s, cost)
  local k = P .. ':rv:' .. s
  if redis.call('EXISTS', k) == 0 then return end
  local c = tonumber(redis.call('HINCRBYFLOAT', k, 'cost', -cost))
  if redis.call('HINCRBY', k, 'req', -1) <= 0 then redis.call('DEL', k)
  elseif c < 0 then redis.call('HSET', k, 'cost', 0) end
end

local SEP = '\0'
local function split(s)
  local out = {}
  if s == nil or s == false or s == '' then return out end
  local start = 1
  while true do
    local i = string.find(s, SEP, start, true)
    if not i then out[#out + 1] = string.sub(s, start); break end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
  return out
end

-- An abandoned call (its process died, or it never settled): free its slots and charge its
-- worst-case cost (conservative: spend is never lost).
local function reclaim(cid)
  local lk = P .. ':l:' .. cid
  local rec = redis.call('HMGET', lk, 'cost', 'bs', 'cs', 'pr', 'sp', 'done')
  redis.call('ZREM', P .. ':leases', cid)
  -- (a call whose usage SETTLE mode '2' settled has no reservation and no spend targets left:
  -- its slots and probe are freed, nothing is charged; processes of earlier releases do the same)
  if not rec[1] or rec[6] then return end
  local cost = tonumber(rec[1]) or 0
  for _, s in ipairs(split(rec[2])) do unreserve(s, cost) end
  for _, s in ipairs(split(rec[3])) do redis.call('ZREM', P .. ':c:' .. s, cid) end
  for _, s in ipairs(split(rec[4])) do
    if redis.call('HGET', P .. ':s:' .. s, 'probe') == cid then redis.call('HDEL', P .. ':s:' .. s, 'probe') end
  end
  local sp = split(rec[5])
  for j = 1, #sp, 4 do
    charge(sp[j], sp[j + 1], sp[j + 2], tonumber(sp[j + 3]), cost, 1, 0)
  end
  redis.call('HSET', lk, 'done', 'expired')
  redis.call('EXPIRE', lk, 3600)
end

local function reclaim_expired()
  local expired = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', now, 'LIMIT', 0, 20)
  for _, cid in ipairs(expired) do reclaim(cid) end
end
"""

#: ARGV: prefix, now|'', call_id, lease_seconds, cost, share, nscopes, then per scope:
#:   key, choice(0/1), provider(0/1; 2: and this process split it already), conc(-1 none), nwin,
#:   [name, limit(-1 learned), period, amount]*,
#:   nbud, [name, kind, start, limit, isreq(0/1), frees]*   (frees: when its window rolls over; -1 never)
#: and at the end the spend targets of the call, '\0'-joined: scope, kind, start, ttl, ...; then its priority;
#: then its deadline (''=none: a call may wait forever), in the caller's clock when it passes now, else in
#: seconds from now (a circuit that reopens after it, or a cooldown that ends after it, refuses the call)
#: Returns {1, now, chosen, has_record(0/1), dataset id|'', splits,
#:          settled spend seen: 'scope\0kind\0start\0cost\0requests'...}
#:       | {0, now, scope, limit, remaining, retry_at|'', release(0/1), splits, eases_at|'', failing keys...}
#:       | {2, now, scope, budget name, kind, limit, spent, amount, frees}  budget exceeded (the one
#:                                                                   that frees last, of all scopes)
#:       | {3, now, scope, limit name, limit, amount}                    can never fit
#:       | {4, now, scope, open_until, failures, splits}                 circuit open past the deadline
#:       | {5, now, scope, cooldown_until}                               cooldown past the deadline
#: splits: the provider scopes of the call (flag 1) that another process split, '\0'-joined ('' = none)
ADMIT = _COMMON + r"""
local call_id = arg()
local lease = num()
local cost = num()
local share = num()
local nscopes = num()
reclaim_expired()

local scopes = {}
for s = 1, nscopes do
  local sc = {key = arg(), choice = arg() == '1', wins = {}, buds = {}}
  local p = arg()
  sc.provider, sc.known, sc.conc = p ~= '0', p == '2', num()
  local nwin = num()
  for w = 1, nwin do
    sc.wins[w] = {name = arg(), limit = num(), period = num(), amount = num()}
  end
  local nbud = num()
  for b = 1, nbud do
    sc.buds[b] = {name = arg(), kind = arg(), start = arg(), limit = num(), isreq = arg() == '1', frees = num()}
  end
  scopes[s] = sc
end
local sp = arg()
local prio = num() or 0
local deadline = num()
if not deadline then deadline = INF
elseif not tonumber(ARGV[2]) then deadline = now + deadline end  -- (Redis' clock: sent as a wait)

-- The line across processes, per scope with a concurrency limit ({P}:q:<scope>, a sorted set of
-- call ids by rank; {P}:qa:<call id> says the call still waits: its process re-asks every
-- 20-100 ms while a slot is what it waits for). Without it, a process whose call ends hands the
-- slot to its own next caller at once, while callers in other processes only re-ask now and then:
-- a busy process could keep a slot from them until it ran out of work.
local WAIT_ALIVE_MS = 1500
local function ahead_in_line(sc)
  local qk = P .. ':q:' .. sc.key
  local rank = tonumber(redis.call('ZSCORE', qk, call_id)) or (now - prio * 1e6)
  for _ = 1, 8 do  -- (a few entries of callers gone are cleared per call)
    local head = redis.call('ZRANGE', qk, 0, 0, 'WITHSCORES')
    if #head == 0 or head[1] == call_id or tonumber(head[2]) >= rank then return false end
    if redis.call('EXISTS', P .. ':qa:' .. head[1]) == 1 then return true end
    redis.call('ZREM', qk, head[1])  -- gave up, was cancelled, or its process is gone
  end
  return false
end

local known = {}  -- settled spend seen by the budget checks, for the caller's outage fallback
local splits = {}  -- models split by another process (see MOVE), for a caller that has not split them
local function with_splits(err)
  if err[1] == 4 then err[6] = table.concat(splits, SEP) end
  return err
end
-- The budgets of scope sc: the refusal of the one that frees last (never: a call it can never
-- hold), if one refuses; else whether the call waits for reservations in flight.
local function budgets(sc)
  local rv = redis.call('HMGET', P .. ':rv:' .. sc.key, 'cost', 'req')
  local rcost, rreq = tonumber(rv[1]) or 0, tonumber(rv[2]) or 0
  local refused, frees, wait = nil, nil, false
  for _, b in ipairs(sc.buds) do
    local c, r = spent(sc.key, b.kind, b.start)
    known[#known + 1] = table.concat({sc.key, b.kind, b.start, fmt(c), fmt(r)}, SEP)
    local used, reserved, amount = c, rcost, cost
    if b.isreq then used, reserved, amount = r, rreq, 1 end
    local room = b.limit + 1e-9  -- (float rounding: a call that just fits, fits; as the engine's MONEY_SLACK)
    if used + 1e-9 >= b.limit or used + amount > room then  -- (spent up to rounding is spent: _engine)
      local f = b.frees
      if f < 0 or amount > room then f = 1e300 end
      if refused == nil or f > frees then
        refused, frees = {2, fmt(now), sc.key, b.name, b.kind, fmt(b.limit), fmt(used), fmt(amount), fmt(f)}, f
      end
    elseif used + reserved + amount > room then
      wait = true
    end
  end
  return refused, wait
end

local function check(sc)
  local retry, release, first = nil, false, nil
  local util = 0
  local st = nil
  if sc.provider then
    local v = redis.call('HMGET', P .. ':s:' .. sc.key, 'cooldown_until', 'pace_until', 'next_slot', 'circuit',
      'open_until', 'probe', 'learned_rpm', 'learned_tpm', 'adaptive_rpm', 'failures', 'learned_itpm', 'split',
      'learned_otpm')
    if v[12] and not sc.known then splits[#splits + 1] = sc.key end
    st = {cooldown = tonumber(v[1]) or 0, pace_until = tonumber(v[2]) or 0, next_slot = tonumber(v[3]) or 0,
      circuit = v[4] or 'closed', open_until = tonumber(v[5]) or 0, probe = v[6],
      rpm = tonumber(v[7]), tpm = tonumber(v[8]), arpm = tonumber(v[9]), failures = tonumber(v[10]) or 0,
      itpm = tonumber(v[11]), otpm = tonumber(v[13])}
    sc.st = st
    if st.cooldown > now then
      retry = st.cooldown
      first = {sc.key, 'provider_cooldown', 0}
      if st.cooldown > deadline then return nil, nil, nil, nil, {5, fmt(now), sc.key, fmt(st.cooldown)} end
    elseif st.pace_until > now and st.next_slot > now then
      retry = math.min(st.next_slot, st.pace_until)  -- (pacing ends at pace_until: _engine)
      first = {sc.key, 'pacing', 0}
    end
    if st.circuit == 'open' and now >= st.open_until then
      st.circuit = 'half_open'
      st.probe = nil
      redis.call('HSET', P .. ':s:' .. sc.key, 'circuit', 'half_open')
      redis.call('HDEL', P .. ':s:' .. sc.key, 'probe')
    end
    if st.circuit == 'open' then
      -- One block among the others (as Engine._check): every scope is still looked at, and the call
      -- comes back when the last of them frees; a refusal if it reopens only after the call's deadline.
      if st.open_until > deadline then
        return nil, nil, nil, nil, {4, fmt(now), sc.key, fmt(st.open_until), fmt(st.failures)}
      end
      if retry == nil or st.open_until > retry then retry = st.open_until end
      first = first or {sc.key, 'circuit_open', 0}
    elseif st.circuit == 'half_open' and st.probe then
      release = true
      first = first or {sc.key, 'circuit_half_open', 0}
    end
  end
  if #sc.buds > 0 then
    if sc.bud == nil then sc.bud = {budgets(sc)} end
    local refused, wait = sc.bud[1], sc.bud[2]
    if refused then return nil, nil, nil, nil, refused end
    if wait then
      release = true
      first = first or {sc.key, 'budget_reservations', 0}
    end
  end
  sc.totals = {}
  for w, win in ipairs(sc.wins) do
    local key = P .. ':w:' .. sc.key .. ':' .. win.name
    local total, width = window(key, win.period)
    sc.totals[w] = total
    local full = win.limit
    if full < 0 then  -- a limit learned from the provider (or none yet)
      if win.name == 'learned_requests_per_minute' then
        full = INF
        if st and st.rpm then full = st.rpm end
        if st and st.arpm and st.arpm < full then full = st.arpm end
      elseif win.name == 'learned_input_tokens_per_minute' then
        full = (st and st.itpm) or INF
      elseif win.name == 'learned_output_tokens_per_minute' then
        full = (st and st.otpm) or INF
      else
        full = (st and st.tpm) or INF
      end
    end
    if full ~= INF then
      local limit = full * share
      local amount = win.amount
      -- (larger than a limit learned from the provider: it goes alone, as in Engine._check)
      if amount > limit and win.limit < 0 then amount = limit end
      if total + amount > limit then
        if amount > full then
          return nil, nil, nil, nil, {3, fmt(now), sc.key, win.name, fmt(full), fmt(amount)}
        end
        local at = retry_at(key, total, width, win.period, amount + full - limit, full)
        if at == INF then release = true
        elseif retry == nil or at > retry then retry = at end
        first = first or {sc.key, win.name, math.max(limit - total, 0)}
      end
      if full > 0 and total / full > util then util = total / full end
    end
  end
  if sc.conc >= 0 then
    local ck = P .. ':c:' .. sc.key
    redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
    local n = redis.call('ZCARD', ck)
    local cap = sc.conc * share
    if share >= 1 then cap = math.max(cap, 1) end
    sc.waits = false
    if n >= cap then
      release = true
      first = first or {sc.key, 'concurrent_requests', 0}
      sc.waits = not sc.choice
      sc.full = true
    elseif not sc.choice and ahead_in_line(sc) then
      release = true
      first = first or {sc.key, 'queue', 0}
      sc.waits = true
    end
    if sc.conc > 0 and n / sc.conc > util then util = n / sc.conc end
  end
  return retry, release, first, util, nil
end

local retry, release, first = nil, false, nil
local eases = nil  -- the earliest time one of the failing scopes may stop blocking (Blocked.eases_at)
local failing = {}
local chosen, best = nil, nil
local alt_retry, alt_first, alt_any, alt_err = nil, nil, false, nil
local budget_err = nil  -- the budget refusal that frees last, of all scopes
-- Budgets before anything else (as Engine._evaluate): a call refused by a budget is told so, whatever
-- else holds it or can never fit.
for _, sc in ipairs(scopes) do
  if #sc.buds > 0 and not sc.choice then
    sc.bud = {budgets(sc)}
    local err = sc.bud[1]
    if err and (budget_err == nil or tonumber(err[9]) > tonumber(budget_err[9])) then budget_err = err end
  end
end
if budget_err then return budget_err end
for _, sc in ipairs(scopes) do
  local r, rel, b, util, err = check(sc)
  if err and err[1] == 2 and not sc.choice then
    if budget_err == nil or tonumber(err[9]) > tonumber(budget_err[9]) then budget_err = err end
  elseif err then
    if not sc.choice then return with_splits(err) end
    alt_err = alt_err or err
  elseif sc.choice then
    alt_any = true
    if b == nil then
      if best == nil or util < best then best, chosen = util, sc end
    else
      alt_first = alt_first or b
      if r ~= nil and (alt_retry == nil or r < alt_retry) then alt_retry = r end
    end
  elseif b ~= nil then
    failing[#failing + 1] = sc.key
    first = first or b
    release = release or rel
    if r ~= nil and (retry == nil or r > retry) then retry = r end
    if r ~= nil and (eases == nil or r < eases) then eases = r end
  end
end
if budget_err then return budget_err end
-- API keys with concurrency limits: one line for the provider's keys (a slot on any of them will do).
local keyline = nil
for _, sc in ipairs(scopes) do
  if sc.choice and sc.conc >= 0 then
    for _, c in ipairs(scopes) do
      if c.choice then keyline = {key = c.key .. ':keys', waits = false}; break end
    end
    break
  end
end
if keyline then
  if chosen ~= nil then
    if ahead_in_line(keyline) then
      keyline.waits = true
      failing[#failing + 1] = chosen.key
      first = first or {chosen.key, 'queue', 0}
      release = true
    end
  else
    for _, sc in ipairs(scopes) do if sc.choice and sc.full then keyline.waits = true end end
  end
end
if (alt_any or alt_err) and chosen == nil then
  if alt_err and not alt_first then return with_splits(alt_err) end
  for _, sc in ipairs(scopes) do if sc.choice then failing[#failing + 1] = sc.key end end
  first = first or alt_first
  if alt_retry == nil then release = true
  else
    if retry == nil or alt_retry > retry then retry = alt_retry end
    if eases == nil or alt_retry < eases then eases = alt_retry end
  end
end
if first ~= nil then
  -- In line where a slot is what it waits for (keeping its place); out of the line elsewhere.
  local waits = false
  local lines = {}
  for _, sc in ipairs(scopes) do
    if sc.conc >= 0 and not sc.choice then lines[#lines + 1] = sc end
  end
  if keyline then lines[#lines + 1] = keyline end
  for _, sc in ipairs(lines) do
    local qk = P .. ':q:' .. sc.key
    if sc.waits then
      redis.call('ZADD', qk, 'NX', now - prio * 1e6, call_id)
      keep(qk, 60000)
      waits = true
    else
      redis.call('ZREM', qk, call_id)
    end
  end
  if waits then redis.call('SET', P .. ':qa:' .. call_id, '1', 'PX', WAIT_ALIVE_MS) end
  local out = {0, fmt(now), first[1], first[2], fmt(first[3]), retry and fmt(retry) or '',
    release and 1 or 0, table.concat(splits, SEP), eases and fmt(eases) or ''}
  for _, k in ipairs(failing) do out[#out + 1] = k end
  return out
end

-- Admit: record usage and reservations in every scope, in one step.
if keyline then redis.call('ZREM', P .. ':q:' .. keyline.key, call_id) end
local bs, cs, pr = {}, {}, {}
for _, sc in ipairs(scopes) do
  if (not sc.choice) or sc == chosen then
    for _, win in ipairs(sc.wins) do
      add(P .. ':w:' .. sc.key .. ':' .. win.name, win.period, now, win.amount)
    end
    if sc.conc >= 0 then
      if not sc.choice then redis.call('ZREM', P .. ':q:' .. sc.key, call_id) end  -- (out of the line)
      redis.call('ZADD', P .. ':c:' .. sc.key, now + lease, call_id)
      keep(P .. ':c:' .. sc.key, math.ceil(lease * 2000))  -- never shortened: other processes' leases may be longer
      cs[#cs + 1] = sc.key
    end
    if #sc.buds > 0 then
      redis.call('HINCRBYFLOAT', P .. ':rv:' .. sc.key, 'cost', cost)
      redis.call('HINCRBY', P .. ':rv:' .. sc.key, 'req', 1)
      keep(P .. ':rv:' .. sc.key, record_ms(lease))  -- outlives every lease record in it
      bs[#bs + 1] = sc.key
    end
    if sc.st then
      local st = sc.st
      local sk = P .. ':s:' .. sc.key
      if st.pace_until > now then
        local interval = tonumber(redis.call('HGET', sk, 'pace_interval')) or 0
        redis.call('HSET', sk, 'next_slot', math.max(st.next_slot, now) + interval)
      end
      if st.circuit == 'half_open' and not st.probe then
        redis.call('HSET', sk, 'probe', call_id)
        pr[#pr + 1] = sc.key
      end
    end
  end
end
-- A lease record only where something must be given back if the caller never settles: a
-- concurrency slot, a budget reservation or a circuit probe. Plain rate windows need none.
local record = #bs > 0 or #cs > 0 or #pr > 0
if record then
  local lk = P .. ':l:' .. call_id
  redis.call('HSET', lk, 'cost', cost, 'bs', table.concat(bs, SEP), 'cs', table.concat(cs, SEP),
    'pr', table.concat(pr, SEP), 'sp', sp, 'at', now)
  redis.call('HDEL', lk, 'done', 'used')
  redis.call('PEXPIRE', lk, record_ms(lease))
  redis.call('ZADD', P .. ':leases', now + lease, call_id)
  keep(P .. ':leases', record_ms(lease))
end
local out = {1, fmt(now), chosen and chosen.key or '', record and 1 or 0, record and boot_id(record_ms(lease)) or '',
  table.concat(splits, SEP)}
for _, k in ipairs(known) do out[#out + 1] = k end
return out
"""

#: ARGV: prefix, now|'', call_id, has_record(0/1), admitted_at, sent_at(''=unknown), spend targets
#:   ('\0'-joined, in the windows current at settlement; '' = those of the lease record), reserved cost,
#:   actual cost, tokens, margin, mode (0: settle and end; 1: free the slot only; 2: settle the usage only,
#:   the call stays open; 3: end a call whose usage mode 2 settled),
#:   outcome, wait(''=none), signals: limit_req, limit_tok, rem_req, reset_req, rem_tok, reset_tok, limit_input,
#:   limit_output (''=none),
#:   pace_default, circuit threshold, cooldown, max cooldown, adaptive(0/1), decrease, adaptive min,
#:   nthr, [threshold]*, nscopes, then per scope:  (outcome 'void': an admission whose answer was lost)
#:     key, provider(0/1; 2: signals apply, but the headers give another scope's limits; 3, 4: 1, 2 of a
#:     model this process split already), rate(''=none),
#:     nwin, [name, period, amount(estimated), actual, isreq(0/1)]*,
#:     nbud, [name, kind, start, limit, isreq, ttl]*,
#:   boot (the dataset id the admission returned with its lease record; '' = none),
#:   then sid, seq, low ('' = none; see first_time): numbers a settlement without a lease record, which
#:   a replay would otherwise apply twice
#: Returns {settled(0/1), now, events...} where each event is a '\0'-joined string ('split', scope: a
#: model another process split, see MOVE).
SETTLE = _COMMON + r"""
local call_id = arg()
local has_record = arg() == '1'
local at_arg = num()
local sent_at = num()
local sp_arg = arg()
local reserved = num()
local cost = num()
local tokens = num()
local margin = arg() or ''
local recounted = string.sub(margin, 1, 1) == 'r'  -- its request counted again from its send (RECOUNT)
if recounted then margin = string.sub(margin, 2) end
margin = tonumber(margin)
local mode = arg()
-- '1': only free its slot (a stream ended, its usage comes later); '2': only settle its usage (windows,
-- spend, budget reservation: Engine.settle), the call stays open (slots, lease); '3': the end of a call
-- settled so already: free what it holds and apply its outcome, nothing more of its usage; '0': both.
local freeing, usage_only, ending = mode == '1', mode == '2', mode == '3'
local outcome = arg()
local wait = num()
local sig = {lreq = num(), ltok = num(), rreq = num(), sreq = num(), rtok = num(), stok = num()}
sig.linp = num()
sig.lout = num()
local pace_default = num()
local threshold, cooldown, max_cooldown = num(), num(), num()
local adaptive, decrease, amin = arg() == '1', num(), num()
local nthr = num()
local thresholds = {}
for j = 1, nthr do thresholds[j] = num() end
local nscopes = num()
local scopes = {}
for s = 1, nscopes do
  local sc = {key = arg(), provider = arg(), rate = num(), wins = {}, buds = {}}
  sc.known = sc.provider == '3' or sc.provider == '4'  -- (split here already: see MOVE)
  sc.learns = sc.provider == '1' or sc.provider == '3'  -- ('2': signals apply, but its headers give another
  sc.provider = sc.learns or sc.provider == '2' or sc.provider == '4'  -- scope's limits)
  for w = 1, num() do
    sc.wins[w] = {name = arg(), period = num(), amount = num(), actual = num(), isreq = arg() == '1'}
  end
  for b = 1, num() do
    sc.buds[b] = {name = arg(), kind = arg(), start = arg(), limit = num(), isreq = arg() == '1', ttl = num()}
  end
  scopes[s] = sc
end
local boot = arg() or ''
local once_sid, once_seq, once_low = arg(), arg(), arg()
if not has_record and not freeing and not first_time(once_sid, once_seq, once_low) then
  return {0, fmt(now)}  -- written before: its answer was lost, this is the replay
end
local events = {}
local admitted_at, expired, sp_str = at_arg, false, sp_arg
local lost, rec = false, nil
if has_record then
  rec = redis.call('HMGET', P .. ':l:' .. call_id, 'at', 'done', 'cost', 'bs', 'cs', 'sp', 'pr', 'used')
  if not rec[1] or rec[2] == 'settled' then
    if rec[1] or freeing or boot == '' or redis.call('GET', P .. ':boot') == boot then
      return {0, fmt(now)}  -- settled before, or reclaimed (its worst case charged)
    end
    lost = true  -- gone with the data it was in (a restart without persistence): charged below
    -- and marked settled, so that this settlement sent again (its answer lost) charges nothing
    redis.call('HSET', P .. ':l:' .. call_id, 'at', fmt(at_arg or now), 'done', 'settled')
    redis.call('PEXPIRE', P .. ':l:' .. call_id, 2 * 86400 * 1000)
  end
end
if has_record and not lost then
  local lk = P .. ':l:' .. call_id
  if outcome == 'void' then  -- an admission whose answer was lost: the caller never had it
    for _, s in ipairs(split(rec[7])) do
      if redis.call('HGET', P .. ':s:' .. s, 'probe') == call_id then redis.call('HDEL', P .. ':s:' .. s, 'probe') end
    end
  end
  admitted_at = tonumber(rec[1])
  expired = rec[2] == 'expired'
  if sp_arg == '' then sp_str = rec[6] end  -- (the windows current at settlement, when given)
  if rec[8] then
    if usage_only then return {0, fmt(now)} end  -- (its usage settled before)
    ending = true  -- its usage settled before (mode '2'): what is left is to free it
  elseif usage_only then
    -- settled, still open: its budget reservation is given back (its spend is charged below), its
    -- slots and lease stay (reclaim frees them, charging nothing more). Marked by a field of its
    -- own, not 'done', with no reservation or spend targets left: a process of an earlier release
    -- reclaims the record as any other (frees its slots and probe) and finds nothing to charge.
    -- (Reclaimed already: kept too, for its release's outcome; it expires in an hour.)
    if not expired then
      for _, s in ipairs(split(rec[4])) do unreserve(s, reserved) end
    end
    redis.call('HSET', lk, 'used', '1', 'bs', '', 'sp', '')
  end
end
if has_record and not lost and not usage_only then
  local lk = P .. ':l:' .. call_id
  redis.call('ZREM', P .. ':leases', call_id)
  for _, s in ipairs(split(rec[5])) do redis.call('ZREM', P .. ':c:' .. s, call_id) end
  if freeing then
    -- a stream ended but its usage comes later: free the slot, keep the reservation open
    redis.call('HSET', lk, 'cs', '')
    return {0, fmt(now)}
  end
  if not expired then  -- (none left after mode '2')
    for _, s in ipairs(split(rec[4])) do unreserve(s, reserved) end
  end
  redis.call('DEL', lk)  -- settled: a second settlement finds nothing and does nothing
elseif freeing then
  return {0, fmt(now)}
end

for _, sc in ipairs(ending and {} or scopes) do  -- (ending: its usage was settled before)
  -- (a lost record's windows went with it: nothing there to correct)
  for _, win in ipairs(lost and {} or sc.wins) do
    local key = P .. ':w:' .. sc.key .. ':' .. win.name
    local width = win.period / BUCKETS
    local idx = fdiv(admitted_at, width)
    local live = (idx + 1) * width + win.period > now
    if win.isreq and outcome == 'void' then  -- never sent: its request is taken back
      if live then bump(key, idx, -win.amount) end
    elseif win.isreq then
      if recounted and sent_at then  -- (counted from its send already: moved on from there)
        idx = fdiv(sent_at, width)
        live = (idx + 1) * width + win.period > now
      end
      -- count the request from when it may have reached the provider (as SlidingWindow.move: taken
      -- from its bucket while that still counts, and counted from then while that still counts,
      -- even when the bucket it was admitted in has already left the window)
      if margin > 0 then
        -- from the send when known (time in the caller's pipeline is not time on the wire); a
        -- call done soon after its send had arrived by its end; a long one early on
        local start = sent_at or admitted_at
        local to = start + math.min(margin, win.period / 10)
        if now - start <= math.min(margin, win.period / 2) then to = now end
        to = math.min(to, now)
        local nidx = fdiv(to, width)
        if nidx ~= idx then
          if live then bump(key, idx, -win.amount) end
          if (nidx + 1) * width + win.period > now then
            add(key, win.period, to, win.amount)
          end
        end
      end
    else
      local delta = win.actual - win.amount
      if delta ~= 0 then
        if live then
          bump(key, idx, delta)
        elseif delta > 0 then
          add(key, win.period, now, delta)
        end
      end
    end
  end
end

-- Spend: actual cost (an expired lease was already charged its worst case: correct it).
local spend_cost, spend_req = cost, 1
if expired then spend_cost, spend_req = cost - reserved, 0 end
if outcome == 'void' then spend_req = spend_req - 1 end  -- (cost is 0: nothing was sent)
local sp = split(sp_str)
if ending then sp = {} end
for j = 1, #sp, 4 do
  charge(sp[j], sp[j + 1], sp[j + 2], tonumber(sp[j + 3]), spend_cost, spend_req, tokens)
end

-- Budget thresholds crossed: announced once per window across all processes, and again for a
-- budget raised or lowered since (the mark holds the limit it was announced for).
for _, sc in ipairs(ending and {} or scopes) do
  for _, b in ipairs(sc.buds) do
    local c, r = spent(sc.key, b.kind, b.start)
    events[#events + 1] = table.concat({'spent', sc.key, b.kind, b.start, fmt(c), fmt(r)}, SEP)
    local used = c
    if b.isreq then used = r end
    local marks = {}
    for _, thr in ipairs(thresholds) do marks[#marks + 1] = thr end
    marks[#marks + 1] = 1.0
    for _, thr in ipairs(marks) do
      if used < thr * b.limit then break end
      local mk = P .. ':mark:' .. sc.key .. ':' .. b.kind .. ':' .. b.start .. ':' .. thr
      local lim = fmt(b.limit)
      if redis.call('GET', mk) ~= lim then
        redis.call('SET', mk, lim, 'EX', b.ttl)
        events[#events + 1] = table.concat({'budget', sc.key, b.name, b.kind, fmt(thr), fmt(used),
          fmt(b.limit)}, SEP)
      end
    end
  end
end

-- Provider signals (model and API-key scopes).
for _, sc in ipairs(scopes) do
  if sc.provider and not usage_only then  -- (settled, still open: its outcome comes at its end)
    local sk = P .. ':s:' .. sc.key
    local v = redis.call('HMGET', sk, 'cooldown_until', 'circuit', 'probe', 'failures', 'open_count',
      'adaptive_rpm', 'adaptive_ceiling', 'rate_limited_at', 'learned_rpm', 'adaptive_cut_at', 'split')
    if v[11] and not sc.known then
      events[#events + 1] = table.concat({'split', sc.key}, SEP)
    elseif sc.known and not v[11] then  -- (its mark expired, or went with a restart: set again)
      redis.call('HSET', sk, 'split', '1')
    end
    local st = {cooldown = tonumber(v[1]) or 0, circuit = v[2] or 'closed', probe = v[3],
      failures = tonumber(v[4]) or 0, open_count = tonumber(v[5]) or 0, arpm = tonumber(v[6]),
      ceiling = tonumber(v[7]) or INF, rl_at = tonumber(v[8]) or -INF, rpm = tonumber(v[9]), rate = sc.rate,
      cut_at = tonumber(v[10]) or -INF}
    -- (not the model's scope of a call sent with a pool's key: its headers speak of that key)
    if sc.learns then
      if sig.lreq then redis.call('HSET', sk, 'learned_rpm', sig.lreq); st.rpm = sig.lreq end
      if sig.ltok and sig.ltok < 0 then redis.call('HDEL', sk, 'learned_tpm')  -- (no limit to learn: read_signals)
      elseif sig.ltok then redis.call('HSET', sk, 'learned_tpm', sig.ltok) end
      if sig.linp then redis.call('HSET', sk, 'learned_itpm', sig.linp) end
      if sig.lout then redis.call('HSET', sk, 'learned_otpm', sig.lout) end
      local resets = 0
      if sig.rreq == 0 and sig.sreq then
        local r = sig.sreq
        if sig.lreq and sig.lreq > 0 then r = sig.sreq / sig.lreq end
        resets = math.max(resets, r)
      end
      if sig.rtok == 0 and sig.stok then
        local r = sig.stok
        if sig.ltok and sig.ltok > 0 then r = sig.stok / sig.ltok end
        resets = math.max(resets, r)
      end
      if resets > 0 and now + resets > st.cooldown then
        st.cooldown = now + resets
        redis.call('HSET', sk, 'cooldown_until', st.cooldown)
      end
    end
    if outcome == 'success' then
      if st.circuit == 'closed' then  -- (while open, only the probe's success counts: _engine)
        if st.failures > 0 then redis.call('HSET', sk, 'failures', 0) end
      elseif st.probe == call_id then
        redis.call('HSET', sk, 'circuit', 'closed', 'open_count', 0, 'failures', 0)
        redis.call('HDEL', sk, 'probe')
        events[#events + 1] = table.concat({'circuit_closed', sc.key}, SEP)
      end
      if st.arpm then
        local a = st.arpm + math.max(0.05, 1.0 / math.max(st.arpm, 1.0))  -- as ADAPTIVE_STEP in _engine.py
        if a >= st.ceiling then redis.call('HDEL', sk, 'adaptive_rpm')
        else redis.call('HSET', sk, 'adaptive_rpm', a) end
      end
    elseif outcome == 'rate_limited' or outcome == 'failure' then
      if outcome == 'rate_limited' then
        local until_ = now + (wait or 1.0)
        if until_ > st.cooldown then st.cooldown = until_ end
        local rate = nil
        local limits = {}
        if st.rpm then limits[#limits + 1] = st.rpm end
        if st.arpm then limits[#limits + 1] = st.arpm end
        for _, l in ipairs(limits) do if rate == nil or l / 60 < rate then rate = l / 60 end end
        if st.rate and (rate == nil or st.rate < rate) then rate = st.rate end
        local interval = pace_default
        if rate and rate > 0 then interval = 1.0 / rate end
        redis.call('HSET', sk, 'cooldown_until', st.cooldown, 'pace_interval', interval,
          'pace_until', st.cooldown + math.max(2.0 * (until_ - now), 1.0), 'next_slot', st.cooldown,
          'rate_limited_at', now)
        if adaptive and now - st.rl_at < 60.0 and now - st.cut_at >= 60.0 then  -- (once a minute: _engine)
          local ow = P .. ':w:' .. sc.key .. ':learned_requests_per_minute'
          local total = window(ow, 60.0)
          if not (total < amin and st.arpm == nil) then
            -- the pace it was sent at, per minute (a burst younger than a minute: over its age,
            -- at least a second), as in _engine.Engine._cool_down
            -- (its oldest bucket holding a request: 'O' may be older, the window's low edge)
            local o = nil
            local raw = redis.call('HGETALL', ow)
            for j = 1, #raw, 2 do
              local idx = tonumber(raw[j])
              if idx and (tonumber(raw[j + 1]) or 0) > 0 and (o == nil or idx < o) then o = idx end
            end
            local span = 60.0
            if o then span = math.min(math.max(now - o * (60.0 / BUCKETS), 1.0), 60.0) end
            local rate = total * 60.0 / span
            local current = st.arpm or rate
            if st.arpm == nil then redis.call('HSET', sk, 'adaptive_ceiling', math.max(rate, 1.0) * 2.0) end
            local cut = math.max(amin * decrease, math.min(current, rate) * decrease)
            redis.call('HSET', sk, 'adaptive_rpm', cut, 'adaptive_cut_at', now)
            -- The window keeps at most the new limit, its buckets scaled down: calls go on at the
            -- new pace rather than stop until the old pace's minute drains (SlidingWindow.shrink_to).
            local lim = cut
            if st.rpm and st.rpm < lim then lim = st.rpm end
            -- (not when it holds more than a limit the headers gave: a real one, see _engine)
            if total > lim and total > 0 and not (st.rpm and total > st.rpm) then
              local f = lim / total
              local raw = redis.call('HGETALL', ow)
              local kept = 0
              for j = 1, #raw, 2 do
                if tonumber(raw[j]) then
                  local x = tonumber(raw[j + 1]) * f
                  kept = kept + x
                  redis.call('HSET', ow, raw[j], x)
                end
              end
              redis.call('HSET', ow, 'T', kept)
            end
          end
        end
      end
      local failures = st.failures + 1
      redis.call('HSET', sk, 'failures', failures)
      local probe_failed = st.circuit == 'half_open' and st.probe == call_id
      if probe_failed or (st.circuit == 'closed' and failures >= threshold) then
        local oc = st.open_count + 1
        local length = math.min(cooldown * 2 ^ (oc - 1), max_cooldown)
        redis.call('HSET', sk, 'circuit', 'open', 'open_count', oc, 'open_until', now + length)
        redis.call('HDEL', sk, 'probe')
        events[#events + 1] = table.concat({'circuit_opened', sc.key, fmt(length), fmt(failures)}, SEP)
      end
    elseif st.probe == call_id then
      redis.call('HDEL', sk, 'probe')
    end
    redis.call('EXPIRE', sk, 86400)
  end
end
local out = {1, fmt(now)}
for _, e in ipairs(events) do out[#out + 1] = e end
return out
"""

#: ARGV: prefix, now|'', admitted_at, nwin, [scope, name, period]*  -- a call sent late: its
#: request counted from now instead of from its admission (see Engine._recount)
RECOUNT = _COMMON + r"""
local admitted_at = num()
for w = 1, num() do
  local key = P .. ':w:' .. arg() .. ':' .. arg()
  local period = num()
  local width = period / BUCKETS
  local idx = fdiv(admitted_at, width)
  if (idx + 1) * width + period > now and (tonumber(redis.call('HGET', key, idx)) or 0) >= 1 then
    bump(key, idx, -1)
  end
  add(key, period, now, 1)
end
return fmt(now)
"""

#: ARGV: prefix, now|'', nwin, [scope, name, period, amount]*  -- add usage (a retry LiteLLM sent)
HIT = _COMMON + r"""
for w = 1, num() do
  local key = P .. ':w:' .. arg() .. ':' .. arg()
  local period = num()
  add(key, period, now, num())
end
return fmt(now)
"""

#: ARGV: prefix, now|'', nwin, [scope, name, period]*, nconc, [scope]*, nstate, [scope]*,
#:   nspend, [scope, kind, start]*, nres, [scope]*
#: Returns totals, concurrency counts, provider state, spend and reservations, for stats.
PEEK = _COMMON + r"""
local out = {fmt(now)}
local w = {}
for j = 1, num() do
  local key = P .. ':w:' .. arg() .. ':' .. arg()
  local total = window(key, num())
  w[j] = fmt(total)
end
out[#out + 1] = w
local c = {}
for j = 1, num() do
  local ck = P .. ':c:' .. arg()
  redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
  c[j] = redis.call('ZCARD', ck)
end
out[#out + 1] = c
local s = {}
for j = 1, num() do
  local v = redis.call('HGETALL', P .. ':s:' .. arg())
  s[j] = table.concat(v, SEP)
end
out[#out + 1] = s
local sp = {}
for j = 1, num() do
  local scope, kind, start = arg(), arg(), arg()
  local cost, req, tok = spent(scope, kind, start)
  sp[j] = table.concat({fmt(cost), fmt(req), fmt(tok)}, SEP)
end
out[#out + 1] = sp
local rv = {}
for j = 1, num() do
  local v = redis.call('HMGET', P .. ':rv:' .. arg(), 'cost', 'req')
  rv[j] = (v[1] or '0') .. SEP .. (v[2] or '0')
end
out[#out + 1] = rv
return out
"""

#: ARGV: prefix, now|'', nscope, [scope]*, nkind, [kind, start]*, nthr, [threshold]*
#:   -- forget settled spend and the warnings sent in the current windows (budget reset)
RESET = _COMMON + r"""
local n = 0
local scopes, windows, marks = {}, {}, {}
for j = 1, num() do scopes[j] = arg() end
for j = 1, num() do windows[j] = {arg(), arg()} end
for j = 1, num() do marks[j] = num() end
marks[#marks + 1] = 1.0
for _, scope in ipairs(scopes) do
  for _, kind in ipairs({'hour', 'day', 'month', 'run'}) do
    n = n + redis.call('DEL', spend_key(scope, kind))
  end
  -- the exact keys SETTLE sets (a SCAN pattern would also match other scopes' marks)
  for _, w in ipairs(windows) do
    for _, thr in ipairs(marks) do
      redis.call('DEL', P .. ':mark:' .. scope .. ':' .. w[1] .. ':' .. w[2] .. ':' .. thr)
    end
  end
end
return n
"""

#: ARGV: prefix, now|'', source, target  -- a model's provider signals (and the requests and tokens
#: counted toward its learned limits) now hold for one endpoint only: the model turned out to be
#: served by more than one. Nothing moves when the model has none, or the endpoint has its own
#: already. The model's hash keeps (or gets) the mark ``split``: ADMIT and SETTLE tell it to the
#: processes that have seen the model at one endpoint only, and they split it too. It lives as long
#: as the rest of the hash: a day, renewed by every settlement that reads it.
MOVE = _COMMON + r"""
local src, dst = arg(), arg()
local s, d = P .. ':s:' .. src, P .. ':s:' .. dst
redis.call('HDEL', s, 'split')  -- (the model's, not the endpoint's; a hash of the mark alone goes with it)
local moved = 0
if redis.call('EXISTS', s) == 1 then
  moved = 1
  if redis.call('EXISTS', d) == 1 then
    -- Another process split this model first: the endpoint keeps what it has, takes what it lacks
    -- of what this process' calls told the model since, and the model keeps nothing (every
    -- endpoint's calls carry it).
    local flat = redis.call('HGETALL', s)
    for i = 1, #flat, 2 do redis.call('HSETNX', d, flat[i], flat[i + 1]) end
    redis.call('DEL', s)
  else
    redis.call('RENAME', s, d)
  end
  redis.call('HDEL', d, 'probe')  -- (a probe in flight is the model's: its outcome lands there)
  for _, name in ipairs({'learned_requests_per_minute', 'learned_tokens_per_minute',
                         'learned_input_tokens_per_minute', 'learned_output_tokens_per_minute'}) do
    local w = P .. ':w:' .. src .. ':' .. name
    local dw = P .. ':w:' .. dst .. ':' .. name
    local ttl = redis.call('PTTL', w)
    if ttl > 0 and redis.call('EXISTS', dw) == 0 then  -- (not COPY: Redis before 6.2 has none)
      local flat = redis.call('HGETALL', w)
      for i = 1, #flat, 2 do redis.call('HSET', dw, flat[i], flat[i + 1]) end
      redis.call('PEXPIRE', dw, ttl)
    end
  end
end
redis.call('HSET', s, 'split', '1')
redis.call('EXPIRE', s, 86400)  -- (as SETTLE's signals)
return moved
"""

#: ARGV: prefix, now|'', call_id, nscopes, [scope]*  -- a caller stopped waiting: out of those lines
LEAVE = _COMMON + r"""
local call_id = arg()
for _ = 1, num() do redis.call('ZREM', P .. ':q:' .. arg(), call_id) end
redis.call('DEL', P .. ':qa:' .. call_id)
return 1
"""

#: ARGV: prefix, now|'', call_id, lease_seconds  -- a stream is still delivering: extend its lease
RENEW = _COMMON + r"""
local call_id, lease = arg(), num()
local lk = P .. ':l:' .. call_id
local rec = redis.call('HMGET', lk, 'cs', 'done', 'bs')
if rec[2] or not rec[1] then return 0 end
local ms = record_ms(lease)
-- the keys holding its slots and reservations live as long as it does
for _, s in ipairs(split(rec[1])) do
  redis.call('ZADD', P .. ':c:' .. s, now + lease, call_id)
  keep(P .. ':c:' .. s, ms)
end
for _, s in ipairs(split(rec[3])) do keep(P .. ':rv:' .. s, ms) end
redis.call('ZADD', P .. ':leases', now + lease, call_id)
keep(P .. ':leases', ms)
redis.call('PEXPIRE', lk, ms)
return 1
"""

#: ARGV: prefix, now|'', n, [scope, kind, start, ttl, cost, requests, tokens]*, sid, seq, low  -- spend
#: of calls Redis did not admit (settled while it was unreachable, or admitted uncounted)
CHARGE = _COMMON + r"""
local rows = {}
for j = 1, num() do
  local scope, kind, start, ttl = arg(), arg(), arg(), num()
  local cost, req, tok = num(), num(), num()
  rows[j] = {scope, kind, start, ttl, cost, req, tok}
end
if not first_time(arg(), arg(), arg()) then return 0 end
for _, r in ipairs(rows) do charge(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) end
return 1
"""
