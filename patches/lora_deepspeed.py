"""LoRA in a DeepSpeed port of the checkout's loop: the ``patch_lora_deepspeed`` row.

A port builds the model as upstream does, then hands it to ``deepspeed.initialize(model=..., model_parameters=...)``
(no ``try_load_ckpt``, no FSDP, no EMA).  ``<script>.deepspeed`` becomes a view whose ``initialize`` first injects
the adapters (:func:`bagel_sr.patches.lora.attach`: base frozen, ``--freeze_*`` kept), hands the engine the
trainable parameters only (the adapters: the optimizer holds nothing else), and makes the engine's
``save_checkpoint`` also write the adapters in peft's format (``<tag>/adapter/``) and keep the module states under
stock names (:func:`bagel_sr.patches.lora_files.split_module_states`).
"""
from __future__ import annotations

import pathlib
from typing import Any

import torch.distributed as dist

from bagel_sr import distributed

from . import lora, lora_files
from .context import PatchContext
from .undo import Undo, replace_attribute
from .training import require


class _View:
    """``base`` with ``overrides``; every other attribute is ``base``'s."""

    def __init__(self, base: Any, **overrides: Any):
        self.__dict__.update(_base=base, _overrides=overrides)

    def __getattr__(self, name: str) -> Any:
        return self._overrides[name] if name in self._overrides else getattr(self._base, name)


def _save_with_adapters(engine: Any, ctx: PatchContext) -> None:
    original = engine.save_checkpoint

    def save_checkpoint(save_dir, tag=None, *args, **kwargs):
        result = original(save_dir, tag, *args, **kwargs)
        if tag is None:  # DeepSpeed wrote the tag it chose into <save_dir>/latest
            tag = (pathlib.Path(save_dir) / "latest").read_text().strip()
        if distributed.is_rank0():
            folder = pathlib.Path(save_dir) / str(tag)
            lora_files.split_module_states(folder / lora_files.DEEPSPEED_STATES, lora.config_json(ctx.run.lora_config))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return result

    engine.save_checkpoint = save_checkpoint


def patch_lora_deepspeed(ctx: PatchContext) -> Undo:
    """``<script>.deepspeed`` -> a view whose ``initialize`` brings LoRA in first (see module doc)."""
    real = getattr(ctx.train_module, "deepspeed", None)
    require(real is not None and callable(getattr(real, "initialize", None)),
            "the training script has no module-level `deepspeed` with `initialize`")

    def initialize(*args: Any, **kwargs: Any) -> Any:
        model = kwargs.get("model")
        require(model is not None, "the DeepSpeed port calls deepspeed.initialize without model=..., where LoRA "
                                   "joins its loop")
        if not any(lora_files.is_adapter_key(name) for name, _ in model.named_parameters()):
            lora.attach(ctx, model, None, None, False)
        kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
        out = real.initialize(*args, **kwargs)
        _save_with_adapters(out[0], ctx)
        return out

    return replace_attribute(ctx.train_module, "deepspeed", _View(real, initialize=initialize))


def lora_deepspeed_on(ctx: PatchContext) -> bool:
    return lora.lora_on(ctx) and lora.uses_deepspeed(ctx)
