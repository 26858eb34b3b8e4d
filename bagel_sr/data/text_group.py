"""The text group of a built set: a user's chat set added as BAGEL's mandatory ``vlm_sft`` group (``--vlm_sft_from``).

With ``--visual_und True`` (BAGEL's default) every packed batch needs a sample with text loss and restoration pairs
have none; a chat group marked mandatory gives one per batch. The chat set is BAGEL's ``vlm_sft`` jsonl format, one
JSON object a line::

    {"image": "a.png" | ["a.png", ...], "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                            {"from": "gpt", "value": "..."}]}

with image paths relative to an image folder. :func:`add_text_group` checks every line, then writes the group into
the build's ``dataset_config.yaml`` and its ``DATASET_INFO['vlm_sft']`` entry into ``bagel_sr_dataset.yaml``
(registered with the set by ``bagel_sr.patches.datasets``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bagel_sr import dataset_layout as layout
from .errors import ConfigError
from .writer import atomic_write_text

TEXT_GROUP = "vlm_sft"
VIT_TRANSFORM_ARGS = {"image_stride": 14, "max_image_size": 518, "min_image_size": 224}


def check_chat_jsonl(jsonl: Path, images: Path) -> int:
    """Number of lines of a chat jsonl; raises :class:`ConfigError` naming the first bad line."""
    if not jsonl.is_file():
        raise ConfigError(f"--vlm_sft_from {jsonl}: no such file (a chat jsonl: one JSON object a line)")
    n = 0
    for i, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--vlm_sft_from {jsonl} line {i}"
        try:
            item = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{where}: not JSON ({e})") from None
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or not any(isinstance(t, dict) and t.get("from") == "gpt" for t in turns):
            raise ConfigError(f"{where}: needs 'conversations' with a {{'from': 'gpt', 'value': ...}} answer turn")
        names = item.get("image") or []
        for name in [names] if isinstance(names, str) else names:
            if not (images / name).is_file():
                raise ConfigError(f"{where}: image {images / name} does not exist (set --vlm_sft_images to its folder)")
        n += 1
    if n == 0:
        raise ConfigError(f"--vlm_sft_from {jsonl}: holds no line")
    return n


def add_text_group(out_dir: Path, name: str, jsonl: str, images: str | None = None) -> str:
    """Add the chat set ``jsonl`` (images under ``images``, default: its folder) to a finished build in ``out_dir``
    as its mandatory text group; returns the summary line."""
    jsonl_path = Path(jsonl).absolute()
    image_dir = Path(images).absolute() if images else jsonl_path.parent
    n = check_chat_jsonl(jsonl_path, image_dir)
    chat_name = f"{name}_chat"
    group = {"dataset_names": [chat_name], "image_transform_args": VIT_TRANSFORM_ARGS,
             "frame_sampler_args": {"max_num_frames": 2, "min_num_frames": 1}, "is_mandatory": True,
             "num_used_data": [n], "weight": 0.5}
    config_file = out_dir / layout.DATASET_CONFIG_FILE
    text = config_file.read_text(encoding="utf-8")
    head = text.split("\n# The text group.")[0].rstrip("\n") + "\n"
    atomic_write_text(config_file, head + yaml.safe_dump({TEXT_GROUP: group}, sort_keys=False))
    reg_file = out_dir / layout.REGISTRATION_FILE
    registration: dict[str, Any] = yaml.safe_load(reg_file.read_text(encoding="utf-8"))
    registration["text_group"] = {"group": TEXT_GROUP, "name": chat_name, "jsonl_path": str(jsonl_path),
                                  "data_dir": str(image_dir), "num_total_samples": n}
    atomic_write_text(reg_file, yaml.safe_dump(registration, sort_keys=False))
    return f"text group: {TEXT_GROUP} '{chat_name}' ({n} chat lines from {jsonl_path}), mandatory"
