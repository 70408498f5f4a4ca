"""V-DPO (SPEC §4) on TRL's DPOTrainer, on a tiny random LLaVA built from config: γ = 1 is
TRL's plain DPO, the loss and its gradient at γ ∈ {0, 0.75, 1} match the hand derivation,
image-contrast pairs reach the model with their edited image, and a real step trains."""

import copy

import pytest
import torch
from dpo_helpers import batch_of, perturbed_reference
from PIL import Image
from trl import DPOConfig, DPOTrainer

from closedloop import config
from closedloop.vlm import model as vlm
from closedloop.vlm import scenes as vlm_data
from closedloop.vlm import vdpo
from closedloop.vlm.pairs import recolour_object, remove_object
from closedloop.vlm.vdpo import VisionGuidedDPOTrainer, guided_log_prob

pytestmark = pytest.mark.slow
BETA = 0.1
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    cfg = config.load([ROOT / "configs" / "vlm_smoke.yaml"])
    policy, processor = vlm.load(vlm.base_source(cfg.vlm.model), cfg.vlm.model)
    return policy, perturbed_reference(policy), processor


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """Two response-contrast and two image-contrast pairs on real easy-VQA images."""
    import easy_vqa

    root = tmp_path_factory.mktemp("pairs")
    paths = easy_vqa.get_test_image_paths()
    rows = []
    for n, i in enumerate([0, 1, 2, 3]):
        pixels = vlm_data.load_rgb(paths[i])
        Image.fromarray(pixels).save(root / f"{i}.png")
        row = {"image": f"{i}.png", "rejected_image": None}
        if n < 2:
            row |= {"prompt": vlm.prompt("Describe the image."), "chosen": " A red circle.",
                    "rejected": " A blue triangle." if n == 0 else " No."}
        else:
            edited = remove_object(pixels) if n == 2 else recolour_object(pixels, (0, 128, 128))
            Image.fromarray(edited).save(root / f"{i}-edited.png")
            row |= {"prompt": vlm.prompt("Is there a circle in the image?"), "chosen": " Yes.", "rejected": " Yes.",
                    "rejected_image": f"{i}-edited.png"}
        rows.append(row)
    return root, rows


def args(tmp_path, **kw):
    return DPOConfig(output_dir=str(tmp_path), beta=BETA, per_device_train_batch_size=4, max_length=None,
                     report_to="none", save_strategy="no", logging_steps=1, bf16=False, use_cpu=True,
                     precompute_ref_log_probs=False, dataloader_pin_memory=False, **kw)


def make(tiny, pair_files, tmp_path, gamma, rows=None, alphas=None, cls=VisionGuidedDPOTrainer, **kw):
    policy, ref, processor = tiny
    root, all_rows = pair_files
    rows = all_rows if rows is None else rows
    if alphas is not None:
        rows = [dict(r, alpha=a) for r, a in zip(rows, alphas, strict=True)]
    ds = vdpo.preference_dataset(rows, root, root, processor.tokenizer.eos_token, alphas is not None)
    extra = {"gamma": gamma} if cls is VisionGuidedDPOTrainer else {}
    if cls is DPOTrainer:
        ds = ds.remove_columns("rejected_images")
    return cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args(tmp_path, **kw),
               train_dataset=ds, processing_class=processor, **extra)


def sequence_logps(model, batch, pixel_values):
    """Σ log p over each row's completion tokens, from a fresh forward pass (grad if enabled)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=pixel_values).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(2, batch["input_ids"][:, 1:].unsqueeze(2)).squeeze(2)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def hand_margin(trainer, batch, gamma):
    """h̃ = [log π̃(y_w) − log π_ref(y_w)] − [log π̃(y_l) − log π_ref(y_l)] (SPEC §4)."""
    pixels = batch["pixel_values"]
    with torch.no_grad():
        pol = sequence_logps(trainer.model, batch, pixels)
        null = sequence_logps(trainer.model, batch, torch.zeros_like(pixels))
        ref = sequence_logps(trainer.ref_model, batch, pixels)
    guided = guided_log_prob(pol, null, gamma)
    (g_c, g_r), (r_c, r_r) = guided.chunk(2), ref.chunk(2)
    return (g_c - r_c) - (g_r - r_r)


def trainer_loss(trainer, batch):
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, dict(batch)))


def test_gamma_one_equals_trl_plain_dpo(tiny, pair_files, tmp_path):
    rows = pair_files[1][:2]  # response-contrast pairs: TRL's own collator handles them
    ours = make(tiny, pair_files, tmp_path, 1.0, rows=rows)
    trl = make(tiny, pair_files, tmp_path, 1.0, rows=rows, cls=DPOTrainer)
    batch, trl_batch = batch_of(ours), batch_of(trl)
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    assert loss_close(trainer_loss(ours, batch), trainer_loss(trl, trl_batch))
    h = hand_margin(ours, batch, 1.0)
    assert h.abs().min() > 1e-4  # not vacuous
    assert loss_close(trainer_loss(ours, batch), float(-torch.nn.functional.logsigmoid(BETA * h).mean()))


def loss_close(a, b):
    return a == pytest.approx(b, abs=1e-6)


def test_image_contrast_rows_carry_the_edited_image(tiny, pair_files, tmp_path):
    ours = make(tiny, pair_files, tmp_path, 0.75)
    batch = batch_of(ours)
    processor, root, rows = tiny[2], *pair_files
    pixels = batch["pixel_values"]
    assert pixels.shape[0] == 8
    for i, row in enumerate(rows):
        original = processor.image_processor(images=[Image.open(root / row["image"])], return_tensors="pt")
        assert torch.allclose(pixels[i], original["pixel_values"][0])
        rejected = root / (row["rejected_image"] or row["image"])
        expected = processor.image_processor(images=[Image.open(rejected)], return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(pixels[4 + i], expected)
        assert torch.equal(pixels[4 + i], pixels[i]) == (row["rejected_image"] is None)


@pytest.mark.parametrize("gamma", [0.0, 0.75, 1.0, 1.5])
def test_loss_matches_the_guided_formula(tiny, pair_files, tmp_path, gamma):
    ours = make(tiny, pair_files, tmp_path, gamma)
    batch = batch_of(ours)
    h = hand_margin(ours, batch, gamma)
    assert loss_close(trainer_loss(ours, batch), float(-torch.nn.functional.logsigmoid(BETA * h).mean()))


@pytest.mark.parametrize("gamma", [0.0, 0.75, 1.0])
def test_gradient_matches_the_hand_derivation(tiny, pair_files, tmp_path, gamma):
    """ℓ = −log σ(β h̃) with h̃ = γ(l_w − l_l) − (γ−1)·sg(n_w − n_l) − (r_w − r_l), so
    ∇ℓ = −β σ(−β h̃) · γ · ∇(l_w − l_l): the null-image terms carry no gradient, and at γ = 0
    neither does anything else (SPEC §4's caution)."""
    ours = make(tiny, pair_files, tmp_path, gamma)
    batch = batch_of(ours)
    model = ours.model
    model.eval()
    model.zero_grad()
    ours.compute_loss(model, dict(batch)).backward()
    got = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}

    h = hand_margin(ours, batch, gamma)
    coef = (-BETA * torch.sigmoid(-BETA * h) / h.numel()).detach()
    model.zero_grad()  # the same weights, a fresh plain forward (no TRL, no hooks at work)
    pol = sequence_logps(model, batch, batch["pixel_values"])
    l_w, l_l = pol.chunk(2)
    surrogate = (coef * gamma * (l_w - l_l)).sum()
    if gamma > 0:
        surrogate.backward()
    expected = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    total = sum(float(g.abs().sum()) for g in got.values())
    if gamma == 0:
        assert total == 0.0
    else:
        assert total > 1e-6
        for name, g in got.items():
            assert torch.allclose(g, expected[name], rtol=1e-3, atol=1e-7), name


def test_alpha_column_adds_the_cdpo_term(tiny, pair_files, tmp_path):
    alphas = [0.0, 0.3, 0.1, 0.5]
    ours = make(tiny, pair_files, tmp_path, 0.75, alphas=alphas)
    batch = batch_of(ours)
    assert batch["alpha"].tolist() == pytest.approx(alphas)
    h = hand_margin(ours, batch, 0.75)
    a = torch.tensor(alphas)
    expected = (-(1 - a) * torch.nn.functional.logsigmoid(BETA * h) - a * torch.nn.functional.logsigmoid(-BETA * h))
    assert loss_close(trainer_loss(ours, batch), float(expected.mean()))


def test_one_real_step_on_the_tiny_vlm(tiny, pair_files, tmp_path):
    ours = make(tiny, pair_files, tmp_path, 0.75, alphas=[0.1, 0.0, 0.2, 0.0], max_steps=1, learning_rate=1e-3)
    before = {k: v.clone() for k, v in ours.model.state_dict().items()}
    out = ours.train()
    assert out.global_step == 1 and out.training_loss > 0
    changed = [k for k, v in ours.model.state_dict().items() if not torch.equal(before[k], v)]
    assert any("vision_tower" in k for k in changed) and any("language_model" in k for k in changed)
    assert any("alpha" in entry for entry in ours.state.log_history)
