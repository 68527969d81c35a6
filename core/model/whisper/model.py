"""Whisper's encoder and decoder on the project's own modules.

The encoder is the conv front end (two 3-tap convolutions, the second with stride 2:
one position per 20 ms) followed by the project's packed pre-LN ``Encoder``
(core/model/encoder.py): ragged clips are packed by their real positions and attention
runs per clip through an ``AttentionPlan``, so a 2 s clip costs 100 positions, not the
1,500 of a 30 s window. Equal-length clips (the tower's 30 s windows, always padded:
see core/model/whisper/tower.py) skip the packing and run the same layers' weights on
(B, S, C) directly (``AudioEncoder.windows_forward``), on a CPU with native bf16 as bf16
matmuls (``SpeechConfig.precision``, core/model/whisper/precision.py).

The decoder is the usual pre-LN stack (causal self-attention, cross-attention to the
clip's encoder states, MLP) run over *rows* grouped by clip: every clip has the same
number ``R`` of rows (beam hypotheses, or label sequences when scoring), so cross
attention is one batched matmul with the clip's keys shared by its rows and never
copied per beam. Self-attention keeps a KV cache for step-by-step decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.model import cpu_kernels
from core.model.attention import (
    AttentionPlan,
    attention_work,
    dense_attention,
    window_attention,
    window_kernel,
)
from core.model.cpu_kernels import amx_bf16
from core.model.encoder import Encoder, EncoderConfig
from core.model.fused import (
    LINEAR_POINTWISE,
    PackedWeight,
    cast,
    fusable,
    linear,
    linear_add,
    weight_identity,
)
from core.model.whisper.cache import CrossKV, SelfKV
from core.model.whisper.padding import (
    PAD_MIN_FRAMES,
    PAD_ROW_STEP,
    Padding,
    Split,
    content_frames,
    padding_row,
)


@dataclass(frozen=True)
class WhisperConfig:
    n_mels: int = 80
    n_audio_ctx: int = 1500  # encoder positions in a 30 s window (3,000 mel frames / 2)
    n_text_ctx: int = 448  # decoder positions
    dim: int = 384
    n_heads: int = 6
    n_audio_layers: int = 4
    n_text_layers: int = 4
    n_vocab: int = 51864  # tiny.en
    ln_eps: float = 1e-5  # Whisper's LayerNorm default (PyTorch's), not BERT's 1e-12

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(dim=self.dim, n_layers=self.n_audio_layers, n_heads=self.n_heads,
                             mlp_dim=4 * self.dim, norm_first=True, ln_eps=self.ln_eps)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        # Sinusoidal positions, stored in the checkpoint (kept as stored: bit-exact).
        self.register_buffer("pos", torch.zeros(cfg.n_audio_ctx, cfg.dim))
        self.encoder = Encoder(cfg.encoder_config())
        self.ln_post = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        # Matmul precision of equal-length windows (``set_matmul_dtype``): None = the
        # model's dtype throughout. ``mm_dtype``: the projections and MLP (ignored by
        # int8 layers, which take and give fp32); ``attn_dtype``: the convolutions and
        # attention.
        self.mm_dtype: torch.dtype | None = None
        self.attn_dtype: torch.dtype | None = None
        self._pad: Padding | None = None  # the all-zero window's rows (``_padding``)

    def set_matmul_dtype(self, dtype: torch.dtype | None,
                         attn_dtype: torch.dtype | None | str = "same") -> None:
        """bf16 on a CPU: the windows' projections, MLP, convolutions and attention run
        as bf16 matmuls (oneDNN, AVX-512 BF16 / AMX), residuals and layer norms stay fp32.
        About 1.9x the fp32 encoder on 2 cores; encoder states move by ~0.01 on average
        (fp32: 1e-6), transcripts measured in bench/speech.py. ``attn_dtype``: the
        convolutions' and attention's own (int8 linears with bf16 attention), by default
        ``dtype``."""
        self.mm_dtype = dtype
        self.attn_dtype = dtype if attn_dtype == "same" else attn_dtype

    def windows_forward(self, x: torch.Tensor, pad: Padding | None = None,
                        rows: list[int] | None = None) -> torch.Tensor:
        """(B, S, C) equal-length windows -> (B, S, C) final states (``x`` may be updated
        in place: it is the residual stream). ``pad`` and ``rows``: window b's first
        layer's q, k, v from row ``rows[b]`` on are ``pad.qkv``'s (``_windows``).

        The packed core's path without its packing: no plan, filler rows or gathers
        (those were ~15% of a 30 s window's time), SDPA over (B, nh, S, hs) as views, and
        on a CPU without AMX in bf16 an explicit per-window attention (bf16 SDPA is no
        faster than fp32 there; two bf16 matmuls and a softmax are ~3x). With AMX, bf16
        SDPA's flash kernel is ~2.7x that explicit path (44-55 against 123-177 ms for 4
        windows' heads; tiny.en's attention was half of its encoder's time there)."""
        B, S, C = x.shape
        nh, hs = self.cfg.n_heads, self.cfg.head_dim
        md, ad = self.mm_dtype, self.attn_dtype
        explicit = self._explicit(x)
        # The explicit path folds 1/sqrt(hs) into the query rows of the q, k, v projection
        # (1/8 for tiny.en's 64-wide heads: a power of two, exact).
        q_scale = hs ** -0.5 if explicit else None
        work = None  # its (S, S) score buffer, shared by every layer's windows and heads
        add_ln = _add_ln(x, md)
        layers = self.encoder.layers
        x, h = add_ln(x, None, layers[0].ln_attn)
        for n, layer in enumerate(layers):
            if n == 0 and pad is not None and rows is not None:
                qkv = pad.qkv.expand(B, S, 3, nh, hs).clone()  # (B, S, 3, nh, hs)
                for b, u in enumerate(rows):  # the rows before u: the window's own
                    if u:
                        qkv[b, :u] = cast(linear(h[b, :u], layer.qkv, md, q_scale=q_scale)
                                          .view(u, 3, nh, hs), ad)
            else:
                qkv = cast(linear(h, layer.qkv, md, q_scale=q_scale).view(B, S, 3, nh, hs),
                           ad)
            if explicit and work is None and window_kernel(qkv) is None:
                work = attention_work(S, qkv)
            if n == 0 and pad is not None and pad.split is not None and rows is not None:
                y = window_kernel(qkv)(qkv, rows, pad.split)  # the rows past each clip
            else:
                y = window_attention(qkv, explicit, work)  # (B, S, nh, hs)
            x, h = add_ln(x, linear(y.reshape(B, S, C), layer.proj, md), layer.ln_mlp)
            y = linear(linear(h, layer.fc1, md, "gelu"), layer.fc2, md)
            if n + 1 < len(layers):
                x, h = add_ln(x, y, layers[n + 1].ln_attn)
        return self.ln_post(x + y)

    def _explicit(self, x: torch.Tensor) -> bool:
        """Whether the windows' attention runs explicitly (see ``windows_forward``)."""
        return self.attn_dtype == torch.bfloat16 and x.device.type == "cpu" and not amx_bf16()

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) frames -> (B, ceil(T/2), C) states before the first layer."""
        md = self.attn_dtype
        c1, c2 = self.conv1, self.conv2
        if md is not None:
            x = x.to(md)
        h = F.gelu(F.conv1d(x, cast(c1.weight, md), cast(c1.bias, md), padding=1))
        h = F.gelu(F.conv1d(h, cast(c2.weight, md), cast(c2.bias, md), stride=2,
                            padding=1))  # (B, C, S)
        S = h.shape[2]
        return h.transpose(1, 2).to(self.pos.dtype) + self.pos[:S]  # (B, S, C)

    def _windows(self, x: torch.Tensor) -> tuple[torch.Tensor, AttentionPlan]:
        """(B, n_mels, T) equal-length clips -> (B*S, C) packed states and their plan.

        On a CPU, each window's rows from ``padding_row`` on take their convolutions and
        first q, k, v projection from an all-zero window's, computed once (``_padding``;
        core/model/whisper/padding.py): 16 windows of 2-3 s clips 1.66 -> 1.55 s on 2
        Zen 4 cores, bit-identical there (tests/core/model/test_speech_padding.py). With
        the bf16 attention kernel, those rows' first attention also takes the zero
        window's keys' part from tables made once (``Split``) and attends to the clip's
        own keys alone: 1.44 -> 1.33 s; the states ~0.004 from the whole attention's on
        average (bf16 against fp32: ~0.01)."""
        B, _, T = x.shape
        S = self.n_positions(T)
        rows = [padding_row(int(n), S) for n in content_frames(x)]
        # int8 quantizes a linear's input with one scale for the whole call: a row's
        # result depends on its batch, so no row can be taken from another call's.
        int8 = not isinstance(self.encoder.layers[0].qkv.weight, torch.Tensor)
        if min(rows) == S or x.device.type != "cpu" or int8:
            out = self.windows_forward(self._conv(x))  # (B, S, C)
            return (out.reshape(B * S, self.cfg.dim),
                    AttentionPlan.from_lengths([S] * B, device=x.device))
        pad = self._padding(x)
        states = pad.x.expand(B, S, self.cfg.dim).clone()  # (B, S, C)
        for b, u in enumerate(rows):
            if u:  # frames up to 2u + 2 are enough for rows < u + 1 (PAD_MIN_FRAMES)
                f = min(T, max(2 * u + 2, PAD_MIN_FRAMES))
                states[b, :u] = self._conv(x[b:b + 1, :, :f])[0, :u]
        out = self.windows_forward(states, pad, rows)  # (B, S, C)
        return (out.reshape(B * S, self.cfg.dim),
                AttentionPlan.from_lengths([S] * B, device=x.device))

    def _padding(self, like: torch.Tensor) -> Padding:
        """The all-zero window's states and first q, k, v (``like``'s frame count), made
        on first use and again when a weight, the matmul dtypes or the attention path
        (its queries scaled or not) change."""
        layer = self.encoder.layers[0]
        T = like.shape[2]
        weights = tuple(t.detach() for t in (
            self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias, self.pos,
            layer.ln_attn.weight, layer.ln_attn.bias, layer.qkv.weight, layer.qkv.bias))
        key = (T, self.mm_dtype, self.attn_dtype, self._explicit(like),
               torch.is_grad_enabled(), *(weight_identity(t) for t in weights))
        held = self._pad
        if held is None or held.key != key:  # two streams may both make it: the same
            S = self.n_positions(T)
            x = self._conv(like.new_zeros(1, self.cfg.n_mels, T))  # (1, S, C)
            _, h = _add_ln(x, self.mm_dtype)(x.clone(), None, layer.ln_attn)
            hs = self.cfg.head_dim
            q_scale = hs ** -0.5 if self._explicit(x) else None
            qkv = cast(linear(h, layer.qkv, self.mm_dtype, q_scale=q_scale), self.attn_dtype)
            qkv = qkv.view(S, 3, self.cfg.n_heads, hs)
            explicit = q_scale is not None and window_kernel(qkv[None]) is not None
            split = Split.of(qkv, PAD_ROW_STEP) if explicit else None
            # The weights' storage is kept with it: while it lives, their addresses (the
            # key's data pointers) cannot become another weight's.
            held = self._pad = Padding(key, x[0], qkv, split, weights)
        return held

    @staticmethod
    def n_positions(n_frames: int) -> int:
        """Encoder positions for ``n_frames`` mel frames (stride-2 conv, padding 1)."""
        return (n_frames + 1) // 2

    def forward(self, mels: list[torch.Tensor], impl: str = "auto") -> tuple[torch.Tensor,
                                                                          AttentionPlan]:
        """``mels``: B clips of (n_mels, T_i) frames -> (N, C) packed states and their plan."""
        B = len(mels)
        lens = [m.shape[1] for m in mels]
        T = max(lens)
        C = self.cfg.dim
        if T > 2 * self.cfg.n_audio_ctx:
            raise ValueError(f"{T} mel frames; a window holds {2 * self.cfg.n_audio_ctx}")
        if min(lens) == T:  # always so for 30 s windows: no padding, no masking
            return self._windows(torch.stack(mels))  # (B, n_mels, T)
        x = mels[0].new_zeros(B, self.cfg.n_mels, T)  # (B, n_mels, T) zero-padded
        for i, m in enumerate(mels):
            x[i, :, :lens[i]] = m
        h = F.gelu(self.conv1(x))  # (B, C, T)
        # conv2 must see zeros past each clip's end (its own padding), not conv1's output
        # of the zero-padded frames: mask them, so a clip's states do not depend on the
        # longest clip in its batch.
        t = torch.arange(T, device=x.device)
        real = t[None, :] < torch.tensor(lens, device=x.device)[:, None]  # (B, T)
        h = F.gelu(self.conv2(h * real[:, None, :].to(h.dtype)))  # (B, C, ceil(T/2))
        n_pos = [self.n_positions(n) for n in lens]
        h = h.transpose(1, 2)  # (B, S, C)
        plan = AttentionPlan.from_lengths(n_pos, device=x.device)
        packed = torch.cat([h[i, :n] + self.pos[:n] for i, n in enumerate(n_pos)])
        out = self.ln_post(self.encoder(packed, plan, impl))  # (N, C)
        assert out.shape == (sum(n_pos), C)
        return out, plan


def _add_ln(x: torch.Tensor, dtype: torch.dtype | None):
    """``fn(x, y, ln)`` -> ``(x + y, ln(x + y))``, the layer norm's output in ``dtype``, the
    next matmul's (y None: nothing added). With bf16 matmuls on a CPU, one pass of the C
    kernel (core/model/kernels/rows.c), adding in place, instead of an add that widens y,
    a layer norm writing fp32 and a cast: 0.63 against 1.6-2.1 ms for 8 windows' (12,000,
    384) rows; the residual stream bit-identical, one normalised value in ~40,000 a bf16
    step apart."""
    kernel = cpu_kernels.add_ln_bf16()
    if (dtype == torch.bfloat16 and x.device.type == "cpu" and x.dtype == torch.float32
            and kernel is not None and x.shape[-1] % 16 == 0 and not torch.is_grad_enabled()):
        def fused(x: torch.Tensor, y: torch.Tensor | None, ln: nn.LayerNorm
                  ) -> tuple[torch.Tensor, torch.Tensor]:
            x = x.contiguous() if y is None else x  # the kernel adds into x in place
            return x, kernel(x, y, ln)

        return fused

    def plain(x: torch.Tensor, y: torch.Tensor | None, ln: nn.LayerNorm
              ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x if y is None else x + y
        return x, cast(ln(x), dtype)

    return plain


class DecoderLayer(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        C, self.nh, self.hs = cfg.dim, cfg.n_heads, cfg.head_dim
        self.ln_self = nn.LayerNorm(C, eps=cfg.ln_eps)
        self.qkv = nn.Linear(C, 3 * C)  # Whisper's key projection has no bias: zeros here
        self.proj = nn.Linear(C, C)
        self.ln_cross = nn.LayerNorm(C, eps=cfg.ln_eps)
        self.cross_q = nn.Linear(C, C)
        self.cross_kv = nn.Linear(C, 2 * C)
        self.cross_proj = nn.Linear(C, C)
        self.ln_mlp = nn.LayerNorm(C, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(C, 4 * C)
        self.fc2 = nn.Linear(4 * C, C)

    def cross_keys(self, enc: torch.Tensor, dtype: torch.dtype | None = None,
                   pairs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C) encoder states -> keys, values (B, nh, S, hs), contiguous, in
        ``dtype`` (None: the model's). The projection runs in ``dtype`` too: its output is
        rounded to it anyway, and in fp32 it was an eighth of a bf16 encoder's time (16
        windows: 322 ms of 2.6 s; bf16 transcripts unchanged, bench/speech.py).
        ``pairs``: the keys as (B, nh, hs/2, S, 2) (``CrossKV.pairs``)."""
        B, S, C = enc.shape
        nh, hs = self.nh, self.hs
        kv = cast(linear(enc, self.cross_kv, dtype), dtype).view(B, S, 2, nh, hs)
        v = kv[:, :, 1].permute(0, 2, 1, 3).contiguous()  # (B, nh, S, hs)
        if pairs:  # each pair as one 32-bit word: a plain transpose (10 -> 3 ms a layer)
            k = kv.view(torch.int32)[:, :, 0].permute(0, 2, 3, 1).contiguous()  # (B, nh, hs/2, S)
            return k.view(torch.bfloat16).view(B, nh, hs // 2, S, 2), v
        return kv[:, :, 0].permute(0, 2, 1, 3).contiguous(), v

    def cross_attention(self, q: torch.Tensor, cross: CrossKV, layer: int) -> torch.Tensor:
        """q (B, nh, R*T, hs) -> (B, nh, R*T, hs) over the clips' encoder positions.

        Keys and values in ``kv_dtype`` (bf16 in the reduced modes): a beam step is bound
        by reading them (9 MB per window per step in fp32; every other tensor of a step
        is far smaller). SDPA in bf16 (fp32 accumulation inside) measured 0.67x the time
        of fp32 SDPA and 0.85x that of two bf16 matmuls around a softmax, in one op. With
        AVX-512 BF16 (``CrossKV.pairs``), the kernel core/model/kernels/attn_bf16.c:
        16 windows' five beams, one layer, 0.92 against SDPA's 4.1 ms on 2 Zen 5 cores,
        within 5e-7 of fp32 attention over the same bf16 inputs (bf16 SDPA: 5e-4)."""
        k, v = cross.k[layer], cross.v[layer]
        if cross.pairs:  # the bf16 kernel: ~4x SDPA here, probabilities in fp32
            B = q.shape[0]
            lens = None if cross.key_mask is None else cross.key_mask.view(B, -1).sum(-1)
            out = cpu_kernels.cross_attn_bf16()(q.to(k.dtype).contiguous(), k, v, lens,
                                                self.hs ** -0.5)  # (B, R*T, nh, hs)
            return out.transpose(1, 2).to(q.dtype)
        return dense_attention(q.to(k.dtype), k, v, cross.key_mask).to(q.dtype)

    def forward(self, x: torch.Tensor, layer: int, cache: SelfKV | None, cross: CrossKV,
                causal_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B*R, T, C) rows grouped by clip (R rows per clip), T new positions."""
        BR, T, C = x.shape
        nh, hs = self.nh, self.hs
        x = x.reshape(BR * T, C)  # projections on (rows, C): oneDNN's fused epilogues
        qkv = linear(self.ln_self(x), self.qkv).view(BR, T, 3, nh, hs).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (BR, nh, T, hs)
        if cache is not None:
            t0 = cache.length
            cache.buf[:, layer, :, :, t0:t0 + T] = qkv[1:].transpose(0, 1)  # k and v at once
            k = cache.buf[:, layer, 0, :, :t0 + T]  # (BR, nh, t0+T, hs)
            v = cache.buf[:, layer, 1, :, :t0 + T]
        y = dense_attention(q, k, v, causal_mask)  # (BR, nh, T, hs)
        x = linear_add(y.transpose(1, 2).reshape(BR * T, C), self.proj, x)
        # Cross-attention: the R rows of a clip become R*T query positions of that clip.
        B = cross.k[layer].shape[0]
        R = BR // B
        q = linear(self.ln_cross(x), self.cross_q).view(B, R * T, nh, hs).transpose(1, 2)
        y = self.cross_attention(q, cross, layer)  # (B, nh, R*T, hs)
        x = linear_add(y.transpose(1, 2).reshape(BR * T, C), self.cross_proj, x)
        x = linear_add(linear(self.ln_mlp(x), self.fc1, act="gelu"), self.fc2, x)
        return x.view(BR, T, C)


class TextDecoder(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.n_vocab, cfg.dim)  # also the output projection (tied)
        self.register_buffer("pos", torch.zeros(cfg.n_text_ctx, cfg.dim))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_text_layers))
        self.ln = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        # Reduced precision (core/model/whisper/precision.py): the cross keys' and
        # values' dtype (None: the model's), and the output projection as its own
        # module (an int8 copy of the tied embedding; None: the embedding in fp32).
        self.kv_dtype: torch.dtype | None = None
        self.head: nn.Module | None = None
        self._head = PackedWeight(rows=32)  # the tied output projection, packed (logits)
        self._pairs: tuple | None = None  # (identity, the same in bf16 pairs: step_top)

    def cross_kv(self, enc: torch.Tensor, plan: AttentionPlan) -> CrossKV:
        """Packed encoder states (N, C) of B clips -> every layer's cross keys/values."""
        N, C = enc.shape
        B, S = len(plan.lengths), plan.max_seqlen
        uniform = min(plan.lengths) == S
        if uniform:  # 30 s windows: already (B, S) rows in order, nothing to pad
            padded, mask = enc.view(B, S, C), None
        else:
            gather, mask = plan.pad_all()  # (B*S,) rows (pads -> N), (B, S)
            padded = torch.cat([enc, enc.new_zeros(1, C)])[gather].view(B, S, C)
        pairs = (self.kv_dtype == torch.bfloat16 and enc.device.type == "cpu"
                 and self.cfg.head_dim == 64 and cpu_kernels.cross_attn_bf16() is not None)
        ks, vs = zip(*(layer.cross_keys(padded, self.kv_dtype, pairs)
                       for layer in self.layers), strict=True)
        return CrossKV(list(ks), list(vs), None if uniform else mask[:, None, None, :], pairs)

    def new_cache(self, rows: int, max_len: int, like: torch.Tensor) -> SelfKV:
        """An empty cache for ``rows`` rows in the model's dtype (``like``: its device)."""
        c = self.cfg
        shape = (rows, c.n_text_layers, 2, c.n_heads, max_len, c.head_dim)
        return SelfKV(torch.zeros(shape, dtype=self.tok.weight.dtype, device=like.device))

    def hidden(self, tokens: torch.Tensor, cross: CrossKV,
               cache: SelfKV | None = None) -> torch.Tensor:
        """tokens (B*R, T) -> final normalised states (B*R, T, C)."""
        BR, T = tokens.shape
        t0 = cache.length if cache is not None else 0
        x = self.tok(tokens) + self.pos[t0:t0 + T]  # (BR, T, C)
        mask = None
        if T > 1:  # new positions see the cache and the new positions up to themselves
            i = torch.arange(T, device=tokens.device)[:, None]
            j = torch.arange(t0 + T, device=tokens.device)[None, :]
            mask = j <= i + t0  # (T, t0+T)
        for n, layer in enumerate(self.layers):
            x = layer(x, n, cache, cross, mask)
        if cache is not None:
            cache.length = t0 + T
        return self.ln(x)

    def logits(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, C) final states -> (rows, V) logits (+ ``bias``: (V,), e.g. -inf on the
        suppressed tokens, added in the matmul's epilogue)."""
        if self.head is not None:  # int8 (fbgemm): fp32 out
            out = self.head(x.float())
            return out if bias is None else out + bias
        w = self.tok.weight  # (V, C): the embedding, tied
        if fusable(x, w.dtype):
            # The (51864, 384) weight in oneDNN's layout, made once: given plain, oneDNN
            # reordered its 80 MB on every beam step (5 rows, one clip's beams: 6.5 ->
            # 2.3 ms a step; 80 rows 21 -> 16 ms; bit-identical from 2 rows up).
            return LINEAR_POINTWISE(x.contiguous(), self._head.get(w),
                                    None if bias is None else bias.to(w.dtype), "none", [],
                                    "none")
        return x @ w.T if bias is None else torch.addmm(bias, x, w.T)

    def step_top(self, tokens: torch.Tensor, cross: CrossKV, cache: SelfKV, bias: torch.Tensor,
                 T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A search step's candidates: tokens (rows, 1) -> each row's T likeliest next
        tokens' log-probabilities (rows, T), fp32, and ids (rows, T); ``bias`` (V,) fp32
        as in ``logits``. In bf16 mode on a CPU with AVX-512 BF16 (else None: the caller
        takes ``forward``'s full logits): the bf16 kernel picks the T candidates and sums
        the normaliser (core/model/kernels/logits_bf16.c, 9.5 against 16 ms for 80 rows
        on 2 Zen 4 cores, and no log-softmax or top-k over 4 M logits after it); their
        logits are then recomputed in fp32 and the normaliser corrected with them."""
        kernel = cpu_kernels.logits_top_bf16()
        w = self.tok.weight  # (V, C)
        if (kernel is None or self.kv_dtype != torch.bfloat16 or self.head is not None
                or w.device.type != "cpu" or w.dtype != torch.float32 or T > 32):
            return None
        if self._pairs is None or self._pairs[0] != weight_identity(w):
            self._pairs = (weight_identity(w), cpu_kernels.pack_pairs(w), w.detach())
        x = self.hidden(tokens, cross, cache)[:, -1]  # (rows, C) fp32
        rough, ids, top, total = kernel(x.to(torch.bfloat16).contiguous(), self._pairs[1],
                                        bias, w.shape[0], T)  # (rows, T) x 2, (rows,) x 2
        exact = torch.einsum("rc,rtc->rt", x, w[ids]) + bias[ids]  # (rows, T)
        # A row with fewer than T tokens allowed pads its list with -inf at id 0.
        exact = exact.masked_fill(rough == float("-inf"), float("-inf"))
        # The normaliser with the candidates' own terms fp32: sum - theirs in bf16 + theirs.
        rest = (total - torch.exp(rough - top[:, None]).sum(1)).clamp_min(0)  # (rows,)
        log_z = top + torch.log(rest + torch.exp(exact - top[:, None]).sum(1))
        return exact - log_z[:, None], ids

    def forward(self, tokens: torch.Tensor, cross: CrossKV, cache: SelfKV | None = None,
                all_logits: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B*R, T) -> logits (B*R, T, V), or only the last position's (B*R, V)
        (``bias``: see ``logits``)."""
        x = self.hidden(tokens, cross, cache)  # (BR, T, C)
        if not all_logits:
            return self.logits(x[:, -1], bias)  # (BR, V)
        BR, T, C = x.shape
        return self.logits(x.reshape(BR * T, C), bias).view(BR, T, -1)  # (BR, T, V)


class Whisper(nn.Module):
    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = AudioEncoder(cfg)
        self.decoder = TextDecoder(cfg)
