"""The Tower protocol: every modality's tower implements it, the model runs them from
its registry, and its version is the towers' versions joined."""

from pathlib import Path

import pytest
import torch

from core.config import Settings
from core.jobs import MODALITIES
from core.model.attention import attention_work, dense_attention, window_attention
from core.model.tower import Tower
from core.model.whisper.weights import cache_dir


def test_every_modality_has_a_tower(model):
    assert tuple(model.towers) == MODALITIES
    for modality, tower in model.towers.items():
        assert isinstance(tower, Tower) and tower.modality == modality
    assert model.version == "+".join(t.version for t in model.towers.values())
    assert model.towers["audio"].labels_in_pass and not model.towers["text"].labels_in_pass


def test_unknown_modality_is_refused(model):
    for call in (lambda: model.prepare_many("video", ["x"]),
                 lambda: model.forward("video", []),
                 lambda: model.feature_kind("video")):
        with pytest.raises(ValueError, match="unknown modality"):
            call()


def test_whisper_cache_dir_comes_from_settings(monkeypatch, tmp_path):
    assert cache_dir(Settings(whisper_cache=str(tmp_path))) == tmp_path
    monkeypatch.setenv("MMQ_WHISPER_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"  # the same variable as before
    monkeypatch.delenv("MMQ_WHISPER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == Path(tmp_path / "xdg" / "mmq" / "whisper")


@pytest.mark.parametrize("explicit", [False, True])
def test_window_attention_matches_dense_sdpa(explicit):
    """Whisper's equal-length windows path computes softmax(QK^T/sqrt(d))V per window."""
    torch.manual_seed(0)
    B, S, nh, hs = 2, 7, 3, 16
    qkv = torch.randn(B, S, 3, nh, hs)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, S, hs)
    want = dense_attention(q, k, v).transpose(1, 2)  # (B, S, nh, hs)
    if explicit:  # the caller folds 1/sqrt(hs) into q
        qkv = torch.cat([qkv[:, :, :1] * hs ** -0.5, qkv[:, :, 1:]], dim=2)
    got = window_attention(qkv, explicit)
    assert got.shape == (B, S, nh, hs)
    assert (got - want).abs().max().item() < 1e-5


def test_window_attention_bf16_reuses_one_buffer_in_place():
    """The explicit bf16 path softmaxes one head's scores in place, in one buffer reused
    across heads, windows and calls: the same as attention over fresh tensors (rows long
    enough for torch's vectorised softmax)."""
    torch.manual_seed(0)
    B, S, nh, hs = 2, 300, 3, 64
    qkv = torch.randn(B, S, 3, nh, hs)
    qkv[:, :, 0] *= hs ** -0.5  # the caller folds 1/sqrt(hs) into q
    q, k, v = qkv.bfloat16().permute(2, 0, 3, 1, 4).float()  # each (B, nh, S, hs)
    want = (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2)  # (B, S, nh, hs)
    work = attention_work(S, qkv.bfloat16())
    got = window_attention(qkv.bfloat16(), True, work)
    again = window_attention(qkv.bfloat16(), True, work)
    assert got.dtype == torch.bfloat16 and got.shape == (B, S, nh, hs)
    assert torch.equal(got, again)
    assert (got.float() - want).abs().max().item() < 0.03  # bf16 probabilities and output
