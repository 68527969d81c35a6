"""``MultimodalModel``: the three towers behind one API, embeddings in one space.

Text: all-MiniLM-L6-v2 (or a local checkpoint). Images: EfficientNet-Lite0 mapped
zero-shot into the text space (core/model/zeroshot.py). Audio: the Whisper speech
tower, whose transcript's text embedding is the clip's (core/model/speech.py). The
image and speech towers load on their modality's first item, so a text worker never
holds them. Each is a ``Tower`` (core/model/tower.py) in ``MultimodalModel.towers``;
the methods here are the same for every modality.

Callers hand in raw items; each item is validated on its own (``prepare_many``
returns an ``InvalidInput`` in that item's slot), valid items are packed into
ragged batches under a token budget and run through the tower in one forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.config import CPU_BATCH_TOKENS, Settings, get_settings
from core.errors import InvalidInput
from core.jobs import MODALITIES, JobResult
from core.model.attention import resolve_impl
from core.model.files import sha256_file
from core.model.lru import LruCache
from core.model.precision import apply_precision, resolve_precision
from core.model.speech import SpeechJobs, SpeechPrepared
from core.model.text import TextItem, TextJobs, TextPreprocessor, TextTower, default_text_path
from core.model.tower import Tower, TowerOutput, cosine_logits
from core.model.whisper.tower import SpeechConfig, SpeechTower
from core.model.zeroshot import ImageJobs, PixelItem, ZeroShotConfig, ZeroShotImageTower
from core.params import check_labels
from core.precision import tagged

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    # Zero-shot scores are softmax(logit_scale * cosine) over the labels; cosines of
    # this embedding space sit in a narrow band, so a scale near CLIP's learned
    # temperature (1/0.05) spreads them into usable probabilities. Adapters (model
    # versions) are trained at this same scale.
    logit_scale: float = 20.0
    # Real tokens per forward when a caller passes a long list (``MultimodalModel.load``
    # takes Settings.batching's, the batcher's budget too).
    max_batch_tokens: int = CPU_BATCH_TOKENS
    attention_impl: str = "auto"
    # Label embeddings kept for reuse (least recently used dropped first): label sets
    # repeat across jobs, but a dict that never evicts grows with every new label any
    # client ever sends. 16384 x 384 float32 = 24 MiB at most.
    label_cache_size: int = 16_384
    # The towers' own configs, one small dataclass each (open_clip's CLIPVisionCfg way).
    # The text tower's comes with its checkpoint (TextTowerConfig.from_dir).
    image: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)  # beam_size: Settings'


Prepared = TextItem | PixelItem | SpeechPrepared


@dataclass
class ItemResult:
    embedding: torch.Tensor  # (D,) L2-normalised, on the CPU
    tokens: int  # tokens the item cost in the packed core
    truncated: bool  # input was longer than the tower's limit and was cut


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MultimodalModel:
    """The towers behind one API. ``towers`` is the registry (modality -> ``Tower``,
    core/model/tower.py) every method goes through; the text tower is always there (it
    anchors the space: labels, transcripts, the image tower's class bank)."""

    def __init__(self, text: TextJobs, device: torch.device, cfg: ModelConfig):
        self.device = device
        self.cfg = cfg
        self.towers: dict[str, Tower] = {"text": text}
        self.text = text.tower  # the text nn.Module (benches cast and time it)
        self.text_pre = text.pre
        self.dim = text.dim
        self._label_cache: LruCache = LruCache(cfg.label_cache_size)

    def add_tower(self, tower: Tower) -> None:
        """Register ``tower`` for its modality (replacing any tower there)."""
        self.towers[tower.modality] = tower

    @property
    def version(self) -> str:
        """The towers' versions joined: every prediction records the exact weights."""
        return "+".join(t.version for t in self.towers.values())

    @property
    def speech(self) -> SpeechJobs:
        return self.towers["audio"]  # type: ignore[return-value]

    @property
    def photo(self) -> ZeroShotImageTower:
        """The image tower's nn.Module, loaded on first use."""
        return self.towers["image"].photo  # type: ignore[attr-defined]

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | None = None, *,
             settings: Settings | None = None) -> MultimodalModel:
        s = settings or get_settings()
        if s.torch_threads > 0:
            torch.set_num_threads(s.torch_threads)
        root = Path(path or s.model_path or default_text_path())
        if not (root / "config.json").exists():
            raise FileNotFoundError(f"{root}: no config.json; expected a Hugging Face model dir")
        dev = pick_device(device or s.device)
        text = TextTower.from_pretrained(root)
        pre = TextPreprocessor(root, text.cfg.max_seq_len, s.max_text_chars)
        budget, _, _ = s.batching(dev.type)
        cfg = ModelConfig(max_batch_tokens=budget, attention_impl=s.attention_impl,
                          speech=SpeechConfig(beam_size=s.speech_beam_size,
                                              precision=s.speech_precision))
        name = "all-MiniLM-L6-v2" if root == default_text_path() else root.name
        text_version = f"{name}@{sha256_file(root / 'model.safetensors')[:12]}"
        precision = resolve_precision(s.text_precision, dev)
        apply_precision(text.encoder, precision, dev, budget)

        def load_speech() -> SpeechTower:
            return SpeechTower.from_bundled(dev, cfg=cfg.speech, cache=Path(s.whisper_cache)
                                            if s.whisper_cache else None)

        model = cls(TextJobs(text, pre, dev, tagged(text_version, precision),
                             cfg.attention_impl, cfg.logit_scale), dev, cfg)
        # The image tower's class bank is keyed by the untagged text version: the bank
        # shipped (computed in fp32) serves every precision of the same weights.
        model.add_tower(ImageJobs(lambda xs: model.embed("text", xs), text_version,
                                  s.image_weights, dev, cfg.image,
                                  precision=resolve_precision(s.image_precision, dev)))
        # Resolved here, before the tower loads, so the version is known without it.
        speech_precision = resolve_precision(s.speech_precision, dev)
        model.add_tower(SpeechJobs(load_speech, cfg.speech.beam_size, model._embed_transcripts,
                                   cfg.logit_scale, speech_precision))
        log.info("model %s on %s (text %s, speech %s, attention %s)", model.version, dev,
                 precision, speech_precision,
                 # bf16 on the CPU attends in fp32 (core/model/encoder.py)
                 resolve_impl(cfg.attention_impl, dev, torch.bfloat16
                              if precision == "bf16" and dev.type == "cuda" else torch.float32))
        return model

    # -- per item ---------------------------------------------------------------------

    def _tower(self, modality: str) -> Tower:
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; this model has {self.modalities}")
        return self.towers[modality]

    def load_tower(self, modality: str) -> None:
        """Load a lazily loaded tower now (a worker's own, before it says it is ready:
        Whisper took ~1.5 s of the first audio job after "ready")."""
        self._tower(modality).load()

    def _check_modality(self, modality: str) -> None:
        self._tower(modality)

    def prepare(self, modality: str, item: object, index: int | None = None) -> Prepared:
        """Validate and preprocess one item; raises ``InvalidInput`` saying why not."""
        return _raise_if_invalid(self.prepare_many(modality, [item])[0], index)

    def prepare_many(self, modality: str, items: list[object]) -> list[Prepared | InvalidInput]:
        """Validate and preprocess each item; a bad item yields its ``InvalidInput``."""
        return self._tower(modality).prepare(list(items))

    # -- batched forward --------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, modality: str, prepared: list[Prepared], unit: bool = True) -> torch.Tensor:
        """One packed forward over already-prepared items -> (B, D) on the CPU. With
        ``unit=False`` image vectors keep the length that scores labels exactly
        (``scores(..., modality="image")``); other modalities are unit either way."""
        return self._tower(modality).forward(prepared, unit)

    # -- features for adapters (core/model/adapters.py) --------------------------------

    def feature_kind(self, modality: str) -> tuple[str, int]:
        """(name, width F) of what ``forward_features`` hands an adapter: for images the
        ImageNet backbone's last block's map on a 2x2 grid (measured best of its
        features: bench/finetune.py), for audio the speech tower's mean-pooled encoder
        states, for text the sentence embedding."""
        return self._tower(modality).feature_kind()

    @torch.inference_mode()
    def forward_features(self, modality: str, prepared: list[Prepared],
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward -> (vectors (B, D) as ``forward(..., unit=False)``, features
        (B, F) for adapters), both on the CPU."""
        return self._tower(modality).features(prepared)

    def features(self, modality: str, prepared: list[Prepared]) -> torch.Tensor:
        """(B, F) adapter inputs of already-prepared items."""
        return self.forward_features(modality, prepared)[1]

    def _chunks(self, prepared: list[Prepared]) -> list[list[Prepared]]:
        """Split a long list into forwards of at most ``max_batch_tokens`` real tokens."""
        chunks: list[list[Prepared]] = [[]]
        used = 0
        for p in prepared:
            if chunks[-1] and used + p.tokens > self.cfg.max_batch_tokens:
                chunks.append([])
                used = 0
            chunks[-1].append(p)
            used += p.tokens
        return chunks

    def embed_items(self, modality: str, inputs: list[object],
                    unit: bool = True) -> list[ItemResult]:
        """Embed valid inputs; raises the first item's ``InvalidInput`` if any is bad.
        ``unit=False``: vectors for ``scores`` (see ``forward``), not for search."""
        prepared = [_raise_if_invalid(p) for p in self.prepare_many(modality, inputs)]
        # Longest first across the whole list, as sentence-transformers does: each
        # forward then holds similar lengths, so attention groups need no padding.
        order = sorted(range(len(prepared)), key=lambda i: -prepared[i].tokens)
        out: list[ItemResult | None] = [None] * len(prepared)
        done = 0
        for chunk in self._chunks([prepared[i] for i in order]):
            emb = self.forward(modality, chunk, unit)  # (b, D)
            for e, p in zip(emb, chunk, strict=True):
                out[order[done]] = ItemResult(e, p.tokens, p.truncated)
                done += 1
        return out  # type: ignore[return-value]

    def embed(self, modality: str, inputs: list[object]) -> torch.Tensor:
        """(N, D) L2-normalised embeddings, comparable across modalities."""
        if not len(inputs):
            self._check_modality(modality)
            return torch.empty(0, self.dim)
        return torch.stack([r.embedding for r in self.embed_items(modality, inputs)])

    @torch.inference_mode()
    def predict(self, modality: str, prepared: list[Prepared],
                asks: list[tuple[list[str] | None, int]],
                adapters: list | None = None) -> list[JobResult]:
        """One batch of jobs -> their results, in order. ``asks`` holds each job's
        (labels, top_k): labels None = embed only. ``adapters``: each job's model
        version (a core.model.adapters.Adapter) or None for the pretrained tower. The
        dynamic batcher's one call."""
        adapters = adapters or [None] * len(prepared)
        return self._predict(self._tower(modality), prepared, asks, adapters)

    def _predict(self, tower: Tower, prepared: list[Prepared],
                 asks: list[tuple[list[str] | None, int]], adapters: list) -> list[JobResult]:
        """The tower runs once for the whole batch, whatever versions its jobs name; each
        version's adapter then maps only its own rows. Label sets go to a tower that
        scores labels in its pass (speech: under the decoder) for base jobs and for
        versions that correct the base's scores (``Adapter.residual``); only legacy
        versions (cosine to their adapted vector) skip it. Vectors are not unit length
        for images: their length scores labels on the base tower
        (core/model/zeroshot.py)."""
        label_sets = [labels if a is None or a.residual else None
                      for (labels, _), a in zip(asks, adapters, strict=True)]
        out = tower.batch(prepared, label_sets, any(a is not None for a in adapters))
        emb = out.embeddings  # (B, D)
        _adapt(emb, adapters, out.features, out.vectors)  # groups are disjoint rows
        return self._results(prepared, asks, adapters, emb, tower, out)

    def _results(self, prepared: list[Prepared], asks: list[tuple[list[str] | None, int]],
                 adapters: list, emb: torch.Tensor, tower: Tower, run: TowerOutput,
                 ) -> list[JobResult]:
        """The batch's JobResults. The pretrained tower's labels by its own rule: the
        label logits of its pass, or ``classify`` of the job's own vector; a version's
        by its head's correction of those same logits (``Adapter.label_logits``), or, for
        a legacy version, by cosine to its adapted vector."""
        out = []
        for i, (p, (labels, top_k)) in enumerate(zip(prepared, asks, strict=True)):
            top = None
            a = adapters[i]
            if labels and a is not None and not a.residual:
                top = self.scores(emb[i:i + 1], labels, top_k)[0]
            elif labels:
                logits = self._base_logits(tower, run, i, labels)  # (1, L)
                if a is not None:
                    logits = a.label_logits(logits, run.features[i:i + 1], labels)
                top = _top(torch.softmax(logits[0], dim=-1), labels, top_k)
            out.append(JobResult(embedding=emb[i].numpy(), labels=top, tokens=p.tokens,
                                 truncated=p.truncated,
                                 text=None if run.texts is None else run.texts[i],
                                 segments=None if run.segments is None else run.segments[i]))
        return out

    def _base_logits(self, tower: Tower, run: TowerOutput, i: int,
                     labels: list[str]) -> torch.Tensor:
        """(1, L) the pretrained tower's logits of item ``i``'s labels: from its own pass
        (speech) or by ``classify`` of its vector."""
        if run.label_logits is not None:
            return run.label_logits[i][None]
        return tower.classify(run.vectors[i:i + 1], self.label_embeddings(labels))

    @torch.inference_mode()
    def scored_features(self, modality: str, prepared: list[Prepared], labels: list[str],
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass over items that all share ``labels`` -> (vectors (B, D) as
        ``forward(unit=False)``, adapter features (B, F), the base's label logits
        (B, L)): what training caches, exactly as ``predict`` computes them."""
        tower = self._tower(modality)
        run = tower.batch(prepared, [labels] * len(prepared), True)
        logits = torch.cat([self._base_logits(tower, run, i, labels)
                            for i in range(len(prepared))])  # (B, L)
        return run.vectors, run.features, logits

    def _embed_transcripts(self, texts: list[str]) -> torch.Tensor:
        """(B, D) text embeddings of transcripts, empty ones included (silence)."""
        items = self.text_pre.tokenize(texts)
        return torch.cat([self.forward("text", chunk) for chunk in self._chunks(items)])

    def transcribe(self, inputs: list[object]) -> list[str]:
        """The text of what was said in each clip (audio bytes, or (waveform, rate))."""
        prepared = [_raise_if_invalid(p) for p in self.prepare_many("audio", inputs)]
        return self.speech.run(prepared, [None] * len(prepared)).texts if prepared else []

    # -- zero-shot classification -----------------------------------------------------

    def label_embeddings(self, labels: list[str]) -> torch.Tensor:
        """(L, D) text embeddings of the labels, cached: label sets repeat across jobs."""
        # Looked up once per call, so a label set larger than the cache still works.
        found = {lb: self._label_cache.get(lb) for lb in dict.fromkeys(labels)}
        missing = [lb for lb, e in found.items() if e is None]
        if missing:
            for lb, e in zip(missing, self.embed("text", missing), strict=True):
                found[lb] = e
                self._label_cache.put(lb, e)
        return torch.stack([found[lb] for lb in labels])

    def scores(self, embeddings: torch.Tensor, labels: list[str], top_k: int = 5,
               modality: str | None = None) -> list[list[tuple[str, float]]]:
        """(B, D) embeddings -> per item the top_k (label, probability) pairs. Images
        from the ImageNet tower are scored by its distribution comparison, exactly
        when given ``forward(..., unit=False)`` vectors (core/model/zeroshot.py).
        ``labels`` are checked already: by ``classify``, or by the worker's host (the
        batcher calls this per item, and would otherwise check each set again)."""
        return self._scores(None if modality is None else self._tower(modality),
                            embeddings, labels, top_k)

    def _scores(self, tower: Tower | None, embeddings: torch.Tensor, labels: list[str],
                top_k: int) -> list[list[tuple[str, float]]]:
        """``scores`` by ``tower``'s own rule (``Tower.classify``), or by the text space's
        cosine when ``tower`` is None (adapted vectors)."""
        lab = self.label_embeddings(labels)  # (L, D)
        if tower is None:
            logits = cosine_logits(embeddings, lab, self.cfg.logit_scale)  # (B, L)
        else:
            logits = tower.classify(embeddings, lab)  # (B, L)
        probs = torch.softmax(logits, dim=-1)
        return [_top(row, labels, top_k) for row in probs]

    def classify(self, modality: str, inputs: list[object], labels: list[str],
                 top_k: int = 5) -> list[list[tuple[str, float]]]:
        labels = check_labels(labels)
        tower = self._tower(modality)
        if not len(inputs):
            return []
        if tower.labels_in_pass:  # one pass scores them (speech: under the decoder)
            prepared = [_raise_if_invalid(p) for p in tower.prepare(list(inputs))]
            return [r.labels for r in self._predict(
                tower, prepared, [(labels, top_k)] * len(prepared), [None] * len(prepared))]
        vecs = [r.embedding for r in self.embed_items(modality, inputs, unit=False)]
        return self._scores(tower, torch.stack(vecs), labels, top_k)


def _adapt(emb: torch.Tensor, adapters: list, feats: torch.Tensor | None,
           base: torch.Tensor) -> None:
    """Each version's adapter maps its own rows of ``emb`` in place, one call per
    version: (features, base vector) -> unit vector in the text space."""
    rows: dict[int, list[int]] = {}
    for i, a in enumerate(adapters):
        if a is not None:
            rows.setdefault(id(a), []).append(i)
    for idx in rows.values():
        emb[idx] = adapters[idx[0]](feats[idx], base[idx])  # (b, D)


def _top(probs: torch.Tensor, labels: list[str], top_k: int) -> list[tuple[str, float]]:
    """(L,) probabilities -> the top_k (label, probability) pairs, best first."""
    k = max(1, min(top_k, len(labels)))
    top = probs.topk(k)
    return [(labels[j], round(float(p), 6))
            for p, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def _raise_if_invalid(p: Prepared | InvalidInput, index: int | None = None) -> Prepared:
    if isinstance(p, InvalidInput):
        if index is not None:  # re-number: the caller knows where the item sits
            raise InvalidInput(p.reason, index=index)
        raise p
    return p
