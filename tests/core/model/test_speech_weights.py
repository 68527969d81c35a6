"""The bundled Whisper tiny.en: model.bin parsed to the last byte, checked, converted, cached."""

from __future__ import annotations

import shutil

import pytest
import torch

from core.model.files import sha256_file
from core.model.whisper.ct2 import read_model_bin
from core.model.whisper.weights import MODEL_BIN_SHA256, bundled_dir, load_whisper


@pytest.fixture(scope="module")
def ct2():
    return read_model_bin(bundled_dir() / "model.bin")


def test_model_bin_is_the_bundled_tiny_en(ct2):
    assert sha256_file(bundled_dir() / "model.bin") == MODEL_BIN_SHA256
    assert ct2.spec == "WhisperSpec"
    assert len(ct2.variables) == 148
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ct2.get("decoder/projection/weight").shape == (51864, 384)
    assert ct2.variables["encoder/conv1/weight"].dtype == torch.float16


def test_truncated_model_bin_is_refused(tmp_path):
    data = (bundled_dir() / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_model_bin(tmp_path / "model.bin")


def test_conversion_is_cached_and_checked(tmp_path):
    first = load_whisper(cache=tmp_path)
    assert first.cached is not None and first.cached.exists()
    params = sum(p.numel() for p in first.model.parameters())
    assert 37_000_000 < params < 38_000_000  # tiny.en: 37.76 M with the tied embedding
    again = load_whisper(cache=tmp_path)  # from the safetensors
    for (k, a), (_, b) in zip(first.model.state_dict().items(),
                              again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # A corrupt cache is noticed (sha256) and converted again, not loaded.
    raw = bytearray(first.cached.read_bytes())
    raw[-10] ^= 0xFF
    first.cached.write_bytes(bytes(raw))
    third = load_whisper(cache=tmp_path)
    assert torch.equal(third.model.decoder.ln.weight, first.model.decoder.ln.weight)
    assert sha256_file(third.cached) == third.cached.with_suffix(".sha256").read_text().split()[0]


def test_a_different_model_bin_is_refused(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(bundled_dir() / name, src / name)
    data = bytearray((bundled_dir() / "model.bin").read_bytes())
    data[-100] ^= 0x01
    (src / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_whisper(source=src, cache=tmp_path / "cache")


def test_unwritable_cache_still_loads(tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory would go")  # even root cannot mkdir
    ck = load_whisper(cache=blocked / "whisper")
    assert ck.cached is None
    assert ck.model.decoder.tok.weight.shape == (51864, 384)
