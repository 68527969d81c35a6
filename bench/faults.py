"""Fault injection for bench/chaos.py and the end-to-end tests: a TCP proxy that can
make a real service unreachable (refuse new connections and cut open ones) and
bring it back, without stopping the service other tests share; a Redis primary with a
replica and three Sentinels whose primary can be killed for real; and ``free_port``,
the one free-port helper of bench/ and tests/.

It lives in bench/ because bench/ imports nothing from tests/; tests import it from here."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


class TcpProxy:
    """127.0.0.1:<port> -> target. ``down()`` closes every open connection and
    refuses new ones (the listening socket is closed, so clients see ECONNREFUSED,
    as when a server is stopped); ``up()`` listens again on the same port.

    While down, the port stays bound by a socket that does not listen (bound with
    SO_REUSEPORT before the listener closes): a port left free in the ephemeral range
    could be handed out as the local port of another connection (a worker's to Redis),
    and listening again then failed with EADDRINUSE."""

    def __init__(self, target_host: str, target_port: int, port: int = 0):
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._hold: socket.socket | None = _bound(port)  # the port's socket while down
        self.port = self._hold.getsockname()[1]
        self.up()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            ls, self._hold = self._hold or _bound(self.port), None
            ls.listen(256)
            self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            ls, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            if ls is not None:
                self._hold = _bound(self.port)  # before the listener goes: no gap
        if ls is not None:
            _close(ls)  # shutdown first: a thread blocked in accept() keeps it listening
        for c in conns:
            _close(c)

    def close(self) -> None:
        """Down for good: the port is released too."""
        self.down()
        with self._lock:
            hold, self._hold = self._hold, None
        if hold is not None:
            hold.close()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:  # the listener was closed by down()
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not ls:  # went down meanwhile
                    _close(client), _close(server)
                    return
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)
                with self._lock:
                    self._conns.discard(s)


def _bound(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:``port`` (0: any free port) that others of its kind
    may share: a second is bound while the first still listens."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    return s


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SentinelCluster:
    """A Redis primary, one replica and three Sentinels (quorum 2) on free ports of
    127.0.0.1, in ``root``. ``kill_primary()`` SIGKILLs the primary's process (its
    clients' connections are reset, as when a host dies, not a polite ``SENTINEL
    FAILOVER``); the Sentinels notice after ``down_after_ms`` and promote the replica.
    ``url`` is the kombu form mmq takes as MMQ_BROKER_URL."""

    MASTER = "mymaster"

    def __init__(self, root: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000):
        import redis

        if not shutil.which("redis-sentinel"):
            raise RuntimeError("redis-sentinel is not installed (Debian: redis-sentinel)")
        self._redis = redis
        self.root, self.procs = root, {}
        self.ports = {"primary": free_port(), "replica": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        for name, extra in (("primary", []),
                            ("replica", ["--replicaof", "127.0.0.1", str(self.ports["primary"])])):
            d = root / name
            d.mkdir(parents=True)
            self.procs[name] = subprocess.Popen(
                ["redis-server", "--port", str(self.ports[name]), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(d), *extra],
                stdout=open(d / "log", "wb"), stderr=subprocess.STDOUT)
        for i, port in enumerate(self.sentinel_ports):
            d = root / f"sentinel{i}"
            d.mkdir()
            conf = d / "sentinel.conf"  # Sentinel rewrites its own config: a file of its own
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.ports['primary']} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} {down_after_ms}\n"
                f"sentinel failover-timeout {self.MASTER} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n")
            self.procs[f"sentinel{i}"] = subprocess.Popen(
                ["redis-sentinel", str(conf)], stdout=open(d / "log", "wb"),
                stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}/0" if i == 0 else f"sentinel://127.0.0.1:{p}"
                        for i, p in enumerate(self.sentinel_ports))

    def sentinel(self, i: int = 0):
        return self._redis.Redis(port=self.sentinel_ports[i], socket_timeout=1,
                                 decode_responses=True)

    def primary_port(self, i: int = 0) -> int | None:
        """The primary's port as Sentinel ``i`` names it now."""
        try:
            addr = self.sentinel(i).sentinel_get_master_addr_by_name(self.MASTER)
        except self._redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every Sentinel knows the replica and the two other Sentinels, and the
        replica is in sync: before that a failover could not happen."""
        end = time.monotonic() + timeout
        replica = self._redis.Redis(port=self.ports["replica"], socket_timeout=1)
        while time.monotonic() < end:
            try:
                masters = [self.sentinel(i).sentinel_master(self.MASTER) for i in range(3)]
                synced = replica.info("replication").get("master_link_status") == "up"
                if synced and all(int(m["num-slaves"]) >= 1 and int(m["num-other-sentinels"]) >= 2
                                  for m in masters):
                    return
            except self._redis.RedisError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the Sentinels did not settle; logs in {self.root}")

    def kill_primary(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: the process dies and the kernel resets its connections (a crash).
        SIGSTOP: it stops answering with every connection left open, as when its host
        is lost or cut off (no reset ever reaches the clients)."""
        proc = self.procs["primary"]
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait()

    def wait_promoted(self, timeout: float = 30) -> None:
        """Until a majority of Sentinels name the replica, and it answers as a primary."""
        end = time.monotonic() + timeout
        new = self._redis.Redis(port=self.ports["replica"], socket_timeout=1)
        while time.monotonic() < end:
            votes = sum(self.primary_port(i) == self.ports["replica"] for i in range(3))
            try:
                role = new.info("replication").get("role")
            except self._redis.RedisError:
                role = None
            if votes >= 2 and role == "master":
                return
            time.sleep(0.05)
        raise TimeoutError(f"no promotion; logs in {self.root}")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()  # SIGKILL also ends a SIGSTOPped process
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
