"""Sweeps: one config file that stands for a family of configs (an ablation table).

A sweep file is an ordinary config (usually a suite) with a top-level ``sweep:`` block::

    kind: suite
    ...                                   # the base config: the table's default row
    sweep:
      name: mae_decoder_depth             # optional, for reports
      table: MAE Table 1a                 # optional, which published table it reproduces
      mode: grid                          # grid (every combination) or zip (row i of every axis)
      prefix: encoders.0.pretrain         # optional, prepended to every axis key
      axes:                               # key path -> list of values, in table order
        recipe.head.depth: [1, 2, 4, 8, 12]
      names:                              # optional short tag names (default: the last key)
        recipe.head.depth: depth

An axis key is a dotted path into the config (list items by index: ``encoders.0...``); a value is
a scalar, a list, or a mapping deep-merged into what the base config holds at that path (so one
axis can change several keys at once: ``recipe.target: [{type: pixels}, {type: tokens}]``).
Keys of the ``sweep:`` block and axis paths are checked against the config schema: an unknown
one is rejected with its path and a did-you-mean. Every expanded config is validated.

:func:`expand_sweep` returns ``(tags, config)`` pairs: ``tags`` maps each axis' short name to the
row's value, in axis order; the config no longer holds the ``sweep:`` block. The harness runs
each config as it would run the file without the block.

:func:`load_config_or_sweep` is the one loader of ``mimbench validate``, ``run``, ``plan`` and
``status``: a file with a ``sweep:`` block becomes :func:`sweep_rows`, which expands and validates
every row up front (a bad row rejects the sweep before anything runs) and checks that the rows
share one suite directory; each row's records carry a :class:`harness.core.records.SweepInfo` (sweep
name, table, row index, tags), from which :mod:`harness.ablation` rebuilds the table.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import downstream  # noqa: F401  (registers every task and its config schema)
from harness.core.config import (
    CONFIG_KINDS,
    ConfigError,
    StrictModel,
    SuiteConfig,
    apply_overrides,
    deep_merge,
    load_yaml_with_extends,
    task_config_classes,
    to_plain,
    validate_config,
)
from harness.core.records import SweepInfo
from harness.core.registry import did_you_mean

SWEEP_KEYS = ("name", "table", "description", "mode", "prefix", "axes", "names")


class SweepError(ConfigError):
    """A sweep block is malformed; the message names the key path."""


def expand_sweep(
    raw: dict[str, Any], validate: bool = True
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Expand a config holding a ``sweep:`` block into one config per table row.

    Args:
        raw: The config mapping (``extends`` already merged). Without a ``sweep:`` block the
            result is the config itself with empty tags.
        validate: Validate every expanded config with its schema (``kind``).

    Returns:
        ``[(tags, config), ...]`` in table order (grid: the first axis varies slowest).

    Raises:
        SweepError: Unknown or malformed sweep keys, unknown axis paths, unequal zip lengths, or an
            expanded config that does not validate (the message names the row).
    """
    if "sweep" not in raw:
        return [({}, copy.deepcopy(raw))]
    sweep = raw["sweep"]
    base = {k: v for k, v in raw.items() if k != "sweep"}
    if not isinstance(sweep, dict):
        raise SweepError(
            "sweep: must be a mapping with 'axes' (and optionally mode, prefix, names)"
        )
    for key in sweep:
        if key not in SWEEP_KEYS:
            hint = did_you_mean(str(key), list(SWEEP_KEYS))
            raise SweepError(
                f"sweep.{key}: unknown key;{hint} allowed keys: {', '.join(SWEEP_KEYS)}"
            )
    mode = sweep.get("mode", "grid")
    if mode not in ("grid", "zip"):
        hint = did_you_mean(str(mode), ["grid", "zip"])
        raise SweepError(f"sweep.mode: '{mode}' is not a mode;{hint} use grid or zip")
    axes = sweep.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise SweepError("sweep.axes: give at least one 'key.path: [values]' entry")
    prefix = sweep.get("prefix") or ""
    names = sweep.get("names") or {}
    if not isinstance(names, dict):
        raise SweepError("sweep.names: must map axis keys to short names")
    for key in names:
        if key not in axes:
            hint = did_you_mean(str(key), list(axes))
            raise SweepError(f"sweep.names.{key}: not an axis;{hint} axes: {', '.join(axes)}")

    kind = base.get("kind")
    model = CONFIG_KINDS.get(kind) if isinstance(kind, str) else None
    paths: list[list[str]] = []
    for key, values in axes.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        parts = [p for p in full.split(".") if p]
        if not isinstance(values, list) or not values:
            raise SweepError(f"sweep.axes.{key}: must be a non-empty list of values")
        if model is not None:
            check_path(model, parts, base, f"sweep.axes.{key}")
        paths.append(parts)
    lengths = [len(v) for v in axes.values()]
    if mode == "zip" and len(set(lengths)) > 1:
        detail = ", ".join(f"{k}: {n}" for k, n in zip(axes, lengths, strict=True))
        raise SweepError(f"sweep.axes: zip mode needs lists of equal length ({detail})")

    tag_names = [str(names.get(k, str(k).split(".")[-1])) for k in axes]
    if len(set(tag_names)) < len(tag_names):
        raise SweepError(f"sweep.names: tag names must differ, got {tag_names}: set sweep.names")
    rows = itertools.product(*axes.values()) if mode == "grid" else zip(*axes.values(), strict=True)
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for row in rows:
        cfg = copy.deepcopy(base)
        for parts, value in zip(paths, row, strict=True):
            set_path(cfg, parts, value)
        tags = dict(zip(tag_names, (copy.deepcopy(v) for v in row), strict=True))
        if validate:
            try:
                validate_config(cfg, source=f"sweep row {variant_name(tags)}")
            except ConfigError as exc:
                raise SweepError(str(exc)) from None
        out.append((tags, cfg))
    return out


def load_sweep(
    path: str | Path, validate: bool = True
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Read a sweep file (with its ``extends`` parent merged) and expand it."""
    return expand_sweep(load_yaml_with_extends(path), validate=validate)


@dataclass
class SweepRow:
    """One row of a sweep, ready to run: its validated suite and what its records carry.

    Attributes:
        info: The row's place in the sweep (stored in every record of the row).
        config: The row's suite (the base config with the row's axis values set).
    """

    info: SweepInfo
    config: SuiteConfig

    @property
    def label(self) -> str:
        """The row's file-name-safe name, e.g. ``depth=8``."""
        return variant_name(self.info.tags)


def sweep_rows(raw: dict[str, Any], source: str = "sweep") -> list[SweepRow]:
    """Expand a suite holding a ``sweep:`` block into validated rows that share one output
    directory, so that one report covers the whole table.

    Every row is validated before any is returned: a bad row rejects the whole sweep before
    anything runs.

    Args:
        raw: The config mapping (``extends`` merged, ``--set`` overrides applied).
        source: Where the mapping came from, for error messages (the file path).

    Raises:
        SweepError: The sweep or one of its rows is invalid, the config is not a suite, or the
            rows would write to different directories (a swept ``name`` or ``output_dir``).
    """
    if not isinstance(raw.get("sweep"), dict):
        raise SweepError(f"{source}: no 'sweep:' block (a mapping with 'axes') to expand")
    if raw.get("kind") != "suite":
        raise SweepError(
            f"{source}: a sweep runs as a suite: set 'kind: suite' (got kind {raw.get('kind')!r})"
        )
    try:
        expanded = expand_sweep(raw, validate=False)
    except SweepError as exc:
        raise SweepError(f"{source}: {exc}") from None
    block = raw["sweep"]
    seen: dict[str, int] = {}
    for i, (tags, _) in enumerate(expanded):
        j = seen.setdefault(json.dumps(tags, sort_keys=True), i)
        if j != i:
            raise SweepError(
                f"{source}: sweep.axes: rows {j} and {i} have the same axis values "
                f"({variant_name(tags)}); each row of a table needs its own values"
            )
    suites = []
    for tags, cfg in expanded:
        try:
            suites.append(validate_config(cfg, source=f"{source}: sweep row {variant_name(tags)}"))
        except ConfigError as exc:
            raise SweepError(str(exc)) from None
    dirs = {(s.output_dir, s.name) for s in suites if isinstance(s, SuiteConfig)}
    if len(dirs) > 1:
        raise SweepError(
            f"{source}: sweep.axes: the rows would write to {len(dirs)} suite directories; do not "
            "sweep 'name' or 'output_dir' (all rows of a sweep share one output directory)"
        )
    name = str(block.get("name") or suites[0].name)  # type: ignore[attr-defined]
    table = block.get("table")
    axes = list(expanded[0][0])
    rows = []
    for i, ((tags, _), suite) in enumerate(zip(expanded, suites, strict=True)):
        assert isinstance(suite, SuiteConfig)
        info = SweepInfo(name=name, table=str(table) if table else None,
                         mode=block.get("mode", "grid"), axes=axes, row=i,
                         rows=len(expanded), tags=tags)
        rows.append(SweepRow(info=info, config=suite))
    return rows


def load_config_or_sweep(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> StrictModel | list[SweepRow]:
    """Read a config file (``extends`` merged, ``--set`` overrides applied): the rows of its
    sweep when it has a ``sweep:`` block (every row validated), else the validated config.

    Raises:
        ConfigError: The file, an override, the config or a sweep row is invalid.
    """
    raw = apply_overrides(load_yaml_with_extends(path), overrides)
    if "sweep" in raw:
        return sweep_rows(raw, source=str(path))
    return validate_config(raw, source=str(path))


def sweep_base(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StrictModel | None:
    """The validated base config of a sweep file (the file without its ``sweep:`` block), or
    None when the base alone does not validate (every row sets a value it lacks)."""
    raw = apply_overrides(load_yaml_with_extends(path), overrides)
    raw.pop("sweep", None)
    try:
        return validate_config(raw, source=str(path))
    except ConfigError:
        return None


#: How :func:`format_sweep` shows a key that one of two configs does not have.
UNSET = "(unset)"


def flatten_config(node: Any, path: str = "") -> dict[str, Any]:
    """``{dotted.key: leaf}`` of a plain config: mappings by key, lists by index; an empty
    mapping or list is a leaf itself."""
    if isinstance(node, dict) and node:
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in node.items()]
    elif isinstance(node, list) and node:
        items = [(str(i), v) for i, v in enumerate(node)]
    else:
        return {path: node}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten_config(value, f"{path}.{key}" if path else key))
    return out


def config_changes(base: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted.key: (base value, other value)}`` for every leaf of :func:`flatten_config`
    that differs between two plain configs (:data:`UNSET` where one has no such key)."""
    a, b = flatten_config(base), flatten_config(other)
    keys = [*a, *(k for k in b if k not in a)]
    return {k: (a.get(k, UNSET), b.get(k, UNSET)) for k in keys
            if k not in a or k not in b or a[k] != b[k]}  # fmt: skip


def format_sweep(rows: list[SweepRow], base: StrictModel | None) -> str:
    """The rows of a sweep as YAML comment lines (what ``mimbench validate`` prints after the
    base config): each row's index, label and resolved keys that differ from ``base`` (from
    row 0 when ``base`` is None), as ``key: old -> new`` with values in JSON."""
    info = rows[0].info
    table = f" ({info.table})" if info.table else ""
    ref = to_plain(base if base is not None else rows[0].config)
    what = "the config above" if base is not None else (
        "row 0 (shown above: the base config alone does not validate)")
    lines = [f"# sweep '{info.name}'{table}: {info.mode} over {', '.join(info.axes)}, "
             f"{len(rows)} rows; each row is {what} with:"]  # fmt: skip
    for row in rows:
        changes = config_changes(ref, to_plain(row.config))
        lines.append(f"# row {row.info.row}: {row.label}" + ("" if changes else " (no change)"))
        lines += [f"#     {key}: {_shown(old)} -> {_shown(new)}"
                  for key, (old, new) in changes.items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    """A value on one line: JSON, or :data:`UNSET`."""
    return value if value is UNSET else json.dumps(value, default=str)


def tag_text(value: Any) -> str:
    """A short text of a tag value (mapping values joined by ``-``), for labels and tables."""
    if isinstance(value, dict):
        return "-".join(tag_text(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(tag_text(v) for v in value) + "]"
    return str(value)


def row_encoder_name(encoder: str, info: SweepInfo | None) -> str:
    """The name an encoder of a sweep row has in records and leaderboards:
    ``<encoder>@<row label>`` (each row is its own leaderboard entry)."""
    return encoder if info is None else f"{encoder}@{variant_name(info.tags)}"


def variant_name(tags: dict[str, Any]) -> str:
    """A file-name-safe name of a row, e.g. ``depth=8,dim=512``."""

    text = ",".join(f"{k}={tag_text(v)}" for k, v in tags.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=\-]", "_", text)


def set_path(cfg: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``value`` at a key path, creating mappings on the way; a mapping value is deep-merged
    into a mapping already there."""
    node: Any = cfg
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = deep_merge(node[last], value)
    else:
        node[last] = copy.deepcopy(value)


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``list[X]``), and whether
    it sits in a list."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple):
        inner, _ = _model_of(args[0]) if args else (None, False)
        return inner, True
    if args and origin is not None:  # Union / Optional / Annotated / SerializeAsAny
        for a in args:
            m, in_list = _model_of(a)
            if m is not None or in_list:
                return m, in_list
        return None, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def check_path(model: type[BaseModel], parts: list[str], data: Any, where: str) -> None:
    """Check a key path against the schema; unknown keys raise :class:`SweepError` naming
    ``where`` and the path. Checking stops at fields without a fixed schema (task entries,
    free mappings)."""
    node_model: type[BaseModel] | None = model
    node_data = data
    walked: list[str] = []
    i = 0
    while i < len(parts) and node_model is not None:
        part = parts[i]
        walked.append(part)
        fields = node_model.model_fields
        if part not in fields:
            hint = did_you_mean(part, list(fields))
            raise SweepError(
                f"{where}: '{'.'.join(walked)}' is not a config key;{hint} "
                f"'{node_model.__name__}' has: {', '.join(fields)}"
            )
        inner, in_list = _model_of(fields[part].annotation)
        node_data = node_data.get(part) if isinstance(node_data, dict) else None
        i += 1
        if in_list and i < len(parts):
            idx = parts[i]
            walked.append(idx)
            if not idx.lstrip("-").isdigit():
                raise SweepError(
                    f"{where}: '{'.'.join(walked)}': '{part}' is a list, index it by number"
                )
            if isinstance(node_data, list):
                if not -len(node_data) <= int(idx) < len(node_data):
                    raise SweepError(
                        f"{where}: '{'.'.join(walked)}': index {idx} out of range "
                        f"(the base config's '{part}' has {len(node_data)} items)"
                    )
                node_data = node_data[int(idx)]
            else:
                node_data = None
            i += 1
        node_model = inner if inner is not None and issubclass(inner, StrictModel) else None
        if node_model is not None and node_model.__name__ == "TaskConfig":
            node_model = _task_model(node_data)  # polymorphic: the entry's name picks the schema


def _task_model(entry: Any) -> type[BaseModel] | None:
    """The config class of a task entry (by its ``name``), or None when it cannot be told."""
    name = entry.get("name") if isinstance(entry, dict) else entry
    if not isinstance(name, str):
        return None

    return task_config_classes().get(name)
