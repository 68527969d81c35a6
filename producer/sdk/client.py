"""The Python SDK: submit jobs, read results, wait, cancel.

    from producer.sdk import Client
    c = Client()                                   # MMQ_BROKER_URL / MMQ_DATABASE_URL
    ids = [c.submit_text("hello"), c.submit_image("digit.png", task="classify",
                                                  labels=["zero", "one"])]
    results = c.wait(ids, timeout=60)

Inputs are validated before anything is written; a bad one raises ``InvalidInput``
and enqueues nothing. The job row (and payload) is committed before the task is
sent, so a failed send leaves a ``queued`` job that ``requeue`` will re-send.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime
from numbers import Real
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from core import store
from core.broker.sender import producer_app, send_jobs
from core.config import Settings, get_settings
from core.errors import InvalidInput, brief_error
from core.inputs import AudioConfig, ImageConfig, decode_image, read_audio, validate_text
from core.jobs import TASKS, TERMINAL, JobStatus, Modality, Task
from core.params import job_params
from core.store import versions
from core.store.migrations import upgrade
from core.webhooks.urls import check_url

log = logging.getLogger(__name__)
# What an item of submit_many may name (docs/pipeline.md); any other key is refused.
ITEM_KEYS = ("modality", "input", "task", "labels", "top_k", "timeout_s", "deadline",
             "model_version", "webhook_url", "webhook_embedding")
_ENGINE_LOCK = threading.Lock()  # one search engine per Client, made on first use


class IdempotencyConflict(ValueError):
    """An idempotency key reused for a different request."""


@dataclass
class Submitted:
    ids: list[str]
    replayed: bool = False  # the ids come from an earlier call with the same key


def check_wait_timeout(timeout: object) -> float:
    """A wait's timeout: finite seconds, at least 0. NaN waited for ever (no time is
    past it), and infinity is a wait that no caller means; both are ``InvalidInput``."""
    if isinstance(timeout, bool) or not isinstance(timeout, Real):
        raise InvalidInput(f"wait timeout must be a number of seconds, got {timeout!r}"[:200])
    try:
        t = float(timeout)
    except OverflowError:
        t = math.inf
    if not (math.isfinite(t) and t >= 0):
        raise InvalidInput(f"wait timeout must be finite seconds, at least 0, got {timeout!r}"
                           [:200])
    return t


def request_digest(rows: list[dict]) -> str:
    """What makes two submits "the same request": every field but the deadline."""
    h = hashlib.sha256()
    for row in rows:
        payload = row.get("payload")
        fields = [row["modality"], row["task"], row["params"], row.get("text"),
                  hashlib.sha256(payload).hexdigest() if payload else None]
        if row.get("model_version"):  # only when named: older keys keep their digests
            fields.append(row["model_version"])
        if row.get("webhook_url"):  # likewise
            fields.append([row["webhook_url"], row.get("webhook_embedding", False)])
        h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()


class Client:
    def __init__(self, broker_url: str | None = None, database_url: str | None = None, *,
                 settings: Settings | None = None, migrate: bool = True):
        base = settings or get_settings()
        self.settings = base.model_copy(update={
            k: v for k, v in {"broker_url": broker_url, "database_url": database_url}.items()
            if v is not None})
        if migrate:
            upgrade(self.settings.db_url)
        self.engine = store.make_engine(self.settings.db_url)
        self.sessions = store.session_factory(self.engine)
        self.app = producer_app(self.settings)
        self._image_cfg = ImageConfig(max_bytes=self.settings.max_payload_bytes)
        self._audio_cfg = AudioConfig(max_bytes=self.settings.max_payload_bytes)

    def close(self) -> None:
        self.engine.dispose()

    # -- searching (producer/sdk/search.py) -------------------------------------------------

    def search(self, query: str | bytes | Path, *, k: int = 10, owner: str | None = None,
               **filters) -> list[dict]:
        """The k stored jobs nearest to ``query``, best first, as dicts with keys id,
        modality, task, score, summary, created_at, model_version, label, label_score,
        text, owner. ``query``: a str is text; bytes or a ``Path`` are an image or audio
        file (found from the bytes). Filters: modality, task, label (the top label),
        model_version (exact; default: any in the query's embedding space: its base model
        and the adapters trained into it), created_since, created_until (datetimes);
        ``owner``: only that key id's jobs (None: everyone's); ``query_modality``
        ("image" | "audio") skips sniffing the bytes. ``InvalidInput`` for a bad query,
        ``producer.sdk.search.SearchUnavailable`` when no worker embeds it in time."""
        from producer.sdk.search import run_search

        res = run_search(self, query, k=k, owner=owner, **filters)
        return [h.as_dict() for h in res.hits]

    def search_engine(self):
        """This client's vector cache and index (built on first use, then kept current)."""
        with _ENGINE_LOCK:
            if getattr(self, "_search", None) is None:
                from core.search import SearchConfig, SearchEngine

                self._search = SearchEngine(self.sessions,
                                            SearchConfig.from_settings(self.settings))
            return self._search

    # -- submitting ---------------------------------------------------------------------

    def submit_text(self, text: str, **kw) -> str:
        return self.submit_many([{"modality": "text", "input": text, **kw}])[0]

    def submit_image(self, image: str | Path | bytes, **kw) -> str:
        return self.submit_many([{"modality": "image", "input": image, **kw}])[0]

    def submit_audio(self, audio: str | Path | bytes, **kw) -> str:
        return self.submit_many([{"modality": "audio", "input": audio, **kw}])[0]

    def submit_many(self, items: list[dict], *, idempotency_key: str | None = None,
                    owner: str | None = None, webhook_url: str | None = None,
                    webhook_embedding: bool | None = None) -> list[str]:
        """Each item: modality, input, and optionally task ("embed" | "classify"),
        labels, top_k, deadline (datetime) or timeout_s, model_version (a version of
        that modality, or "base"; default: the promoted one when a worker starts it),
        webhook_url (POSTed a signed event when the job ends; ``webhook_embedding``:
        with the embedding). ``webhook_url=`` here is every item's that names none.
        All are validated first; one bad item raises ``InvalidInput`` (naming it) and
        nothing is enqueued. Rows are written in one transaction, then the tasks are
        sent over one connection. With an ``idempotency_key``, submitting the same
        items again returns the first call's job ids and queues nothing (see
        ``submit``)."""
        if webhook_url is not None or webhook_embedding is not None:
            common = {k: v for k, v in (("webhook_url", webhook_url),
                                        ("webhook_embedding", webhook_embedding))
                      if v is not None}
            items = [{**common, **it} if isinstance(it, dict) else it for it in items]
        return self.submit(items, idempotency_key=idempotency_key, owner=owner).ids

    def submit(self, items: list[dict], *, idempotency_key: str | None = None,
               owner: str | None = None) -> Submitted:
        """``submit_many`` that also says whether the ids are a replay of an earlier
        call with the same key. The same key with different items raises
        ``IdempotencyConflict``; deadlines are not part of the comparison, so a
        retried request with ``timeout_s`` is still the same request. A replay says
        nothing of the jobs' state now (they may have finished): ``get`` or ``wait``
        reads it. ``owner`` is
        the key id the jobs belong to (the API passes its caller's; never a key)."""
        return self.submit_valid(self.validate(items), idempotency_key=idempotency_key,
                                 owner=owner)

    def validate(self, items: list[dict]) -> list[dict]:
        """Check every item (``InvalidInput`` names the first bad one); -> the rows
        ``submit_valid`` writes. For callers that must refuse bad input before
        anything else (the API: before it reserves room in the queue)."""
        if isinstance(items, dict | str | bytes) or not isinstance(items, list | tuple):
            raise InvalidInput(f"items must be a list of dicts, got {type(items).__name__}")
        if not items:
            raise InvalidInput("no items to submit")
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise InvalidInput(f"an item must be a dict (modality, input, ...), got "
                                   f"{type(it).__name__}", index=i)
        rows = [self._validate(i, it) for i, it in enumerate(items)]
        self._check_versions(rows)
        return rows

    def _check_versions(self, rows: list[dict]) -> None:
        """Each named model_version exists and is of the job's modality (one query)."""
        named = [(i, r) for i, r in enumerate(rows) if r.get("model_version") is not None]
        if not named:
            return
        with self.sessions() as s:
            known = versions.version_modalities(
                session=s, names=[r["model_version"] for _, r in named
                                  if isinstance(r["model_version"], str)])
        for i, r in named:
            try:
                versions.check_job_version(r["model_version"], r["modality"], known)
            except InvalidInput as e:
                raise InvalidInput(e.reason, index=i) from None

    def submit_valid(self, rows: list[dict], *, idempotency_key: str | None = None,
                     owner: str | None = None) -> Submitted:
        """``submit`` of rows that ``validate`` returned."""
        digest = request_digest(rows) if idempotency_key else ""
        try:
            with self.sessions.begin() as s:
                if idempotency_key and (prior := self._replay(s, idempotency_key, digest)):
                    return prior
                now = store.db_time(session=s)  # one clock for every stamp and deadline
                pairs = store.create_jobs(session=s, rows=rows, owner=owner, now=now)
                if idempotency_key:  # same transaction: the key exists iff the jobs do
                    store.put_idempotency(session=s, key=idempotency_key, request_hash=digest,
                                          job_ids=[i for i, _ in pairs], created_at=now)
        except IntegrityError:
            if not idempotency_key:
                raise
            with self.sessions() as s:  # a concurrent call with the same key won the race
                if prior := self._replay(s, idempotency_key, digest):
                    return prior
            raise
        ids = [i for i, _ in pairs]
        try:
            try:
                sent = send_jobs(self.app, pairs, self.settings.jobs_per_message)
            except Exception as e:  # noqa: BLE001
                # Once more, on a new connection: after a Sentinel failover the first
                # send can fail on a pooled connection to the lost primary (a timeout,
                # then redis-py drops it), and the second finds the new one at once
                # instead of waiting for the sweep. A send that half happened is sent
                # twice: the job may run twice, and its upsert keeps one prediction.
                log.info("send failed (%s); trying once more", brief_error(e))
                sent = send_jobs(self.app, pairs, self.settings.jobs_per_message)
        except Exception as e:  # broker down: the rows stay queued for requeue
            log.warning("could not send %d job(s) (%s); `mmq requeue` will re-send them",
                        len(pairs), brief_error(e))
            return Submitted(ids)
        try:
            with self.sessions.begin() as s:
                store.mark_sent(session=s, job_ids=sent)
        except Exception as e:  # noqa: BLE001  (the jobs are queued: a 503 would be a lie)
            # The sweep reads a missing send time as "created then": at worst a job
            # is re-sent once after a minute, and the upsert keeps one prediction.
            # brief_error: SQLAlchemy's message carries the statement with every id.
            log.warning("sent %d job(s) but could not record it (%s)", len(sent),
                        brief_error(e))
        return Submitted(ids)

    @staticmethod
    def _replay(session, key: str, digest: str) -> Submitted | None:
        prior = store.get_idempotency(session=session, key=key)
        if prior is None:
            return None
        if prior.request_hash != digest:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request")
        return Submitted(list(prior.job_ids), replayed=True)

    def _validate(self, index: int, item: dict) -> dict:
        if unknown := [k for k in item if k not in ITEM_KEYS]:
            # A misspelt key was dropped without a word: submit_text(t, timeout=5) queued
            # a job with no deadline. The API refuses unknown fields too.
            hints = [f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
                str(k), ITEM_KEYS, n=1)) else "" for k in unknown]
            raise InvalidInput("unknown item key(s): " + ", ".join(
                f"{k!r}{h}" for k, h in zip(unknown, hints, strict=True))
                + f"; accepted: {', '.join(ITEM_KEYS)}", index=index)
        try:
            modality = Modality(item.get("modality")).value
        except ValueError:
            raise InvalidInput(f"modality must be one of text, image, audio, got "
                               f"{item.get('modality')!r}", index=index) from None
        try:
            task = Task(item.get("task", "embed")).value
        except ValueError:
            raise InvalidInput(f"task must be one of {', '.join(TASKS)}, got "
                               f"{item.get('task')!r}", index=index) from None
        if task == Task.TRANSCRIBE.value and modality != Modality.AUDIO.value:
            raise InvalidInput(f"task transcribe is for audio, not {modality}", index=index)
        try:  # labels, top_k, timeout_s/deadline: types and bounds in core/params.py
            params, deadline, timeout_s = job_params(item, task, self.settings)
        except InvalidInput as e:
            raise InvalidInput(e.reason, index=index, kind=e.kind) from None
        row = {"modality": modality, "task": task, "params": params, "deadline": deadline,
               "timeout_s": timeout_s}
        if item.get("model_version") is not None:  # checked against the store in validate()
            row["model_version"] = item["model_version"]
        if item.get("webhook_url") is not None:
            row |= self._webhook(item, index)
        data = item.get("input")
        if modality == "text":
            row["text"] = validate_text(data, self.settings.max_text_chars, index)
            return row
        if isinstance(data, str | Path):
            try:
                data = Path(data).read_bytes()
            except OSError as e:
                raise InvalidInput(f"cannot read {data}: {e.strerror}", index=index) from None
        if not isinstance(data, bytes | bytearray):
            raise InvalidInput(f"{modality} input must be a path or bytes, got "
                               f"{type(data).__name__}", index=index)
        data = bytes(data)
        if modality == "image":
            decode_image(data, self._image_cfg, index)  # decodable, within limits
        else:
            read_audio(data, self._audio_cfg, index)
        row["payload"] = data
        return row

    def _webhook(self, item: dict, index: int) -> dict:
        """webhook_url (http(s), a public host: core/webhooks/urls.py) and
        webhook_embedding, as the job row's columns."""
        if not self.settings.webhook_secret:
            raise InvalidInput("webhook_url: webhooks are off here (no MMQ_WEBHOOK_SECRET "
                               "to sign them with)", index=index)
        url = check_url(item["webhook_url"], allow_private=self.settings.webhook_allow_private,
                        index=index)
        embedding = item.get("webhook_embedding", False)
        if not isinstance(embedding, bool):
            raise InvalidInput(f"webhook_embedding must be true or false, got {embedding!r}",
                               index=index)
        return {"webhook_url": url, "webhook_embedding": embedding}

    # -- reading ------------------------------------------------------------------------

    # ``owner`` on the reads: only that key id's jobs (another's look like no job);
    # None, the default, sees every job: the SDK talks to SQL directly and is trusted.

    def get(self, job_id: str, *, with_embedding: bool = True,
            owner: str | None = None) -> dict | None:
        """The job as a dict, with ``prediction`` once it has succeeded."""
        with self.sessions() as s:
            job = store.get_job(session=s, job_id=job_id, owner=owner)
            if job is None:
                return None
            out = job.as_dict()
            pred = store.get_prediction(session=s, job_id=job_id)
            out["prediction"] = pred.as_dict(with_embedding) if pred else None
            return out

    def wait(self, job_ids: list[str], timeout: float = 60.0, poll: float = 0.05,
             *, with_embedding: bool = True, owner: str | None = None) -> list[dict]:
        """Block until every job is terminal (or raise TimeoutError); results in order.
        ``timeout``: finite seconds, at least 0 (``InvalidInput`` otherwise)."""
        timeout = check_wait_timeout(timeout)
        # Another key's job never finishes, as if unknown.
        last = store.wait_statuses(self.sessions, job_ids, timeout=timeout, poll=poll,
                                   max_poll=0.5, owner=owner)
        pending = [j for j, status in last.items() if status not in TERMINAL]
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(job_ids)} job(s) not done after "
                               f"{timeout:g} s")
        return [self.get(i, with_embedding=with_embedding, owner=owner) for i in job_ids]

    def missing(self, job_ids: list[str], *, owner: str | None = None) -> list[str]:
        """The ids among ``job_ids`` that name no job (with ``owner``: none of that key
        id's), each once, in order. ``wait`` treats such an id as a job not finished yet
        (the API must not tell a key that another key's job exists); a trusted caller
        such as the CLI asks here first, so that a mistyped id fails at once."""
        found: set[str] = set()
        unique = list(dict.fromkeys(job_ids))
        with self.sessions() as s:
            for i in range(0, len(unique), 500):  # bound the IN list's parameters
                found |= set(store.job_statuses(session=s, job_ids=unique[i:i + 500],
                                                owner=owner))
        return [j for j in unique if j not in found]

    def cancel(self, job_id: str, *, owner: str | None = None) -> bool:
        """Cancel a queued or running job -> True if the job is ``cancelled``, by this
        call or an earlier one (a repeated cancel succeeds again, as the API's DELETE
        answers 200 again); False if it had already succeeded or failed, or names no
        job (with ``owner``: none of that key id's). A running attempt is not
        interrupted: its worker drops the job from a batch that has not started, and
        the store discards the attempt's outcome (the fence), so the job stays
        ``cancelled``."""
        with self.sessions.begin() as s:
            if store.cancel_job(session=s, job_id=job_id, owner=owner):
                return True
            # Not cancellable now: already cancelled (final, so still true when read),
            # or finished otherwise, or unknown.
            status = store.job_statuses(session=s, job_ids=[job_id], owner=owner)
            return status.get(job_id) == JobStatus.CANCELLED.value

    def results(self, *, status: str | None = None, modality: str | None = None,
                since: datetime | None = None, limit: int = 100,
                owner: str | None = None) -> list[dict]:
        with self.sessions() as s:
            return [j.as_dict() for j in store.list_jobs(
                session=s, status=status, modality=modality, since=since, limit=limit,
                owner=owner)]

    # -- model versions (core/store/versions.py) ----------------------------------------

    def train(self, modality: str, data_dir: str | Path, name: str, *, seed: int = 0,
              promote: bool = False, progress: bool = True, config=None,
              group_by: str | None = None, source: dict | None = None) -> dict:
        """Fine-tune a version on ``data_dir`` (one sub-folder per label, or
        labels.csv/.jsonl, optionally with a group column) and record it as version
        ``name``: a candidate, or promoted with ``promote`` if it beats its base on the
        held-out items (else it stays a candidate: the row's ``metrics["beats_base"]``
        says why). ``group_by``: a regular expression on each file's relative path
        naming its group (speaker, session); the held-out items are then whole unseen
        groups. ``source``: where the data came from, recorded in the version's config
        (corrections). Runs in this process: it loads the model and needs torch,
        imported here so that importing the SDK stays light. -> the version's row;
        ``DataError`` for unusable data, before any training."""
        from core.model.multimodal import MultimodalModel
        from core.training.finetune import FinetuneConfig, train_version
        from core.training.labelled import read_labelled

        if modality not in {m.value for m in Modality}:
            raise InvalidInput(f"modality must be one of text, image, audio, got {modality!r}")
        versions.check_version_name(name)
        read_labelled(data_dir, group_by=group_by)  # the layout's errors before the model
        # loads (seconds)
        cfg = config or FinetuneConfig(seed=seed)
        model = MultimodalModel.load(settings=self.settings)
        out = train_version(model=model, modality=modality, data_dir=data_dir, name=name,
                            sessions=self.sessions, adapters_dir=self.settings.adapters_path,
                            cfg=cfg, progress=progress, group_by=group_by, source=source)
        if promote and out["metrics"].get("beats_base"):
            out = self.promote(name)
        return out

    def train_from_corrections(self, modality: str, name: str, *, owner: str | None = None,
                               **kw) -> dict:
        """``train`` on the corrected classify jobs of ``modality`` (with ``owner``: only
        that key id's): their stored inputs, labelled with their corrections. The count
        goes with the version (``corrections`` in ``model(name)``). ``DataError`` when
        there are none, or too few, before any training."""
        import tempfile

        from core.training.corrections import export_corrections

        if modality not in {m.value for m in Modality}:
            raise InvalidInput(f"modality must be one of text, image, audio, got {modality!r}")
        versions.check_version_name(name)
        with tempfile.TemporaryDirectory(prefix="mmq-corrections-") as tmp:
            found = export_corrections(self.sessions, modality, tmp, owner=owner)
            return self.train(modality, tmp, name, source=found.source(owner), **kw)

    # -- corrections (core/store/corrections.py) ----------------------------------------

    def correct(self, job_id: str, label: str, *, by: str = "sdk") -> dict:
        """Mark ``label`` as the right label of a classify job that succeeded (one of its
        labels or a new one), replacing any earlier correction; ``by`` names who.
        ``InvalidInput`` for a bad label; ``CorrectionRefused`` for an unknown job, one
        that is not classify, or one that has not succeeded."""
        from core.params import check_labels
        from core.store import corrections

        (label,) = check_labels([label], max_labels=1,
                                max_chars=self.settings.max_label_chars)
        with self.sessions.begin() as s:
            return corrections.set_correction(session=s, job_id=job_id, label=label,
                                              by=by, via="sdk").as_dict()

    def correction(self, job_id: str) -> dict | None:
        """The job's correction, or None."""
        from core.store import corrections

        with self.sessions() as s:
            c = corrections.get_correction(session=s, job_id=job_id)
            return None if c is None else c.as_dict()

    def models(self, modality: str | None = None) -> list[dict]:
        """Every version (newest first per modality), with which one each modality serves."""
        with self.sessions() as s:
            return [v.as_dict(with_metrics=False)
                    for v in versions.list_versions(session=s, modality=modality)]

    def model(self, name: str) -> dict | None:
        with self.sessions() as s:
            v = versions.get_version(session=s, name=name)
            return None if v is None else v.as_dict()

    def promote(self, name: str) -> dict:
        """Jobs of its modality that name no version run ``name`` from now on: workers
        resolve the promoted version as each job starts (no restart)."""
        with self.sessions.begin() as s:
            return versions.promote(session=s, name=name).as_dict()

    def rollback(self, modality: str) -> tuple[str, str]:
        """Undo the last promote of ``modality`` -> (from, to); ``to`` may be "base"."""
        with self.sessions.begin() as s:
            return versions.rollback(session=s, modality=modality)

    def remove_model(self, name: str, *, force: bool = False) -> dict:
        """Delete a version's row, then its adapter file (not the promoted one)."""
        with self.sessions.begin() as s:
            v = versions.remove_version(session=s, name=name, force=force).as_dict()
        (Path(self.settings.adapters_path) / v["adapter_file"]).unlink(missing_ok=True)
        return v
