"""ablate sweeps the fidelity terms: a grid over ``pixel_loss_terms`` plans distinct runs whose commands the
embedded experiment parses back into the intended terms."""
import shlex

from bagel_sr.config import PixelLossConfig
from bagel_sr.embedded.experiment import parse
from bagel_sr.eval import ablate

SETS = ["l2:1", "l2:1,ssim:0.1", "l2:1,grad:0.1", "l2:1,lpl:0.05", "l2:1,ssim:0.1,grad:0.1,lpl:0.05"]


def test_a_grid_over_terms_plans_one_parsable_run_per_term_set():
    runs = ablate.build_runs({"grid": {"pixel_loss_terms": SETS, "seed": [0, 1]}, "output_root": "/x"})
    assert len({r.name for r in runs}) == len(SETS) * 2
    for run in runs:
        words = shlex.split(run.train_command)[len(shlex.split(ablate.DEFAULT_BASE_COMMAND)):]
        _, pixel = parse(words)
        assert pixel.term_weights == PixelLossConfig(terms=run.flags["pixel_loss_terms"]).term_weights
        assert ":" not in run.name and "," not in run.name
