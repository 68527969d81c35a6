"""bench/faults.py's TcpProxy, which the recovery tests and bench/chaos.py cut links with."""

import socket

import pytest
import redis


def test_down_refuses_and_keeps_its_port_so_up_always_listens_again(redis_proxy):
    """While down, nothing else may take the port: it used to be left free, the kernel
    handed it out as the local port of another connection, and ``up()`` failed with
    EADDRINUSE (tests/e2e/test_recovery.py failed so)."""
    client = redis.Redis(host="127.0.0.1", port=redis_proxy.port, socket_timeout=5)
    assert client.ping()
    redis_proxy.down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", redis_proxy.port), timeout=5)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    # what an outgoing connection's local port needs: a plain bind to the port
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", redis_proxy.port))
    redis_proxy.up()
    assert redis.Redis(host="127.0.0.1", port=redis_proxy.port, socket_timeout=5).ping()


def test_close_releases_the_port(redis_proxy):
    redis_proxy.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", redis_proxy.port), timeout=5)
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", redis_proxy.port))
