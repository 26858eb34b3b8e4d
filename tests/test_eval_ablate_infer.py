"""ablate sweeps inference flags next to training flags: ``infer_grid`` (and per-run ``infer_flags``) gives inference
variants of one training; each training trains once, each variant writes its own outputs and is one report row;
the report puts PSNR, SSIM and the hallucination share side by side."""
import shlex
import sys
import textwrap

import numpy as np
import pytest
import yaml
from PIL import Image

from bagel_sr.errors import UserError, cli_main
from bagel_sr.eval import ablate

# Training stand-in: "weights" are the pixel-loss weight written to a file; every call is counted.
FAKE_TRAIN = textwrap.dedent("""
    import argparse, pathlib
    p = argparse.ArgumentParser()
    p.add_argument("--pixel_loss_weight", type=float, required=True); p.add_argument("--weights_file", required=True)
    a = p.parse_args()
    w = pathlib.Path(a.weights_file); w.parent.mkdir(parents=True, exist_ok=True)
    w.write_text(str(a.pixel_loss_weight))
    with open(w.parent / "train_count.txt", "a") as f:
        f.write("x")
""")

# Inference stand-in with infer's flags: outputs = reference + noise that shrinks with the weight, a lower start_t
# and more samples. Every call is counted next to its outputs folder; FAIL_ONCE makes one variant fail once.
FAKE_INFER = textwrap.dedent("""
    import argparse, pathlib, sys
    import numpy as np
    from PIL import Image
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", required=True); p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", required=True); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start_t", type=float, default=1.0); p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--aggregate", choices=("mean", "median"), default="mean")
    p.add_argument("--data_consistency", action="store_true")
    a = p.parse_args()
    out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"count_{out.name}.txt", "a") as f:
        f.write("x")
    fail = pathlib.Path(a.inputs).parent / "FAIL_ONCE"
    if a.start_t < 1 and a.num_samples > 1 and fail.exists():
        fail.unlink(); sys.exit(4)
    weight = float(pathlib.Path(a.checkpoint).read_text())
    sigma = 8 + 40 * a.start_t / (1 + 5 * weight) / a.num_samples ** 0.5
    rng = np.random.default_rng(a.seed)
    for ref in sorted(pathlib.Path(a.inputs).glob("*.png")):
        x = np.asarray(Image.open(ref), dtype=float)
        Image.fromarray(np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)).save(out / ref.name)
""")

VARIANTS = ["start_t=1.0,num_samples=1", "start_t=1.0,num_samples=4", "start_t=0.3,num_samples=1",
            "start_t=0.3,num_samples=4"]


def make_grid(tmp, **overrides):
    rng = np.random.default_rng(1)
    refs = tmp / "refs"
    refs.mkdir(exist_ok=True)
    for i in range(4):
        Image.fromarray(rng.integers(40, 200, (32, 32), dtype=np.uint8)).save(refs / f"p{i}.png")
    (tmp / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp / "fake_infer.py").write_text(FAKE_INFER)
    grid = {"name": "train x inference sweep", "base_command": [sys.executable, str(tmp / "fake_train.py")],
            "output_root": str(tmp / "runs"), "workdir": str(tmp),
            "common_flags": {"weights_file": "{run_dir}/weights.txt"},
            "grid": {"pixel_loss_weight": [0.0, 0.1]},
            "infer_grid": {"start_t": [1.0, 0.3], "num_samples": [1, 4]},
            "eval": {"infer_command": [sys.executable, str(tmp / "fake_infer.py"), "--inputs", str(refs),
                                       "--checkpoint", "{run_dir}/weights.txt", "--out", "{outputs}"],
                     "references": str(refs), "n_boot": 200, "grid_images": 1, "baseline": "weight0.0"}}
    grid.update(overrides)
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def gray(path):
    return np.asarray(Image.open(path), dtype=np.float64) / 255.0


def independent_metrics(outputs, refs):
    """Per image: PSNR (data range 1) and the share of pixels off by more than 0.1 of the range."""
    psnr, halluc = [], []
    for ref in sorted(refs.glob("*.png")):
        r, o = gray(ref), gray(outputs / ref.name)
        psnr.append(10 * np.log10(1.0 / np.mean((o - r) ** 2)))
        halluc.append(np.mean(np.abs(o - r) > 0.1))
    return np.array(psnr), np.array(halluc)


def test_plan_writes_one_training_and_one_inference_per_variant(tmp_path):
    infer = (f"{shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'fake_infer.py'))} --inputs refs "
             "--checkpoint {run_dir}/weights.txt --out {outputs}")
    grid = make_grid(tmp_path, runs=[{"name": "dc", "pixel_loss_weight": 0.05,
                                      "infer_flags": [{"start_t": 0.3, "data_consistency": True},
                                                      {"name": "stock", "data_consistency": False}]}])
    cfg = yaml.safe_load(grid.read_text())
    cfg["eval"]["infer_command"] = infer                      # the string form of the template
    grid.write_text(yaml.safe_dump(cfg, sort_keys=False))
    runs = ablate.plan(grid)                                  # flags checked against both --help texts
    assert [r.name for r in runs] == ["weight0.0", "weight0.1", "dc"]
    assert [v.name for v in runs[0].variants] == VARIANTS
    assert [v.name for v in runs[2].variants] == ["start_t=0.3,data_consistency=True", "stock"]
    root = tmp_path / "runs"
    script = (root / "weight0.1" / "command.sh").read_text()
    assert script.count("fake_train.py") == 1 and script.count("fake_infer.py") == 4
    lines = script.splitlines()
    train_at = next(i for i, ln in enumerate(lines) if "fake_train.py" in ln)
    infer_at = [i for i, ln in enumerate(lines) if "fake_infer.py" in ln]
    assert lines[train_at - 1].startswith(f"if [ ! -e {root / 'weight0.1' / 'DONE'} ]")  # trains unless trained
    assert train_at < min(infer_at)
    for name, at in zip(VARIANTS, infer_at):
        start_t, k = (part.split("=")[1] for part in name.split(","))
        words = shlex.split(lines[at])
        assert words[words.index("--out") + 1] == str(root / "weight0.1" / "outputs" / name)
        assert words[-4:] == ["--start_t", start_t, "--num_samples", k]
        assert words[words.index("--checkpoint") + 1] == str(root / "weight0.1" / "weights.txt")
        marker = shlex.quote(str(root / "weight0.1" / "infer" / name / "DONE"))
        assert lines[at - 1].startswith(f"if [ ! -e {marker} ]") and lines[at + 1].endswith(f"> {marker}")
    dc = (root / "dc" / "command.sh").read_text()
    dc_lines = [shlex.split(ln) for ln in dc.splitlines() if "fake_infer.py" in ln]
    assert dc_lines[0][-3:] == ["--start_t", "0.3", "--data_consistency"]  # infer's switch: bare, not "True"
    assert dc_lines[1][-2:] == ["--out", str(root / "dc" / "outputs" / "stock")]  # false: left out
    assert "--pixel_loss_weight 0.05" in dc
    commands = (root / "commands.txt").read_text()
    assert commands.count("command.sh") == 3 and commands.count("then inference") == 10


def test_train_once_per_run_resume_per_variant_and_report_side_by_side(tmp_path):
    grid = make_grid(tmp_path)
    root, refs = tmp_path / "runs", tmp_path / "refs"
    (tmp_path / "FAIL_ONCE").touch()                          # the 4th variant of the first run fails once
    assert ablate.main(["run", str(grid)]) == 1
    w0, w1 = root / "weight0.0", root / "weight0.1"
    assert (w0 / "train_count.txt").read_text() == "x" and (w0 / "DONE").exists() and (w0 / "FAILED").exists()
    assert [(w0 / "infer" / v / "DONE").exists() for v in VARIANTS] == [True, True, True, False]
    assert not w1.joinpath("DONE").exists()
    partial = ablate.build_report(grid, progress=False)
    assert sorted(partial["table"]["run"]) == sorted(f"weight0.0/{v}" for v in VARIANTS[:3])
    assert f"weight0.0/{VARIANTS[3]}" in partial["report"].read_text().split("Not finished (left out):")[1]

    assert ablate.main(["run", str(grid)]) == 0               # resume: no training twice, no variant twice
    for run in (w0, w1):
        assert (run / "train_count.txt").read_text() == "x"
        counts = [(run / "outputs" / f"count_{v}.txt").read_text() for v in VARIANTS]
        assert counts == (["x", "x", "x", "xx"] if run == w0 else ["x"] * 4)
        assert all((run / "outputs" / v / "p0.png").exists() for v in VARIANTS)

    res = ablate.build_report(grid, progress=False)
    table = res["table"].set_index("run")
    rows = [f"{r}/{v}" for r in ("weight0.0", "weight0.1") for v in VARIANTS]
    assert sorted(table.index) == sorted(rows)
    assert list(res["table"]["psnr"]) == sorted(res["table"]["psnr"], reverse=True)
    psnr, halluc = {}, {}
    for row in rows:
        run, variant = row.split("/")
        psnr[row], halluc[row] = independent_metrics(root / run / "outputs" / variant, refs)
        assert table.loc[row, "halluc_share"] == pytest.approx(halluc[row].mean(), abs=1e-12)
        assert table.loc[row, "psnr"] == pytest.approx(psnr[row].mean(), rel=1e-9)
        assert table.loc[row, "pixel_loss_weight"] == float(run[6:])
        assert (table.loc[row, "start_t"], table.loc[row, "num_samples"]) == tuple(
            float(p.split("=")[1]) for p in variant.split(","))
    assert len({round(v.mean(), 6) for v in halluc.values()}) == len(rows)  # every row differs
    # baseline names a training run: each row is paired with the baseline's row of the same inference variant
    for row in rows:
        base = "weight0.0/" + row.split("/")[1]
        assert table.loc[row, "psnr_vs_weight0.0"] == pytest.approx((psnr[row] - psnr[base]).mean(), rel=1e-9,
                                                                    abs=1e-9)

    md = res["report"].read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| run |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    at = cells.index("psnr [95% CI]")
    assert cells[at:at + 3] == ["psnr [95% CI]", "ssim_uniform7 [95% CI]", "halluc_share [95% CI]"]
    assert cells[:4] == ["run", "pixel_loss_weight", "start_t", "num_samples"]
    for row in rows:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row} |"))
        values = [c.strip() for c in line.strip("|").split("|")]
        assert values[at + 2].split(" [")[0] == f"{halluc[row].mean():.4g}"
    assert "halluc_share: share of pixels with |error| > 0.1 x data_range" in md
    assert (w1 / "eval" / VARIANTS[3] / "per_image.csv").exists()
    assert (root / "report" / "halluc_share_vs_start_t.png").exists()


def test_a_changed_inference_redoes_only_the_inference_and_a_new_variant_only_itself(tmp_path):
    grid = make_grid(tmp_path, grid={"pixel_loss_weight": [0.1]}, infer_grid={"start_t": [1.0, 0.3]},
                     eval=_eval(tmp_path, baseline=None))
    run = tmp_path / "runs" / "weight0.1"
    assert ablate.main(["run", str(grid)]) == 0
    cfg = yaml.safe_load(grid.read_text())
    cfg["eval"]["infer_command"] += ["--seed", "1"]           # every variant's command changes, training does not
    grid.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(UserError, match="infer/start_t=1.0 was made with other settings .*--overwrite"):
        ablate.main(["run", str(grid)])
    assert ablate.main(["run", str(grid), "--overwrite"]) == 0
    assert (run / "train_count.txt").read_text() == "x"
    assert [(run / "outputs" / f"count_start_t={t}.txt").read_text() for t in ("1.0", "0.3")] == ["xx", "xx"]
    assert "--seed 1" in (run / "command.sh").read_text()

    cfg["infer_grid"]["start_t"].append(0.6)                  # a new variant: only it runs
    grid.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert ablate.main(["run", str(grid)]) == 0
    assert (run / "train_count.txt").read_text() == "x"
    assert [(run / "outputs" / f"count_start_t={t}.txt").read_text() for t in ("1.0", "0.3", "0.6")] == [
        "xx", "xx", "x"]
    table = ablate.build_report(grid, progress=False)["table"]
    assert sorted(table["run"]) == sorted(f"weight0.1/start_t={t}" for t in ("1.0", "0.3", "0.6"))


def _bad(tmp, **overrides):
    return ["plan", str(make_grid(tmp, **overrides))]


def _eval(tmp, **extra):
    ev = yaml.safe_load(make_grid(tmp).read_text())["eval"]
    return {**ev, **extra}


@pytest.mark.parametrize("argv_of, message", [
    (lambda t: _bad(t, eval={"references": "refs"}), "infer_grid needs eval.infer_command"),
    (lambda t: _bad(t, infer_grid={"start_t": []}), "infer_grid: values of 'start_t' must be a non-empty list"),
    (lambda t: _bad(t, infer_grid={"start_t": 0.3}), "infer_grid: values of 'start_t' must be a non-empty list"),
    (lambda t: _bad(t, infer_grid=[0.3]), "'infer_grid' must be a mapping, got list"),
    (lambda t: _bad(t, infer_grid={"start_t": [{"a": 1}]}), r"value \{'a': 1\} \(dict\) of 'start_t' is not a flag"),
    (lambda t: _bad(t, infer_grid={1: [0.3]}), r"infer_grid: 1 \(int\) is not a flag name"),
    (lambda t: _bad(t, infer_grid=None, runs=[{"pixel_loss_weight": 0.2, "infer_flags": []}]),
     r"runs\[0\].infer_flags is an empty list"),
    (lambda t: _bad(t, infer_grid=None, runs=[{"pixel_loss_weight": 0.2, "infer_flags": 0.3}]),
     r"runs\[0\].infer_flags must be a mapping of flag -> value"),
    (lambda t: _bad(t, infer_grid={"checkpoint": ["a", "b"]}),
     "--checkpoint is swept and also written in eval.infer_command"),
    (lambda t: _bad(t, infer_grid={"start_tt": [0.3]}),
     "infer_grid: flag --start_tt is not accepted by eval.infer_command's parser; did you mean --start_t"),
    (lambda t: _bad(t, runs=[{"name": "again", "pixel_loss_weight": 0.1}]),
     "runs 'weight0.1' and 'again' train with the same flags"),
    (lambda t: _bad(t, eval=_eval(t, infer_command=[sys.executable, str(t / "nope.py"), "--out", "{outputs}"])),
     "eval.infer_command .*nope.py.* --help exited 2"),
])
def test_bad_inference_sweeps_are_refused_in_one_line_before_any_run(tmp_path, capsys, argv_of, message):
    assert cli_main(ablate.main, argv_of(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    progress = [line for line in err if line.startswith("ablate plan [")]  # plan's progress lines
    assert len(err) == len(progress) + 1 and err[-1].startswith("error: ")
    err = err[-1:]
    import re
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "runs").exists()


def test_planned_variants_parse_with_the_real_infer_parser(tmp_path):
    """The flags checked against ``bagel_sr.embedded.infer --help`` and appended to its command mean what the grid
    says (a true boolean is infer's bare switch)."""
    from bagel_sr.embedded import infer

    grid = make_grid(tmp_path, infer_grid={"start_t": [0.3], "num_samples": [4], "aggregate": ["median"],
                                           "data_consistency": [True, False]},
                     eval={"infer_command": [sys.executable, "-m", "bagel_sr.embedded.infer", "--inputs", "refs",
                                             "--embedded_run", "{run_dir}", "--out", "{outputs}"],
                           "references": str(tmp_path / "refs")})
    runs = ablate.plan(grid)
    assert [v.name for v in runs[0].variants] == [
        "start_t=0.3,num_samples=4,aggregate=median,data_consistency=True",
        "start_t=0.3,num_samples=4,aggregate=median,data_consistency=False"]
    for v, dc in zip(runs[1].variants, (True, False)):
        words = shlex.split(v.command)
        args = infer.parse_args(words[words.index("bagel_sr.embedded.infer") + 1:])
        assert (args.start_t, args.num_samples, args.aggregate, args.data_consistency) == (0.3, 4, "median", dc)
        assert args.out == str(tmp_path / "runs" / "weight0.1" / "outputs" / v.name)
        assert args.embedded_run == str(tmp_path / "runs" / "weight0.1")
