"""Seeded multi-step arithmetic word problems with step-by-step gold solutions.

The default training task: every problem is a short story of ``n`` quantity changes;
the gold solution has one line per change and ends with ``The answer is N.``, so
answers are verifiable and every step is checkable (what MCTS and self-evaluation
need). Difficulty is set by :class:`closedloop.config.SyntheticTaskConfig`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jon",
         "Kira", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "shells", "pencils", "cards",
         "stamps", "cookies", "beads", "feathers")


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[str, ...]
    answer: int


def _step(rng: random.Random, name: str, item: str, value: int, max_operand: int):
    """One quantity change: (story sentence, solution line, new value)."""
    ops = ["add"]
    if value > 1:
        ops.append("sub")
    if value * 2 <= 999:
        ops.append("mul")
    divisors = [d for d in range(2, max_operand + 1) if value % d == 0 and value // d >= 1]
    if divisors:
        ops.append("div")
    op = rng.choice(ops)
    if op == "add":
        x = rng.randint(1, max_operand)
        new = value + x
        return (f"{name} finds {x} more {item}.", f"{name} finds {x} more, so {value} + {x} = {new}.", new)
    if op == "sub":
        x = rng.randint(1, min(max_operand, value - 1))
        new = value - x
        return (f"{name} gives away {x} {item}.", f"{name} gives away {x}, so {value} - {x} = {new}.", new)
    if op == "mul":
        x = rng.randint(2, max(2, min(max_operand, 999 // value)))
        new = value * x
        return (f"Then the number of {item} {name} has becomes {x} times as large.",
                f"The amount becomes {x} times as large, so {value} * {x} = {new}.", new)
    x = rng.choice(divisors)
    new = value // x
    return (f"{name} splits the {item} into {x} equal groups and keeps one group.",
            f"{name} keeps one of {x} equal groups, so {value} / {x} = {new}.", new)


def make_problem(rng: random.Random, min_steps: int, max_steps: int, max_start: int, max_operand: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, max(2, max_start))
    story = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        sentence, line, value = _step(rng, name, item, value, max_operand)
        story.append(sentence)
        steps.append(line)
    story.append(f"How many {item} does {name} have now?")
    steps.append(f"The answer is {value}.")
    return Problem(" ".join(story), tuple(steps), value)


def generate(seed: str, n: int, min_steps: int, max_steps: int, max_start: int, max_operand: int) -> list[dict]:
    """``n`` distinct problems (by question text) as task rows, reproducible from ``seed``."""
    if min_steps < 1 or max_steps < min_steps:
        raise ValueError(f"synthetic: need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    rng = random.Random(seed)
    rows, seen, attempts = [], set(), 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"synthetic: could not make {n} distinct problems; raise max_start or max_operand")
        problem = make_problem(rng, min_steps, max_steps, max_start, max_operand)
        if problem.question in seen:
            continue
        seen.add(problem.question)
        digest = hashlib.sha1(problem.question.encode()).hexdigest()[:12]
        rows.append({
            "id": f"synthetic-{digest}",
            "question": problem.question,
            "answer": str(problem.answer),
            "solution_steps": list(problem.steps),
            "choices": None,
        })
    return rows
