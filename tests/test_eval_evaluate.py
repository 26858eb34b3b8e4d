"""evaluate: folders and manifests, per-volume aggregation, paired comparison, reports."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage
from scipy import stats as sps
from skimage import metrics as skm

from bagel_sr.eval import evaluate as E
from bagel_sr.eval import pairs as pairs_mod
from bagel_sr.eval import pairs as pairs_mod
from bagel_sr.data import consistency as ops
from bagel_sr.eval.images import load_image
from bagel_sr.errors import cli_main
from bagel_sr.eval import evaluate
from bagel_sr.testing.builder_inputs import eval_folders as _eval_folders
from bagel_sr.testing.builder_inputs import two_runs


def _smooth(rng, shape):
    return np.clip(ndimage.gaussian_filter(rng.random(shape), 2) * 2 - 0.5, 0, 1)


@pytest.fixture
def png_folders(tmp_path):
    rng = np.random.default_rng(0)
    refs, outs = tmp_path / "ref", tmp_path / "out"
    refs.mkdir(), outs.mkdir()
    arrays = {}
    for i in range(5):
        ref = (_smooth(rng, (40, 40)) * 255).astype(np.uint8)
        out = np.clip(ref + rng.normal(0, 3 + 2 * i, ref.shape), 0, 255).astype(np.uint8)
        Image.fromarray(ref).save(refs / f"img{i}.png")
        Image.fromarray(out).save(outs / f"img{i}.png")
        arrays[f"img{i}"] = (ref, out)
    return refs, outs, arrays


def test_folder_mode_matches_skimage_and_writes_report(png_folders, tmp_path):
    refs, outs, arrays = png_folders
    rep = tmp_path / "report"
    assert E.main(["--outputs", str(outs), "--references", str(refs), "--out", str(rep), "--n_boot", "500",
                   "--worst", "2", "--no_progress"]) == 0
    df = pd.read_csv(rep / "per_image.csv").set_index("pair_id")
    for stem, (ref, out) in arrays.items():
        assert df.loc[stem, "psnr"] == pytest.approx(skm.peak_signal_noise_ratio(ref, out), abs=1e-9)
        assert df.loc[stem, "ssim_uniform7"] == pytest.approx(skm.structural_similarity(ref, out), abs=1e-9)
    summary = pd.read_csv(rep / "summary.csv").set_index("metric")
    assert summary.loc["psnr", "mean"] == pytest.approx(df["psnr"].mean())
    assert summary.loc["psnr", "ci_lo"] < summary.loc["psnr", "mean"] < summary.loc["psnr", "ci_hi"]
    md = (rep / "summary.md").read_text()
    assert "uniform 7x7" in md and "LPIPS skipped" in md and "worst_cases.png" in md
    assert (rep / "worst_cases.png").stat().st_size > 1000


def test_gaussian_window_and_float_inputs(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "r").mkdir(), (tmp_path / "o").mkdir()
    ref = rng.random((32, 32)) * 3.0
    out = ref + 0.1 * rng.standard_normal(ref.shape)
    np.save(tmp_path / "r" / "a.npy", ref)
    np.save(tmp_path / "o" / "a.npy", out)
    with pytest.raises(ValueError, match="--data_range"):
        E.run_evaluation(tmp_path / "o", tmp_path / "rep", E.EvalSettings(), tmp_path / "r", progress=False)
    res = E.run_evaluation(tmp_path / "o", tmp_path / "rep", E.EvalSettings(data_range=3.0, window="gaussian11"),
                           tmp_path / "r", n_boot=100, worst=0, progress=False)
    row = res["per_image"].iloc[0]
    assert row["ssim_gaussian11"] == pytest.approx(skm.structural_similarity(
        ref, out, data_range=3.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False))
    assert "Gaussian 11x11" in (tmp_path / "rep" / "summary.md").read_text()


def test_missing_outputs_are_listed(png_folders):
    refs, outs, _ = png_folders
    (outs / "img3.png").unlink()
    with pytest.raises(FileNotFoundError, match="img3"):
        E.pairs_from_folders(outs, refs)
    assert len(E.pairs_from_folders(outs, refs, allow_missing=True)) == 4


def test_image_reading_conventions(tmp_path):
    x16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(x16).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.was_integer and img.array.max() == pytest.approx(x16.max() / 65535)
    gray = np.random.default_rng(2).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").array.shape == (16, 16)
    color = np.random.default_rng(3).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(color).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match="--color luma"):
        load_image(tmp_path / "c.png")
    assert load_image(tmp_path / "c.png", "luma").array.shape == (16, 16)
    assert load_image(tmp_path / "c.png", "rgb").array.shape == (16, 16, 3)


@pytest.fixture
def manifest_case(tmp_path):
    """6 volumes x 2 slices of float MR-like images degraded by bicubic x2 + noise; runs A (better) and B."""
    rng = np.random.default_rng(5)
    data = tmp_path / "data"
    for sub in ("hr", "lr"):
        (data / sub).mkdir(parents=True)
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    run_a.mkdir(), run_b.mkdir()
    steps = [{"name": "bicubic_downsample", "scale": 2}, {"name": "gaussian_noise", "sigma": 0.01}]
    rows, truth = [], {}
    for v in range(6):
        for s in range(2):
            pid = f"vol{v}_s{s}"
            hr = _smooth(rng, (32, 32)) * (1 + v)
            lr = ops.bicubic_downsample(hr, 2) + 0.01 * rng.standard_normal((16, 16))
            np.save(data / "hr" / f"{pid}.npy", hr)
            np.save(data / "lr" / f"{pid}.npy", lr)
            np.save(run_a / f"{pid}.npy", hr + 0.02 * rng.standard_normal(hr.shape))
            np.save(run_b / f"{pid}.npy", hr + 0.05 * rng.standard_normal(hr.shape))
            truth[pid] = hr
            rows.append({"pair_id": pid, "split": "test", "source": f"vol{v}.nii", "group": f"patient{v}",
                         "volume_id": f"vol{v}", "slice_index": s, "degradations": steps,
                         "lr_path": f"lr/{pid}.npy", "hr_path": f"hr/{pid}.npy"})
    rows.append({**rows[0], "pair_id": "train_only", "split": "train"})
    with open(data / "manifest.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return data / "manifest.jsonl", run_a, run_b, truth


def test_manifest_fastmri_volumes_and_paired_comparison(manifest_case, tmp_path):
    manifest, run_a, run_b, truth = manifest_case
    with pytest.raises(FileNotFoundError, match="train_only.*--split"):
        E.pairs_from_manifest(run_a, manifest)
    rep = tmp_path / "rep"
    res = E.run_evaluation(run_a, rep, E.EvalSettings(convention="fastmri"), manifest=manifest, compare=run_b,
                           split="test", n_boot=500, worst=2, progress=False)
    assert res["unit"] == "volume"
    vol = pd.read_csv(rep / "per_volume.csv").set_index("volume_id")
    for v in range(6):
        gt = np.stack([truth[f"vol{v}_s{s}"] for s in range(2)])
        pred = np.stack([np.load(run_a / f"vol{v}_s{s}.npy") for s in range(2)])
        assert vol.loc[f"vol{v}", "psnr"] == pytest.approx(skm.peak_signal_noise_ratio(gt, pred, data_range=gt.max()))
        want_ssim = np.mean([skm.structural_similarity(gt[s], pred[s], data_range=gt.max()) for s in range(2)])
        assert vol.loc[f"vol{v}", "ssim_uniform7"] == pytest.approx(want_ssim)
        assert vol.loc[f"vol{v}", "data_range"] == pytest.approx(gt.max())
    img = res["per_image"]
    assert {"dc_nrmse", "dc_ref_nrmse", "dc_psnr"} <= set(img.columns) and (img["dc_ref_nrmse"] > 0).all()
    assert (img["dc_skipped"] == "gaussian_noise").all()
    # paired comparison on per-volume PSNR agrees with scipy
    tests = pd.read_csv(rep / "comparison.csv").set_index("metric")
    vol_b = E.evaluate_pairs(E.pairs_from_manifest(run_b, manifest, "test"), E.EvalSettings(convention="fastmri"),
                             progress=False)[1].set_index("volume_id")
    diff = vol["psnr"] - vol_b.loc[vol.index, "psnr"]
    assert tests.loc["psnr", "p_value"] == pytest.approx(sps.wilcoxon(diff).pvalue)
    assert tests.loc["psnr", "mean_diff"] == pytest.approx(diff.mean()) and tests.loc["psnr", "n_a_higher"] == 6
    md = (rep / "summary.md").read_text()
    assert "fastMRI" in md and "Wilcoxon" in md and "resample volumes" in md and "gaussian_noise" in md
    assert (rep / "comparison_per_image.csv").exists() and (rep / "worst_cases.png").exists()


def test_folder_mode_volumes_and_kspace_data_consistency(tmp_path):
    rng = np.random.default_rng(6)
    for sub in ("ref", "out", "lr"):
        (tmp_path / sub).mkdir()
    steps = [{"name": "kspace_truncation", "scale": 2, "window": "hann"}]
    for v in range(3):
        for s in range(2):
            ref = _smooth(rng, (32, 32))
            np.save(tmp_path / "ref" / f"case{v}_{s}.npy", ref)
            np.save(tmp_path / "lr" / f"case{v}_{s}.npy", ops.kspace_truncation(ref, 2, "hann"))
            np.save(tmp_path / "out" / f"case{v}_{s}.npy", ref + 0.01 * rng.standard_normal(ref.shape))
    rep = tmp_path / "rep"
    E.main(["--outputs", str(tmp_path / "out"), "--references", str(tmp_path / "ref"), "--inputs",
            str(tmp_path / "lr"), "--degradations", json.dumps(steps), "--data_range", "1",
            "--volume_pattern", r"(?P<volume>case\d)_(?P<slice>\d)", "--n_boot", "100", "--worst", "0",
            "--out", str(rep), "--no_progress"])
    vol = pd.read_csv(rep / "per_volume.csv")
    img = pd.read_csv(rep / "per_image.csv")
    assert sorted(vol["volume_id"]) == ["case0", "case1", "case2"] and (vol["n_slices"] == 2).all()
    assert vol.set_index("volume_id").loc["case1", "psnr"] == pytest.approx(
        img[img["volume_id"] == "case1"]["psnr"].mean())
    assert (img["dc_ref_nrmse"] < 1e-12).all() and (img["err_null_nrmse"] > 0).all()
    np.testing.assert_allclose(np.hypot(img["err_band_nrmse"], img["err_null_nrmse"]), img["nrmse"])
    assert pd.read_csv(rep / "summary.csv")["unit"].eq("volume").all()


def test_lpips_is_skipped_with_a_message(tmp_path):
    from bagel_sr.eval.lpips_metric import make_lpips

    fn, msg = make_lpips(None)
    assert fn is None and "LPIPS skipped" in msg and "--lpips_weights" in msg
    fn, msg = make_lpips(str(tmp_path / "alex.pth"))
    assert fn is None and "not found" in msg


def test_conflicting_conventions_are_refused():
    with pytest.raises(ValueError, match="fastMRI convention"):
        E.EvalSettings(convention="fastmri", data_range=1.0)


def test_data_builder_manifest_schema(tmp_path):
    """Rows as the builder writes them: held-out 8-bit RGB PNGs, ``source`` dict, CT intensity mapping in HU."""
    rng = np.random.default_rng(7)
    lo, hi = -160.0, 240.0
    steps = [{"name": "gaussian_blur", "sigma": 1.0}]
    rows = []
    (tmp_path / "out").mkdir()
    for k in range(3):
        pid = f"ct_abcd1234_s{k:04d}"
        hu = lo + _smooth(rng, (32, 32)) * (hi - lo)
        blurred = ops.gaussian_blur(hu, 1.0)
        to_u8 = lambda x: np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)  # noqa: E731
        for side, img in (("hr", hu), ("lr", blurred)):
            (tmp_path / "heldout" / "test" / side).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([to_u8(img)] * 3, -1)).save(tmp_path / "heldout" / "test" / side / f"{pid}.png")
        Image.fromarray(to_u8(hu + rng.normal(0, 5, hu.shape))).save(tmp_path / "out" / f"{pid}.png")
        rows.append({"pair_id": pid, "split": "test", "group": "patient-1", "degradations": steps,
                     "source": {"id": "nifti:ct.nii.gz", "slice_index": k, "num_slices": 3, "modality": "CT"},
                     "intensity": {"mode": "ct_window", "unit": "HU", "low": lo, "high": hi, "working": "physical"},
                     "heldout": {"lr": f"heldout/test/lr/{pid}.png", "hr": f"heldout/test/hr/{pid}.png"}})
    rows.append({**rows[0], "pair_id": "train_pair", "split": "train", "heldout": None})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="train_pair.*heldout"):
        pairs_mod._row_paths(rows[-1], tmp_path)
    pairs = E.pairs_from_manifest(tmp_path / "out", tmp_path / "manifest.jsonl", split="test")
    assert [p.volume_id for p in pairs] == ["nifti:ct.nii.gz"] * 3 and [p.slice_index for p in pairs] == [0, 1, 2]
    res = E.run_evaluation(tmp_path / "out", tmp_path / "rep", E.EvalSettings(), manifest=tmp_path / "manifest.jsonl",
                           split="test", n_boot=100, worst=1, progress=False)
    img = res["per_image"]
    assert res["unit"] == "volume" and len(res["per_volume"]) == 1
    assert (img["dc_ref_nrmse"] < 0.02).all() and (img["dc_nrmse"] > img["dc_ref_nrmse"]).all()
    assert "[-160, 240] HU" in (tmp_path / "rep" / "summary.md").read_text()


def test_hallucination_share_background_and_std_calibration(tmp_path):
    """halluc_share counts pixels off by more than 0.1 of the range, bg_mean reads the output where the reference is
    background, std maps written by infer (--num_samples) are scored, and all enter the summary and comparison."""
    ref = np.zeros((20, 20), np.uint8)
    ref[5:15, 5:15] = 200
    out_a, out_b = ref.copy(), ref.copy()
    out_a[0:2, :] = 102  # 40 invented bright background pixels (> 0.1 * 255 off)
    out_b[0:2, :] = 20  # off by less than the threshold
    for name, arr in (("ref", ref), ("a", out_a), ("b", out_b)):
        (tmp_path / name).mkdir()
        Image.fromarray(arr).save(tmp_path / name / "x.png")
    (tmp_path / "a/std").mkdir()
    std = np.full((20, 20), 0.01, np.float32)
    std[0:2, :] = 0.3  # the spread flags the invented rows
    np.save(tmp_path / "a/std/x.npy", std)
    res = E.run_evaluation(tmp_path / "a", tmp_path / "rep", E.EvalSettings(), tmp_path / "ref", compare=tmp_path / "b",
                           progress=False, n_boot=200)
    row = res["per_image"].iloc[0]
    assert row["halluc_share"] == pytest.approx(40 / 400)
    assert row["bg_mean"] == pytest.approx(40 * 102 / 255 / 300)
    assert row["std_within_2"] == 1.0 and row["std_spearman"] > 0.9
    assert set(res["summary"]["metric"]) >= {"halluc_share", "bg_mean", "std_spearman", "std_within_2"}
    comp = res["comparison"].set_index("metric")
    assert comp.loc["halluc_share", "mean_diff"] == pytest.approx(0.1)
    md = (tmp_path / "rep/summary.md").read_text()
    assert "halluc_share" in md and "bg_mean" in md


@pytest.mark.parametrize("bad, extra, rc, failed", [
    ((1,), [], 1, 1),                        # one NaN output: exit 1, named
    ((0, 1, 2), [], 1, 3),                   # every output non-finite: the same message, no KeyError
    ((1,), ["--allow_nonfinite"], 0, 1),     # accepted on request, still counted
    ((), [], 0, 0),
])
def test_evaluate_counts_and_refuses_nonfinite_outputs(tmp_path, capsys, bad, extra, rc, failed):
    refs, outs = _eval_folders(tmp_path, bad)
    argv = ["--outputs", str(outs), "--references", str(refs), "--data_range", "1", "--out", str(tmp_path / "rep"),
            "--no_progress", "--n_boot", "50", *extra]
    assert cli_main(evaluate.main, argv) == rc
    err = capsys.readouterr().err
    if rc:
        line = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and f"{failed} output(s) hold NaN/Inf" in line[0]
        assert all(f"a{i}.npy" in line[0] for i in bad)
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert len(summary["nonfinite_outputs"]["A"]) == failed
    assert all(r["n_failed"] == failed and r["n"] == 3 - failed for r in summary["summary"])
    assert f"A: {failed}" in (tmp_path / "rep" / "summary.md").read_text()


def test_nonfinite_volume_slice_fails_the_volume(tmp_path):
    refs, outs = _eval_folders(tmp_path, (1,))
    for d in (refs, outs):
        for i in range(3):
            os.rename(d / f"a{i}.npy", d / f"vol_{i}.npy")
    res = evaluate.run_evaluation(outs, tmp_path / "rep", evaluate.EvalSettings(data_range=1.0), references=refs,
                                  volume_pattern=r"(?P<volume>vol)_(?P<slice>\d)", n_boot=50, progress=False,
                                  allow_nonfinite=True)
    assert res["unit"] == "volume" and bool(res["per_volume"]["nonfinite"].iloc[0])
    assert res["summary"]["n_failed"].eq(1).all() and res["summary"]["n"].eq(0).all()


def test_paired_comparison_scores_a_failure_as_a_loss(tmp_path):
    refs, outs = _eval_folders(tmp_path, (1,))
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        np.save(good / f"a{i}.npy", np.load(refs / f"a{i}.npy") + 0.01)
    res = evaluate.run_evaluation(outs, tmp_path / "rep", evaluate.EvalSettings(data_range=1.0), references=refs,
                                  compare=good, n_boot=50, progress=False, allow_nonfinite=True)
    psnr = res["comparison"].set_index("metric").loc["psnr"]
    assert psnr["n"] == 3 and psnr["n_b_higher"] == 1 and psnr["n_ties"] == 2 and psnr["mean_diff"] < 0


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
