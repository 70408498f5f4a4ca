"""lm-evaluation-harness on our rows (SPEC §7): a custom multiple-choice task on a 5-row local
file gives the hand-computed acc / acc_norm with a scripted model; GSM8K's strict and flexible
filters on scripted completions; the HFLM wrapper's log-likelihood equals the sum of the
tiny model's own log-probabilities."""

import json

import pytest

pytest.importorskip("lm_eval")  # installed by scripts/bootstrap.sh (--no-deps)

from lm_eval.api.model import LM  # noqa: E402

from closedloop import harness  # noqa: E402

ROWS = [  # our row schema; answer = the gold letter
    {"id": "q0", "question": "Sky?", "answer": "A", "choices": ["blue", "green", "red"], "solution_steps": None},
    {"id": "q1", "question": "Grass?", "answer": "B", "choices": ["red", "green", "blue"], "solution_steps": None},
    {"id": "q2", "question": "Snow?", "answer": "C", "choices": ["black", "grey", "white as milk"],
     "solution_steps": None},
    {"id": "q3", "question": "Coal?", "answer": "A", "choices": ["black", "pink", "see-through"],
     "solution_steps": None},
    {"id": "q4", "question": "Sun?", "answer": "B", "choices": ["cold", "yellow", "green"], "solution_steps": None},
]
# scripted log-likelihood of " <choice>" given the prompt
LL = {"Sky?": [-3.0, -2.0, -9.0],          # acc: B (wrong); per char -0.75, -0.4, -3 -> B (wrong)
      "Grass?": [-5.0, -1.0, -5.0],        # acc: B (right); norm -1.67, -0.2, -1.25 -> B (right)
      "Snow?": [-4.0, -4.5, -6.0],         # acc: A (wrong); norm -0.8, -1.125, -0.46 -> C (right)
      "Coal?": [-6.0, -4.0, -20.0],        # acc: B (wrong); norm -1.2, -1.0, -1.82 -> B (wrong)
      "Sun?": [-2.0, -3.0, -9.0]}          # acc: A (wrong); norm -0.5, -0.5, -1.8 -> tie, first -> A (wrong)


class ScriptedLM(LM):
    """Canned answers: log-likelihoods from LL, completions from COMPLETIONS."""

    completions: dict[str, str] = {}

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            context, continuation = req.args
            question = context.split("Question: ")[1].split("\n")[0]
            row = next(r for r in ROWS if r["question"] == question)
            if continuation.strip() not in row["choices"]:  # a CSQA letter
                out.append((-1.0, False))
                continue
            out.append((LL[question][row["choices"].index(continuation.strip())], False))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        return [next(v for k, v in self.completions.items() if k in req.args[0]) for req in requests]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_multiple_choice_acc_and_acc_norm_match_a_hand_computation(tmp_path):
    samples = harness.run(ScriptedLM(), harness.mc_task("local_mc", write(tmp_path / "heldout.jsonl", ROWS)))
    records = harness.mc_records(samples)
    assert [r["id"] for r in records] == ["q0", "q1", "q2", "q3", "q4"]
    assert [r["extracted"][0] for r in records] == ["B", "B", "A", "B", "A"]
    assert [r["correct"][0] for r in records] == [False, True, False, False, False]  # acc = 1/5
    assert [r["correct_norm"] for r in records] == [False, True, True, False, False]  # acc_norm = 2/5
    assert records[2]["loglik"] == [-4.0, -4.5, -6.0]
    assert samples[0]["arguments"][0] == ("Question: Sky?\nAnswer:", " blue")  # ARC's template


def test_csqa_style_scores_the_letters(tmp_path):
    rows = [dict(ROWS[1], choices=["red", "green", "blue", "pink", "grey"])]
    samples = harness.run(ScriptedLM(), harness.mc_task("local_csqa", write(tmp_path / "h.jsonl", rows), "csqa"))
    assert samples[0]["arguments"][0][0] == "Question: Grass?\nA. red\nB. green\nC. blue\nD. pink\nE. grey\nAnswer:"
    assert [a[1] for a in samples[0]["arguments"]] == [" A", " B", " C", " D", " E"]


def test_gsm8k_strict_and_flexible_extraction(tmp_path):
    rows = [{"id": "g0", "question": "Tom has 3 and gets 4.", "answer": "7", "choices": None, "solution_steps": None},
            {"id": "g1", "question": "A box of 100, 12 boxes.", "answer": "1200", "choices": None,
             "solution_steps": None},
            {"id": "g2", "question": "Sara owes.", "answer": "-5", "choices": None, "solution_steps": None}]
    lm = ScriptedLM()
    lm.completions = {"Tom": "3 + 4 = 7 apples.\n#### 7", "box": "12 * 100 = 1,200 eggs. So 1,200",
                      "Sara": "She owes 5 dollars. #### 5"}
    records, filters = harness.generative_records(
        harness.run(lm, harness.gsm8k_task("local_gsm8k", write(tmp_path / "g.jsonl", rows), 32)))
    assert filters == ["strict-match", "flexible-extract"]
    assert [r["filters"]["strict-match"]["correct"] for r in records] == [True, False, False]
    assert [r["filters"]["strict-match"]["extracted"] for r in records] == ["7", harness.INVALID, "5"]
    assert [r["filters"]["flexible-extract"]["correct"] for r in records] == [True, True, False]
    assert records[0]["correct"] == [True] and records[1]["extracted"] == [harness.INVALID]


@pytest.mark.slow
def test_hflm_loglikelihood_is_the_tiny_models_own(smoke_cfg, tmp_path):
    import torch

    from closedloop import models

    model, tokenizer = models.load_dir(models.base_source(smoke_cfg.model), smoke_cfg.model, inference=True)
    samples = harness.run(harness.wrap(model, tokenizer, 4),
                          harness.mc_task("tiny_mc", write(tmp_path / "h.jsonl", ROWS[:2])))
    for s in samples:
        for (context, continuation), (ll, _) in zip(s["arguments"], s["filtered_resps"], strict=True):
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            assert ll == pytest.approx(sum(logp[i - 1, whole[i]].item() for i in range(n_context, len(whole))),
                                       abs=1e-3)


@pytest.mark.slow
def test_gsm8k_generates_through_hflm_on_the_tiny_model(smoke_cfg, tmp_path):
    from closedloop import models

    model, tokenizer = models.load_dir(models.base_source(smoke_cfg.model), smoke_cfg.model, inference=True)
    rows = [{"id": f"g{i}", "question": f"Tom has {i} apples and gets 2 more. How many?", "answer": str(i + 2),
             "choices": None, "solution_steps": None} for i in range(3)]
    records, filters = harness.generative_records(
        harness.run(harness.wrap(model, tokenizer, 4), harness.gsm8k_task("tiny_gsm8k", write(tmp_path / "g.jsonl", rows), 8)))
    assert filters == ["strict-match", "flexible-extract"] and [r["id"] for r in records] == ["g0", "g1", "g2"]
    assert all(isinstance(r["completions"][0], str) and set(r["filters"]) == set(filters) for r in records)
    assert all(r["filters"]["strict-match"]["extracted"] == harness.INVALID for r in records)  # random weights
