"""Reading images for evaluation (bagel_sr.eval.images): integer images are scaled by their bit depth."""
import numpy as np
import pytest

from bagel_sr.errors import UserError


def test_evaluate_scales_12_bit_values_in_16_bit_pngs_by_bits_stored(tmp_path):
    import warnings

    from PIL import Image

    from bagel_sr.eval import images as eval_images
    from bagel_sr.eval.evaluate import EvalSettings, run_evaluation

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 4096, (32, 32)).astype(np.uint16)                 # 12-bit values, 16-bit container
    out = np.clip(ref.astype(int) + rng.integers(-40, 41, ref.shape), 0, 4095).astype(np.uint16)
    for name, arr in (("refs", ref), ("outs", out)):
        (tmp_path / name).mkdir()
        Image.fromarray(arr).save(tmp_path / name / "a.png")
    eval_images._WARNED_DEPTH.clear()
    with pytest.warns(UserWarning, match="fits in 12 bits.*--bits_stored"):
        container = eval_images.load_image(tmp_path / "refs" / "a.png")
    assert container.array.max() <= 4095 / 65535 + 1e-12                   # the container scale, as before
    twelve = eval_images.load_image(tmp_path / "refs" / "a.png", bits_stored=12)
    np.testing.assert_allclose(twelve.array, ref / 4095.0)
    with pytest.raises(UserError, match="exceeds --bits_stored 10"):
        eval_images.load_image(tmp_path / "refs" / "a.png", bits_stored=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = {b: run_evaluation(tmp_path / "outs", tmp_path / f"rep{b}", EvalSettings(bits_stored=b),
                                 references=tmp_path / "refs", n_boot=50, worst=0, progress=False)
               for b in (None, 12)}
    psnr = {b: float(r["summary"].set_index("metric").loc["psnr", "mean"]) for b, r in res.items()}
    assert psnr[None] - psnr[12] == pytest.approx(20 * np.log10(65535 / 4095), abs=0.05)  # 24.1 dB too good before
