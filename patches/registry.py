"""Every runtime patch of a BAGEL checkout, in one table; ``apply(ctx) -> Handle``; ``Handle.undo()`` undoes all.

A row names the function that applies the patch (it checks the contract fact it needs and returns its undo), the
name it replaces, its group (``cpu``, ``training``, ``datasets``, ``dryrun``: the CPU dry run of ``main()`` only, ``inference``: a
restoring ``InterleaveInferencer``, ``lora``: LoRA fine-tuning, :mod:`.lora`), its stage (``checkout``: needs only the checkout
on ``sys.path``, applied before the training script is imported; ``script``: needs the imported script), when it
applies, and how to read the replaced name (how the tests check that ``undo`` restores it and that a row listed in
force replaced it).  To add a patch, write one function ``patch_x(ctx) -> Undo`` (built with
:func:`bagel_sr.patches.undo.replace_attribute`; :data:`~bagel_sr.patches.undo.NOTHING` when there is nothing to
replace) and one row.  The start-up banner lists the rows in force;
``python -c "from bagel_sr.patches import registry; print(registry.describe())"`` prints the table.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Collection, List, Optional

import torch

from . import cpu, datasets, inference, lora, lora_deepspeed, training
from .context import PatchContext, RunState
from .undo import Undo, UndoLike, as_undo

STAGES = ("checkout", "script")
GROUPS = ("cpu", "training", "datasets", "dryrun", "inference", "lora")


@dataclass(frozen=True)
class Patch:
    """One row of :data:`PATCHES`."""

    name: str
    target: str
    group: str
    stage: str
    does: str
    apply: Callable[[PatchContext], UndoLike]
    read: Callable[[PatchContext], Any]
    when: Callable[[PatchContext], bool] = lambda ctx: True
    condition: str = "always"


def _script_name(name: str) -> Callable[[PatchContext], Any]:
    return lambda ctx: vars(ctx.train_module).get(name)


def _copy(group: Optional[dict]) -> Optional[dict]:
    return None if group is None else dict(group)


#: The table, in the order the rows apply; layers above the patches add theirs with :func:`register`.
PATCHES: List[Patch] = [
    Patch("patch_torchvision_ops", "torch.ops.torchvision (nms, qnms schemas)", "cpu", "checkout",
          "declares the two operators a CUDA-built torchvision registers against, next to a CPU-only torch",
          cpu.patch_torchvision_ops, lambda ctx: cpu._TORCHVISION_LIB,
          when=lambda ctx: not torch.cuda.is_available(), condition="no CUDA, torchvision ops missing"),
    Patch("patch_flash_attn", "sys.modules['flash_attn']", "cpu", "checkout",
          "a plain-torch flash_attn stand-in (BAGEL imports flash_attn at import time)",
          cpu.patch_flash_attn, lambda ctx: sys.modules.get(cpu.FLASH_ATTN_MODULE),
          condition="flash-attn not installed"),
    Patch("patch_sdpa", "modeling.bagel.qwen2_navit.sdpa_kernel", "cpu", "checkout",
          "also allows SDPBackend.MATH (a CPU has no EFFICIENT_ATTENTION kernel)",
          cpu.patch_sdpa, lambda ctx: ctx.module("navit_module", cpu.QWEN2_NAVIT_MODULE).sdpa_kernel,
          when=lambda ctx: not torch.cuda.is_available(), condition="no CUDA"),
    Patch("patch_training_arguments", "<script>.TrainingArguments", "training", "script",
          "a subclass with the --pixel_loss_* fields and the wrapper's defaults (validated at parse time)",
          training.patch_training_arguments, _script_name("TrainingArguments")),
    Patch("patch_parser", "<script>.HfArgumentParser", "training", "script",
          "remembers the parsed settings and prints the start-up banner",
          training.patch_parser, _script_name("HfArgumentParser")),
    Patch("patch_load_ae", "<script>.load_ae", "training", "script",
          "the checkout's load_ae, remembering the VAE it returns",
          training.patch_load_ae, _script_name("load_ae")),
    Patch("patch_model_class", "<script>.Bagel", "training", "script",
          "BagelWithPixelLossFold: armed at construction, folds weight * pixel into the returned mse",
          training.patch_model_class, _script_name("Bagel")),
    Patch("patch_batch", "data.dataset_base.SimpleCustomBatch.to_dict", "training", "script",
          "also returns pixel_loss_inputs (ground truth past the loop's pop of padded_images)",
          training.patch_batch,
          lambda ctx: vars(ctx.module("batch_module", "data.dataset_base").SimpleCustomBatch).get("to_dict")),
    Patch("patch_train_state", "<script>.FSDPCheckpoint.try_load_train_state", "training", "script",
          "also tells the weight controller the optimizer step the loop resumes at (the warm-up goes on from there)",
          training.patch_train_state,
          lambda ctx: getattr(getattr(ctx.train_module, "FSDPCheckpoint", None), "try_load_train_state", None),
          when=lambda ctx: callable(getattr(getattr(ctx.train_module, "FSDPCheckpoint", None),
                                            "try_load_train_state", None)),
          condition="the script resumes through FSDPCheckpoint"),
    Patch("register_datasets", "data.dataset_info.DATASET_INFO['unified_edit']", "datasets", "script",
          "adds the sets of --bagel_sr_datasets",
          datasets.register_datasets,
          lambda ctx: _copy(ctx.module("dataset_info_module", "data.dataset_info").DATASET_INFO.get("unified_edit")),
          when=lambda ctx: bool(ctx.dataset_yamls), condition="--bagel_sr_datasets given"),
    Patch("patch_start_t", "<inferencer>.model.generate_image, <inferencer>.update_context_image", "inference",
          "checkout", "sampling starts from the condition image noised to --start_t, optionally one step to 0",
          inference.patch_start_t,
          lambda ctx: (vars(ctx.inferencer.model).get("generate_image"), vars(ctx.inferencer).get("update_context_image")),
          when=lambda ctx: ctx.inferencer is not None and (ctx.start_t < 1.0 or ctx.one_step),
          condition="--start_t < 1 or --one_step"),
    Patch("patch_lora_checkpoint", "<script>.FSDPCheckpoint", "lora", "script",
          "peft LoRA injected after try_load_ckpt (base frozen, --freeze_* kept); adapters saved in peft format",
          lora.patch_lora_checkpoint, _script_name("FSDPCheckpoint"), when=lora.lora_on,
          condition="--bagel_sr_lora_rank > 0"),
    Patch("patch_lora_fsdp_units", "train.fsdp_utils.FSDP", "lora", "script",
          "each adapter matrix its own FSDP unit (flat parameters all frozen or all trainable)",
          lora.patch_lora_fsdp_units, lora.fsdp_name("FSDP"), when=lora.lora_on, condition="--bagel_sr_lora_rank > 0"),
    Patch("patch_lora_deepspeed", "<script>.deepspeed", "lora", "script",
          "deepspeed.initialize gets the model with adapters and the adapters only; checkpoints as with FSDP",
          lora_deepspeed.patch_lora_deepspeed, _script_name("deepspeed"), when=lora_deepspeed.lora_deepspeed_on,
          condition="--bagel_sr_lora_rank > 0, a DeepSpeed port"),
]


def register(*patches: Patch) -> None:
    """Add rows to :data:`PATCHES` (the dry run adds its ``dryrun`` rows when imported); a row already there by
    name is left alone when it is the same row and refused when it is another."""
    for patch in patches:
        if patch.group not in GROUPS or patch.stage not in STAGES:
            raise ValueError(f"patch {patch.name}: group {patch.group!r} / stage {patch.stage!r} not in {GROUPS} / {STAGES}")
        same = [p for p in PATCHES if p.name == patch.name]
        if same and same[0] is not patch:
            raise ValueError(f"patch {patch.name} is already registered by another row")
        if not same:
            PATCHES.append(patch)


class Handle(Undo):
    """The patches :func:`apply` put in force, newest last; ``undo()`` (or leaving a ``with`` block) reverts all.

    A row whose undo changed nothing (:data:`~bagel_sr.patches.undo.NOTHING`: its target is absent here, or it is
    already in force and the first caller owns it) is not listed as applied.
    """

    def __init__(self, ctx: PatchContext):
        super().__init__()
        self.ctx = ctx

    @property
    def run(self) -> RunState:
        """What the patches learned while ``main()`` ran: parsed settings, TrainingArguments, the VAE."""
        return self.ctx.run

    def add(self, patch: Patch, undo: UndoLike) -> bool:  # type: ignore[override]
        undo = as_undo(undo)
        if not undo.changed:
            return False
        ctx, name = self.ctx, patch.name

        def revert() -> None:
            undo.undo()
            ctx.run.applied.pop(name, None)

        self._reverts.append((name, revert))
        ctx.run.applied[name] = patch.target
        return True


def select(stage: Optional[str] = None, groups: Optional[Collection[str]] = None,
           names: Optional[Collection[str]] = None) -> List[Patch]:
    """The rows of :data:`PATCHES` in the given stage, groups and names (None: all), in table order."""
    known = {p.name for p in PATCHES}
    unknown = set(names or ()) - known
    if unknown:
        raise ValueError(f"unknown patch(es) {sorted(unknown)}; known: {sorted(known)}")
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; allowed: {STAGES}")
    return [p for p in PATCHES if (stage is None or p.stage == stage) and (groups is None or p.group in groups)
            and (names is None or p.name in names)]


def apply(ctx: PatchContext, *, stage: Optional[str] = None, groups: Optional[Collection[str]] = None,
          names: Optional[Collection[str]] = None, handle: Optional[Handle] = None) -> Handle:
    """Apply the selected rows whose condition holds, in table order; returns ``handle`` (a new one when None).

    If one fails, everything the handle holds is undone before the error propagates.
    """
    handle = handle if handle is not None else Handle(ctx)
    try:
        for patch in select(stage, groups, names):
            if patch.when(ctx):
                handle.add(patch, patch.apply(ctx))
    except BaseException:
        handle.undo()
        raise
    return handle


def apply_pixel_loss_training(train_module: Any, batch_module: Any = None, **options: Any) -> Handle:
    """The ``training`` rows on an imported training script (``batch_module``: its ``data.dataset_base``,
    imported when None); ``options`` go to :class:`PatchContext` (e.g. ``defaults={}`` for PixelLossConfig's)."""
    ctx = PatchContext(train_module=train_module, batch_module=batch_module, **options)
    return apply(ctx, groups=("training",))


def describe(patches: Collection[Patch] = PATCHES) -> str:
    """The rows as a plain-text table (one line each: name, what it replaces, group, stage, when, what)."""
    header = ("patch", "replaces", "group", "stage", "when", "what")
    rows = [header] + [(p.name, p.target, p.group, p.stage, p.condition, p.does) for p in patches]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    rule = "  ".join("-" * w for w in widths) + "  " + "-" * 20
    return "\n".join([lines[0], rule] + lines[1:])

