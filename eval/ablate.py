"""Ablation grids over training flags: plan runnable commands, run them in sequence (resumable), report.

    python -m bagel_sr.eval.ablate plan   GRID.yaml   # writes RUN_DIR/command.sh for every run + commands.txt
    python -m bagel_sr.eval.ablate run    GRID.yaml   # runs pending runs one after another (finished ones skipped)
    python -m bagel_sr.eval.ablate report GRID.yaml   # evaluates finished runs, writes report/report.md + PNGs

Grid YAML keys (relative paths are relative to the directory the command is started from):
  base_command   string or list; default ``python train/main_sr_pixel_loss.py`` (the embedded default, CPU).
                 A checkout: ``torchrun --nproc_per_node 8 train/main_sr_pixel_loss.py --bagel_root ...``.
  output_root    folder of the run folders (default ``runs/ablation``).
  workdir        folder the commands run in (default: the current directory at plan time).
  common_flags   flags for every run, e.g. ``{checkpoint_dir: "{run_dir}/checkpoints", total_steps: 500}``.
  grid           flag -> list of values; the cartesian product gives the runs (fidelity terms:
                 ``pixel_loss_terms: ["l2:1", "l2:1,ssim:0.1", "l2:1,lpl:0.05"]``).
  runs           explicit runs: list of flag dicts, each with an optional ``name``.
  eval           ``infer_command`` (template run after training, inside command.sh), ``outputs`` (template,
                 default ``{run_dir}/outputs``), ``references`` or ``manifest`` (+ ``split``), ``data_range``,
                 ``convention``, ``ssim_window``, ``hu_window`` ([level, width]), ``color``, ``baseline`` (run name
                 for paired comparisons), ``n_boot``, ``grid_images`` (pairs shown side by side, default 4).
  sort_by        metric of the report's ordering (default ``psnr``).
  plots          flags on the x axis of metric plots (default: grid flags with several numeric values).

Templates: ``{run_dir}``, ``{name}``, ``{outputs}`` in any string. Flags are HfArgumentParser flags: a key
``pixel_loss_weight`` (or ``--pixel_loss_weight``) becomes ``--pixel_loss_weight VALUE``; booleans are written
``True``/``False``; a null value drops the flag; a list value gives several arguments.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml
from tqdm.auto import tqdm

from bagel_sr.errors import BadInput, MissingInput, cli_main, one_line
from bagel_sr.outputs import claim


DEFAULT_BASE_COMMAND = "python train/main_sr_pixel_loss.py"
DONE, FAILED = "DONE", "FAILED"
TOOL = "bagel_sr.eval.ablate"
#: What ablate writes in each run folder (recorded in its ledger before they are written).
RUN_FILES = ("command.sh", "run.json", "log.txt", DONE, FAILED)


@dataclass
class Run:
    """One run of the grid: its name, flags, folder and the shell lines of ``command.sh``."""

    name: str
    flags: dict[str, Any]
    run_dir: Path
    train_command: str
    infer_command: str | None

    @property
    def done(self) -> bool:
        return (self.run_dir / DONE).is_file()


# ---------------------------------------------------------------- planning


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
    for key, kind in (("grid", dict), ("runs", list), ("common_flags", dict), ("eval", dict)):
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            raise BadInput(f"grid {path}: '{key}' must be a {'mapping' if kind is dict else 'list'}, "
                           f"got {type(cfg[key]).__name__}")
    known = {"name", "base_command", "output_root", "workdir", "common_flags", "grid", "runs", "eval", "sort_by",
             "plots"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise BadInput(f"{path}: unknown keys {unknown}; known keys: {sorted(known)}")
    if not cfg.get("grid") and not cfg.get("runs"):
        raise BadInput(f"{path}: give a 'grid' (flag -> list of values) or a list of 'runs'")
    for flag, values in (cfg.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise BadInput(f"{path}: grid values of {flag!r} must be a non-empty list, got {values!r}")
    return cfg


def fill(text: str, fields: dict[str, str]) -> str:
    """Replace the placeholders ``{run_dir}``, ``{name}``, ``{outputs}`` (other braces are left as they are)."""
    for key, value in fields.items():
        text = text.replace("{" + key + "}", value)
    return text


def _flag_name(key: str) -> str:
    return key[2:] if key.startswith("--") else key


def format_value(value: Any) -> list[str]:
    """Command-line words of one flag value (HfArgumentParser style)."""
    if isinstance(value, bool):
        return ["True" if value else "False"]
    if isinstance(value, (list, tuple)):
        return [w for v in value for w in format_value(v)]
    return [str(value)]


def flag_words(flags: dict[str, Any], fields: dict[str, str]) -> list[str]:
    """``--flag value`` words; templates in string values are filled from ``fields``."""
    words = []
    for key, value in flags.items():
        if value is None:
            continue
        words.append(f"--{_flag_name(key)}")
        words += [fill(w, fields) for w in format_value(value)]
    return words


def run_name(flags: dict[str, Any]) -> str:
    """A folder-safe name from the flags, e.g. ``weight0.05_max_t0.3`` (``pixel_loss_`` prefixes dropped)."""
    parts = []
    for key, value in flags.items():
        short = _flag_name(key).removeprefix("pixel_loss_")
        parts.append(f"{short}{'-'.join(format_value(value)) if value is not None else 'None'}")
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(parts)) or "run"


def expand_runs(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, flags) of every run: the cartesian product of ``grid``, then the explicit ``runs``."""
    grid = cfg.get("grid") or {}
    runs = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    named = [(run_name(f), f) for f in runs]
    for r in cfg.get("runs") or []:
        r = dict(r)
        name = r.pop("name", None)
        named.append((str(name) if name else run_name(r), r))
    seen: set[str] = set()
    for name, _ in named:
        if name in seen:
            raise BadInput(f"two runs are named {name!r}; give explicit names in 'runs'")
        seen.add(name)
    return named


def _command_text(base: str | Sequence[str], words: list[str], fields: dict[str, str]) -> str:
    base_text = fill(base, fields) if isinstance(base, str) else shlex.join(fill(str(w), fields) for w in base)
    return " ".join([base_text] + [shlex.quote(w) for w in words])


def build_runs(cfg: dict[str, Any]) -> list[Run]:
    """Runs with absolute folders and filled-in commands."""
    root = Path(cfg.get("output_root", "runs/ablation")).resolve()
    base = cfg.get("base_command") or DEFAULT_BASE_COMMAND
    ev = cfg.get("eval") or {}
    runs = []
    for name, flags in expand_runs(cfg):
        run_dir = root / name
        fields = {"run_dir": str(run_dir), "name": name}
        fields["outputs"] = fill(str(ev.get("outputs", "{run_dir}/outputs")), fields)
        words = flag_words({**(cfg.get("common_flags") or {}), **flags}, fields)
        infer = ev.get("infer_command")
        infer_text = None
        if infer:
            infer_text = fill(infer, fields) if isinstance(infer, str) else shlex.join(fill(str(w), fields)
                                                                                       for w in infer)
        runs.append(Run(name, flags, run_dir, _command_text(base, words, fields), infer_text))
    return runs


def target_flags(base: str | Sequence[str], workdir: Path, timeout: float = 300) -> set[str]:
    """Flags the target's parser knows, read from ``BASE --help`` (argparse / HfArgumentParser help text)."""
    words = shlex.split(base) if isinstance(base, str) else [str(w) for w in base]
    try:
        res = subprocess.run(words + ["--help"], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BadInput(f"base_command {shlex.join(words)!r} cannot be run to list its flags: {e}") from None
    if res.returncode != 0:
        text = (res.stderr or res.stdout).strip()
        tail = one_line(text.splitlines()[-1]) if text else ""
        raise BadInput(f"base_command {shlex.join(words)!r} --help exited {res.returncode} ({tail}); "
                       "fix base_command (or workdir) before planning runs")
    return set(re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", res.stdout + res.stderr))


def check_flags(cfg: dict[str, Any], known: set[str]) -> None:
    """Every flag of every run (grid, runs, common_flags) must be one the target's parser knows."""
    import difflib

    flags = {(_flag_name(k), where) for where in ("common_flags", "grid") for k in (cfg.get(where) or {})}
    flags |= {(_flag_name(k), f"runs[{i}]") for i, r in enumerate(cfg.get("runs") or []) for k in r if k != "name"}
    for flag, where in sorted(flags):
        if flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            raise BadInput(f"{where}: flag --{flag} is not accepted by the base_command's parser"
                           + (f"; did you mean --{close[0]}?" if close else ""))


def command_script(run: Run, workdir: Path) -> str:
    """Text of ``command.sh``: cd, train, optional inference, then the DONE marker (only reached on success)."""
    lines = ["#!/usr/bin/env bash", f"# run {run.name}, written by bagel_sr.eval.ablate plan", "set -euo pipefail",
             f"cd {shlex.quote(str(workdir))}", run.train_command]
    if run.infer_command:
        lines.append(run.infer_command)
    lines.append(f"date -u +%Y-%m-%dT%H:%M:%SZ > {shlex.quote(str(run.run_dir / DONE))}")
    return "\n".join(lines) + "\n"


def plan(grid_path: str | Path, check: bool = True, overwrite: bool = False) -> list[Run]:
    """Write ``command.sh`` and ``run.json`` of every unfinished run and ``OUTPUT_ROOT/commands.txt``.

    Each folder is claimed through :func:`bagel_sr.outputs.claim` (a ledger of what ablate wrote): a run folder
    holding something ablate did not write is refused; a run made with another command is refused unless
    ``overwrite``, which deletes only ablate's own files there (the target's outputs have their own ledger).
    With ``check``, the whole plan is validated first: every flag against the target's ``--help``.
    """
    cfg = load_grid(grid_path)
    runs = build_runs(cfg)
    workdir = Path(cfg.get("workdir", ".")).resolve()
    if not workdir.is_dir():
        raise MissingInput(f"workdir {workdir}: no such folder")
    if check:
        check_flags(cfg, target_flags(cfg.get("base_command") or DEFAULT_BASE_COMMAND, workdir))
    root = runs[0].run_dir.parent
    root_ledger, _ = claim(root, TOOL, {}, flag="--overwrite")
    ledgers = [claim(run.run_dir, TOOL, {"command": run.train_command, "infer": run.infer_command},
                     overwrite=overwrite, flag="--overwrite")[0] for run in runs]  # all refusals before any write
    for run, ledger in zip(runs, ledgers):
        if run.done:
            continue
        for name in RUN_FILES:
            ledger.record(name)
        script = command_script(run, workdir)
        meta = {"name": run.name, "flags": run.flags, "command": run.train_command, "infer": run.infer_command}
        (run.run_dir / "command.sh").write_text(script, encoding="utf-8")
        os.chmod(run.run_dir / "command.sh", 0o755)
        (run.run_dir / "run.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    root_ledger.record("commands.txt")
    (root / "commands.txt").write_text(
        "".join(f"# {r.name}: {r.train_command}\nbash {shlex.quote(str(r.run_dir / 'command.sh'))} > "
                f"{shlex.quote(str(r.run_dir / 'log.txt'))} 2>&1\n" for r in runs), encoding="utf-8")
    return runs


# ---------------------------------------------------------------- running


def execute(runs: Sequence[Run], keep_going: bool = False, dry_run: bool = False) -> int:
    """Run the unfinished runs one after another; logs in ``RUN_DIR/log.txt``. Returns the number that failed."""
    pending = [r for r in runs if not r.done]
    print(f"{len(runs) - len(pending)} of {len(runs)} runs already finished; {len(pending)} to run", file=sys.stderr)
    failed = 0
    for run in tqdm(pending, desc="ablate", unit="run", disable=dry_run or not pending):
        if dry_run:
            print(f"would run: bash {run.run_dir / 'command.sh'}")
            continue
        (run.run_dir / FAILED).unlink(missing_ok=True)
        with open(run.run_dir / "log.txt", "ab") as log:
            log.write(f"\n=== {datetime.now(timezone.utc).isoformat()} start\n".encode())
            log.flush()
            rc = subprocess.run(["bash", str(run.run_dir / "command.sh")], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL).returncode
        if rc == 0 and run.done:
            continue
        failed += 1
        (run.run_dir / FAILED).write_text(f"exit code {rc}\n", encoding="utf-8")
        tail = (run.run_dir / "log.txt").read_text(errors="replace").splitlines()[-15:]
        print(f"run {run.name} failed (exit code {rc}); last lines of its log:\n  " + "\n  ".join(tail),
              file=sys.stderr)
        if not keep_going:
            break
    return failed


# ---------------------------------------------------------------- reporting (eval/ablate_report.py)


def build_report(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Evaluate every finished run and write the report: :func:`bagel_sr.eval.ablate_report.build_report`."""
    from .ablate_report import build_report as build

    return build(*args, **kwargs)


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bagel_sr.eval.ablate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("action", choices=("plan", "run", "report"))
    p.add_argument("grid", help="grid YAML")
    p.add_argument("--keep_going", action="store_true", help="run: continue after a failed run")
    p.add_argument("--dry_run", action="store_true", help="run: only list what would run")
    p.add_argument("--only", nargs="+", help="run: only these run names")
    p.add_argument("--out", help="report: folder (default OUTPUT_ROOT/report)")
    p.add_argument("--n_boot", type=int, help="report: bootstrap resamples (default eval.n_boot or 10000)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--no_flag_check", action="store_true", help="plan/run: skip checking flags against BASE --help")
    p.add_argument("--overwrite", action="store_true", help="plan/run: redo runs whose command changed (deletes only "
                   "the files ablate wrote in their folders)")
    a = p.parse_args(argv)
    if a.action == "plan":
        runs = plan(a.grid, not a.no_flag_check, a.overwrite)
        print(f"planned {len(runs)} runs; commands in {runs[0].run_dir.parent / 'commands.txt'}")
        return 0
    if a.action == "run":
        runs = plan(a.grid, not a.no_flag_check, a.overwrite)
        if a.only:
            unknown = sorted(set(a.only) - {r.name for r in runs})
            if unknown:
                raise BadInput(f"unknown run names {unknown}; runs: {[r.name for r in runs]}")
            runs = [r for r in runs if r.name in a.only]
        return 1 if execute(runs, a.keep_going, a.dry_run) else 0
    res = build_report(a.grid, a.out, a.n_boot, not a.no_progress)
    print(res["table"].to_string(index=False))
    print(f"report: {res['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
