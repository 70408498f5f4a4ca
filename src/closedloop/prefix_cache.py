"""The question's KV cache, computed once per tree and reused by every expansion (SPEC §2,
efficiency: "reuse the shared prefix's KV cache").

Every node of a tree extends the same chat prompt (system turn + question + assistant
header); only the steps after it differ. :class:`QuestionCache` runs one forward pass
over the prompts of a batch of trees (all but each prompt's last token, left padded)
and keeps that cache. An expansion then hands ``generate`` the cached rows of its trees
(copied, since generation appends to them) plus only the uncached tokens: the prompt's
last token and the steps so far, prefilled once per distinct context however many
samples are drawn from it. Padding between the cached part and the suffix is
masked, and generate derives position ids from the full mask, so each row sees exactly
the sequence it would see without the cache.

:meth:`QuestionCache.prefill_ids` does the same for the MCTS decode loop
(:mod:`closedloop.decode`), which feeds each row's last context token itself.

transformers supports a pre-filled cache in ``generate`` (prefix caching); building
per-row caches from a batch cache by row selection is written here because no library
call does it for ragged suffixes.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class PrefixMismatch(ValueError):
    """A context does not start with its tree's cached prompt tokens (tokenisation merged
    across the boundary); the caller falls back to a full prefill."""


class QuestionCache:
    """KV cache of one batch of trees' prompts (each without its last token)."""

    def __init__(self, model, tokenizer, prompts: list[str]):
        self.model, self.tokenizer = model, tokenizer
        self.prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        cached = [ids[:-1] for ids in self.prompt_ids]
        self.width = max(len(ids) for ids in cached)
        pad = tokenizer.pad_token_id
        self.input_ids = torch.tensor([[pad] * (self.width - len(ids)) + ids for ids in cached],
                                      device=model.device)
        self.mask = torch.tensor([[0] * (self.width - len(ids)) + [1] * len(ids) for ids in cached],
                                 device=model.device)
        positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        with torch.inference_mode():
            out = model(input_ids=self.input_ids, attention_mask=self.mask, position_ids=positions,
                        use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values

    def rows(self, trees: list[int]) -> DynamicCache:
        """A fresh cache holding the cached prompt of each listed tree, in order."""
        index = torch.tensor(trees, device=self.input_ids.device)
        cache = DynamicCache()
        for layer_idx, layer in enumerate(self.cache.layers):
            cache.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), layer_idx)
        return cache

    def inputs(self, trees: list[int], contexts: list[str]) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
        """(input_ids, attention_mask, past_key_values) for ``generate``: each row is its
        tree's cached prompt, padding, then the suffix of its context. Rows with the same
        context (the b samples of one leaf) share one prefill of all but the suffix's last
        token, so ``generate`` itself reads one token per row before sampling."""
        suffixes = []
        for tree, context in zip(trees, contexts, strict=True):
            ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
            cached = self.prompt_ids[tree][:-1]
            if ids[:len(cached)] != cached or len(ids) <= len(cached):
                raise PrefixMismatch(f"context of tree {tree} does not extend its cached prompt")
            suffixes.append(ids[len(cached):])
        keys = [(tree, tuple(s)) for tree, s in zip(trees, suffixes, strict=True)]
        unique = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        width = max(len(s) for s in suffixes)
        pad, device = self.tokenizer.pad_token_id, self.input_ids.device
        suffix_ids = torch.tensor([[pad] * (width - len(s)) + list(s) for _, s in unique], device=device)
        suffix_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for _, s in unique], device=device)
        owners = torch.tensor([tree for tree, _ in unique], device=device)
        input_ids = torch.cat([self.input_ids.index_select(0, owners), suffix_ids], dim=1)
        mask = torch.cat([self.mask.index_select(0, owners), suffix_mask], dim=1)
        cache = self.rows(owners.tolist())
        if width > 1:
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            with torch.inference_mode():
                self.model(input_ids=suffix_ids[:, :-1], attention_mask=mask[:, :-1],
                           position_ids=positions[:, self.width:-1], past_key_values=cache, use_cache=True,
                           logits_to_keep=1)
        rows = torch.tensor([unique[key] for key in keys], device=device)
        cache.batch_select_indices(rows)
        return input_ids.index_select(0, rows), mask.index_select(0, rows), cache

    def extends(self, tree: int, ids: list[int]) -> bool:
        """Whether token ids ``ids`` start with tree ``tree``'s cached prompt (and go past it)."""
        cached = self.prompt_ids[tree][:-1]
        return len(ids) > len(cached) and ids[:len(cached)] == cached

    def prefill_ids(self, trees: list[int], id_lists: list[list[int]]
                    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """For :class:`closedloop.decode.Decoder`: (cache, mask, last token) per row, the cache
        covering each row's tokens but the last (cached prompt, padding, suffix), the mask over
        the cache's columns. Rows with the same context share one suffix prefill."""
        suffixes = [ids[len(self.prompt_ids[tree]) - 1:] for tree, ids in zip(trees, id_lists, strict=True)]
        keys = [(tree, tuple(s)) for tree, s in zip(trees, suffixes, strict=True)]
        unique = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        width = max(len(s) for s in suffixes) - 1  # the last token is fed by the decode loop
        pad, device = self.tokenizer.pad_token_id, self.input_ids.device
        suffix_ids = torch.tensor([[pad] * (width - len(s) + 1) + list(s[:-1]) for _, s in unique], device=device,
                                  dtype=torch.long)
        suffix_mask = torch.tensor([[0] * (width - len(s) + 1) + [1] * (len(s) - 1) for _, s in unique],
                                   device=device, dtype=torch.long)
        owners = torch.tensor([tree for tree, _ in unique], device=device)
        mask = torch.cat([self.mask.index_select(0, owners), suffix_mask], dim=1)
        cache = self.rows(owners.tolist())
        if width > 0:
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            with torch.inference_mode():
                self.model(input_ids=suffix_ids, attention_mask=mask, position_ids=positions[:, self.width:],
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
        rows = torch.tensor([unique[key] for key in keys], device=device)
        cache.batch_select_indices(rows)
        last = torch.tensor([s[-1] for s in suffixes], device=device)
        return cache, mask.index_select(0, rows), last
