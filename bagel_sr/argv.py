"""Flags on a command line that is passed on to another parser: find, read and take out ``--name value`` /
``--name=value`` without declaring the other parser's flags (the wrapper's own flags before the checkout's parser
sees the rest, the dry run's look at what it passes on).

One rule for every caller: a flag's value is what follows ``=``, else the next word unless that word starts with
``--`` or is ``-h`` (then the flag has no value, as a bare boolean flag); ``-1`` is a value.  Words are never
reordered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Sequence, Tuple

from .errors import UsageError

HELP_WORDS = ("-h", "--help")


@dataclass(frozen=True)
class Word:
    """One flag with its value (``name`` without ``--``; ``value`` None when it has none) or one other word
    (``name`` None); ``words``: as written on the command line."""

    name: Optional[str]
    value: Optional[str]
    words: Tuple[str, ...]


def scan(argv: Sequence[str]) -> List[Word]:
    """``argv`` as flags with their values and other words, in order."""
    argv, out, i = list(argv), [], 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("--") or word == "--":
            out.append(Word(None, None, (word,)))
        elif "=" in word:
            name, _, value = word[2:].partition("=")
            out.append(Word(name, value, (word,)))
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and argv[i + 1] not in HELP_WORDS:
            out.append(Word(word[2:], argv[i + 1], (word, argv[i + 1])))
            i += 1
        else:
            out.append(Word(word[2:], None, (word,)))
        i += 1
    return out


def value(argv: Sequence[str], name: str) -> Optional[str]:
    """The last value of ``--name`` (as argparse keeps it), or None when it is not given or has no value."""
    found = [w.value for w in scan(argv) if w.name == name]
    return found[-1] if found else None


def given(argv: Sequence[str], name: str) -> bool:
    """Whether ``--name`` is on the command line (with or without a value)."""
    return any(w.name == name for w in scan(argv))


def with_prefix(argv: Sequence[str], prefix: str) -> List[str]:
    """The words of the flags whose name starts with ``prefix`` (with their values), in order."""
    return [word for w in scan(argv) if w.name is not None and w.name.startswith(prefix) for word in w.words]


def split(argv: Sequence[str], names: Collection[str], *, prefixes: Collection[str] = (),
          switches: Collection[str] = ()) -> Tuple[Dict[str, str], List[str], List[str]]:
    """Take out ``--name value`` for each of ``names`` (each needs a value, but for ``switches``, which alone mean
    ``True``; the last one given wins) and keep the words of flags starting with one of ``prefixes`` apart.  Returns
    ``(values, prefixed, rest)``: ``prefixed`` and ``rest`` as written, in order.  A named flag without a value
    raises :class:`~bagel_sr.errors.UsageError`."""
    values: Dict[str, str] = {}
    prefixed: List[str] = []
    rest: List[str] = []
    for w in scan(argv):
        if w.name in names:
            if w.value is None and w.name not in switches:
                raise UsageError(f"--{w.name} needs a value")
            values[w.name] = "True" if w.value is None else w.value
        elif w.name is not None and any(w.name.startswith(p) for p in prefixes):
            prefixed += w.words
        else:
            rest += w.words
    return values, prefixed, rest


def wants_help(argv: Sequence[str]) -> bool:
    """``-h`` or ``--help`` among the words (not as a flag's value)."""
    return any(w.name is None and w.words[0] in HELP_WORDS or w.name == "help" for w in scan(argv))
