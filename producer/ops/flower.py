"""``mmq flower``: Flower for the mmq Celery app, always behind basic auth.

Flower runs as its own process, ``python -m producer.ops.flower [flower options]``, which
loads the monitoring app of the broker contract (``-A core.broker.apps:monitor``): the
queues and events, no task module and no torch. Two things are adjusted in that
process before Flower starts:

- ``/metrics`` requires the same basic auth as the UI. Flower 2 serves it
  unauthenticated on purpose (mher/flower#1129), and it names every task, worker and
  queue; Prometheus scrapes it with ``basic_auth`` instead.
- The broker page and ``/api/queues/length`` list every modality's queue. Flower
  lists only the queues of the workers it knows, and a queue that has no worker is
  exactly the backlog worth seeing.
- The task list shows each job's modality and the compact summary of its outcome
  (``TASKS_COLUMNS``, ``format_task``). By default Flower shows only name, id, state,
  received, runtime and worker: forty rows of ``mmq.run_job`` and nothing else. The
  modality comes from the message's kwargs (``core/broker/sender.py`` sends
  ``modality=``) and the summary from the task's return value, which the worker's
  ``task-succeeded`` event carries (``core/serving/host.py``'s ``_summary``). Only the
  HTML pages are reformatted; ``/api/tasks`` keeps Celery's reprs.

Credentials travel to Flower in its environment (``FLOWER_BASIC_AUTH``, which Flower
reads like ``--basic-auth=``), never on its command line, where ``ps`` shows them.
"""

from __future__ import annotations

import argparse
import ast
import os
import secrets
import sys

from core.config import Settings, get_settings
from core.jobs import QUEUES

CELERY_APP = "core.broker.apps:monitor"  # without the task module: no torch in Flower
LOCAL_USER = "mmq"
# Flower's tasks_columns: kwargs is the job's modality and result its summary (both
# relabelled and compacted by _harden_flower); FLOWER_TASKS_COLUMNS still overrides.
TASKS_COLUMNS = "name,uuid,state,kwargs,result,received,runtime,worker"
COLUMN_LABELS = {"kwargs": "Modality", "result": "Summary"}


class FlowerAuthMissing(SystemExit):
    pass


def flower_credentials(settings: Settings, *, local: bool | None = None) -> tuple[str, bool]:
    """(basic-auth value, generated?). Outside the local/dev profile a missing
    ``MMQ_FLOWER_BASIC_AUTH`` is refused; locally a one-off password is generated,
    so Flower is never open, even on a laptop."""
    value = ",".join(p.strip() for p in settings.flower_basic_auth.split(",") if p.strip())
    if value:
        bad = [p for p in value.split(",") if ":" not in p or p.startswith(":")
               or p.endswith(":")]
        if bad:
            raise FlowerAuthMissing("MMQ_FLOWER_BASIC_AUTH must be user:password[,user2:pass2]")
        return value, False
    if not (settings.local if local is None else local):
        raise FlowerAuthMissing(
            "mmq flower: set MMQ_FLOWER_BASIC_AUTH=user:password (Flower can shut workers "
            "down and shows every job id); only MMQ_PROFILE=local or dev runs without it")
    return f"{LOCAL_USER}:{secrets.token_urlsafe(12)}", True


def flower_command(port: int, address: str) -> list[str]:
    return [sys.executable, "-m", "producer.ops.flower", f"--port={port}", f"--address={address}"]


def flower_env(auth: str, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["FLOWER_BASIC_AUTH"] = auth
    # A stale FLOWER_UNAUTHENTICATED_API in the environment would open the API again.
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    return env


def _literal(text: object) -> object:
    """A repr Celery put in an event, read back (literals only; never code), or None."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None  # e.g. cut short by Celery's repr size limit


def compact_summary(result: object) -> str | None:
    """The task's summary as one short line: ``succeeded · top: tabby 0.62`` (the
    modality has a column of its own). Anything that is not an mmq summary is
    returned unchanged."""
    d = _literal(result)
    if not isinstance(d, dict) or "status" not in d:
        return result if result is None else str(result)
    parts = [str(d["status"])]
    top = d.get("top")
    if isinstance(top, list | tuple) and len(top) == 2 and isinstance(top[1], int | float):
        parts.append(f"top: {top[0]} {top[1]:.2f}")
    elif d.get("embedding_dim"):
        parts.append(f"embedding {d['embedding_dim']}-d")
    for key in ("text", "error"):  # an audio job's transcript, a failure's reason
        if d.get(key):
            value = str(d[key])
            parts.append(value if len(value) <= 80 else value[:79] + "…")
    return " · ".join(parts)


def format_task(task):
    """Flower's format_task hook (the tasks page and a task's page): the modality alone
    in the kwargs column, the compact summary in the result column."""
    kwargs = _literal(task.kwargs)
    if isinstance(kwargs, dict) and set(kwargs) == {"modality"}:
        task.kwargs = str(kwargs["modality"])
    if task.result is not None:
        task.result = compact_summary(task.result)
    return task


def _harden_flower() -> None:
    """The adjustments described in the module docstring."""
    from flower.options import options
    from flower.views import BaseHandler
    from flower.views import tasks as task_views
    from flower.views.monitor import Metrics
    from tornado import web

    # Defaults only: FLOWER_TASKS_COLUMNS or --tasks_columns, applied later by Flower,
    # still win.
    options.tasks_columns = TASKS_COLUMNS
    options.format_task = format_task
    task_views.TASK_COLUMNS.update(COLUMN_LABELS)

    if not getattr(Metrics.get, "_mmq_auth", False):
        get = web.authenticated(Metrics.get)
        get._mmq_auth = True
        Metrics.get = get

    listed = BaseHandler.get_active_queue_names
    if not getattr(listed, "_mmq_all_queues", False):
        def get_active_queue_names(self) -> list[str]:
            return sorted(set(listed(self)) | set(QUEUES))

        get_active_queue_names._mmq_all_queues = True
        BaseHandler.get_active_queue_names = get_active_queue_names


def run_flower(argv: list[str]) -> None:
    """Run Flower in this process: ``celery -A core.broker.apps:monitor flower <argv>``."""
    if not os.environ.get("FLOWER_BASIC_AUTH"):
        raise FlowerAuthMissing("producer.ops.flower: FLOWER_BASIC_AUTH is not set; "
                                "use `mmq flower`")
    _harden_flower()
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "-A", CELERY_APP, "flower", *argv]
    celery_main()


def cmd_flower(args: argparse.Namespace) -> int:
    s = get_settings()
    auth, generated = flower_credentials(s)
    if generated:
        print(f"flower: no MMQ_FLOWER_BASIC_AUTH in the {s.profile} profile; "
              f"this run's login is {auth}", flush=True)
    port = args.port or s.flower_port
    argv = flower_command(port, args.address)
    os.execve(sys.executable, argv, flower_env(auth))  # signals reach Flower directly


def add_flower_command(sub) -> None:
    # Other Flower options come from FLOWER_* variables (FLOWER_PERSISTENT=True, ...),
    # which Flower itself reads.
    p = sub.add_parser("flower", help="run Flower (basic auth from MMQ_FLOWER_BASIC_AUTH)")
    p.add_argument("--port", type=int, default=None, help="default: MMQ_FLOWER_PORT (5555)")
    p.add_argument("--address", default="127.0.0.1",
                   help="listen address (0.0.0.0 in a container)")
    p.set_defaults(func=cmd_flower)


if __name__ == "__main__":
    run_flower(sys.argv[1:])
