"""Build and load the C kernels in core/kernels/ for this machine's CPU.

The attention kernel (core/kernels/varlen_attn.c) is plain C with GCC vector
extensions, built once per machine with ``-march=native`` by the system's C
compiler (well under a second) and cached by a hash of the source, the flags,
the compiler and the CPU. It is called through ctypes, which releases the GIL
for the call, and it uses the OpenMP runtime torch has already loaded.

Everything here is optional: with no compiler or a failed build,
``varlen_attn()`` returns None, the reason is logged once, and attention falls
back to the grouped SDPA path (``MMQ_ATTENTION_IMPL=grouped`` forces that path).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("mmq.kernels")

SOURCE = Path(__file__).parent / "kernels" / "varlen_attn.c"
# No -ffast-math: the kernel's exp rounds with IEEE arithmetic, and a fast-math shared
# object would also switch denormals off for the whole process when it loads.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         "-shared", "-fPIC"]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = Path(base) / "mmq" / "kernels"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(tempfile.gettempdir()) / f"mmq-kernels-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cpu_id() -> str:
    """The CPU's model and feature flags: -march=native code is only valid on their like."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = ("model name", "flags", "Features", "CPU part", "CPU implementer")
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in keep}))


def build(source: Path = SOURCE) -> Path:
    """Compile ``source`` to a shared object (cached); raises on failure."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS), version,
                                    platform.machine(), _cpu_id()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    res = subprocess.run([cc, *FLAGS, str(source), "-o", str(tmp)], capture_output=True,
                         text=True, timeout=300)
    if res.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed on {source.name}: {res.stderr.strip()[-2000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders (worker processes) never see half a file
    return out


VarlenAttn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], None]


@functools.cache
def varlen_attn() -> VarlenAttn | None:
    """``fn(qkv, cu_seqlens, out, max_len, scale)`` filling ``out`` (N, nh, hs) in place
    for every sequence of at most ``max_len`` tokens; None when unavailable."""
    try:
        lib = ctypes.CDLL(str(build()))
    except Exception as e:  # noqa: BLE001  (any failure means: use the fallback)
        log.warning("CPU attention kernel unavailable, using grouped SDPA: %s", e)
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
                               f"be a multiple of 16, or out of memory)")

    return run
