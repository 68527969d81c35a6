"""Precision modes of the image backbone on the bundled EfficientNet-Lite0 weights: bf16
gives the same zero-shot answers as fp32 on the real photographs (both sets), and the
mode is tagged in the version."""

import pytest
import torch
import torch.nn.functional as F

from core.config import Settings
from core.precision import untagged
from core.training import photo_eval as pe
from tests.helpers import needs_bf16

PHOTOS = pe.HELD_OUT + pe.CALIBRATION


@pytest.fixture(scope="module")
def bf16_model():
    from core.model.multimodal import MultimodalModel

    return MultimodalModel.load(device="cpu", settings=Settings(image_precision="bf16",
                                                                text_precision="fp32"))


@pytest.fixture(scope="module")
def photos():
    return [pe.photo_bytes(p, "JPEG") for p in PHOTOS]


def answers(model, photos: list[bytes], photo_set: tuple) -> list[str]:
    return [r[0][0] for r in model.classify("image", photos, pe.labels_of(photo_set), top_k=1)]


@needs_bf16()
def test_bf16_zero_shot_answers_equal_fp32(fp32_model, bf16_model, photos):
    n = len(pe.HELD_OUT)
    for sl, photo_set in ((slice(0, n), pe.HELD_OUT), (slice(n, None), pe.CALIBRATION)):
        got, ref = answers(bf16_model, photos[sl], photo_set), answers(fp32_model, photos[sl],
                                                                       photo_set)
        assert got == ref
    ref, got = fp32_model.embed("image", photos), bf16_model.embed("image", photos)  # (32, D)
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.min() >= 0.99, f"cosine {cos.min():.4f}"
    text = fp32_model.embed("text", pe.labels_of(pe.HELD_OUT))  # text->image retrieval, held out
    assert torch.equal((text @ got[:n].T).argmax(-1), (text @ ref[:n].T).argmax(-1))
    assert bf16_model.photo.net._conv_stem.weight.dtype == torch.bfloat16


@needs_bf16()
def test_bf16_backbone_logits_close_to_fp32(fp32_model, bf16_model):
    x = torch.stack([fp32_model.prepare("image", pe.load_photo(p)).pixels for p in PHOTOS[:8]])
    with torch.inference_mode():
        ref, got = fp32_model.photo.class_logits(x), bf16_model.photo.class_logits(x)  # (8, 1000)
    assert got.dtype == torch.float32
    assert torch.equal(got.argmax(-1), ref.argmax(-1))  # the ImageNet class, per photo


@needs_bf16()
def test_image_version_is_tagged(fp32_model, bf16_model):
    text, image = bf16_model.version.split("+image@")
    assert "efficientnet-lite0@" in image and "/bf16+zs@" in image
    assert text == fp32_model.version.split("+image@")[0]  # the text tower untouched
    assert untagged(bf16_model.version) == untagged(fp32_model.version)  # speech: auto


def test_bad_image_setting_is_refused():
    with pytest.raises(ValueError, match="image_precision"):
        Settings(image_precision="int8")
