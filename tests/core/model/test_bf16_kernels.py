"""The bf16 kernels of the speech tower (core/model/kernels/): the window attention's
in-place softmax, the encoder's residual add and layer norm, its window self-attention,
the decoder's cross-attention and its output projection's candidates, against ATen on
fresh random inputs; the decoder's self-attention cache taking turns with two buffers."""

import random

import pytest
import torch
import torch.nn.functional as F

from core.model import cpu_kernels
from core.model.attention import AttentionPlan
from core.model.whisper.cache import SelfKV
from core.model.whisper.model import TextDecoder, WhisperConfig

SEED = random.SystemRandom().randrange(2**31)


def needs(kernel, flag: str | None = None):
    """The kernel, or a skip. A CPU without ``flag`` (the attention kernels' AVX-512
    BF16) cannot run it: an inherent skip (tests/conftest.py), as on an AVX2-only AMD
    EPYC. A kernel missing on a CPU that has the flag (no build, no compiler) is not,
    so CI fails there rather than skipping quietly."""
    if kernel is None:
        if flag is not None and flag not in cpu_kernels._cpu_flags():
            pytest.skip(f"this CPU has no bf16 kernels (no {flag})")
        pytest.skip("no kernel for this CPU (needs the AVX-512 or AVX2 build)")
    return kernel


@pytest.mark.parametrize("rows,cols", [(1500, 1500), (7, 1), (3, 16), (33, 33), (5, 47)])
def test_softmax_bf16_matches_aten(rows, cols):
    """Full vectors and tails; at most one bf16 step from ATen's, almost always equal."""
    softmax = needs(cpu_kernels.softmax_bf16())
    torch.manual_seed(SEED)
    x = (torch.randn(rows, cols) * 4).bfloat16()
    ref = torch.softmax(x, -1)
    got = x.clone()
    softmax(got)
    step = torch.finfo(torch.bfloat16).eps * ref.float().abs()  # one bf16 step near ref
    assert ((got.float() - ref.float()).abs() <= step).all(), f"seed {SEED}"
    # One in a thousand may differ, or one value (as in the add+layer-norm test below).
    assert (got != ref).sum().item() <= max(1, 1e-3 * got.numel()), f"seed {SEED}"


@pytest.mark.parametrize("shape", [(8, 1500, 384), (3, 64), (1, 16)])
@pytest.mark.parametrize("with_y", [True, False])
def test_add_layer_norm_matches_aten(shape, with_y):
    """x += y exactly as ATen adds (in place), and ln(x) in bf16 at most one bf16 step
    from ATen's layer norm rounded to bf16 (and almost always equal)."""
    add_ln = needs(cpu_kernels.add_ln_bf16())
    torch.manual_seed(SEED)
    ln = torch.nn.LayerNorm(shape[-1])
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = torch.randn(shape) * 3 + 1
    y = torch.randn(shape).bfloat16() if with_y else None
    with torch.inference_mode():
        want_x = x + y if with_y else x.clone()
        want_h = ln(want_x).bfloat16()
        h = add_ln(x, y, ln)
    assert torch.equal(x, want_x)
    # One bf16 step, plus fp32 rounding where (x - mean) * rstd * w + b nearly cancels.
    step = torch.finfo(torch.bfloat16).eps * want_h.float().abs() + 1e-5
    assert ((h.float() - want_h.float()).abs() <= step).all(), f"seed {SEED}"
    # Almost always equal: one in a thousand may differ, one at least (a (3, 64) input's
    # one differing value of 192 failed ~1% of seeds when the bound was a fraction alone).
    assert (h != want_h).sum().item() <= max(1, 1e-3 * h.numel()), f"seed {SEED}"


def pairs(k: torch.Tensor) -> torch.Tensor:
    B, nh, S, hs = k.shape
    return k.view(B, nh, S, hs // 2, 2).permute(0, 1, 3, 2, 4).contiguous()


@pytest.mark.parametrize("B,M,S,ragged", [(4, 5, 1500, False), (3, 1, 37, False),
                                          (5, 13, 100, True), (2, 8, 1, False),
                                          (3, 16, 17, True)])
def test_cross_attention_kernel_matches_fp32(B, M, S, ragged):
    """Within 1e-5 of fp32 attention over the same bf16 queries, keys and values (bf16
    SDPA: ~5e-4), every query-row block size, key tails and ragged windows."""
    attn = needs(cpu_kernels.cross_attn_bf16(), "avx512_bf16")
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    q, k, v = (torch.randn(B, 6, n, 64).bfloat16() for n in (M, S, S))
    lens = torch.tensor([rng.randint(1, S) for _ in range(B)]) if ragged else None
    mask = None if lens is None else (torch.arange(S)[None] < lens[:, None])[:, None, None]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    got = attn(q, pairs(k), v, lens, 64 ** -0.5)  # (B, M, nh, hs)
    assert (got.transpose(1, 2) - ref).abs().max().item() < 1e-5, f"seed {SEED}"


@pytest.mark.parametrize("B,S,nh", [(2, 1500, 6), (1, 1, 6), (3, 31, 2), (1, 33, 1),
                                    (2, 17, 6), (1, 64, 3)])
def test_window_attention_kernel_matches_fp32(B, S, nh):
    """The encoder's window self-attention against fp32 attention over the same bf16
    inputs, for every query-row block and key-pair tail: within its output's and its
    probabilities' bf16 roundings, and closer than the matmul path it replaced (whose
    scores are rounded to bf16 too: ~10x the error)."""
    attn = needs(cpu_kernels.window_attn_bf16(), "avx512_bf16")
    torch.manual_seed(SEED)
    qkv = (2 * torch.randn(B, S, 3, nh, 64)).bfloat16()  # (B, S, 3, nh, hs)
    qkv[:, :, 0] *= 64 ** -0.5  # the projection folds the scale into the queries
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, S, hs)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                         scale=1.0).transpose(1, 2)  # (B, S, nh, hs)
    got = attn(qkv)
    assert got.dtype == torch.bfloat16 and got.shape == (B, S, nh, 64)
    err = (got.float() - ref).abs()
    assert (err - ref.abs() * 2 ** -8).max().item() < 0.02, f"seed {SEED}"
    probs = torch.softmax((q @ k.transpose(-1, -2)).float(), -1).bfloat16()
    matmuls = (probs @ v).transpose(1, 2).float()  # the explicit path's roundings
    assert err.max() <= (matmuls - ref).abs().max(), f"seed {SEED}"


def test_window_attention_path_uses_the_kernel_and_keeps_its_answers(monkeypatch):
    """``window_attention``'s explicit bf16 path is the kernel where there is one; its
    answers are the matmul path's (which it replaced) within bf16 roundings."""
    from core.model import attention

    needs(cpu_kernels.window_attn_bf16(), "avx512_bf16")
    torch.manual_seed(SEED)
    qkv = torch.randn(2, 40, 3, 6, 64).bfloat16()  # (B, S, 3, nh, hs)
    qkv[:, :, 0] *= 0.125
    got = attention.window_attention(qkv, True)
    assert got.is_contiguous()  # (B, S, nh, hs): the next projection's input as it is
    monkeypatch.setattr(attention, "window_kernel", lambda qkv: None)
    old = attention.window_attention(qkv, True)
    assert got.shape == old.shape
    assert (got.float() - old.float()).abs().max().item() < 0.05, f"seed {SEED}"


def small_decoder() -> TextDecoder:
    torch.manual_seed(SEED)
    cfg = WhisperConfig(dim=128, n_heads=2, n_text_layers=2, n_vocab=300, n_text_ctx=32)
    dec = TextDecoder(cfg).eval()
    for p in dec.parameters():
        torch.nn.init.normal_(p, std=0.2)
    dec.kv_dtype = torch.bfloat16
    return dec


@pytest.mark.parametrize("lengths", [[40, 40, 40], [40, 9, 23]])
def test_decoder_logits_with_the_kernel_match_sdpa(monkeypatch, lengths):
    """The decoder with pair-interleaved keys (the kernel) gives the logits of the SDPA
    path, equal-length and ragged windows, a prompt of three positions then one step."""
    needs(cpu_kernels.cross_attn_bf16(), "avx512_bf16")
    dec = small_decoder()
    plan = AttentionPlan.from_lengths(lengths)
    enc = torch.randn(sum(lengths), 128)
    tokens = torch.randint(0, 300, (len(lengths), 3))

    def run() -> tuple[torch.Tensor, bool]:
        cross = dec.cross_kv(enc, plan)
        cache = dec.new_cache(len(lengths), 8, enc)
        with torch.inference_mode():
            first = dec(tokens, cross, cache)  # (B, 3, V)
            step = dec(tokens[:, :1], cross, cache.select(torch.arange(len(lengths))),
                       all_logits=False)  # (B, V)
        return torch.cat([first.flatten(), step.flatten()]), cross.pairs

    fast, used = run()
    monkeypatch.setattr(cpu_kernels, "cross_attn_bf16", lambda: None)
    ref, unused = run()
    assert used and not unused
    assert (fast - ref).abs().max().item() < 2e-2 * ref.abs().max().item(), f"seed {SEED}"


@pytest.mark.parametrize("R,V,T", [(80, 1000, 16), (13, 300, 32), (1, 51, 1), (7, 17, 8)])
def test_logits_top_kernel_keeps_each_rows_largest_and_its_normaliser(R, V, T):
    """Against fp64 products of the same bf16-rounded rows and weight: the T largest
    logits (suppressed tokens -inf) in order with their ids, the largest and the sum of
    exp(logit - largest); vocabulary sizes with a partial last block of 16."""
    kernel = needs(cpu_kernels.logits_top_bf16(), "avx512_bf16")
    torch.manual_seed(SEED)
    w, h = torch.randn(V, 64), torch.randn(R, 64).bfloat16()
    bias = torch.randn(V)
    bias[torch.randperm(V)[:V // 10]] = float("-inf")
    val, ids, top, total = kernel(h, cpu_kernels.pack_pairs(w), bias, V, T)
    ref = h.double() @ w.bfloat16().double().T + bias.double()  # (R, V)
    want, _ = ref.topk(T, -1)
    assert torch.allclose(val.double(), want, atol=1e-4), f"seed {SEED}"
    assert torch.allclose(ref.gather(1, ids), val.double(), atol=1e-4), f"seed {SEED}"
    assert all(len(set(r)) == T for r in ids.tolist())  # T distinct tokens per row
    assert torch.allclose(top.double(), ref.amax(-1), atol=1e-4), f"seed {SEED}"
    want_total = torch.exp(ref - ref.amax(-1, keepdim=True)).sum(-1)
    assert torch.allclose(total.double(), want_total, rtol=1e-4), f"seed {SEED}"


def test_step_top_gives_the_full_paths_candidates(monkeypatch):
    """A search step's T candidates per row: the full fp32 path's likeliest tokens, with
    its log-probabilities (fp32 logits; only the normaliser's rest summed in bf16)."""
    needs(cpu_kernels.logits_top_bf16(), "avx512_bf16")
    dec = small_decoder()
    plan = AttentionPlan.from_lengths([40, 40])
    enc = torch.randn(80, 128)
    tokens = torch.randint(0, 300, (2, 3))
    bias = torch.zeros(300).index_fill_(0, torch.tensor([3, 7, 11]), float("-inf"))

    def step(fast: bool):
        cross = dec.cross_kv(enc, plan)
        cache = dec.new_cache(2, 8, enc)
        with torch.inference_mode():
            dec(tokens, cross, cache)
            nxt = cache.select(torch.arange(2))
            if fast:
                return dec.step_top(tokens[:, :1], cross, nxt, bias, 12)
            return torch.log_softmax(dec(tokens[:, :1], cross, nxt, all_logits=False,
                                         bias=bias), -1)  # (2, V)

    lp, ids = step(True)
    ref = step(False)
    # bf16 picks the 12: near its last, ties may go either way, so the full path's 6
    # likeliest (2K for five beams is 10; the search asks for 2K + 6) must be among them.
    want_ids = ref.topk(6, -1).indices
    for got, want in zip(ids.tolist(), want_ids.tolist(), strict=True):
        assert set(want) <= set(got), f"seed {SEED}"
    assert torch.allclose(lp, ref.gather(1, ids), atol=1e-3), f"seed {SEED}"
    # Fewer tokens allowed than candidates asked for: the rest are -inf, not token 0.
    bias = torch.full((300,), float("-inf")).index_fill_(0, torch.tensor([5, 9, 40]), 0.0)
    lp, ids = step(True)
    assert torch.isinf(lp).sum(1).tolist() == [9, 9]
    assert set(ids[lp > float("-inf")].tolist()) == {5, 9, 40}
    monkeypatch.setattr(cpu_kernels, "logits_top_bf16", lambda: None)
    assert step(True) is None  # no kernel: the caller takes the full logits


def test_self_cache_select_takes_turns_with_two_buffers():
    """Each select copies the chosen rows' filled positions into the buffer of the cache
    before (no fresh buffer per beam step), and the contents are the rows chosen."""
    torch.manual_seed(SEED)
    c0 = SelfKV(torch.randn(6, 2, 2, 3, 10, 4), length=7)
    picks = [torch.tensor([5, 5, 0, 1, 2, 3]), torch.tensor([1, 0, 3, 2, 5, 4]),
             torch.tensor([2, 2, 2, 0, 0, 0])]
    want = c0.buf[..., :7, :].clone()
    caches = [c0]
    for idx in picks:
        caches.append(caches[-1].select(idx))
        want = want[idx]
        assert torch.equal(caches[-1].buf[..., :7, :], want)
    ptrs = [c.buf.data_ptr() for c in caches]
    assert ptrs[2] == ptrs[0] and ptrs[3] == ptrs[1] and ptrs[0] != ptrs[1]
    fewer = caches[-1].select(torch.tensor([1, 4]))  # rows change: a buffer of their own
    assert fewer.buf.shape[0] == 2 and torch.equal(fewer.buf[..., :7, :], want[[1, 4]])


def test_kernel_wrappers_refuse_what_c_would_misread():
    """Raw pointers: a transposed, wrongly typed or too-long input is a ValueError (with
    ``python -O`` too), not a wrong answer or a read past the end. Key lengths over S
    left some outputs unwritten (torch.empty's garbage) before."""
    softmax, add_ln = cpu_kernels.softmax_bf16(), cpu_kernels.add_ln_bf16()
    if softmax is not None:
        x = torch.randn(8, 6).bfloat16()
        for bad in (x.t(), x.float(), x[None]):
            with pytest.raises(ValueError):
                softmax(bad)
    if add_ln is not None:
        ln = torch.nn.LayerNorm(16)
        with pytest.raises(ValueError), torch.inference_mode():
            add_ln(torch.randn(4, 16), torch.randn(4, 16), ln)  # y not bf16
    window = cpu_kernels.window_attn_bf16()
    if window is not None:
        qkv = torch.randn(2, 10, 3, 6, 64).bfloat16()
        for bad in (qkv.float(), qkv.transpose(0, 1), qkv[:, :, :2], qkv[:, :0]):
            with pytest.raises(ValueError):
                window(bad)
    top = cpu_kernels.logits_top_bf16()
    if top is not None:
        w, h = cpu_kernels.pack_pairs(torch.randn(40, 16)), torch.randn(3, 16).bfloat16()
        with pytest.raises(ValueError, match="does not match"):
            top(h, w, None, 49, 4)  # the weight packs 48 entries: 49 would read past it
        with pytest.raises(ValueError, match="T=33"):
            top(h, w, None, 40, 33)
        with pytest.raises(ValueError, match="bias"):
            top(h, w, torch.zeros(39), 40, 4)
    attn = cpu_kernels.cross_attn_bf16()
    if attn is not None:
        q, k, v = (torch.randn(2, 6, n, 64).bfloat16() for n in (5, 50, 50))
        with pytest.raises(ValueError, match="at most S=50"):
            attn(q, pairs(k), v, torch.tensor([51, 50]), 0.125)
        with pytest.raises(ValueError, match="do not match"):
            attn(q, pairs(k), v[:, :, :40].contiguous(), None, 0.125)
