"""Multi-head attention over ragged batches packed as ``(total_tokens, ...)``.

The contract is varlen flash attention's: sequences are concatenated along the
token axis and ``cu_seqlens`` (B+1,) holds their cumulative offsets. No token
attends across a sequence boundary and no padding token is ever projected.

Paths, all computing ``softmax(Q K^T / sqrt(d)) V`` per sequence:

- ``reference``: pad to the longest sequence, boolean key mask, explicit
  softmax. Slow and memory-hungry on purpose; it is the test oracle.
- ``grouped``: sequences sorted by length and cut into groups whose padded
  attention cost stays within ``slack`` of the real cost; one SDPA call per
  group. Groups of equal length need no mask, so SDPA takes its flash kernel.
  The CPU fallback (see bench/attention.py for the numbers).
- ``kernel``: core/model/kernels/varlen_attn.c (loaded by cpu_kernels.py), reading
  q, k and v straight from the packed projection: no padding, no gather, no SDPA
  set-up per (sequence, head).
  The CPU default in fp32 inference when the kernel builds; sequences longer
  than ``KERNEL_MAX_LEN`` still go through grouped SDPA, which is faster there.
- ``nested``: jagged nested tensors through SDPA, one call for the batch.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention with
  cumulative offsets) on CUDA in fp16/bf16, the GPU default.

The layout of a batch (groups, gather indices) depends only on ``cu_seqlens``,
so it is computed once per batch as an ``AttentionPlan`` and reused by every layer.

Dense batches, where every sequence has the same length or a mask says which keys count,
skip the packing: ``window_attention`` (Whisper's equal-length 30 s windows, with an
explicit bf16 path for CPUs) and ``dense_attention`` (SDPA over (B, nh, T, hs), Whisper's
decoder: causal self-attention over its KV cache, cross-attention to the clips). The
text/image encoder (core/model/encoder.py) and Whisper (core/model/whisper/model.py)
attend only through this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from core.model import cpu_kernels

IMPLS = ("reference", "grouped", "kernel", "nested", "varlen")
# Longer sequences leave the C kernel for grouped SDPA: from about 128 tokens SDPA's
# blocked kernel wins (bench/attention.py), and its set-up cost no longer matters.
KERNEL_MAX_LEN = 128


@dataclass
class _Group:
    n_seqs: int  # G
    length: int  # L, the longest sequence in the group
    # (G*L,) packed row per padded slot. Pad slots point at any real row: their keys
    # are masked and their query rows dropped, so no zero row has to be appended.
    gather: torch.Tensor
    key_mask: torch.Tensor | None  # (G, 1, 1, L) True = real key; None when all lengths equal
    # (n_real,) indices of the real slots among the G*L; None when all lengths equal.
    # Indices, not a boolean mask: a mask would cost a nonzero() in every layer.
    real: torch.Tensor | None
    # (start, end) token span when members are consecutive in the packed order and
    # all of length L: then the group is a free view of the packed tokens.
    span: tuple[int, int] | None


@dataclass
class AttentionPlan:
    """Layout of one ragged batch, shared by all layers of a forward pass."""

    cu_seqlens: torch.Tensor  # (B+1,) int64 cumulative offsets, on the tokens' device
    lengths: list[int]  # B real lengths, host side
    max_seqlen: int
    slack: float = 0.25
    _groups: list[_Group] | None = field(default=None, repr=False)
    _unpad: torch.Tensor | None = field(default=None, repr=False)
    _pad_all: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _long: tuple[torch.Tensor, AttentionPlan] | None = field(default=None, repr=False)

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str = "cpu",
                     slack: float = 0.25) -> AttentionPlan:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every sequence needs at least one token, got lengths {lengths}")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        return cls(cu_seqlens=cu.to(device), lengths=list(lengths), max_seqlen=max(lengths),
                   slack=slack)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, slack: float = 0.25) -> AttentionPlan:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        return cls.from_lengths(lengths, device=cu_seqlens.device, slack=slack)

    def with_filler(self, n: int) -> AttentionPlan:
        """This plan plus one trailing sequence of ``n`` filler tokens: the batch padded
        to ``total_tokens + n`` rows without any real token attending to a filler."""
        return AttentionPlan.from_lengths(self.lengths + [n], device=self.cu_seqlens.device,
                                          slack=self.slack)

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def seq_ids(self) -> torch.Tensor:
        """(N,) index of the sequence each packed token belongs to."""
        lens = torch.tensor(self.lengths, device=self.cu_seqlens.device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=lens.device), lens)

    def positions(self) -> torch.Tensor:
        """(N,) position of each packed token inside its own sequence."""
        n = self.total_tokens
        starts = torch.repeat_interleave(self.cu_seqlens[:-1], torch.tensor(
            self.lengths, device=self.cu_seqlens.device))
        return torch.arange(n, device=self.cu_seqlens.device) - starts

    # -- grouped layout -------------------------------------------------------------

    @property
    def sorted_desc(self) -> bool:
        """Packed longest first: groups are then consecutive spans, in packed order."""
        return all(a >= b for a, b in zip(self.lengths, self.lengths[1:], strict=False))

    def groups(self) -> tuple[list[_Group], torch.Tensor | None]:
        """Length groups, and the (N,) index mapping packed tokens back from their
        concatenated outputs (None when the packed order is already that order)."""
        if self._groups is None:
            self._groups, self._unpad = self._build_groups()
        return self._groups, self._unpad

    def _build_groups(self) -> tuple[list[_Group], torch.Tensor | None]:
        dev = self.cu_seqlens.device
        n = self.total_tokens
        lens_all = torch.tensor(self.lengths, dtype=torch.int64)
        starts_all = self.cu_seqlens[:-1].cpu()
        in_order = self.sorted_desc
        order = (list(range(len(self.lengths))) if in_order else
                 sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i]))
        groups: list[_Group] = []
        unpad = torch.empty(n, dtype=torch.int64)  # packed token -> row of the outputs
        done = 0  # real tokens already placed in the concatenated outputs
        i = 0
        while i < len(order):
            L = self.lengths[order[i]]
            # Grow the group while padded attention work (G * L^2) stays within
            # (1 + slack) of the real work (sum l^2); sorted descending, so L is the max.
            real = L * L
            j = i + 1
            while j < len(order):
                lj = self.lengths[order[j]]
                if (j - i + 1) * L * L > (1.0 + self.slack) * (real + lj * lj):
                    break
                real += lj * lj
                j += 1
            members = torch.tensor(order[i:j])
            G = j - i
            lens, starts = lens_all[members], starts_all[members]  # (G,)
            pos = torch.arange(L)
            mask = pos[None, :] < lens[:, None]  # (G, L)
            uniform = bool(mask.all())
            gather = torch.where(mask, starts[:, None] + pos[None, :], starts[:, None])  # (G, L)
            k = int(lens.sum())
            unpad[gather[mask]] = torch.arange(done, done + k)
            span = None
            if in_order and uniform:
                span = (int(starts[0]), int(starts[0]) + G * L)
            groups.append(_Group(
                n_seqs=G, length=L, gather=gather.view(-1).to(dev),
                key_mask=None if uniform else mask.view(G, 1, 1, L).to(dev),
                real=None if uniform else mask.view(-1).nonzero().squeeze(1).to(dev), span=span,
            ))
            done += k
            i = j
        return groups, None if in_order else unpad.to(dev)

    def long_part(self, max_len: int) -> tuple[torch.Tensor, AttentionPlan] | None:
        """The sequences over ``max_len`` tokens: (n,) their packed rows and their own
        plan; None when there are none."""
        if self.max_seqlen <= max_len:
            return None
        if self._long is None:
            idx = [i for i, n in enumerate(self.lengths) if n > max_len]
            starts = self.cu_seqlens[:-1].cpu()
            rows = torch.cat([torch.arange(int(starts[i]), int(starts[i]) + self.lengths[i])
                              for i in idx])
            self._long = (rows.to(self.cu_seqlens.device), AttentionPlan.from_lengths(
                [self.lengths[i] for i in idx], device=self.cu_seqlens.device, slack=self.slack))
        return self._long

    def pad_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*T,) gather index into packed rows (pads -> N) and (B, T) key mask."""
        if self._pad_all is None:
            T, n = self.max_seqlen, self.total_tokens
            pos = torch.arange(T, device=self.cu_seqlens.device)
            lens = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
            mask = pos[None, :] < lens[:, None]  # (B, T)
            gather = torch.where(mask, self.cu_seqlens[:-1, None] + pos[None, :], n)
            self._pad_all = (gather.view(-1), mask)
        return self._pad_all


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    """Append one zero row so that pad slots can gather index N."""
    return torch.cat([x, x.new_zeros((1,) + x.shape[1:])], dim=0)


def attention_reference(qkv: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """The oracle: pad everything, mask padded keys, explicit softmax."""
    N, _, nh, hs = qkv.shape
    B, T = len(plan.lengths), plan.max_seqlen
    gather, mask = plan.pad_all()
    x = _with_zero_row(qkv)[gather].view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)
    q, k, v = x.unbind(0)  # each (B, nh, T, hs)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    att = att.masked_fill(~mask[:, None, None, :], float("-inf"))
    att = torch.softmax(att, dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B * T, nh, hs)  # (B*T, nh, hs)
    return y[mask.view(-1)]  # (N, nh, hs): rows of real tokens, in packed order


def attention_grouped(qkv: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    N, _, nh, hs = qkv.shape
    groups, unpad = plan.groups()
    outs = []
    for g in groups:
        G, L = g.n_seqs, g.length
        if g.span is not None:  # consecutive equal-length sequences: a view, no copy
            x = qkv[g.span[0]:g.span[1]]
        else:
            x = qkv[g.gather]  # (G*L, 3, nh, hs) padded copy
        x = x.view(G, L, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, G, nh, L, hs)
        y = F.scaled_dot_product_attention(x[0], x[1], x[2], attn_mask=g.key_mask)
        # SDPA's CPU and CUDA kernels lay the output out as (G, L, nh, hs): a free view.
        y = y.transpose(1, 2).reshape(G * L, nh, hs)
        outs.append(y if g.real is None else y.index_select(0, g.real))  # real tokens only
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (N, nh, hs) in group order
    return y if unpad is None else y[unpad]


def attention_kernel(qkv: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    N, _, nh, hs = qkv.shape
    run = cpu_kernels.varlen_attn()
    if (run is None or hs % 16 or qkv.device.type != "cpu" or qkv.dtype != torch.float32
            or (qkv.requires_grad and torch.is_grad_enabled())):  # no backward in C
        return attention_grouped(qkv, plan)
    qkv = qkv.contiguous()
    out = torch.empty(N, nh, hs)  # (N, nh, hs)
    run(qkv, plan.cu_seqlens, out, min(plan.max_seqlen, KERNEL_MAX_LEN), 1.0 / math.sqrt(hs))
    long = plan.long_part(KERNEL_MAX_LEN)
    if long is not None:  # the kernel skipped these rows
        rows, sub = long
        out[rows] = attention_grouped(qkv[rows], sub)
    return out


def attention_nested(qkv: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    off = plan.cu_seqlens
    # (B, j, nh, hs) -> (B, nh, j, hs), the layout SDPA expects of jagged tensors
    q, k, v = (torch.nested.nested_tensor_from_jagged(t.contiguous(), off).transpose(1, 2)
               for t in qkv.unbind(1))
    y = F.scaled_dot_product_attention(q, k, v)
    return y.transpose(1, 2).values()  # (N, nh, hs)


def attention_varlen(qkv: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = plan.cu_seqlens.to(torch.int32)
    q, k, v = qkv.unbind(1)
    return varlen_attn(q, k, v, cu, cu, plan.max_seqlen, plan.max_seqlen)  # (N, nh, hs)


_IMPL_FNS = {
    "reference": attention_reference,
    "grouped": attention_grouped,
    "kernel": attention_kernel,
    "nested": attention_nested,
    "varlen": attention_varlen,
}


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the path for "auto"; "varlen" needs CUDA and a half-precision dtype,
    "kernel" the CPU, fp32 and a C compiler (it falls back to "grouped" without)."""
    if impl == "auto":
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return "varlen"
        if device.type == "cpu" and dtype == torch.float32 and cpu_kernels.varlen_attn():
            return "kernel"
        return "grouped"
    if impl not in _IMPL_FNS:
        raise ValueError(f"unknown attention impl {impl!r}; choose from {IMPLS} or 'auto'")
    return impl


def packed_attention_qkv(qkv: torch.Tensor, plan: AttentionPlan,
                         impl: str = "auto") -> torch.Tensor:
    """Attention over packed sequences from one fused projection.

    qkv: (N, 3, nh, hs), as ``Linear(C, 3C)`` output viewed; returns (N, nh, hs).
    """
    name = resolve_impl(impl, qkv.device, qkv.dtype)
    return _IMPL_FNS[name](qkv, plan)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                     impl: str = "auto") -> torch.Tensor:
    """Attention over packed sequences; q, k, v and the result are (N, nh, hs)."""
    return packed_attention_qkv(torch.stack((q, k, v), dim=1), plan, impl)


# -- dense batches ------------------------------------------------------------------------

def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over a dense batch: q (B, nh, T, hs), k and v (B, nh, S, hs), ``mask``
    broadcastable to (B, nh, T, S), True = attend; returns (B, nh, T, hs)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def window_attention(qkv: torch.Tensor, explicit: bool,
                     work: torch.Tensor | None = None) -> torch.Tensor:
    """Equal-length sequences: (B, S, 3, nh, hs) -> (B, S, nh, hs).

    SDPA over (B, nh, S, hs) as views, no plan. ``explicit``: q is already scaled by
    1/sqrt(hs), and attention runs in the C kernel where the CPU has one
    (``window_kernel``), else as two matmuls and a softmax, one (window, head) at a
    time: on a CPU without AMX in bf16 either is ~3x bf16 SDPA, which is no faster than
    fp32 there (with AMX, SDPA is ~2.7x the explicit path: the caller decides).

    One head's (S, S) scores at a time (4.5 MB in bf16 for a 30 s window), softmaxed in
    place, in one buffer (``work``, kept by the caller across layers): they stay in the
    cache between the three ops, where a window's (nh, S, S) scores and probabilities
    (2 x 27 MB) went out to memory and back (a window-layer's attention 16.8 -> 13.4 ms,
    and in place ~7% less again; bit-identical). Reused rather than allocated per call:
    a block glibc maps fresh from the kernel faults in every page zeroed."""
    B, S, _, nh, hs = qkv.shape
    if not explicit:
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    if (kernel := window_kernel(qkv)) is not None:
        return kernel(qkv)  # (B, S, nh, hs), contiguous
    q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous()  # each (B, nh, S, hs)
    out = q.new_empty(B, nh, S, hs)
    scores = work if work is not None else attention_work(S, q)  # (S, S)
    softmax = _softmax_in_place(scores)
    for i in range(B):
        for h in range(nh):
            torch.matmul(q[i, h], k[i, h].t(), out=scores)  # (S, S), q pre-scaled
            softmax(scores)
            torch.matmul(scores, v[i, h], out=out[i, h])  # (S, hs)
    return out.transpose(1, 2)


def window_kernel(qkv: torch.Tensor):
    """The explicit window attention as one C kernel (core/model/kernels/attn_bf16.c:
    both products on AVX-512 BF16 dot products, each block of query rows' fp32 scores kept
    in the cache; ~3x the two matmuls and softmax below on a Zen 4), where the CPU has
    AVX-512 BF16 and the heads are 64 wide (every Whisper size's); else None."""
    if qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu" and qkv.shape[-1] == 64:
        return cpu_kernels.window_attn_bf16()
    return None


def _softmax_in_place(scores: torch.Tensor):
    """The row softmax of the explicit window attention, in place: the C kernel for bf16
    on a CPU (core/model/kernels/rows.c: one widening of each row, which stays in
    L1; 0.39 against ATen's 0.61 ms for a (1500, 1500) head on 2 Zen 5 cores, 36 of
    2.25 M probabilities a bf16 step apart), else ATen's."""
    if scores.dtype == torch.bfloat16 and scores.device.type == "cpu":
        kernel = cpu_kernels.softmax_bf16()
        if kernel is not None:
            return kernel
    return lambda s: torch.ops.aten._softmax.out(s, -1, False, out=s)


def attention_work(S: int, like: torch.Tensor) -> torch.Tensor:
    """The explicit window attention's (S, S) score buffer, like ``like``'s dtype."""
    return like.new_empty(S, S)
