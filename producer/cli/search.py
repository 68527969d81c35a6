"""``mmq search``: the stored jobs nearest to a text, an image or a sound.

    mmq search "a cat" --modality image          # text query, image results
    mmq search photo.jpg --modality text -k 5     # an existing file is an image/audio query
    mmq search "rain" --label weather --since 1h --json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from core.jobs import MODALITIES, TASKS
from producer.cli.jobs import parse_duration


def cmd_search(args: argparse.Namespace) -> int:
    from producer.sdk import Client
    from producer.sdk.search import SearchUnavailable

    # An argument naming an existing file is that file (image or audio); else it is text.
    query: str | Path = Path(args.query) if Path(args.query).is_file() and not args.text \
        else args.query
    now = datetime.now(UTC)
    filters = {"modality": args.modality, "task": args.task, "label": args.label,
               "model_version": args.model_version,
               "created_since": now - args.since if args.since else None,
               "created_until": now - args.until if args.until else None}
    c = Client()
    try:
        hits = c.search(query, k=args.k, owner=args.owner, **filters)
    except SearchUnavailable as e:
        print(json.dumps({"error": "unavailable", "message": str(e)}), file=sys.stderr)
        return 3
    finally:
        c.close()
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    print(f"{'score':>6}  {'id':<36}  {'modality':<8} {'created':<19}  summary")
    for h in hits:
        print(f"{h['score']:>6.3f}  {h['id']:<36}  {h['modality']:<8} "
              f"{(h['created_at'] or '')[:19]:<19}  {h['summary']}")
    return 0


def add_search_command(sub) -> None:
    p = sub.add_parser("search", help="the stored jobs nearest to a text, image or audio query")
    p.add_argument("query", help="text, or the path of an image or audio file")
    p.add_argument("--text", action="store_true", help="the query is text even if a file "
                   "of that name exists")
    p.add_argument("-k", type=int, default=10, help="results (default 10)")
    p.add_argument("--modality", choices=MODALITIES, help="return only jobs of this modality")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--label", help="the jobs' top label (case-insensitive)")
    p.add_argument("--model-version", help="only this exact version's predictions")
    p.add_argument("--since", type=parse_duration, help="created within, e.g. 1h, 7d")
    p.add_argument("--until", type=parse_duration, help="created before this long ago")
    p.add_argument("--owner", help="only this API key id's jobs (default: everyone's)")
    p.add_argument("--json", action="store_true", help="the results as JSON")
    p.set_defaults(func=cmd_search)
