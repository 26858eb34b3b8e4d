"""A checkout that already carries its own pixel loss (a research fork): detect it, then take over or stand aside.

Detected from signatures and fields, never from names of forks: ``Bagel.forward`` parameters named
``padded_images`` or holding ``pixel``/``ssim``, and ``TrainingArguments`` fields holding ``pixel``/``ssim``.
``--bagel_sr_host_pixel_loss`` chooses what happens (:data:`HOST_MODES`); the default counts exactly one term.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from bagel_sr.config import PixelLossConfig
from bagel_sr.errors import UserError

HOST_MODES: Dict[str, str] = {
    "off": "bagel-sr's term replaces the checkout's own: the host's pixel/SSIM weights are set to 0 (announced)",
    "keep": "the checkout's own term stays and bagel-sr stands aside (its --pixel_loss_* flags are the host's)",
    "refuse": "stop before training when the checkout carries its own pixel term",
}
DEFAULT_HOST_MODE = "off"
HOST_MODE_FLAG = "--bagel_sr_host_pixel_loss"
_OUR_FIELDS = frozenset(PixelLossConfig().to_flags())


class HostPixelLossError(UserError, RuntimeError):
    """The checkout carries its own pixel term and ``--bagel_sr_host_pixel_loss refuse`` was given."""


def is_pixel_name(name: str) -> bool:
    """A name that belongs to a pixel/SSIM term (``padded_images`` is the ground truth such a forward needs)."""
    return name == "padded_images" or "pixel" in name or "ssim" in name


@dataclass(frozen=True)
class HostPixelLoss:
    """What a checkout's own pixel term consists of: ``forward_args`` of ``Bagel.forward`` and ``fields`` of
    ``TrainingArguments`` (both empty for upstream BAGEL)."""

    forward_args: Tuple[str, ...] = ()
    fields: Tuple[str, ...] = ()

    @property
    def present(self) -> bool:
        return bool(self.forward_args or self.fields)

    @property
    def shared_fields(self) -> Tuple[str, ...]:
        """Host fields spelt like one of our flags (ours win under ``off``; the host's under ``keep``)."""
        return tuple(f for f in self.fields if f in _OUR_FIELDS)

    @property
    def weight_fields(self) -> Tuple[str, ...]:
        """Host fields that switch its term on (``*_weight``); set to 0 when bagel-sr takes over."""
        return tuple(f for f in self.fields if f.endswith("_weight"))

    @property
    def weight_args(self) -> Tuple[str, ...]:
        """``forward`` arguments that switch the host's term on; passed as 0 when bagel-sr takes over."""
        return tuple(a for a in self.forward_args if a.endswith("_weight"))

    def describe(self) -> str:
        parts = []
        if self.forward_args:
            parts.append("Bagel.forward takes " + ", ".join(self.forward_args))
        if self.fields:
            parts.append("TrainingArguments has " + ", ".join(self.fields))
        return "; ".join(parts)


def detect(train_module: Any) -> HostPixelLoss:
    """The pixel term the script's ``Bagel`` and ``TrainingArguments`` already carry (empty for upstream)."""
    forward = getattr(getattr(train_module, "Bagel", None), "forward", None)
    args = tuple(n for n in inspect.signature(forward).parameters if is_pixel_name(n)) if forward else ()
    targs = getattr(train_module, "TrainingArguments", None)
    fields = tuple(f.name for f in dataclasses.fields(targs) if is_pixel_name(f.name)) \
        if targs is not None and dataclasses.is_dataclass(targs) else ()
    return HostPixelLoss(forward_args=args, fields=fields)


def check_mode(mode: str) -> str:
    if mode not in HOST_MODES:
        raise HostPixelLossError(f"{HOST_MODE_FLAG} {mode!r}: allowed: {', '.join(HOST_MODES)}")
    return mode


def decide(host: HostPixelLoss, mode: str) -> str:
    """The mode in force: ``mode`` when the host carries a term, ``"none"`` when it carries none; refuses."""
    check_mode(mode)
    if not host.present:
        return "none"
    if mode == "refuse":
        raise HostPixelLossError(
            f"this checkout already carries its own pixel loss ({host.describe()}); pass {HOST_MODE_FLAG} off to "
            f"let bagel-sr's term replace it, or {HOST_MODE_FLAG} keep to train with the checkout's own")
    return mode


def banner_line(host: HostPixelLoss, mode: str, prefix: str) -> str:
    """What the start-up banner says about the host's own term ('' when there is none)."""
    if mode == "off":
        switched = ", ".join(f"{n}=0" for n in host.weight_fields + host.weight_args) or "nothing to switch"
        renamed = f"; bagel-sr logs its keys as {prefix}pixel, ..." if prefix else ""
        return (f"  checkout's own pixel loss found ({host.describe()}): switched OFF ({switched}), bagel-sr's term "
                f"replaces it ({HOST_MODE_FLAG} off; 'keep' uses the checkout's own){renamed}")
    if mode == "keep":
        return (f"  checkout's own pixel loss found ({host.describe()}): KEPT, bagel-sr stands aside "
                f"({HOST_MODE_FLAG} keep; the --pixel_loss_* flags are the checkout's)")
    return ""
