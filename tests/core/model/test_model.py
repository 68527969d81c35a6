"""MultimodalModel's public API: embed, classify, per-item errors, loading."""

import shutil

import pytest
import torch

from core.errors import InvalidInput
from core.model.multimodal import MultimodalModel
from core.model.text import default_text_path


def test_embed_shape_and_norm(model):
    e = model.embed("text", ["a cat sat on the mat", "stocks fell sharply"])
    assert e.shape == (2, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert model.embed("text", []).shape == (0, 384)


def test_classify_ranks_the_obvious_label_first(model):
    labels = ["animals", "finance", "sport", "weather"]
    out = model.classify("text", ["my dog chased the cat around the garden",
                                  "the central bank raised interest rates",
                                  "heavy rain and strong wind tomorrow"], labels, top_k=2)
    assert [r[0][0] for r in out] == ["animals", "finance", "weather"]
    assert all(len(r) == 2 and r[0][1] >= r[1][1] for r in out)
    full = model.classify("text", ["hello"], labels, top_k=10)[0]
    assert len(full) == 4 and abs(sum(p for _, p in full) - 1) < 1e-4


@pytest.mark.parametrize("bad, reason", [
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("\u200b\ufeff \u200c\u200d\u2060", "no visible characters"),  # zero-width only
    ("\u0301 \u0308", "combining marks with no base character"),  # embedded as ""
    (None, "must be a string"),
    (42, "must be a string"),
    (b"\xff\xfe broken", "not valid UTF-8"),
    ("lone \ud800 surrogate", "not valid Unicode"),
])
def test_bad_items_fail_alone(model, bad, reason):
    prepared = model.prepare_many("text", ["fine", bad, "also fine"])
    assert isinstance(prepared[1], InvalidInput) and reason in str(prepared[1])
    assert prepared[1].index == 1 and "item 1" in str(prepared[1])
    assert not isinstance(prepared[0], InvalidInput) and not isinstance(prepared[2], InvalidInput)
    with pytest.raises(InvalidInput, match=reason):
        model.embed("text", ["fine", bad])


def test_utf8_bytes_are_accepted(model):
    a = model.embed("text", ["café au lait".encode()])
    b = model.embed("text", ["café au lait"])
    assert torch.allclose(a, b)


def test_oversized_text_is_refused(model):
    limit = model.text_pre.max_chars
    with pytest.raises(InvalidInput, match="over the limit"):
        model.embed("text", ["x" * (limit + 1)])


def test_truncation_is_reported(model):
    long, short = "word " * 400, "a short one"
    res = model.embed_items("text", [long, short])
    assert res[0].truncated and res[0].tokens == 256
    assert not res[1].truncated and res[1].tokens < 10


def test_long_lists_are_chunked_by_token_budget(model):
    texts = [f"sentence number {i} about the weather in town" for i in range(300)]
    chunks = model._chunks(model.prepare_many("text", texts))
    assert len(chunks) > 1
    assert all(sum(p.tokens for p in c) <= model.cfg.max_batch_tokens for c in chunks)
    assert sum(len(c) for c in chunks) == 300
    together = model.embed("text", texts)
    assert (together[-3:] - model.embed("text", texts[-3:])).abs().max() <= 1e-5


@pytest.mark.parametrize("labels", [[], "a,b", ["a", ""], ["a", "a"], ["a", 3]])
def test_bad_labels(model, labels):
    with pytest.raises(InvalidInput, match="label"):
        model.classify("text", ["x"], labels)


def test_unknown_modality(model):
    with pytest.raises(ValueError, match="unknown modality"):
        model.embed("smell", ["x"])


def test_loads_from_any_local_directory(tmp_path, model):
    """A deployment points at its own checkpoint dir; the format is plain HF BERT."""
    d = tmp_path / "my-checkpoint"
    shutil.copytree(default_text_path(), d)
    other = MultimodalModel.load(path=d, device="cpu")
    assert other.version.startswith("my-checkpoint@")
    digest = model.version.split("@")[1].split("+")[0]  # the text weights' part
    # The image and speech parts follow; the image one names this text model's class bank.
    assert other.version.split("+")[0] == f"my-checkpoint@{digest}"
    assert other.version.split("+image@")[1] != model.version.split("+image@")[1]
    same = ["same weights"]
    assert torch.allclose(other.embed("text", same), model.embed("text", same))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MultimodalModel.load(path=tmp_path, device="cpu")


def test_label_cache_is_a_bounded_lru(model):
    """Every label any client sends used to stay in the cache for the worker's life."""
    from core.model.multimodal import LruCache, ModelConfig

    assert model._label_cache.capacity == ModelConfig().label_cache_size
    saved, model._label_cache = model._label_cache, LruCache(3)
    try:
        labels = ["cat", "dog", "bird", "fish", "horse"]  # more than the cache holds
        torch.testing.assert_close(model.label_embeddings(labels), model.embed("text", labels))
        assert list(model._label_cache) == ["bird", "fish", "horse"]
        model.label_embeddings(["bird"])  # used: now the most recent
        model.label_embeddings(["cow"])  # evicts the least recently used, "fish"
        assert list(model._label_cache) == ["horse", "bird", "cow"]
    finally:
        model._label_cache = saved
