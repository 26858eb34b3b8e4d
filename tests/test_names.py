"""Names checked against what exists (bagel_sr.names): unknown data set names are refused with the closest known
one; the known names come from the dataset config."""
import types

import pytest
import yaml

from bagel_sr.errors import UserError
from bagel_sr.names import check_names
from bagel_sr.patches.datasets import dataset_config_names


@pytest.mark.parametrize("given, known, message", [
    ({"ct_denose"}, ["ct_denoise", "t2i"], "unknown data set 'ct_denose'; did you mean 'ct_denoise'?"),
    ({"zzz"}, ["ct_denoise"], "unknown data set 'zzz' Known: ct_denoise"),
    ({"unified_edit"}, [], "Known: (none)"),
])
def test_unknown_dataset_names_are_refused(given, known, message):
    with pytest.raises(UserError) as e:
        check_names("--pixel_loss_datasets", given, known)
    assert message in str(e.value)


def test_known_names_pass_and_come_from_the_dataset_config(tmp_path):
    check_names("--pixel_loss_datasets", {"unified_edit"}, ["unified_edit", "t2i_pretrain"])
    check_names("--pixel_loss_datasets", None, [])
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"unified_edit": {}, "t2i_pretrain": {}}))
    parsed = [types.SimpleNamespace(dataset_config_file=str(tmp_path / "d.yaml"))]
    assert sorted(dataset_config_names(parsed)) == ["t2i_pretrain", "unified_edit"]
    assert dataset_config_names([types.SimpleNamespace()]) is None
