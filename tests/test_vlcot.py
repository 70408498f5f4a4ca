"""VL-CoT (SPEC §6): scenes with exact grounding labels, the vision head's losses, interleaved
generation, rejection filtering and scoring, against hand-computed values."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from closedloop import artifacts
from closedloop import config as cl_config
from closedloop.vlcot import scenes

NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}


@pytest.fixture
def vlcot_cfg(tmp_path):
    return cl_config.load([], [f"data_dir={tmp_path / 'data'}", f"results_dir={tmp_path / 'results'}",
                               "vlcot.data.n_train_scenes=60", "vlcot.data.n_validation_scenes=10",
                               "vlcot.data.n_heldout_scenes=10", "vlcot.data.questions_per_scene=3"])


# ---- part 1: scenes -------------------------------------------------------------------------

def test_a_shape_exactly_covering_patches_5_and_6_labels_exactly_those():
    """64×64 canvas, 16-pixel patches (a 4×4 grid): a rectangle over x 16..47, y 16..31 is patches 5 and 6."""
    objects = [{"shape": "rectangle", "color": "red", "bbox": [16, 16, 47, 31]}]
    image, labels = scenes.render(objects, 64)
    assert scenes.patch_labels(labels == 1, 16, 0.25) == [5, 6]
    assert np.asarray(image)[16, 16].tolist() == list(scenes.RGB["red"])
    assert np.asarray(image)[15, 16].tolist() == list(scenes.BACKGROUND)
    # a later object hides the earlier one where they overlap: the masks stay disjoint
    objects.append({"shape": "rectangle", "color": "blue", "bbox": [32, 16, 47, 31]})
    _, labels = scenes.render(objects, 64)
    assert scenes.patch_labels(labels == 1, 16, 0.25) == [5]
    assert scenes.patch_labels(labels == 2, 16, 0.25) == [6]
    # a patch covered by a quarter (64 of 256 pixels) is in at threshold 0.25, out at 0.3
    _, labels = scenes.render([{"shape": "rectangle", "color": "red", "bbox": [0, 0, 7, 7]}], 64)
    assert scenes.patch_labels(labels == 1, 16, 0.25) == [0]
    assert scenes.patch_labels(labels == 1, 16, 0.3) == []


def test_iou_and_f1_on_hand_sets():
    assert scenes.iou({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 4)
    assert scenes.iou([5], [6]) == 0.0
    assert scenes.iou([], []) == 1.0
    assert scenes.iou([1], []) == 0.0
    assert scenes.f1({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 * 2 / 6)
    assert scenes.f1([7, 8], [7]) == pytest.approx(2 / 3)


def _recompute(question: str, objects: list[dict]) -> str:
    """The answer from the scene graph alone (not the generator's string)."""
    def referred(ref: str) -> dict:
        words = ref.split()
        hits = [o for o in objects if o["shape"] == words[-1] and (len(words) == 1 or o["color"] == words[0])]
        assert len(hits) == 1, (question, ref)
        return hits[0]

    if m := re.fullmatch(r"what (color|shape) is the shape (left|right) of the (.+)\?", question):
        attr, side, ref = m.groups()
        anchor = referred(ref)
        sign = -1 if side == "left" else 1
        others = [o for o in objects if o is not anchor and sign * (o["cx"] - anchor["cx"]) > 0]
        return min(others, key=lambda o: abs(o["cx"] - anchor["cx"]))[attr]
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return scenes.NUMBERS[sum(o["color"] == m.group(1) for o in objects)]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return scenes.NUMBERS[sum(o["shape"] == m.group(1) for o in objects)]
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return referred(m.group(1))["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (hit,) = [o for o in objects if o["color"] == m.group(1)]
        return hit["shape"]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == m.groups() for o in objects) else "no"
    raise AssertionError(f"unparsed question {question!r}")


def test_every_generated_answer_is_right_by_construction(vlcot_cfg, tmp_path):
    out = tmp_path / "built"
    out.mkdir()
    stats = scenes.build(vlcot_cfg, out)
    graph = {s["id"]: s for s in artifacts.read_jsonl(out / "scenes.jsonl")}
    seen = {}
    for split in scenes.SPLITS:
        rows = artifacts.read_jsonl(out / f"{split}.jsonl")
        assert stats["mix"][split] == {t: sum(r["qtype"] == t for r in rows) for t in stats["mix"][split]}
        for r in rows:
            objects = graph[r["scene"]]["objects"]
            assert _recompute(r["question"], objects) == r["answer"], r
            # every ⟨look⟩'s gold patches are those of the objects it finds, from the saved mask
            mask = np.asarray(Image.open(out / graph[r["scene"]]["mask"]))
            for i, o in enumerate(objects):
                assert scenes.patch_labels(mask == i + 1, 8, 0.25) == o["patches"]
            assert scenes.chain_text(r["steps"], r["answer"]).endswith(f"Answer: {r['answer']}.")
            seen.setdefault(r["scene"], set()).add(split)
    assert all(len(s) == 1 for s in seen.values())  # splits are disjoint by scene
    assert set(stats["mix"]["train"]) == set(scenes.QTYPES)
    assert 0 < stats["overlapping_scenes"] < sum(stats["scenes"].values())
    json.dumps(stats)
