"""ablate's inference variants: one training run, several inference settings (``infer_grid`` / ``infer_flags``).

A run with variants trains once (``RUN_DIR``'s ledger marks the finished training) and then runs
``eval.infer_command`` once per variant with the variant's flags appended, each into its own outputs folder
(``{outputs}/<variant>``) and with its own folder ``RUN_DIR/infer/<variant>/`` (``variant.json`` and ablate's ledger,
which marks the finished variant). Each
(run, variant) is one row of the report, named ``RUN/VARIANT``.
"""
from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bagel_sr.errors import BadInput
from bagel_sr.outputs import Ledger, shell_is_finished, shell_mark_finished

from .ablate_flags import flag_name, check_flag_map, check_sweep, fill, switch_words, variant_name

INFER_DIR = "infer"
#: What ablate writes in a variant's folder (besides its ledger).
VARIANT_FILES = ("variant.json",)


@dataclass
class Variant:
    """One inference setting of a run: its name, flags, ablate's marker folder, outputs folder and command."""

    name: str
    flags: dict[str, Any]
    folder: Path
    outputs: Path
    command: str

    @property
    def done(self) -> bool:
        """The variant's ledger marks it finished."""
        return Ledger.finished(self.folder)


def check_infer_section(cfg: dict[str, Any], where: str) -> None:
    """Types of ``infer_grid`` and ``runs[i].infer_flags``, and an ``eval.infer_command`` to append them to."""
    sources = []
    if cfg.get("infer_grid"):
        check_sweep(f"{where}: infer_grid", cfg["infer_grid"])
        sources.append("infer_grid")
    for i, run in enumerate(cfg.get("runs") or []):
        if isinstance(run, dict) and "infer_flags" in run:
            specs = run["infer_flags"]
            items = specs if isinstance(specs, list) else [specs]
            if not items:
                raise BadInput(f"{where}: runs[{i}].infer_flags is an empty list; give one mapping per inference "
                               "variant, e.g. [{start_t: 1.0}, {start_t: 0.3}]")
            for j, spec in enumerate(items):
                check_flag_map(f"{where}: runs[{i}].infer_flags" + (f"[{j}]" if isinstance(specs, list) else ""),
                               spec, skip=("name",))
            sources.append(f"runs[{i}].infer_flags")
    if not sources:
        return
    command = (cfg.get("eval") or {}).get("infer_command")
    if not command:
        raise BadInput(f"{where}: {sources[0]} needs eval.infer_command (the inference command its flags are "
                       "appended to, writing into {outputs})")
    present = {flag_name(w.split("=", 1)[0]) for w in template_words(command) if w.startswith("--")}
    both = sorted({flag for flag, _ in swept_flags(cfg)} & present)
    if both:
        raise BadInput(f"{where}: --{both[0]} is swept and also written in eval.infer_command; remove it from "
                       "infer_command")


def swept_flags(cfg: dict[str, Any]) -> set[tuple[str, str]]:
    """(flag, where) of every inference flag the grid sweeps (``infer_grid`` and each run's ``infer_flags``)."""
    flags = {(flag_name(k), "infer_grid") for k in cfg.get("infer_grid") or {}}
    for i, run in enumerate(cfg.get("runs") or []):
        specs = run.get("infer_flags") or [] if isinstance(run, dict) else []
        flags |= {(flag_name(k), f"runs[{i}].infer_flags") for spec in (specs if isinstance(specs, list) else [specs])
                  for k in spec if k != "name"}
    return flags


def template_words(command: str | Sequence[str]) -> list[str]:
    """The words of a command template (a string is split like a shell would)."""
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def program_words(command: str | Sequence[str]) -> list[str]:
    """The program part of a command: its words before the first ``--flag`` (what ``--help`` is asked of)."""
    words = template_words(command)
    first = next((i for i, w in enumerate(words) if w.startswith("--")), len(words))
    return words[:first]


def variant_specs(cfg: dict[str, Any], run_entry: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(name, flags) of a run's inference variants: its own ``infer_flags`` (a mapping or a list of them), else
    the product of ``infer_grid``; empty when neither is given (the run's one ``infer_command`` as is)."""
    if run_entry is not None and "infer_flags" in run_entry:
        specs = run_entry["infer_flags"]
        items = specs if isinstance(specs, list) else [specs]
    else:
        grid = cfg.get("infer_grid") or {}
        items = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    named = []
    for spec in items:
        spec = dict(spec)
        name = spec.pop("name", None)
        named.append((str(name) if name else variant_name(spec), spec))
    names = [n for n, _ in named]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise BadInput(f"two inference variants are named {dup!r}; give each a distinct 'name' in infer_flags")
    return named


def build_variants(specs: Sequence[tuple[str, dict[str, Any]]], ev: dict[str, Any],
                   fields: dict[str, str]) -> list[Variant]:
    """Variants with filled-in outputs folders and commands (``fields``: the run's ``run_dir`` and ``name``)."""
    template = ev["infer_command"] if specs else None
    outputs_template = str(ev.get("outputs", "{run_dir}/outputs"))
    variants = []
    for name, flags in specs:
        vf = {**fields, "variant": name}
        outputs = fill(outputs_template, vf)
        if "{variant}" not in outputs_template:
            outputs = str(Path(outputs) / name)
        vf["outputs"] = outputs
        words = [fill(w, vf) for w in template_words(template)] if not isinstance(template, str) else None
        extra = switch_words(flags, vf)
        command = (shlex.join(words + extra) if words is not None
                   else " ".join([fill(template, vf)] + [shlex.quote(w) for w in extra]))
        variants.append(Variant(name, flags, Path(fields["run_dir"]) / INFER_DIR / name, Path(outputs), command))
    return variants


def variant_lines(run_dir: Path, train_command: str, variants: Sequence[Variant]) -> list[str]:
    """Shell lines that train unless ``RUN_DIR``'s ledger marks the training finished, then run each variant whose
    own ledger does not mark it finished."""
    def guarded(folder: Path, command: str, comment: str) -> list[str]:
        return [f"if ! {shell_is_finished(folder)}; then  # {comment}", f"  {command}",
                f"  {shell_mark_finished(folder)}", "fi"]

    lines = guarded(run_dir, train_command, "training, once for all inference variants")
    for v in variants:
        lines += guarded(v.folder, v.command, f"inference variant {v.name}")
    return lines


def check_infer_flags(cfg: dict[str, Any], known: set[str]) -> None:
    """Every swept inference flag must be one the inference command's parser knows."""
    import difflib

    for flag, where in sorted(swept_flags(cfg)):
        if flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            raise BadInput(f"{where}: flag --{flag} is not accepted by eval.infer_command's parser"
                           + (f"; did you mean --{close[0]}?" if close else ""))
