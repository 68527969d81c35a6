"""The rows of a padded 30 s window that an all-zero window shares (``AudioEncoder._windows``).

The tower pads every window to 30 s with zero log-mel frames (faster-whisper's padding:
trimming it changes transcripts, core/model/whisper/tower.py), so a 3 s clip's window is
90% padding. Until the first attention mixes positions, a position's state depends only on
the frames around it and on its position, so from ``padding_row`` on every window's
convolutions and first q, k, v projection are an all-zero window's: computed once and
copied, the same ops on the same values (bit-identical on the CPUs measured; oneDNN may
pick another kernel for another shape, whose sums differ in the last bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Padding:
    """An all-zero window's rows: what every window's rows past its clip's end are."""

    key: tuple  # the frame count, matmul dtypes and weights they were made from
    x: torch.Tensor  # (S, C) states before the first layer (convolutions and positions)
    qkv: torch.Tensor  # (S, 3, nh, hs) the first layer's q, k, v, as windows_forward's
    split: Split | None  # its part of the first attention (the bf16 kernel's only)
    kept: tuple = ()  # the weights they were made from (their storage held: ``key``)


# A window's own rows are convolved from at least this many frames: on a Zen 4, oneDNN's
# fp32 convolution of 202 frames or fewer took another kernel, whose sums differ from
# the whole window's in the last bits (from 302 frames on, and in bf16 always, the same).
PAD_MIN_FRAMES = 512

# Padded rows are recomputed from a multiple of this many positions (1 s), so that a
# window's own rows come in few shapes (oneDNN makes a primitive per shape).
PAD_ROW_STEP = 50


def content_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, n_mels, T) -> (B,) frames up to and including each window's last nonzero one.
    A frame of zeros inside a clip is the padding's value too: where it is, is all that
    matters."""
    nonzero = (x != 0).any(1)  # (B, T)
    t = torch.arange(1, x.shape[2] + 1, device=x.device)
    return (nonzero * t).amax(1)


def padding_row(n: int, S: int) -> int:
    """The first of S positions whose state before the first attention is the all-zero
    window's, for a window of ``n`` content frames: position u reads frames 2u - 2 to
    2u + 2 (two 3-tap convolutions, the second with stride 2), all zeros once
    2u - 2 >= n; rounded up to ``PAD_ROW_STEP``."""
    u = (n + 3) // 2
    return min(S, -(-u // PAD_ROW_STEP) * PAD_ROW_STEP)


@dataclass(frozen=True)
class Split:
    """The all-zero window's part of its first attention, for the rows past a clip
    (core/model/kernels/attn_bf16.c, ``split_t``): for a window whose rows from u on are
    the zero window's (u a multiple of ``step``), query row i >= u's scores against keys
    j >= u: their largest (M), the sum of their exponentials relative to it (Z) and of
    those times the values (A). A query row past the clip then attends to the u keys
    before alone, plus these."""

    A: torch.Tensor  # (rows, nh, hs) fp32: for each u, rows i >= u, from off[u / step] on
    Z: torch.Tensor  # (rows, nh) fp32
    M: torch.Tensor  # (rows, nh) fp32
    off: torch.Tensor  # (S / step + 1,) int64
    step: int

    def fits(self, S: int, nh: int, hs: int) -> bool:
        rows = int(self.off[-1])
        return (self.A.shape == (rows, nh, hs) and self.Z.shape == self.M.shape == (rows, nh)
                and rows == sum(S - u for u in range(0, S, self.step)))

    @classmethod
    def of(cls, qkv: torch.Tensor, step: int) -> Split:
        """From the zero window's first q, k, v (S, 3, nh, hs), queries pre-scaled.

        Made in fp32 from the bf16 values the kernel reads, block by block of keys from
        the last, each block's sums merged relative to the running maximum (as a flash
        attention's blocks are): 16 windows' first layer's attention on 2 Zen 4 cores
        ~0.16 -> ~0.05 s for clips of 2-3 s; ~35 MB for tiny.en (rows i >= u only), made
        in ~0.13 s."""
        f32 = torch.float32
        q, k, v = qkv.to(f32).unbind(1)  # each (S, nh, hs)
        S, nh, hs = q.shape
        scores = torch.einsum("ihd,jhd->hij", q, k)  # (nh, S, S)
        acc_m = torch.full((nh, S), float("-inf"), dtype=f32)
        acc_a, acc_z = torch.zeros(nh, S, hs, dtype=f32), torch.zeros(nh, S, dtype=f32)
        A, Z, M = [], [], []
        starts = list(range(0, S, step))
        for u in reversed(starts):  # suffix sums: the keys from u on
            block = scores[:, :, u:u + step]  # (nh, S, step)
            m = torch.maximum(acc_m, block.amax(-1))  # (nh, S)
            e = torch.exp(block - m[..., None])
            old = torch.exp(acc_m - m)  # 0 while acc_m is -inf
            acc_a = acc_a * old[..., None] + torch.einsum("hij,jhd->hid", e, v[u:u + step])
            acc_z = acc_z * old + e.sum(-1)
            acc_m = m
            A.append(acc_a[:, u:].transpose(0, 1))  # (S - u, nh, hs)
            Z.append(acc_z[:, u:].transpose(0, 1))  # (S - u, nh)
            M.append(acc_m[:, u:].transpose(0, 1))
        off = torch.tensor([0] + [S - u for u in starts]).cumsum(0)
        return cls(torch.cat(A[::-1]).contiguous(), torch.cat(Z[::-1]).contiguous(),
                   torch.cat(M[::-1]).contiguous(), off, step)
