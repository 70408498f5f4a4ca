"""COrAL (SPEC §5) against hand-computed values: target-aware RoPE, the (i, j) pairs and the
loss of both objectives, the corruption sampler, the acceptance rule, blockwise decoding
against AR greedy, the save → load round trip; and the `coral_all` target on the smoke run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from closedloop import config, models, paths
from closedloop.coral import decoding, objective
from closedloop.coral import model as coral_model
from closedloop.coral.trainer import set_trainable


@pytest.fixture
def tiny(smoke_cfg):
    m = coral_model.load(models.tiny_dir(smoke_cfg.model))
    coral_model.mark(m, 4, 8)
    return m


@pytest.fixture
def varied(tiny):
    """The tiny model with its weights shaken so greedy decoding does not repeat one token."""
    torch.manual_seed(3)
    coral_model.untie_lm_head(tiny)
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return tiny


# ---- target-aware RoPE -----------------------------------------------------------------

def test_a_query_copy_rotated_to_j_scores_keys_as_a_query_at_j(tiny):
    """q = k = e_0 (the first rotary pair, frequency 1): a query at position j scores a key at
    m with cos(j − m). The copy of the query of row i = 3 rotated at j = 5 scores the key at
    m = 2 with cos(3) = −0.9899925, whatever i is."""
    d = tiny.config.head_dim
    e0 = torch.zeros(1, 1, 1, d)
    e0[..., 0] = 1.0
    x = torch.zeros(1, 1, d)

    def at(p):
        cos, sin = tiny.model.rotary_emb(x, torch.tensor([[p]]))
        return coral_model.rope(e0, cos, sin)[0, 0, 0]

    key = at(2)
    assert float(at(5) @ key) == pytest.approx(math.cos(3), abs=1e-6)
    assert float(at(5) @ key) == pytest.approx(-0.9899925, abs=1e-6)
    assert float(at(5) @ at(4)) == pytest.approx(math.cos(1), abs=1e-6)


def test_offset_zero_is_the_base_layer_and_future_tokens_never_leak(tiny):
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 10))
    base = tiny(input_ids=ids).logits
    assert torch.allclose(tiny.oa_offsets(ids, [0])[:, :, 0], base, atol=1e-5)
    assert not torch.allclose(tiny.oa_offsets(ids, [1])[:, :, 0], base, atol=1e-5)  # the copy is rotated at i+1
    window = range(-8, 5)
    out = tiny.oa_offsets(ids, window)
    changed = ids.clone()
    changed[:, 7] = 5
    out2 = tiny.oa_offsets(changed, window)
    assert torch.equal(out[:, :7], out2[:, :7])  # rows i < 7 see keys <= i only, for every target j
    assert not torch.allclose(out[:, 7:], out2[:, 7:])
    assert torch.allclose(out[:, :, 9], tiny.oa_offsets(ids, [1])[:, :, 0], atol=1e-5)  # columns independent


def test_the_kv_cache_and_cropping_give_the_same_logits(tiny):
    from transformers import DynamicCache

    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (1, 10))
    full = tiny.oa_offsets(ids, range(-2, 3))
    cache = DynamicCache()
    tiny.oa_offsets(ids[:, :6], range(-2, 3), cache=cache)
    assert torch.allclose(tiny.oa_offsets(ids[:, 6:], range(-2, 3), cache=cache), full[:, 6:], atol=1e-5)
    coral_model.crop_cache(cache, 4)
    assert cache.get_seq_length() == 4
    assert torch.allclose(tiny.oa_offsets(ids[:, 4:], range(-2, 3), cache=cache), full[:, 4:], atol=1e-5)


# ---- the (i, j) pairs and the loss on a 6-token example ----------------------------------

# positions 0..5, prompt {0, 1}, response 2..5; W_f = 2, W_b = 2
FORWARD_VALID = [[0, 1], [1, 1], [1, 1], [1, 1], [1, 0], [0, 0]]  # offsets +1, +2
BACKWARD_VALID = [[0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]]  # −2, −1, 0; chunk {2, 3}
FORWARD_PAIRS = [(0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (3, 5), (4, 5)]  # (i, j)
BACKWARD_PAIRS = [(2, 2), (3, 2), (3, 3), (4, 2), (4, 3), (5, 3)]


def test_pair_targets_of_both_windows_on_the_hand_example():
    prompt, length = torch.tensor([2]), torch.tensor([6])
    targets, valid = objective.pair_targets(6, objective.forward_offsets(2), prompt, length)
    assert valid[0].int().tolist() == FORWARD_VALID
    assert targets[0, 3].tolist() == [4, 5]
    labelled = torch.tensor([[False, False, True, True, False, False]])
    targets, valid = objective.pair_targets(6, objective.backward_offsets(2), prompt, length, labelled)
    assert valid[0].int().tolist() == BACKWARD_VALID
    assert targets[0, 4].tolist() == [2, 3, 4]
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    assert objective.pair_labels(ids, targets)[0, 5].tolist() == [13, 14, 15]
    assert objective.backward_window(4, 2.0) == 8 and len(objective.backward_offsets(8)) == 9  # SPEC §5


@pytest.mark.parametrize("window", ["forward", "backward"])
def test_the_loss_is_the_mean_over_exactly_the_hand_listed_pairs(tiny, window):
    ids = torch.tensor([[5, 6, 12, 13, 14, 2]])
    prompt, length = torch.tensor([2]), torch.tensor([6])
    if window == "forward":
        offsets, labelled, pairs = objective.forward_offsets(2), None, FORWARD_PAIRS
        inputs = ids
    else:
        offsets, pairs = objective.backward_offsets(2), BACKWARD_PAIRS
        labelled = torch.tensor([[False, False, True, True, False, False]])
        inputs = torch.tensor([[5, 6, 14, 2, 14, 2]])  # chunk {2, 3} replaced by the chunk at 4
    targets, valid = objective.pair_targets(6, offsets, prompt, length, labelled)
    kwargs = {"input_ids": inputs, "coral_targets": targets, "coral_valid": valid,
              "coral_labels": objective.pair_labels(ids, targets), "coral_key_mask": objective.key_mask(length, 6)}
    logits = tiny.oa_logits(inputs, targets)[0]
    by_hand = [float(torch.nn.functional.cross_entropy(logits[i, offsets.index(j - i)][None],
                                                       ids[0, j][None])) for i, j in pairs]
    assert float(tiny(**kwargs).loss) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    coral_model.untie_lm_head(tiny)
    with torch.no_grad():
        tiny.lm_head.weight.zero_()  # every logit 0: each pair's CE is ln V = ln 49152 = 10.80267
    assert float(tiny(**kwargs).loss) == pytest.approx(10.80267, abs=1e-4)


# ---- corruption ----------------------------------------------------------------------------

def test_the_corruption_rate_follows_the_truncated_normal():
    """TruncNormal(0, 0.25, [0, 0.5]): mean 0.25·(φ(0) − φ(2)) / (Φ(2) − Φ(0)) = 0.18070,
    median 0.25·Φ⁻¹(0.5 + (Φ(2) − 0.5)/2) = 0.1597, support [0, 0.5]."""
    assert objective.truncnorm_mean() == pytest.approx(0.18070, abs=1e-5)
    r = objective.sample_rate(10_000, generator=torch.Generator().manual_seed(0))
    assert float(r.mean()) == pytest.approx(0.18070, abs=0.005)  # σ_r ≈ 0.13: 4 standard errors
    assert float(r.median()) == pytest.approx(0.1597, abs=0.01)
    assert 0.0 <= float(r.min()) < 0.002 and 0.49 < float(r.max()) <= 0.5


@pytest.mark.parametrize(("n", "sizes"), [(10, {1, 2}), (40, {1, 2, 3, 4})])
def test_chunks_are_at_most_four_and_labelled_exactly_where_replaced(n, sizes):
    gen = torch.Generator().manual_seed(1)
    response = list(range(100, 100 + n))
    seen = set()
    for _ in range(300):
        cor = objective.corrupt(response, max_chunk=4, generator=gen)
        seen.add(cor.chunk)
        assert len(cor.ids) == n and cor.spans
        assert all(e - s <= cor.chunk <= 4 for s, e in cor.spans)
        inside = {k for s, e in cor.spans for k in range(s, e)}
        assert cor.labelled == [k in inside for k in range(n)]
        assert all(cor.ids[k] == response[k] for k in range(n) if k not in inside)
        for s, e in cor.spans:  # a replaced chunk is another chunk of the same response
            f = cor.ids[s] - 100
            assert cor.ids[s:e] == response[f:f + e - s]
    assert seen == sizes


# ---- acceptance and decoding ---------------------------------------------------------------

@pytest.mark.parametrize(("p", "eta", "accepted"), [
    ([0.25, 0.25, 0.25, 0.25], 0.0790569, [0, 1, 2, 3]),  # H = ln 4: η = √0.1 / 4
    ([1.0, 0.0, 0.0, 0.0], 0.1, [0]),  # H = 0: η = min(0.1, 0.316)
    ([0.4, 0.3, 0.2, 0.1], 0.0879360, [0, 1, 2, 3]),  # H = 1.279854: η = √0.1·e^−H
    ([0.6, 0.3, 0.08, 0.02], 0.1, [0, 1]),  # √0.1·e^−0.947988 = 0.12254 > 0.1
])
def test_acceptance_rule_on_hand_distributions(p, eta, accepted):
    probs = torch.tensor(p)
    assert decoding.acceptance_threshold(probs, 0.1) == pytest.approx(eta, abs=1e-6)
    assert [k for k in range(4) if decoding.accepts(probs, k, 0.1)] == accepted
    assert all(decoding.accepts(probs, k, 0.0) for k in range(4))  # ε = 0: η = 0, always accept


def test_occurrence_counts():
    """[A,B,C] -> [A,B,D] -> [A,B,D]: counts [1,1,1] -> [2,2,1] -> [3,3,2]."""
    counts = decoding._update_counts([], [], [1, 2, 3])
    assert counts == [1, 1, 1]
    counts = decoding._update_counts([1, 2, 3], counts, [1, 2, 4])
    assert counts == [2, 2, 1]
    assert decoding._update_counts([1, 2, 4], counts, [1, 2, 4]) == [3, 3, 2]
    assert decoding.offset_weight(-2) == decoding.offset_weight(1) == 1.0
    assert decoding.offset_weight(0) == pytest.approx(math.exp(-0.25))


def test_blockwise_with_block_one_and_always_accept_is_ar_greedy(varied):
    torch.manual_seed(1)
    prompt = torch.randint(3, 1000, (6,)).tolist()
    ar = decoding.ar_greedy(varied, prompt, 12, {2})
    assert len(set(ar.tokens)) > 3 and ar.forward_passes == len(ar.tokens)
    for use_cache in (True, False):
        bw = decoding.blockwise(varied, prompt, 12, {2}, block=1, eps=0.0, threshold=3, use_cache=use_cache)
        assert bw.tokens == ar.tokens
        assert bw.forward_passes == len(ar.tokens) + 1  # the last pass only verifies
    parallel = decoding.blockwise(varied, prompt, 12, {2}, block=16, eps=0.0, threshold=3)
    assert parallel.forward_passes == math.ceil(12 / 4) + 1  # W_f = 4 new tokens a pass from the last row
    cached = decoding.blockwise(varied, prompt, 12, {2}, block=16, eps=0.1, threshold=3)
    uncached = decoding.blockwise(varied, prompt, 12, {2}, block=16, eps=0.1, threshold=3, use_cache=False)
    assert cached.tokens == uncached.tokens and len(cached.tokens) == 12


# ---- save / load ---------------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_logits(varied, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 9))
    before = varied.oa_offsets(ids, range(-8, 5))
    varied.save_pretrained(tmp_path, safe_serialization=True)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["coral"] == {"w_f": 4, "w_b": 8} and written["architectures"] == ["LlamaForCausalLM"]
    assert written["tie_word_embeddings"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    loaded = coral_model.load(tmp_path)
    assert coral_model.is_coral_dir(tmp_path) and loaded.windows == (4, 8)
    assert torch.equal(loaded.oa_offsets(ids, range(-8, 5)), before)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # no custom code: a Llama, the offset-0 head
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert torch.allclose(plain(input_ids=ids).logits, before[:, :, 8], atol=1e-5)


def test_stage_one_trains_only_the_last_layer_and_an_untied_lm_head(tiny):
    counts = set_trainable(tiny, 1)
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tiny.named_parameters() if n.startswith(("model.layers.1.", "lm_head."))}
    assert tiny.lm_head.weight.data_ptr() != tiny.model.embed_tokens.weight.data_ptr()
    assert counts["trainable"] < counts["total"]
    assert set_trainable(tiny, 2)["trainable"] == counts["total"]


# ---- the DAG: `snakemake coral_all` on the smoke run ------------------------------------------

@pytest.mark.slow
def test_coral_all_on_the_smoke_run(smoke_local_run):
    """Both stages, AR greedy and blockwise decoding and the report, after the smoke DAG."""
    repo, first = smoke_local_run
    assert first.returncode == 0, first.stderr[-3000:]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "configs/smoke.yaml",
                          "--", "coral_all"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    coral = repo / "results" / "smoke" / "coral"
    stage1, stage2 = (load_file(coral / f"stage{s}" / "model" / "model.safetensors") for s in (1, 2))
    policy = load_file(repo / "results" / "smoke" / "iter2" / "dpo" / "model" / "model.safetensors")
    assert json.loads((coral / "stage1" / "stats.json").read_text())["input_tag"] == "iter2"  # coral.init: last
    assert torch.equal(stage1["model.embed_tokens.weight"], policy["model.embed_tokens.weight"])  # frozen
    assert torch.equal(stage1["model.layers.0.mlp.up_proj.weight"], policy["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(stage1["model.layers.1.mlp.up_proj.weight"], policy["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(stage2["model.embed_tokens.weight"], stage1["model.embed_tokens.weight"])
    for decoding_name in ("greedy", "coral_blockwise"):
        metrics = json.loads((coral / "eval" / decoding_name / "synthetic" / "metrics.json").read_text())
        assert metrics["n"] == 4 and metrics["decoding"] == decoding_name
        assert metrics["forward_passes"] > 0 and metrics["wall_seconds"] > 0
        assert metrics["tokens_per_forward"] == pytest.approx(metrics["generated_tokens"] / metrics["forward_passes"])
    assert "| synthetic | COrAL | coral_blockwise |" in (coral / "report.md").read_text()
    again = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile",
                            "configs/smoke.yaml", "--", "coral_all"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=300)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_config_errors_name_the_key():
    with pytest.raises(config.ConfigError, match="key 'eval.decoding': coral_blockwise decodes a COrAL model"):
        config.load([], ["eval.decoding=coral_blockwise"])
    with pytest.raises(config.ConfigError, match="key 'coral.eval_tasks': task 'nope'"):
        config.load([], ["coral.eval_tasks=[nope]"])
    with pytest.raises(config.ConfigError, match="key 'coral.decoding.block': expected a number >= 1, got 0"):
        config.load([], ["coral.decoding.block=0"])
    cfg = config.load([], ["loop.iterations=3"])
    assert paths.coral_input_tag(cfg) == "iter3"
    assert paths.coral_input_tag(config.load([], ["coral.init=sft"])) == "sft"
    assert paths.coral_eval_runs(cfg) == [("greedy", "synthetic"), ("coral_blockwise", "synthetic")]
