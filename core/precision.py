"""Precision modes of a tower, and how they show in model version strings (no torch).

A tower running in a reduced precision tags its part of ``MultimodalModel.version``
with ``/<mode>`` (``all-MiniLM-L6-v2@53aa51172d14/bf16``), so every stored result says
how it was computed. fp32 is the untagged form: versions recorded before precision
modes existed stay valid. The tag is not part of the embedding space: the same weights
in bf16 or int8 give vectors within cosine 0.999 of fp32 (tests/core/model/
test_precision.py), so search (core/search/engine.py) files them under the untagged
version and ranks them together.
"""

from __future__ import annotations

import re

PRECISIONS = ("fp32", "bf16", "int8")
SETTINGS = PRECISIONS + ("auto",)
# "/<mode>" at the end of one tower's part (before the next "+" or the end)
_TAG = re.compile("/(?:" + "|".join(PRECISIONS) + r")(?=\+|$)")


def check_precision(mode: str) -> str:
    if mode not in SETTINGS:
        raise ValueError(f"unknown precision {mode!r}; choose from {', '.join(SETTINGS)}")
    return mode


def tagged(version: str, mode: str) -> str:
    """``version`` as run in ``mode`` (a resolved mode, not "auto")."""
    if mode not in PRECISIONS:
        raise ValueError(f"precision {mode!r} is not a resolved mode {PRECISIONS}")
    return version if mode == "fp32" else f"{version}/{mode}"


def untagged(version: str) -> str:
    """A (possibly "+"-joined) version string without its towers' precision tags:
    the embedding space it belongs to."""
    return _TAG.sub("", version)
