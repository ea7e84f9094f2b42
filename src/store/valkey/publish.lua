#!lua name=pulsar
--[[
pulsar-relay's Valkey Function library: the one way the relay appends to a topic's stream.

Loaded by every relay when a connection is (re)established (`FUNCTION LOAD`, `REPLACE` only
over an older version: see `src/valkey/library.rs`), so relays of different versions on one
Valkey never downgrade it. A new version must keep every function older relays call, with
the same arguments and replies (add functions or trailing, optional arguments; never change
what an existing one means), because an older relay keeps calling whatever is loaded.
The version is in each function's description (`version <n>`); `src/store/valkey/function.rs`
holds the same number (a unit test keeps them equal).

pulsar_publish: appends a batch of entries to ONE topic's stream, atomically with the
idempotency check of each, and notifies the topic's feed channel.

  KEYS[1]   the topic's stream key           (valkey.stream_key)
  KEYS[2]   the topic's meta hash key        (valkey.meta_key)
  KEYS[3..] the idempotency keys of the batch (valkey.idempotency_key + the client's key)
  Every key a call touches is in KEYS, all rendered from the topic's templates, so they share
  the topic's hash slot once the templates carry a hash tag (Valkey Cluster).

  ARGV[1]   MAXLEN bound (approximate: `MAXLEN ~`) of every XADD
  ARGV[2]   idempotency window in milliseconds (`SET ... PX`)
  ARGV[3]   the meta hash's `created` time for a topic new to the caller, or '' to leave the
            meta hash alone
  ARGV[4]   the publishing relay's instance id (the feed notification's first word)
  then six arguments per entry, in order:
    id         '*' (Valkey picks the id) or an explicit id (`ack: buffered` write-behind)
    key        index into KEYS of the entry's idempotency key, '0' for none
    payload    the message's JSON text
    timestamp  RFC 3339 acceptance time
    metadata   compact JSON object, '' for none
    ttl        seconds, '' for none

  Per entry, in order: if it has an idempotency key and that key exists, nothing is written
  and the entry's reply is a one-element array holding the key's value, `<id> <timestamp>` of
  the publish that first used the key (a duplicate). Otherwise
  `XADD <stream> MAXLEN ~ <n> <id> payload .. timestamp .. [metadata ..] [ttl ..]`, and on
  success `SET <key> "<id> <timestamp>" PX <window>`; the reply is the new id (a bulk string),
  or the XADD's error (an error element; the other entries go on, as separate XADDs in one
  pipeline would).

  After the batch, if anything was stored: the meta hash's `created` (HSETNX) and PERSIST
  (a deleted topic's meta is an expiring tombstone; written again, it stays), then
  `SPUBLISH <stream key>:feed "<instance id> <last stored id>"`: the cross-relay notification
  that the topic's stream grew up to that id (one per call, not per entry).

  Reads of idempotency keys and the XADDs use pcall: a key of the wrong type (written by
  something else) fails its entry, never the entries already written in this call.

pulsar_append (version 2): the same call, keys and arguments as pulsar_publish, and the same
per-entry replies after one more leading element: the id of the stream's newest entry before
the call appended anything ('0-0' for an empty or missing stream). With it a relay knows, for
each entry it stored, which entry precedes it in the stream, so it can tell without another
round trip whether anyone else appended between its own entries (`store/stream_sync.rs`).

pulsar_group_ack (version 3): acknowledges ids in a consumer group of a topic's stream,
except those held for dead-lettering, atomically per id (`store/valkey/group.rs`): an
acknowledgement and a dead-lettering of one message must never both succeed.

  KEYS[1]   the topic's stream key
  ARGV[1]   the group
  ARGV[2]   the name of the dead-letter holder (entries it holds are not acknowledged)
  ARGV[3..] the ids
  Reply: one integer per id: 1 acknowledged by this call, 0 not pending in the group or held
  for dead-lettering. A missing group is the XPENDING's NOGROUP error.
]]

local VERSION = 3

local ENTRY_ARGS = 6
local HEADER_ARGS = 4

local function append(keys, args, with_tip)
  local stream, meta = keys[1], keys[2]
  local maxlen, window, created, instance = args[1], args[2], args[3], args[4]
  local replies = {}
  if with_tip then
    -- pcall: a key of the wrong type fails each entry's XADD below, as with pulsar_publish.
    local newest = redis.pcall('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if type(newest) == 'table' and not newest.err and newest[1] then
      replies[1] = newest[1][1]
    else
      replies[1] = '0-0'
    end
  end
  local last = nil
  local n = (#args - HEADER_ARGS) / ENTRY_ARGS
  for i = 0, n - 1 do
    local at = HEADER_ARGS + i * ENTRY_ARGS
    local id, key_index = args[at + 1], tonumber(args[at + 2])
    local payload, timestamp = args[at + 3], args[at + 4]
    local metadata, ttl = args[at + 5], args[at + 6]
    local key = nil
    if key_index and key_index > 0 then
      key = keys[key_index]
    end
    local seen = false
    if key then
      seen = redis.pcall('GET', key)
    end
    if type(seen) == 'table' and seen.err then
      replies[#replies + 1] = seen
    elseif seen then
      replies[#replies + 1] = { seen }
    else
      local command = { 'XADD', stream, 'MAXLEN', '~', maxlen, id,
        'payload', payload, 'timestamp', timestamp }
      if metadata ~= '' then
        command[#command + 1] = 'metadata'
        command[#command + 1] = metadata
      end
      if ttl ~= '' then
        command[#command + 1] = 'ttl'
        command[#command + 1] = ttl
      end
      local added = redis.pcall(unpack(command))
      if type(added) == 'table' and added.err then
        replies[#replies + 1] = added
      else
        if key then
          redis.call('SET', key, added .. ' ' .. timestamp, 'PX', window)
        end
        last = added
        replies[#replies + 1] = added
      end
    end
  end
  if last then
    if created ~= '' then
      redis.call('HSETNX', meta, 'created', created)
      redis.call('PERSIST', meta)
    end
    redis.call('SPUBLISH', stream .. ':feed', instance .. ' ' .. last)
  end
  return replies
end

local function group_ack(keys, args)
  local stream, group, dead = keys[1], args[1], args[2]
  local replies = {}
  for i = 3, #args do
    local id = args[i]
    local pending = redis.call('XPENDING', stream, group, id, id, 1)
    if #pending == 1 and pending[1][2] ~= dead then
      replies[#replies + 1] = redis.call('XACK', stream, group, id)
    else
      replies[#replies + 1] = 0
    end
  end
  return replies
end

redis.register_function {
  function_name = 'pulsar_group_ack',
  callback = group_ack,
  description = 'version ' .. VERSION,
}

redis.register_function {
  function_name = 'pulsar_publish',
  callback = function(keys, args) return append(keys, args, false) end,
  description = 'version ' .. VERSION,
}

redis.register_function {
  function_name = 'pulsar_append',
  callback = function(keys, args) return append(keys, args, true) end,
  description = 'version ' .. VERSION,
}
