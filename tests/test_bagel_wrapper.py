"""The wrapper against a real checkout: data-set registration by flag, --help with our flags, missing checkout."""
import sys

import numpy as np
import pytest
from PIL import Image

from bagel_sr.data import build_dataset
from bagel_sr.patches import checkout, launch
from bagel_tiny import bagel_root, import_bagel, requires_bagel


def test_without_a_checkout_the_wrapper_says_how_to_point_at_one(monkeypatch, capsys):
    monkeypatch.delenv("BAGEL_ROOT", raising=False)
    called = {}
    monkeypatch.setattr("bagel_sr.embedded.experiment.main", lambda argv: called.setdefault("argv", argv))
    launch.main(["--seeds", "1"])
    out = capsys.readouterr().out
    assert "--bagel_root PATH" in out and "BAGEL_ROOT=PATH" in out
    assert called["argv"] == ["--seeds", "1"]  # the experiment's parser holds the defaults
    with pytest.raises(checkout.CheckoutError, match="BAGEL_ROOT"):
        launch.prepare_checkout("/nonexistent/bagel")


def _tiny_set(tmp_path):
    rng = np.random.default_rng(0)
    for p in ("p1", "p2", "p3", "p4"):
        (tmp_path / "imgs" / p).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "imgs" / p / "a.png")
    summary = build_dataset({
        "name": "toy_sr", "output_dir": str(tmp_path / "out"), "seed": 1,
        "input": {"kind": "images", "path": str(tmp_path / "imgs")},
        "degradations": [{"name": "bicubic_downsample", "scale": 2}],
        "splits": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}},
    }, progress=False)
    return summary.registration_file


@pytest.mark.bagel
@requires_bagel
def test_dataset_flag_registers_and_help_lists_our_flags(tmp_path, capsys):
    registration = _tiny_set(tmp_path)
    import_bagel()
    sys.modules.pop(checkout.TRAINING_MODULE_NAME, None)
    try:
        module, handle = launch.prepare_checkout(bagel_root(), dataset_yamls=str(registration))
    except checkout.CheckoutError as err:
        if "not installed" in str(err):
            pytest.skip(f"the training script's dependencies are missing here: {err}")
        raise
    info = sys.modules["data.dataset_info"].DATASET_INFO["unified_edit"]
    try:
        assert "toy_sr" in info and info["toy_sr"]["num_total_samples"] >= 1
        launch.print_checkout_help(module)
        text = capsys.readouterr().out
        assert "--bagel_sr_datasets" in text and "--pixel_loss_max_t" in text and "--mse_weight" in text
    finally:
        handle.undo()
    assert "toy_sr" not in info
    assert not hasattr(module.Bagel, "_bagel_sr_extended")
