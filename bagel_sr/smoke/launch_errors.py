"""A failed launch in one line: the first exception of the checkout's log, where in the checkout it was raised.

``torchrun`` ends a failed launch with its own wrapper trace (``ChildFailedError``); what the user needs is the
first exception a rank printed: its type, message and the checkout's own ``file:line`` (the deepest frame inside
the checkout). Two cases get a sentence of their own:

- the checkout asks for a GPU the dry run does not map (a CUDA-only kernel, a CUDA stream, a CUDA extension):
  ``the checkout needs a GPU at FILE:LINE``;
- a ``KeyError`` on a mapping of the checkout (e.g. its decoder-layer registry, looked up with ``--layer_module``):
  the keys the checkout knows, and the flag to pass when the lookup reads ``layer_module``.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import re
import sys
from dataclasses import dataclass, field
from typing import List, Mapping, Optional

from bagel_sr.errors import one_line

#: What a rank prints before each line under some torchrun versions (``[rank0]: ...``).
RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d*\]:\s?")
FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')
EXCEPTION = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::\s?(?P<message>.*))?$")
#: Messages of torch/CUDA/NCCL that mean "this needs a GPU" (what the dry run could not map to the CPU).
NEEDS_GPU = re.compile(r"cuda|nccl|nvidia|gpu|triton|invalid device|no kernel image", re.IGNORECASE)
MAX_KEYS = 12


@dataclass
class Frame:
    file: str
    line: int
    func: str
    code: str = ""


@dataclass
class LoggedException:
    """The first exception of a log: ``type``, first line of ``message``, its frames (outermost first)."""

    type: str
    message: str
    frames: List[Frame] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.type.rsplit(".", 1)[-1]


def first_exception(text: str) -> Optional[LoggedException]:
    """The first Python traceback of ``text`` (a launch's merged output), or None."""
    lines = [RANK_PREFIX.sub("", line.rstrip("\n")) for line in text.splitlines()]
    try:
        start = lines.index("Traceback (most recent call last):")
    except ValueError:
        return None
    frames: List[Frame] = []
    for line in lines[start + 1:]:
        match = FRAME.match(line)
        if match:
            frames.append(Frame(match["file"], int(match["line"]), match["func"]))
        elif line.startswith(" ") or not line.strip():
            stripped = line.strip()
            if frames and not frames[-1].code and stripped and not set(stripped) <= set("^~ "):
                frames[-1].code = stripped
        else:
            match = EXCEPTION.match(line)
            if match is None:  # another rank's log line between this rank's traceback lines
                continue
            return LoggedException(match["type"], (match["message"] or "").strip(), frames)
    return None


def checkout_frame(exc: LoggedException, root: pathlib.Path) -> Optional[Frame]:
    """The deepest frame whose file lies inside the checkout ``root``."""
    root = pathlib.Path(root).resolve()
    for frame in reversed(exc.frames):
        try:
            if pathlib.Path(frame.file).resolve().is_relative_to(root):
                return frame
        except OSError:
            continue
    return None


def _where(frame: Optional[Frame], root: pathlib.Path) -> str:
    if frame is None:
        return ""
    path = pathlib.Path(frame.file).resolve()
    rel = path.relative_to(root.resolve()) if path.is_relative_to(root.resolve()) else path
    return f" at {rel}:{frame.line}" + (f" (`{frame.code}`)" if frame.code else "")


def _module_of(path: str, root: pathlib.Path):
    """The loaded (or importable) module of the checkout file ``path``."""
    resolved = pathlib.Path(path).resolve()
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and pathlib.Path(module.__file__).resolve() == resolved:
            return module
    try:
        dotted = ".".join(resolved.relative_to(root.resolve()).with_suffix("").parts)
        module = importlib.import_module(dotted)
        if pathlib.Path(module.__file__).resolve() == resolved:
            return module
    except Exception:
        pass
    try:  # the dotted name is another checkout's (a package of that name loaded first): load the file itself
        spec = importlib.util.spec_from_file_location(f"_bagel_sr_keys_{abs(hash(str(resolved)))}", resolved)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # not importable on its own: no keys to list
        return None


def _subscripted_names(code: str) -> List[str]:
    """Dotted names subscripted in one line of code, e.g. ``Decoder_layer_dict`` in ``x = Decoder_layer_dict[k]``."""
    try:
        tree = ast.parse(code.strip().rstrip(":\\(") if code else "")
    except SyntaxError:
        return re.findall(r"([A-Za-z_][\w.]*)\[", code)
    return [ast.unparse(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.value, (ast.Name, ast.Attribute))]


def registry_keys(frame: Frame, root: pathlib.Path) -> Optional[tuple]:
    """(name, keys) of the module-level mapping the frame's line subscripts, if it can be found."""
    module = _module_of(frame.file, root)
    if module is None:
        return None
    for name in _subscripted_names(frame.code):
        value = module
        for part in name.split("."):
            value = getattr(value, part, None) if value is not None else None
        if isinstance(value, Mapping):
            return name, [str(k) for k in value]
    return None


def explain(exc: LoggedException, root: str | pathlib.Path) -> str:
    """One line saying what the checkout raised and where, with the two special cases of the module doc."""
    root = pathlib.Path(root)
    frame = checkout_frame(exc, root)
    raised = f"{exc.name}: {exc.message}" if exc.message else exc.name
    if exc.name == "KeyError" and frame is not None:
        found = registry_keys(frame, root)
        if found:
            name, keys = found
            known = ", ".join(keys[:MAX_KEYS]) + (", ..." if len(keys) > MAX_KEYS else "")
            line = f"{raised}{_where(frame, root)}: {exc.message} is not a key of the checkout's `{name}`; it knows {known}"
            if "layer_module" in frame.code:
                line += "; pass --layer_module with one of them"
            return one_line(line)
    if NEEDS_GPU.search(exc.message) or NEEDS_GPU.search(exc.type):
        place = _where(frame or (exc.frames[-1] if exc.frames else None), root) or " (no frame in the log)"
        return one_line(f"the checkout needs a GPU{place}, which the dry run does not map to the CPU: {raised}")
    return one_line(f"{raised}{_where(frame or (exc.frames[-1] if exc.frames else None), root)}")


def explain_log(text: str, root: str | pathlib.Path, tail_lines: int = 25) -> str:
    """:func:`explain` of the log's first exception; the log's last lines when it holds no traceback."""
    exc = first_exception(text)
    if exc is not None:
        return explain(exc, root)
    return "no traceback in the log; its last lines:\n" + "".join(text.splitlines(keepends=True)[-tail_lines:])
