"""Structured experiment configuration (OmegaConf dataclasses), as a package.

- :mod:`.core`: :class:`ConfigError`, merging with explained errors, YAML loading, the hash;
- :mod:`.common`: the base model, LoRA, :class:`TrainArgs` (every TRL trainer's settings), the job;
- :mod:`.llm`: the LLM closed loop's sections (SPEC §1–3, §7) and their checks;
- :mod:`.vlm`: the V-DPO branch's sections (SPEC §4) and their checks;
- :mod:`.vlcot`: the VL-CoT family's sections (SPEC §6) and their checks;
- :mod:`.coral`: the COrAL family's section (SPEC §5) and its checks;
- :mod:`.loader`: :class:`ExperimentConfig`, :func:`load`, :func:`stage_view`.

The dataclass defaults *are* the embedded default experiment; ``configs/default.yaml``
mirrors them (a test keeps the two equal). A user file and ``key=value`` overrides are
merged on top, and every mistake (unknown key, wrong type, bad enum value) raises
:class:`ConfigError` naming the file, the dotted key and what was expected. Everything is
re-exported here: ``from closedloop import config; config.load(...)``.
"""

from closedloop.config.common import (
    DType,
    JobConfig,
    LoraConfig,
    ModelConfig,
    ModelKind,
    SharedSections,
    TinyModelConfig,
    Tracker,
    TrainArgs,
)
from closedloop.config.coral import (
    CoralConfig,
    CoralDecoding,
    CoralDecodingConfig,
    CoralInit,
    CoralSections,
    CoralStageConfig,
    check_coral,
)
from closedloop.config.core import ConfigError, InputError, config_hash, enum_value, explain, load_yaml, merge, to_yaml
from closedloop.config.llm import (
    ABLATIONS,
    DataConfig,
    Decoding,
    DecodingsConfig,
    DPOConfig,
    EvalConfig,
    LLMSections,
    LoopConfig,
    MathScoring,
    MCScoring,
    MCTSConfig,
    Reference,
    RejectedChoice,
    ReportConfig,
    SFTConfig,
    Split,
    SyntheticTaskConfig,
    TaskConfig,
    TaskSource,
    check_llm,
    dpo_for,
)
from closedloop.config.loader import SHARED_KEYS, ExperimentConfig, check, from_dict, load, stage_view
from closedloop.config.vlcot import VLCoTConfig, VLCoTSections, check_vlcot
from closedloop.config.vlm import (
    PopeConfig,
    TextBackbone,
    VDPOConfig,
    VDPOPairsConfig,
    VLMConfig,
    VLMDataConfig,
    VLMKind,
    VLMModelConfig,
    VLMSections,
    VLMSFTConfig,
    check_vlm,
)

__all__ = [
    "CoralConfig", "CoralDecoding", "CoralDecodingConfig", "CoralInit", "CoralSections", "CoralStageConfig",
    "check_coral",
    "ABLATIONS", "InputError", "LLMSections", "SHARED_KEYS", "SharedSections", "VLMSections", "ConfigError", "DPOConfig", "DType", "DataConfig", "Decoding", "DecodingsConfig",
    "EvalConfig", "ExperimentConfig", "JobConfig", "LoopConfig", "LoraConfig", "MathScoring", "MCScoring", "MCTSConfig", "ModelConfig",
    "ModelKind", "PopeConfig", "Reference", "RejectedChoice", "ReportConfig", "SFTConfig", "Split",
    "SyntheticTaskConfig", "TaskConfig", "TaskSource", "TextBackbone", "TinyModelConfig", "Tracker", "TrainArgs",
    "VDPOConfig", "VDPOPairsConfig", "VLMConfig", "VLMDataConfig", "VLMKind", "VLMModelConfig", "VLMSFTConfig",
    "VLCoTConfig", "VLCoTSections", "check_vlcot",
    "check", "check_llm", "check_vlm", "config_hash", "dpo_for", "enum_value", "explain", "from_dict", "load",
    "load_yaml", "merge", "stage_view", "to_yaml",
]
