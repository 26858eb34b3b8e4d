"""Splits by subject (bagel_sr.data.splits): every subject, patient or first folder lands in one split, and a
grouping that would put one subject in two splits is refused."""
import json

import pytest

from bagel_sr.data import build_dataset
from bagel_sr.errors import UserError
from bagel_sr.testing.builder_inputs import cfg_for, manifest, tree


BIDS = [f"sub-0{s}/ses-{e}/anat/sub-0{s}_ses-{e}_T1w.png" for s in (1, 2, 3, 4) for e in (1, 2)]
PATIENTS = [f"patient0{p}/series{s}/img{i}.png" for p in (1, 2, 3, 4) for s in (1, 2) for i in (1,)]


def splits_of_subjects(rows, subject):
    seen = {}
    for r in rows:
        seen.setdefault(subject(r["source"]["path"]), set()).add(r["split"])
    return seen


@pytest.mark.parametrize("layout, subject, field", [
    (BIDS, lambda p: p.split("/")[0], "bids_subject"),
    (PATIENTS, lambda p: p.split("/")[0], "subject_folder"),
])
def test_default_split_keeps_each_subject_in_one_split(tmp_path, layout, subject, field):
    tree(tmp_path / "imgs", layout)
    summary = build_dataset(cfg_for(tmp_path), progress=False)
    rows = manifest(tmp_path / "out")
    assert all(len(s) == 1 for s in splits_of_subjects(rows, subject).values())
    assert {r["group_by"] for r in rows} == {field} and summary.group_fields == {field: 4}
    assert f"groups keyed by: {field} (4)" in summary.format()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["groups_keyed_by"] == {field: 4}


def test_first_folder_is_the_fallback_group(tmp_path):
    tree(tmp_path / "imgs", [f"site{k}/a/x{i}.png" for k in (1, 2) for i in (1, 2)] + ["loose.png"])
    summary = build_dataset(cfg_for(tmp_path, splits={"fractions": {"train": 1.0}}), progress=False)
    assert summary.group_fields == {"file": 1, "top_folder": 2}


@pytest.mark.parametrize("layout, regex, subject", [
    (PATIENTS, r"(series\d)", "patient0"),                 # a regex on the series: patients leak
    (BIDS, r"(ses-\d)", "sub-0"),                           # grouping by session: subjects leak
])
def test_a_grouping_that_leaks_subjects_is_refused(tmp_path, layout, regex, subject):
    tree(tmp_path / "imgs", layout)
    cfg = cfg_for(tmp_path, splits={"group_by": "regex", "group_regex": regex,
                                    "fractions": {"train": 0.5, "val": 0.5, "test": 0.0}})
    with pytest.raises(UserError, match=f"subject '{subject}.*would be in two splits"):
        build_dataset(cfg, progress=False)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
