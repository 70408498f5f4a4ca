"""The V-DPO branch's preference pairs (stage ``vdpo_pairs``): response-contrast and image-contrast preference pairs (SPEC §4).

From the training images of ``vlm_data`` (one shape of one colour each):

- response-contrast (same image v and question x, y_w vs y_l), cycling three kinds:
  ``describe`` ("Describe the image.": the true "A red circle." vs a hallucinated one that
  names an absent shape or an absent colour), ``absent`` ("Is there a <absent shape>?":
  "No." vs the hallucinated "Yes.") and ``present`` ("Is there a <shape>?": "Yes." vs
  "No.", so the pairs do not teach a bias towards "no");
- image-contrast (same x and y; v_w = the original image, v_l = an edit made with PIL so
  that y no longer holds), alternating ``remove`` (the object is painted over with the
  background: a blank image) and ``recolour`` (the object's colour replaced by another,
  anti-aliased edges kept); y is the description or a "Yes." to "Is there a <shape>?" /
  "Is there a <colour> <shape>?". Every pair records what changed.

Optional per-pair α (``vlm.pairs.alpha``): ``fixed``, or ``score``: α = (1 − conf)/2 with
conf = S(w)/(S(w) + S(l)), where S(v, claim) is the SFT stage's shape/colour classifier
standing in for CLIP: p(shape)·p(colour) of what the response claims, or 1 − that for a
"No." (SPEC §4 allows any image-text score).

Output ``results/<experiment>/vlm/pairs/``: ``pairs.jsonl`` (prompt, chosen, rejected,
image, rejected_image, kind, edit/hallucination, alpha), ``edited/<n>.png``, ``stats.json``.
"""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from closedloop import artifacts, paths
from closedloop import config as cl_config
from closedloop.vlm import model as vlm
from closedloop.vlm.scenes import background, load_rgb, object_color
from closedloop.vlm.vision import SceneHeads


def remove_object(pixels: np.ndarray) -> np.ndarray:
    """The image with its (single) object painted over by the background colour."""
    out = pixels.copy()
    bg = background(pixels)
    out[np.any(pixels != bg, axis=2)] = bg
    return out


def recolour_object(pixels: np.ndarray, new_rgb) -> np.ndarray:
    """The image with the object's fill colour replaced by ``new_rgb``.

    Each non-background pixel is bg + a·(fill − bg) (anti-aliasing blends the fill into
    the background); a is recovered by projection and the pixel rebuilt as bg + a·(new − bg).
    """
    bg = background(pixels).astype(float)
    fill = object_color(pixels).astype(float)
    diff = fill - bg
    a = np.clip(((pixels.astype(float) - bg) @ diff) / max(float(diff @ diff), 1e-9), 0.0, 1.0)
    out = bg + a[..., None] * (np.asarray(new_rgb, dtype=float) - bg)
    keep = np.all(pixels == background(pixels), axis=2)
    out[keep] = pixels[keep]
    return np.rint(out).clip(0, 255).astype(np.uint8)


def describe(color: str, shape: str) -> str:
    return f" A {color} {shape}."


def response_pair(scene: dict, n: int, rng: random.Random, colors: list[str]) -> dict:
    shape, color = scene["shape"], scene["color"]
    absent_shape = rng.choice([s for s in vlm.SHAPES if s != shape])
    absent_color = rng.choice([c for c in colors if c != color])
    kind = ("describe", "absent", "present")[n % 3]
    truth = {"shape": shape, "color": color, "true": True}
    if kind == "describe":
        wrong = ({"shape": absent_shape, "color": color} if n % 2 == 0 else {"shape": shape, "color": absent_color})
        return {"kind": "describe", "prompt": vlm.prompt("Describe the image."), "chosen": describe(color, shape),
                "rejected": describe(wrong["color"], wrong["shape"]), "hallucination": wrong,
                "claims": [truth, {**wrong, "true": True}]}
    obj = absent_shape if kind == "absent" else shape
    yes_no = (" No.", " Yes.") if kind == "absent" else (" Yes.", " No.")
    claim = {"shape": obj, "color": None}
    return {"kind": kind, "prompt": vlm.prompt(f"Is there a {obj} in the image?"), "chosen": yes_no[0],
            "rejected": yes_no[1], "hallucination": {"shape": absent_shape, "color": None} if kind == "absent" else None,
            "claims": [{**claim, "true": kind == "present"}, {**claim, "true": kind == "absent"}]}


def image_pair(scene: dict, pixels: np.ndarray, n: int, rng: random.Random, table: dict) -> tuple[dict, np.ndarray]:
    shape, color = scene["shape"], scene["color"]
    if n % 2 == 0:
        edited = remove_object(pixels)
        edit = {"kind": "remove", "object": f"{color} {shape}"}
        question, claim = f"Is there a {shape} in the image?", {"shape": shape, "color": None, "true": True}
    else:
        new = rng.choice([c for c in vlm.COLORS if c != color])
        edited = recolour_object(pixels, table[new])
        edit = {"kind": "recolour", "object": shape, "from_color": color, "to_color": new}
        question, claim = f"Is there a {color} {shape} in the image?", {"shape": shape, "color": color, "true": True}
    edit["pixels_changed"] = int(np.any(edited != pixels, axis=2).sum())
    if (n // 2) % 2 == 0:
        question, answer = "Describe the image.", describe(color, shape)
        claim = {"shape": shape, "color": color, "true": True}
    else:
        answer = " Yes."
    return {"kind": "image", "prompt": vlm.prompt(question), "chosen": answer, "rejected": answer, "edit": edit,
            "claims": [claim, claim]}, edited


class SceneScore:
    """S(v, claim) from the SFT stage's vision tower and shape/colour heads (stand-in for CLIP)."""

    def __init__(self, cfg):
        heads_file = paths.vlm_sft_dir(cfg) / "heads.safetensors"
        if not heads_file.is_file():
            raise cl_config.ConfigError(f"key 'vlm.pairs.alpha': 'score' needs {heads_file} (vision pretraining of a "
                                        "tiny model); use 'none' or 'fixed' for this model")
        model, self.processor = vlm.load(paths.vlm_model_dir(cfg, "sft"), cfg.vlm.model)
        self.tower = model.model.vision_tower
        self.heads = SceneHeads(self.tower.config.hidden_size)
        self.heads.load_state_dict(load_file(heads_file))

    @torch.no_grad()
    def __call__(self, pixels: np.ndarray, claim: dict) -> float:
        values = self.processor.image_processor(images=[pixels], return_tensors="pt")["pixel_values"]
        shape_logits, color_logits = self.heads(self.tower, values)
        p = shape_logits.softmax(-1)[0, vlm.SHAPES.index(claim["shape"])].item()
        if claim["color"] is not None:
            p *= color_logits.softmax(-1)[0, vlm.COLORS.index(claim["color"])].item()
        return p if claim["true"] else 1.0 - p


def alpha_from_scores(s_w: float, s_l: float) -> float:
    """SPEC §4: α = (1 − conf)/2, conf = S_w / (S_w + S_l)."""
    conf = s_w / max(s_w + s_l, 1e-12)
    return (1.0 - conf) / 2.0


def build(cfg, out: Path) -> dict:
    p = cfg.vlm.pairs
    data = paths.vlm_data_dir(cfg)
    stats_in = json.loads((data / "stats.json").read_text())
    table = stats_in["color_table"]
    scenes = [r for r in artifacts.read_jsonl(data / "scenes.jsonl") if r["split"] == "train"]
    if not scenes:
        raise ValueError(f"{data / 'scenes.jsonl'}: no training scenes to build pairs from")
    rng = random.Random(cfg.seed)
    order = list(range(len(scenes)))
    rng.shuffle(order)
    mode = p.alpha
    if mode not in ("none", "fixed", "score"):
        raise cl_config.ConfigError(f"key 'vlm.pairs.alpha': expected 'none', 'fixed' or 'score', got {mode!r}")
    scorer = SceneScore(cfg) if mode == "score" else None
    (out / "edited").mkdir()
    rows = []
    for n in range(p.n_response + p.n_image):
        scene = scenes[order[n % len(scenes)]]
        pixels = load_rgb(data / scene["image"])
        row = {"id": f"pair-{n}", "image": scene["image"], "image_id": scene["image_id"]}
        if n < p.n_response:
            row |= response_pair(scene, n, rng, list(vlm.COLORS))
            row["rejected_image"], edited = None, None
        else:
            pair, edited = image_pair(scene, pixels, n - p.n_response, rng, table)
            row |= pair
            row["rejected_image"] = f"edited/{n}.png"
            Image.fromarray(edited).save(out / row["rejected_image"])
        if mode == "fixed":
            row["alpha"] = float(p.fixed_alpha)
        elif mode == "score":
            claim_w, claim_l = row["claims"]
            s_w = scorer(pixels, claim_w)
            s_l = scorer(edited, claim_l) if edited is not None else scorer(pixels, claim_l)
            row["alpha"] = alpha_from_scores(s_w, s_l)
        rows.append(row)
    with open(out / "pairs.jsonl", "w") as fh:
        artifacts.write_jsonl(fh, rows)
    kinds = collections.Counter(r["kind"] for r in rows)
    edits = collections.Counter(r["edit"]["kind"] for r in rows if r["kind"] == "image")
    alphas = [r["alpha"] for r in rows if "alpha" in r]
    return {"pairs": len(rows), "kinds": dict(kinds), "edits": dict(edits), "alpha": mode,
            "mean_alpha": float(np.mean(alphas)) if alphas else 0.0}
