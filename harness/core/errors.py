"""Errors caused by user input (a config, a path, a checkpoint). The CLI prints them as one
clear message and exits with status 2 instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message tells the user what to fix."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, unsafe to load, or does not fit the encoder."""
