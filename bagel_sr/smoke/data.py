"""Tiny data for the dry run, from images that ship in pip packages (scikit-image's sample pictures).

- A paired super-resolution set built with ``bagel_sr.data``: 64x64 tiles in 4 "patients", x4 bicubic
  degradation, BAGEL editing parquet with small image transforms (a packed batch stays a few hundred tokens).
- A chat set in BAGEL's ``vlm_sft`` jsonl format (a tile and one question/answer each), *mandatory* in the mix:
  BAGEL's loop asserts ``not visual_und`` on a micro-batch without text-loss tokens and edit data have none, so
  with the ViT on (``--visual_und True``, BAGEL's default) every packed batch must hold a text-loss sample; a
  mandatory group is BAGEL's own way to guarantee one per batch. Train your own runs the same way.
"""
from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np
from PIL import Image

from typing import Optional

from bagel_sr.data import build_dataset
from bagel_sr.patches.undo import Undo, replace_item

SHIPPED_PICTURES = ("camera", "moon", "coins", "page")
TILE = 64
TILES_PER_PICTURE = 4
#: BAGEL ImageTransform arguments: 64-px VAE images (4x4 tokens), 56-px ViT images (4x4 patches).
IMAGE_TRANSFORM_ARGS = {"image_stride": 16, "max_image_size": 64, "min_image_size": 64}
VIT_TRANSFORM_ARGS = {"image_stride": 14, "max_image_size": 56, "min_image_size": 56}


def write_source_tiles(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """``folder/<picture>/tile<i>.png``: random 64x64 crops of scikit-image's grayscale sample pictures."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    for name in SHIPPED_PICTURES:
        image = np.asarray(getattr(skdata, name)())
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(TILES_PER_PICTURE):
            y = int(rng.integers(0, image.shape[0] - TILE))
            x = int(rng.integers(0, image.shape[1] - TILE))
            Image.fromarray(image[y:y + TILE, x:x + TILE]).save(folder / name / f"tile{i}.png")
    return folder


def build_smoke_dataset(workdir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Build the set under ``workdir/data``; returns its ``bagel_sr_dataset.yaml`` (for ``--bagel_sr_datasets``)."""
    sources = write_source_tiles(workdir / "data" / "sources", seed)
    out = workdir / "data" / "built"
    summary = build_dataset({
        "name": "bagel_sr_smoke", "output_dir": str(out), "seed": seed,
        "input": {"kind": "images", "path": str(sources)},
        "degradations": [{"name": "bicubic_downsample", "scale": 4}],
        "splits": {"fractions": {"train": 1.0}},
        "output": {"rows_per_row_group": 1, "heldout_png": False},
        "bagel": {"image_transform_args": IMAGE_TRANSFORM_ARGS, "vit_image_transform_args": VIT_TRANSFORM_ARGS},
    }, progress=False)
    return summary.registration_file


CHAT_NAME = "bagel_sr_smoke_chat"
CHAT_GROUP = "vlm_sft"


def write_chat_set(workdir: pathlib.Path, sources: pathlib.Path) -> dict:
    """``workdir/data/chat.jsonl`` over the source tiles; returns its ``DATASET_INFO['vlm_sft']`` entry."""
    tiles = sorted(p.relative_to(sources).as_posix() for p in sources.rglob("*.png"))
    lines = [json.dumps({"image": tile, "conversations": [
        {"from": "human", "value": "<image>\nWhich picture is this tile from?"},
        {"from": "gpt", "value": f"A tile of the {tile.split('/')[0]} picture."}]}) for tile in tiles]
    path = workdir / "data" / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return {"data_dir": str(sources), "jsonl_path": str(path), "num_total_samples": len(lines)}


def chat_group(num: int) -> dict:
    """The ``vlm_sft`` group of the dry run's ``--dataset_config_file`` (mandatory: one sample per batch)."""
    return {"dataset_names": [CHAT_NAME], "image_transform_args": VIT_TRANSFORM_ARGS,
            "frame_sampler_args": {"max_num_frames": 2, "min_num_frames": 1}, "is_mandatory": True,
            "num_used_data": [num], "weight": 0.5}


def build_smoke_data(workdir: pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """Both sets; returns ``(bagel_sr_dataset.yaml, dataset_config.yaml with both groups, chat entry JSON)``."""
    import yaml

    registration = build_smoke_dataset(workdir, seed)
    entry_path, group = write_chat_entry(workdir, workdir / "data" / "sources")
    config = yaml.safe_load(registration.with_name("dataset_config.yaml").read_text())
    config[CHAT_GROUP] = group
    config_path = workdir / "data" / "dataset_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return registration, config_path, entry_path


def write_chat_entry(workdir: pathlib.Path, sources: Optional[pathlib.Path] = None, seed: int = 0) -> tuple[pathlib.Path, dict]:
    """The chat set alone (tiles written first when ``sources`` is None); returns ``(chat entry JSON, its group)``."""
    if sources is None:
        sources = write_source_tiles(workdir / "data" / "chat_sources", seed)
    entry = write_chat_set(workdir, sources)
    entry_path = workdir / "data" / "chat_entry.json"
    entry_path.write_text(json.dumps({"group": CHAT_GROUP, "name": CHAT_NAME, "entry": entry}))
    return entry_path, chat_group(entry["num_total_samples"])


def register_chat_entry(entry_file: str) -> Undo:
    """Dry run only: add the chat set to the checkout's ``DATASET_INFO``; returns the undo."""
    spec = json.loads(pathlib.Path(entry_file).read_text())
    info = importlib.import_module("data.dataset_info").DATASET_INFO
    undo = Undo()
    if spec["group"] not in info:
        undo.add(spec["group"], replace_item(info, spec["group"], {}))
    undo.add(spec["name"], replace_item(info[spec["group"]], spec["name"], spec["entry"]))
    return undo
