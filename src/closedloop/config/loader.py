"""The whole experiment's schema, loading it (defaults ← files ← overrides, validated),
and the view of it that one stage's job depends on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from closedloop import stage_table
from closedloop.config.common import SharedSections, check_shared
from closedloop.config.coral import CoralSections, check_coral
from closedloop.config.core import ConfigError, explain, load_yaml, merge
from closedloop.config.llm import DATA_LIMITS, LLMSections, check_llm, dpo_for
from closedloop.config.vlcot import VLCoTSections, check_vlcot
from closedloop.config.vlm import VLMSections, check_vlm, narrowed_sections


@dataclass
class ExperimentConfig(CoralSections, VLCoTSections, VLMSections, LLMSections, SharedSections):
    """A whole experiment: the shared settings, then each family's sections (a family adds a
    section in its own module: :class:`~closedloop.config.llm.LLMSections`,
    :class:`~closedloop.config.vlm.VLMSections`, :class:`~closedloop.config.vlcot.VLCoTSections`,
    :class:`~closedloop.config.coral.CoralSections`)."""


SHARED_KEYS = ("experiment", "seed", "data_dir", "results_dir")
DAG_KEYS = {"eval.ablation_iterations": ("report", "seeds_report")}
"""Keys that choose which jobs the DAG holds, read by no job but the stages listed: dropped from
every other stage's view, so switching one adds or removes jobs and reruns none."""


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
        sources = [str(p) for p in files] + (["command line"] if overrides else [])
        check(cfg, " + ".join(sources) or "defaults")
    return cfg


def _apply(cfg: DictConfig, data: dict, source: str) -> DictConfig:
    """Merge a Snakemake-style mapping into ``cfg``: nested keys first, then top-level keys
    with dots (``snakemake --config sft.learning_rate=3e-5``) as dotted overrides."""
    cfg = merge(cfg, OmegaConf.create({k: v for k, v in data.items() if "." not in k}), source)
    for key, value in data.items():
        if "." in key:
            try:
                OmegaConf.update(cfg, key, value, merge=True)
            except OmegaConfBaseException as err:
                raise explain(err, f"{source} ({key}=...)") from err
    return cfg


def from_dict(data: dict, source: str, layers: list[tuple[str, dict]] = ()) -> DictConfig:
    """Validate a plain mapping (Snakemake's ``config``) against the schema.

    ``layers``: the mappings Snakemake merged into ``data``, in order, each with its name (every
    config file, then ``snakemake --config``); when ``data`` is invalid they are applied one by
    one, so the error names the layer that set the bad value rather than ``source``.
    """
    try:
        cfg = _apply(OmegaConf.structured(ExperimentConfig), dict(data), source)
    except ConfigError:
        if not layers:
            raise
        layered = OmegaConf.structured(ExperimentConfig)
        for name, layer in layers:
            layered = _apply(layered, dict(layer), name)  # raises, naming the layer at fault
        raise  # each layer alone is fine: report the merged config's error
    check(cfg, source)
    return cfg


def check(cfg: DictConfig, source: str | None = None) -> None:
    """Names that reach a path or a shell, then every value's range and the cross-field
    checks that types alone cannot express, family by family; the error names ``source``
    (the config files) and the key."""
    try:
        check_shared(cfg)
        check_families(cfg.families)
        check_llm(cfg)
        check_vlm(cfg.vlm)
        check_vlcot(cfg.vlcot)
        check_coral(cfg)
    except ConfigError as err:
        if source is None:
            raise
        raise ConfigError(f"{source}: {err}") from None


def check_families(families) -> None:
    """``families`` names only families of :data:`closedloop.stage_table.FAMILIES`."""
    for family in families:
        if family not in stage_table.FAMILIES:
            raise ConfigError(f"key 'families': unknown family {family!r} (expected any of {list(stage_table.FAMILIES)})")


def stage_view(cfg: DictConfig, stage: str, tasks: list[str] = (), iteration: int | None = None,
               model: str | None = None) -> dict:
    """The part of ``cfg`` that determines one ``stage`` job's outputs, as a plain dict.

    Only the stage's sections (:data:`closedloop.stage_table.STAGES`; ``vlm.sft`` is one
    subsection), the catalogue entries of ``tasks`` and the job's ``model`` go to the job, so a
    change anywhere else does not invalidate it. ``dpo`` of iteration ``iteration`` gets
    that iteration's settings (:func:`~closedloop.config.llm.dpo_for`); :data:`DAG_KEYS` reach
    only the stages that read them. Under ``seeds`` a job
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
        if stage == "data" and any(full["data"]["tasks"][t]["source"] == "jsonl" for t in tasks):
            view["data"].update({key: full["data"][key] for key in DATA_LIMITS})  # they judge a user's file
    for key, readers in DAG_KEYS.items():
        top, _, sub = key.partition(".")
        if stage not in readers and isinstance(view.get(top), dict):
            view[top].pop(sub, None)
    if stage == "dpo" and iteration is not None:
        view["dpo"] = OmegaConf.to_container(dpo_for(cfg, iteration), enum_to_str=True)
    if model is not None:
        view["job"] = {"model": model}
    return view
