"""The scenarios of bench/chaos.py (see its docstring): each takes a fresh ``Stack``,
the parsed arguments and a ``Result`` to fill in."""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter

import httpx

from bench.chaos_inputs import MAX_PAYLOAD, MAX_REQUEST, api_cases, sdk_cases
from bench.chaos_services import Worker
from bench.chaos_stack import API_KEY, Fault, Load, Result, Stack, finish_result
from core.errors import InvalidInput
from core.training.samples import sentences

AUTH = {"Authorization": f"Bearer {API_KEY}"}
KILLS = 5


# -- 1, 2: a worker, or its model process, SIGKILLed ------------------------------------------

def _wait_busy(stack: Stack, w: Worker, load: Load, timeout: float = 60) -> list[str]:
    """Until the worker is ready and has jobs running (so a kill hits work in flight)."""
    w.wait_ready()
    load.release = True
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ids := stack.running_on(w):
            return ids
        time.sleep(0.05)
    return []


def worker_kill(stack: Stack, args, res: Result, model: bool = False) -> None:
    res.target = "in-flight done <= 60 s"
    keep, victim = Worker(stack, args.concurrency), Worker(stack, args.concurrency)
    keep.wait_ready()
    victim.wait_ready()
    load = Load(stack, args.jobs, KILLS)
    load.start()
    for _ in range(KILLS):
        load.wait_point()
        _wait_busy(stack, victim, load)
        if model:
            child = victim.model_child()
            if child is None:
                res.notes.append(f"worker {victim.pid}: no model process found")
                continue
            os.kill(child, signal.SIGKILL)
            what = f"model process {child} of worker {victim.pid} killed"
        else:
            os.kill(victim.pid, signal.SIGKILL)
            what = f"worker {victim.pid} killed"
        t = time.monotonic()
        ids = stack.running_on(victim)  # what it held when it died (jobs end in ms)
        scope = "in-flight"
        if not model:  # and what it had fetched, not started: recovered another way
            fetched = [i for i in stack.fetched_unstarted() if i not in ids]
            scope = f"in-flight ({len(ids)} running, {len(fetched)} fetched unstarted)"
            ids += fetched
        load.fire(Fault(what, t, ids, target_s=60, scope=scope))
        if not ids:
            res.notes.append(f"{what} with no job running on it: this kill tests nothing")
        if model:
            try:
                victim.proc.wait(15)
                res.notes.append(f"worker {victim.pid} exited (rc {victim.proc.returncode}) "
                                 "after its model process was killed; replaced")
            except Exception:
                res.notes.append(f"worker {victim.pid} still up 15 s after its model "
                                 "process was killed (kept as the next victim)")
                _wait_new_child(victim, child)
                continue
        else:
            victim.proc.wait()
        victim = Worker(stack, args.concurrency)
    load.finish(args.timeout)
    if not keep.alive():
        res.notes.append(f"the worker that was never killed ({keep.pid}) died too")
    finish_result(res, stack, load)


def _wait_new_child(w: Worker, old: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and w.alive():
        c = w.model_child()
        if c is not None and c != old:
            return
        time.sleep(0.2)


def model_kill(stack: Stack, args, res: Result) -> None:
    worker_kill(stack, args, res, model=True)


# -- 3, 4, 5: Redis killed; with AOF, or restarted empty (and a worker killed) ---------------

def redis_restart(stack: Stack, args, res: Result, empty: bool, kill_worker: bool = False
                  ) -> None:
    res.target = "all done <= 120 s"
    workers = [Worker(stack, args.concurrency) for _ in range(2 if kill_worker else 1)]
    for w in workers:
        w.wait_ready()
    load = Load(stack, args.jobs, 1)
    load.start()
    load.wait_point()
    victim = workers[-1]
    load.release = True  # the fault meets a flow of jobs, not a drained queue
    busy: list[str] = []
    if kill_worker:
        busy = _wait_busy(stack, victim, load)
    else:
        time.sleep(1)
    ids = stack.all_ids()
    if kill_worker:
        os.kill(victim.pid, signal.SIGKILL)
        busy = stack.running_on(victim)  # what it really held when it died
    stack.redis.kill9()
    time.sleep(2)
    stack.redis.start(empty=empty)
    what = "Redis kill -9, back " + ("empty" if empty else "from its AOF") + (
        f", worker {victim.pid} killed" if kill_worker else "")
    load.fire(Fault(what, time.monotonic(), ids, target_s=120, scope="already submitted"))
    if kill_worker:
        victim.proc.wait()
        Worker(stack, args.concurrency)
    load.finish(args.timeout)
    finish_result(res, stack, load)
    if kill_worker:
        left = stack.open_among(busy)
        res.notes.append(f"worker {victim.pid} had {len(busy)} job(s) running when killed; "
                         f"{left} of them not terminal at the end")
        if not busy and res.passed:
            res.passed = None  # the kill met no job: nothing was shown


def redis_aof(stack, args, res):
    redis_restart(stack, args, res, empty=False)


def redis_empty(stack, args, res):
    redis_restart(stack, args, res, empty=True)


def redis_empty_worker(stack, args, res):
    redis_restart(stack, args, res, empty=True, kill_worker=True)


# -- 6: PostgreSQL unreachable for 10 s ------------------------------------------------------

def pg_outage(stack: Stack, args, res: Result) -> None:
    res.target = "none lost, none failed"
    if stack.proxy is None:
        res.notes.append("needs --db postgresql")
        return
    w = Worker(stack, args.concurrency)
    api = stack.start_api()
    w.wait_ready()
    load = Load(stack, args.jobs, 1)
    load.start()
    load.wait_point()
    load.release = True
    time.sleep(1)
    stack.proxy.down()
    codes: Counter = Counter()
    end = time.monotonic() + 10
    with httpx.Client(timeout=15, headers=AUTH) as h:
        while time.monotonic() < end:
            for method, path, body in (("POST", "/v1/jobs", {"text": "during the outage"}),
                                       ("GET", "/readyz", None)):
                try:
                    r = h.request(method, api + path, json=body)
                    codes[f"{method} {path} {r.status_code}"] += 1
                except httpx.HTTPError as e:
                    codes[f"{method} {path} {type(e).__name__}"] += 1
            time.sleep(max(0.0, min(1.0, end - time.monotonic())))
    ids = stack.all_ids()
    stack.proxy.up()
    load.fire(Fault("PostgreSQL back after 10 s", time.monotonic(), ids,
                    scope="already submitted"))
    load.finish(args.timeout)
    finish_result(res, stack, load)
    res.notes.append(f"API during the outage: {dict(codes)}")
    bad = [k for k in codes if k.startswith("POST") and not k.endswith(" 503")]
    if bad:
        res.notes.append("API answered a submit during the outage with something other "
                         f"than 503: {bad}")
        res.passed = False
    if not w.alive():
        res.notes.append(f"worker {w.pid} exited (rc {w.proc.returncode})")
        res.passed = False


# -- 7: poison messages ----------------------------------------------------------------------

def _envelope(tpl: dict, *, task: str | None = None, body=None, job_id: str | None = None
              ) -> bytes:
    e = copy.deepcopy(tpl)
    tid = job_id or str(uuid.uuid4())
    e["headers"].update({"id": tid, "root_id": tid})
    e["properties"].update({"correlation_id": tid, "delivery_tag": str(uuid.uuid4())})
    if task:
        e["headers"]["task"] = task
    if body is not None:
        e["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(e).encode()


def poison_shapes(tpl: dict) -> list[tuple[str, bytes]]:
    real = json.loads(base64.b64decode(tpl["body"]))  # [args, kwargs, embed]
    ghost = str(uuid.uuid4())
    return [("raw bytes", b"\x00\xff\xfenot json {"),
            ("a JSON list", b'[1, "two", {"three": 3}]'),
            ("envelope, bad body", _envelope(tpl, body={"not": "a task body"})),
            ("unknown task", _envelope(tpl, task="mmq.no_such_task")),
            ("job id not in SQL", _envelope(tpl, job_id=ghost,
                                            body=[[ghost], real[1], real[2]]))]


def _poison_id(raw: bytes) -> str | None:
    try:
        doc = json.loads(raw)
        doc = doc[0] if isinstance(doc, list) and doc and isinstance(doc[0], dict) else doc
        return doc["headers"]["id"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _remove_poison(r, raws: list[bytes]) -> int:
    """Take the poison messages out of the queue and the unacked hash (matched by
    bytes, or by task id: kombu re-serialises what it restores), so that the next
    shape is judged on its own."""
    ids = {i for i in map(_poison_id, raws) if i}
    n = 0
    for item in set(r.lrange("text", 0, -1)):
        if item in raws or _poison_id(item) in ids:
            n += r.lrem("text", 0, item)
    for tag, val in r.hgetall("unacked").items():
        if val in raws or _poison_id(val) in ids:
            r.hdel("unacked", tag)
            r.zrem("unacked_index", tag)
            n += 1
    return n


def poison(stack: Stack, args, res: Result) -> None:
    """One shape at a time: RPUSH it (the end workers pop from, so it comes first),
    then a share of real jobs; wait for them. A worker that dies is noted against
    the shape and replaced, so every shape gets its own verdict."""
    res.target = "worker up, real jobs ok"
    r = stack.redis.client()
    stack.client.submit_text("the envelope template")  # no worker yet: it stays queued
    tpl = json.loads(r.lrange("text", 0, 0)[0])
    shapes = poison_shapes(tpl)
    w = Worker(stack, args.concurrency)
    w.wait_ready()
    texts = sentences(args.jobs, seed=9)
    step = max(1, len(texts) // len(shapes))
    verdicts, deaths = [], 0
    for k, (name, raw) in enumerate(shapes):
        r.rpush("text", raw)
        chunk = texts[k * step:] if k == len(shapes) - 1 else texts[k * step:(k + 1) * step]
        stack.client.submit_many([{"modality": "text", "input": t} for t in chunk])
        end = time.monotonic() + min(args.timeout, 120)
        while time.monotonic() < end and w.alive() and stack.open_jobs():
            time.sleep(0.2)
        if not w.alive():
            deaths += 1
            back = _remove_poison(r, [p for _, p in shapes[:k + 1]])
            verdicts.append(f"{name}: worker {w.pid} DIED (rc {w.proc.returncode}); replaced"
                            + (f"; {back} poison message(s) were back in Redis (removed, "
                               "else they kill every new worker)" if back else ""))
            w = Worker(stack, args.concurrency)
            w.wait_ready()
        else:
            left = stack.open_jobs()
            verdicts.append(f"{name}: worker up, "
                            + (f"{left} job(s) still open" if left else "real jobs done"))
    end = time.monotonic() + args.timeout
    while time.monotonic() < end and w.alive() and stack.open_jobs():
        time.sleep(0.5)
    time.sleep(2)
    load = Load(stack, 1 + len(texts), 0)  # only for the summary
    finish_result(res, stack, load)
    res.passed = bool(res.passed) and deaths == 0 and w.alive()
    res.notes += verdicts
    dead = {k.decode(errors="replace"): r.llen(k) if r.type(k) == b"list" else r.type(k)
            for k in r.scan_iter("*dead*") if not k.startswith(b"_kombu")}
    res.notes.append(f"left in Redis: text queue {r.llen('text')}, unacked "
                     f"{r.hlen('unacked')}; dead-letter keys {dead or 'none'}")


# -- 8: bad inputs through the API and the SDK -----------------------------------------------

def _call_api(h: httpx.Client, url: str, kw: dict) -> str:
    kw = dict(kw)
    path = "/v1/jobs:batch" if kw.pop("batch", False) else "/v1/jobs"
    try:
        r = h.post(url + path, **kw)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}"
    return str(r.status_code)


def bad_input(stack: Stack, args, res: Result) -> None:
    res.target = "all 4xx / InvalidInput"
    url = stack.start_api(MMQ_MAX_REQUEST_BYTES=MAX_REQUEST, MMQ_MAX_PAYLOAD_BYTES=MAX_PAYLOAD)
    ok, bad = 0, []
    with httpx.Client(timeout=60, headers=AUTH) as h:
        for name, kw in api_cases():
            got = _call_api(h, url, kw)
            if got.isdigit() and 400 <= int(got) < 500:
                ok += 1
            else:
                bad.append(f"API {name}: {got}")
    for name, items in sdk_cases():
        try:
            stack.client.submit_many(items)
            bad.append(f"SDK {name}: accepted (no exception)")
        except InvalidInput:
            ok += 1
        except Exception as e:
            bad.append(f"SDK {name}: {type(e).__name__}: {str(e)[:100]}")
    if stack.api.poll() is not None:
        bad.append(f"the API process exited (rc {stack.api.returncode})")
    n = len(api_cases()) + len(sdk_cases())
    res.row = {"submitted": n, "succeeded": ok, "failed": len(bad)}
    res.passed = not bad
    res.notes.append(f"{ok} ok, {len(bad)} not ok (succeeded = rejected properly)")
    res.notes += bad


# -- 9: 200 concurrent clients against a queue limit of 100 ------------------------------------

def backpressure(stack: Stack, args, res: Result, clients: int = 200, each: int = 2,
                 limit: int = 100) -> None:
    res.target = f"queue <= {limit}, no 5xx"
    url = stack.start_api(MMQ_MAX_QUEUE_DEPTH=limit)
    r = stack.redis.client()
    codes: Counter = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    stop = threading.Event()
    seen = [0]

    def sample() -> None:
        while not stop.is_set():
            seen[0] = max(seen[0], r.llen("text"))
            time.sleep(0.005)

    def client(i: int) -> None:
        with httpx.Client(timeout=60, headers=AUTH) as h:
            barrier.wait()
            for k in range(each):
                try:
                    code = str(h.post(f"{url}/v1/jobs", json={"text": f"client {i} job {k}"}
                                      ).status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    codes[code] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.2)
    stop.set()
    final = r.llen("text")
    other = {c: n for c, n in codes.items() if c not in ("202", "429")}
    res.row = {"submitted": clients * each, "succeeded": codes["202"],
               "failed": sum(other.values())}
    res.passed = max(seen[0], final) <= limit and not other
    res.notes.append(f"{clients} clients x {each} submits: 202 x {codes['202']}, "
                     f"429 x {codes['429']}, other {other or 'none'}; queue length max "
                     f"sampled {seen[0]}, at the end {final}, limit {limit}")


SCENARIOS = [
    (1, "worker-kill", worker_kill),
    (2, "model-kill", model_kill),
    (3, "redis-aof", redis_aof),
    (4, "redis-empty", redis_empty),
    (5, "redis-empty+worker", redis_empty_worker),
    (6, "pg-outage", pg_outage),
    (7, "poison", poison),
    (8, "bad-input", bad_input),
    (9, "backpressure", backpressure),
]
