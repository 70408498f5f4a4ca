"""The VL-CoT model (SPEC §6): a LLaVA (``LlavaForConditionalGeneration``) with a second head
that scores the input image's patches at ⟨look⟩ steps; the text head stays as it is.

- :func:`base_source`: the untrained LLaVA, by default a tiny one built from config offline
  (a CLIP-style ViT on 64×64 scenes with 8-pixel patches = 64 image tokens, LLaVA's two-layer
  projector, a tiny Llama with a word-level tokenizer over this family's vocabulary); ``kind: hf``
  names a from_pretrained LLaVA (LLaVA-1.5-7B: 576 patches, configs/paper/vlcot_llava7b.yaml).
  Written here rather than shared with the V-DPO family's builder (families stay apart).
- :class:`VisionHead`: Ŝ_{t,k} = σ(⟨W h_t, f_k⟩ / √d + b), h_t the language model's hidden state
  at the t-th ⟨look⟩ and f_k the projected feature of patch k (what the LLaVA feeds its language
  model as image token k).
- :func:`vision_losses`: L_BCE + λ·L_Dice + α·R_ent (SPEC §6).
- :class:`VLCoTModel`: both heads over one LLaVA; the features of the patches a ⟨look⟩ selected
  are the inputs that follow it (``<patch>`` placeholders, filled by :meth:`VLCoTModel.embed`).

A trained model is a directory with ``model/`` (the LLaVA's from_pretrained dir with its
processor) and ``vision_head.safetensors`` (:func:`save`, :func:`load`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from closedloop import config as cl_config
from closedloop import models
from closedloop.vlcot import scenes

IMAGE, LOOK, PATCH = "<image>", scenes.LOOK, "<patch>"
SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
BUILD_VERSION = 1
"""Part of the tiny model's cache key: bump when :func:`_build_tiny` changes."""
HEAD_FILE = "vision_head.safetensors"
JUDGE = " USER: Is this reasoning correct? ASSISTANT:"
"""The model-based score's question (SPEC §6: the model judges its own chain)."""


# ---- the tiny LLaVA ---------------------------------------------------------------------------

def corpus() -> list[str]:
    """Every text the tiny model reads or writes: the questions, chains and answers of
    :mod:`closedloop.vlcot.scenes` over all shapes, colours and numbers, and the judge turn."""
    texts = [scenes.prompt("x"), JUDGE, "yes no none one a an the it is are there of left right",
             "find what how many color shape object shapes answer : . ?", " ".join(scenes.NUMBERS)]
    texts += [f"{c} {s} {s}s" for c in scenes.COLORS for s in scenes.SHAPES]
    return texts


def word_tokenizer():
    """A word-level tokenizer over :func:`corpus` (lower-cased; ~60 entries): the 49k-way output
    projection of a BPE vocabulary would dominate the tiny model's cost on a CPU."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in corpus() for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t.lower())})
    words = [w for w in words if w not in ("<", ">", "image")] + ["image"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL.values(), IMAGE, LOOK, PATCH, *dict.fromkeys(words)])}
    backend = Tokenizer(WordLevel(vocab, unk_token=SPECIAL["unk"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"],
                                   additional_special_tokens=[IMAGE, LOOK, PATCH])


def _build_tiny(mcfg, out: Path) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = word_tokenizer()
    size = mcfg.image_size
    vision = CLIPVisionConfig(image_size=size, patch_size=mcfg.patch_size, hidden_size=mcfg.vision_hidden_size,
                              intermediate_size=4 * mcfg.vision_hidden_size, num_hidden_layers=mcfg.vision_layers,
                              num_attention_heads=mcfg.vision_heads, projection_dim=mcfg.vision_hidden_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=mcfg.text_hidden_size,
                       intermediate_size=mcfg.text_intermediate_size, num_hidden_layers=mcfg.text_layers,
                       num_attention_heads=mcfg.text_heads, num_key_value_heads=mcfg.text_kv_heads,
                       max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(mcfg.init_seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=mcfg.patch_size,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   image_token=IMAGE).save_pretrained(out)


def base_source(mcfg) -> str:
    """The from_pretrained dir (or hub id) of the untrained LLaVA (built once and cached for ``tiny``)."""
    if cl_config.enum_value(mcfg.kind) == "hf":
        return mcfg.name_or_path
    fields = {k: cl_config.enum_value(v) for k, v in OmegaConf.to_container(mcfg).items()
              if k not in ("kind", "name_or_path", "revision", "trust_remote_code", "dtype", "bf16_training", "lora",
                           "freeze_vision_tower")}
    key = cl_config.config_hash({**fields, "build": BUILD_VERSION})[:12]
    root = Path(models.cache_root(OmegaConf.create({"cache_dir": None})))
    return str(models.build_once(root / f"tiny-llava-vlcot-{key}", lambda out: _build_tiny(mcfg, out)))


# ---- the vision head and its loss (SPEC §6) ---------------------------------------------------

class VisionHead(torch.nn.Module):
    """Ŝ_{t,k} = σ(⟨W h_t, f_k⟩ / √d + b): patch k's score at the t-th ⟨look⟩ (logits returned)."""

    def __init__(self, hidden: int, init_bias: float = -2.0):
        super().__init__()
        self.query = torch.nn.Linear(hidden, hidden)
        self.bias = torch.nn.Parameter(torch.tensor([init_bias]))

    def forward(self, hidden: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``hidden`` [T, d] at the ⟨look⟩ positions, ``feats`` [T, P, d] of each one's image → logits [T, P]."""
        q = self.query(hidden.to(self.query.weight.dtype)).to(feats.dtype)
        return torch.einsum("td,tpd->tp", q, feats) / math.sqrt(feats.shape[-1]) + self.bias.to(feats.dtype)


def vision_losses(logits: torch.Tensor, targets: torch.Tensor, dice_lambda: float, entropy_alpha: float,
                  entropy: str, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """SPEC §6 on T ⟨look⟩ steps × P patches (``logits`` of Ŝ, ``targets`` B ∈ {0, 1}):

    - L_BCE = Σ_{t,k} −B log Ŝ − (1−B) log(1−Ŝ), divided by T·P so its scale matches the per-token L_text;
    - L_Dice = 1 − 2 Σ_k B Ŝ / (Σ_k B + Σ_k Ŝ + ε) per step, averaged over the T steps;
    - R_ent = ±(1/T) Σ_t H(P̂_t), P̂_{t,k} = Ŝ_{t,k} / Σ_j Ŝ_{t,j}; + for ``sharpen`` (minimising the loss
      lowers the entropy), − for ``smooth``;
    - total = L_BCE + λ·L_Dice + α·R_ent.
    """
    if entropy not in ("sharpen", "smooth"):
        raise ValueError(f"vision_losses: entropy {entropy!r} (expected 'sharpen' or 'smooth')")
    logits, targets = logits.float(), targets.float()
    s = torch.sigmoid(logits)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    dice = (1 - 2 * (targets * s).sum(-1) / (targets.sum(-1) + s.sum(-1) + eps)).mean()
    p = s / s.sum(-1, keepdim=True)
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    r_ent = h if entropy == "sharpen" else -h
    return {"bce": bce, "dice": dice, "entropy": h, "r_ent": r_ent,
            "total": bce + dice_lambda * dice + entropy_alpha * r_ent}


# ---- the model --------------------------------------------------------------------------------

class VLCoTModel(torch.nn.Module):
    """A LLaVA with its text head and (``head`` not None) the vision head; :meth:`forward` returns
    L_text + L_vision (SPEC §6) for teacher-forced chains.

    Inputs: ``input_ids`` with ``<image>`` placeholders (the image's P patches in order) and ``<patch>``
    placeholders (after a ⟨look⟩, the patches it selected), ``patch_index`` (the patch each
    placeholder stands for, −1 elsewhere), ``labels`` (−100 on the prompt and on every placeholder),
    ``look_targets`` (B of each ⟨look⟩ in the batch, row-major order of their positions).
    """

    def __init__(self, llava, head: VisionHead | None, token_ids: dict[str, int], hcfg=None):
        super().__init__()
        self.llava, self.head, self.ids = llava, head, token_ids
        self.hcfg = hcfg
        self.config = llava.config

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, P, d]: the projected patch features (LLaVA's image tokens)."""
        cfg = self.llava.config
        out = self.llava.model.get_image_features(
            pixel_values=pixel_values.to(self.llava.dtype), vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return torch.stack(list(out.pooler_output))

    def embed(self, input_ids: torch.Tensor, patch_index: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Token embeddings with every placeholder replaced by its patch's feature."""
        placeholder = patch_index >= 0
        ids = input_ids.masked_fill(placeholder, self.ids["pad"])
        embeds = self.llava.get_input_embeddings()(ids)
        gathered = feats.gather(1, patch_index.clamp_min(0).unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        return torch.where(placeholder.unsqueeze(-1), gathered.to(embeds.dtype), embeds)

    def hidden(self, embeds, attention_mask, position_ids=None, past_key_values=None):
        out = self.llava.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                              position_ids=position_ids, past_key_values=past_key_values,
                                              use_cache=past_key_values is not None)
        return out.last_hidden_state, out.past_key_values

    def forward(self, input_ids, attention_mask, pixel_values, patch_index, labels, look_targets=None, **_):
        feats = self.patch_features(pixel_values)
        h, _ = self.hidden(self.embed(input_ids, patch_index, feats), attention_mask)
        logits = self.llava.lm_head(h[:, :-1])
        text = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        out = {"loss": text, "text_loss": text.detach()}
        looks = (input_ids == self.ids["look"]) & (labels != -100)
        if self.head is not None and looks.any():
            rows, pos = looks.nonzero(as_tuple=True)
            v = vision_losses(self.head(h[rows, pos], feats[rows]), look_targets, self.hcfg.dice_lambda,
                              self.hcfg.entropy_alpha, cl_config.enum_value(self.hcfg.entropy))
            out["loss"] = text + v["total"]
            out.update({f"vision_{k}": t.detach() for k, t in v.items()})
        return out


def token_ids(tokenizer) -> dict[str, int]:
    return {"image": tokenizer.convert_tokens_to_ids(IMAGE), "look": tokenizer.convert_tokens_to_ids(LOOK),
            "patch": tokenizer.convert_tokens_to_ids(PATCH), "pad": tokenizer.pad_token_id,
            "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}


def load(source: str | Path, mcfg, hcfg, with_head: bool):
    """(VLCoTModel, processor) from a trained dir (``model/`` + ``vision_head.safetensors``) or from an
    untrained LLaVA's from_pretrained dir or hub id (a fresh head, seeded by ``init_seed``)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    source = Path(source) if Path(source).is_dir() else source
    llava_dir = source / "model" if isinstance(source, Path) and (source / "model").is_dir() else source
    processor = AutoProcessor.from_pretrained(str(llava_dir), revision=mcfg.revision,
                                              trust_remote_code=mcfg.trust_remote_code)
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    llava = LlavaForConditionalGeneration.from_pretrained(
        str(llava_dir), revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code,
        dtype=models.DTYPES[cl_config.enum_value(mcfg.dtype)])
    v = llava.config.vision_config
    if (v.image_size // v.patch_size) ** 2 != (mcfg.image_size // mcfg.patch_size) ** 2:
        raise cl_config.ConfigError(
            f"keys 'vlcot.model.image_size', 'vlcot.model.patch_size': the scenes are labelled on a "
            f"{mcfg.image_size // mcfg.patch_size}-patch grid, but {llava_dir} sees {v.image_size // v.patch_size} "
            f"(expected image_size {v.image_size}, patch_size {v.patch_size})")
    missing = [t for t in (LOOK, PATCH) if t not in tok.get_vocab()]
    if missing:  # a stock LLaVA: add the family's tokens
        tok.add_special_tokens({"additional_special_tokens": [*tok.additional_special_tokens, *missing]})
        llava.resize_token_embeddings(len(tok))
    head = None
    if with_head:
        torch.manual_seed(mcfg.init_seed)
        head = VisionHead(llava.config.text_config.hidden_size)
        if isinstance(source, Path) and (source / HEAD_FILE).is_file():
            head.load_state_dict(load_file(source / HEAD_FILE))
    model = VLCoTModel(llava, head, token_ids(tok), hcfg)
    model.eval()
    return model, processor


def freeze_and_lora(model: VLCoTModel, mcfg) -> VLCoTModel:
    """``freeze_vision_tower``; ``lora.enabled``: PEFT LoRA on the language model's projections (in place;
    the projector and the vision head stay fully trainable)."""
    if mcfg.freeze_vision_tower:
        for p in model.llava.model.vision_tower.parameters():
            p.requires_grad_(False)
    if mcfg.lora.enabled:
        from peft import LoraConfig, inject_adapter_in_model

        lcfg = mcfg.lora
        names = "|".join(lcfg.target_modules)
        config = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                            target_modules=rf".*language_model\..*\.({names})")
        for p in model.llava.model.language_model.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(config, model.llava)
    return model


def save(model: VLCoTModel, processor, directory: Path) -> None:
    """``directory/model/`` (from_pretrained, LoRA merged) and ``directory/vision_head.safetensors``."""
    llava = model.llava
    if any("lora_" in n for n, _ in llava.named_parameters()):
        llava = _merge_lora(llava)
    llava.save_pretrained(directory / "model", safe_serialization=True)
    processor.save_pretrained(directory / "model")
    if model.head is not None:
        save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, directory / HEAD_FILE)


def _merge_lora(llava):
    """Fold every injected LoRA layer into its base linear layer (W += B·A·scale) and drop the adapter."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(llava.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = llava.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], module.get_base_layer())
    return llava
