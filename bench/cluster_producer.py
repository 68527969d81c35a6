"""The producer host of bench/cluster.py: submits a mixed stream of jobs with
deadlines through the HTTP API, and cancels running jobs when told to.

Steered by a control file the bench rewrites (JSON: ``allow`` = how many jobs may have
been submitted so far, ``storm`` = a counter: each increment cancels every job the
API lists as running, ``stop``); reports to an append-only JSON-lines file:
``{"ids": [...], "mods": [...]}`` per accepted batch, ``{"cancel": id, "code": int,
"status": str}`` per DELETE, ``{"error": str}`` per refused or failed request.

    python bench/cluster_producer.py API_URL KEY CTL_FILE OUT_FILE [--seed N] [--text-only]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.training.samples import sentences  # noqa: E402

TIMEOUT_S = 300  # every job's deadline: dropped if no worker starts it within this
LABELS = ["weather", "sports", "music", "politics", "food"]
WORDS = ["yes", "no", "stop", "go", "left", "right"]


def _images(rng: random.Random, n: int = 6) -> list[str]:
    from PIL import Image

    out = []
    for _ in range(n):
        img = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(12):  # a few blocks, so the images differ
            x, y = rng.randrange(80), rng.randrange(80)
            img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 16, y + 16))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def _clips() -> list[str]:
    return [base64.b64encode(subprocess.run(["espeak-ng", "--stdout", w], check=True,
                                            capture_output=True).stdout).decode()
            for w in WORDS]


class Stream:
    """About 80% text (half embed, half classify), 12% image classify, 8% audio."""

    def __init__(self, seed: int, text_only: bool = False):
        self.rng = random.Random(seed)
        self.text_only = text_only
        self.texts = sentences(2000, seed=seed)
        self.images, self.clips = ([], []) if text_only else (_images(self.rng), _clips())

    def item(self) -> dict:
        r = 0.2 + 0.8 * self.rng.random() if self.text_only else self.rng.random()
        base = {"timeout_s": TIMEOUT_S}
        if r < 0.08:
            return {**base, "modality": "audio", "data_base64": self.rng.choice(self.clips)}
        if r < 0.20:
            return {**base, "modality": "image", "data_base64": self.rng.choice(self.images),
                    "task": "classify", "labels": ["a red square", "a blue sky", "a cat"],
                    "top_k": 2}
        text = self.rng.choice(self.texts)
        if r < 0.60:
            return {**base, "modality": "text", "text": text}
        return {**base, "modality": "text", "text": text, "task": "classify",
                "labels": LABELS, "top_k": 2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("api")
    ap.add_argument("key")
    ap.add_argument("ctl", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--text-only", action="store_true", help="for a fleet of text workers")
    args = ap.parse_args()
    stream = Stream(args.seed, args.text_only)
    http = httpx.Client(base_url=args.api, timeout=30,
                        headers={"Authorization": f"Bearer {args.key}"})
    out = open(args.out, "a", buffering=1)

    def note(**rec) -> None:
        out.write(json.dumps(rec) + "\n")

    submitted, storms, pending = 0, 0, None
    print("producer ready", flush=True)
    while True:
        try:
            ctl = json.loads(args.ctl.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
            continue
        if ctl.get("stop"):
            return
        if ctl.get("storm", 0) > storms:
            storms = ctl["storm"]
            _storm(http, note)
            continue
        if submitted >= ctl.get("allow", 0):
            time.sleep(0.1)
            continue
        if pending is None:  # a retried batch keeps its key: never submitted twice
            k = min(20, ctl["allow"] - submitted)
            pending = (str(uuid.uuid4()), [stream.item() for _ in range(k)])
        key, items = pending
        try:
            r = http.post("/v1/jobs:batch", json={"items": items},
                          headers={"Idempotency-Key": key})
        except httpx.HTTPError as e:
            note(error=f"submit: {type(e).__name__}")
            time.sleep(0.5)
            continue
        if r.status_code != 202:
            note(error=f"submit: {r.status_code} {r.text[:120]}")
            time.sleep(0.5)
            continue
        note(ids=[j["id"] for j in r.json()["jobs"]], mods=[i["modality"] for i in items])
        submitted += len(items)
        pending = None


def _storm(http: httpx.Client, note) -> None:
    """DELETE every job the API lists as running (this key's jobs)."""
    try:
        running = http.get("/v1/jobs", params={"status": "running", "limit": 1000}).json()
    except (httpx.HTTPError, ValueError) as e:
        note(error=f"storm list: {type(e).__name__}")
        return
    for job in running.get("jobs", []):
        try:
            r = http.delete(f"/v1/jobs/{job['id']}")
            body = r.json()
            status = body.get("status") or body.get("error", {}).get("message", "")[:80]
        except (httpx.HTTPError, ValueError) as e:
            note(cancel=job["id"], code=0, status=type(e).__name__)
            continue
        note(cancel=job["id"], code=r.status_code, status=status)


if __name__ == "__main__":
    main()
