"""Linear layers with their bias, GELU or residual add fused into oneDNN's matmul.

The one copy of these helpers: the packed encoder (core/model/encoder.py, every tower's
layers) and Whisper's windows path and decoder (core/model/whisper/model.py) call them.

oneDNN linear with the bias, GELU or residual add done in the matmul's epilogue
(the kernels torch.compile's CPU backend emits): each saves one pass over the
activations. About 5% per layer on 2 cores (bench/attention.py); inference on
CPU only, and plain ops everywhere else (training, CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_pointwise():
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


# torch.ops.mkldnn._linear_pointwise, or None where oneDNN is missing. The op has an
# overload for the unary epilogues (``PW(x, w, b, "gelu", [], "none")``) and one for
# the binary ones (``PW.binary(x, other, w, b, "add")``).
LINEAR_POINTWISE = _onednn_linear_pointwise()


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Whether oneDNN has bf16 kernels for this CPU (AVX-512 or newer; emulated without
# avx512_bf16, but it runs). On an AVX2-only CPU the fused op has none and raises
# ("could not create a primitive descriptor"), while a plain bf16 F.linear still runs
# on ATen's own kernels: bf16 there takes the unfused path.
ONEDNN_BF16 = LINEAR_POINTWISE is not None and _onednn_bf16()


def fusable(x: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> bool:
    """Whether ``x`` takes the fused path: oneDNN present, CPU, no autograd, and ``x`` in
    ``dtype`` (the weights' dtype: Whisper's windows path runs bf16 matmuls too)."""
    return (LINEAR_POINTWISE is not None and x.device.type == "cpu" and x.dtype == dtype
            and (dtype != torch.bfloat16 or ONEDNN_BF16) and not torch.is_grad_enabled())


def pack(lin: nn.Linear, rows: int) -> None:
    """Keep a copy of a bf16 CPU linear's weight in oneDNN's own blocked layout, made
    once: otherwise oneDNN reorders the plain weight on every call. 6-26% less time
    per matmul at 1,024 rows on an AVX512-BF16 CPU (fc2, 1536 -> 384, the most), the
    same results bit for bit. ``rows``: the rows a call usually has (a hint only; any
    count works). The copy is used while the weight is the same tensor, unchanged
    (``packed_weight``)."""
    w = lin.weight.detach()
    if (LINEAR_POINTWISE is None or w.device.type != "cpu" or w.dtype != torch.bfloat16
            or not ONEDNN_BF16):
        return
    packed = _reorder(w, rows)
    if packed is None:
        return
    # ``w`` is kept: while it lives, no other tensor can take its memory, so the data
    # pointer names this weight alone.
    lin.onednn_packed = (weight_identity(lin.weight), packed, w)


class PackedWeight:
    """A (N, K) weight that is not an ``nn.Linear``'s (Whisper's tied embedding as its
    output projection), copied into oneDNN's blocked layout for LINEAR_POINTWISE on
    first use and again whenever the weight changes (as ``pack``, fp32 too); the plain
    weight where oneDNN cannot. ``rows``: the rows a call usually has (a hint only)."""

    def __init__(self, rows: int):
        self.rows = rows
        self._held: tuple | None = None  # (identity, packed copy, the weight kept alive)

    def get(self, w: torch.Tensor) -> torch.Tensor:
        if self._held is None or self._held[0] != weight_identity(w):
            w_ = w.detach()
            packed = _reorder(w_, self.rows)
            self._held = (weight_identity(w), w_ if packed is None else packed, w_)
        return self._held[1]


def _reorder(w: torch.Tensor, rows: int) -> torch.Tensor | None:
    """``w`` in oneDNN's blocked layout for ``rows``-row calls; None in a torch build
    without the op (the caller keeps the plain weight)."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, rows)
    except (AttributeError, RuntimeError):
        return None


def weight_identity(w: torch.Tensor) -> tuple:
    """What changes when a weight does: replaced (``.data``, ``.to``) or written in place.
    A weight made under ``torch.inference_mode`` (a model loaded inside it) has no
    version counter: only its replacement is seen."""
    return w.data_ptr(), None if w.is_inference() else w._version, w.dtype, w.device


def packed_weight(lin: nn.Module) -> torch.Tensor:
    """The weight to hand to oneDNN's fused op: the packed copy (``pack``) while it is
    current, else the weight itself. Only for LINEAR_POINTWISE: the copy's bytes are
    oneDNN's layout, not a matrix."""
    packed = getattr(lin, "onednn_packed", None)
    if packed is not None and packed[0] == weight_identity(lin.weight):
        return packed[1]
    return lin.weight


def plain_linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """lin(x) for 2-D x: through oneDNN with the packed weight where the layer has one
    (``pack``), else the module itself."""
    if getattr(lin, "onednn_packed", None) is not None and fusable(x, weight_dtype(lin)):
        return LINEAR_POINTWISE(x.contiguous(), packed_weight(lin), lin.bias, "none", [],
                                "none")
    return lin(x)


def weight_dtype(lin: nn.Module) -> torch.dtype | None:
    """A linear layer's weight dtype; None for one whose weight is not a plain tensor
    (a dynamically quantized int8 Linear: it takes the unfused path)."""
    w = getattr(lin, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else None


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def linear_add(x: torch.Tensor, lin: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """residual + lin(x) for 2-D x: one oneDNN call on the CPU (bias and add fused) when
    x, the weights and the residual share a dtype."""
    if fusable(x, weight_dtype(lin)) and residual.dtype == x.dtype:
        return LINEAR_POINTWISE.binary(x.contiguous(), residual.contiguous(),
                                       packed_weight(lin), lin.bias, "add")
    return residual + plain_linear(x, lin)  # bf16 into an fp32 residual: promoted


def linear_gelu(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """gelu(lin(x)) for 2-D x, exact erf GELU as BERT uses"""
    if fusable(x, weight_dtype(lin)):
        return LINEAR_POINTWISE(x.contiguous(), packed_weight(lin), lin.bias, "gelu", [],
                                "none")
    return F.gelu(lin(x))


def linear(x: torch.Tensor, lin: nn.Linear, dtype: torch.dtype | None = None,
           act: str = "none", q_scale: float | None = None) -> torch.Tensor:
    """act(lin(x)) for x of any rank, the matmul in ``dtype`` (None: x's dtype); output in
    that dtype. ``q_scale``: the first third of the output rows (a fused q, k, v
    projection's queries) times this factor, folded into the weights. A dynamically
    quantized int8 ``lin`` takes fp32 (``x`` is cast) and hands back fp32, ``dtype``
    ignored; ``q_scale`` multiplies its output there."""
    if weight_dtype(lin) is None:  # int8 (dynamic quantized): fp32 in and out
        y = lin(x.float())
        if q_scale is not None:
            y[..., :y.shape[-1] // 3] *= q_scale
        return F.gelu(y) if act == "gelu" else y
    x = cast(x, dtype)
    if dtype is not None and dtype != lin.weight.dtype and fusable(x, dtype):
        w, b = _prepared(lin, dtype, q_scale, x.numel() // x.shape[-1])
        y = LINEAR_POINTWISE(x.reshape(-1, x.shape[-1]).contiguous(), w, b, act, [], "none")
        return y.view(*x.shape[:-1], y.shape[-1])
    w, b = _scaled(lin.weight, lin.bias, q_scale)
    w, b = cast(w, dtype), cast(b, dtype)
    if fusable(x, w.dtype):
        shape = x.shape[:-1]
        y = LINEAR_POINTWISE(x.reshape(-1, x.shape[-1]).contiguous(), w, b, act, [], "none")
        return y.view(*shape, y.shape[-1])
    y = F.linear(x, w, b)
    return F.gelu(y) if act == "gelu" else y


def _scaled(w: torch.Tensor, b: torch.Tensor | None, q_scale: float | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fused q, k, v projection's weight and bias with the query rows times q_scale."""
    if q_scale is None:
        return w, b
    C = w.shape[1]
    return (torch.cat([w[:C] * q_scale, w[C:]]),
            None if b is None else torch.cat([b[:C] * q_scale, b[C:]]))


def _prepared(lin: nn.Module, dtype: torch.dtype, q_scale: float | None, rows: int
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``lin``'s weight and bias in ``dtype`` (the windows path's bf16 matmuls over fp32
    weights), ``q_scale`` folded in, the weight in oneDNN's layout for ``rows``-row calls:
    made on first use and again when the weight, bias, dtype or scale change. Cast,
    folded and reordered on every call they cost ~10-20% of a 12,000-row bf16 matmul
    (q, k, v 13.5 -> 11.3 ms, proj 4.3 -> 3.4 ms on 2 Zen 5 cores), bit-identical."""
    bias = None if lin.bias is None else weight_identity(lin.bias)
    key = (weight_identity(lin.weight), bias, dtype, q_scale)
    held = getattr(lin, "onednn_prepared", None)
    if held is None or held[0] != key:
        w, b = _scaled(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(),
                       q_scale)
        w, b = w.to(dtype), cast(b, dtype)
        packed = _reorder(w, rows)
        # The source tensors' storage is kept (detached views, not the Parameters: a
        # ``.data =`` swap frees a Parameter's old storage): while it lives, its address
        # (the identity's data pointer) cannot become another weight's.
        held = (key, w if packed is None else packed, b,
                (lin.weight.detach(), None if lin.bias is None else lin.bias.detach()))
        lin.onednn_prepared = held
    return held[1], held[2]
