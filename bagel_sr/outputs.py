"""Output folders we own: a ledger of what a tool wrote, so that reruns know what they resume and
``--overwrite`` deletes only our own files.

The ledger ``.bagel_sr_outputs.jsonl`` (JSON lines, appended and fsynced) starts with a header
``{"tool", "settings", "fingerprint"}``; each later line is ``{"wrote": relative path}`` (recorded *before* the
file is written, so a kill never leaves an unlisted file of ours) or ``{"complete": true}``.

Rules (:func:`claim`):
- a folder that is missing or empty is ours: a fresh ledger is started;
- a non-empty folder without a ledger is refused (not even ``--overwrite`` touches it);
- a ledger of another tool, or made with other settings / fingerprint, is refused unless ``overwrite``;
- a finished run (``mark_complete``) is resumed (a tool then skips what it finished), or, for a tool that passes
  ``refuse_finished``, refused unless ``overwrite``;
- ``overwrite`` deletes exactly the files the ledger lists (and folders that become empty), then starts again.
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

LEDGER = ".bagel_sr_outputs.jsonl"
#: The ledger's line that marks a finished run (what :meth:`Ledger.mark_complete` appends).
COMPLETE_LINE = json.dumps({"complete": True}, sort_keys=True)


class OutputFolderError(UserError):
    """An output folder holds something we must not write into or delete."""


def _append(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "ab") as f:
        f.write(json.dumps(entry, sort_keys=True, default=str).encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Ledger:
    """What one tool wrote into ``folder`` and with which settings."""

    folder: Path
    tool: str
    settings: dict[str, Any]
    fingerprint: str | None = None
    written: list[str] = field(default_factory=list)
    complete: bool = False
    _listed: set[str] = field(default_factory=set, repr=False, compare=False)  # ``written`` as a set (large builds)

    @property
    def path(self) -> Path:
        return self.folder / LEDGER

    @classmethod
    def read(cls, folder: Path) -> "Ledger | None":
        path = folder / LEDGER
        if not path.is_file():
            return None
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        entries = []
        for ln in lines:
            try:
                entries.append(json.loads(ln))
            except json.JSONDecodeError:  # a torn last line of a killed run: keep the complete ones
                path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries), encoding="utf-8")
                break
        if not entries or "tool" not in entries[0]:
            raise OutputFolderError(f"{path} is not a bagel-sr output ledger; move it away or choose another folder")
        head = entries[0]
        led = cls(folder, head["tool"], head.get("settings") or {}, head.get("fingerprint"))
        for e in entries[1:]:
            if "wrote" in e and e["wrote"] not in led._listed:
                led.written.append(e["wrote"])
                led._listed.add(e["wrote"])
            led.complete = led.complete or bool(e.get("complete"))
        return led

    def start(self) -> "Ledger":
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"tool": self.tool, "settings": self.settings, "fingerprint": self.fingerprint},
                                  sort_keys=True, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
        return self

    def record(self, rel: str | Path) -> Path:
        """Note that we are about to write ``folder/rel``; returns the absolute path."""
        rel = Path(rel).as_posix()
        if rel not in self._listed:
            _append(self.path, {"wrote": rel})
            self.written.append(rel)
            self._listed.add(rel)
        return self.folder / rel

    def mark_complete(self) -> None:
        _append(self.path, {"complete": True})
        self.complete = True

    @staticmethod
    def finished(folder: str | Path) -> bool:
        """Whether ``folder`` holds a ledger of a finished run."""
        folder = Path(folder)
        ledger = Ledger.read(folder) if (folder / LEDGER).is_file() else None
        return bool(ledger and ledger.complete)

    def remove_written(self) -> int:
        """Delete the files this ledger lists (and folders they leave empty) and the ledger; returns the count."""
        removed = 0
        dirs = set()
        for rel in self.written:
            p = self.folder / rel
            if p.is_file() or p.is_symlink():
                p.unlink()
                removed += 1
            dirs.update(q for q in p.parents if self.folder in q.parents)
        for d in sorted(dirs, key=lambda q: len(q.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        self.path.unlink(missing_ok=True)
        self.written, self._listed, self.complete = [], set(), False
        return removed


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if not _same(old.get(k), new.get(k)))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:4])


def claim(folder: str | Path, tool: str, settings: dict[str, Any], fingerprint: str | None = None,
          overwrite: bool = False, flag: str = "--overwrite", refuse_finished: bool = False) -> tuple[Ledger, bool]:
    """Take ``folder`` for ``tool``; returns ``(ledger, resumed)``. See the module docstring for the rules."""
    folder = Path(folder)
    old = Ledger.read(folder) if folder.is_dir() else None
    if old is None:
        if folder.is_dir() and any(folder.iterdir()):
            raise OutputFolderError(f"output folder {folder} is not empty and was not written by bagel-sr "
                                    f"(no {LEDGER}); choose a new or empty folder (not even {flag} deletes it)")
        return Ledger(folder, tool, settings, fingerprint).start(), False
    if refuse_finished and old.complete:
        if not overwrite:
            raise OutputFolderError(f"output folder {folder} holds a finished run; pass {flag} to redo it (deletes "
                                    "only the files that run wrote) or choose another folder")
        old.remove_written()
        return Ledger(folder, tool, settings, fingerprint).start(), False
    if old.tool != tool:
        problem = f"was written by {old.tool}, not {tool}"
    elif not _same(old.settings, settings):
        problem = f"was made with other settings ({_differences(old.settings, settings)})"
    elif old.fingerprint != fingerprint:
        problem = f"was made from another checkpoint/input or config (fingerprint {old.fingerprint} then, {fingerprint} now)"
    else:
        return old, True
    if not overwrite:
        raise OutputFolderError(f"output folder {folder} {problem}; rerun with the same settings to resume, "
                                f"{flag} to redo it (deletes only the files bagel-sr wrote there), "
                                "or choose another folder")
    old.remove_written()
    return Ledger(folder, tool, settings, fingerprint).start(), False


def file_fingerprint(path: str | Path, sample: int = 1 << 20) -> str:
    """Cheap fingerprint of a file or folder: sizes, and the first/last ``sample`` bytes of each file (sha256)."""
    import hashlib

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(path) if path.is_dir() else p.name}|{size}|".encode())
        with open(p, "rb") as f:
            h.update(f.read(sample))
            if size > 2 * sample:
                f.seek(size - sample)
                h.update(f.read(sample))
    return h.hexdigest()[:16]


def shell_is_finished(folder: str | Path) -> str:
    """A shell test that succeeds when ``folder``'s ledger marks a finished run (for scripts that run steps once)."""
    return f"grep -qxF {shlex.quote(COMPLETE_LINE)} {shlex.quote(str(Path(folder) / LEDGER))} 2>/dev/null"


def shell_mark_finished(folder: str | Path) -> str:
    """The shell line that marks ``folder``'s run finished in its ledger (what :meth:`Ledger.mark_complete` does)."""
    return f"printf '%s\\n' {shlex.quote(COMPLETE_LINE)} >> {shlex.quote(str(Path(folder) / LEDGER))}"
