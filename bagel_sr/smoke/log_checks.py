"""What a launch of the dry run logged (:class:`LaunchLog`, read from the loop's own log lines) and the checks the
dry run makes on it: the pixel term acted and its keys reached the log, every loss is finite, the second launch
resumed from the first one's checkpoint. A failed check raises :class:`SmokeFailure` naming what failed."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from bagel_sr.state import KEY_PREFIX  # our log keys' prefix when a checkout returns the same keys

from .watch import SmokeStop

LOG_LINE = re.compile(r"\(step=(\d+)\) (.*)")
LOSS_ITEM = re.compile(r"Train Loss (\w+): (\S+?),")
START_LINE = re.compile(r"Training for (\d+) steps, starting at (\d+)")
PIXEL_KEYS = ("pixel", "pixel_images", "pixel_weight")


class SmokeFailure(SmokeStop):
    """A check of the dry run failed; the message says which."""


@dataclass
class LaunchLog:
    """What one launch's log shows: ``steps[step] = {key: value}`` and the step ``main()`` said it starts at."""

    steps: Dict[int, Dict[str, float]] = field(default_factory=dict)
    start: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "LaunchLog":
        log = cls()
        for line in text.splitlines():
            start = START_LINE.search(line)
            if start and log.start is None:
                log.start = int(start.group(2))
            match = LOG_LINE.search(line)
            if match:
                items = {k: float(v) for k, v in LOSS_ITEM.findall(match.group(2) + ",")}
                if items:
                    log.steps.setdefault(int(match.group(1)), items)
        return log

    def trajectory(self, keys: Sequence[str] = ("mse", "ce")) -> List[tuple]:
        return [(s, tuple(self.steps[s].get(k) for k in keys)) for s in sorted(self.steps)]


def check_pixel_term(logs: Sequence[LaunchLog]) -> str:
    """The pixel keys reached the log lines and some step admitted an image. A checkout whose forward returns
    ``pixel`` itself logs ours as ``bagel_sr_pixel``, ... (``PixelLossState.key``): those are read then."""
    lines = [items for log in logs for items in log.steps.values()]
    if not lines:
        raise SmokeFailure("the loop logged no step (look at the launch log)")
    prefix = KEY_PREFIX if any(KEY_PREFIX + "pixel" in items for items in lines) else ""
    keys = [prefix + k for k in PIXEL_KEYS]
    missing = [k for k in keys if not any(k in items for items in lines)]
    if missing:
        raise SmokeFailure(f"the loop's log lines lack {', '.join(missing)}: the pixel term's keys did not reach them")
    images = prefix + "pixel_images"
    admitted = sum(items.get(images, 0.0) for items in lines)
    if admitted <= 0:
        raise SmokeFailure(
            f"the pixel term admitted no image in {len(lines)} logged steps ({images} stayed 0): check "
            "--pixel_loss_datasets / --pixel_loss_paired_only against your data, or raise --steps")
    where = f" (as {prefix}*: the checkout logs its own pixel keys)" if prefix else ""
    return f"pixel term acted on {sum(1 for i in lines if i.get(images, 0) > 0)}/{len(lines)} steps{where}"


def check_finite(logs: Sequence[LaunchLog]) -> None:
    for log in logs:
        for step, items in sorted(log.steps.items()):
            bad = [k for k, v in items.items() if not math.isfinite(v)]
            if bad:
                raise SmokeFailure(f"non-finite {', '.join(bad)} at step {step}")


def check_resume(first: LaunchLog, second: LaunchLog, saved_step: int) -> str:
    expected = saved_step + 1  # BAGEL's resume: int(checkpoint folder name) + 1
    if second.start != expected:
        raise SmokeFailure(f"the resumed launch started at step {second.start}, expected {expected} "
                           f"(checkpoint {saved_step:07d} of the first launch)")
    if second.steps and min(second.steps) != expected:
        raise SmokeFailure(f"the resumed launch's first logged step is {min(second.steps)}, expected {expected}")
    return f"resumed from checkpoint {saved_step:07d} at step {expected}"
