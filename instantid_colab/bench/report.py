"""An identity benchmark's results per setting: tables (Markdown and CSV), a plot, a contact sheet, and the best
settings as files `generate --settings` reads.

Every setting is made with the same people, prompts and seeds, so two settings are compared image by image: the
paired differences against the first setting (mean and 95 % confidence interval over the pairs where both images
have a value) say whether a difference is larger than the spread between images. A setting's own spread (the
standard deviation) is mostly the prompts' and people's, which pairing removes. The plot shows the paired
differences, as the paired table does. Each cell says how many images it averages: the held-out columns cover only
the people with a held-out photo.
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
from instantid_colab.bench.references import slug

# name -> (column title, what it is): the same columns, in this order, in every table, the CSV and the sheet.
METRICS: dict[str, tuple[str, str]] = {
    "likeness": ("ArcFace · given", "ArcFace (antelopev2: the recogniser InstantID and PuLID are conditioned on) to "
                                    "the photos given"),
    "heldout_likeness": ("ArcFace · held-out", "ArcFace to the held-out photo"),
    "auraface_heldout": ("AuraFace · held-out", "AuraFace (the main independent judge) to the held-out photo"),
    "auraface_given": ("AuraFace · given", "AuraFace to the photos given"),
    "sface_heldout": ("SFace · held-out", "SFace (the light independent judge) to the held-out photo"),
    "sface_given": ("SFace · given", "SFace to the photos given"),
    "copy_paste": ("copy-paste", "copy-paste by AuraFace (MultiID-Bench): 1 the picture sits on the photos given, "
                                 "-1 on the held-out photo, 0 halfway"),
    "clip_score": ("CLIP score", "prompt-following: CLIP image-text cosine x 100"),
}
LIKENESS_FOR_PLOT = ("auraface_heldout", "auraface_given")  # the first every setting has is the plot's likeness
RECOGNISER_TITLES = {"arcface": "ArcFace", "auraface": "AuraFace", "sface": "SFace"}
HELD_OUT_METRIC = {"arcface": "heldout_likeness", "auraface": "auraface_heldout", "sface": "sface_heldout"}
TABLE = "table.md"
CSV_TABLE = "table.csv"
PLOT = "likeness_vs_prompt.png"
SHEET = "settings_sheet.png"
BEST = "best_settings"  # folder of the settings files of the settings on the front
SHEET_ROWS = 6  # person/prompt/seed rows on the contact sheet


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation, count and the 95 % confidence interval's half-width (Student's t)."""

    mean: float
    sd: float
    n: int
    ci95: float

    def render(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} (n {self.n})"


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
    load_seconds: float | None = None  # its method's and LoRAs' load before its first image, apart from `seconds`
    peak_vram_gib: float | None = None
    per_person: dict[str, dict[str, Stat | None]] = field(default_factory=dict)  # person -> metric -> stat


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

    @property
    def clear(self) -> bool:
        """The 95 % interval leaves out 0."""
        return not math.isnan(self.ci95) and abs(self.mean) > self.ci95


def image_figures(line: dict[str, Any]) -> dict[str, float | None]:
    """One image's metrics from its results line (the benchmark makes one image per row)."""
    return {"likeness": (line.get("identity_similarity") or [None])[0],
            **{name: line.get(name) for name in METRICS if name != "likeness"}}


@dataclass
class BenchSummary:
    settings: list[SettingResult]
    differences: list[Difference]
    judges: dict[str, str]
    label: str | None = None
    held_out: list[str] = field(default_factory=list)  # "person: file" for each held-out photo
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)  # person -> held_out, ceiling per recogniser
    best: dict[str, Path] = field(default_factory=dict)  # setting -> its settings file, once `write` has written them

    def difference(self, setting: str, metric: str) -> Difference | None:
        return next((d for d in self.differences if d.setting == setting and d.metric == metric), None)

    def plot_likeness(self) -> str | None:
        """The likeness the plot and the front use: AuraFace to the held-out photo when every setting has it, else
        to the photos given; None when some setting has neither (no face found in its pictures)."""
        return next((name for name in LIKENESS_FOR_PLOT if all(s.stats.get(name) for s in self.settings)), None)

    def objectives(self) -> list[tuple[str, int]]:
        """What the front weighs: (measure, +1 more is better / -1 less is better), each that every setting has."""
        found = [(name, 1) for name in (self.plot_likeness(), "clip_score")
                 if name and all(s.stats.get(name) for s in self.settings)]
        return found + ([("seconds", -1)] if all(s.seconds for s in self.settings) else [])

    def front(self) -> list[SettingResult]:
        """The settings no other setting beats on every objective at once (likeness, CLIP score, seconds per image),
        in table order."""
        objectives = self.objectives()

        def value(setting: SettingResult, name: str) -> float:
            return setting.seconds.mean if name == "seconds" else setting.stats[name].mean

        def beaten(setting: SettingResult) -> bool:
            return any(all(sign * value(other, name) >= sign * value(setting, name) for name, sign in objectives)
                       and any(sign * value(other, name) > sign * value(setting, name) for name, sign in objectives)
                       for other in self.settings if other is not setting)

        return [setting for setting in self.settings if objectives and not beaten(setting)]

    # -- tables --------------------------------------------------------------------------------

    def table_markdown(self) -> str:
        lines = (["", f"**{self.label}**: the figures below measure the plumbing, not a method.", ""] if self.label
                 else [])
        lines += self._settings_table() + self._columns_legend() + self._paired_table() + self._calibration_table()
        lines += self._settings_list() + self._best_list()
        if self.held_out:
            lines += ["", "Held out (never given to the generator): " + "; ".join(self.held_out) + "."]
        return "\n".join(lines)

    def _settings_table(self) -> list[str]:
        head = ["setting", "images", "no face", "failed", *(title for title, _ in METRICS.values()), "s/image",
                "load (s)", "peak VRAM (GiB)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for setting in self.settings:
            cells = [setting.name, str(setting.images), str(setting.faceless), str(setting.failed)]
            cells += [setting.stats[name].render(1 if name == "clip_score" else 3) if setting.stats.get(name) else "—"
                      for name in METRICS]
            cells += [f"{setting.seconds.mean:.2f}" if setting.seconds else "—",
                      f"{setting.load_seconds:.1f}" if setting.load_seconds is not None else "—",
                      f"{setting.peak_vram_gib:.2f}" if setting.peak_vram_gib is not None else "—"]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def _columns_legend(self) -> list[str]:
        judges = "; ".join(f"{key}: {name}" for key, name in self.judges.items())
        return ["", "Mean ± standard deviation (n images) over the images with a face; `no face`: images where none "
                "was found (no likeness figures). Held-out columns: only the people with a held-out photo. s/image: "
                "each image's own time; load: what the setting loads before its first image (identity method, LoRAs, "
                "ControlNets), apart. Columns: " + "; ".join(f"**{title}**: {what}" for title, what in METRICS.values())
                + f". Judges: {judges}."]

    def _paired_table(self) -> list[str]:
        if len(self.settings) < 2:
            return []
        first = self.settings[0].name
        lines = ["", f"Paired differences against `{first}` (same person, prompt and seed; mean [95 % CI] (n pairs)):",
                 "", "| setting | " + " | ".join(title for title, _ in METRICS.values()) + " |",
                 "|---|" + "---|" * len(METRICS)]
        for setting in self.settings[1:]:
            cells = [self.difference(setting.name, name) for name in METRICS]
            lines.append(f"| {setting.name} | " + " | ".join(d.render() if d else "—" for d in cells) + " |")
        return lines + ["", "An interval that leaves out 0 is a difference larger than chance across these images."]

    def _calibration_table(self) -> list[str]:
        if not self.calibration:
            return []
        names = [s.name for s in self.settings]
        lines = ["", "Same-person ceiling: how alike each person's own photos are (each photo given against the "
                 "held-out one), beside that person's pictures against the held-out photo, per setting. Two real "
                 "photos of one person are the natural ceiling (MultiID-Bench reports an ArcFace median near 0.46): a "
                 "picture far above it against the photos given, with a copy-paste near 1, pastes the photo.", "",
                 "| person | recogniser | ceiling | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for person, found in self.calibration.items():
            for recogniser, title in RECOGNISER_TITLES.items():
                ceiling = found.get("ceiling", {}).get(recogniser)
                cells = [(s.per_person.get(person, {}).get(HELD_OUT_METRIC[recogniser])) for s in self.settings]
                lines.append(f"| {person} | {title} | {'—' if ceiling is None else f'{ceiling:.3f}'} | "
                             + " | ".join(c.render() if c else "—" for c in cells) + " |")
        return lines

    def _settings_list(self) -> list[str]:
        lines = ["", "What each setting sets (the rest are `generate`'s defaults):", ""]
        return lines + [f"- `{s.name}`: " + (json.dumps(s.values, ensure_ascii=False) if s.values else "the defaults")
                        for s in self.settings]

    def _best_list(self) -> list[str]:
        if not self.best:
            return []
        said = {"seconds": "seconds per image", "clip_score": "CLIP score"}
        weighed = ", ".join(said[name] if name in said else f"likeness ({METRICS[name][0]})"
                            for name, _ in self.objectives())
        lines = ["", f"The best settings here: no other setting is as good on {weighed} at once and better on one of "
                 "them. Each is a file for `generate --settings FILE`, a batch's `--settings FILE` and the app's "
                 "*Load settings*:", ""]
        return lines + [f"- `{name}`: {path}" for name, path in self.best.items()]

    def write_csv(self, path: Path) -> Path:
        columns = ["setting", "images", "faceless", "failed"]
        for name in METRICS:
            columns += [f"{name}_mean", f"{name}_sd", f"{name}_n", f"{name}_ci95"]
        for name in METRICS:
            columns += [f"{name}_diff_mean", f"{name}_diff_ci95", f"{name}_diff_n"]
        columns += ["seconds_per_image", "load_seconds", "peak_vram_gib", "best", "settings", "label"]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for setting in self.settings:
                row = [setting.name, setting.images, setting.faceless, setting.failed]
                for name in METRICS:
                    found = setting.stats.get(name)
                    row += [round(found.mean, 4), round(found.sd, 4), found.n, _csv(found.ci95)] if found else ["", "", 0, ""]
                for name in METRICS:
                    found = self.difference(setting.name, name)
                    row += [round(found.mean, 4), _csv(found.ci95), found.n] if found else ["", "", 0]
                row += [round(setting.seconds.mean, 3) if setting.seconds else "",
                        "" if setting.load_seconds is None else setting.load_seconds, setting.peak_vram_gib or "",
                        str(setting.name in self.best).lower(), json.dumps(setting.values), self.label or ""]
                writer.writerow(row)
        return path

    # -- pictures ------------------------------------------------------------------------------

    def plot_points(self) -> list[tuple[float, float, float, float]]:
        """Per setting, what the plot draws: (CLIP score difference from the first setting, its 95 % half-width,
        likeness difference, its half-width), the paired table's figures; the first setting at 0, 0; 0 where
        there is no difference to show."""
        likeness = self.plot_likeness()
        points = [(0.0, 0.0, 0.0, 0.0)]
        for setting in self.settings[1:]:
            x, y = self.difference(setting.name, "clip_score"), likeness and self.difference(setting.name, likeness)
            points.append((x.mean if x else 0.0, _bar(x), y.mean if y else 0.0, _bar(y or None)))
        return points

    def plot(self, path: Path) -> Path:
        """What the paired table says: each setting's difference from the first in CLIP score (x) and in likeness
        (y), with their 95 % intervals; the first setting at 0, 0. Markers are numbered (the key beside the plot
        names them, with their seconds per image, which the marker's area also shows)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        likeness = self.plot_likeness()
        first = self.settings[0].name
        best = self.front()
        figure, (axis, key) = plt.subplots(1, 2, figsize=(10, 5.2), gridspec_kw={"width_ratios": [3, 2]})
        slowest = max((s.seconds.mean for s in self.settings if s.seconds), default=1.0) or 1.0
        for number, (setting, (x, x_bar, y, y_bar)) in enumerate(zip(self.settings, self.plot_points()), 1):
            size = 80 + 700 * (setting.seconds.mean / slowest if setting.seconds else 0.0)
            if x_bar or y_bar:
                axis.errorbar(x, y, xerr=x_bar, yerr=y_bar, fmt="none", ecolor="grey", capsize=3)
            axis.scatter([x], [y], s=size, alpha=0.6, marker="*" if number == 1 else "o",
                         color="black" if number == 1 else f"C{(number - 2) % 10}",
                         edgecolors="black" if setting in best else "none", linewidths=1.5)
            axis.annotate(str(number), (x, y), textcoords="offset points", xytext=(7, 7), fontsize=9, weight="bold")
        axis.axhline(0, color="lightgrey", linewidth=0.8, zorder=0)
        axis.axvline(0, color="lightgrey", linewidth=0.8, zorder=0)
        axis.margins(0.25)
        axis.set_xlabel("CLIP score minus setting 1's (95 % CI)")
        if likeness:
            axis.set_ylabel(f"{METRICS[likeness][0]} minus setting 1's (95 % CI)")
        else:
            axis.set_ylim(-1, 1)
            axis.set_yticks([])
            axis.set_ylabel("likeness: none to compare (no face found in some setting's pictures)")
        title = f"Each setting against setting 1 ({_short(first, 40)}), same people, prompts, seeds"
        axis.set_title(f"{self.label}\n{title}" if self.label else title, fontsize=9,
                       color="darkred" if self.label else "black")
        key.axis("off")
        entries = [f"{number}{'*' if s in best else ' '} {_short(s.name, 44)}"
                   + (f"\n    {s.seconds.mean:.2f} s/image" if s.seconds else "")
                   for number, s in enumerate(self.settings, 1)]
        key.text(0.0, 1.0, "Settings (marker area: seconds per image;\n* and a black ring: the best, table.md)\n\n"
                 + "\n".join(entries), va="top", fontsize=8, family="monospace", transform=key.transAxes)
        figure.tight_layout()
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        return path

    def write(self, out: Path, lines: list[dict[str, Any]], row_order: list[batch.Row]) -> dict[str, Path]:
        """The best settings' files, the tables (Markdown, CSV), the plot and the contact sheet into `out`; their
        paths by kind."""
        out = Path(out)
        self.best = self.write_best(out / BEST)
        (out / TABLE).write_text(self.table_markdown() + "\n", encoding="utf-8")
        written = {"table": out / TABLE, "csv": self.write_csv(out / CSV_TABLE), "plot": self.plot(out / PLOT)}
        sheet = contact_sheet(out, lines, row_order, [s.name for s in self.settings], self.label)
        if sheet is not None:
            written["sheet"] = sheet
        if self.best:
            written["best settings"] = out / BEST
        return written

    def write_best(self, folder: Path) -> dict[str, Path]:
        """A settings file per setting on the front (`settings`: its manifest columns, read by `generate
        --settings`, batch and the app; the rest says where it comes from)."""
        likeness = self.plot_likeness()
        written = {}
        for stale in folder.glob("*.json") if folder.is_dir() else ():  # an earlier report's front
            stale.unlink()
        for setting in self.front():
            number = self.settings.index(setting) + 1
            path = folder / f"{number:02d}-{slug(setting.name)}.json"
            figures = {"seconds_per_image": round(setting.seconds.mean, 3) if setting.seconds else None,
                       "clip_score": round(setting.stats["clip_score"].mean, 3) if setting.stats.get("clip_score") else None}
            if likeness:
                figures[likeness] = round(setting.stats[likeness].mean, 4)
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"name": setting.name, "settings": setting.values, "measured": figures,
                                        "made_by": "instantid-colab bench", "label": self.label}, indent=1,
                                       ensure_ascii=False) + "\n", encoding="utf-8")
            written[setting.name] = path
        return written


def _csv(value: float) -> float | str:
    return "" if math.isnan(value) else round(value, 4)


def _bar(found: Difference | None) -> float:
    return 0.0 if found is None or math.isnan(found.ci95) else found.ci95


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def summarise(lines: list[dict[str, Any]], rows: list[batch.Row], settings: list[tuple[str, dict[str, Any]]],
              judges: dict[str, str], label: str | None = None, held_out: list[str] | None = None,
              loads: dict[str, float] | None = None, calibration: dict[str, dict[str, Any]] | None = None) -> BenchSummary:
    """Per setting (in `settings` order: name and values), the figures of `rows`' latest results `lines` (a row
    that failed and was made on a later run counts as made)."""
    keys = {row.key: row for row in rows}
    by_setting = {name: SettingResult(name, values, load_seconds=(loads or {}).get(name)) for name, values in settings}
    figures: dict[str, dict[tuple, dict[str, float | None]]] = {name: {} for name, _ in settings}
    collected: dict[str, dict[str, list[float]]] = {name: {m: [] for m in METRICS} for name, _ in settings}
    by_person: dict[str, dict[str, dict[str, list[float]]]] = {name: {} for name, _ in settings}
    seconds: dict[str, list[float]] = {name: [] for name, _ in settings}
    for key, line in batch.latest(lines).items():
        row = keys.get(key)
        if row is None:
            continue
        result = by_setting[row.record["configuration"]]
        if line.get("status") != "done":
            result.failed += 1
            continue
        image = image_figures(line)
        result.images += 1
        result.faceless += image["likeness"] is None
        person = by_person[result.name].setdefault(row.record["person"], {m: [] for m in METRICS})
        for name, value in image.items():
            if value is not None:
                collected[result.name][name].append(value)
                person[name].append(value)
        seconds[result.name].append(line["seconds"])
        if line.get("peak_vram_gib") is not None:
            result.peak_vram_gib = max(result.peak_vram_gib or 0.0, line["peak_vram_gib"])
        figures[result.name][(row.record["person"], row.record["prompt"], row.record["seed"])] = image
    for result in by_setting.values():
        result.stats = {name: stat(values) for name, values in collected[result.name].items()}
        result.seconds = stat(seconds[result.name])
        result.per_person = {person: {name: stat(values) for name, values in found.items()}
                             for person, found in by_person[result.name].items()}
    return BenchSummary(list(by_setting.values()), _paired(figures, [name for name, _ in settings]), judges, label,
                        held_out or [], calibration or {})


def _paired(figures: dict[str, dict[tuple, dict[str, float | None]]], order: list[str]) -> list[Difference]:
    differences = []
    first = figures[order[0]] if order else {}
    for name in order[1:]:
        for metric in METRICS:
            deltas = [image[metric] - first[key][metric] for key, image in figures[name].items()
                      if key in first and image[metric] is not None and first[key][metric] is not None]
            found = stat(deltas)
            if found is not None:
                differences.append(Difference(name, metric, found.mean, found.ci95, found.n))
    return differences


SHEET_LETTERS = (("L", "likeness", "ArcFace to the photos given"), ("A", "auraface_heldout", "AuraFace to the held-out "
                 "photo"), ("a", "auraface_given", "AuraFace to the photos given"), ("C", "clip_score", "CLIP score"))


def contact_sheet(out: Path, lines: list[dict[str, Any]], rows: list[batch.Row], settings: list[str],
                  label: str | None = None) -> Path | None:
    """Settings side by side: a column per setting, a row per person, prompt and seed (the first SHEET_ROWS),
    each picture captioned under it with its figures; a key to the letters, and which rows it shows of how many."""
    done = {key: line for key, line in batch.latest(lines).items() if line.get("status") == "done"}
    places = list(dict.fromkeys((row.record["person"], row.record["prompt"], row.record["seed"]) for row in rows))
    shown = places[:SHEET_ROWS]
    cells: dict[tuple, dict[str, tuple[Path | None, str]]] = {place: {} for place in shown}
    for row in rows:
        place = (row.record["person"], row.record["prompt"], row.record["seed"])
        if place not in cells:
            continue
        line = done.get(row.key)
        file = next(iter(batch.pictures(out, line)), None) if line else None
        if file is None:
            cells[place][row.record["configuration"]] = (None, "not made yet" if line is None else "picture missing")
            continue
        image = image_figures(line)
        caption = f"{row.record['person']} p{row.record['prompt']} s{row.record['seed']}\n" + " ".join(
            f"{letter} {'n/a' if image[name] is None else format(image[name], '.2f' if name != 'clip_score' else '.1f')}"
            for letter, name, _ in SHEET_LETTERS)
        cells[place][row.record["configuration"]] = (file, caption)
    if not any(file for found in cells.values() for file, _ in found.values()):
        return None
    grid = [[found.get(name, (None, "")) for name in settings] for found in cells.values()]
    footer = ["Under each picture: person, prompt number, seed; " + "; ".join(f"{letter}: {what}"
                                                                              for letter, _, what in SHEET_LETTERS)
              + " (n/a: no face found, or no held-out photo).",
              f"Rows: the first {len(shown)} of {len(places)} person/prompt/seed combinations; every picture is in "
              f"{out}/NN-setting/, every figure in results.jsonl and table.md."]
    path = out / SHEET
    batch.draw_sheet(grid, label, titles=[f"{number}. {_short(name, 30)}" for number, name in enumerate(settings, 1)],
                     footer=footer).save(path)
    return path
