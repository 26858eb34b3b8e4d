"""End-to-end builds: DICOM series / images / sample files -> shards, manifest, splits, resume, overwrite."""
import io
import json
import os
import shutil
import types

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from bagel_sr.data import build as build_mod
from bagel_sr.data import build_dataset, load_build_config
from bagel_sr.data.__main__ import main as cli_main
from bagel_sr.data.errors import BuildError, ConfigError, OutputExistsError
from bagel_sr.data.writer import BuildState
from bagel_sr.errors import UserError
from bagel_sr.patches.datasets import DatasetRegistrationError, register_built_datasets
from bagel_sr.testing.builder_inputs import build_interrupted, cfg_for, make_ct_series, png, tree

NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
BAGEL_KEYS = {"dataset_names", "image_transform_args", "vit_image_transform_args", "is_mandatory", "num_used_data", "weight"}


def make_png_patients(root, patients=("p1", "p2", "p3", "p4"), per_patient=2, size=(40, 48)):
    rng = np.random.default_rng(0)
    for p in patients:
        (root / p).mkdir(parents=True, exist_ok=True)
        for i in range(per_patient):
            y, x = np.mgrid[0:size[0], 0:size[1]]
            img = 30000 + 20000 * np.sin(x / 5.0 + i) * np.cos(y / 7.0) + rng.normal(0, 50, size)
            Image.fromarray(img.astype(np.uint16)).save(root / p / f"slice{i}.png")


def read_manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def read_rows(out):
    rows = []
    for split in ("train", "val", "test"):
        d = out / "parquet" / split
        for f in sorted(d.glob("*.parquet")) if d.is_dir() else []:
            rows += [dict(r, split=split, shard=f) for r in pq.read_table(f).to_pylist()]
    return rows


def decode(png):
    return np.asarray(Image.open(io.BytesIO(png)))


def images_config(tmp_path, **extra):
    cfg = {"name": "toy_sr", "output_dir": str(tmp_path / "out"), "seed": 7,
           "input": {"kind": "images", "path": str(tmp_path / "imgs")},
           "degradations": [{"name": "bicubic_downsample", "scale": 2}, {"name": "gaussian_noise", "sigma": 0.02}],
           "splits": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}},
           "output": {"rows_per_shard": 2, "rows_per_row_group": 1}}
    cfg.update(extra)
    return cfg


def test_dicom_series_split_by_patient_and_noise_level(tmp_path):
    for i in range(6):
        make_ct_series(tmp_path / "dicom" / f"P{i}" / "series", f"PAT{i}")
    (tmp_path / "dicom" / "DICOMDIR.txt").write_text("not a dicom")
    cfg = {"name": "ct_noise", "output_dir": str(tmp_path / "out"), "input": {"kind": "dicom", "path": str(tmp_path / "dicom")},
           "intensity": {"window": {"level": 40, "width": 400}},
           "degradations": [{"name": "gaussian_noise", "sigma": 20.0}],
           "splits": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}}}
    summary = build_dataset(cfg, progress=False)
    out = tmp_path / "out"
    rows = read_manifest(out)
    assert len(rows) == 24 and summary.pairs == {"train": 8, "val": 8, "test": 8}
    assert [s.path for s in summary.skipped_files] == ["DICOMDIR.txt"]
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["source"]["patient_id"], r["split"]) == r["split"]  # a patient in one split only
        assert r["group"] == r["source"]["patient_id"] and r["group_by"] == "patient_id"
        assert r["intensity"]["unit"] == "HU" and (r["intensity"]["low"], r["intensity"]["high"]) == (-160.0, 240.0)
        k = r["source"]["slice_index"]
        assert r["source"]["file"].endswith(f"img{4 - k:03d}.dcm")  # sorted by position, not by file name
        assert r["instructions"][0] == "Remove the noise from this CT slice"
    assert sorted(set(split_of.values())) == ["test", "train", "val"]
    for a in ("train", "val", "test"):
        for b in ("train", "val", "test"):
            if a < b:
                assert not {p for p, s in split_of.items() if s == a} & {p for p, s in split_of.items() if s == b}
    # measured noise in the 8-bit images matches the requested 20 HU (window width 400 -> 12.75 levels)
    diffs = [decode(r["image_list"][0])[..., 0].astype(float) - decode(r["image_list"][1])[..., 0] for r in read_rows(out)]
    flat = np.concatenate([d[16:, 16:].ravel() for d in diffs])
    assert abs(flat.std() - 20.0 * 255 / 400) < 0.05 * 12.75


def test_images_build_read_back_with_pyarrow(tmp_path):
    make_png_patients(tmp_path / "imgs")
    summary = build_dataset(images_config(tmp_path), progress=False)
    out = tmp_path / "out"
    rows, manifest = read_rows(out), {m["pair_id"]: m for m in read_manifest(out)}
    assert len(rows) == len(manifest) == 8 == sum(summary.pairs.values())
    assert summary.groups == {"train": 2, "val": 1, "test": 1}
    table = pq.read_table(next((out / "parquet" / "train").glob("*.parquet")))
    assert table.schema.field("image_list").type.value_type == pa.binary()
    assert table.schema.field("instruction_list").type.value_type.value_type == pa.string()
    for r in rows:
        m = manifest[r["pair_id"]]
        lr, hr = decode(r["image_list"][0]), decode(r["image_list"][1])
        assert lr.shape == hr.shape == (32, 48, 3) and lr.dtype == np.uint8    # 8-bit RGB, same size
        assert np.abs(lr.astype(int) - hr).mean() > 1                        # condition first = degraded
        assert r["instruction_list"] == [m["instructions"]] and m["instructions"][0] == "Restore this image: super-resolve it by 2x and remove the noise"
        assert m["degradations"][0]["lr_shape"] == [16, 24] and m["split"] == r["split"]
        assert m["shard"] == r["shard"].relative_to(out).as_posix()
        if r["split"] in ("val", "test"):
            assert (out / m["heldout"]["lr"]).read_bytes() == r["image_list"][0]
            assert (out / m["heldout"]["hr"]).read_bytes() == r["image_list"][1]
        else:
            assert "heldout" not in m
    info = json.loads((out / "parquet_info" / "train.json").read_text())
    for path, v in info.items():
        assert os.path.isabs(path) and v["num_row_groups"] == pq.ParquetFile(path).metadata.num_row_groups == 2
    frag = yaml.safe_load((out / "dataset_config.yaml").read_text())
    assert set(frag) == {"unified_edit"} and set(frag["unified_edit"]) == BAGEL_KEYS
    assert frag["unified_edit"]["dataset_names"] == ["toy_sr"] and frag["unified_edit"]["num_used_data"] == [2]
    reg = yaml.safe_load((out / "bagel_sr_dataset.yaml").read_text())
    assert set(reg["datasets"]) == {"toy_sr", "toy_sr_val", "toy_sr_test"}
    assert reg["datasets"]["toy_sr"]["num_total_samples"] == 4 and reg["datasets"]["toy_sr"]["num_files"] == 2
    assert str(tmp_path) not in (out / "bagel_sr_dataset.yaml").read_text()                 # portable


def test_sample_files_from_pydicom_and_nibabel(tmp_path):
    (tmp_path / "dcm").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "dcm" / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "dcm" / "mr.dcm")
    cfg = {"name": "ldct", "output_dir": str(tmp_path / "ct"), "input": {"kind": "dicom", "path": str(tmp_path / "dcm")},
           "degradations": [{"name": "low_dose_ct", "photons_per_ray": 2.0e4}], "splits": {"fractions": {"train": 1.0}}}
    summary = build_dataset(cfg, progress=False)
    assert summary.pairs["train"] == 1                                   # the CT slice
    assert any("needs modality CT" in v for v in summary.failed_sources.values())  # MR reported, not lost
    (m,) = read_manifest(tmp_path / "ct")
    assert m["degradations"][0]["pixel_size_mm"] == pytest.approx(0.661468)  # from DICOM PixelSpacing
    assert m["instructions"][0] == "Remove the noise from this low-dose CT slice"
    report = json.loads((tmp_path / "ct" / "report.json").read_text())
    assert report["failed_sources"][0]["source"].startswith("dicom:")

    cfg = {"name": "mr_sr", "output_dir": str(tmp_path / "mr"),
           "input": {"kind": "nifti", "path": os.path.join(NIBABEL_DATA, "anatomical.nii")},
           "degradations": [{"name": "slice_thickness", "factor": 2}, {"name": "kspace_truncation", "scale": 2, "window": "hann"},
                            {"name": "rician_noise", "sigma": 0.02}],
           "splits": {"fractions": {"train": 1.0}}, "output": {"size_multiple": 8}}
    summary = build_dataset(cfg, progress=False)
    rows = read_manifest(tmp_path / "mr")
    assert summary.pairs["train"] == len(rows) > 10
    assert all(r["size"] == [40, 32] and r["intensity"]["mode"] == "percentile" for r in rows)  # rot90 of 33x41 cropped
    assert [d["name"] for d in rows[0]["degradations"]] == ["slice_thickness", "kspace_truncation", "rician_noise"]
    assert rows[0]["seed"]["volume"] is not None and rows[0]["task"] == "restore"


def test_nifti_group_regex_keeps_sessions_together(tmp_path):
    src = os.path.join(NIBABEL_DATA, "anatomical.nii")
    for sub in range(1, 5):
        for ses in (1, 2):
            (tmp_path / "nii").mkdir(exist_ok=True)
            shutil.copy(src, tmp_path / "nii" / f"sub-{sub:02d}_ses-{ses}_T1w.nii")
    cfg = {"name": "mr", "output_dir": str(tmp_path / "out"), "input": {"kind": "nifti", "path": str(tmp_path / "nii"),
           "slice_step": 8}, "degradations": [{"name": "bicubic_downsample", "scale": 2}],
           "splits": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "group_by": "regex", "group_regex": r"(sub-\d+)"}}
    build_dataset(cfg, progress=False)
    split_of = {}
    for r in read_manifest(tmp_path / "out"):
        assert split_of.setdefault(r["group"], r["split"]) == r["split"]
    assert len(split_of) == 4 and set(split_of.values()) == {"train", "val", "test"}


def test_resume_after_interrupt_gives_identical_pairs(tmp_path, monkeypatch):
    make_png_patients(tmp_path / "imgs", per_patient=3)
    reference = build_dataset(images_config(tmp_path, output_dir=str(tmp_path / "ref")), progress=False)
    ref_rows = {r["pair_id"]: r["image_list"] for r in read_rows(tmp_path / "ref")}

    build_interrupted(monkeypatch, images_config(tmp_path), after_pairs=8)
    out = tmp_path / "out"
    state = BuildState.load(out)
    assert not state.complete and 0 < len(state.done) < 12
    with open(out / ".build" / "journal.jsonl", "ab") as f:
        f.write(b'{"type": "commit", "spl')                                # torn append of a crash
    (out / "parquet" / "train").mkdir(parents=True, exist_ok=True)
    (out / "parquet" / "train" / "part-00042.parquet").write_bytes(b"orphan of an interrupted commit")
    with pytest.raises(OutputExistsError, match="another checkpoint/input or config"):
        build_dataset(images_config(tmp_path, seed=8), progress=False)
    summary = build_dataset(images_config(tmp_path), progress=False)
    assert summary.resumed_sources == len(state.done)
    assert not (out / "parquet" / "train" / "part-00042.parquet").exists()
    rows = read_rows(out)
    ids = [r["pair_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 12 and summary.pairs == reference.pairs
    assert {r["pair_id"]: r["image_list"] for r in rows} == ref_rows         # byte-identical pairs
    assert sorted(m["pair_id"] for m in read_manifest(out)) == sorted(ids)


def test_existing_output_is_never_overwritten_unless_asked(tmp_path, capsys):
    make_png_patients(tmp_path / "imgs", patients=("p1", "p2"), per_patient=1)
    cfg_path = tmp_path / "build.yaml"
    cfg = images_config(tmp_path, output_dir="out", splits={"fractions": {"train": 1.0}})
    cfg["input"]["path"] = "imgs"                                           # relative to the YAML's folder
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["build", str(cfg_path), "--no-progress"]) == 0
    assert "train" in capsys.readouterr().out
    before = (tmp_path / "out" / "manifest.jsonl").read_bytes()
    assert cli_main(["build", str(cfg_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--overwrite" in err
    assert (tmp_path / "out" / "manifest.jsonl").read_bytes() == before
    assert cli_main(["build", str(cfg_path), "--no-progress", "--overwrite"]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty and was not written by bagel-sr"):
        build_dataset(images_config(tmp_path, output_dir=str(foreign)), overwrite=True, progress=False)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_bad_inputs_are_reported_per_file(tmp_path):
    make_png_patients(tmp_path / "imgs", patients=("sub-01", "sub-02"), per_patient=1)
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    (tmp_path / "imgs" / "sub-01" / "broken.png").write_bytes(b"garbage")
    (tmp_path / "imgs" / "misc").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8) + 9).save(tmp_path / "imgs" / "misc" / "unmatched.png")
    cfg = images_config(tmp_path, splits={"fractions": {"train": 1.0}, "group_by": "regex", "group_regex": r"(sub-\d+)"})
    summary = build_dataset(cfg, progress=False)
    assert summary.pairs["train"] == 2
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["skipped_files"] == [{"path": "notes.txt", "reason": report["skipped_files"][0]["reason"], "stage": "scan"}]
    reasons = {f["source"]: f["reason"] for f in report["failed_sources"]}
    assert "not a decodable image" in reasons["sub-01/broken.png"]
    assert "does not match splits.group_regex" in reasons["misc/unmatched.png"]
    text = summary.format()
    assert "notes.txt" in text and "broken.png" in text and "unmatched.png" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(BuildError, match="no pairs were produced"):
        build_dataset(images_config(tmp_path, output_dir=str(tmp_path / "o2"), input={"kind": "images", "path": str(empty)}),
                      progress=False)


def fake_dataset_info():
    mod = types.ModuleType("data.dataset_info")
    mod.DATASET_INFO = {"unified_edit": {"existing": {"data_dir": "x"}}, "t2i_pretrain": {}}
    mod.DATASET_REGISTRY = {"unified_edit": object}
    return mod


def test_registration_patch_adds_undoes_and_rekeys_moved_sets(tmp_path):
    make_png_patients(tmp_path / "imgs")
    build_dataset(images_config(tmp_path), progress=False)
    mod = fake_dataset_info()
    handle = register_built_datasets(tmp_path / "out" / "bagel_sr_dataset.yaml", mod)
    group = mod.DATASET_INFO["unified_edit"]
    assert set(handle.names) == {"toy_sr", "toy_sr_val", "toy_sr_test"} and "existing" in group
    e = group["toy_sr"]
    assert set(e) == {"data_dir", "num_files", "num_total_samples", "parquet_info_path"}
    assert e["parquet_info_path"] == str(tmp_path / "out" / "parquet_info" / "train.json")
    for p in json.loads(open(e["parquet_info_path"]).read()):
        assert os.path.dirname(p) == e["data_dir"]
    handle.undo()
    assert set(group) == {"existing"}

    shutil.move(tmp_path / "out", tmp_path / "moved")                    # a moved set is re-keyed
    with register_built_datasets(str(tmp_path / "moved" / "dataset_config.yaml"), mod):
        e = group["toy_sr"]
        assert e["data_dir"] == str(tmp_path / "moved" / "parquet" / "train")
        assert all(os.path.isfile(p) for p in json.loads(open(e["parquet_info_path"]).read()))
    assert set(group) == {"existing"}

    group["toy_sr"] = {"data_dir": "/elsewhere"}
    with pytest.raises(DatasetRegistrationError, match="already has 'toy_sr'"):
        register_built_datasets(tmp_path / "moved", mod)
    bad = types.ModuleType("data.dataset_info")
    bad.DATASET_INFO, bad.DATASET_REGISTRY = {"t2i_pretrain": {}}, {}
    with pytest.raises(DatasetRegistrationError, match=r"no DATASET_REGISTRY\['unified_edit'\].*UnifiedEditIterableDataset"):
        register_built_datasets(tmp_path / "moved", bad)
    fork = types.ModuleType("data.dataset_info")  # a fork: the registry maps the type, DATASET_INFO has no group
    fork.DATASET_INFO, fork.DATASET_REGISTRY = {"medical_sr": {}}, {"unified_edit": object}
    with register_built_datasets(tmp_path / "moved", fork) as created:
        assert "toy_sr" in fork.DATASET_INFO["unified_edit"] and "toy_sr" in created.names
    assert fork.DATASET_INFO == {"medical_sr": {}}
    with pytest.raises(DatasetRegistrationError, match="no built bagel-sr set"):
        register_built_datasets(tmp_path / "nothing_here", mod)


@pytest.mark.parametrize("name", ["ct_denoise_dicom.yaml", "mr_sr_nifti.yaml", "ct_png_hu.yaml", "mr_png_magnitude.yaml"])
def test_example_configs_validate(name):
    from importlib import resources

    path = resources.files("bagel_sr.data").joinpath("templates", name)
    cfg = load_build_config(str(path))
    assert cfg.degradations and cfg.name


def test_output_inside_input_is_refused_and_2d_volume_errors(tmp_path):
    make_png_patients(tmp_path / "imgs", patients=("p1", "p2"), per_patient=1)
    cfg = images_config(tmp_path, output_dir=str(tmp_path / "imgs" / "built"), splits={"fractions": {"train": 1.0}})
    with pytest.raises(ConfigError, match="'output_dir'.*lies inside input.path"):
        build_dataset(cfg, progress=False)
    assert not (tmp_path / "imgs" / "built").exists()

    (tmp_path / "one").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "one" / "ct.dcm")
    cfg = {"name": "thick", "output_dir": str(tmp_path / "thick"), "input": {"kind": "dicom", "path": str(tmp_path / "one")},
           "degradations": [{"name": "slice_thickness", "factor": 2}]}
    with pytest.raises(BuildError, match="too few for factor 2"):          # a single slice is no volume
        build_dataset(cfg, progress=False)


def test_the_output_ledger_lists_every_file_of_a_build_and_overwrite_removes_them(tmp_path):
    """Ownership goes through bagel_sr.outputs: every file the build leaves (shards, manifest, held-out PNGs, lesion
    file, state, ...) is in the folder's ledger, and --overwrite deletes exactly those (a user's file stays)."""
    from bagel_sr.outputs import LEDGER, Ledger

    for p in ("p1", "p2", "p3", "p4"):
        make_ct_series(tmp_path / "dicom" / p, p, n_slices=2, size=64)
    cfg = {"name": "ct_ledger", "output_dir": str(tmp_path / "out"), "seed": 5,
           "input": {"kind": "dicom", "path": str(tmp_path / "dicom")},
           "degradations": [{"name": "bicubic_downsample", "scale": 2}],
           "splits": {"fractions": {"train": 0.5, "val": 0.0, "test": 0.5}},
           "lesions": {"splits": ["test"], "per_slice": [1, 2], "radius": [1.5, 4], "contrast_hu": [10, 80]}}
    build_dataset(cfg, progress=False)
    out = tmp_path / "out"
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {LEDGER}
    ledger = Ledger.read(out)
    assert ledger.tool == build_mod.TOOL and ledger.complete
    assert {"lesions.json", "manifest.jsonl", "build_state.json"} <= on_disk
    assert any(f.startswith("heldout/test/") for f in on_disk) and on_disk <= set(ledger.written)
    (out / "notes.txt").write_text("mine")
    build_dataset(cfg, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and Ledger.read(out).complete


@pytest.mark.parametrize("inp, out, message", [
    ("imgs", "imgs/built", "'output_dir'.*lies inside input.path"),
    ("data/imgs", "data", "'input.path'.*lies inside output_dir"),
    ("imgs", "imgs", "lies inside input.path"),
])
def test_nested_input_and_output_are_refused(tmp_path, inp, out, message):
    tree(tmp_path / inp, ["p1/a.png", "p2/a.png"])
    with pytest.raises(UserError, match=message):
        build_dataset(cfg_for(tmp_path, inp=inp, out=out), progress=False)


def test_builder_overwrite_keeps_a_users_file(tmp_path):
    tree(tmp_path / "imgs", ["p1/a.png", "p2/a.png", "p3/a.png", "p4/a.png"])
    build_dataset(cfg_for(tmp_path), progress=False)
    (tmp_path / "out" / "my_notes.txt").write_text("keep")
    (tmp_path / "out" / "heldout" / "mine.png").write_bytes(b"keep")
    build_dataset(cfg_for(tmp_path), overwrite=True, progress=False)
    assert (tmp_path / "out" / "my_notes.txt").read_text() == "keep"
    assert (tmp_path / "out" / "heldout" / "mine.png").read_bytes() == b"keep"
    assert (tmp_path / "out" / "manifest.jsonl").is_file()


def test_builder_resume_refuses_changed_inputs(tmp_path, monkeypatch):
    tree(tmp_path / "imgs", ["p1/a.png", "p2/a.png", "p3/a.png", "p4/a.png"])
    build_interrupted(monkeypatch, cfg_for(tmp_path, output={"rows_per_shard": 1}), after_pairs=3)
    png(tmp_path / "imgs" / "p4" / "a.png", value=7, size=(48, 48))         # a file changed since
    with pytest.raises(UserError, match="inputs under .* changed since the interrupted build"):
        build_dataset(cfg_for(tmp_path, output={"rows_per_shard": 1}), progress=False)
