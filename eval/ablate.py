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

import pandas as pd
import yaml
from tqdm.auto import tqdm

from bagel_sr.errors import BadInput, MissingInput, cli_main, one_line
from bagel_sr.outputs import claim

from . import report
from .evaluate import EvalSettings, collect_pairs, compare_tables, metric_columns, run_evaluation, unit_table
from .images import load_image

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


# ---------------------------------------------------------------- reporting


def eval_settings(ev: dict[str, Any]) -> EvalSettings:
    """EvalSettings from the grid's ``eval`` section."""
    hu = ev.get("hu_window")
    return EvalSettings(data_range=ev.get("data_range"), window=ev.get("ssim_window", "uniform7"),
                        color=ev.get("color", "gray"), convention=ev.get("convention", "plain"),
                        hu_window=tuple(hu) if hu else None, data_consistency=ev.get("data_consistency", True),
                        lpips_weights=ev.get("lpips_weights"), bits_stored=ev.get("bits_stored"))


def _outputs_of(run: Run, ev: dict[str, Any]) -> Path:
    fields = {"run_dir": str(run.run_dir), "name": run.name}
    return Path(fill(str(ev.get("outputs", "{run_dir}/outputs")), fields))


def _default_plots(cfg: dict[str, Any], table: pd.DataFrame) -> list[str]:
    plots = cfg.get("plots")
    if plots:
        return [_flag_name(p) for p in plots]
    flags = [_flag_name(f) for f in (cfg.get("grid") or {})] or [c for c in table.columns if c.startswith("pixel_loss")]
    return [f for f in flags if f in table.columns and pd.to_numeric(table[f], errors="coerce").notna().all()
            and table[f].nunique() > 1]


def _image_grid(runs: Sequence[Run], ev: dict[str, Any], per_image: dict[str, pd.DataFrame],
                settings: EvalSettings, path: Path, n: int) -> str | None:
    """Rows: the ``n`` pairs with the lowest mean PSNR over runs; columns: input, reference, each run."""
    if n <= 0 or not runs:
        return None
    mean_psnr = pd.concat([df.set_index("pair_id")["psnr"] for df in per_image.values()], axis=1).mean(axis=1)
    chosen = mean_psnr.replace([float("inf")], float("nan")).fillna(1e9).sort_values().index[:n]
    pair_lists = {r.name: {p.pair_id: p for p in collect_pairs(_outputs_of(r, ev), ev.get("references"),
                                                               ev.get("manifest"), ev.get("split"),
                                                               allow_missing=True)} for r in runs}
    first = pair_lists[runs[0].name]
    rows = []
    for pid in chosen:
        cols = []
        if first[pid].degraded is not None:
            cols.append(("input", load_image(first[pid].degraded, settings.color, settings.bits_stored).array))
        cols.append(("reference", load_image(first[pid].reference, settings.color, settings.bits_stored).array))
        cols += [(r.name, load_image(pair_lists[r.name][pid].output, settings.color, settings.bits_stored).array)
                 for r in runs if pid in pair_lists[r.name]]
        rows.append((str(pid), cols))
    return report.image_grid(rows, path)


def build_report(grid_path: str | Path, out: str | Path | None = None, n_boot: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate every finished run and write ``report.md``, ``ablation.csv`` and PNG figures; returns the table."""
    cfg = load_grid(grid_path)
    ev = cfg.get("eval") or {}
    runs = build_runs(cfg)
    finished = [r for r in runs if r.done]
    if not finished:
        raise RuntimeError("no finished runs (a run is finished when RUN_DIR/DONE exists); use 'ablate run' first")
    if not ev.get("references") and not ev.get("manifest"):
        raise BadInput(f"{grid_path}: the report needs eval.references (a folder) or eval.manifest")
    out = Path(out) if out else runs[0].run_dir.parent / "report"
    ledger, _ = claim(out, TOOL + ".report", {}, flag="--out")  # a report folder holds only what reports wrote
    settings = eval_settings(ev)
    n_boot = int(n_boot or ev.get("n_boot", 10000))
    rows, unit_tables, per_image = [], {}, {}
    for run in finished:
        res = run_evaluation(_outputs_of(run, ev), run.run_dir / "eval", settings, ev.get("references"),
                             ev.get("manifest"), split=ev.get("split"), n_boot=n_boot, worst=0, progress=progress,
                             title=f"Evaluation of run {run.name}")
        per_image[run.name] = res["per_image"]
        unit_tables[run.name] = unit_table(res["per_image"], res["per_volume"])
        row: dict[str, Any] = {"run": run.name, **{_flag_name(k): v for k, v in run.flags.items()}}
        for s in res["summary"].itertuples():
            row.update({s.metric: s.mean, f"{s.metric}_lo": s.ci_lo, f"{s.metric}_hi": s.ci_hi, "n": s.n,
                        "unit": s.unit})
        rows.append(row)
    table = pd.DataFrame(rows)
    sort_by = cfg.get("sort_by", "psnr")
    if sort_by == "ssim":
        sort_by = f"ssim_{settings.window}"
    if sort_by not in table.columns:
        raise BadInput(f"sort_by {sort_by!r} is not a computed metric; choose one of {metric_columns(table)}")
    table = table.sort_values(sort_by, ascending=not report.higher_is_better(sort_by), kind="stable")
    baseline = ev.get("baseline")
    if baseline:
        table = _add_baseline_columns(table, unit_tables, baseline, sort_by, n_boot)
    ledger.record("ablation.csv")
    table.to_csv(out / "ablation.csv", index=False)
    figures = _figures(cfg, table, settings, out, ledger)
    by_name = {r.name: r for r in runs}
    grid_png = _image_grid([by_name[n] for n in table["run"]], ev, per_image, settings,
                           ledger.record("image_grid.png"), int(ev.get("grid_images", 4)))
    if grid_png:
        figures.append(grid_png)
    pending = [r.name for r in runs if not r.done]
    md = _report_markdown(cfg, table, sort_by, settings, pending, figures)
    ledger.record("report.md")
    (out / "report.md").write_text(md, encoding="utf-8")
    return {"table": table, "report": out / "report.md", "figures": figures}


def _add_baseline_columns(table: pd.DataFrame, unit_tables: dict, baseline: str, metric: str,
                          n_boot: int) -> pd.DataFrame:
    if baseline not in unit_tables:
        raise BadInput(f"eval.baseline {baseline!r} is not a finished run; finished: {sorted(unit_tables)}")
    base_tab, _, key = unit_tables[baseline]
    diffs, lo, hi, p = [], [], [], []
    for name in table["run"]:
        tab = unit_tables[name][0]
        t = compare_tables(tab, base_tab, key, n_boot)[1].set_index("metric").loc[metric]
        diffs.append(t.mean_diff)
        lo.append(t.diff_lo)
        hi.append(t.diff_hi)
        p.append(t.p_value)
    return table.assign(**{f"{metric}_vs_{baseline}": diffs, f"{metric}_vs_{baseline}_lo": lo,
                           f"{metric}_vs_{baseline}_hi": hi, f"{metric}_vs_{baseline}_p": p})


def _figures(cfg: dict[str, Any], table: pd.DataFrame, settings: EvalSettings, out: Path, ledger) -> list[str]:
    params = _default_plots(cfg, table)
    figs = []
    for metric in ("psnr", f"ssim_{settings.window}"):
        if metric not in table.columns:
            continue
        for param in params:
            others = [p for p in params if p != param]
            hue = others[0] if others else None
            path = ledger.record(f"{metric}_vs_{param}.png")
            figs.append(report.plot_metric_vs_param(table, param, metric, path, hue))
    return figs


def _report_markdown(cfg: dict[str, Any], table: pd.DataFrame, sort_by: str, settings: EvalSettings,
                     pending: list[str], figures: list[str]) -> str:
    metrics = metric_columns(table)
    flags = [c for c in table.columns if c not in ("run", "n", "unit") and not any(
        c == m or c.startswith(f"{m}_") for m in metrics)]
    view = table[["run"] + flags].copy()
    for m in metrics:
        view[f"{m} [95% CI]"] = [report.fmt_ci(r[m], r[f"{m}_lo"], r[f"{m}_hi"]) for _, r in table.iterrows()]
    extra = [c for c in table.columns if "_vs_" in c and not c.endswith(("_lo", "_hi", "_p"))]
    for c in extra:
        view[f"{c} [95% CI], Wilcoxon p"] = [
            f"{report.fmt_ci(r[c], r[f'{c}_lo'], r[f'{c}_hi'])}, p={report.fmt(r[f'{c}_p'], 3)}"
            for _, r in table.iterrows()]
    view["n"] = [f"{n} {u}s" for n, u in zip(table["n"], table["unit"])]
    title = cfg.get("name", "Ablation")
    lines = [f"# {title}", "", f"Sorted by {sort_by} ({'higher' if report.higher_is_better(sort_by) else 'lower'} "
             "is better); mean [95% bootstrap interval].", ""]
    lines += [f"- {k}: {v}" for k, v in settings.describe().items()]
    lines += ["", report.markdown_table(view)]
    if pending:
        lines += ["", f"Not finished (left out): {', '.join(pending)}"]
    lines += [f"\n![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


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
