"""The worst-cases figure (bagel_sr.eval.worst_cases): PSNR/SSIM on every panel, a colour bar per error map."""
from bagel_sr.eval import evaluate as E
from bagel_sr.eval import report
from bagel_sr.testing.builder_inputs import two_runs

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
