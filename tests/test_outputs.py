"""bagel_sr.outputs: the one output ledger (claim / Ledger) of the builder's, infer's, the main job's and ablate's
folders: what a rerun resumes, what is refused, what --overwrite deletes."""
import pytest

from bagel_sr.outputs import LEDGER, Ledger, OutputFolderError, claim


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
