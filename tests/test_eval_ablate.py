"""ablate: planning commands, a resumable sequential run, and a two-run report end to end on synthetic outputs."""
import shlex
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from bagel_sr.config import PixelLossConfig
from bagel_sr.embedded.experiment import parse
from bagel_sr.eval import ablate
from bagel_sr.outputs import Ledger
from bagel_sr.errors import cli_main
from bagel_sr.testing.ablate_grids import make_grid

# Stand-in for training + inference: writes outputs = reference + noise that shrinks with the pixel-loss weight.
FAKE_TRAIN = textwrap.dedent("""
    import argparse, pathlib, sys
    import numpy as np
    from PIL import Image
    p = argparse.ArgumentParser()
    for f in ("--pixel_loss_weight", "--pixel_loss_max_t"):
        p.add_argument(f, type=float)
    p.add_argument("--references"); p.add_argument("--output_dir"); p.add_argument("--use_ema")
    a = p.parse_args()
    out = pathlib.Path(a.output_dir); out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "count.txt", "a") as f:
        f.write("x")
    fail = pathlib.Path(a.references).parent / "FAIL_ONCE"
    if a.pixel_loss_weight > 0 and fail.exists():
        fail.unlink(); sys.exit(3)
    rng = np.random.default_rng(0)
    sigma = 20.0 / (1 + 20 * a.pixel_loss_weight)
    for ref in sorted(pathlib.Path(a.references).glob("*.png")):
        x = np.asarray(Image.open(ref), dtype=float)
        Image.fromarray(np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)).save(out / ref.name)
""")


def test_flags_and_names():
    words = ablate.flag_words({"pixel_loss_weight": 0.05, "--use_ema": True, "skip": None, "dims": [1, 2],
                               "checkpoint_dir": "{run_dir}/ckpt"}, {"run_dir": "R", "name": "n"})
    assert words == ["--pixel_loss_weight", "0.05", "--use_ema", "True", "--dims", "1", "2", "--checkpoint_dir",
                     "R/ckpt"]
    assert ablate.run_name({"pixel_loss_weight": 0.05, "pixel_loss_max_t": 0.3}) == "weight0.05_max_t0.3"
    cfg = {"grid": {"pixel_loss_weight": [0.0, 0.1], "pixel_loss_type": ["l1"]},
           "runs": [{"name": "ramp", "pixel_loss_schedule": "ramp"}]}
    names = [n for n, _ in ablate.expand_runs(cfg)]
    assert names == ["weight0.0_typel1", "weight0.1_typel1", "ramp"]
    with pytest.raises(ValueError, match="two runs are named"):
        ablate.expand_runs({"runs": [{"pixel_loss_weight": 1}, {"pixel_loss_weight": 1}]})
    runs = ablate.build_runs({**cfg, "output_root": "/x"})
    assert runs[0].train_command.startswith(ablate.DEFAULT_BASE_COMMAND + " --pixel_loss_weight 0.0")


def test_the_default_base_command_lists_its_flags(monkeypatch):
    """``plan`` reads the flags from the main job's --help (a bare % in a help text once made it exit 1); without a
    checkout that is the embedded experiment's."""
    import pathlib

    monkeypatch.delenv("BAGEL_ROOT", raising=False)
    repo = pathlib.Path(__file__).resolve().parents[1]
    known = ablate.target_flags([sys.executable] + ablate.DEFAULT_BASE_COMMAND.split()[1:], repo)
    assert {"pixel_loss_weight", "pixel_loss_max_t", "sample_modes", "steps", "seeds"} <= known


def test_bad_grid_is_a_clear_error(tmp_path):
    (tmp_path / "g.yaml").write_text("grids: {a: [1]}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        ablate.load_grid(tmp_path / "g.yaml")


@pytest.fixture
def synthetic_grid(tmp_path):
    rng = np.random.default_rng(1)
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(40, 200, (32, 32), dtype=np.uint8)).save(refs / f"p{i}.png")
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    grid = {"name": "synthetic sweep", "base_command": [sys.executable, str(script)],
            "output_root": str(tmp_path / "runs"), "workdir": str(tmp_path),
            "common_flags": {"references": str(refs), "output_dir": "{run_dir}/outputs", "use_ema": True},
            "grid": {"pixel_loss_weight": [0.0, 0.1], "pixel_loss_max_t": [0.3]},
            "eval": {"references": str(refs), "n_boot": 300, "grid_images": 2, "baseline": "weight0.0_max_t0.3"},
            "sort_by": "psnr", "plots": ["pixel_loss_weight", "pixel_loss_max_t"]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path, tmp_path


def test_ablation_end_to_end_with_resume(synthetic_grid):
    grid, tmp = synthetic_grid
    root = tmp / "runs"
    assert ablate.main(["plan", str(grid)]) == 0
    cmd = (root / "weight0.1_max_t0.3" / "command.sh").read_text()
    assert "--pixel_loss_weight 0.1" in cmd and "--use_ema True" in cmd and "set -euo pipefail" in cmd
    assert (root / "commands.txt").read_text().count("command.sh") == 2

    (tmp / "FAIL_ONCE").touch()  # the second run fails once: a partial grid
    assert ablate.main(["run", str(grid)]) == 1
    first, second = root / "weight0.0_max_t0.3", root / "weight0.1_max_t0.3"
    assert Ledger.finished(first) and not Ledger.finished(second) and (second / "FAILED").exists()
    partial = ablate.build_report(grid, progress=False)  # a report of a partial grid names what is missing
    assert list(partial["table"]["run"]) == ["weight0.0_max_t0.3"]
    assert "Not finished (left out): weight0.1_max_t0.3" in partial["report"].read_text()

    assert ablate.main(["run", str(grid)]) == 0  # resume: the finished run is skipped
    assert (first / "count.txt").read_text() == "x" and (second / "count.txt").read_text() == "xx"
    assert Ledger.finished(second) and not (second / "FAILED").exists()
    assert ablate.main(["run", str(grid)]) == 0 and (second / "count.txt").read_text() == "xx"

    res = ablate.build_report(grid, progress=False)
    table = res["table"]
    assert list(table["run"]) == ["weight0.1_max_t0.3", "weight0.0_max_t0.3"]  # sorted by PSNR, best first
    assert (table["psnr_lo"] < table["psnr"]).all() and (table["psnr"] < table["psnr_hi"]).all()
    assert table.set_index("run").loc["weight0.1_max_t0.3", "psnr_vs_weight0.0_max_t0.3"] > 0
    md = res["report"].read_text()
    assert md.index("| weight0.1_max_t0.3") < md.index("| weight0.0_max_t0.3") and "psnr [95% CI]" in md
    out = root / "report"
    for png in ("psnr_vs_pixel_loss_weight.png", "ssim_uniform7_vs_pixel_loss_max_t.png", "image_grid.png"):
        assert (out / png).stat().st_size > 1000 and png in md
    csv = pd.read_csv(out / "ablation.csv")
    assert list(csv["run"]) == list(table["run"])
    assert (first / "eval" / "per_image.csv").exists()


def test_a_changed_run_is_refused_and_overwrite_deletes_only_what_ablate_wrote(synthetic_grid):
    from bagel_sr.errors import UserError

    grid, tmp = synthetic_grid
    assert ablate.main(["run", str(grid)]) == 0
    run = tmp / "runs" / "weight0.1_max_t0.3"
    (run / "notes.txt").write_text("my notes")                      # a user's file next to ablate's
    cfg = yaml.safe_load(grid.read_text())
    cfg["common_flags"]["use_ema"] = False                           # the runs' command changes
    grid.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(UserError, match="weight0.0_max_t0.3 was made with other settings .*--overwrite"):
        ablate.main(["plan", str(grid)])
    assert Ledger.finished(run)                                   # nothing touched by the refusal
    assert ablate.main(["run", str(grid), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "my notes"             # not ours: kept
    assert (run / "count.txt").read_text() == "xx"                   # the target's own file: kept, run again
    assert "--use_ema False" in (run / "command.sh").read_text() and Ledger.finished(run)


def test_a_run_folder_with_foreign_files_is_refused(synthetic_grid):
    from bagel_sr.errors import UserError

    grid, tmp = synthetic_grid
    run = tmp / "runs" / "weight0.0_max_t0.3"
    run.mkdir(parents=True)
    (run / "results.csv").write_text("someone else's")
    with pytest.raises(UserError, match="not empty and was not written by bagel-sr"):
        ablate.main(["plan", str(grid), "--overwrite"])
    assert (run / "results.csv").read_text() == "someone else's" and not (run / "command.sh").exists()


def _grid(tmp, text):
    (tmp / "g.yaml").write_text(text)
    return str(tmp / "g.yaml")


TRAIN = "import argparse; p = argparse.ArgumentParser(); p.add_argument('--pixel_loss_weight'); p.parse_args()"


@pytest.mark.parametrize("argv_of, message", [
    (lambda t: ["plan", str(t / "none.yaml")], "grid .*none.yaml: no such file"),
    (lambda t: ["plan", _grid(t, "grid: [unclosed")], "is not valid YAML"),
    (lambda t: ["plan", _grid(t, "- a\n- b\n")], "expected a YAML mapping"),
    (lambda t: ["plan", _grid(t, "grid: [1, 2]\n")], "'grid' must be a mapping"),
    (lambda t: ["plan", _grid(t, "grdi: {a: [1]}\n")], "unknown keys"),
    (lambda t: ["plan", _grid(t, "grid: {pixel_loss_weight: 0.1}\n")], "must be a non-empty list"),
    (lambda t: ["plan", _grid(t, f"base_command: [{sys.executable!r}, {str(t / 'tr.py')!r}]\n"
                                 f"output_root: {str(t / 'runs')!r}\n"
                                 "grid: {pixel_loss_weigth: [0, 0.1]}\n")],
     "flag --pixel_loss_weigth is not accepted.*did you mean --pixel_loss_weight"),
    (lambda t: ["plan", _grid(t, f"base_command: [{sys.executable!r}, {str(t / 'missing.py')!r}]\n"
                                 f"output_root: {str(t / 'runs')!r}\ngrid: {{pixel_loss_weight: [0]}}\n")],
     "--help exited 2"),
])
def test_ablate_refuses_a_bad_plan_in_one_line_before_any_run(tmp_path, capsys, argv_of, message):
    (tmp_path / "tr.py").write_text(TRAIN)
    assert cli_main(ablate.main, argv_of(tmp_path)) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("ablate plan [")]  # plan's progress lines come first
    assert len(err) == 1 and err[0].startswith("error: ")
    import re
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "runs").exists()


SETS = ["l2:1", "l2:1,ssim:0.1", "l2:1,grad:0.1", "l2:1,lpl:0.05", "l2:1,ssim:0.1,grad:0.1,lpl:0.05"]


def test_a_grid_over_terms_plans_one_parsable_run_per_term_set():
    runs = ablate.build_runs({"grid": {"pixel_loss_terms": SETS, "seed": [0, 1]}, "output_root": "/x"})
    assert len({r.name for r in runs}) == len(SETS) * 2
    for run in runs:
        words = shlex.split(run.train_command)[len(shlex.split(ablate.DEFAULT_BASE_COMMAND)):]
        _, pixel = parse(words)
        assert pixel.term_weights == PixelLossConfig(terms=run.flags["pixel_loss_terms"]).term_weights
        assert ":" not in run.name and "," not in run.name


def test_ablate_report_console_fits_120_columns_and_notes_a_small_sample(tmp_path, capsys, figures):
    grid = make_grid(tmp_path)
    assert cli_main(ablate.main, ["run", str(grid), "--no_progress"]) == 0
    capsys.readouterr()
    assert cli_main(ablate.main, ["report", str(grid), "--no_progress"]) == 0
    console = capsys.readouterr().out
    lines = console.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert sum(line.startswith("weight0.") for line in lines) == 8  # every row shown
    assert "note: small sample: 4 image(s)" in console
    md = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert "**Note: small sample" in md
    variant = "start_t=0.3,num_samples=4"
    summary = (tmp_path / "runs" / "weight0.1" / "eval" / variant / "summary.md").read_text()
    assert f"# Evaluation of run weight0.1/{variant}" in summary
    plot = next(f for f in figures if f.axes[0].get_xlabel() == "pixel_loss_weight"
                and f.axes[0].get_ylabel().startswith("psnr"))
    assert len(plot.axes[0].containers) == 4 and plot.axes[0].get_legend() is not None
