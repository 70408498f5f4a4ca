"""The VL-CoT family's data (stage ``vlcot_data``, SPEC §6): seeded multi-object scenes with
exact grounding labels, questions that need finding things in order, and gold interleaved chains.

easy-VQA images hold one object, so grounding is trivial there. Here each scene holds 2–4 shapes
in easy-VQA's shapes and colours, drawn with PIL at varied sizes and positions on a white
canvas, later shapes over earlier ones (an object is placed clear of the earlier ones' boxes
unless it draws ``overlap_prob``). Each object's *visible* pixels are its
exact mask (the masks are disjoint; ``masks/<id>.png`` stores object index + 1 per pixel, 0 for
background), and patch k of the ``patch_size`` grid (row-major, as the vision tower reads it) is
labelled B = 1 for an object when the object covers at least ``patch_threshold`` of its pixels.

Question types (``vlcot.data.mix`` weights):

- ``relation``: "what color is the shape left of the triangle?": the nearest object whose centre
  lies left (right) of the referred one's, by bounding-box centre;
- ``counting``: "how many red shapes are there?" / "how many circles are there?";
- ``attribute``: "what color is the circle?" / "what shape is the red object?";
- ``existence``: "is there a blue triangle?" (half absent, half present).

An object is referred to as "the <shape>" when its shape is unique in the scene, else as "the
<color> <shape>" when that is unique; a question is only asked when its references are unique.
Each gold chain interleaves text steps with ⟨look⟩ steps, each ⟨look⟩ with its gold patch set:
"Find the triangle. ⟨look⟩ The shape left of it ⟨look⟩ is blue. Answer: blue."

Output ``data/<experiment>/vlcot/``: ``images/<id>.png``, ``masks/<id>.png``, ``scenes.jsonl``
(objects with shape, colour, bbox, centre, patches), ``{train,validation,heldout}.jsonl`` (questions;
splits disjoint by scene), ``stats.json`` (the question-type mix per split).
"""

from __future__ import annotations

import collections
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from closedloop import artifacts

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
RGB = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 60, 220), "yellow": (235, 210, 40),
       "teal": (30, 160, 160), "brown": (130, 80, 30), "gray": (128, 128, 128), "black": (10, 10, 10)}
QTYPES = ("relation", "counting", "attribute", "existence")
NUMBERS = ("zero", "one", "two", "three", "four")
SPLITS = ("train", "validation", "heldout")
BACKGROUND = (255, 255, 255)
LOOK = "<look>"


# ---- drawing and labels -------------------------------------------------------------------

def shape_mask(shape: str, bbox: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The pixels of one shape drawn alone (bool ``size``×``size``); ``bbox`` = (x0, y0, x1, y1),
    inclusive, as PIL draws it."""
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = bbox
    if shape == "circle":
        draw.ellipse(bbox, fill=1)
    elif shape == "rectangle":
        draw.rectangle(bbox, fill=1)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r} (expected one of {SHAPES})")
    return np.asarray(im, dtype=bool)


def render(objects: list[dict], size: int) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and the label map (object index + 1 per visible pixel, 0 = background):
    objects are drawn in order, a later one hiding an earlier one."""
    pixels = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    labels = np.zeros((size, size), dtype=np.uint8)
    for i, obj in enumerate(objects):
        mask = shape_mask(obj["shape"], tuple(obj["bbox"]), size)
        pixels[mask] = RGB[obj["color"]]
        labels[mask] = i + 1
    return Image.fromarray(pixels), labels


def patch_labels(mask: np.ndarray, patch_size: int, threshold: float) -> list[int]:
    """Patches (row-major indices of the ``patch_size`` grid) where ``mask`` covers at least
    ``threshold`` of the patch's pixels: the B_{t,k} = 1 set of SPEC §6."""
    g = mask.shape[0] // patch_size
    cover = mask[:g * patch_size, :g * patch_size].reshape(g, patch_size, g, patch_size).mean(axis=(1, 3))
    return [int(k) for k in np.flatnonzero(cover.reshape(-1) >= threshold)]


def iou(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two patch sets; 1.0 when both are empty."""
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def f1(pred, gold) -> float:
    """Patch F1 = 2|p ∩ g| / (|p| + |g|); 1.0 when both are empty."""
    pred, gold = set(pred), set(gold)
    return 1.0 if not pred and not gold else 2 * len(pred & gold) / (len(pred) + len(gold))


# ---- scenes -------------------------------------------------------------------------------

def sample_scene(rng: random.Random, d, size: int, patch_size: int) -> dict:
    """One scene graph: objects with shape, colour, bbox, centre, visible pixels and patch set.

    Resampled until every object keeps ``min_visible`` of its pixels and every patch set is non-empty."""
    while True:
        objects = []
        for _ in range(rng.randint(d.min_objects, d.max_objects)):
            may_overlap = rng.random() < d.overlap_prob
            for _ in range(50):  # a free spot unless this object may overlap the ones before
                s = rng.randint(d.min_size, d.max_size)
                x0, y0 = rng.randint(0, size - s), rng.randint(0, size - s)
                if may_overlap or all(x0 > o["bbox"][2] or x0 + s - 1 < o["bbox"][0] or y0 > o["bbox"][3]
                                      or y0 + s - 1 < o["bbox"][1] for o in objects):
                    break
            objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(COLORS),
                            "bbox": [x0, y0, x0 + s - 1, y0 + s - 1], "cx": x0 + (s - 1) / 2, "cy": y0 + (s - 1) / 2})
        _, labels = render(objects, size)
        ok = True
        for i, obj in enumerate(objects):
            full = int(shape_mask(obj["shape"], tuple(obj["bbox"]), size).sum())
            visible = labels == i + 1
            obj["visible"] = int(visible.sum())
            obj["patches"] = patch_labels(visible, patch_size, d.patch_threshold)
            ok &= obj["visible"] >= d.min_visible * full and bool(obj["patches"])
        if ok:
            return {"objects": objects, "overlap": any(o["visible"] < int(shape_mask(
                o["shape"], tuple(o["bbox"]), size).sum()) for o in objects)}


def reference(objects: list[dict], i: int) -> str | None:
    """The unique referring expression of object i ("the triangle", "the red triangle"), or None."""
    o = objects[i]
    if sum(p["shape"] == o["shape"] for p in objects) == 1:
        return f"the {o['shape']}"
    if sum(p["shape"] == o["shape"] and p["color"] == o["color"] for p in objects) == 1:
        return f"the {o['color']} {o['shape']}"
    return None


def neighbour(objects: list[dict], i: int, side: str) -> int | None:
    """The nearest object left (right) of object i by centre x; None unless it is at least 2 pixels
    to that side and 2 pixels nearer than the next one (no near-ties)."""
    sign = -1 if side == "left" else 1
    cands = sorted((sign * (o["cx"] - objects[i]["cx"]), j) for j, o in enumerate(objects)
                   if j != i and sign * (o["cx"] - objects[i]["cx"]) > 0)
    if not cands or cands[0][0] < 2 or (len(cands) > 1 and cands[1][0] - cands[0][0] < 2):
        return None
    return cands[0][1]


def _union(objects, idx) -> list[int]:
    return sorted({k for j in idx for k in objects[j]["patches"]})


def relation_question(rng, objects):
    options = [(i, side) for i in range(len(objects)) for side in ("left", "right")
               if reference(objects, i) and neighbour(objects, i, side) is not None]
    if not options:
        return None
    i, side = rng.choice(options)
    j, attr = neighbour(objects, i, side), rng.choice(("color", "shape"))
    ref, ans = reference(objects, i), objects[neighbour(objects, i, side)][attr]
    q = f"what {attr} is the shape {side} of {ref}?"
    steps = [{"text": f"Find {ref}."}, {"look": objects[i]["patches"]}, {"text": f"The shape {side} of it"},
             {"look": objects[j]["patches"]}, {"text": f"is {ans}." if attr == "color" else f"is a {ans}."}]
    return q, ans, steps


def counting_question(rng, objects):
    present = rng.random() < 0.75  # mostly a colour or shape the scene has (else most counts are zero)
    if rng.random() < 0.5:
        color = rng.choice([o["color"] for o in objects] if present else COLORS)
        idx, q, what = [j for j, o in enumerate(objects) if o["color"] == color], \
            f"how many {color} shapes are there?", f"the {color} shapes"
    else:
        shape = rng.choice([o["shape"] for o in objects] if present else SHAPES)
        idx, q, what = [j for j, o in enumerate(objects) if o["shape"] == shape], \
            f"how many {shape}s are there?", f"the {shape}s"
    ans = NUMBERS[len(idx)]
    steps = [{"text": f"Find {what}."}, {"look": _union(objects, idx)}, {"text": f"There are {ans}."}]
    return q, ans, steps


def attribute_question(rng, objects):
    options = []
    for i, o in enumerate(objects):
        if sum(p["shape"] == o["shape"] for p in objects) == 1:
            options.append((i, "color", f"what color is the {o['shape']}?", f"the {o['shape']}"))
        if sum(p["color"] == o["color"] for p in objects) == 1:
            options.append((i, "shape", f"what shape is the {o['color']} object?", f"the {o['color']} object"))
    if not options:
        return None
    i, attr, q, what = rng.choice(options)
    ans = objects[i][attr]
    steps = [{"text": f"Find {what}."}, {"look": objects[i]["patches"]},
             {"text": f"It is {ans}." if attr == "color" else f"It is a {ans}."}]
    return q, ans, steps


def existence_question(rng, objects):
    present = {(o["color"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(absent)
    idx = [j for j, o in enumerate(objects) if (o["color"], o["shape"]) == (color, shape)]
    ans = "yes" if idx else "no"
    steps = [{"text": f"Find a {color} {shape}."}, {"look": _union(objects, idx)},
             {"text": "There is one." if idx else "There is none."}]
    return f"is there a {color} {shape}?", ans, steps


QUESTIONS = {"relation": relation_question, "counting": counting_question, "attribute": attribute_question,
             "existence": existence_question}


# ---- chains as text -----------------------------------------------------------------------

def chain_text(steps: list[dict], answer: str, with_looks: bool = True) -> str:
    """The chain as the model writes it: text steps joined by spaces, each ⟨look⟩ as ``<look>``
    (``with_looks=False``: the text-only chain), then "Answer: <answer>."."""
    parts = [s["text"] if "text" in s else LOOK for s in steps if with_looks or "text" in s]
    return " ".join([*parts, f"Answer: {answer}."])


def looks(steps: list[dict]) -> list[list[int]]:
    """The gold patch set of each ⟨look⟩, in order."""
    return [s["look"] for s in steps if "look" in s]


def prompt(question: str) -> str:
    """LLaVA-1.5's prompt format; the chain (or answer) follows "ASSISTANT:"."""
    return f"USER: <image>\n{question[:1].upper()}{question[1:]} ASSISTANT:"


# ---- the dataset --------------------------------------------------------------------------

def build(cfg, out: Path) -> dict:
    """Write scenes, masks and question splits of ``vlcot.data`` into ``out``; returns stats."""
    d, m = cfg.vlcot.data, cfg.vlcot.model
    rng = random.Random(cfg.seed)
    (out / "images").mkdir()
    (out / "masks").mkdir()
    weights = [float(d.mix[t]) for t in QTYPES]
    counts = {"train": d.n_train_scenes, "validation": d.n_validation_scenes, "heldout": d.n_heldout_scenes}
    scenes, splits = [], {s: [] for s in SPLITS}
    for split in SPLITS:
        for _ in range(counts[split]):
            sid = f"s{len(scenes):05d}"
            scene = {"id": sid, "split": split, **sample_scene(rng, d, m.image_size, m.patch_size)}
            image, labels = render(scene["objects"], m.image_size)
            image.save(out / "images" / f"{sid}.png")
            Image.fromarray(labels).save(out / "masks" / f"{sid}.png")
            scene["image"], scene["mask"] = f"images/{sid}.png", f"masks/{sid}.png"
            scenes.append(scene)
            asked = set()
            for _ in range(d.questions_per_scene * 4):
                if len([q for q in splits[split] if q["scene"] == sid]) >= d.questions_per_scene:
                    break
                qtype = rng.choices(QTYPES, weights)[0]
                made = QUESTIONS[qtype](rng, scene["objects"])
                if made is None or made[0] in asked:
                    continue
                asked.add(made[0])
                q, ans, steps = made
                splits[split].append({"id": f"{sid}-q{len(asked)}", "scene": sid, "image": scene["image"],
                                      "qtype": qtype, "question": q, "answer": ans, "steps": steps})
    with open(out / "scenes.jsonl", "w") as fh:
        artifacts.write_jsonl(fh, scenes)
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, rows)
    return {"scenes": {s: counts[s] for s in SPLITS},
            "overlapping_scenes": sum(s["overlap"] for s in scenes),
            "objects_per_scene": dict(sorted(collections.Counter(len(s["objects"]) for s in scenes).items())),
            "questions": {s: len(rows) for s, rows in splits.items()},
            "mix": {s: dict(collections.Counter(r["qtype"] for r in rows)) for s, rows in splits.items()},
            "answers": {s: dict(collections.Counter(r["answer"] for r in rows).most_common()) for s, rows in
                        splits.items()},
            "patches": (m.image_size // m.patch_size) ** 2}
