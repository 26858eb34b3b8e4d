"""A small ablation grid whose training and inference are stand-in scripts, for ``bagel_sr.eval.ablate``.

The stand-in training writes the pixel-loss weight as its "weights"; the stand-in inference takes ``infer``'s
flags and writes reference + noise that shrinks with the weight, a lower ``start_t`` and more samples.
"""
import sys
import textwrap

import numpy as np
import yaml
from PIL import Image

# Training stand-in: "weights" are the pixel-loss weight written to a file; every call is counted.
FAKE_TRAIN = textwrap.dedent("""
    import argparse, pathlib
    p = argparse.ArgumentParser()
    p.add_argument("--pixel_loss_weight", type=float, required=True); p.add_argument("--weights_file", required=True)
    a = p.parse_args()
    w = pathlib.Path(a.weights_file); w.parent.mkdir(parents=True, exist_ok=True)
    w.write_text(str(a.pixel_loss_weight))
    with open(w.parent / "train_count.txt", "a") as f:
        f.write("x")
""")


# Inference stand-in with infer's flags: outputs = reference + noise that shrinks with the weight, a lower start_t
# and more samples. Every call is counted next to its outputs folder; FAIL_ONCE makes one variant fail once.
FAKE_INFER = textwrap.dedent("""
    import argparse, pathlib, sys
    import numpy as np
    from PIL import Image
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", required=True); p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", required=True); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start_t", type=float, default=1.0); p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--aggregate", choices=("mean", "median"), default="mean")
    p.add_argument("--data_consistency", action="store_true")
    a = p.parse_args()
    out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"count_{out.name}.txt", "a") as f:
        f.write("x")
    fail = pathlib.Path(a.inputs).parent / "FAIL_ONCE"
    if a.start_t < 1 and a.num_samples > 1 and fail.exists():
        fail.unlink(); sys.exit(4)
    weight = float(pathlib.Path(a.checkpoint).read_text())
    sigma = 8 + 40 * a.start_t / (1 + 5 * weight) / a.num_samples ** 0.5
    rng = np.random.default_rng(a.seed)
    for ref in sorted(pathlib.Path(a.inputs).glob("*.png")):
        x = np.asarray(Image.open(ref), dtype=float)
        Image.fromarray(np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)).save(out / ref.name)
""")


def make_grid(tmp, **overrides):
    rng = np.random.default_rng(1)
    refs = tmp / "refs"
    refs.mkdir(exist_ok=True)
    for i in range(4):
        Image.fromarray(rng.integers(40, 200, (32, 32), dtype=np.uint8)).save(refs / f"p{i}.png")
    (tmp / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp / "fake_infer.py").write_text(FAKE_INFER)
    grid = {"name": "train x inference sweep", "base_command": [sys.executable, str(tmp / "fake_train.py")],
            "output_root": str(tmp / "runs"), "workdir": str(tmp),
            "common_flags": {"weights_file": "{run_dir}/weights.txt"},
            "grid": {"pixel_loss_weight": [0.0, 0.1]},
            "infer_grid": {"start_t": [1.0, 0.3], "num_samples": [1, 4]},
            "eval": {"infer_command": [sys.executable, str(tmp / "fake_infer.py"), "--inputs", str(refs),
                                       "--checkpoint", "{run_dir}/weights.txt", "--out", "{outputs}"],
                     "references": str(refs), "n_boot": 200, "grid_images": 1, "baseline": "weight0.0"}}
    grid.update(overrides)
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path
