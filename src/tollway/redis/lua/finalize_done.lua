-- finalize_done.lua: a finalize message is finished (its outcome is durable in the WAL).
--
-- KEYS[1]  the finalize stream
-- ARGV[1]  the consumer group
-- ARGV[2]  the message id
--
-- Acknowledges the message and deletes it from the stream, atomically, so a finished message
-- is neither redelivered nor kept. Returns the number of messages acknowledged (0 or 1).
-- Idempotent: a second call acknowledges and deletes nothing.

local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
