"""The pure pieces of validation during training: settings and flags, the val subset and its shards, scoring with
the evaluation's own functions, the grid and the CSV; and the metric functions eval and validation now share."""
import csv

import numpy as np
import pytest
import torch
from scipy import ndimage

from bagel_sr import image_metrics, validation_math as V
from bagel_sr.eval import metrics as eval_metrics
from bagel_sr.restoration import ONE_STEP_START_T
from bagel_sr.validation_config import ValidationConfig, val_flag_help


def test_settings_default_to_the_one_step_modes_start_and_refuse_bad_values_naming_the_flag():
    c = ValidationConfig()
    assert (c.enabled, c.every, c.images, c.start_t, c.ema) == (False, 500, 32, ONE_STEP_START_T, False)
    c = ValidationConfig.from_flags({"bagel_sr_val_datasets": "a.yaml, b.yaml", "bagel_sr_val_every": "10",
                                     "bagel_sr_val_ema": "True", "bagel_sr_val_images": None})
    assert c.enabled and c.yamls == ["a.yaml", "b.yaml"] and c.every == 10 and c.ema is True and c.images == 32
    for flag, value, allowed in (("every", 0, ">= 1"), ("images", 0, ">= 1"), ("start_t", 0.0, r"\(0, 1\]"),
                                 ("start_t", 1.5, r"\(0, 1\]"), ("ema", "maybe", "True or False")):
        with pytest.raises(ValueError, match=rf"--bagel_sr_val_{flag}: got .*allowed: .*{allowed}"):
            ValidationConfig(**{flag: value})
    assert list(val_flag_help()) == [f"bagel_sr_val_{f}" for f in ("datasets", "every", "images", "start_t", "ema", "seed")]


def test_the_subset_is_fixed_by_the_seed_and_every_rank_runs_the_same_number_of_restorations():
    a, b = V.choose_subset(100, 7, 0), V.choose_subset(100, 7, 0)
    assert a == b == sorted(a) and len(set(a)) == 7 and a != V.choose_subset(100, 7, 1)
    assert V.choose_subset(5, 5, 3) == [0, 1, 2, 3, 4]
    for world in (1, 2, 3, 8):
        shards = [V.shard(a, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1                                # same count on every rank
        assert sorted(i for s in shards for i in s if i is not None) == a        # each image exactly once


def test_scores_are_the_evaluations_functions_on_luma_of_the_restoration_against_a_gray_truth():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    restored = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ref, pred = V.comparable(truth, restored)
    luma = restored.astype(np.float64) / 255 @ np.array([0.299, 0.587, 0.114])
    assert np.allclose(ref, truth / 255) and np.allclose(pred, luma)
    s = V.scores(ref, pred)
    assert s == {"psnr": eval_metrics.psnr(ref, pred, 1.0), "ssim": eval_metrics.ssim(ref, pred, 1.0, "uniform7"),
                 "halluc": eval_metrics.hallucination_share(ref, pred, 1.0, 0.1)}
    same = np.repeat(truth[..., None], 3, -1)                    # a gray restoration stored as RGB scores as gray
    assert V.scores(*V.comparable(truth, same))["psnr"] == float("inf")
    ref3, pred3 = V.comparable(same, restored)                   # a gray truth stored as RGB is a gray truth
    assert np.allclose(ref3, ref) and np.allclose(pred3, luma)
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)   # a colour truth: channel by channel
    assert V.comparable(colour, restored)[1].shape == (32, 32, 3)


def test_a_ct_set_is_compared_in_the_hu_window():
    intensity = {"unit": "HU", "low": -1000.0, "high": 1000.0}
    truth = np.array([[0, 65535]], dtype=np.uint16).repeat(8, 0)
    ref, _ = V.comparable(truth, truth, intensity)
    assert np.allclose(ref[0], [0.0, 1.0])                      # -1000 HU and +1000 HU clip to the window's ends
    mid = np.full((8, 2), 32768, dtype=np.uint16)               # about 0 HU: inside the (40, 400) window
    assert 0 < V.comparable(mid, mid, intensity)[0][0, 0] < 1


def test_totals_sum_over_ranks_to_the_mean_of_all_images():
    rows = [{"psnr": 10.0, "ssim": 0.5, "halluc": 0.1}, {"psnr": 20.0, "ssim": 0.7, "halluc": 0.3}]
    summed = V.totals(rows[:1]) + V.totals(rows[1:]) + V.totals([])   # three ranks, one with padding only
    assert V.means(summed) == pytest.approx({"val_psnr": 15.0, "val_ssim": 0.6, "val_halluc": 0.2})


def test_grid_and_csv(tmp_path):
    panels = [[np.zeros((8, 8)), np.ones((8, 8, 3)), np.full((4, 6), 0.5), V.error_map(np.zeros((8, 8)), np.ones((8, 8)))]]
    g = V.grid(panels * 2)
    assert g.dtype == np.uint8 and g.shape == (2 * 10 + 2, 4 * 10 + 2, 3)
    assert (g[2:10, 12:20] == 255).all() and (g[2:10, 2:10] == 0).all()
    V.append_csv(tmp_path / "v.csv", {"step": 0, "val_psnr": 1.5})
    V.append_csv(tmp_path / "v.csv", {"step": 5, "val_psnr": 2.5})
    rows = list(csv.DictReader(open(tmp_path / "v.csv")))
    assert [(r["step"], r["val_psnr"]) for r in rows] == [("0", "1.5"), ("5", "2.5")]


@pytest.mark.parametrize("window", ["uniform7", "gaussian11"])
def test_the_shared_ssim_filters_equal_scipys(window):
    rng = np.random.default_rng(1)
    x = rng.random((23, 31))
    ours = image_metrics._filter(x, image_metrics._kernel(window))
    theirs = (ndimage.uniform_filter(x, size=7, mode="reflect") if window == "uniform7"
              else ndimage.gaussian_filter(x, sigma=1.5, truncate=3.5, mode="reflect"))
    assert np.abs(ours - theirs).max() < 1e-12
    assert eval_metrics.ssim is image_metrics.ssim and eval_metrics.psnr is image_metrics.psnr


def test_validation_samples_as_infer_does_by_default():
    from dataclasses import asdict

    from bagel_sr.eval.infer import SamplingArgs
    from bagel_sr.validation.loop import SAMPLING

    assert SAMPLING == asdict(SamplingArgs())
