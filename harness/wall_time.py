"""Accuracy beside wall time: one table of top-1 and seconds per (encoder, task).

The leaderboard (:mod:`harness.leaderboard`) shows what each protocol reads; this table adds
what each reading cost, so protocols can be compared on both (issue 14: linear vs attentive vs
partial fine-tuning vs kNN side by side, with wall times). It is built from the same records the
leaderboard counts (newest task versions, one record per run, ok runs only) and the same row
labels, so its top-1 values are the leaderboard's.

A metric's seconds are the record's ``duration_s`` (the task's ``run``, from the encoder handed
over to the metrics returned), unless the task timed its metrics separately: a record whose
``details.metric_seconds`` maps a metric to seconds (partial fine-tuning: one fine-tuning per k)
uses that. Both are averaged over seeds like the metric. A record that reused another run's
result (``details.reused_from``) costs nothing itself and is left out of the seconds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import pandas as pd

from harness.core.records import Record
from harness.leaderboard import Leaderboard, leaderboard

#: Long-form columns of :func:`wall_time_frame`.
COLUMNS: tuple[str, ...] = ("encoder", "task", "metric", "value", "seconds", "n")


def metric_seconds(record: Record, metric: str) -> float | None:
    """Wall seconds behind ``metric`` of ``record``: its ``details.metric_seconds`` entry, else
    the record's duration; None for a reused result or a record without a duration."""
    if "reused_from" in record.details:
        return None
    per_metric = record.details.get("metric_seconds") or {}
    if metric in per_metric:
        return float(per_metric[metric])
    return None if record.duration_s is None else float(record.duration_s)


def _wanted(name: str, metric: str) -> bool:
    """``metric`` itself or one of its variants (``top1`` -> ``top1_k2``, ``top1_best_layer``)."""
    return name == metric or name.startswith(metric + "_")


def wall_time_frame(
    records: Iterable[Record], metric: str = "top1", lb: Leaderboard | None = None
) -> pd.DataFrame:
    """One row per (leaderboard row, task, metric) whose name is ``metric`` or starts with
    ``metric_``: the leaderboard's mean value and the mean wall seconds over the ok runs.

    Args:
        records: Run records (as for :func:`harness.leaderboard.leaderboard`).
        metric: The metric (and its ``metric_*`` variants) to show.
        lb: The leaderboard of ``records`` when already built.

    Returns:
        A frame with :data:`COLUMNS`, in the leaderboard's row order, then task and metric as
        the records list them; ``seconds`` is NaN where no run was timed.
    """
    records = list(records)
    lb = leaderboard(records) if lb is None else lb
    seconds: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    order: dict[tuple[str, str, str], int] = {}
    for record in records:
        label = lb.row_of.get(record.run_id)
        if label is None or record.status != "ok":
            continue
        for name in record.metrics:
            if not _wanted(name, metric):
                continue
            key = (label, record.task.name, name)
            order.setdefault(key, len(order))
            s = metric_seconds(record, name)
            if s is not None:
                seconds[key].append(s)
    rows = []
    for key in sorted(order, key=lambda k: (lb.encoders.index(k[0]), k[1], order[k])):
        label, task, name = key
        column = f"{task}/{name}"
        value = float(lb.mean.loc[label, column]) if column in lb.mean.columns else math.nan
        times = seconds.get(key, [])
        rows.append({"encoder": label, "task": task, "metric": name, "value": value,
                     "seconds": sum(times) / len(times) if times else math.nan,
                     "n": int(lb.n.loc[label, column]) if column in lb.n.columns else 0})  # fmt: skip
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _seconds_text(s: float) -> str:
    if math.isnan(s):
        return "–"
    return f"{s:.0f}" if s >= 10 else f"{s:.1f}"


def format_wall_time_markdown(frame: pd.DataFrame) -> str:
    """``frame`` side by side: one line per (task, metric), a value and a seconds column per
    encoder (``–`` where missing)."""
    encoders = list(dict.fromkeys(frame["encoder"]))
    header = ["task", "metric"]
    for enc in encoders:
        header += [f"{enc}", f"{enc} s"]
    lines = ["| " + " | ".join(header) + " |",
             "| --- | --- |" + " ---: |" * (2 * len(encoders))]  # fmt: skip
    cells = {(r.encoder, r.task, r.metric): r for r in frame.itertuples(index=False)}
    keys = list(dict.fromkeys(zip(frame["task"], frame["metric"], strict=True)))
    for task, name in sorted(keys, key=lambda k: (k[0], keys.index(k))):
        line = [task, name]
        for enc in encoders:
            row = cells.get((enc, task, name))
            if row is None:
                line += ["–", "–"]
            else:
                value = "–" if math.isnan(row.value) else f"{row.value:.2f}"
                line += [value, _seconds_text(row.seconds)]
        lines.append("| " + " | ".join(line) + " |")
    lines += ["", "Values: the leaderboard's (mean over seeds); s: wall seconds of the run "
              "that produced the value (mean over seeds)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def format_wall_time_csv(frame: pd.DataFrame) -> str:
    """``frame`` as long-form CSV (:data:`COLUMNS`)."""
    return frame.to_csv(index=False, float_format="%.4f")
