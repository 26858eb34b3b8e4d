"""User errors of every command-line tool (bagel_sr.errors.cli_main): one line starting with ``error:``, exit 2."""
import numpy as np
import pytest

from bagel_sr.data.__main__ import main as data_main
from bagel_sr.embedded import infer as embedded_infer
from bagel_sr.errors import cli_main
from bagel_sr.eval import evaluate, infer
from bagel_sr.testing.builder_inputs import eval_folders as _eval_folders


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
