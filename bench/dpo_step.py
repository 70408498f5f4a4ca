"""cDPO step time vs TRL's DPOTrainer sigmoid step time (issue 4 goal: ratio <= 1.05).

Both trainers get the same model weights, reference, batch and settings; their
``training_step`` (forward, loss, backward) is timed alternately, ``--repeats`` times
each, in one process, and the ratio of the medians is printed. The optimizer step is
left out: it is identical for both.

    python bench/dpo_step.py [--model DIR|tiny] [--batch 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from closedloop import config, models, prompts, synthetic
from closedloop.cdpo import ConservativeDPOTrainer


def pairs(tokenizer, n: int) -> list[dict]:
    rows = synthetic.generate("bench-dpo", n, 2, 4, 20, 9)
    out = []
    for i, row in enumerate(rows):
        prompt = prompts.chat_prompt(tokenizer, row) + "".join(s + "\n" for s in row["solution_steps"][:1])
        good = row["solution_steps"][1] + "\n"
        bad = good.replace("=", "= 1 +", 1)
        out.append({"prompt": prompt, "chosen": good, "rejected": bad, "alpha": (i % 5) / 10})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a from_pretrained dir, or 'tiny' (default: embedded SmolLM2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cfg = config.load([], ["model.kind=tiny"] if args.model == "tiny" else [])
    source = args.model if args.model not in (None, "tiny") else models.base_source(cfg.model)
    policy, tok = models.load_dir(source, cfg.model)
    rows = pairs(tok, args.batch)
    settings = dict(beta=0.1, per_device_train_batch_size=args.batch, max_length=512, report_to="none",
                    save_strategy="no", bf16=False, use_cpu=True, precompute_ref_log_probs=False)
    trainers = {
        "trl_sigmoid": DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(policy),
                                  args=DPOConfig(output_dir="/tmp/bench-dpo-trl", **settings),
                                  train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                                   for r in rows]), processing_class=tok),
        "cdpo": ConservativeDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(policy),
                                       args=DPOConfig(output_dir="/tmp/bench-dpo-cdpo", **settings),
                                       train_dataset=Dataset.from_list(rows), processing_class=tok),
    }
    batches = {name: t.data_collator([t.train_dataset[i] for i in range(len(t.train_dataset))])
               for name, t in trainers.items()}
    times = {name: [] for name in trainers}
    for name, t in trainers.items():  # warm-up
        t.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call training_step directly
        t.model.train()
        t.training_step(t.model, dict(batches[name]))
    for _ in range(args.repeats):
        for name, t in trainers.items():
            start = time.perf_counter()
            t.training_step(t.model, dict(batches[name]))
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    tokens = int(batches["trl_sigmoid"]["attention_mask"].sum())
    print(f"model: {source}; batch {args.batch} pairs ({tokens} tokens); torch threads {torch.get_num_threads()}")
    for name, ts in times.items():
        print(f"{name:12s}: median {med[name]:.3f} s/step over {len(ts)} steps (min {min(ts):.3f}, max {max(ts):.3f})")
    print(f"ratio (cdpo / trl_sigmoid): {med['cdpo'] / med['trl_sigmoid']:.3f}   goal <= 1.05")


if __name__ == "__main__":
    main()
