"""An identity benchmark's results per setting: a table (Markdown and CSV), a plot and a contact sheet.

Every setting is made with the same people, prompts and seeds, so two settings are compared image by image: the
paired differences against the first setting (mean and 95 % confidence interval over the pairs where both images
have a value) say whether a difference is larger than the spread between images. A setting's own spread (the
standard deviation) is mostly the prompts' and people's, which pairing removes.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instantid_colab import batch

METRICS = {
    "likeness": "likeness (ArcFace, to the photos given)",
    "heldout_likeness": "held-out likeness (ArcFace)",
    "judge_likeness": "judge likeness (SFace)",
    "clip_score": "CLIP score",
}
PAIRED = ("judge_likeness", "likeness", "clip_score")
TABLE = "table.md"
CSV_TABLE = "table.csv"
PLOT = "likeness_vs_prompt.png"
SHEET = "settings_sheet.png"
SHEET_ROWS = 6  # person/prompt/seed rows on the contact sheet


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation, count and the 95 % confidence interval's half-width (Student's t)."""

    mean: float
    sd: float
    n: int
    ci95: float

    def render(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    if len(values) == 1:
        return Stat(values[0], 0.0, 1, math.nan)
    from scipy.stats import t

    sd = statistics.stdev(values)
    return Stat(statistics.fmean(values), sd, len(values), float(t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values)))


@dataclass
class SettingResult:
    """One setting's images and their figures."""

    name: str
    values: dict[str, Any]
    images: int = 0
    faceless: int = 0  # images in which no face was found (no likeness figures)
    failed: int = 0
    stats: dict[str, Stat | None] = field(default_factory=dict)
    seconds: Stat | None = None
    peak_vram_gib: float | None = None


@dataclass(frozen=True)
class Difference:
    """A setting minus the first setting, over the image pairs with the same person, prompt and seed."""

    setting: str
    metric: str
    mean: float
    ci95: float
    n: int

    def render(self) -> str:
        interval = "" if math.isnan(self.ci95) else f" [{self.mean - self.ci95:+.3f}, {self.mean + self.ci95:+.3f}]"
        return f"{self.mean:+.3f}{interval} (n {self.n})"


def image_figures(line: dict[str, Any]) -> dict[str, float | None]:
    """One image's metrics from its results line (the benchmark makes one image per row)."""
    return {"likeness": (line.get("identity_similarity") or [None])[0],
            **{name: line.get(name) for name in ("heldout_likeness", "judge_likeness", "clip_score")}}


@dataclass
class BenchSummary:
    settings: list[SettingResult]
    differences: list[Difference]
    judges: dict[str, str]
    label: str | None = None
    held_out: list[str] = field(default_factory=list)  # "person: file" for each held-out photo

    def table_markdown(self) -> str:
        head = ["setting", "images", "no face", *(METRICS[name] for name in METRICS), "s/image", "peak VRAM (GiB)"]
        lines = (["", f"**{self.label}**: the figures below measure the plumbing, not a method.", ""] if self.label
                 else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for setting in self.settings:
            cells = [setting.name, str(setting.images), str(setting.faceless)]
            cells += [setting.stats[name].render(1 if name == "clip_score" else 3) if setting.stats.get(name) else "—"
                      for name in METRICS]
            cells += [f"{setting.seconds.mean:.1f}" if setting.seconds else "—",
                      f"{setting.peak_vram_gib:.2f}" if setting.peak_vram_gib is not None else "—"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Mean ± standard deviation over the images with a face; `no face`: images where none was found "
                  "(they have no likeness figures). Judges: " + "; ".join(f"{k} {v}" for k, v in self.judges.items())
                  + "."]
        if self.differences:
            first = self.settings[0].name
            lines += ["", f"Paired differences against `{first}` (same person, prompt and seed; mean [95 % CI], pairs):",
                      "", "| setting | " + " | ".join(METRICS[name] for name in PAIRED) + " |",
                      "|---|" + "---|" * len(PAIRED)]
            for setting in self.settings[1:]:
                found = {d.metric: d.render() for d in self.differences if d.setting == setting.name}
                lines.append(f"| {setting.name} | " + " | ".join(found.get(name, "—") for name in PAIRED) + " |")
            lines += ["", "An interval that excludes 0 is a difference larger than chance across these images."]
        if self.held_out:
            lines += ["", "Held out (never given to the generator): " + "; ".join(self.held_out) + "."]
        return "\n".join(lines)

    def write_csv(self, path: Path) -> Path:
        columns = ["setting", "images", "faceless", "failed"]
        for name in METRICS:
            columns += [f"{name}_mean", f"{name}_sd", f"{name}_n", f"{name}_ci95"]
        columns += ["seconds_per_image", "peak_vram_gib", "settings", "label"]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for setting in self.settings:
                row = [setting.name, setting.images, setting.faceless, setting.failed]
                for name in METRICS:
                    found = setting.stats.get(name)
                    row += [round(found.mean, 4), round(found.sd, 4), found.n,
                            "" if math.isnan(found.ci95) else round(found.ci95, 4)] if found else ["", "", 0, ""]
                row += [round(setting.seconds.mean, 2) if setting.seconds else "", setting.peak_vram_gib or "",
                        json.dumps(setting.values), self.label or ""]
                writer.writerow(row)
        return path

    def plot(self, path: Path) -> Path:
        """Judge likeness against CLIP score, one point per setting (95 % intervals as bars); the marker's area
        grows with the seconds per image, which the label gives. Settings without a face sit on a strip below."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 5))
        scored = [s for s in self.settings if s.stats.get("judge_likeness") and s.stats.get("clip_score")]
        floor = min((s.stats["judge_likeness"].mean for s in scored), default=0.0) - 0.1
        slowest = max((s.seconds.mean for s in self.settings if s.seconds), default=1.0) or 1.0
        for index, setting in enumerate(self.settings):
            clip, likeness = setting.stats.get("clip_score"), setting.stats.get("judge_likeness")
            x, y = clip.mean if clip else 0.0, likeness.mean if likeness else floor
            size = 60 + 600 * (setting.seconds.mean / slowest if setting.seconds else 0.0)
            text = f"{setting.name}\n{setting.seconds.mean:.1f} s/image" if setting.seconds else setting.name
            if likeness is None:  # on a strip below the others: no face was found in its images
                axis.scatter([x], [y], s=size, facecolors="none", edgecolors="grey")
                text += ", no face found"
            else:
                axis.errorbar(x, y, xerr=_bar(clip), yerr=_bar(likeness), fmt="none", ecolor="lightgrey")
                axis.scatter([x], [y], s=size, alpha=0.7)
            # Labels step down by setting, so settings at the same place stay readable.
            axis.annotate(text, (x, y), textcoords="offset points", xytext=(8, 8 - 22 * (index % 4)), fontsize=7,
                          color="grey" if likeness is None else "black")
        if not scored:
            axis.set_yticks([floor], ["no face found"])
        axis.margins(x=0.3, y=0.2)  # room for the labels
        axis.set_xlabel(f"prompt-following: CLIP score ({self.judges.get('clip', 'CLIP')})")
        axis.set_ylabel(f"likeness: {self.judges.get('judge', 'judge')}")
        title = "Likeness against prompt-following per setting (marker area: seconds per image)"
        axis.set_title(f"{self.label}\n{title}" if self.label else title, fontsize=9,
                       color="darkred" if self.label else "black")
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path

    def write(self, out: Path, lines: list[dict[str, Any]], row_order: list[batch.Row]) -> dict[str, Path]:
        """The table (Markdown, CSV), the plot and the contact sheet into `out`; their paths by kind."""
        out = Path(out)
        (out / TABLE).write_text(self.table_markdown() + "\n", encoding="utf-8")
        written = {"table": out / TABLE, "csv": self.write_csv(out / CSV_TABLE), "plot": self.plot(out / PLOT)}
        sheet = contact_sheet(out / SHEET, lines, row_order, [s.name for s in self.settings], self.label)
        if sheet is not None:
            written["sheet"] = sheet
        return written


def _bar(found: Stat | None) -> float:
    return 0.0 if found is None or math.isnan(found.ci95) else found.ci95


def summarise(lines: list[dict[str, Any]], rows: list[batch.Row], settings: list[tuple[str, dict[str, Any]]],
              judges: dict[str, str], label: str | None = None, held_out: list[str] | None = None) -> BenchSummary:
    """Per setting (in `settings` order: name and values), the figures of `rows`' results `lines`."""
    keys = {row.key: row for row in rows}
    by_setting = {name: SettingResult(name, values) for name, values in settings}
    figures: dict[str, dict[tuple, dict[str, float | None]]] = {name: {} for name, _ in settings}
    collected: dict[str, dict[str, list[float]]] = {name: {m: [] for m in METRICS} for name, _ in settings}
    seconds: dict[str, list[float]] = {name: [] for name, _ in settings}
    for line in lines:
        row = keys.get(line.get("key"))
        if row is None:
            continue
        result = by_setting[row.record["configuration"]]
        if line.get("status") != "done":
            result.failed += 1
            continue
        image = image_figures(line)
        result.images += 1
        result.faceless += image["judge_likeness"] is None
        for name, value in image.items():
            if value is not None:
                collected[result.name][name].append(value)
        seconds[result.name].append(line["seconds"])
        if line.get("peak_vram_gib") is not None:
            result.peak_vram_gib = max(result.peak_vram_gib or 0.0, line["peak_vram_gib"])
        figures[result.name][(row.record["person"], row.record["prompt"], row.record["seed"])] = image
    for result in by_setting.values():
        result.stats = {name: stat(values) for name, values in collected[result.name].items()}
        result.seconds = stat(seconds[result.name])
    return BenchSummary(list(by_setting.values()), _paired(figures, [name for name, _ in settings]), judges, label,
                        held_out or [])


def _paired(figures: dict[str, dict[tuple, dict[str, float | None]]], order: list[str]) -> list[Difference]:
    differences = []
    first = figures[order[0]] if order else {}
    for name in order[1:]:
        for metric in PAIRED:
            deltas = [image[metric] - first[key][metric] for key, image in figures[name].items()
                      if key in first and image[metric] is not None and first[key][metric] is not None]
            found = stat(deltas)
            if found is not None:
                differences.append(Difference(name, metric, found.mean, found.ci95, found.n))
    return differences


def contact_sheet(path: Path, lines: list[dict[str, Any]], rows: list[batch.Row], settings: list[str],
                  label: str | None = None) -> Path | None:
    """Settings side by side: a column per setting, a row per person, prompt and seed (the first SHEET_ROWS),
    each picture captioned with its likeness (L), judge likeness (J) and CLIP score (C)."""
    done = {line["key"]: line for line in lines if line.get("status") == "done"}
    cells: dict[tuple, dict[str, tuple[str | None, str]]] = {}
    for row in rows:
        place = (row.record["person"], row.record["prompt"], row.record["seed"])
        if place not in cells and len(cells) == SHEET_ROWS:
            continue
        line = done.get(row.key)
        if line is None:
            cells.setdefault(place, {})[row.record["configuration"]] = (None, "not made yet")
            continue
        image = image_figures(line)
        caption = f"{row.record['person']} p{row.record['prompt']} s{row.record['seed']} · " + " ".join(
            f"{letter} {'n/a' if image[name] is None else format(image[name], '.2f')}"
            for letter, name in (("L", "likeness"), ("J", "judge_likeness"), ("C", "clip_score")))
        cells.setdefault(place, {})[row.record["configuration"]] = (line["files"][0], caption)
    if not any(file for places in cells.values() for file, _ in places.values()):
        return None
    grid = [[places.get(name, (None, "")) for name in settings] for places in cells.values()]
    batch.draw_sheet(grid, label, titles=[name[:36] for name in settings]).save(path)
    return path
