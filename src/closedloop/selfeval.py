"""Step self-evaluation C(s) (SPEC §1), shared by MCTS (§2) and beam search.

C(s^t) = P_LM(option "correct" | eval prompt, question, s^{1:t}). The evaluation prompt
is a follow-up turn in the policy's own conversation: after the partial solution
(question + steps so far, exactly as the policy saw and wrote them) the user asks
whether the newest step is correct, with options (A) correct / (B) incorrect, and the
assistant turn starts "The newest step is (". C is the softmax over the two option
tokens at that position, read from one forward pass's logits (no sampling).

Because the evaluation turn is a suffix of the policy's context, MCTS computes C for a
freshly generated step by continuing the generation's KV cache with the suffix
(:func:`continue_confidence`) instead of re-reading the whole prompt. The reference
code's hinted prompt (gold solution shown to the evaluator) is an option, off by
default; it changes the suffix per question, so it takes the full-prompt path.
"""

from __future__ import annotations

import torch

OPTIONS = ("A", "B")  # (A) correct, (B) incorrect
QUESTION = "Is the newest step of your solution correct?\n(A) correct\n(B) incorrect"
ANSWER_PREFIX = "The newest step is ("
_MARK = "\x00PARTIAL\x00"


def eval_suffix(tokenizer, hint: list[str] | None = None) -> str:
    """The text that turns a policy context (prompt + steps) into the evaluation prompt."""
    question = QUESTION if not hint else "Reference solution:\n" + "\n".join(hint) + "\n\n" + QUESTION
    if not tokenizer.chat_template:
        return f"\n\n{question}\nAnswer: {ANSWER_PREFIX}"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK},
         {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True)
    return rendered[rendered.index(_MARK) + len(_MARK):] + ANSWER_PREFIX


def option_token_ids(tokenizer) -> list[int]:
    """The token id of each option letter as it follows ``(``; each must be one token."""
    base = tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in OPTIONS:
        pieces = tokenizer(ANSWER_PREFIX + letter, add_special_tokens=False)["input_ids"]
        if pieces[: len(base)] != base or len(pieces) != len(base) + 1:
            raise ValueError(f"self-evaluation: option {letter!r} is not a single token after {ANSWER_PREFIX!r}")
        ids.append(pieces[-1])
    return ids


def _option_probability(logits: torch.Tensor, option_ids: list[int]) -> list[float]:
    """Softmax over the option tokens' logits; the probability of option (A)."""
    chosen = logits[:, torch.tensor(option_ids, device=logits.device)].float()
    return torch.softmax(chosen, dim=-1)[:, 0].tolist()


@torch.inference_mode()
def confidence_from_ids(model, tokenizer, id_lists: list[list[int]], batch_size: int = 32) -> list[float]:
    """C for each tokenised evaluation prompt (left-padded batches, last position)."""
    option_ids = option_token_ids(tokenizer)
    pad = tokenizer.pad_token_id
    out: list[float] = []
    for start in range(0, len(id_lists), batch_size):
        chunk = id_lists[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=model.device)
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, :]
        out += _option_probability(logits, option_ids)
    return out


def self_evaluate(model, tokenizer, contexts: list[str], hints: list[list[str] | None] | None = None,
                  batch_size: int = 32) -> list[float]:
    """C(s) for each policy context (chat prompt + steps, newest step last)."""
    hints = hints or [None] * len(contexts)
    texts = [ctx + eval_suffix(tokenizer, hint) for ctx, hint in zip(contexts, hints, strict=True)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return confidence_from_ids(model, tokenizer, ids, batch_size)


@torch.inference_mode()
def continue_confidence(model, tokenizer, sequences: torch.Tensor, cache, attention_mask: torch.Tensor,
                        kept: torch.Tensor) -> list[float]:
    """C for every row of a finished ``generate`` call, reusing its KV cache.

    ``sequences`` [B, P+T] are generate's outputs (prompt of width P, left padded, whose
    mask is ``attention_mask``), ``cache`` its past_key_values (covering all but the
    last token), ``kept`` [B] how many generated tokens form each row's step. Tokens
    after a row's step are masked out, so each row is scored exactly as if its
    evaluation prompt had been read from scratch.
    """
    option_ids = option_token_ids(tokenizer)
    suffix = tokenizer(eval_suffix(tokenizer), add_special_tokens=False, return_tensors="pt")["input_ids"]
    batch, total = sequences.shape
    n_new = total - attention_mask.shape[1]
    positions = torch.arange(n_new, device=sequences.device).unsqueeze(0)
    generated_mask = (positions < kept.unsqueeze(1)).long()
    suffix = suffix.to(sequences.device).expand(batch, -1)
    full_mask = torch.cat([attention_mask, generated_mask, torch.ones_like(suffix)], dim=1)
    position_ids = (full_mask.cumsum(dim=1) - 1).clamp(min=0)[:, total - 1:]
    logits = model(input_ids=torch.cat([sequences[:, -1:], suffix], dim=1), attention_mask=full_mask,
                   position_ids=position_ids, past_key_values=cache, logits_to_keep=1).logits[:, -1, :]
    return _option_probability(logits, option_ids)
