"""Instruction text for each pair, from editable templates (``templates/instructions.yaml``)."""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .degradations import DEGRADATIONS
from .errors import ConfigError

TASKS = ("super_resolution", "slice_thickness", "denoise", "low_dose_ct", "deblur", "jpeg_artifacts", "restore")
_SCALE_TASKS = ("super_resolution", "slice_thickness")


def load_templates(path: str | Path | None = None) -> dict[str, Any]:
    """Read a templates YAML (default: the packaged one); check every task has a non-empty list."""
    if path is None:
        text = resources.files("bagel_sr.data").joinpath("templates/instructions.yaml").read_text(encoding="utf-8")
        where = "packaged templates/instructions.yaml"
    else:
        if not Path(path).is_file():
            raise ConfigError.bad_value("instructions.templates", str(path), "an existing YAML file")
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    data = yaml.safe_load(text) or {}
    for task in TASKS:
        variants = data.get(task)
        if not (isinstance(variants, list) and variants and all(isinstance(v, str) for v in variants)):
            raise ConfigError(f"instruction templates ({where}): key '{task}' must be a non-empty list of strings")
    if not isinstance(data.get("phrases"), dict):
        raise ConfigError(f"instruction templates ({where}): key 'phrases' must map task -> phrase")
    return data


def pair_tasks(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(task, fields)`` for each distinct task of a degradation chain, in chain order."""
    seen: dict[str, dict[str, Any]] = {}
    for rec in records:
        task = DEGRADATIONS[rec["name"]].task
        if task not in seen:
            seen[task] = {"scale": _fmt_scale(rec.get("scale", rec.get("factor")))}
    return list(seen.items())


def _fmt_scale(v: Any) -> str:
    if v is None:
        return ""
    return str(int(v)) if float(v) == int(v) else f"{float(v):g}"


def instructions_for(
    records: list[dict[str, Any]], templates: dict[str, Any], modality: str, noun: str, task: str = "auto"
) -> tuple[str, list[str]]:
    """``(task, variants)`` for one pair; ``task='auto'`` infers it from ``records``."""
    tasks = pair_tasks(records)
    scale = next((f["scale"] for _, f in tasks if f["scale"]), "")
    if task == "auto":
        task = tasks[0][0] if len(tasks) == 1 else "restore"
    fields = {"modality": {"CT": "CT", "MR": "MR"}.get(modality, ""), "noun": noun, "scale": scale}
    fields["tasks"] = " and ".join(templates["phrases"].get(t, t).format(**{**fields, **f}) for t, f in tasks)
    variants = [re.sub(r"\s+", " ", v.format(**fields)).strip() for v in templates[task]]
    return task, variants
