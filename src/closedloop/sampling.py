"""Sampling one step (or one completion) per prompt with one ``generate`` call, with each
sample's summed log-prob under the policy and, optionally, its self-evaluation C(s) read by
continuing the same KV cache (SPEC §1). Self-evaluation guided beam search samples its
candidate steps this way; the MCTS search (:mod:`closedloop.loop.search`) has its own
continuous-batching decode loop (:mod:`closedloop.decode`) and shares :class:`Sample`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from closedloop import selfeval
from closedloop.prefix_cache import PrefixMismatch, QuestionCache


class LogprobRecorder(LogitsProcessor):
    """Records log p(token) of each sampled token from the raw logits generate sees.

    Placed among the custom processors, it runs before temperature/top-p warping, so
    the log-probs are the policy's own. At step t it gathers the log-prob of the token
    chosen at step t−1 (now the last input id); :meth:`finish` gathers the last one.
    """

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        """[batch, new_tokens] log-probs of the generated tokens."""
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))
        return torch.stack(self.logprobs, dim=1)


class LineStop(StoppingCriteria):
    """Stop a row once it has produced a non-empty line (one step = one line)."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([bool(re.search(r"\S[^\n]*\n", t)) for t in texts], device=input_ids.device)


@dataclass
class Sample:
    text: str
    sum_logprob: float
    n_tokens: int
    ended: bool  # the policy ended the solution (EOS) rather than a line
    token_ids: tuple[int, ...] = ()
    confidence: float | None = None  # C(s) of the step, when scored from the generation's KV cache


def sample_continuations(model, tokenizer, prompts_: list[str], *, max_new_tokens: int, one_line: bool,
                         temperature: float, top_p: float, score: bool = False,
                         prefix: tuple[QuestionCache, list[int]] | None = None) -> list[Sample]:
    """One sampled continuation per prompt, with its summed log-prob under the policy and,
    with ``score``, its self-evaluation C(s) read by continuing the same KV cache.

    With ``prefix`` = (question cache, tree index of each prompt) only the part of each
    prompt after its tree's cached question is prefilled (:mod:`closedloop.prefix_cache`).
    """
    enc = _encode(model, tokenizer, prompts_, prefix)
    prompt_len = enc["input_ids"].shape[1]
    recorder = LogprobRecorder()
    stops = StoppingCriteriaList([LineStop(tokenizer, prompt_len)] if one_line else [])
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             logits_processor=LogitsProcessorList([recorder]), stopping_criteria=stops,
                             return_dict_in_generate=True)
    seq = out.sequences
    new = seq[:, prompt_len:]
    logprobs = recorder.finish(seq)
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    samples, kept = [], []
    for row in range(new.shape[0]):
        tokens = new[row].tolist()
        cut = next((j for j, t in enumerate(tokens) if t in ends), len(tokens))
        text = tokenizer.decode(tokens[:cut], skip_special_tokens=True).lstrip("\n")
        # a line ends in a newline; a row that stopped without one hit EOS: the solution is over
        hit_eos = cut < len(tokens) and (not one_line or "\n" not in text)
        if one_line:
            text = text.split("\n", 1)[0]
        kept.append(cut)
        samples.append(Sample(text.strip(), float(logprobs[row, :cut].sum()), cut, hit_eos, tuple(tokens[:cut])))
    if score:
        confidences = selfeval.continue_confidence(model, tokenizer, seq, out.past_key_values,
                                                   enc["attention_mask"], torch.tensor(kept, device=seq.device))
        for sample, c in zip(samples, confidences, strict=True):
            sample.confidence = c
    return samples


def _encode(model, tokenizer, prompts_: list[str], prefix) -> dict:
    """generate's inputs: the prompts left padded, or their uncached suffixes after the
    cached questions (falling back to a full prefill if tokenisation crosses the boundary)."""
    if prefix is not None:
        try:
            input_ids, mask, cache = prefix[0].inputs(prefix[1], prompts_)
            return {"input_ids": input_ids, "attention_mask": mask, "past_key_values": cache}
        except PrefixMismatch:
            pass
    tokenizer.padding_side = "left"
    return dict(tokenizer(prompts_, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device))
