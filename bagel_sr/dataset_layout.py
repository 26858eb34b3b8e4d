"""Names of the files a build writes under its output directory (one place, shared with the patch)."""
from __future__ import annotations

REGISTRATION_FORMAT = "bagel-sr-dataset/1"

REGISTRATION_FILE = "bagel_sr_dataset.yaml"   # self-describing set: what the wrapper flag / patch reads
DATASET_CONFIG_FILE = "dataset_config.yaml"   # pure BAGEL fragment for --dataset_config_file
MANIFEST_FILE = "manifest.jsonl"              # one JSON row per pair
REPORT_FILE = "report.json"                   # skipped files, failed sources, counts
STATE_FILE = "build_state.json"               # resume state (finished sources, committed shards)
CONFIG_COPY_FILE = "build_config.yaml"        # the resolved build config
PARQUET_DIR = "parquet"                       # parquet/<split>/part-NNNNN.parquet
PARQUET_INFO_DIR = "parquet_info"             # parquet_info/<split>.json
HELDOUT_DIR = "heldout"                       # heldout/<split>/{lr,hr}/<pair_id>.png
PARTS_DIR = ".build"                          # manifest parts of committed shards, commit journal
JOURNAL_FILE = "journal.jsonl"                # .build/journal.jsonl: append-only commit log

SPLITS = ("train", "val", "test")
HELDOUT_SPLITS = ("val", "test")
BAGEL_GROUP = "unified_edit"


def dataset_name_for(name: str, split: str) -> str:
    """DATASET_INFO key of a split: the train split keeps the plain name, others get a suffix."""
    return name if split == "train" else f"{name}_{split}"
