"""easy-VQA scenes, the POPE-style set and the image edits of the V-DPO pairs (SPEC §4)."""

import collections

import numpy as np
import pytest

from closedloop import config, paths
from closedloop.stages import vlm_data as vlm_data_stage
from closedloop.vlm import model as vlm
from closedloop.vlm import pairs as vdpo_pairs
from closedloop.vlm import scenes as vlm_data

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """vlm_data's output for the smoke config, built once."""
    tmp = tmp_path_factory.mktemp("vlm")
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"], [f"data_dir={tmp / 'data'}", f"results_dir={tmp / 'r'}",
                                                              "vlm.data.n_pope_images=40"])
    vlm_data_stage.main(cfg)
    return cfg, paths.vlm_data_dir(cfg)


@pytest.mark.parametrize("question,answer,facts", [
    ("what is the red shape?", "triangle", [("shape", "triangle", True), ("color", "red", True)]),
    ("what color is the circle?", "blue", [("color", "blue", True), ("shape", "circle", True)]),
    ("is there not a black shape in the image?", "yes", [("color", "black", False)]),
    ("is no blue shape present?", "no", [("color", "blue", True)]),
    ("does the image contain a circle?", "no", [("shape", "circle", False)]),
    ("is a rectangle present?", "yes", [("shape", "rectangle", True)]),
])
def test_question_facts(question, answer, facts):
    assert vlm_data.question_facts(question, answer) == facts


def test_two_absent_shapes_leave_the_third():
    scenes = vlm_data.scenes_from_questions(
        ["does the image contain a circle?", "is there a triangle?", "what color is the shape?"],
        ["no", "no", "green"], [7, 7, 7])
    assert scenes == {7: {"shape": "rectangle", "color": "green"}}


def test_scene_colours_agree_with_the_pixels(built):
    cfg, data = built
    import json

    table = json.loads((data / "stats.json").read_text())["color_table"]
    from closedloop import artifacts

    scenes = artifacts.read_jsonl(data / "scenes.jsonl")
    agree = [vlm_data.nearest_color(vlm_data.object_color(vlm_data.load_rgb(data / s["image"])), table) == s["color"]
             for s in scenes]
    assert len(scenes) == 16 + 4 + 40 and all(agree)


def test_pope_set_is_balanced_and_its_negatives_are_absent(built):
    from closedloop import artifacts

    _, data = built
    rows = artifacts.read_jsonl(data / "pope.jsonl")
    assert collections.Counter((r["split"], r["label"]) for r in rows) == {
        (s, lab): 40 for s in vlm_data.SPLITS for lab in ("yes", "no")}
    for r in rows:
        scene = r["scene"]
        present = r["object"] in (scene["shape"], f"{scene['color']} {scene['shape']}")
        assert present == (r["label"] == "yes"), r
        assert r["question"] == f"Is there a {r['object']} in the image?"
    adversarial = collections.Counter(r["negative_kind"] for r in rows if r["split"] == "adversarial")
    assert adversarial == {None: 40, "same_color_other_shape": 20, "same_shape_other_color": 20}
    popular = {r["object"] for r in rows if r["split"] == "popular" and r["label"] == "no"}
    assert popular <= set(vlm.SHAPES)


def _image(data, shape=None):
    from closedloop import artifacts

    scenes = [s for s in artifacts.read_jsonl(data / "scenes.jsonl") if shape is None or s["shape"] == shape]
    return scenes[0], vlm_data.load_rgb(data / scenes[0]["image"])


@pytest.mark.parametrize("shape", vlm.SHAPES)
def test_remove_really_removes_the_object(built, shape):
    _, data = built
    scene, pixels = _image(data, shape)
    assert vlm_data.object_mask(pixels).sum() > 20
    edited = vdpo_pairs.remove_object(pixels)
    bg = vlm_data.background(pixels)
    assert vlm_data.object_mask(edited).sum() == 0
    assert (edited == bg).all()  # not a pixel of the shape or its anti-aliased edge is left
    assert np.any(edited != pixels, axis=2).sum() >= vlm_data.object_mask(pixels).sum()


@pytest.mark.parametrize("shape", vlm.SHAPES)
def test_recolour_really_recolours_the_object(built, shape):
    import json

    _, data = built
    table = json.loads((data / "stats.json").read_text())["color_table"]
    scene, pixels = _image(data, shape)
    new = next(c for c in vlm.COLORS if c != scene["color"] and c != "black")
    edited = vdpo_pairs.recolour_object(pixels, table[new])
    old_fill = np.all(pixels == np.array(table[scene["color"]]), axis=2)
    new_fill = np.all(edited == np.array(table[new]), axis=2)
    assert old_fill.sum() > 0
    assert np.all(edited == np.array(table[scene["color"]]), axis=2).sum() == 0  # old colour gone
    assert (new_fill == old_fill).all()  # exactly the fill pixels now carry the new colour
    bg = vlm_data.background(pixels)
    assert not (np.any(edited != bg, axis=2) & np.all(pixels == bg, axis=2)).any()  # nothing painted outside it
    assert vlm_data.nearest_color(vlm_data.object_color(edited), table) == new
    untouched = np.all(pixels == vlm_data.background(pixels), axis=2)
    assert (edited[untouched] == pixels[untouched]).all()  # background untouched


def test_presence_sft_rows_are_balanced_true_and_on_training_images_only(built):
    from closedloop import artifacts

    _, data = built
    sft = artifacts.read_jsonl(data / "sft.jsonl")
    scenes = {s["image"]: s for s in artifacts.read_jsonl(data / "scenes.jsonl")}
    presence = [r for r in sft if r["source"] == "presence"]
    assert len(presence) == 16 * 4  # smoke: 16 images × 2 pairs
    assert collections.Counter(r["completion"] for r in presence) == {" Yes.": 32, " No.": 32}
    for r in presence:
        scene = scenes[r["image"]]
        obj = r["prompt"].split("Is there a ", 1)[1].split(" in the image?")[0]
        assert (obj in (scene["shape"], f"{scene['color']} {scene['shape']}")) == (r["completion"] == " Yes."), r
    assert collections.Counter(r["kind"] for r in presence if r["completion"] == " No.") == {
        "absent_shape": 16, "same_color_other_shape": 8, "same_shape_other_color": 8}
    held_out = {s["image_id"] for s in scenes.values() if s["split"] in ("test", "val")}
    assert all(r["image"].startswith("images/train/") for r in sft)
    assert not {r["image_id"] for r in sft} & {s["image_id"] for s in scenes.values() if s["split"] == "val"}
    test_images = {s["image"] for s in scenes.values() if s["split"] == "test"}
    assert not {r["image"] for r in sft} & test_images and held_out


def test_validation_split_is_pope_style_and_disjoint_from_test_and_training(built):
    from closedloop import artifacts

    _, data = built
    val = artifacts.read_jsonl(data / "val.jsonl")
    pope = artifacts.read_jsonl(data / "pope.jsonl")
    scenes = artifacts.read_jsonl(data / "scenes.jsonl")
    assert collections.Counter((r["split"], r["label"]) for r in val) == {
        (s, lab): 4 for s in vlm_data.SPLITS for lab in ("yes", "no")}
    val_images = {r["image"] for r in val}
    assert all(im.startswith("images/val/") and (data / im).is_file() for im in val_images)
    # easy-VQA's train and test splits number their images separately: compare the source files' pixels too
    assert not val_images & {r["image"] for r in pope}
    test_pixels = {vlm_data.load_rgb(data / r["image"]).tobytes() for r in pope}
    assert not {vlm_data.load_rgb(data / im).tobytes() for im in val_images} & test_pixels
    train_ids = {s["image_id"] for s in scenes if s["split"] == "train"}
    assert not {r["image_id"] for r in val} & train_ids
    for r in val:
        present = r["object"] in (r["scene"]["shape"], f"{r['scene']['color']} {r['scene']['shape']}")
        assert present == (r["label"] == "yes")


def test_presence_questions_can_be_switched_off(tmp_path):
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"], [f"data_dir={tmp_path}", "vlm.data.presence_pairs_per_image=0"])
    vlm_data_stage.main(cfg)
    from closedloop import artifacts

    sft = artifacts.read_jsonl(paths.vlm_data_dir(cfg) / "sft.jsonl")
    assert {r["source"] for r in sft} == {"easy_vqa", "describe"}


SCENES = {1: {"shape": "circle", "color": "red"}, 2: {"shape": "circle", "color": "blue"},
          3: {"shape": "triangle", "color": "red"}, 4: {"shape": "rectangle", "color": "green"},
          5: {"shape": "triangle", "color": "blue"}, 6: {"shape": "rectangle", "color": "red"}}


def test_contrast_rows_flip_the_answer_on_another_image_and_stay_in_one_group():
    """vlm.data.presence_contrast: each presence question is asked again of an image where the answer
    flips; an image's presence rows and their contrasts form one group, adjacent, in which every
    question text is answered yes as often as no."""
    import random

    questions = {i: [("what shape is in the image?", s["shape"])] for i, s in SCENES.items()}
    rows = vlm_data.sft_rows(SCENES, sorted(SCENES), questions, 1, random.Random(0), 2, contrast=True)
    presence = [r for r in rows if r["source"] == "presence"]
    contrasts = [r for r in presence if r["kind"].startswith("contrast_")]
    # 2 pairs per image; each question asked again unless no image here shows a no-question's object
    assert len(presence) - len(contrasts) == 6 * 4 and len(contrasts) >= 0.8 * 6 * 4
    for r in presence:  # every answer is the truth about the row's own image (checked by hand below)
        obj = r["prompt"].split("Is there a ")[1].split(" in the image?")[0]
        truth = SCENES[r["image_id"]]["shape"] == obj.split()[-1] and (
            len(obj.split()) == 1 or SCENES[r["image_id"]]["color"] == obj.split()[0])
        assert r["completion"] == (" Yes." if truth else " No.")
    by_group = collections.defaultdict(list)
    for n, r in enumerate(rows):
        by_group[r["group"]].append(n)
    assert all(idx == list(range(idx[0], idx[0] + len(idx))) for idx in by_group.values())  # adjacent
    for idx in by_group.values():
        group = [rows[n] for n in idx]
        if group[0]["source"] != "presence":
            assert len(group) == 1
            continue
        assert len({r["image_id"] for r in group}) > 1 and 4 < len(group) <= 8
        for prompt in {r["prompt"] for r in group}:
            answers = sorted(r["completion"] for r in group if r["prompt"] == prompt)
            assert answers == [" No.", " Yes."] or (len(answers) == 1 and answers == [" No."])
    # a "red circle" yes-question's contrast keeps the colour or the shape (here 2 blue circle, 3 red triangle, 6 red rectangle)
    assert vlm_data.contrast_image("red circle", "yes", SCENES, sorted(SCENES), random.Random(1)) in (2, 3, 6)
    assert vlm_data.contrast_image("blue triangle", "no", SCENES, sorted(SCENES), random.Random(1)) == 5
    assert vlm_data.contrast_image("green circle", "no", SCENES, sorted(SCENES), random.Random(1)) is None


def test_group_sampler_keeps_groups_together_and_reshuffles_per_epoch():
    from closedloop.vlm.vision import GroupShuffleSampler

    groups = [0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5, 5]
    sampler = GroupShuffleSampler(groups, seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(len(groups))) and len(sampler) == len(groups)
    positions = {g: [first.index(i) for i, gg in enumerate(groups) if gg == g] for g in set(groups)}
    assert all(p == list(range(p[0], p[0] + len(p))) for p in positions.values())
    assert list(GroupShuffleSampler(groups, seed=7)) == first  # deterministic per (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != first
