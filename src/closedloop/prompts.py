"""How a task row is shown to the policy, for training and evaluation alike.

The user turn holds the question (and lettered options for multiple choice) plus a
one-line instruction; the assistant turn is the step-by-step solution, one step per
line, ending in ``The answer is ...``. Prompts go through the tokenizer's chat
template; a tokenizer without one gets a plain ``Question:/Answer:`` layout.
"""

from __future__ import annotations

from closedloop.tasks import LETTERS

STEPS_INSTRUCTION = "Solve it step by step, one step per line. End with: The answer is <number>."
MC_INSTRUCTION = "Reply with the letter of the correct option, as: The answer is (X)."


def user_message(row: dict) -> str:
    if row.get("choices"):
        options = "\n".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(row["choices"]))
        return f"{row['question']}\n{options}\n{MC_INSTRUCTION}"
    return f"{row['question']}\n{STEPS_INSTRUCTION}"


def solution_text(row: dict) -> str:
    """The gold assistant turn: gold steps one per line (or just the answer line)."""
    if row.get("solution_steps"):
        return "\n".join(row["solution_steps"])
    if row.get("choices"):
        return f"The answer is ({row['answer']})."
    return f"The answer is {row['answer']}."


def chat_prompt(tokenizer, row: dict) -> str:
    """The generation prompt string for ``row`` (ends where the assistant starts)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(row)}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {user_message(row)}\nAnswer:\n"


def sft_example(row: dict) -> dict:
    """A conversational prompt-completion example for TRL (loss on the completion only)."""
    return {
        "prompt": [{"role": "user", "content": user_message(row)}],
        "completion": [{"role": "assistant", "content": solution_text(row)}],
    }
