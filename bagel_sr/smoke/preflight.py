"""Before the dry run launches: will BAGEL's loader feed every rank with the given configs, at these token limits?

:func:`plan_dry_run` reads the ``--dataset_config_file`` and its data (:mod:`.feed`) at the dry run's world
size (``--nproc``), loader workers (``--num_workers``) and token limits, then either adapts the dry run's *own*
settings, each with one ``smoke:`` line that says so, or stops with one line that names the fix:

- a group without the mandatory text group (``vlm_sft`` with ``is_mandatory: true``, needed with ``--visual_und
  True``): the dry run adds its own tiny chat set (or marks the user's ``vlm_sft`` group mandatory) in a copy of
  the config;
- a group with fewer row groups / lines than ranks x workers: fewer ranks (unless ``--nproc`` was given);
- samples longer than ``--max_num_tokens_per_sample``: limits that fit them (unless the user gave the limit; then it
  stops when every sample of a group is too long, since BAGEL would skip them all forever).
"""
from __future__ import annotations

import argparse
import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from bagel_sr import dataset_layout as layout
from bagel_sr.argv import value as flag_value
from bagel_sr.patches.datasets import load_built_dataset, load_text_group

from .data import write_chat_entry
from .feed import GroupFeed, read_feed
from .watch import SmokeStop

TEXT_GROUP = "vlm_sft"
#: BAGEL data flags a user passes through the dry run (listed in its --help; the checkout's main() reads them).
DATA_FLAGS = {
    "dataset_config_file": "your BAGEL dataset config YAML (e.g. the dataset_config.yaml a build wrote)",
    "bagel_sr_datasets": "comma-separated bagel_sr_dataset.yaml files of built sets, registered for the run",
    "max_num_tokens_per_sample": "longest sample BAGEL keeps, in tokens (default: fitted to your images)",
    "max_num_tokens": "tokens of one packed batch (default: fitted to your images)",
    "expected_num_tokens": "tokens after which a packed batch is yielded (default 320)",
    "num_workers": "data loader workers per rank (default 1)",
}


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """Declare :data:`DATA_FLAGS` in a group of the dry run's parser (values go on to the checkout unchanged)."""
    group = parser.add_argument_group("your data (passed on to the checkout's main())")
    for name, help_text in DATA_FLAGS.items():
        group.add_argument(f"--{name}", dest=f"data_{name}", default=None, metavar="VALUE", help=help_text)


def data_flags_back(args: argparse.Namespace) -> List[str]:
    """The :data:`DATA_FLAGS` given on the command line, as BAGEL flags again."""
    out: List[str] = []
    for name in DATA_FLAGS:
        value = getattr(args, f"data_{name}", None)
        if value is not None:
            out += [f"--{name}", value]
    return out


def _truthy(value: Optional[str]) -> bool:
    return str(value).lower() in ("true", "1", "yes", "t", "y")


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


@dataclass
class DryRunPlan:
    """What the dry run launches with: BAGEL flags (overrides appended last), worker extras, ranks, notes."""

    flags: List[str]
    extra: List[str]
    nproc: int
    notes: List[str] = field(default_factory=list)

    def set(self, name: str, value: object) -> None:
        self.flags += [f"--{name}", str(value)]


def _dataset_info(flags: Sequence[str], extra: Sequence[str]) -> Dict[str, Dict[str, dict]]:
    """The checkout's ``DATASET_INFO`` (a copy) plus the built sets of ``--bagel_sr_datasets`` and the dry run's chat."""
    import json

    info = copy.deepcopy(importlib.import_module("data.dataset_info").DATASET_INFO)
    for path in filter(None, (flag_value(flags, "bagel_sr_datasets") or "").split(",")):
        info.setdefault(layout.BAGEL_GROUP, {}).update(load_built_dataset(path.strip()))
        text = load_text_group(path.strip())
        if text:
            info.setdefault(text[0], {})[text[1]] = text[2]
    chat = flag_value(extra, "register_chat")
    if chat:
        spec = json.loads(Path(chat).read_text())
        info.setdefault(spec["group"], {})[spec["name"]] = spec["entry"]
    return info


def _ensure_text_group(plan: DryRunPlan, config: dict, workdir: Path) -> bool:
    """Add a mandatory text group to a copy of the config when it has none; True when the config changed."""
    group = config.get(TEXT_GROUP)
    if group is not None and group.get("is_mandatory"):
        return False
    if group is not None:
        group["is_mandatory"] = True
        plan.notes.append(f"your {TEXT_GROUP} group is not mandatory: the dry run makes it so (--visual_und True "
                          f"needs a text-loss sample in every batch; set `is_mandatory: true` for training)")
        return True
    entry_path, chat = write_chat_entry(workdir)
    config[TEXT_GROUP] = chat
    plan.extra += ["--register_chat", str(entry_path)]
    plan.notes.append(f"your dataset config has no mandatory {TEXT_GROUP} group (--visual_und True needs a text-loss "
                      f"sample in every batch): the dry run adds its own tiny chat set; add yours for training "
                      f"(docs/data.md, 'The text group')")
    return True


def _check_feed(plan: DryRunPlan, feeds: List[GroupFeed], num_workers: int, nproc_given: bool,
                workers_given: bool) -> None:
    for feed in feeds:
        if feed.problems:
            raise SmokeStop(f"dataset config group '{feed.name}' {feed.problems[0]}")
        if feed.kind != "unknown" and feed.units == 0:
            raise SmokeStop(f"dataset config group '{feed.name}' has no {feed.unit_noun} to load: check its data")
    checked = [f for f in feeds if f.kind != "unknown"]
    starved = [f for f in checked if f.per_worker(plan.nproc, num_workers) == 0]
    if not starved:
        return
    worst = min(starved, key=lambda f: f.units)
    fits = [n for n in range(plan.nproc, 0, -1) if all(f.per_worker(n, num_workers) > 0 for f in checked)]
    why = (f"group '{worst.name}' has {worst.units} {worst.unit_noun}(s) for {plan.nproc} ranks x {num_workers} "
           f"worker(s), so a worker would get none and BAGEL's loader would loop forever")
    if fits and not nproc_given and not workers_given:
        plan.nproc = fits[0]
        plan.set("num_shard", plan.nproc)
        plan.notes.append(f"{why}: the dry run uses {plan.nproc} rank(s); training on N GPUs needs at least N x "
                          f"num_workers {worst.unit_noun}s (`python -m bagel_sr.data build CONFIG --world_size N "
                          f"--num_workers K --overwrite`)")
        return
    raise SmokeStop(f"{why}; rebuild the set with `python -m bagel_sr.data build CONFIG --world_size {plan.nproc} "
                    f"--num_workers {num_workers} --overwrite` (smaller row groups), or pass --nproc "
                    f"{fits[0] if fits else 1}")


def _check_tokens(plan: DryRunPlan, feeds: List[GroupFeed], user_flags: Sequence[str]) -> None:
    limit = int(flag_value(plan.flags, "max_num_tokens_per_sample"))
    sized = [f for f in feeds if f.max_tokens is not None]
    if not sized:
        return
    need = max(f.max_tokens for f in sized) + 1  # a mandatory sample must be strictly shorter than the limit
    if need <= limit:
        return
    if flag_value(user_flags, "max_num_tokens_per_sample") is None:
        new = _round_up(need)
        mandatory = max((f.max_tokens for f in sized if f.is_mandatory), default=0)
        batch = max(int(flag_value(plan.flags, "max_num_tokens")), _round_up(new + mandatory))
        plan.set("max_num_tokens_per_sample", new)
        if flag_value(user_flags, "max_num_tokens") is None:
            plan.set("max_num_tokens", batch)
        plan.notes.append(f"your samples are up to {need - 1} tokens, over the dry run's {limit}: it runs with "
                          f"--max_num_tokens_per_sample {new} --max_num_tokens {batch} (train with at least these)")
        return
    hopeless = [f for f in sized if f.min_tokens is not None and f.min_tokens >= limit]
    if hopeless:
        f = hopeless[0]
        raise SmokeStop(f"every sample of group '{f.name}' is at least {f.min_tokens} tokens, over "
                        f"--max_num_tokens_per_sample {limit}: BAGEL would skip them all and never step; raise it "
                        f"above {f.max_tokens} or lower max_image_size in the group's image_transform_args")
    plan.notes.append(f"some samples (up to {need - 1} tokens) exceed --max_num_tokens_per_sample {limit}: BAGEL "
                      f"skips those")


def plan_dry_run(flags: List[str], user_flags: Sequence[str], extra: List[str], nproc: int, nproc_given: bool,
                 workdir: Path) -> DryRunPlan:
    """Check the data configs of a dry run (``flags``: its BAGEL flags, the user's last) and adapt or stop.

    Raises :class:`SmokeStop` with one line naming the fix. Needs the checkout importable (``data.*``).
    """
    plan = DryRunPlan(list(flags), list(extra), nproc)
    if flag_value(flags, "dataset_config_file") is None:
        built = (flag_value(flags, "bagel_sr_datasets") or "").split(",")[0].strip()
        beside = Path(built).with_name("dataset_config.yaml") if built.endswith(".yaml") else Path(built) / "dataset_config.yaml"
        if not built or not beside.is_file():
            raise SmokeStop("no --dataset_config_file given: pass the dataset_config.yaml your build wrote")
        plan.set("dataset_config_file", beside)
        plan.notes.append(f"no --dataset_config_file given: the dry run uses the one beside your set, {beside}")
    config_path = Path(flag_value(plan.flags, "dataset_config_file"))
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SmokeStop(f"--dataset_config_file {config_path} cannot be read ({e})") from None
    if not isinstance(config, dict) or not config:
        raise SmokeStop(f"--dataset_config_file {config_path} holds no data group")
    if _truthy(flag_value(flags, "visual_und")) and _ensure_text_group(plan, config, workdir):
        copy_path = workdir / "dataset_config.dry_run.yaml"
        copy_path.write_text(yaml.safe_dump(config, sort_keys=False))
        plan.set("dataset_config_file", copy_path)
    transform_cls = importlib.import_module("data.transforms").ImageTransform
    feeds = read_feed(copy.deepcopy(config), _dataset_info(plan.flags, plan.extra), transform_cls)
    workers = int(flag_value(plan.flags, "num_workers") or 1)
    _check_feed(plan, feeds, workers, nproc_given, flag_value(user_flags, "num_workers") is not None)
    _check_tokens(plan, feeds, user_flags)
    return plan
