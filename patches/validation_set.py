"""The val split of built bagel-sr sets, as validation during training reads it, and the one-line refusals that
stop a run before training: no val split, no held-out PNGs, fewer val images than asked, a val set the training
also reads (the limits the model's tables and token budget put on val images are checked when the model is built,
:mod:`bagel_sr.validation.fits`).

A built set (``python -m bagel_sr.data build``) lists its pairs in ``manifest.jsonl`` (``split``, ``pair_id``,
``instructions``, ``intensity``, ``source``) and keeps the held-out ones as ``heldout/val/{lr,hr}/<pair_id>.png``;
its ``dataset_config.yaml`` holds the image transforms training uses, which validation uses too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import yaml

from bagel_sr import dataset_layout as layout
from bagel_sr.errors import BadInput, MissingInput

from .datasets import _registration_file


@dataclass
class ValImage:
    """One val pair: the degraded input, its ground truth, the instruction (the manifest's first), intensity."""

    pair_id: str
    lr: Path
    hr: Path
    instruction: str
    intensity: Optional[dict] = None


@dataclass
class ValSet:
    """The val split of one built set; ``vae_args`` / ``vit_args``: its ``image_transform_args`` for BAGEL."""

    name: str
    registration: Path
    images: List[ValImage]
    vae_args: Dict[str, int]
    vit_args: Dict[str, int]
    val_name: str = ""
    sources: set = field(default_factory=set)


def _manifest_rows(reg: Path, meta: dict) -> Iterable[dict]:
    path = reg.parent / (meta.get("manifest") or layout.MANIFEST_FILE)
    if not path.is_file():
        raise MissingInput(f"{reg}: its manifest {path.name} is missing; rebuild the set with python -m bagel_sr.data build")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def source_key(reg: Path, row: dict) -> str:
    """What identifies a pair's source file across sets: the build's input folder and the source's id in it."""
    config = reg.parent / layout.CONFIG_COPY_FILE
    root = ""
    if config.is_file():
        root = str(((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("input") or {}).get("path", ""))
    return f"{Path(root).absolute() if root else reg.parent}::{(row.get('source') or {}).get('id', row.get('pair_id'))}"


def _transform_args(reg: Path, meta: dict) -> tuple[dict, dict]:
    config = reg.parent / meta.get("dataset_config_file", layout.DATASET_CONFIG_FILE)
    groups = yaml.safe_load(config.read_text(encoding="utf-8")) if config.is_file() else {}
    group = (groups or {}).get(meta.get("bagel_group", layout.BAGEL_GROUP)) or {}
    return dict(group.get("image_transform_args") or {}), dict(group.get("vit_image_transform_args") or {})


def load_val_set(path: str | Path) -> ValSet:
    """The val split of the built set at ``path`` (its YAML, its dataset_config.yaml or its folder)."""
    reg = _registration_file(path)
    meta = yaml.safe_load(reg.read_text(encoding="utf-8")) or {}
    name = str(meta.get("name", reg.parent.name))
    rows = [r for r in _manifest_rows(reg, meta) if r.get("split") == "val"]
    if not rows:
        raise BadInput(f"--bagel_sr_val_datasets {path}: the set '{name}' has no val split; rebuild it with "
                       "splits.fractions.val > 0 (python -m bagel_sr.data build)")
    heldout = reg.parent / (meta.get("heldout_dir") or layout.HELDOUT_DIR) / "val"

    def png(row: dict, kind: str) -> Path:  # the row's own record (what infer and evaluate read), else the layout's
        recorded = (row.get("heldout") or {}).get(kind)
        return reg.parent / recorded if recorded else heldout / kind / f"{row['pair_id']}.png"

    images = [ValImage(str(r["pair_id"]), png(r, "lr"), png(r, "hr"), str((r.get("instructions") or [""])[0]),
                       r.get("intensity")) for r in rows]
    missing = [im for im in images if not (im.lr.is_file() and im.hr.is_file())]
    if missing:
        raise MissingInput(f"--bagel_sr_val_datasets {path}: {len(missing)} val pair(s) have no held-out PNGs (e.g. "
                           f"{missing[0].lr}); rebuild the set with output.heldout_png: true")
    vae_args, vit_args = _transform_args(reg, meta)
    return ValSet(name, reg, images, vae_args, vit_args, layout.dataset_name_for(name, "val"),
                  {source_key(reg, r) for r in rows})


def training_sources(yamls: Sequence[str]) -> Dict[str, str]:
    """``{source key: set name}`` of the train split of every built set training registers."""
    out: Dict[str, str] = {}
    for path in yamls:
        reg = _registration_file(path)
        meta = yaml.safe_load(reg.read_text(encoding="utf-8")) or {}
        for row in _manifest_rows(reg, meta):
            if row.get("split") == "train":
                out[source_key(reg, row)] = str(meta.get("name", reg.parent.name))
    return out


def config_dataset_names(dataset_config_file: Optional[str]) -> List[str]:
    """Every ``dataset_names`` entry of a BAGEL ``--dataset_config_file`` (empty when there is none)."""
    if not dataset_config_file or not Path(dataset_config_file).is_file():
        return []
    groups = yaml.safe_load(Path(dataset_config_file).read_text(encoding="utf-8")) or {}
    return [str(n) for g in groups.values() if isinstance(g, dict) for n in (g.get("dataset_names") or [])]


def check_val_sets(sets: Sequence[ValSet], images: int, train_yamls: Sequence[str] = (),
                   dataset_config_file: Optional[str] = None) -> None:
    """Refuse (one line) more val images than the splits hold and a val split training also reads."""
    total = sum(len(s.images) for s in sets)
    if images > total:
        raise BadInput(f"--bagel_sr_val_images {images}: the val split(s) hold only {total} image(s); ask for at most {total}")
    trained = set(config_dataset_names(dataset_config_file))
    for s in sets:
        if s.val_name in trained:
            raise BadInput(f"--bagel_sr_val_datasets: the val split '{s.val_name}' is also a training set in "
                           f"{dataset_config_file}; validate on data training does not see (remove it there)")
    sources = training_sources(train_yamls)
    for s in sets:
        shared = sorted(k for k in s.sources if k in sources)
        if shared:
            raise BadInput(f"--bagel_sr_val_datasets: the val split of '{s.name}' shares {len(shared)} source file(s) "
                           f"with the training set '{sources[shared[0]]}' (e.g. {shared[0].split('::')[-1]}); "
                           "validate on files training does not see")
