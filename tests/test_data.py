"""Task data: the schema, reproducible synthetic problems, disjoint splits, real
benchmark packages and user JSONL validation."""

import json
import re
from fractions import Fraction

import pytest

from closedloop import config, paths, synthetic, tasks
from closedloop.artifacts import read_jsonl
from closedloop.stages import data

KEYS = {"id", "question", "answer", "solution_steps", "choices"}


def check_schema(rows):
    for row in rows:
        assert set(row) == KEYS
        tasks.validate_row(row, "test")


def test_synthetic_is_reproducible_and_distinct():
    a = synthetic.generate("0:synthetic", 300, 2, 4, 20, 9)
    b = synthetic.generate("0:synthetic", 300, 2, 4, 20, 9)
    c = synthetic.generate("1:synthetic", 300, 2, 4, 20, 9)
    assert a == b and a != c
    assert len({r["question"] for r in a}) == 300 and len({r["id"] for r in a}) == 300
    check_schema(a)


def test_synthetic_gold_steps_are_correct_arithmetic():
    rows = synthetic.generate("7:x", 200, 1, 5, 30, 9)
    for row in rows:
        steps = row["solution_steps"]
        assert 2 <= len(steps) <= 6
        assert steps[-1] == f"The answer is {row['answer']}."
        value = None
        for step in steps[:-1]:
            a, op, b, result = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)\.$", step).groups()
            a, b, result = int(a), int(b), int(result)
            assert value is None or a == value  # each step continues from the last result
            assert Fraction(eval(f"{a}{op}{b}")) == result  # noqa: S307 - digits and one operator
            value = result
        assert value == int(row["answer"])


def test_synthetic_difficulty_controls_step_count():
    for row in synthetic.generate("s", 50, 3, 3, 20, 9):
        assert len(row["solution_steps"]) == 4  # 3 steps + the answer line


def test_splits_are_disjoint(smoke_cfg):
    splits = tasks.build_splits("synthetic", smoke_cfg.data.tasks.synthetic, smoke_cfg.seed)
    assert len(splits["train"]) == 32 and len(splits["heldout"]) == 12
    tasks.check_disjoint(splits, "synthetic")
    assert not {r["id"] for r in splits["train"]} & {r["id"] for r in splits["heldout"]}
    with pytest.raises(tasks.DataError, match="also appears"):
        tasks.check_disjoint({"train": splits["train"], "heldout": splits["train"][:1]}, "synthetic")


@pytest.mark.parametrize("source,n_all,n_choices", [
    ("arc_challenge", 299, None), ("sciq", 1000, 4), ("csqa", 1221, 5), ("gsm8k", 1319, 0), ("math", 500, 0),
])
def test_real_benchmarks_load_offline(source, n_all, n_choices):
    rows = tasks.BENCHMARKS[source]()
    assert len(rows) == n_all
    check_schema(rows)
    assert len({r["id"] for r in rows}) == n_all
    if n_choices is None:  # ARC has 3-5 options
        assert all(3 <= len(r["choices"]) <= 5 and r["answer"] in "ABCDE" for r in rows)
    elif n_choices:
        assert all(len(r["choices"]) == n_choices for r in rows)
    else:
        assert all(r["choices"] is None and r["answer"] for r in rows)


def test_gsm8k_gold_steps_drop_calculator_annotations():
    row = tasks.load_gsm8k()[0]
    assert row["answer"] == "18"
    assert row["solution_steps"][-1] == "The answer is 18."
    assert not any("<<" in s for s in row["solution_steps"])


def test_sciq_answer_letters_are_fixed_per_row():
    first, second = tasks.load_sciq()[:5], tasks.load_sciq()[:5]
    assert first == second
    assert {r["answer"] for r in tasks.load_sciq()[:200]} == set("ABCD")


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_user_jsonl_loads_and_validates(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", [
        json.dumps({"id": "q1", "question": "1+1?", "answer": 2}),
        json.dumps({"id": "q2", "question": "Pick", "answer": "B", "choices": ["x", "y"]}),
    ])
    rows = tasks.load_jsonl(good)
    assert rows[0]["answer"] == "2" and rows[1]["choices"] == ["x", "y"]


@pytest.mark.parametrize("bad_line,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"question": "q", "answer": "1"}), "missing required key 'id'"),
    (json.dumps({"id": "q", "question": 5, "answer": "1"}), "key 'question' must be a string"),
    (json.dumps({"id": "q", "question": "q", "answer": "1", "choices": "AB"}), "'choices' must be a list"),
    (json.dumps({"id": "q", "question": "q", "answer": "C", "choices": ["a", "b"]}), "letter A..B"),
    (json.dumps({"id": "q", "question": "q", "answer": "1", "extra": 1}), "unknown keys"),
    (json.dumps({"id": "q1", "question": "q", "answer": "1"}), "duplicate id"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_user_row_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "user.jsonl", [json.dumps({"id": "q1", "question": "ok", "answer": "1"}), bad_line])
    with pytest.raises(tasks.DataError) as err:
        tasks.load_jsonl(path)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_data_stage_writes_splits_with_config_and_provenance(smoke_cfg):
    smoke_cfg.job.task = "synthetic"
    data.main(smoke_cfg)
    out = paths.data_dir(smoke_cfg, "synthetic")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "heldout.jsonl", "provenance.json",
                                                     "stats.json", "train.jsonl", "validation.jsonl"]
    assert len(read_jsonl(out / "train.jsonl")) == 32 and len(read_jsonl(out / "heldout.jsonl")) == 12
    assert len(read_jsonl(out / "validation.jsonl")) == 12
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "data" and prov["seed"] == 0 and len(prov["config_hash"]) == 64
    saved = config.load([out / "config.yaml"], validate=False)
    assert saved.data.tasks.synthetic.n_train == 32


def test_jsonl_task_through_the_data_stage(tmp_path, smoke_cfg):
    held = write_jsonl(tmp_path / "held.jsonl", [json.dumps({"id": f"h{i}", "question": f"q{i}", "answer": i})
                                                  for i in range(5)])
    cfg = config.load([], [f"data_dir={tmp_path / 'd'}", "data.tasks.mine.source=jsonl",
                           f"data.tasks.mine.heldout_path={held}", "data.tasks.mine.n_heldout=-1",
                           "job.task=mine"])
    data.main(cfg)
    assert len(read_jsonl(tmp_path / "d" / "default" / "mine" / "heldout.jsonl")) == 5


@pytest.mark.parametrize("name", ["synthetic", "arc_challenge"])
def test_validation_split_is_disjoint_and_leaves_the_other_splits_unchanged(name):
    task = config.load([], []).data.tasks[name]
    task.n_validation = 0
    before = tasks.build_splits(name, task, 0)
    task.n_validation = 30
    after = tasks.build_splits(name, task, 0)
    assert after["train"] == before["train"] and after["heldout"] == before["heldout"]
    assert before["validation"] == [] and len(after["validation"]) == 30
    tasks.check_disjoint(after, name)
    held = {r["question"] for r in after["heldout"]} | {r["question"] for r in after["train"]}
    assert not held & {r["question"] for r in after["validation"]}


def test_overlapping_splits_are_refused():
    rows = synthetic.generate("x", 3, 2, 3, 20, 9)
    with pytest.raises(tasks.DataError, match="validation row .* also appears in the heldout split"):
        tasks.check_disjoint({"heldout": rows[:2], "train": [], "validation": rows[1:]}, "t")
