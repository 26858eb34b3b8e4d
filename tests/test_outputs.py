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
