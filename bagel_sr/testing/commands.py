"""Running the project's commands as a user does, for tests: ``python ARGS`` in a folder, output and last line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Tuple


def run_python(*args: str, cwd: Path, timeout: float = 600, env: Optional[Mapping[str, str]] = None) -> Tuple[int, str]:
    """``python ARGS`` in ``cwd`` (the environment plus ``env``); returns ``(exit code, stdout + stderr)``."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    return proc.returncode, proc.stdout + proc.stderr


def last_line(text: str) -> str:
    """The last line of ``text`` that is not blank."""
    return [line for line in text.splitlines() if line.strip()][-1]
