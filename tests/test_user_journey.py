"""A new user's path, from an empty folder with their PNG folder made at test time, each step as docs/eval.md writes
it: build (the PNG template) -> evaluate --hu_window on the builder's manifest (outputs of a trivial restoration:
the degraded inputs) -> ablate plan with the documented YAML (the checkout of BAGEL_ROOT; plan trains nothing)."""
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from user_pngs import make_ct_pngs

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "eval.md"
MARKER = "<!-- user-journey: ablation.yaml"


def marked_yaml(path: Path) -> str | None:
    """The YAML block that follows the marker in ``path`` (None when the file has no marker)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if MARKER not in text:
        return None
    found = re.search(re.escape(MARKER) + r".*?\n```yaml\n(.*?)\n```", text, re.S)
    assert found, f"{path}: the marker {MARKER!r} is not followed by a ```yaml block"
    return found.group(1) + "\n"


def documented_yaml() -> str:
    """The block users copy: docs/eval.md's, which the README's (if it carries the marker) must equal."""
    text = marked_yaml(DOCS)
    assert text, f"{DOCS} lost the block marked {MARKER!r}"
    readme = marked_yaml(REPO / "README.md")
    assert readme in (None, text), "README.md's marked ablation YAML differs from docs/eval.md's; keep them equal"
    return text


def sh(cwd: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m ...`` as a user types it in a shell whose ``python`` is this interpreter."""
    env = {**os.environ, **(env or {})}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["python", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def build_and_evaluate(tmp: Path) -> None:
    make_ct_pngs(tmp / "CT_exports")
    shutil.copyfile(str(resources.files("bagel_sr.data").joinpath("templates", "ct_png_hu.yaml")),
                    tmp / "ct_png_hu.yaml")
    res = sh(tmp, "-m", "bagel_sr.data", "build", "ct_png_hu.yaml")
    assert res.returncode == 0, res.stderr[-2000:]
    test_lr = sorted((tmp / "ct" / "heldout" / "test" / "lr").glob("*.png"))
    assert test_lr, "the build wrote no held-out test pairs"
    (tmp / "restored").mkdir()
    for f in test_lr:
        shutil.copyfile(f, tmp / "restored" / f.name)
    res = sh(tmp, "-m", "bagel_sr.eval.evaluate", "--outputs", "restored", "--manifest", "ct/manifest.jsonl",
             "--split", "test", "--hu_window", "40,400", "--out", "reports/ct", "--n_boot", "500")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = (tmp / "reports" / "ct" / "summary.md").read_text()
    assert "HU window level 40 / width 400" in summary and "mapped back to HU" in summary
    assert max(len(line) for line in res.stdout.splitlines()) <= 120  # the console table fits a terminal


@pytest.mark.bagel
def test_png_folder_to_evaluation_and_ablation_plan(tmp_path):
    root = os.environ.get("BAGEL_ROOT")
    if not root:
        pytest.skip("set BAGEL_ROOT to a BAGEL checkout to run")
    build_and_evaluate(tmp_path)
    text = documented_yaml()
    assert yaml.safe_load(text)["eval"]["hu_window"] == [40, 400]
    (tmp_path / "ablation.yaml").write_text(text)
    res = sh(tmp_path, "-m", "bagel_sr.eval.ablate", "plan", "ablation.yaml", env={"BAGEL_ROOT": root})
    assert res.returncode == 0, res.stderr[-3000:]
    progress = [line for line in res.stderr.splitlines() if line.startswith("ablate plan [")]
    assert any("training flags" in line for line in progress) and any("eval block matches" in line for line in progress)
    runs = tmp_path / "runs" / "ablation"
    script = (runs / "weight0.05" / "command.sh").read_text()
    assert f"--bagel_root {root}" in script and "$BAGEL_ROOT" not in script and "-m bagel_sr.patches.launch" in script
    assert "--checkpoint_dir" in script and "--total_steps 2000" in script
    assert sorted(p.name for p in (runs / "weight0.05" / "infer").iterdir()) == [
        "start_t=0.3,num_samples=1", "start_t=0.3,num_samples=4", "start_t=1.0,num_samples=1",
        "start_t=1.0,num_samples=4"]
    assert not list(runs.rglob("DONE")) and not list(runs.rglob("checkpoints"))  # plan trained nothing

    # what 'ablate run' leaves (simulated: trainings and inferences marked done, outputs = the degraded inputs):
    # the report the plan promised runs without a refusal, and reads well
    for run in runs.glob("weight*"):
        (run / "DONE").write_text("simulated\n")
        for variant in (run / "infer").iterdir():
            shutil.copytree(tmp_path / "ct" / "heldout" / "test" / "lr", run / "outputs" / variant.name)
            (variant / "DONE").write_text("simulated\n")
    res = sh(tmp_path, "-m", "bagel_sr.eval.ablate", "report", "ablation.yaml", "--n_boot", "200", "--no_progress",
             env={"BAGEL_ROOT": root})
    assert res.returncode == 0, res.stderr[-3000:]
    assert max(len(line) for line in res.stdout.splitlines()) <= 120 and "note: small sample" in res.stdout
    header = next(line for line in (runs / "report" / "report.md").read_text().splitlines() if line.startswith("| run"))
    assert header.split(" | ")[1:4] == ["pixel_loss_weight", "start_t", "num_samples"] and "dc_psnr" not in header


def test_documented_ablation_yaml_refuses_an_unset_bagel_root(tmp_path):
    """Without a checkout the plan stops at once, naming the variable to set (no --help is run)."""
    build_and_evaluate(tmp_path)
    (tmp_path / "ablation.yaml").write_text(documented_yaml())
    env = {k: v for k, v in os.environ.items() if k != "BAGEL_ROOT"}
    res = subprocess.run(["python", "-m", "bagel_sr.eval.ablate", "plan", "ablation.yaml"], cwd=tmp_path,
                         env={**env, "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: base_command uses $BAGEL_ROOT, which is not set")
    assert not (tmp_path / "runs").exists()
