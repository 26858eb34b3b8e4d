"""Restoring with a run of the embedded demo (bagel_sr.embedded.infer): reruns resume, refuse other settings or
weights unless --overwrite, and never write into a folder bagel-sr did not write."""
import pytest

from bagel_sr.embedded import infer as embedded_infer
from bagel_sr.errors import UserError
from bagel_sr.testing.builder_inputs import infer_inputs as _infer_inputs


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
