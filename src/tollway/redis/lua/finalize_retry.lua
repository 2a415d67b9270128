-- finalize_retry.lua: move a finalize message out of the stream until its retry is due.
--
-- KEYS[1]  the finalize stream
-- KEYS[2]  the delayed-retry sorted set (score: due time in ms)
-- ARGV[1]  the consumer group
-- ARGV[2]  the message id being retried
-- ARGV[3]  due time in ms (integer)
-- ARGV[4]  the message to send again, as JSON (its fields, with the next attempt number)
--
-- Acknowledges and deletes the current message and schedules the next one in one step, so a
-- crash can neither lose the retry nor leave both. Returns 1. Idempotent for a given message
-- id: a repeated call re-adds the same member with the same score.

redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
