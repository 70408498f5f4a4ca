"""The one stage table: every stage of the DAG, read by the CLI (which stages exist), the
launcher (where each runs) and the config views (what each depends on).

Rule name = stage name = module name: rule ``mcts_merge`` runs ``closedloop run-stage
mcts_merge``, which calls ``closedloop.stages.mcts_merge.main(cfg)``. A test checks every
``run-stage`` call in ``rules/*.smk`` against this table and every row against a rule.

This module imports nothing, so parsing the DAG never imports torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("loop", "vlm", "coral", "vlcot")
"""The families ``families`` may switch on in the default target (rule ``all``)."""

LOCAL, HEAVY, TRAINING = "local", "heavy", "training"
"""Launch classes: ``local`` stays where Snakemake runs; ``heavy`` goes to Slurm under the
slurm launcher as one rank; ``training`` goes to Slurm and may run several ranks
(torch.distributed through the HF Trainer)."""


@dataclass(frozen=True)
class Stage:
    """One row of the table."""

    name: str
    family: str
    """``loop`` (the LLM closed loop, SPEC §1–3), ``vlm`` (V-DPO, SPEC §4), ``coral`` (SPEC §5), ``vlcot`` (SPEC §6), ``shared``."""
    sections: tuple[str, ...]
    """Config sections the stage's output depends on (``vlm.sft``: one subsection); a change
    anywhere else does not rerun it (:func:`closedloop.config.stage_view`)."""
    launch: str = LOCAL

    @property
    def entry(self) -> str:
        """``module:function`` of the stage's entry point."""
        return f"closedloop.stages.{self.name}:main"


_VLM_TRAINED = ("vlm.model", "vlm.data", "vlm.sft")
_VLCOT_TRAINED = ("vlcot.model", "vlcot.data", "vlcot.head", "vlcot.sft")

_CORAL_TRAINED = ("model", "coral.init", "coral.task", "coral.window", "coral.n_back_pred", "coral.max_chunk",
                  "coral.max_length", "coral.stage1")
"""What the COrAL model depends on: not its decoding or evaluation settings."""

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", "shared", ()),
    Stage("sft", "shared", ("model", "sft"), TRAINING),
    Stage("evaluate", "shared", ("model", "eval"), HEAVY),
    Stage("evaluate_decoding", "shared", ("model", "eval", "decodings"), HEAVY),
    Stage("mcts", "loop", ("model", "mcts"), HEAVY),
    Stage("mcts_merge", "loop", ("model", "mcts")),
    Stage("instance", "loop", ("model", "mcts", "loop"), HEAVY),
    Stage("dpo", "loop", ("model", "dpo"), TRAINING),
    Stage("report", "shared", ("eval", "loop", "decodings", "report")),
    Stage("seeds_report", "shared", ("seeds", "eval", "loop", "report")),
    Stage("vlm_data", "vlm", ("vlm.data",)),
    Stage("vlm_sft", "vlm", _VLM_TRAINED, HEAVY),
    Stage("vdpo_pairs", "vlm", (*_VLM_TRAINED, "vlm.pairs")),
    Stage("vdpo", "vlm", (*_VLM_TRAINED, "vlm.pairs", "vlm.vdpo"), HEAVY),
    Stage("pope", "vlm", (*_VLM_TRAINED, "vlm.pairs", "vlm.vdpo", "vlm.pope"), HEAVY),
    Stage("vlm_report", "vlm", ("vlm.pope",)),
    Stage("vlm_seeds_report", "vlm", ("seeds", "vlm.pope")),
    Stage("vlcot_data", "vlcot", ("vlcot.model", "vlcot.data")),
    Stage("vlcot_sft", "vlcot", _VLCOT_TRAINED, HEAVY),
    Stage("vlcot_rejection", "vlcot", (*_VLCOT_TRAINED, "vlcot.rejection"), HEAVY),
    Stage("vlcot_eval", "vlcot", (*_VLCOT_TRAINED, "vlcot.rejection", "vlcot.eval"), HEAVY),
    Stage("vlcot_report", "vlcot", ("vlcot.data", "vlcot.sft", "vlcot.rejection", "vlcot.eval")),
    Stage("coral_stage1", "coral", _CORAL_TRAINED, TRAINING),
    Stage("coral_stage2", "coral", (*_CORAL_TRAINED, "coral.stage2"), TRAINING),
    Stage("coral_evaluate", "coral", (*_CORAL_TRAINED, "coral.stage2", "eval", "coral.decoding",
                                      "coral.n_questions"), HEAVY),
    Stage("coral_report", "coral", ("eval", "coral")),
)}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r} (expected one of {sorted(STAGES)})")
    return STAGES[name]


def names(launch: str | None = None) -> list[str]:
    """Every stage, or those of one launch class."""
    return [s.name for s in STAGES.values() if launch is None or s.launch == launch]
