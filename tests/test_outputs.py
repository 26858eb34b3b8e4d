"""bagel_sr.outputs: the one output ledger (claim / Ledger) of the builder's, infer's, the main job's and ablate's
folders: what a rerun resumes, what is refused, what --overwrite deletes, and a writer killed half way that resumes."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from bagel_sr.errors import UserError
from bagel_sr.outputs import LEDGER, Ledger, OutputFolderError, claim
from bagel_sr.testing.builder_inputs import infer_inputs as _infer_inputs


def _finished(folder, tool="tool", settings=None):
    ledger, resumed = claim(folder, tool, settings or {"a": 1})
    assert not resumed
    ledger.record("result.txt").write_text("r")
    ledger.mark_complete()
    return ledger


def test_a_finished_run_is_resumed_by_default(tmp_path):
    _finished(tmp_path / "o")
    ledger, resumed = claim(tmp_path / "o", "tool", {"a": 1})
    assert resumed and ledger.complete and ledger.written == ["result.txt"]


def test_refuse_finished_refuses_then_overwrite_deletes_only_the_runs_files(tmp_path):
    _finished(tmp_path / "o")
    (tmp_path / "o" / "user.txt").write_text("keep")
    with pytest.raises(OutputFolderError, match="holds a finished run; pass --again to redo it"):
        claim(tmp_path / "o", "tool", {"a": 1}, flag="--again", refuse_finished=True)
    ledger, resumed = claim(tmp_path / "o", "tool", {"a": 1}, overwrite=True, refuse_finished=True)
    assert not resumed and not ledger.complete and ledger.written == []
    assert not (tmp_path / "o" / "result.txt").exists() and (tmp_path / "o" / "user.txt").read_text() == "keep"
    assert Ledger.read(tmp_path / "o").complete is False and (tmp_path / "o" / LEDGER).is_file()


def test_an_unfinished_run_is_resumed_also_with_refuse_finished(tmp_path):
    ledger, _ = claim(tmp_path / "o", "tool", {"a": 1}, refuse_finished=True)
    ledger.record("part.txt").write_text("p")
    again, resumed = claim(tmp_path / "o", "tool", {"a": 1}, refuse_finished=True)
    assert resumed and again.written == ["part.txt"]


def test_a_script_marks_a_run_finished_as_the_ledger_does(tmp_path):
    """What ablate's command.sh runs: the shell test is false until the shell line marks the run finished, and the
    ledger then reads as finished."""
    import subprocess

    from bagel_sr.outputs import shell_is_finished, shell_mark_finished

    folder = tmp_path / "run dir"
    claim(folder, "tool", {})[0].record("log.txt")

    def sh(line):
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True).returncode

    assert sh(shell_is_finished(folder)) == 1 and sh(shell_is_finished(tmp_path / "none")) != 0
    assert not Ledger.finished(folder)
    assert sh(shell_mark_finished(folder)) == 0 and sh(shell_is_finished(folder)) == 0
    assert Ledger.finished(folder) and Ledger.read(folder).written == ["log.txt"]


def test_ledger_overwrite_deletes_only_listed_files(tmp_path):
    led, resumed = claim(tmp_path / "o", "tool", {"a": 1})
    led.record("x.png").write_text("ours")
    (tmp_path / "o" / "user.txt").write_text("theirs")
    with pytest.raises(UserError, match="other settings.*a: 1 then, 2 now.*--overwrite"):
        claim(tmp_path / "o", "tool", {"a": 2})
    claim(tmp_path / "o", "tool", {"a": 2}, overwrite=True)
    assert not (tmp_path / "o" / "x.png").exists() and (tmp_path / "o" / "user.txt").read_text() == "theirs"
    assert not resumed and claim(tmp_path / "o", "tool", {"a": 2})[1]


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
