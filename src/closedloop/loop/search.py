"""MCTS as a data engine (SPEC §2): the search that turns a policy's own step-by-step
solutions into step-level preference pairs, and the records it writes.

The trees of a batch advance independently (:class:`Searcher`): each runs its own
simulations and sends its expansions' sampling requests to one continuous-batching decode
loop (:mod:`closedloop.decode`) that takes finished rows out every step and refills free
slots with other trees' requests, so decode steps stay full. Each row stops at the end of
its line (or EOS / max tokens for a forced completion); the prior p(a|s) comes from the
decode loop's own logits (no second forward pass), and the self-evaluation C(s) of each new
node is read by continuing the row's KV cache with the evaluation suffix, batched over the
rows that finish together (:mod:`closedloop.selfeval`). Each batch's question prompts are
prefilled once and their KV cache reused by every expansion (:mod:`closedloop.prefix_cache`),
so a request prefills only the steps so far; and the cache of the row that wrote a node's
step is kept until that node is expanded, so its children continue that row's cache with no
prefill at all (unless re-tokenising the node's text changes the ids: then they take the
question-cache path). The stages ``mcts`` and ``mcts_merge`` run it and write its output.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from collections import deque
from pathlib import Path

import torch

from closedloop import answers, artifacts, paths, prompts, selfeval
from closedloop.decode import Decoder, Request
from closedloop.generation import FINAL_ANSWER
from closedloop.loop.tree import Candidate, Node, Tree, length_normalised_prior, preference_pairs
from closedloop.prefix_cache import QuestionCache
from closedloop.sampling import Sample


class Searcher:
    """Runs SPEC §2's search for a batch of questions with one policy.

    Every tree is a coroutine (:meth:`_tree`) that runs its own simulations (select →
    expand → evaluate → backup, then commit) and yields what it needs from the model:
    ("generate", requests) for its leaf's b children, or ("evaluate", ...) for C(s) that
    the decode loop could not read from the cache (hinted prompt, gold step). One
    :class:`~closedloop.decode.Decoder` serves all trees of the batch: a tree whose
    expansion is done runs its backup and issues its next simulation's requests while
    other trees' rows still decode, and new rows fill free slots of the running batch.
    Each request samples with its own generator, seeded from (batch seed, tree, request
    number), so a tree's samples do not depend on what else shares the batch.
    """

    def __init__(self, model, tokenizer, mcfg, policy: str):
        self.model, self.tokenizer, self.m, self.policy = model, tokenizer, mcfg, policy
        self.policy_tokens = 0
        self.question_cache: QuestionCache | None = None
        self._contexts: dict = {}
        self.timings = {"decode": 0.0, "prefill": 0.0, "self_eval": 0.0, "tree": 0.0, "total": 0.0}
        self.decode_steps = self.decode_row_steps = 0
        self.continued_rows = 0  # rows decoded from their leaf's kept cache (no prefill)
        self.calls = {"decode": 0, "prefill": 0, "self_eval": 0}  # forward passes
        self.on_tree_done = None  # called with no argument each time a tree of a batch finishes (progress)

    def prefix(self, row: dict, steps: list[str]) -> str:
        return prompts.chat_prompt(self.tokenizer, row) + "".join(s + "\n" for s in steps)

    def search(self, rows: list[dict]) -> list[tuple[Tree, list[int]]]:
        """Search every row's tree to a terminal committed node; (tree, committed path) each."""
        t0 = time.perf_counter()
        trees = [Tree() for _ in rows]
        committed = [[0] for _ in rows]
        base_seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the batch seed set by the caller
        if self.m.reuse_question_cache:
            self.question_cache = QuestionCache(self.model, self.tokenizer, [self.prefix(r, []) for r in rows])
        prefill0 = time.perf_counter() - t0
        decoder = Decoder(self.model, self.tokenizer, temperature=self.m.temperature, top_p=self.m.top_p,
                          max_rows=self.m.generate_batch_size, question_cache=self.question_cache)
        self._eval_seconds = 0.0
        self._contexts = {}  # (tree, node) -> the finished row's cache (decode.RowCache) of that node's step
        programs = {i: self._tree(i, trees[i], rows[i], committed[i], base_seed) for i in range(len(rows))}
        queue: deque[Request] = deque()
        waiting: dict[int, list] = {}  # tree -> result slots of its outstanding requests

        def resume(ready: list[tuple[int, object]]) -> None:
            """Advance trees until each waits for generation or is done; the C(s) reads of
            all trees advanced together go out as one batch."""
            while ready:
                evals, scores = [], []
                for i, value in ready:
                    try:
                        kind, payload = programs[i].send(value)
                    except StopIteration:
                        del programs[i]
                        if self.on_tree_done is not None:
                            self.on_tree_done()
                        continue
                    if kind == "generate":
                        waiting[i] = [None] * len(payload)
                        queue.extend(payload)
                    elif kind == "score":
                        scores.append((i, payload))
                    else:
                        evals.append((i, payload))
                ready = [(i, None) for i, _ in scores]
                decoder.score([r for _, results in scores for r in results])
                if evals:
                    start = time.perf_counter()
                    contexts = [c for _, (cs, _) in evals for c in cs]
                    hints = [h for _, (_, hs) in evals for h in hs]
                    values = iter(selfeval.self_evaluate(self.model, self.tokenizer, contexts, hints,
                                                         self.m.self_eval_batch_size))
                    self._eval_seconds += time.perf_counter() - start
                    ready += [(i, [next(values) for _ in cs]) for i, (cs, _) in evals]
                ready.sort(key=lambda item: item[0])

        resume([(i, None) for i in sorted(programs)])
        while queue or decoder.rows:
            if queue and decoder.free > 0:
                decoder.add([queue.popleft() for _ in range(min(decoder.free, len(queue)))])
            complete = []
            for res in decoder.step():
                i, k = res.request.tag
                waiting[i][k] = res
                if all(r is not None for r in waiting[i]):
                    complete.append(i)
            resume([(i, waiting.pop(i)) for i in sorted(complete)])
        assert not programs, "a tree stopped without finishing its search"
        self.question_cache, self._contexts = None, {}
        for key in ("decode", "prefill", "self_eval"):
            self.timings[key] += decoder.timings[key]
        self.timings["prefill"] += prefill0
        self.timings["self_eval"] += self._eval_seconds
        total = time.perf_counter() - t0
        self.timings["total"] += total
        self.timings["tree"] += total - prefill0 - self._eval_seconds - sum(decoder.timings.values())
        for key, n in decoder.calls.items():
            self.calls[key] += n
        self.decode_steps += decoder.steps
        self.decode_row_steps += decoder.row_steps
        self.continued_rows += decoder.continued
        return list(zip(trees, committed, strict=True))

    def _tree(self, i: int, tree: Tree, row: dict, committed: list[int], base_seed: int):
        """One tree's search (SPEC §2): K simulations per committed step, then commit the
        most visited child, until the committed node is terminal."""
        counter = itertools.count()
        while True:
            for _ in range(self.m.simulations):
                path = tree.select(committed[-1], self.m.c_puct)
                leaf = tree[path[-1]]
                if not leaf.terminal and not leaf.children:
                    yield from self._expand(i, tree, row, leaf.id, base_seed, counter)
                tree.backup(path, self.m.gamma)
            node = tree[committed[-1]]
            if node.terminal:
                return
            committed.append(tree.best_child(node.id))
            if tree[committed[-1]].terminal:
                return

    def _expand(self, i: int, tree: Tree, row: dict, leaf_id: int, base_seed: int, counter):
        """Sample b1 (root) or b2 children of a leaf, score them, attach them (SPEC §2);
        at the depth limit each child completes the solution."""
        leaf = tree[leaf_id]
        complete = leaf.depth + 1 >= self.m.depth_limit
        b = self.m.b1 if leaf_id == 0 else self.m.b2
        steps = tree.steps(leaf_id)
        ids = self.tokenizer(self.prefix(row, steps), add_special_tokens=False)["input_ids"]
        n = next(counter)
        context = self._contexts.pop((i, leaf_id), None)  # the leaf's own row: its children need no prefill
        requests = [Request(ids, self.m.max_completion_tokens if complete else self.m.max_step_tokens,
                            one_line=not complete, seed=_request_seed(base_seed, i, n, k), tree=i,
                            score=not self.m.self_eval_hint, tag=(i, k), keep=not complete, context=context)
                    for k in range(b)]
        results = yield "generate", requests
        self.policy_tokens += sum(r.n_tokens for r in results)
        pending = [(r, complete) for r in results]
        if self.m.add_gold_step and not complete:
            pending += [(sample, False) for sample in self._gold_candidates(row, steps)]
        # the candidates that become nodes (non-empty, new, within max_children, as
        # Tree.add_children picks them): only these need C(s)
        seen = {tree[c].text.strip() for c in leaf.children}
        kept = []
        for sample, complete_ in pending:
            key = sample.text.strip()
            if not key or key in seen or len(leaf.children) + len(kept) >= self.m.max_children:
                continue
            seen.add(key)
            kept.append((sample, complete_))
        unscored = [s for s, _ in kept if s.confidence is None and getattr(s, "_parked", None) is not None]
        if unscored:
            yield "score", unscored  # read from each row's KV cache (decode.Decoder.score)
        scored = []
        for sample, complete_ in kept:
            terminal = complete_ or sample.ended or bool(FINAL_ANSWER.search(sample.text + "\n"))
            correct = None
            if terminal:
                solution = "\n".join(steps + [sample.text])
                correct = answers.is_correct(answers.extract(solution, row), row)
            scored.append((sample, terminal, correct))
        missing = [(sample, terminal) for sample, terminal, _ in scored if sample.confidence is None]
        if missing:
            contexts = [self.prefix(row, steps) + s.text + ("" if terminal else "\n") for s, terminal in missing]
            hints = [row.get("solution_steps") if self.m.self_eval_hint else None for _ in missing]
            values = yield "evaluate", (contexts, hints)
            for (sample, _), c in zip(missing, values, strict=True):
                sample.confidence = c
        candidates = [Candidate(s.text, length_normalised_prior(s.sum_logprob, s.n_tokens, self.m.prior_lambda),
                                s.confidence, terminal, correct, s.n_tokens) for s, terminal, correct in scored]
        added = tree.add_children(leaf_id, candidates, self.m.max_children, self.m.outcome_reward,
                                  self.m.self_eval_depth_scaled)
        if len(added) == len(scored):  # kept in the order add_children attaches them
            for node_id, (sample, terminal, _) in zip(added, scored, strict=True):
                if not terminal and getattr(sample, "context", None) is not None:
                    self._contexts[(i, node_id)] = sample.context
        if not added and not leaf.children:
            leaf.terminal, leaf.correct = True, False  # a dead end: nothing usable sampled

    def _gold_candidates(self, row: dict, steps: list[str]) -> list[Sample]:
        """The gold next step as an extra candidate where the prefix follows the gold solution."""
        gold = row.get("solution_steps") or []
        if not (len(gold) > len(steps) and gold[:len(steps)] == steps):
            return []
        text = gold[len(steps)]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [Sample(text, self._score(self.prefix(row, steps), text), len(ids), False)]

    @torch.inference_mode()
    def _score(self, prefix: str, text: str) -> float:
        """log p(text | prefix) under the policy (only for the optional gold candidate)."""
        p_ids = self.tokenizer(prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
        t_ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([p_ids, t_ids], dim=1).to(self.model.device)
        logits = self.model(ids).logits[0, p_ids.shape[1] - 1:-1].float()
        return float(torch.log_softmax(logits, -1).gather(1, t_ids[0].unsqueeze(1).to(logits.device)).sum())


def _request_seed(base: int, tree: int, request: int, sample: int) -> int:
    digest = hashlib.sha256(f"{base}:{tree}:{request}:{sample}".encode()).hexdigest()
    return int(digest[:15], 16)


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


def keep_tree(record: dict, mcfg) -> bool:
    return record["correct"] or not mcfg.drop_wrong_trees


def shard_stats(records: list[dict], pairs_path: Path, policy_tokens: int) -> dict:
    pairs = artifacts.read_jsonl(pairs_path)
    return {"trees": len(records), "pairs": len(pairs), "correct_trees": sum(r["correct"] for r in records),
            "nodes": sum(len(r["nodes"]) for r in records), "policy_tokens_this_run": policy_tokens}


ALPHA_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def describe_alpha(values: list[float]) -> dict:
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
