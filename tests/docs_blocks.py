"""The shell blocks of the README and docs/, and what each is marked to be.

Every fenced ``bash`` block must be preceded (on the line before its fence) by one marker:

- ``<!-- docs-test: run -->``: run as written, in order with the other ``run`` blocks of the same page, in one
  empty folder that holds only the user's data the test makes (``tests/test_docs_commands.py``);
- ``<!-- docs-test: file NAME -->`` (before a block of any language): written to ``NAME`` in that folder before the
  next ``run`` block, as a user saves it;
- ``<!-- docs-test: skip: REASON -->``: not run (it needs GPUs, released weights, a user's own paths); the flags
  of each ``python -m bagel_sr...`` / ``train/main_sr_pixel_loss.py`` command in it are still checked against that
  command's ``--help``.

An unmarked block fails the test, so a new block cannot escape it unnoticed.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*docs-test:\s*(run|skip|file)(?::?\s*(.*?))?\s*-->")


@dataclass
class Block:
    page: str          # path relative to the repository
    line: int          # 1-based line of the opening fence
    mode: Optional[str]  # "run", "skip", "file", or None (unmarked)
    reason: str          # why a block is skipped; the file name of a "file" block
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> List[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


SHELL = ("bash", "sh", "shell", "console")


def blocks(page: Path) -> Iterator[Block]:
    """The shell blocks of ``page``, and blocks of any language marked ``file``, with the marker of the line before
    each fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            start, lang = i, fence[3:].strip()
            i += 1
            body = []
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            m = MARKER.search(lines[start - 1] if start > 0 else "")
            mode = m.group(1) if m else None
            if lang in SHELL or mode == "file":
                yield Block(str(page.relative_to(REPO)), start + 1, mode, (m.group(2) or "") if m else "", lang,
                            "\n".join(body) + "\n")
        i += 1


def commands(text: str) -> List[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        out.append((current + line.strip()).strip())
        current = ""
    if current:
        out.append(current.strip())
    return out


def bagel_cli(command: str) -> Optional[Tuple[List[str], List[str]]]:
    """``(argv prefix to run the tool, the flags given)`` for a ``python -m bagel_sr...`` or
    ``.../train/main_sr_pixel_loss.py`` command (``torchrun`` and env assignments before it allowed); else None."""
    try:
        words = shlex.split(command.split("#", 1)[0].split("&&")[-1].split("|")[0])
    except ValueError:
        return None
    while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] in ("nice", "time")):
        words = words[1:]
    if not words:
        return None
    prefix: List[str]
    rest: List[str]
    if words[0] in ("python", "python3") and len(words) > 2 and words[1] == "-m" and words[2].startswith("bagel_sr"):
        prefix, rest = ["-m", words[2]], words[3:]
    else:
        script = next((i for i, w in enumerate(words) if w.endswith("main_sr_pixel_loss.py")), None)
        if script is None:
            return None
        prefix, rest = [str(REPO / "train" / "main_sr_pixel_loss.py")], words[script + 1:]
    if prefix[0] == "-m" and rest and re.fullmatch(r"[a-z]+", rest[0]):
        prefix, rest = prefix + [rest[0]], rest[1:]  # a subcommand (build, template, plan, train, ...)
    flags = [w.split("=", 1)[0] for w in rest if w.startswith("--")]
    return prefix, flags
