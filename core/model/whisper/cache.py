"""The speech decoder's caches: every layer's cross-attention keys and values for the
windows being decoded (``CrossKV``), and the self-attention keys and values of the rows
(beam hypotheses) filled step by step (``SelfKV``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CrossKV:
    """Every decoder layer's cross-attention keys and values for B clips, computed once."""

    k: list[torch.Tensor]  # per layer (B, nh, S, hs), S = longest clip's positions;
    # with ``pairs``, (B, nh, hs/2, S, 2): the head dimension's pairs interleaved, as the
    # bf16 cross-attention kernel reads them (core/model/kernels/attn_bf16.c)
    v: list[torch.Tensor]
    key_mask: torch.Tensor | None  # (B, 1, 1, S) True = real position; None when all equal
    pairs: bool = False

    def select(self, idx: torch.Tensor) -> CrossKV:
        return CrossKV([k[idx] for k in self.k], [v[idx] for v in self.v],
                       None if self.key_mask is None else self.key_mask[idx], self.pairs)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype


@dataclass
class SelfKV:
    """Self-attention cache for rows (hypotheses), filled step by step."""

    buf: torch.Tensor  # (rows, layers, 2, nh, T_max, hs): every layer's keys and values
    length: int = 0  # positions filled
    # The buffer of the cache this one was selected from: the next ``select`` writes into
    # it when the rows match, so a search's steps take turns with two buffers.
    spare: torch.Tensor | None = None

    @property
    def k(self) -> list[torch.Tensor]:  # per layer (rows, nh, T_max, hs), views of buf
        return list(self.buf[:, :, 0].unbind(1))

    @property
    def v(self) -> list[torch.Tensor]:
        return list(self.buf[:, :, 1].unbind(1))

    def select(self, idx: torch.Tensor) -> SelfKV:
        """Rows ``idx`` (beam reordering): only the filled positions are copied, into a
        buffer of the same capacity (a full-capacity copy per step was 2/3 of the search),
        all layers in one copy (one buffer: a beam step's reorder is one op, not eight).

        The copy goes into the buffer of the cache this one was selected from (``spare``),
        so the cache before this one must not be used after this call. A fresh buffer per
        step (80 rows: 223 MB, of which the filled positions touch a few pages in every
        (row, layer, head) block) faulted its pages in anew: 4-5 ms a step, 0.2 ms now."""
        L = self.length
        shape = (idx.shape[0],) + self.buf.shape[1:]
        out = self.spare if self.spare is not None and self.spare.shape == shape else (
            self.buf.new_empty(shape))
        torch.index_select(self.buf[..., :L, :], 0, idx, out=out[..., :L, :])
        return SelfKV(out, L, self.buf)
