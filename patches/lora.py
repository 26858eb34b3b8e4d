"""LoRA fine-tuning of a checkout's own ``main()`` through peft: the ``lora`` rows of the registry.

Where ``main()`` is touched (upstream's order: build the model, apply ``--freeze_*``, ``ema_model =
deepcopy(model)``, ``FSDPCheckpoint.try_load_ckpt(...)``, ``fsdp_ema_setup``, ``fsdp_wrapper``, AdamW over
``fsdp_model.parameters()``):

* ``patch_lora_checkpoint`` (``<script>.FSDPCheckpoint``): after ``try_load_ckpt`` has loaded the base weights,
  peft's LoRA layers are injected into the model and its EMA copy (same initial adapters on every rank), the base
  is frozen and the adapters trainable, except where ``--freeze_llm`` / ``--freeze_vit`` / ``--freeze_und`` freeze
  that part (its adapters stay frozen); a checkpoint of a LoRA run restores its adapters (``adapter/``,
  ``adapter_ema/``).  ``fsdp_save_ckpt`` then also writes the adapters in peft's format and keeps
  ``model.safetensors`` / ``ema.safetensors`` as the base under stock names (:mod:`.lora_files`).
* ``patch_lora_fsdp_units`` (``train.fsdp_utils.FSDP``): each adapter matrix becomes its own FSDP unit, so every
  flat parameter is either all frozen or all trainable (FSDP's requirement without ``use_orig_params``), the
  optimizer gets state for the adapter units only, and ``fsdp_ema_update`` (which skips flat parameters that do
  not require grad) moves the EMA adapters and leaves the EMA base bit-identical.

peft is imported only when a row applies (:func:`require_peft`).
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import os
import pathlib
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from bagel_sr import distributed
from bagel_sr.errors import BadInput, UserError
from bagel_sr.lora_settings import EXTRA_HINT, FLAG_PREFIX, LoraSettings

from . import lora_files
from .context import PatchContext
from .undo import NOTHING, Undo, replace_attribute
from .training import require

UNIT_MARK = "_bagel_sr_lora_unit"
FSDP_MODULE = "train.fsdp_utils"
INIT_SEED = 0  # the adapters' initial values do not depend on the rank (FSDP shards each rank's own copy)


class MissingExtra(UserError):
    """An optional package a requested feature needs is not installed."""


def require_peft() -> Any:
    """``import peft`` (after the CPU torchvision fix transformers' imports need), or a one-line error naming the
    extra to install."""
    from .cpu import declare_torchvision_ops

    declare_torchvision_ops()
    try:
        import peft
    except ImportError:
        raise MissingExtra(f"--{FLAG_PREFIX}rank needs peft, which is not installed: {EXTRA_HINT}") from None
    return peft


# ------------------------------------------------------------------------------------------ targets and injection

def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def resolve_targets(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Names of the ``nn.Linear`` modules of ``model`` matched by any pattern; a pattern matching none is a
    ``BadInput`` naming close matches."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen: List[str] = []
    for pattern in patterns:
        hits = [n for n in linears if _matches(n, pattern)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            close = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.5)
            close += difflib.get_close_matches(pattern, linears, n=2, cutoff=0.6)
            raise BadInput(f"--{FLAG_PREFIX}targets: {pattern!r} matches no linear module of the model; close "
                           f"matches: {', '.join(close) if close else 'none'} (patterns are globs on full module "
                           "names, or a name's last parts)")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def lora_config(settings: LoraSettings, targets: Sequence[str]) -> Any:
    """peft's ``LoraConfig`` of the settings over the resolved module names."""
    peft = require_peft()
    return peft.LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.dropout,
                           target_modules=list(targets), bias="none")


def inject(model: nn.Module, config: Any, seed: int = INIT_SEED) -> nn.Module:
    """peft's LoRA layers into ``model`` in place (the model keeps its class), initialised from ``seed``; each
    adapter matrix is marked as an FSDP unit (:func:`adapter_unit`)."""
    peft = require_peft()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model)
    for module in adapter_modules(model):
        setattr(module, UNIT_MARK, True)
    return model


def adapter_modules(model: nn.Module) -> Iterable[nn.Module]:
    """The adapter matrices (``lora_A[...]``, ``lora_B[...]`` linears) of an injected model."""
    for name, module in model.named_modules():
        if lora_files.is_adapter_key(name + ".") and not list(module.children()):
            yield module


def adapter_unit(module: nn.Module) -> bool:
    """FSDP wrap policy: an adapter matrix is its own unit."""
    return bool(getattr(module, UNIT_MARK, False))


def frozen_by_flags(name: str, training_args: Any) -> bool:
    """Whether BAGEL's ``--freeze_*`` flags freeze the part holding parameter ``name``."""
    flag = lambda f: bool(getattr(training_args, f, False))  # noqa: E731
    in_llm, in_vit = name.startswith("language_model."), name.startswith("vit_model.")
    return ((flag("freeze_llm") and in_llm) or (flag("freeze_vit") and in_vit)
            or (flag("freeze_und") and in_llm and "moe_gen" not in name))


def set_trainable(model: nn.Module, training_args: Any = None) -> Tuple[int, int]:
    """Freeze the base, let the adapters train unless a ``--freeze_*`` flag covers them; ``(trainable, total)``."""
    trainable = total = 0
    for name, param in model.named_parameters():
        train = lora_files.is_adapter_key(name) and not frozen_by_flags(name, training_args)
        param.requires_grad_(train)
        total += param.numel()
        trainable += param.numel() if train else 0
    if trainable == 0:
        raise BadInput("LoRA: no adapter is trainable: the --freeze_* flags freeze every part the "
                       f"--{FLAG_PREFIX}targets adapt; adapt another part or drop a --freeze_* flag")
    return trainable, total


def load_adapter_into(model: nn.Module, folder: os.PathLike) -> None:
    """Adapter tensors of a peft folder into an injected model; a missing or extra adapter is ``BadInput``."""
    adapters, _config = lora_files.load_adapter(folder)
    state = {lora_files.from_peft_key(k): v for k, v in adapters.items()}
    own = {k for k in model.state_dict() if lora_files.is_adapter_key(k)}
    if set(state) != own:
        diff = sorted(set(state) ^ own)
        raise BadInput(f"adapter/model mismatch: {folder} and the --{FLAG_PREFIX}targets differ at {diff[0]} "
                       f"({len(diff)} names); resume with the run's own LoRA flags")
    model.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------------------------ registry rows

def attach(ctx: PatchContext, model: nn.Module, ema_model: Optional[nn.Module], resume_from: Optional[str],
           resume_from_ema: bool) -> Any:
    """Inject, freeze, restore a LoRA checkpoint's adapters; returns the ``LoraConfig``."""
    settings: LoraSettings = ctx.lora
    targets = resolve_targets(model, settings.patterns)
    config = lora_config(settings, targets)
    for one in (model, ema_model):
        if one is not None:
            inject(one, config)
    folder = pathlib.Path(resume_from) if resume_from else None
    if folder is not None and (folder / "adapter").is_dir():
        load_adapter_into(model, folder / ("adapter_ema" if resume_from_ema else "adapter"))
        if ema_model is not None:
            load_adapter_into(ema_model, folder / "adapter_ema")
    trainable, total = set_trainable(model, ctx.run.training_args)
    if ema_model is not None:
        ema_model.requires_grad_(False)
    ctx.run.lora_config = config
    if distributed.is_rank0():
        print(f"{settings.describe()}\n  {len(targets)} adapted modules; trainable {trainable:,} of {total:,} "
              f"parameters ({100 * trainable / total:.3f}%)", flush=True)
    return config


def config_json(config: Any) -> dict:
    """``adapter_config.json``'s content: peft's ``LoraConfig.to_dict()`` with the targets as a sorted list."""
    out = config.to_dict()
    out["target_modules"] = sorted(out.get("target_modules") or [])
    return out


def _source(ctx: PatchContext) -> Optional[str]:
    try:
        return inspect.getsource(ctx.train_module)
    except (OSError, TypeError):
        return None  # no source to read (a module built in memory): the names checked are all we know


def uses_deepspeed(ctx: PatchContext) -> bool:
    """The script is a DeepSpeed port: it holds ``deepspeed`` and calls ``deepspeed.initialize(``."""
    source = _source(ctx)
    return hasattr(ctx.train_module, "deepspeed") and source is not None and "deepspeed.initialize(" in source


def patch_lora_checkpoint(ctx: PatchContext) -> Undo:
    """``<script>.FSDPCheckpoint`` -> a subclass: LoRA after ``try_load_ckpt``, adapters written on each save."""
    base = getattr(ctx.train_module, "FSDPCheckpoint", None)
    require(base is not None and callable(getattr(base, "try_load_ckpt", None))
            and callable(getattr(base, "fsdp_save_ckpt", None)),
            "the training script has no `FSDPCheckpoint` with `try_load_ckpt` and `fsdp_save_ckpt`, where LoRA "
            f"joins the loop (--{FLAG_PREFIX}rank)")
    source = _source(ctx)
    if source is not None and "try_load_ckpt" not in source:
        require(uses_deepspeed(ctx),
                "the training script never calls `FSDPCheckpoint.try_load_ckpt` nor `deepspeed.initialize`, where "
                f"LoRA joins the loop (--{FLAG_PREFIX}rank)")
        return NOTHING  # a DeepSpeed port: patch_lora_deepspeed brings LoRA in
    load_sig, save_sig = inspect.signature(base.try_load_ckpt), inspect.signature(base.fsdp_save_ckpt)

    class LoraCheckpoint(base):
        @staticmethod
        def try_load_ckpt(*args, **kwargs):
            model, ema_model = base.try_load_ckpt(*args, **kwargs)
            bound = load_sig.bind(*args, **kwargs).arguments
            attach(ctx, model, ema_model, bound.get("resume_from"), bool(bound.get("resume_from_ema", False)))
            return model, ema_model

        @staticmethod
        def fsdp_save_ckpt(*args, **kwargs):
            result = base.fsdp_save_ckpt(*args, **kwargs)
            bound = save_sig.bind(*args, **kwargs).arguments
            folder = pathlib.Path(bound["ckpt_dir"]) / f"{int(bound['train_steps']):07d}"
            if distributed.is_rank0():
                for name in lora_files.ADAPTER_DIRS:
                    lora_files.split_checkpoint_file(folder / name, config_json(ctx.run.lora_config))
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            return result

    LoraCheckpoint.__name__ = LoraCheckpoint.__qualname__ = base.__name__
    return replace_attribute(ctx.train_module, "FSDPCheckpoint", LoraCheckpoint)


class AdapterUnitsFSDP:
    """``FSDP`` as the checkout names it, whose constructor also wraps each adapter matrix as its own unit;
    every other attribute (``state_dict_type``, ...) and ``isinstance`` checks are FSDP's."""

    def __init__(self, fsdp_cls: type):
        self._fsdp_cls = fsdp_cls

    def __call__(self, module: nn.Module, *args: Any, auto_wrap_policy: Any = None, **kwargs: Any) -> Any:
        from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy

        units = functools.partial(lambda_auto_wrap_policy, lambda_fn=adapter_unit)
        if auto_wrap_policy is not None:
            if not callable(auto_wrap_policy) or not isinstance(auto_wrap_policy, functools.partial):
                raise BadInput("LoRA: the checkout's FSDP auto-wrap policy is not a function policy; adapter "
                               "units cannot be added to it")
            units = functools.partial(_or_policy, policies=[auto_wrap_policy, units])
        return self._fsdp_cls(module, *args, auto_wrap_policy=units, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fsdp_cls, name)

    def __instancecheck__(self, instance: Any) -> bool:
        return isinstance(instance, self._fsdp_cls)


def patch_lora_fsdp_units(ctx: PatchContext) -> Undo:
    """``train.fsdp_utils.FSDP`` -> :class:`AdapterUnitsFSDP` of it (the model and the EMA copy alike)."""
    module = fsdp_module(ctx)
    if (module is None or not hasattr(module, "FSDP")) and uses_deepspeed(ctx):
        return NOTHING  # a DeepSpeed port without BAGEL's FSDP helpers: nothing to wrap
    require(module is not None and hasattr(module, "FSDP"),
            "`train.fsdp_utils` has no module-level `FSDP`, which LoRA wraps to make the adapters their own units")
    return replace_attribute(module, "FSDP", AdapterUnitsFSDP(module.FSDP))


def fsdp_module(ctx: PatchContext) -> Optional[Any]:
    """The checkout's ``train.fsdp_utils`` (None where the loop has none, e.g. a DeepSpeed port)."""
    try:
        return ctx.module("fsdp_module", FSDP_MODULE)
    except ImportError:
        return None


def fsdp_name(name: str) -> Callable[[PatchContext], Any]:
    """How the registry reads ``train.fsdp_utils.<name>``."""
    return lambda ctx: vars(fsdp_module(ctx) or ctx).get(name)


def lora_on(ctx: PatchContext) -> bool:
    return ctx.lora is not None and ctx.lora.enabled
