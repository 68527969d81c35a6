"""A real Prometheus (Debian's `prometheus` binary) scrapes a test stack with mmq's own
rule file and sees MmqNoLiveWorker go pending, fire, and resolve.

The rules are alerts.yml as shipped, with the group's interval and every `for:` cut to
seconds so that the test takes seconds, not minutes; promtool's unit tests
(tests/producer/ops/test_alert_rules.py) hold the shipped durations.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from core.training.samples import sentences
from producer.ops.rules import RULES
from producer.sdk import Client
from tests.helpers import ROOT, Worker, free_port, service_env, wait_http

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (Debian package prometheus)")
FOR_S = 2  # every alert's `for:` in this test's copy of the rules


def _fast_rules(path) -> None:
    text = RULES.read_text()
    text = re.sub(r"(?m)^(\s+)interval: \S+$", r"\g<1>interval: 1s", text)
    text = re.sub(r"(?m)^(\s+)for: \S+$", rf"\g<1>for: {FOR_S}s", text)
    path.write_text(text)


def _alert(prom: httpx.Client, name: str) -> list[dict]:
    alerts = prom.get("/api/v1/alerts").json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name]


def _wait(what: str, check, timeout: float = 90):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := check():
            return got
        time.sleep(0.25)
    raise TimeoutError(what)


def test_prometheus_fires_and_resolves_no_live_worker(broker_url, tmp_path):
    db = f"sqlite:///{tmp_path / 'mmq.db'}"
    wport, aport, pport = free_port(), free_port(), free_port()
    env = service_env(broker_url, db, MMQ_LEASE_S=4, MMQ_LEASE_RENEW_S=1, MMQ_API_KEYS="ops:k",
                      MMQ_WORKER_METRICS_PORT=wport)
    subprocess.run([sys.executable, "-m", "producer.cli", "db", "upgrade"], env=env, check=True)
    worker = Worker("text", env, tmp_path / "text.log")
    api = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(aport)],
                           env=env, cwd=ROOT, stdout=open(tmp_path / "api.log", "wb"),
                           stderr=subprocess.STDOUT)
    _fast_rules(tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "mmq-api", "static_configs": [{"targets": [f"127.0.0.1:{aport}"]}]},
            {"job_name": "mmq-workers",
             "static_configs": [{"targets": [f"127.0.0.1:{wport}"]}]}]}))
    prom_proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{pport}"],
        stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
    client = Client(broker_url=broker_url, database_url=db)
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()

    def note(event: str) -> None:
        seen.append((round(time.monotonic() - t0, 1), event))

    try:
        worker.wait_ready()
        wait_http(f"http://127.0.0.1:{aport}/healthz", api, tmp_path / "api.log")
        wait_http(f"http://127.0.0.1:{pport}/-/ready", prom_proc, tmp_path / "prometheus.log")
        prom = httpx.Client(base_url=f"http://127.0.0.1:{pport}", timeout=10)

        def all_up():
            targets = prom.get("/api/v1/targets").json()["data"]["activeTargets"]
            healthy = {t["labels"]["job"] for t in targets if t["health"] == "up"}
            return healthy == {"mmq-api", "mmq-workers"}

        _wait("every target up", all_up)
        note("both targets up")
        rules = prom.get("/api/v1/rules").json()["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules if r["type"] == "alerting"} >= {
            "MmqNoLiveWorker", "MmqOldestQueuedJobTooOld", "MmqBrokerDown"}
        time.sleep(3)  # a few evaluations with a live worker: nothing fires
        assert _alert(prom, "MmqNoLiveWorker") == []

        worker.stop()  # the only text worker; a clean stop drops its lease
        note("text worker stopped")
        ids = client.submit_many([{"modality": "text", "input": t}
                                  for t in sentences(5, seed=3)])
        note("5 text jobs submitted")
        pending = _wait("pending", lambda: [a for a in _alert(prom, "MmqNoLiveWorker")
                                            if a["state"] == "pending"])
        note("MmqNoLiveWorker pending")
        firing = _wait("firing", lambda: [a for a in _alert(prom, "MmqNoLiveWorker")
                                          if a["state"] == "firing"])
        note("MmqNoLiveWorker firing")
        assert firing[0]["labels"]["modality"] == "text" == pending[0]["labels"]["modality"]
        assert firing[0]["labels"]["severity"] == "page"
        assert float(firing[0]["value"]) == 5  # the queued jobs, from the API's store gauge
        assert firing[0]["annotations"]["runbook_url"] == "docs/runbooks/MmqNoLiveWorker.md"

        worker = Worker("text", env, tmp_path / "text-2.log")
        worker.wait_ready()
        note("text worker restarted")
        res = client.wait(ids, timeout=120, with_embedding=False)
        assert [r["status"] for r in res] == ["succeeded"] * 5
        _wait("resolved", lambda: _alert(prom, "MmqNoLiveWorker") == [] or None)
        note("MmqNoLiveWorker resolved")
    finally:
        print("\nprometheus timeline (s since start):")
        for at, event in seen:
            print(f"  {at:7.1f}  {event}")
        client.close()
        worker.stop()
        for p in (api, prom_proc):
            p.terminate()
            p.wait(20)
