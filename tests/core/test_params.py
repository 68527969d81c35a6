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


@pytest.mark.parametrize("label", ["\u200b", "\ufeff", " \u200c\u200d ", "\u2060", "\u3164"])
def test_a_label_with_nothing_visible_is_refused(label):
    """Each label is a text the model embeds: one of only zero-width characters was
    embedded as an empty string and scored against the input like any other."""
    with pytest.raises(InvalidInput, match="no visible characters"):
        check_labels(["cat", label])


def test_invisible_characters_among_visible_ones_are_kept_in_a_label():
    assert check_labels(["ice\u200bcream", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"]) \
        == ["ice\u200bcream", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"]


@pytest.mark.parametrize("label", ["\u0301", "\u0301\u0308", " \u200b\u0301 ", "\u20dd"])
def test_a_label_of_combining_marks_only_is_refused(label):
    """Embedded as an empty string, like a label of zero-width characters."""
    with pytest.raises(InvalidInput, match="no visible characters.*combining mark"):
        check_labels(["cat", label])


def test_labels_whose_letters_carry_marks_are_kept():
    hindi, thai = "\u0928\u092e\u0938\u094d\u0924\u0947", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35"
    assert check_labels([NFD, hindi, thai]) == [NFC, hindi, thai]
