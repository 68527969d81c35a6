"""Adapters: small trained modules on top of a frozen tower (one per model version).

A version's embedding of an item is

    z = normalize(base + mlp((features - mean) / std))      (B, D)

where ``base`` is the frozen tower's own vector in the shared space (unit length) and
``features`` what the tower exposes through ``MultimodalModel.forward_features``: the
image backbone's pooled features (1280-d), the sentence embedding for text, the
audio tower's vector (the speech tower will hand in its mean-pooled encoder
states). The last layer starts at zero, so an untrained adapter is the base tower
exactly; training moves ``z`` towards the text embedding of its label name
(cross-entropy at the model's logit scale), so the vectors stay in the 384-d text
space and search across modalities still works.

Labels (``scoring="residual"``, format ``mmq-adapter/2``) are scored from the base's own
scores plus a learned correction (core/training/head.py):

    logits = head_scale * base_logits + x @ head_w.T + head_bias      (B, L)

with ``x`` the standardised features: the decoder's label scoring for audio, the
zero-shot distribution comparison for images, cosine for text, corrected rather than
replaced. A label the version was not trained on gets no correction. Versions of
format ``mmq-adapter/1`` (``scoring="cosine"``) score labels by cosine to ``z``, as
they were trained.

Weights are a safetensors file (tensors only: nothing executes at load) whose
sha256 is recorded in the ``model_versions`` row; ``load_adapter`` refuses a file
that does not match.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from core.model.files import sha256_file

FORMAT = "mmq-adapter/2"
LEGACY_FORMAT = "mmq-adapter/1"  # cosine scoring, no head tensors


@dataclass(frozen=True)
class AdapterConfig:
    modality: str
    feature: str  # what the tower hands in: "pooled" (image backbone) or "embedding"
    in_dim: int  # F, the width of those features
    dim: int = 384  # D, the shared space
    hidden: int = 256
    logit_scale: float = 20.0  # ModelConfig.logit_scale: trained at the scale it scores at
    labels: tuple[str, ...] = ()  # what it was trained to tell apart (the head's rows)
    # "residual": labels by the base's scores plus the head's correction; "cosine": by
    # cosine to the adapted vector (versions trained before the head existed).
    scoring: str = "residual"


class Adapter(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        # Feature standardisation from the training set: pooled CNN features are
        # non-negative with per-channel scales over two orders of magnitude.
        self.register_buffer("mean", torch.zeros(cfg.in_dim))
        self.register_buffer("std", torch.ones(cfg.in_dim))
        self.fc1 = nn.Linear(cfg.in_dim, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.dim)
        nn.init.zeros_(self.fc2.weight)  # start as the base tower (z = base)
        nn.init.zeros_(self.fc2.bias)
        # The label head (buffers: fitted by core/training/head.py, not by the MLP's
        # optimiser); these values are the base's scores unchanged.
        n = len(cfg.labels)
        self.register_buffer("head_scale", torch.ones(()))
        self.register_buffer("head_bias", torch.zeros(n))
        self.register_buffer("head_w", torch.zeros(n, cfg.in_dim))
        self._index = {lb: i for i, lb in enumerate(cfg.labels)}

    @property
    def residual(self) -> bool:
        return self.cfg.scoring == "residual"

    def set_head(self, scale: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor) -> None:
        self.head_scale.copy_(scale)
        self.head_bias.copy_(bias)
        self.head_w.copy_(weight)

    def standardise(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std  # (B, F)

    def label_logits(self, base_logits: torch.Tensor, feats: torch.Tensor,
                     labels: list[str]) -> torch.Tensor:
        """(B, L') the base's logits of a job's labels, (B, F) features -> (B, L')
        corrected logits. Labels outside the trained set keep the base's score (scaled)."""
        if not self._index:
            return self.head_scale * base_logits
        corr = self.standardise(feats) @ self.head_w.T + self.head_bias  # (B, L)
        idx = [self._index.get(lb) for lb in labels]
        known = torch.tensor([i is not None for i in idx])  # (L',)
        take = torch.tensor([0 if i is None else i for i in idx])  # (L',)
        return self.head_scale * base_logits + torch.where(known, corr[:, take], 0.0)

    def forward(self, feats: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(B, F) features, (B, D) base vectors -> (B, D) unit vectors."""
        x = self.standardise(feats)  # (B, F)
        delta = self.fc2(F.gelu(self.fc1(x)))  # (B, D)
        return F.normalize(F.normalize(base, dim=-1) + delta, dim=-1)


def save_adapter(adapter: Adapter, directory: Path, name: str) -> tuple[Path, str]:
    """Write the weights atomically (a temp file, then a rename) -> (path, sha256).
    The name carries the digest, so a new version never overwrites an old file."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in adapter.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(asdict(adapter.cfg))}
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        digest = sha256_file(Path(tmp))
        path = directory / f"{name}-{digest[:16]}.safetensors"
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path, digest


class AdapterMismatch(ValueError):
    """The adapter file is not the one its version recorded (sha256), or not an adapter."""


def load_adapter(path: str | Path, expect_sha256: str) -> Adapter:
    """Load an adapter after checking the file's sha256 against the version's record."""
    path = Path(path)
    got = sha256_file(path)
    if got != expect_sha256:
        raise AdapterMismatch(f"{path}: sha256 {got} does not match the version's "
                              f"{expect_sha256}; the file is corrupt or was replaced")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise AdapterMismatch(f"{path}: not an mmq adapter (format {meta.get('format')!r})")
    legacy = meta["format"] == LEGACY_FORMAT
    d = json.loads(meta["config"])
    if legacy:
        d["scoring"] = "cosine"
    cfg = AdapterConfig(**{**d, "labels": tuple(d.get("labels", ()))})
    adapter = Adapter(cfg)
    # A legacy file has no head tensors: its (unused) head stays the identity.
    missing, unexpected = adapter.load_state_dict(load_file(str(path)), strict=not legacy)
    if unexpected or [k for k in missing if not k.startswith("head_")]:
        raise AdapterMismatch(f"{path}: tensors do not match its config "
                              f"(missing {missing}, unexpected {unexpected})")
    return adapter.eval()


class AdapterCache:
    """Adapters loaded on demand by (name, sha256), least recently used dropped past
    ``capacity``: a worker serves any number of versions with bounded memory."""

    def __init__(self, capacity: int = 16):
        self.capacity = max(1, capacity)
        self._loaded: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref, feature: tuple[str, int] | None = None) -> Adapter:
        """``ref``: a core.serving.contracts.AdapterRef. ``feature``: the (kind, width)
        this model's tower hands adapters of the ref's modality; an adapter trained on
        other features is refused rather than run on the wrong inputs."""
        key = (ref.name, ref.sha256)
        with self._lock:  # the batcher's streams look adapters up at once
            adapter = self._loaded.get(key)
            if adapter is None:
                adapter = load_adapter(ref.path, ref.sha256)
                if adapter.cfg.modality != ref.modality:
                    raise AdapterMismatch(f"version {ref.name!r}: its adapter is for "
                                          f"{adapter.cfg.modality}, not {ref.modality}")
                self._loaded[key] = adapter
                while len(self._loaded) > self.capacity:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
        if feature is not None and (adapter.cfg.feature, adapter.cfg.in_dim) != feature:
            raise AdapterMismatch(
                f"version {ref.name!r} was trained on {adapter.cfg.feature} features of "
                f"width {adapter.cfg.in_dim}; this worker's {ref.modality} tower gives "
                f"{feature[0]} of width {feature[1]} (retrain it on this tower)")
        return adapter

    def __len__(self) -> int:
        return len(self._loaded)
