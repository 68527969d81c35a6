"""``mmq dead list|show|drop``: the dead-letter list (core/broker/deadletter.py).

Entries are numbered from 0, oldest first, as ``list`` prints them; ``show N``
prints one in full as JSON, ``drop N`` or ``drop --all`` removes.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

import redis

from core.broker import deadletter
from core.broker.redis_client import redis_for

PREVIEW_CHARS = 60


def _client() -> redis.Redis:
    return redis_for(socket_timeout=10)


def _preview(entry: deadletter.DeadLetter) -> str:
    text = entry.raw if not entry.raw_base64 else repr(entry.raw_bytes())
    text = " ".join(text.split())  # one line, whatever the message held
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 3] + "..."


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def cmd_dead_list(args: argparse.Namespace) -> int:
    entries = deadletter.list_entries(_client())
    if not entries:
        print("no dead letters")
        return 0
    print(f"{'#':<5} {'time':<19}  {'queue':<8} {'reason':<16} message")
    for i, e in enumerate(entries):
        print(f"{i:<5} {_when(e.time):<19}  {e.queue[:8]:<8} {e.reason:<16} {_preview(e)}")
    return 0


def cmd_dead_show(args: argparse.Namespace) -> int:
    entry = deadletter.get(_client(), args.index)
    if entry is None:
        print(f"mmq dead show: no entry {args.index}", file=sys.stderr)
        return 3
    out = entry.__dict__ | {"time_iso": datetime.fromtimestamp(entry.time).isoformat()}
    print(json.dumps(out, indent=2))
    return 0


def cmd_dead_drop(args: argparse.Namespace) -> int:
    r = _client()
    if args.all:
        print(f"dropped {deadletter.drop_all(r)} dead letter(s)")
        return 0
    if args.index is None:
        raise SystemExit("mmq dead drop: give an entry number (see `mmq dead list`) or --all")
    if not deadletter.drop(r, args.index):
        print(f"mmq dead drop: no entry {args.index}", file=sys.stderr)
        return 3
    print(f"dropped entry {args.index}")
    return 0


def add_dead_commands(sub) -> None:
    p = sub.add_parser("dead", help="messages that were not valid tasks (dead letters)")
    dead = p.add_subparsers(dest="dead_command", required=True)
    q = dead.add_parser("list", help="number, time, queue, reason and a preview of each")
    q.set_defaults(func=cmd_dead_list)
    q = dead.add_parser("show", help="one entry in full (JSON)")
    q.add_argument("index", type=int)
    q.set_defaults(func=cmd_dead_show)
    q = dead.add_parser("drop", help="remove entry N, or all of them")
    q.add_argument("index", type=int, nargs="?")
    q.add_argument("--all", action="store_true")
    q.set_defaults(func=cmd_dead_drop)
