"""The worst-cases figure of an evaluation: the ``k`` pairs worst by a metric, each with its degraded input, the
reference, every run's output titled with its PSNR/SSIM, and the absolute error maps with a colour bar."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from . import report
from .images import load_image
from .pairs import Pair
from .settings import prepare


def worst_cases_figure(per_image: pd.DataFrame, pairs: Sequence[Pair], settings, path: Path, k: int = 6,
                       other: dict[str, Pair] | None = None, metric: str = "psnr",
                       labels: tuple[str, str] = ("output", "compare")) -> str | None:
    """PNG of the ``k`` pairs worst by ``metric`` (run A's, and the compared run B's output when ``other`` is
    given); ``labels`` name the two runs. None when ``k`` is 0 or the metric was not computed."""
    if k <= 0 or metric not in per_image.columns:
        return None
    by_id = {p.pair_id: p for p in pairs}
    worst = per_image.sort_values(metric, ascending=report.higher_is_better(metric)).head(k)
    cases = []
    for row in worst.itertuples():
        p = by_id[row.pair_id]

        def load(file, p=p):
            return prepare(load_image(file, settings.color, settings.bits_stored), settings, p.intensity)

        outs = [(labels[0], load(p.output))]
        if other and row.pair_id in other:
            outs.append((labels[1], load(other[row.pair_id].output)))
        halluc = f"\nhalluc={report.fmt(row.halluc_share, 3)}" if hasattr(row, "halluc_share") else ""
        cases.append({"title": f"{row.pair_id}\n{metric}={report.fmt(getattr(row, metric))}{halluc}",
                      "reference": load(p.reference), "outputs": outs, "data_range": row.data_range,
                      "input": _same_size_input(p, load), "window": settings.window})
    return report.plot_worst_cases(cases, path)


def _same_size_input(p: Pair, load):
    """The pair's degraded input when it exists and has the reference's size (else None: not comparable)."""
    if p.degraded is None or not Path(p.degraded).is_file():
        return None
    img, ref = load(p.degraded), load(p.reference)
    return img if img.shape == ref.shape else None
