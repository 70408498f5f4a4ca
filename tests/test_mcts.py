"""MCTS collection on the tiny model: C(s), priors from generation logits, the shard
artifacts, determinism and resume after a kill (SPEC §1–2)."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from closedloop import artifacts, config, models, paths, sampling, selfeval
from closedloop.prefix_cache import PrefixMismatch, QuestionCache
from closedloop.stages import data, mcts, mcts_merge, sft

pytestmark = pytest.mark.slow

PAIR_FIELDS = {"prompt", "chosen", "rejected", "q_chosen", "q_rejected", "n_chosen", "n_rejected", "alpha",
               "depth", "tree_id", "policy"}
NODE_FIELDS = {"text", "depth", "visits", "q", "v", "prior", "self_eval", "reward", "terminal", "correct"}


@pytest.fixture
def tiny(smoke_cfg):
    return models.load_base(smoke_cfg.model)


def test_self_evaluation_is_the_softmax_over_the_option_tokens(tiny):
    model, tok = tiny
    contexts = ["<|im_start|>user\nAva has 3 apples. She finds 2 more.<|im_end|>\n<|im_start|>assistant\n"
                "Ava finds 2 more, so 3 + 2 = 5.\n", "Q?\nstep one\nstep two is longer than the first\n"]
    hints = [None, ["gold"]]
    got = selfeval.self_evaluate(model, tok, contexts, hints, batch_size=2)
    a_id, b_id = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    for ctx, hint, c in zip(contexts, hints, got, strict=True):
        prompt = ctx + selfeval.eval_suffix(tok, hint)
        assert prompt.endswith("<|im_start|>assistant\nThe newest step is (")
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logits = model(**ids).logits[0, -1]
        manual = torch.exp(logits[a_id]) / (torch.exp(logits[a_id]) + torch.exp(logits[b_id]))
        assert c == pytest.approx(float(manual), abs=1e-5)
    assert "Reference solution:\ngold" in selfeval.eval_suffix(tok, ["gold"])


def test_prior_log_probs_come_from_the_generation_logits(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    prompts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Count: one two"]
    samples = sampling.sample_continuations(model, tok, prompts, max_new_tokens=8, one_line=False,
                                        temperature=1.0, top_p=1.0)
    assert all(s.n_tokens == len(s.token_ids) > 0 for s in samples)
    for prompt, sample in zip(prompts, samples, strict=True):
        p_ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        s_ids = torch.tensor([sample.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.cat([p_ids, s_ids], 1)).logits[0, p_ids.shape[1] - 1:-1], -1)
        manual = logp.gather(1, s_ids[0].unsqueeze(1)).sum()
        assert sample.sum_logprob == pytest.approx(float(manual), abs=1e-3)


def prepare(cfg):
    cfg.job.task = cfg.mcts.task
    data.main(cfg)
    sft.main(cfg)


def collect(cfg):
    cfg.job.iteration = 1
    for shard in range(cfg.mcts.n_shards):
        cfg.job.shard = shard
        mcts.main(cfg)
    mcts_merge.main(cfg)
    return paths.mcts_dir(cfg, 1) / "merged"


def test_collection_writes_trees_and_pairs_deterministically(smoke_cfg, tmp_path):
    prepare(smoke_cfg)
    merged = collect(smoke_cfg)
    trees = artifacts.read_jsonl(merged / "trees.jsonl")
    pairs = artifacts.read_jsonl(merged / "pairs.jsonl")
    m = smoke_cfg.mcts
    assert len(trees) == m.n_prompts and len({t["tree_id"] for t in trees}) == m.n_prompts
    for tree in trees:
        nodes = tree["nodes"]
        assert NODE_FIELDS <= set(nodes[0])
        assert len(nodes[0]["children"]) <= m.max_children
        assert nodes[tree["committed"][-1]]["terminal"]
        assert max(n["depth"] for n in nodes) <= m.depth_limit
        assert len(nodes[0]["children"]) >= 1
    assert pairs, "no preference pairs"
    for pair in pairs:
        assert set(pair) == PAIR_FIELDS
        assert pair["alpha"] == pytest.approx(min(pair["n_rejected"] / max(pair["n_chosen"] + pair["n_rejected"], 1)
                                                  if pair["n_chosen"] + pair["n_rejected"] else 0.5, 0.5))
        assert pair["q_chosen"] > pair["q_rejected"] and pair["chosen"] != pair["rejected"]
        assert pair["prompt"].startswith("<|im_start|>") and pair["policy"].endswith("sft/model")
    stats = json.loads((merged / "stats.json").read_text())
    assert stats["trees"] == m.n_prompts and stats["pairs"] == len(pairs)
    for shard in range(m.n_shards):
        d = paths.mcts_shard_dir(smoke_cfg, 1, shard)
        assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "pairs.jsonl", "provenance.json",
                                                       "stats.json", "trees.jsonl"]
    work = paths.mcts_dir(smoke_cfg, 1) / ".work"
    assert not work.exists() or not any(work.iterdir())  # the resume state is cleaned up

    again = copy.deepcopy(smoke_cfg)
    again.results_dir = str(tmp_path / "again")
    shutil.copytree(paths.sft_dir(smoke_cfg), paths.sft_dir(again))
    merged_again = collect(again)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "policy"} for r in rows]  # noqa: E731
    assert strip(artifacts.read_jsonl(merged_again / "pairs.jsonl")) == strip(pairs)


def test_killed_shard_resumes_to_the_same_trees(smoke_cfg, tmp_path):
    smoke_cfg.mcts.n_shards = 1
    smoke_cfg.mcts.trees_per_batch = 2
    prepare(smoke_cfg)
    reference = collect(smoke_cfg)
    expected = artifacts.read_jsonl(reference / "trees.jsonl")
    shutil.rmtree(paths.mcts_dir(smoke_cfg, 1))

    view = json.dumps(config.stage_view(smoke_cfg, "mcts", [smoke_cfg.mcts.task]))
    cmd = [sys.executable, "-m", "closedloop", "run-stage", "mcts", "--config-yaml", view, "job.shard=0",
           "job.iteration=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = paths.mcts_dir(smoke_cfg, 1) / ".work"
    deadline = time.time() + 300
    while time.time() < deadline and not list(work.glob("*/batch00000.jsonl")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(work.glob("*/batch*.jsonl"))
    assert done and len(done) < 2, "the kill should land after the first of two batches"
    assert not paths.mcts_shard_dir(smoke_cfg, 1, 0).exists()  # nothing marked done

    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    smoke_cfg.job.iteration = 1
    mcts_merge.main(smoke_cfg)
    resumed = artifacts.read_jsonl(paths.mcts_dir(smoke_cfg, 1) / "merged" / "trees.jsonl")
    assert [t["tree_id"] for t in resumed] == [t["tree_id"] for t in expected]  # no duplicates, same order
    assert resumed == expected


def test_confidence_from_the_generation_cache_equals_a_fresh_read(tiny):
    """C(s) read by continuing generate's KV cache equals C from the full prompt's token ids."""
    model, tok = tiny
    torch.manual_seed(3)
    contexts = ["<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n",
                "<|im_start|>user\nA much longer question, padded on the left in the batch.<|im_end|>\n"
                "<|im_start|>assistant\nFirst step.\n"]
    samples = sampling.sample_continuations(model, tok, contexts, max_new_tokens=10, one_line=True,
                                        temperature=1.0, top_p=1.0, score=True)
    suffix = tok(selfeval.eval_suffix(tok), add_special_tokens=False)["input_ids"]
    fresh = selfeval.confidence_from_ids(
        model, tok, [tok(c, add_special_tokens=False)["input_ids"] + list(s.token_ids) + suffix
                     for c, s in zip(contexts, samples, strict=True)])
    assert [s.confidence for s in samples] == pytest.approx(fresh, abs=1e-4)


def test_question_cache_gives_the_same_priors_and_confidence_as_a_fresh_read(tiny):
    """Sampling from a tree's cached question (ragged suffixes, padding between the cached
    part and the suffix) scores every row exactly as a full forward pass would."""
    model, tok = tiny
    questions = ["<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n",
                 "<|im_start|>user\nA much longer question, padded on the left.<|im_end|>\n<|im_start|>assistant\n"]
    cache = QuestionCache(model, tok, questions)
    steps = questions[1] + "First step.\nSecond step is longer.\n"
    contexts = [questions[0], steps, questions[0] + "Go.\n", steps]  # two samples share one prefill
    trees = [0, 1, 0, 1]
    torch.manual_seed(5)
    samples = sampling.sample_continuations(model, tok, contexts, max_new_tokens=10, one_line=True,
                                        temperature=1.0, top_p=1.0, score=True, prefix=(cache, trees))
    suffix = tok(selfeval.eval_suffix(tok), add_special_tokens=False)["input_ids"]
    for context, sample in zip(contexts, samples, strict=True):
        p_ids = tok(context, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + list(sample.token_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(p_ids) - 1:-1], -1)
        manual = logp.gather(1, ids[0, len(p_ids):].unsqueeze(1)).sum()
        assert sample.sum_logprob == pytest.approx(float(manual), abs=1e-3)
        fresh = selfeval.confidence_from_ids(model, tok, [p_ids + list(sample.token_ids) + suffix])[0]
        assert sample.confidence == pytest.approx(fresh, abs=1e-4)
    with pytest.raises(PrefixMismatch):
        cache.inputs([1], [questions[0]])  # not tree 1's prompt
