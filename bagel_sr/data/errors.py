"""Exceptions raised by the dataset builder (user errors share :class:`bagel_sr.errors.UserError`)."""
from __future__ import annotations

from typing import Any

from ..errors import RunFailed, UserError


class ConfigError(UserError, ValueError):
    """A build-config value is invalid. The message names the YAML key, the value and what is allowed."""

    @classmethod
    def bad_value(cls, key: str, value: Any, allowed: str) -> "ConfigError":
        return cls(f"config key '{key}' has value {value!r}; allowed: {allowed}")


class SourceError(RuntimeError):
    """One input source (file, DICOM series, volume) cannot be turned into pairs; it is reported and skipped."""


class OutputExistsError(UserError, RuntimeError):
    """The output directory already holds a build (or foreign files) and overwriting was not requested."""


class LeakError(UserError, RuntimeError):
    """One subject would land in two splits (train and held-out): the build is refused."""


class BuildError(RunFailed, RuntimeError):
    """The build ran but produced no usable pairs (every file skipped or failed; see report.json)."""
