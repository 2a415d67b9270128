"""Which Redis client a cluster node uses for its ``--redis-url``: a plain one, or redis-py's cluster client."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio.cluster import RedisCluster

from tests.redis_cluster_support import RedisClusterNodes
from tollway.cli.node import redis_client
from tollway.redis.server import EmbeddedRedis


async def test_a_plain_redis_gets_a_plain_client(redis_server: EmbeddedRedis) -> None:
    """A Redis without cluster mode: the plain client, which answers."""
    client = await redis_client(redis_server.url)
    try:
        assert not isinstance(client, RedisCluster)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_redis_that_does_not_answer_is_taken_for_a_plain_one(tmp_path: Path) -> None:
    """Nothing listening: after a few attempts, a plain client (the projectors wait for Redis)."""
    client = await redis_client(f"unix://{tmp_path / 'nobody.sock'}")
    try:
        assert not isinstance(client, RedisCluster)
    finally:
        await client.aclose()


async def test_a_redis_cluster_gets_the_cluster_client(tmp_path: Path) -> None:
    """Any master of a Redis Cluster: redis-py's cluster client, which reaches every slot."""
    masters = RedisClusterNodes(tmp_path)
    try:
        await masters.start()
        client = await redis_client(masters.url)
        try:
            assert isinstance(client, RedisCluster)
            for n in range(8):  # keys of eight hash tags, on the three masters
                await client.set(f"tw:{{{n}}}:probe", str(n))
            assert [str(n).encode() for n in range(8)] == [await client.get(f"tw:{{{n}}}:probe") for n in range(8)]
        finally:
            await client.aclose()
    finally:
        masters.close()
