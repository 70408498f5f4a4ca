"""The V-DPO branch's model (SPEC §4): the prompt format and the LLaVA it trains.

The model is always transformers' ``LlavaForConditionalGeneration`` with its
``LlavaProcessor``, so the same stage code trains ``llava-hf/llava-1.5-7b-hf`` on a cluster
(``vlm.model.kind: hf``, configs/paper/vdpo_llava7b.yaml) and, by default, a small LLaVA
built from config offline (``kind: tiny``): a CLIP-style ViT vision tower on 64×64 easy-VQA
images (patch 16 → 16 image tokens), LLaVA's two-layer projector, and a tiny Llama text
backbone with a word-level tokenizer over the task's vocabulary (``text_backbone: embedded``
puts SmolLM2-135M's weights and tokenizer there instead). Every stage output is a ``from_pretrained`` dir (safetensors + processor).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from closedloop import config as cl_config
from closedloop import models

IMAGE_TOKEN = "<image>"
BUILD_VERSION = 2
"""Part of the tiny model's cache key: bump when :func:`_build_tiny` changes."""
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")


# ---- prompts ----------------------------------------------------------------------------

def prompt(question: str) -> str:
    """LLaVA-1.5's prompt format (the llava-hf template), used for every model of the branch."""
    question = question[:1].upper() + question[1:]
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def answer_text(answer: str) -> str:
    """easy-VQA's one-word answer as a short sentence: 'yes' -> ' Yes.'."""
    return f" {answer[:1].upper()}{answer[1:]}."


# ---- the model --------------------------------------------------------------------------

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


def task_corpus() -> list[str]:
    """Every text the branch's tiny model reads or writes: easy-VQA's questions and answers
    plus this branch's prompt, description and POPE templates."""
    import easy_vqa

    texts = [*easy_vqa.get_train_questions()[0], *easy_vqa.get_test_questions()[0], *easy_vqa.get_answers()]
    texts += [prompt("Describe the image."), "yes. no. there is not. a an the"]
    texts += [f"Is there a {c} {s} in the image? A {c} {s}." for c in COLORS for s in SHAPES]
    return texts


def word_tokenizer():
    """A word-level tokenizer over :func:`task_corpus` (lower-cased; ~60 entries).

    Why not SmolLM2's 49k-entry tokenizer for the tiny model: on 2 CPU cores the 49k-way
    output projection over every position costs ~95% of a training step; the task's
    vocabulary has a few dozen words. ``text_backbone: embedded`` keeps SmolLM2's tokenizer.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in task_corpus() for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t.lower())})
    vocab = {tok: i for i, tok in enumerate([*SPECIAL.values(), IMAGE_TOKEN, *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token=SPECIAL["unk"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"],
                                   additional_special_tokens=[IMAGE_TOKEN])


def _build_tiny(mcfg, out: Path, text_dir: str | None = None) -> None:
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    backbone = cl_config.enum_value(mcfg.text_backbone)
    if backbone == "loop_policy":  # the closed loop's last policy, then built as the embedded backbone
        backbone, smol = "embedded", Path(text_dir)
        tokenizer = AutoTokenizer.from_pretrained(smol)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    elif backbone == "embedded":
        llm_cfg = OmegaConf.create({"cache_dir": None})
        smol = models.embedded_dir(llm_cfg)
        tokenizer = AutoTokenizer.from_pretrained(smol)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    else:
        tokenizer = word_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    vision = CLIPVisionConfig(image_size=64, patch_size=mcfg.vision_patch_size, hidden_size=mcfg.vision_hidden_size,
                              intermediate_size=4 * mcfg.vision_hidden_size, num_hidden_layers=mcfg.vision_layers,
                              num_attention_heads=mcfg.vision_heads, projection_dim=mcfg.vision_hidden_size)
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    if backbone == "embedded":
        text = LlamaConfig.from_pretrained(smol)
        text.vocab_size = len(tokenizer)
    else:
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=mcfg.text_hidden_size,
                           intermediate_size=mcfg.text_intermediate_size, num_hidden_layers=mcfg.text_layers,
                           num_attention_heads=mcfg.text_heads, num_key_value_heads=mcfg.text_kv_heads,
                           max_position_embeddings=512, tie_word_embeddings=True, **specials)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(
        IMAGE_TOKEN), vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=text.tie_word_embeddings)
    torch.manual_seed(mcfg.init_seed)
    model = LlavaForConditionalGeneration(config)
    if backbone == "embedded":
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
        lm.resize_token_embeddings(len(tokenizer))
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [config.image_token_id]
    model.save_pretrained(out, safe_serialization=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=mcfg.vision_patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN)
    processor.save_pretrained(out)


def base_source(mcfg, text_dir: str | None = None) -> str:
    """The from_pretrained dir (or hub id) of the untrained LLaVA; ``text_dir``: the language
    model's from_pretrained dir for ``text_backbone: loop_policy`` (part of the cache key by content)."""
    kind = cl_config.enum_value(mcfg.kind)
    if kind == "hf":
        return mcfg.name_or_path
    fields = {k: cl_config.enum_value(v) for k, v in OmegaConf.to_container(mcfg).items()
              if k not in ("kind", "name_or_path", "revision", "trust_remote_code", "dtype", "bf16_training", "lora")}
    if fields["text_backbone"] == "loop_policy":
        if not text_dir:
            raise cl_config.ConfigError("key 'vlm.model.text_backbone': loop_policy needs the loop policy's dir "
                                        "(job.model, set by the vlm_sft rule)")
        from closedloop import artifacts

        fields["text_dir"] = artifacts.content_hash(Path(text_dir))  # hashed once per process (the input check)
    key = cl_config.config_hash({**fields, "build": BUILD_VERSION})[:12]
    root = Path(models.cache_root(OmegaConf.create({"cache_dir": None})))
    return str(models.build_once(root / f"tiny-llava-{key}", lambda out: _build_tiny(mcfg, out, text_dir)))


def load(source: str | Path, mcfg):
    """(LlavaForConditionalGeneration, LlavaProcessor) from a dir or hub id, in eval mode
    (:func:`closedloop.models.load_dir` with the LLaVA classes)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return models.load_dir(source, mcfg, model_class=LlavaForConditionalGeneration, processor_class=AutoProcessor)


def freeze_vision_tower(model, mcfg) -> None:
    """``vlm.model.freeze_vision_tower``: no gradient into the vision tower (LLaVA-1.5 practice)."""
    if mcfg.freeze_vision_tower:
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)


def lora_targets(lcfg) -> str:
    """PEFT ``target_modules`` as a regex: the named projections of the language model only
    (CLIP's vision tower has q_proj/k_proj/v_proj too; LLaVA's LoRA leaves it alone)."""
    names = "|".join(lcfg.target_modules)
    return rf".*language_model\..*\.({names})"


def add_lora(model, mcfg):
    """``vlm.model.lora.enabled``: wrap the LLaVA in a PEFT LoRA adapter on its language model;
    the projector is trained in full (``modules_to_save``). Otherwise ``model`` unchanged."""
    lcfg = mcfg.lora
    if not lcfg.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=lora_targets(lcfg),
                        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save(model, processor, directory: Path, merge_lora: bool = True) -> None:
    """A ``from_pretrained`` dir (:func:`closedloop.models.save_policy`): a PEFT model is merged
    into plain LLaVA weights first (``merge_lora``; otherwise the adapter alone is saved)."""
    models.save_policy(model, processor, directory, merge_lora)
