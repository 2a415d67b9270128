-- finalize_promote.lua: make due retries deliverable again.
--
-- KEYS[1]  the delayed-retry sorted set
-- KEYS[2]  the finalize stream
-- ARGV[1]  now, in ms
-- ARGV[2]  the most messages to move in this call
--
-- Every member with score <= now (oldest first, at most ARGV[2]) is added to the stream
-- with its fields and removed from the set, in one atomic step. Members are JSON objects of
-- string fields (cjson only sees strings: no amount becomes a Lua number). Returns the
-- number of messages moved.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local fields = cjson.decode(member)
  local flat = {}
  for name, value in pairs(fields) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  redis.call('XADD', KEYS[2], '*', unpack(flat))
  redis.call('ZREM', KEYS[1], member)
end
return #due
