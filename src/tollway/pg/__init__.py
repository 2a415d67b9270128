"""The PostgreSQL adapter of cluster mode: the embedded server for tests, the schema, the log, leases.

An adapter like :mod:`tollway.redis`: it moves bytes between the engine's world and SQL and
knows no business rule. See ``docs/cluster.md``.
"""
