"""The Redis connection that records and leases share."""

from __future__ import annotations

from typing import Any


def redis_client(url: str, *, ride_out_restarts: bool = True) -> Any:
    """A Redis client for `url`.

    A worker rides out a Redis restart: every command is retried with backoff
    for about a minute before it fails. A command-line user waits for nobody:
    with `ride_out_restarts=False` an unreachable Redis fails within seconds.
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    retries = 20 if ride_out_restarts else 1
    return redis.Redis.from_url(
        url,
        socket_timeout=30 if ride_out_restarts else 10,
        socket_connect_timeout=5 if ride_out_restarts else 3,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=5, base=0.2), retries=retries),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )
