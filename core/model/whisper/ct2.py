"""Reader of CTranslate2's ``model.bin`` (binary version 6), written from the format.

Layout (little-endian, as ctranslate2/specs/model_spec.py ``_serialize`` writes it):

    u32 version (6) | str spec name ("WhisperSpec") | u32 spec revision | u32 n_variables
    n_variables x [ str name | u8 rank | rank x u32 dims | u8 dtype id | u32 n_bytes | bytes ]
    u32 n_aliases | n_aliases x [ str alias | str target ]

where ``str`` is u16 length (including a trailing NUL) + UTF-8 bytes + NUL, and dtype ids
are, in order, float32, int8, int16, int32, float16, bfloat16. Aliases name variables that
CTranslate2 de-duplicated (Whisper's output projection is the token embedding).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BINARY_VERSION = 6
# bfloat16 has no numpy dtype: read as raw int16 words and reinterpreted through torch.
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NP = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32,
       "float16": np.float16, "bfloat16": np.int16}


@dataclass
class Ct2Model:
    spec: str  # "WhisperSpec"
    revision: int
    variables: dict[str, torch.Tensor]  # name -> tensor in its stored dtype
    aliases: dict[str, str]  # alias -> target variable name

    def get(self, name: str) -> torch.Tensor:
        return self.variables[self.aliases.get(name, name)]


class _Cursor:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError(f"model.bin truncated: wanted {n} bytes at offset {self.pos}, "
                             f"file has {len(self.buf)}")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        n = self.unpack("H")
        raw = self.take(n)
        if n < 1 or raw[-1] != 0:
            raise ValueError(f"model.bin: malformed string at offset {self.pos - n}")
        return raw[:-1].decode("utf-8")


def read_model_bin(path: Path) -> Ct2Model:
    """Parse the whole file; raises ValueError on anything not in the format above."""
    cur = _Cursor(Path(path).read_bytes())
    version = cur.unpack("I")
    if version != BINARY_VERSION:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, expected "
                         f"{BINARY_VERSION}")
    spec, revision = cur.string(), cur.unpack("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(cur.unpack("I")):
        name = cur.string()
        shape = [cur.unpack("I") for _ in range(cur.unpack("B"))]
        dtype = _DTYPES[cur.unpack("B")]
        raw = cur.take(cur.unpack("I"))
        arr = np.frombuffer(raw, dtype=_NP[dtype]).reshape(shape)
        t = torch.from_numpy(arr.copy())
        variables[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    aliases = {}
    for _ in range(cur.unpack("I")):
        alias = cur.string()
        aliases[alias] = cur.string()
    if cur.pos != len(cur.buf):
        raise ValueError(f"{path}: {len(cur.buf) - cur.pos} trailing bytes after the aliases")
    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"{path}: alias {alias} -> unknown variable {target}")
    return Ct2Model(spec, revision, variables, aliases)
