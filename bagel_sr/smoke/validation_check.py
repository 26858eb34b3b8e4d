"""The dry run's check of validation during training (``--bagel_sr_val_datasets`` given): each launch validated at
its first step and at every multiple of ``--bagel_sr_val_every`` it ran, every logged step carries the ``val_*``
keys, and ``validation.csv`` and one grid picture per validation are in the results folder.  Returns the note the
dry run's OK line carries, with the measured cost (forwards per validation, share of the time between validations).
"""
from __future__ import annotations

import csv
import pathlib
import re
from typing import List, Sequence

from bagel_sr.validation_config import ValidationConfig, val_flag
from bagel_sr.validation_math import LOG_KEYS

from bagel_sr.argv import value as flag_value
from .watch import SmokeStop

VAL_LINE = re.compile(r"bagel-sr validation \(step=(\d+)\)")


class ValidationCheckFailure(SmokeStop):
    """Validation did not run, log or write what it should have; the message says which."""


def expected_steps(first: int, last: int, every: int) -> List[int]:
    """The steps a launch running ``first..last`` validates at: its first, then the multiples of ``every``."""
    return [first] + [s for s in range(first + 1, last + 1) if s % every == 0]


def check_validation(logs: Sequence, texts: Sequence[str], results: pathlib.Path, flags: Sequence[str]) -> str:
    """``logs``: the launches' :class:`LaunchLog`; ``texts``: their log texts; ``flags``: the user's flags."""
    every = int(flag_value(flags, val_flag("every")) or ValidationConfig().every)
    expected: List[int] = []
    for log, text in zip(logs, texts):
        if not log.steps:
            raise ValidationCheckFailure("a launch logged no step, so no validation can be checked")
        first, last = (log.start if log.start is not None else min(log.steps)), max(log.steps)
        want = expected_steps(first, last, every)
        seen = [int(m.group(1)) for m in VAL_LINE.finditer(text)]
        if seen != want:
            raise ValidationCheckFailure(f"validation ran at steps {seen}, expected {want} (first step and every {every})")
        lacking = [s for s, items in sorted(log.steps.items()) if not all(k in items for k in LOG_KEYS)]
        if lacking:
            raise ValidationCheckFailure(f"the loop's log lines of step(s) {lacking} lack {', '.join(LOG_KEYS)}")
        expected += want
    table = results / "validation.csv"
    if not table.is_file():
        raise ValidationCheckFailure(f"no {table} was written")
    with open(table, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if [int(r["step"]) for r in rows] != expected:
        raise ValidationCheckFailure(f"{table} holds steps {[r['step'] for r in rows]}, expected {expected}")
    missing = [s for s in expected if not (results / "validation" / f"step_{s:07d}.png").is_file()]
    if missing:
        raise ValidationCheckFailure(f"no grid picture for the validation(s) at step(s) {missing}")
    shares = [float(r["share_of_time"]) for r in rows if r["share_of_time"]]
    forwards = sorted({int(r["model_forwards"]) for r in rows})
    cost = (f", {100 * sum(shares) / len(shares):.0f}% of the time between validations" if shares else "")
    return (f"validated at steps {expected} (val_psnr {float(rows[-1]['val_psnr']):.2f} dB at the last), "
            f"{'/'.join(map(str, forwards))} language-model forwards per validation on rank 0{cost}")
