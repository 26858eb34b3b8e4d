"""Build a paired restoration set: scan -> split -> read -> degrade -> 8-bit -> shards + manifest.

Per source (image, NIfTI volume or DICOM series): physical array -> intensity mapping (stats of the
whole clean volume) -> working units -> volumetric degradations (seeded by ``(seed, source, -1)``) ->
slices along ``input.slice_axis`` -> centre crop to ``size_multiple`` -> 2D degradations (seeded by
``(seed, source, slice index)``) -> one conversion to 8-bit RGB PNG for both condition and target.

Over 400 lines on purpose: the pipeline, its resume state and its final files are one sequence a reader follows top
to bottom (the readers, degradations, splits and writer it calls live in their own modules).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from PIL import Image

from bagel_sr import dataset_layout as layout

from . import feeding, lesions
from .config import BuildConfig, load_build_config
from .degradations import apply_chain
from .errors import BuildError, ConfigError, OutputExistsError, SourceError
from .instructions import instructions_for, load_templates
from .intensity import compute_mapping
from .readers import SkippedFile, SourceRef, read_source, scan_sources
from .splits import assign_splits, check_no_subject_leak, group_key, groups_by_field, resolve_group_by
from .writer import BuildState, Pair, ShardWriter, atomic_write_text, remove_build


def pair_seed(base_seed: int, source_id: str, slice_index: int) -> int:
    """Per-pair seed from ``(base seed, source id, slice index)``; ``slice_index=-1`` seeds the volume."""
    digest = hashlib.sha256(f"{base_seed}|{source_id}|{slice_index}".encode()).digest()
    return int.from_bytes(digest[:6], "little")  # 48 bits: exact in JSON readers that use doubles


def pair_id_for(ref: SourceRef, slice_index: int) -> str:
    series = ref.meta.get("series_uid")
    stem = series if series and ref.source_id == f"dicom:{series}" else Path(ref.rel_path).name
    stem = re.sub(r"\.(nii\.gz|nii|mgz|png|jpe?g|tiff?|bmp|dcm)$", "", stem or "src", flags=re.I)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-")[-32:].strip("-") or "src"
    return f"{slug}_{hashlib.sha1(ref.source_id.encode()).hexdigest()[:8]}_s{slice_index:04d}"


def encode_png(u8: np.ndarray) -> bytes:
    """8-bit gray or RGB array -> RGB PNG bytes (deterministic)."""
    im = Image.fromarray(u8)
    if im.mode != "RGB":
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _center_crop(shape: tuple[int, ...], multiple: int) -> tuple[int, int, int, int]:
    h, w = shape[:2]
    ch, cw = h - h % multiple, w - w % multiple
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def make_pairs(ref: SourceRef, cfg: BuildConfig, split: str, group: tuple[str, str], templates: dict[str, Any]) -> tuple[list[Pair], int]:
    """All pairs of one source (and the number of blank slices skipped). Raises :class:`SourceError`."""
    inp = cfg.input
    src = read_source(ref, cfg.input_path, inp)
    for step in cfg.degradations:
        need = step.spec.modality
        if need and src.modality != need:
            raise SourceError(f"{ref.label}: degradation {step.name} needs modality {need} (HU); this source is "
                              f"{src.modality} (set input.modality, or input.rescale for image files)")
    mapping = compute_mapping(
        src.array, modality=src.modality, mode=cfg.intensity["mode"], window=cfg.intensity["window"],
        percentiles=tuple(cfg.intensity["percentiles"]), fixed_range=cfg.intensity["range"],
        source_dtype=src.source_dtype, is_image_file=ref.kind == "image", bits_stored=src.info.get("bits_stored"),
    )
    kept = ("bits_stored", "bits_source", "note") if mapping.mode == "dtype" else ("bits_stored", "bits_source")
    intensity = {**mapping.as_dict(), **{k: src.info[k] for k in kept if k in src.info}}  # the depth note: dtype only
    clean = mapping.to_working(src.array)
    context = {"value_range": list(mapping.working_range()), "pixel_size_mm": src.pixel_size_mm}
    degraded, vol_records, vol_seed = clean, [], None
    if cfg.volume_steps:
        vol_seed = pair_seed(cfg.seed, ref.source_id, -1)
        try:
            degraded, vol_records = apply_chain(list(cfg.volume_steps), clean, np.random.default_rng(vol_seed), context)
        except ValueError as e:
            raise SourceError(f"{ref.label}: {e}") from e

    if src.is_volume:
        axis = inp["slice_axis"]
        n = clean.shape[axis]
        margin = int(np.floor(n * inp["slice_margin"]))
        indices = list(range(margin, n - margin, inp["slice_step"]))
    else:
        axis, n, indices = None, 1, [0]
    multiple = cfg.size_multiple()
    noun = "slice" if src.is_volume else "image"
    pairs, blank = [], 0
    for k in indices:
        hr = np.take(clean, k, axis=axis) if axis is not None else clean
        lr = np.take(degraded, k, axis=axis) if axis is not None else degraded
        if src.display_rot90:
            hr, lr = np.rot90(hr), np.rot90(lr)
        full_hw = hr.shape[:2]
        top, left, ch, cw = _center_crop(hr.shape, multiple)
        if ch == 0 or cw == 0:
            raise SourceError(f"{ref.label}: slice size {hr.shape[0]}x{hr.shape[1]} is smaller than the crop "
                              f"multiple {multiple} (output.size_multiple and bicubic scales)")
        hr, lr = hr[top:top + ch, left:left + cw], lr[top:top + ch, left:left + cw]
        hr_u8 = mapping.to_uint8(hr)
        if inp["skip_blank_slices"] and hr_u8.min() == hr_u8.max():
            blank += 1
            continue
        seed = pair_seed(cfg.seed, ref.source_id, k)
        versions = [(pair_id_for(ref, k), hr_u8, lr, None)]
        les_cfg = cfg.data["lesions"]
        if les_cfg and split in les_cfg["splits"]:  # lesions need no volumetric step (config): lr is the clean slice
            les_seed = pair_seed(cfg.seed if les_cfg["seed"] is None else les_cfg["seed"], ref.source_id, k)
            try:
                made = lesions.variants(versions[0][0], hr, les_cfg, np.random.default_rng(les_seed), mapping.unit,
                                        mapping.working_range())
            except ValueError as e:
                raise SourceError(f"{ref.label} slice {k}: {e}") from e
            versions = [(v_id, mapping.to_uint8(v_hr), v_hr, block) for v_id, v_hr, block in made]
        for pid, hr_u8, lr, les_block in versions:  # a lesion version and its twin share the degradation seed
            try:
                lr, records = apply_chain(list(cfg.slice_steps), lr, np.random.default_rng(seed), context)
            except ValueError as e:
                raise SourceError(f"{ref.label} slice {k}: {e}") from e
            records = vol_records + records
            task, variants = instructions_for(records, templates, src.modality, noun, cfg.data["instructions"]["task"])
            source_info = {
                "id": ref.source_id, "kind": ref.kind, "path": ref.rel_path, "modality": src.modality,
                "slice_axis": axis, "slice_index": k, "num_slices": n, "pixel_size_mm": src.pixel_size_mm,
                **{key: v for key, v in ref.meta.items() if key != "modality"},
                **{key: v for key, v in src.info.items() if key not in ("bits_source", "note")},
            }
            if src.slice_files is not None and axis == 2:
                source_info["file"] = src.slice_files[k]
            manifest = {
                "pair_id": pid, "split": split, "group": group[0], "group_by": group[1], "source": source_info,
                "crop": {"top": top, "left": left, "height": ch, "width": cw, "original_size": list(full_hw)},
                "intensity": intensity, "degradations": records,
                "seed": {"base": cfg.seed, "pair": seed, "volume": vol_seed},
                "task": task, "instructions": variants, "size": [ch, cw],
            }
            if les_block is not None:
                manifest["lesions"] = les_block
            pairs.append(Pair(pid, split, encode_png(mapping.to_uint8(lr)), encode_png(hr_u8), variants, manifest))
    return pairs, blank


@dataclass
class BuildSummary:
    """What a build produced; ``format()`` gives the text the CLI prints."""

    name: str
    output_dir: Path
    pairs: dict[str, int]
    sources: dict[str, int]
    groups: dict[str, int]
    skipped_files: list[SkippedFile] = field(default_factory=list)
    failed_sources: dict[str, str] = field(default_factory=dict)
    blank_slices: int = 0
    resumed_sources: int = 0
    fractions: dict[str, float] = field(default_factory=dict)
    group_fields: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def registration_file(self) -> Path:
        return self.output_dir / layout.REGISTRATION_FILE

    @property
    def dataset_config_file(self) -> Path:
        return self.output_dir / layout.DATASET_CONFIG_FILE

    def format(self, max_listed: int = 20) -> str:
        lines = [f"bagel-sr dataset '{self.name}' -> {self.output_dir}", f"{'split':<8}{'groups':>8}{'sources':>9}{'pairs':>9}"]
        for s in layout.SPLITS:
            lines.append(f"{s:<8}{self.groups.get(s, 0):>8}{self.sources.get(s, 0):>9}{self.pairs.get(s, 0):>9}")
        lines.append(f"{'total':<8}{sum(self.groups.values()):>8}{sum(self.sources.values()):>9}{sum(self.pairs.values()):>9}")
        if self.group_fields:
            lines.append("groups keyed by: " + ", ".join(f"{how} ({n})" for how, n in self.group_fields.items()))
        lines += [f"note: {n}" for n in self.notes]
        empty = [s for s in ("val", "test") if self.fractions.get(s, 0) > 0 and not self.pairs.get(s)]
        if empty:
            lines.append(f"note: {' and '.join(empty)} got no pairs: only {sum(self.groups.values())} group(s) to split "
                         f"(splits are by patient/study, never by slice)")
        if self.resumed_sources:
            lines.append(f"resumed: {self.resumed_sources} source(s) were already done")
        if self.blank_slices:
            lines.append(f"blank slices skipped: {self.blank_slices}")
        for title, items in (("skipped files", [f"{f.path}: {f.reason}" for f in self.skipped_files]),
                             ("failed sources", list(self.failed_sources.values()))):
            if items:
                lines.append(f"{title}: {len(items)} (all listed in {layout.REPORT_FILE})")
                lines += [f"  - {it}" for it in items[:max_listed]]
                if len(items) > max_listed:
                    lines.append(f"  ... and {len(items) - max_listed} more")
        lines.append(f"BAGEL: --dataset_config_file {self.dataset_config_file}")
        lines.append(f"register (bagel-sr wrapper / bagel_sr.patches.datasets): {self.registration_file}")
        lines.append(feeding.next_step(str(self.dataset_config_file), str(self.registration_file)))
        return "\n".join(lines)


def _prepare_output(cfg: BuildConfig, fingerprint: str, overwrite: bool, log: Callable[[str], None]) -> BuildState | None:
    """Existing state to resume, or ``None`` for a fresh build. Never deletes foreign files."""
    out = cfg.output_dir
    state_path = out / layout.STATE_FILE
    if not out.exists() or not any(out.iterdir()):
        return None
    if not state_path.is_file():
        raise OutputExistsError(
            f"output_dir {out} is not empty and holds no bagel-sr build ({layout.STATE_FILE} missing); refusing to "
            f"write into it (also with --overwrite). Choose a new or empty output_dir.")
    if overwrite:
        removed = remove_build(out)
        log(f"--overwrite: removed the {removed} file(s) of the previous build in {out} (other files are kept)")
        return None
    try:
        state = BuildState.load(out)
    except (ValueError, KeyError, TypeError) as e:
        raise OutputExistsError(f"output_dir {out}: its build state cannot be read ({e}); start again with --overwrite")
    if state.complete:
        total = sum(state.pairs(s) for s in layout.SPLITS)
        raise OutputExistsError(
            f"output_dir {out} already holds a complete build ({total} pairs). To rebuild it, run again with "
            f"--overwrite (Python: overwrite=True); to keep it, set another output_dir.")
    if state.fingerprint != fingerprint:
        raise OutputExistsError(
            f"output_dir {out} holds an interrupted build made with a different config; resume it with the "
            f"original config, or start again with --overwrite.")
    return state


def _write_final_files(cfg: BuildConfig, writer: ShardWriter, info_paths: dict[str, str], task: str | None) -> None:
    out, state = cfg.output_dir, writer.state
    train_files = len(state.shards["train"])
    num_used = cfg.bagel["num_used_data"] or max(train_files, 1)
    rg = max((s["num_row_groups"] for s in state.shards["train"]), default=0)
    fragment = {
        layout.BAGEL_GROUP: {
            "dataset_names": [cfg.name],
            "image_transform_args": cfg.bagel["image_transform_args"],
            "vit_image_transform_args": cfg.bagel["vit_image_transform_args"],
            "is_mandatory": cfg.bagel["is_mandatory"],
            "num_used_data": [num_used],
            "weight": cfg.bagel["weight"],
        }
    }
    text = feeding.dataset_config_text(cfg.name, yaml.safe_dump(fragment, sort_keys=False), train_files, rg, cfg.bagel)
    atomic_write_text(out / layout.DATASET_CONFIG_FILE, text)

    datasets = {}
    for split in layout.SPLITS:
        if split not in info_paths:
            continue
        datasets[layout.dataset_name_for(cfg.name, split)] = {
            "split": split,
            "data_dir": f"{layout.PARQUET_DIR}/{split}",
            "num_files": len(state.shards[split]),
            "num_total_samples": state.pairs(split),
            "parquet_info_path": info_paths[split],
        }
    registration = {
        "format": layout.REGISTRATION_FORMAT,
        "name": cfg.name,
        "bagel_group": layout.BAGEL_GROUP,
        "paths_relative_to": "this file's folder",
        "datasets": datasets,
        "dataset_config_file": layout.DATASET_CONFIG_FILE,
        "manifest": layout.MANIFEST_FILE,
        "heldout_dir": layout.HELDOUT_DIR if cfg.output["heldout_png"] else None,
        "task": task,
        "fingerprint": state.fingerprint,
    }
    atomic_write_text(out / layout.REGISTRATION_FILE, yaml.safe_dump(registration, sort_keys=False))


def _refuse_nested(input_path: Path, output_dir: Path) -> None:
    """The output may not lie inside the input (it would be read back as input) nor the input inside the output."""
    inp, out = input_path.absolute(), output_dir.absolute()
    if out == inp or inp in out.parents:
        raise ConfigError(f"config key 'output_dir' ({out}) lies inside input.path ({inp}): the next build would read "
                          "its own outputs back as input; choose an output_dir outside the input folder")
    if out in inp.parents:
        raise ConfigError(f"config key 'input.path' ({inp}) lies inside output_dir ({out}); choose an output_dir "
                          "outside the input folder")


def _input_stats(refs: list) -> list:
    """Size and modification time of every input file: a rerun on changed files is not resumed."""
    return [[r.source_id, [[f.stat().st_size, f.stat().st_mtime_ns] for f in r.files]] for r in refs]


def build_dataset(
    config: str | Path | dict[str, Any] | BuildConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    base_dir: str | Path | None = None,
) -> BuildSummary:
    """Build (or resume) the set described by ``config``; returns the summary. See ``docs/data.md``.

    Raises ``ConfigError`` for a bad config, ``OutputExistsError`` when the output holds a build that must
    not be touched, ``BuildError`` when no pair could be made. Bad input files do not raise: they are
    listed in the summary and ``report.json``.
    """
    from tqdm.auto import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg = load_build_config(config, base_dir=base_dir)
    templates = load_templates(cfg.templates_path)
    fingerprint = cfg.fingerprint(extra=templates)
    _refuse_nested(cfg.input_path, cfg.output_dir)
    state = _prepare_output(cfg, fingerprint, overwrite, log)

    refs, skipped = scan_sources(cfg.input_path, cfg.input["kind"], exclude=cfg.output_dir)
    ids = [r.source_id for r in refs]
    group_by = resolve_group_by(cfg.splits["group_by"], cfg.input["kind"])
    groups: dict[str, tuple[str, str]] = {}
    group_errors: dict[str, str] = {}
    for ref in refs:
        try:
            groups[ref.source_id] = group_key(ref, group_by, cfg.splits["group_regex"])
        except SourceError as e:
            group_errors[ref.source_id] = str(e)
    split_seed = cfg.splits["seed"] if cfg.splits["seed"] is not None else cfg.seed
    assignment = assign_splits([g for g, _ in groups.values()], cfg.splits["fractions"], split_seed)
    check_no_subject_leak(refs, groups, assignment)

    digest = hashlib.sha256(json.dumps([ids, assignment, _input_stats(refs)], sort_keys=True).encode()).hexdigest()[:16]
    resumed = state is not None
    if state is None:
        out = cfg.output_dir
        out.mkdir(parents=True, exist_ok=True)
        state = BuildState(fingerprint=fingerprint, sources_digest=digest, n_sources=len(ids))
        atomic_write_text(out / layout.CONFIG_COPY_FILE, yaml.safe_dump(cfg.data, sort_keys=False))
        state.save_header(out)
    elif state.sources_digest != digest:
        raise OutputExistsError(
            f"the inputs under {cfg.input_path} changed since the interrupted build in {cfg.output_dir} "
            f"({state.n_sources} source(s) then, {len(ids)} now); start again with --overwrite.")
    writer = ShardWriter(cfg.output_dir, state, cfg.output["rows_per_shard"], cfg.output["rows_per_row_group"],
                         cfg.output["heldout_png"], readers=cfg.bagel["world_size"] * cfg.bagel["num_workers"])
    if resumed:
        removed = writer.remove_orphans()
        log(f"resuming {cfg.output_dir}: {len(state.done) + len(state.failed)}/{len(refs)} sources done"
            + (f", removed {len(removed)} file(s) of an interrupted commit" if removed else ""))
    for sid, reason in group_errors.items():
        if sid not in state.failed:
            writer.mark_failed(sid, reason)

    done_before = len(state.done) + len(state.failed)
    blank, notes = 0, set()
    total_pairs = sum(state.pairs(s) for s in layout.SPLITS)
    task_seen: str | None = None
    bar = tqdm(total=len(refs), initial=done_before, desc=f"{cfg.name}: files", unit="src", disable=not progress,
               dynamic_ncols=True)
    try:
        for ref in refs:
            sid = ref.source_id
            if sid in state.done or sid in state.failed:
                continue
            split = assignment[groups[sid][0]]
            try:
                pairs, n_blank = make_pairs(ref, cfg, split, groups[sid], templates)
            except SourceError as e:
                writer.mark_failed(sid, str(e))
            except Exception as e:  # unexpected data problem: report it with the source, keep going
                writer.mark_failed(sid, f"{ref.label}: {type(e).__name__}: {e}")
            else:
                blank += n_blank
                notes.update(p.manifest["intensity"].get("note", "") for p in pairs[:1] if p.manifest["intensity"].get("note"))
                total_pairs += len(pairs)
                task_seen = task_seen or (pairs[0].manifest["task"] if pairs else None)
                writer.add(split, sid, pairs)
            bar.update(1)
            bar.set_postfix(pairs=total_pairs, failed=len(state.failed), skipped=len(skipped))
        writer.flush_all()
    finally:
        bar.close()

    n_manifest = writer.write_manifest()
    if cfg.data["lesions"] and n_manifest:
        lesions.write_lesion_file(cfg.output_dir, [json.loads(line) for line in
                                                   (cfg.output_dir / layout.MANIFEST_FILE).read_text().splitlines()
                                                   if line.strip()], cfg.data["lesions"])
    info_paths = writer.write_parquet_info()
    if task_seen is None and n_manifest:
        task_seen = json.loads((cfg.output_dir / layout.MANIFEST_FILE).read_text().splitlines()[0])["task"]
    summary = BuildSummary(
        name=cfg.name,
        output_dir=cfg.output_dir,
        pairs={s: state.pairs(s) for s in layout.SPLITS},
        sources={s: sum(1 for d in state.done.values() if d["split"] == s and d["pairs"]) for s in layout.SPLITS},
        groups={s: len({groups[sid][0] for sid, d in state.done.items() if d["split"] == s and d["pairs"]})
                for s in layout.SPLITS},
        skipped_files=skipped,
        failed_sources=dict(state.failed),
        blank_slices=blank,
        resumed_sources=done_before if resumed else 0,
        fractions=cfg.splits["fractions"],
        group_fields=groups_by_field(groups),
        notes=sorted(notes) + feeding.notes_for(cfg.bagel, [s["num_row_groups"] for s in state.shards["train"]]),
    )
    report = {
        "name": cfg.name,
        "counts": {"pairs": summary.pairs, "sources": summary.sources, "groups": summary.groups},
        "groups_keyed_by": summary.group_fields,
        "notes": summary.notes,
        "skipped_files": [f.as_dict() for f in skipped],
        "failed_sources": [{"source": k, "reason": v} for k, v in state.failed.items()],
    }
    atomic_write_text(cfg.output_dir / layout.REPORT_FILE, json.dumps(report, indent=1))
    if n_manifest == 0:
        err = BuildError(f"no pairs were produced from {cfg.input_path}: {len(skipped)} file(s) skipped, "
                         f"{len(state.failed)} source(s) failed; see {cfg.output_dir / layout.REPORT_FILE}"
                         + (f" (first failure: {next(iter(state.failed.values()))})" if state.failed else ""))
        err.summary = summary
        raise err
    _write_final_files(cfg, writer, info_paths, task_seen)
    state.complete = True
    state.save_header(cfg.output_dir)
    return summary
