"""What the patches act on (:class:`PatchContext`) and what they learn while the checkout's ``main()`` runs
(:class:`RunState`).  Model-level state (counters, the weight's clock) is not here: it lives in the armed model's
:class:`bagel_sr.state.PixelLossState`."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Dict, Optional, Sequence

from bagel_sr.config import CONSERVATIVE_DEFAULTS, PixelLossConfig

from .host import DEFAULT_HOST_MODE


@dataclass
class RunState:
    """Filled by the parser and ``load_ae`` patches: the parsed settings, the script's TrainingArguments, the VAE;
    ``applied``: ``name -> target`` of the patches in force (for the banner); ``banner``: what was printed."""

    config: Optional[PixelLossConfig] = None
    training_args: Any = None
    vae: Any = None
    applied: Dict[str, str] = field(default_factory=dict)
    banner: str = ""
    host: Any = None  # bagel_sr.patches.host.HostPixelLoss: the checkout's own pixel term, if any
    host_mode: str = "none"  # what was decided for it: "none" (no host term), "off" or "keep"
    parsed: tuple = ()  # every dataclass the script's parser returned (ModelArguments, DataArguments, ...)
    lora_config: Any = None  # peft's LoraConfig of the adapters injected (--bagel_sr_lora_rank > 0)
    start_step: int = 0  # the optimizer step the loop resumed at (its FSDPCheckpoint.try_load_train_state), else 0

    @property
    def gradient_accumulation_steps(self) -> int:
        return int(getattr(self.training_args, "gradient_accumulation_steps", 1) or 1)


@dataclass
class PatchContext:
    """The objects a patch replaces names in; a module left None is imported from the checkout when first needed.

    ``train_module``: the imported training script; ``batch_module``: ``data.dataset_base``; ``navit_module``:
    ``modeling.bagel.qwen2_navit``; ``dataset_info_module``: ``data.dataset_info``; ``dataset_yamls``: built sets to
    register; ``fsdp_module``: ``train.fsdp_utils``; ``dry_run``: apply the ``dryrun`` rows; ``host_mode``: ``--bagel_sr_host_pixel_loss`` (off, keep, refuse: what
    to do with a checkout's own pixel term, :mod:`bagel_sr.patches.host`); ``defaults``: the ``--pixel_loss_*`` defaults of the patched TrainingArguments (field name -> value).
    ``inferencer``: a checkout's ``InterleaveInferencer``, ``start_t``: its sampling start and ``one_step``: one Euler
    step from there to 0 (the ``inference`` rows).  ``validation``: the ``--bagel_sr_val_*`` settings, ``val_sets``:
    their val splits and ``validator``: what the validation rows (``bagel_sr.validation``) build and feed.
    """

    train_module: Optional[ModuleType] = None
    batch_module: Optional[ModuleType] = None
    navit_module: Optional[ModuleType] = None
    dataset_info_module: Optional[ModuleType] = None
    fsdp_module: Optional[ModuleType] = None
    dataset_yamls: Sequence[str] = ()
    dry_run: bool = False
    host_mode: str = DEFAULT_HOST_MODE
    defaults: Dict[str, Any] = field(default_factory=lambda: dict(CONSERVATIVE_DEFAULTS))
    inferencer: Any = None
    start_t: float = 1.0
    one_step: bool = False
    validation: Any = None
    val_sets: Sequence[Any] = ()
    validator: Any = None
    lora: Any = None  # bagel_sr.lora_settings.LoraSettings: the ``lora`` rows apply when its rank > 0
    run: RunState = field(default_factory=RunState)

    def module(self, attr: str, name: str) -> ModuleType:
        """``self.<attr>``, importing ``name`` (from the checkout on ``sys.path``) and keeping it when unset."""
        if getattr(self, attr) is None:
            setattr(self, attr, importlib.import_module(name))
        return getattr(self, attr)
