"""Paired restoration datasets (super-resolution, denoising; CT and MR) in BAGEL's editing format.

CLI: ``python -m bagel_sr.data build CONFIG.yaml [--overwrite]``. Python::

    from bagel_sr.data import build_dataset
    summary = build_dataset("ct_denoise.yaml")      # or a dict; overwrite=True to rebuild
    print(summary.format())

See ``docs/data.md`` for the config reference and the output layout.
"""
from .build import build_dataset, pair_seed
from .config import BuildConfig, load_build_config
from .degradations import DEGRADATIONS
from .errors import BuildError, ConfigError, OutputExistsError, SourceError
from .intensity import CT_WINDOWS
from .summary import BuildSummary

__all__ = [
    "BuildConfig",
    "BuildError",
    "BuildSummary",
    "CT_WINDOWS",
    "ConfigError",
    "DEGRADATIONS",
    "OutputExistsError",
    "SourceError",
    "build_dataset",
    "load_build_config",
    "pair_seed",
]
