"""COrAL blockwise decoding vs AR greedy of the same COrAL model (SPEC §5), side by side.

One COrAL model decodes the same held-out synthetic questions with AR greedy of its own +1
prediction and with sliding blockwise decoding at each (block, ε) of the grid, alternating
the decodings question by question (so load changes on a shared machine hit all alike).
Prints, per decoding: accuracy, tokens per forward pass, seconds per question, wall-time
speed-up over AR greedy and the accuracy difference (points).

The model: ``--model DIR`` (a COrAL dir, e.g. results/default/coral/stage2/model), else one
trained here with the default ``coral`` settings (stage 1, then stage 2; ``--max-steps``
caps each) from ``--init`` (default: results/default/sft/model, else the base model) on
the default synthetic training split's generator.

    python bench/coral_decoding.py [--model DIR | --untrained] [--questions 200] [--grid 16:0.1,4:0.1,16:0.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from closedloop import answers, config, models, prompts, synthetic
from closedloop.coral import decoding
from closedloop.coral import model as coral_model
from closedloop.coral import trainer as coral_trainer
from closedloop.coral.objective import backward_window
from closedloop.generation import FINAL_ANSWER


def train(cfg, init: str, out: Path, max_steps: int) -> float:
    """Both COrAL stages with the default settings; returns the training seconds."""
    from datasets import Dataset
    from transformers import TrainingArguments

    c, t0 = cfg.coral, time.perf_counter()
    tokenizer = models.load_tokenizer(init, cfg.model)
    rows = synthetic.generate("bench-coral-train", cfg.data.tasks.synthetic.n_train, 2, 4, 20, 9)
    data = Dataset.from_list(coral_trainer.tokenize(tokenizer, rows, c.max_length))
    source = init
    for stage in (1, 2):
        m = coral_model.load(source)
        coral_model.mark(m, c.window, backward_window(c.window, c.n_back_pred))
        coral_trainer.set_trainable(m, stage)
        s = c[f"stage{stage}"]
        args = TrainingArguments(output_dir=str(out / f"trainer{stage}"), num_train_epochs=s.epochs,
                                 max_steps=max_steps or s.max_steps, learning_rate=s.learning_rate,
                                 lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio,
                                 per_device_train_batch_size=s.batch_size, logging_steps=s.logging_steps,
                                 save_strategy="no", report_to="none", seed=cfg.seed, use_cpu=True,
                                 remove_unused_columns=False)
        trainer = coral_trainer.CoralTrainer(model=m.train(), args=args, train_dataset=data,
                                             data_collator=coral_trainer.Collator(tokenizer.pad_token_id),
                                             w_f=c.window, w_b=backward_window(c.window, c.n_back_pred),
                                             max_chunk=c.max_chunk)
        trainer.train()
        source = str(out / f"stage{stage}")
        m.save_pretrained(source)
        tokenizer.save_pretrained(source)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a COrAL model dir (default: train one)")
    parser.add_argument("--init", default=None, help="policy to train from (default: results/default/sft/model)")
    parser.add_argument("--max-steps", type=int, default=0, help="cap on each training stage's steps (0: epochs)")
    parser.add_argument("--untrained", action="store_true",
                        help="no COrAL training: the init policy as a COrAL model (its last layer run in OA mode)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--grid", default="16:0.1,4:0.1,16:0.0", help="block:eps,... for blockwise decoding")
    parser.add_argument("--threshold", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    cfg = config.load([], [])
    tmp = Path(tempfile.mkdtemp(prefix="coral-bench-"))
    source = args.model
    if source is None:
        init = args.init or ("results/default/sft/model" if Path("results/default/sft/model").is_dir()
                             else models.base_source(cfg.model))
    if source is None and args.untrained:
        source = init
        print(f"untrained: {init} decoded as a COrAL model (W_f {cfg.coral.window})")
    elif source is None:
        seconds = train(cfg, init, tmp, args.max_steps)
        print(f"trained a COrAL model from {init} in {seconds:.0f} s (max_steps {args.max_steps or 'epochs'})")
        source = str(tmp / "stage2")
    m = coral_model.load(source, models.DTYPES[args.dtype])
    if not coral_model.is_coral_dir(source):
        coral_model.mark(m, cfg.coral.window, backward_window(cfg.coral.window, cfg.coral.n_back_pred))
    tokenizer = models.load_tokenizer(source, cfg.model)
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    budget = args.max_new_tokens or cfg.eval.max_new_tokens
    threshold = cfg.coral.decoding.threshold if args.threshold is None else args.threshold
    rows = synthetic.generate("bench-coral", args.questions, 2, 4, 20, 9)
    grid = [(int(b), float(e)) for b, e in (x.split(":") for x in args.grid.split(","))]
    names = ["ar"] + [f"block{b} eps{e}" for b, e in grid]
    res = {n: {"correct": 0, "tokens": 0, "passes": 0, "seconds": 0.0} for n in names}

    def stop(toks):
        return FINAL_ANSWER.search(tokenizer.decode(toks, skip_special_tokens=True)) is not None

    for row in rows:
        prompt = tokenizer(prompts.chat_prompt(tokenizer, row), add_special_tokens=False)["input_ids"]
        for name in names:
            if name == "ar":
                out = decoding.ar_greedy(m, prompt, budget, eos, stop=stop)
            else:
                b, e = grid[names.index(name) - 1]
                out = decoding.blockwise(m, prompt, budget, eos, block=b, eps=e, threshold=threshold,
                                         max_refinements=cfg.coral.decoding.max_refinements, stop=stop)
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            found = FINAL_ANSWER.search(text)
            text = text[:found.end()] if found else text
            r = res[name]
            r["correct"] += answers.is_correct(answers.extract(text, row), row)
            r["tokens"] += len(out.tokens)
            r["passes"] += out.forward_passes
            r["seconds"] += out.seconds
            print(f"question {row['id']} {name}: {len(out.tokens)} tokens, {out.forward_passes} passes, "
                  f"{out.seconds:.1f} s", flush=True)
    ar = res["ar"]
    print(f"model {source}; {len(rows)} held-out synthetic questions, budget {budget}, threshold {threshold}, "
          f"{args.dtype}, torch threads {torch.get_num_threads()}")
    print("| decoding | accuracy % | tokens / forward | s / question | wall speed-up | accuracy diff (points) |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        acc = 100 * r["correct"] / len(rows)
        print(f"| {name} | {acc:.1f} | {r['tokens'] / max(r['passes'], 1):.2f} | {r['seconds'] / len(rows):.3f} | "
              f"{ar['seconds'] / r['seconds']:.2f}x | {acc - 100 * ar['correct'] / len(rows):+.1f} |")


if __name__ == "__main__":
    main()
