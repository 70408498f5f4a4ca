"""Answer extraction and matching (SPEC §7).

Numeric tasks: the final answer is the number after the last ``#### `` (GSM8K's answer
line), else the result of the last "answer is" sentence (the number after its last "=",
so "The answer is 10 - 3 = 7." gives 7; without "=" the first number after "answer is"),
else the last number in the text; normalised: thousands separators, currency, percent,
trailing period, negatives and fractions (``3/4`` equals ``0.75``). LaTeX answers
(MATH) fall back to a normalised string comparison. Multiple choice: the option
letter ("The answer is (B).", "B)", "Answer: b").
"""

from __future__ import annotations

import re
from fractions import Fraction

NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?%?|-?\$?\.\d+"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*", re.IGNORECASE)
_NUMBER = re.compile(NUMBER)
_HASHES = re.compile(r"####\s*(" + NUMBER + ")")


def parse_number(text: str) -> Fraction | None:
    """``"$1,234.50"`` → 1234.5; ``"-3/4"`` → -3/4; ``"12%"`` → 12; None if not a number."""
    text = text.strip().rstrip(".").replace("$", "").replace(",", "").replace("%", "").replace(" ", "")
    frac = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(\d+)\}", text)
    if frac:
        text = f"{frac.group(1)}/{frac.group(2)}"
    try:
        if "/" in text:
            num, den = text.split("/")
            return Fraction(int(num), int(den)) if int(den) else None
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(text: str) -> str | None:
    """The final numeric answer in a completion, as written (not yet normalised)."""
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    for marker in reversed(list(_ANSWER_IS.finditer(text))):
        line = text[marker.end():].split("\n", 1)[0]
        sentence = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0]  # "7." ends it; "1.5" does not
        if "=" in sentence:
            found = _NUMBER.search(sentence.rsplit("=", 1)[1])
            if found:
                return found.group(0).strip()
        found = _NUMBER.search(text, marker.end())
        if found:
            return found.group(0).strip()
    found = _NUMBER.findall(text)
    return found[-1].strip() if found else None


def _normalise_latex(text: str) -> str:
    text = text.strip().strip("$").rstrip(".")
    text = re.sub(r"\\(?:left|right|!|,|;|displaystyle)", "", text)
    text = text.replace("dfrac", "frac").replace("tfrac", "frac").replace("^\\circ", "")
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    return re.sub(r"\s+", "", text)


def extract_math(text: str) -> str | None:
    """``\\boxed{...}`` if present, else the text after "answer is", else the last number."""
    from closedloop.tasks import last_boxed

    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    markers = list(_ANSWER_IS.finditer(text))
    if markers:
        tail = text[markers[-1].end():].strip()
        return tail.splitlines()[0].rstrip(".") if tail else None
    return extract_number(text)


def numeric_match(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    a, b = parse_number(prediction), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    return _normalise_latex(prediction) == _normalise_latex(gold)


_LETTER_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)?\s*(?:option\s*)?\(?([A-J])\b\)?", re.IGNORECASE),
    re.compile(r"^\s*\(?([A-J])\)?(?:[.):\s]|$)"),
    re.compile(r"\(([A-J])\)"),
)


def extract_letter(text: str, n_choices: int) -> str | None:
    """The chosen option letter, or None. Case-insensitive only after "answer"."""
    valid = "ABCDEFGHIJ"[:n_choices]
    for pattern in _LETTER_PATTERNS:
        for match in pattern.finditer(text):
            letter = match.group(1).upper()
            if letter in valid:
                return letter
    return None


def extract(text: str, row: dict) -> str | None:
    """The answer a completion gives for task ``row``."""
    if row.get("choices"):
        return extract_letter(text, len(row["choices"]))
    if parse_number(row["answer"]) is None:
        return extract_math(text)
    return extract_number(text)


def is_correct(prediction: str | None, row: dict) -> bool:
    if row.get("choices"):
        return prediction is not None and prediction == row["answer"]
    return numeric_match(prediction, row["answer"])


def canonical(prediction: str | None) -> str | None:
    """A key under which equal answers compare equal ("1,234" and "1234.0"; LaTeX forms)."""
    if prediction is None:
        return None
    number = parse_number(prediction)
    return str(number) if number is not None else _normalise_latex(prediction)
