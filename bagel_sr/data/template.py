"""``python -m bagel_sr.data template NAME --input DIR --output DIR [-o FILE]``: a packaged build config with
your paths filled in, comments kept, ready for ``python -m bagel_sr.data build``.

Paths in a build config are resolved against the config file's folder, so they are written relative to where the
config goes (``-o FILE``, else the current folder, for ``> FILE``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional

import difflib
from .errors import ConfigError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_NOT_BUILD_CONFIGS = {"instructions"}


def available() -> Dict[str, Path]:
    """``{template name: its file}`` of the packaged build configs."""
    return {p.stem: p for p in sorted(TEMPLATE_DIR.glob("*.yaml")) if p.stem not in _NOT_BUILD_CONFIGS}


def _first_line(path: Path) -> str:
    line = path.read_text(encoding="utf-8").splitlines()[0]
    return line.lstrip("# ").split(" (")[0]


def describe() -> str:
    """One line per template: its name and what it builds (the first line of its file)."""
    return "\n".join(f"  {name:<22} {_first_line(path)}" for name, path in available().items())


def _set_key(text: str, pattern: str, value: str, what: str) -> str:
    """Replace the value of the first line matching ``pattern`` (group 1 = the key and its indent), keeping a comment."""
    regex = re.compile(pattern + r"[^#\n]*?(\s*#.*)?$", re.MULTILINE)
    if not regex.search(text):
        raise ConfigError(f"the template has no {what} line to fill in")
    return regex.sub(lambda m: f"{m.group(1)}{value}{m.group(2) or ''}", text, count=1)


def render(name: str, input_path: Optional[str] = None, output_dir: Optional[str] = None,
           config_dir: Optional[str] = None) -> str:
    """The template ``name`` as text with ``input.path`` and ``output_dir`` set (relative to ``config_dir``)."""
    templates = available()
    if name not in templates:
        close = difflib.get_close_matches(name, list(templates), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"template '{name}' does not exist{hint} Templates: {', '.join(templates)} "
                          "(python -m bagel_sr.data template lists what each builds)")
    text = templates[name].read_text(encoding="utf-8")
    base = Path(config_dir or ".").absolute()

    def rel(p: str) -> str:
        return Path(os.path.relpath(Path(p).expanduser().absolute(), base)).as_posix()

    if input_path is not None:
        if not Path(input_path).expanduser().exists():
            raise ConfigError(f"--input {input_path}: no such file or folder")
        text = _set_key(text, r"^(input:\n(?:[ \t]+.*\n|\s*\n)*?[ \t]+path: )", rel(input_path), "input.path")
    if output_dir is not None:
        text = _set_key(text, r"^(output_dir: )", rel(output_dir), "output_dir")
    return text
