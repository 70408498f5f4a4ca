"""Decoding a COrAL model (SPEC §5): AR greedy of its own next-position prediction (j = i+1),
and sliding blockwise order-agnostic decoding. One sequence at a time (the reference asserts
batch size 1 too); every forward pass is counted.

Blockwise decoding, one forward pass per iteration over the tokens not in the KV cache,
with every row's window −W_b..+W_f:

1. *Verify* the current draft left to right: the token at t is accepted while
   p ≥ min(ε, √ε·e^{−H(p)}), p = the row t−1's +1 prediction (conditioned on the draft
   before t); the first rejection stops.
2. *Fix* the longest accepted prefix, or, if longer, the prefix whose tokens stayed unchanged
   for more than ``threshold`` refinements.
3. *Propose* the next block (``block`` positions from the first unfixed one): target t gets
   the argmax of the weighted mean of log-probabilities of every row s ≥ fixed−1 whose window
   reaches t (weights w(d) of the offset d = t − s).
4. Crop the cache to the fixed positions (the cached K/V of draft tokens go stale once they
   change) and feed the rest.

Where we follow the reference (``coral/models/oa_model/mistral/modeling_mistral.py``
``multiple_token_generate`` and ``coral/utils.py``): the window, the η rule, the occurrence
counts (+1 while a position's token and all before it are unchanged, reset to 1 otherwise),
sources restricted to rows ≥ fixed−1, the offset weights w(d) = e^{−|d+2|/8} for d ≤ 0 and
e^{−8(d−1)} for d ≥ 1 (the reference's ``get_exp_dist`` table at W_b = 8; the formula for other
windows is ours), cropping the cache to the fixed prefix. Where we depart: one greedy
candidate instead of the top-16 token tree and its separate verification forward; the
acceptance is the deterministic η test of SPEC §5 (the reference draws u ~ U(0, 1) against
exp(−score)); the verifier is the +1 column of the next forward; the reference's
accept-ratio re-weighting of sources is dropped; after ``threshold`` iterations without
progress one position is fixed with the row's +1 argmax (as the reference's Llama variant's
stall breaker). Properties (tested): block 1 with ε = 0 (η = 0, always accept) is exactly AR
greedy of the +1 prediction, at one extra forward (the last one only verifies).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from closedloop.coral.model import crop_cache


def entropy(probs: torch.Tensor) -> float:
    return float(-(probs * probs.clamp_min(1e-30).log()).sum())


def acceptance_threshold(probs: torch.Tensor, eps: float) -> float:
    """η = min(ε, √ε·e^{−H(p)}) (SPEC §5); ε = 0 gives η = 0 (always accept)."""
    return min(eps, math.sqrt(eps) * math.exp(-entropy(probs)))


def accepts(probs: torch.Tensor, token: int, eps: float) -> bool:
    """Whether ``token`` passes the η test under the distribution ``probs`` [V]."""
    return float(probs[token]) >= acceptance_threshold(probs, eps)


def offset_weight(d: int) -> float:
    """w(d) of the source ensemble (see the module docstring)."""
    return math.exp(-abs(d + 2) / 8) if d <= 0 else math.exp(-8 * (d - 1))


def _accepted(logp: torch.Tensor, draft: list[int], eps: float) -> int:
    """Length of the draft's prefix that passes the η test; ``logp`` [D, V] are the +1
    log-probabilities of the rows before each draft position (:func:`accepts`, vectorised)."""
    if not draft:
        return 0
    probs = logp.exp()
    entropy_ = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    eta = torch.clamp(math.sqrt(eps) * torch.exp(-entropy_), max=eps)
    ok = probs[torch.arange(len(draft)), torch.tensor(draft)] >= eta
    return len(draft) if bool(ok.all()) else int((~ok).nonzero()[0])


def _propose(logp, pair, first: int, lo: int, hi: int, last: int, w_f: int, w_b: int) -> list[int]:
    """Draft tokens for targets lo..hi: argmax of Σ_s w(t−s)·log p_s(t) / Σ_s w(t−s) over the
    sources s in [lo − 1, last] whose window reaches t (one gather and index_add)."""
    ts, rows, ws = [], [], []
    for t in range(lo, hi + 1):
        for s in range(max(lo - 1, t - w_f), min(last, t + w_b) + 1):
            ts.append(t - lo)
            rows.append(int(pair[s - first, t - s + w_b]))
            ws.append(offset_weight(t - s))
    if not ts:
        return []
    w, index = torch.tensor(ws), torch.tensor(ts)
    num = torch.zeros(hi - lo + 1, logp.shape[-1]).index_add_(0, index, logp[torch.tensor(rows)] * w[:, None])
    den = torch.zeros(hi - lo + 1).index_add_(0, index, w)
    return (num / den[:, None]).argmax(-1).tolist()


@dataclass
class Decoded:
    tokens: list[int]
    """Generated tokens, a final EOS included."""
    forward_passes: int
    seconds: float


@torch.inference_mode()
def ar_greedy(model, prompt: list[int], max_new: int, eos: set[int], stop=None) -> Decoded:
    """Greedy decoding of the +1 prediction with a KV cache: one forward per token.
    ``stop(tokens)``: end early once it returns True (e.g. after the final-answer line)."""
    start = time.perf_counter()
    cache, out, passes = DynamicCache(), [], 0
    feed = torch.tensor([prompt])
    while len(out) < max_new:
        logits = model.oa_offsets(feed, [1], cache=cache, query_from=feed.shape[1] - 1)[0, -1, 0]
        passes += 1
        tok = int(logits.argmax())
        out.append(tok)
        if tok in eos or (stop is not None and stop(out)):
            break
        feed = torch.tensor([[tok]])
    return Decoded(out, passes, time.perf_counter() - start)


def _update_counts(old_draft: list[int], old_counts: list[int], draft: list[int]) -> list[int]:
    """+1 for each position before the first change (unchanged token and prefix), 1 from there on."""
    counts, same = [], True
    for k, tok in enumerate(draft):
        same = same and k < len(old_draft) and old_draft[k] == tok
        counts.append(old_counts[k] + 1 if same else 1)
    return counts


@torch.inference_mode()
def blockwise(model, prompt: list[int], max_new: int, eos: set[int], *, block: int = 16, eps: float = 0.1,
              threshold: int = 3, max_refinements: int = 512, use_cache: bool = True, stop=None) -> Decoded:
    """Sliding blockwise order-agnostic decoding (module docstring). ``max_refinements`` caps
    the iterations (forward passes); when hit, the unfixed draft is appended as it stands.
    ``stop(fixed tokens)``: end once it returns True."""
    started = time.perf_counter()
    w_f, w_b = model.windows
    offsets = list(range(-w_b, w_f + 1))
    plus1 = offsets.index(1)
    L = len(prompt)
    end = L + max_new
    ids, fixed, counts = list(prompt), L, []
    cache = DynamicCache() if use_cache else None
    passes = stalled = 0
    while fixed < end and passes < max_refinements:
        keep = min(cache.get_seq_length(), fixed - 1) if cache is not None else 0
        if cache is not None:
            crop_cache(cache, keep)
        first = fixed - 1  # rows of sources before fixed−1 are never used
        src = torch.arange(first, len(ids))
        targets = src[:, None] + torch.tensor(offsets)[None]  # [R, N]
        hidden = model.oa_hidden(torch.tensor([ids[keep:]]), targets[None], cache=cache, query_from=first - keep)[0]
        # norm + lm_head only for the pairs whose target can still be verified or proposed
        need = (targets >= fixed) & (targets <= min(len(ids) - 1 + w_f, end - 1))
        pair = torch.full(targets.shape, -1, dtype=torch.long)  # (s − first, n) -> row of logp
        pair[need] = torch.arange(int(need.sum()))
        logp = model.head(hidden[need]).log_softmax(-1)
        passes += 1
        accepted = _accepted(logp[pair[:len(ids) - fixed, plus1]], ids[fixed:], eps)
        stable = next((k for k, c in enumerate(counts) if c <= threshold), len(counts))
        new_fixed = fixed + max(accepted, stable)
        stalled = 0 if new_fixed > fixed else stalled + 1
        broke = stalled > threshold
        if broke:  # stall breaker: fix the +1 argmax of row fixed−1 (no row of this pass saw it)
            ids = ids[:fixed] + [int(logp[pair[0, plus1]].argmax())]
            counts, new_fixed, stalled = [], fixed + 1, 0
        if any(tok in eos for tok in ids[L:new_fixed]) or (stop is not None and new_fixed > fixed
                                                            and stop(ids[L:new_fixed])):
            fixed = new_fixed
            break
        t_hi = new_fixed - 1 if broke else min(new_fixed + block - 1, end - 1, len(ids) - 1 + w_f)
        draft = _propose(logp, pair, first, new_fixed, t_hi, len(ids) - 1, w_f, w_b)
        cut = next((k + 1 for k, tok in enumerate(draft) if tok in eos), len(draft))
        draft = draft[:cut]
        counts = _update_counts(ids[new_fixed:], counts[new_fixed - fixed:], draft)
        ids, fixed = ids[:new_fixed] + draft, new_fixed
    if fixed < end and passes >= max_refinements:
        fixed = len(ids)
    out = ids[L:fixed]
    first_eos = next((k + 1 for k, tok in enumerate(out) if tok in eos), len(out))
    return Decoded(out[:first_eos], passes, time.perf_counter() - started)


def decode_rows(model, tokenizer, rows: list[dict], mode: str, dcfg, max_new_tokens: int, mc_max_new_tokens: int,
                desc: str) -> tuple[list[list[str]], int, dict]:
    """Completions of ``rows`` under ``mode`` (``greedy``: :func:`ar_greedy`; ``coral_blockwise``:
    :func:`blockwise` with ``dcfg`` = ``coral.decoding``), the generated-token count (a final
    EOS included) and the metrics SPEC §5 adds: forward passes, tokens per forward, wall time.
    Like the shared greedy evaluation, a step-by-step answer stops after its final-answer line
    and its text is cut there."""
    from tqdm.auto import tqdm

    from closedloop import prompts
    from closedloop.generation import FINAL_ANSWER

    if mode not in ("greedy", "coral_blockwise"):
        raise ValueError(f"key 'job.decoding': expected 'greedy' or 'coral_blockwise' for a COrAL model, got {mode!r}")
    eos = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    texts, n_tokens, passes, seconds = [], 0, 0, 0.0
    for row in tqdm(rows, desc=desc, unit="question"):
        mc = bool(row.get("choices"))
        prompt = tokenizer(prompts.chat_prompt(tokenizer, row), add_special_tokens=False)["input_ids"]
        budget = mc_max_new_tokens if mc else max_new_tokens
        stop = None if mc else (lambda toks: FINAL_ANSWER.search(tokenizer.decode(toks, skip_special_tokens=True))
                                is not None)
        if mode == "greedy":
            out = ar_greedy(model, prompt, budget, eos, stop=stop)
        else:
            out = blockwise(model, prompt, budget, eos, block=dcfg.block, eps=dcfg.eps, threshold=dcfg.threshold,
                            max_refinements=dcfg.max_refinements, stop=stop)
        text = tokenizer.decode(out.tokens, skip_special_tokens=True)
        found = None if mc else FINAL_ANSWER.search(text)
        texts.append([text[:found.end()] if found else text])
        n_tokens, passes, seconds = n_tokens + len(out.tokens), passes + out.forward_passes, seconds + out.seconds
    extra = {"forward_passes": passes, "tokens_per_forward": n_tokens / max(passes, 1),
             "wall_seconds": round(seconds, 3), "seconds_per_question": round(seconds / max(len(rows), 1), 4)}
    if mode == "coral_blockwise":
        extra["coral_decoding"] = {k: dcfg[k] for k in ("block", "eps", "threshold", "max_refinements")}
    return texts, n_tokens, extra
