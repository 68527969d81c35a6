"""Input checks shared by producers and the model's front ends (core/inputs.py): what
counts as no text at all. Audio: tests/core/test_audio_input.py."""

import unicodedata

import pytest

from core.errors import InvalidInput
from core.inputs import validate_text

# Text a reader sees nothing of: zero-width and format characters, alone or among
# whitespace. Each was accepted and embedded as an empty string ([CLS] [SEP]).
INVISIBLE = {
    "zero width space": "\u200b",
    "byte order mark": "\ufeff",
    "ZWNJ and ZWJ": "\u200c\u200d",
    "word joiner": "\u2060",
    "all of them among whitespace": " \u200b\n\ufeff\t\u200c \u200d\u2060 ",
    "a BOM before a newline, as a file may start": "\ufeff\n",
    "soft hyphen and direction marks": "\u00ad\u200e\u202e",
    "hangul filler and a variation selector": "\u3164\ufe0f",
    "control characters": "\x01\x1b",
}


@pytest.mark.parametrize("text", list(INVISIBLE.values()), ids=list(INVISIBLE))
def test_text_with_nothing_visible_is_refused_as_blank(text):
    with pytest.raises(InvalidInput) as e:
        validate_text(text, 1000, index=3)
    assert e.value.kind == InvalidInput.INVALID and e.value.index == 3
    msg = str(e.value)
    assert msg.startswith("item 3: text is empty") and "no visible characters" in msg
    assert "U+" in msg  # names what it found: the characters themselves do not show
    assert not any(ch in msg for ch in text if not ch.isascii() or not ch.isprintable())


def test_bytes_with_nothing_visible_are_refused_too():
    with pytest.raises(InvalidInput, match="no visible characters"):
        validate_text("\ufeff\u200b".encode(), 1000)


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_and_whitespace_keep_their_message(text):
    with pytest.raises(InvalidInput, match="^text is empty or only whitespace$"):
        validate_text(text, 1000)


@pytest.mark.parametrize("text", [
    "a\u200bb",  # a zero-width space inside a word
    "\ufeffhello",  # a BOM before real text
    "\u200d\U0001f468\u200d\U0001f469",  # an emoji joined by ZWJ
    "\u0627\u200c\u0628",  # ZWNJ between Arabic letters, as Persian writes
    "\u2800",  # braille blank: a printed character, not a format one
])
def test_invisible_characters_among_visible_ones_are_kept(text):
    assert validate_text(text, 1000) == text



# Combining marks (categories Mn, Me) with no base character: the tokenizer strips
# accents, so each was accepted and embedded as an empty string, as zero-width text was.
MARKS_ONLY = {
    "two acute accents": "\u0301\u0301",
    "an enclosing circle": "\u20dd",
    "a Devanagari virama and vowel sign": "\u094d\u0947",
    "Arabic harakat": "\u064e\u0652\u064b",
    "accents among whitespace and zero-width characters": " \u0301\u200b\u0308\n",
    "an accent on a space": " \u0301",
}
# Real scripts write combining marks on every other letter: all of them are text.
WITH_MARKS = {
    "e and a combining acute": "e\u0301",
    "an accent before its letter": "\u0301a",
    "Hindi": "\u0928\u092e\u0938\u094d\u0924\u0947",  # namaste: virama, vowel sign
    "Thai": "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",  # sawasdee
    "Arabic with harakat": "\u0645\u064e\u0631\u0652\u062d\u064e\u0628\u064b\u0627",
    "Vietnamese in NFD": unicodedata.normalize("NFD", "Ti\u1ebfng Vi\u1ec7t"),
    "a keycap": "1\ufe0f\u20e3",
}


@pytest.mark.parametrize("text", list(MARKS_ONLY.values()), ids=list(MARKS_ONLY))
def test_text_of_combining_marks_only_is_refused_as_blank(text):
    with pytest.raises(InvalidInput) as e:
        validate_text(text, 1000, index=1)
    msg = str(e.value)
    assert msg.startswith("item 1: text is empty") and "combining mark" in msg, msg
    first = next(ch for ch in text if unicodedata.category(ch) in ("Mn", "Me"))
    assert f"U+{ord(first):04X} {unicodedata.name(first)}" in msg, msg
    assert not any(ch in msg for ch in text if not ch.isascii() or not ch.isprintable())


@pytest.mark.parametrize("text", list(WITH_MARKS.values()), ids=list(WITH_MARKS))
def test_text_with_a_base_character_under_its_marks_is_kept(text):
    assert validate_text(text, 1000) == text
