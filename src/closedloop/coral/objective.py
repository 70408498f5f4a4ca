"""The COrAL training objective (SPEC §5): which (i, j) pairs are trained, and the corruption
of the backward objective's input.

- Forward multi-token prediction on clean input: row i predicts x_j for j = i+1..i+W_f.
- Backward reconstruction on corrupted input: row i predicts the clean x_j for
  j = i−W_b..i, only where j lies in a corrupted chunk.
- A pair is valid only when j is a response position (prompt tokens are never targets;
  rows of prompt positions may be sources). The loss of each objective is the token-mean
  cross-entropy over its valid pairs, and the two are summed with weights 1, 1: the
  reference (``coral/algorithms/oa/trainer.py``) runs the clean and the corrupted batch as
  two micro-batches of one optimizer update with coefficient 1 each, which is the same
  gradient up to Adam's per-step scaling.

Corruption follows SPEC §5 ("chunks of the response are replaced by other chunks with a rate
r ~ TruncNormal(0, 0.25, [0, 0.5])"); chunk size c is drawn uniformly from
1..min(4, max(2, n // 8)) as the reference (n = response length). Departures from the
reference's ``corrupt_context``: the replacing chunk starts at a uniform token offset of the
response (the reference draws the offset from 0..K−1, the chunk count, so only early tokens
are ever used), it is not mixed token-wise with the original, the "stutter" perturbation and
the self-sampled noise fallback are left out, and after three draws without any replaced
chunk one chunk is forced (the reference retries forever, which never ends at r = 0).
r is sampled by inverse CDF with ``torch.erfinv`` (no scipy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def backward_window(w_f: int, n_back_pred: float) -> int:
    """W_b = int(W_f · n_back_pred), the reference's ``--n_back_pred`` multiplier (4·2 = 8)."""
    return int(w_f * n_back_pred)


def forward_offsets(w_f: int) -> list[int]:
    return list(range(1, w_f + 1))


def backward_offsets(w_b: int) -> list[int]:
    return list(range(-w_b, 1))


def pair_targets(T: int, offsets: list[int], prompt_lens: torch.Tensor, lengths: torch.Tensor,
                 labelled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, valid), both [B, T, N]: targets[b, i, n] = i + offsets[n]; valid when the
    target is a response position (prompt_len ≤ j < length) and, if ``labelled`` [B, T] is
    given (the backward objective), a corrupted position."""
    pos = torch.arange(T)
    targets = (pos[:, None] + torch.as_tensor(offsets)[None]).expand(len(prompt_lens), T, len(offsets))
    valid = (targets >= prompt_lens[:, None, None]) & (targets < lengths[:, None, None])
    if labelled is not None:
        valid &= labelled.gather(1, targets.clamp(0, T - 1).reshape(len(lengths), -1)).view_as(valid)
    return targets, valid


def pair_labels(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, T, N]: the token at each target position (clamped indices where invalid)."""
    B, T = input_ids.shape
    idx = targets.clamp(0, T - 1).reshape(B, -1)
    return input_ids.gather(1, idx).view_as(targets)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def truncnorm_mean(mu: float = 0.0, sigma: float = 0.25, lo: float = 0.0, hi: float = 0.5) -> float:
    """Analytic mean of TruncNormal(μ, σ, [lo, hi]) (0.18070 for the SPEC's setting)."""
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    return mu + sigma * (pdf(a) - pdf(b)) / (_normal_cdf(b) - _normal_cdf(a))


def sample_rate(n: int, mu: float = 0.0, sigma: float = 0.25, lo: float = 0.0, hi: float = 0.5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws of r ~ TruncNormal(μ, σ, [lo, hi]) by inverse CDF:
    p = Φ(a) + u·(Φ(b) − Φ(a)), r = μ + σ·√2·erfinv(2p − 1), u ~ U(0, 1) (float64)."""
    fa, fb = _normal_cdf((lo - mu) / sigma), _normal_cdf((hi - mu) / sigma)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    r = mu + sigma * math.sqrt(2.0) * torch.erfinv(2 * (fa + u * (fb - fa)) - 1)
    return r.clamp(lo, hi)


@dataclass
class Corruption:
    ids: list[int]
    """The response with the chosen chunks replaced (same length)."""
    labelled: list[bool]
    """True inside replaced chunks: the positions the backward objective reconstructs."""
    chunk: int
    """Chunk size c."""
    spans: list[tuple[int, int]]
    """[start, end) of every replaced chunk."""
    rate: float


def corrupt(response: list[int], max_chunk: int = 4, generator: torch.Generator | None = None,
            tries: int = 3) -> Corruption:
    """Replace chunks of ``response`` by other chunks of it (see the module docstring)."""
    n = len(response)
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=generator))  # noqa: E731
    c = randint(1, max(1, min(max_chunk, max(2, n // 8))))
    starts = list(range(0, n, c))
    rate, chosen = 0.0, []
    for _ in range(tries):
        rate = float(sample_rate(1, generator=generator)[0])
        chosen = [s for s in starts if float(torch.rand(1, generator=generator)) < rate]
        if chosen:
            break
    if not chosen and starts:
        chosen = [starts[randint(0, len(starts) - 1)]]
    ids, labelled, spans = list(response), [False] * n, []
    for s in chosen:
        e = min(s + c, n)
        f = randint(0, n - (e - s))
        ids[s:e] = response[f:f + e - s]
        labelled[s:e] = [True] * (e - s)
        spans.append((s, e))
    return Corruption(ids, labelled, c, spans, rate)


def corrupt_batch(input_ids: torch.Tensor, prompt_lens: torch.Tensor, lengths: torch.Tensor, max_chunk: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted ids, labelled [B, T] bool) for a right-padded batch; prompts stay clean."""
    out, labelled = input_ids.clone(), torch.zeros_like(input_ids, dtype=torch.bool)
    for b in range(input_ids.shape[0]):
        lo, hi = int(prompt_lens[b]), int(lengths[b])
        if hi <= lo:
            continue
        cor = corrupt(input_ids[b, lo:hi].tolist(), max_chunk, generator)
        out[b, lo:hi] = torch.tensor(cor.ids, dtype=input_ids.dtype)
        labelled[b, lo:hi] = torch.tensor(cor.labelled)
    return out, labelled


def key_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T] True at real tokens, from lengths (never from ``ids != pad``: SmolLM2's pad is its EOS)."""
    return torch.arange(T)[None] < lengths[:, None]


def objective_inputs(input_ids, prompt_lens, lengths, w_f: int, w_b: int, max_chunk: int,
                     generator: torch.Generator | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The model kwargs of both objectives for one batch: ``forward`` (clean input, offsets
    +1..+W_f) and ``backward`` (corrupted input, offsets −W_b..0, labels = clean tokens)."""
    T = input_ids.shape[1]
    mask = key_mask(lengths, T)
    f_t, f_v = pair_targets(T, forward_offsets(w_f), prompt_lens, lengths)
    corrupted, labelled = corrupt_batch(input_ids, prompt_lens, lengths, max_chunk, generator)
    b_t, b_v = pair_targets(T, backward_offsets(w_b), prompt_lens, lengths, labelled)
    return {
        "forward": {"input_ids": input_ids, "coral_targets": f_t, "coral_valid": f_v,
                    "coral_labels": pair_labels(input_ids, f_t), "coral_key_mask": mask},
        "backward": {"input_ids": corrupted, "coral_targets": b_t, "coral_valid": b_v,
                     "coral_labels": pair_labels(input_ids, b_t), "coral_key_mask": mask},
    }
