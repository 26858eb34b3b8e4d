"""Run a checkout's own, unchanged ``main()`` on CPU under ``torchrun`` with gloo: the dry run's patches.

Upstream ``main()`` (and forks of it) ask CUDA for a few things. Each patch below maps one of them to the CPU by
replacing one module-level name of the training script or of ``train.fsdp_utils`` with a *view* that differs from
the real object only in the named attributes. Nothing in torch itself is changed, so the rest of the process
(DataLoader, transformers, our own code) still sees the real CPU-only torch. Each function returns its undo.

=============================  ===============================================================================
``patch_cuda_queries``         ``<module>.torch`` -> view whose ``cuda`` says available, one device, no-op
                               ``set_device``/``synchronize``/``empty_cache``, memory statistics 0; its
                               ``device_count()`` is an index whose ``rank % index`` is ``torch.device("cpu")``,
                               so the device ids main() and fsdp_wrapper() derive from ranks are the CPU
``patch_cuda_autocast``        ``<module>.torch`` -> view whose ``amp.autocast("cuda", ...)`` is CPU autocast
                               (same dtype): BAGEL's bf16 language model needs it on CPU
``patch_nccl``                 ``<module>.dist`` -> view whose ``init_process_group("nccl")`` uses gloo
``patch_state_dict_offload``   ``<fsdp module>.FullStateDictConfig`` -> one with ``offload_to_cpu=False``
                               (FSDP's CPU offload of a full state dict fails when the parameters already live
                               on the CPU; the saved files are the same)
``patch_device_mesh``          ``<fsdp module>.init_device_mesh`` -> the same on the ``"cpu"`` device type
                               (HYBRID_SHARD)
=============================  ===============================================================================

``apply_cpu_main(train_module, fsdp_module)`` applies them all (each only where its name exists) and returns a
handle whose ``undo()`` restores every name. None of them is active outside the dry run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.distributed as dist

Undo = Callable[[], None]
CPU = torch.device("cpu")


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


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


CPU_CUDA = NameView(torch.cuda, dict(
    is_available=lambda: True,
    device_count=CpuDeviceIndex,
    set_device=_noop,
    synchronize=_noop,
    empty_cache=_noop,
    current_device=lambda: CPU,
    get_device_name=lambda *a: "cpu (bagel-sr dry run)",
    max_memory_allocated=lambda *a, **k: 0,
    max_memory_reserved=lambda *a, **k: 0,
    memory_allocated=lambda *a, **k: 0,
    reset_peak_memory_stats=_noop,
))


def cpu_autocast(device_type: str = "cuda", *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
    """``torch.amp.autocast`` with ``"cuda"`` read as ``"cpu"`` (dtype and ``enabled`` kept)."""
    return torch.amp.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def gloo_init_process_group(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``dist.init_process_group`` with ``nccl`` (or the default) replaced by ``gloo``."""
    if backend is None or "nccl" in str(backend):
        backend = "gloo"
    return dist.init_process_group(backend, *args, **kwargs)


def _replace_name(module: ModuleType, name: str, value: Any) -> Undo:
    """Set ``module.name = value`` (the name must exist); the undo restores the old value if still ours."""
    old = getattr(module, name)
    setattr(module, name, value)

    def undo() -> None:
        if getattr(module, name, None) is value:
            setattr(module, name, old)

    return undo


def _require(module: ModuleType, name: str, why: str) -> None:
    if not hasattr(module, name):
        raise RuntimeError(
            f"bagel-sr dry run: {module.__name__} has no module-level name `{name}`, which the CPU patch for {why} "
            "replaces (BAGEL_CONTRACT.md, training loop). Your checkout differs from upstream here; the dry run "
            "cannot map this CUDA call to the CPU."
        )


def patch_cuda_queries(module: ModuleType) -> Undo:
    """``module.torch.cuda``: available, one device whose rank-derived index is the CPU, no-op sync and cache."""
    _require(module, "torch", "the CUDA assertion and device ids")
    return _replace_name(module, "torch", NameView(module.torch, {"cuda": CPU_CUDA}))


def patch_cuda_autocast(module: ModuleType) -> Undo:
    """``module.torch.amp.autocast("cuda", dtype=bf16)`` -> CPU autocast with the same dtype."""
    _require(module, "torch", "CUDA autocast")
    amp = NameView(torch.amp, {"autocast": cpu_autocast})
    return _replace_name(module, "torch", NameView(module.torch, {"amp": amp}))


def patch_nccl(module: ModuleType) -> Undo:
    """``module.dist.init_process_group("nccl")`` -> gloo."""
    _require(module, "dist", "the nccl process group")
    return _replace_name(module, "dist", NameView(module.dist, {"init_process_group": gloo_init_process_group}))


def patch_state_dict_offload(module: ModuleType) -> Undo:
    """``module.FullStateDictConfig(..., offload_to_cpu=True)`` -> ``offload_to_cpu=False``."""
    _require(module, "FullStateDictConfig", "full-state-dict offload")
    original = module.FullStateDictConfig

    def FullStateDictConfig(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (the name it replaces)
        kwargs["offload_to_cpu"] = False
        return original(*args, **kwargs)

    return _replace_name(module, "FullStateDictConfig", FullStateDictConfig)


def patch_device_mesh(module: ModuleType) -> Undo:
    """``module.init_device_mesh("cuda", ...)`` -> the same mesh on ``"cpu"``."""
    _require(module, "init_device_mesh", "the HYBRID_SHARD device mesh")
    original = module.init_device_mesh

    def init_device_mesh(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return original("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    return _replace_name(module, "init_device_mesh", init_device_mesh)


#: (name, which module, patch) in the order applied; "script" = the training script, "fsdp" = train.fsdp_utils.
CPU_MAIN_PATCHES: List[Tuple[str, str, Callable[[ModuleType], Undo]]] = [
    ("patch_cuda_queries", "script", patch_cuda_queries),
    ("patch_cuda_autocast", "script", patch_cuda_autocast),
    ("patch_nccl", "script", patch_nccl),
    ("patch_cuda_queries", "fsdp", patch_cuda_queries),
    ("patch_state_dict_offload", "fsdp", patch_state_dict_offload),
    ("patch_device_mesh", "fsdp", patch_device_mesh),
]


@dataclass
class CpuMainHandle:
    """What :func:`apply_cpu_main` replaced (``"module.name"`` strings); ``undo()`` restores all, newest first."""

    applied: List[str] = field(default_factory=list)
    _undos: List[Undo] = field(default_factory=list)

    def undo(self) -> None:
        while self._undos:
            self._undos.pop()()
        self.applied.clear()


def apply_cpu_main(train_module: ModuleType, fsdp_module: ModuleType | None) -> CpuMainHandle:
    """Apply :data:`CPU_MAIN_PATCHES` to the training script and (if given) the checkout's FSDP helpers.

    The script must hold ``torch`` and ``dist`` (it calls ``torch.cuda``, ``torch.amp.autocast`` and
    ``dist.init_process_group`` through them); the FSDP module's names are patched where they exist (a DeepSpeed
    port has none). Raises RuntimeError naming a missing fact; on failure nothing stays patched.
    """
    handle = CpuMainHandle()
    targets = {"script": train_module, "fsdp": fsdp_module}
    try:
        for name, where, patch in CPU_MAIN_PATCHES:
            module = targets[where]
            if module is None:
                continue
            if where == "fsdp" and name != "patch_cuda_queries" and not hasattr(module, _TARGET_NAME[name]):
                continue
            handle._undos.append(patch(module))
            handle.applied.append(f"{module.__name__}: {name}")
    except BaseException:
        handle.undo()
        raise
    return handle


_TARGET_NAME = {"patch_state_dict_offload": "FullStateDictConfig", "patch_device_mesh": "init_device_mesh"}
