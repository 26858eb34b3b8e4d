"""Register built bagel-sr sets in a BAGEL checkout's ``DATASET_INFO`` at run time (no edits to its files).

The wrapper calls :func:`register_built_datasets` with the path(s) its flag names before BAGEL builds
its ``PackedDataset``; BAGEL's ``data.dataset_base`` holds the same ``DATASET_INFO`` dict object, so
entries added here are seen there. Accepted paths: a built set's ``bagel_sr_dataset.yaml``, its
``dataset_config.yaml`` (the sibling file is used) or the output folder itself.

Fact checked before patching: ``data.dataset_info.DATASET_REGISTRY['unified_edit']`` exists and
``DATASET_INFO`` is a dict; its ``'unified_edit'`` group is created when a fork holds only its own groups. A set
built with ``--vlm_sft_from`` also registers its chat set (``text_group`` of the file) under
``DATASET_INFO['vlm_sft']``, which needs ``DATASET_REGISTRY['vlm_sft']``.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import yaml

from bagel_sr import dataset_layout as layout
from bagel_sr.names import check_names  # noqa: F401 (re-exported: the wrapper's name check)
from bagel_sr.errors import UserError

from .undo import Undo, replace_item


class DatasetRegistrationError(UserError, RuntimeError):
    """The checkout or the built set does not have what registration needs (the message says what)."""


class DatasetRegistration(Undo):
    """Handle returned by :func:`register_built_datasets`: an :class:`~bagel_sr.patches.undo.Undo` of the entries
    (and groups) it added to ``DATASET_INFO``; ``names``: the data sets registered."""

    def __init__(self, names: Iterable[str] = ()):
        super().__init__()
        self.names = list(names)


def _registration_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / layout.REGISTRATION_FILE
    elif p.name == layout.DATASET_CONFIG_FILE:
        p = p.with_name(layout.REGISTRATION_FILE)
    if not p.is_file():
        raise DatasetRegistrationError(
            f"no built bagel-sr set at {path}: expected {layout.REGISTRATION_FILE} (written by "
            f"`python -m bagel_sr.data build`), its dataset_config.yaml, or the output folder")
    return p


def _parquet_info(entry_dir: Path, info_path: Path, split_name: str) -> str:
    """Path of a parquet-info JSON keyed the way BAGEL looks shards up (``os.path.join(data_dir, name)``).

    If the set was moved since the build, a re-keyed copy is written next to the original (or to a temp
    file when that folder is read-only) and its path returned.
    """
    info = json.loads(info_path.read_text(encoding="utf-8"))
    data_dir = str(entry_dir)
    rekeyed = {os.path.join(data_dir, os.path.basename(k)): v for k, v in info.items()}
    missing = [k for k in rekeyed if not os.path.isfile(k)]
    if missing:
        raise DatasetRegistrationError(f"built set '{split_name}': shard(s) listed in {info_path} are missing: {missing[:3]}")
    if rekeyed == info:
        return str(info_path)
    text = json.dumps(rekeyed, indent=1, sort_keys=True)
    target = info_path.with_name(info_path.stem + ".resolved.json")
    try:
        target.write_text(text, encoding="utf-8")
    except OSError:
        fd, tmp = tempfile.mkstemp(prefix=f"bagel_sr_{split_name}_", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        target = Path(tmp)
    return str(target)


def load_built_dataset(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{dataset name: DATASET_INFO entry}`` of one built set, with absolute paths."""
    reg = _registration_file(path)
    meta = yaml.safe_load(reg.read_text(encoding="utf-8")) or {}
    if meta.get("format") != layout.REGISTRATION_FORMAT:
        raise DatasetRegistrationError(
            f"{reg}: format {meta.get('format')!r} is not {layout.REGISTRATION_FORMAT!r}; rebuild the set with this bagel-sr")
    base = reg.parent.absolute()
    entries = {}
    for name, e in (meta.get("datasets") or {}).items():
        data_dir = Path(os.path.normpath(base / e["data_dir"]))
        if not data_dir.is_dir():
            raise DatasetRegistrationError(f"{reg}: data_dir of '{name}' does not exist: {data_dir}")
        entries[name] = {
            "data_dir": str(data_dir),
            "num_files": int(e["num_files"]),
            "num_total_samples": int(e["num_total_samples"]),
            "parquet_info_path": _parquet_info(data_dir, Path(os.path.normpath(base / e["parquet_info_path"])), name),
        }
    if not entries:
        raise DatasetRegistrationError(f"{reg} lists no datasets")
    return entries


def load_text_group(path: str | os.PathLike[str]) -> tuple[str, str, dict[str, Any]] | None:
    """``(group, name, DATASET_INFO entry)`` of the chat set a build added with ``--vlm_sft_from``, or None."""
    reg = _registration_file(path)
    text = (yaml.safe_load(reg.read_text(encoding="utf-8")) or {}).get("text_group")
    if not text:
        return None
    for key in ("jsonl_path", "data_dir"):
        if not os.path.exists(text[key]):
            raise DatasetRegistrationError(f"{reg}: the text group's {key} does not exist: {text[key]}")
    entry = {k: text[k] for k in ("data_dir", "jsonl_path", "num_total_samples")}
    return text["group"], text["name"], entry


def _register_text_groups(module: ModuleType, paths: list, handle: "DatasetRegistration") -> None:
    for p in paths:
        found = load_text_group(p)
        if found is None:
            continue
        group_name, name, entry = found
        if group_name not in (getattr(module, "DATASET_REGISTRY", None) or {}):
            raise DatasetRegistrationError(f"BAGEL checkout mismatch: no DATASET_REGISTRY['{group_name}'] for the "
                                           f"chat set of {p}")
        if group_name not in module.DATASET_INFO:
            handle.add(group_name, replace_item(module.DATASET_INFO, group_name, {}))
        handle.add(name, replace_item(module.DATASET_INFO[group_name], name, entry))


def _check_checkout(module: ModuleType) -> dict[str, Any]:
    """``DATASET_INFO['unified_edit']``, or an empty dict when the registry maps the type but ``DATASET_INFO`` holds
    no group for it (forks keep only their own groups; the registration adds it)."""
    info = getattr(module, "DATASET_INFO", None)
    registry = getattr(module, "DATASET_REGISTRY", None)
    where = getattr(module, "__file__", module.__name__)
    if not isinstance(registry, dict) or layout.BAGEL_GROUP not in registry:
        raise DatasetRegistrationError(
            f"BAGEL checkout mismatch: {where} has no DATASET_REGISTRY['{layout.BAGEL_GROUP}']; the built sets need "
            f"BAGEL's UnifiedEditIterableDataset registered under that name")
    if not isinstance(info, dict):
        raise DatasetRegistrationError(f"BAGEL checkout mismatch: {where} has no DATASET_INFO dict to register into")
    group = info.get(layout.BAGEL_GROUP)
    if group is None:
        return {}
    if not isinstance(group, dict):
        raise DatasetRegistrationError(
            f"BAGEL checkout mismatch: {where}: DATASET_INFO['{layout.BAGEL_GROUP}'] is a "
            f"{type(group).__name__}, not a dict of data sets")
    return group


def register_built_datasets(
    yaml_paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    dataset_info_module: ModuleType | None = None,
    *,
    replace: bool = False,
) -> DatasetRegistration:
    """Add the built set(s) to ``DATASET_INFO['unified_edit']`` of the checkout on ``sys.path``.

    ``dataset_info_module`` defaults to ``importlib.import_module('data.dataset_info')``. Re-registering
    an identical entry is a no-op; a different entry under an existing name raises unless ``replace``.
    Returns a handle whose ``undo()`` restores the previous entries.
    """
    if isinstance(yaml_paths, (str, os.PathLike)):
        yaml_paths = [yaml_paths]
    yaml_paths = list(yaml_paths)
    module = dataset_info_module or importlib.import_module("data.dataset_info")
    group = _check_checkout(module)
    entries: dict[str, dict[str, Any]] = {}
    for p in yaml_paths:
        for name, entry in load_built_dataset(p).items():
            if name in entries and entries[name] != entry:
                raise DatasetRegistrationError(f"two built sets given define the dataset name '{name}'")
            entries[name] = entry
    for name, entry in entries.items():
        old = group.get(name)
        if old is not None and old != entry and not replace:
            raise DatasetRegistrationError(
                f"DATASET_INFO['{layout.BAGEL_GROUP}'] already has '{name}' with data_dir {old.get('data_dir')!r}; "
                f"rename the built set (config key 'name') or pass replace=True")
    handle = DatasetRegistration(entries)
    try:
        if layout.BAGEL_GROUP not in module.DATASET_INFO:
            handle.add(layout.BAGEL_GROUP, replace_item(module.DATASET_INFO, layout.BAGEL_GROUP, group))
        for name, entry in entries.items():
            handle.add(name, replace_item(group, name, entry))
        _register_text_groups(module, yaml_paths, handle)
    except Exception:
        handle.undo()
        raise
    return handle


def register_datasets(ctx) -> Undo:
    """Registry row: :func:`register_built_datasets` of ``ctx.dataset_yamls`` into ``ctx.dataset_info_module``
    (``data.dataset_info`` of the checkout when unset); returns its handle."""
    module = ctx.module("dataset_info_module", "data.dataset_info")
    return register_built_datasets(list(ctx.dataset_yamls), module)


# -- names checked against what exists (the check itself: bagel_sr.names.check_names) -------------------------

def dataset_config_names(parsed: Iterable[Any]) -> list[str] | None:
    """Group names of the ``--dataset_config_file`` among parsed argument dataclasses (what BAGEL's loop puts in
    ``batch_data_indexes``), or ``None`` when no such file is named or it does not exist (BAGEL reports that)."""
    for item in parsed:
        path = getattr(item, "dataset_config_file", None)
        if path and Path(path).is_file():

            try:
                meta = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                raise UserError(f"--dataset_config_file {path}: cannot be read as YAML ({e})") from None
            return list(meta) if isinstance(meta, dict) else []
    return None
