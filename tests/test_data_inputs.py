"""Readers (16-bit PNG, TIFF, DICOM to HU, NIfTI), intensity mappings, instructions, config errors."""
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from bagel_sr.data import build_dataset
from bagel_sr.data.__main__ import main as data_main
from bagel_sr.data.config import load_build_config
from bagel_sr.data.errors import ConfigError, SourceError
from bagel_sr.data.instructions import instructions_for, load_templates
from bagel_sr.data.intensity import CT_WINDOWS, compute_mapping
from bagel_sr.data.readers import read_source, scan_sources
from bagel_sr.testing.builder_inputs import cfg_for, manifest, tree

INPUT = {"modality": "auto", "volume_index": 0, "rescale": {"slope": 1.0, "intercept": 0.0}, "color": "gray"}
NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def test_scan_and_read_images_16bit_tiff_and_bad_files(tmp_path):
    a16 = (np.arange(32 * 40).reshape(32, 40) * 50).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "b.tif", a16)
    tifffile.imwrite(tmp_path / "f.tiff", a16.astype(np.float32) / 7)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.jpg")
    (tmp_path / "readme.txt").write_text("x")
    refs, skipped = scan_sources(tmp_path, "images")
    assert [r.source_id for r in refs] == ["a.png", "b.tif", "f.tiff", "rgb.jpg"]
    assert [s.path for s in skipped] == ["readme.txt"] and "not an image file" in skipped[0].reason
    png, tif, flt, rgb = (read_source(r, tmp_path, INPUT) for r in refs)
    np.testing.assert_array_equal(png.array, a16)       # full 16-bit precision
    np.testing.assert_array_equal(tif.array, a16)
    assert png.source_dtype == np.uint16 and not png.is_volume
    assert flt.source_dtype == np.float32 and rgb.array.shape == (8, 8)
    m = compute_mapping(png.array, modality="other", mode="auto", source_dtype=png.source_dtype, is_image_file=True)
    assert (m.mode, m.low, m.high) == ("dtype", 0.0, 65535.0)
    assert compute_mapping(flt.array, modality="other", mode="auto", source_dtype=flt.source_dtype,
                           is_image_file=True).mode == "minmax"
    rgb_in = dict(INPUT, color="rgb")
    assert read_source(refs[3], tmp_path, rgb_in).array.shape == (8, 8, 3)


def test_missing_input_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="input.path.*does not exist"):
        scan_sources(tmp_path / "nope", "images")


def test_truncated_image_is_a_source_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    refs, _ = scan_sources(tmp_path, "images")
    with pytest.raises(SourceError, match="bad.png"):
        read_source(refs[0], tmp_path, INPUT)


def test_dicom_samples_rescale_to_hu_and_skip_non_dicom(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    refs, skipped = scan_sources(tmp_path, "dicom")
    assert len(refs) == 2 and [s.path for s in skipped] == ["notes.txt"]
    by_mod = {r.meta["modality"]: r for r in refs}
    ct = read_source(by_mod["CT"], tmp_path, INPUT)
    import pydicom

    ds = pydicom.dcmread(tmp_path / "ct.dcm")
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(ct.array[..., 0], expected)
    assert ct.modality == "CT" and ct.array.shape == (128, 128, 1) and ct.pixel_size_mm == float(ds.PixelSpacing[0])
    assert by_mod["CT"].meta["patient_id"] == "1CT1"
    mr = read_source(by_mod["MR"], tmp_path, INPUT)
    assert mr.modality == "MR"
    m = compute_mapping(mr.array, modality="MR", mode="auto")
    assert m.mode == "percentile" and m.working == "normalised" and m.low == mr.array.min()


def test_nifti_sample_volumes(tmp_path):
    refs, _ = scan_sources(os.path.join(NIBABEL_DATA, "anatomical.nii"), "nifti")
    src = read_source(refs[0], tmp_path, INPUT)
    assert src.is_volume and src.array.ndim == 3 and src.modality == "MR" and src.display_rot90
    assert src.info["voxel_size_mm"] == [2.0, 2.0, 2.0]
    refs, _ = scan_sources(os.path.join(NIBABEL_DATA, "example4d.nii.gz"), "nifti")
    second = read_source(refs[0], tmp_path, dict(INPUT, volume_index=1))
    assert second.array.shape == (128, 96, 24)
    with pytest.raises(SourceError, match="volume_index=5.*2 volumes"):
        read_source(refs[0], tmp_path, dict(INPUT, volume_index=5))


def test_ct_windows_and_single_8bit_conversion():
    hu = np.array([-2000.0, -160.0, 40.0, 240.0, 3000.0])
    m = compute_mapping(hu, modality="CT", mode="auto")
    assert (m.low, m.high, m.details["window"]) == (-160.0, 240.0, "abdomen")
    u8 = m.to_uint8(m.to_working(hu))
    assert u8.tolist() == [0, 0, 128, 255, 255]
    np.testing.assert_allclose(m.pixel_to_physical(u8[1:4]), [-160.0, 40.0 + 400 / 255 * 0.5, 240.0], atol=1.0)
    lung = compute_mapping(hu, modality="CT", mode="ct_window", window="lung")
    assert (lung.low, lung.high) == (-1350.0, 150.0)
    custom = compute_mapping(hu, modality="CT", mode="ct_window", window={"level": 0, "width": 100})
    assert (custom.low, custom.high, custom.unit) == (-50.0, 50.0, "HU")
    assert set(CT_WINDOWS) >= {"brain", "lung", "bone", "abdomen", "soft_tissue"}


def test_instruction_templates():
    t = load_templates()
    task, v = instructions_for([{"name": "bicubic_downsample", "scale": 4}], t, "CT", "slice")
    assert task == "super_resolution" and v[0] == "Super-resolve this CT slice by 4x"
    task, v = instructions_for([{"name": "rician_noise", "sigma": 0.05}], t, "MR", "image")
    assert task == "denoise" and v[0] == "Remove the noise from this MR image"
    task, v = instructions_for([{"name": "gaussian_noise", "sigma": 1}], t, "other", "image")
    assert v[0] == "Remove the noise from this image"
    task, v = instructions_for([{"name": "kspace_truncation", "scale": 2.0}, {"name": "rician_noise", "sigma": 0.1}],
                               t, "MR", "slice")
    assert task == "restore" and "super-resolve it by 2x and remove the noise" in v[0]


BASE = {"name": "x", "output_dir": "out", "input": {"kind": "images", "path": "in"},
        "degradations": [{"name": "gaussian_noise", "sigma": 0.01}]}


def with_(**changes):
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


@pytest.mark.parametrize("changes, match", [
    ({"input__kind": "png"}, r"'input.kind'.*'png'.*images, dicom, nifti"),
    ({"intensity__window": "lungs"}, r"'intensity.window'.*'lungs'.*abdomen"),
    ({"intensity__mode": "zscore"}, r"'intensity.mode'.*'zscore'"),
    ({"degradations": [{"name": "bicubic_downsample", "scale": 8}]}, r"degradations\[0\].scale.*8.*2, 3 or 4"),
    ({"degradations": [{"name": "slice_thickness", "factor": 2}]}, r"needs volumes.*input.kind 'images'"),
    ({"degradations": []}, r"'degradations'"),
    ({"splits__fractions": {"train": 0.5, "val": 0.2}}, r"'splits.fractions'.*summing to 1"),
    ({"splits__group_by": "study"}, r"'splits.group_by'.*'study'.*auto, subject, patient, regex, parent_dir, file .*need DICOM"),
    ({"input__sliceaxis": 1}, r"unknown config key 'input.sliceaxis'"),
    ({"name": "my-set"}, r"'name'.*'my-set'"),
    ({"instructions__task": "colorize"}, r"'instructions.task'.*'colorize'"),
])
def test_config_errors_name_key_value_and_allowed(changes, match):
    with pytest.raises(ConfigError, match=match):
        load_build_config(with_(**changes))


def test_config_volumetric_steps_first_and_paths(tmp_path):
    cfg = load_build_config(with_(input__kind="nifti", degradations=[
        {"name": "slice_thickness", "factor": 2}, {"name": "bicubic_downsample", "scale": 3}]), base_dir=tmp_path)
    assert [s.name for s in cfg.volume_steps] == ["slice_thickness"] and cfg.size_multiple() == 48
    assert cfg.output_dir == tmp_path / "out"
    with pytest.raises(ConfigError, match="must come before"):
        load_build_config(with_(input__kind="nifti", degradations=[
            {"name": "gaussian_noise", "sigma": 0.1}, {"name": "slice_thickness", "factor": 2}]))
    with pytest.raises(ConfigError, match="not found"):
        load_build_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("bits, value, high, note", [
    (None, 3000, 65535.0, True),       # 12-bit values in a 16-bit PNG: warned about
    (12, 3000, 4095.0, False),         # declared: scaled over 12 bits
    (None, 40000, 65535.0, False),     # full-range 16-bit data: no note
])
def test_integer_images_are_scaled_by_their_bit_depth(tmp_path, bits, value, high, note):
    tree(tmp_path / "imgs", ["p1/a.png", "p2/a.png"], dtype=np.uint16, value=value)
    cfg = cfg_for(tmp_path, splits={"fractions": {"train": 1.0}}, input={"bits_stored": bits})
    summary = build_dataset(cfg, progress=False)
    row = manifest(tmp_path / "out")[0]
    assert row["intensity"]["high"] == high and row["intensity"]["bits_stored"] == (bits or 16)
    assert any("maximum fits in 12 bits" in n for n in summary.notes) == note


@pytest.mark.parametrize("change, message", [
    ({"name": "1bad"}, "config key 'name'"),
    ({"seed": "x"}, "config key 'seed'"),
    ({"input": {"kind": "png"}}, "config key 'input.kind'"),
    ({"input": {"slice_step": 0}}, "config key 'input.slice_step'"),
    ({"input": {"bits_stored": 40}}, "config key 'input.bits_stored'"),
    ({"degradations": []}, "config key 'degradations'"),
    ({"splits": {"fractions": {"train": 0.5}}}, "config key 'splits.fractions'"),
    ({"splits": {"group_by": "study"}}, "config key 'splits.group_by'"),
    ({"output": {"rows_per_shard": 0}}, "config key 'output.rows_per_shard'"),
    ({"colour": "gray"}, "unknown config key 'colour'"),
])
def test_builder_config_errors_are_one_line(tmp_path, capsys, change, message):
    tree(tmp_path / "imgs", ["p1/a.png"])
    cfg = cfg_for(tmp_path)
    for k, v in change.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert data_main(["build", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
