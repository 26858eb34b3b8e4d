"""A new user's path, as the README writes it: from an empty folder that holds only a folder of 16-bit PNG CT
slices made here, the README's ``run`` blocks in order (build with the PNG template, the dry run on that set,
evaluate --hu_window on the builder's manifest, ablate plan with the README's ablation.yaml); then ``ablate report``
on runs marked finished by hand (what ``ablate run`` would leave), which must read well."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import docs_blocks
from user_pngs import make_ct_pngs

README = docs_blocks.REPO / "README.md"


def readme_blocks():
    return [b for b in docs_blocks.blocks(README) if b.mode in ("run", "file")]


def shell_env(tmp: Path, **extra: str) -> dict:
    """An environment whose ``python`` is this interpreter (a wrapper script keeps a venv a venv)."""
    bin_dir = tmp / ".bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "BAGEL_ROOT"}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", **extra}


def readme_yaml() -> str:
    (block,) = [b for b in readme_blocks() if b.mode == "file" and b.reason == "ablation.yaml"]
    return block.text


@pytest.mark.bagel
def test_the_readme_path_runs_as_written_and_its_report_reads_well(tmp_path):
    root = os.environ.get("BAGEL_ROOT")
    if not root:
        pytest.skip("set BAGEL_ROOT to a BAGEL checkout to run")
    work = tmp_path / "study"
    make_ct_pngs(work / "CT_exports")
    env = shell_env(tmp_path, BAGEL_ROOT=root)
    outputs = []
    for block in readme_blocks():
        if block.mode == "file":
            (work / block.reason).write_text(block.text)
            continue
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        outputs.append(proc.stdout + proc.stderr)
        if "bagel_sr.smoke" in block.text:  # on the user's own data it passes (a stalled launch is stopped: FAILED)
            assert "smoke: OK" in outputs[-1], outputs[-1][-3000:]
        assert proc.returncode == 0, (f"README block at {block.where} exited {proc.returncode}:\n{block.text}\n"
                                      f"--- last output ---\n{outputs[-1][-3000:]}")
    text = "\n".join(outputs)
    assert "smoke: OK" in text                                    # the dry run on the user's own set
    summary = (work / "reports" / "input" / "summary.md").read_text()
    assert "HU window level 40 / width 400" in summary and "mapped back to HU" in summary
    assert yaml.safe_load(readme_yaml())["eval"]["hu_window"] == [40, 400]

    runs = work / "runs" / "ablation"                             # what plan wrote, and that it trained nothing
    script = (runs / "weight0.05" / "command.sh").read_text()
    assert f"--bagel_root {root}" in script and "$BAGEL_ROOT" not in script and "-m bagel_sr.train.main_sr_pixel_loss" in script
    assert "--checkpoint_dir" in script and "--total_steps 2000" in script
    assert sorted(p.name for p in (runs / "weight0.05" / "infer").iterdir()) == [
        "start_t=0.3,num_samples=1", "start_t=0.3,num_samples=4", "start_t=1.0,num_samples=1",
        "start_t=1.0,num_samples=4"]
    assert not list(runs.rglob("DONE")) and not list(runs.rglob("checkpoints"))
    assert any(line.startswith("ablate plan [") and "eval block matches" in line for line in text.splitlines())

    for run in runs.glob("weight*"):                              # as 'ablate run' leaves them (outputs = inputs)
        (run / "DONE").write_text("simulated\n")
        for variant in (run / "infer").iterdir():
            shutil.copytree(work / "ct" / "heldout" / "test" / "lr", run / "outputs" / variant.name)
            (variant / "DONE").write_text("simulated\n")
    res = subprocess.run(["python", "-m", "bagel_sr.eval.ablate", "report", "ablation.yaml", "--n_boot", "200",
                          "--no_progress"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert max(len(line) for line in res.stdout.splitlines()) <= 120 and "note: small sample" in res.stdout
    header = next(line for line in (runs / "report" / "report.md").read_text().splitlines() if line.startswith("| run"))
    assert header.split(" | ")[1:4] == ["pixel_loss_weight", "start_t", "num_samples"] and "dc_psnr" not in header


def test_the_readme_ablation_refuses_an_unset_bagel_root(tmp_path):
    """Without a checkout the plan stops at once, naming the variable to set (no --help is run)."""
    (tmp_path / "ablation.yaml").write_text(readme_yaml())
    res = subprocess.run(["python", "-m", "bagel_sr.eval.ablate", "plan", "ablation.yaml"], cwd=tmp_path,
                         env=shell_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: base_command uses $BAGEL_ROOT, which is not set")
    assert not (tmp_path / "runs").exists()
