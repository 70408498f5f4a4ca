"""Interleaved chains as token sequences, their batched generation with the vision head, and
their scores (SPEC §6).

A chain is ``completion_ids`` (the text tokens the model writes, ⟨look⟩ included, ending with
"Answer: <a>." and EOS) plus ``looks`` (the patch set each ⟨look⟩ selected). :func:`encode` turns
it into the model's input: after each ⟨look⟩ one ``<patch>`` placeholder per selected patch,
whose embedding :meth:`~closedloop.vlcot.model.VLCoTModel.embed` replaces by that patch's
feature: gold patches when teacher-forcing SFT, the model's own selection in generation.

:func:`generate` decodes a batch with a KV cache, one input per row per step: a sampled token,
or, after a ⟨look⟩, the next selected patch's feature (the head scores the patches from the
hidden state at the ⟨look⟩, Ŝ > ``select_threshold`` or, sampling, Bernoulli(Ŝ)); a row stops at
EOS or once its "Answer: <a>." is complete (:func:`answer_done`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from closedloop.vlcot import scenes
from closedloop.vlcot.model import JUDGE, VLCoTModel

ANSWER = re.compile(r"answer\s*:\s*([a-z]+)\s*\.", re.I)


def answer_done(text: str) -> bool:
    """The chain's "Answer: <word>." is complete."""
    return ANSWER.search(text) is not None


def parse_answer(text: str) -> str | None:
    m = ANSWER.search(text)
    return m.group(1).lower() if m else None


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tok, question: str, n_patches: int, image_id: int) -> list[int]:
    """The prompt with its one ``<image>`` expanded to the image's P patch tokens (BOS first)."""
    ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for i in _ids(tok, scenes.prompt(question)):
        ids += [i] * n_patches if i == image_id else [i]
    return ids


def gold_chain(tok, row: dict, variant: str, look_id: int) -> tuple[list[int], list[list[int]]]:
    """(completion ids, looks) of a question's gold chain: ``direct`` the answer alone, ``text`` the
    chain without its ⟨look⟩ steps, ``vision`` the interleaved chain with its gold patch sets."""
    if variant == "direct":
        return _ids(tok, f" Answer: {row['answer']}.") + [tok.eos_token_id], []
    ids: list[int] = []
    for step in row["steps"]:
        if "text" in step:
            ids += _ids(tok, " " + step["text"])
        elif variant == "vision":
            ids.append(look_id)
    return ids + _ids(tok, f" Answer: {row['answer']}.") + [tok.eos_token_id], \
        (scenes.looks(row["steps"]) if variant == "vision" else [])


def encode(prompt: list[int], completion: list[int], looks: list[list[int]], ids: dict[str, int],
           n_patches: int) -> dict:
    """Model inputs of one chain: ``input_ids`` with a ``<patch>`` per selected patch after each
    ⟨look⟩, ``patch_index`` (0..P−1 on the image tokens, the selected patch on each ``<patch>``, −1
    elsewhere), ``labels`` (the completion's text tokens; −100 on the prompt and the placeholders),
    ``look_targets`` (B of each ⟨look⟩ over the P patches). A ⟨look⟩ without a patch set (a chain cut
    by the token budget right after it) selected nothing."""
    looks = list(looks) + [[]] * max(0, completion.count(ids["look"]) - len(looks))
    input_ids, patch_index, labels = [], [], []
    k = 0
    for i in prompt:
        input_ids.append(i)
        patch_index.append(k if i == ids["image"] else -1)
        k += i == ids["image"]
        labels.append(-100)
    n_looks = 0
    for i in completion:
        input_ids.append(i)
        patch_index.append(-1)
        labels.append(i)
        if i == ids["look"]:
            for p in looks[n_looks]:
                input_ids.append(ids["patch"])
                patch_index.append(int(p))
                labels.append(-100)
            n_looks += 1
    targets = np.zeros((len(looks), n_patches), dtype=np.float32)
    for t, look in enumerate(looks):
        targets[t, list(look)] = 1.0
    return {"input_ids": input_ids, "patch_index": patch_index, "labels": labels, "look_targets": targets}


def load_images(processor, data: Path, rows: list[dict]) -> torch.Tensor:
    images = []
    for r in rows:
        with Image.open(data / r["image"]) as im:
            images.append(im.convert("RGB"))
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def collate(encoded: list[dict], pixel_values: torch.Tensor, pad_id: int, with_targets: bool = True) -> dict:
    """Right-padded batch of :func:`encode` outputs."""
    length = max(len(e["input_ids"]) for e in encoded)

    def pad(key, value):
        return torch.tensor([e[key] + [value] * (length - len(e[key])) for e in encoded])

    batch = {"input_ids": pad("input_ids", pad_id), "patch_index": pad("patch_index", -1),
             "labels": pad("labels", -100), "pixel_values": pixel_values,
             "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"]))
                                             for e in encoded])}
    if with_targets:
        targets = [e["look_targets"] for e in encoded if len(e["look_targets"])]
        batch["look_targets"] = torch.from_numpy(np.concatenate(targets)) if targets else torch.zeros(0)
    return batch


# ---- generation -------------------------------------------------------------------------------

@torch.no_grad()
def generate(model: VLCoTModel, processor, data: Path, rows: list[dict], *, max_new_tokens: int,
             temperature: float = 0.0, select_threshold: float = 0.5, sample_patches: bool = False,
             generator: torch.Generator | None = None, batch_size: int = 64, trace: bool = False) -> list[dict]:
    """One chain per row: ``text``, ``completion_ids``, ``looks`` (selected patches), ``answer``;
    with ``trace``, ``appended``: the embeddings fed after each ⟨look⟩ (to check they are the
    selected patches' features). Greedy at ``temperature`` 0."""
    out = []
    for start in range(0, len(rows), batch_size):
        out += _generate_batch(model, processor, data, rows[start:start + batch_size], max_new_tokens, temperature,
                               select_threshold, sample_patches, generator, trace)
    return out


def _generate_batch(model, processor, data, rows, max_new_tokens, temperature, select_threshold, sample_patches,
                    generator, trace):
    tok, ids = processor.tokenizer, model.ids
    feats = model.patch_features(load_images(processor, data, rows))
    n_patches = feats.shape[1]
    prompts = [prompt_ids(tok, r["question"], n_patches, ids["image"]) for r in rows]
    length = max(map(len, prompts))
    input_ids = torch.tensor([[ids["pad"]] * (length - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    patch_index = torch.full_like(input_ids, -1)
    for b in range(len(prompts)):
        cols = (input_ids[b] == ids["image"]).nonzero().squeeze(-1)
        patch_index[b, cols] = torch.arange(len(cols))
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    h, cache = model.hidden(model.embed(input_ids, patch_index, feats), attention, positions, _cache())
    h_last, pos = h[:, -1], positions[:, -1]
    n = len(rows)
    state = [{"ids": [], "looks": [], "queue": [], "appended": [], "done": False, "scored": True} for _ in range(n)]
    banned = [ids["image"], ids["patch"], ids["pad"]] + ([] if model.head is not None else [ids["look"]])
    if tok.bos_token_id is not None:
        banned.append(tok.bos_token_id)
    embed_table = model.llava.get_input_embeddings()
    for _ in range(max_new_tokens + n_patches * 4):
        logits = model.llava.lm_head(h_last).float()
        logits[:, banned] = -float("inf")
        if temperature > 0:
            tokens = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)
        else:
            tokens = logits.argmax(-1)
        step = []
        for b, s in enumerate(state):
            if s["done"]:
                step.append(embed_table.weight[ids["pad"]])
                continue
            if not s["scored"]:  # h_last is the hidden state at this row's ⟨look⟩: score the patches
                scores = torch.sigmoid(model.head(h_last[b:b + 1], feats[b:b + 1]).float())[0]
                chosen = (torch.bernoulli(scores, generator=generator) > 0 if sample_patches
                          else scores > select_threshold)
                s["queue"] = chosen.nonzero().squeeze(-1).tolist()
                s["looks"].append(list(s["queue"]))
                s["appended"].append([])
                s["scored"] = True
            if s["queue"]:
                k = s["queue"].pop(0)
                step.append(feats[b, k])
                if trace:
                    s["appended"][-1].append(feats[b, k].clone())
                continue
            t = int(tokens[b])
            s["ids"].append(t)
            step.append(embed_table.weight[t])
            if t == ids["look"]:
                s["scored"] = False
            if t == ids["eos"] or answer_done(tok.decode(s["ids"], skip_special_tokens=True)) \
                    or len(s["ids"]) >= max_new_tokens:
                s["done"] = True
        if all(s["done"] for s in state):
            break
        attention = torch.cat([attention, torch.ones(n, 1, dtype=attention.dtype)], 1)
        pos = pos + 1
        h, cache = model.hidden(torch.stack(step).unsqueeze(1).to(h_last.dtype), attention, pos.unsqueeze(1), cache)
        h_last = h[:, -1]
    results = []
    for s in state:
        text = tok.decode(s["ids"], skip_special_tokens=False)
        r = {"completion_ids": s["ids"], "looks": s["looks"], "text": text, "answer": parse_answer(text)}
        if trace:
            r["appended"] = [torch.stack(a) if a else torch.zeros(0) for a in s["appended"]]
        results.append(r)
    return results


def _cache():
    from transformers import DynamicCache

    return DynamicCache()


# ---- scores -----------------------------------------------------------------------------------

def grounding(pred: list[list[int]], gold: list[list[int]]) -> dict[str, float]:
    """Mean IoU and patch F1 of the i-th selected set against the i-th gold set; a missing or extra
    ⟨look⟩ counts 0 (the mean is over max(#pred, #gold) steps)."""
    n = max(len(pred), len(gold))
    if n == 0:
        return {"iou": 1.0, "f1": 1.0}
    pairs = list(zip(pred, gold, strict=False))
    return {"iou": sum(scenes.iou(p, g) for p, g in pairs) / n, "f1": sum(scenes.f1(p, g) for p, g in pairs) / n}


def function_score(chain: dict, row: dict) -> float:
    """SPEC §6's function-based score: answer correctness (0/1) + mean IoU of the ⟨look⟩s with gold."""
    return float(chain["answer"] == row["answer"]) + grounding(chain["looks"], scenes.looks(row["steps"]))["iou"]


@torch.no_grad()
def judge(model: VLCoTModel, processor, data: Path, rows: list[dict], chains: list[dict],
          batch_size: int = 64) -> list[float]:
    """SPEC §6's model-based score: the model's P("yes") (normalised over yes/no) after its own chain
    and the turn "USER: Is this reasoning correct? ASSISTANT:"."""
    tok, ids = processor.tokenizer, model.ids
    yes, no = _ids(tok, " yes")[-1], _ids(tok, " no")[-1]
    suffix = _ids(tok, JUDGE)
    scores = []
    for start in range(0, len(rows), batch_size):
        rs, cs = rows[start:start + batch_size], chains[start:start + batch_size]
        feats = model.patch_features(load_images(processor, data, rs))
        n_patches = feats.shape[1]
        enc = [encode(prompt_ids(tok, r["question"], n_patches, ids["image"]),
                      [i for i in c["completion_ids"] if i != ids["eos"]] + suffix, c["looks"], ids, n_patches)
               for r, c in zip(rs, cs, strict=True)]
        batch = collate(enc, torch.zeros(0), ids["pad"], with_targets=False)
        h, _ = model.hidden(model.embed(batch["input_ids"], batch["patch_index"], feats), batch["attention_mask"])
        last = batch["attention_mask"].sum(-1) - 1
        logits = model.llava.lm_head(h[torch.arange(len(enc)), last]).float()
        scores += torch.softmax(logits[:, [yes, no]], -1)[:, 0].tolist()
    return scores


def keep_best(candidates: list[dict], threshold: float) -> dict | None:
    """The rejection filter (SPEC §6): the candidate with the highest ``function_score`` (the first
    on ties) when that score reaches ``threshold``, else None."""
    if not candidates:
        return None
    best = max(enumerate(candidates), key=lambda it: (it[1]["function_score"], -it[0]))[1]
    return best if best["function_score"] >= threshold else None


def _ranks(x) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 1-based."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson's r of the average ranks); nan when one side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(groups: list[list[dict]]) -> dict:
    """How the model-based score agrees with the function-based one over every sampled chain
    (``function_score``, ``model_score``, ``correct``), grouped by question: Spearman's ρ over all
    chains and within questions (mean), and, on questions with both a right and a wrong chain, how
    often the model's favourite chain is wrong and how often it ranks a wrong chain over a right one."""
    flat = [c for g in groups for c in g]
    within = [spearman([c["function_score"] for c in g], [c["model_score"] for c in g]) for g in groups]
    within = [r for r in within if not np.isnan(r)]
    mixed = [g for g in groups if any(c["correct"] for c in g) and not all(c["correct"] for c in g)]
    favourite_wrong = [not max(g, key=lambda c: c["model_score"])["correct"] for g in mixed]
    pairs = [(w["model_score"] > r["model_score"]) for g in mixed for w in g if not w["correct"] for r in g
             if r["correct"]]
    return {"chains": len(flat), "questions": len(groups),
            "spearman_all": spearman([c["function_score"] for c in flat], [c["model_score"] for c in flat]),
            "spearman_within_mean": float(np.mean(within)) if within else float("nan"),
            "questions_with_right_and_wrong": len(mixed),
            "model_prefers_wrong_chain": float(np.mean(favourite_wrong)) if mixed else float("nan"),
            "wrong_over_right_pairs": float(np.mean(pairs)) if pairs else float("nan"), "n_pairs": len(pairs)}
