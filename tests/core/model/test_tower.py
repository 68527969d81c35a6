"""The Tower protocol: every modality's tower implements it, the model runs them from
its registry, and its version is the towers' versions joined."""

from pathlib import Path

import pytest
import torch

from core.config import Settings
from core.jobs import MODALITIES
from core.model.attention import dense_attention, window_attention
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
