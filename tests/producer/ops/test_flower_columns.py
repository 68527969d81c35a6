"""Flower's task list formatting (producer/ops/flower.py): the modality alone in the
kwargs column, the summary as one short line. The rendered list is checked in
headless Chromium in tests/e2e/test_monitoring.py."""

from __future__ import annotations

from types import SimpleNamespace

from producer.ops.flower import TASKS_COLUMNS, compact_summary, format_task


def test_summaries_become_one_short_line():
    s = "{'job': 'j1', 'modality': 'image', 'status': 'succeeded', 'top': ['tabby', 0.6234]}"
    assert compact_summary(s) == "succeeded · top: tabby 0.62"
    assert compact_summary({"job": "j", "modality": "text", "status": "succeeded",
                            "embedding_dim": 384}) == "succeeded · embedding 384-d"
    long = "x" * 200
    assert compact_summary(f"{{'status': 'failed', 'error': '{long}'}}") == (
        "failed · " + "x" * 79 + "…")
    assert compact_summary("{'status': 'succeeded', 'text': 'turn left'}") == (
        "succeeded · turn left")


def test_anything_else_is_left_as_it_was():
    cut = "{'job': 'j1', 'modality': 'ima..."  # Celery cuts long reprs
    assert compact_summary(cut) == cut
    assert compact_summary("42") == "42" and compact_summary(None) is None
    assert compact_summary("__import__('os').system('true')") == (
        "__import__('os').system('true')")  # read as a literal, never run


def test_format_task_fills_the_modality_and_summary_columns():
    task = SimpleNamespace(kwargs="{'modality': 'audio'}",
                           result="{'job': 'j', 'modality': 'audio', 'status': 'succeeded', "
                                  "'top': ['yes', 0.9]}")
    out = format_task(task)
    assert (out.kwargs, out.result) == ("audio", "succeeded · top: yes 0.90")
    other = format_task(SimpleNamespace(kwargs="{'x': 1}", result=None))
    assert (other.kwargs, other.result) == ("{'x': 1}", None)
    assert TASKS_COLUMNS.split(",")[3:5] == ["kwargs", "result"]
