"""Batched generation with left padding, length-sorted batches and a progress bar."""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

FINAL_ANSWER = re.compile(r"answer is[^\n]*?\d[^\n]*?(?:\.\s|\.$|\n)", re.IGNORECASE)


class FinalAnswerStop(StoppingCriteria):
    """Stop a row once its completion has stated ``The answer is <number>.`` (a line
    after the final answer cannot change what is extracted)."""

    def __init__(self, tokenizer, prompt_len: int, window: int = 24):
        self.tokenizer, self.prompt_len, self.window = tokenizer, prompt_len, window

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        tail = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([bool(FINAL_ANSWER.search(t)) for t in texts], device=input_ids.device)


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1, stop_at_answer: bool = False,
             desc: str = "generate") -> tuple[list[list[str]], int]:
    """Completions per prompt (``num_return_sequences`` each) and the generated-token count.

    Prompts are sorted by length so a batch carries little padding; results come back
    in the input order. ``stop_at_answer`` ends a row after its final-answer line.
    """
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[list[str]] = [[] for _ in prompts]
    n_tokens = 0
    pad_id = tokenizer.pad_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        stop = StoppingCriteriaList([FinalAnswerStop(tokenizer, enc["input_ids"].shape[1])] if stop_at_answer else [])
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                pad_token_id=pad_id, stopping_criteria=stop, **sampling,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        n_tokens += int(generated_lengths(new, tokenizer).sum())
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for j, i in enumerate(idx):
            results[i] = [t.strip() for t in texts[j * num_return_sequences:(j + 1) * num_return_sequences]]
    return results, n_tokens


def generated_lengths(new: torch.Tensor, tokenizer) -> torch.Tensor:
    """Tokens generated per row: up to and including the first EOS, padding left out."""
    is_end = new == tokenizer.eos_token_id
    up_to_end = (is_end.cumsum(dim=1) - is_end.int()) == 0
    return (up_to_end & ((new != tokenizer.pad_token_id) | is_end)).sum(dim=1)
