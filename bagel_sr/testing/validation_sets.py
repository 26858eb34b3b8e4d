"""Test helper (not a test file): small built sets with a val split, from scikit-image's sample pictures."""
from __future__ import annotations

import pathlib

from bagel_sr.data import build_dataset
from bagel_sr.smoke.data import IMAGE_TRANSFORM_ARGS, VIT_TRANSFORM_ARGS, write_source_tiles


def build_val_set(folder: pathlib.Path, name: str = "valset", fractions: dict | None = None, seed: int = 1,
                  sources: pathlib.Path | None = None, heldout_png: bool = True) -> pathlib.Path:
    """Build 16 64x64 tiles (4 pictures) into ``folder``, split by picture (default half train, half val);
    returns the set's ``bagel_sr_dataset.yaml``."""
    sources = sources or write_source_tiles(folder / "sources", seed)
    summary = build_dataset({
        "name": name, "output_dir": str(folder / "built"), "seed": seed,
        "input": {"kind": "images", "path": str(sources)},
        "degradations": [{"name": "bicubic_downsample", "scale": 4}],
        "splits": {"fractions": fractions or {"train": 0.5, "val": 0.5}},
        "output": {"rows_per_row_group": 1, "heldout_png": heldout_png},
        "bagel": {"image_transform_args": IMAGE_TRANSFORM_ARGS, "vit_image_transform_args": VIT_TRANSFORM_ARGS},
    }, progress=False)
    return pathlib.Path(summary.registration_file)
