"""Config plumbing shared by every schema: the error type, merging with explained errors,
YAML loading, and the canonical hash of a config view. Imports no schema."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class InputError(ValueError):
    """An input file (task data, model weights) is missing or malformed; the message names the
    file (and the line), so the CLI prints it as one line, without a traceback."""



def enum_value(value: Any) -> str:
    """The string of a config choice: a validated config holds the Enum, a stage's plain view the str."""
    return str(getattr(value, "value", value))


def type_name(tp: Any) -> str:
    """A field's annotation as a reader writes it: ``int``, ``float or null``, ``list of str``,
    ``one of [greedy, sampled]`` for an Enum, the section's name for a nested dataclass."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of [{', '.join(str(m.value) for m in tp)}]"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} mapping"
    return getattr(tp, "__name__", str(tp))


def field_type(owner: Any, key: Any) -> str | None:
    """The type of field ``key`` of the dataclass ``owner`` (None when either is unknown)."""
    if not (isinstance(owner, type) and dataclasses.is_dataclass(owner)) or not isinstance(key, str):
        return None
    hints = typing.get_type_hints(owner)
    return type_name(hints[key]) if key in hints else None


def explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """``<source>: key '<dotted key>': <what is wrong> (expected <the field's type>)``; ``source``
    names what set the value: a YAML file, ``snakemake --config`` or the command line."""
    key = getattr(err, "full_key", None) or "<root>"
    msg = str(err).splitlines()[0]
    expected = field_type(getattr(err, "object_type", None), getattr(err, "key", None))
    suffix = f" (expected {expected})" if expected and "expected one of" not in msg and "not in" not in msg else ""
    return ConfigError(f"{source}: key '{key}': {msg}{suffix}")


def load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got a list")
    return loaded




def _string_iteration_keys(layer: Any) -> Any:
    """YAML reads ``per_iteration: {2: ...}`` with an int key, Snakemake's --config with a
    str key; the schema keys iterations by string."""
    if isinstance(layer, DictConfig):
        layer = OmegaConf.to_container(layer)
    if isinstance(layer, dict) and isinstance(layer.get("dpo"), dict) \
            and isinstance(layer["dpo"].get("per_iteration"), dict):
        layer["dpo"]["per_iteration"] = {str(k): v for k, v in layer["dpo"]["per_iteration"].items()}
    return layer


def merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    """Merge ``layer`` into the structured ``base``, explaining any mismatch."""
    layer = _string_iteration_keys(layer)
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        raise explain(err, source) from err



def to_yaml(cfg: DictConfig | dict) -> str:
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))


def config_hash(view: dict) -> str:
    """sha256 of a config view's canonical JSON (provenance key)."""
    blob = json.dumps(view, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
