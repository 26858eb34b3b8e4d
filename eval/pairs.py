"""Which output belongs to which reference: pairs from two folders (matched by file stem) or from the data
builder's ``manifest.jsonl`` (an output is ``OUTPUTS/<pair_id>.<png|tif|tiff|npy>``; references, degraded inputs
and degradation steps come from the rows).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bagel_sr.errors import BadInput, MissingInput

from .images import find_by_stem, list_images


@dataclass
class Pair:
    """One output/reference pair; ``degraded`` and ``degradations`` enable data consistency."""

    pair_id: str
    output: Path
    reference: Path
    degraded: Path | None = None
    degradations: list = field(default_factory=list)
    volume_id: str | None = None
    slice_index: int | None = None
    intensity: dict | None = None  # the builder's mapping: 8-bit pixel p -> low + p / 255 * (high - low)
    subject: str | None = None  # the patient/subject (the builder's split group), when known


def _missing_error(what: str, missing: Sequence[str], where: str, hint: str = "") -> MissingInput:
    shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
    return MissingInput(f"{len(missing)} {what} missing in {where}: {shown}. {hint}"
                             "Fix the folders or pass --allow_missing to evaluate the pairs that exist.")


def _volume_from_stem(stem: str, pattern: str | None) -> tuple[str | None, int | None]:
    if not pattern:
        return None, None
    m = re.fullmatch(pattern, stem)
    if not m:
        return stem, None
    g = m.groupdict()
    return g.get("volume", stem), int(g["slice"]) if g.get("slice") is not None else None


def pairs_from_folders(outputs: str | Path, references: str | Path, inputs: str | Path | None = None,
                       degradations: list | None = None, volume_pattern: str | None = None,
                       allow_missing: bool = False) -> list[Pair]:
    """Match ``outputs`` and ``references`` (and optional degraded ``inputs``) by relative path without suffix.

    ``volume_pattern``: a regex with named groups ``volume`` (and optionally ``slice``) matched against the stem.
    """
    outs, refs = list_images(outputs), list_images(references)
    outs = {k: v for k, v in outs.items() if not k.startswith("std/")}  # infer's std maps, not outputs
    ins = list_images(inputs) if inputs else {}
    missing = sorted(set(refs) - set(outs))
    if missing and not allow_missing:
        raise _missing_error("outputs", missing, str(outputs))
    extra = sorted(set(outs) - set(refs))
    if extra:
        warnings.warn(f"{len(extra)} outputs have no reference and are ignored: {', '.join(extra[:10])}")
    pairs = []
    for stem in sorted(set(refs) & set(outs)):
        vol, sl = _volume_from_stem(stem, volume_pattern)
        pairs.append(Pair(stem, outs[stem], refs[stem], ins.get(stem), list(degradations or []), vol, sl))
    if not pairs:
        raise MissingInput(f"no output in {outputs} matches a reference in {references} by file stem")
    return pairs


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines manifest (blank lines ignored)."""
    if not Path(path).is_file():
        raise MissingInput(f"--manifest {path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadInput(f"{path} line {n} is not JSON ({e.msg}); expected one JSON object per line") from None
    return rows


def _volume_and_slice(row: dict) -> tuple[str | None, int | None]:
    """Volume id and slice index of a row: ``volume_id``/``slice_index`` fields, or the builder's ``source``
    (a dict with ``id``, ``slice_index``, ``num_slices``; a volume only when it has several slices), or a
    ``source`` string with a slice index."""
    src = row.get("source")
    sl = row.get("slice_index", row.get("slice"))
    if isinstance(src, dict):
        sl = src.get("slice_index") if sl is None else sl
        vol = row.get("volume_id") or (src.get("id") if (src.get("num_slices") or 1) > 1 else None)
    else:
        vol = row.get("volume_id") or (src if sl is not None else None)
    return (None if vol is None else str(vol)), (None if sl is None else int(sl))


def _row_paths(row: dict, root: Path) -> tuple[Path, Path | None]:
    """Reference and degraded-input paths: ``hr_path``/``lr_path``, or the builder's ``heldout`` {hr, lr} PNGs."""
    held = row.get("heldout") or {}
    hr, lr = row.get("hr_path") or held.get("hr"), row.get("lr_path") or held.get("lr")
    if not hr:
        raise BadInput(f"manifest row {row.get('pair_id')!r} (split {row.get('split')!r}) names no reference: "
                         "it needs hr_path or heldout.hr (the builder writes held-out PNGs for val and test only)")
    return root / hr, (root / lr if lr else None)


def pairs_from_manifest(outputs: str | Path, manifest: str | Path, split: str | None = None,
                        allow_missing: bool = False) -> list[Pair]:
    """Pairs of the manifest rows (of ``split`` if given); paths in rows are relative to the manifest's folder."""
    root = Path(manifest).parent
    rows = [r for r in read_manifest(manifest) if split is None or r.get("split") == split]
    if not rows:
        raise BadInput(f"no rows in {manifest}" + (f" with split={split!r}" if split else ""))
    pairs, missing = [], []
    for r in rows:
        out = find_by_stem(outputs, str(r["pair_id"]))
        if out is None:
            missing.append(str(r["pair_id"]))
            continue
        vol, sl = _volume_and_slice(r)
        hr, lr = _row_paths(r, root)
        pairs.append(Pair(str(r["pair_id"]), out, hr, lr, list(r.get("degradations") or []), vol, sl,
                          r.get("intensity"), None if r.get("group") is None else str(r["group"])))
    if missing and not allow_missing:
        hint = "" if split else "Rows of every split were read; pass --split test to restrict them. "
        raise _missing_error("outputs", missing, str(outputs), hint)
    if not pairs:
        raise MissingInput(f"no outputs for manifest rows in {outputs}")
    return pairs


def collect_pairs(outputs: str | Path, references: str | Path | None = None, manifest: str | Path | None = None,
                  split: str | None = None, inputs: str | Path | None = None, degradations: list | None = None,
                  volume_pattern: str | None = None, allow_missing: bool = False) -> list[Pair]:
    """Pairs from a manifest when given, otherwise from the two folders."""
    if manifest:
        return pairs_from_manifest(outputs, manifest, split, allow_missing)
    if not references:
        raise BadInput("pass --references DIR (folder mode) or --manifest manifest.jsonl")
    return pairs_from_folders(outputs, references, inputs, degradations, volume_pattern, allow_missing)
