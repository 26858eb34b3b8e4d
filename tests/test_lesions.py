"""Synthetic lesions: what the builder inserts is what it records, and the lesion study's metrics react to exactly
the failures they name (an identity restoration, an inpainted lesion, one invented blob, the false-positive rate)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from bagel_sr.data import build_dataset
from bagel_sr.data import lesions as L
from bagel_sr.data.errors import ConfigError
from bagel_sr.errors import cli_main
from bagel_sr.eval import lesions as LS
from bagel_sr.eval.evaluate import main as evaluate_main
from bagel_sr.testing.builder_inputs import make_ct_series


CFG = {"splits": ["test"], "per_slice": [2, 3], "radius": [1.5, 6.0], "contrast_hu": [10, 80],
       "contrast_fraction": [0.15, 0.4], "sign": "both", "shapes": list(L.SHAPES), "seed": None}


# ------------------------------------------------------------------------------------------ builder

@pytest.fixture(scope="module")
def ct_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesion_set")
    for p in ("p1", "p2", "p3", "p4"):
        make_ct_series(root / "dicom" / p, p, n_slices=2, size=64)
    cfg = {"name": "ct_lesions", "output_dir": str(root / "out"), "seed": 5,
           "input": {"kind": "dicom", "path": str(root / "dicom")},
           "degradations": [{"name": "bicubic_downsample", "scale": 2}, {"name": "gaussian_noise", "sigma": 8.0}],
           "splits": {"fractions": {"train": 0.5, "val": 0.0, "test": 0.5}},
           "lesions": {"splits": ["test"], "per_slice": [2, 3], "radius": [1.5, 5], "contrast_hu": [10, 80]}}
    build_dataset(cfg, progress=False)
    return root / "out"


def _png(path):
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def test_inserted_lesions_have_the_recorded_position_and_contrast(ct_set):
    doc = json.loads((ct_set / "lesions.json").read_text())
    rows = {r["pair_id"]: r for r in map(json.loads, (ct_set / "manifest.jsonl").read_text().splitlines())}
    assert doc["images"] and doc["lesions"] and all(r["unit"] == "HU" for r in doc["lesions"])
    assert {r["split"] for r in rows.values() if "lesions" in r} == {"test"}  # only the chosen split
    for im in doc["images"]:
        row, twin = rows[im["pair_id"]], rows[im["twin_id"]]
        lo, hi = row["intensity"]["low"], row["intensity"]["high"]
        hu_per_level = (hi - lo) / 255
        diff = (_png(ct_set / row["heldout"]["hr"]) - _png(ct_set / twin["heldout"]["hr"])) * hu_per_level
        expected = np.zeros_like(diff)
        recs = [r for r in doc["lesions"] if r["pair_id"] == im["pair_id"]]
        assert len(recs) == im["n_lesions"] >= 1
        for r in recs:
            assert 10 <= abs(r["contrast"]) <= 80 and r["amplitude"] == r["contrast"]
            prof = L.profile(diff.shape, r["center"], r["radius"], r["shape"], r["shape_params"])
            expected += r["contrast"] * prof
            assert abs(diff[tuple(r["center"])] - r["contrast"]) <= hu_per_level + 1e-9  # peak at the centre
            for q in recs:  # rings do not overlap
                if q is not r:
                    gap = np.hypot(*np.subtract(r["center"], q["center"]))
                    assert gap > L.ring_radii(r["radius"])[1] + L.ring_radii(q["radius"])[1]
        assert np.abs(diff - expected).max() <= hu_per_level + 1e-9  # nothing else changed
        # the same degradation seed: away from the lesions the inputs are identical (same noise)
        lr_diff = _png(ct_set / row["heldout"]["lr"]) - _png(ct_set / twin["heldout"]["lr"])
        near = ndimage.binary_dilation(np.abs(expected) > 0.1, iterations=6)  # the inputs keep the HR size
        assert np.abs(lr_diff[~near]).max() <= 1 and (lr_diff[~near] != 0).mean() < 0.02  # rounding flips only
        assert np.abs(lr_diff[near]).max() > 2
    assert json.loads(json.dumps(doc))["conventions"]["ring"].startswith("radius + 2")


def test_evaluate_lesions_identity_outputs(ct_set, tmp_path):
    rows = [json.loads(line) for line in (ct_set / "manifest.jsonl").read_text().splitlines()]
    outs = tmp_path / "outs"
    outs.mkdir()
    for r in rows:
        if r["split"] == "test":
            shutil.copy(ct_set / r["heldout"]["hr"], outs / f"{r['pair_id']}.png")
    evaluate_main(["--outputs", str(outs), "--manifest", str(ct_set / "manifest.jsonl"), "--split", "test",
                   "--lesions", str(ct_set / "lesions.json"), "--out", str(tmp_path / "rep"), "--n_boot", "200",
                   "--no_progress"])
    import pandas as pd

    per = pd.read_csv(tmp_path / "rep" / "lesions_per_lesion.csv")
    a, truth = per[per.system == "A"].reset_index(), per[per.system == "truth"].reset_index()
    assert len(a) == len(json.loads((ct_set / "lesions.json").read_text())["lesions"])
    assert np.allclose(a["cr"], 1.0) and (a["detected"] == truth["detected"]).all() and not a["erased"].any()
    inp = per[per.system == "input"]
    assert (inp["cr"] < 1).mean() > 0.5  # the degraded input blurs them
    assert "Lesion study" in (tmp_path / "rep" / "lesions.md").read_text()
    assert (tmp_path / "rep" / "lesion_crops.png").stat().st_size > 0


def test_lesion_config_errors_name_the_key(tmp_path):
    base = {"name": "x", "output_dir": str(tmp_path / "o"), "input": {"kind": "dicom", "path": str(tmp_path)},
            "degradations": [{"name": "bicubic_downsample", "scale": 2}]}
    with pytest.raises(ConfigError, match="lesions.radius"):
        build_dataset({**base, "lesions": {"radius": [0.5, 2]}}, progress=False)
    with pytest.raises(ConfigError, match="unknown config key 'lesions.size'"):
        build_dataset({**base, "lesions": {"size": 3}}, progress=False)
    with pytest.raises(ConfigError, match="input.color: gray"):
        build_dataset({**base, "input": {"kind": "images", "path": str(tmp_path), "color": "rgb"}, "lesions": True},
                      progress=False)
    with pytest.raises(ConfigError, match="volumetric"):
        build_dataset({**base, "degradations": [{"name": "slice_thickness", "factor": 2},
                                                {"name": "bicubic_downsample", "scale": 2}], "lesions": True},
                      progress=False)
    assert cli_main(evaluate_main, ["--outputs", str(tmp_path), "--references", str(tmp_path), "--lesions",
                                    str(tmp_path / "none.json"), "--out", str(tmp_path / "r")]) == 2


# ------------------------------------------------------------------------------------------ the study, in memory

def _phantom(rng, size=64):
    yy, xx = np.mgrid[:size, :size]
    body = (yy - size / 2) ** 2 / 29 ** 2 + (xx - size / 2) ** 2 / 27 ** 2 < 1
    tissue = 0.5 + 0.03 * np.sin(xx / 7.0 + rng.uniform(0, 6)) + ndimage.gaussian_filter(rng.normal(0, 0.02, (size, size)), 1)
    return np.where(body, tissue, 0.0)


def _study(n=12, seed=0):
    """Lesion images and twins (truth only) of ``n`` phantoms, three subjects."""
    rng = np.random.default_rng(seed)
    cfg = {**CFG, "per_slice": [2, 2], "contrast_fraction": [0.25, 0.4], "radius": [2.0, 4.0]}
    images, lesions, items = [], [], []
    for i in range(n):
        (lid, with_l, block), (tid, hr, _) = L.variants(f"im{i}", _phantom(rng), cfg, rng, "raw", (0.0, 1.0))
        rec = {"pair_id": lid, "twin_id": tid, "subject": f"s{i % 3}", "body_threshold": block["body_threshold"]}
        images.append(rec)
        lesions += [{**r, "pair_id": lid, "subject": rec["subject"]} for r in block["records"]]
        items.append(LS.StudyImages(rec, {"truth": with_l}, {"truth": hr}))
    return LS.LesionSet(images, lesions), items


def _with_system(items, name, lesion_fn=lambda i, x: x):
    for i, it in enumerate(items):
        it.lesion[name], it.twin[name] = lesion_fn(i, it.lesion["truth"].copy()), it.twin["truth"].copy()
    return items


def test_identity_restoration_recovers_contrast_one_and_detects_what_truth_detects():
    lesion_set, items = _study()
    per_lesion, per_image, _ = LS.measure(_with_system(items, "A"), lesion_set, ["truth", "A"])
    a, t = per_lesion[per_lesion.system == "A"], per_lesion[per_lesion.system == "truth"]
    assert np.allclose(a["cr"], 1.0) and list(a["detected"]) == list(t["detected"]) and t["detected"].mean() > 0.8
    assert per_image[per_image.system == "A"]["invented"].sum() == 0


def test_inpainted_lesion_scores_erased():
    lesion_set, items = _study()
    target = lesion_set.lesions_of(items[0].record["pair_id"])[0]

    def inpaint(i, x):
        if i == 0:
            d = np.hypot(*np.meshgrid(np.arange(x.shape[0]) - target["center"][0],
                                      np.arange(x.shape[1]) - target["center"][1], indexing="ij"))
            near = d <= L.ring_radii(target["radius"])[0]
            x[near] = items[0].twin["truth"][near]
        return x

    per_lesion, _, _ = LS.measure(_with_system(items, "A", inpaint), lesion_set, ["truth", "A"])
    a = per_lesion[per_lesion.system == "A"].set_index("lesion_id")
    t = per_lesion[per_lesion.system == "truth"].set_index("lesion_id")
    assert t.loc[target["lesion_id"], "detected"]
    assert a.loc[target["lesion_id"], "erased"] and not a.loc[target["lesion_id"], "detected"]
    assert abs(a.loc[target["lesion_id"], "cr"]) < 0.2
    others = a.drop(index=target["lesion_id"])
    assert not others["erased"].any() and np.allclose(others["cr"], 1.0)


def test_one_added_blob_counts_one_invented():
    lesion_set, items = _study()
    recs = lesion_set.lesions_of(items[3].record["pair_id"])
    body = items[3].twin["truth"] > items[3].record["body_threshold"]
    dist = ndimage.distance_transform_edt(body)
    free = [(y, x) for y, x in np.argwhere(dist > 12)
            if all(np.hypot(y - r["center"][0], x - r["center"][1]) > 16 for r in recs)]
    spot = free[len(free) // 2]
    blob = 0.2 * L.profile(body.shape, spot, 3.0, "gaussian")
    per_lesion, per_image, _ = LS.measure(_with_system(items, "A", lambda i, x: x + blob if i == 3 else x),
                                          lesion_set, ["truth", "A"])
    inv = per_image[per_image.system == "A"].set_index("pair_id")["invented"]
    assert inv[items[3].record["pair_id"]] == 1 and inv.sum() == 1
    at = json.loads(per_image.set_index(["system", "pair_id"]).loc[("A", items[3].record["pair_id"]), "invented_at"])
    assert np.hypot(at[0][0] - spot[0], at[0][1] - spot[1]) <= 2
    assert np.allclose(per_lesion[per_lesion.system == "A"]["cr"], 1.0)  # the blob touches no lesion


def test_false_positive_rate_on_fresh_twins_matches_the_stated_one():
    rate, n = 1.0, 150
    rng = np.random.default_rng(3)
    body = _phantom(rng) > 0.1

    def twins(k):
        return [np.where(body, 0.5 + ndimage.gaussian_filter(rng.normal(0, 0.03, body.shape), 1.0), 0.0)
                for _ in range(k)]

    channels = LS.channels_for([{"radius": 2.0}, {"radius": 4.0}])
    det = LS.calibrate(twins(n), [body] * n, channels, fp_per_image=rate)
    assert det.achieved_fp_per_image == pytest.approx(rate, abs=1.0 / n)
    counts = [len(det.detections(t, body)) for t in twins(n)]  # fresh twins, same process
    from bagel_sr.eval.stats import bootstrap_ci

    ci = bootstrap_ci(counts, n_boot=4000, seed=0)
    assert ci.lo <= rate <= ci.hi, (ci, rate)
    assert 0.5 * rate < np.mean(counts) < 2 * rate


FAKE_RESTORER = """
import argparse, json, pathlib, shutil
p = argparse.ArgumentParser()
p.add_argument("--erase", type=float); p.add_argument("--manifest"); p.add_argument("--output_dir")
a = p.parse_args()
root, out = pathlib.Path(a.manifest).parent, pathlib.Path(a.output_dir)
out.mkdir(parents=True, exist_ok=True)
rows = {r["pair_id"]: r for r in map(json.loads, open(a.manifest).read().splitlines())}
for pid, r in rows.items():
    if r["split"] == "test":  # identity, or every lesion erased (the twin's truth in the lesion image's place)
        src = rows[r["lesions"]["twin"]] if a.erase and r.get("lesions", {}).get("role") == "lesion" else r
        shutil.copy(root / src["heldout"]["hr"], out / (pid + ".png"))
"""


def test_ablate_report_shows_the_lesion_columns(ct_set, tmp_path):
    import yaml

    from bagel_sr.eval import ablate

    script = tmp_path / "restorer.py"
    script.write_text(FAKE_RESTORER)
    manifest = str(ct_set / "manifest.jsonl")
    grid = {"name": "lesion sweep", "base_command": [__import__("sys").executable, str(script)],
            "output_root": str(tmp_path / "runs"), "workdir": str(tmp_path),
            "common_flags": {"manifest": manifest, "output_dir": "{run_dir}/outputs"}, "grid": {"erase": [0, 1]},
            "eval": {"manifest": manifest, "split": "test", "lesions": str(ct_set / "lesions.json"), "n_boot": 200,
                     "grid_images": 0}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    assert ablate.main(["run", str(path)]) == 0
    res = ablate.build_report(path, progress=False)
    t = res["table"].set_index("erase")
    assert t.loc[0, "lesion_cr"] == pytest.approx(1.0) and t.loc[0, "lesion_erased"] == 0
    assert t.loc[1, "lesion_erased"] == 1 and abs(t.loc[1, "lesion_cr"]) < 0.3 and t.loc[1, "lesion_detected"] == 0
    md = res["report"].read_text()
    assert "lesion contrast recovery [95% CI]" in md and "invented lesions / image [95% CI]" in md
    assert "lesion_cr_lo" not in md  # the interval columns are not shown as flags


def test_lesion_study_template_validates():
    from importlib import resources

    from bagel_sr.data import load_build_config

    cfg = load_build_config(str(resources.files("bagel_sr.data").joinpath("templates", "ct_lesion_study_dicom.yaml")))
    assert cfg.data["lesions"]["contrast_hu"] == [10, 80] and cfg.data["lesions"]["splits"] == ["test"]


def test_a_nan_output_loses_its_lesions_and_is_named():
    from pathlib import Path

    from bagel_sr.eval.pairs import Pair

    lesion_set, items = _study(n=6)
    images = {}
    for it in items:
        images[f"ref/{it.record['pair_id']}"], images[f"ref/{it.record['twin_id']}"] = it.lesion["truth"], it.twin["truth"]
        out = it.lesion["truth"].copy()
        if it is items[0]:
            out[:] = np.nan
        images[f"out/{it.record['pair_id']}"], images[f"out/{it.record['twin_id']}"] = out, it.twin["truth"]
    runs = {"A": {pid: Pair(pid, Path(f"out/{pid}"), Path(f"ref/{pid}")) for it in items
                  for pid in (it.record["pair_id"], it.record["twin_id"])}}
    got, notes = LS.gather(lesion_set, runs, lambda p: images[str(p)], progress=False)
    assert len(got) == 6 and any("NaN/Inf" in n and items[0].record["pair_id"] in n for n in notes)
    per_lesion, _, _ = LS.measure(got, lesion_set, ["truth", "A"])
    lost = per_lesion[(per_lesion.system == "A") & (per_lesion.pair_id == items[0].record["pair_id"])]
    assert len(lost) and lost["erased"].all() and not lost["detected"].any()
