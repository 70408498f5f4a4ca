"""The grounding check of stage ``vlm_sft`` (SPEC §4): do the SFT model's presence answers
depend on the image?

POPE (SPEC §4) scores yes/no presence answers; a model can reach a fair POPE score from the
question alone (issue 22: one seed's SFT model answered from the text and DPO then collapsed it
to all-"no"). The check asks the same question about two images, one where the right answer is
"yes" and one where it is "no", and counts how often the model's answer flips with the image.
An image-blind model never flips (its two inputs differ only in the image); a model that reads
the image flips on every probe it gets right on both sides.

The probe set is fixed (no random draws): from ``scenes.jsonl``'s validation scenes (training-split
images that neither SFT nor the preference pairs use), in image-id order, two probes per scene s:

- ``shape``: "Is there a <shape of s> in the image?" on s (yes) and on the next scene, cyclically,
  whose shape differs (no);
- ``color``: "Is there a <colour of s> <shape of s> in the image?" on s (yes) and on the next scene
  with the same shape in another colour (no), so only the colour tells the two apart.

A probe without such a partner is left out; the first ``n`` probes are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from closedloop import artifacts
from closedloop.vlm import pope

KINDS = ("shape", "color")
BATCH_SIZE = 32
MAX_NEW_TOKENS = 8
"""Greedy decoding budget of the probes (as the γ selection's validation: ``vlm.pope`` is not in
``vlm_sft``'s config view); the answers are one word and a full stop."""


def _partner(scenes: list[dict], i: int, accept) -> dict | None:
    """The first scene after ``scenes[i]`` (cyclically) that ``accept`` takes."""
    for k in range(1, len(scenes)):
        other = scenes[(i + k) % len(scenes)]
        if accept(other):
            return other
    return None


def probe_rows(scenes: list[dict], n: int) -> list[dict]:
    """The probe set (module docstring): rows ``{pair, kind, image, question, label}``, the
    "yes" row of each pair first, at most ``n`` pairs."""
    scenes = sorted((s for s in scenes if s["split"] == "val"), key=lambda s: s["image_id"])
    rows = []
    for i, s in enumerate(scenes):
        shape, color = s["shape"], s["color"]
        probes = (("shape", f"Is there a {shape} in the image?", lambda o, shape=shape: o["shape"] != shape),
                  ("color", f"Is there a {color} {shape} in the image?",
                   lambda o, shape=shape, color=color: o["shape"] == shape and o["color"] != color))
        for kind, question, accept in probes:
            other = _partner(scenes, i, accept)
            if other is None or len(rows) >= 2 * n:
                continue
            pair = len(rows) // 2
            rows += [{"pair": pair, "kind": kind, "image": s["image"], "question": question, "label": "yes"},
                     {"pair": pair, "kind": kind, "image": other["image"], "question": question, "label": "no"}]
    return rows


def flip_score(rows: list[dict], answers: list[str], threshold: float) -> dict:
    """The check's record: ``flip_rate`` (pairs whose answer differs between the two images),
    ``pair_accuracy`` (pairs answered right on both images), ``accuracy`` and ``yes_ratio`` over
    all answers, per kind as well; ``passed``: flip rate ≥ ``threshold`` (None without probes)."""
    def summary(idx: list[int]) -> dict:
        pairs = [(idx[k], idx[k + 1]) for k in range(0, len(idx), 2)]
        n = len(pairs)
        flips = sum(answers[a] != answers[b] for a, b in pairs)
        right = [answers[i] == rows[i]["label"] for i in idx]
        both = sum(right[2 * k] and right[2 * k + 1] for k in range(n))
        return {"n_pairs": n, "flip_rate": flips / n if n else None, "pair_accuracy": both / n if n else None,
                "accuracy": sum(right) / len(idx) if idx else None,
                "yes_ratio": sum(answers[i] == "yes" for i in idx) / len(idx) if idx else None}

    record = summary(list(range(len(rows))))
    record["kinds"] = {k: summary([i for i, r in enumerate(rows) if r["kind"] == k]) for k in KINDS}
    record["threshold"] = threshold
    record["passed"] = None if record["flip_rate"] is None else record["flip_rate"] >= threshold
    return record


def model_answers(model, processor, data: Path) -> Callable:
    """``rows -> answers`` of a LLaVA: greedy generation and POPE's answer rule, as stage ``pope``."""
    def answer(rows: list[dict]) -> list[str]:
        model.eval()
        generations = pope.generate(model, processor, rows, data, BATCH_SIZE, MAX_NEW_TOKENS)
        return [pope.parse_answer(g) for g in generations]

    return answer


def check(answer: Callable[[list[dict]], list[str]], data: Path, n: int, threshold: float) -> dict:
    """Run the probe set of ``data``'s validation scenes through ``answer`` and score it (:func:`flip_score`)."""
    rows = probe_rows(artifacts.read_jsonl(data / "scenes.jsonl"), n)
    return flip_score(rows, answer(rows) if rows else [], threshold)


def warning(record: dict) -> str | None:
    """A loud one-paragraph warning when the check failed or could not run; None when it passed."""
    if record["passed"]:
        return None
    if record["passed"] is None:
        return ("WARNING: the grounding check had no probes (no validation scenes with a partner image); "
                "nothing shows that the SFT model reads the image.")
    return (f"WARNING: the SFT model's presence answers barely depend on the image: only "
            f"{100 * record['flip_rate']:.1f}% of {record['n_pairs']} probe answers flip when the image is swapped "
            f"for one where the right answer flips (threshold {100 * record['threshold']:.0f}%, "
            f"vlm.sft.grounding_threshold). POPE scores of this model and of DPO/V-DPO trained from it measure "
            f"answers given from the question text, not from the image.")
