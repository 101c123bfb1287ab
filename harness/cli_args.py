"""Argument types and the parser class of the ``mimbench`` command line (shared by
:mod:`harness.cli` and the commands that build their own options, e.g. :mod:`harness.bench`):
bad values are usage errors, printed as one line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from harness.core.config import ENCODER_PRESETS
from harness.core.errors import UserError
from harness.core.registry import did_you_mean


class UsageError(UserError):
    """A command line that does not parse: an unknown command or option, a bad value."""


class CliParser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`UsageError` (printed as one line by
    :func:`harness.cli.main`) and whose registry-made help texts are computed only when help is
    printed."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("mimbench").strip()  # "" for the top level
        raise UsageError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")

    def format_help(self) -> str:
        for action in self._actions:
            text = getattr(action, "lazy_help", None)
            if text is not None:
                action.help = text().replace("%", "%%")
        return super().format_help()


def lazy_help(action: argparse.Action, text: Callable[[], str]) -> None:
    """Give ``action`` a help text made from a registry when help is printed (the task and
    masking registries import torch, which every other use of the parser can skip)."""
    action.help = "(listed by --help)"
    action.lazy_help = text  # type: ignore[attr-defined]


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high} (got {value})")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be at least 0 seconds (got {text})")
    return value


def encoder_preset(text: str) -> str:
    """An argparse ``type``: a registered encoder preset (did-you-mean on a typo)."""
    if text not in ENCODER_PRESETS:
        raise argparse.ArgumentTypeError(
            f"unknown encoder preset '{text}';{did_you_mean(text, list(ENCODER_PRESETS))} "
            f"known: {', '.join(ENCODER_PRESETS)}"
        )
    return text


def preset_help(what: str) -> str:
    """``what`` followed by the registered encoder presets."""
    return f"{what}: {', '.join(ENCODER_PRESETS)}"
