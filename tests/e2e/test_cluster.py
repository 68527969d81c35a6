"""The short version of bench/cluster.py: two text worker hosts, one clock 10 min
fast and one 10 min slow, a stream of jobs with deadlines from a producer host, and
one host SIGKILLed mid-stream. Every job ends once; none is cancelled or failed.

It drives the bench's own code (bench/netns.py, bench/cluster_hosts.py,
bench/cluster.py): the namespace plumbing is one implementation, run by the bench and
defended here. (bench/ imports nothing from tests/.) Leases are shortened
(MMQ_LEASE_S=8) so that the killed host's jobs come back within the test's time."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from bench import netns  # the bench's own plumbing (see the docstring)
from tests.helpers import PG_ADMIN_URL

JOBS = 100


@pytest.fixture
def cluster(tmp_path):
    why = netns.unavailable()
    if why:  # CI runs as root: there this never skips (MMQ_REQUIRE_SERVICES fails it)
        pytest.skip(f"cluster test: {why}")
    if shutil.which("faketime") is None:
        pytest.skip("cluster test: faketime is not installed (Debian: faketime)")
    from bench.cluster_hosts import Cluster, WorkerSpec

    c = Cluster(tmp_path, [WorkerSpec("w1", "+10m", ("text",)),
                           WorkerSpec("w2", "-10m", ("text",))],
                broker="redis", concurrency=16, pg_admin=PG_ADMIN_URL,
                env_extra={"MMQ_LEASE_S": "8", "MMQ_LEASE_RENEW_S": "2"})
    try:
        c.start()
        yield c
    finally:
        c.close()


def test_host_killed_on_skewed_clocks_loses_nothing(cluster):
    from bench.cluster import Run, run_scenario

    run = Run(cluster, window=60)
    try:
        row = run_scenario(run, "host-kill", JOBS, SimpleNamespace(timeout=300, cut_s=0))
    finally:
        run.stop()
    cells = row.cells
    detail = "\n".join(row.notes)
    assert cells["submitted"] == JOBS, detail
    assert cells["done"], f"not every job terminal:\n{detail}"
    assert cells["lost"] == 0, detail
    assert cells["dup"] == 0, detail
    assert cells["failed"] == 0, detail
    assert cells["cancelled"] == 0 and cells["unintended"] == 0, detail  # no deadline fired
    assert cells["pred_on_cancelled"] == 0, detail
    assert cells["succeeded"] == JOBS, detail
    assert all(f.recovered_s is not None for f in row.faults), detail
