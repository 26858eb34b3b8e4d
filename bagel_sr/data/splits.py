"""Train/val/test splits by patient or study, never by slice.

Every source gets a *group key* (DICOM PatientID, falling back to StudyInstanceUID; or a regex on
the path; ...). Groups are ordered by a seeded SHA-256 hash and cut by the configured fractions, so
the assignment is deterministic, balanced even for a handful of patients, and every source of a
group lands in the same split.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

from .errors import SourceError
from .readers import SourceRef

SPLIT_ORDER = ("train", "val", "test")


def resolve_group_by(group_by: str, kind: str) -> str:
    """``auto`` -> ``patient`` for DICOM, ``file`` for NIfTI volumes, ``parent_dir`` for image files."""
    if group_by != "auto":
        return group_by
    return {"dicom": "patient", "nifti": "file", "images": "parent_dir"}[kind]


def group_key(ref: SourceRef, group_by: str, regex: str | None = None) -> tuple[str, str]:
    """``(key, how)`` for one source; ``how`` says which field gave the key (recorded in the manifest)."""
    m = ref.meta
    if group_by == "patient":
        for field in ("patient_id", "study_uid", "series_uid"):
            if m.get(field):
                return m[field], field
        return ref.source_id, "source"
    if group_by == "study":
        for field in ("study_uid", "patient_id", "series_uid"):
            if m.get(field):
                return m[field], field
        return ref.source_id, "source"
    if group_by == "series":
        return m.get("series_uid") or ref.source_id, "series_uid"
    if group_by == "regex":
        found = re.search(regex or "", ref.rel_path)
        if not found:
            raise SourceError(f"path {ref.rel_path!r} does not match splits.group_regex {regex!r}")
        return (found.group(1) if found.groups() else found.group(0)), "regex"
    if group_by == "parent_dir":
        return (ref.rel_path.rsplit("/", 1)[0] if "/" in ref.rel_path else "."), "parent_dir"
    return ref.rel_path, "file"


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assign_splits(groups: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Map each distinct group key to a split.

    Groups are sorted by ``sha256(seed:key)``; the first ``round(n * f_val)`` go to val, the next
    ``round(n * f_test)`` to test, the rest to train. A split with a positive fraction gets at least one
    group while train keeps at least one.
    """
    keys = sorted(set(groups), key=lambda k: _rank(seed, k))
    n = len(keys)
    counts = {s: int(round(n * fractions.get(s, 0.0))) for s in ("val", "test")}
    for s in ("val", "test"):
        if fractions.get(s, 0.0) > 0 and counts[s] == 0 and n - sum(counts.values()) > 1:
            counts[s] = 1
    while n > 0 and n - sum(counts.values()) < 1:  # train keeps at least one group
        s = max(("val", "test"), key=lambda k: counts[k])
        counts[s] -= 1
    out: dict[str, str] = {}
    i = 0
    for s in ("val", "test"):
        for k in keys[i:i + counts[s]]:
            out[k] = s
        i += counts[s]
    for k in keys[i:]:
        out[k] = "train"
    return out


def split_report(assignment: dict[str, str]) -> dict[str, Any]:
    """Group counts per split (for the summary)."""
    return {s: sum(1 for v in assignment.values() if v == s) for s in SPLIT_ORDER}
