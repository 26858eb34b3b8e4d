"""The LoRA settings of the wrapper in one dataclass: default, flag (``--bagel_sr_lora_<field>``) and validation.

``rank`` 0 (the default) means off: no patch row applies and the checkout's loop is the stock one bit for bit.
``targets`` is a preset name (:data:`TARGET_PRESETS`) or comma-separated module-name patterns: a glob matched
against full module names (``language_model.model.layers.*.self_attn.q_proj``) or a bare name matched against the
end of a name, as peft does (``q_proj`` matches every ``....q_proj``).  Resolving patterns needs the model
(:mod:`bagel_sr.patches.lora`); everything here is plain values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import UsageError

FLAG_PREFIX = "bagel_sr_lora_"
EXTRA_HINT = 'pip install -e ".[lora]"'

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_LAYERS = "language_model.model.layers.*."

#: Preset name -> module-name globs. ``mot``: attention and MLP projections of both MoT experts (the
#: understanding expert's ``q_proj``... and the generation expert's ``q_proj_moe_gen``...); ``gen``: the
#: generation expert's only (the expert that predicts the velocity).
TARGET_PRESETS: Dict[str, Tuple[str, ...]] = {
    "mot": tuple(f"{_LAYERS}self_attn.{p}" for p in _ATTENTION)
    + tuple(f"{_LAYERS}self_attn.{p}_moe_gen" for p in _ATTENTION)
    + tuple(f"{_LAYERS}mlp.{p}" for p in _MLP) + tuple(f"{_LAYERS}mlp_moe_gen.{p}" for p in _MLP),
    "gen": tuple(f"{_LAYERS}self_attn.{p}_moe_gen" for p in _ATTENTION)
    + tuple(f"{_LAYERS}mlp_moe_gen.{p}" for p in _MLP),
}
DEFAULT_TARGETS = "mot"


class LoraSettingsError(UsageError):
    """A ``--bagel_sr_lora_*`` value is wrong; the message names the flag and what is allowed."""


@dataclass
class LoraSettings:
    """Settings of LoRA fine-tuning through peft (``rank`` 0 = off, full fine-tuning as the checkout does it)."""

    rank: int = field(default=0, metadata={"help": "LoRA rank r of the adapters (0 = off: full fine-tuning, the stock loop)."})
    alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank (unset = rank, scale 1)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapters' input, in [0, 1)."})
    targets: str = field(
        default=DEFAULT_TARGETS,
        metadata={"help": "Modules that get adapters: a preset (mot: attention and MLP projections of both MoT "
                          "experts; gen: the generation expert's only) or comma-separated module-name globs."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "LoraSettings":
        _check(isinstance(self.rank, int) and self.rank >= 0, "rank", self.rank, "an integer >= 0 (0 = off)")
        _check(self.alpha is None or self.alpha > 0, "alpha", self.alpha, "a number > 0")
        _check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        _check(bool(self.patterns), "targets", self.targets,
               f"a preset ({', '.join(TARGET_PRESETS)}) or comma-separated module-name patterns")
        return self

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """What peft multiplies ``B @ A`` by: ``alpha / rank``."""
        return self.lora_alpha / self.rank

    @property
    def patterns(self) -> Tuple[str, ...]:
        text = str(self.targets or "").strip()
        if text in TARGET_PRESETS:
            return TARGET_PRESETS[text]
        return tuple(p.strip() for p in text.split(",") if p.strip())

    def to_flags(self) -> Dict[str, Any]:
        return {FLAG_PREFIX + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        if not self.enabled:
            return "bagel-sr LoRA OFF (full fine-tuning as the checkout does it)"
        return (f"bagel-sr LoRA ON: rank {self.rank}, alpha {self.lora_alpha:g} (scale {self.scale:g}), dropout "
                f"{self.dropout:g}, targets {self.targets}; base weights frozen, adapters trained")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise LoraSettingsError(f"--{FLAG_PREFIX}{name}: got {value!r}; allowed: {allowed}.")


#: Flag name (without ``--``) -> help: the wrapper takes these out of the command line before the checkout's parser.
LORA_FLAGS: Dict[str, str] = {FLAG_PREFIX + f.name: f.metadata["help"] for f in dataclasses.fields(LoraSettings)}


def _convert(name: str, text: str) -> Any:
    kind = {"rank": int, "alpha": float, "dropout": float, "targets": str}[name]
    try:
        return kind(text)
    except ValueError:
        raise LoraSettingsError(f"--{FLAG_PREFIX}{name}: got {text!r}; allowed: {kind.__name__} value.") from None


def settings_from_flags(values: Mapping[str, Optional[str]]) -> LoraSettings:
    """``{"bagel_sr_lora_rank": "8", ...}`` (unset = None) -> validated :class:`LoraSettings`.

    Other LoRA flags with rank 0 (or no rank) are an error: they would silently do nothing.
    """
    given = {k[len(FLAG_PREFIX):]: v for k, v in values.items() if k.startswith(FLAG_PREFIX) and v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(LoraSettings)}
    if unknown:
        raise LoraSettingsError(f"unknown LoRA flag(s) {sorted('--' + FLAG_PREFIX + u for u in unknown)}; "
                                f"allowed: {', '.join('--' + f for f in LORA_FLAGS)}")
    settings = LoraSettings(**{k: _convert(k, v) for k, v in given.items()})
    others = sorted(k for k in given if k != "rank")
    if not settings.enabled and others:
        raise LoraSettingsError(
            f"--{FLAG_PREFIX}{others[0]} given but --{FLAG_PREFIX}rank is {settings.rank}: LoRA is off; pass "
            f"--{FLAG_PREFIX}rank R (R > 0, e.g. 8) to train adapters, or drop the LoRA flags.")
    return settings
