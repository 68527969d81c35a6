"""Image and audio towers: patch tokens through the packed encoder into text space.

Both are the same module with different front ends: a linear patch embedding,
a class token, learned positions, pre-LN encoder layers on the packed attention
core, a pooled state and a projection into the text tower's space (384-d),
L2-normalised. Checkpoints: ``towers.json`` (configs), ``towers.safetensors``
(weights, keys prefixed ``image.`` / ``audio.``) and ``towers.sha256``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from core.model.attention import AttentionPlan
from core.model.audio import AudioConfig
from core.model.encoder import Encoder, EncoderConfig
from core.model.files import sha256_file
from core.model.image import ImageConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class TowerConfig:
    patch_dim: int  # input features per patch (3*p*p pixels, or k*n_mels)
    max_patches: int  # position table size, class token excluded
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(
        dim=192, n_layers=4, n_heads=6, mlp_dim=768, norm_first=True, ln_eps=1e-6))
    out_dim: int = 384  # the text tower's embedding size: one shared space
    pool: str = "cls"  # "cls" (ViT) or "mean" over all tokens (steadier for ragged audio)


class PatchTower(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.encoder.dim
        self.patch_proj = nn.Linear(cfg.patch_dim, C)
        self.cls = nn.Parameter(torch.zeros(C))
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_patches + 1, C) * 0.02)
        self.encoder = Encoder(cfg.encoder)
        self.ln_out = nn.LayerNorm(C, eps=cfg.encoder.ln_eps)
        self.head = nn.Linear(C, cfg.out_dim)

    def forward(self, patches: torch.Tensor, n_patches: list[int],
                impl: str = "auto") -> torch.Tensor:
        """(P, patch_dim) packed patches of B items -> (B, out_dim) unit vectors."""
        P, _ = patches.shape
        B, C = len(n_patches), self.cfg.encoder.dim
        if max(n_patches) > self.cfg.max_patches:
            raise ValueError(f"{max(n_patches)} patches, the tower holds {self.cfg.max_patches}")
        plan = AttentionPlan.from_lengths([n + 1 for n in n_patches], device=patches.device)
        seq = plan.seq_ids  # (N,) with N = P + B
        starts = plan.cu_seqlens[:-1]  # (B,) where each class token goes
        is_patch = torch.ones(P + B, dtype=torch.bool, device=patches.device)
        is_patch[starts] = False
        x = patches.new_empty(P + B, C)
        x[is_patch] = self.patch_proj(patches)  # (P, C)
        x[starts] = self.cls.to(x.dtype).expand(B, C)
        x = x + self.pos_emb[plan.positions()]
        x = self.ln_out(self.encoder(x, plan, impl))  # (N, C)
        if self.cfg.pool == "cls":
            pooled = x[starts]  # (B, C)
        else:
            pooled = x.new_zeros(B, C).index_add_(0, seq, x) / torch.tensor(
                [n + 1 for n in n_patches], dtype=x.dtype, device=x.device)[:, None]
        return F.normalize(self.head(pooled), dim=-1)


def image_tower_config(img: ImageConfig) -> TowerConfig:
    return TowerConfig(patch_dim=img.patch_dim, max_patches=img.n_patches, pool="cls")


def audio_tower_config(aud: AudioConfig) -> TowerConfig:
    return TowerConfig(patch_dim=aud.patch_dim, max_patches=aud.max_patches, pool="mean")


@dataclass
class TowersCheckpoint:
    image_cfg: ImageConfig
    audio_cfg: AudioConfig
    image: PatchTower
    audio: PatchTower
    meta: dict  # text model it was aligned to, training data, evaluation, seeds

    def save(self, path: Path) -> str:
        """Write the three files; weights in fp16 (they are small, and inference
        runs them in fp32). Returns the sha256 of the safetensors file."""
        path.mkdir(parents=True, exist_ok=True)
        sd = {f"image.{k}": v.detach().half().contiguous() for k, v in
              self.image.state_dict().items()}
        sd |= {f"audio.{k}": v.detach().half().contiguous() for k, v in
               self.audio.state_dict().items()}
        save_file(sd, str(path / "towers.safetensors"))
        digest = sha256_file(path / "towers.safetensors")
        cfg = {
            "format": "mmq-towers/1",
            "image": {"front_end": asdict(self.image_cfg), "tower": _tower_dict(self.image.cfg)},
            "audio": {"front_end": asdict(self.audio_cfg), "tower": _tower_dict(self.audio.cfg)},
            "meta": self.meta,
        }
        (path / "towers.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (path / "towers.sha256").write_text(f"{digest}  towers.safetensors\n")
        return digest

    @classmethod
    def load(cls, path: Path) -> TowersCheckpoint:
        cfg = json.loads((path / "towers.json").read_text())
        if cfg.get("format") != "mmq-towers/1":
            raise ValueError(f"{path}/towers.json: unknown format {cfg.get('format')!r}")
        want = (path / "towers.sha256").read_text().split()[0]
        got = sha256_file(path / "towers.safetensors")
        if want != got:
            raise ValueError(f"{path}/towers.safetensors: sha256 {got} does not match "
                             f"towers.sha256 ({want}); the file is corrupt or was replaced")
        sd = load_file(str(path / "towers.safetensors"))
        towers = {}
        for name in ("image", "audio"):
            tower = PatchTower(_tower_from_dict(cfg[name]["tower"]))
            own = {k.split(".", 1)[1]: v.float() for k, v in sd.items() if k.startswith(name)}
            tower.load_state_dict(own)
            towers[name] = tower.eval()
        return cls(ImageConfig(**cfg["image"]["front_end"]),
                   AudioConfig(**cfg["audio"]["front_end"]),
                   towers["image"], towers["audio"], cfg.get("meta", {}))


def _tower_dict(cfg: TowerConfig) -> dict:
    return asdict(cfg)


def _tower_from_dict(d: dict) -> TowerConfig:
    return TowerConfig(**{**d, "encoder": EncoderConfig(**d["encoder"])})
