"""Audio jobs on the Whisper speech tower (core/model/whisper): what ``MultimodalModel``
does with a batch of clips.

Every audio job is transcribed (beam search, batched across the batch's windows); its
embedding is the text tower's embedding of the transcript, so spoken and written
sentences share the space. ``classify`` scores each label as a hypothesis under the
decoder (teacher-forced log-likelihood minus the label's likelihood given silence:
``SpeechTower.label_scores``), because free decoding mishears isolated words. One pass
per chunk of windows: the encoder runs once, and its states feed the beam search, the
label scoring and the adapters' features (the mean of the states over the clip's real
frames).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from core.errors import InvalidInput
from core.model.attention import AttentionPlan
from core.model.tower import TowerOutput, cosine_logits, prepare_each
from core.model.whisper.timestamps import align_timestamps
from core.model.whisper.tower import SpeechItem, SpeechTower
from core.model.whisper.weights import MODEL_BIN_SHA256
from core.precision import tagged

# The version tag of the speech tower: the bundled model.bin's sha256 prefix, known
# without loading the tower, so workers that never load it still report one version.
SPEECH_VERSION = f"whisper-tiny.en@{MODEL_BIN_SHA256[:12]}"
FEATURE_KIND = "whisper-encoder-mean"  # what audio adapters are trained on
# Decode steps a window is expected to cost, for the batch budget: English speech is
# about three tokens a second, plus the prompt and the end token.
TOKENS_PER_SECOND = 3.0


@dataclass
class SpeechPrepared:
    """A prepared clip as the batcher sees it: ``tokens`` is its cost in the batch
    budget, the encoder positions of its 30 s windows (1,500 each) plus its expected
    decode steps times the beam width."""

    item: SpeechItem
    tokens: int
    truncated: bool = False  # clips over the limit are refused, never cut

    @property
    def seconds(self) -> float:
        return self.item.seconds


@dataclass
class SpeechRun:
    texts: list[str]  # per clip
    scores: list[torch.Tensor | None]  # per clip: (L,) label scores, None without labels
    features: torch.Tensor | None  # (B, C) mean encoder states over real frames
    # per clip: (start s, end s, text) of each spoken segment, from Whisper's timestamp
    # tokens (core/model/whisper/timestamps.py); their texts joined are the transcript
    segments: list[list[tuple[float, float, str]]] | None = None


class SpeechJobs:
    """The speech tower behind the ``Tower`` protocol (core/model/tower.py), loaded on
    first use (text and image workers never pay for it), and the batch logic of audio
    jobs. Its vectors are the text tower's embeddings of the transcripts
    (``embed_texts``), and it scores labels in its own pass, under the decoder."""

    modality = "audio"
    labels_in_pass = True

    def __init__(self, load: Callable[[], SpeechTower], beam_size: int = 5,
                 embed_texts: Callable[[list[str]], torch.Tensor] | None = None,
                 logit_scale: float = 20.0, precision: str = "fp32"):
        # The version tag, known without loading the tower (SPEECH_VERSION's digest),
        # with the precision mode the tower will run (resolved: fp32, bf16, int8).
        self.version = tagged(f"speech@{SPEECH_VERSION.split('@')[1]}", precision)
        self.precision = precision
        self._load = load
        self._tower: SpeechTower | None = None
        self._lock = threading.Lock()
        self.beam_size = beam_size
        # (B, D) text embeddings of transcripts (empty ones included), from the model
        self.embed_texts = embed_texts
        self.logit_scale = logit_scale

    @property
    def tower(self) -> SpeechTower:
        if self._tower is None:
            with self._lock:
                if self._tower is None:
                    tower = self._load()
                    if tower.precision != self.precision:  # the version would lie
                        raise RuntimeError(f"speech tower runs {tower.precision}, its "
                                           f"version says {self.precision}")
                    self._tower = tower
        return self._tower

    @property
    def dim(self) -> int:
        return self.tower.model.cfg.dim

    def load(self) -> None:
        self.tower  # noqa: B018  (the property loads Whisper)

    def prepare(self, items: list[object]) -> list[SpeechPrepared | InvalidInput]:
        return prepare_each(self.prepare_one, items)

    def prepare_one(self, data: object, index: int | None = None) -> SpeechPrepared:
        item = self.tower.prepare(data, index)
        windows = len(item.windows)
        steps = self.beam_size * (windows * 4 + int(TOKENS_PER_SECOND * item.seconds))
        return SpeechPrepared(item, tokens=item.cost + steps)

    @torch.inference_mode()
    def run(self, prepared: list[SpeechPrepared], label_sets: list[list[str] | None],
            features: bool = False) -> SpeechRun:
        """Transcribe every clip; score each clip's labels (if any); and the adapters'
        features when asked. Windows of all clips are searched together."""
        t = self.tower
        items = [p.item for p in prepared]
        mels, owner = t.window_mels(items)  # W windows of (80, 3000), clip of each
        real = [n for it in items for _, n in it.windows]  # real mel frames per window
        dcfg = replace(t.cfg.decode, beam_size=self.beam_size)
        sets = {tuple(s) for s in label_sets if s}
        hyps, feats, timed = [], [], []
        ll: dict[tuple[str, ...], list[torch.Tensor]] = {s: [] for s in sets}
        for a in range(0, len(mels), t.cfg.decode_batch):
            chunk = mels[a:a + t.cfg.decode_batch]
            enc, plan = t.encode(chunk)  # (N, C) packed, plan over the chunk
            cross = t.model.decoder.cross_kv(enc, plan)
            found = t.beam_search(cross, dcfg)
            hyps += found
            timed += align_timestamps(t.model.decoder, cross, t.tokens,
                                      [[] if h.silent(dcfg) else h.tokens for h in found])
            for s in sets:
                ll[s].append(t.label_ll(cross, list(s)))  # (w, L)
            if features:
                feats.append(_real_mean(enc, plan, real[a:a + len(chunk)]))  # (w, C)
        texts = [[] for _ in items]
        segments: list[list[tuple[float, float, str]]] = [[] for _ in items]
        win = [0] * len(items)
        for h, i, segs in zip(hyps, owner, timed, strict=True):
            s, n = items[i].windows[win[i]]  # first mel frame, real frames (100 a second)
            win[i] += 1
            if not h.silent(dcfg):
                texts[i].append(t.tokens.decode(h.tokens))
            for g in segs:  # window seconds -> clip seconds, ends within the real audio
                end = min(s + n, s + round(g.end * 100)) / 100
                segments[i].append((min(s / 100 + g.start, end), end,
                                    t.tokens.decode(list(g.tokens))))
        best = {s: t.clip_scores(torch.cat(ll[s]), list(s), owner, len(items))
                for s in sets}  # (B, L) each
        scores = [best[tuple(s)][i] if s else None for i, s in enumerate(label_sets)]
        out_feats = None
        if features:
            fw = torch.cat(feats).float()  # (W, C)
            weight = torch.tensor(real, dtype=torch.float32)[:, None]  # (W, 1)
            out_feats = torch.zeros(len(items), fw.shape[1])
            out_feats.index_add_(0, torch.tensor(owner), fw * weight)
            total = torch.zeros(len(items)).index_add_(0, torch.tensor(owner), weight[:, 0])
            out_feats /= total.clamp_min(1)[:, None]  # (B, C) mean over real frames
        return SpeechRun(["".join(x).strip() for x in texts], scores, out_feats, segments)


    def forward(self, prepared: list[SpeechPrepared], unit: bool = True) -> torch.Tensor:
        """The transcript's text embedding: what a spoken sentence means (unit)."""
        return self.embed_texts(self.run(prepared, [None] * len(prepared)).texts)

    def feature_kind(self) -> tuple[str, int]:
        return FEATURE_KIND, self.dim  # the encoder states' mean over the real frames

    def features(self, prepared: list[SpeechPrepared]) -> tuple[torch.Tensor, torch.Tensor]:
        run = self.run(prepared, [None] * len(prepared), features=True)
        return self.embed_texts(run.texts), run.features

    def classify(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Transcript embeddings live in the text space: labels by cosine there."""
        return cosine_logits(vectors, labels, self.logit_scale)  # (B, L)

    def batch(self, prepared: list[SpeechPrepared], label_sets: list[list[str] | None],
              features: bool) -> TowerOutput:
        """One pass transcribes every clip, scores the given label sets under the decoder
        and, when asked, gives the encoder features adapters map."""
        run = self.run(prepared, label_sets, features=features)
        emb = self.embed_texts(run.texts)  # (B, D) the transcripts in the text space
        return TowerOutput(emb, emb, run.features, run.scores, run.texts, run.segments)


def _real_mean(enc: torch.Tensor, plan: AttentionPlan, real_frames: list[int]) -> torch.Tensor:
    """(N, C) packed states of w windows -> (w, C) each window's mean over the positions
    of its real frames (not the zero padding of a short clip's window)."""
    out = []
    for j, n in enumerate(real_frames):
        start = int(plan.cu_seqlens[j])
        k = max(1, (n + 1) // 2)  # encoder positions: one per two mel frames
        out.append(enc[start:start + k].float().mean(0))
    return torch.stack(out).cpu()
