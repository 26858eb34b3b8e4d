"""Reports a reader understands: run labels (not a folder called ``outputs``), PSNR/SSIM on every panel of the
worst cases with colour bars, one line per inference variant with legend and title, console tables within 120
columns, a note on small samples, and one line per data-consistency metric."""
import shutil
from pathlib import Path

import matplotlib.figure
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bagel_sr.errors import cli_main
from bagel_sr.eval import ablate, report
from bagel_sr.eval import evaluate as E
from bagel_sr.eval.readable import fit_console, small_sample_note
from bagel_sr.testing.ablate_grids import make_grid


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure saved during the test (inspected instead of the PNG's pixels)."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return saved


def two_runs(tmp, n=4, size=24):
    rng = np.random.default_rng(0)
    for d in ("refs", "inputs", "runs/a/outputs", "runs/b/outputs"):
        (tmp / d).mkdir(parents=True)
    for i in range(n):
        ref = rng.integers(30, 220, (size, size)).astype(float)
        for d, sigma in (("refs", 0), ("inputs", 30), ("runs/a/outputs", 5), ("runs/b/outputs", 15)):
            img = np.clip(ref + rng.normal(0, sigma, ref.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp / d / f"img{i}.png")


def test_labels_come_from_run_paths_or_flags_not_the_folder_name(tmp_path, capsys):
    two_runs(tmp_path)
    out = tmp_path / "rep"
    assert E.main(["--outputs", str(tmp_path / "runs/a/outputs"), "--compare", str(tmp_path / "runs/b/outputs"),
                   "--references", str(tmp_path / "refs"), "--out", str(out), "--n_boot", "100",
                   "--no_progress", "--worst", "2"]) == 0
    md = (out / "summary.md").read_text()
    assert "A = a, B = b" in md and "A = outputs" not in md
    assert E.main(["--outputs", str(tmp_path / "runs/a/outputs"), "--compare", str(tmp_path / "runs/b/outputs"),
                   "--references", str(tmp_path / "refs"), "--out", str(tmp_path / "rep2"), "--n_boot", "100",
                   "--no_progress", "--worst", "0", "--label", "pixel loss 0.05", "--compare_label", "flow only"]) == 0
    assert "A = pixel loss 0.05, B = flow only" in (tmp_path / "rep2" / "summary.md").read_text()
    console = capsys.readouterr().out
    assert max(len(line) for line in console.splitlines()) <= 120
    assert "note: small sample: 4 image(s)" in console  # 4 images < 10


def test_worst_cases_titles_every_panel_with_psnr_ssim_and_colour_bars(tmp_path, figures):
    two_runs(tmp_path, n=3)
    pairs = E.pairs_from_folders(tmp_path / "runs/a/outputs", tmp_path / "refs", inputs=tmp_path / "inputs")
    other = {p.pair_id: p for p in E.pairs_from_folders(tmp_path / "runs/b/outputs", tmp_path / "refs")}
    s = E.EvalSettings()
    per_image, _, _ = E.evaluate_pairs(pairs, s, progress=False)
    assert E.worst_cases_figure(per_image, pairs, s, tmp_path / "w.png", 2, other, labels=("a", "b"))
    fig = figures[-1]
    titles = [ax.get_title() for ax in fig.axes]
    assert sum("PSNR" in t and "SSIM" in t for t in titles) == 2 * 3  # input, A and B in each of 2 rows
    assert sum(t.startswith("A: a") for t in titles) == 2 and sum(t.startswith("B: b") for t in titles) == 2
    # the PSNR on A's panel is the per-image PSNR of that pair
    worst = per_image.sort_values("psnr").iloc[0]
    a_title = next(t for t in titles if t.startswith("A: a"))
    assert f"PSNR {report.fmt(worst.psnr, 4)} dB" in a_title
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 2 * 2  # one per error map


def test_metric_plot_has_one_line_per_inference_variant_with_legend_and_title(tmp_path, figures):
    rows = [{"run": f"w{w}/s{s},k{k}", "pixel_loss_weight": w, "start_t": s, "num_samples": k,
             "psnr": 20 + w * 10 + s + k, "psnr_lo": 19 + w, "psnr_hi": 25 + w}
            for w in (0.0, 0.05) for s in (1.0, 0.3) for k in (1, 4)]
    report.plot_metric_vs_param(pd.DataFrame(rows), "pixel_loss_weight", "psnr", tmp_path / "p.png",
                                ["start_t", "num_samples"], "sweep: psnr vs pixel_loss_weight")
    ax = figures[-1].axes[0]
    assert len(ax.containers) == 4  # 4 variants, each a line over the 2 weights
    assert all(len(c.lines[0].get_xdata()) == 2 for c in ax.containers)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == sorted(f"start_t={s}, num_samples={k}" for s in (1.0, 0.3) for k in (1, 4))
    assert ax.get_title() == "sweep: psnr vs pixel_loss_weight"


def test_ablate_report_console_fits_120_columns_and_notes_a_small_sample(tmp_path, capsys, figures):
    grid = make_grid(tmp_path)
    assert cli_main(ablate.main, ["run", str(grid), "--no_progress"]) == 0
    capsys.readouterr()
    assert cli_main(ablate.main, ["report", str(grid), "--no_progress"]) == 0
    console = capsys.readouterr().out
    lines = console.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert sum(line.startswith("weight0.") for line in lines) == 8  # every row shown
    assert "note: small sample: 4 image(s)" in console
    md = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert "**Note: small sample" in md
    variant = "start_t=0.3,num_samples=4"
    summary = (tmp_path / "runs" / "weight0.1" / "eval" / variant / "summary.md").read_text()
    assert f"# Evaluation of run weight0.1/{variant}" in summary
    plot = next(f for f in figures if f.axes[0].get_xlabel() == "pixel_loss_weight"
                and f.axes[0].get_ylabel().startswith("psnr"))
    assert len(plot.axes[0].containers) == 4 and plot.axes[0].get_legend() is not None


def test_fit_console_keeps_width_and_names_what_it_leaves_out():
    df = pd.DataFrame({"run": ["x" * 70, "y"], **{f"metric_{i}": ["12.34 [12.00, 12.70]"] * 2 for i in range(8)}})
    text = fit_console(df, "report.md")
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "not shown here" in text and "metric_7" in text.splitlines()[-1] and "report.md" in text
    assert "metric_0" in text.splitlines()[0]


def test_small_sample_note_thresholds():
    assert small_sample_note(12, "image", 12, ["p1", "p2", "p3"]) is None
    assert "3 image(s) from 1 subject(s)" in small_sample_note(3, "image", 3, ["p1"] * 3)
    assert "from 2 subject(s)" in small_sample_note(40, "image", 40, ["p1", "p2"] * 20)
    assert small_sample_note(9, "image", 9, [None] * 9) is not None
    assert small_sample_note(10, "image", 10, [None] * 10) is None


def test_hu_evaluation_summary_explains_dc_metrics_and_small_sample(tmp_path):
    from bagel_sr.data import build_dataset

    from bagel_sr.testing.user_pngs import make_ct_pngs, template_copy

    make_ct_pngs(tmp_path / "CT_exports")
    build_dataset(template_copy("ct_png_hu.yaml", tmp_path), progress=False, log=lambda m: None)
    rows = [__import__("json").loads(x) for x in (tmp_path / "ct" / "manifest.jsonl").read_text().splitlines()]
    (tmp_path / "restored").mkdir()
    for r in rows:
        if r["split"] == "test":
            shutil.copyfile(tmp_path / "ct" / r["heldout"]["lr"], tmp_path / "restored" / f"{r['pair_id']}.png")
    E.run_evaluation(tmp_path / "restored", tmp_path / "rep", E.EvalSettings(hu_window=(40, 400)),
                     manifest=tmp_path / "ct" / "manifest.jsonl", split="test", n_boot=100, progress=False)
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "small sample: 3 image(s) from 1 subject(s)" in md
    assert "- dc_nrmse: " in md and "- dc_ref_nrmse: dc_nrmse of the ground truth itself" in md
    per = pd.read_csv(tmp_path / "rep" / "per_image.csv")
    assert (per["dc_ref_nrmse"] > per["dc_nrmse"]).all()  # the copied input is "more consistent" than the truth
    assert Path(tmp_path / "rep" / "worst_cases.png").is_file()


def test_path_labels_skip_generic_folders_and_tell_runs_apart(tmp_path):
    from bagel_sr.eval.readable import pair_labels, path_label

    assert path_label(tmp_path / "runs" / "weight0.05" / "outputs") == "weight0.05"
    assert path_label(tmp_path / "restored") == "restored"
    a, b = (tmp_path / "runs" / w / "outputs" / "start_t=0.3" for w in ("w0", "w1"))
    assert pair_labels(a, b) == ("w0/start_t=0.3", "w1/start_t=0.3")
    assert pair_labels(a, b, ("mine", None)) == ("mine", "w1/start_t=0.3")
