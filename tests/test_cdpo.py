"""cDPO (SPEC §3) on TRL's DPOTrainer: equals TRL's sigmoid loss at α = 0, the hand
formula at fixed and per-pair α, and trains for real on the tiny model."""

import copy

import pytest
import torch
from datasets import Dataset
from dpo_helpers import batch_of, perturbed_reference
from trl import DPOConfig, DPOTrainer

from closedloop import models
from closedloop.cdpo import ConservativeDPOTrainer, cdpo_loss

pytestmark = pytest.mark.slow
BETA = 0.1
PAIRS = [
    {"prompt": "Q: 2+3?\n", "chosen": "2 + 3 = 5.\n", "rejected": "2 + 3 = 6.\n"},
    {"prompt": "Q: 4*2?\n", "chosen": "The answer is 8.", "rejected": "The answer is 9."},
    {"prompt": "Q: 9-4?\nStep one.\n", "chosen": "9 - 4 = 5.\n", "rejected": "I do not know.\n"},
    {"prompt": "Q: 6/3?\n", "chosen": "6 / 3 = 2.\n", "rejected": "6 / 3 = 3.\n"},
]


@pytest.fixture(scope="module")
def models_(tmp_path_factory):
    from closedloop import config

    cfg = config.load([], ["model.kind=tiny"])
    policy, tok = models.load_base(cfg.model)
    return policy, perturbed_reference(policy), tok


def args(tmp_path, **kw):
    return DPOConfig(output_dir=str(tmp_path), beta=BETA, per_device_train_batch_size=4, max_length=128,
                     report_to="none", save_strategy="no", logging_steps=1, bf16=False, use_cpu=True,
                     precompute_ref_log_probs=False, **kw)


def make(cls, models_, tmp_path, alphas=None, **kw):
    policy, ref, tok = models_
    rows = [dict(p, alpha=a) for p, a in zip(PAIRS, alphas, strict=True)] if alphas is not None else PAIRS
    return cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args(tmp_path, **kw),
               train_dataset=Dataset.from_list(rows), processing_class=tok)


def sequence_logps(model, batch):
    """Σ log p over the completion tokens of each row, from a fresh forward pass."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(2, batch["input_ids"][:, 1:].unsqueeze(2)).squeeze(2)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def hand_margin(trainer, batch):
    pol_c, pol_r = sequence_logps(trainer.model, batch).chunk(2)
    ref_c, ref_r = sequence_logps(trainer.ref_model, batch).chunk(2)
    return (pol_c - ref_c) - (pol_r - ref_r)


def loss_of(trainer, batch):
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, dict(batch)))


def test_alpha_zero_equals_trl_sigmoid_loss(models_, tmp_path):
    ours = make(ConservativeDPOTrainer, models_, tmp_path, alphas=[0.0] * 4)
    trl = make(DPOTrainer, models_, tmp_path)
    batch = batch_of(ours)
    assert "alpha" in batch and batch["alpha"].tolist() == [0.0] * 4
    trl_batch = {k: v for k, v in batch.items() if k != "alpha"}
    assert loss_of(ours, batch) == pytest.approx(loss_of(trl, trl_batch), abs=1e-6)
    h = hand_margin(ours, batch)
    assert h.abs().min() > 1e-3  # the test is not vacuous
    assert loss_of(trl, trl_batch) == pytest.approx(float(cdpo_loss(h, 0.0, BETA).mean()), abs=1e-5)


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_fixed_alpha_matches_the_hand_computed_cdpo_loss(models_, tmp_path, alpha):
    ours = make(ConservativeDPOTrainer, models_, tmp_path, alphas=[alpha] * 4)
    batch = batch_of(ours)
    h = hand_margin(ours, batch)
    expected = float((-(1 - alpha) * torch.nn.functional.logsigmoid(BETA * h)
                      - alpha * torch.nn.functional.logsigmoid(-BETA * h)).mean())
    assert loss_of(ours, batch) == pytest.approx(expected, abs=1e-5)


def test_per_pair_alpha_column_changes_the_loss_as_the_formula_says(models_, tmp_path):
    alphas = [0.0, 0.5, 0.25, 0.1]
    ours = make(ConservativeDPOTrainer, models_, tmp_path, alphas=alphas)
    batch = batch_of(ours)
    h = hand_margin(ours, batch)
    per_pair = cdpo_loss(h, torch.tensor(alphas), BETA)
    assert loss_of(ours, batch) == pytest.approx(float(per_pair.mean()), abs=1e-5)
    uniform = make(ConservativeDPOTrainer, models_, tmp_path, alphas=[0.0] * 4)
    delta = loss_of(ours, batch) - loss_of(uniform, batch_of(uniform))
    assert delta == pytest.approx(float((torch.tensor(alphas) * BETA * h).mean()), abs=1e-5)


def test_partial_steps_get_no_eos_and_final_answers_do(models_, tmp_path):
    ours = make(ConservativeDPOTrainer, models_, tmp_path, alphas=[0.0] * 4)
    eos = models_[2].eos_token_id
    rows = ours.train_dataset
    assert rows[0]["chosen_ids"][-1] != eos and rows[2]["rejected_ids"][-1] != eos  # "...\n" steps
    assert rows[1]["chosen_ids"][-1] == eos and rows[1]["rejected_ids"][-1] == eos  # final answers


def test_one_real_training_step_moves_the_policy(models_, tmp_path):
    ours = make(ConservativeDPOTrainer, models_, tmp_path, alphas=[0.2, 0.0, 0.5, 0.1], max_steps=1,
                learning_rate=1e-3)
    before = {k: v.clone() for k, v in ours.model.state_dict().items()}
    out = ours.train()
    assert out.global_step == 1 and out.training_loss > 0
    assert any(not torch.equal(before[k], v) for k, v in ours.model.state_dict().items())
    assert any("alpha" in entry for entry in ours.state.log_history)


def test_lora_training_step_moves_only_the_adapters_and_merges(models_, tmp_path):
    """cDPO with PEFT LoRA (``model.lora.enabled``): the adapters train, the base weights do
    not, and the merged policy saves as a plain model dir."""
    from closedloop import config

    policy, ref, tok = models_
    lora = config.load([], ["model.lora.target_modules=[q_proj,v_proj]"]).model.lora
    rows = [dict(p, alpha=a) for p, a in zip(PAIRS, [0.2, 0.0, 0.5, 0.1], strict=True)]
    trainer = ConservativeDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                                     args=args(tmp_path, max_steps=1, learning_rate=1e-2),
                                     train_dataset=Dataset.from_list(rows), processing_class=tok,
                                     peft_config=models.lora_config(lora))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    out = trainer.train()
    after = trainer.model.state_dict()
    moved = {k for k, v in after.items() if not torch.equal(before[k], v)}
    assert out.global_step == 1 and moved and all("lora_" in k for k in moved)
    models.save_policy(trainer.model, tok, tmp_path / "model", merge_lora=True)
    merged, _ = models.load_dir(tmp_path / "model", config.load([], ["model.kind=tiny"]).model)
    assert not any("lora" in k for k in merged.state_dict())
    base_q = policy.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"], base_q)


def test_unsupported_loss_settings_are_refused(models_, tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        make(ConservativeDPOTrainer, models_, tmp_path, alphas=[0.0] * 4, loss_type=["ipo"])


def test_loss_weights_scale_the_whole_cdpo_loss(models_, tmp_path):
    """TRL's ``loss_weights: [w]`` multiplies the sigmoid loss; cDPO weights its α·β·h term too
    (issue 15 §6: before, only the sigmoid part was weighted)."""
    alphas = [0.2, 0.0, 0.5, 0.1]
    ours = make(ConservativeDPOTrainer, models_, tmp_path, alphas=alphas, loss_weights=[2.0])
    batch = batch_of(ours)
    h = hand_margin(ours, batch)
    expected = 2.0 * float(cdpo_loss(h, torch.tensor(alphas), BETA).mean())
    assert loss_of(ours, batch) == pytest.approx(expected, abs=1e-5)


def test_rpo_nll_term_adds_lambda_times_the_chosen_tokens_mean_nll(models_, tmp_path):
    """loss_type [sigmoid, sft], weights [1, λ]: the cDPO loss + λ·(−mean log πθ over every chosen
    completion token of the batch), TRL's ``sft`` term (RPO); the α·β·h term stays at weight 1."""
    alphas, lam = [0.2, 0.0, 0.5, 0.1], 0.7
    ours = make(ConservativeDPOTrainer, models_, tmp_path, alphas=alphas, loss_type=["sigmoid", "sft"],
                loss_weights=[1.0, lam])
    batch = batch_of(ours)
    h = hand_margin(ours, batch)
    with torch.no_grad():
        logits = ours.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(2, batch["input_ids"][:, 1:].unsqueeze(2)).squeeze(2)
    chosen_logp, chosen_mask = logp.chunk(2)[0], batch["completion_mask"][:, 1:].chunk(2)[0].bool()
    nll = float(-chosen_logp[chosen_mask].mean())
    assert nll > 0.1  # not vacuous
    expected = float(cdpo_loss(h, torch.tensor(alphas), BETA).mean()) + lam * nll
    assert loss_of(ours, batch) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="loss_weights"):
        make(ConservativeDPOTrainer, models_, tmp_path, alphas=alphas, loss_type=["sigmoid", "sft"], loss_weights=[1.0])
