"""What the GPU check's numbers were measured on: GPUs, driver, CUDA, cuDNN, NCCL, torch, flash-attn (or why it
is absent), transformers, the checkout. Imports nothing of the checkout."""
from __future__ import annotations

import os
import pathlib
import platform
import subprocess
from typing import Dict


def environment(device: str, bagel_root: str) -> Dict[str, str]:
    """What the numbers were measured on; imports nothing of the checkout."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        count = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(count)]
        memory = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
        env.update(gpus=f"{count} x {', '.join(sorted(set(names)))} ({memory:.0f} GiB each)",
                   cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()), nccl=_nccl(),
                   driver=_driver())
    else:
        env["cpus"] = str(os.cpu_count())
    env["flash_attn"] = _flash_attn()
    for name in ("transformers", "accelerate", "safetensors"):
        env[name] = _version(name)
    env["checkout"] = _checkout_id(bagel_root)
    return env


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _flash_attn() -> str:
    version = _version("flash-attn")
    if version != "not installed":
        return version
    return ("not installed: BAGEL's training attention (nested masks) runs on torch SDPA; the ViT's varlen "
            "attention runs on bagel-sr's plain-torch stand-in")


def _nccl() -> str:
    try:
        import torch.cuda.nccl as nccl

        version = nccl.version()
        return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception as error:  # a torch built without NCCL
        return f"unavailable ({type(error).__name__})"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def _checkout_id(root: str) -> str:
    path = pathlib.Path(root).expanduser().resolve()
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=20)
        if head.returncode == 0 and head.stdout.strip():
            return f"{path.name} at {head.stdout.strip()}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{path.name} (not a git checkout)"
