"""Row groups for BAGEL's loader: how a build sizes them, and what its summary says when they cannot feed a run.

BAGEL deals parquet *row groups* out whole: each of ``world_size`` ranks gets ``units // world_size`` of the
``num_used_data`` files' row groups, and each of its ``num_workers`` loader workers ``that // num_workers``. A worker
with none loops forever and the run never steps. So a shard is written with at least ``world_size x num_workers``
row groups when it has that many rows (smaller groups than ``output.rows_per_row_group`` if need be), and the
summary warns when the train split still has too few (fewer pairs than ranks x workers).
"""
from __future__ import annotations

import math
import os
from typing import Optional


def row_group_size(rows: int, rows_per_row_group: int, readers: int) -> int:
    """Rows per row group for a shard of ``rows`` rows: at most ``rows_per_row_group``, and small enough that the
    shard has ``min(rows, readers)`` row groups (``readers`` = ranks x loader workers)."""
    return max(1, min(rows_per_row_group, math.ceil(rows / max(readers, 1))))


def rows_per_worker(train_row_groups: list[int], num_used_data: int, world_size: int, num_workers: int) -> int:
    """Row groups one loader worker gets: ``num_used_data`` files drawn from the train shards (the list repeated
    when shorter), their row groups divided over ranks, then workers, remainders dropped as BAGEL does."""
    if not train_row_groups:
        return 0
    drawn = (train_row_groups * (num_used_data // len(train_row_groups) + 1))[:num_used_data]
    return (sum(drawn) // max(world_size, 1)) // max(num_workers, 1)


def feed_note(train_row_groups: list[int], num_used_data: int, world_size: int, num_workers: int) -> Optional[str]:
    """A summary line when the train split cannot feed ``world_size`` ranks x ``num_workers`` workers, else None."""
    if rows_per_worker(train_row_groups, num_used_data, world_size, num_workers) > 0:
        return None
    units = sum((train_row_groups * (num_used_data // max(len(train_row_groups), 1) + 1))[:num_used_data])
    return (f"the train split has {units} row group(s) for {world_size} rank(s) x {num_workers} loader worker(s): "
            f"BAGEL's loader would give a worker nothing and never step; add pairs, or build for fewer with "
            f"--world_size / --num_workers (the dry run then uses fewer ranks)")


def next_step(dataset_config: str, registration: str) -> str:
    """The dry-run command on a built set, as the build summary prints it."""
    root = os.environ.get("BAGEL_ROOT") or "PATH_TO_YOUR_BAGEL_CHECKOUT"
    return (f"next (CPU dry run on this set): python -m bagel_sr.smoke --bagel_root {root} "
            f"--dataset_config_file {dataset_config} --bagel_sr_datasets {registration}")


def notes_for(bagel: dict, train_row_groups: list[int]) -> list[str]:
    """Summary notes of a build's ``bagel`` section and its train shards' row-group counts."""
    num_used = bagel["num_used_data"] or max(len(train_row_groups), 1)
    note = feed_note(train_row_groups, num_used, bagel["world_size"], bagel["num_workers"])
    return [note] if note else []


#: The text group BAGEL needs with ``--visual_und True`` (its default): a chat set, one sample in every batch.
TEXT_GROUP_EXAMPLE = """\
# The text group. With --visual_und True (BAGEL's default) every packed batch needs a sample with text loss, and
# edit pairs have none: add a chat set (LLaVA-style jsonl: {"image": ..., "conversations": [{"from": "human", ...},
# {"from": "gpt", ...}]}, registered in your checkout's data/dataset_info.py as DATASET_INFO['vlm_sft']['my_chat'] =
# {data_dir, jsonl_path, num_total_samples}) and uncomment. The dry run (python -m bagel_sr.smoke) adds its own
# tiny chat set when this group is missing.
# vlm_sft:
#   dataset_names: [my_chat]
#   image_transform_args: {image_stride: 14, max_image_size: 518, min_image_size: 224}
#   frame_sampler_args: {max_num_frames: 2, min_num_frames: 1}
#   is_mandatory: true
#   num_used_data: [1000]
#   weight: 0.5
"""


def dataset_config_text(name: str, fragment_yaml: str, train_files: int, max_row_groups: int, bagel: dict) -> str:
    """``dataset_config.yaml``: a comment on the row-group rule, the set's group, and the commented text group."""
    header = (
        f"# BAGEL --dataset_config_file for the bagel-sr set '{name}'; register the set with --bagel_sr_datasets\n"
        f"# (bagel_sr_dataset.yaml beside this file). BAGEL deals out parquet row groups whole: num_used_data x row\n"
        f"# groups per file (here {train_files} train shard(s), up to {max_row_groups} row groups each) must be at least\n"
        f"# NUM_GPUS x num_workers; this set was built for {bagel['world_size']} x {bagel['num_workers']} "
        f"(python -m bagel_sr.data build CONFIG --world_size N --num_workers K).\n"
    )
    return header + fragment_yaml + "\n" + TEXT_GROUP_EXAMPLE
