"""Replace-and-undo, one way for every patch: :func:`replace_attribute` / :func:`replace_item` change one name and
return an :class:`Undo`, the one handle type that puts things back.

An :class:`Undo` holds the changes of one or more patches, newest last; ``undo()`` (or calling it, or leaving a
``with`` block) reverts them newest first, once.  :data:`NOTHING` is the undo of a patch that changed nothing (its
target absent, or the patch already in force: the first caller owns it); ``changed`` tells the two apart, which is
how the registry lists only the patches that really applied.
"""
from __future__ import annotations

from typing import Any, Callable, List, MutableMapping, Optional, Tuple, Union

_ABSENT = object()


class Undo:
    """Reverts what patches changed, newest first; ``applied``: the names of the changes it holds."""

    def __init__(self, revert: Optional[Callable[[], None]] = None, name: str = ""):
        self._reverts: List[Tuple[str, Callable[[], None]]] = [] if revert is None else [(name, revert)]

    @property
    def changed(self) -> bool:
        """True when there is something to revert (False for :data:`NOTHING` and after ``undo()``)."""
        return bool(self._reverts)

    @property
    def applied(self) -> List[str]:
        return [name for name, _ in self._reverts]

    def add(self, name: str, undo: "UndoLike") -> bool:
        """Take over ``undo``'s changes under ``name`` (nothing when it changed nothing); True when it did."""
        undo = as_undo(undo)
        if not undo.changed:
            return False
        self._reverts.append((name, undo.undo))
        return True

    def undo(self) -> None:
        while self._reverts:
            _, revert = self._reverts.pop()
            revert()

    def __call__(self) -> None:
        self.undo()

    def __enter__(self) -> "Undo":
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(applied={self.applied})"


class _Nothing(Undo):
    """The undo of a patch that changed nothing: never holds a change."""

    def add(self, name: str, undo: "UndoLike") -> bool:
        raise TypeError("NOTHING holds no changes; make an Undo() to collect them")


#: The undo of a patch that changed nothing.
NOTHING: Undo = _Nothing()

UndoLike = Union[Undo, Callable[[], None]]


def as_undo(undo: UndoLike) -> Undo:
    """``undo`` as an :class:`Undo` (a plain callable counts as one change)."""
    if isinstance(undo, Undo):
        return undo
    if not callable(undo):
        raise TypeError(f"a patch must return an Undo (or a callable), got {type(undo).__name__}")
    return Undo(undo)


def combine(*undos: UndoLike) -> Undo:
    """One undo for several: reverts them newest first; :data:`NOTHING` when none changed anything."""
    out = Undo()
    for i, undo in enumerate(undos):
        out.add(str(i), undo)
    return out if out.changed else NOTHING


def replace_attribute(owner: Any, name: str, value: Any, *, must_exist: bool = False) -> Undo:
    """Set ``owner.name = value``; the undo puts back what ``owner`` itself held (or deletes the name when it held
    none, e.g. a method inherited from a base class), unless someone replaced ``value`` since.

    ``must_exist``: raise ``AttributeError`` when ``owner`` has no such name (not even inherited).
    """
    if must_exist and not hasattr(owner, name):
        raise AttributeError(f"{owner!r} has no attribute {name!r} to replace")
    old = vars(owner).get(name, _ABSENT)
    setattr(owner, name, value)

    def undo() -> None:
        if vars(owner).get(name, _ABSENT) is not value:
            return  # replaced again since: not ours to put back
        if old is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, old)

    return Undo(undo, name)


def replace_item(mapping: MutableMapping, key: Any, value: Any) -> Undo:
    """Set ``mapping[key] = value`` (``sys.modules``, a dict of data sets); the undo restores the old entry or
    removes the key when there was none, unless the entry was replaced since."""
    old = mapping.get(key, _ABSENT)
    mapping[key] = value

    def undo() -> None:
        if mapping.get(key, _ABSENT) is not value:
            return
        if old is _ABSENT:
            del mapping[key]
        else:
            mapping[key] = old

    return Undo(undo, str(key))
