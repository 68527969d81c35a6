"""The job commands of ``mmq``: submit, status, wait, results, cancel, requeue, db."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.jobs import MODALITIES, TASKS

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
AUDIO_EXT = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff"}


def parse_duration(text: str) -> timedelta:
    """'90', '90s', '15m', '1h', '2d' -> timedelta."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 60s, 15m, 1h)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return timedelta(seconds=float(m.group(1)) * unit)


def _client():
    from producer.sdk import Client

    return Client()


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _job_items(args: argparse.Namespace) -> list[dict]:
    extra = {"task": args.task}
    if args.task == "classify":
        extra |= {"labels": [lb.strip() for lb in (args.labels or "").split(",") if lb.strip()],
                  "top_k": args.top_k}
    if args.timeout_s:
        extra["timeout_s"] = args.timeout_s
    if args.model_version:
        extra["model_version"] = args.model_version
    if args.webhook_url:
        extra["webhook_url"] = args.webhook_url
        extra["webhook_embedding"] = bool(args.webhook_embedding)
    if args.from_dir:
        items = []
        for p in sorted(Path(args.from_dir).rglob("*")):
            ext = p.suffix.lower()
            if ext in IMAGE_EXT:
                items.append({"modality": "image", "input": p, **extra})
            elif ext in AUDIO_EXT:
                items.append({"modality": "audio", "input": p, **extra})
            elif ext == ".txt":
                items.append({"modality": "text", "input": p.read_text(encoding="utf-8",
                                                                        errors="strict"), **extra})
        return items
    if not args.modality:
        raise SystemExit("mmq submit: give a modality (text, image, audio) or --from-dir DIR")
    return [{"modality": args.modality, "input": x, **extra} for x in args.inputs]


def cmd_submit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    items = _job_items(args)
    if not items:
        raise SystemExit("mmq submit: nothing to submit")
    if args.wait:  # refused before anything is queued, not after (nan is true here)
        from producer.sdk.client import check_wait_timeout

        check_wait_timeout(args.wait)
    c = _client()
    ids: list[str] = []
    chunk = 500  # validated and sent in chunks, so the bar moves on big directories
    with tqdm(total=len(items), unit="job", disable=len(items) < 50 or args.quiet,
              file=sys.stderr) as bar:
        for i in range(0, len(items), chunk):
            ids += c.submit_many(items[i:i + chunk])
            bar.update(len(items[i:i + chunk]))
    if args.wait:
        _print(c.wait(ids, timeout=args.wait, with_embedding=False))
    else:
        print("\n".join(ids))
    return 0


def _not_found(ids: list[str]) -> int:
    """Say on stderr which ids name no job -> exit status 3 (1: some job did not
    succeed; 4: timed out)."""
    print(json.dumps({"error": "not_found", "ids": ids,
                      "message": f"no such job: {', '.join(ids)}"}), file=sys.stderr)
    return 3


def cmd_status(args: argparse.Namespace) -> int:
    c = _client()
    out = [c.get(i, with_embedding=args.embedding) for i in args.ids]
    missing = list(dict.fromkeys(i for i, o in zip(args.ids, out, strict=True) if o is None))
    if len(out) > 1:
        _print(out)  # each id's place kept: null where there is no such job
    elif out[0] is not None:
        _print(out[0])
    return _not_found(missing) if missing else 0


def cmd_wait(args: argparse.Namespace) -> int:
    c = _client()
    # The CLI passes no owner and sees every job, so an id that names no job is a
    # mistake to report now: the SDK's wait would poll it as unfinished until the
    # timeout (as it must for the API, where another key's job looks unknown).
    if missing := c.missing(args.ids):
        return _not_found(missing)
    try:
        res = c.wait(args.ids, timeout=args.timeout, with_embedding=args.embedding)
    except TimeoutError as e:
        print(json.dumps({"error": "timeout", "message": str(e)}), file=sys.stderr)
        return 4
    _print(res)
    return 0 if all(r["status"] == "succeeded" for r in res) else 1


def cmd_results(args: argparse.Namespace) -> int:
    since = datetime.now(UTC) - args.since if args.since else None
    rows = _client().results(status=args.status, modality=args.modality, since=since,
                             limit=args.limit, owner=args.owner)
    if args.json:
        _print(rows)
        return 0
    print(f"{'id':<36}  {'modality':<8} {'task':<8} {'status':<9} {'created':<19}  error")
    for r in rows:
        print(f"{r['id']:<36}  {r['modality']:<8} {r['task']:<8} {r['status']:<9} "
              f"{(r['created_at'] or '')[:19]:<19}  {r['error'] or ''}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Each id -> "cancelled" (by this command or before: a repeated cancel is no
    error, as the API's DELETE answers 200 again), "not cancelled: it already
    succeeded|failed" (the API's 409), or null for no such job (its 404). Exit status
    0 when every job is cancelled, 1 when one had succeeded or failed, 3 when an id
    names no job (named on stderr, as ``status`` and ``wait`` do)."""
    c = _client()
    out: dict[str, str | None] = {}
    for i in dict.fromkeys(args.ids):
        if c.cancel(i):
            out[i] = "cancelled"
        elif (job := c.get(i, with_embedding=False)) is not None:
            out[i] = f"not cancelled: it already {job['status']}"
        else:
            out[i] = None
    _print(out)
    if missing := [i for i, v in out.items() if v is None]:
        return _not_found(missing)
    return 0 if all(v == "cancelled" for v in out.values()) else 1


def cmd_requeue(args: argparse.Namespace) -> int:
    from core.broker.sweep import sweep
    from core.config import get_settings
    from core.store.migrations import upgrade

    s = get_settings()
    upgrade(s.db_url)
    out = sweep(s, stale_s=args.stale.total_seconds())
    print(f"requeued {out.total} job(s): {len(out.resent)} re-sent, "
          f"{len(out.restored)} unacknowledged message(s) of dead workers put back")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from core.config import get_settings
    from core.store.migrations import upgrade

    url = get_settings().db_url
    upgrade(url)
    print(f"database at head: {url.split('@')[-1]}")
    return 0


def add_job_commands(sub) -> None:
    p = sub.add_parser("submit", help="enqueue jobs (text, image or audio files, a directory)")
    p.add_argument("modality", nargs="?", choices=MODALITIES)
    p.add_argument("inputs", nargs="*", help="texts, or image/audio file paths")
    p.add_argument("--from-dir", help="submit every image/audio/.txt file under DIR")
    p.add_argument("--task", default="embed", choices=list(TASKS),
                   help="transcribe: audio only, the text of what was said")
    p.add_argument("--labels", help="comma-separated labels (classify)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--timeout-s", type=float, help="drop the job if not started in time")
    p.add_argument("--model-version", help="a version of the modality (`mmq models list`) or "
                   "'base'; default: the promoted one when a worker starts the job")
    p.add_argument("--webhook-url", metavar="URL", help="POST a signed event there when "
                   "each job ends (http(s), a public host; docs/api.md)")
    p.add_argument("--webhook-embedding", action="store_true",
                   help="the webhook's event carries the embedding")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait and print results")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_submit)
    for name, fn, hlp in (("status", cmd_status, "a job's state and prediction"),
                          ("wait", cmd_wait, "block until jobs finish, print them")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("ids", nargs="+")
        p.add_argument("--embedding", action="store_true", help="include embedding vectors")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=300)
        p.set_defaults(func=fn)
    p = sub.add_parser("results", help="list jobs from the store")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--modality", choices=MODALITIES)
    p.add_argument("--owner", help="only the jobs of this API key id (a key's name, or "
                   "key-<hash>)")
    p.add_argument("--since", type=parse_duration, help="e.g. 1h, 30m")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_results)
    p = sub.add_parser("cancel", help="cancel queued or running jobs (a running job's "
                       "outcome is discarded)")
    p.add_argument("ids", nargs="+")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("requeue", help="sweep now: re-send jobs whose message was lost, recover "
                       "the running jobs of dead workers")
    p.add_argument("--stale", type=parse_duration, default=timedelta(seconds=60),
                   help="only jobs sent longer ago than this (default 60s)")
    p.set_defaults(func=cmd_requeue)
    p = sub.add_parser("db", help="database migrations")
    p.add_argument("action", choices=["upgrade"])
    p.set_defaults(func=cmd_db_upgrade)
