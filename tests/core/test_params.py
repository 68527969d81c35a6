"""Job parameters: labels are compared as Unicode text, not as code points."""

import unicodedata

import pytest

from core.errors import InvalidInput
from core.params import check_labels

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def test_labels_equal_after_nfc_normalisation_are_one_label():
    """"café" typed as one code point and as "e" + a combining accent were two labels."""
    assert NFC != NFD
    with pytest.raises(InvalidInput, match="distinct"):
        check_labels([NFC, NFD])
    with pytest.raises(InvalidInput, match="distinct"):
        check_labels([NFD, f" {NFC} "])


def test_labels_come_back_in_nfc():
    assert check_labels([NFD, "tea"]) == [NFC, "tea"]
    assert check_labels([" \u2126 "]) == ["\u03a9"]  # U+2126 OHM SIGN is U+03A9 in NFC
