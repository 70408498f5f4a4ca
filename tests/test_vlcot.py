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


# ---- part 2: the vision head --------------------------------------------------------------

def _logit(p):
    return float(np.log(p / (1 - p)))


S = [[0.9, 0.8, 0.1, 0.1, 0.2, 0.5], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]]
B = [[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]


def test_vision_losses_on_a_2_step_6_patch_example():
    import torch

    from closedloop.vlcot.model import vision_losses

    logits = torch.tensor([[_logit(p) for p in row] for row in S])
    targets = torch.tensor(B, dtype=torch.float32)
    ln = np.log
    # BCE: Σ −B ln Ŝ − (1−B) ln(1−Ŝ) over the 12 terms, / 12
    bce = (-(ln(.9) + ln(.8) + ln(.9) + ln(.9) + ln(.8) + ln(.5)) - 6 * ln(.5)) / 12
    # Dice per step: 1 − 2·(0.9 + 0.8) / (2 + 2.6); 1 − 2·0.5 / (1 + 3.0); mean of the two
    dice = ((1 - 3.4 / 4.6) + (1 - 1.0 / 4.0)) / 2
    # entropy of P̂ = Ŝ / ΣŜ: step 1 over (0.9, 0.8, 0.1, 0.1, 0.2, 0.5) / 2.6, step 2 uniform = ln 6
    p1 = np.array(S[0]) / 2.6
    h = (-(p1 * ln(p1)).sum() + ln(6)) / 2
    out = vision_losses(logits, targets, dice_lambda=0.5, entropy_alpha=0.1, entropy="sharpen", eps=0.0)
    assert float(out["bce"]) == pytest.approx(bce, rel=1e-5)
    assert float(out["dice"]) == pytest.approx(dice, rel=1e-5)
    assert float(out["entropy"]) == pytest.approx(h, rel=1e-5)
    assert float(out["total"]) == pytest.approx(bce + 0.5 * dice + 0.1 * h, rel=1e-5)
    smooth = vision_losses(logits, targets, dice_lambda=0.5, entropy_alpha=0.1, entropy="smooth", eps=0.0)
    assert float(smooth["r_ent"]) == pytest.approx(-h, rel=1e-5)
    assert float(smooth["total"]) == pytest.approx(bce + 0.5 * dice - 0.1 * h, rel=1e-5)
    # the sign switch in action: one gradient step on R_ent alone lowers the entropy (sharpen) or raises it
    for entropy, lower in (("sharpen", True), ("smooth", False)):
        x = logits.clone().requires_grad_(True)
        vision_losses(x, targets, 0.0, 1.0, entropy)["r_ent"].backward()
        after = vision_losses(x.detach() - 1.0 * x.grad, targets, 0.0, 1.0, entropy)["entropy"]
        assert (float(after) < h) == lower


def test_encode_puts_the_selected_patches_after_each_look():
    from closedloop.vlcot.chains import encode

    ids = {"image": 9, "look": 7, "patch": 8, "pad": 0}
    enc = encode([1, 9, 9, 9, 9, 2], [3, 7, 4, 7, 5, 6], [[2, 3], []], ids, n_patches=4)
    assert enc["input_ids"] == [1, 9, 9, 9, 9, 2, 3, 7, 8, 8, 4, 7, 5, 6]
    assert enc["patch_index"] == [-1, 0, 1, 2, 3, -1, -1, -1, 2, 3, -1, -1, -1, -1]
    assert enc["labels"] == [-100] * 6 + [3, 7, -100, -100, 4, 7, 5, 6]
    assert enc["look_targets"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    cut = encode([1, 9, 9, 9, 9, 2], [3, 7, 4, 7], [[2]], ids, n_patches=4)  # the budget ended at the last ⟨look⟩
    assert cut["input_ids"][6:] == [3, 7, 8, 4, 7] and cut["look_targets"].tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]


TINY = ["vlcot.model.vision_hidden_size=32", "vlcot.model.vision_layers=1", "vlcot.model.vision_heads=2",
        "vlcot.model.text_hidden_size=64", "vlcot.model.text_intermediate_size=128", "vlcot.model.text_layers=1",
        "vlcot.model.text_heads=2", "vlcot.model.text_kv_heads=1"]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny VL-CoT model that has memorised one gold chain (teacher-forced, gold patches), and its data."""
    import torch

    from closedloop.vlcot import chains
    from closedloop.vlcot import model as vm

    tmp = tmp_path_factory.mktemp("vlcot_mem")
    cfg = cl_config.load([], [f"data_dir={tmp}", "vlcot.data.n_train_scenes=30", "vlcot.data.n_validation_scenes=1",
                              "vlcot.data.n_heldout_scenes=1", *TINY])
    scenes.build(cfg, tmp)
    row = next(r for r in artifacts.read_jsonl(tmp / "train.jsonl") if r["qtype"] == "relation")
    model, processor = vm.load(vm.base_source(cfg.vlcot.model), cfg.vlcot.model, cfg.vlcot.head, with_head=True)
    tok = processor.tokenizer
    completion, looks = chains.gold_chain(tok, row, "vision", model.ids["look"])
    n_patches = 64
    enc = chains.encode(chains.prompt_ids(tok, row["question"], n_patches, model.ids["image"]), completion, looks,
                        model.ids, n_patches)
    batch = chains.collate([enc], chains.load_images(processor, tmp, [row]), model.ids["pad"])
    torch.manual_seed(0)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-row batch: one thread is faster on a shared machine
    try:
        for _ in range(100):
            loss = model(**batch)["loss"]
            optim.zero_grad()
            loss.backward()
            optim.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, processor, tmp, row, loss.item()


def test_generation_appends_exactly_the_selected_patches_and_stops_at_the_answer(memorised):
    import torch

    from closedloop.vlcot import chains

    model, processor, data, row, loss = memorised
    assert loss < 0.05
    (out,) = chains.generate(model, processor, data, [row], max_new_tokens=40, trace=True)
    tok = processor.tokenizer
    gold_ids, gold_looks = chains.gold_chain(tok, row, "vision", model.ids["look"])
    # the chain is the memorised one up to "Answer: <a>." — and stops there, before the EOS it learnt
    assert out["completion_ids"] == gold_ids[:-1]
    assert tok.convert_ids_to_tokens(out["completion_ids"][-1]) == "."
    assert out["answer"] == row["answer"]
    assert out["looks"] == gold_looks
    feats = model.patch_features(chains.load_images(processor, data, [row]))[0]
    assert len(out["appended"]) == len(out["looks"]) == 2
    for appended, look in zip(out["appended"], out["looks"], strict=True):
        assert torch.equal(appended, feats[look])
    # with the head switched off the model cannot look: no ⟨look⟩ token is generated
    head, model.head = model.head, None
    try:
        (blind,) = chains.generate(model, processor, data, [row], max_new_tokens=12)
    finally:
        model.head = head
    assert model.ids["look"] not in blind["completion_ids"] and blind["looks"] == []


def test_a_trained_model_saves_as_a_from_pretrained_dir_plus_the_head_safetensors(memorised, tmp_path):
    import torch

    from closedloop.vlcot import chains
    from closedloop.vlcot import model as vm

    model, processor, data, row, _ = memorised
    vm.save(model, processor, tmp_path / "saved")
    assert (tmp_path / "saved" / vm.HEAD_FILE).is_file() and (tmp_path / "saved" / "model" / "config.json").is_file()
    assert not [p for p in (tmp_path / "saved").rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    cfg = cl_config.load([], TINY)
    loaded, _ = vm.load(tmp_path / "saved", cfg.vlcot.model, cfg.vlcot.head, with_head=True)
    for name, tensor in model.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[name], tensor)
    (a,) = chains.generate(model, processor, data, [row], max_new_tokens=40)
    (b,) = chains.generate(loaded, processor, data, [row], max_new_tokens=40)
    assert a["completion_ids"] == b["completion_ids"] and a["looks"] == b["looks"]


# ---- part 3: rejection sampling -------------------------------------------------------------

def test_the_rejection_filter_keeps_the_argmax_chain_and_drops_chains_under_the_threshold():
    from closedloop.vlcot.chains import keep_best

    cands = [{"function_score": s} for s in (0.4, 1.7, 1.2, 1.7)]
    assert keep_best(cands, 1.5) is cands[1]  # the arg-max (the first of a tie)
    assert keep_best(cands, 1.7) is cands[1]  # reaching the threshold is enough
    assert keep_best(cands, 1.8) is None  # the best is under the threshold: the question is dropped
    assert keep_best([], 0.0) is None


def test_kept_chains_are_teacher_forced_with_their_own_or_the_gold_looks():
    from closedloop.stages.vlcot_rejection import training_looks

    row = {"steps": [{"text": "Find the circle."}, {"look": [1, 2]}, {"text": "It is red."}]}
    assert training_looks({"looks": [[2, 3]]}, row, "sampled") == [[2, 3]]
    assert training_looks({"looks": [[2, 3]]}, row, "gold") == [[1, 2]]
    assert training_looks({"looks": [[2, 3], [4]]}, row, "gold") == [[2, 3], [4]]  # a ⟨look⟩ more than gold: its own


def test_function_score_is_correctness_plus_mean_look_iou():
    from closedloop.vlcot.chains import function_score, grounding

    row = {"answer": "blue", "steps": [{"text": "Find the triangle."}, {"look": [1, 2, 3]},
                                       {"text": "The shape left of it"}, {"look": [5]}, {"text": "is blue."}]}
    assert function_score({"answer": "blue", "looks": [[2, 3, 4], [5]]}, row) == pytest.approx(1 + (2 / 4 + 1) / 2)
    assert function_score({"answer": "red", "looks": [[1, 2, 3]]}, row) == pytest.approx((1 + 0) / 2)  # a look missing
    assert function_score({"answer": None, "looks": [[1, 2, 3], [5], [9]]}, row) == pytest.approx(2 / 3)  # one extra
    assert grounding([[2, 3, 4], [5, 6]], [[1, 2, 3], [5]])["f1"] == pytest.approx((4 / 6 + 2 / 3) / 2)


def test_agreement_of_model_and_function_scores_on_hand_values():
    from closedloop.vlcot.chains import agreement, spearman

    groups = [[{"function_score": 2.0, "model_score": 0.3, "correct": True},
               {"function_score": 0.5, "model_score": 0.9, "correct": False}],
              [{"function_score": 1.8, "model_score": 0.8, "correct": True},
               {"function_score": 0.2, "model_score": 0.1, "correct": False}]]
    a = agreement(groups)
    # ranks of f (2.0, 0.5, 1.8, 0.2) = 4 2 3 1, of m (0.3, 0.9, 0.8, 0.1) = 2 4 3 1: ρ = 1 − 6·8 / (4·15) = 0.2
    assert a["spearman_all"] == pytest.approx(0.2)
    assert a["spearman_within_mean"] == pytest.approx(0.0)  # −1 on the first question, +1 on the second
    assert a["questions_with_right_and_wrong"] == 2
    assert a["model_prefers_wrong_chain"] == pytest.approx(0.5) and a["wrong_over_right_pairs"] == pytest.approx(0.5)
    # ties share their mean rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / np.sqrt(1.5 * 2))


@pytest.mark.parametrize(("override", "key"), [
    ("vlcot.sft.variants=[vision,chains]", "vlcot.sft.variants"),
    ("vlcot.data.mix.size=1", "vlcot.data.mix"),
    ("vlcot.model.patch_size=7", "vlcot.model.patch_size"),
    ("vlcot.eval.models=[base,round1]", "vlcot.eval.models"),
    ("vlcot.eval.split=test", "vlcot.eval.split"),
])
def test_a_bad_vlcot_config_names_the_key(override, key):
    with pytest.raises(cl_config.ConfigError, match=key.replace(".", r"\.")):
        cl_config.load([], [override])


def test_the_paper_preset_scores_llava_15s_576_patches_with_lora():
    from pathlib import Path

    cfg = cl_config.load([Path(__file__).resolve().parents[1] / "configs" / "paper" / "vlcot_llava7b.yaml"])
    m = cfg.vlcot.model
    assert m.name_or_path == "llava-hf/llava-1.5-7b-hf" and (m.image_size // m.patch_size) ** 2 == 576
    assert m.lora.enabled and m.freeze_vision_tower


# ---- parts 3-5: the stages, in process, on the smoke config --------------------------------

@pytest.mark.slow
def test_the_stages_run_end_to_end_on_the_smoke_config(tmp_path):
    from pathlib import Path

    from closedloop import paths
    from closedloop.stages import vlcot_data, vlcot_eval, vlcot_rejection, vlcot_report, vlcot_sft

    root = Path(__file__).resolve().parents[1]
    cfg = cl_config.load([root / "configs" / "vlcot_smoke.yaml"],
                         [f"data_dir={tmp_path / 'data'}", f"results_dir={tmp_path / 'results'}",
                          "vlcot.sft.variants=[vision]", "vlcot.eval.models=[vision]"])
    vlcot_data.main(cfg)
    stats = json.loads((paths.vlcot_data_dir(cfg) / "stats.json").read_text())
    assert stats["patches"] == 64 and sum(stats["mix"]["train"].values()) == stats["questions"]["train"]
    cfg.job.model = "vision"
    vlcot_sft.main(cfg)
    assert (paths.vlcot_sft_dir(cfg, "vision") / "vision_head.safetensors").is_file()
    cfg.job.model = "round1"
    vlcot_rejection.main(cfg)
    out = paths.vlcot_round_dir(cfg, 1)
    samples = artifacts.read_jsonl(out / "samples.jsonl")
    assert len(samples) == 8 * 2 and all(0.0 <= s["model_score"] <= 1.0 for s in samples)
    kept = artifacts.read_jsonl(out / "kept.jsonl")
    by_q = {}
    for s in samples:
        by_q.setdefault(s["id"], []).append(s)
    assert [k["function_score"] for k in kept] == [max(c["function_score"] for c in by_q[k["id"]]) for k in kept]
    assert set(json.loads((out / "agreement.json").read_text())) >= {"spearman_all", "model_prefers_wrong_chain"}
    for tag in ("vision", "round1"):
        cfg.job.model = tag
        vlcot_eval.main(cfg)
        m = json.loads((paths.vlcot_eval_dir(cfg, tag) / "metrics.json").read_text())
        preds = artifacts.read_jsonl(paths.vlcot_eval_dir(cfg, tag) / "predictions.jsonl")
        assert m["all"]["n"] == len(preds) == stats["questions"]["heldout"]
        assert m["all"]["accuracy"] == pytest.approx(np.mean([p["correct"] for p in preds]))
        assert 0.0 <= m["iou"]["mean"] <= 1.0 and set(m["by_type"]) == set(scenes.QTYPES)
    vlcot_report.main(cfg)
    report = paths.vlcot_report_file(cfg).read_text()
    assert "| vision → round1 |" in report and "| 1 | 16 |" in report
    assert "| vlcot_rejection round1 |" in report


def test_stage_views_are_narrow():
    cfg = cl_config.load([])
    assert set(cl_config.stage_view(cfg, "vlcot_data")["vlcot"]) == {"model", "data"}
    assert set(cl_config.stage_view(cfg, "vlcot_sft", model="vision")["vlcot"]) == {"model", "data", "head", "sft"}
    assert "eval" not in cl_config.stage_view(cfg, "vlcot_rejection", model="round1")["vlcot"]
    assert "vlm" not in cl_config.stage_view(cfg, "vlcot_eval", model="vision")


@pytest.mark.slow
def test_vlcot_all_dag_is_its_own_target(repo_copy):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile",
                          "configs/vlcot_smoke.yaml", "--", "vlcot_all"], cwd=repo_copy, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = re.search(r"job\s+count\n[-\s]+\n(.*?)\ntotal", out.stdout, re.S)
    jobs = {m[0]: int(m[1]) for m in re.findall(r"(\w+)\s+(\d+)", table.group(1))}
    assert jobs == {"vlcot_data": 1, "vlcot_sft": 3, "vlcot_rejection": 1, "vlcot_eval": 5, "vlcot_report": 1,
                    "vlcot_all": 1}


def test_lora_trains_the_adapter_and_saves_merged_weights(memorised, tmp_path):
    import torch
    from safetensors.torch import load_file

    from closedloop.vlcot import chains
    from closedloop.vlcot import model as vm

    _, _, data, row, _ = memorised
    cfg = cl_config.load([], [*TINY, "vlcot.model.lora.enabled=true", "vlcot.model.lora.r=4",
                              "vlcot.model.freeze_vision_tower=true"])
    model, processor = vm.load(vm.base_source(cfg.vlcot.model), cfg.vlcot.model, cfg.vlcot.head, with_head=True)
    vm.freeze_and_lora(model, cfg.vlcot.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.startswith("head.") for n in trainable)
    assert not any("vision_tower" in n or ("language_model" in n and "lora_" not in n) for n in trainable)
    q = model.llava.model.language_model.layers[0].self_attn.q_proj
    base_q = q.get_base_layer().weight.detach().clone()
    tok = processor.tokenizer
    completion, looks = chains.gold_chain(tok, row, "vision", model.ids["look"])
    enc = chains.encode(chains.prompt_ids(tok, row["question"], 64, model.ids["image"]), completion, looks,
                        model.ids, 64)
    batch = chains.collate([enc], chains.load_images(processor, data, [row]), model.ids["pad"])
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(**batch)["loss"]
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    assert torch.equal(q.get_base_layer().weight, base_q)  # LoRA leaves the base weights alone
    with torch.no_grad():
        before = model(**batch)["loss"]
    vm.save(model, processor, tmp_path / "lora")
    assert not any("lora_" in k for k in load_file(tmp_path / "lora" / "model" / "model.safetensors"))
    loaded, _ = vm.load(tmp_path / "lora", cfg.vlcot.model, cfg.vlcot.head, with_head=True)
    with torch.no_grad():
        assert float(loaded(**batch)["loss"]) == pytest.approx(float(before), rel=1e-4)
