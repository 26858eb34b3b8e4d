"""Finding a checkout and importing its training script without running ``main()``."""
from __future__ import annotations

import sys

import pytest

from bagel_sr.patches import checkout
from bagel_sr.testing.bagel_tiny import import_training_script, requires_bagel


# ------------------------------------------------------------------------------------------------- checkout

MAIN_THAT_MUST_NOT_RUN = "def main():\n    raise SystemExit(1)\n"


def make_fake_checkout(root, scripts=("train/pretrain_unified_navit.py",), body=MAIN_THAT_MUST_NOT_RUN):
    for rel in checkout.MARKER_FILES + tuple(scripts):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body if rel in scripts else "")
    return root


def test_find_checkout_missing_folder(tmp_path):
    with pytest.raises(checkout.CheckoutError, match="not a folder") as err:
        checkout.find_checkout(tmp_path / "nowhere")
    assert "--bagel_root PATH" in str(err.value) and "BAGEL_ROOT=PATH" in str(err.value)


def test_find_checkout_not_a_checkout_lists_missing_files(tmp_path):
    (tmp_path / "modeling").mkdir()
    (tmp_path / "modeling" / "autoencoder.py").write_text("")
    with pytest.raises(checkout.CheckoutError) as err:
        checkout.find_checkout(tmp_path)
    msg = str(err.value)
    assert "modeling/bagel/bagel.py" in msg and "data/dataset_base.py" in msg
    assert "modeling/autoencoder.py" not in msg


def test_find_checkout_from_env_and_unset(tmp_path, monkeypatch):
    make_fake_checkout(tmp_path)
    monkeypatch.setenv("BAGEL_ROOT", str(tmp_path))
    assert checkout.find_checkout(None) == tmp_path.resolve()
    monkeypatch.delenv("BAGEL_ROOT")
    with pytest.raises(checkout.CheckoutError, match="No BAGEL checkout given.*--bagel_root PATH.*BAGEL_ROOT=PATH"):
        checkout.find_checkout(None)


def test_find_training_script(tmp_path):
    root = make_fake_checkout(tmp_path, scripts=())
    with pytest.raises(checkout.CheckoutError) as err:
        checkout.find_training_script(root)
    assert "train/main.py" in str(err.value) and "train/pretrain_unified_navit.py" in str(err.value)
    make_fake_checkout(tmp_path, scripts=("train/pretrain_unified_navit.py",))
    assert checkout.find_training_script(root).name == "pretrain_unified_navit.py"
    make_fake_checkout(tmp_path, scripts=("train/main.py",))
    assert checkout.find_training_script(root).name == "main.py"  # forks' name wins
    assert checkout.find_training_script(root, "train/pretrain_unified_navit.py").name == "pretrain_unified_navit.py"
    with pytest.raises(checkout.CheckoutError, match="train/other.py"):
        checkout.find_training_script(root, "train/other.py")


def test_add_to_sys_path_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", ["a", str(tmp_path), "b"])
    checkout.add_to_sys_path(tmp_path)
    checkout.add_to_sys_path(tmp_path)
    assert sys.path == [str(tmp_path), "a", "b"]


def test_import_training_module_does_not_run_main(tmp_path, monkeypatch):
    body = "import helper_mod\nVALUE = helper_mod.X\ndef main():\n    raise SystemExit(1)\n"
    root = make_fake_checkout(tmp_path, scripts=("train/main.py",), body=body)
    (root / "helper_mod.py").write_text("X = 7\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    saved = {name: sys.modules.pop(name, None) for name in ("bagel_train_main", "helper_mod")}
    try:
        module = checkout.import_training_module(root)
        assert module.__name__ == "bagel_train_main" and module.VALUE == 7 and callable(module.main)
        assert sys.path[0] == str(root.resolve())
        assert checkout.import_training_module(root) is module
    finally:
        for name, old in saved.items():
            sys.modules.pop(name, None)
            if old is not None:
                sys.modules[name] = old


def test_import_training_module_names_missing_dependency(tmp_path, monkeypatch):
    root = make_fake_checkout(tmp_path, body="import surely_not_installed_pkg\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "bagel_train_main", raising=False)
    with pytest.raises(checkout.CheckoutError, match="surely_not_installed_pkg.*pip install"):
        checkout.import_training_module(root)
    assert "bagel_train_main" not in sys.modules


@pytest.mark.bagel
@requires_bagel
@pytest.mark.usefixtures("checkout_shape")
def test_real_training_script_imports_without_running_main():
    module = import_training_script()
    for name in ("ModelArguments", "DataArguments", "TrainingArguments", "main", "Bagel", "load_ae",
                 "PackedDataset", "collate_wrapper", "HfArgumentParser"):
        assert hasattr(module, name), name
