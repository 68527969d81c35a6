"""Whisper tiny.en's tokenizer (``tokenizers``, from the bundled tokenizer.json) and the
special tokens and suppression lists faster-whisper decodes with."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer


class WhisperTokens:
    def __init__(self, model_dir: Path):
        self.tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        # suppress_blank: at the first generated step, " " (220) and <|endoftext|>.
        self.suppress_begin: tuple[int, ...] = tuple(cfg["suppress_ids_begin"])

    def id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token} is not in Whisper's vocabulary")
        return i

    @cached_property
    def eot(self) -> int:
        return self.id("<|endoftext|>")

    @cached_property
    def sot(self) -> int:
        return self.id("<|startoftranscript|>")

    @cached_property
    def no_timestamps(self) -> int:
        return self.id("<|notimestamps|>")

    @cached_property
    def no_speech(self) -> int:
        i = self.tok.token_to_id("<|nospeech|>")
        return i if i is not None else self.id("<|nocaptions|>")

    @property
    def prompt(self) -> list[int]:
        """English-only model, no timestamps, no previous text: [sot, notimestamps]."""
        return [self.sot, self.no_timestamps]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.eot])

    @cached_property
    def suppress(self) -> tuple[int, ...]:
        """faster-whisper's ``suppress_tokens=[-1]``: symbols that are never speech (speaker
        tags, music notes, brackets), plus the task and start tokens. Hyphen and
        apostrophe stay allowed inside words, so only their word-initial forms go."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        notes = set("♩♪♫♬♭♮♯")  # multi-token symbols: their shared first token is enough
        out = {self.encode(" -")[0], self.encode(" '")[0]}
        for s in symbols + sorted(notes):
            for ids in (self.encode(s), self.encode(" " + s)):
                if len(ids) == 1 or s in notes:
                    out.add(ids[0])
        for t in ("<|transcribe|>", "<|translate|>", "<|startoftranscript|>",
                  "<|startofprev|>", "<|startoflm|>"):
            out.add(self.id(t))
        out.add(self.no_speech)
        return tuple(sorted(out))
