"""Greedy evaluation decoding in bfloat16 vs float32 (``model.inference_dtype``).

Loads one policy twice (float32 and bfloat16) and decodes the same held-out synthetic
questions with the evaluate stage's generation settings, alternating the two dtypes
batch by batch (so load changes on a shared machine hit both alike). Prints tokens/s
of each, the speed-up, accuracy of each and how many answers agree.

    python bench/inference_dtype.py [--model DIR] [--questions 64] [--batch 16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from closedloop import answers, config, generation, models, prompts, synthetic


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="policy dir (default: results/default/sft/model, else base)")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    cfg = config.load([], [])
    source = args.model or ("results/default/sft/model" if Path("results/default/sft/model").is_dir()
                            else models.base_source(cfg.model))
    loaded = {}
    for dtype in ("float32", "bfloat16"):
        cfg.model.inference_dtype = config.DType(dtype)
        loaded[dtype] = models.load_dir(source, cfg.model, inference=True)
    rows = synthetic.generate("bench-dtype", args.questions, 2, 4, 20, 9)
    tokenizer = loaded["float32"][1]
    texts = [prompts.chat_prompt(tokenizer, r) for r in rows]
    seconds = dict.fromkeys(loaded, 0.0)
    tokens = dict.fromkeys(loaded, 0)
    outputs = {d: [] for d in loaded}
    torch.manual_seed(0)
    for start in range(0, len(rows), args.batch):
        batch = texts[start:start + args.batch]
        for dtype, (model, tok) in loaded.items():
            t0 = time.perf_counter()
            out, n = generation.generate(model, tok, batch, max_new_tokens=cfg.eval.max_new_tokens,
                                         batch_size=args.batch, stop_at_answer=True, desc=dtype)
            seconds[dtype] += time.perf_counter() - t0
            tokens[dtype] += n
            outputs[dtype] += [o[0] for o in out]
    extracted = {d: [answers.extract(t, r) for t, r in zip(outputs[d], rows, strict=True)] for d in loaded}
    for dtype in loaded:
        acc = sum(answers.is_correct(e, r) for e, r in zip(extracted[dtype], rows, strict=True)) / len(rows)
        print(f"{dtype:9s}: {tokens[dtype]} tokens in {seconds[dtype]:.1f} s = "
              f"{tokens[dtype] / seconds[dtype]:.1f} tok/s, accuracy {acc:.3f}")
    agree = sum(a == b for a, b in zip(extracted["float32"], extracted["bfloat16"], strict=True))
    speedup = (tokens["bfloat16"] / seconds["bfloat16"]) / (tokens["float32"] / seconds["float32"])
    print(f"bfloat16 / float32 tokens/s: {speedup:.2f}; same extracted answer on {agree}/{len(rows)} questions; "
          f"torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
