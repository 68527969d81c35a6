"""Builds the CPU attention kernel (core/model/kernels/varlen_attn.c) when the package is
built or installed, so that no serving process ever runs a compiler.

The kernel is plain C loaded through ctypes (core/model/cpu_kernels.py), not a Python
extension module; it is built here as one only because that is how setuptools
compiles C for a wheel and for an editable install alike. One build per
instruction-set level, since the machine that serves need not be the one that
builds: core/model/cpu_kernels.py loads the best one this CPU supports. Everything else
about the package is in pyproject.toml.
"""

import platform

from setuptools import Extension, setup

# No -ffast-math: the kernel's exp rounds with IEEE arithmetic, and a fast-math shared
# object would also switch denormals off for the whole process when it loads.
COMMON = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
# -fopenmp links libgomp.so.1; torch's wheel carries a libgomp.so.1 of its own and has
# loaded it first, so the dynamic linker reuses that one: one OpenMP runtime per
# process (tests/core/model/test_attention.py checks).
LEVELS = {
    # AVX2 gets its own vector width and key tile (MMQ_VW, MMQ_KC: see the kernel's
    # header): built with AVX-512's 16-float vectors it spilled registers and ran 4.2x
    # slower than the AVX-512 build, slower than grouped SDPA.
    "x86_64": {"x86_64_v4": ["-march=x86-64-v4", "-mtune=generic"],
               "x86_64_v3": ["-march=x86-64-v3", "-mtune=generic", "-DMMQ_VW=8",
                             "-DMMQ_KC=2"]},
    "aarch64": {"armv8": ["-march=armv8-a"]},  # NEON
}


# Sources only a level's build has: the speech tower's attention and output projection
# (AVX-512 BF16 intrinsics, compiled for that extension by function attribute; called
# only on a CPU with avx512_bf16).
EXTRA = {"x86_64_v4": ["core/model/kernels/attn_bf16.c", "core/model/kernels/logits_bf16.c"]}


def kernels() -> list[Extension]:
    levels = LEVELS.get(platform.machine(), {})
    return [Extension(f"core.model.kernels._varlen_attn_{name}",
                      ["core/model/kernels/varlen_attn.c", "core/model/kernels/rows.c",
                       *EXTRA.get(name, [])],
                      depends=["core/model/kernels/vec.h", "core/model/kernels/bf16.h"],
                      extra_compile_args=COMMON + flags, extra_link_args=["-fopenmp"],
                      optional=True)  # no compiler: the package installs, SDPA is used
            for name, flags in levels.items()]


setup(ext_modules=kernels())
