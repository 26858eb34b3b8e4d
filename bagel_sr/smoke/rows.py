"""The dry run's ``dryrun`` rows of the patch registry: the CPU mapping of a checkout's ``main()``.

Imported by :mod:`bagel_sr.smoke` (so in every dry-run process), which adds them to
:data:`bagel_sr.patches.registry.PATCHES`; they apply only when the context says ``dry_run``.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Tuple

from bagel_sr.patches.context import PatchContext
from bagel_sr.patches.registry import Patch

from . import cpu_cuda, cpu_main


def _script_name(name: str) -> Callable[[PatchContext], Any]:
    return lambda ctx: vars(ctx.train_module).get(name)


def _fsdp_name(name: str) -> Callable[[PatchContext], Any]:
    return lambda ctx: vars(cpu_main.fsdp_module(ctx) or ctx).get(name)


def _dry_run(ctx: PatchContext) -> bool:
    return ctx.dry_run



def _dry_run_row(name: str, target: str, apply: Callable, read: Callable, does: str, **when: Any) -> Patch:
    """A ``dryrun`` row of the ``script`` stage, in force in the dry run only (``when``/``condition`` to narrow it)."""
    return Patch(name, target, "dryrun", "script", does, apply, read,
                 **({"when": _dry_run, "condition": "dry run"} | when))


DRY_RUN_PATCHES: Tuple[Patch, ...] = (
    _dry_run_row("patch_cuda_queries", "<script>.torch, train.fsdp_utils.torch", cpu_main.patch_cuda_queries,
                 _script_name("torch"),
                 "torch.cuda seen as available, one device whose rank-derived id is the CPU, no-op sync/cache"),
    _dry_run_row("patch_cuda_autocast", "<script>.torch", cpu_main.patch_cuda_autocast, _script_name("torch"),
                 "torch.amp.autocast('cuda', ...) runs as CPU autocast (same dtype)"),
    _dry_run_row("patch_nccl", "<script>.dist", cpu_main.patch_nccl, _script_name("dist"),
                 "dist.init_process_group('nccl') uses gloo"),
    _dry_run_row("patch_state_dict_offload", "train.fsdp_utils.FullStateDictConfig", cpu_main.patch_state_dict_offload,
                 _fsdp_name("FullStateDictConfig"),
                 "full state dicts without offload_to_cpu (fails when parameters already live on the CPU)"),
    _dry_run_row("patch_device_mesh", "train.fsdp_utils.init_device_mesh", cpu_main.patch_device_mesh,
                 _fsdp_name("init_device_mesh"), "the HYBRID_SHARD device mesh on 'cpu'"),
    _dry_run_row("patch_cuda_tensors", "torch function mode of the thread that runs main()",
                 cpu_cuda.patch_cuda_tensors, lambda ctx: cpu_cuda.function_modes(),
                 "torch calls given a CUDA device (device=, .to('cuda:N'), Tensor.cuda, Module.cuda) get the CPU"),
    _dry_run_row("patch_parallel_device_ids", "DistributedDataParallel.__init__, FullyShardedDataParallel.__init__",
                 cpu_cuda.patch_parallel_device_ids, lambda ctx: cpu_cuda.parallel_inits(),
                 "DDP without device_ids/output_device, FSDP's int or CUDA device_id read as the CPU"),
    _dry_run_row("patch_checkout_torch", "<other checkout modules>.torch", cpu_cuda.patch_checkout_torch,
                 cpu_cuda.checkout_torch_names,
                 "the script's torch view (torch.cuda queries, set_device, CUDA autocast) in every loaded checkout module",
                 when=lambda ctx: ctx.dry_run and cpu_cuda.checkout_root(ctx) is not None),
    _dry_run_row("patch_process_group_backend", "torch.distributed.init_process_group",
                 cpu_cuda.patch_process_group_backend, cpu_cuda.process_group_names,
                 "init_process_group('nccl') uses gloo however the checkout reaches it"),
    _dry_run_row("patch_deepspeed_init", "deepspeed.init_distributed", cpu_cuda.patch_deepspeed_init,
                 cpu_cuda.deepspeed_names, "deepspeed.init_distributed(dist_backend='nccl') uses gloo",
                 when=lambda ctx: ctx.dry_run and "deepspeed" in sys.modules, condition="dry run, deepspeed imported"),
)
