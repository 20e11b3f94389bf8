"""The transport carries a decided request to its replica: attempts and failover, the relay,
the upstream connection pool, lifecycle hooks, in-flight waits, the retry budget, hedging."""
