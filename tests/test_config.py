"""Config loading: defaults, files, overrides, and errors that name file, key and type."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from closedloop import config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_default_yaml_mirrors_the_dataclass_defaults():
    """configs/default.yaml spells out every default (minus the per-job section), value for value."""
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/default.yaml"))
    embedded = OmegaConf.to_container(config.load(), enum_to_str=True)
    del embedded["job"]
    assert raw == embedded


@pytest.mark.parametrize("name", ["smoke.yaml", "paper/mcts_ipl_mistral7b.yaml"])
def test_shipped_configs_load(name):
    cfg = config.load([ROOT / "configs" / name])
    assert cfg.experiment


def test_paper_preset_has_the_papers_beam_search_settings():
    """SPEC §1 (Xie et al. 2023): λ 0.5, k 5, n 16, at most 16 steps; compared with SC and greedy."""
    ev = config.load([ROOT / "configs/paper/mcts_ipl_mistral7b.yaml"]).eval
    assert (ev.beam_lambda, ev.beam_k, ev.beam_n, ev.beam_max_steps, ev.beam_tau_decay) == (0.5, 5, 16, 16, 0.5)
    smoke = config.load([ROOT / "configs/smoke.yaml"]).eval
    assert smoke.beam_k * smoke.beam_n < ev.beam_k * ev.beam_n and smoke.beam_max_steps < 16


def test_files_then_overrides_in_order(tmp_path):
    a = write(tmp_path, "seed: 3\nsft:\n  learning_rate: 0.5\n", "a.yaml")
    b = write(tmp_path, "seed: 4\n", "b.yaml")
    cfg = config.load([a, b], ["sft.batch_size=2", "eval.tasks=[synthetic]"])
    assert (cfg.seed, cfg.sft.learning_rate, cfg.sft.batch_size) == (4, 0.5, 2)
    assert list(cfg.eval.tasks) == ["synthetic"]
    assert cfg.model.kind == config.ModelKind.embedded


BAD_FILES = [
    ("seeed: 1\n", "seeed"),  # unknown top-level key
    ("sft:\n  lr: 0.1\n", "sft.lr"),  # unknown nested key
    ("sft:\n  batch_size: eight\n", "sft.batch_size"),  # wrong type
    ("model:\n  kind: gpt5\n", "model.kind"),  # bad enum value
    ("model:\n  trust_remote_code: maybe\n", "model.trust_remote_code"),  # not a bool
    ("eval:\n  tasks: synthetic\n", "eval.tasks"),  # scalar for a list
    ("data:\n  tasks:\n    mine:\n      source: csv\n", "data.tasks.mine.source"),  # bad enum in a dict value
    ("eval:\n  tasks: [nope]\n", "eval.tasks"),  # unknown task
    ("eval:\n  ci_level: 1.5\n", "eval.ci_level"),  # out of range
    ("data:\n  tasks:\n    mine:\n      source: jsonl\n", "data.tasks.mine.heldout_path"),  # missing path
    ("eval:\n  models: [base, gpt]\n", "eval.models"),  # unknown model tag
    ("sft:\n  batch_size: 0\n", "sft.batch_size"),  # not positive
]


@pytest.mark.parametrize("text,key", BAD_FILES)
def test_bad_config_names_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load([path])
    message = str(err.value)
    assert key in message
    if key not in ("eval.tasks", "eval.ci_level", "eval.models", "sft.batch_size", "data.tasks.mine.heldout_path") \
            or "eight" in text or "synthetic" in text:
        assert str(path) in message


def test_wrong_type_says_what_was_expected(tmp_path):
    with pytest.raises(config.ConfigError, match=r"sft\.batch_size.*(Integer|int)"):
        config.load([write(tmp_path, "sft:\n  batch_size: eight\n")])


def test_bad_enum_lists_the_valid_values(tmp_path):
    with pytest.raises(config.ConfigError, match=r"embedded.*hf.*tiny"):
        config.load([write(tmp_path, "model:\n  kind: gpt5\n")])


def test_bad_override_is_reported_as_command_line():
    with pytest.raises(config.ConfigError, match=r"command line: key 'sft.epochs'"):
        config.load([], ["sft.epochs=lots"])
    with pytest.raises(config.ConfigError, match="key=value"):
        config.load([], ["sft.epochs"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load([tmp_path / "nope.yaml"])
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load([write(tmp_path, "sft: [unclosed\n")])
    with pytest.raises(config.ConfigError, match="mapping"):
        config.load([write(tmp_path, "- a\n- b\n")])


def test_stage_view_keeps_only_what_the_stage_depends_on():
    cfg = config.load()
    sft = config.stage_view(cfg, "sft", ["synthetic"])
    assert set(sft) == {"experiment", "seed", "data_dir", "results_dir", "model", "sft", "data"}
    assert list(sft["data"]["tasks"]) == ["synthetic"]
    changed = config.load([], ["eval.k=9"])
    assert config.stage_view(changed, "sft", ["synthetic"]) == sft  # eval change: SFT stays valid
    assert config.stage_view(changed, "evaluate", ["sciq"]) != config.stage_view(cfg, "evaluate", ["sciq"])
    assert config.config_hash(sft) == config.config_hash(dict(reversed(list(sft.items()))))


def test_from_dict_names_its_source():
    with pytest.raises(config.ConfigError, match=r"snake\.yaml: key 'sft.nope'"):
        config.from_dict({"sft": {"nope": 1}}, "snake.yaml")


def test_from_dict_accepts_dotted_keys_like_snakemake_config():
    cfg = config.from_dict({"seed": 2, "sft.learning_rate": 0.003, "eval.tasks": ["sciq"]}, "cli")
    assert (cfg.seed, cfg.sft.learning_rate, list(cfg.eval.tasks)) == (2, 0.003, ["sciq"])
    with pytest.raises(config.ConfigError, match=r"sft\.nope"):
        config.from_dict({"sft.nope": 1}, "cli")
    with pytest.raises(config.ConfigError, match=r"sft\.batch_size"):
        config.from_dict({"sft.batch_size": "many"}, "cli")
