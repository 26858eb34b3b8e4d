"""Small inputs for the data builder, the evaluation and ``infer``: PNG trees, CT series, build configs, results.

Images are 2-D ``(h, w)`` arrays written as PNG (8-bit by default, 16-bit with ``dtype=np.uint16``); evaluation
folders hold ``.npy`` arrays in [0, 1].
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bagel_sr.data import build as build_mod
from bagel_sr.data import build_dataset


def png(path, value=100, size=(32, 32), dtype=np.uint8, seed=0):
    """One noisy ramp image at ``path`` (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    span = 1000 if dtype == np.uint16 else 0              # 16-bit: values value .. value + ~1000
    arr = (value + rng.integers(0, 20, size) + np.arange(size[1]) * span // size[1]).astype(dtype)
    Image.fromarray(arr).save(path)


def tree(root, rels, dtype=np.uint8, value=100):
    """A PNG at every relative path of ``rels`` under ``root``."""
    for i, rel in enumerate(rels):
        png(root / rel, value=value, dtype=dtype, seed=i)


def cfg_for(tmp, inp="imgs", out="out", **extra):
    """A build config reading ``tmp/inp`` and writing ``tmp/out``; ``extra`` mappings update its sections."""
    cfg = {"name": "t", "output_dir": str(tmp / out), "seed": 3, "input": {"kind": "images", "path": str(tmp / inp)},
           "degradations": [{"name": "bicubic_downsample", "scale": 2}],
           "splits": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}}}
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def manifest(out):
    """The rows of ``out/manifest.jsonl``."""
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def eval_folders(tmp, bad):
    """References ``tmp/r`` and outputs ``tmp/o`` of three pairs ``a0..a2.npy``; the outputs numbered in ``bad``
    hold one NaN or Inf."""
    refs, outs = tmp / "r", tmp / "o"
    refs.mkdir(exist_ok=True)
    outs.mkdir(exist_ok=True)
    for i in range(3):
        r = np.random.default_rng(i).random((16, 16))
        np.save(refs / f"a{i}.npy", r)
        o = r + 0.01
        if i in bad:
            o[2, 3] = np.nan if i % 2 else np.inf
        np.save(outs / f"a{i}.npy", o)
    return refs, outs


def infer_inputs(tmp: Path, n=4):
    """``n`` input images ``tmp/in/x<i>.png`` for ``infer``."""
    for i in range(n):
        png(tmp / "in" / f"x{i}.png", value=10 * i, seed=i)


def make_ct_series(folder, patient, n_slices=4, size=32, hu=40):
    """A fake CT series (CT_small.dcm as template): flat ``hu`` with a bright square, files named in reverse z."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(entropy_srcs=[patient, "study"]), generate_uid(entropy_srcs=[patient, "series"])
    for z in range(n_slices):
        ds = template.copy()
        hu_img = np.full((size, size), float(hu))
        hu_img[8:16, 8:16] = 200 + 10 * z
        ds.Rows, ds.Columns = size, size
        ds.PixelData = np.round(hu_img + 1024).astype(np.int16).tobytes()  # slope 1, intercept -1024
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[patient, str(z)])
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * z]
        ds.InstanceNumber = z + 1
        ds.save_as(folder / f"img{n_slices - z:03d}.dcm")


def two_runs(tmp, n=4, size=24):
    """``tmp/refs``, ``tmp/inputs`` and the outputs of two runs ``tmp/runs/{a,b}/outputs`` (a closer than b)."""
    rng = np.random.default_rng(0)
    for d in ("refs", "inputs", "runs/a/outputs", "runs/b/outputs"):
        (tmp / d).mkdir(parents=True)
    for i in range(n):
        ref = rng.integers(30, 220, (size, size)).astype(float)
        for d, sigma in (("refs", 0), ("inputs", 30), ("runs/a/outputs", 5), ("runs/b/outputs", 15)):
            img = np.clip(ref + rng.normal(0, sigma, ref.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp / d / f"img{i}.png")


def build_interrupted(monkeypatch, config, after_pairs: int) -> None:
    """Build ``config`` and stop it (``KeyboardInterrupt``, as Ctrl-C) when the builder asks for its
    ``after_pairs``-th source's pairs; the builder is whole again afterwards."""
    real, calls = build_mod.make_pairs, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == after_pairs:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "make_pairs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(config, progress=False)
    monkeypatch.setattr(build_mod, "make_pairs", real)
