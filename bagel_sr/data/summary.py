"""What a build produced (:class:`BuildSummary`): pairs, sources and groups per split, skipped files and failed
sources, and the text the CLI prints (``format()``), ending with the flags that feed the set to BAGEL."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bagel_sr import dataset_layout as layout

from . import feeding
from .readers import SkippedFile


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
