"""The metrics collector's store errors are logged as one brief line each (the
driver's message, no statement or parameters): a Prometheus scrape every few seconds
through an outage repeats them."""

from __future__ import annotations

from types import SimpleNamespace

from core.config import Settings
from producer.api.metrics import StoreCollector
from tests.helpers import brief_warnings, raise_sql_error


def test_store_errors_log_the_drivers_message_not_the_sql(caplog):
    down = SimpleNamespace(sessions=raise_sql_error)  # every session fails to open
    with caplog.at_level("WARNING"):
        collector = StoreCollector(Settings(), down, redis_client=None)  # at start
        families = list(collector._store_metrics())  # at a scrape
    assert [f.name for f in families] == ["mmq_store_up"]
    assert len(brief_warnings(caplog.records)) == 2
