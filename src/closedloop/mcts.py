"""Stage ``mcts``: MCTS as a data engine (SPEC §2) turning the policy's own step-by-step
solutions into step-level preference pairs.

Each shard searches its prompts in batches of ``trees_per_batch`` trees. All expansions
of one simulation, across the trees of a batch, go out as one ``generate`` call (left
padding; each row stops at the end of its line); the prior p(a|s) comes from the
generation's own logits via :class:`LogprobRecorder` (no second forward pass), and the
self-evaluation C(s) of every new node is one batched forward pass (``selfeval.py``).
Completed batches are written to a work dir keyed by the config hash, so a killed shard
resumes where it stopped with identical results (each batch has its own seed).
Each batch's question prompts are prefilled once and their KV cache reused by every
expansion (``prefix_cache.py``), so a generate call prefills only the steps so far.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from closedloop import answers, artifacts, models, paths, prompts, selfeval
from closedloop import config as cl_config
from closedloop.generation import FINAL_ANSWER
from closedloop.prefix_cache import PrefixMismatch, QuestionCache
from closedloop.tree import Candidate, Node, Tree, length_normalised_prior, preference_pairs


class LogprobRecorder(LogitsProcessor):
    """Records log p(token) of each sampled token from the raw logits generate sees.

    Placed among the custom processors, it runs before temperature/top-p warping, so
    the log-probs are the policy's own. At step t it gathers the log-prob of the token
    chosen at step t−1 (now the last input id); :meth:`finish` gathers the last one.
    """

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        """[batch, new_tokens] log-probs of the generated tokens."""
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))
        return torch.stack(self.logprobs, dim=1)


class LineStop(StoppingCriteria):
    """Stop a row once it has produced a non-empty line (one step = one line)."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([bool(re.search(r"\S[^\n]*\n", t)) for t in texts], device=input_ids.device)


@dataclass
class Sample:
    text: str
    sum_logprob: float
    n_tokens: int
    ended: bool  # the policy ended the solution (EOS) rather than a line
    token_ids: tuple[int, ...] = ()
    confidence: float | None = None  # C(s) of the step, when scored from the generation's KV cache


def sample_continuations(model, tokenizer, prompts_: list[str], *, max_new_tokens: int, one_line: bool,
                         temperature: float, top_p: float, score: bool = False,
                         prefix: tuple[QuestionCache, list[int]] | None = None) -> list[Sample]:
    """One sampled continuation per prompt, with its summed log-prob under the policy and,
    with ``score``, its self-evaluation C(s) read by continuing the same KV cache.

    With ``prefix`` = (question cache, tree index of each prompt) only the part of each
    prompt after its tree's cached question is prefilled (:mod:`closedloop.prefix_cache`).
    """
    enc = _encode(model, tokenizer, prompts_, prefix)
    prompt_len = enc["input_ids"].shape[1]
    recorder = LogprobRecorder()
    stops = StoppingCriteriaList([LineStop(tokenizer, prompt_len)] if one_line else [])
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             logits_processor=LogitsProcessorList([recorder]), stopping_criteria=stops,
                             return_dict_in_generate=True)
    seq = out.sequences
    new = seq[:, prompt_len:]
    logprobs = recorder.finish(seq)
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    samples, kept = [], []
    for row in range(new.shape[0]):
        tokens = new[row].tolist()
        cut = next((j for j, t in enumerate(tokens) if t in ends), len(tokens))
        text = tokenizer.decode(tokens[:cut], skip_special_tokens=True).lstrip("\n")
        # a line ends in a newline; a row that stopped without one hit EOS: the solution is over
        hit_eos = cut < len(tokens) and (not one_line or "\n" not in text)
        if one_line:
            text = text.split("\n", 1)[0]
        kept.append(cut)
        samples.append(Sample(text.strip(), float(logprobs[row, :cut].sum()), cut, hit_eos, tuple(tokens[:cut])))
    if score:
        confidences = selfeval.continue_confidence(model, tokenizer, seq, out.past_key_values,
                                                   enc["attention_mask"], torch.tensor(kept, device=seq.device))
        for sample, c in zip(samples, confidences, strict=True):
            sample.confidence = c
    return samples


def _encode(model, tokenizer, prompts_: list[str], prefix) -> dict:
    """generate's inputs: the prompts left padded, or their uncached suffixes after the
    cached questions (falling back to a full prefill if tokenisation crosses the boundary)."""
    if prefix is not None:
        try:
            input_ids, mask, cache = prefix[0].inputs(prefix[1], prompts_)
            return {"input_ids": input_ids, "attention_mask": mask, "past_key_values": cache}
        except PrefixMismatch:
            pass
    tokenizer.padding_side = "left"
    return dict(tokenizer(prompts_, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device))


class Searcher:
    """Runs SPEC §2's search for a batch of questions with one policy."""

    def __init__(self, model, tokenizer, mcfg, policy: str):
        self.model, self.tokenizer, self.m, self.policy = model, tokenizer, mcfg, policy
        self.policy_tokens = 0
        self.question_cache: QuestionCache | None = None

    def prefix(self, row: dict, steps: list[str]) -> str:
        return prompts.chat_prompt(self.tokenizer, row) + "".join(s + "\n" for s in steps)

    def _sample(self, requests: list[tuple[int, int, int]], trees, rows, complete: bool) -> list[Sample]:
        texts = [self.prefix(rows[i], trees[i].steps(n)) for i, n, b in requests for _ in range(b)]
        tree_of = [i for i, _, b in requests for _ in range(b)]
        out: list[Sample] = []
        size = self.m.generate_batch_size
        for start in range(0, len(texts), size):
            prefix = (self.question_cache, tree_of[start:start + size]) if self.question_cache else None
            out += sample_continuations(
                self.model, self.tokenizer, texts[start:start + size],
                max_new_tokens=self.m.max_completion_tokens if complete else self.m.max_step_tokens,
                one_line=not complete, temperature=self.m.temperature, top_p=self.m.top_p,
                score=not self.m.self_eval_hint, prefix=prefix)
        self.policy_tokens += sum(s.n_tokens for s in out)
        return out

    def expand(self, trees: list[Tree], rows: list[dict], leaves: list[tuple[int, int]]) -> None:
        """Sample b1 (root) or b2 children for each leaf, score them, attach them."""
        pending = []  # (tree index, leaf id, step texts, Sample, complete)
        for complete in (False, True):
            requests = [(i, n, self.m.b1 if n == 0 else self.m.b2) for i, n in leaves
                        if (trees[i][n].depth + 1 >= self.m.depth_limit) == complete]
            if not requests:
                continue
            samples = iter(self._sample(requests, trees, rows, complete))
            for i, n, b in requests:
                for _ in range(b):
                    pending.append((i, n, trees[i].steps(n), next(samples), complete))
            if self.m.add_gold_step and not complete:
                pending += self._gold_candidates(trees, rows, requests)
        scored = []
        for i, n, steps, sample, complete in pending:
            if not sample.text:
                continue
            terminal = complete or sample.ended or bool(FINAL_ANSWER.search(sample.text + "\n"))
            correct = None
            if terminal:
                solution = "\n".join(steps + [sample.text])
                correct = answers.is_correct(answers.extract(solution, rows[i]), rows[i])
            scored.append((i, n, steps, sample, terminal, correct))
        self._fill_confidence(scored, rows)
        by_leaf: dict[tuple[int, int], list[Candidate]] = {}
        for i, n, _, sample, terminal, correct in scored:
            prior = length_normalised_prior(sample.sum_logprob, sample.n_tokens, self.m.prior_lambda)
            by_leaf.setdefault((i, n), []).append(
                Candidate(sample.text, prior, sample.confidence, terminal, correct, sample.n_tokens))
        for i, n in leaves:
            added = trees[i].add_children(n, by_leaf.get((i, n), []), self.m.max_children,
                                          self.m.outcome_reward, self.m.self_eval_depth_scaled)
            if not added and not trees[i][n].children:
                trees[i][n].terminal, trees[i][n].correct = True, False  # a dead end: nothing usable sampled

    def _fill_confidence(self, scored, rows) -> None:
        """C(s) from the full evaluation prompt for candidates not scored during generation
        (the hinted prompt, the gold step)."""
        missing = [(i, steps, sample, terminal) for i, _, steps, sample, terminal, _ in scored
                   if sample.confidence is None]
        if not missing:
            return
        contexts = [self.prefix(rows[i], steps) + sample.text + ("" if terminal else "\n")
                    for i, steps, sample, terminal in missing]
        hints = [rows[i].get("solution_steps") if self.m.self_eval_hint else None for i, *_ in missing]
        values = selfeval.self_evaluate(self.model, self.tokenizer, contexts, hints, self.m.self_eval_batch_size)
        for (_, _, sample, _), c in zip(missing, values, strict=True):
            sample.confidence = c

    def _gold_candidates(self, trees, rows, requests):
        """The gold next step as an extra candidate where the prefix follows the gold solution."""
        extra = []
        for i, n, _ in requests:
            gold, steps = rows[i].get("solution_steps") or [], trees[i].steps(n)
            if len(gold) > len(steps) and gold[:len(steps)] == steps:
                text = gold[len(steps)]
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                logp = self._score(self.prefix(rows[i], steps), text)
                extra.append((i, n, steps, Sample(text, logp, len(ids), False), False))
        return extra

    @torch.inference_mode()
    def _score(self, prefix: str, text: str) -> float:
        """log p(text | prefix) under the policy (only for the optional gold candidate)."""
        p_ids = self.tokenizer(prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
        t_ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([p_ids, t_ids], dim=1).to(self.model.device)
        logits = self.model(ids).logits[0, p_ids.shape[1] - 1:-1].float()
        return float(torch.log_softmax(logits, -1).gather(1, t_ids[0].unsqueeze(1).to(logits.device)).sum())

    def search(self, rows: list[dict]) -> list[tuple[Tree, list[int]]]:
        """Search every row's tree to a terminal committed node; (tree, committed path) each."""
        trees = [Tree() for _ in rows]
        committed = [[0] for _ in rows]
        self.question_cache = (QuestionCache(self.model, self.tokenizer, [self.prefix(r, []) for r in rows])
                               if self.m.reuse_question_cache else None)
        active = list(range(len(rows)))
        while active:
            for _ in range(self.m.simulations):
                paths_ = {i: trees[i].select(committed[i][-1], self.m.c_puct) for i in active}
                leaves = [(i, p[-1]) for i, p in paths_.items()
                          if not trees[i][p[-1]].terminal and not trees[i][p[-1]].children]
                if leaves:
                    self.expand(trees, rows, leaves)
                for i, p in paths_.items():
                    trees[i].backup(p, self.m.gamma)
            for i in list(active):
                node = trees[i][committed[i][-1]]
                if node.terminal:
                    active.remove(i)
                    continue
                committed[i].append(trees[i].best_child(node.id))
                if trees[i][committed[i][-1]].terminal:
                    active.remove(i)
        self.question_cache = None
        return list(zip(trees, committed, strict=True))


def tree_record(tree: Tree, committed: list[int], row: dict, tree_id: str, policy: str) -> dict:
    last = tree[committed[-1]]
    return {"tree_id": tree_id, "row_id": row["id"], "question": row["question"], "answer": row["answer"],
            "policy": policy, "committed": committed, "correct": bool(last.correct),
            "solution": tree.steps(last.id), "nodes": [n.to_json() for n in tree.nodes]}


def pairs_from_record(record: dict, row: dict, tokenizer, mcfg, seed: int) -> list[dict]:
    """Preference pairs of one tree record, with the prompt the policy saw."""
    tree = Tree()
    tree.nodes = [Node(**n) for n in record["nodes"]]
    rng = random.Random(f"{seed}:{record['tree_id']}")
    rejected = str(getattr(mcfg.rejected, "value", mcfg.rejected))
    out = []
    for pair in preference_pairs(tree, record["committed"], rejected, rng):
        prompt = prompts.chat_prompt(tokenizer, row) + "".join(s + "\n" for s in tree.steps(pair["parent"]))
        # a step that does not end the solution keeps its newline, so training on it (SPEC §3)
        # teaches "this line, then more lines", not "this line, then stop"
        chosen, rejected = (tree[pair[f"{side}_id"]] for side in ("chosen", "rejected"))
        out.append({"prompt": prompt, "chosen": _as_step(chosen), "rejected": _as_step(rejected),
                    "q_chosen": pair["q_chosen"], "q_rejected": pair["q_rejected"],
                    "n_chosen": pair["n_chosen"], "n_rejected": pair["n_rejected"], "alpha": pair["alpha"],
                    "depth": pair["depth"], "tree_id": record["tree_id"], "policy": record["policy"]})
    return out


def _as_step(node) -> str:
    return node.text if node.terminal else node.text + "\n"


def shard_rows(cfg, shard: int) -> list[dict]:
    rows = artifacts.read_jsonl(paths.data_dir(cfg, cfg.mcts.task) / "train.jsonl")[: cfg.mcts.n_prompts]
    return rows[shard::cfg.mcts.n_shards]


def batch_seed(cfg, iteration: int, shard: int, batch: int) -> int:
    digest = hashlib.sha256(f"{cfg.seed}:{iteration}:{shard}:{batch}".encode()).hexdigest()
    return int(digest[:8], 16)


def main(cfg) -> None:
    """Search shard ``job.shard`` of iteration ``job.iteration`` of loop ``job.variant``
    with that loop's policy_{k−1}."""
    shard, k, variant = cfg.job.shard, cfg.job.iteration or 1, cfg.job.variant
    if shard is None or not 0 <= shard < cfg.mcts.n_shards:
        raise cl_config.ConfigError(f"key 'job.shard': expected 0..{cfg.mcts.n_shards - 1}, got {shard}")
    policy_dir = paths.policy_dir(cfg, k - 1, variant)
    view = cl_config.stage_view(cfg, "mcts", [cfg.mcts.task])
    work = paths.mcts_dir(cfg, k, variant) / ".work" / f"shard{shard}-{cl_config.config_hash(view)[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = models.load_dir(policy_dir, cfg.model, inference=True)
    searcher = Searcher(model, tokenizer, cfg.mcts, str(policy_dir))
    rows = shard_rows(cfg, shard)
    size = cfg.mcts.trees_per_batch
    batches = range(0, len(rows), size)
    for b, start in enumerate(tqdm(batches, desc=f"mcts {paths.model_tag(k, variant)} shard{shard}", unit="batch")):
        done = work / f"batch{b:05d}.jsonl"
        if done.exists():
            continue  # resumed: this batch was searched before the job stopped
        torch.manual_seed(batch_seed(cfg, k, shard, b))
        batch_rows = rows[start:start + size]
        results = searcher.search(batch_rows)
        with artifacts.atomic_file(done) as fh:
            artifacts.write_jsonl(fh, (tree_record(t, c, r, f"iter{k}-{r['id']}", str(policy_dir))
                                       for (t, c), r in zip(results, batch_rows, strict=True)))
    records = [rec for b in range(len(batches)) for rec in artifacts.read_jsonl(work / f"batch{b:05d}.jsonl")]
    by_id = {r["id"]: r for r in rows}
    inputs = {"data": paths.data_dir(cfg, cfg.mcts.task), "policy": policy_dir}
    out_dir = paths.mcts_shard_dir(cfg, k, shard, variant)
    with artifacts.artifact_dir(out_dir, "mcts", view, inputs, cfg.seed) as out:
        with open(out / "trees.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, records)
        with open(out / "pairs.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, (p for rec in records if keep_tree(rec, cfg.mcts)
                                       for p in pairs_from_record(rec, by_id[rec["row_id"]], tokenizer,
                                                                  cfg.mcts, cfg.seed)))
        (out / "stats.json").write_text(json.dumps(shard_stats(records, out / "pairs.jsonl",
                                                               searcher.policy_tokens), indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"mcts: {paths.model_tag(k, variant)} shard{shard}: {len(records)} trees -> {out_dir}")


def keep_tree(record: dict, mcfg) -> bool:
    return record["correct"] or not mcfg.drop_wrong_trees


def shard_stats(records: list[dict], pairs_path: Path, policy_tokens: int) -> dict:
    pairs = artifacts.read_jsonl(pairs_path)
    return {"trees": len(records), "pairs": len(pairs), "correct_trees": sum(r["correct"] for r in records),
            "nodes": sum(len(r["nodes"]) for r in records), "policy_tokens_this_run": policy_tokens}


def merge(cfg) -> None:
    """Concatenate the shards of one iteration of one loop variant (stage ``mcts-merge``)."""
    k, variant = cfg.job.iteration or 1, cfg.job.variant
    shards = [paths.mcts_shard_dir(cfg, k, s, variant) for s in range(cfg.mcts.n_shards)]
    view = cl_config.stage_view(cfg, "mcts", [cfg.mcts.task])
    inputs = {f"shard{s}": d for s, d in enumerate(shards)}
    with artifacts.artifact_dir(paths.mcts_dir(cfg, k, variant) / "merged", "mcts-merge", view, inputs,
                                cfg.seed) as out:
        for name in ("trees.jsonl", "pairs.jsonl"):
            with open(out / name, "w") as fh:
                for d in shards:
                    fh.write((d / name).read_text())
        records = artifacts.read_jsonl(out / "trees.jsonl")
        pairs = artifacts.read_jsonl(out / "pairs.jsonl")
        stats = {"trees": len(records), "pairs": len(pairs),
                 "pairs_per_tree": len(pairs) / max(len(records), 1),
                 "committed_accuracy": sum(r["correct"] for r in records) / max(len(records), 1),
                 "alpha": _describe([p["alpha"] for p in pairs])}
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"mcts-merge: {paths.model_tag(k, variant)}: {stats['trees']} trees, {stats['pairs']} pairs")


ALPHA_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def _describe(values: list[float]) -> dict:
    """Summary of the α values: mean, quartiles and counts per 0.1-wide bin (0.5 in the last)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def quantile(f: float) -> float:
        return ordered[min(int(f * len(ordered)), len(ordered) - 1)]

    histogram = {}
    for lo, hi in zip(ALPHA_BINS, ALPHA_BINS[1:], strict=False):
        last = hi == ALPHA_BINS[-1]
        histogram[f"{lo:.1f}-{hi:.1f}"] = sum(lo <= v < hi or (last and v == hi) for v in values)
    return {"n": len(values), "mean": sum(values) / len(values), "min": ordered[0], "p25": quantile(0.25),
            "median": quantile(0.5), "p75": quantile(0.75), "max": ordered[-1], "histogram": histogram}
