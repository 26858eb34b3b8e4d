"""Degradation statistics: requested noise levels, exact k-space band, slice profiles, low-dose CT."""
import numpy as np
import pytest

from bagel_sr.data import degradations as D
from bagel_sr.data import operators
from bagel_sr.data.errors import ConfigError


def rng(seed=0):
    return np.random.default_rng(seed)


def smooth_image(h=64, w=64):
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    return 0.5 + 0.3 * np.sin(2 * np.pi * x) * np.cos(2 * np.pi * y)


def test_gaussian_noise_level_matches_request():
    clean = smooth_image(256, 256)
    noisy, used = D.gaussian_noise(clean, rng(1), sigma=0.05)
    assert used == {"sigma": 0.05}
    assert abs((noisy - clean).std() - 0.05) < 0.05 * 0.02
    assert abs((noisy - clean).mean()) < 1e-3


def test_rician_noise_statistics():
    bright = np.full((256, 256), 10.0)       # high SNR: Rician ~ Gaussian with the same sigma
    out, used = D.rician_noise(bright, rng(2), sigma=0.1)
    assert abs(out.std() - 0.1) < 0.005 and used["sigma"] == 0.1
    dark = np.zeros((256, 256))               # background: Rayleigh, mean sigma * sqrt(pi / 2)
    out, _ = D.rician_noise(dark, rng(3), sigma=0.1)
    assert out.min() >= 0
    assert abs(out.mean() - 0.1 * np.sqrt(np.pi / 2)) < 0.003


@pytest.mark.parametrize("shape", [(64, 64), (60, 45)])
def test_kspace_truncation_keeps_low_band_exactly(shape):
    img = rng(4).random(shape)
    out, used = D.kspace_truncation(img, rng(), scale=4)
    assert out.shape == img.shape and np.isrealobj(out)
    f_in, f_out = np.fft.fft2(img), np.fft.fft2(out)
    mr, mc = used["kept_half_width"]
    kr = np.abs(np.fft.fftfreq(shape[0], 1 / shape[0]))[:, None]
    kc = np.abs(np.fft.fftfreq(shape[1], 1 / shape[1]))[None, :]
    band = (kr <= mr) & (kc <= mc)
    assert mr == (round(shape[0] / 4) - 1) // 2
    np.testing.assert_allclose(f_out[band], f_in[band], rtol=0, atol=1e-9)
    np.testing.assert_allclose(f_out[~band], 0, atol=1e-9)


def test_kspace_truncation_hann_and_single_axis():
    img = rng(5).random((64, 64))
    out, used = D.kspace_truncation(img, rng(), scale=2, window="hann")
    m = used["kept_half_width"][0]
    k = np.fft.fftfreq(64, 1 / 64)
    w = np.where(np.abs(k) <= m, 0.5 * (1 + np.cos(np.pi * k / (m + 1))), 0)
    np.testing.assert_allclose(np.fft.fft2(out), np.fft.fft2(img) * np.outer(w, w), atol=1e-9)
    out, used = D.kspace_truncation(img, rng(), scale=2, axes="rows")
    assert used["kept_half_width"][1] is None
    np.testing.assert_allclose(out.mean(axis=0), img.mean(axis=0), atol=1e-9)  # k_row = 0 kept for every column


def test_bicubic_downsample_size_and_constant():
    img = smooth_image(48, 48)
    out, used = D.bicubic_downsample(img, rng(), scale=3)
    assert out.shape == img.shape and used["lr_shape"] == [16, 16] and used["scale"] == 3
    assert np.abs(out - img).max() < 0.05             # smooth content survives
    const, _ = D.bicubic_downsample(np.full((32, 32), 0.7), rng(), scale=4)
    np.testing.assert_allclose(const, 0.7, atol=1e-6)
    lr, used = D.bicubic_downsample(img, rng(), scale=4, keep_size=False)
    assert lr.shape == (12, 12)
    with pytest.raises(ValueError, match="not divisible"):
        D.bicubic_downsample(np.zeros((30, 30)), rng(), scale=4)


def test_slice_thickness_blurs_only_along_axis():
    z = np.arange(64)
    fine = np.broadcast_to((-1.0) ** z, (8, 8, 64)).copy()      # detail finer than the thick slice
    out, used = D.slice_thickness(fine, rng(), factor=4, profile="rect")
    assert out.shape == fine.shape and used["lr_slices"] == 16 and used["thickness"] == 4.0
    assert np.allclose(out, out[:1, :1, :])             # still constant in-plane
    assert np.abs(out[..., 12:52]).max() < 0.01         # averaged away by the 4-slice profile (interior)
    coarse = np.broadcast_to(np.sin(2 * np.pi * z / 64), (4, 4, 64)).copy()
    out, _ = D.slice_thickness(coarse, rng(), factor=4, profile="rect")
    assert np.abs(out - coarse)[..., 4:56].max() < 0.05  # coarse structure survives
    flat = np.broadcast_to(np.arange(8.0)[:, None, None], (8, 8, 16)).copy()
    same, used = D.slice_thickness(flat, rng(), factor=2, thickness=3.0, profile="gaussian")
    np.testing.assert_allclose(same, flat, atol=1e-9)  # constant along z: unchanged
    assert used["sigma"] == pytest.approx(3.0 / 2.3548, rel=1e-3)
    with pytest.raises(ValueError, match="3D volume"):
        D.slice_thickness(np.zeros((16, 16)), rng(), factor=2)


def test_rect_profile_weights():
    np.testing.assert_allclose(operators._rect_kernel(3.0), [1 / 3] * 3)
    np.testing.assert_allclose(operators._rect_kernel(2.0), [0.25, 0.5, 0.25])


def test_gaussian_blur_and_jpeg():
    img = rng(6).random((32, 32))
    out, used = D.gaussian_blur(img, rng(), sigma=1.5)
    assert out.std() < img.std() and used["sigma"] == 1.5
    np.testing.assert_allclose(out.mean(), img.mean(), atol=1e-2)
    hu = smooth_image(32, 32) * 400 - 160
    out, used = D.jpeg_compression(hu, rng(), quality=30, value_range=(-160.0, 240.0))
    assert used["quality"] == 30 and out.shape == hu.shape
    assert 0 < np.abs(out - hu).mean() < 20


def water_phantom(n=64, radius=26):
    y, x = np.mgrid[0:n, 0:n] - (n - 1) / 2
    return np.where(x**2 + y**2 < radius**2, 0.0, -1000.0)  # water disc in air (HU)


def test_low_dose_ct_noise_scales_with_dose_and_keeps_mean():
    hu = water_phantom()
    centre = (slice(24, 40), slice(24, 40))
    stds = []
    for i0 in (4e3, 6.4e4):
        out, used = D.low_dose_ct(hu, rng(7), photons_per_ray=i0, electronic_noise_std=0.0)
        assert used["photons_per_ray"] == i0 and used["filter"] == "ramp" and used["n_angles"] == 64
        d = (out - hu)[centre]
        assert abs(d.mean()) < 3 * d.std() / 4 + 5     # no bias beyond noise
        stds.append(d.std())
    assert 2.5 < stds[0] / stds[1] < 6.0               # 16x dose -> ~4x less noise (1 / sqrt(dose))
    clean, _ = D.low_dose_ct(hu, rng(8), photons_per_ray=1e14, electronic_noise_std=0.0)
    assert np.abs(clean - hu).max() < 1.0              # noise insertion: nothing but noise is added


def test_low_dose_ct_electronic_noise_and_reconstruct_mode():
    hu = water_phantom()
    a, _ = D.low_dose_ct(hu, rng(9), photons_per_ray=2e4, electronic_noise_std=0.0)
    b, _ = D.low_dose_ct(hu, rng(9), photons_per_ray=2e4, electronic_noise_std=40.0)
    assert (b - hu).std() > (a - hu).std()
    rec, used = D.low_dose_ct(hu, rng(10), photons_per_ray=1e6, mode="reconstruct", pixel_size_mm=0.8)
    assert used["mode"] == "reconstruct" and abs(np.median(rec[24:40, 24:40])) < 30  # FBP of water ~ 0 HU
    with pytest.raises(ValueError, match="2D"):
        D.low_dose_ct(np.zeros((8, 8, 3)), rng())


def test_seeded_and_recorded():
    img = smooth_image(32, 32)
    steps = [D.validate_step({"name": "gaussian_noise", "sigma": {"uniform": [0.01, 0.03]}}, "degradations[0]"),
             D.validate_step({"name": "bicubic_downsample", "scale": {"choice": [2, 4]}}, "degradations[1]")]
    a, rec_a = D.apply_chain(steps, img, rng(11))
    b, rec_b = D.apply_chain(steps, img, rng(11))
    np.testing.assert_array_equal(a, b)
    assert rec_a == rec_b and 0.01 <= rec_a[0]["sigma"] <= 0.03 and rec_a[1]["scale"] in (2, 4)


@pytest.mark.parametrize("entry, match", [
    ({"name": "bicubic_down"}, r"degradations\[0\].name.*'bicubic_down'.*bicubic_downsample"),
    ({"name": "bicubic_downsample", "scale": 5}, r"degradations\[0\].scale.*5.*2, 3 or 4"),
    ({"name": "bicubic_downsample"}, r"missing required parameter.*scale"),
    ({"name": "gaussian_noise", "sigma": -1}, r"degradations\[0\].sigma.*-1"),
    ({"name": "gaussian_noise", "sigma": 0.1, "sgima": 2}, r"degradations\[0\].sgima.*parameters of gaussian_noise"),
    ({"name": "kspace_truncation", "scale": 2, "window": "hamming"}, r"window.*'hamming'.*'none' or 'hann'"),
    ({"name": "jpeg_compression", "quality": {"uniform": [10, 120]}}, r"quality.uniform"),
])
def test_bad_degradation_entries_name_key_value_and_allowed(entry, match):
    with pytest.raises(ConfigError, match=match):
        D.validate_step(entry, "degradations[0]")


def test_uniform_sampling_respects_parameter_type():
    float_step = D.validate_step({"name": "gaussian_noise", "sigma": {"uniform": [0, 1]}}, "degradations[0]")
    int_step = D.validate_step({"name": "jpeg_compression", "quality": {"uniform": [20, 40]}}, "degradations[0]")
    sigmas = [D.sample_params(float_step, rng(i))["sigma"] for i in range(5)]
    assert all(isinstance(s, float) and 0 < s < 1 for s in sigmas)
    q = D.sample_params(int_step, rng(0))["quality"]
    assert isinstance(q, int) and 20 <= q <= 40
    yaml_str = D.validate_step({"name": "low_dose_ct", "photons_per_ray": "1.0e4"}, "degradations[0]")
    assert yaml_str.params["photons_per_ray"] == 1.0e4  # PyYAML reads 1.0e4 as a string
