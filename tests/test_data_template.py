"""``python -m bagel_sr.data template``: a packaged build config with the user's paths, ready to build."""
import subprocess
import sys
from pathlib import Path

import pytest

from bagel_sr.data import template
from bagel_sr.data.config import load_build_config
from bagel_sr.errors import UserError


@pytest.mark.parametrize("name", sorted(template.available()))
def test_every_template_renders_with_the_given_paths_and_validates(tmp_path, name):
    (tmp_path / "scans").mkdir()
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    text = template.render(name, str(tmp_path / "scans"), str(tmp_path / "out"), str(config_dir))
    (config_dir / "c.yaml").write_text(text)
    cfg = load_build_config(config_dir / "c.yaml")
    assert (cfg.base_dir / cfg.data["input"]["path"]).resolve() == (tmp_path / "scans").resolve()
    assert (cfg.base_dir / cfg.data["output_dir"]).resolve() == (tmp_path / "out").resolve()
    original = template.available()[name].read_text()
    assert text.count("#") == original.count("#")  # comments kept


def test_unknown_template_and_missing_input_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"template 'ct_denoise_dicm' does not exist; did you mean 'ct_denoise_dicom'"):
        template.render("ct_denoise_dicm")
    with pytest.raises(UserError, match="--input .*nope: no such file or folder"):
        template.render("ct_denoise_dicom", str(tmp_path / "nope"))


def test_cli_writes_the_file_once_and_prints_the_next_command(tmp_path):
    (tmp_path / "scans").mkdir()
    argv = [sys.executable, "-m", "bagel_sr.data", "template", "mr_sr_nifti", "--input", "scans", "--output", "out",
            "-o", "cfg/mr.yaml"]
    first = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "python -m bagel_sr.data build cfg/mr.yaml" in first.stdout
    assert "path: ../scans" in (tmp_path / "cfg" / "mr.yaml").read_text()
    again = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().startswith("error: -o cfg/mr.yaml exists")
    listing = subprocess.run(argv[:4], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and all(name in listing.stdout for name in template.available())
