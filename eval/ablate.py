"""Ablation grids over training and inference flags: plan runnable commands, run them in sequence (resumable), report.

    python -m bagel_sr.eval.ablate plan   GRID.yaml   # writes RUN_DIR/command.sh for every run + commands.txt
    python -m bagel_sr.eval.ablate run    GRID.yaml   # runs pending runs one after another (finished ones skipped)
    python -m bagel_sr.eval.ablate report GRID.yaml   # evaluates finished rows, writes report/report.md + PNGs

Grid YAML keys (relative paths are relative to the directory the command is started from; ``plan`` checks the
flags and the ``eval`` block against the data before it writes anything, so ``report`` has nothing left to refuse):
  base_command   string or list; default ``python -m bagel_sr.train.main_sr_pixel_loss`` (the wrapper, from any folder: the
                 embedded default on CPU, or the checkout of ``BAGEL_ROOT``). A checkout on 8 GPUs:
                 ``torchrun --nproc_per_node 8 -m bagel_sr.train.main_sr_pixel_loss --bagel_root $BAGEL_ROOT ...``.
                 ``$VARS`` and ``~`` are expanded here and in ``eval.infer_command`` at plan time.
  output_root    folder of the run folders (default ``runs/ablation``).
  workdir        folder the commands run in (default: the current directory at plan time).
  common_flags   flags for every run, e.g. ``{checkpoint_dir: "{run_dir}/checkpoints", total_steps: 500}``.
  grid           flag -> list of values; the cartesian product gives the runs (fidelity terms:
                 ``pixel_loss_terms: ["l2:1", "l2:1,ssim:0.1", "l2:1,lpl:0.05"]``).
  runs           explicit runs: list of flag dicts, each with an optional ``name`` and ``infer_flags`` (one
                 mapping of inference flags, or a list of them, each with an optional ``name``: its variants).
  infer_grid     inference flag -> list of values, appended to ``eval.infer_command``; the product gives the
                 inference variants of every run (runs with their own ``infer_flags`` use those instead).
  eval           ``infer_command`` (template run after training, inside command.sh), ``outputs`` (template,
                 default ``{run_dir}/outputs``), ``references`` or ``manifest`` (+ ``split``), ``data_range``,
                 ``convention``, ``ssim_window``, ``hu_window`` ([level, width]), ``color``,
                 ``hallucination_threshold`` (default 0.1), ``baseline`` (run name, or ``RUN/VARIANT``, for paired
                 comparisons), ``n_boot``, ``grid_images`` (pairs shown side by side, default 4), ``lesions``
                 (``lesions.json`` of a lesion set: lesion columns in the report) and ``lesion_fp_per_image``.
  sort_by        metric of the report's ordering (default ``psnr``).
  plots          flags on the x axis of metric plots (default: grid and infer_grid flags with several numeric values).

Templates: ``{run_dir}``, ``{name}``, ``{outputs}`` (and ``{variant}``) in any string. Training flags are
HfArgumentParser flags: a key ``pixel_loss_weight`` (or ``--pixel_loss_weight``) becomes ``--pixel_loss_weight
VALUE``; booleans are written ``True``/``False``; a null value drops the flag; a list value gives several arguments.
Inference flags follow ``bagel_sr.eval.infer``'s argparse: the same, except that ``true`` is the bare switch
(``--data_consistency``) and ``false`` drops it.

Inference variants (``eval/ablate_infer.py``): a run trains ONCE (``RUN_DIR/DONE`` marks the finished training),
then runs ``infer_command`` + the variant's flags once per variant, ``{outputs}`` being ``{run_dir}/outputs/VARIANT``
(``VARIANT``: e.g. ``start_t=0.3,num_samples=4``), each marked by ``RUN_DIR/infer/VARIANT/DONE``. A finished
variant is skipped, a new one runs alone, a changed one is refused unless ``--overwrite`` (which redoes that
inference, not the training). Each run x variant is one report row ``RUN/VARIANT``; ``eval.baseline`` naming a
run compares each row with that run's row of the same variant. The report's first table shows PSNR, SSIM and the
hallucination share (``halluc_share``) side by side for every row. Example::

    base_command: torchrun --nproc_per_node 8 -m bagel_sr.train.main_sr_pixel_loss --bagel_root $BAGEL_ROOT
      --model_path hf/BAGEL-7B-MoT --finetune_from_hf True --resume_model_only True --finetune_from_ema True
      --dataset_config_file ct/dataset_config.yaml --bagel_sr_datasets ct/bagel_sr_dataset.yaml
    common_flags: {checkpoint_dir: "{run_dir}/checkpoints", total_steps: 2000}
    grid: {pixel_loss_weight: [0.0, 0.05]}
    infer_grid: {start_t: [1.0, 0.3], num_samples: [1, 4]}       # 2 trainings, 8 report rows
    eval:
      infer_command: python -m bagel_sr.eval.infer --inputs ct/manifest.jsonl --split test --bagel_root $BAGEL_ROOT
        --model_path hf/BAGEL-7B-MoT --checkpoint {run_dir}/checkpoints/0002000/ema.safetensors --out {outputs}
      manifest: ct/manifest.jsonl
      split: test
      hu_window: [40, 400]
      baseline: weight0.0
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml
from tqdm.auto import tqdm

from bagel_sr.errors import ArgumentParser, BadInput, MissingInput, cli_main, one_line
from bagel_sr.outputs import claim

from .ablate_check import check_eval_block, default_base_command, expand, progress_printer, start_flag_checks
from .ablate_flags import (_flag_name, check_flag_map, check_sweep, fill, flag_words,  # noqa: F401 (re-exported)
                           format_value, run_name)
from .ablate_infer import (DONE, VARIANT_FILES, Variant, build_variants, check_infer_section, variant_lines,
                           variant_specs)

DEFAULT_BASE_COMMAND = shlex.join(default_base_command())  # the wrapper as a module: works from any folder
FAILED = "FAILED"
TOOL = "bagel_sr.eval.ablate"
#: What ablate writes in each run folder (recorded in its ledger before they are written).
RUN_FILES = ("command.sh", "run.json", "log.txt", DONE, FAILED)


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
        """``RUN_DIR/DONE``: training finished (and, without variants, the run's one inference)."""
        return (self.run_dir / DONE).is_file()

    @property
    def done(self) -> bool:
        return self.trained and all(v.done for v in self.variants)


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
        key = json.dumps({_flag_name(k): v for k, v in run.flags.items()}, sort_keys=True, default=str)
        other = by_flags.setdefault(key, run)
        if other is not run and (run.variants or other.variants):
            raise BadInput(f"runs {other.name!r} and {run.name!r} train with the same flags; give both inference "
                           "settings to one run (infer_flags: a list of flag mappings) so that it trains once")


def target_flags(base: str | Sequence[str], workdir: Path, timeout: float = 300,
                 what: str = "base_command") -> set[str]:
    """Flags the target's parser knows, read from ``BASE --help`` (argparse / HfArgumentParser help text)."""
    words = shlex.split(base) if isinstance(base, str) else [str(w) for w in base]
    try:
        res = subprocess.run(words + ["--help"], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BadInput(f"{what} {shlex.join(words)!r} cannot be run to list its flags: {e}") from None
    if res.returncode != 0:
        text = (res.stderr or res.stdout).strip()
        tail = one_line(text.splitlines()[-1]) if text else ""
        raise BadInput(f"{what} {shlex.join(words)!r} --help exited {res.returncode} ({tail}); "
                       f"fix {what} (or workdir) before planning runs")
    return set(re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", res.stdout + res.stderr))


def check_flags(cfg: dict[str, Any], known: set[str]) -> None:
    """Every flag of every run (grid, runs, common_flags) must be one the target's parser knows."""
    import difflib

    flags = {(_flag_name(k), where) for where in ("common_flags", "grid") for k in (cfg.get(where) or {})}
    flags |= {(_flag_name(k), f"runs[{i}]") for i, r in enumerate(cfg.get("runs") or []) for k in r
              if k not in ("name", "infer_flags")}
    for flag, where in sorted(flags):
        if flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            raise BadInput(f"{where}: flag --{flag} is not accepted by the base_command's parser"
                           + (f"; did you mean --{close[0]}?" if close else ""))


def command_script(run: Run, workdir: Path) -> str:
    """Text of ``command.sh``: cd, train, optional inference, then the DONE marker (only reached on success).

    With inference variants: train unless ``RUN_DIR/DONE`` exists, then each variant unless its own ``DONE`` does.
    """
    lines = ["#!/usr/bin/env bash", f"# run {run.name}, written by bagel_sr.eval.ablate plan", "set -euo pipefail",
             f"cd {shlex.quote(str(workdir))}"]
    if run.variants:
        return "\n".join(lines + variant_lines(run.run_dir, run.train_command, run.variants)) + "\n"
    lines.append(run.train_command)
    if run.infer_command:
        lines.append(run.infer_command)
    lines.append(f"date -u +%Y-%m-%dT%H:%M:%SZ > {shlex.quote(str(run.run_dir / DONE))}")
    return "\n".join(lines) + "\n"


def plan(grid_path: str | Path, check: bool = True, overwrite: bool = False, progress: bool = True) -> list[Run]:
    """Write ``command.sh`` and ``run.json`` of every unfinished run and ``OUTPUT_ROOT/commands.txt``.

    Each folder is claimed through :func:`bagel_sr.outputs.claim` (a ledger of what ablate wrote): a run folder
    holding something ablate did not write is refused; a run made with another command is refused unless
    ``overwrite``, which deletes only ablate's own files there (the target's outputs have their own ledger).
    The whole plan is validated first (:mod:`.ablate_check`): the ``eval`` block against the data, and, with
    ``check``, every flag against the target's ``--help``; ``progress``: one line per step on stderr.
    """
    say = progress_printer(progress)
    cfg = load_grid(grid_path)
    runs = build_runs(cfg)
    say(f"{len(runs)} training run(s), {sum(max(len(r.variants), 1) for r in runs)} report row(s)")
    workdir = Path(cfg.get("workdir", ".")).resolve()
    if not workdir.is_dir():
        raise MissingInput(f"workdir {workdir}: no such folder")
    finish_flag_checks = None
    if check:  # the targets' --help run while the eval block is checked
        infer = expand(cfg["eval"]["infer_command"]) if any(r.variants for r in runs) else None
        finish_flag_checks = start_flag_checks(cfg, expand(cfg.get("base_command") or DEFAULT_BASE_COMMAND), infer,
                                               workdir, say)
    if cfg.get("eval"):
        rows = [f"{r.name}/{v.name}" for r in runs for v in r.variants] + [r.name for r in runs if not r.variants]
        check_eval_block(cfg, rows, [r.name for r in runs], Path.cwd(), say)
    else:
        say("no eval block: training only ('ablate report' needs eval.manifest or eval.references)")
    if finish_flag_checks:
        finish_flag_checks()
    root = runs[0].run_dir.parent
    root_ledger, _ = claim(root, TOOL, {}, flag="--overwrite")
    ledgers = [claim(run.run_dir, TOOL, {"command": run.train_command, "infer": run.infer_command},
                     overwrite=overwrite, flag="--overwrite")[0] for run in runs]  # all refusals before any write
    variant_ledgers = [[claim(v.folder, TOOL, {"command": run.train_command, "infer": v.command},
                              overwrite=overwrite, flag="--overwrite")[0] for v in run.variants] for run in runs]
    for run, ledger, vledgers in zip(runs, ledgers, variant_ledgers):
        if run.done:
            continue
        for name in RUN_FILES:
            ledger.record(name)
        for v, vledger in zip(run.variants, vledgers):
            for name in VARIANT_FILES:
                vledger.record(name)
            (v.folder / "variant.json").write_text(json.dumps(
                {"run": run.name, "variant": v.name, "flags": v.flags, "outputs": str(v.outputs),
                 "command": v.command}, indent=2, default=str), encoding="utf-8")
        script = command_script(run, workdir)
        meta = {"name": run.name, "flags": run.flags, "command": run.train_command, "infer": run.infer_command,
                "variants": {v.name: v.command for v in run.variants}}
        (run.run_dir / "command.sh").write_text(script, encoding="utf-8")
        os.chmod(run.run_dir / "command.sh", 0o755)
        (run.run_dir / "run.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    root_ledger.record("commands.txt")
    (root / "commands.txt").write_text("".join(_commands_entry(r) for r in runs), encoding="utf-8")
    return runs


def _commands_entry(run: Run) -> str:
    notes = "".join(f"#   then inference {v.name}: {v.command}\n" for v in run.variants)
    return (f"# {run.name}: {run.train_command}\n{notes}bash {shlex.quote(str(run.run_dir / 'command.sh'))} > "
            f"{shlex.quote(str(run.run_dir / 'log.txt'))} 2>&1\n")


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
    p = ArgumentParser(prog="python -m bagel_sr.eval.ablate", description=__doc__.split("\n\n")[0],
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
        runs = plan(a.grid, not a.no_flag_check, a.overwrite, not a.no_progress)
        print(f"planned {len(runs)} runs; commands in {runs[0].run_dir.parent / 'commands.txt'}")
        return 0
    if a.action == "run":
        runs = plan(a.grid, not a.no_flag_check, a.overwrite, not a.no_progress)
        if a.only:
            unknown = sorted(set(a.only) - {r.name for r in runs})
            if unknown:
                raise BadInput(f"unknown run names {unknown}; runs: {[r.name for r in runs]}")
            runs = [r for r in runs if r.name in a.only]
        return 1 if execute(runs, a.keep_going, a.dry_run) else 0
    res = build_report(a.grid, a.out, a.n_boot, not a.no_progress)
    print(res["console"])
    print(f"report: {res['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
