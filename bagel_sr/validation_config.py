"""Settings of validation inside BAGEL's training loop: one dataclass, one ``--bagel_sr_val_<field>`` flag each.

Validation is off (the stock loop, bit for bit) unless ``datasets`` names at least one built set.  Every
``every`` optimizer steps (and at the first step) the one-step restoration of ``images`` fixed val images is
measured (:mod:`bagel_sr.patches.validation`).
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from .restoration import ONE_STEP_START_T

VAL_PREFIX = "bagel_sr_val_"


@dataclass
class ValidationConfig:
    """What to validate on, how often, how many images, from which flow time, with which weights."""

    datasets: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated dataset YAMLs built by `python -m bagel_sr.data build` whose val split is measured "
                "during training (unset: no validation)."})
    every: int = field(default=500, metadata={"help": "Validate every this many optimizer steps (and at the first step)."})
    images: int = field(default=32, metadata={
        "help": "Val images measured each time: a fixed, seeded subset of the val split (unset: at most the split's size)."})
    start_t: float = field(default=ONE_STEP_START_T, metadata={
        "help": "Flow time the one-step restoration starts from (the input noised to it, one Euler step to 0)."})
    ema: bool = field(default=False, metadata={"help": "Validate the EMA weights instead of the live ones."})
    seed: int = field(default=0, metadata={"help": "Seed of the val subset and of the restoration's noise."})

    def __post_init__(self) -> None:
        self.every, self.images, self.seed = int(self.every), int(self.images), int(self.seed)
        self.start_t = float(self.start_t)
        if isinstance(self.ema, str):
            self.ema = _truth(self.ema)
        self.validate()

    def validate(self) -> "ValidationConfig":
        """Raise ``ValueError`` naming the flag, the value and what is allowed."""
        _check(self.every >= 1, "every", self.every, "an integer >= 1")
        _check(self.images >= 1, "images", self.images, "an integer >= 1")
        _check(0.0 < self.start_t <= 1.0, "start_t", self.start_t, "a flow time in (0, 1]")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.yamls)

    @property
    def yamls(self) -> List[str]:
        return [p.strip() for p in str(self.datasets or "").split(",") if p.strip()]

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "ValidationConfig":
        """Build from ``{"bagel_sr_val_every": "100", ...}`` (flag names, string or typed values; None = default)."""
        kwargs = {f.name: values[val_flag(f.name)] for f in dataclasses.fields(cls)
                  if values.get(val_flag(f.name)) is not None}
        return cls(**kwargs)

    def describe(self) -> str:
        return " ".join(f"--{val_flag(f.name)} {getattr(self, f.name)}" for f in dataclasses.fields(self))


def val_flag(field_name: str) -> str:
    """The CLI flag (without ``--``) of a field: ``bagel_sr_val_<field>``."""
    return VAL_PREFIX + field_name


def val_flag_help() -> dict:
    """``{flag: help}`` of every validation flag, in field order."""
    return {val_flag(f.name): f.metadata["help"] + f" (default {f.default})" for f in dataclasses.fields(ValidationConfig)}


def _truth(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"--{val_flag('ema')}: got {text!r}; allowed: True or False.")
    return value in ("true", "1", "yes")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"--{val_flag(name)}: got {value!r}; allowed: {allowed}.")
