"""``mmq up``, ``mmq worker`` and ``mmq demo``: the local stack on embedded defaults.

Workers run as ``python -m workers <modality>`` child processes: the producer
side starts them by command, never by importing the workers package.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

from core.broker.redis_client import broker_transport_options, is_sentinel, redis_for
from core.config import LOCAL_API_KEY, Settings, get_settings
from core.jobs import QUEUES
from producer.ops.flower import add_flower_command, flower_command, flower_credentials, flower_env
from producer.ops.supervise import Supervisor, run_supervised

EXAMPLES = Path(__file__).parents[1] / "examples"  # producer/examples
DEMO_TEXTS = [
    "The striker scored twice in the second half and the home side won the cup.",
    "Shares slid after the bank warned that profits would fall this quarter.",
    "Heavy rain and strong winds are expected along the coast tomorrow morning.",
    "Simmer the tomatoes with garlic and basil, then stir in the pasta.",
]
TEXT_LABELS = ["sport", "finance", "weather", "cooking", "technology"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# photo-cat.jpg is scikit-image's "chelsea" (CC0, Stefan van der Walt).
PHOTO_LABELS = ["a cat", "a dog", "a cup of coffee", "a rocket", "a motorcycle", "a flower"]
WORDS = DIGITS + ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
# spoken-*.wav: espeak-ng recordings; the sentence is transcribed and classified by topic.
SPOKEN_SENTENCE = EXAMPLES / "spoken-weather.wav"
SPOKEN_TOPICS = ["weather", "sport", "cooking"]


def cmd_worker(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", "workers", args.modality]
    argv += ["--concurrency", str(args.concurrency)] if args.concurrency else []
    argv += ["--device", args.device] if args.device else []
    os.execv(sys.executable, argv)  # replaces this process: signals reach Celery directly


def _redis_up(url: str) -> bool:
    try:
        return bool(redis_for(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _ensure_redis(url: str, sup: Supervisor) -> None:
    if _redis_up(url):
        print(f"redis: using {url}")
        return
    if is_sentinel(url):
        raise SystemExit(f"mmq up: no Redis primary answers through the Sentinels at {url} "
                         f"(master name {get_settings().sentinel_master!r})")
    u = urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1") or not shutil.which("redis-server"):
        raise SystemExit(f"mmq up: no Redis answers at {url}, and none can be started here "
                         "(install redis-server or set MMQ_BROKER_URL)")
    data = Path(get_settings().data_dir).resolve() / "redis"
    data.mkdir(parents=True, exist_ok=True)
    sup.add("redis-server", functools.partial(
        subprocess.Popen,
        ["redis-server", "--port", str(u.port or 6379), "--bind", "127.0.0.1", "--dir",
         str(data), "--appendonly", "yes", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL))
    for _ in range(50):
        if _redis_up(url):
            print(f"redis: none was running at {url}; started redis-server (data in {data})")
            return
        time.sleep(0.1)
    raise SystemExit("mmq up: redis-server did not start")


def _wait_for_workers(timeout: float = 180) -> None:
    """Until one worker per queue answers a ping (its model is loaded by then)."""
    from celery import Celery

    s = get_settings()
    app = Celery(broker=s.broker_url)
    app.conf.broker_transport_options = broker_transport_options(s)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        replies = app.control.ping(timeout=1.0) or []
        names = {next(iter(r)) for r in replies}
        if all(any(n.startswith(f"{q}-") for n in names) for q in QUEUES):
            return
        time.sleep(1)
    raise SystemExit("mmq up: workers did not come up; see their logs above")


def _start_flower(s: Settings, port: int, sup: Supervisor) -> None:
    """Flower as `mmq flower` runs it; `mmq up` is the local stack, so without
    MMQ_FLOWER_BASIC_AUTH it gets a one-off login, printed here."""
    auth, generated = flower_credentials(s, local=True)
    sup.add("flower", functools.partial(
        subprocess.Popen, flower_command(port, "127.0.0.1"), env=flower_env(auth),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    login = f" (login {auth})" if generated else " (login from MMQ_FLOWER_BASIC_AUTH)"
    print(f"flower: http://127.0.0.1:{port}{login}")


def _start_api(s: Settings, port: int, sup: Supervisor) -> None:
    """`mmq api` in the local profile: without MMQ_API_KEYS the development key works."""
    env = dict(os.environ)
    if not s.api_keys:
        env["MMQ_PROFILE"] = "local"
    sup.add("api", functools.partial(
        subprocess.Popen, [sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    key = "a key from MMQ_API_KEYS" if s.api_keys else f"Bearer {LOCAL_API_KEY}"
    print(f"api: http://127.0.0.1:{port}/docs ({key}); results page: "
          f"http://127.0.0.1:{port}/ui")


def _worker_env(s: Settings, index: int) -> dict:
    """Each local worker exports its metrics on its own port: base, base+1, base+2."""
    env = dict(os.environ)
    if s.worker_metrics_port:
        env["MMQ_WORKER_METRICS_PORT"] = str(s.worker_metrics_port + index)
    return env


def cmd_up(args: argparse.Namespace) -> int:
    """The stack under a supervisor: a child that exits is restarted (with backoff)
    and the rest keeps running; Ctrl-C or SIGTERM stops everything."""
    return run_supervised(functools.partial(_bring_up, args))


def _child_output(name: str, verbose: bool) -> dict:
    """A child's stdout/stderr: the terminal with --verbose, else a log file under
    MMQ_DATA_DIR/logs (Celery's banners and per-worker logs stay out of the way)."""
    if verbose:
        return {}
    logs = Path(get_settings().data_dir).resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    f = open(logs / f"{name}.log", "ab")  # noqa: SIM115  (the child owns it from here)
    return {"stdout": f, "stderr": subprocess.STDOUT}


def _bring_up(args: argparse.Namespace, sup: Supervisor) -> None:
    from core.store.migrations import upgrade

    s = get_settings()
    _ensure_redis(s.broker_url, sup)
    upgrade(s.db_url)
    print(f"database: {s.db_url.split('@')[-1]}")
    for i, q in enumerate(QUEUES):
        sup.add(f"worker {q}", functools.partial(
            subprocess.Popen, [sys.executable, "-m", "workers", q] + (
                ["--concurrency", str(args.concurrency)] if args.concurrency else []),
            env=_worker_env(s, i), **_child_output(f"worker-{q}", args.verbose)))
    where = "this terminal" if args.verbose else f"{Path(s.data_dir).resolve() / 'logs'}"
    print(f"workers: {', '.join(QUEUES)} (logs: {where})")
    if not args.no_flower:
        _start_flower(s, args.flower_port or s.flower_port, sup)
    if not args.no_api:
        _start_api(s, args.api_port or s.api_port, sup)
    _wait_for_workers()
    print("mmq is up: workers for " + ", ".join(QUEUES) + ". Ctrl-C stops everything.")
    if args.demo:
        run_demo()


def run_demo(timeout: float = 120, client=None) -> None:
    """Submit the bundled examples, wait, print the predictions (and transcripts) from SQL.
    ``client``: a producer.sdk.Client (default: one from the MMQ_* settings)."""
    from producer.sdk import Client

    c = client or Client()
    images = sorted(EXAMPLES.glob("photo-*.jpg"))  # real photographs, for the ImageNet tower
    words = sorted(p for p in EXAMPLES.glob("spoken-*.wav") if p != SPOKEN_SENTENCE)
    items = [{"modality": "text", "input": t, "task": "classify", "labels": TEXT_LABELS,
              "top_k": 1} for t in DEMO_TEXTS]
    items += [{"modality": "image", "input": p, "task": "classify", "labels": PHOTO_LABELS,
               "top_k": 1} for p in images]
    # Spoken keywords, scored zero-shot by the speech tower's decoder against the words.
    items += [{"modality": "audio", "input": p, "task": "classify", "labels": WORDS,
               "top_k": 1} for p in words]
    # A spoken sentence: its transcript, and its topic.
    items += [{"modality": "audio", "input": SPOKEN_SENTENCE, "task": "transcribe"},
              {"modality": "audio", "input": SPOKEN_SENTENCE, "task": "classify",
               "labels": SPOKEN_TOPICS, "top_k": 1}]
    names = DEMO_TEXTS + [p.name for p in images + words] + [SPOKEN_SENTENCE.name] * 2
    ids = c.submit_many(items)
    results = c.wait(ids, timeout=timeout, with_embedding=False)
    print(f"\n{'modality':<8} {'task':<10} {'status':<9} {'label':<10} {'score':>6}  input")
    for name, r in zip(names, results, strict=True):
        pred = r["prediction"] or {}
        label, score = ((pred.get("labels") or [["-", None]])[0])
        score = f"{score:>6.3f}" if score is not None else f"{'-':>6}"
        heard = f"  heard: {pred['text']!r}" if pred.get("text") is not None else ""
        print(f"{r['modality']:<8} {r['task']:<10} {r['status']:<9} {label:<10} {score}  "
              f"{name[:70]}{heard}")
    print(f"\n{len(results)} jobs; results are in {c.settings.db_url.split('@')[-1]}")


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.timeout)
    return 0


def add_stack_commands(sub) -> None:
    p = sub.add_parser("worker", help="run a worker for one modality's queue")
    p.add_argument("modality", choices=QUEUES)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="task threads (default: twice the max batch size)")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("up", help="Redis if needed, a worker per modality, Flower, the API")
    p.add_argument("--demo", action="store_true", help="then run `mmq demo` once")
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--flower-port", type=int, default=None, help="default: MMQ_FLOWER_PORT")
    p.add_argument("--no-flower", action="store_true")
    p.add_argument("--api-port", type=int, default=None, help="default: MMQ_API_PORT")
    p.add_argument("--no-api", action="store_true")
    p.add_argument("--verbose", action="store_true",
                   help="the workers' own output (Celery banners, logs) in this terminal")
    p.set_defaults(func=cmd_up)
    add_flower_command(sub)
    p = sub.add_parser("demo", help="submit the bundled examples to a running stack")
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(func=cmd_demo)
