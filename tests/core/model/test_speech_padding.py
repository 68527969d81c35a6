"""A padded window's rows taken from an all-zero window's (core/model/whisper/padding.py)
are exactly what computing them gives."""

from __future__ import annotations

import pytest
import torch

import core.model.whisper.model as whisper_model
from core.model.whisper.padding import content_frames, padding_row
from core.model.whisper.tower import SpeechTower


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


@pytest.mark.parametrize("dtype", ["tower's own", None])
def test_rows_from_the_zero_window_equal_computed_ones(tower, monkeypatch, dtype):
    enc = tower.model.encoder
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
