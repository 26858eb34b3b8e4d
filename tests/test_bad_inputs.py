"""Bad input, reruns and stale state, table-driven: each case names what a user did and the one-line message
(or count) they must get. Covers the wrapper's early checks and the builder's."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bagel_sr.data import build_dataset
from bagel_sr.data.__main__ import main as data_main
from bagel_sr.errors import UserError, cli_main
from bagel_sr.embedded import infer as embedded_infer
from bagel_sr.eval import ablate, evaluate, infer
from bagel_sr.outputs import LEDGER, claim
from bagel_sr.monitoring import NoImageWatch
from bagel_sr.names import check_names
from bagel_sr.patches.datasets import dataset_config_names


def png(path, value=100, size=(32, 32), dtype=np.uint8, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    span = 1000 if dtype == np.uint16 else 0              # 16-bit: values value .. value + ~1000
    arr = (value + rng.integers(0, 20, size) + np.arange(size[1]) * span // size[1]).astype(dtype)
    Image.fromarray(arr).save(path)


def tree(root, rels, dtype=np.uint8, value=100):
    for i, rel in enumerate(rels):
        png(root / rel, value=value, dtype=dtype, seed=i)


def cfg_for(tmp, inp="imgs", out="out", **extra):
    cfg = {"name": "t", "output_dir": str(tmp / out), "seed": 3, "input": {"kind": "images", "path": str(tmp / inp)},
           "degradations": [{"name": "bicubic_downsample", "scale": 2}],
           "splits": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}}}
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def manifest(out):
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def splits_of_subjects(rows, subject):
    seen = {}
    for r in rows:
        seen.setdefault(subject(r["source"]["path"]), set()).add(r["split"])
    return seen


# ---------------------------------------------------------------------------------------------- 1. splits by subject

BIDS = [f"sub-0{s}/ses-{e}/anat/sub-0{s}_ses-{e}_T1w.png" for s in (1, 2, 3, 4) for e in (1, 2)]
PATIENTS = [f"patient0{p}/series{s}/img{i}.png" for p in (1, 2, 3, 4) for s in (1, 2) for i in (1,)]


@pytest.mark.parametrize("layout, subject, field", [
    (BIDS, lambda p: p.split("/")[0], "bids_subject"),
    (PATIENTS, lambda p: p.split("/")[0], "subject_folder"),
])
def test_default_split_keeps_each_subject_in_one_split(tmp_path, layout, subject, field):
    tree(tmp_path / "imgs", layout)
    summary = build_dataset(cfg_for(tmp_path), progress=False)
    rows = manifest(tmp_path / "out")
    assert all(len(s) == 1 for s in splits_of_subjects(rows, subject).values())
    assert {r["group_by"] for r in rows} == {field} and summary.group_fields == {field: 4}
    assert f"groups keyed by: {field} (4)" in summary.format()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["groups_keyed_by"] == {field: 4}


def test_first_folder_is_the_fallback_group(tmp_path):
    tree(tmp_path / "imgs", [f"site{k}/a/x{i}.png" for k in (1, 2) for i in (1, 2)] + ["loose.png"])
    summary = build_dataset(cfg_for(tmp_path, splits={"fractions": {"train": 1.0}}), progress=False)
    assert summary.group_fields == {"file": 1, "top_folder": 2}


@pytest.mark.parametrize("layout, regex, subject", [
    (PATIENTS, r"(series\d)", "patient0"),                 # a regex on the series: patients leak
    (BIDS, r"(ses-\d)", "sub-0"),                           # grouping by session: subjects leak
])
def test_a_grouping_that_leaks_subjects_is_refused(tmp_path, layout, regex, subject):
    tree(tmp_path / "imgs", layout)
    cfg = cfg_for(tmp_path, splits={"group_by": "regex", "group_regex": regex,
                                    "fractions": {"train": 0.5, "val": 0.5, "test": 0.0}})
    with pytest.raises(UserError, match=f"subject '{subject}.*would be in two splits"):
        build_dataset(cfg, progress=False)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


@pytest.mark.parametrize("inp, out, message", [
    ("imgs", "imgs/built", "'output_dir'.*lies inside input.path"),
    ("data/imgs", "data", "'input.path'.*lies inside output_dir"),
    ("imgs", "imgs", "lies inside input.path"),
])
def test_nested_input_and_output_are_refused(tmp_path, inp, out, message):
    tree(tmp_path / inp, ["p1/a.png", "p2/a.png"])
    with pytest.raises(UserError, match=message):
        build_dataset(cfg_for(tmp_path, inp=inp, out=out), progress=False)


# ------------------------------------------------------------------------------------- 2. non-finite is a failure

def _eval_folders(tmp, bad):
    refs, outs = tmp / "r", tmp / "o"
    refs.mkdir(exist_ok=True)
    outs.mkdir(exist_ok=True)
    for i in range(3):
        r = np.random.default_rng(i).random((16, 16))
        np.save(refs / f"a{i}.npy", r)
        o = r + 0.01
        if i in bad:
            o[2, 3] = np.nan if i % 2 else np.inf
        np.save(outs / f"a{i}.npy", o)
    return refs, outs


@pytest.mark.parametrize("bad, extra, rc, failed", [
    ((1,), [], 1, 1),                        # one NaN output: exit 1, named
    ((0, 1, 2), [], 1, 3),                   # every output non-finite: the same message, no KeyError
    ((1,), ["--allow_nonfinite"], 0, 1),     # accepted on request, still counted
    ((), [], 0, 0),
])
def test_evaluate_counts_and_refuses_nonfinite_outputs(tmp_path, capsys, bad, extra, rc, failed):
    refs, outs = _eval_folders(tmp_path, bad)
    argv = ["--outputs", str(outs), "--references", str(refs), "--data_range", "1", "--out", str(tmp_path / "rep"),
            "--no_progress", "--n_boot", "50", *extra]
    assert cli_main(evaluate.main, argv) == rc
    err = capsys.readouterr().err
    if rc:
        line = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and f"{failed} output(s) hold NaN/Inf" in line[0]
        assert all(f"a{i}.npy" in line[0] for i in bad)
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert len(summary["nonfinite_outputs"]["A"]) == failed
    assert all(r["n_failed"] == failed and r["n"] == 3 - failed for r in summary["summary"])
    assert f"A: {failed}" in (tmp_path / "rep" / "summary.md").read_text()


def test_nonfinite_volume_slice_fails_the_volume(tmp_path):
    refs, outs = _eval_folders(tmp_path, (1,))
    for d in (refs, outs):
        for i in range(3):
            os.rename(d / f"a{i}.npy", d / f"vol_{i}.npy")
    res = evaluate.run_evaluation(outs, tmp_path / "rep", evaluate.EvalSettings(data_range=1.0), references=refs,
                                  volume_pattern=r"(?P<volume>vol)_(?P<slice>\d)", n_boot=50, progress=False,
                                  allow_nonfinite=True)
    assert res["unit"] == "volume" and bool(res["per_volume"]["nonfinite"].iloc[0])
    assert res["summary"]["n_failed"].eq(1).all() and res["summary"]["n"].eq(0).all()


def test_paired_comparison_scores_a_failure_as_a_loss(tmp_path):
    refs, outs = _eval_folders(tmp_path, (1,))
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        np.save(good / f"a{i}.npy", np.load(refs / f"a{i}.npy") + 0.01)
    res = evaluate.run_evaluation(outs, tmp_path / "rep", evaluate.EvalSettings(data_range=1.0), references=refs,
                                  compare=good, n_boot=50, progress=False, allow_nonfinite=True)
    psnr = res["comparison"].set_index("metric").loc["psnr"]
    assert psnr["n"] == 3 and psnr["n_b_higher"] == 1 and psnr["n_ties"] == 2 and psnr["mean_diff"] < 0


# ------------------------------------------------------------------------------------ 3. only delete what we wrote

def test_builder_overwrite_keeps_a_users_file(tmp_path):
    tree(tmp_path / "imgs", ["p1/a.png", "p2/a.png", "p3/a.png", "p4/a.png"])
    build_dataset(cfg_for(tmp_path), progress=False)
    (tmp_path / "out" / "my_notes.txt").write_text("keep")
    (tmp_path / "out" / "heldout" / "mine.png").write_bytes(b"keep")
    build_dataset(cfg_for(tmp_path), overwrite=True, progress=False)
    assert (tmp_path / "out" / "my_notes.txt").read_text() == "keep"
    assert (tmp_path / "out" / "heldout" / "mine.png").read_bytes() == b"keep"
    assert (tmp_path / "out" / "manifest.jsonl").is_file()


def test_ledger_overwrite_deletes_only_listed_files(tmp_path):
    led, resumed = claim(tmp_path / "o", "tool", {"a": 1})
    led.record("x.png").write_text("ours")
    (tmp_path / "o" / "user.txt").write_text("theirs")
    with pytest.raises(UserError, match="other settings.*a: 1 then, 2 now.*--overwrite"):
        claim(tmp_path / "o", "tool", {"a": 2})
    claim(tmp_path / "o", "tool", {"a": 2}, overwrite=True)
    assert not (tmp_path / "o" / "x.png").exists() and (tmp_path / "o" / "user.txt").read_text() == "theirs"
    assert not resumed and claim(tmp_path / "o", "tool", {"a": 2})[1]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--steps", "-5"], "--steps -5: expected an integer >= 1"),
    (["--batch_size", "0"], "--batch_size 0: expected an integer >= 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
    (["--t2i_ratio", "1.5"], "--t2i_ratio 1.5: expected a number in [0, 1]"),
    (["--lr", "0"], "--lr 0.0: expected a finite number > 0"),
    (["--seeds", "0"], "--seeds 0: expected an integer >= 1"),
    (["--sample_steps", "0"], "--sample_steps 0: expected an integer >= 1"),
    (["--pixel_loss_datasets", "sr_pair"], "unknown data set 'sr_pair'; did you mean 'sr_pairs'?"),
])
def test_main_job_validates_flags_before_work(argv, message):
    from bagel_sr.embedded import experiment

    with pytest.raises(UserError) as e:
        experiment.parse(argv)
    assert message in str(e.value)


def test_main_job_refuses_a_finished_output_dir(tmp_path):
    from bagel_sr.embedded import experiment

    args, pixel = experiment.parse(["--output_dir", str(tmp_path / "run"), "--steps", "3"])
    led = experiment.claim_output_dir(args, pixel)
    led.record("metrics.json").write_text("{}")
    led.mark_complete()
    (tmp_path / "run" / "user.txt").write_text("keep")
    with pytest.raises(UserError, match="holds a finished run; pass --overwrite"):
        experiment.claim_output_dir(args, pixel)
    args.overwrite = True
    experiment.claim_output_dir(args, pixel)
    assert not (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "user.txt").exists()
    with pytest.raises(UserError, match="not empty and was not written by bagel-sr"):
        experiment.claim_output_dir(*experiment.parse(["--output_dir", str(tmp_path / "run2"), "--steps", "3"])) \
            if (tmp_path / "run2").mkdir() or (tmp_path / "run2" / "x").write_text("x") else None


# ----------------------------------------------------------------------------------- 4. names checked against what exists

@pytest.mark.parametrize("given, known, message", [
    ({"ct_denose"}, ["ct_denoise", "t2i"], "unknown data set 'ct_denose'; did you mean 'ct_denoise'?"),
    ({"zzz"}, ["ct_denoise"], "unknown data set 'zzz' Known: ct_denoise"),
    ({"unified_edit"}, [], "Known: (none)"),
])
def test_unknown_dataset_names_are_refused(given, known, message):
    with pytest.raises(UserError) as e:
        check_names("--pixel_loss_datasets", given, known)
    assert message in str(e.value)


def test_known_names_pass_and_come_from_the_dataset_config(tmp_path):
    check_names("--pixel_loss_datasets", {"unified_edit"}, ["unified_edit", "t2i_pretrain"])
    check_names("--pixel_loss_datasets", None, [])
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"unified_edit": {}, "t2i_pretrain": {}}))
    parsed = [types.SimpleNamespace(dataset_config_file=str(tmp_path / "d.yaml"))]
    assert sorted(dataset_config_names(parsed)) == ["t2i_pretrain", "unified_edit"]
    assert dataset_config_names([types.SimpleNamespace()]) is None


@pytest.mark.parametrize("images, weight, warns", [([0] * 8, 0.05, True), ([0, 0, 1, 0, 0, 0, 0, 0], 0.05, False),
                                                   ([0] * 8, 0.0, False), ([0] * 4, 0.05, False)])
def test_no_image_admitted_warns_once(images, weight, warns):
    watch = NoImageWatch(steps=5)
    with pytest.warns(RuntimeWarning, match="admitted no image in the first 5") if warns else _no_warning():
        msgs = [watch.observe(n, weight, "typo") for n in images]
    assert sum(m is not None for m in msgs) == int(warns)   # once only


class _no_warning:
    def __enter__(self):
        import warnings
        self.c = warnings.catch_warnings()
        self.c.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self.c.__exit__(*exc)


# ------------------------------------------------------------------------------------ 5. reruns that know what they resume

def _infer_inputs(tmp, n=4):
    for i in range(n):
        png(tmp / "in" / f"x{i}.png", value=10 * i, seed=i)


def _run(argv):
    return embedded_infer.main(argv)


def test_infer_rerun_with_other_settings_refuses_then_overwrite_redoes(tmp_path, monkeypatch):
    _infer_inputs(tmp_path)
    monkeypatch.setattr("bagel_sr.embedded.inference.embedded_restorer",
                        lambda run, num_timesteps, timestep_shift, seed: lambda im, text: im.rotate(num_timesteps),
                        raising=False)
    (tmp_path / "run").mkdir()
    base = ["--inputs", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--embedded_run", str(tmp_path / "run"),
            "--no_progress"]
    assert _run(base + ["--num_timesteps", "2"]) == (4, 0)
    (tmp_path / "out" / "user.txt").write_text("keep")
    with pytest.raises(UserError, match="other settings.*num_timesteps: 2 then, 3 now"):
        _run(base + ["--num_timesteps", "3"])
    (tmp_path / "run" / "weights.bin").write_bytes(b"new")        # other weights, same flags
    with pytest.raises(UserError, match="another checkpoint/input"):
        _run(base + ["--num_timesteps", "2"])
    assert _run(base + ["--num_timesteps", "3", "--overwrite"]) == (4, 0)
    assert (tmp_path / "out" / "user.txt").read_text() == "keep"
    assert _run(base + ["--num_timesteps", "3"]) == (0, 4)


def test_infer_refuses_a_foreign_folder(tmp_path):
    _infer_inputs(tmp_path, 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.png").write_bytes(b"x")
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="not empty and was not written by bagel-sr"):
        _run(["--inputs", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--embedded_run", str(tmp_path / "run")])


KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from PIL import ImageOps
    from bagel_sr.eval import infer
    from bagel_sr.outputs import claim
    src, out, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    jobs = infer.jobs_from_folder(src, None)
    ledger, _ = claim(out, "bagel_sr.eval.infer", {"k": 1})
    def restore(im, text):
        time.sleep(delay)
        return ImageOps.invert(im)
    print(infer.run_jobs(jobs, out, restore, progress=False, ledger=ledger), flush=True)
""")


def test_infer_killed_half_way_then_rerun_equals_an_uninterrupted_run(tmp_path):
    _infer_inputs(tmp_path, 6)
    script = tmp_path / "k.py"
    script.write_text(KILLABLE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, str(script), str(tmp_path / "in"), str(tmp_path / "ref"), "0"], check=True, env=env)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "in"), str(tmp_path / "out"), "0.4"], env=env)
    for _ in range(600):
        if len(list((tmp_path / "out").glob("x*.png"))) >= 2 if (tmp_path / "out").is_dir() else False:
            break
        import time
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((tmp_path / "out").glob("x*.png")))
    assert 2 <= done_before < 6
    subprocess.run([sys.executable, str(script), str(tmp_path / "in"), str(tmp_path / "out"), "0"], check=True, env=env)
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != LEDGER)
    assert names == [f"x{i}.png" for i in range(6)]
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_builder_resume_refuses_changed_inputs(tmp_path, monkeypatch):
    from bagel_sr.data import build as build_mod

    tree(tmp_path / "imgs", ["p1/a.png", "p2/a.png", "p3/a.png", "p4/a.png"])
    real, calls = build_mod.make_pairs, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(build_mod, "make_pairs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(cfg_for(tmp_path, output={"rows_per_shard": 1}), progress=False)
    monkeypatch.setattr(build_mod, "make_pairs", real)
    png(tmp_path / "imgs" / "p4" / "a.png", value=7, size=(48, 48))         # a file changed since
    with pytest.raises(UserError, match="inputs under .* changed since the interrupted build"):
        build_dataset(cfg_for(tmp_path, output={"rows_per_shard": 1}), progress=False)


# ----------------------------------------------------------------------------------- 6. one-line errors, exit code 2

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


@pytest.mark.parametrize("tool, argv_of, message", [
    ("evaluate", lambda t: ["--outputs", str(t / "nope"), "--references", str(t / "r"), "--out", str(t / "rep")],
     "not a folder: .*nope"),
    ("evaluate", lambda t: ["--outputs", str(t / "o"), "--manifest", str(t / "m.jsonl"), "--out", str(t / "rep")],
     "--manifest .*m.jsonl: no such file"),
    ("evaluate", lambda t: ["--outputs", str(t / "o"), "--references", str(t / "r"), "--out", str(t / "rep"),
                            "--n_boot", "0"], "--n_boot 0: expected an integer >= 1"),
    ("evaluate", lambda t: ["--outputs", str(t / "o"), "--references", str(t / "r"), "--out", str(t / "rep"),
                            "--data_range", "-1"], "--data_range -1.0: expected a finite number > 0"),
    ("evaluate", lambda t: ["--outputs", str(t / "o"), "--references", str(t / "r"), "--out", str(t / "rep"),
                            "--degradations", "{bad"], "--degradations is not JSON"),
    ("evaluate", lambda t: ["--outputs", str(t / "bad"), "--references", str(t / "r"), "--out", str(t / "rep"),
                            "--data_range", "1", "--no_progress"], "image .*a0.png cannot be read"),
    ("infer", lambda t: ["--inputs", str(t / "nope"), "--out", str(t / "x")], "--inputs .*nope: no such file"),
    ("embedded-infer", lambda t: ["--inputs", str(t / "r"), "--out", str(t / "x"), "--embedded_run", str(t / "zz")],
     "--embedded_run .*zz: no such file or folder"),
    ("infer", lambda t: ["--inputs", str(t / "r"), "--out", str(t / "x"), "--num_timesteps", "0"],
     "--num_timesteps 0: expected an integer >= 1"),
    ("infer", lambda t: ["--inputs", str(t / "empty"), "--out", str(t / "x")], "no images"),
    ("data", lambda t: ["build", str(t / "none.yaml")], "build config file not found"),
])
def test_cli_user_errors_are_one_line_with_exit_2(tmp_path, capsys, tool, argv_of, message):
    refs, outs = _eval_folders(tmp_path, ())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a0.png").write_bytes(b"not a png")
    for i in (1, 2):
        np.save(tmp_path / "bad" / f"a{i}.npy", np.zeros((16, 16)))
    (tmp_path / "empty").mkdir()
    main = {"evaluate": evaluate.main, "infer": infer.main, "embedded-infer": embedded_infer.main, "data": data_main}[tool]
    rc = main(argv_of(tmp_path)) if tool == "data" else cli_main(main, argv_of(tmp_path))
    assert rc == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    import re
    assert len(err) == 1 and re.search(message, err[0]), err


# --------------------------------------------------------------------------------------------------- 7. bit depth

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


# ---------------------------------------------------------------------------------- the builder's existing checks

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
