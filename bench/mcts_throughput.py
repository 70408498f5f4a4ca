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
machine slows them alike. Each rate is also given per second of this process's CPU time
(``time.process_time``); with one torch thread that is nearly immune to other processes
on a shared machine, so the CPU-time ratio is the steadier one.

The script also runs against the Searcher before the decode loop (one ``generate`` call
per simulation), whose baseline batch is then the mean rows per ``generate`` call.

    python bench/mcts_throughput.py [--model DIR] [--prompts 16] [--line] [key=value mcts overrides]
"""

from __future__ import annotations

import argparse
import time

import torch

from closedloop import config, models, prompts, synthetic
from closedloop.loop.search import Searcher
from closedloop.sampling import sample_continuations


class CountingSearcher(Searcher):
    """Counts rows per ``generate`` call when the Searcher is the one before the decode loop."""

    calls = rows = 0

    def _sample(self, requests, trees, rows, complete):
        self.calls += 1
        self.rows += sum(b for _, _, b in requests)
        return super()._sample(requests, trees, rows, complete)

    def occupancy(self) -> tuple[int, int]:
        """(decode steps or generate calls, row-steps or rows) so far."""
        if hasattr(self, "decode_steps"):
            return self.decode_steps, self.decode_row_steps
        return self.calls, self.rows


def plain_sampling(model, tokenizer, prompt_texts, batch_size, n_tokens, temperature):
    """Sample until ``n_tokens`` tokens exist, ``batch_size`` rows a call; returns (tokens, seconds)."""
    per_row = 48
    done, start, cpu, i = 0, time.perf_counter(), time.process_time(), 0
    tokenizer.padding_side = "left"
    while done < n_tokens:
        batch = [prompt_texts[(i + j) % len(prompt_texts)] for j in range(batch_size)]
        i += batch_size
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**enc, do_sample=True, temperature=temperature, max_new_tokens=per_row,
                           min_new_tokens=per_row, pad_token_id=tokenizer.pad_token_id)
        done += batch_size * per_row
    return done, time.perf_counter() - start, time.process_time() - cpu


def line_sampling(model, tokenizer, prompt_texts, batch_size, n_tokens, temperature, max_step_tokens):
    """Sample one-line steps (same stop rule as MCTS) until ``n_tokens`` tokens exist."""
    done, start, cpu, i = 0, time.perf_counter(), time.process_time(), 0
    while done < n_tokens:
        batch = [prompt_texts[(i + j) % len(prompt_texts)] for j in range(batch_size)]
        i += batch_size
        samples = sample_continuations(model, tokenizer, batch, max_new_tokens=max_step_tokens, one_line=True,
                                       temperature=temperature, top_p=1.0)
        done += sum(s.n_tokens for s in samples)
    return done, time.perf_counter() - start, time.process_time() - cpu


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
    searcher = CountingSearcher(model, tokenizer, cfg.mcts, source)
    names = ["mcts", "plain"] + (["line"] if args.line else [])
    seconds, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    tokens = dict.fromkeys(names, 0)
    # interleaved per batch of trees, so load changes on a shared machine hit all alike
    for b in range(0, len(rows), cfg.mcts.trees_per_batch):
        batch_rows = rows[b:b + cfg.mcts.trees_per_batch]
        before, (steps, row_steps) = searcher.policy_tokens, searcher.occupancy()
        start, cpu_start = time.perf_counter(), time.process_time()
        searcher.search(batch_rows)
        seconds["mcts"] += time.perf_counter() - start
        cpu["mcts"] += time.process_time() - cpu_start
        produced = searcher.policy_tokens - before
        tokens["mcts"] += produced
        steps_now, row_steps_now = searcher.occupancy()
        batch = max(1, round((row_steps_now - row_steps) / max(steps_now - steps, 1)))
        texts = [prompts.chat_prompt(tokenizer, r) for r in batch_rows]
        runs = {"plain": (plain_sampling, (model, tokenizer, texts, batch, produced, cfg.mcts.temperature))}
        if args.line:
            runs["line"] = (line_sampling, (model, tokenizer, texts, batch, produced, cfg.mcts.temperature,
                                            cfg.mcts.max_step_tokens))
        for name, (run, run_args) in runs.items():
            n, t, c = run(*run_args)
            tokens[name], seconds[name], cpu[name] = tokens[name] + n, seconds[name] + t, cpu[name] + c
    rate = {name: tokens[name] / seconds[name] for name in seconds}
    cpu_rate = {name: tokens[name] / cpu[name] for name in cpu}
    steps, row_steps = searcher.occupancy()
    unit = "decode steps" if hasattr(searcher, "decode_steps") else "generate calls"
    print(f"model: {source}; {args.prompts} prompts; torch threads {torch.get_num_threads()}")
    print(f"mcts collection : {tokens['mcts']} policy tokens in {seconds['mcts']:.1f} s = {rate['mcts']:.1f} tok/s, "
          f"{cpu['mcts']:.1f} CPU s = {cpu_rate['mcts']:.1f} tok/CPU-s ({steps} {unit}, "
          f"{row_steps / max(steps, 1):.1f} rows per {unit[:-1]} on average)")
    if hasattr(searcher, "timings"):
        phases = ", ".join(f"{k} {searcher.timings[k]:.1f}" for k in ("decode", "prefill", "self_eval", "tree"))
        print(f"mcts phases (s) : {phases} (total {searcher.timings['total']:.1f}); forward passes {searcher.calls}; "
              f"rows continued from their leaf's cache {searcher.continued_rows}")
    print(f"plain sampling  : {tokens['plain']} tokens in {seconds['plain']:.1f} s = {rate['plain']:.1f} tok/s, "
          f"{cpu['plain']:.1f} CPU s = {cpu_rate['plain']:.1f} tok/CPU-s (batch = the collection's mean rows, "
          f"48 tokens a row)")
    if args.line:
        print(f"line sampling   : {tokens['line']} tokens in {seconds['line']:.1f} s = {rate['line']:.1f} tok/s "
              f"(one line a row, full prompt prefill, no search)")
    print(f"ratio (mcts / plain): {rate['mcts'] / rate['plain']:.3f} wall, "
          f"{cpu_rate['mcts'] / cpu_rate['plain']:.3f} CPU time   goal >= 0.9")
    if args.line:
        print(f"ratio (mcts / line sampling): {rate['mcts'] / rate['line']:.3f}")


if __name__ == "__main__":
    main()
