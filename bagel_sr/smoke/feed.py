"""What BAGEL's data loader will get from a ``--dataset_config_file``, read before any launch.

Per group of the config (``{group: {dataset_names, num_used_data, image_transform_args, ...}}``) and its
``DATASET_INFO`` entries, :func:`read_feed` finds

- the *units* BAGEL deals out: parquet row groups (``parquet_info_path`` entries; ``num_used_data`` files per
  data folder, the folder's listing repeated when it holds fewer) or jsonl lines (``jsonl_path`` entries, the first
  ``num_used_data`` lines). BAGEL gives each rank ``units // world_size`` of them and each loader worker
  ``that // num_workers``; a worker with none loops forever without yielding (its log says ``repeat in rank``).
- bounds on a sample's token length as the loop counts it: ``num_tokens + 2 * len(sequence_plan)``, with
  ``h*w / stride**2`` tokens per image after the group's image transform (16x16 pixels per VAE token, 14x14 per ViT
  patch), plus its text. The lower bound counts no text, the upper one a token per UTF-8 byte (a byte-level
  tokenizer's count; a BPE tokenizer's is never more).

The image transform is the checkout's own (``data.transforms.ImageTransform``), applied to blank images of each
size seen. Pure reading: nothing here launches, registers or writes.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

#: Samples read per group to bound token lengths (row groups / lines are counted in full).
SAMPLE_ROWS = 64


@dataclass
class GroupFeed:
    """One group of a dataset config as the loader will see it."""

    name: str
    kind: str                      # "parquet", "jsonl" or "unknown"
    units: int = 0                 # row groups (parquet) or lines (jsonl) dealt over ranks x workers
    is_mandatory: bool = False
    min_tokens: Optional[int] = None
    max_tokens: Optional[int] = None
    problems: List[str] = field(default_factory=list)

    @property
    def unit_noun(self) -> str:
        return {"parquet": "row group", "jsonl": "line"}.get(self.kind, "unit")

    def per_worker(self, world_size: int, num_workers: int) -> int:
        """Units one loader worker of one rank gets (BAGEL drops the remainder of each division)."""
        return (self.units // max(world_size, 1)) // max(num_workers, 1)


class TokenCounter:
    """Tokens of one image after a group's transform, from the checkout's ``ImageTransform`` (cached per size)."""

    def __init__(self, transform_cls: Callable[..., Any]):
        self.transform_cls = transform_cls
        self._cache: Dict[Tuple[str, int, int], int] = {}

    def __call__(self, args: Optional[dict], size: Tuple[int, int]) -> int:
        if not args:
            return 0
        key = (json.dumps(args, sort_keys=True), size[0], size[1])
        if key not in self._cache:
            from PIL import Image

            transform = self.transform_cls(**args)
            height, width = transform(Image.new("RGB", size)).shape[1:]
            self._cache[key] = int(height * width // transform.stride ** 2)
        return self._cache[key]


def _parquet_feed(feed: GroupFeed, spec: dict, entries: List[dict], num_used: List[int], tokens: TokenCounter) -> None:
    import pyarrow.parquet as pq
    from PIL import Image

    info: Dict[str, Any] = {}
    for entry in entries:
        try:
            info.update(json.loads(Path(entry["parquet_info_path"]).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            feed.problems.append(f"parquet_info_path {entry['parquet_info_path']} cannot be read ({e})")
    files: List[str] = []
    for entry, n in zip(entries, num_used):
        data_dir = entry["data_dir"]
        names = [os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet")] \
            if os.path.isdir(data_dir) else []
        if not names:
            feed.problems.append(f"data_dir {data_dir} holds no .parquet file")
            continue
        files += (names * (n // len(names) + 1))[:n]
    checked: Dict[str, int] = {}
    for path in files:
        if path not in info:
            continue  # BAGEL skips a file its parquet_info does not list
        feed.units += int(info[path]["num_row_groups"])
        if path not in checked:
            checked[path] = pq.ParquetFile(path).metadata.num_row_groups
            if checked[path] != int(info[path]["num_row_groups"]):
                feed.problems.append(f"{path} has {checked[path]} row groups, its parquet_info says "
                                     f"{info[path]['num_row_groups']}: rebuild the set")
    if files and not checked:
        feed.problems.append("none of its parquet files is listed in its parquet_info (BAGEL skips them all)")
    vae, vit = spec.get("image_transform_args"), spec.get("vit_image_transform_args")
    seen = 0
    for path in checked:
        if seen >= SAMPLE_ROWS:
            break
        table = pq.ParquetFile(path).read_row_group(0, columns=["image_list", "instruction_list"])
        for images, steps in zip(table.column("image_list").to_pylist(), table.column("instruction_list").to_pylist()):
            sizes = [Image.open(io.BytesIO(b)).size for b in images]
            if len(sizes) < 2:
                continue
            # one step (start -> end): condition as VAE + ViT, instruction text, target as VAE: 4 plan items
            low = tokens(vae, sizes[0]) + tokens(vit, sizes[0]) + min(tokens(vae, s) for s in sizes[1:]) + 2 * 4
            text = sum(max((len(v.encode("utf-8")) for v in variants), default=0) for variants in steps)
            if len(sizes) == 2:
                high = low + text
            else:  # a chain: at most every image as VAE condition and target, with ViT, every instruction
                high = sum(2 * tokens(vae, s) + tokens(vit, s) for s in sizes) + text + 2 * 3 * len(sizes)
            feed.min_tokens = low if feed.min_tokens is None else min(feed.min_tokens, low)
            feed.max_tokens = high if feed.max_tokens is None else max(feed.max_tokens, high)
            seen += 1


def _jsonl_feed(feed: GroupFeed, spec: dict, entries: List[dict], num_used: List[int], tokens: TokenCounter) -> None:
    from PIL import Image

    transform = spec.get("image_transform_args")
    for entry, n in zip(entries, num_used):
        try:
            lines = Path(entry["jsonl_path"]).read_text(encoding="utf-8").splitlines()[:n]
        except OSError as e:
            feed.problems.append(f"jsonl_path {entry['jsonl_path']} cannot be read ({e})")
            continue
        feed.units += len(lines)
        for line in lines[:SAMPLE_ROWS]:
            item = json.loads(line)
            names = item.get("image") or []
            names = [names] if isinstance(names, str) else names
            image_tokens = 0
            for name in names:
                path = Path(entry["data_dir"]) / name
                if not path.is_file():
                    feed.problems.append(f"image {path} of {entry['jsonl_path']} is missing")
                    continue
                with Image.open(path) as im:
                    image_tokens += tokens(transform, im.size)
            turns = item.get("conversations") or []
            answer = sum(len(t.get("value", "").encode("utf-8")) for t in turns if t.get("from") == "gpt")
            text = sum(len(t.get("value", "").encode("utf-8")) for t in turns)
            low = image_tokens + 2 * (len(names) + 1) + min(answer, 1)
            high = image_tokens + text + 2 * (len(names) + 2 * len(turns))
            feed.min_tokens = low if feed.min_tokens is None else min(feed.min_tokens, low)
            feed.max_tokens = high if feed.max_tokens is None else max(feed.max_tokens, high)


def read_feed(config: Dict[str, dict], dataset_info: Dict[str, Dict[str, dict]], transform_cls) -> List[GroupFeed]:
    """Every group of a loaded ``--dataset_config_file`` with its units, token bounds and problems found.

    ``dataset_info``: ``{group: {dataset name: entry}}`` (the checkout's ``DATASET_INFO`` plus registered sets);
    ``transform_cls``: the checkout's ``ImageTransform``.
    """
    tokens = TokenCounter(transform_cls)
    feeds = []
    for group, spec in config.items():
        spec = spec or {}
        names = list(spec.get("dataset_names") or [])
        feed = GroupFeed(group, "unknown", is_mandatory=bool(spec.get("is_mandatory", False)))
        feeds.append(feed)
        known = dataset_info.get(group) or {}
        missing = [n for n in names if n not in known]
        if missing:
            feed.problems.append(f"lists data set(s) {', '.join(missing)} that are not registered in DATASET_INFO"
                                 f"['{group}'] (a built set: pass its bagel_sr_dataset.yaml with --bagel_sr_datasets)")
            continue
        entries = [known[n] for n in names]
        num_used = list(spec.get("num_used_data") or [])
        if len(num_used) != len(entries):
            feed.problems.append(f"has {len(entries)} dataset_names but {len(num_used)} num_used_data values")
            continue
        if entries and all("parquet_info_path" in e for e in entries):
            feed.kind = "parquet"
            _parquet_feed(feed, spec, entries, [int(n) for n in num_used], tokens)
        elif entries and all("jsonl_path" in e for e in entries):
            feed.kind = "jsonl"
            _jsonl_feed(feed, spec, entries, [int(n) for n in num_used], tokens)
    return feeds
