"""Precision modes of the speech tower (``Settings.speech_precision``; core/precision.py
names them, core/model/precision.py resolves ``auto`` by device and CPU features).

On a CPU:

- ``fp32``: the reference, every matmul in fp32 (faster-whisper's fp32 transcripts).
- ``bf16``: the encoder's projections, MLP, convolutions and attention as bf16 matmuls
  (residual stream and layer norms fp32); the decoder's cross-attention keys and values
  projected, stored and attended in bf16 (a beam step is bound by reading them); the rest
  of the decoder, its output projection and the search in fp32.
- ``int8``: the encoder's and decoder's linear layers (and the decoder's cross key/value
  projection and output projection) dynamically quantized to int8 (fbgemm, VNNI:
  weights per output channel, activations per tensor at run time); the convolutions,
  encoder attention and cross keys/values in bf16 where the CPU multiplies bf16
  natively, else fp32.

``auto`` is bf16 where bf16 is native (AVX512-BF16 / AMX, or CUDA), else fp32: the
quality bounds (tests/core/model/test_speech_precision.py; bench/speech.py) hold for
both reduced modes, but bf16 emulated by oneDNN is several times slower than fp32.
On CUDA the whole tower runs in the resolved dtype (bf16 or fp32); int8 is CPU only.
"""

from __future__ import annotations

import copy

import torch

from core.model.precision import _int8_linear, native_bf16
from core.model.whisper.model import Whisper

_ENCODER_LINEARS = ("qkv", "proj", "fc1", "fc2")
_DECODER_LINEARS = ("qkv", "proj", "cross_q", "cross_kv", "cross_proj", "fc1", "fc2")


def apply_speech_precision(model: Whisper, mode: str, device: torch.device) -> None:
    """Convert ``model`` (fp32, on ``device``) in place to ``mode`` (resolved, not
    "auto"). On CUDA only the dtype matters: the caller moves the model there."""
    if mode == "fp32" or device.type != "cpu":
        return
    enc, dec = model.encoder, model.decoder
    if mode == "bf16":
        enc.set_matmul_dtype(torch.bfloat16)
        dec.kv_dtype = torch.bfloat16
        return
    if mode != "int8":
        raise ValueError(f"speech precision {mode!r} is not a resolved mode")
    low = torch.bfloat16 if native_bf16(device) else None
    for layer in enc.encoder.layers:
        for name in _ENCODER_LINEARS:
            setattr(layer, name, _int8_linear(getattr(layer, name)))
    enc.set_matmul_dtype(None, attn_dtype=low)
    for layer in dec.layers:
        for name in _DECODER_LINEARS:
            setattr(layer, name, _int8_linear(getattr(layer, name)))
    # The output projection: an int8 copy of the tied embedding (the embedding itself
    # stays fp32 for the token lookup and for label scoring's teacher forcing).
    head = torch.nn.Linear(dec.cfg.dim, dec.cfg.n_vocab, bias=False)
    head.weight = torch.nn.Parameter(copy.deepcopy(dec.tok.weight.detach()), False)
    dec.head = _int8_linear(head)
    dec.kv_dtype = low
