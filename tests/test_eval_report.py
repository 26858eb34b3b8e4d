"""Report plots (bagel_sr.eval.report): one line per inference variant, with legend and title."""
import pandas as pd

from bagel_sr.eval import report

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
