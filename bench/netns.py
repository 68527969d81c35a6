"""Hosts as Linux network namespaces on this machine, for bench/cluster.py and
tests/e2e/test_cluster.py (which imports this file; it imports nothing of mmq).

One bridge in the root namespace holds ``<subnet>.1``; each host is a namespace with
one veth into the bridge (``<subnet>.<n>``), its own loopback and no default route, so
a host reaches only its own loopback and the other hosts. The subnet is a private
10.231.X.0/24 that no interface here uses yet; IP forwarding is left as it is (off),
so nothing routes beyond the bridge. Cutting a host's link sets the bridge side of its
veth down: a cable pulled, open TCP connections stall rather than fail.

Every name starts with a prefix (namespaces ``mmqc-<run>-<host>``, links
``mqc<run>...``) so that ``cleanup(prefix)`` removes whatever a killed run left
behind; ``Net.close`` (also registered with atexit) removes this run's.

    python bench/netns.py proxy NETNS LISTEN_ADDR:PORT TARGET_ADDR:PORT
        a TCP proxy listening inside NETNS and connecting from the root namespace
        (PostgreSQL access for the hosts: the server itself listens on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

NS_PREFIX, LINK_PREFIX = "mmqc-", "mqc"
CLONE_NEWNET = 0x40000000


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"{NS_PREFIX}probe{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _used_subnets() -> set[int]:
    out = _ip("-o", "-4", "addr", "show").stdout
    return {int(m) for m in re.findall(r"inet 10\.231\.(\d+)\.", out)}


@dataclass
class Host:
    name: str  # short: "svc", "w1"
    ns: str  # the namespace
    ip: str
    veth: str  # the bridge side of its link (the one cut)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def cmd(self, argv: list[str], hostname: bool = True) -> list[str]:
        """``argv`` run inside this host: its network namespace and, so that workers
        are named after their host, its own UTS namespace with hostname = name."""
        if not hostname:
            return ["ip", "netns", "exec", self.ns, *argv]
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
                f'hostname {self.name} && exec "$@"', "sh", *argv]

    def spawn(self, argv: list[str], env: dict, log, cwd=None) -> subprocess.Popen:
        p = subprocess.Popen(self.cmd(argv), env=env, cwd=cwd, stdout=open(log, "ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def pids(self) -> list[int]:
        """Every process inside this host's namespace."""
        out = _ip("netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """SIGKILL every process on the host (a host that dies at once)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = [p for p in self.procs if p.poll() is None]

    def link(self, up: bool) -> None:
        _ip("link", "set", self.veth, "up" if up else "down")


class Net:
    """A bridge and hosts; ``close()`` kills what runs inside them and removes them."""

    def __init__(self, names: list[str], run: str | None = None):
        self.run = run or uuid.uuid4().hex[:4]
        used = _used_subnets()
        free = [x for x in range(1, 255) if x not in used]
        if not free:
            raise RuntimeError("no free 10.231.X.0/24 subnet")
        self.subnet = f"10.231.{free[0]}"
        self.gateway = f"{self.subnet}.1"
        self.bridge = f"{LINK_PREFIX}{self.run}br"
        self.hosts: dict[str, Host] = {}
        atexit.register(self.close)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(names):
            self._add(name, 10 + i)

    def _add(self, name: str, octet: int) -> None:
        ns = f"{NS_PREFIX}{self.run}-{name}"
        outer, inner = f"{LINK_PREFIX}{self.run}v{octet}", f"{LINK_PREFIX}{self.run}p{octet}"
        ip = f"{self.subnet}.{octet}"
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("-n", ns, "link", "set", inner, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        self.hosts[name] = Host(name, ns, ip, outer)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        for h in self.hosts.values():
            h.kill_all()
        cleanup(f"{NS_PREFIX}{self.run}-", f"{LINK_PREFIX}{self.run}")
        self.hosts = {}


def cleanup(ns_prefix: str = NS_PREFIX, link_prefix: str = LINK_PREFIX) -> list[str]:
    """Kill the processes in, and delete, every namespace and link with these
    prefixes (a run that was SIGKILLed leaves them). Returns what was removed."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if not ns.startswith(ns_prefix):
            continue
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for _ in range(50):  # the namespace goes once its last process has exited
            if not _ip("netns", "pids", ns, check=False).stdout.split():
                break
            time.sleep(0.1)
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+: ([^:@]+)", line)
        if m and m.group(1).startswith(link_prefix):
            _ip("link", "del", m.group(1), check=False)  # a veth takes its peer along
            removed.append(m.group(1))
    return removed


# -- a TCP proxy from inside a namespace to the root namespace ---------------------------------

def _listen_in(netns: str, addr: str, port: int) -> socket.socket:
    """A listening socket created inside ``netns`` (a socket keeps the namespace it was
    made in); this thread then returns to its own namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((addr, port))
            ls.listen(512)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own), os.close(target)
    return ls


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


async def _serve(ls: socket.socket, host: str, port: int) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(host, port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, sw), _pipe(sr, cw))

    server = await asyncio.start_server(handle, sock=ls)
    async with server:
        await server.serve_forever()


def proxy_main(argv: list[str]) -> None:
    netns, listen, target = argv
    la, lp = listen.rsplit(":", 1)
    ta, tp = target.rsplit(":", 1)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the bench that made it
    ls = _listen_in(netns, la, int(lp))
    print(f"proxy {netns} {listen} -> {target}", flush=True)
    asyncio.run(_serve(ls, ta, int(tp)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["proxy"]:
        proxy_main(sys.argv[2:])
    elif sys.argv[1:2] == ["cleanup"]:
        print("\n".join(cleanup()) or "nothing to remove")
    else:
        sys.exit(__doc__)
