"""The dry run on a user's own data: the builder's row groups, the preflight, the launch watch, and the dry-run
command the build prints (``bagel``: against the checkout named by BAGEL_ROOT; the run on a PNG folder to
``smoke: OK`` is tests/test_user_journey.py)."""
import os
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from bagel_sr.data import build_dataset
from bagel_sr.data.feeding import feed_note, row_group_size, rows_per_worker
from bagel_sr.smoke.watch import KEEP_PER_KIND, SmokeStop, watch
from bagel_tiny import bagel_root, requires_bagel

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_ct_pngs(root: pathlib.Path, patients: int = 3, slices: int = 2, size: int = 64) -> pathlib.Path:
    """``root/CT_exports/patientNN/sliceKKK.png``: 16-bit CT slices stored as HU + 1024 (a body, a bright spot)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    for p in range(patients):
        folder = root / "CT_exports" / f"patient{p + 1:02d}"
        folder.mkdir(parents=True)
        for k in range(slices):
            hu = np.full((size, size), -1000.0)
            body = ((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.3) ** 2 < 1
            hu[body] = 40 + rng.normal(0, 20, body.sum())
            hu[((yy - 0.4 - 0.02 * k) / 0.08) ** 2 + ((xx - 0.55) / 0.06) ** 2 < 1] = 700
            Image.fromarray((hu + 1024).astype(np.uint16)).save(folder / f"slice{k:03d}.png")
    return root / "CT_exports"


BUILD_YAML = """\
name: my_ct_sr
output_dir: my_sr
input: {kind: images, path: CT_exports, modality: CT, rescale: {slope: 1.0, intercept: -1024.0}}
intensity: {mode: ct_window, window: abdomen}
degradations: [{name: bicubic_downsample, scale: 4}]
splits: {fractions: {train: 0.67, val: 0.33}, group_by: parent_dir}
bagel:                        # no resize of 64-px slices (BAGEL's defaults would upscale them to 256 px)
  image_transform_args: {image_stride: 16, max_image_size: 64, min_image_size: 64}
  vit_image_transform_args: {image_stride: 14, max_image_size: 56, min_image_size: 56}
"""


def build_config(root: pathlib.Path, **bagel) -> dict:
    write_ct_pngs(root)
    cfg = yaml.safe_load(BUILD_YAML)
    cfg.update(output_dir=str(root / "my_sr"), splits={"fractions": {"train": 1.0}, "group_by": "parent_dir"})
    cfg["input"]["path"] = str(root / "CT_exports")
    cfg["bagel"] = bagel
    return cfg


# --------------------------------------------------------------------------------------------- the builder

def test_row_groups_are_sized_for_ranks_times_workers():
    assert row_group_size(6, 16, 2) == 3 and row_group_size(256, 16, 2) == 16 and row_group_size(1, 16, 8) == 1
    assert rows_per_worker([1], 1, 2, 1) == 0 and rows_per_worker([1], 2, 2, 1) == 1   # num_used_data repeats files
    assert rows_per_worker([3, 1], 2, 2, 2) == 1 and rows_per_worker([3, 1], 1, 2, 1) == 1
    assert feed_note([2], 1, 2, 1) is None
    assert "1 row group(s) for 2 rank(s) x 1 loader worker(s)" in feed_note([1], 1, 2, 1)


def test_the_build_feeds_the_dry_runs_ranks_and_says_when_it_cannot(tmp_path, monkeypatch):
    monkeypatch.setenv("BAGEL_ROOT", "/some/Bagel")
    summary = build_dataset(build_config(tmp_path), progress=False)       # 6 train pairs, default 2 ranks x 1 worker
    shard = next((tmp_path / "my_sr" / "parquet" / "train").glob("*.parquet"))
    assert pq.ParquetFile(shard).metadata.num_row_groups == 2              # rows_per_row_group 16 would give 1
    text = summary.format()
    assert "row group(s) for" not in text
    assert (f"python -m bagel_sr.smoke --bagel_root /some/Bagel --dataset_config_file {summary.dataset_config_file} "
            f"--bagel_sr_datasets {summary.registration_file}") in text
    written = (tmp_path / "my_sr" / "dataset_config.yaml").read_text()
    assert list(yaml.safe_load(written)) == ["unified_edit"] and "\n# vlm_sft:\n#   dataset_names:" in written
    example = yaml.safe_load("\n".join(line[2:] for line in written.splitlines() if line.startswith("#   ")
                                       or line == "# vlm_sft:"))
    assert example["vlm_sft"]["is_mandatory"] is True                      # the commented group is valid YAML

    small = build_dataset(build_config(tmp_path / "b", world_size=8, num_workers=1), progress=False)
    shard = next((tmp_path / "b" / "my_sr" / "parquet" / "train").glob("*.parquet"))
    assert pq.ParquetFile(shard).metadata.num_row_groups == 6
    assert "note: the train split has 6 row group(s) for 8 rank(s) x 1 loader worker(s)" in small.format()


def test_the_build_refuses_a_bad_world_size(tmp_path):
    (tmp_path / "build.yaml").write_text(BUILD_YAML)
    proc = subprocess.run([sys.executable, "-m", "bagel_sr.data", "build", "build.yaml", "--world_size", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == "error: --world_size 0: must be an integer >= 1"


def write_chat(folder: pathlib.Path, lines: int = 3) -> pathlib.Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "a.png")
    item = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                                {"from": "gpt", "value": "A gray square."}]}
    (folder / "chat.jsonl").write_text("".join(json.dumps(item) + "\n" for _ in range(lines)))
    return folder / "chat.jsonl"


def test_vlm_sft_from_adds_a_mandatory_text_group_that_registers_and_undoes(tmp_path):
    import types

    from bagel_sr.patches.datasets import register_built_datasets

    chat = write_chat(tmp_path / "chat")
    write_ct_pngs(tmp_path)
    (tmp_path / "build.yaml").write_text(BUILD_YAML)
    proc = subprocess.run([sys.executable, "-m", "bagel_sr.data", "build", "build.yaml", "--no-progress",
                           "--vlm_sft_from", str(chat)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "text group: vlm_sft 'my_ct_sr_chat' (3 chat lines" in proc.stdout
    config = yaml.safe_load((tmp_path / "my_sr" / "dataset_config.yaml").read_text())
    assert list(config) == ["unified_edit", "vlm_sft"] and config["vlm_sft"]["is_mandatory"] is True
    assert config["vlm_sft"]["dataset_names"] == ["my_ct_sr_chat"] and config["vlm_sft"]["num_used_data"] == [3]
    mod = types.ModuleType("data.dataset_info")
    mod.DATASET_INFO = {"vlm_sft": {"llava": {"data_dir": "x"}}}
    mod.DATASET_REGISTRY = {"unified_edit": object, "vlm_sft": object}
    with register_built_datasets(tmp_path / "my_sr" / "bagel_sr_dataset.yaml", mod):
        entry = mod.DATASET_INFO["vlm_sft"]["my_ct_sr_chat"]
        assert entry == {"data_dir": str(chat.parent), "jsonl_path": str(chat), "num_total_samples": 3}
        assert "llava" in mod.DATASET_INFO["vlm_sft"] and "my_ct_sr" in mod.DATASET_INFO["unified_edit"]
    assert mod.DATASET_INFO == {"vlm_sft": {"llava": {"data_dir": "x"}}}       # as before, the created group too


def test_a_bad_chat_set_is_refused_in_one_line_before_the_build(tmp_path):
    chat = write_chat(tmp_path / "chat")
    chat.write_text(chat.read_text() + '{"image": "missing.png", "conversations": [{"from": "gpt", "value": "x"}]}\n')
    write_ct_pngs(tmp_path)
    (tmp_path / "build.yaml").write_text(BUILD_YAML)
    proc = subprocess.run([sys.executable, "-m", "bagel_sr.data", "build", "build.yaml", "--vlm_sft_from", str(chat)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not (tmp_path / "my_sr").exists()
    assert proc.stderr.strip().splitlines()[-1] == (f"error: --vlm_sft_from {chat} line 4: image {chat.parent}/missing.png "
                                                    f"does not exist (set --vlm_sft_images to its folder)")


# ------------------------------------------------------------------------------------------ the launch watch

def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_spinning_loader_is_stopped_with_its_reason_and_a_small_log(tmp_path):
    log = tmp_path / "launch.log"
    spin = ("print('Training for 4 steps, starting at 0...', flush=True)\n"
            "while True: print('unified_edit repeat in rank-1 worker-0', flush=True)")
    started = time.time()
    with pytest.raises(SmokeStop) as stop:
        watch(_spawn(spin), log, stall_s=3, timeout_s=60)
    assert time.time() - started < 30
    message = str(stop.value)
    assert "no step for 3 s" in message and "'unified_edit repeat in rank-1 worker-0'" in message
    assert "fewer parquet row groups (or jsonl lines) than ranks x workers" in message and "--world_size" in message
    text = log.read_text()
    assert text.splitlines().count("unified_edit repeat in rank-1 worker-0") == KEEP_PER_KIND
    assert log.stat().st_size < 10_000
    assert "x unified_edit repeat in rank-1 worker-0" in text                 # the rest counted, not written


def test_steps_keep_a_launch_alive_and_a_silent_one_is_stopped(tmp_path):
    steps = ("import time\nprint('Training for 3 steps, starting at 0...', flush=True)\n"
             "for s in range(3):\n    time.sleep(1.2); print(f'(step={s:07d}) Train Loss mse: 1.0,', flush=True)")
    proc = _spawn(steps)
    watch(proc, tmp_path / "ok.log", stall_s=2.5, timeout_s=60)              # each step within the stall window
    assert proc.returncode == 0 and (tmp_path / "ok.log").read_text().count("(step=") == 3
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True); time.sleep(60)")
    hang = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    started = time.time()
    with pytest.raises(SmokeStop, match="no step for 3 s and nothing printed since: the launch hangs"):
        watch(hang, tmp_path / "hang.log", stall_s=1, timeout_s=60)               # silent set-up: 3 windows
    assert 3 <= time.time() - started < 20
    child = int((tmp_path / "hang.log").read_text().split()[0])
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"  # its child too


def test_too_long_samples_are_explained():
    from bagel_sr.smoke.watch import meaning_of

    assert "--max_num_tokens_per_sample" in meaning_of("skip a sample with length 901")


# ----------------------------------------------------------------------------------- the preflight, on BAGEL

def _plan(tmp_path, cfg_dir: pathlib.Path, user: list, nproc: int = 2, nproc_given: bool = False):
    from bagel_sr.patches.checkout import add_to_sys_path
    from bagel_sr.smoke.dry_run import DRY_RUN_FLAGS
    from bagel_sr.smoke.preflight import plan_dry_run

    add_to_sys_path(bagel_root())
    flags = [x for k, v in DRY_RUN_FLAGS.items() for x in (f"--{k}", v)] + ["--num_shard", str(nproc)]
    flags += ["--dataset_config_file", str(cfg_dir / "dataset_config.yaml"),
              "--bagel_sr_datasets", str(cfg_dir / "bagel_sr_dataset.yaml")] + user
    (tmp_path / "wd").mkdir(exist_ok=True)
    return plan_dry_run(flags, user, [], nproc, nproc_given, tmp_path / "wd")


@pytest.mark.bagel
@requires_bagel
def test_preflight_adapts_the_dry_runs_own_settings_and_says_so(tmp_path):
    build_dataset(build_config(tmp_path, world_size=1, image_transform_args={
        "image_stride": 16, "max_image_size": 512, "min_image_size": 256}), progress=False)   # 1 row group, 256 px
    plan = _plan(tmp_path, tmp_path / "my_sr", [])
    notes = "\n".join(plan.notes)
    assert plan.nproc == 1 and plan.flags[-6:-4] == ["--num_shard", "1"]
    assert "group 'unified_edit' has 1 row group(s) for 2 ranks x 1 worker(s)" in notes
    assert "no mandatory vlm_sft group" in notes and plan.extra[0] == "--register_chat"
    copy = yaml.safe_load((tmp_path / "wd" / "dataset_config.dry_run.yaml").read_text())
    assert copy["vlm_sft"]["is_mandatory"] is True and set(copy) == {"unified_edit", "vlm_sft"}
    # 256 px after the transform: 2 x 16x16 VAE tokens + 18x18 ViT patches + text, over the dry run's 640
    assert "your samples are up to" in notes
    limit = int(plan.flags[plan.flags.index("--max_num_tokens_per_sample", len(plan.flags) - 4) + 1])
    assert 2 * 256 + 18 * 18 + 8 < limit <= 2 * 256 + 18 * 18 + 8 + 128 + 64


@pytest.mark.bagel
@requires_bagel
def test_preflight_keeps_the_users_own_text_group(tmp_path):
    from bagel_sr.data.text_group import add_text_group

    summary = build_dataset(build_config(tmp_path), progress=False)
    add_text_group(summary.output_dir, summary.name, str(write_chat(tmp_path / "chat")))
    plan = _plan(tmp_path, tmp_path / "my_sr", [])
    assert plan.extra == [] and not any("vlm_sft" in note for note in plan.notes) and plan.nproc == 2
    assert plan.flags.count("--dataset_config_file") == 1                   # the user's config, not a copy


@pytest.mark.bagel
@requires_bagel
@pytest.mark.parametrize("user, nproc_given, named", [
    ([], True, "rebuild the set with `python -m bagel_sr.data build CONFIG --world_size 2 --num_workers 1 "
               "--overwrite` (smaller row groups), or pass --nproc 1"),
    (["--num_workers", "1"], False, "--world_size 2 --num_workers 1"),
    (["--max_num_tokens_per_sample", "40"], False, "every sample of group 'unified_edit' is at least"),
])
def test_preflight_stops_in_one_line_when_the_user_fixed_the_setting(tmp_path, user, nproc_given, named):
    build_dataset(build_config(tmp_path, world_size=1), progress=False)    # one row group of 6 pairs, 64 px
    with pytest.raises(SmokeStop) as stop:
        _plan(tmp_path, tmp_path / "my_sr", user, nproc=2, nproc_given=nproc_given)
    assert named in str(stop.value) and "\n" not in str(stop.value)


@pytest.mark.bagel
@requires_bagel
def test_preflight_counts_a_users_chat_lines_and_tokens(tmp_path):
    """A user's own mandatory vlm_sft group (a jsonl of one line) is kept, read and counted like BAGEL deals it."""
    import json

    from bagel_sr.patches.checkout import add_to_sys_path
    from bagel_sr.smoke.feed import read_feed

    add_to_sys_path(bagel_root())
    import data.transforms

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    line = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                {"from": "gpt", "value": "A CT slice."}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(line) + "\n")
    info = {"vlm_sft": {"my_chat": {"data_dir": str(tmp_path), "jsonl_path": str(tmp_path / "chat.jsonl"),
                                    "num_total_samples": 1}}}
    group = {"dataset_names": ["my_chat"], "is_mandatory": True, "num_used_data": [10], "weight": 1,
             "image_transform_args": {"image_stride": 14, "max_image_size": 56, "min_image_size": 56}}
    (feed,) = read_feed({"vlm_sft": group}, info, data.transforms.ImageTransform)
    assert (feed.kind, feed.units, feed.is_mandatory) == ("jsonl", 1, True)
    assert feed.per_worker(1, 1) == 1 and feed.per_worker(2, 1) == 0
    # 4x4 ViT patches; the answer's 11 bytes at most; plan: image + question + answer (2 tokens each)
    assert 16 + 2 * 2 < feed.min_tokens <= feed.max_tokens <= 16 + len("<image>\nWhat is it?A CT slice.") + 2 * 5
    (missing,) = read_feed({"vlm_sft": dict(group, dataset_names=["other"])}, info, data.transforms.ImageTransform)
    assert "not registered in DATASET_INFO['vlm_sft']" in missing.problems[0]


# -------------------------------------------------------------------------------------- the user's journey

@pytest.mark.bagel
@requires_bagel
def test_the_build_prints_the_readmes_dry_run_on_its_own_files(tmp_path):
    """The dry-run command the build prints names the set's own files and is the README's dry-run command (which
    tests/test_user_journey.py runs as written on a PNG folder, to smoke: OK)."""
    import docs_blocks

    write_ct_pngs(tmp_path)
    (tmp_path / "build.yaml").write_text(BUILD_YAML)
    env = dict(os.environ, BAGEL_ROOT=bagel_root())
    build = subprocess.run([sys.executable, "-m", "bagel_sr.data", "build", "build.yaml", "--no-progress"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    printed = [line for line in build.stdout.splitlines() if "python -m bagel_sr.smoke" in line]
    assert len(printed) == 1
    command = shlex.split(printed[0].split(": ", 1)[1])
    assert command[:3] == ["python", "-m", "bagel_sr.smoke"] and command[command.index("--bagel_root") + 1] == bagel_root()
    for flag in ("--dataset_config_file", "--bagel_sr_datasets"):
        assert pathlib.Path(command[command.index(flag) + 1]).is_file()
    readme = [c for b in docs_blocks.blocks(docs_blocks.REPO / "README.md") if b.mode == "run"
              for c in docs_blocks.commands(b.text) if "bagel_sr.smoke" in c]
    assert len(readme) == 1 and docs_blocks.bagel_cli(readme[0])[1] == docs_blocks.bagel_cli(" ".join(command))[1]
