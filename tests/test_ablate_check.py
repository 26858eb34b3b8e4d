"""``ablate plan`` refuses what ``ablate report`` would refuse, before anything is written or trained; expands
``$VARS``/``~`` in its commands; its default base command runs from any folder; it prints its progress."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bagel_sr.errors import cli_main
from bagel_sr.eval import ablate
from bagel_sr.eval.ablate_check import expand, help_command

FAKE_TRAIN = "import argparse; p = argparse.ArgumentParser(); p.add_argument('--pixel_loss_weight'); p.parse_args()\n"
FAKE_INFER = ("import argparse; p = argparse.ArgumentParser(); [p.add_argument(f) for f in "
              "('--split', '--out', '--start_t')]; p.parse_args()\n")


def manifest(tmp, unit="HU", splits=("train", "test", "test")):
    """A builder-like manifest.jsonl: train rows without held-out PNGs, test rows with them."""
    (tmp / "ct" / "heldout").mkdir(parents=True)
    rows = []
    for i, split in enumerate(splits):
        row = {"pair_id": f"p{i}", "split": split, "group": f"patient{i}",
               "intensity": {"unit": unit, "low": -160.0, "high": 240.0, "working": "physical" if unit == "HU"
                             else "normalised"}}
        if split != "train":
            for kind in ("hr", "lr"):
                Image.fromarray(np.full((16, 16), 100, np.uint8)).save(tmp / "ct" / "heldout" / f"{kind}{i}.png")
            row["heldout"] = {"hr": f"heldout/hr{i}.png", "lr": f"heldout/lr{i}.png"}
        rows.append(row)
    (tmp / "ct" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def grid(tmp, **overrides):
    (tmp / "train.py").write_text(FAKE_TRAIN)
    (tmp / "infer.py").write_text(FAKE_INFER)
    cfg = {"base_command": [sys.executable, str(tmp / "train.py")], "output_root": str(tmp / "runs"),
           "grid": {"pixel_loss_weight": [0.0, 0.05]}, "infer_grid": {"start_t": [1.0, 0.3]},
           "eval": {"infer_command": f"{sys.executable} {tmp / 'infer.py'} --split test --out {{outputs}}",
                    "manifest": str(tmp / "ct" / "manifest.jsonl"), "split": "test", "hu_window": [40, 400],
                    "baseline": "weight0.0"}}
    for key, value in overrides.items():
        if key.startswith("eval__"):
            if value is None:
                cfg["eval"].pop(key[6:])
            else:
                cfg["eval"][key[6:]] = value
        else:
            cfg[key] = value
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("unit, overrides, message", [
    ("HU", {"eval__hu_windw": [40, 400]}, r"eval: unknown keys \['hu_windw'\]"),
    ("HU", {"eval__manifest": None}, "the report needs eval.references .* or eval.manifest"),
    ("raw", {}, r"--hu_window needs CT values in HU, .* unit 'raw'"),
    ("HU", {"eval__split": None}, "rows of split train have no reference images.*set eval.split: test"),
    ("HU", {"eval__split": "val"}, "no rows with split 'val'|differs from --split test"),
    ("HU", {"eval__baseline": "weight0.1"}, "eval.baseline 'weight0.1' names no run"),
    ("HU", {"sort_by": "psnr_db"}, "sort_by 'psnr_db' is not a metric"),
    ("HU", {"plots": ["num_samples"]}, "plots: 'num_samples' is not a flag the grid varies"),
    ("HU", {"eval__n_boot": 0}, r"eval.n_boot 0: expected an integer >= 1"),
    ("HU", {"eval__convention": "fastmri"}, "fastMRI convention .* drop --data_range and --hu_window"),
    ("HU", {"eval__hu_window": [40]}, r"eval.hu_window \[40\]: expected \[level, width\]"),
    ("HU", {"eval__lesions": "ct/lesions.json"}, r"eval.lesions 'ct/lesions.json': no such file"),
])
def test_plan_refuses_what_report_would_refuse_before_writing(tmp_path, capsys, unit, overrides, message):
    import re

    manifest(tmp_path, unit)
    assert cli_main(ablate.main, ["plan", str(grid(tmp_path, **overrides)), "--no_flag_check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and re.search(message, err[-1]), err[-1]
    assert not (tmp_path / "runs").exists()


def test_plan_checks_flags_and_data_with_progress_and_expands_vars(tmp_path, capsys, monkeypatch):
    manifest(tmp_path)
    monkeypatch.setenv("MY_INFER", str(tmp_path / "infer.py"))
    path = grid(tmp_path, eval__infer_command=f"{sys.executable} $MY_INFER --split test --out {{outputs}}")
    assert cli_main(ablate.main, ["plan", str(path)]) == 0
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if line.startswith("ablate plan [")]
    assert len(steps) >= 4 and "flags accepted" in steps[-1] and any("eval block matches the data (2 ref" in s
                                                                     for s in steps)
    script = (tmp_path / "runs" / "weight0.05" / "command.sh").read_text()
    assert str(tmp_path / "infer.py") in script and "$MY_INFER" not in script
    monkeypatch.delenv("MY_INFER")
    assert cli_main(ablate.main, ["plan", str(path), "--overwrite"]) == 2
    assert "eval.infer_command uses $MY_INFER, which is not set" in capsys.readouterr().err


def test_expand_and_torchrun_help_command(monkeypatch):
    monkeypatch.setenv("BAGEL_ROOT", "/data/Bagel")
    home = os.path.expanduser("~")
    assert (expand("run --a $BAGEL_ROOT --b ~/x --c=~/y --d a~b")
            == f"run --a /data/Bagel --b {home}/x --c={home}/y --d a~b")
    assert expand(["run", "${BAGEL_ROOT}/m", "~"]) == ["run", "/data/Bagel/m", home]
    words = help_command("torchrun --nproc_per_node 8 --standalone -m bagel_sr.train.main_sr_pixel_loss --bagel_root /b --x 1")
    assert words == [sys.executable, "-m", "bagel_sr.train.main_sr_pixel_loss", "--bagel_root", "/b", "--x", "1"]
    assert help_command("torchrun --nproc-per-node=2 train/x.py --a 1") == [sys.executable, "train/x.py", "--a", "1"]
    assert help_command("python train/x.py") == ["python", "train/x.py"]


def test_default_base_command_runs_from_any_folder(tmp_path, monkeypatch):
    """No base_command, started outside the repository: the wrapper module answers --help (the embedded default)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BAGEL_ROOT", raising=False)
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"grid": {"pixel_loss_weight": [0.0]},
                                                     "output_root": "runs"}))
    runs = ablate.plan("g.yaml", progress=False)
    assert runs[0].train_command.startswith(f"{sys.executable} -m bagel_sr.train.main_sr_pixel_loss --pixel_loss_weight 0.0")
    assert Path(tmp_path / "runs" / "weight0.0" / "command.sh").is_file()


def test_flags_of_a_checkout_refused_by_the_embedded_default_say_to_name_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BAGEL_ROOT", raising=False)
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"grid": {"pixel_loss_weight": [0.0]}, "output_root": "runs",
                                                     "common_flags": {"total_steps": 2000}}))
    assert cli_main(ablate.main, ["plan", "g.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--total_steps is not accepted" in err and "set BAGEL_ROOT or add --bagel_root PATH" in err
