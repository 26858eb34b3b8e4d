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


DRY_RUN_PATCHES: Tuple[Patch, ...] = (
    Patch("patch_cuda_queries", "<script>.torch, train.fsdp_utils.torch", "dryrun", "script",
          "torch.cuda seen as available, one device whose rank-derived id is the CPU, no-op sync/cache",
          cpu_main.patch_cuda_queries, _script_name("torch"), when=_dry_run, condition="dry run"),
    Patch("patch_cuda_autocast", "<script>.torch", "dryrun", "script",
          "torch.amp.autocast('cuda', ...) runs as CPU autocast (same dtype)",
          cpu_main.patch_cuda_autocast, _script_name("torch"), when=_dry_run, condition="dry run"),
    Patch("patch_nccl", "<script>.dist", "dryrun", "script",
          "dist.init_process_group('nccl') uses gloo",
          cpu_main.patch_nccl, _script_name("dist"), when=_dry_run, condition="dry run"),
    Patch("patch_state_dict_offload", "train.fsdp_utils.FullStateDictConfig", "dryrun", "script",
          "full state dicts without offload_to_cpu (fails when parameters already live on the CPU)",
          cpu_main.patch_state_dict_offload, _fsdp_name("FullStateDictConfig"), when=_dry_run, condition="dry run"),
    Patch("patch_device_mesh", "train.fsdp_utils.init_device_mesh", "dryrun", "script",
          "the HYBRID_SHARD device mesh on 'cpu'",
          cpu_main.patch_device_mesh, _fsdp_name("init_device_mesh"), when=_dry_run, condition="dry run"),
    Patch("patch_cuda_tensors", "torch function mode of the thread that runs main()", "dryrun", "script",
          "torch calls given a CUDA device (device=, .to('cuda:N'), Tensor.cuda, Module.cuda) get the CPU",
          cpu_cuda.patch_cuda_tensors, lambda ctx: cpu_cuda.function_modes(), when=_dry_run, condition="dry run"),
    Patch("patch_parallel_device_ids", "DistributedDataParallel.__init__, FullyShardedDataParallel.__init__",
          "dryrun", "script", "DDP without device_ids/output_device, FSDP's int or CUDA device_id read as the CPU",
          cpu_cuda.patch_parallel_device_ids, lambda ctx: cpu_cuda.parallel_inits(), when=_dry_run,
          condition="dry run"),
    Patch("patch_checkout_torch", "<other checkout modules>.torch", "dryrun", "script",
          "the script's torch view (torch.cuda queries, set_device, CUDA autocast) in every loaded checkout module",
          cpu_cuda.patch_checkout_torch, cpu_cuda.checkout_torch_names,
          when=lambda ctx: ctx.dry_run and cpu_cuda.checkout_root(ctx) is not None, condition="dry run"),
    Patch("patch_process_group_backend", "torch.distributed.init_process_group", "dryrun", "script",
          "init_process_group('nccl') uses gloo however the checkout reaches it",
          cpu_cuda.patch_process_group_backend, cpu_cuda.process_group_names, when=_dry_run, condition="dry run"),
    Patch("patch_deepspeed_init", "deepspeed.init_distributed", "dryrun", "script",
          "deepspeed.init_distributed(dist_backend='nccl') uses gloo",
          cpu_cuda.patch_deepspeed_init, cpu_cuda.deepspeed_names,
          when=lambda ctx: ctx.dry_run and "deepspeed" in sys.modules, condition="dry run, deepspeed imported"),
)
