"""Counterfactual term swaps: exact on hand-made sentences."""

from __future__ import annotations

import pytest

from tuneforge.fairness.terms import detect_group, group_counts, load_lexicons, read_lexicon, swap_terms


@pytest.fixture(scope="module")
def gender():
    return load_lexicons()["gender"]


@pytest.mark.parametrize("text, expected, swaps", [
    ("He gave her his book.", "She gave him her book.", 3),
    ("She told him that Mary was her sister.", "He told her that James was his brother.", 5),
    ("I saw her.", "I saw him.", 1),
    ("The book is his.", "The book is hers.", 1),
    ("Her dad is a king.", "His mom is a queen.", 3),
    ("HE said Mr. Jones", "SHE said Mrs. Jones", 2),
    ("Theme: shepherd, hemline, mankind", "Theme: shepherd, hemline, mankind", 0),  # whole words only
])
def test_swap_is_exact(gender, text, expected, swaps):
    assert swap_terms(text, gender) == (expected, swaps)


def test_swap_is_simultaneous_and_reversible_on_simple_pairs(gender):
    text = "he and she, his brother and his sister"
    once, _ = swap_terms(text, gender)
    assert once == "she and he, her sister and her brother"


def test_detect_group(gender):
    assert detect_group("My brother called.", gender) == "male"
    assert detect_group("My sister called.", gender) == "female"
    assert detect_group("He called his aunt.", gender) == "mixed"
    assert detect_group("The weather is fine.", gender) is None
    assert group_counts("he he she", gender) == {"male": 2, "female": 1}


def test_user_lexicon_and_errors(tmp_path):
    path = tmp_path / "age.yaml"
    path.write_text("name: age\ngroups: [young, old]\npairs:\n  - [young, old]\n  - [youth, elder]\n")
    lex = load_lexicons([str(path)])["age"]
    assert swap_terms("The young met an elder.", lex) == ("The old met an youth.", 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngroups: [a]\npairs:\n  - [only]\n")
    with pytest.raises(ValueError) as err:
        read_lexicon(bad)
    assert str(bad) in str(err.value) and "exactly two" in str(err.value) and "pairs[0]" in str(err.value)
