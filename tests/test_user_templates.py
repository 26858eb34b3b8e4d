"""Templates for plain PNG/TIFF folders (CT in HU + 1024, MR magnitude) and evaluation in HU from a builder
manifest of 8-bit PNGs (the intensity mapping each pair records)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from bagel_sr.data import build_dataset, load_build_config
from bagel_sr.data.errors import ConfigError
from bagel_sr.errors import BadInput
from bagel_sr.eval import evaluate as E
from bagel_sr.eval.hu import windowed

from bagel_sr.testing.user_pngs import make_ct_pngs, make_mr_images, phantom_hu, template_copy


def rows(out):
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def copy_degraded_as_outputs(out, split="test"):
    """The trivial restoration: each held-out degraded input, unchanged, as the output of its pair."""
    dest = out.parent / f"restored_{split}"
    dest.mkdir()
    for r in rows(out):
        if r["split"] == split:
            shutil.copyfile(out / r["heldout"]["lr"], dest / f"{r['pair_id']}.png")
    return dest


@pytest.fixture(scope="module")
def ct_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ct")
    first_hu = make_ct_pngs(tmp / "CT_exports")
    build_dataset(template_copy("ct_png_hu.yaml", tmp), progress=False, log=lambda m: None)
    return tmp / "ct", first_hu


def test_ct_png_template_reads_hu_offset_and_groups_by_patient_folder(ct_build):
    out, _ = ct_build
    rs = rows(out)
    assert len(rs) == 12 and {r["group_by"] for r in rs} == {"subject_folder"}
    assert {r["group"] for r in rs} == {f"patient{p:02d}" for p in range(1, 5)}
    for r in rs:  # all slices of a patient in one split
        assert {x["split"] for x in rs if x["group"] == r["group"]} == {r["split"]}
    it = rs[0]["intensity"]
    assert (it["unit"], it["low"], it["high"]) == ("HU", -160.0, 240.0)
    assert {r["degradations"][0]["name"] for r in rs} == {"low_dose_ct"}
    # a held-out 8-bit target maps back to the HU of its PNG (+1024 offset removed), within the window
    held = next(r for r in rs if r["split"] in ("val", "test"))
    p, k = int(held["source"]["path"][7:9]), int(held["source"]["path"][-7:-4])
    hr = np.asarray(Image.open(out / held["heldout"]["hr"]).convert("L"), dtype=float)
    back = it["low"] + hr / 255 * (it["high"] - it["low"])
    assert np.abs(back - np.clip(phantom_hu(64, 100 * p + k), -160, 240)).max() <= 400 / 255 / 2 + 0.5


def test_group_by_patient_outside_dicom_and_error_lists_every_value(tmp_path):
    base = {"name": "x", "output_dir": "o", "input": {"kind": "images", "path": "in"},
            "degradations": [{"name": "gaussian_noise", "sigma": 0.01}]}
    assert load_build_config({**base, "splits": {"group_by": "patient"}}).splits["group_by"] == "patient"
    with pytest.raises(ConfigError) as e:
        load_build_config({**base, "splits": {"group_by": "series"}})
    for value in ("auto", "subject", "patient", "regex", "parent_dir", "file"):
        assert value in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_build_config({**base, "splits": {"group_by": "patients"}})
    assert "subject" in str(e.value) and "patient" in str(e.value)


def test_mr_png_template_builds_8_12_16_bit_magnitude(tmp_path):
    make_mr_images(tmp_path / "MR_exports")
    summary = build_dataset(template_copy("mr_png_magnitude.yaml", tmp_path), progress=False, log=lambda m: None)
    rs = rows(tmp_path / "mr")
    (tmp_path / "mr_png_magnitude.yaml").unlink()
    assert sum(summary.pairs.values()) == 12 and {r["group"] for r in rs} == {f"subject{s:02d}" for s in range(1, 5)}
    assert {r["intensity"]["mode"] for r in rs} == {"percentile"} and {r["intensity"]["unit"] for r in rs} == {"raw"}
    assert {r["source"]["bits_stored"] for r in rs} == {8, 16}  # the 12-bit PNG: container depth
    assert not summary.notes  # percentiles do not depend on the bit depth: no note about it
    summary = build_dataset(template_copy("mr_png_magnitude.yaml", tmp_path, output_dir="mr_dtype",
                                          intensity={"mode": "dtype"}), progress=False, log=lambda m: None)
    assert any("set input.bits_stored (e.g. 12)" in n for n in summary.notes)  # the stored scale does


def test_evaluate_hu_window_on_builder_manifest_of_pngs(ct_build, tmp_path, capsys):
    out, _ = ct_build
    restored = copy_degraded_as_outputs(out)
    rc = E.main(["--outputs", str(restored), "--manifest", str(out / "manifest.jsonl"), "--split", "test",
                 "--hu_window", "40,400", "--out", str(tmp_path / "rep"), "--n_boot", "200", "--no_progress"])
    assert rc == 0
    per = __import__("pandas").read_csv(tmp_path / "rep" / "per_image.csv")
    assert len(per) == 3 and (per["data_range"] == 1.0).all() and np.isfinite(per["psnr"]).all()
    # same numbers by hand: 8-bit -> HU with the recorded range -> window 40/400 -> [0, 1]
    r0 = next(r for r in rows(out) if r["pair_id"] == per["pair_id"][0])
    it = r0["intensity"]
    ref = np.asarray(Image.open(out / r0["heldout"]["hr"]).convert("L"), float) / 255
    outp = np.asarray(Image.open(out / r0["heldout"]["lr"]).convert("L"), float) / 255
    hu_ref, hu_out = (np.clip((it["low"] + x * (it["high"] - it["low"]) + 160) / 400, 0, 1) for x in (ref, outp))
    mse = np.mean((hu_ref - hu_out) ** 2)
    assert per["psnr"][0] == pytest.approx(10 * np.log10(1 / mse), rel=1e-6)
    assert "mapped back to HU" in (tmp_path / "rep" / "summary.md").read_text()


def test_hu_window_refused_for_non_hu_sets_and_plain_pngs(tmp_path):
    make_mr_images(tmp_path / "MR_exports", subjects=4)
    build_dataset(template_copy("mr_png_magnitude.yaml", tmp_path), progress=False, log=lambda m: None)
    out = tmp_path / "mr"
    restored = copy_degraded_as_outputs(out)
    with pytest.raises(BadInput, match="unit 'raw'.*drop --hu_window"):
        E.run_evaluation(restored, tmp_path / "rep", E.EvalSettings(hu_window=(40, 400)),
                         manifest=out / "manifest.jsonl", split="test", progress=False, n_boot=10)
    with pytest.raises(BadInput, match="--manifest"):
        windowed(np.zeros((4, 4)), True, "x.png", None, (40, 400))
    hu = windowed(np.array([[0.0, 1.0]]), True, "x.png", {"unit": "HU", "low": -160, "high": 240}, (40, 400))
    np.testing.assert_allclose(hu, [[0.0, 1.0]])


def test_ct_template_reads_signed_16_bit_tiffs_in_hu(tmp_path):
    """The other common CT export: HU as signed 16-bit TIFF (no offset: rescale intercept 0)."""
    import tifffile

    for p in (1, 2):
        (tmp_path / "CT_exports" / f"case_{p}").mkdir(parents=True)
        tifffile.imwrite(tmp_path / "CT_exports" / f"case_{p}" / "s0.tif", np.round(phantom_hu(48, p)).astype(np.int16))
    build_dataset(template_copy("ct_png_hu.yaml", tmp_path, input__rescale={"slope": 1.0, "intercept": 0.0},
                                splits__fractions={"train": 0.5, "val": 0.0, "test": 0.5}),
                  progress=False, log=lambda m: None)
    rs = rows(tmp_path / "ct")
    assert {r["group"] for r in rs} == {"case_1", "case_2"} and {r["split"] for r in rs} == {"train", "test"}
    held = next(r for r in rs if r["split"] == "test")
    it, p = held["intensity"], int(held["group"][-1])
    hr = np.asarray(Image.open(tmp_path / "ct" / held["heldout"]["hr"]).convert("L"), dtype=float)
    back = it["low"] + hr / 255 * (it["high"] - it["low"])
    assert np.abs(back - np.clip(np.round(phantom_hu(48, p)), -160, 240)).max() <= 400 / 255 / 2 + 1e-6
