"""Batched generation with left padding, length-sorted batches and a progress bar."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1, desc: str = "generate") -> tuple[list[list[str]], int]:
    """Completions per prompt (``num_return_sequences`` each) and the generated-token count.

    Prompts are sorted by length so a batch carries little padding; results come back
    in the input order.
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
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                pad_token_id=pad_id, **sampling,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        n_tokens += int(_generated_lengths(new, tokenizer).sum())
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for j, i in enumerate(idx):
            results[i] = [t.strip() for t in texts[j * num_return_sequences:(j + 1) * num_return_sequences]]
    return results, n_tokens


def _generated_lengths(new: torch.Tensor, tokenizer) -> torch.Tensor:
    """Tokens generated per row, up to and including the first end-of-sequence token."""
    eos = tokenizer.eos_token_id
    is_end = new == eos
    first = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1) + 1, torch.full((new.shape[0],), new.shape[1]))
    return first
