"""The project's own files name none of its tracker items: no ``#<number>``, no tracker words, no lettered item
headings. What was tried and measured lives in docs/ in plain words."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Each pattern is spelt so that this file does not match it.
TRACKER_REFERENCES = {
    "a #number": re.compile(r"(?<![&\w])#\d{1,5}\b"),
    "a tracker word": re.compile(r"\b(?:iss(?:ue)|tick(?:et)|pull requ(?:est))s?\b", re.IGNORECASE),
    "a lettered item heading": re.compile(r"(?:^|[\s(#])[A-Z]\d? — (?=[A-Z])"),
    "a tracker id": re.compile(r"\b(?:GH|PR)-?\d+\b"),
}
SKIPPED_SUFFIXES = (".safetensors", ".png", ".jpg", ".npy", ".parquet", ".pt")


def project_files() -> list:
    """The files git tracks in this checkout (every file under it but .git and caches without git)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        paths = [REPO / n for n in names.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if p.is_file()
                 and not any(part in (".git", "__pycache__", "build") or part.endswith(".egg-info") for part in p.parts)]
    return [p for p in paths if p.suffix not in SKIPPED_SUFFIXES and p.is_file()]


def references(text: str) -> list:
    """``(line number, what, line)`` of every tracker reference in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in TRACKER_REFERENCES.items():
            if pattern.search(line):
                found.append((number, what, line.strip()[:120]))
    return found


def test_no_project_file_names_a_tracker_item():
    files = project_files()
    assert any(p.name == "README.md" for p in files) and any(p.suffix == ".py" for p in files)
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(REPO)}:{n}: {what}: {line}" for n, what, line in references(text)]
    assert not found, "say what the code does instead of naming a tracker item:\n" + "\n".join(found)


@pytest.mark.parametrize("line, what", [
    ("see #" "28 for the history", "a #number"),
    ("(from the iss" "ue on resumes)", "a tracker word"),
    ("Tick" "ets: K and L", "a tracker word"), ("see the pull requ" "est", "a tracker word"),
    ("K" " — The plugin is the package", "a lettered item heading"),
    ("fixed by G" "H-12", "a tracker id"),
])
def test_references_are_found(line, what):
    assert [w for _, w, _ in references(line)] == [what]


@pytest.mark.parametrize("line", [
    "color = '#1f77b4'", "latent_channel: int = 16  # C: VAE latent channels", "step K+1 resumes checkpoint K", "A - B", "| 2 | 0.3 |",
    "T0=0.3 K=16", "flash_attn (BAGEL imports it)",
])
def test_plain_text_is_not_a_reference(line):
    assert references(line) == []


def test_benchmarks_and_tests_import_the_installed_package_without_editing_sys_path():
    """The shared fakes live in ``bagel_sr.testing``; nothing reaches them (or bagel_sr) by a path edit."""
    edits = re.compile(r"sys\.path\.(?:insert|append)\(")
    found = [f"{p.relative_to(REPO)}:{n}" for p in project_files() if p.suffix == ".py"
             and p.relative_to(REPO).parts[0] in ("benchmarks", "tests") and p.name != Path(__file__).name
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if edits.search(line)]
    assert not found, f"import from bagel_sr.testing instead: {found}"
    crossed = [f"{p.name}:{n}" for p in (REPO / "tests").glob("test_*.py")
               for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
               if re.match(r"\s*(from|import) test_\w+", line)]
    assert not crossed, f"a test module imports another; move what they share to bagel_sr/testing/: {crossed}"
    helpers = sorted(p.name for p in (REPO / "tests").glob("*.py")
                     if not p.name.startswith("test_") and p.name not in ("conftest.py", "docs_blocks.py"))
    assert not helpers, f"shared test support belongs in bagel_sr/testing/: {helpers}"
