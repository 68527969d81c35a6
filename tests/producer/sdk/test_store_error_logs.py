"""A store error in the SDK's send bookkeeping is logged as one brief line: the
driver's message, never SQLAlchemy's whole statement and parameters (mark_sent's carry
every job id of the submit; a warning repeated through an outage should be short)."""

from __future__ import annotations

from core import store
from core.config import Settings
from producer.sdk import Client
from producer.sdk import client as sdk_client
from tests.helpers import brief_warnings, raise_sql_error


def test_mark_sent_failure_logs_the_drivers_message_not_the_sql(tmp_path, monkeypatch,
                                                                 caplog):
    c = Client(settings=Settings(broker_url="redis://127.0.0.1:1/0",
                                 database_url=f"sqlite:///{tmp_path / 'mmq.db'}"))
    monkeypatch.setattr(sdk_client, "send_jobs", lambda app, pairs, n: [i for i, _ in pairs])
    monkeypatch.setattr(store, "mark_sent", raise_sql_error)
    rows = c.validate([{"modality": "text", "input": "x"}] * 2)
    with caplog.at_level("WARNING"):
        ids = c.submit_valid(rows).ids  # the jobs are queued: no error for the caller
    c.close()
    assert len(ids) == 2
    warned = brief_warnings(caplog.records)
    assert len(warned) == 1 and "could not record it" in warned[0]
