"""The V-DPO branch's data (stage ``vlm_data``): easy-VQA scenes, SFT questions and a POPE-style held-out set (SPEC §4).

easy-VQA (package ``easy-vqa`` 1.0) ships 64×64 images with one shape of one colour on a
plain background, and questions about them; it has no per-image labels. The scene of an
image (its shape and colour) is derived here from its own questions: every answer to a
"what" question names the shape or the colour; every yes/no question says a shape or
colour is (not) present, so two absent shapes leave the third. Images whose shape stays
unknown are skipped; a missing colour is read from the pixels (nearest entry of a colour
table measured on the labelled images).

The POPE-style set (the real POPE is built on COCO, which no package here ships) asks,
for each held-out test image, one yes and one no question in each of three splits:

- ``random``: "Is there a <s'> in the image?" with s' drawn from the absent shapes;
- ``popular``: s' = the absent shape most frequent in the training scenes;
- ``adversarial``: the questions name colour and shape, "Is there a <c> <s> in the
  image?", and the negative keeps one of them and swaps the other (same colour with an
  absent shape, or the present shape in an absent colour), alternating. With one object
  per image there is no co-occurrence to mine; sharing an attribute with the present
  object is the closest analogue of POPE's co-occurring objects.

Output ``data/<experiment>/vlm/``: ``images/{train,test}/<id>.png`` (copies of the images
used), ``scenes.jsonl``, ``sft.jsonl`` (image, prompt, completion, source), ``pope.jsonl`` (image,
question, label, split), ``val.jsonl`` (the same POPE-style questions on ``images/val/``: training-split
images used by neither SFT nor the pairs, for choosing γ; never the held-out test images),
``stats.json``.

SFT rows per training image: ``questions_per_image`` easy-VQA questions, ``presence_pairs_per_image``
balanced yes/no presence pairs in the POPE templates (:func:`presence_questions`) and a description.
"""

from __future__ import annotations

import collections
import random
import re
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from closedloop import artifacts
from closedloop.vlm import model as vlm

NEGATION = re.compile(r"\b(not|no)\b")
SPLITS = ("random", "popular", "adversarial")


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("stage vlm_data needs the easy-vqa package: pip install --no-deps easy-vqa==1.0") from err
    return easy_vqa


def question_facts(question: str, answer: str) -> list[tuple[str, str, bool]]:
    """(kind, value, present) facts one easy-VQA question-answer pair states about its image."""
    words = re.findall(r"[a-z]+", question.lower())
    if words[0] == "what":
        kind = "shape" if answer in vlm.SHAPES else "color"
        facts = [(kind, answer, True)]
        for w in words:  # "what is the red shape?" / "what color is the circle?"
            if w in vlm.COLORS:
                facts.append(("color", w, True))
            elif w in vlm.SHAPES:
                facts.append(("shape", w, True))
        return facts
    negated = bool(NEGATION.search(question.lower()))
    present = (answer == "yes") != negated
    for w in words:
        if w in vlm.COLORS:
            return [("color", w, present)]
        if w in vlm.SHAPES:
            return [("shape", w, present)]
    return []


def scenes_from_questions(texts, answers, image_ids) -> dict[int, dict]:
    """Shape and colour per image id from that image's questions (see the module docstring)."""
    facts: dict[int, dict] = collections.defaultdict(lambda: {"shape": set(), "color": set(), "not_shape": set()})
    for q, a, i in zip(texts, answers, image_ids, strict=True):
        for kind, value, present in question_facts(q, a):
            if present:
                facts[i][kind].add(value)
            elif kind == "shape":
                facts[i]["not_shape"].add(value)
    scenes = {}
    for i, f in facts.items():
        shapes = f["shape"] or (set(vlm.SHAPES) - f["not_shape"] if len(f["not_shape"]) == 2 else set())
        if len(shapes) != 1 or len(f["color"]) > 1:
            continue
        scenes[i] = {"shape": next(iter(shapes)), "color": next(iter(f["color"]), None)}
    return scenes


def background(pixels: np.ndarray) -> np.ndarray:
    """The plain background colour: the most frequent pixel value."""
    values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    return values[counts.argmax()].astype(int)


def object_mask(pixels: np.ndarray, threshold: int = 40) -> np.ndarray:
    """Pixels of the shape: further than ``threshold`` (max over RGB) from the background."""
    return np.abs(pixels.astype(int) - background(pixels)).max(axis=2) > threshold


def object_color(pixels: np.ndarray) -> np.ndarray:
    """The shape's fill colour: the most frequent value among its pixels."""
    inside = pixels[object_mask(pixels)]
    values, counts = np.unique(inside.reshape(-1, 3), axis=0, return_counts=True)
    return values[counts.argmax()].astype(int)


def load_rgb(path: Path | str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def color_table(scenes: dict[int, dict], image_paths: dict[int, str], per_color: int = 20) -> dict[str, list[int]]:
    """RGB of each colour name, measured as the median fill colour of labelled images."""
    seen: dict[str, list] = collections.defaultdict(list)
    for i, s in sorted(scenes.items()):
        if s["color"] and len(seen[s["color"]]) < per_color:
            seen[s["color"]].append(object_color(load_rgb(image_paths[i])))
    missing = set(vlm.COLORS) - set(seen)
    if missing:
        raise ValueError(f"easy-vqa: no labelled image of colour(s) {sorted(missing)}; cannot build the colour table")
    return {c: [int(v) for v in np.median(np.stack(seen[c]), axis=0)] for c in vlm.COLORS}


def nearest_color(rgb, table: dict[str, list[int]]) -> str:
    return min(table, key=lambda c: float(np.sum((np.asarray(table[c]) - np.asarray(rgb)) ** 2)))


def complete_scenes(scenes, image_paths, table) -> None:
    for i, s in scenes.items():
        if s["color"] is None:
            s["color"] = nearest_color(object_color(load_rgb(image_paths[i])), table)


def pope_rows(scenes: dict[int, dict], ids: list[int], popularity: list[str], rng: random.Random,
              folder: str = "test") -> list[dict]:
    """Balanced yes/no object-presence questions, one yes and one no per image and split
    (images under ``images/<folder>/``: ``test`` for the held-out set, ``val`` for γ selection)."""
    rows = []
    for n, i in enumerate(ids):
        shape, color = scenes[i]["shape"], scenes[i]["color"]
        absent = [s for s in vlm.SHAPES if s != shape]
        other_colors = [c for c in vlm.COLORS if c != color]
        popular = next(s for s in popularity if s != shape)
        if n % 2 == 0:
            adv_negative, adv_kind = f"{color} {rng.choice(absent)}", "same_color_other_shape"
        else:
            adv_negative, adv_kind = f"{rng.choice(other_colors)} {shape}", "same_shape_other_color"
        questions = {
            "random": ((shape, "present"), (rng.choice(absent), "random_absent_shape")),
            "popular": ((shape, "present"), (popular, "most_frequent_absent_shape")),
            "adversarial": ((f"{color} {shape}", "present"), (adv_negative, adv_kind)),
        }
        for split in SPLITS:
            for (obj, kind), label in zip(questions[split], ("yes", "no"), strict=True):
                rows.append({"id": f"{split}-{i}-{label}", "image": f"images/{folder}/{i}.png", "image_id": i,
                             "split": split, "question": f"Is there a {obj} in the image?", "object": obj,
                             "label": label, "negative_kind": None if label == "yes" else kind,
                             "scene": {"shape": shape, "color": color}})
    return rows


def presence_questions(scene: dict, n: int, pairs: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(object, answer, kind) for ``pairs`` balanced yes/no presence questions about one training image.

    Pair 1 asks about a shape (the present one; a random absent one), pair 2 about a colour
    and shape (the present pair; the same colour with an absent shape or the same shape in
    an absent colour, alternating with ``n``): the templates of the POPE-style set, asked of
    training images only. easy-VQA's own presence questions cannot teach this: their
    un-negated form ("is there a circle?") is answered "no" 82% of the time (11608 of 14187
    in the train split), and they never name colour and shape together.
    """
    shape, color = scene["shape"], scene["color"]
    absent = [s for s in vlm.SHAPES if s != shape]
    out = [(shape, "yes", "present"), (rng.choice(absent), "no", "absent_shape")]
    if pairs >= 2:
        if n % 2 == 0:
            negative = (f"{color} {rng.choice(absent)}", "no", "same_color_other_shape")
        else:
            negative = (f"{rng.choice([c for c in vlm.COLORS if c != color])} {shape}", "no", "same_shape_other_color")
        out += [(f"{color} {shape}", "yes", "present"), negative]
    return out


def has_object(scene: dict, obj: str) -> bool:
    """Does ``scene`` show ``obj`` ("circle" or "red circle")?"""
    *color, shape = obj.split()
    return scene["shape"] == shape and (not color or scene["color"] == color[0])


def contrast_image(obj: str, answer: str, scenes: dict[int, dict], ids: list[int], rng: random.Random,
                   pools: dict | None = None) -> int | None:
    """A training image on which "Is there a ``obj``?" has the answer opposite to ``answer``.

    For a yes-question about a colour + shape the image keeps one of the two (the same shape in
    another colour, or the same colour on another shape, at random): the question is only answered
    by reading both. A yes-question about a shape gets an image of another shape; a no-question an
    image that shows ``obj``. None when no image in ``ids`` qualifies (tiny configs). ``pools``: a
    dict the caller keeps across calls, so each candidate list is built from ``ids`` once."""
    *color, shape = obj.split()
    if answer == "no":
        key = ("shows", obj)
    elif color:
        key = ("same_color", obj) if rng.random() < 0.5 else ("same_shape", obj)
    else:
        key = ("other_shape", obj)
    pools = {} if pools is None else pools
    if key not in pools:
        keep = {"shows": lambda sc: has_object(sc, obj),
                "same_color": lambda sc: sc["color"] == color[0] and sc["shape"] != shape,
                "same_shape": lambda sc: sc["shape"] == shape and sc["color"] != color[0],
                "other_shape": lambda sc: sc["shape"] != shape}[key[0]]
        pool = [i for i in ids if keep(scenes[i])]
        if answer == "yes" and not pool:
            pool = [i for i in ids if not has_object(scenes[i], obj)]
        pools[key] = pool
    return rng.choice(pools[key]) if pools[key] else None


def sft_rows(scenes, ids, questions_by_image, per_image: int, rng: random.Random, presence_pairs: int = 0,
             contrast: bool = False) -> list[dict]:
    """easy-VQA questions of the training images (``per_image`` each), ``presence_pairs``
    balanced yes/no presence-question pairs (:func:`presence_questions`) and one description each.

    ``contrast`` (``vlm.data.presence_contrast``): every presence question is also asked of another
    training image where its answer flips (:func:`contrast_image`), and an image's presence rows with
    their contrast rows share a ``group`` (every other row is a group of its own), which the SFT
    sampler keeps together in one batch (:class:`closedloop.vlm.vision.GroupShuffleSampler`). Within a
    group the answers are balanced per image and per question text: neither the image alone nor the
    question alone predicts them, so the gradient from the question text or from the image cancels
    within the batch and what is left needs both."""
    rows, pools = [], {}
    for n, i in enumerate(ids):
        image = f"images/train/{i}.png"
        qs = list(questions_by_image[i])
        rng.shuffle(qs)
        for q, a in qs[:per_image]:
            rows.append({"image": image, "image_id": i, "prompt": vlm.prompt(q), "completion": vlm.answer_text(a),
                         "source": "easy_vqa"})
        s = scenes[i]
        if presence_pairs:
            group = []
            for obj, a, kind in presence_questions(s, n, presence_pairs, rng):
                question = vlm.prompt(f"Is there a {obj} in the image?")
                group.append({"image": image, "image_id": i, "prompt": question, "completion": vlm.answer_text(a),
                              "source": "presence", "kind": kind})
                if contrast and (j := contrast_image(obj, a, scenes, ids, rng, pools)) is not None:
                    flipped = "no" if a == "yes" else "yes"
                    group.append({"image": f"images/train/{j}.png", "image_id": j, "prompt": question,
                                  "completion": vlm.answer_text(flipped), "source": "presence",
                                  "kind": f"contrast_{flipped}"})
            rows.extend([group] if contrast else group)
        rows.append({"image": image, "image_id": i, "prompt": vlm.prompt("Describe the image."),
                     "completion": f" A {s['color']} {s['shape']}.", "source": "describe"})
    rng.shuffle(rows)
    out = []
    for g, item in enumerate(rows):  # a group's rows stay adjacent, numbered by their shuffled position
        for r in item if isinstance(item, list) else [item]:
            out.append({**r, "group": g} if contrast else r)
    return out


def build(cfg, out: Path) -> dict:
    """Write the branch's data into ``out``; return its stats."""
    ev = _easy_vqa()
    d = cfg.vlm.data
    rng = random.Random(cfg.seed)
    train_q, test_q = ev.get_train_questions(), ev.get_test_questions()
    train_paths, test_paths = ev.get_train_image_paths(), ev.get_test_image_paths()
    train_scenes, test_scenes = scenes_from_questions(*train_q), scenes_from_questions(*test_q)
    table = color_table(train_scenes, train_paths)
    complete_scenes(train_scenes, train_paths, table)
    complete_scenes(test_scenes, test_paths, table)
    counts = collections.Counter(s["shape"] for s in train_scenes.values())
    popularity = [s for s, _ in counts.most_common()]

    train_ids = sorted(train_scenes)
    rng.shuffle(train_ids)
    train_ids = sorted(train_ids[: d.n_train_images])
    test_ids = sorted(test_scenes)
    rng.shuffle(test_ids)
    test_ids = sorted(test_ids[: d.n_pope_images])
    # The validation images (γ selection) are training-split images that neither SFT nor the pairs use.
    unused = sorted(set(train_scenes) - set(train_ids))
    rng.shuffle(unused)
    val_ids = sorted(unused[: d.n_val_images])
    if len(train_ids) < d.n_train_images or len(test_ids) < d.n_pope_images or len(val_ids) < d.n_val_images:
        raise ValueError(f"vlm.data: asked for {d.n_train_images} train + {d.n_val_images} validation / "
                         f"{d.n_pope_images} POPE images, easy-VQA has {len(train_scenes)} / {len(test_scenes)} "
                         "with a known scene")
    questions_by_image = collections.defaultdict(list)
    for q, a, i in zip(*train_q, strict=True):
        questions_by_image[i].append((q, a))

    for split, ids, paths in (("train", train_ids, train_paths), ("val", val_ids, train_paths),
                              ("test", test_ids, test_paths)):
        (out / "images" / split).mkdir(parents=True)
        for i in ids:
            shutil.copyfile(paths[i], out / "images" / split / f"{i}.png")
    sft = sft_rows(train_scenes, train_ids, questions_by_image, d.questions_per_image, rng, d.presence_pairs_per_image,
                   d.presence_contrast)
    pope = pope_rows(test_scenes, test_ids, popularity, rng)
    val = pope_rows(train_scenes, val_ids, popularity, rng, folder="val")
    scenes = [{"split": "train", "image_id": i, "image": f"images/train/{i}.png", **train_scenes[i]} for i in train_ids]
    scenes += [{"split": "val", "image_id": i, "image": f"images/val/{i}.png", **train_scenes[i]} for i in val_ids]
    scenes += [{"split": "test", "image_id": i, "image": f"images/test/{i}.png", **test_scenes[i]} for i in test_ids]
    for name, rows in (("scenes", scenes), ("sft", sft), ("pope", pope), ("val", val)):
        with open(out / f"{name}.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, rows)
    return {"source": {"package": "easy-vqa", "version": metadata.version("easy-vqa")},
            "scenes_known": {"train": len(train_scenes), "test": len(test_scenes)},
            "train_images": len(train_ids), "val_images": len(val_ids), "pope_images": len(test_ids),
            "sft_rows": len(sft), "sft_sources": dict(collections.Counter(r["source"] for r in sft)),
            "sft_presence_answers": dict(collections.Counter(r["completion"] for r in sft if r["source"] == "presence")),
            "val_rows": len(val),
            "pope_rows": len(pope), "pope_per_split": dict(collections.Counter(r["split"] for r in pope)),
            "shape_popularity": dict(counts.most_common()), "color_table": table}
