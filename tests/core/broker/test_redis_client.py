"""The broker URL forms the Redis client factory understands (kombu's own reading)."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection

from core.broker.redis_client import (
    SentinelUrl,
    broker_transport_options,
    is_sentinel,
    parse_sentinel_url,
    redis_for,
)
from core.config import Settings


def test_sentinel_url_is_read_as_kombu_reads_it():
    url = "sentinel://:s%40cret@h1:26380/3;sentinel://h2;sentinel://h3:26381"
    assert is_sentinel(url) and not is_sentinel("redis://h1:6379/0")
    parsed = parse_sentinel_url(url)
    assert parsed == SentinelUrl(sentinels=(("h1", 26380), ("h2", 26379), ("h3", 26381)),
                                 db=3, password="s@cret")
    conn = Connection(url, transport_options={"master_name": "m"})  # kombu's reading
    assert conn.alt == url.split(";")
    assert (conn.hostname, conn.port, conn.virtual_host) == ("h1", 26380, "3")
    with pytest.raises(ValueError):
        parse_sentinel_url("sentinel://h1;redis://h2")


def test_redis_for_a_sentinel_url_asks_the_named_master():
    s = Settings(broker_url="sentinel://127.0.0.1:1/2;sentinel://127.0.0.1:2",
                 sentinel_master="primary")
    r = redis_for(s, socket_timeout=0.5)
    pool = r.connection_pool
    assert pool.service_name == "primary" and pool.connection_kwargs["db"] == 2
    assert [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs
             ["port"]) for c in pool.sentinel_manager.sentinels] == [("127.0.0.1", 1),
                                                                    ("127.0.0.1", 2)]
    with pytest.raises(redis.ConnectionError):  # no Sentinel there: no primary to ask
        r.ping()
    assert broker_transport_options(s)["master_name"] == "primary"
    plain = Settings(broker_url="redis://127.0.0.1:1/0")
    assert "master_name" not in broker_transport_options(plain)
    assert isinstance(redis_for(plain).connection_pool, redis.ConnectionPool)
