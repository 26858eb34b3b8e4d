"""Watch one dry-run launch: a capped log, and a stop with the reason when the loop makes no step progress.

BAGEL's loader prints a line each time a worker wraps around its share (``... repeat in rank-1 worker-0``) and each
time it drops a sample (``skip a sample with length 901``); a loader that cannot feed a rank prints those millions
of times while no step ever comes. The watcher

- writes each kind of line (digits folded: ``repeat in rank-# worker-#``) at most :data:`KEEP_PER_KIND` times and
  counts the rest (a summary at the end of the log), and stops writing at ``max_log_bytes``;
- ends the launch when no progress was seen for ``stall_s`` seconds: progress is a step line, the loop's start line,
  or, before that, any line that is not a repeat of one already seen a few times (a launch silent before the loop
  starts, setting up, gets :data:`SILENT_STARTUP` times as long);
- explains the stall from the most frequent repeated line of the window (:data:`MEANINGS`).
"""
from __future__ import annotations

import os
import queue
import signal
import re
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, TextIO

KEEP_PER_KIND = 20
#: Before the loop's start line, a launch that prints nothing (imports, model set-up) gets this many stall windows.
SILENT_STARTUP = 3
MAX_LOG_BYTES = 20 * 2 ** 20
STEP_LINE = re.compile(r"\(step=\d+\)")
START_LINE = re.compile(r"Training for \d+ steps, starting at \d+")

#: Repeated loader lines and what they mean for a launch that makes no progress.
MEANINGS = (
    ("repeat in rank", "a loader worker loops over an empty share of its data set: the set has fewer parquet row "
                       "groups (or jsonl lines) than ranks x workers; rebuild it with `python -m bagel_sr.data build "
                       "CONFIG --world_size N --num_workers K --overwrite` or run fewer ranks (--nproc)"),
    ("skip a sample with length", "every sample is longer than --max_num_tokens_per_sample: raise it above the "
                                  "length shown, or lower max_image_size in the group's image_transform_args"),
    ("No loss defined", "chat samples without an answer turn ('from': 'gpt') are skipped: fix the jsonl"),
    ("Error", "the loader cannot read rows of a data set (see the log)"),
)


class SmokeStop(Exception):
    """The dry run stops here; the message is the one line that says why and what to do."""


def kind_of(line: str) -> str:
    """A line with its digits folded, to count lines that differ only in numbers as one kind."""
    return re.sub(r"\d+", "#", line.strip())[:160]


def meaning_of(line: str) -> str:
    for marker, meaning in MEANINGS:
        if marker in line:
            return meaning
    return "the launch printed no step line (see the log)"


class CappedLog:
    """A launch log that keeps :data:`KEEP_PER_KIND` lines of each kind (step lines all) and at most ``max_bytes``."""

    def __init__(self, handle: TextIO, max_bytes: int = MAX_LOG_BYTES):
        self.handle = handle
        self.max_bytes = max_bytes
        self.written = 0
        self.kinds: Counter = Counter()
        self.examples: dict = {}
        self.dropped = 0

    def write(self, line: str) -> str:
        """Log ``line`` (or count it); returns its kind."""
        kind = kind_of(line)
        self.kinds[kind] += 1
        self.examples.setdefault(kind, line.strip()[:200])
        keep = STEP_LINE.search(line) or START_LINE.search(line) or self.kinds[kind] <= KEEP_PER_KIND
        if keep and self.written + len(line) <= self.max_bytes:
            self.handle.write(line)
            self.written += len(line)
        else:
            self.dropped += 1
        return kind

    def close(self) -> None:
        """Append the summary of the lines not written."""
        if self.dropped:
            self.handle.write(f"[bagel-sr smoke] {self.dropped} line(s) not written; counts of the repeated kinds:\n")
            for kind, n in self.kinds.most_common(10):
                if n > KEEP_PER_KIND and kind:
                    self.handle.write(f"[bagel-sr smoke]   {n} x {self.examples[kind]}\n")
        self.handle.flush()


def watch(proc: subprocess.Popen, log_path: Path, *, stall_s: float, timeout_s: float,
          echo: Optional[Callable[[str], None]] = None, max_log_bytes: int = MAX_LOG_BYTES) -> None:
    """Copy ``proc``'s output to a :class:`CappedLog` at ``log_path`` until it exits; kill it and raise
    :class:`SmokeStop` when it makes no progress for ``stall_s`` seconds or runs past ``timeout_s``."""
    lines: "queue.Queue[Optional[str]]" = queue.Queue(maxsize=10000)

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    started = last_progress = time.time()
    window: Counter = Counter()
    examples: dict = {}
    looping = False
    with open(log_path, "w") as handle:
        log = CappedLog(handle, max_log_bytes)
        try:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                now = time.time()
                if line:
                    kind = log.write(line)
                    if echo and line.startswith(("(step=", "bagel-sr", "smoke")):
                        echo(line)
                    if STEP_LINE.search(line) or START_LINE.search(line):
                        looping = looping or bool(START_LINE.search(line))
                        last_progress, window = now, Counter()
                    elif not looping and log.kinds[kind] <= 3:
                        last_progress = now
                    else:
                        window[kind] += 1
                        examples.setdefault(kind, line.strip()[:160])
                limit = stall_s if looping or window else SILENT_STARTUP * stall_s
                if now - last_progress > limit:
                    _kill(proc)
                    raise SmokeStop(_stall_reason(limit, window, examples, log_path))
                if now - started > timeout_s:
                    _kill(proc)
                    raise SmokeStop(f"launch exceeded --timeout {timeout_s:.0f} s (log: {log_path})")
        finally:
            if proc.poll() is None:
                _kill(proc)
            proc.wait()
            log.close()


def _kill(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and, when it leads its own process group (``start_new_session=True``), its ranks with it."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
            return
    except (ProcessLookupError, PermissionError):
        pass
    proc.kill()


def _stall_reason(stall_s: float, window: Counter, examples: dict, log_path: Path) -> str:
    if not window:
        return (f"no step for {stall_s:.0f} s and nothing printed since: the launch hangs (raise --stall_timeout if your "
                f"machine is slow; log: {log_path})")
    kind, n = window.most_common(1)[0]
    return (f"no step for {stall_s:.0f} s while the loader printed {n} x '{examples[kind]}': "
            f"{meaning_of(examples[kind])} (log: {log_path})")
