"""The registry of synthetic degradations: :data:`DEGRADATIONS` names each operator of
:mod:`bagel_sr.data.operators` with its parameter specs, which the build config is validated against
(:func:`validate_step`); :func:`sample_params` draws per-pair values for ``{uniform: [a, b]}`` /
``{choice: [...]}`` parameters; :func:`apply_chain` runs a validated chain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .operators import (  # noqa: F401  (re-exported: the registry's operators)
    Array, Result, bicubic_downsample, gaussian_blur, gaussian_noise, jpeg_compression, kspace_truncation,
    low_dose_ct, rician_noise, slice_thickness,
)
from .errors import ConfigError


# --------------------------------------------------------------------------------------- registry

_REQUIRED = object()
_FBP_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: default (``_REQUIRED`` if none), a check on a concrete value and its description."""

    check: Callable[[Any], bool]
    allowed: str
    default: Any = _REQUIRED
    samplable: bool = True
    integer: bool = False                # {uniform: [a, b]} draws integers


@dataclass(frozen=True)
class DegradationSpec:
    fn: Callable[..., Result]
    params: dict[str, ParamSpec]
    task: str                            # instruction-template key (see instructions.py)
    volumetric: bool = False             # runs on the 3D volume before slicing
    context: tuple[str, ...] = ()        # filled in by the pipeline when not given: value_range, pixel_size_mm
    modality: str | None = None          # required modality (low_dose_ct needs CT in HU)
    grayscale_only: bool = False


def _num(lo: float, hi: float = math.inf, lo_open: bool = False, integer: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if integer and float(v) != int(v):
            return False
        return (v > lo if lo_open else v >= lo) and v <= hi

    return check


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v in values


DEGRADATIONS: dict[str, DegradationSpec] = {
    "bicubic_downsample": DegradationSpec(
        bicubic_downsample,
        {
            "scale": ParamSpec(_one_of(2, 3, 4), "2, 3 or 4", integer=True),
            "keep_size": ParamSpec(lambda v: v is True, "true (condition and target must have the same size)", True, False),
        },
        task="super_resolution",
    ),
    "kspace_truncation": DegradationSpec(
        kspace_truncation,
        {
            "scale": ParamSpec(_num(1.0, 16.0, lo_open=True), "a number in (1, 16]"),
            "window": ParamSpec(_one_of("none", "hann"), "'none' or 'hann'", "none"),
            "axes": ParamSpec(_one_of("both", "rows", "cols"), "'both', 'rows' or 'cols'", "both"),
        },
        task="super_resolution",
    ),
    "slice_thickness": DegradationSpec(
        slice_thickness,
        {
            "factor": ParamSpec(_num(2, 16, integer=True), "an integer in [2, 16]", integer=True),
            "thickness": ParamSpec(lambda v: v is None or _num(0.0, 64.0, lo_open=True)(v), "a number in (0, 64] (voxels)", None),
            "profile": ParamSpec(_one_of("gaussian", "rect"), "'gaussian' or 'rect'", "gaussian"),
            "axis": ParamSpec(_one_of(0, 1, 2), "0, 1 or 2", 2, False),
            "keep_size": ParamSpec(lambda v: v is True, "true (condition and target must have the same size)", True, False),
        },
        task="slice_thickness",
        volumetric=True,
    ),
    "gaussian_noise": DegradationSpec(
        gaussian_noise, {"sigma": ParamSpec(_num(0.0), "a number >= 0 (working units: HU for CT, else 0..1)")}, task="denoise"
    ),
    "rician_noise": DegradationSpec(
        rician_noise, {"sigma": ParamSpec(_num(0.0), "a number >= 0 (normalised units, 0..1)")}, task="denoise"
    ),
    "low_dose_ct": DegradationSpec(
        low_dose_ct,
        {
            "photons_per_ray": ParamSpec(_num(1.0), "a number >= 1 (incident photons per ray, I0)", 2.5e5),
            "electronic_noise_std": ParamSpec(_num(0.0), "a number >= 0 (counts)", 10.0),
            "n_angles": ParamSpec(lambda v: v is None or _num(8, 4096, integer=True)(v), "an integer in [8, 4096]", None, integer=True),
            "pixel_size_mm": ParamSpec(lambda v: v is None or _num(0.0, 100.0, lo_open=True)(v), "a number in (0, 100] (mm)", None),
            "mu_water": ParamSpec(_num(0.0, 1.0, lo_open=True), "a number in (0, 1] (1/mm)", 0.0192),
            "mode": ParamSpec(_one_of("noise_insertion", "reconstruct"), "'noise_insertion' or 'reconstruct'", "noise_insertion", False),
            "filter": ParamSpec(_one_of(*_FBP_FILTERS), ", ".join(_FBP_FILTERS) + " (scikit-image iradon)", "ramp", False),
        },
        task="low_dose_ct",
        context=("pixel_size_mm",),
        modality="CT",
        grayscale_only=True,
    ),
    "gaussian_blur": DegradationSpec(
        gaussian_blur, {"sigma": ParamSpec(_num(0.0, 64.0, lo_open=True), "a number in (0, 64] (pixels)")}, task="deblur"
    ),
    "jpeg_compression": DegradationSpec(
        jpeg_compression,
        {
            "quality": ParamSpec(_num(1, 95, integer=True), "an integer in [1, 95]", integer=True),
            "value_range": ParamSpec(
                lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2 and v[1] > v[0]),
                "[low, high] in working units", None, False,
            ),
        },
        task="jpeg_artifacts",
        context=("value_range",),
    ),
}


@dataclass(frozen=True)
class DegradationStep:
    """A validated chain entry: ``params`` may hold ``{'uniform': [a, b]}`` / ``{'choice': [...]}`` samplers."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> DegradationSpec:
        return DEGRADATIONS[self.name]


def _yaml_number(v: Any) -> Any:
    """PyYAML reads ``1.0e4`` (no sign in the exponent) as a string; accept it as the number it means."""
    if isinstance(v, str):
        try:
            return float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            return v
    if isinstance(v, list):
        return [_yaml_number(x) for x in v]
    if isinstance(v, dict):
        return {k: _yaml_number(x) for k, x in v.items()}
    return v


def validate_step(entry: Any, key: str) -> DegradationStep:
    """Check one YAML chain entry (``{name: ..., <param>: ...}``); raise ``ConfigError`` naming ``key``."""

    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError.bad_value(key, entry, "a mapping with a 'name' key, e.g. {name: gaussian_noise, sigma: 0.02}")
    name = entry["name"]
    if name not in DEGRADATIONS:
        raise ConfigError.bad_value(f"{key}.name", name, ", ".join(sorted(DEGRADATIONS)))
    spec = DEGRADATIONS[name]
    params: dict[str, Any] = {}
    for p, value in entry.items():
        if p == "name":
            continue
        if p not in spec.params:
            raise ConfigError.bad_value(f"{key}.{p}", value, f"parameters of {name}: {', '.join(spec.params)}")
        ps = spec.params[p]
        value = _yaml_number(value)
        if isinstance(value, dict):
            if not ps.samplable:
                raise ConfigError.bad_value(f"{key}.{p}", value, ps.allowed + " (a fixed value)")
            if set(value) == {"uniform"} and isinstance(value["uniform"], list) and len(value["uniform"]) == 2:
                lo, hi = value["uniform"]
                if not (ps.check(lo) and ps.check(hi) and lo <= hi):
                    raise ConfigError.bad_value(f"{key}.{p}.uniform", value["uniform"], f"[low, high], each {ps.allowed}")
            elif set(value) == {"choice"} and isinstance(value["choice"], list) and value["choice"]:
                bad = [v for v in value["choice"] if not ps.check(v)]
                if bad:
                    raise ConfigError.bad_value(f"{key}.{p}.choice", bad, f"values that are each {ps.allowed}")
            else:
                raise ConfigError.bad_value(f"{key}.{p}", value, f"{ps.allowed}, or {{uniform: [low, high]}}, or {{choice: [...]}}")
        elif not ps.check(value):
            raise ConfigError.bad_value(f"{key}.{p}", value, ps.allowed)
        params[p] = value
    missing = [p for p, ps in spec.params.items() if ps.default is _REQUIRED and p not in params]
    if missing:
        raise ConfigError(f"config key '{key}' ({name}) is missing required parameter(s): {', '.join(missing)}")
    return DegradationStep(name, params)


def sample_params(step: DegradationStep, rng: np.random.Generator, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Concrete keyword arguments for one pair: defaults, then samplers drawn from ``rng``, then context."""
    spec = step.spec
    out: dict[str, Any] = {p: ps.default for p, ps in spec.params.items() if ps.default is not _REQUIRED}
    for p, value in step.params.items():
        if isinstance(value, dict) and "uniform" in value:
            lo, hi = value["uniform"]
            value = int(rng.integers(lo, hi + 1)) if spec.params[p].integer else float(rng.uniform(lo, hi))
        elif isinstance(value, dict) and "choice" in value:
            value = value["choice"][int(rng.integers(len(value["choice"])))]
        out[p] = value
    for name in spec.context:
        if out.get(name) is None and context and context.get(name) is not None:
            out[name] = context[name]
    return {k: v for k, v in out.items() if v is not None}


def apply_chain(
    steps: list[DegradationStep], x: Array, rng: np.random.Generator, context: dict[str, Any] | None = None
) -> tuple[Array, list[dict[str, Any]]]:
    """Run ``steps`` in order; returns the degraded array and one record ``{name, **used_params}`` per step."""
    records = []
    for step in steps:
        x, used = step.spec.fn(x, rng, **sample_params(step, rng, context))
        records.append({"name": step.name, **used})
    return x, records
