"""Precision modes of the text tower's encoder (core/precision.py names them); the
image backbone's (fp32, bf16) are applied by core/model/zeroshot.py.

- ``fp32``: the reference; the packed C attention kernel and oneDNN's fused fp32 matmuls.
- ``bf16``: the encoder's four matmuls per layer in bf16 (oneDNN), the residual stream,
  LayerNorm, embeddings and pooling in fp32: each bf16 matmul reads an fp32 activation
  cast down and hands back a bf16 result added to the fp32 residual. Attention runs in
  bf16 on CUDA (varlen flash) and in fp32 on the CPU's packed C kernel (bf16 SDPA on
  the CPU pads and gathers every group: half of a bf16 forward when it was used).
  Fast only where the CPU multiplies bf16 natively (AVX512-BF16, AMX) or on CUDA;
  elsewhere oneDNN emulates it, several times slower than fp32.
- ``int8``: the same four matmuls as dynamically quantized int8 (fbgemm: weights per
  output channel, activations per tensor at run time; VNNI on x86), everything else
  fp32, attention on the C kernel. CPU only.

``auto``: bf16 on CUDA where the GPU supports it, and on CPUs that list ``avx512_bf16``
or ``amx_bf16``; fp32 otherwise. An explicit ``bf16`` is kept wherever oneDNN has bf16
kernels (AVX-512 CPUs, emulated there without native bf16); on a CPU without them (AVX2
only) it runs as fp32, with a warning: there oneDNN's fused bf16 ops raise, and ATen's
plain bf16 matmuls are slower than fp32 and changed 2 of 20 beam-5 transcripts (WER
+3.3 points; tests/core/model/test_speech_precision.py on an AMD EPYC with AVX2).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from core.config import CPU_BATCH_TOKENS
from core.model.cpu_kernels import _cpu_flags
from core.model.fused import ONEDNN_BF16, pack
from core.precision import PRECISIONS, check_precision

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
_MATMULS = ("qkv", "proj", "fc1", "fc2")  # an EncoderLayer's nn.Linear children


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (faster than fp32) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # /proc/cpuinfo, not torch's mkldnn bf16 check: that one is true on any AVX-512
        # CPU, where oneDNN emulates bf16 (measured 5x slower than fp32 on such a VM).
        return bool(NATIVE_BF16_FLAGS & _cpu_flags())
    return False


def resolve_precision(mode: str, device: torch.device) -> str:
    """A setting (fp32, bf16, int8, auto) -> the mode to run on ``device``: ``auto`` is
    bf16 where it is native (text encoder 1.63-1.70x fp32, image backbone 2.0x, on a
    quiet 2-core AMD EPYC with avx512_bf16: docs/model.md), fp32 elsewhere."""
    check_precision(mode)
    if mode == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if mode == "bf16" and device.type == "cpu" and not (ONEDNN_BF16 or native_bf16(device)):
        log.warning("precision bf16 runs as fp32 on this CPU: oneDNN has no bf16 kernels "
                    "without AVX-512 (the version string says fp32)")
        return "fp32"
    if mode == "int8" and device.type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only, not on {device}")
    assert mode in PRECISIONS
    return mode


def apply_precision(encoder: nn.Module, mode: str, device: torch.device | None = None,
                    rows: int = CPU_BATCH_TOKENS) -> None:
    """Convert an ``Encoder``'s layers in place to ``mode`` (resolved, not "auto"), for
    ``device`` (None: the CPU): there bf16 weights are also packed in oneDNN's layout,
    for forwards of about ``rows`` tokens (``fused.pack``)."""
    on_cpu = device is None or device.type == "cpu"
    if mode == "fp32":
        return
    for layer in encoder.layers:
        if mode == "bf16":
            for name in _MATMULS:
                getattr(layer, name).to(torch.bfloat16)
                if on_cpu:
                    pack(getattr(layer, name), rows)  # oneDNN's layout, once
            layer.matmul_dtype = torch.bfloat16
        elif mode == "int8":
            for name in _MATMULS:
                setattr(layer, name, _int8_linear(getattr(layer, name)))
        else:
            raise ValueError(f"precision {mode!r} is not a resolved mode {PRECISIONS}")


def _int8_linear(lin: nn.Linear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    # Per output channel: one scale per row of the weight keeps small rows exact enough
    # (per tensor, the widest row sets every row's step).
    lin.qconfig = per_channel_dynamic_qconfig
    return DynamicLinear.from_float(lin)
