"""Run a checkout's own, unchanged ``main()`` on CPU under ``torchrun`` with gloo: the dry run's patches.

Upstream ``main()`` (and forks of it) ask CUDA for a few things. Each patch below maps one of them to the CPU by
replacing one module-level name of the training script or of ``train.fsdp_utils`` with a *view* that differs from
the real object only in the named attributes. Nothing in torch itself is changed, so the rest of the process
(DataLoader, transformers, our own code) still sees the real CPU-only torch. Each function returns its
:class:`~bagel_sr.patches.undo.Undo` (:data:`~bagel_sr.patches.undo.NOTHING` where its target is absent).

=============================  ===============================================================================
``patch_cuda_queries``         ``<script>.torch`` and ``<fsdp>.torch`` -> view whose ``cuda`` says available, one device, no-op
                               ``set_device``/``synchronize``/``empty_cache``, memory statistics 0; its
                               ``device_count()`` is an index whose ``rank % index`` is ``torch.device("cpu")``,
                               so the device ids main() and fsdp_wrapper() derive from ranks are the CPU
``patch_cuda_autocast``        ``<script>.torch`` -> view whose ``amp.autocast("cuda", ...)`` is CPU autocast
                               (same dtype): BAGEL's bf16 language model needs it on CPU
``patch_nccl``                 ``<script>.dist`` -> view whose ``init_process_group("nccl")`` uses gloo
``patch_state_dict_offload``   ``<fsdp module>.FullStateDictConfig`` -> one with ``offload_to_cpu=False``
                               (FSDP's CPU offload of a full state dict fails when the parameters already live
                               on the CPU; the saved files are the same)
``patch_device_mesh``          ``<fsdp module>.init_device_mesh`` -> the same on the ``"cpu"`` device type
                               (HYBRID_SHARD)
=============================  ===============================================================================

They are the ``dryrun`` rows of :data:`bagel_sr.patches.registry.PATCHES` (``when``: ``ctx.dry_run``), applied by
``launch.main(..., dry_run=True)``; the registry's handle undoes them with the others. None is active outside the
dry run. ``<fsdp>`` is the checkout's ``train.fsdp_utils``; a loop without it (a DeepSpeed port) skips those.
"""
from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from bagel_sr.patches.undo import NOTHING, Undo, combine, replace_attribute

CPU = torch.device("cpu")
FSDP_MODULE = "train.fsdp_utils"


class NameView:
    """``base`` seen through ``overrides``: attribute lookups return the override if any, else ``base``'s."""

    def __init__(self, base: Any, overrides: Dict[str, Any]):
        self.__dict__["_base"], self.__dict__["_overrides"] = base, dict(overrides)

    def __getattr__(self, name: str) -> Any:
        overrides = self.__dict__["_overrides"]
        return overrides[name] if name in overrides else getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_base"], name, value)

    def __repr__(self) -> str:
        return f"<bagel_sr CPU view of {self.__dict__['_base']!r}: {sorted(self.__dict__['_overrides'])}>"


class CpuDeviceIndex(int):
    """What ``torch.cuda.device_count()`` returns in the dry run: 1, and ``rank % it`` is the CPU device."""

    def __new__(cls) -> "CpuDeviceIndex":
        return super().__new__(cls, 1)

    def __rmod__(self, other: int) -> torch.device:
        return CPU


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


CPU_CUDA = NameView(torch.cuda, dict(
    is_available=lambda: True,
    device_count=CpuDeviceIndex,
    set_device=_ignore,
    synchronize=_ignore,
    empty_cache=_ignore,
    current_device=lambda: CPU,
    get_device_name=lambda *a: "cpu (bagel-sr dry run)",
    max_memory_allocated=lambda *a, **k: 0,
    max_memory_reserved=lambda *a, **k: 0,
    memory_allocated=lambda *a, **k: 0,
    reset_peak_memory_stats=_ignore,
))


def cpu_autocast(device_type: str = "cuda", *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
    """``torch.amp.autocast`` with ``"cuda"`` read as ``"cpu"`` (dtype and ``enabled`` kept)."""
    return torch.amp.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def gloo_init_process_group(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``dist.init_process_group`` with ``nccl`` (or the default) replaced by ``gloo``."""
    if backend is None or "nccl" in str(backend):
        backend = "gloo"
    return dist.init_process_group(backend, *args, **kwargs)


def _require(module: ModuleType, name: str, why: str) -> None:
    if not hasattr(module, name):
        raise RuntimeError(
            f"bagel-sr dry run: {module.__name__} has no module-level name `{name}`, which the CPU patch for {why} "
            "replaces (BAGEL_CONTRACT.md, training loop). Your checkout differs from upstream here; the dry run "
            "cannot map this CUDA call to the CPU."
        )


def _cuda_queries_in(module: ModuleType) -> Undo:
    _require(module, "torch", "the CUDA assertion and device ids")
    return replace_attribute(module, "torch", NameView(module.torch, {"cuda": CPU_CUDA}))


def fsdp_module(ctx: Any) -> Optional[ModuleType]:
    """The checkout's ``train.fsdp_utils`` (None where the loop has none, e.g. a DeepSpeed port)."""
    if ctx.fsdp_module is None:
        try:
            ctx.fsdp_module = importlib.import_module(FSDP_MODULE)
        except ImportError:
            return None
    return ctx.fsdp_module


def patch_cuda_queries(ctx: Any) -> Undo:
    """``<script>.torch.cuda`` and ``<fsdp>.torch.cuda``: available, one device whose rank-derived index is the CPU,
    no-op sync and cache, memory statistics 0 (the CUDA assertion, device ids, FSDP's ``device_id``)."""
    undos = [_cuda_queries_in(ctx.train_module)]
    fsdp = fsdp_module(ctx)
    if fsdp is not None and hasattr(fsdp, "torch"):
        undos.append(_cuda_queries_in(fsdp))
    return combine(*undos)


def patch_cuda_autocast(ctx: Any) -> Undo:
    """``<script>.torch.amp.autocast("cuda", dtype=bf16)`` (and ``torch.autocast``) -> CPU autocast, same dtype."""
    module = ctx.train_module
    _require(module, "torch", "CUDA autocast")
    amp = NameView(torch.amp, {"autocast": cpu_autocast})
    return replace_attribute(module, "torch", NameView(module.torch, {"amp": amp, "autocast": cpu_autocast}))


def patch_nccl(ctx: Any) -> Undo:
    """``<script>.dist.init_process_group("nccl")`` -> gloo."""
    module = ctx.train_module
    _require(module, "dist", "the nccl process group")
    return replace_attribute(module, "dist", NameView(module.dist, {"init_process_group": gloo_init_process_group}))


def patch_state_dict_offload(ctx: Any) -> Undo:
    """``<fsdp>.FullStateDictConfig(..., offload_to_cpu=True)`` -> ``offload_to_cpu=False`` (where it is used)."""
    module = fsdp_module(ctx)
    if module is None or not hasattr(module, "FullStateDictConfig"):
        return NOTHING
    original = module.FullStateDictConfig

    def FullStateDictConfig(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (the name it replaces)
        kwargs["offload_to_cpu"] = False
        return original(*args, **kwargs)

    return replace_attribute(module, "FullStateDictConfig", FullStateDictConfig)


def patch_device_mesh(ctx: Any) -> Undo:
    """``<fsdp>.init_device_mesh("cuda", ...)`` -> the same mesh on ``"cpu"`` (HYBRID_SHARD; where it is used)."""
    module = fsdp_module(ctx)
    if module is None or not hasattr(module, "init_device_mesh"):
        return NOTHING
    original = module.init_device_mesh

    def init_device_mesh(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return original("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    return replace_attribute(module, "init_device_mesh", init_device_mesh)
