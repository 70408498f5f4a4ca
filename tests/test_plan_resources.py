"""``closedloop plan-resources`` (closedloop.plan): parameter counts against the hub models' own,
the tiny model's estimate against its measured peak memory on CPU, the paper presets' tables."""

import os
import subprocess
import sys
from pathlib import Path

from closedloop import config, plan

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import sys, torch
from closedloop import config, models, plan

def status(key):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key))) * 1024

cfg = config.load([sys.argv[1]], ["model.bf16_training=false"])
torch.manual_seed(0)
model, tok = models.load_base(cfg.model)
ids = torch.randint(0, len(tok), (cfg.sft.batch_size, cfg.sft.max_length))  # the configured batch, full length
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the HF Trainer's default optimizer

def step():
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

for recompute in (False, True):  # the estimate assumes checkpointing (TRL's default); both measured
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step()  # AdamW's states exist from here on
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(),
               *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))])
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    step()
    estimate = plan.training("sft", cfg, {"gpus_per_node": 0})
    print(recompute, held + status("VmHWM") - before, estimate.total, sum(p.numel() for p in model.parameters()))
"""


def test_parameter_counts_are_the_models_own():
    # the hub models' safetensors index totals: Mistral-7B-v0.1 7,241,732,096; llava-1.5-7b-hf 7,063,427,072
    assert plan.n_params(plan.KNOWN["mistralai/Mistral-7B-v0.1"]) == 7_241_732_096
    assert plan.n_params(plan.KNOWN["llava-hf/llava-1.5-7b-hf"]) == 7_063_427_072
    tiny = plan.shape(config.load([ROOT / "configs" / "smoke.yaml"]).model)
    # tied 49152 x 64 embedding + 2 layers x (2*64*64 + 2*64*32 + 3*64*128 + 2*64) + final norm 64
    assert plan.n_params(tiny) == 49152 * 64 + 2 * (8192 + 4096 + 24576 + 128) + 64 == 3_219_776
    lora = config.load([ROOT / "configs" / "paper" / "vdpo_llava7b.yaml"]).vlm.model.lora
    # r 128 x (in + out) over q,k,v,o (4096+4096 each), gate/up (4096+11008), down (11008+4096), 32 layers
    assert plan.n_lora(plan.KNOWN["llava-hf/llava-1.5-7b-hf"], lora) == 32 * 128 * (4 * 8192 + 3 * 15104)


def test_tiny_model_estimate_is_within_30_percent_of_its_measured_peak_on_cpu():
    """One SFT step (forward, backward, AdamW) at the smoke config's batch and max_length; peak
    memory = parameters + AdamW states + the step's rise of VmHWM, with glibc returning every
    tensor of 64 KiB and up to the OS at once (MALLOC_MMAP_THRESHOLD_), so RSS follows live tensors."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT / "configs" / "smoke.yaml")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("False", "True"))]
    assert len(rows) == 2, out.stdout
    for recompute, measured, estimate, n_params in rows:
        assert int(n_params) == 3_219_776
        assert abs(int(estimate) - int(measured)) <= 0.3 * int(measured), (recompute, measured, estimate)
        print(f"gradient checkpointing {recompute}: measured {int(measured) / 2**20:.0f} MiB, "
              f"estimated {int(estimate) / 2**20:.0f} MiB")


def test_plan_resources_prints_each_paper_preset_against_its_gpus():
    for preset, rows in (("mcts_ipl_mistral7b", ("sft", "dpo", "evaluate", "mcts")),
                         ("vdpo_llava7b", ("vlm_sft", "vdpo", "pope"))):
        out = subprocess.run([sys.executable, "-m", "closedloop", "plan-resources", "--config",
                              str(ROOT / "configs" / "paper" / f"{preset}.yaml")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert f"launch settings: {ROOT}/configs/paper/{preset}.launch.yaml" in out.stdout
        table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                 for line in out.stdout.splitlines()[3:]}
        assert tuple(table) == rows, out.stdout
        assert all(r[-2] == "80.0" for r in table.values()), out.stdout  # every stage states its GPU memory
        if preset == "mcts_ipl_mistral7b":
            # policy + reference + grads + AdamW in bf16: 4 x 13.49 + 13.49 GiB would be on every DDP rank
            # (80.65 GiB, no); the preset's dpo.trainer_args.fsdp full_shard splits them over 8 GPUs
            assert table["dpo"][:2] == ["8", "fsdp"] and float(table["dpo"][-4]) > 72 > float(table["dpo"][-3])
            assert table["dpo"][-1] == "yes" and table["sft"][:2] == ["8", "ddp"] and table["sft"][-1] == "yes"
        else:
            assert all(r[-1] == "yes" for r in table.values()), out.stdout


def test_training_stages_checkpoint_gradients_as_the_estimate_assumes(tmp_path):
    """TRL's SFTConfig and DPOConfig default to gradient checkpointing; trainer_args keeps it."""
    from closedloop import training

    cfg = config.load([ROOT / "configs" / "smoke.yaml"])
    assert training.trainer_args("sft", cfg.sft, tmp_path, 0, False).gradient_checkpointing
    assert training.trainer_args("dpo", cfg.dpo, tmp_path, 0, False).gradient_checkpointing


def test_the_mistral_preset_hands_dpo_to_fsdp(tmp_path):
    """The preset's dpo.trainer_args reach TRL's DPOConfig: FSDP full shard of the decoder layers with
    FSDP's own activation checkpointing (plan-resources reads the same keys)."""
    from closedloop import training

    cfg = config.load([ROOT / "configs" / "paper" / "mcts_ipl_mistral7b.yaml"])
    args = training.trainer_args("dpo", cfg.dpo, tmp_path, 0, False, beta=0.1)
    assert args.fsdp and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["MistralDecoderLayer"]
    assert args.fsdp_config["reshard_after_forward"] and args.fsdp_config["activation_checkpointing"]
    assert not args.activation_checkpointing
