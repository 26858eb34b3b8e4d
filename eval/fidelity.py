"""Fidelity-aware sampling around any restorer: settings, K-sample posterior mean with a std map, data
consistency with the input, and where the std maps go.  Used by :mod:`bagel_sr.eval.infer` for both restorers."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image

from bagel_sr.errors import UserError
from bagel_sr.outputs import Ledger
from bagel_sr.restoration import aggregate

from .consistency import back_project


@dataclass
class FidelityArgs:
    """Sampling that keeps to the input; the defaults are the stock sampler."""

    start_t: float = 1.0
    one_step: bool = False
    num_samples: int = 1
    aggregate: str = "mean"
    data_consistency: bool = False
    dc_steps: int = 10


@dataclass
class Restored:
    """An output and, for an aggregate of several samples, its per-pixel standard deviation (H, W[, C]) in [0, 1]."""

    image: Image.Image
    std: Optional[np.ndarray] = None


def _unit(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _from_unit(x: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def posterior_restorer(restore: Callable[..., Image.Image], num_samples: int, how: str = "mean",
                       seed: int = 0) -> Callable[[Image.Image, str], "Restored"]:
    """``restore(image, instruction, seed=seed + j)`` for j < K -> :class:`Restored` (aggregate, per-pixel std)."""
    import torch

    def restore_k(image: Image.Image, instruction: str) -> Restored:
        runs = [_unit(restore(image, instruction, seed=seed + j)) for j in range(num_samples)]
        size = runs[0].shape
        runs = [r if r.shape == size else _unit(_from_unit(r).resize(size[1::-1], Image.BICUBIC)) for r in runs]
        center, std = aggregate(torch.from_numpy(np.stack(runs)), how)
        return Restored(_from_unit(center.numpy()), std.numpy().astype(np.float32))

    return restore_k


def project_on_input(result: Image.Image, degraded: Image.Image, degradations: list, steps: int) -> Tuple[Image.Image, str]:
    """Data consistency of an output with its input (``bagel_sr.eval.consistency``); (image, note; '' = applied)."""

    try:
        x, note = back_project(_unit(result), _unit(degraded), degradations, steps)
    except ValueError as e:  # an operator that does not fit this input (sizes)
        return result, f"not projected: {e}"
    return (result if note else _from_unit(x)), note


def save_std(std: np.ndarray, out: Path, pair_id: str, ledger: Optional[Ledger]) -> None:
    folder = out / "std"
    folder.mkdir(exist_ok=True)
    gray = std.mean(-1) if std.ndim == 3 else std
    for name in (f"std/{pair_id}.npy", f"std/{pair_id}.png"):
        if ledger is not None:
            ledger.record(name)
    np.save(folder / f"{pair_id}.npy", gray.astype(np.float32))
    peak = float(gray.max())
    Image.fromarray((gray / peak * 255.0 if peak > 0 else gray * 0).round().astype(np.uint8)).save(folder / f"{pair_id}.png")


def check_fidelity(f: FidelityArgs) -> None:
    if not 0.0 <= f.start_t <= 1.0:
        raise UserError(f"--start_t {f.start_t:g}: expected a flow time in [0, 1] (1 = from pure noise)")
    if f.num_samples < 1:
        raise UserError(f"--num_samples {f.num_samples}: expected an integer >= 1")
    if f.data_consistency and f.dc_steps < 1:
        raise UserError(f"--dc_steps {f.dc_steps}: expected an integer >= 1 with --data_consistency")
