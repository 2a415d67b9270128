"""Cluster mode above the engine and below the API: membership, shard assignment, lease timing.

It decides which shards this node serves and keeps their leases; the service (not yet wired)
runs one engine per served shard through a :class:`~tollway.cluster.membership.ShardHandler`.
Routing requests to the owner is to come here too. See ``docs/cluster.md``.
"""
