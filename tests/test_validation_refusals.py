"""Validation's bad inputs stop the wrapper in one line before training (no checkout needed: the checks run first)."""
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from bagel_sr.errors import BadInput
from bagel_sr.patches.validation_set import check_val_sets, load_val_set
from bagel_sr.validation.fits import check_fits
from bagel_sr.smoke.data import write_source_tiles
from bagel_sr.testing.validation_sets import build_val_set

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("valsets")
    sources = write_source_tiles(root / "sources", 1)
    return {"val": build_val_set(root / "a", "seta", sources=sources),
            "train_only": build_val_set(root / "b", "setb", {"train": 1.0}, sources=sources),
            "other_sources": build_val_set(root / "c", "setc", {"train": 1.0}, seed=2),
            "no_png": build_val_set(root / "d", "setd", sources=sources, heldout_png=False)}


def wrapper(*args):
    proc = subprocess.run([sys.executable, "train/main_sr_pixel_loss.py", "--bagel_root", str(REPO), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    out = proc.stdout + proc.stderr
    return proc.returncode, [x for x in out.splitlines() if x.strip()][-1], out


def test_a_set_without_a_val_split_is_refused_in_one_line(sets):
    code, line, out = wrapper("--bagel_sr_val_datasets", str(sets["train_only"]))
    assert code == 2 and "Traceback" not in out
    assert line == ("error: --bagel_sr_val_datasets {}: the set 'setb' has no val split; rebuild it with "
                    "splits.fractions.val > 0 (python -m bagel_sr.data build)".format(sets["train_only"]))


def test_more_val_images_than_the_split_holds_is_refused(sets):
    code, line, out = wrapper("--bagel_sr_val_datasets", str(sets["val"]), "--bagel_sr_val_images", "9")
    assert code == 2 and "Traceback" not in out
    assert line == "error: --bagel_sr_val_images 9: the val split(s) hold only 8 image(s); ask for at most 8"


def test_a_val_set_whose_source_files_training_reads_is_refused_naming_the_overlap(sets):
    code, line, out = wrapper("--bagel_sr_val_datasets", str(sets["val"]), "--bagel_sr_datasets", str(sets["train_only"]))
    assert code == 2 and "Traceback" not in out
    assert line.startswith("error: --bagel_sr_val_datasets: the val split of 'seta' shares 8 source file(s) with "
                           "the training set 'setb' (e.g. "), line
    # the same set for training (its train split) and validation (its val split) is the normal case
    val = load_val_set(sets["val"])
    check_val_sets([val], 8, [str(sets["val"]), str(sets["other_sources"])])


def test_a_val_split_named_in_the_training_config_is_refused(sets, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"unified_edit": {"dataset_names": ["seta", "seta_val"]}}))
    with pytest.raises(BadInput, match=r"the val split 'seta_val' is also a training set in .*train\.yaml; validate"):
        check_val_sets([load_val_set(sets["val"])], 4, [], str(config))


def test_a_set_built_without_held_out_pngs_is_refused(sets):
    code, line, _ = wrapper("--bagel_sr_val_datasets", str(sets["no_png"]))
    assert code == 2 and "have no held-out PNGs" in line and line.endswith("rebuild the set with output.heldout_png: true")


def test_bad_values_and_validation_without_a_checkout_are_refused_in_one_line(sets):
    code, line, _ = wrapper("--bagel_sr_val_datasets", str(sets["val"]), "--bagel_sr_val_every", "0")
    assert code == 2 and line == "error: --bagel_sr_val_every: got 0; allowed: an integer >= 1."
    proc = subprocess.run([sys.executable, "train/main_sr_pixel_loss.py", "--bagel_sr_val_datasets", str(sets["val"])],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "BAGEL_ROOT"})
    last = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()][-1]
    assert proc.returncode == 2 and last.startswith("error: --bagel_sr_val_datasets validates inside a BAGEL checkout")


class _Transform:
    """Stands in for the checkout's ImageTransform: keeps the size (the sets are 64x64)."""

    def __init__(self, *args):
        self.resize_transform = lambda image: image


def test_val_images_the_position_tables_cannot_hold_are_refused(sets):
    val = [load_val_set(sets["val"])]
    check_fits(val, _Transform, max_latent_size=4, latent_downsample=16, vit_max_patches=4)
    with pytest.raises(BadInput, match=r"64x64 after its set's transform, 4 latent tokens a side, more than "
                                       r"--max_latent_size 3; raise"):
        check_fits(val, _Transform, max_latent_size=3, latent_downsample=16)
    with pytest.raises(BadInput, match=r"needs 4 ViT patches a side, more than the model's 3"):
        check_fits(val, _Transform, max_latent_size=4, latent_downsample=16, vit_max_patches=3)
