"""Names a user gives (``--pixel_loss_datasets`` and other name lists) checked against the ones that exist."""
from __future__ import annotations

import difflib
from typing import Iterable

from bagel_sr.errors import UserError


def check_names(flag: str, given: Iterable[str] | None, known: Iterable[str]) -> None:
    """Raise :class:`~bagel_sr.errors.UserError` for the first name of ``given`` not in ``known``, with the closest
    known name as a suggestion and the full list."""
    known = sorted(set(known))
    for name in sorted(set(given or ())):
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{flag}: unknown data set '{name}'{hint} Known: {', '.join(known) or '(none)'}")
