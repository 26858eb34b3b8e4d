"""The demo's lesion line: are small lesions kept, and are none invented, on a lesion version of the held-out split?

Lesions (``bagel_sr.data.lesions``: disk, Gaussian, irregular; radius 1.5-5 px; contrast +-15-40% of the local
intensity; inside the body, not overlapping) go into the HR of ``n_images`` patches of the evaluated split (spread over it,
x2 and x4 alternating); each lesion patch has a lesion-free twin degraded with the same noise. Both arms restore
both in the chosen mode; ``bagel_sr.eval.lesions`` measures the truth, the bicubic input and the arms (detector
threshold: 0.25 false detections per image on each system's own twins; subjects = the patches' sources).
Everything is drawn from its own seeded generators, after the main results, so no number printed before changes.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from ..data import lesions as L
from ..eval import lesions as LS
from . import data
from .modes import Mode, parse_modes, sample_modes

LESIONS = {**L.DEFAULTS, "per_slice": [1, 2], "radius": [1.5, 5.0], "contrast_fraction": [0.15, 0.4]}
SEED = 31_000


def lesion_pairs(split: str = "heldout", n_images: int = 16, seed: int = SEED
                 ) -> tuple[LS.LesionSet, List[data.Sample], List[data.Sample]]:
    """(records, lesion samples, twin samples) of ``n_images`` fixed patches of ``split``; the i-th twin is the i-th
    lesion sample without its lesions (same scale, same noise, same instruction)."""
    patches = data.fixed_patches(split)
    idx = np.unique(np.linspace(0, len(patches) - 1, min(n_images, len(patches))).round().astype(int))
    images, lesions, with_l, twins = [], [], [], []
    for j, i in enumerate(idx):
        source, modality, hr = patches[i]
        rng = np.random.default_rng(seed + j)
        (lid, hr_l, block), (tid, hr_t, _) = L.variants(f"p{j}", np.asarray(hr, dtype=np.float64), LESIONS, rng,
                                                         "fraction", (0.0, 1.0))
        scale, sigma = data.SCALES[j % len(data.SCALES)], float(np.mean(data.NOISE_SIGMA))
        pair = []
        for img in (hr_l, hr_t):  # same instruction rng and noise generator state for both
            pair.append(data.make_pair(source, modality, img, scale, sigma, np.random.default_rng(seed + j),
                                       torch.Generator().manual_seed(seed + j)))
        with_l.append(pair[0])
        twins.append(pair[1])
        rec = {"pair_id": lid, "twin_id": tid, "subject": source, "body_threshold": block["body_threshold"]}
        images.append(rec)
        lesions += [{**r, "pair_id": lid, "subject": source} for r in block["records"]]
    return LS.LesionSet(images, lesions), with_l, twins


def _gray(x: torch.Tensor) -> np.ndarray:
    return data.to_unit_gray(x).double().numpy()


def run(restore: Dict[str, Callable[[Sequence[data.Sample]], torch.Tensor]], n_images: int = 16, seed: int = SEED,
        n_boot: int = 2000, split: str = "heldout") -> Dict:
    """Measure the truth, the bicubic input and each ``restore[name](samples) -> (N, 3, H, W)`` on the lesion bench;
    returns the summary table (records) and the headline numbers per system."""
    lesion_set, with_l, twins = lesion_pairs(split, n_images, seed)
    both = list(with_l) + list(twins)
    outputs = {name: fn(both) for name, fn in restore.items()}
    n = len(with_l)
    items = []
    for k, rec in enumerate(lesion_set.images):
        lesion = {"truth": _gray(with_l[k].target), "input": _gray(with_l[k].condition)}
        twin = {"truth": _gray(twins[k].target), "input": _gray(twins[k].condition)}
        for name, out in outputs.items():
            lesion[name], twin[name] = _gray(out[k]), _gray(out[n + k])
        items.append(LS.StudyImages(rec, lesion, twin))
    systems = ["truth", "input", *restore]
    per_lesion, per_image, dets = LS.measure(items, lesion_set, systems)
    summary = LS.summary_table(per_lesion, per_image, n_boot=n_boot, seed=0)
    return dict(split=split, n_images=n, n_lesions=len(lesion_set.lesions), n_subjects=int(per_image["subject"].nunique()),
                headline={s: LS.headline(summary, s) for s in systems}, summary=json.loads(summary.to_json(orient="records")),
                thresholds={s: float(d.threshold) for s, d in dets.items()})


def _cell(summary: List[Dict], system: str, metric: str, group: str) -> str:
    r = next(r for r in summary if r["system"] == system and r["metric"] == metric and r["group"] == group)
    return f"{r['mean']:.2f} [{r['ci_lo']:.2f}, {r['ci_hi']:.2f}]"


def format_lines(result: Dict, labels: Dict[str, str], mode: str, width: int = 30) -> str:
    """The printed lesion block: one line per system (bicubic input, then the arms)."""
    lines = [f"lesions ({mode}; {result['n_lesions']} lesions, r 1.5-5 px, contrast +-15-40%, in {result['n_images']} "
             f"{result['split']} patches + lesion-free twins, {result['n_subjects']} sources; detector LoG at the lesion's "
             f"scale, threshold for 0.25 false detections per image on each row's twins; mean [95% CI over sources])",
             f"{'':{width}}{'detected':>18}  {'contrast recovery':>18}  {'erased (CR<0.5)':>18}  {'invented / image':>18}"]
    for system, label in labels.items():
        s = result["summary"]
        lines.append(f"{label:{width}}{_cell(s, system, 'detected', 'all'):>18}  {_cell(s, system, 'cr', 'all'):>18}  "
                     f"{_cell(s, system, 'erased', 'all'):>18}  {_cell(s, system, 'invented', 'per image'):>18}")
    return "\n".join(lines)


def lesion_line(args, seed_result: Dict, models: Dict, vae, tokenizer) -> Dict:
    """Print and return the experiment's lesion line (``args``: its ``ExperimentArguments``): the bicubic input and
    both arms in the chosen mode (the stock sampler without modes). Torch's and numpy's global random states are
    restored afterwards."""
    mode = {m.name: m for m in parse_modes(args.sample_modes)}.get(seed_result.get("chosen_mode"), Mode())
    seed = seed_result["seed"]
    restore = {arm: (lambda s, m=models[arm]: sample_modes(m, vae, s, tokenizer, [mode], args, seed)[mode.name]["pred"])
               for arm in ("flow_only", "pixel")}
    t0, np_state = time.time(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        result = run(restore, args.lesion_images, split=args.eval_split)
    np.random.set_state(np_state)
    result["seconds"] = round(time.time() - t0, 1)
    labels = {"input": "LR input (bicubic up)", "flow_only": f"flow only, {mode.name}", "pixel": f"+ pixel, {mode.name}"}
    what = f"chosen mode {mode.name}" if "chosen_mode" in seed_result else f"stock sampler {mode.name}"
    print(format_lines(result, labels, f"seed {seed}, {what}") +
          f"\nlesion line: {result['seconds']:.0f} s", flush=True)
    return result
