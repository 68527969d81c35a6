"""Load the C kernels in core/model/kernels/ built for this machine's CPU.

The attention kernel (core/model/kernels/varlen_attn.c) is plain C with GCC vector
extensions, compiled when the package is built or installed (setup.py), once per
instruction-set level: x86-64-v4 (AVX-512), x86-64-v3 (AVX2) or ARMv8 (NEON).
Here the best level this CPU supports is picked; no serving process runs a
compiler. It is called through ctypes, which releases the GIL for the call, and it
uses the OpenMP runtime torch has already loaded.

Everything here is optional: with no build for this CPU (a source checkout never
installed, a machine without a compiler at install time, an older CPU),
``varlen_attn()`` returns None, the reason is logged once, and attention falls back
to the grouped SDPA path (``MMQ_ATTENTION_IMPL=grouped`` forces that path).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("mmq.kernels")

KERNELS = Path(__file__).parent / "kernels"
# Build name -> the /proc/cpuinfo flags it needs, best first (setup.py builds them).
LEVELS = {
    "x86_64": [("x86_64_v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                              "avx2", "fma"}),
               ("x86_64_v3", {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"})],
    "aarch64": [("armv8", set())],
}


@functools.cache
def amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 on AMX tiles (oneDNN uses them for bf16 matmuls
    and PyTorch's bf16 flash attention on the CPU)."""
    return "amx_bf16" in _cpu_flags()


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    for ln in lines:
        key, _, value = ln.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def find_build(kind: str = "varlen_attn") -> Path:
    """The shared object of the best level this CPU runs; raises if there is none."""
    flags, built = _cpu_flags(), []
    for level, needs in LEVELS.get(platform.machine(), []):
        found = sorted(KERNELS.glob(f"_{kind}_{level}.*.so")) + sorted(
            KERNELS.glob(f"_{kind}_{level}.so"))
        built += found
        if found and needs <= flags:
            return found[0]
    if built:
        raise RuntimeError(f"no build of {kind} runs on this CPU (have {len(built)})")
    raise RuntimeError(f"{kind} was not built: install the package (`pip install -e .` "
                       "or `make`) on a machine with a C compiler")


VarlenAttn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], None]


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(find_build()))
    except Exception as e:  # noqa: BLE001  (any failure means: use the fallbacks)
        log.warning("CPU attention kernels unavailable, using grouped SDPA and ATen's "
                    "softmax: %s", e)
        return None


@functools.cache
def varlen_attn() -> VarlenAttn | None:
    """``fn(qkv, cu_seqlens, out, max_len, scale)`` filling ``out`` (N, nh, hs) in place
    for every sequence of at most ``max_len`` tokens; None when unavailable."""
    lib = _library()
    if lib is None:
        return None
    c = lib.mmq_varlen_attn
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    c.argtypes = [ptr, ptr, i64, i64, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
    c.restype = ctypes.c_int

    def run(qkv: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor, max_len: int,
            scale: float) -> None:
        N, _, nh, hs = qkv.shape
        assert qkv.is_contiguous() and out.is_contiguous() and cu_seqlens.is_contiguous()
        assert qkv.dtype == out.dtype == torch.float32 and cu_seqlens.dtype == torch.int64
        rc = c(qkv.data_ptr(), cu_seqlens.data_ptr(), cu_seqlens.numel() - 1, nh, hs, max_len,
               scale, out.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"mmq_varlen_attn failed (code {rc}: head size {hs} needs to "
                               f"be a multiple of the build's vector width, or out of memory)")

    return run


@functools.cache
def softmax_bf16() -> Callable[[torch.Tensor], None] | None:
    """``fn(x)``: softmax along the rows of a contiguous 2-D bf16 CPU tensor, in place
    (fp32 arithmetic, rounded to nearest even); None when the kernel is unavailable."""
    lib = _library()
    if lib is None:
        return None
    c = lib.mmq_softmax_bf16
    i64 = ctypes.c_int64
    c.argtypes = [ctypes.c_void_p, i64, i64, ctypes.c_int]
    c.restype = ctypes.c_int

    def run(x: torch.Tensor) -> None:
        _check(x.dtype == torch.bfloat16 and x.dim() == 2 and x.is_contiguous()
               and x.device.type == "cpu", "softmax_bf16 takes a contiguous 2-D bf16 CPU tensor")
        rc = c(x.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads())
        if rc:
            raise RuntimeError(f"mmq_softmax_bf16 failed (code {rc}: out of memory)")

    return run


CrossAttn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float],
                     torch.Tensor]


@functools.cache
def cross_attn_bf16() -> CrossAttn | None:
    """``fn(q, kp, v, lens, scale)`` -> (B, M, nh, hs) fp32: the decoder's cross-attention
    (core/model/kernels/attn_bf16.c) for q (B, nh, M, hs), pair-interleaved keys kp
    (B, nh, hs/2, S, 2) and values v (B, nh, S, hs), all bf16, ``lens`` (B,) int64 real
    keys per window (a prefix) or None. None where the CPU has no AVX-512 BF16 or the
    build lacks the kernel."""
    lib = _library()
    if lib is None or "avx512_bf16" not in _cpu_flags() or not hasattr(lib, "mmq_cross_attn_bf16"):
        return None
    c = lib.mmq_cross_attn_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    c.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
    c.restype = ctypes.c_int

    def run(q: torch.Tensor, kp: torch.Tensor, v: torch.Tensor, lens: torch.Tensor | None,
            scale: float) -> torch.Tensor:
        B, nh, M, hs = q.shape
        S = v.shape[2]
        ts = (q, kp, v)
        _check(all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.device.type == "cpu"
                   for t in ts), "cross_attn_bf16 takes contiguous bf16 CPU tensors")
        _check(kp.shape == (B, nh, hs // 2, S, 2) and v.shape == (B, nh, S, hs),
               f"cross_attn_bf16: keys {tuple(kp.shape)} / values {tuple(v.shape)} do not "
               f"match queries {tuple(q.shape)}")
        _check(lens is None or (lens.dtype == torch.int64 and lens.is_contiguous()
                                and lens.shape == (B,) and bool((lens <= S).all())),
               f"cross_attn_bf16: lens must be (B,) int64 of at most S={S} keys")
        out = torch.empty(B, M, nh, hs)  # (B, M, nh, hs)
        rc = c(q.data_ptr(), kp.data_ptr(), v.data_ptr(),
               None if lens is None else lens.data_ptr(), B, nh, M, S, hs, scale,
               out.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"mmq_cross_attn_bf16 failed (code {rc}: head size {hs} is "
                               "not 64, or out of memory)")
        return out

    return run


WindowAttn = Callable[..., torch.Tensor]


@functools.cache
def window_attn_bf16() -> WindowAttn | None:
    """``fn(qkv, rows=None, split=None)`` -> (B, S, nh, hs) bf16: the speech encoder's
    window self-attention (core/model/kernels/attn_bf16.c) for qkv (B, S, 3, nh, hs)
    bf16 whose queries are already scaled by 1/sqrt(hs); hs must be 64. ``rows`` (B,)
    and ``split`` (core/model/whisper/padding.py's ``Split``): from row rows[b] on, window
    b's q, k, v are an all-zero window's, whose part of those rows' attention ``split``
    holds. None where the CPU has no AVX-512 BF16 or the build lacks the kernel."""
    lib = _library()
    if (lib is None or "avx512_bf16" not in _cpu_flags()
            or not hasattr(lib, "mmq_window_attn_bf16")):
        return None
    c = lib.mmq_window_attn_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    c.argtypes = [ptr, i64, i64, i64, i64, ptr, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, i64]
    c.restype = ctypes.c_int

    def run(qkv: torch.Tensor, rows: list[int] | None = None, split=None) -> torch.Tensor:
        _check(qkv.dtype == torch.bfloat16 and qkv.is_contiguous() and qkv.dim() == 5
               and qkv.shape[2] == 3 and qkv.device.type == "cpu" and qkv.shape[1] > 0,
               "window_attn_bf16 takes a contiguous (B, S, 3, nh, hs) bf16 CPU tensor")
        B, S, _, nh, hs = qkv.shape
        out = torch.empty(B, S, nh, hs, dtype=torch.bfloat16)  # (B, S, nh, hs)
        args: list = [None] * 5 + [0]
        if rows is not None:
            _check(split is not None and len(rows) == B and split.fits(S, nh, hs)
                   and all(0 <= u <= S and (u == S or u % split.step == 0) for u in rows),
                   f"window_attn_bf16: rows {rows} do not fit the split tables")
            held = torch.tensor(rows, dtype=torch.int64)
            args = [held.data_ptr(), split.A.data_ptr(), split.Z.data_ptr(),
                    split.M.data_ptr(), split.off.data_ptr(), split.step]
        rc = c(qkv.data_ptr(), B, S, nh, hs, out.data_ptr(), torch.get_num_threads(), *args)
        if rc:
            raise RuntimeError(f"mmq_window_attn_bf16 failed (code {rc}: head size {hs} is "
                               "not 64, or out of memory)")
        return out

    return run


LogitsTop = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int],
                    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


@functools.cache
def logits_top_bf16() -> LogitsTop | None:
    """``fn(h, wp, bias, V, T)`` -> (val (R, T), idx (R, T), mx (R,), sum (R,)): the output
    projection of rows h (R, K) bf16 by a weight packed as (ceil(V/16), K/2, 16, 2) bf16
    (``pack_pairs``), plus ``bias`` (V,) fp32 or None, keeping per row its T largest
    logits (descending) and their ids, its largest and the sum of exp(logit - largest)
    over all V (core/model/kernels/logits_bf16.c). None where the CPU has no AVX-512
    BF16 or the build lacks the kernel."""
    lib = _library()
    if lib is None or "avx512_bf16" not in _cpu_flags() or not hasattr(lib, "mmq_logits_top_bf16"):
        return None
    c = lib.mmq_logits_top_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    c.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, ptr, ptr, ctypes.c_int]
    c.restype = ctypes.c_int

    def run(h: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None, V: int, T: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        R, K = h.shape
        _check(all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.device.type == "cpu"
                   for t in (h, wp)), "logits_top_bf16 takes contiguous bf16 CPU tensors")
        _check(wp.shape == ((V + 15) // 16, K // 2, 16, 2) and K % 2 == 0,
               f"logits_top_bf16: weight {tuple(wp.shape)} does not match rows of {K} and "
               f"{V} entries")
        _check(bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()
                                and bias.shape == (V,)), "logits_top_bf16: bias must be (V,) fp32")
        _check(1 <= T <= min(32, V), f"logits_top_bf16: T={T} must be 1..32")
        f32 = torch.float32  # whatever torch's default dtype: the C side writes floats
        val, idx = torch.empty(R, T, dtype=f32), torch.empty(R, T, dtype=torch.int64)
        mx, total = torch.empty(R, dtype=f32), torch.empty(R, dtype=f32)
        rc = c(h.data_ptr(), wp.data_ptr(), None if bias is None else bias.data_ptr(), R, V,
               K, T, val.data_ptr(), idx.data_ptr(), mx.data_ptr(), total.data_ptr(),
               torch.get_num_threads())
        if rc:
            raise RuntimeError(f"mmq_logits_top_bf16 failed (code {rc}: out of memory)")
        return val, idx, mx, total

    return run


def pack_pairs(w: torch.Tensor) -> torch.Tensor:
    """(V, K) weight -> (ceil(V/16), K/2, 16, 2) bf16: each block of 16 entries' pairs
    of one input dimension pair together, entries past V zero (``logits_top_bf16``)."""
    V, K = w.shape
    V16 = -(-V // 16)
    wb = torch.zeros(V16 * 16, K, dtype=torch.bfloat16)
    wb[:V] = w.detach()
    return wb.view(V16, 16, K // 2, 2).permute(0, 2, 1, 3).contiguous()


AddLayerNorm = Callable[[torch.Tensor, torch.Tensor | None, torch.nn.LayerNorm], torch.Tensor]


@functools.cache
def add_ln_bf16() -> AddLayerNorm | None:
    """``fn(x, y, ln)`` -> ln(x) in bf16, after ``x += y`` in place when ``y`` (bf16, x's
    shape) is given; x fp32, contiguous, last dimension a multiple of the build's vector
    width. None when the kernel is unavailable."""
    lib = _library()
    if lib is None:
        return None
    c = lib.mmq_add_ln_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    c.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_float, i64, i64, ptr, ctypes.c_int]
    c.restype = ctypes.c_int

    def run(x: torch.Tensor, y: torch.Tensor | None, ln: torch.nn.LayerNorm) -> torch.Tensor:
        C = x.shape[-1]
        w, b = ln.weight.detach(), ln.bias.detach()
        _check(x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu",
               "add_ln_bf16: x must be a contiguous fp32 CPU tensor")
        _check(y is None or (y.dtype == torch.bfloat16 and y.is_contiguous()
                             and y.shape == x.shape), "add_ln_bf16: y must be bf16, x's shape")
        _check(w.dtype == b.dtype == torch.float32 and w.shape == b.shape == (C,)
               and w.is_contiguous() and b.is_contiguous(),
               f"add_ln_bf16: the layer norm must have fp32 weight and bias of {C}")
        h = torch.empty(x.shape, dtype=torch.bfloat16)
        rc = c(x.data_ptr(), None if y is None else y.data_ptr(), w.data_ptr(), b.data_ptr(),
               ln.eps, x.numel() // C, C, h.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"mmq_add_ln_bf16 failed: width {C} is not a multiple of "
                               "the build's vector width")
        return h

    return run


def _check(ok: bool, message: str) -> None:
    """The kernels take raw pointers: a wrong tensor is refused here (not by ``assert``,
    which ``python -O`` drops), before C reads past its end."""
    if not ok:
        raise ValueError(message)
