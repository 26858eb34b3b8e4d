"""Output writing: parquet shards in BAGEL's edit layout, manifest, held-out PNGs, resumable state.

Parquet rows (what ``UnifiedEditIterableDataset.parse_row`` reads)::

    image_list:       list<binary>        [condition PNG, target PNG]  (8-bit RGB, same size)
    instruction_list: list<list<string>>  [[variant, variant, ...]]   (one step: image 0 -> image 1)
    pair_id:          string              (extra column, ignored by BAGEL; joins the manifest)

Commit protocol (crash-safe, resumable): sources are buffered per split; a full buffer is written
as one shard (temp file + rename), its manifest part likewise, then one fsynced line appended to the
journal records the shard and its sources as done. Anything on disk that the state does not list is an
orphan of an interrupted commit and is removed on resume; those sources are simply built again
(deterministically, so the pairs are identical).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bagel_sr import dataset_layout as layout
from .feeding import row_group_size

SCHEMA = pa.schema([
    ("image_list", pa.list_(pa.binary())),
    ("instruction_list", pa.list_(pa.list_(pa.string()))),
    ("pair_id", pa.string()),
])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass
class Pair:
    """One condition/target pair ready to be written; ``manifest`` gets shard/row/heldout on commit."""

    pair_id: str
    split: str
    lr_png: bytes
    hr_png: bytes
    instructions: list[str]
    manifest: dict[str, Any]


@dataclass
class BuildState:
    """Resume state: a small header (``build_state.json``) plus an append-only journal of commits.

    Journal lines (``.build/journal.jsonl``, one JSON object each, appended and fsynced): ``{"type":
    "commit", "split", "shard": {path, manifest_part, rows, num_row_groups} | null, "sources": {id: pairs}}``
    and ``{"type": "failed", "source", "reason"}``. A torn last line (crash mid-append) is dropped on load.
    """

    fingerprint: str
    sources_digest: str
    n_sources: int
    complete: bool = False
    version: int = 2
    done: dict[str, dict[str, Any]] = field(default_factory=dict)      # from the journal
    failed: dict[str, str] = field(default_factory=dict)
    shards: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {s: [] for s in layout.SPLITS})

    HEADER = ("fingerprint", "sources_digest", "n_sources", "complete", "version")

    @staticmethod
    def journal_path(out: Path) -> Path:
        return out / layout.PARTS_DIR / layout.JOURNAL_FILE

    @classmethod
    def load(cls, out: Path) -> "BuildState":
        header = json.loads((out / layout.STATE_FILE).read_text(encoding="utf-8"))
        if header.get("version") != 2:
            raise ValueError(f"{out / layout.STATE_FILE}: unknown state version {header.get('version')!r}")
        state = cls(**{k: header[k] for k in cls.HEADER})
        journal = cls.journal_path(out)
        if journal.is_file():
            data = journal.read_bytes()
            *lines, tail = data.split(b"\n")
            for line in lines:
                state._apply(json.loads(line))
            if tail:  # torn append: keep only the complete lines
                atomic_write_bytes(journal, data[: len(data) - len(tail)])
        return state

    def save_header(self, out: Path) -> None:
        atomic_write_text(out / layout.STATE_FILE, json.dumps({k: getattr(self, k) for k in self.HEADER}, indent=1))

    def record(self, out: Path, entry: dict[str, Any]) -> None:
        """Append one journal entry durably, then apply it."""
        path = self.journal_path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(json.dumps(entry, sort_keys=True).encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._apply(entry)

    def _apply(self, entry: dict[str, Any]) -> None:
        if entry["type"] == "failed":
            self.failed[entry["source"]] = entry["reason"]
            return
        shard = entry["shard"]
        if shard is not None:
            self.shards[entry["split"]].append(shard)
        for sid, n in entry["sources"].items():
            self.done[sid] = {"split": entry["split"], "pairs": n, "shard": shard["path"] if shard and n else None}

    def pairs(self, split: str) -> int:
        return sum(s["rows"] for s in self.shards[split])


class ShardWriter:
    """Buffers pairs per split and commits full shards (see the module docstring)."""

    def __init__(self, out_dir: Path, state: BuildState, rows_per_shard: int, rows_per_row_group: int, heldout_png: bool,
                 readers: int = 1):
        self.readers = readers  # ranks x loader workers: a shard gets that many row groups when it has the rows
        self.out = out_dir
        self.state = state
        self.rows_per_shard = rows_per_shard
        self.rows_per_row_group = rows_per_row_group
        self.heldout_png = heldout_png
        self.buffers: dict[str, list[tuple[str, list[Pair]]]] = {s: [] for s in layout.SPLITS}

    def remove_orphans(self) -> list[str]:
        """Delete shards / manifest parts / temp files not recorded in the state (interrupted commit)."""
        keep = {s["path"] for split in layout.SPLITS for s in self.state.shards[split]}
        keep |= {s["manifest_part"] for split in layout.SPLITS for s in self.state.shards[split]}
        keep.add(f"{layout.PARTS_DIR}/{layout.JOURNAL_FILE}")
        removed = []
        for folder in [self.out / layout.PARQUET_DIR / s for s in layout.SPLITS] + [self.out / layout.PARTS_DIR]:
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                rel = f.relative_to(self.out).as_posix()
                if f.is_file() and rel not in keep:
                    f.unlink()
                    removed.append(rel)
        for f in self.out.rglob(".*.tmp*"):
            f.unlink()
        return removed

    def add(self, split: str, source_id: str, pairs: list[Pair]) -> None:
        self.buffers[split].append((source_id, pairs))
        if sum(len(p) for _, p in self.buffers[split]) >= self.rows_per_shard:
            self.flush(split)

    def flush(self, split: str) -> None:
        entries = self.buffers[split]
        pairs = [p for _, ps in entries for p in ps]
        index = len(self.state.shards[split])
        shard = None
        if pairs:
            shard_rel = f"{layout.PARQUET_DIR}/{split}/part-{index:05d}.parquet"
            part_rel = f"{layout.PARTS_DIR}/manifest-{split}-{index:05d}.jsonl"
            row_groups = self._write_shard(self.out / shard_rel, pairs)
            lines = []
            for row, p in enumerate(pairs):
                m = dict(p.manifest, shard=shard_rel, row=row)
                if self.heldout_png and split in layout.HELDOUT_SPLITS:
                    m["heldout"] = {}
                    for side, data in (("lr", p.lr_png), ("hr", p.hr_png)):
                        rel = f"{layout.HELDOUT_DIR}/{split}/{side}/{p.pair_id}.png"
                        atomic_write_bytes(self.out / rel, data)
                        m["heldout"][side] = rel
                lines.append(json.dumps(m, sort_keys=True))
            atomic_write_text(self.out / part_rel, "".join(line + "\n" for line in lines))
            shard = {"path": shard_rel, "manifest_part": part_rel, "rows": len(pairs), "num_row_groups": row_groups}
        self.state.record(self.out, {"type": "commit", "split": split, "shard": shard,
                                     "sources": {sid: len(ps) for sid, ps in entries}})
        self.buffers[split] = []

    def _write_shard(self, path: Path, pairs: list[Pair]) -> int:
        table = pa.Table.from_pydict(
            {
                "image_list": [[p.lr_png, p.hr_png] for p in pairs],
                "instruction_list": [[p.instructions] for p in pairs],
                "pair_id": [p.pair_id for p in pairs],
            },
            schema=SCHEMA,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # no .parquet suffix: BAGEL lists *.parquet
        pq.write_table(table, tmp, row_group_size=row_group_size(len(pairs), self.rows_per_row_group, self.readers))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return pq.ParquetFile(path).metadata.num_row_groups

    def flush_all(self) -> None:
        for split in layout.SPLITS:
            if self.buffers[split]:
                self.flush(split)

    def mark_failed(self, source_id: str, reason: str) -> None:
        self.state.record(self.out, {"type": "failed", "source": source_id, "reason": reason})

    # -- final files ------------------------------------------------------------------------------
    def write_manifest(self) -> int:
        """Concatenate committed manifest parts (split order, shard order) into ``manifest.jsonl``."""
        chunks = []
        for split in layout.SPLITS:
            for shard in self.state.shards[split]:
                chunks.append((self.out / shard["manifest_part"]).read_text(encoding="utf-8"))
        text = "".join(chunks)
        atomic_write_text(self.out / layout.MANIFEST_FILE, text)
        self._prune_heldout(text)
        return text.count("\n")

    def _prune_heldout(self, manifest_text: str) -> None:
        wanted = set()
        for line in manifest_text.splitlines():
            held = json.loads(line).get("heldout") or {}
            wanted.update(held.values())
        for split in layout.HELDOUT_SPLITS:  # only our own folders: heldout/<split>/<lr|hr>/
            for side in ("lr", "hr"):
                for f in (self.out / layout.HELDOUT_DIR / split / side).glob("*.png"):
                    if f.relative_to(self.out).as_posix() not in wanted:
                        f.unlink()

    def write_parquet_info(self) -> dict[str, str]:
        """``parquet_info/<split>.json``: ``{absolute parquet path: {num_row_groups, num_rows}}`` per split.

        BAGEL looks a shard up under ``os.path.join(data_dir, file name)``, so keys are absolute paths
        built from the absolute ``data_dir`` (the registration patch re-keys them if the set moves).
        """
        paths = {}
        for split in layout.SPLITS:
            if not self.state.shards[split]:
                continue
            info = {
                os.path.join(str(self.out / layout.PARQUET_DIR / split), Path(s["path"]).name): {
                    "num_row_groups": s["num_row_groups"], "num_rows": s["rows"]}
                for s in self.state.shards[split]
            }
            rel = f"{layout.PARQUET_INFO_DIR}/{split}.json"
            atomic_write_text(self.out / rel, json.dumps(info, indent=1, sort_keys=True))
            paths[split] = rel
        return paths


#: Files a build writes: fixed names, and name patterns inside the folders it owns (an interrupted commit may
#: have left some of them before the journal recorded them). Anything else in the output folder is not ours.
OWN_FILES = (layout.REGISTRATION_FILE, layout.DATASET_CONFIG_FILE, layout.MANIFEST_FILE, layout.REPORT_FILE,
             layout.STATE_FILE, layout.CONFIG_COPY_FILE)
OWN_PATTERNS = tuple(
    [f"{layout.PARQUET_DIR}/{s}/part-*.parquet" for s in layout.SPLITS]
    + [f"{layout.PARQUET_DIR}/{s}/.part-*.parquet.tmp*" for s in layout.SPLITS]
    + [f"{layout.PARQUET_INFO_DIR}/{s}{ext}" for s in layout.SPLITS for ext in (".json", ".resolved.json")]
    + [f"{layout.HELDOUT_DIR}/{s}/{side}/{name}" for s in layout.HELDOUT_SPLITS for side in ("lr", "hr")
       for name in ("*.png", ".*.png.tmp*")]
    + [f"{layout.PARTS_DIR}/{layout.JOURNAL_FILE}", f"{layout.PARTS_DIR}/manifest-*.jsonl",
       f"{layout.PARTS_DIR}/.manifest-*.jsonl.tmp*"]
    + [f".{name}.tmp*" for name in (layout.REGISTRATION_FILE, layout.DATASET_CONFIG_FILE, layout.MANIFEST_FILE,
                                     layout.REPORT_FILE, layout.STATE_FILE, layout.CONFIG_COPY_FILE)])


def remove_build(out_dir: Path) -> int:
    """Delete the files of a previous build (``--overwrite``) and the folders they leave empty; files the build did
    not write (a user's notes, other results) are kept. Returns the number of files removed."""
    files = {out_dir / f for f in OWN_FILES} | {p for pat in OWN_PATTERNS for p in out_dir.glob(pat)}
    removed = 0
    for f in sorted(files):
        if f.is_file():
            f.unlink()
            removed += 1
    for d in sorted((p for p in out_dir.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    return removed
