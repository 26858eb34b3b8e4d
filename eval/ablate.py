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

Inference variants (``eval/ablate_infer.py``): a run trains ONCE (``RUN_DIR``'s ledger marks the finished training),
then runs ``infer_command`` + the variant's flags once per variant, ``{outputs}`` being ``{run_dir}/outputs/VARIANT``
(``VARIANT``: e.g. ``start_t=0.3,num_samples=4``), each marked finished in ``RUN_DIR/infer/VARIANT``'s ledger. A finished
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
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from bagel_sr.errors import ArgumentParser, BadInput, MissingInput, cli_main
from bagel_sr.outputs import claim, shell_mark_finished

from .ablate_check import (check_eval_block, check_flags, expand, progress_printer,  # noqa: F401 (re-exported)
                           start_flag_checks, target_flags)
from .ablate_flags import flag_words, run_name  # noqa: F401 (re-exported)
from .ablate_grid import (DEFAULT_BASE_COMMAND, TOOL, Run, build_runs, expand_runs,  # noqa: F401 (re-exported)
                          load_grid)
from .ablate_infer import VARIANT_FILES, variant_lines
from .ablate_report import build_report

FAILED = "FAILED"
#: What ablate writes in each run folder (recorded in its ledger before they are written).
RUN_FILES = ("command.sh", "run.json", "log.txt", FAILED)


# ---------------------------------------------------------------- planning


def command_script(run: Run, workdir: Path) -> str:
    """Text of ``command.sh``: cd, train, optional inference, then the run marked finished in its ledger (only
    reached on success). With inference variants: train unless the run's ledger marks it finished, then each variant
    unless its own ledger does.
    """
    lines = ["#!/usr/bin/env bash", f"# run {run.name}, written by bagel_sr.eval.ablate plan", "set -euo pipefail",
             f"cd {shlex.quote(str(workdir))}"]
    if run.variants:
        return "\n".join(lines + variant_lines(run.run_dir, run.train_command, run.variants)) + "\n"
    lines.append(run.train_command)
    if run.infer_command:
        lines.append(run.infer_command)
    lines.append(shell_mark_finished(run.run_dir))
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


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m bagel_sr.eval.ablate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("action", choices=("plan", "run", "report"), help="plan, run or report the grid")
    p.add_argument("grid", help="grid YAML")
    p.add_argument("--keep_going", action="store_true", help="run: continue after a failed run")
    p.add_argument("--dry_run", action="store_true", help="run: only list what would run")
    p.add_argument("--only", nargs="+", help="run: only these run names")
    p.add_argument("--out", help="report: folder (default OUTPUT_ROOT/report)")
    p.add_argument("--n_boot", type=int, help="report: bootstrap resamples (default eval.n_boot or 10000)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
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
