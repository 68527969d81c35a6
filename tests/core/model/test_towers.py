"""Image/audio towers on the packed core, checkpoints, and the model's API for them
(random small towers here; the trained default weights are tested in
test_default_towers.py)."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from core.config import Settings
from core.errors import InvalidInput
from core.model.audio import AudioConfig
from core.model.encoder import EncoderConfig
from core.model.image import ImageConfig
from core.model.multimodal import MultimodalModel
from core.model.towers import PatchTower, TowerConfig, TowersCheckpoint

SMALL = EncoderConfig(dim=32, n_layers=2, n_heads=4, mlp_dim=64, norm_first=True, ln_eps=1e-6)


def random_checkpoint(seed=0) -> TowersCheckpoint:
    torch.manual_seed(seed)
    img, aud = ImageConfig(), AudioConfig(max_seconds=5.0)
    return TowersCheckpoint(
        img, aud,
        PatchTower(TowerConfig(img.patch_dim, img.n_patches, SMALL, pool="cls")).eval(),
        PatchTower(TowerConfig(aud.patch_dim, aud.max_patches, SMALL, pool="mean")).eval(),
        {"note": "random test towers"})


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    d = tmp_path_factory.mktemp("towers")
    random_checkpoint().save(d)
    # These tests are about the patch towers in a towers checkpoint: the image one is
    # used only when asked for by name (the default is the ImageNet tower).
    return MultimodalModel.load(device="cpu", settings=Settings(towers_path=str(d),
                                                               image_tower="digits"))


def png(color=(200, 30, 30), size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_png() -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def wav(seconds: float, rate=16000, freq=440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * freq * t), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_packed_tower_equals_one_item_at_a_time():
    tower = random_checkpoint().audio
    lengths = [3, 40, 1, 17, 17, 60]
    patches = torch.randn(sum(lengths), tower.cfg.patch_dim)
    with torch.inference_mode():
        batch = tower(patches, lengths)
        starts = np.cumsum([0] + lengths)
        alone = torch.cat([tower(patches[s:s + n], [n])
                           for s, n in zip(starts, lengths, strict=False)])
    assert batch.shape == (6, 384)
    assert (batch - alone).abs().max() <= 1e-5
    assert torch.allclose(batch.norm(dim=-1), torch.ones(6), atol=1e-5)


def test_tower_trains_through_the_packed_core():
    tower = random_checkpoint().image.train()
    patches = torch.randn(3 * 16, tower.cfg.patch_dim)
    tower(patches, [16, 16, 16]).sum().backward()
    assert all(p.grad is not None for p in tower.parameters())


def test_checkpoint_round_trip_and_integrity(tmp_path):
    ck = random_checkpoint(1)
    digest = ck.save(tmp_path)
    cfg = json.loads((tmp_path / "towers.json").read_text())
    assert cfg["format"] == "mmq-towers/1" and cfg["audio"]["front_end"]["max_seconds"] == 5.0
    back = TowersCheckpoint.load(tmp_path)
    x = torch.randn(16, ck.image.cfg.patch_dim)
    with torch.inference_mode():
        # weights are stored in fp16: equal up to that rounding
        assert (back.image(x, [16]) - ck.image(x, [16])).abs().max() < 1e-2
    assert digest in (tmp_path / "towers.sha256").read_text()
    data = bytearray((tmp_path / "towers.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "towers.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        TowersCheckpoint.load(tmp_path)


def test_model_embeds_all_modalities_in_one_space(mm):
    assert mm.modalities == ("text", "image", "audio")
    t = mm.embed("text", ["red"])
    i = mm.embed("image", [png(), Image.new("L", (9, 9), 128)])
    a = mm.embed("audio", [wav(0.3), wav(2.0), (np.zeros(8000, np.float32), 8000)])
    assert t.shape == (1, 384) and i.shape == (2, 384) and a.shape == (3, 384)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    res = mm.embed_items("audio", [wav(0.3), wav(2.0)])
    assert res[1].tokens > res[0].tokens  # clip length sets the token count
    scores = mm.classify("image", [png()], labels=["red", "blue"], top_k=2)
    assert len(scores[0]) == 2


def test_ragged_audio_batch_equals_single_clips(mm):
    clips = [wav(s, freq=f) for s, f in [(0.2, 300), (1.7, 500), (0.9, 700), (3.0, 900)]]
    batch = mm.embed("audio", clips)
    alone = torch.cat([mm.embed("audio", [c]) for c in clips])
    assert (batch - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("modality, bad, reason", [
    ("image", b"not an image at all", "not an image"),
    ("image", noise_png()[:1500], "could not be decoded"),  # truncated file
    ("audio", b"", "empty"),
    ("audio", wav(0.0), "zero length"),
    ("audio", wav(6.0), "over the limit"),
    ("audio", b"OggS" + b"\0" * 60, "not a readable audio file"),
])
def test_bad_items_fail_alone(mm, modality, bad, reason):
    good = png() if modality == "image" else wav(0.5)
    prepared = mm.prepare_many(modality, [good, bad, good])
    assert isinstance(prepared[1], InvalidInput) and reason in str(prepared[1])
    assert not isinstance(prepared[0], InvalidInput) and not isinstance(prepared[2], InvalidInput)
    with pytest.raises(InvalidInput, match=reason):
        mm.prepare(modality, bad, index=7)


def test_text_only_checkpoint_has_no_image_modality(tmp_path):
    import shutil

    from core.model.text import default_text_path

    d = tmp_path / "text-only"
    shutil.copytree(default_text_path(), d)
    m = MultimodalModel.load(path=d, device="cpu", settings=Settings())
    assert m.modalities == ("text",)
    with pytest.raises(ValueError, match="unknown modality 'image'"):
        m.embed("image", [png()])
