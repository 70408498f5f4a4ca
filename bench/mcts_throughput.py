"""MCTS collection throughput vs plain batched sampling (issue 3 goal: ratio >= 0.9).

Measures, in one run with one model: policy tokens generated per second during MCTS
collection (wall time of the whole search: decoding, prefill, self-evaluation, tree
work), and tokens per second of plain batched sampling (``generate``, 48 tokens a row) of
the same number of tokens with the same model. The baseline's batch size is the
collection's mean number of active rows per decode step (the decode loop,
``closedloop.decode``, drops finished rows and refills free slots, so this is the batch
the collection actually ran at), measured per batch of trees. Prints both, their ratio,
and the collection's seconds per phase (decode, prefill, self-eval, tree work). With
``--line``, also a second baseline: plain sampling of one-line steps from the same
prompts (no tree, no self-evaluation, no KV reuse). The baselines are interleaved batch
by batch (search a batch of trees, then sample as many tokens), so a noisy shared
machine slows them alike.

    python bench/mcts_throughput.py [--model DIR] [--prompts 16] [--line] [key=value mcts overrides]
"""

from __future__ import annotations

import argparse
import time

import torch

from closedloop import config, models, prompts, synthetic
from closedloop.mcts import Searcher, sample_continuations


def plain_sampling(model, tokenizer, prompt_texts, batch_size, n_tokens, temperature):
    """Sample until ``n_tokens`` tokens exist, ``batch_size`` rows a call; returns (tokens, seconds)."""
    per_row = 48
    done, start, i = 0, time.perf_counter(), 0
    tokenizer.padding_side = "left"
    while done < n_tokens:
        batch = [prompt_texts[(i + j) % len(prompt_texts)] for j in range(batch_size)]
        i += batch_size
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**enc, do_sample=True, temperature=temperature, max_new_tokens=per_row,
                           min_new_tokens=per_row, pad_token_id=tokenizer.pad_token_id)
        done += batch_size * per_row
    return done, time.perf_counter() - start


def line_sampling(model, tokenizer, prompt_texts, batch_size, n_tokens, temperature, max_step_tokens):
    """Sample one-line steps (same stop rule as MCTS) until ``n_tokens`` tokens exist."""
    done, start, i = 0, time.perf_counter(), 0
    while done < n_tokens:
        batch = [prompt_texts[(i + j) % len(prompt_texts)] for j in range(batch_size)]
        i += batch_size
        samples = sample_continuations(model, tokenizer, batch, max_new_tokens=max_step_tokens, one_line=True,
                                       temperature=temperature, top_p=1.0)
        done += sum(s.n_tokens for s in samples)
    return done, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="policy dir (default: results/default/sft/model, else base)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--line", action="store_true", help="also the one-line sampling baseline")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = config.load([], [f"mcts.{o}" for o in args.overrides])
    from pathlib import Path

    source = args.model or ("results/default/sft/model" if Path("results/default/sft/model").is_dir()
                            else models.base_source(cfg.model))
    model, tokenizer = models.load_dir(source, cfg.model)
    rows = synthetic.generate("bench", args.prompts, 2, 4, 20, 9)
    torch.manual_seed(0)
    searcher = Searcher(model, tokenizer, cfg.mcts, source)
    names = ["mcts", "plain"] + (["line"] if args.line else [])
    seconds = dict.fromkeys(names, 0.0)
    tokens = dict.fromkeys(names, 0)
    # interleaved per batch of trees, so load changes on a shared machine hit all alike
    for b in range(0, len(rows), cfg.mcts.trees_per_batch):
        batch_rows = rows[b:b + cfg.mcts.trees_per_batch]
        before, steps, row_steps = searcher.policy_tokens, searcher.decode_steps, searcher.decode_row_steps
        start = time.perf_counter()
        searcher.search(batch_rows)
        seconds["mcts"] += time.perf_counter() - start
        produced = searcher.policy_tokens - before
        tokens["mcts"] += produced
        batch = max(1, round((searcher.decode_row_steps - row_steps) / max(searcher.decode_steps - steps, 1)))
        texts = [prompts.chat_prompt(tokenizer, r) for r in batch_rows]
        n, t = plain_sampling(model, tokenizer, texts, batch, produced, cfg.mcts.temperature)
        tokens["plain"], seconds["plain"] = tokens["plain"] + n, seconds["plain"] + t
        if args.line:
            n, t = line_sampling(model, tokenizer, texts, batch, produced, cfg.mcts.temperature,
                                 cfg.mcts.max_step_tokens)
            tokens["line"], seconds["line"] = tokens["line"] + n, seconds["line"] + t
    rate = {name: tokens[name] / seconds[name] for name in seconds}
    rows_per_step = searcher.decode_row_steps / max(searcher.decode_steps, 1)
    print(f"model: {source}; {args.prompts} prompts; torch threads {torch.get_num_threads()}")
    print(f"mcts collection : {tokens['mcts']} policy tokens in {seconds['mcts']:.1f} s = {rate['mcts']:.1f} tok/s "
          f"({searcher.decode_steps} decode steps, {rows_per_step:.1f} active rows/step on average, "
          f"{tokens['mcts'] / max(searcher.decode_steps, 1):.1f} policy tokens/step)")
    phases = ", ".join(f"{k} {searcher.timings[k]:.1f}" for k in ("decode", "prefill", "self_eval", "tree"))
    print(f"mcts phases (s) : {phases} (total {searcher.timings['total']:.1f})")
    print(f"plain sampling  : {tokens['plain']} tokens in {seconds['plain']:.1f} s = {rate['plain']:.1f} tok/s "
          f"(batch = mean active rows per decode step of each batch of trees, 48 tokens a row)")
    if args.line:
        print(f"line sampling   : {tokens['line']} tokens in {seconds['line']:.1f} s = {rate['line']:.1f} tok/s "
              f"(one line a row, full prompt prefill, no search)")
    print(f"ratio (mcts / plain): {rate['mcts'] / rate['plain']:.3f}   goal >= 0.9")
    if args.line:
        print(f"ratio (mcts / line sampling): {rate['mcts'] / rate['line']:.3f}")


if __name__ == "__main__":
    main()
