"""MCTS collection throughput vs plain batched sampling (issue 3 goal: ratio >= 0.9).

Measures, in one run with one model: policy tokens generated per second during MCTS
collection (wall time of the whole search: generation, self-evaluation, tree work),
and tokens per second of plain batched sampling of the same number of tokens with the
same model and batch size (the collection's mean rows per generate call), 48 tokens a
row. Prints both and their ratio; also a second baseline, plain sampling of one-line
steps from the same prompts (no tree, no self-evaluation, no KV reuse). The three are
interleaved batch by batch (search a batch of trees, then sample as many tokens both
ways), so a noisy shared machine slows all three alike.

    python bench/mcts_throughput.py [--model DIR] [--prompts 16] [key=value mcts overrides]
"""

from __future__ import annotations

import argparse
import time

import torch

from closedloop import config, models, prompts, synthetic
from closedloop.mcts import Searcher, sample_continuations


class CountingSearcher(Searcher):
    """A Searcher that also counts generate calls and rows, for the matched baseline."""

    calls = rows = 0

    def _sample(self, requests, trees, rows, complete):
        self.calls += 1
        self.rows += sum(b for _, _, b in requests)
        return super()._sample(requests, trees, rows, complete)


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
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = config.load([], [f"mcts.{o}" for o in args.overrides])
    from pathlib import Path

    source = args.model or ("results/default/sft/model" if Path("results/default/sft/model").is_dir()
                            else models.base_source(cfg.model))
    model, tokenizer = models.load_dir(source, cfg.model)
    rows = synthetic.generate("bench", args.prompts, 2, 4, 20, 9)
    torch.manual_seed(0)
    searcher = CountingSearcher(model, tokenizer, cfg.mcts, source)
    seconds = {"mcts": 0.0, "plain": 0.0, "line": 0.0}
    tokens = {"mcts": 0, "plain": 0, "line": 0}
    # interleaved per batch of trees, so load changes on a shared machine hit all three alike
    for b in range(0, len(rows), cfg.mcts.trees_per_batch):
        batch_rows = rows[b:b + cfg.mcts.trees_per_batch]
        before, calls, n_rows = searcher.policy_tokens, searcher.calls, searcher.rows
        start = time.perf_counter()
        searcher.search(batch_rows)
        seconds["mcts"] += time.perf_counter() - start
        produced = searcher.policy_tokens - before
        tokens["mcts"] += produced
        batch = max(1, round((searcher.rows - n_rows) / max(searcher.calls - calls, 1)))
        texts = [prompts.chat_prompt(tokenizer, r) for r in batch_rows]
        n, t = plain_sampling(model, tokenizer, texts, batch, produced, cfg.mcts.temperature)
        tokens["plain"], seconds["plain"] = tokens["plain"] + n, seconds["plain"] + t
        n, t = line_sampling(model, tokenizer, texts, batch, produced, cfg.mcts.temperature,
                             cfg.mcts.max_step_tokens)
        tokens["line"], seconds["line"] = tokens["line"] + n, seconds["line"] + t
    rate = {name: tokens[name] / seconds[name] for name in seconds}
    batch = max(1, round(searcher.rows / searcher.calls))
    print(f"model: {source}; {args.prompts} prompts; torch threads {torch.get_num_threads()}")
    print(f"mcts collection : {tokens['mcts']} policy tokens in {seconds['mcts']:.1f} s = {rate['mcts']:.1f} tok/s "
          f"({searcher.calls} generate calls, {batch} rows/call on average)")
    print(f"plain sampling  : {tokens['plain']} tokens in {seconds['plain']:.1f} s = {rate['plain']:.1f} tok/s "
          f"(same batch size, 48 tokens a row)")
    print(f"line sampling   : {tokens['line']} tokens in {seconds['line']:.1f} s = {rate['line']:.1f} tok/s "
          f"(one line a row, full prompt prefill, no search)")
    print(f"ratio (mcts / plain): {rate['mcts'] / rate['plain']:.3f}   goal >= 0.9")
    print(f"ratio (mcts / line sampling): {rate['mcts'] / rate['line']:.3f}")


if __name__ == "__main__":
    main()
