"""Train/val/test splits by subject, never by slice.

Every source gets a *group key*. ``auto`` takes the subject: DICOM PatientID (falling back to the study), else a
BIDS ``sub-`` entity (then ``ses-``) or a patient-like folder (``patient07``, ``case_3``, ``subj-2``) in the path,
else the first folder below the input root, else the file. ``group_by``/``group_regex`` override it. Groups are
ordered by a seeded SHA-256 hash and cut by the configured fractions, so the assignment is deterministic, balanced
even for a handful of patients, and every source of a group lands in the same split.

Whatever the grouping, :func:`check_no_subject_leak` refuses an assignment in which one *recognised* subject
(PatientID, BIDS subject, patient-like folder) has sources in two splits.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

from .errors import LeakError, SourceError
from .readers import SourceRef

SPLIT_ORDER = ("train", "val", "test")


#: Path components that name a subject: BIDS ``sub-<label>``, or ``patient07``, ``case_3``, ``subj-2`` ...
_BIDS = {"sub": re.compile(r"(?:^|_)(sub-[A-Za-z0-9]+)"), "ses": re.compile(r"(?:^|_)(ses-[A-Za-z0-9]+)")}
_SUBJECT_DIR = re.compile(r"^(?:patient|pat|subject|subj|case|pt)[-_ ]?[A-Za-z0-9]*\d[A-Za-z0-9]*$", re.I)
#: ``how`` values of keys that identify a subject (the leak check trusts only these).
SUBJECT_FIELDS = ("patient_id", "bids_subject", "subject_folder")


def resolve_group_by(group_by: str, kind: str) -> str:
    """``auto`` -> ``patient`` for DICOM, ``subject`` (see the module docstring) for NIfTI and image files;
    ``patient`` outside DICOM is ``subject`` (a patient-like or BIDS folder, else the first folder)."""
    if group_by == "auto" or (group_by == "patient" and kind != "dicom"):
        return "patient" if kind == "dicom" else "subject"
    return group_by


def subject_key(ref: SourceRef) -> tuple[str, str] | None:
    """``(key, how)`` of the subject a source recognisably belongs to, or ``None``."""
    if ref.meta.get("patient_id"):
        return ref.meta["patient_id"], "patient_id"
    parts = ref.rel_path.split("/")
    for part in parts:
        found = _BIDS["sub"].search(part)
        if found:
            return found.group(1), "bids_subject"
    for part in parts[:-1]:
        if _SUBJECT_DIR.match(part):
            return part, "subject_folder"
    return None


def _auto_subject(ref: SourceRef) -> tuple[str, str]:
    known = subject_key(ref)
    if known:
        return known
    parts = ref.rel_path.split("/")
    for part in parts:
        found = _BIDS["ses"].search(part)
        if found:
            return found.group(1), "bids_session"
    if len(parts) > 1:
        return parts[0], "top_folder"
    return ref.rel_path, "file"


def group_key(ref: SourceRef, group_by: str, regex: str | None = None) -> tuple[str, str]:
    """``(key, how)`` for one source; ``how`` says which field gave the key (recorded in the manifest)."""
    m = ref.meta
    if group_by == "subject":
        return _auto_subject(ref)
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


def check_no_subject_leak(refs: list[SourceRef], groups: dict[str, tuple[str, str]],
                          assignment: dict[str, str]) -> None:
    """Raise :class:`LeakError` when one recognised subject has sources in two splits."""
    seen: dict[str, tuple[str, str]] = {}
    for ref in refs:
        if ref.source_id not in groups:
            continue
        subject = subject_key(ref)
        if subject is None:
            continue
        split = assignment[groups[ref.source_id][0]]
        first = seen.setdefault(subject[0], (split, ref.rel_path))
        if first[0] != split:
            raise LeakError(
                f"subject {subject[0]!r} ({subject[1]}) would be in two splits: {first[1]} in {first[0]}, "
                f"{ref.rel_path} in {split}; group by subject (splits.group_by: auto) or make "
                f"splits.group_regex capture the subject")


def groups_by_field(groups: dict[str, tuple[str, str]]) -> dict[str, int]:
    """Number of distinct group keys per field that gave them (for the summary and report)."""
    out: dict[str, set] = {}
    for key, how in groups.values():
        out.setdefault(how, set()).add(key)
    return {how: len(keys) for how, keys in sorted(out.items())}


def split_report(assignment: dict[str, str]) -> dict[str, Any]:
    """Group counts per split (for the summary)."""
    return {s: sum(1 for v in assignment.values() if v == s) for s in SPLIT_ORDER}
