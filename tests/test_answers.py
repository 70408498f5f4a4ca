"""Answer extraction and matching on tricky strings (SPEC §7)."""

from fractions import Fraction

import pytest

from closedloop import answers

NUM = {"answer": "0", "choices": None}


@pytest.mark.parametrize("text,expected", [
    ("1,234", Fraction(1234)),
    ("$1,234.50", Fraction(123450, 100)),
    ("42.", Fraction(42)),
    ("-17", Fraction(-17)),
    ("3/4", Fraction(3, 4)),
    ("-3 / 4", Fraction(-3, 4)),
    ("0.75", Fraction(3, 4)),
    ("12%", Fraction(12)),
    ("\\frac{1}{2}", Fraction(1, 2)),
    ("\\dfrac{-5}{3}", Fraction(-5, 3)),
    ("abc", None),
    ("1/0", None),
])
def test_parse_number(text, expected):
    assert answers.parse_number(text) == expected


@pytest.mark.parametrize("completion,expected", [
    ("She has 3 + 4 = 7.\nThe answer is 7.", "7"),
    ("Total: 1,200 + 34 = 1,234\nThe answer is $1,234.", "$1,234"),
    ("The answer is -5.", "-5"),
    ("It drops to -12 degrees", "-12"),
    ("So she gets 3/4 of the pie. The answer is 3/4.", "3/4"),
    ("The answer is 2. Wait, 5 + 2 = 7. Final answer: 7", "7"),
    ("no digits here", None),
    ("He pays $.50 each", "$.50"),
    ("The answer is 10 - 3 = 7.", "7"),  # the result, not the first operand
    ("The answer is 2 * 1.5 = 3.0 apples.", "3.0"),
    ("3 + 4 = 7 apples.\n#### 7", "7"),  # GSM8K's answer line
    ("12 * 100 = 1,200 eggs.\n#### 1,200\nThe answer is 5.", "1,200"),  # #### wins over "answer is"
    ("#### -5", "-5"),
])
def test_extract_number(completion, expected):
    assert answers.extract_number(completion) == expected


@pytest.mark.parametrize("prediction,gold,ok", [
    ("$1,234", "1234", True),
    ("1234.0", "1234", True),
    ("3/4", "0.75", True),
    ("-5", "5", False),
    ("7.", "7", True),
    (None, "7", False),
    ("\\frac{\\pi}{2}", "\\dfrac{\\pi}{2}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
])
def test_numeric_match(prediction, gold, ok):
    assert answers.numeric_match(prediction, gold) is ok


@pytest.mark.parametrize("completion,expected", [
    ("The answer is (B).", "B"),
    ("B", "B"),
    ("(C) Change the height of the ramp.", "C"),
    ("Answer: d", "D"),
    ("the answer is option A", "A"),
    ("I think (E) is wrong, so The answer is (A).", "A"),
    ("A good choice is hard. The answer is (B).", "B"),
    ("The answer is (F).", None),  # only four options
    ("I do not know.", None),
])
def test_extract_letter(completion, expected):
    assert answers.extract_letter(completion, 4 if "(F)" in completion else 5 if "(E)" in completion else 4) == expected


def test_extract_dispatches_on_task_type():
    mc = {"answer": "B", "choices": ["x", "y", "z", "w"]}
    assert answers.is_correct(answers.extract("The answer is (B).", mc), mc)
    assert not answers.is_correct(answers.extract("The answer is (C).", mc), mc)
    assert answers.is_correct(answers.extract("The answer is 1,000.", {"answer": "1000", "choices": None}),
                              {"answer": "1000", "choices": None})
    latex = {"answer": "\\frac{\\pi}{2}", "choices": None}
    assert answers.is_correct(answers.extract("so $\\boxed{\\dfrac{\\pi}{2}}$.", latex), latex)
