"""The dry run's CUDA mapping wherever a checkout asks for it: forks' own wrappers, devices and launchers on CPU.

:mod:`.cpu_main` maps the names upstream's script and ``train.fsdp_utils`` use. Forks ask CUDA for more, in their
own helpers: ``model.cuda(device_id)``, ``.to("cuda:N")``, ``torch.device("cuda", i)``, factory calls with
``device=...``, ``DistributedDataParallel(vae, device_ids=[i])``, ``FSDP(..., device_id=i)``,
``torch.cuda.set_device`` in other modules, ``torch.distributed.init_process_group("nccl")`` or
``deepspeed.init_distributed(dist_backend="nccl")``. Each function below maps one family to the CPU and returns
its undo; they are the ``dryrun`` rows of :data:`bagel_sr.patches.registry.PATCHES` after those of
:mod:`.cpu_main` (``when``: ``ctx.dry_run``), so none is ever active in a real run.

=================================  ==========================================================================
``patch_cuda_tensors``             a torch function mode, entered in the thread that runs ``main()``: any torch
                                   call given a CUDA device (``device=``, ``Tensor.to``) gets the CPU,
                                   ``Tensor.cuda`` (hence ``Module.cuda``) returns the tensor on the CPU
``patch_parallel_device_ids``      ``DistributedDataParallel.__init__`` drops ``device_ids``/``output_device``,
                                   ``FullyShardedDataParallel.__init__`` reads an int or CUDA ``device_id`` as
                                   the CPU
``patch_checkout_torch``           every other loaded module of the checkout holding ``torch``: the same view
                                   as the script's (``torch.cuda`` queries, ``set_device``, CUDA autocast)
``patch_process_group_backend``    ``torch.distributed.init_process_group`` (and checkout names bound to it):
                                   ``nccl`` -> ``gloo``
``patch_deepspeed_init``           ``deepspeed.init_distributed`` (where the script imported deepspeed):
                                   ``dist_backend="nccl"`` -> ``gloo``
=================================  ==========================================================================

What stays unmapped (a CUDA-only kernel, ``torch.cuda.Stream``/``Event``, a CUDA extension, a module imported
only once ``main()`` runs) fails in the launch; the dry run then names the checkout's file:line that asked
(:mod:`.launch_errors`).
"""
from __future__ import annotations

import contextlib
import inspect
import pathlib
import sys
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode

from bagel_sr.patches.checkout import MARKER_FILES
from bagel_sr.patches.undo import NOTHING, Undo, combine, replace_attribute

from .cpu_main import CPU, CPU_CUDA, NameView, cpu_autocast

DEEPSPEED_MODULES = ("deepspeed", "deepspeed.comm", "deepspeed.comm.comm")


def is_cuda(device: Any) -> bool:
    """A CUDA device as torch takes one: ``torch.device('cuda', i)``, ``'cuda'``, ``'cuda:N'``."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0].strip() == "cuda"


def _device_index(value: Any) -> bool:
    """An int that a device argument reads as a CUDA index (bools are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


class CudaToCpu(TorchFunctionMode):
    """Torch calls of the thread it is entered in see the CPU wherever they are given a CUDA device."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0].to(CPU, non_blocking=bool(kwargs.get("non_blocking", False)))
        if func is torch.Tensor.pin_memory:  # pinned host memory needs a CUDA driver
            return args[0]
        if "device" in kwargs and (is_cuda(kwargs["device"]) or _device_index(kwargs["device"])):
            kwargs = dict(kwargs, device=CPU)
        if func is torch.Tensor.to and len(args) > 1 and (is_cuda(args[1]) or _device_index(args[1])):
            args = (args[0], CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def function_modes() -> Dict[str, tuple]:
    """The torch function modes in force (the registry's reading of ``patch_cuda_tensors``)."""
    return {"modes": tuple(torch.overrides._get_current_function_mode_stack())}


def patch_cuda_tensors(ctx: Any) -> Undo:
    """Enter :class:`CudaToCpu`: ``Module.cuda``/``Tensor.cuda``, ``.to("cuda[:N]")``, ``device=cuda`` to the CPU."""
    mode = CudaToCpu()
    mode.__enter__()

    def undo() -> None:
        if mode in torch.overrides._get_current_function_mode_stack():
            mode.__exit__(None, None, None)

    return Undo(undo, "CudaToCpu")


def _rebind(original: Callable, change: Callable[[inspect.BoundArguments], None]) -> Callable:
    signature = inspect.signature(original)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        change(bound)
        original(*bound.args, **bound.kwargs)

    init.__wrapped__ = original
    return init


def _drop_ddp_devices(bound: inspect.BoundArguments) -> None:
    for name in ("device_ids", "output_device"):
        if bound.arguments.get(name) is not None:
            bound.arguments[name] = None


def _fsdp_device_on_cpu(bound: inspect.BoundArguments) -> None:
    device = bound.arguments.get("device_id")
    if is_cuda(device) or _device_index(device):
        bound.arguments["device_id"] = CPU


def parallel_inits() -> Dict[str, Any]:
    """The ``__init__`` of DDP and FSDP (the registry's reading of ``patch_parallel_device_ids``)."""
    return {"ddp": vars(DistributedDataParallel)["__init__"], "fsdp": vars(FullyShardedDataParallel)["__init__"]}


def patch_parallel_device_ids(ctx: Any) -> Undo:
    """DDP without ``device_ids``/``output_device`` (a CPU module takes none); FSDP's ``device_id`` on the CPU."""
    undos = [replace_attribute(DistributedDataParallel, "__init__",
                               _rebind(DistributedDataParallel.__init__, _drop_ddp_devices)),
             replace_attribute(FullyShardedDataParallel, "__init__",
                               _rebind(FullyShardedDataParallel.__init__, _fsdp_device_on_cpu))]
    return combine(*undos)


def checkout_root(ctx: Any) -> Optional[pathlib.Path]:
    """The checkout the training script belongs to: the first parent folder holding BAGEL's marker files."""
    script = getattr(ctx.train_module, "__file__", None)
    for parent in pathlib.Path(script).resolve().parents if script else ():
        if all((parent / rel).is_file() for rel in MARKER_FILES):
            return parent
    return None


def checkout_modules(ctx: Any) -> Iterator[ModuleType]:
    """The loaded modules whose file lies in the checkout (the training script included)."""
    root = checkout_root(ctx)
    if root is None:
        return
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(module, ModuleType) and path and pathlib.Path(path).resolve().is_relative_to(root):
            yield module


def checkout_torch_names(ctx: Any) -> Dict[str, Any]:
    """``module name -> its torch`` of the checkout (the registry's reading of ``patch_checkout_torch``)."""
    return {m.__name__: vars(m).get("torch") for m in checkout_modules(ctx) if "torch" in vars(m)}


def patch_checkout_torch(ctx: Any) -> Undo:
    """Every loaded module of the checkout whose ``torch`` is still torch itself sees torch through a view whose
    ``cuda`` is the dry run's (queries, ``set_device``) and whose CUDA autocast is CPU autocast."""
    amp = NameView(torch.amp, {"autocast": cpu_autocast})
    view = NameView(torch, {"cuda": CPU_CUDA, "amp": amp, "autocast": cpu_autocast})
    return combine(*[replace_attribute(m, "torch", view) for m in checkout_modules(ctx) if vars(m).get("torch") is torch])


def process_group_names(ctx: Any) -> Dict[str, Any]:
    """``torch.distributed.init_process_group`` and checkout names bound to it (``patch_process_group_backend``)."""
    names = {"torch.distributed": dist.init_process_group}
    names.update({m.__name__: vars(m)["init_process_group"] for m in checkout_modules(ctx)
                  if "init_process_group" in vars(m)})
    return names


def _gloo_for_nccl(original: Callable, name: str) -> Callable:
    signature = inspect.signature(original)

    def init(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        backend = bound.arguments.get(name)
        if backend is None or "nccl" in str(backend):
            bound.arguments[name] = "gloo"
        if is_cuda(bound.arguments.get("device_id")) or _device_index(bound.arguments.get("device_id")):
            bound.arguments["device_id"] = None  # a gloo group binds no CUDA device
        return original(*bound.args, **bound.kwargs)

    init.__wrapped__ = original
    return init


def patch_process_group_backend(ctx: Any) -> Undo:
    """``torch.distributed.init_process_group`` with ``nccl`` (or no backend) uses gloo, however the checkout
    reaches it (``torch.distributed.…``, ``dist.…`` or a name imported from it)."""
    original = dist.init_process_group
    gloo = _gloo_for_nccl(original, "backend")
    undos = [replace_attribute(dist, "init_process_group", gloo)]
    undos += [replace_attribute(m, "init_process_group", gloo) for m in checkout_modules(ctx)
              if vars(m).get("init_process_group") is original]
    return combine(*undos)


def deepspeed_names(ctx: Any) -> Dict[str, Any]:
    """``deepspeed.init_distributed`` where loaded (the registry's reading of ``patch_deepspeed_init``)."""
    return {name: vars(sys.modules[name]).get("init_distributed") for name in DEEPSPEED_MODULES if name in sys.modules}


def patch_deepspeed_init(ctx: Any) -> Undo:
    """``deepspeed.init_distributed(dist_backend="nccl")`` (or none) initialises gloo; only where the checkout
    imported deepspeed (a DeepSpeed script), nothing is imported here."""
    if "deepspeed" not in sys.modules or not hasattr(sys.modules["deepspeed"], "init_distributed"):
        return NOTHING
    original = sys.modules["deepspeed"].init_distributed
    gloo = _gloo_for_nccl(original, "dist_backend")
    holders: List[ModuleType] = [sys.modules[n] for n in DEEPSPEED_MODULES if n in sys.modules]
    holders += list(checkout_modules(ctx))
    return combine(*[replace_attribute(m, "init_distributed", gloo) for m in holders
                 if vars(m).get("init_distributed") is original])


@contextlib.contextmanager
def cuda_mapped() -> Iterator[None]:
    """Tests: :class:`CudaToCpu` and the DDP/FSDP device mapping in force within the block."""
    undos = [patch_cuda_tensors(None), patch_parallel_device_ids(None)]
    try:
        yield
    finally:
        combine(*undos)()
