"""EfficientNet-Lite0: the bundled checkpoint, our definition vs timm's reference."""

import pytest
import torch

from core.model.efficientnet import (
    EfficientNetLite,
    default_checkpoint,
    load_efficientnet_lite0,
)


@pytest.fixture(scope="module")
def nets():
    return load_efficientnet_lite0(fuse=False), load_efficientnet_lite0()


def timm_reference():
    """timm's tf_efficientnet_lite0 with the same weights: the key names differ, the
    order and shapes do not (checked here, tensor by tensor)."""
    timm = pytest.importorskip("timm")  # a dev dependency: CI has it
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours = torch.load(default_checkpoint(), map_location="cpu", weights_only=True)
    rk, ok = list(ref.state_dict()), list(ours)
    assert len(rk) == len(ok)
    for a, b in zip(rk, ok, strict=True):
        assert ref.state_dict()[a].shape == ours[b].shape, (a, b)
    ref.load_state_dict({a: ours[b] for a, b in zip(rk, ok, strict=True)}, strict=True)
    return ref.eval()


@torch.inference_mode()
def test_logits_match_timm_tf_efficientnet_lite0(nets):
    ref = timm_reference()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 224, 224)
    want = ref(x)
    plain, fused = nets
    assert (plain(x) - want).abs().max() <= 1e-4
    assert (fused(x) - want).abs().max() <= 1e-4  # BatchNorm folded into the convs
    cl = fused.to(memory_format=torch.channels_last)
    assert (cl(x.contiguous(memory_format=torch.channels_last)) - want).abs().max() <= 1e-4
    fused.to(memory_format=torch.contiguous_format)


@torch.inference_mode()
def test_same_padding_handles_odd_sizes(nets):
    # TF "SAME": out = ceil(in / stride) at every stride-2 layer, extra pad bottom/right.
    assert nets[1](torch.randn(1, 3, 225, 193)).shape == (1, 1000)


def test_checkpoint_loads_strictly_and_is_checked(tmp_path):
    sd = torch.load(default_checkpoint(), map_location="cpu", weights_only=True)
    EfficientNetLite().load_state_dict(sd, strict=True)  # every key, no extras
    bad = tmp_path / "lite0.pth"
    data = bytearray(default_checkpoint().read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_efficientnet_lite0(bad)
