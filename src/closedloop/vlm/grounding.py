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

import copy
import csv
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

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


def scene_rows(scenes: list[dict]) -> list[dict]:
    """easy-VQA's "what shape"/"what colour" questions on the same validation scenes (is the image read
    at all?): rows ``{kind, image, question, label}``, the label the word the answer must contain."""
    scenes = sorted((s for s in scenes if s["split"] == "val"), key=lambda s: s["image_id"])
    return [r for s in scenes for r in (
        {"kind": "what_shape", "image": s["image"], "question": "What shape is in the image?", "label": s["shape"]},
        {"kind": "what_color", "image": s["image"], "question": "What color is the shape?", "label": s["color"]})]


def scene_accuracy(rows: list[dict], generations: list[str]) -> dict:
    """Per kind: the fraction of answers whose first sentence contains the right shape / colour word."""
    def right(r, g):
        return r["label"] in re.findall(r"[a-z]+", g.strip().split(".")[0].lower())

    out = {}
    for kind in ("what_shape", "what_color"):
        hits = [right(r, g) for r, g in zip(rows, generations, strict=True) if r["kind"] == kind]
        out[kind] = sum(hits) / len(hits) if hits else None
    out["n"] = len(rows)
    return out


def model_generate(model, processor, data: Path) -> Callable[[list[dict]], list[str]]:
    """``rows -> generations`` of a LLaVA: greedy, as stage ``pope``. The check runs during SFT too:
    it leaves the model's train/eval mode as it found it and pads with its own copy of the processor
    (generation pads on the left, and the tokenizer keeps that state, which SFT's collator and the
    saved tokenizer must not see)."""
    processor = copy.deepcopy(processor)

    def generate(rows: list[dict]) -> list[str]:
        training = model.training
        model.eval()
        try:
            return pope.generate(model, processor, rows, data, BATCH_SIZE, MAX_NEW_TOKENS)
        finally:
            model.train(training)

    return generate


def check(generate: Callable[[list[dict]], list[str]], data: Path, n: int, threshold: float) -> dict:
    """Run the probe set of ``data``'s validation scenes through ``generate``, answers parsed by POPE's
    rule, and score it (:func:`flip_score`); with the "what shape/colour" accuracy (:func:`scene_accuracy`)."""
    scenes = artifacts.read_jsonl(data / "scenes.jsonl")
    rows, what = probe_rows(scenes, n), scene_rows(scenes)
    generations = generate(rows + what) if rows or what else []
    record = flip_score(rows, [pope.parse_answer(g) for g in generations[:len(rows)]], threshold)
    record["scene_questions"] = scene_accuracy(what, generations[len(rows):])
    return record


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


class GroundingLogCallback(TrainerCallback):
    """``vlm.sft.grounding_every``: the check every ``every`` SFT steps, one CSV row each (where in
    training presence answers start to depend on the image). Rows past ``resume_step`` (a requeue
    trains them again) are dropped.

    With ``best_dir`` (``vlm.sft.keep_best``) the model's weights at the check with the highest probe
    accuracy so far (ties: the later) go to ``best_dir/model.safetensors`` with ``best.json``
    (step, accuracy, flip rate); :func:`restore_best` puts them back after training when the final
    model scores lower. Selection on the validation scenes' probes only: the held-out POPE set is
    never seen."""

    HEADER = ["step", "flip_rate", "pair_accuracy", "accuracy", "yes_ratio", "what_shape", "what_color"]

    def __init__(self, generate, data: Path, n: int, every: int, path: Path, resume_step: int = 0,
                 model=None, best_dir: Path | None = None):
        self.generate, self.data, self.n, self.every, self.path = generate, data, n, every, Path(path)
        self.model, self.best_dir, self.best = model, best_dir, None
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path, newline="") as fh:
                rows = [r for r in list(csv.reader(fh))[1:] if r and int(r[0]) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerows([self.HEADER, *rows])
        if best_dir is not None and (Path(best_dir) / "best.json").is_file():
            best = json.loads((Path(best_dir) / "best.json").read_text())
            self.best = best if best["step"] <= resume_step else None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            r = check(self.generate, self.data, self.n, threshold=0.0)
            sq = r["scene_questions"]
            with open(self.path, "a", newline="") as fh:
                csv.writer(fh).writerow([state.global_step, r["flip_rate"], r["pair_accuracy"], r["accuracy"],
                                         r["yes_ratio"], sq["what_shape"], sq["what_color"]])
            if self.best_dir is not None and r["accuracy"] is not None and (
                    self.best is None or r["accuracy"] >= self.best["accuracy"]):
                self.best = {"step": state.global_step, "accuracy": r["accuracy"], "flip_rate": r["flip_rate"]}
                save_best(self.model, self.best, Path(self.best_dir))


def save_best(model, best: dict, best_dir: Path) -> None:
    """The weights and ``best.json``, each by atomic rename (a kill leaves the previous best whole)."""
    from safetensors.torch import save_model

    best_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(best_dir / "model.safetensors.tmp"))
    os.replace(best_dir / "model.safetensors.tmp", best_dir / "model.safetensors")
    with artifacts.atomic_file(best_dir / "best.json") as fh:
        fh.write(json.dumps(best))


def restore_best(model, final: dict, best_dir: Path) -> dict:
    """After training: load the kept weights into ``model`` when their probe accuracy beats the final
    model's (``final``, a :func:`check` record); returns ``{"step", "accuracy", "flip_rate", "restored"}``."""
    from safetensors.torch import load_model

    best_json = best_dir / "best.json"
    best = json.loads(best_json.read_text()) if best_json.is_file() else None
    if best is None or final["accuracy"] is None or best["accuracy"] <= final["accuracy"]:
        return {"step": None, "accuracy": final["accuracy"], "flip_rate": final["flip_rate"], "restored": False}
    load_model(model, str(best_dir / "model.safetensors"))
    return {**best, "restored": True}
