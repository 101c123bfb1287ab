"""Reading config files: YAML with one ``extends:`` parent, ``--set a.b=c`` overrides, validation
by the schema a file's ``kind:`` names, and the dumps that ``mimbench validate`` prints and that
runs store and hash."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from harness.core.config.base import ConfigError, StrictModel, deep_merge
from harness.core.config.suite import SuiteConfig
from harness.core.config.train import PretrainConfig
from harness.core.registry import did_you_mean

CONFIG_KINDS: dict[str, type[StrictModel]] = {"suite": SuiteConfig, "pretrain": PretrainConfig}


def load_yaml_with_extends(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, merging it over its single optional ``extends:`` parent.

    The parent path is relative to the file that names it. Chains are allowed, cycles are not.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"'extends' cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(
            f"{path}: 'extends' takes one file path (a string); multiple parents are not supported"
        )
    base = load_yaml_with_extends(path.parent / parent, (*_seen, path))
    return deep_merge(base, data)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; values are parsed as YAML (numbers, bools, lists).

    List elements are addressed by index: ``tasks.0.epochs=10``.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[: i + 1], item, create=True)
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(node, last, item)
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override '{item}': '{'.'.join(parts[:-1])}' is not a mapping")
    return data


def _index(node: list[Any], part: str, item: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override '{item}': '{part}' is not a valid index of a list of {len(node)}")
    return int(part)


def _child(node: Any, part: str, path: list[str], item: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, item)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            if not create:
                raise ConfigError(f"override '{item}': no key '{'.'.join(path)}'")
            node[part] = {}
        return node[part]
    raise ConfigError(f"override '{item}': '{'.'.join(path[:-1])}' is not a mapping")


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: path.to.key: message``."""
    lines = [f"{source}: invalid config ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], source: str = "config", kind: str | None = None) -> StrictModel:
    """Validate a raw mapping as the schema named by ``kind`` or by its ``kind:`` key."""
    kind = kind or data.get("kind")
    if kind is None:
        raise ConfigError(
            f"{source}: missing 'kind:' at the top level; use one of: {', '.join(CONFIG_KINDS)}"
        )
    if kind not in CONFIG_KINDS:
        hint = did_you_mean(str(kind), list(CONFIG_KINDS))
        raise ConfigError(f"{source}: unknown kind '{kind}';{hint} use one of: {', '.join(CONFIG_KINDS)}")
    try:
        return CONFIG_KINDS[kind].model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), kind: str | None = None
) -> StrictModel:
    """Load, merge ``extends``, apply overrides and validate a config file."""
    data = apply_overrides(load_yaml_with_extends(path), overrides)
    return validate_config(data, source=str(path), kind=kind)


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (what ``mimbench validate`` prints)."""
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def hashed_dump(cfg: StrictModel) -> dict[str, Any]:
    """``model_dump(mode="json")`` less the fields of ``cfg.HASH_OMIT_DEFAULTS`` that hold their
    default (what run configs store and hash: see :func:`harness.runner.run_config_for`)."""
    fields = type(cfg).model_fields
    omit = {k for k in cfg.HASH_OMIT_DEFAULTS if getattr(cfg, k) == fields[k].default}
    return cfg.model_dump(mode="json", exclude=omit or None)


def to_plain(cfg: BaseModel) -> dict[str, Any]:
    """JSON-compatible dict of a config (tuples become lists)."""
    return cfg.model_dump(mode="json")
