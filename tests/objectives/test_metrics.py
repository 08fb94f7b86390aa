"""Metrics against hand-computed values, including the edge cases a search runs into."""

import math

import pytest

from evomerge.objectives import (
    answer_cross_entropy,
    choice_score,
    contains,
    exact_match,
    extract_answer,
    load_custom_metric,
    perplexity,
    predict_choice,
)


@pytest.mark.parametrize(
    ("text", "mode", "pattern", "expected"),
    [
        ("  olleh \n", "strip", None, "olleh"),
        ("abc\nmore text", "first_line", None, "abc"),
        ("\n  abc  \nx", "first_line", None, "abc"),
        ("so 3 apples and 1,234 pears", "last_number", None, "1234"),
        ("answer: -7.5", "last_number", None, "-7.5"),
        ("no digits here", "last_number", None, None),
        ("", "last_number", None, None),
        ("The answer is (B).", "regex", r"\(([A-D])\)", "B"),
        ("no match", "regex", r"\(([A-D])\)", None),
        ("x=42", "regex", r"\d+", "42"),
        ("", "strip", None, ""),
    ],
)
def test_extract_answer(text, mode, pattern, expected):
    assert extract_answer(text, mode, pattern) == expected


def test_extract_regex_needs_pattern():
    with pytest.raises(ValueError, match="pattern"):
        extract_answer("x", "regex")


def test_exact_match():
    assert exact_match("olleh", "olleh") == 1.0
    assert exact_match(" olleh\n", "olleh") == 1.0
    assert exact_match("olle", "olleh") == 0.0
    assert exact_match("", "olleh") == 0.0  # empty generation
    assert exact_match("", "") == 1.0  # an empty target is matched by an empty generation only
    assert exact_match("The total is 1,234.", "#### 1234", "last_number") == 1.0
    assert exact_match("no number at all", "#### 12", "last_number") == 0.0
    assert exact_match("12\nextra", "12", "first_line") == 1.0
    assert exact_match("12\nextra", "12", "strip") == 0.0


def test_contains():
    assert contains("the answer is 42.", "42") == 1.0
    assert contains("the answer is 4", "42") == 0.0
    assert contains("", "42") == 0.0
    assert contains("anything", "  ") == 0.0  # an empty target never counts


def test_choice_score_and_prediction():
    assert choice_score([-1.0, -2.0]) == -3.0
    assert choice_score([-1.0, -2.0], "mean") == -1.5
    # sum prefers the short choice, mean the long one with better per-token likelihood
    short, long = [-2.0], [-1.0, -1.5]
    assert predict_choice([choice_score(short), choice_score(long)]) == 0
    assert predict_choice([choice_score(short, "mean"), choice_score(long, "mean")]) == 1
    with pytest.raises(ValueError):
        choice_score([])


def test_predict_choice_ties_go_to_lowest_index():
    assert predict_choice([-1.0, -1.0, -1.0]) == 0
    assert predict_choice([-3.0, -1.0, -1.0]) == 1
    assert predict_choice([-1.0]) == 0


def test_answer_cross_entropy_is_token_weighted():
    # item 1: two tokens with log p = ln 0.5 each; item 2: one token with log p = ln 0.25
    lp = [[math.log(0.5), math.log(0.5)], [math.log(0.25)]]
    expected = -(2 * math.log(0.5) + math.log(0.25)) / 3
    assert answer_cross_entropy(lp) == pytest.approx(expected)
    assert answer_cross_entropy([[], [math.log(0.5)]]) == pytest.approx(math.log(2))
    assert math.isnan(answer_cross_entropy([[], []]))


def test_perplexity():
    # uniform over 4 tokens -> perplexity 4
    assert perplexity([[math.log(0.25)] * 3, [math.log(0.25)]]) == pytest.approx(4.0)
    assert perplexity([[0.0]]) == 1.0
    assert math.isnan(perplexity([]))


def test_custom_metric_import():
    func = load_custom_metric("operator:eq")
    assert float(func("abc", "abc")) == 1.0 and float(func("abc", "abd")) == 0.0
    with pytest.raises(ValueError, match="package.module:function"):
        load_custom_metric("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_custom_metric("operator:no_such_function")
    with pytest.raises(ValueError, match="cannot import"):
        load_custom_metric("no_such_module_xyz:f")
