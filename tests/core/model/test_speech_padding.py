"""A padded window's rows taken from an all-zero window's (core/model/whisper/padding.py)
are what computing them gives: the convolutions and first q, k, v exactly, the first
attention's part over the zero window's keys (bf16 kernel) to its own rounding."""

from __future__ import annotations

import pytest
import torch

import core.model.whisper.model as whisper_model
from core.model import cpu_kernels
from core.model.whisper.padding import Split, content_frames, padding_row
from core.model.whisper.tower import SpeechConfig, SpeechTower


@pytest.fixture(scope="module")
def tower():
    return SpeechTower.from_bundled(device="cpu")


def _windows(tower: SpeechTower) -> list[torch.Tensor]:
    """Padded windows of 1 s of noise... 29.9 s, one all-zero and one full one."""
    g = torch.Generator().manual_seed(0)
    mels = []
    for frames in (100, 233, 1, 2999, 0, 3000, 1501, 57):
        mel = torch.randn(80, frames, generator=g) * 0.3
        mels.append(tower.front.pad_window(mel))
    return mels


def _computed(monkeypatch, tower: SpeechTower, mels: list[torch.Tensor]) -> torch.Tensor:
    with monkeypatch.context() as m:  # every row computed: the padding shares none
        m.setattr(whisper_model, "padding_row", lambda n, S: S)
        return tower.encode(mels)[0]


def _no_split(monkeypatch, tower: SpeechTower) -> None:
    """The zero window's rows shared up to the first attention, which runs whole."""
    tower.model.encoder._pad = None
    monkeypatch.setattr(whisper_model.Split, "of", classmethod(lambda cls, qkv, step: None))


@pytest.mark.parametrize("dtype", ["tower's own", None])
def test_rows_from_the_zero_window_equal_computed_ones(tower, monkeypatch, dtype):
    enc = tower.model.encoder
    _no_split(monkeypatch, tower)
    was = (enc.mm_dtype, enc.attn_dtype)
    if dtype is None:
        enc.set_matmul_dtype(None)  # fp32 throughout: the fused add and norm not taken
    try:
        mels = _windows(tower)
        shared = tower.encode(mels)[0]  # (8 * 1500, C)
        assert enc._pad is not None  # the zero window's rows were used
        # Bit-identical on the CPUs measured; oneDNN may choose another kernel for a
        # shorter input on another, whose sums differ in their last bits.
        torch.testing.assert_close(shared, _computed(monkeypatch, tower, mels), rtol=0,
                                   atol=1e-4 if dtype is None else 2e-2)
    finally:
        enc.set_matmul_dtype(*was)


def test_the_zero_window_is_remade_when_a_weight_changes(tower, monkeypatch):
    enc = tower.model.encoder
    _no_split(monkeypatch, tower)
    mels = _windows(tower)[:3]
    tower.encode(mels)
    before = enc._pad
    bias = enc.conv1.bias
    try:
        with torch.no_grad():
            enc.conv1.bias = torch.nn.Parameter(bias + 0.01, requires_grad=False)
        shared = tower.encode(mels)[0]
        assert enc._pad is not before
        torch.testing.assert_close(shared, _computed(monkeypatch, tower, mels), rtol=0,
                                   atol=2e-2)
    finally:
        enc.conv1.bias = bias


def test_the_split_first_attention_keeps_the_states(tower, monkeypatch):
    """With the first attention's rows past each clip split (bf16 kernel): the encoder's
    states as close to the whole attention's as bf16 rounding leaves them."""
    if cpu_kernels.window_attn_bf16() is None or tower.precision != "bf16":
        pytest.skip("this CPU has no bf16 kernels (no avx512_bf16)")
    mels = _windows(tower)
    tower.model.encoder._pad = None
    split = tower.encode(mels)[0]
    assert tower.model.encoder._pad.split is not None
    with monkeypatch.context() as m:
        _no_split(m, tower)
        whole = tower.encode(mels)[0]
    tower.model.encoder._pad = None
    d = (split - whole).abs()
    assert d.mean() < 0.01, d.mean()  # bf16 against fp32 is ~0.01 on average


@pytest.mark.parametrize("rows", [[50, 0, 150, 300], [300, 250]])
def test_the_split_kernel_attends_as_the_whole(rows):
    """The kernel's rows past each clip (split tables) against fp32 attention over all
    keys: within the error of its whole-attention path; the rows before, identical."""
    kernel = cpu_kernels.window_attn_bf16()
    if kernel is None:
        pytest.skip("this CPU has no bf16 kernels (no avx512_bf16)")
    torch.manual_seed(0)
    S, nh, hs = 300, 6, 64
    scale = torch.tensor([0.375, 3, 1]).view(1, 3, 1, 1)  # q pre-scaled; keys spread
    zero = (torch.randn(S, 3, nh, hs) * scale).bfloat16()
    qkv = zero[None].repeat(len(rows), 1, 1, 1, 1)
    for b, u in enumerate(rows):
        qkv[b, :u] = (torch.randn(u, 3, nh, hs) * scale).bfloat16()
    fast, whole = kernel(qkv, rows, Split.of(zero, 50)), kernel(qkv)
    q, k, v = qkv.float().permute(2, 0, 3, 1, 4)
    ref = (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2)
    for b, u in enumerate(rows):
        assert torch.equal(fast[b, :u], whole[b, :u])
        if u == S:
            continue
        err = (fast[b, u:].float() - ref[b, u:]).abs()
        assert err.max() < 0.03 and err.mean() < 2 * (whole[b].float() - ref[b]).abs().mean()


def test_split_tables_keep_a_far_larger_score_before_u_from_erasing_the_rest():
    """Each u's sums are relative to the largest score among its own keys (j >= u): a
    zero-window key before u scoring ~120 above the rest erased them (exp underflow)
    when the tables were relative to the row's largest over all keys."""
    kernel = cpu_kernels.window_attn_bf16()
    if kernel is None:
        pytest.skip("this CPU has no bf16 kernels (no avx512_bf16)")
    torch.manual_seed(0)
    S, nh, hs = 200, 6, 64
    zero = (torch.randn(S, 3, nh, hs) * 0.3).bfloat16()
    zero[:, 0] = 1.0  # every query the same direction...
    zero[0, 1] = 2.0  # ...which key 0 (before u = 50) matches: 128 against ~0 elsewhere
    qkv = zero[None].clone()
    qkv[0, :50, 1] = (torch.randn(50, nh, hs) * 0.3).bfloat16()  # the clip's own keys
    fast = kernel(qkv, [50], Split.of(zero, 50))
    q, k, v = qkv.float().permute(2, 0, 3, 1, 4)
    ref = (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2)
    assert (fast[0, 50:].float() - ref[0, 50:]).abs().max() < 0.03


def test_int8_takes_no_rows_from_another_call():
    """int8 quantizes a linear's input with one scale per call: no shared rows there."""
    tower = SpeechTower.from_bundled(device="cpu", cfg=SpeechConfig(precision="int8"))
    tower.encode(_windows(tower)[:2])
    assert tower.model.encoder._pad is None


def test_where_the_padding_starts():
    x = torch.zeros(2, 80, 3000)
    x[0, 3, :233] = 1.0
    x[0, 5, 10] = 0.0
    assert content_frames(x).tolist() == [233, 0]
    # Position u reads frames 2u - 2 .. 2u + 2: with 233 frames, u = 118 is the first
    # whose frames are all padding, rounded up to a whole second (50 positions).
    assert padding_row(233, 1500) == 150
    assert padding_row(0, 1500) == 50
    assert padding_row(2999, 1500) == 1500
