"""Inference modes of the demo's sampler: where sampling starts (``T0``), how many samples are averaged (``K``),
back-projection onto the input (``+DC``), one Euler step to the clean estimate; their parser, the choice of a
mode on the val split, and sampling every mode of a list with shared runs. The experiment and its lesion line
both use them."""
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import BadInput
from ..eval.stats import bootstrap_ci
from ..restoration import aggregate, visited_times
from . import sampling


@dataclass(frozen=True)
class Mode:
    """An inference mode: start time, samples averaged (mean), data consistency on/off, one Euler step from the
    start to 0 (the model's clean estimate) instead of the rest of the grid."""

    start_t: float = 1.0
    num_samples: int = 1
    dc: bool = False
    one_step: bool = False

    @property
    def name(self) -> str:
        return f"T0={self.start_t:g} K={self.num_samples}{' one-step' if self.one_step else ''}{' +DC' if self.dc else ''}"

    def evaluations(self, steps: int, timestep_shift: float) -> int:
        """Model evaluations per image on the sampler's grid of ``steps`` steps."""
        times = visited_times(sampling.sampler_grid(steps, timestep_shift), self.start_t, self.one_step)
        return self.num_samples * (len(times) - 1)


def parse_modes(text: str) -> List[Mode]:
    """``"1:1:0,0.3:4:1,0.3:8:0:1"`` -> modes; a ``BadInput`` for anything else."""
    modes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            fields = item.split(":")
            if len(fields) not in (3, 4):
                raise ValueError
            mode = Mode(float(fields[0]), int(fields[1]), bool(int(fields[2])),
                        bool(int(fields[3])) if len(fields) == 4 else False)
        except ValueError:
            raise BadInput(f"--sample_modes {item!r}: expected START_T:NUM_SAMPLES:DC[:ONE_STEP], e.g. 0.3:4:1 or "
                           "0.3:8:0:1") from None
        if not (0.0 <= mode.start_t <= 1.0 and mode.num_samples >= 1):
            raise BadInput(f"--sample_modes {item!r}: START_T in [0, 1], NUM_SAMPLES >= 1")
        if mode.name in {m.name for m in modes}:
            raise BadInput(f"--sample_modes: {item!r} appears twice")
        modes.append(mode)
    return modes


def choose_mode(val_psnr: Dict[str, Sequence[float]], modes: Sequence[Mode], steps: int, timestep_shift: float) -> str:
    """The mode chosen on the val split: among the modes whose per-image PSNR difference to the best mode (by mean)
    has a bootstrap 95% interval reaching 0 (as good as the best, within the noise of the split), the one with the
    fewest model evaluations per image, then without DC, then the best mean.  ``val_psnr``: mode name -> per-image
    PSNR on val, the same images in the same order."""

    best = max(val_psnr, key=lambda n: float(np.mean(val_psnr[n])))
    tied = [m for m in modes if m.name in val_psnr and
            bootstrap_ci(np.asarray(val_psnr[m.name]) - np.asarray(val_psnr[best]), n_boot=2000, seed=0).hi >= 0]
    return min(tied, key=lambda m: (m.evaluations(steps, timestep_shift), m.dc, -float(np.mean(val_psnr[m.name])))).name


def sample_modes(model, vae, pairs, tokenizer, modes: Sequence[Mode], args, seed: int,
                 stock: Optional[tuple] = None) -> Dict[str, Dict]:
    """Predictions and sampling seconds of every mode.  Modes that differ only in K share one set of runs: the
    K-sample mode averages the first K of the largest K's runs (seeds ``seed .. seed + K - 1``, as
    :func:`sampling.posterior_samples`; its seconds are that set's times K / K_max), and modes that differ only in
    DC share their samples.  ``stock``: ``(prediction, seconds)`` of the stock sampler on ``pairs`` with this seed,
    reused for ``T0=1 K=1`` (the same sample: one run from noise, its mean is itself)."""

    largest: Dict[tuple, int] = {}
    for mode in modes:
        key = (mode.start_t, mode.one_step)
        largest[key] = max(largest.get(key, 0), mode.num_samples)
    out, runs = {}, {}
    for mode in modes:
        key = (mode.start_t, mode.one_step)
        if stock is not None and key == (1.0, False) and mode.num_samples == 1:
            pred, seconds = stock
        else:
            if key not in runs:
                t0 = time.time()
                runs[key] = (sampling.euler_runs(model, vae, pairs, tokenizer, seeds=range(seed, seed + largest[key]),
                                                 steps=args.sample_steps, timestep_shift=args.sample_timestep_shift,
                                                 start_t=mode.start_t, one_step=mode.one_step, clamp=False),
                             time.time() - t0)
            all_runs, all_seconds = runs[key]
            pred = aggregate(all_runs[: mode.num_samples], "mean")[0].clamp(-1, 1)
            seconds = all_seconds * mode.num_samples / largest[key]
        if mode.dc:
            t0 = time.time()
            pred = sampling.back_project(pred, pairs)
            seconds += time.time() - t0
        out[mode.name] = dict(pred=pred, seconds=seconds)
    return out
