"""The wrapper against a real checkout: data-set registration by flag, --help with our flags, missing checkout."""
import importlib
import sys

import pytest

from bagel_sr.testing import fake_checkout
from bagel_sr.errors import UserError
from bagel_sr.patches import checkout, launch
from bagel_sr.train import main_sr_pixel_loss as main_job
from bagel_sr.testing.bagel_tiny import bagel_root, import_bagel, requires_bagel


def test_without_a_checkout_the_wrapper_says_how_to_point_at_one(monkeypatch, capsys):
    monkeypatch.delenv("BAGEL_ROOT", raising=False)
    called = {}
    monkeypatch.setattr("bagel_sr.embedded.experiment.main", lambda argv: called.setdefault("argv", argv))
    main_job.main(["--seeds", "1"])
    out = capsys.readouterr().out
    assert "--bagel_root PATH" in out and "BAGEL_ROOT=PATH" in out
    assert called["argv"] == ["--seeds", "1"]  # the experiment's parser holds the defaults
    with pytest.raises(checkout.CheckoutError, match="BAGEL_ROOT"):
        launch.prepare_checkout("/nonexistent/bagel")
    with pytest.raises(UserError, match="no BAGEL checkout: pass --bagel_root PATH"):
        launch.main(["--seeds", "1"])  # the wrapper alone needs a checkout


@pytest.mark.bagel
@requires_bagel
def test_dataset_flag_registers_and_help_lists_our_flags(tmp_path, capsys, checkout_shape):
    """On the fork DATASET_INFO has no unified_edit group (its registry still maps the type): it is created and
    removed again by the undo."""
    registration = fake_checkout.built_set(tmp_path)
    import_bagel()
    had_group = "unified_edit" in importlib.import_module("data.dataset_info").DATASET_INFO
    assert had_group == (checkout_shape == "upstream")
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
        assert "--bagel_sr_host_pixel_loss" in text
    finally:
        handle.undo()
    assert "toy_sr" not in info
    assert ("unified_edit" in sys.modules["data.dataset_info"].DATASET_INFO) == had_group
    assert not hasattr(module.Bagel, "_bagel_sr_extended")
