"""Every fast attention path equals the padded reference, on fresh random batches."""

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.model import cpu_kernels
from core.model.attention import (
    IMPLS,
    KERNEL_MAX_LEN,
    AttentionPlan,
    packed_attention,
    packed_attention_qkv,
    resolve_impl,
)
from core.model.encoder import Encoder, EncoderConfig, bucket_rows

# A new seed every run, printed on failure, so that each run tries new batches.
SEED = random.SystemRandom().randrange(2**31)
CPU_IMPLS = ["grouped", "kernel", "nested"]
HAS_CC = bool(shutil.which("cc") or shutil.which("gcc"))


def ragged_cases(rng: random.Random) -> dict[str, list[int]]:
    return {
        "batch of one": [rng.randint(1, 64)],
        "single token": [1],
        "all length one": [1] * rng.randint(2, 9),
        "one long among short": [rng.randint(1, 8) for _ in range(12)] + [rng.randint(300, 520)],
        "mixed": [rng.randint(1, 128) for _ in range(rng.randint(2, 48))],
        "equal lengths": [rng.randint(2, 40)] * rng.randint(2, 16),
        "sorted longest first": sorted((rng.randint(1, 90) for _ in range(33)), reverse=True),
    }


def qkv_for(lengths, nh=4, hs=16, dtype=torch.float32, device="cpu"):
    n = sum(lengths)
    return tuple(torch.randn(n, nh, hs, dtype=dtype, device=device) for _ in range(3))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("slack", [0.0, 0.25, 2.0])
def test_fast_paths_match_reference(impl, slack):
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    for name, lengths in ragged_cases(rng).items():
        plan = AttentionPlan.from_lengths(lengths, slack=slack)
        q, k, v = qkv_for(lengths)
        ref = packed_attention(q, k, v, plan, "reference")
        out = packed_attention(q, k, v, plan, impl)
        assert out.shape == q.shape
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, f"seed {SEED}, case {name!r}, lengths {lengths}: max err {err}"


def test_no_attention_across_sequences():
    """Changing one sequence's tokens leaves every other sequence's output unchanged."""
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    lengths = [rng.randint(1, 60) for _ in range(10)]
    plan = AttentionPlan.from_lengths(lengths)
    q, k, v = qkv_for(lengths)
    before = packed_attention(q, k, v, plan, "grouped")
    s, e = plan.cu_seqlens[3].item(), plan.cu_seqlens[4].item()
    k2, v2 = k.clone(), v.clone()
    k2[s:e] += 5 * torch.randn_like(k2[s:e])
    v2[s:e] += 5 * torch.randn_like(v2[s:e])
    after = packed_attention(q, k2, v2, plan, "grouped")
    outside = torch.ones(sum(lengths), dtype=torch.bool)
    outside[s:e] = False
    assert torch.equal(before[outside], after[outside]), f"seed {SEED}"
    assert not torch.allclose(before[s:e], after[s:e])


def test_encoder_packed_equals_each_sequence_alone():
    """A packed batch through the whole encoder = each sequence run on its own."""
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    enc = Encoder(EncoderConfig(dim=64, n_layers=2, n_heads=4, mlp_dim=128)).eval()
    lengths = [rng.randint(1, 70) for _ in range(9)] + [1, 200]
    plan = AttentionPlan.from_lengths(lengths)
    x = torch.randn(sum(lengths), 64)
    with torch.inference_mode():
        packed = enc(x, plan)
        for i, n in enumerate(lengths):
            s = plan.cu_seqlens[i].item()
            alone = enc(x[s:s + n], AttentionPlan.from_lengths([n]), "reference")
            err = (packed[s:s + n] - alone).abs().max().item()
            assert err <= 1e-5, f"seed {SEED}, sequence {i} (length {n}): max err {err}"


def test_row_buckets_are_few_and_cheap():
    """CPU forwards are padded to a bucketed row count (one oneDNN primitive per shape,
    so memory stays flat): few shapes per token budget, little filler each."""
    rows = [bucket_rows(n) for n in range(1, 2049)]
    assert len(set(rows)) <= 80
    assert all(b >= n for n, b in zip(range(1, 2049), rows, strict=True))
    assert max((b - n) / n for n, b in zip(range(1, 2049), rows, strict=True) if n > 128) < 1 / 16
    assert bucket_rows(2048) == 2048 and bucket_rows(24) == 24 and bucket_rows(22) == 24


def test_encoder_filler_rows_change_nothing():
    """The filler that pads a batch to its bucket is a sequence of its own: outputs
    have the batch's rows, equal to a forward with no filler (the reference path)."""
    torch.manual_seed(SEED)
    enc = Encoder(EncoderConfig(dim=64, n_layers=2, n_heads=4, mlp_dim=128)).eval()
    lengths = [3, 17, 5]  # 25 rows -> a bucket of 32, 7 filler rows
    plan = AttentionPlan.from_lengths(lengths)
    x = torch.randn(25, 64)
    with torch.inference_mode():
        out = enc(x, plan)
    with torch.enable_grad():  # grad mode: the plain ops, no filler
        ref = enc(x, plan, "reference").detach()
    assert out.shape == (25, 64)
    assert (out - ref).abs().max().item() <= 1e-5, f"seed {SEED}"


def test_kernel_is_built_where_a_compiler_is():
    """Without this, a broken kernel build would pass every test on the fallback path.
    The build happens at install time (setup.py), never in the serving process."""
    if not HAS_CC:
        pytest.skip("no C compiler at install time: attention uses grouped SDPA")
    assert cpu_kernels.find_build().exists()
    assert cpu_kernels.varlen_attn() is not None, "see the mmq.kernels warning in the log"


def test_one_openmp_runtime_with_the_kernel():
    """The kernel links libgomp; it must reuse the one torch loaded, not bring its own
    (two OpenMP runtimes in a process fight over threads, or abort)."""
    if cpu_kernels.varlen_attn() is None:
        pytest.skip("no kernel build for this CPU")
    # A fresh process: the test session itself also holds CTranslate2's own libgomp,
    # loaded by the speech tests' reference (faster-whisper, a dev dependency only).
    probe = (
        "import torch\n"
        "from core.model import cpu_kernels\n"
        "assert cpu_kernels.varlen_attn() is not None\n"
        "names = ('libgomp', 'libiomp', 'libomp')\n"
        "print('\\n'.join({ln.split()[-1] for ln in open('/proc/self/maps')\n"
        "                  if any(n in ln.rsplit('/', 1)[-1] for n in names)}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[3]).stdout
    maps = set(out.split())
    assert len(maps) == 1, maps


@pytest.mark.parametrize("hs", [16, 32, 64, 24])
def test_kernel_head_sizes_and_long_sequences(hs):
    """Head sizes of one, two and four vectors (24 falls back to grouped), 1 to 4
    query-row blocks, and sequences past KERNEL_MAX_LEN that go through SDPA."""
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    lengths = [rng.randint(1, 70) for _ in range(20)] + [1, 2, 3, 4, 5, 16, 17, 33, 64, 65,
                                                         KERNEL_MAX_LEN, KERNEL_MAX_LEN + 1, 300]
    rng.shuffle(lengths)
    plan = AttentionPlan.from_lengths(lengths)
    for scale in (1.0, 8.0):  # 8: scores in the hundreds, softmax saturated (exp's range)
        qkv = scale * torch.randn(sum(lengths), 3, 3, hs)
        ref = packed_attention_qkv(qkv, plan, "reference")
        with torch.inference_mode():
            out = packed_attention_qkv(qkv, plan, "kernel")
        err = (out - ref).abs().max().item()
        # At x8 the scores reach +-300, whose fp32 round-off (~3e-5) exp turns into a
        # relative error of the same size in any implementation (SDPA's included).
        tol = 1e-5 if scale == 1 else 5e-5 * ref.abs().max().item()
        assert err <= tol, f"seed {SEED}, hs {hs}, x{scale}, lengths {lengths}: max err {err}"


def test_kernel_keeps_autograd_on_the_sdpa_path():
    lengths = [5, 9, 2]
    plan = AttentionPlan.from_lengths(lengths)
    qkv = torch.randn(sum(lengths), 3, 2, 16, requires_grad=True)
    packed_attention_qkv(qkv, plan, "kernel").sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0


def test_auto_picks_per_device_and_rejects_unknown():
    want_cpu = "kernel" if cpu_kernels.varlen_attn() else "grouped"
    assert resolve_impl("auto", torch.device("cpu"), torch.float32) == want_cpu
    assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "varlen"
    assert resolve_impl("auto", torch.device("cuda"), torch.float32) == "grouped"
    assert set(IMPLS) >= {"reference", "grouped", "kernel", "nested", "varlen"}
    with pytest.raises(ValueError, match="unknown attention impl"):
        resolve_impl("magic", torch.device("cpu"), torch.float32)


def test_plan_rejects_empty_sequences():
    with pytest.raises(ValueError, match="at least one token"):
        AttentionPlan.from_lengths([3, 0, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_varlen_matches_reference(dtype):
    rng = random.Random(SEED)
    for name, lengths in ragged_cases(rng).items():
        plan = AttentionPlan.from_lengths(lengths, device="cuda")
        q, k, v = qkv_for(lengths, dtype=dtype, device="cuda")
        ref = packed_attention(q.float(), k.float(), v.float(), plan, "reference")
        out = packed_attention(q, k, v, plan, "auto").float()
        err = (out - ref).abs().max().item()
        assert err <= 2e-2, f"seed {SEED}, case {name!r}: max err {err}"
