"""The per-process model host: loaded once before the worker consumes anything.

The threads pool runs tasks concurrently; only one thread at a time may touch the
model (and the device), so calls are serialised here. Dynamic batching replaces
this lock with a batcher thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from core.config import Settings
from core.model import MultimodalModel, check_labels
from core.store import make_engine, session_factory


@dataclass
class ModelHost:
    settings: Settings
    model: MultimodalModel
    sessions: object  # sessionmaker
    lock: threading.Lock

    def run(self, modality: str, task: str, payload: object, params: dict) -> dict:
        """One job through the model -> the prediction fields for the store."""
        labels = check_labels(params.get("labels") or []) if task == "classify" else None
        prepared = self.model.prepare(modality, payload)
        with self.lock:
            emb = self.model.forward(modality, [prepared])  # (1, D)
            scores = (self.model.scores(emb, labels, int(params.get("top_k", 5)))
                      if labels else None)
        return {"embedding": emb[0].numpy(), "labels": scores[0] if scores else None,
                "tokens": prepared.tokens, "truncated": prepared.truncated}


_HOST: ModelHost | None = None


def init_host(settings: Settings, device: str | None = None) -> ModelHost:
    global _HOST
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    model = MultimodalModel.load(device=device or settings.device, settings=settings)
    engine = make_engine(settings.db_url)
    _HOST = ModelHost(settings, model, session_factory(engine), threading.Lock())
    return _HOST


def host() -> ModelHost:
    if _HOST is None:
        raise RuntimeError("the model host is not initialised; start workers with "
                           "`mmq worker <modality>`")
    return _HOST
