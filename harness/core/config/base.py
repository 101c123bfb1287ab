"""The base of every schema (:class:`StrictModel`), the config error, and :func:`deep_merge`."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from harness.core.errors import UserError
from harness.core.registry import did_you_mean


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


class StrictModel(BaseModel):
    """Base for all schemas: unknown keys are rejected with a did-you-mean."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    #: Fields left out of :func:`hashed_dump` while they hold their default: fields added after
    #: records were written, so that those records' config hashes still match.
    HASH_OMIT_DEFAULTS: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    hint = did_you_mean(str(key), allowed)
                    raise ValueError(
                        f"unknown key '{key}';{hint} allowed keys: {', '.join(allowed)}"
                    )
        return data


def deep_merge(base: Any, override: Any) -> Any:
    """Merge ``override`` over ``base``: dicts merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            out[key] = deep_merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def omit_at_default(model: BaseModel, dumped: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``dumped`` (a ``model_dump`` of ``model``) less the fields ``names`` that hold their schema
    default: keys added after configs were hashed stay out of dumps until set, so those configs
    keep their hashes (used by the schemas' ``model_serializer``)."""
    fields = type(model).model_fields
    for name in names:
        if getattr(model, name) == fields[name].get_default(call_default_factory=True):
            dumped.pop(name, None)
    return dumped
