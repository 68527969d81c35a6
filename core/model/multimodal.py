"""``MultimodalModel``: the towers behind one API, embeddings in one space.

Callers hand in raw items; each item is validated on its own (``prepare_many``
returns an ``InvalidInput`` in that item's slot), valid items are packed into
ragged batches under a token budget and run through the tower in one forward.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import Settings, get_settings
from core.errors import InvalidInput
from core.jobs import MODALITIES, JobResult
from core.model.attention import AttentionPlan, resolve_impl
from core.model.audio import LogMel, decode_audio, frames_to_patches
from core.model.files import sha256_file
from core.model.image import decode_image, image_to_patches, image_to_pixels
from core.model.speech import FEATURE_KIND, SPEECH_VERSION, SpeechJobs, SpeechPrepared
from core.model.text import TextItem, TextPreprocessor, TextTower, default_text_path
from core.model.towers import WEIGHTS_DIR, TowersCheckpoint
from core.model.zeroshot import FRONT_END, GRID, PixelItem, ZeroShotImageTower, load_zero_shot_tower
from core.params import check_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    # Zero-shot scores are softmax(logit_scale * cosine) over the labels; cosines of
    # this embedding space sit in a narrow band, so a scale near CLIP's learned
    # temperature (1/0.05) spreads them into usable probabilities. The image and
    # audio towers are trained at this same scale.
    logit_scale: float = 20.0
    max_batch_tokens: int = 2048  # real tokens per forward when a caller passes a long list
    attention_impl: str = "auto"
    # Label embeddings kept for reuse (least recently used dropped first): label sets
    # repeat across jobs, but a dict that never evicts grows with every new label any
    # client ever sends. 16384 x 384 float32 = 24 MiB at most.
    label_cache_size: int = 16_384


class LruCache(OrderedDict):
    """A dict bounded to ``capacity`` entries; ``get`` and ``put`` mark an entry used."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


@dataclass
class PatchItem:
    """One decoded image or clip as patch vectors; the class token adds one token."""

    patches: torch.Tensor  # (n_patches, patch_dim)
    seconds: float | None = None  # audio duration after decoding
    truncated: bool = False  # images and clips are never cut: over-limit ones are refused

    @property
    def tokens(self) -> int:
        return self.patches.shape[0] + 1


Prepared = TextItem | PatchItem | PixelItem | SpeechPrepared


@dataclass
class ItemResult:
    embedding: torch.Tensor  # (D,) L2-normalised, on the CPU
    tokens: int  # tokens the item cost in the packed core
    truncated: bool  # input was longer than the tower's limit and was cut


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _towers_dir(root: Path, s: Settings) -> Path | None:
    """Towers live beside the text weights; the bundled ones go with the bundled text
    model only, since they were aligned to its embedding space."""
    if s.towers_path:
        return Path(s.towers_path)
    if (root / "towers.json").exists():
        return root
    if root == default_text_path() and (WEIGHTS_DIR / "towers.json").exists():
        return WEIGHTS_DIR
    return None


class MultimodalModel:
    def __init__(self, text: TextTower, text_pre: TextPreprocessor, device: torch.device,
                 cfg: ModelConfig, version: str, towers: TowersCheckpoint | None = None):
        self.text = text.to(device)
        self.text_pre = text_pre
        self.device = device
        self.cfg = cfg
        self.version = version
        self.dim = text.cfg.encoder.dim
        self.towers = towers
        if towers is not None:
            towers.image.to(device)
            towers.audio.to(device)
            self._mel = LogMel(towers.audio_cfg)
        self._label_cache: LruCache = LruCache(cfg.label_cache_size)
        # The image tower in use when set (MMQ_IMAGE_TOWER=efficientnet); None = the
        # patch tower in ``towers`` (MMQ_IMAGE_TOWER=digits).
        self.photo: ZeroShotImageTower | None = None
        # The speech tower for audio when set (MMQ_AUDIO_TOWER=whisper); None = the
        # keyword tower in ``towers``.
        self.speech: SpeechJobs | None = None

    def use_speech_tower(self, speech: SpeechJobs) -> None:
        self.speech = speech
        self.version += f"+speech@{SPEECH_VERSION.split('@')[1]}"

    def use_photo_tower(self, tower: ZeroShotImageTower, version: str) -> None:
        self.photo = tower.to(self.device)
        self.version += f"+image@{version}"

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES if self.towers is not None else ("text",)

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
        cfg = ModelConfig(max_batch_tokens=budget, attention_impl=s.attention_impl)
        name = "all-MiniLM-L6-v2" if root == default_text_path() else root.name
        version = f"{name}@{sha256_file(root / 'model.safetensors')[:12]}"
        towers = None
        tdir = _towers_dir(root, s)
        if tdir is not None:
            towers = TowersCheckpoint.load(tdir)
            version += f"+towers@{sha256_file(tdir / 'towers.safetensors')[:12]}"
        model = cls(text, pre, dev, cfg, version, towers)
        if towers is not None and s.image_tower == "efficientnet":
            text_version = version.split("+", 1)[0]  # the class text bank's key
            model.use_photo_tower(*load_zero_shot_tower(
                lambda xs: model.embed("text", xs), text_version, s.image_weights))
        elif s.image_tower not in ("efficientnet", "digits"):
            raise ValueError(f"MMQ_IMAGE_TOWER={s.image_tower!r}: expected efficientnet or digits")
        if towers is not None and s.audio_tower == "whisper":
            from core.model.whisper.tower import SpeechTower

            cache = Path(s.whisper_cache) if s.whisper_cache else None
            # Loaded on the first audio item: a text or image worker never holds it.
            model.use_speech_tower(SpeechJobs(
                lambda: SpeechTower.from_bundled(dev, cache=cache), s.speech_beam_size))
        elif s.audio_tower not in ("whisper", "keywords"):
            raise ValueError(f"MMQ_AUDIO_TOWER={s.audio_tower!r}: expected whisper or keywords")
        log.info("model %s on %s (attention %s)", model.version, dev,
                 resolve_impl(cfg.attention_impl, dev, torch.float32))
        return model

    # -- per item ---------------------------------------------------------------------

    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; this model has {self.modalities}")

    def prepare(self, modality: str, item: object, index: int | None = None) -> Prepared:
        """Validate and preprocess one item; raises ``InvalidInput`` saying why not."""
        return _raise_if_invalid(self.prepare_many(modality, [item])[0], index)

    def prepare_many(self, modality: str, items: list[object]) -> list[Prepared | InvalidInput]:
        """Validate and preprocess each item; a bad item yields its ``InvalidInput``."""
        self._check_modality(modality)
        if modality == "text":
            return self.text_pre.prepare_many(list(items))
        out: list[Prepared | InvalidInput] = []
        for i, item in enumerate(items):
            try:
                out.append(self._prepare_patches(modality, item, i))
            except InvalidInput as e:
                out.append(e)
        return out

    def _prepare_patches(self, modality: str, item: object,
                         index: int) -> PatchItem | PixelItem | SpeechPrepared:
        t = self.towers
        if modality == "image" and self.photo is not None:
            return PixelItem(image_to_pixels(decode_image(item, FRONT_END, index), FRONT_END))
        if modality == "image":
            img = decode_image(item, t.image_cfg, index)
            return PatchItem(image_to_patches(img, t.image_cfg))
        if self.speech is not None:
            return self.speech.prepare(item, index)
        wave = decode_audio(item, t.audio_cfg, index)
        patches = frames_to_patches(self._mel(wave), t.audio_cfg)
        return PatchItem(patches, seconds=wave.numel() / t.audio_cfg.sample_rate)

    # -- batched forward --------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, modality: str, prepared: list[Prepared], unit: bool = True) -> torch.Tensor:
        """One packed forward over already-prepared items -> (B, D) on the CPU. With
        ``unit=False`` image vectors keep the length that scores labels exactly
        (``scores(..., modality="image")``); other modalities are unit either way."""
        self._check_modality(modality)
        if modality == "image" and self.photo is not None:
            pixels = torch.stack([p.pixels for p in prepared])  # (B, 3, 224, 224)
            return self.photo(pixels, unit=unit).float().cpu()
        if modality == "audio" and self.speech is not None:
            # The transcript's text embedding: what a spoken sentence means.
            return self._embed_transcripts(self.speech.run(prepared, [None] * len(prepared)).texts)
        if modality != "text":
            tower = self.towers.image if modality == "image" else self.towers.audio
            patches = torch.cat([p.patches for p in prepared]).to(self.device)  # (P, patch_dim)
            return tower(patches, [p.patches.shape[0] for p in prepared],
                         self.cfg.attention_impl).float().cpu()
        # Pack longest first: equal-length neighbours then form attention groups that
        # are views of the packed tokens, with no gather and no padding.
        order = sorted(range(len(prepared)), key=lambda i: -prepared[i].tokens)
        items = [prepared[i] for i in order]
        plan = AttentionPlan.from_lengths([p.tokens for p in items], device=self.device)
        ids = torch.tensor([t for p in items for t in p.ids], device=self.device)  # (N,)
        emb = self.text(ids, plan, self.cfg.attention_impl).float().cpu()  # (B, D) sorted
        out = torch.empty_like(emb)
        out[torch.tensor(order)] = emb
        return out

    # -- features for adapters (core/model/adapters.py) --------------------------------

    def feature_kind(self, modality: str) -> tuple[str, int]:
        """(name, width F) of what ``forward_features`` hands an adapter: for the ImageNet
        tower its last block's map on a 2x2 grid (measured best of the backbone's
        features: bench/finetune.py), else the tower's own vector. The speech tower
        replaces audio's with its mean-pooled encoder states."""
        self._check_modality(modality)
        if modality == "image" and self.photo is not None:
            return f"grid{GRID}x{GRID}", self.photo.net._conv_head.in_channels * GRID * GRID
        if modality == "audio" and self.speech is not None:
            return FEATURE_KIND, self.speech.dim
        return "embedding", self.dim

    @torch.inference_mode()
    def forward_features(self, modality: str, prepared: list[Prepared],
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward -> (vectors (B, D) as ``forward(..., unit=False)``, features
        (B, F) for adapters), both on the CPU."""
        if modality == "image" and self.photo is not None:
            pixels = torch.stack([p.pixels for p in prepared])  # (B, 3, 224, 224)
            m, feats = self.photo.forward_features(pixels)
            return m.float().cpu(), feats.float().cpu()
        if modality == "audio" and self.speech is not None:
            run = self.speech.run(prepared, [None] * len(prepared), features=True)
            return self._embed_transcripts(run.texts), run.features
        vecs = self.forward(modality, prepared, unit=False)  # (B, D)
        return vecs, vecs

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
        if modality == "audio" and self.speech is not None:
            return self._predict_speech(prepared, asks, adapters)
        # The tower runs once for the whole batch, whatever versions its jobs name; each
        # version's adapter then maps only its own rows. Not unit length for images:
        # their length scores labels on the base tower (core/model/zeroshot.py).
        if any(a is not None for a in adapters):
            vecs, feats = self.forward_features(modality, prepared)  # (B, D), (B, F)
        else:
            vecs, feats = self.forward(modality, prepared, unit=False), None  # (B, D)
        emb = torch.nn.functional.normalize(vecs, dim=-1)  # (B, D)
        rows: dict[int, list[int]] = {}
        for i, a in enumerate(adapters):
            if a is not None:
                rows.setdefault(id(a), []).append(i)
        for idx in rows.values():
            emb[idx] = adapters[idx[0]](feats[idx], vecs[idx])  # (b, D) unit, text space
        out = []
        for i, (p, (labels, top_k)) in enumerate(zip(prepared, asks, strict=True)):
            top = None
            if labels and adapters[i] is not None:  # adapters train on softmax(scale * cos)
                top = self.scores(emb[i:i + 1], labels, top_k)[0]
            elif labels:
                top = self.scores(vecs[i:i + 1], labels, top_k, modality)[0]
            out.append(JobResult(embedding=emb[i].numpy(), labels=top, tokens=p.tokens,
                                 truncated=p.truncated))
        return out

    def _predict_speech(self, prepared: list[SpeechPrepared],
                        asks: list[tuple[list[str] | None, int]],
                        adapters: list) -> list[JobResult]:
        """Audio on the speech tower: one pass transcribes every clip, scores the label
        sets of base-version jobs under the decoder and, for jobs on a fine-tuned
        version, gives the encoder features their adapter maps (cosine scores then, as
        adapters are trained)."""
        label_sets = [labels if a is None else None
                      for (labels, _), a in zip(asks, adapters, strict=True)]
        adapted = any(a is not None for a in adapters)
        run = self.speech.run(prepared, label_sets, features=adapted)
        emb = self._embed_transcripts(run.texts)  # (B, D) the transcripts in the text space
        rows: dict[int, list[int]] = {}
        for i, a in enumerate(adapters):
            if a is not None:
                rows.setdefault(id(a), []).append(i)
        for idx in rows.values():
            emb[idx] = adapters[idx[0]](run.features[idx], emb[idx])  # (b, D) unit
        out = []
        for i, (p, (labels, top_k)) in enumerate(zip(prepared, asks, strict=True)):
            top = None
            if labels and adapters[i] is not None:
                top = self.scores(emb[i:i + 1], labels, top_k)[0]
            elif labels:
                top = _top(torch.softmax(run.scores[i], dim=-1), labels, top_k)
            out.append(JobResult(embedding=emb[i].numpy(), labels=top, tokens=p.tokens,
                                 truncated=p.truncated, text=run.texts[i]))
        return out

    def _embed_transcripts(self, texts: list[str]) -> torch.Tensor:
        """(B, D) text embeddings of transcripts, empty ones included (silence)."""
        items = self.text_pre.tokenize(texts)
        return torch.cat([self.forward("text", chunk) for chunk in self._chunks(items)])

    def transcribe(self, inputs: list[object]) -> list[str]:
        """The text of what was said in each clip (audio bytes, or (waveform, rate))."""
        if self.speech is None:
            raise ValueError("transcribe needs the speech tower (MMQ_AUDIO_TOWER=whisper)")
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
        lab = self.label_embeddings(labels)  # (L, D)
        if modality == "image" and self.photo is not None:
            logits = self.photo.label_logits(embeddings, lab)  # (B, L)
        else:
            logits = self.cfg.logit_scale * embeddings @ lab.T  # (B, L)
        probs = torch.softmax(logits, dim=-1)
        return [_top(row, labels, top_k) for row in probs]

    def classify(self, modality: str, inputs: list[object], labels: list[str],
                 top_k: int = 5) -> list[list[tuple[str, float]]]:
        labels = check_labels(labels)
        if not len(inputs):
            self._check_modality(modality)
            return []
        if modality == "audio" and self.speech is not None:
            prepared = [_raise_if_invalid(p) for p in self.prepare_many(modality, inputs)]
            return [r.labels for r in self._predict_speech(
                prepared, [(labels, top_k)] * len(prepared), [None] * len(prepared))]
        vecs = [r.embedding for r in self.embed_items(modality, inputs, unit=False)]
        return self.scores(torch.stack(vecs), labels, top_k, modality)


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
