"""Build config: load the YAML, validate every key (errors name the key, the value and what is allowed).

Relative paths in a YAML file resolve against the file's folder; in a dict passed to the API,
against ``base_dir`` (default: the current directory). See ``docs/data.md`` for the reference.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .degradations import DegradationStep, validate_step
from .errors import ConfigError
from .intensity import CT_WINDOWS, INTENSITY_MODES
from .lesions import validate_config as validate_lesions
from .instructions import TASKS

INPUT_KINDS = ("images", "dicom", "nifti")
MODALITIES = ("auto", "CT", "MR", "other")
GROUP_BY = ("auto", "subject", "patient", "study", "series", "regex", "parent_dir", "file")
#: Groupings read from DICOM tags only (``patient`` is the PatientID for DICOM, the subject folder otherwise).
DICOM_ONLY_GROUP_BY = ("study", "series")

DEFAULTS: dict[str, Any] = {
    "name": None,
    "output_dir": None,
    "seed": 0,
    "input": {
        "kind": None,
        "path": None,
        "modality": "auto",
        "slice_axis": 2,
        "slice_step": 1,
        "slice_margin": 0.0,
        "skip_blank_slices": True,
        "volume_index": 0,
        "rescale": {"slope": 1.0, "intercept": 0.0},
        "color": "gray",
        "bits_stored": None,
    },
    "intensity": {"mode": "auto", "window": "abdomen", "percentiles": [0.0, 99.5], "range": None},
    "degradations": None,
    "splits": {"fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "group_by": "auto", "group_regex": None, "seed": None},
    "instructions": {"templates": None, "task": "auto"},
    "output": {"size_multiple": 16, "rows_per_shard": 256, "rows_per_row_group": 16, "heldout_png": True},
    "bagel": {
        "image_transform_args": {"image_stride": 16, "max_image_size": 1024, "min_image_size": 256},
        "vit_image_transform_args": {"image_stride": 14, "max_image_size": 518, "min_image_size": 224},
        "num_used_data": None,
        "weight": 1,
        "is_mandatory": True,
        "world_size": 2,
        "num_workers": 1,
    },
    "lesions": None,  # synthetic lesions (bagel_sr/data/lesions.py); validated there
}


@dataclass(frozen=True)
class BuildConfig:
    """A validated build config. ``data`` is the full normalised mapping (defaults filled in)."""

    data: dict[str, Any]
    degradations: tuple[DegradationStep, ...]
    base_dir: Path = field(default_factory=Path.cwd)

    # -- convenient views -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def seed(self) -> int:
        return self.data["seed"]

    @property
    def output_dir(self) -> Path:
        return Path(os.path.normpath((self.base_dir / self.data["output_dir"]).absolute()))

    @property
    def input_path(self) -> Path:
        return Path(os.path.normpath((self.base_dir / self.data["input"]["path"]).absolute()))

    @property
    def input(self) -> dict[str, Any]:
        return self.data["input"]

    @property
    def intensity(self) -> dict[str, Any]:
        return self.data["intensity"]

    @property
    def splits(self) -> dict[str, Any]:
        return self.data["splits"]

    @property
    def output(self) -> dict[str, Any]:
        return self.data["output"]

    @property
    def bagel(self) -> dict[str, Any]:
        return self.data["bagel"]

    @property
    def templates_path(self) -> Path | None:
        t = self.data["instructions"]["templates"]
        return None if t is None else (self.base_dir / t).absolute()

    @property
    def volume_steps(self) -> tuple[DegradationStep, ...]:
        return tuple(s for s in self.degradations if s.spec.volumetric)

    @property
    def slice_steps(self) -> tuple[DegradationStep, ...]:
        return tuple(s for s in self.degradations if not s.spec.volumetric)

    def size_multiple(self) -> int:
        """Crop multiple: ``output.size_multiple`` and every bicubic scale, so down-sampling is exact."""
        m = self.output["size_multiple"]
        for step in self.degradations:
            if step.name == "bicubic_downsample":
                v = step.params["scale"]
                for s in (v["choice"] if isinstance(v, dict) else [v]):
                    m = math.lcm(m, int(s))
        return m

    def fingerprint(self, extra: Any = None) -> str:
        """Hash of everything that determines the pairs (the output folder excluded; ``extra``: templates)."""
        d = {k: v for k, v in self.data.items() if k != "output_dir"}
        d["input"] = {**d["input"], "path": str(self.input_path)}
        d["extra"] = extra
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _merge(defaults: dict[str, Any], given: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        full = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"unknown config key '{full}'; allowed keys here: {', '.join(defaults)}")
        if isinstance(defaults[key], dict) and key not in ("fractions", "rescale", "image_transform_args", "vit_image_transform_args"):
            if not isinstance(value, dict):
                raise ConfigError.bad_value(full, value, f"a mapping with keys {', '.join(defaults[key])}")
            out[key] = _merge(defaults[key], value, full + ".")
        else:
            out[key] = value
    return out


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError.bad_value(key, value, allowed)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_build_config(config: str | Path | dict[str, Any] | BuildConfig, base_dir: str | Path | None = None) -> BuildConfig:
    """Load and validate a build config from a YAML path, a mapping, or pass a ``BuildConfig`` through."""
    if isinstance(config, BuildConfig):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"build config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"build config {path} is not valid YAML: {e}") from e
        base = Path(base_dir) if base_dir is not None else path.absolute().parent
    else:
        raw, base = config, Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(raw, dict):
        raise ConfigError("the build config must be a YAML mapping with keys: " + ", ".join(DEFAULTS))
    d = _merge(DEFAULTS, raw, "")
    return BuildConfig(data=d, degradations=_validate(d), base_dir=base.absolute())


def _validate(d: dict[str, Any]) -> tuple[DegradationStep, ...]:
    _check(isinstance(d["name"], str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", d["name"] or "") is not None,
           "name", d["name"], "an identifier (letters, digits, underscores), e.g. ct_ldct_x4")
    _check(isinstance(d["output_dir"], str) and d["output_dir"] != "", "output_dir", d["output_dir"], "a folder path")
    _check(_is_int(d["seed"]), "seed", d["seed"], "an integer")

    inp = d["input"]
    _check(inp["kind"] in INPUT_KINDS, "input.kind", inp["kind"], ", ".join(INPUT_KINDS))
    _check(isinstance(inp["path"], str) and inp["path"] != "", "input.path", inp["path"], "a folder or file path")
    _check(inp["modality"] in MODALITIES, "input.modality", inp["modality"], ", ".join(MODALITIES))
    _check(inp["slice_axis"] in (0, 1, 2) and _is_int(inp["slice_axis"]), "input.slice_axis", inp["slice_axis"], "0, 1 or 2")
    _check(_is_int(inp["slice_step"]) and inp["slice_step"] >= 1, "input.slice_step", inp["slice_step"], "an integer >= 1")
    _check(_is_num(inp["slice_margin"]) and 0 <= inp["slice_margin"] < 0.5, "input.slice_margin", inp["slice_margin"], "a fraction in [0, 0.5)")
    _check(isinstance(inp["skip_blank_slices"], bool), "input.skip_blank_slices", inp["skip_blank_slices"], "true or false")
    _check(_is_int(inp["volume_index"]) and inp["volume_index"] >= 0, "input.volume_index", inp["volume_index"], "an integer >= 0")
    resc = inp["rescale"]
    _check(isinstance(resc, dict) and set(resc) <= {"slope", "intercept"} and all(_is_num(v) for v in resc.values()),
           "input.rescale", resc, "{slope: number, intercept: number} (images and NIfTI only; DICOM uses its own tags)")
    inp["rescale"] = {"slope": 1.0, "intercept": 0.0, **resc}
    _check(inp["bits_stored"] is None or (_is_int(inp["bits_stored"]) and 1 <= inp["bits_stored"] <= 32),
           "input.bits_stored", inp["bits_stored"], "null (DICOM BitsStored / the container's depth) or an integer in "
           "[1, 32], e.g. 12 for 12-bit values in 16-bit PNGs")
    _check(inp["color"] in ("gray", "rgb"), "input.color", inp["color"], "'gray' or 'rgb' (images only)")

    inten = d["intensity"]
    _check(inten["mode"] in INTENSITY_MODES, "intensity.mode", inten["mode"], ", ".join(INTENSITY_MODES))
    w = inten["window"]
    if isinstance(w, dict):
        _check(set(w) == {"level", "width"} and all(_is_num(v) for v in w.values()) and w["width"] > 0,
               "intensity.window", w, "a preset name or {level: HU, width: HU > 0}")
    else:
        _check(w in CT_WINDOWS, "intensity.window", w, "one of " + ", ".join(CT_WINDOWS) + " or {level: HU, width: HU}")
    p = inten["percentiles"]
    _check(isinstance(p, list) and len(p) == 2 and all(_is_num(v) for v in p) and 0 <= p[0] < p[1] <= 100,
           "intensity.percentiles", p, "[low, high] with 0 <= low < high <= 100")
    r = inten["range"]
    if inten["mode"] == "fixed":
        _check(isinstance(r, list) and len(r) == 2 and all(_is_num(v) for v in r) and r[0] < r[1],
               "intensity.range", r, "[low, high] in physical units (needed by mode 'fixed')")

    chain = d["degradations"]
    _check(isinstance(chain, list) and len(chain) > 0, "degradations", chain,
           "a non-empty list such as [{name: bicubic_downsample, scale: 4}]")
    steps = tuple(validate_step(e, f"degradations[{i}]") for i, e in enumerate(chain))
    first_2d = next((i for i, s in enumerate(steps) if not s.spec.volumetric), len(steps))
    for i, s in enumerate(steps):
        if s.spec.volumetric and inp["kind"] == "images":
            raise ConfigError(f"config key 'degradations[{i}].name' is {s.name!r}, which needs volumes "
                              f"(input.kind dicom or nifti); input.kind 'images' gives 2D images only")
        if s.spec.volumetric and i > first_2d:
            raise ConfigError(f"config key 'degradations[{i}].name' is {s.name!r}: volumetric degradations run on the "
                              f"whole volume and must come before the 2D ones (first 2D step: degradations[{first_2d}])")
        if s.spec.grayscale_only and inp["color"] == "rgb":
            raise ConfigError(f"config key 'degradations[{i}].name' is {s.name!r}, which needs grayscale input; "
                              f"set input.color: gray")
        if s.spec.modality and inp["modality"] not in ("auto", s.spec.modality):
            raise ConfigError(f"config key 'degradations[{i}].name' is {s.name!r}, which needs modality "
                              f"{s.spec.modality}; input.modality is {inp['modality']!r}")

    sp = d["splits"]
    fr = sp["fractions"]
    _check(isinstance(fr, dict) and set(fr) <= {"train", "val", "test"} and all(_is_num(v) and v >= 0 for v in fr.values())
           and abs(sum(fr.values()) - 1.0) < 1e-6 and fr.get("train", 0) > 0,
           "splits.fractions", fr, "{train: f, val: f, test: f}, non-negative, summing to 1, train > 0")
    sp["fractions"] = {k: float(fr.get(k, 0.0)) for k in ("train", "val", "test")}
    _check(sp["group_by"] in GROUP_BY, "splits.group_by", sp["group_by"], ", ".join(GROUP_BY))
    if sp["group_by"] in DICOM_ONLY_GROUP_BY:
        _check(inp["kind"] == "dicom", "splits.group_by", sp["group_by"],
               ", ".join(g for g in GROUP_BY if g not in DICOM_ONLY_GROUP_BY) + " for input.kind "
               + repr(inp["kind"]) + " (study/series need DICOM; patient = the patient folder outside DICOM)")
    if sp["group_by"] == "regex":
        rx = sp["group_regex"]
        try:
            re.compile(rx)
        except (re.error, TypeError):
            raise ConfigError.bad_value("splits.group_regex", rx, "a Python regular expression (first group = group key)")
    _check(sp["seed"] is None or _is_int(sp["seed"]), "splits.seed", sp["seed"], "an integer or null (= seed)")

    ins = d["instructions"]
    _check(ins["task"] == "auto" or ins["task"] in TASKS, "instructions.task", ins["task"], "auto, " + ", ".join(TASKS))
    _check(ins["templates"] is None or isinstance(ins["templates"], str), "instructions.templates", ins["templates"],
           "null (packaged templates) or a YAML path")

    out = d["output"]
    _check(_is_int(out["size_multiple"]) and 1 <= out["size_multiple"] <= 256, "output.size_multiple", out["size_multiple"], "an integer in [1, 256]")
    _check(_is_int(out["rows_per_shard"]) and out["rows_per_shard"] >= 1, "output.rows_per_shard", out["rows_per_shard"], "an integer >= 1")
    _check(_is_int(out["rows_per_row_group"]) and out["rows_per_row_group"] >= 1, "output.rows_per_row_group",
           out["rows_per_row_group"], "an integer >= 1")
    _check(isinstance(out["heldout_png"], bool), "output.heldout_png", out["heldout_png"], "true or false")

    bg = d["bagel"]
    for k in ("image_transform_args", "vit_image_transform_args"):
        _check(isinstance(bg[k], dict), f"bagel.{k}", bg[k], "a mapping passed to BAGEL's ImageTransform")
    _check(bg["num_used_data"] is None or (_is_int(bg["num_used_data"]) and bg["num_used_data"] >= 1),
           "bagel.num_used_data", bg["num_used_data"], "null (= number of train shards) or an integer >= 1")
    _check(_is_num(bg["weight"]) and bg["weight"] > 0, "bagel.weight", bg["weight"], "a number > 0")
    _check(isinstance(bg["is_mandatory"], bool), "bagel.is_mandatory", bg["is_mandatory"], "true or false")
    for k in ("world_size", "num_workers"):  # the ranks x loader workers the train row groups must feed
        _check(_is_int(bg[k]) and bg[k] >= 1, f"bagel.{k}", bg[k], "an integer >= 1")
    d["lesions"] = validate_lesions(d["lesions"], [s.name for s in steps if s.spec.volumetric], inp["color"])
    return steps
