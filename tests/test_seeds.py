"""Seeds as a dimension (SPEC §7): the two-level bootstrap of a paired gain against an exact
enumeration, and the report over seeds on hand-made per-seed predictions."""

import itertools
import json

import numpy as np
import pytest

from closedloop import artifacts, paths, reporting, stats

BASE = np.array([[1, 0, 0],   # seed 0 of the SFT model, questions q0..q2
                 [1, 1, 0]])  # seed 1
MODEL = np.array([[1, 1, 0],
                  [0, 1, 1]])  # d = [[0, 1, 0], [-1, 0, 1]]


def test_paired_gain_matches_a_hand_computation_and_the_exact_bootstrap_distribution():
    g = stats.paired_gain_over_seeds(BASE, MODEL, n_boot=40_000, level=0.9, seed=1)
    assert g["gain"] == pytest.approx(1 / 6)  # (1 + 0) / 6 cells
    assert g["per_seed"] == pytest.approx([1 / 3, 0.0])
    assert (g["gained"], g["lost"], g["n_seeds"], g["n_questions"]) == (2, 1, 2, 3)
    # every (seed draw, question draw) is equally likely: 2^2 * 3^3 = 108 outcomes
    d = MODEL - BASE
    exact = sorted(d[list(s)][:, list(q)].mean() for s in itertools.product(range(2), repeat=2)
                   for q in itertools.product(range(3), repeat=3))
    cdf = {v: sum(x <= v + 1e-12 for x in exact) / len(exact) for v in set(exact)}
    lo = min(v for v in cdf if cdf[v] >= 0.05)
    hi = min(v for v in cdf if cdf[v] >= 0.95)
    # exact CDF: P(g <= -4/6) = 4/108 < 0.05 <= P(g <= -3/6) = 6/108; P(g <= 3/6) = 97/108 < 0.95 <= 106/108
    assert (lo, hi) == (pytest.approx(-1 / 2), pytest.approx(2 / 3))
    assert g["ci_low"] == pytest.approx(lo) and g["ci_high"] == pytest.approx(hi)


def test_one_seed_is_the_paired_bootstrap_over_questions():
    g = stats.paired_gain_over_seeds(np.array([[1, 1, 1, 1]]), np.array([[1, 1, 1, 1]]), n_boot=100)
    assert (g["gain"], g["ci_low"], g["ci_high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="seeds, questions"):
        stats.paired_gain_over_seeds(BASE, MODEL[:, :2])


def test_seed_summary_is_mean_and_sample_sd():
    s = stats.seed_summary({0: 0.5, 1: 0.6, 2: 0.7})
    assert s["mean"] == pytest.approx(0.6) and s["sd"] == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert stats.seed_summary({3: 0.4})["sd"] == 0.0


def test_report_over_seeds_on_hand_made_predictions(smoke_cfg):
    cfg = smoke_cfg
    cfg.seeds, cfg.eval.tasks, cfg.eval.models, cfg.loop.iterations = [0, 1], ["synthetic"], ["sft"], 1
    cfg.loop.ablations = ["plain_dpo"]
    ablation = np.array([[0, 0, 0],
                         [0, 1, 1]])  # closed loop − ablation = [[1, 1, 0], [0, 0, 0]]
    correct = {"sft": BASE, "iter1": MODEL, "ablations/plain_dpo/iter1": ablation}
    for s in (0, 1):
        seed_cfg = paths.for_seed(cfg, s)
        assert paths.run_dir(seed_cfg).name == f"seed{s}"
        for tag, table in correct.items():
            out = paths.eval_dir(seed_cfg, tag, "synthetic")
            out.mkdir(parents=True)
            rows = [{"id": f"q{i}", "correct": [bool(table[s][i])]} for i in (2, 0, 1)]  # order does not matter
            with open(out / "predictions.jsonl", "w") as fh:
                artifacts.write_jsonl(fh, rows)
    agg = reporting.seeds_aggregate(cfg, reporting.seed_scores(cfg), 2000, 0.95)
    assert agg["accuracy"]["sft/synthetic"]["per_seed"] == pytest.approx({0: 1 / 3, 1: 2 / 3})
    assert agg["accuracy"]["sft/synthetic"]["mean"] == pytest.approx(0.5)
    assert agg["accuracy"]["sft/synthetic"]["sd"] == pytest.approx(np.std([1 / 3, 2 / 3], ddof=1))
    assert agg["accuracy"]["iter1/synthetic"]["per_seed"] == pytest.approx({0: 2 / 3, 1: 2 / 3})
    gain = agg["gain_over_sft"]["iter1/synthetic"]
    assert gain["gain"] == pytest.approx(1 / 6) and (gain["gained"], gain["lost"]) == (2, 1)
    md = reporting.render_seeds(cfg, json.loads(json.dumps(agg)))
    assert "| sft | 50.0 ± 23.6 (33.3 / 66.7) |" in md
    assert "| iter1 | synthetic | +16.7 [" in md and "| +33.3 / +0.0 | +2 / −1 |" in md
    versus = agg["closed_loop_over_ablation"]["plain_dpo/synthetic"]  # the talk's ranking, paired the same way
    assert versus["gain"] == pytest.approx(1 / 3) and versus["per_seed"] == pytest.approx([2 / 3, 0.0])
    assert (versus["gained"], versus["lost"]) == (2, 0)
    assert "## The closed loop's iteration-1 policy against each ablation's" in md
    assert "| plain_dpo | synthetic | +33.3 [" in md and "| +66.7 / +0.0 | +2 / −0 |" in md


def test_a_seeds_job_sees_only_its_own_seed(smoke_cfg):
    """Seed 0 of seeds [0, 1, 2] gets the single run's view plus its seed layout marker, so
    adding seeds changes none of its settings; the report over seeds sees every seed."""
    from closedloop import config

    single = config.stage_view(smoke_cfg, "sft", ["synthetic"])
    smoke_cfg.seeds = [0, 1, 2]
    seeded = config.stage_view(smoke_cfg, "sft", ["synthetic"])
    assert seeded.pop("seeds") == [0] and seeded == single
    assert config.stage_view(smoke_cfg, "seeds_report")["seeds"] == [0, 1, 2]
    assert paths.run_dir(smoke_cfg).name == "seed0" and paths.seeds_report_file(smoke_cfg).parent.name == "smoke"
    with pytest.raises(config.ConfigError, match="'seeds'"):
        config.load([], ["seeds=[1,1]"])


def test_efficacy_preset_runs_three_seeds_with_more_search_than_the_default():
    from closedloop import config

    root = paths.Path(__file__).resolve().parents[1]
    default, eff = config.load(), config.load([root / "configs" / "efficacy.yaml"])
    assert list(eff.seeds) == [0, 1, 2]
    assert eff.mcts.n_prompts > default.mcts.n_prompts and eff.loop.iterations > default.loop.iterations
    assert sorted(eff.loop.ablations) == sorted(config.ABLATIONS)  # equal budgets: one loop config for all
    assert config.enum_value(eff.eval.ablation_iterations) == "last"


def test_ablations_evaluated_at_their_last_iteration_only():
    """``eval.ablation_iterations: last``: each ablation's final policy is evaluated, the closed loop's
    every policy; evaluation jobs' views do not change (switching reruns nothing), the report's do."""
    from closedloop import config, reporting

    every = config.load([], ["loop.iterations=3", "loop.ablations=[plain_dpo, offline_mcts]", "eval.tasks=[synthetic]"])
    last = config.load([], ["loop.iterations=3", "loop.ablations=[plain_dpo, offline_mcts]", "eval.tasks=[synthetic]",
                            "eval.ablation_iterations=last"])
    assert paths.eval_model_tags(last) == ["sft", "iter1", "iter2", "iter3", "ablations/plain_dpo/iter3",
                                           "ablations/offline_mcts/iter3"]
    assert len(paths.eval_model_tags(every)) == 1 + 3 * 3
    assert config.stage_view(every, "evaluate", ["synthetic"]) == config.stage_view(last, "evaluate", ["synthetic"])
    assert config.stage_view(last, "report")["eval"]["ablation_iterations"] == "last"
    assert config.stage_view(every, "report") != config.stage_view(last, "report")

    def m(acc):
        return {"accuracy": acc, "ci_low": acc - 0.05, "ci_high": acc + 0.05, "n": 20}

    metrics = {(tag, "synthetic"): m(0.5 + 0.01 * k) for k, tag in enumerate(paths.eval_model_tags(last))}
    table = reporting.iteration_table(last, metrics).splitlines()
    assert table[2] == "| synthetic | closedloop | 50.0 [45.0, 55.0] | 51.0 [46.0, 56.0] | 52.0 [47.0, 57.0] | 53.0 [48.0, 58.0] |"
    assert table[3] == "| synthetic | plain_dpo | 50.0 [45.0, 55.0] | – | – | 54.0 [49.0, 59.0] |"
    assert table[4] == "| synthetic | offline_mcts | 50.0 [45.0, 55.0] | – | – | 55.0 [50.0, 60.0] |"


def test_vdpo_report_over_seeds_on_hand_made_predictions(tmp_path):
    """The V-DPO branch over seeds (issue 22 part 5): per-seed metrics with mean ± sd, V-DPO's paired
    gain over its own seed's SFT model (the same hand-made table as the loop's), each seed's SFT record."""
    from closedloop import config
    from closedloop.vlm import seeds as vlm_seeds
    from closedloop.vlm.scenes import SPLITS

    root = paths.Path(__file__).resolve().parents[1]
    cfg = config.load([root / "configs" / "vlm_smoke.yaml"],
                      [f"data_dir={tmp_path / 'data'}", f"results_dir={tmp_path / 'results'}", "seeds=[0, 1]"])
    cfg.vlm.pope.models = ["sft", "vdpo"]
    labels = ["yes", "no", "yes"]  # q0..q2; a correct answer is the label, a wrong one the other word
    for s in (0, 1):
        seed_cfg = paths.for_seed(cfg, s)
        for tag, table in {"sft": BASE, "vdpo": MODEL}.items():
            out = paths.pope_dir(seed_cfg, tag)
            out.mkdir(parents=True)
            rows = [{"id": f"q{i}", "label": labels[i],
                     "answer": labels[i] if table[s][i] else {"yes": "no", "no": "yes"}[labels[i]]} for i in (1, 2, 0)]
            with open(out / "predictions.jsonl", "w") as fh:
                artifacts.write_jsonl(fh, rows)
            acc = float(table[s].mean())
            metrics = {"all": {"accuracy": acc, "f1": acc / 2, "yes_ratio": 0.5 + s / 10},
                       "splits": {split: {"accuracy": acc} for split in SPLITS}}
            (out / "metrics.json").write_text(json.dumps(metrics))
        sft = paths.vlm_sft_dir(seed_cfg)
        sft.mkdir(parents=True)
        record = {"attempts": [{"seed": s}, {"seed": s + 1000}][: s + 1], "kept_attempt": s,
                  "validation": {"accuracy": 0.8 + s / 100}, "grounding": {"flip_rate": 0.9, "passed": True}}
        (sft / "stats.json").write_text(json.dumps(record))
    agg = json.loads(json.dumps(vlm_seeds.aggregate(cfg)))
    assert agg["metrics"]["sft"]["accuracy"]["per_seed"] == pytest.approx({"0": 1 / 3, "1": 2 / 3})
    assert agg["metrics"]["sft"]["accuracy"]["sd"] == pytest.approx(np.std([1 / 3, 2 / 3], ddof=1))
    assert agg["metrics"]["vdpo"]["yes_ratio"]["mean"] == pytest.approx(0.55)
    assert agg["metrics"]["vdpo"]["adversarial/accuracy"]["mean"] == pytest.approx(2 / 3)
    gain = agg["gain_over_sft"]["vdpo"]
    assert gain["gain"] == pytest.approx(1 / 6) and (gain["gained"], gain["lost"]) == (2, 1)
    assert gain["per_seed"] == pytest.approx([1 / 3, 0.0]) and "sft" not in agg["gain_over_sft"]
    assert agg["sft"]["1"] == {"attempts": 2, "kept_attempt": 1, "validation_accuracy": 0.81,
                               "grounding_flip_rate": 0.9, "grounding_passed": True}
    md = vlm_seeds.render(cfg, agg)
    assert "| sft | 50.0 ± 23.6 (33.3 / 66.7) | 25.0 ± 11.8 (16.7 / 33.3) | 55.0 ± 7.1 (50.0 / 60.0) | 33.3 |" in md
    assert "| vdpo | +16.7 [" in md and "| +33.3 / +0.0 | +2 / −1 |" in md
    assert "| 1 | 2 | 1 | 81.0 | 90.0 | passed |" in md
