"""The order-agnostic (OA) last decoder layer on a transformers Llama (SPEC §5).

Target-aware RoPE: the query at position i is copied once per target j of its window and
each copy is rotated with RoPE at position j; keys keep their own positions, and copy (i, j)
attends to the keys at positions ≤ i (never ≤ j). Output (i, j) predicts token x_j. Because
RoPE scores depend on (j − k) only, copy (i, j) scores every key exactly as a query at
position j would (tested), and offset 0 (j = i) reproduces the base layer's row i.

Like the reference (``OAModelMixin.init_oa_layer`` with its default ``additional_layer=False``)
the OA layer *is* ``model.layers[-1]``: layers 0..N−2 run as usual and the last layer runs in
OA mode, so a COrAL checkpoint has exactly a plain ``LlamaForCausalLM``'s weights and loads
with ``AutoModelForCausalLM`` (``trust_remote_code`` off). Its plain forward then gives the
offset-0 ("reconstruct my own token") distribution, not next-token: so ``config.json``
carries a ``coral`` marker (:data:`MARKER`) and :func:`load` dispatches on it. The
reference's optional extra, randomly initialised layer is not implemented (no extra weights).

Departures from the reference: the OA layer always gets an explicit boolean mask (the
reference falls back to ``is_causal=True`` on its non-square [T·N × T] score matrix when the
padding mask is all ones, which leaks future tokens); the padding mask comes from lengths,
never from ``input_ids != pad_id`` (SmolLM2's pad is its EOS); invalid targets are an
explicit ``valid`` mask (the reference encodes them as position 0); and norm + lm_head run
only on the rows that are used (mathematically the same, rows are independent after
attention, and it avoids a [B, T·N, V] logits tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import rotate_half

MARKER = "coral"
"""Key of the config.json entry ``{"w_f": 4, "w_b": 8}`` that marks a COrAL model."""
LOSS_CHUNK = 2048
"""Rows of (i, j) pairs per lm_head call in the loss."""


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, M, d] with per-row cos/sin [B, M, d] (transformers' rotate_half form)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _allowed(q_pos: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, Tk] bool: query at absolute position ``q_pos[b, i]`` may see key k (absolute
    position k) iff k ≤ q_pos and the key is a real token. A query's own slot is always allowed,
    so a padding row never has an empty softmax (its outputs are never used)."""
    k_pos = torch.arange(key_mask.shape[1], device=q_pos.device)
    causal = k_pos[None, None, :] <= q_pos[:, :, None]
    own = k_pos[None, None, :] == q_pos[:, :, None]
    return (causal & key_mask[:, None, :].bool()) | own


def crop_cache(cache, keep: int) -> None:
    """Drop cached positions ≥ ``keep`` (transformers 5 ``crop`` takes a negative count)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


class CoralLlamaForCausalLM(LlamaForCausalLM):
    """A Llama whose last layer also runs in OA mode (:meth:`oa_hidden`, :meth:`oa_logits`).

    The plain ``forward`` is untouched (the base layer at offset 0). Saved dirs name
    ``LlamaForCausalLM`` as their architecture and carry the :data:`MARKER` entry.
    """

    @property
    def windows(self) -> tuple[int, int]:
        """(W_f, W_b) of the marker (SPEC §5 defaults 4, 8)."""
        marker = getattr(self.config, MARKER, None) or {}
        return int(marker.get("w_f", 4)), int(marker.get("w_b", 8))

    def _backbone(self, input_ids, key_mask, cache):
        """Layers 0..N−2 with an explicit additive mask; returns (hidden, positions, full key mask)."""
        start = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape
        pos = (torch.arange(T, device=input_ids.device) + start)[None].expand(B, T)
        if key_mask is None:
            key_mask = torch.ones(B, start + T, dtype=torch.bool, device=input_ids.device)
        h = self.model.embed_tokens(input_ids)
        allow = _allowed(pos, key_mask)
        additive = torch.zeros(allow.shape, dtype=h.dtype, device=h.device)
        additive = additive.masked_fill(~allow, torch.finfo(h.dtype).min)[:, None]
        emb = self.model.rotary_emb(h, pos)
        for layer in self.model.layers[:-1]:
            h = layer(h, attention_mask=additive, position_embeddings=emb, position_ids=pos,
                      past_key_values=cache, use_cache=cache is not None)
        return h, pos, allow

    def oa_hidden(self, input_ids: torch.Tensor, targets: torch.Tensor, key_mask: torch.Tensor | None = None,
                  cache=None, query_from: int = 0) -> torch.Tensor:
        """OA layer outputs before the final norm, [B, T, N, D]: row (b, i, n) predicts the token
        at absolute position ``targets[b, i, n]`` from the keys at positions ≤ i.

        ``input_ids`` [B, T] are the tokens after the ``cache`` (their positions start at the
        cache length); ``key_mask`` [B, cache + T] marks real tokens (None: all real). Any
        target value is allowed (invalid pairs simply go unused); negative ones are clamped
        to 0 for the rotation only. ``query_from``: run the OA queries only for rows
        ``query_from..T−1`` (decoding needs the last rows only; every row's key and value still
        enters the cache); ``targets`` then covers those rows, and so does the output.
        """
        h, pos, allow = self._backbone(input_ids, key_mask, cache)
        layer = self.model.layers[-1]
        att = layer.self_attn
        B, T, D = h.shape
        N = targets.shape[-1]
        x = layer.input_layernorm(h)
        q = att.q_proj(x).view(B, T, -1, att.head_dim).transpose(1, 2)  # [B, Hq, T, d]
        k = att.k_proj(x).view(B, T, -1, att.head_dim).transpose(1, 2)
        v = att.v_proj(x).view(B, T, -1, att.head_dim).transpose(1, 2)
        cos, sin = self.model.rotary_emb(x, pos)
        k = rope(k, cos, sin)  # keys keep their own positions
        if cache is not None:  # keys/values do not depend on the targets: the cache is exact
            k, v = cache.update(k, v, att.layer_idx)
        q, h, x, allow = q[:, :, query_from:], h[:, query_from:], x[:, query_from:], allow[:, query_from:]
        T = h.shape[1]
        tq = targets.clamp(min=0).reshape(B, T * N)
        cq, sq = self.model.rotary_emb(x, tq)
        Hq = q.shape[1]
        qn = q[:, :, :, None, :].expand(B, Hq, T, N, att.head_dim).reshape(B, Hq, T * N, att.head_dim)
        qn = rope(qn, cq, sq)  # copy (i, n) rotated at its target position
        mask = allow[:, :, None, :].expand(B, T, N, allow.shape[-1]).reshape(B, 1, T * N, -1)
        a = F.scaled_dot_product_attention(qn, k, v, attn_mask=mask, scale=att.scaling,
                                           enable_gqa=Hq != k.shape[1])
        a = att.o_proj(a.transpose(1, 2).reshape(B, T * N, -1))
        r = h[:, :, None, :].expand(B, T, N, D).reshape(B, T * N, D) + a
        r = r + layer.mlp(layer.post_attention_layernorm(r))
        return r.view(B, T, N, D)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head (fp32 logits)."""
        return self.lm_head(self.model.norm(hidden)).float()

    def oa_logits(self, input_ids, targets, key_mask=None, cache=None, query_from: int = 0) -> torch.Tensor:
        """[B, T, N, V] logits of every (i, n) pair (for decoding and tests; training gathers
        the valid rows first, :meth:`forward`)."""
        return self.head(self.oa_hidden(input_ids, targets, key_mask, cache, query_from))

    def oa_offsets(self, input_ids, offsets, key_mask=None, cache=None, query_from: int = 0) -> torch.Tensor:
        """:meth:`oa_logits` with targets = own position + each of ``offsets``, for rows
        ``query_from..T−1``."""
        start = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape
        pos = torch.arange(query_from, T, device=input_ids.device) + start
        off = torch.as_tensor(list(offsets), device=input_ids.device)
        targets = (pos[:, None] + off)[None].expand(B, T - query_from, len(off))
        return self.oa_logits(input_ids, targets, key_mask, cache, query_from)

    def forward(self, *args, coral_targets=None, coral_valid=None, coral_labels=None, coral_key_mask=None,
                **kwargs):
        """The plain Llama forward, or with ``coral_targets`` the OA loss: the token-mean
        cross-entropy over the pairs where ``coral_valid`` [B, T, N] holds, against
        ``coral_labels`` [B, T, N] (SPEC §5). Going through ``forward`` keeps DDP's gradient
        hooks in charge when the Trainer runs several ranks."""
        if coral_targets is None:
            return super().forward(*args, **kwargs)
        hidden = self.oa_hidden(kwargs["input_ids"], coral_targets, coral_key_mask)
        rows, labels = hidden[coral_valid], coral_labels[coral_valid]
        if rows.shape[0] == 0:  # no valid pair (e.g. a batch of empty responses): a zero that keeps the graph
            return CausalLMOutputWithPast(loss=hidden.sum() * 0.0)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], LOSS_CHUNK):  # bounds the [rows, V] logits
            logits = self.head(rows[start:start + LOSS_CHUNK])
            total = total + F.cross_entropy(logits, labels[start:start + LOSS_CHUNK], reduction="sum")
        return CausalLMOutputWithPast(loss=total / rows.shape[0])

    def save_pretrained(self, save_directory, *args, **kwargs):
        """A plain Llama dir: config.json names ``LlamaForCausalLM`` (transformers writes the
        class name; we put the base class back) and carries the marker."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        config = Path(save_directory) / "config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            data["architectures"] = ["LlamaForCausalLM"]
            tmp = config.with_name("config.json.tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            tmp.replace(config)
        return out


def mark(model, w_f: int, w_b: int) -> None:
    """Write the :data:`MARKER` entry into the model's config (saved with it)."""
    setattr(model.config, MARKER, {"w_f": int(w_f), "w_b": int(w_b)})


def is_coral_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and MARKER in json.loads(config.read_text())


LLAMA_FAMILY = ("llama", "mistral")
"""``model_type`` values :func:`load` accepts. A Mistral dir loads as a Llama (same weight
names and layers); its sliding window (4096 in Mistral-7B-v0.1) is not applied, which changes
nothing for sequences up to that length, and it is saved back as a Llama dir."""


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> CoralLlamaForCausalLM:
    """A Llama-family ``from_pretrained`` dir (local) as :class:`CoralLlamaForCausalLM`, in eval
    mode; a dir without the marker loads too (the base model, e.g. a stage's input policy)."""
    config = Path(path) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type not in LLAMA_FAMILY:
        raise ValueError(f"{config}: key 'model_type': expected one of {list(LLAMA_FAMILY)} for COrAL, "
                         f"got {model_type!r}")
    model = CoralLlamaForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
    return model.eval()


def untie_lm_head(model) -> bool:
    """Give a tied lm_head its own copy of the embedding matrix (SmolLM2 ties them) and record
    ``tie_word_embeddings: false``, so stage 1 can train lm_head while the embeddings stay
    frozen (the reference's Llama/Mistral are untied). Returns whether it was tied."""
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if tied:
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None:
        text_config.tie_word_embeddings = False
    return tied

