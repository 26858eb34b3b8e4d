"""Metrics against scikit-image, fastMRI's formulas and hand-computed cases."""
import numpy as np
import pytest
from scipy import signal
from skimage import metrics as skm

from bagel_sr.eval import metrics as M
from bagel_sr.data import consistency as ops


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    ref = rng.random((48, 40))
    pred = np.clip(ref + 0.05 * rng.standard_normal(ref.shape), 0, 1)
    return ref, pred


def test_psnr_matches_skimage(pair):
    ref, pred = pair
    assert M.psnr(ref, pred, 1.0) == pytest.approx(skm.peak_signal_noise_ratio(ref, pred, data_range=1.0), abs=1e-12)
    r8, p8 = (ref * 255).astype(np.uint8), (pred * 255).astype(np.uint8)
    assert M.psnr(r8, p8) == pytest.approx(skm.peak_signal_noise_ratio(r8, p8), abs=1e-12)


def test_identical_images():
    x = np.random.default_rng(1).random((32, 32))
    assert M.psnr(x, x, 1.0) == float("inf")
    assert M.ssim(x, x, 1.0) == pytest.approx(1.0)
    assert M.ssim(x, x, 1.0, "gaussian11") == pytest.approx(1.0)
    assert M.nmse(x, x) == 0 and M.nrmse(x, x) == 0 and M.hfen(x, x) == 0


def test_psnr_known_noise_level():
    rng = np.random.default_rng(2)
    ref = np.full((256, 256), 0.5)
    for sigma in (0.01, 0.05):
        pred = ref + sigma * rng.standard_normal(ref.shape)
        assert M.psnr(ref, pred, 1.0) == pytest.approx(20 * np.log10(1.0 / sigma), abs=0.1)


def test_float_without_data_range_says_what_to_pass(pair):
    with pytest.raises(ValueError, match="data_range is required for float data"):
        M.psnr(*pair)
    with pytest.raises(ValueError, match="data_range"):
        M.ssim(*pair)


@pytest.mark.parametrize("window,kw", [("uniform7", {}),
                                       ("gaussian11", dict(gaussian_weights=True, sigma=1.5,
                                                           use_sample_covariance=False))])
def test_ssim_matches_skimage(pair, window, kw):
    ref, pred = pair
    assert M.ssim(ref, pred, 1.0, window) == pytest.approx(skm.structural_similarity(ref, pred, data_range=1.0, **kw),
                                                           abs=1e-12)
    rng = np.random.default_rng(3)
    rgb = rng.random((24, 30, 3))
    rgb2 = rgb + 0.1 * rng.random(rgb.shape)
    assert M.ssim(rgb, rgb2, 1.0, window, channel_axis=-1) == pytest.approx(
        skm.structural_similarity(rgb, rgb2, data_range=1.0, channel_axis=-1, **kw), abs=1e-12)


def test_ssim_window_is_named():
    assert M.ssim_key("uniform7") == "ssim_uniform7"
    row = M.image_metrics(np.ones((16, 16)), np.ones((16, 16)) * 0.9, 1.0, "gaussian11")
    assert "ssim_gaussian11" in row and "ssim_uniform7" not in row
    with pytest.raises(ValueError, match="window"):
        M.ssim_key("gauss")


def test_nmse_nrmse(pair):
    ref, pred = pair
    assert M.nmse(ref, pred) == pytest.approx(np.linalg.norm(ref - pred) ** 2 / np.linalg.norm(ref) ** 2)
    for norm in ("euclidean", "min-max", "mean"):
        assert M.nrmse(ref, pred, norm) == pytest.approx(skm.normalized_root_mse(ref, pred, normalization=norm))
    assert M.nrmse(ref, pred) == pytest.approx(np.sqrt(M.nmse(ref, pred)))


def test_fastmri_volume_metrics_match_fastmri_formulas():
    rng = np.random.default_rng(4)
    gt = rng.random((3, 32, 32)) * 7.0
    pred = gt + 0.3 * rng.standard_normal(gt.shape)
    got = M.fastmri_volume_metrics(gt, pred)
    maxval = gt.max()
    assert got["data_range"] == maxval
    assert got["nmse"] == pytest.approx(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)
    assert got["psnr"] == pytest.approx(skm.peak_signal_noise_ratio(gt, pred, data_range=maxval))
    want_ssim = np.mean([skm.structural_similarity(gt[s], pred[s], data_range=maxval) for s in range(3)])
    assert got["ssim_uniform7"] == pytest.approx(want_ssim)


def _hand_log(sigma=1.5, size=15):
    h = size // 2
    y, x = np.meshgrid(np.arange(-h, h + 1), np.arange(-h, h + 1), indexing="ij")
    g = np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    k = g * (x ** 2 + y ** 2 - 2 * sigma ** 2) / sigma ** 4
    return k - k.mean()


def test_hfen_known_cases(pair):
    ref, pred = pair
    k = M.log_kernel()
    assert k.shape == (15, 15) and abs(k.sum()) < 1e-12
    np.testing.assert_allclose(k, _hand_log())
    assert M.hfen(ref, 1.3 * ref) == pytest.approx(0.3)  # LoG is linear: HFEN of a scaled image is |a - 1|
    assert M.hfen(ref, ref + 0.25) == pytest.approx(0.0, abs=1e-12)  # zero-sum kernel ignores offsets
    # against an explicit convolution (symmetric kernel, reflect padding = numpy 'symmetric')
    pad = 7
    conv = lambda x: signal.convolve2d(np.pad(x, pad, mode="symmetric"), _hand_log(), mode="valid")  # noqa: E731
    want = np.linalg.norm(conv(pred) - conv(ref)) / np.linalg.norm(conv(ref))
    assert M.hfen(ref, pred) == pytest.approx(want, rel=1e-10)


def test_hu_window():
    x = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(M.hu_window(x, 40, 400), [0, 0, 0.5, 1, 1])


# ---------------------------------------------------------------- k-space and data consistency


def _null_space_part(z, scale, window=None):
    wts = ops.kspace_weights(z.shape, scale, window)
    return ops.ifft2c(ops.fft2c(z) * (wts == 0)).real


@pytest.mark.parametrize("shape,window", [((32, 32), None), ((33, 30), "hann")])
def test_kspace_split_null_space_error_only(shape, window):
    rng = np.random.default_rng(5)
    truth = rng.random(shape)
    measured = ops.kspace_truncation(truth, 4, window)
    assert np.abs(ops.ifft2c(ops.fft2c(truth) * ops.kspace_weights(shape, 4, window)).imag).max() < 1e-12
    output = truth + _null_space_part(rng.standard_normal(shape), 4, window)
    res = M.kspace_consistency(output, measured, 4, window, reference=truth)
    assert res["dc_band_nrmse"] < 1e-12 and res["err_band_nrmse"] < 1e-12
    assert res["err_null_nrmse"] > 0.1 and res["err_band_fraction"] < 1e-20
    assert res["err_band_nrmse"] ** 2 + res["err_null_nrmse"] ** 2 == pytest.approx(M.nrmse(truth, output) ** 2)


def test_kspace_split_band_error_and_parseval():
    rng = np.random.default_rng(6)
    truth = rng.random((32, 32))
    measured = ops.kspace_truncation(truth, keep_fraction=0.5)
    output = truth + 0.05 * rng.standard_normal(truth.shape)
    res = M.kspace_consistency(output, measured, keep_fraction=0.5, reference=truth)
    assert res["dc_band_nrmse"] > 0.01 and res["err_null_nrmse"] > 0
    total = np.linalg.norm(output - truth) / np.linalg.norm(truth)
    assert np.hypot(res["err_band_nrmse"], res["err_null_nrmse"]) == pytest.approx(total)
    band_share = (ops.kspace_weights(truth.shape, 2) > 0).mean()  # white noise: energy share = band area
    assert res["err_band_fraction"] == pytest.approx(band_share, abs=0.1)


def test_kspace_band_is_symmetric_and_hann_nonzero():
    w = ops.kspace_weights((16, 17), 2, "hann")
    assert w[8, 8] == 1.0
    for axis_w, n in ((w[:, 17 // 2], 16), (w[16 // 2, :], 17)):
        nz = np.flatnonzero(axis_w)
        assert np.all(axis_w[nz] > 0) and nz.size == 2 * ((round(n / 2) - 1) // 2) + 1
        np.testing.assert_allclose(axis_w[nz], axis_w[nz][::-1])
    rows_only = ops.kspace_weights((16, 16), 4, axes="rows")
    assert (rows_only[8] == 1).all() and (rows_only[:, 8] > 0).sum() == 3


def test_data_consistency_bicubic_and_noise_skip():
    rng = np.random.default_rng(7)
    truth = rng.random((32, 32))
    steps = [{"name": "Bicubic-Downsample", "scale": 4, "kernel": "bicubic"},
             {"name": "gaussian_noise", "sigma": 0.02, "seed": 3}]
    lr = ops.bicubic_downsample(truth, 4)
    assert lr.shape == (8, 8)
    res = M.data_consistency(truth, lr, steps, 1.0, reference=truth)
    assert res["dc_nrmse"] == 0 and res["dc_psnr"] == float("inf") and res["dc_ref_nrmse"] == 0
    assert res["dc_skipped"] == "gaussian_noise" and "bicubic_downsample(scale=4)" in res["dc_ops"]
    noisy_out = truth + 0.1 * rng.standard_normal(truth.shape)
    assert M.data_consistency(noisy_out, lr, steps, 1.0)["dc_nrmse"] > 0
    same_size = ops.apply_forward(truth, [{"name": "bicubic", "scale": 4, "keep_size": True}])[0]
    assert same_size.shape == truth.shape
    sk = ops.apply_forward(truth, [{"name": "bicubic", "scale": 4, "backend": "skimage"}])[0]
    assert sk.shape == (8, 8) and np.abs(sk - lr).mean() < 0.1
    with pytest.raises(ValueError, match="shape"):
        M.data_consistency(truth, lr, [{"name": "bicubic_downsample", "scale": 2}])


def test_data_consistency_kspace_adds_split():
    rng = np.random.default_rng(8)
    truth = rng.random((32, 32))
    steps = [{"name": "k-space truncation", "scale": 4, "window": "hann", "axes": "both", "kept_half_width": [3, 3]}]
    lr = ops.kspace_truncation(truth, 4, "hann")
    out = truth + _null_space_part(rng.standard_normal(truth.shape), 4, "hann")
    res = M.data_consistency(out, lr, steps, 1.0, reference=truth)
    assert res["dc_nrmse"] < 1e-12 and res["dc_band_nrmse"] < 1e-12 and res["err_null_nrmse"] > 0


def test_unknown_degradation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown degradation step 'sharpen'.*known operators"):
        ops.split_steps([{"name": "sharpen", "amount": 30}])
    assert ops.canonical_name("AWGN") == "gaussian_noise"
    assert set(ops.ALIASES.values()) <= set(ops.OPERATORS) | set(ops.SKIPPED_STEPS)
    assert ops.split_steps([{"name": "slice_thickness", "factor": 2}, {"name": "low_dose_ct"}])[1] == [
        "slice_thickness", "low_dose_ct"]


BUILDER_STEPS = [
    {"name": "bicubic_downsample", "scale": 4, "keep_size": True},
    {"name": "bicubic_downsample", "scale": 2, "keep_size": True},
    {"name": "kspace_truncation", "scale": 3.0, "window": "none", "axes": "both"},
    {"name": "kspace_truncation", "scale": 2.5, "window": "hann", "axes": "rows"},
    {"name": "gaussian_blur", "sigma": 1.2},
    {"name": "jpeg_compression", "quality": 40, "value_range": [0.0, 1.0]},
]


@pytest.mark.parametrize("step", BUILDER_STEPS, ids=lambda s: f"{s['name']}-{s.get('scale', '')}")
def test_operators_reproduce_the_data_builder(step):
    """Our forward operators equal the builder's deterministic degradations on its recorded parameters."""
    deg = pytest.importorskip("bagel_sr.data.degradations")
    if step["name"] not in getattr(deg, "DEGRADATIONS", {}):
        pytest.skip(f"the data builder has no {step['name']}")
    x = np.clip(np.random.default_rng(9).random((48, 40)), 0, 1)
    params = {k: v for k, v in step.items() if k != "name"}
    want, record = deg.DEGRADATIONS[step["name"]].fn(x, np.random.default_rng(0), **params)
    got = ops.apply_forward(x, [{"name": step["name"], **record}])[0]
    np.testing.assert_allclose(got, want, atol=1e-9)
