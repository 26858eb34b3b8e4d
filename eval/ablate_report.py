"""ablate's report: evaluate every finished row of a grid (a training run, or a training run x an inference
variant), compare with a baseline, write ``report.md``, ``ablation.csv``, metric plots and an image grid
(``python -m bagel_sr.eval.ablate report GRID.yaml``). PSNR, SSIM and the hallucination share stand side by side
in the first table; the other metrics follow in a second one."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from bagel_sr.errors import BadInput
from bagel_sr.outputs import claim

from . import readable, report
from .ablate_check import eval_settings
from .ablate_flags import fill, flag_name
from .ablate_grid import TOOL, Run, build_runs, load_grid
from .evaluate import EvalSettings, collect_pairs, compare_tables, metric_columns, run_evaluation, unit_table
from .images import load_image


@dataclass
class Row:
    """One row of the report: a training run with one inference variant (``variant`` None: the run's only one)."""

    name: str
    run: Run
    variant: str | None
    flags: dict[str, Any]  # table columns: training flags, then inference flags
    outputs: Path
    eval_dir: Path
    done: bool


def headline_metrics(settings: EvalSettings) -> list[str]:
    """The metrics shown side by side for every row: PSNR, SSIM (the settings' window), hallucination share."""
    return ["psnr", f"ssim_{settings.window}", "halluc_share"]


LESION_COLUMNS = {"detected": "lesions detected", "cr": "lesion contrast recovery", "erased": "lesions erased",
                  "invented": "invented lesions / image"}


def lesion_columns(summary: pd.DataFrame) -> dict[str, float]:
    """``lesion_<metric>`` (+ ``_lo``/``_hi``) of run A over all lesions, from the lesion study's summary."""
    out = {}
    for metric in LESION_COLUMNS:
        hit = summary[(summary["system"] == "A") & (summary["metric"] == metric) & summary["group"].isin(["all", "per image"])]
        if len(hit):
            r = hit.iloc[0]
            out.update({f"lesion_{metric}": r["mean"], f"lesion_{metric}_lo": r["ci_lo"], f"lesion_{metric}_hi": r["ci_hi"]})
    return out


def infer_column(flag: str, train_flags: set[str]) -> str:
    """Table column of an inference flag: its name, or ``infer_<name>`` when a training flag has that name."""
    flag = flag_name(flag)
    return f"infer_{flag}" if flag in train_flags else flag


def report_rows(runs: Sequence[Run], ev: dict[str, Any]) -> list[Row]:
    """One row per run without inference variants, one per (run, variant) otherwise (named ``RUN/VARIANT``)."""
    train_flags = {flag_name(k) for r in runs for k in r.flags}
    rows = []
    for run in runs:
        flags = {flag_name(k): v for k, v in run.flags.items()}
        if not run.variants:
            outputs = Path(fill(str(ev.get("outputs", "{run_dir}/outputs")),
                                {"run_dir": str(run.run_dir), "name": run.name}))
            rows.append(Row(run.name, run, None, flags, outputs, run.run_dir / "eval", run.done))
        for v in run.variants:
            vflags = {**flags, **{infer_column(k, train_flags): x for k, x in v.flags.items()}}
            rows.append(Row(f"{run.name}/{v.name}", run, v.name, vflags, v.outputs, run.run_dir / "eval" / v.name,
                            run.trained and v.done))
    return rows


def _default_plots(cfg: dict[str, Any], table: pd.DataFrame, train_flags: set[str]) -> list[str]:
    plots = cfg.get("plots")
    if plots:
        return [flag_name(p) for p in plots]
    flags = [flag_name(f) for f in (cfg.get("grid") or {})] or [c for c in table.columns if c.startswith("pixel_loss")]
    flags += [infer_column(f, train_flags) for f in (cfg.get("infer_grid") or {})]
    return [f for f in flags if f in table.columns and pd.to_numeric(table[f], errors="coerce").notna().all()
            and table[f].nunique() > 1]


def _image_grid(shown: Sequence[Row], ev: dict[str, Any], per_image: dict[str, pd.DataFrame],
                settings: EvalSettings, path: Path, n: int) -> str | None:
    """Rows: the ``n`` pairs with the lowest mean PSNR over rows; columns: input, reference, each row's output."""
    if n <= 0 or not shown:
        return None
    mean_psnr = pd.concat([df.set_index("pair_id")["psnr"] for df in per_image.values()], axis=1).mean(axis=1)
    chosen = mean_psnr.replace([float("inf")], float("nan")).fillna(1e9).sort_values().index[:n]
    pair_lists = {r.name: {p.pair_id: p for p in collect_pairs(r.outputs, ev.get("references"),
                                                               ev.get("manifest"), ev.get("split"),
                                                               allow_missing=True)} for r in shown}
    first = pair_lists[shown[0].name]
    rows = []
    for pid in chosen:
        cols = []
        if first[pid].degraded is not None:
            cols.append(("input", load_image(first[pid].degraded, settings.color, settings.bits_stored).array))
        cols.append(("reference", load_image(first[pid].reference, settings.color, settings.bits_stored).array))
        cols += [(r.name, load_image(pair_lists[r.name][pid].output, settings.color, settings.bits_stored).array)
                 for r in shown if pid in pair_lists[r.name]]
        rows.append((str(pid), cols))
    return report.image_grid(rows, path)


def build_report(grid_path: str | Path, out: str | Path | None = None, n_boot: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate every finished row and write ``report.md``, ``ablation.csv`` and PNG figures; returns the table."""
    cfg = load_grid(grid_path)
    ev = cfg.get("eval") or {}
    runs = build_runs(cfg)
    rows_all = report_rows(runs, ev)
    finished = [r for r in rows_all if r.done]
    if not finished:
        raise RuntimeError("no finished runs (a run is finished when its folder's ledger says so, an inference variant "
                           "when RUN_DIR/infer/VARIANT's does too); use 'ablate run' first")
    if not ev.get("references") and not ev.get("manifest"):
        raise BadInput(f"{grid_path}: the report needs eval.references (a folder) or eval.manifest")
    out = Path(out) if out else runs[0].run_dir.parent / "report"
    ledger, _ = claim(out, TOOL + ".report", {}, flag="--out")  # a report folder holds only what reports wrote
    settings = eval_settings(ev)
    n_boot = int(n_boot or ev.get("n_boot", 10000))
    rows, unit_tables, per_image, small = [], {}, {}, None
    for r in finished:
        res = run_evaluation(r.outputs, r.eval_dir, settings, ev.get("references"),
                             ev.get("manifest"), split=ev.get("split"), n_boot=n_boot, worst=0, progress=progress,
                             title=f"Evaluation of run {r.name}", label=r.name, lesions=ev.get("lesions"),
                             lesion_fp_per_image=float(ev.get("lesion_fp_per_image", 0.25)))
        small = small or next((n for n in res["notes"] if n.startswith("small sample")), None)
        per_image[r.name] = res["per_image"]
        unit_tables[r.name] = unit_table(res["per_image"], res["per_volume"])
        row: dict[str, Any] = {"run": r.name, **r.flags}
        for s in res["summary"].itertuples():
            row.update({s.metric: s.mean, f"{s.metric}_lo": s.ci_lo, f"{s.metric}_hi": s.ci_hi, "n": s.n,
                        "unit": s.unit})
        if res.get("lesions"):
            row.update(lesion_columns(res["lesions"]["summary"]))
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
        table = _add_baseline_columns(table, unit_tables, _baselines(finished, str(baseline)), str(baseline),
                                      sort_by, n_boot)
    ledger.record("ablation.csv")
    table.to_csv(out / "ablation.csv", index=False)
    train_flags = {flag_name(k) for r in runs for k in r.flags}
    figures = _figures(cfg, table, settings, out, ledger, train_flags, _flag_columns(table, finished))
    by_name = {r.name: r for r in finished}
    grid_png = _image_grid([by_name[n] for n in table["run"]], ev, per_image, settings,
                           ledger.record("image_grid.png"), int(ev.get("grid_images", 4)))
    if grid_png:
        figures.append(grid_png)
    pending = [r.name for r in rows_all if not r.done]
    md = _report_markdown(cfg, table, sort_by, settings, pending, figures, small, _flag_columns(table, finished))
    ledger.record("report.md")
    (out / "report.md").write_text(md, encoding="utf-8")
    console = readable.fit_console(console_view(table, settings), f"{out / 'report.md'} and {out / 'ablation.csv'}")
    if small:
        console += "\n" + textwrap.fill("note: " + small, readable.CONSOLE_WIDTH)
    return {"table": table, "report": out / "report.md", "figures": figures, "console": console}


def console_view(table: pd.DataFrame, settings: EvalSettings) -> pd.DataFrame:
    """The rows with the headline metrics (mean [95% CI]), the difference to the baseline and n: what the console
    shows (the flags are in the row names; everything is in report.md and ablation.csv)."""
    view = table[["run"]].copy()
    for m in headline_metrics(settings):
        if m in table.columns:
            digits = 4 if m == "psnr" else 3
            view[m] = [report.fmt_ci(r[m], r[f"{m}_lo"], r[f"{m}_hi"], digits) for _, r in table.iterrows()]
    for c in [c for c in table.columns if "_vs_" in c and not c.endswith(("_lo", "_hi", "_p"))]:
        view[c.replace("_vs_", " vs ")] = [f"{report.fmt(r[c], 3)}, p={report.fmt(r[f'{c}_p'], 2)}"
                                          for _, r in table.iterrows()]
    view["n"] = table["n"].to_numpy()
    return view


def _baselines(finished: Sequence[Row], baseline: str) -> dict[str, str | None]:
    """The row each row is compared with: the row named ``baseline``, or, when ``baseline`` names a training run
    with inference variants, that run's row of the same variant (None: the baseline run lacks that variant)."""
    names = {r.name for r in finished}
    if baseline in names:
        return {r.name: baseline for r in finished}
    if not any(r.run.name == baseline for r in finished):
        raise BadInput(f"eval.baseline {baseline!r} is not a finished run or row; finished: {sorted(names)}")
    same = {r.name: f"{baseline}/{r.variant}" for r in finished}
    return {name: other if other in names else None for name, other in same.items()}


def _add_baseline_columns(table: pd.DataFrame, unit_tables: dict, baselines: dict[str, str | None], baseline: str,
                          metric: str, n_boot: int) -> pd.DataFrame:
    diffs, lo, hi, p = [], [], [], []
    for name in table["run"]:
        if baselines[name] is None:
            for values in (diffs, lo, hi, p):
                values.append(float("nan"))
            continue
        tab = unit_tables[name][0]
        base_tab, _, key = unit_tables[baselines[name]]
        t = compare_tables(tab, base_tab, key, n_boot)[1].set_index("metric").loc[metric]
        diffs.append(t.mean_diff)
        lo.append(t.diff_lo)
        hi.append(t.diff_hi)
        p.append(t.p_value)
    return table.assign(**{f"{metric}_vs_{baseline}": diffs, f"{metric}_vs_{baseline}_lo": lo,
                           f"{metric}_vs_{baseline}_hi": hi, f"{metric}_vs_{baseline}_p": p})


def _figures(cfg: dict[str, Any], table: pd.DataFrame, settings: EvalSettings, out: Path, ledger,
             train_flags: set[str], flag_columns: list[str]) -> list[str]:
    params = _default_plots(cfg, table, train_flags)
    figs = []
    for metric in headline_metrics(settings):
        if metric not in table.columns:
            continue
        for param in params:  # one line per combination of the other swept flags (e.g. each inference variant)
            others = [c for c in flag_columns if c != param and table[c].astype(str).nunique() > 1]
            path = ledger.record(f"{metric}_vs_{param}.png")
            title = f"{cfg.get('name') or 'ablation'}: {metric} vs {param}"
            figs.append(report.plot_metric_vs_param(table, param, metric, path, others, title))
    return figs


def _flag_columns(table: pd.DataFrame, rows: Sequence[Row]) -> list[str]:
    """The table's flag columns (training and inference flags of the rows; a metric column never counts, even
    one whose values are all undefined, such as the infinite dc_psnr of outputs that equal their input)."""
    names = {k for r in rows for k in r.flags}
    return [c for c in table.columns if c in names]


def _report_markdown(cfg: dict[str, Any], table: pd.DataFrame, sort_by: str, settings: EvalSettings,
                     pending: list[str], figures: list[str], small: str | None = None,
                     flags: list[str] | None = None) -> str:
    metrics = metric_columns(table)
    if flags is None:
        flags = [c for c in table.columns if c not in ("run", "n", "unit") and not c.startswith("lesion_") and not any(
            c == m or c.startswith(f"{m}_") for m in metrics)]
    view = table[["run"] + flags].copy()
    headline = headline_metrics(settings)
    for m in headline:
        view[f"{m} [95% CI]"] = _ci_cells(table, m)
    extra = [c for c in table.columns if "_vs_" in c and not c.endswith(("_lo", "_hi", "_p"))]
    for c in extra:
        view[f"{c} [95% CI], Wilcoxon p"] = [
            f"{report.fmt_ci(r[c], r[f'{c}_lo'], r[f'{c}_hi'])}, p={report.fmt(r[f'{c}_p'], 3)}"
            for _, r in table.iterrows()]
    for m, label in LESION_COLUMNS.items():  # with eval.lesions: the lesion study's columns (run A, all lesions)
        if f"lesion_{m}" in table.columns:
            view[f"{label} [95% CI]"] = _ci_cells(table, f"lesion_{m}")
    view["n"] = [f"{n} {u}s" for n, u in zip(table["n"], table["unit"])]
    title = cfg.get("name", "Ablation")
    lines = [f"# {title}", "", f"Sorted by {sort_by} ({'higher' if report.higher_is_better(sort_by) else 'lower'} "
             "is better); mean [95% bootstrap interval].", ""]
    lines += [f"- {k}: {v}" for k, v in settings.describe().items()]
    if small:
        lines += ["", f"**Note: {small}.**"]
    lines += ["", report.markdown_table(view)]
    others = [m for m in metrics if m not in headline]
    if others:
        rest = table[["run"]].copy()
        for m in others:
            rest[f"{m} [95% CI]"] = _ci_cells(table, m)
        lines += ["", "Other metrics:", "", report.markdown_table(rest)]
    if pending:
        lines += ["", f"Not finished (left out): {', '.join(pending)}"]
    glossary = readable.metric_notes(metrics)
    if glossary:
        lines += ["", "What the less common metrics mean:", ""] + [f"- {g}" for g in glossary]
    lines += [f"\n![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


def _ci_cells(table: pd.DataFrame, metric: str) -> list[str]:
    """``mean [lo, hi]`` of ``metric`` per row (``n/a`` where the evaluation did not compute it)."""
    if metric not in table.columns:
        return ["n/a"] * len(table)
    return [report.fmt_ci(r[metric], r[f"{metric}_lo"], r[f"{metric}_hi"]) for _, r in table.iterrows()]
