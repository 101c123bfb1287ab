"""Published reference numbers (``results/published.yaml``) and where they sit beside ours.

The file's top-level sections are named after mimbench tasks (``linear_probe``,
``attentive_probe``, ``partial_finetune``, ``detection``, ...); each holds entries with a
``source``, a ``protocol`` (and ``read_from`` where the text was read from a copy) and their
``results``. A result's keys are descriptive (:data:`DESCRIPTIVE_KEYS`: the pretraining method,
the mimbench ``recipe`` or checkpoint format it corresponds to, the ``encoder`` preset, the
pretraining ``epochs``, a ``note``) or metric names of the section's task, so a number under
``attentive_probe`` keyed ``top1`` is the published counterpart of our ``attentive_probe/top1``
column. ``classification`` (SimMIM's system-level table) keeps the paper's column names and is
mapped by :data:`SECTION_COLUMNS`; ``notes`` is prose.

:func:`published_beside` finds, for each leaderboard row, the published results of the same
recipe (for an imported checkpoint: the same checkpoint format) and the same encoder
architecture, and pairs their numbers with our cells; :func:`format_beside_markdown` writes them
as the table under the leaderboard (``mimbench report``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.core.errors import UserError
from harness.core.fsutil import PathLike
from harness.core.records import Record
from harness.leaderboard import Leaderboard

#: The published numbers shipped with the repository.
DEFAULT_PUBLISHED_RESULTS = Path(__file__).resolve().parents[1] / "results" / "published.yaml"

#: Keys of a result that describe it; every other key is a metric (a number).
DESCRIPTIVE_KEYS: tuple[str, ...] = ("pretraining", "recipe", "encoder", "epochs", "note")

#: Sections not named after a task: their metric keys -> our leaderboard column, and their keys
#: that are neither descriptive nor a metric.
SECTION_COLUMNS: dict[str, dict[str, str]] = {
    "classification": {"ft": "finetune/top1", "linear": "linear_probe/top1"},
}
SECTION_INFO_KEYS: dict[str, tuple[str, ...]] = {"classification": ("cost",)}

#: Top-level keys that hold no results.
PROSE_SECTIONS: tuple[str, ...] = ("notes",)

#: Columns a published number is compared with besides its own: MAE's linear probe protocol is
#: what ``linear_probe_faithful`` runs, so its numbers sit beside that column too.
ALSO_COMPARED: dict[str, tuple[str, ...]] = {
    "linear_probe/top1": ("linear_probe_faithful/top1",),
}


class PublishedError(UserError, ValueError):
    """The published-numbers file is malformed (the message names the section, entry and key)."""


@dataclass(frozen=True)
class PublishedResult:
    """One published row: what was evaluated, by which source and protocol, and its numbers.

    Attributes:
        section: The file's section (a task name, or ``classification``).
        source: The paper / repository file and table.
        protocol: How the numbers were obtained.
        read_from: How the text was read, where not from the source itself.
        pretraining: The method as the source names it.
        recipe: The mimbench recipe or checkpoint format it corresponds to (None: none).
        encoder: A mimbench encoder preset, or the source's model in words.
        epochs: Pretraining epochs, where the source gives them.
        note: What else tells this row apart (masking variant, code base, resolution).
        metrics: Our leaderboard column (``task/metric``) -> the published value.
    """

    section: str
    source: str
    protocol: str
    read_from: str | None
    pretraining: str
    recipe: str | None
    encoder: str
    epochs: int | None
    note: str | None
    metrics: dict[str, float]

    def describe(self) -> str:
        """``MAE, vit_base_16, 1600 ep (from the CAE paper)``."""
        text = f"{self.pretraining}, {self.encoder}"
        if self.epochs is not None:
            text += f", {self.epochs} ep"
        return text + (f" ({self.note})" if self.note else "")


def load_published_results(path: PathLike = DEFAULT_PUBLISHED_RESULTS) -> list[PublishedResult]:
    """Reads every published result of the file, in file order.

    Args:
        path: A YAML file in the format of ``results/published.yaml``.

    Raises:
        PublishedError: The file is not valid YAML or breaks the format (a section that is not a
            list of entries, an entry without a source, protocol or results, a result without an
            encoder or pretraining, a metric that is not a number, a result with no metric).
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise PublishedError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PublishedError(f"{p}: expected a mapping of sections (task names) to entry lists")
    results: list[PublishedResult] = []
    for section, entries in data.items():
        if section in PROSE_SECTIONS:
            continue
        if not isinstance(entries, list) or not entries:
            raise PublishedError(f"{p}: section '{section}' must be a non-empty list of entries")
        for i, entry in enumerate(entries):
            results.extend(_entry_results(entry, str(section), f"{p}: {section}[{i}]"))
    return results


def _entry_results(entry: Any, section: str, where: str) -> list[PublishedResult]:
    """The results of one entry of ``section``, checked."""
    if not isinstance(entry, dict):
        raise PublishedError(f"{where}: an entry must be a mapping with source, protocol, results")
    unknown = sorted(set(entry) - {"source", "read_from", "protocol", "results"})
    if unknown:
        raise PublishedError(f"{where}: unknown key(s) {unknown}; an entry has source, "
                             "read_from, protocol and results")
    for key in ("source", "protocol"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise PublishedError(f"{where}: '{key}' must be a non-empty text (where the numbers "
                                 "come from, and how they were obtained)")
    rows = entry.get("results")
    if not isinstance(rows, list) or not rows:
        raise PublishedError(f"{where}: 'results' must be a non-empty list")
    return [_result(row, section, entry, f"{where}.results[{j}]") for j, row in enumerate(rows)]


def _result(row: Any, section: str, entry: dict[str, Any], where: str) -> PublishedResult:
    """One result row, checked; its metric keys become leaderboard columns."""
    if not isinstance(row, dict):
        raise PublishedError(f"{where}: a result must be a mapping")
    for key in ("pretraining", "encoder"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise PublishedError(f"{where}: '{key}' must be given (a text)")
    for key in ("recipe", "note"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise PublishedError(f"{where}: '{key}' must be a text")
    epochs = row.get("epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)):
        raise PublishedError(f"{where}: 'epochs' must be a whole number, got {epochs!r}")
    columns = SECTION_COLUMNS.get(section)
    info = SECTION_INFO_KEYS.get(section, ())
    metrics: dict[str, float] = {}
    for key, value in row.items():
        if key in DESCRIPTIVE_KEYS or key in info:
            continue
        if columns is not None and key not in columns:
            raise PublishedError(f"{where}: '{key}' is not a metric of section '{section}' "
                                 f"(known: {sorted(columns)})")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise PublishedError(f"{where}: metric '{key}' must be a number, got {value!r}")
        metrics[columns[key] if columns is not None else f"{section}/{key}"] = float(value)
    if not metrics:
        raise PublishedError(f"{where}: no number (a result needs at least one metric; leave a "
                             "number that no source gives out rather than writing a placeholder)")
    return PublishedResult(
        section=section, source=entry["source"].strip(), protocol=" ".join(entry["protocol"].split()),
        read_from=" ".join(entry["read_from"].split()) if entry.get("read_from") else None,
        pretraining=row["pretraining"], recipe=row.get("recipe"), encoder=row["encoder"],
        epochs=epochs, note=row.get("note"), metrics=metrics,
    )


# --------------------------------------------------------------------------- beside ours


@dataclass(frozen=True)
class Beside:
    """A published number beside one of our leaderboard cells.

    Attributes:
        row: The leaderboard row label.
        column: Our ``task/metric`` column.
        ours: Our mean over seeds.
        published: The published result.
        value: Its number for ``column``.
    """

    row: str
    column: str
    ours: float
    published: PublishedResult
    value: float

    @property
    def diff(self) -> float:
        """``ours - published``."""
        return self.ours - self.value

    @property
    def value_text(self) -> str:
        """The published number with the decimals its sources print (``68.0``, ``69.32``)."""
        text = f"{self.value:.2f}"
        return text[:-1] if text.endswith("0") else text


def record_recipe(record: Record) -> str | None:
    """The recipe an encoder comes from: the pretraining recipe's name, or, for an imported
    checkpoint, its format (the import report's ``family``: ``mae``, ``ijepa``, ...)."""
    if record.recipe:
        name = record.recipe.get("name")
        return str(name) if name else None
    if record.encoder.source == "checkpoint":
        family = (record.details.get("import") or {}).get("family")
        return str(family) if family else None
    return None


def row_identities(lb: Leaderboard, records: Iterable[Record]) -> dict[str, tuple[str, str]]:
    """Row label -> (recipe, architecture) for the rows whose counted records agree on one
    recipe and one architecture (rows without a recipe are left out)."""
    seen: dict[str, set[tuple[str | None, str]]] = {}
    for record in records:
        label = lb.row_of.get(record.run_id)
        if label is not None:
            seen.setdefault(label, set()).add((record_recipe(record), record.encoder.arch))
    return {
        label: (recipe, arch)
        for label, found in seen.items()
        if len(found) == 1
        for recipe, arch in found
        if recipe is not None
    }


def published_beside(
    lb: Leaderboard, records: Iterable[Record], published: Sequence[PublishedResult]
) -> list[Beside]:
    """The published numbers of the rows' recipe and encoder beside our cells.

    A published result matches a row when its ``recipe`` is the row's (pretraining recipe, or
    format of the imported checkpoint) and its ``encoder`` is the row's architecture label
    (``vit_base_16``; a label with changed values, ``vit_base_16(depth=6)``, matches nothing).
    Each of its metrics sits beside the same column (and :data:`ALSO_COMPARED`) where the row has
    a value. Ordered by row, then column, then file order.

    Args:
        lb: The leaderboard.
        records: The records behind it.
        published: :func:`load_published_results`.
    """
    identities = row_identities(lb, records)
    out: list[Beside] = []
    for label in lb.encoders:
        if label not in identities:
            continue
        recipe, arch = identities[label]
        matches = [r for r in published if r.recipe == recipe and r.encoder == arch]
        for column in lb.columns:
            if int(lb.n.at[label, column]) == 0:
                continue
            ours = float(lb.mean.at[label, column])
            for result in matches:
                for key, value in result.metrics.items():
                    if column == key or column in ALSO_COMPARED.get(key, ()):
                        out.append(Beside(label, column, ours, result, value))
    return out


def format_beside_markdown(beside: Sequence[Beside], lb: Leaderboard) -> str:
    """The published numbers beside ours as a markdown section ("" when there are none)."""
    if not beside:
        return ""
    lines = [
        "## Published numbers beside ours",
        "",
        "| encoder | column | ours | published | ours - published | published row | source |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for b in beside:
        cells = [lb.row(b.row).encoder, b.column, f"{b.ours:.2f}", b.value_text,
                 f"{b.diff:+.2f}", b.published.describe(), b.published.source]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        "Published rows of the same recipe (or imported checkpoint format) and encoder "
        "architecture, from results/published.yaml (each entry names its protocol). They were "
        "obtained with their papers' data, schedules and protocols; ours - published measures "
        "the distance, not which is right.",
    ]
    return "\n".join(lines) + "\n"
