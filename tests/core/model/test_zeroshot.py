"""The ImageNet image tower in the shared space: real photographs, plain labels."""

import pytest
import torch
import torch.nn.functional as F

from core.model.image import image_to_pixels
from core.model.zeroshot import FRONT_END, PixelItem, ZeroShotConfig, compute_bank, load_bank
from core.serving.batcher import BatcherConfig, DynamicBatcher
from core.training import photo_eval as pe


@pytest.fixture(scope="module")
def held_out():
    return [pe.photo_bytes(p, "JPEG") for p in pe.HELD_OUT], pe.labels_of(pe.HELD_OUT)


def test_default_image_tower_is_the_imagenet_one(model):
    assert model.photo is not None and "+image@efficientnet-lite0@" in model.version
    item = model.prepare("image", pe.load_photo(pe.HELD_OUT[0]))
    assert isinstance(item, PixelItem) and item.pixels.shape == (3, 224, 224)
    assert item.tokens == 49  # the 7 x 7 feature grid: its share of a batch's budget


def test_front_end_resizes_the_short_side_then_crops_the_centre():
    from PIL import Image

    img = Image.new("RGB", (512, 256), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 128, 256))  # a blue band that the crop must cut off
    x = image_to_pixels(img, FRONT_END)  # (3, 224, 224)
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[0], torch.ones(224, 224)) and x[2].max() == -1.0


def test_held_out_photographs_top1_and_recall(model, held_out):
    images, labels = held_out
    preds = model.classify("image", images, labels=labels, top_k=1)
    top1 = sum(p[0][0] == lb for p, lb in zip(preds, labels, strict=True)) / len(labels)
    emb = model.embed("image", images)  # (16, D) unit vectors, as search uses them
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(images)), atol=1e-5)
    text = model.embed("text", labels)
    recall = ((text @ emb.T).argmax(-1) == torch.arange(len(labels))).float().mean().item()
    print(f"held-out photographs: top-1 {top1:.3f}, text->image recall@1 {recall:.3f}")
    assert top1 >= 0.6 and recall >= 0.5


def test_batched_path_equals_classify(model, held_out):
    images, labels = held_out
    want = model.classify("image", images[:6], labels=labels, top_k=3)
    b = DynamicBatcher(model, BatcherConfig(max_batch_size=8, max_wait_ms=50))
    try:
        futs = [b.submit("image", model.prepare("image", x), labels=labels, top_k=3)
                for x in images[:6]]
        got = [f.result(timeout=120) for f in futs]
    finally:
        b.stop()
    for g, w, x in zip(got, want, images[:6], strict=True):
        assert [lb for lb, _ in g.labels] == [lb for lb, _ in w]
        assert max(abs(a[1] - c[1]) for a, c in zip(g.labels, w, strict=True)) < 1e-4
        assert torch.allclose(torch.from_numpy(g.embedding), model.embed("image", [x])[0],
                              atol=1e-5)


def test_label_scores_are_the_cross_entropy_of_class_distributions(model):
    """b * l.m - logZ_l equals sum_c p_c log softmax_c(b * l.bank_c), written out."""
    t = model.photo
    x = torch.stack([model.prepare("image", pe.load_photo(p)).pixels for p in pe.HELD_OUT[:3]])
    lab = model.label_embeddings(["a cat", "the moon", "grass"])
    with torch.inference_mode():
        p = torch.softmax(t.class_logits(x) / t.cfg.image_temperature, -1)  # (3, 1000)
        q = torch.log_softmax(t.cfg.label_scale * lab @ t.bank.T, -1)  # (3 labels, 1000)
        want = (p @ q.T) / t.cfg.score_temperature
        got = t.label_logits(t(x, unit=False), lab)
    assert torch.allclose(got, want, atol=1e-3)


def test_bank_is_recomputed_for_another_text_model(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    names = [[f"class {i}"] for i in range(1000)]
    cfg = ZeroShotConfig(templates=("{}",))
    calls = []

    def embed(xs):
        calls.append(len(xs))
        return F.normalize(torch.randn(len(xs), 8), dim=-1)

    bank = load_bank(embed, "other-model@123", cfg, names)
    assert bank.shape == (1000, 8) and calls == [1000]
    again = load_bank(embed, "other-model@123", cfg, names)  # from the user cache
    assert calls == [1000] and torch.allclose(again, bank, atol=1e-3)
    assert compute_bank(lambda xs: torch.eye(1000)[: len(xs)], names, cfg).shape == (1000, 1000)

