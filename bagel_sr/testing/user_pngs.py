"""A user's folder of exported scans, made at test time: CT slices as 16-bit PNGs storing HU + 1024 in
``patientNN/`` folders, and MR magnitude images (12-bit values in 16-bit PNGs, 8-bit PNGs, 16-bit TIFFs)."""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import tifffile
import yaml
from PIL import Image


def phantom_hu(size: int, seed: int) -> np.ndarray:
    """(size, size) float HU: air outside, a soft-tissue body with a few brighter/darker blobs and bone."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    hu = np.full((size, size), -1000.0)
    hu[xx ** 2 / 0.16 + yy ** 2 / 0.12 < 1] = 40.0
    for _ in range(4):
        cx, cy, r = rng.uniform(-0.2, 0.2), rng.uniform(-0.15, 0.15), rng.uniform(0.03, 0.08)
        hu[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.choice([-100.0, 80.0, 200.0, 700.0])
    return hu + rng.normal(0, 5, hu.shape)


def make_ct_pngs(root: Path, patients: int = 4, slices: int = 3, size: int = 64) -> np.ndarray:
    """``root/patientNN/slice_KKK.png`` (uint16, value = HU + 1024); returns the HU of patient01 slice 0."""
    first = None
    for p in range(1, patients + 1):
        folder = root / f"patient{p:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(slices):
            hu = phantom_hu(size, 100 * p + k)
            first = hu if first is None else first
            stored = np.clip(np.round(hu + 1024), 0, 65535).astype(np.uint16)  # value = HU + 1024
            Image.fromarray(stored).save(folder / f"slice_{k:03d}.png")
    return first


def make_mr_images(root: Path, subjects: int = 4, size: int = 64) -> None:
    """``root/subjectNN/``: a 12-bit-in-16-bit PNG, an 8-bit PNG and a 16-bit TIFF of a magnitude image each."""
    for s in range(1, subjects + 1):
        folder = root / f"subject{s:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        mag = np.abs(phantom_hu(size, s) + 1000) / 1800  # ~[0, 1]
        Image.fromarray(np.round(np.clip(mag, 0, 1) * 4095).astype(np.uint16)).save(folder / "a_12bit.png")
        Image.fromarray(np.round(np.clip(mag, 0, 1) * 255).astype(np.uint8)).save(folder / "b_8bit.png")
        tifffile.imwrite(folder / "c_16bit.tif", np.round(np.clip(mag, 0, 1) * 65535).astype(np.uint16))


def template_copy(name: str, folder: Path, **changes) -> Path:
    """Copy a packaged build template into ``folder`` (as a user would with ``cp``), with top-level/dotted edits."""
    src = resources.files("bagel_sr.data").joinpath("templates", name)
    dest = folder / name
    shutil.copyfile(str(src), dest)
    if changes:
        cfg = yaml.safe_load(dest.read_text())
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            node = cfg
            for part in parents:
                node = node[part]
            node[leaf] = value
        dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest
