"""An ablation grid as runs: read and check the grid YAML, expand it into training runs (each with its folder,
commands and inference variants). ``ablate plan`` writes them, ``ablate run`` runs them, ``ablate report`` reads
them back (see ``bagel_sr.eval.ablate`` for the YAML keys)."""
from __future__ import annotations

import itertools
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from bagel_sr.errors import BadInput, MissingInput, one_line
from bagel_sr.outputs import Ledger

from .ablate_check import default_base_command, expand
from .ablate_flags import check_flag_map, check_sweep, fill, flag_name, flag_words, run_name
from .ablate_infer import Variant, build_variants, check_infer_section, variant_specs

DEFAULT_BASE_COMMAND = shlex.join(default_base_command())  # the wrapper as a module: works from any folder
TOOL = "bagel_sr.eval.ablate"


@dataclass
class Run:
    """One training run of the grid: its name, flags, folder, commands and inference variants (if swept)."""

    name: str
    flags: dict[str, Any]
    run_dir: Path
    train_command: str
    infer_command: str | None  # the one inference of a run without variants
    variants: list[Variant] = field(default_factory=list)

    @property
    def trained(self) -> bool:
        """``RUN_DIR``'s ledger marks the training finished (and, without variants, the run's one inference)."""
        return Ledger.finished(self.run_dir)

    @property
    def done(self) -> bool:
        return self.trained and all(v.done for v in self.variants)


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read and check a grid YAML (see the module docstring for its keys)."""
    if not Path(path).is_file():
        raise MissingInput(f"grid {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise BadInput(f"grid {path} is not valid YAML: {one_line(str(e))}") from None
    if not isinstance(cfg, dict):
        raise BadInput(f"grid {path}: expected a YAML mapping with keys such as grid, runs, common_flags, eval")
    for key, kind in (("grid", dict), ("runs", list), ("common_flags", dict), ("eval", dict), ("infer_grid", dict)):
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            raise BadInput(f"grid {path}: '{key}' must be a {'mapping' if kind is dict else 'list'}, "
                           f"got {type(cfg[key]).__name__}")
    known = {"name", "base_command", "output_root", "workdir", "common_flags", "grid", "runs", "eval", "sort_by",
             "plots", "infer_grid"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise BadInput(f"{path}: unknown keys {unknown}; known keys: {sorted(known)}")
    if not cfg.get("grid") and not cfg.get("runs"):
        raise BadInput(f"{path}: give a 'grid' (flag -> list of values) or a list of 'runs'")
    check_sweep(f"{path}: grid", cfg.get("grid") or {})
    check_flag_map(f"{path}: common_flags", cfg.get("common_flags") or {})
    for i, run in enumerate(cfg.get("runs") or []):
        check_flag_map(f"{path}: runs[{i}]", run, skip=("name", "infer_flags"))
    check_infer_section(cfg, str(path))
    return cfg


def _expand(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(name, training flags, explicit run entry or None) of every run."""
    grid = cfg.get("grid") or {}
    runs = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    named: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [(run_name(f), f, None) for f in runs]
    for entry in cfg.get("runs") or []:
        r = {k: v for k, v in entry.items() if k not in ("name", "infer_flags")}
        named.append((str(entry["name"]) if entry.get("name") else run_name(r), r, entry))
    seen: set[str] = set()
    for name, _, _ in named:
        if name in seen:
            raise BadInput(f"two runs are named {name!r}; give explicit names in 'runs'")
        seen.add(name)
    return named


def expand_runs(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, training flags) of every run: the cartesian product of ``grid``, then the explicit ``runs``."""
    return [(name, flags) for name, flags, _ in _expand(cfg)]


def _command_text(base: str | Sequence[str], words: list[str], fields: dict[str, str]) -> str:
    base_text = fill(base, fields) if isinstance(base, str) else shlex.join(fill(str(w), fields) for w in base)
    return " ".join([base_text] + [shlex.quote(w) for w in words])


def build_runs(cfg: dict[str, Any]) -> list[Run]:
    """Runs with absolute folders, filled-in commands and their inference variants."""
    root = Path(cfg.get("output_root", "runs/ablation")).resolve()
    base = expand(cfg.get("base_command") or DEFAULT_BASE_COMMAND)
    ev = dict(cfg.get("eval") or {})
    if ev.get("infer_command"):
        ev["infer_command"] = expand(ev["infer_command"])
    runs = []
    for name, flags, entry in _expand(cfg):
        run_dir = root / name
        fields = {"run_dir": str(run_dir), "name": name}
        variants = build_variants(variant_specs(cfg, entry), ev, dict(fields))
        fields["outputs"] = fill(str(ev.get("outputs", "{run_dir}/outputs")), fields)
        words = flag_words({**(cfg.get("common_flags") or {}), **flags}, fields)
        infer = ev.get("infer_command")
        infer_text = None
        if infer and not variants:
            infer_text = fill(infer, fields) if isinstance(infer, str) else shlex.join(fill(str(w), fields)
                                                                                       for w in infer)
        runs.append(Run(name, flags, run_dir, _command_text(base, words, fields), infer_text, variants))
    _check_trained_once(runs)
    return runs


def _check_trained_once(runs: Sequence[Run]) -> None:
    """Runs with inference variants must not train the same flags twice (list the variants in one run)."""
    by_flags: dict[str, Run] = {}
    for run in runs:
        key = json.dumps({flag_name(k): v for k, v in run.flags.items()}, sort_keys=True, default=str)
        other = by_flags.setdefault(key, run)
        if other is not run and (run.variants or other.variants):
            raise BadInput(f"runs {other.name!r} and {run.name!r} train with the same flags; give both inference "
                           "settings to one run (infer_flags: a list of flag mappings) so that it trains once")
