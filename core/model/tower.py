"""The ``Tower`` protocol: what ``MultimodalModel`` asks of each modality's tower.

A tower owns one modality end to end, from raw items to vectors in the one embedding
space (the text tower's): ``TextJobs`` (core/model/text.py, all-MiniLM-L6-v2),
``ImageJobs`` (core/model/zeroshot.py, EfficientNet-Lite0 mapped zero-shot into the text
space) and ``SpeechJobs`` (core/model/speech.py, Whisper tiny.en: the transcript's text
embedding). ``MultimodalModel`` keeps them in a registry (modality -> tower) and runs
every modality through the same calls; what differs between modalities lives here,
behind the protocol, never in a branch on the modality's name.

Each tower's hyper-parameters are one small frozen dataclass (``TextTowerConfig``,
``ZeroShotConfig``, ``SpeechConfig``), gathered in ``ModelConfig`` (core/model/multimodal.py)
as open_clip gathers ``CLIPTextCfg`` and ``CLIPVisionCfg`` in its model config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from core.errors import InvalidInput


@dataclass
class TowerOutput:
    """One batch through a tower, as ``MultimodalModel.predict`` needs it."""

    # (B, D) on the CPU, as ``forward(..., unit=False)``: the base vectors adapters start
    # from and ``classify`` scores.
    vectors: torch.Tensor
    # (B, D) unit embeddings, what a prediction stores (may be ``vectors`` itself when
    # those are unit already; adapters then overwrite rows in place).
    embeddings: torch.Tensor
    features: torch.Tensor | None = None  # (B, F) adapter inputs, when asked for
    # Per item (L,) label logits from the tower's own pass (speech: under the decoder),
    # None for items without labels; None for towers that score labels by ``classify``.
    label_logits: list[torch.Tensor | None] | None = None
    texts: list[str] | None = None  # per item, towers that produce text (transcripts)
    # per item, with ``texts``: (start s, end s, text) of each timed segment of speech
    segments: list[list[tuple[float, float, str]]] | None = None


@runtime_checkable
class Tower(Protocol):
    """One modality's tower. ``Prepared`` items carry ``tokens`` (their cost in a batch's
    token budget) and ``truncated`` (the input was cut to the tower's limit)."""

    modality: str  # "text", "image" or "audio" (core.jobs.MODALITIES)
    # Whether ``batch`` scores label sets in its own pass (``TowerOutput.label_logits``);
    # False: labels are scored by ``classify`` over the vectors.
    labels_in_pass: bool

    @property
    def version(self) -> str:
        """This tower's part of ``MultimodalModel.version`` (joined with "+"): which weights
        the vectors come from, known without loading a lazily loaded tower."""
        ...

    def load(self) -> None:
        """Load now what the tower would load on its first batch (its weights): a worker
        of this modality says it is ready only once its tower is."""
        ...

    def prepare(self, items: list[object]) -> list[object | InvalidInput]:
        """Validate and preprocess raw items (text, image bytes, audio bytes or
        waveforms): one prepared item, or the ``InvalidInput`` saying why not, per item
        (indexed by its position); never raises for a bad item."""
        ...

    def forward(self, prepared: list, unit: bool = True) -> torch.Tensor:
        """One forward over prepared items -> (B, D) float32 on the CPU. ``unit=False``:
        the vectors ``classify`` scores exactly (images keep their length); unit either
        way where the tower has no such vectors."""
        ...

    def feature_kind(self) -> tuple[str, int]:
        """(name, width F) of what ``features`` hands an adapter (core/model/adapters.py);
        an adapter trained on another kind is refused."""
        ...

    def features(self, prepared: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward -> (vectors (B, D) as ``forward(..., unit=False)``, adapter
        features (B, F)), both on the CPU."""
        ...

    def classify(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) ``forward(..., unit=False)`` vectors, (L, D) label text embeddings ->
        (B, L) logits (softmax over the labels gives probabilities): the pretrained
        tower's own rule for zero-shot labels."""
        ...

    def batch(self, prepared: list, label_sets: list[list[str] | None],
              features: bool) -> TowerOutput:
        """A batch of jobs in one pass: the vectors and unit embeddings, the adapters'
        features when ``features``, and, where ``labels_in_pass``, each job's label set
        (None: no labels) scored. The dynamic batcher's forward."""
        ...


def cosine_logits(vectors: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, D) unit vectors, (L, D) unit label embeddings -> (B, L) ``scale * cosine``: the
    text space's zero-shot rule (and an adapter's: adapters train at this scale)."""
    return scale * vectors @ labels.T


def prepare_each(prepare_one, items: list[object]) -> list[object | InvalidInput]:
    """``prepare`` for towers that take items one by one: ``prepare_one(item, index)``
    raising ``InvalidInput`` becomes that item's verdict."""
    out: list[object | InvalidInput] = []
    for i, item in enumerate(items):
        try:
            out.append(prepare_one(item, i))
        except InvalidInput as e:
            out.append(e)
    return out


def vector_batch(tower: Tower, prepared: list, features: bool) -> TowerOutput:
    """``batch`` for towers that score labels by ``classify``: one forward (with the
    adapters' features when asked), embeddings the vectors normalised."""
    if features:
        vecs, feats = tower.features(prepared)  # (B, D), (B, F)
    else:
        vecs, feats = tower.forward(prepared, unit=False), None  # (B, D)
    return TowerOutput(vecs, torch.nn.functional.normalize(vecs, dim=-1), feats)
