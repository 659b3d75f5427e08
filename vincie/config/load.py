"""Loading a config: a preset name or YAML path, `key.sub=value` overrides, typed construction that names a
wrong key or type in one line, and the command-line arguments every config-driven command shares."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.resources
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vincie.config.rules import validate
from vincie.config.sections import Config
from vincie.errors import ConfigError


def preset_dir() -> Path:
    return Path(str(importlib.resources.files("launch") / "configs"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_source(source: str) -> Path:
    """A preset name or a YAML path -> the file to read."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {source} does not exist (expected a YAML file or a preset: "
                              f"{', '.join(preset_names())})")
        return path
    preset = preset_dir() / f"{source}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown config preset '{source}' (expected one of: {', '.join(preset_names())}, "
                          "or a path ending in .yaml)")
    return preset


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (run:, data:, ...), got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML: 3 -> int, true -> bool, [1, 2] -> list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. synth.resolution=32)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def load_config(source: str = "tiny", overrides: typing.Sequence[str] = ()) -> Config:
    path = resolve_source(source)
    raw = read_yaml(path)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    cfg = from_dict(Config, raw, prefix="")
    validate(cfg)
    return cfg


def all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        hint = typing.get_type_hints(cls)[f.name]
        keys += all_keys(hint, name + ".") if dataclasses.is_dataclass(hint) else [name]
    return keys


def unknown_key_error(cls: type, prefix: str, key: str) -> ConfigError:
    full = prefix + str(key)
    candidates = all_keys(Config)
    near = difflib.get_close_matches(full, candidates, n=3, cutoff=0.6)
    if not near:  # compare the last part alone, so `synth.resolutoin` and `resolutoin` both find a match
        local = [prefix + f.name for f in dataclasses.fields(cls)]
        near = difflib.get_close_matches(full, local, n=3, cutoff=0.4)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}?" if near else \
        f"valid keys here: {', '.join(f.name for f in dataclasses.fields(cls))}"
    return ConfigError(f"unknown config key '{full}' ({hint})")


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return f"a mapping of {type_name(typing.get_args(hint)[1])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    expected = f"config key '{key}' expects {type_name(hint)}, got {type(value).__name__} {value!r}"
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(expected)
        return from_dict(hint, value, prefix=key + ".")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(expected)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(expected)
        (item,) = typing.get_args(hint)
        return [convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(expected)
        key_type, value_type = typing.get_args(hint)
        return {convert(key_type, k, key): convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
        option = next(o for o in typing.get_args(hint) if o is not type(None))
        return convert(option, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(expected)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(expected)
        return value
    if hint is float:
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            return float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(expected)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(expected)
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def from_dict(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise unknown_key_error(cls, prefix, key)
    values = {name: convert(hints[name], raw[name], prefix + name) for name in names if name in raw}
    return cls(**values)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    parser.add_argument("--config", default=default, metavar="PRESET|YAML",
                        help=f"config preset name (launch/configs/NAME.yaml) or YAML path (default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. storage.s3_endpoint_url=http://127.0.0.1:9000")


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    """The resolved config: preset or file, then the command's own flags, then explicit overrides."""
    return load_config(args.config, [*(extra or []), *args.overrides])
