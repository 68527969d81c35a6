"""The per-worker Prometheus exporter: a real worker, real jobs, a real scrape."""

from __future__ import annotations

import re
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from core.training.samples import sentences
from producer.sdk import Client
from tests.helpers import free_port, service_env


def scrape(port: int) -> dict[tuple[str, str], float]:
    """-> {(sample name, modality label): value} for the mmq_* samples."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name.startswith("mmq_") and s.labels.get("le") in (None, "+Inf"):
                out[(s.name, s.labels.get("modality", ""))] = s.value
    return out


def test_worker_exports_its_batching_histograms(broker_url, tmp_path, start_worker):
    port = free_port()
    db = f"sqlite:///{tmp_path / 'mmq.db'}"
    env = service_env(broker_url, db, MMQ_WORKER_METRICS_PORT=port)
    worker = start_worker("text", env)
    client = Client(broker_url=broker_url, database_url=db)
    ids = client.submit_many([{"modality": "text", "input": t} for t in sentences(7, seed=2)])
    res = client.wait(ids, timeout=120, with_embedding=False)
    client.close()
    assert [r["status"] for r in res] == ["succeeded"] * 7
    m = scrape(port)
    # Each job was counted once, in however many batches the batcher formed.
    assert m[("mmq_jobs_total", "text")] == 7
    assert m[("mmq_batch_size_sum", "text")] == 7
    assert 1 <= m[("mmq_batch_size_count", "text")] <= 7
    assert m[("mmq_batch_size_bucket", "text")] == m[("mmq_batch_size_count", "text")]
    assert m[("mmq_queue_wait_seconds_count", "text")] == 7
    assert m[("mmq_model_seconds_count", "text")] == m[("mmq_batch_size_count", "text")]
    assert m[("mmq_batch_tokens_sum", "text")] == sum(r["prediction"]["tokens"] for r in res)
    assert m[("mmq_batch_tokens_count", "text")] == m[("mmq_batch_size_count", "text")]
    assert m[("mmq_dropped_jobs_total", "text")] == 0
    assert m[("mmq_jobs_per_second", "")] > 0
    # Loopback by default (MMQ_WORKER_METRICS_HOST): nothing listens wider than it must.
    assert f"metrics exporter: http://127.0.0.1:{port}/metrics" in worker.log.read_text()


def test_a_taken_port_is_logged_and_the_worker_still_serves(broker_url, tmp_path,
                                                            start_worker):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = f"sqlite:///{tmp_path / 'mmq.db'}"
        env = service_env(broker_url, db, MMQ_WORKER_METRICS_PORT=port)
        worker = start_worker("text", env)
        client = Client(broker_url=broker_url, database_url=db)
        res = client.wait([client.submit_text("still served")], timeout=120)
        client.close()
    assert res[0]["status"] == "succeeded"
    assert re.search(rf"ERROR .*metrics exporter: port {port} is already in use",
                     worker.log.read_text())


def _outward_address() -> str | None:
    """This machine's non-loopback IPv4 address, if it has one (a UDP connect sends
    nothing; it only picks the interface a packet would leave by)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_the_exporter_listens_on_loopback_by_default():
    from core.serving.exporter import start_exporter
    from core.serving.metrics import BatchMetrics

    port = free_port()
    sink = start_exporter(port, "text-1@test", "text", BatchMetrics())
    try:
        assert b"mmq_jobs_total" in urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        if (outward := _outward_address()) is not None:
            with socket.socket() as c:
                c.settimeout(5)
                assert c.connect_ex((outward, port)) != 0, f"reachable on {outward}"
        assert sink.server.server_address[0] == "127.0.0.1"
    finally:
        if getattr(sink, "server", None) is not None:
            sink.server.shutdown()
            sink.server.server_close()
