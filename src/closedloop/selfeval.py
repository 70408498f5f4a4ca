"""Step self-evaluation C(s) (SPEC §1), shared by MCTS (§2) and beam search.

C(s^t) = P_LM(option "correct" | eval prompt, question, s^{1:t}): the policy is asked
whether the newest step is correct, with options (A) correct / (B) incorrect, and C is
the softmax over the two option tokens at the first answer position, read from one
forward pass's logits (no sampling). The reference code's hinted prompt (the gold
solution shown to the evaluator) is an option, off by default.
"""

from __future__ import annotations

import torch

OPTIONS = ("A", "B")  # (A) correct, (B) incorrect
ANSWER_PREFIX = "The newest step is ("


def eval_message(question: str, steps: list[str], hint: list[str] | None = None) -> str:
    """The evaluation prompt's user turn for the newest of ``steps``."""
    previous = "\n".join(steps[:-1]) or "(none)"
    text = (f"Question: {question}\n"
            f"Steps so far:\n{previous}\n"
            f"Newest step: {steps[-1]}\n")
    if hint:
        text += "Reference solution:\n" + "\n".join(hint) + "\n"
    return text + "Is the newest step correct?\n(A) correct\n(B) incorrect"


def eval_prompt(tokenizer, question: str, steps: list[str], hint: list[str] | None = None) -> str:
    message = eval_message(question, steps, hint)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"{message}\nAnswer: "
    return text + ANSWER_PREFIX


def option_token_ids(tokenizer) -> list[int]:
    """The token id of each option letter as it follows ``(``; each must be one token."""
    ids = []
    for letter in OPTIONS:
        pieces = tokenizer(ANSWER_PREFIX + letter, add_special_tokens=False)["input_ids"]
        base = tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        if pieces[: len(base)] != base or len(pieces) != len(base) + 1:
            raise ValueError(f"self-evaluation: option {letter!r} is not a single token after {ANSWER_PREFIX!r}")
        ids.append(pieces[-1])
    return ids


@torch.inference_mode()
def confidence(model, tokenizer, prompts: list[str], batch_size: int = 32) -> list[float]:
    """C for each evaluation prompt: p(A) / (p(A) + p(B)) at the last position."""
    option_ids = torch.tensor(option_token_ids(tokenizer))
    tokenizer.padding_side = "left"
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        logits = model(**enc, logits_to_keep=1).logits[:, -1, :].float()
        probs = torch.softmax(logits[:, option_ids.to(logits.device)], dim=-1)
        out.extend(probs[:, 0].tolist())
    return out


def self_evaluate(model, tokenizer, items: list[tuple[str, list[str], list[str] | None]],
                  batch_size: int = 32) -> list[float]:
    """C(s) for each (question, steps, hint-or-None)."""
    prompts = [eval_prompt(tokenizer, q, steps, hint) for q, steps, hint in items]
    return confidence(model, tokenizer, prompts, batch_size)
