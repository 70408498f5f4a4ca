"""The whole experiment's schema, loading it (defaults ← files ← overrides, validated),
and the view of it that one stage's job depends on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from closedloop import stage_table
from closedloop.config.common import SharedSections
from closedloop.config.core import ConfigError, explain, load_yaml, merge
from closedloop.config.llm import LLMSections, check_llm, dpo_for
from closedloop.config.vlm import VLMSections, check_vlm, narrowed_sections


@dataclass
class ExperimentConfig(VLMSections, LLMSections, SharedSections):
    """A whole experiment: the shared settings, then each family's sections (a family adds a
    section in its own module: :class:`~closedloop.config.llm.LLMSections`,
    :class:`~closedloop.config.vlm.VLMSections`)."""


SHARED_KEYS = ("experiment", "seed", "data_dir", "results_dir")


def load(
    files: list[str | Path] = (), overrides: list[str] = (), validate: bool = True
) -> DictConfig:
    """Defaults ← each YAML file in order ← ``key=value`` overrides; validated.

    ``validate=False`` skips the cross-field :func:`check`, for stage views that
    carry only the sections one job needs (the whole config was checked upstream).
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    for path in files:
        cfg = merge(cfg, load_yaml(Path(path)), str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"command line: override {bad[0]!r} is not of the form key=value")
        try:
            layer = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as err:
            raise explain(err, "command line") from err
        cfg = merge(cfg, layer, "command line")
    if validate:
        check(cfg)
    return cfg


def from_dict(data: dict, source: str) -> DictConfig:
    """Validate a plain mapping (Snakemake's ``config``) against the schema.

    Top-level keys with dots (``snakemake --config sft.learning_rate=3e-5``) are
    applied as dotted overrides after the nested keys.
    """
    nested = {k: v for k, v in data.items() if "." not in k}
    cfg = merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(nested), source)
    for key, value in data.items():
        if "." in key:
            try:
                OmegaConf.update(cfg, key, value, merge=True)
            except OmegaConfBaseException as err:
                raise explain(err, f"{source} (--config {key}=...)") from err
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """Cross-field checks that types alone cannot express, family by family."""
    check_llm(cfg)
    check_vlm(cfg.vlm)


def stage_view(cfg: DictConfig, stage: str, tasks: list[str] = (), iteration: int | None = None,
               model: str | None = None) -> dict:
    """The part of ``cfg`` that determines one ``stage`` job's outputs, as a plain dict.

    Only the stage's sections (:data:`closedloop.stage_table.STAGES`; ``vlm.sft`` is one
    subsection), the catalogue entries of ``tasks`` and the job's ``model`` go to the job, so a
    change anywhere else does not invalidate it. ``dpo`` of iteration ``iteration`` gets
    that iteration's settings (:func:`~closedloop.config.llm.dpo_for`). Under ``seeds`` a job
    sees only its own seed (``seeds: [seed]``, which puts it in the per-seed layout), so adding
    a seed reruns nothing of the others; a stage with the ``seeds`` section sees them all.
    """
    if stage not in stage_table.STAGES:
        raise ConfigError(f"unknown stage {stage!r} (expected one of {sorted(stage_table.STAGES)})")
    sections = narrowed_sections(cfg, stage, model, stage_table.STAGES[stage].sections)
    full = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    view = {k: full[k] for k in SHARED_KEYS}
    if full.get("seeds"):
        view["seeds"] = [full["seed"]]
    for section in sections:
        top, _, sub = section.partition(".")
        if sub:
            view.setdefault(top, {})[sub] = full[top][sub]
        else:
            view[top] = full[top]
    if tasks:
        view["data"] = {"tasks": {t: full["data"]["tasks"][t] for t in tasks}}
    if stage == "dpo" and iteration is not None:
        view["dpo"] = OmegaConf.to_container(dpo_for(cfg, iteration), enum_to_str=True)
    if model is not None:
        view["job"] = {"model": model}
    return view
