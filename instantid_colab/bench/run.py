"""An identity benchmark from plan to report, on the batch machinery.

`plan` checks everything a person gave (the faces folder, the prompts, every setting of the grid, the seeds) and
turns people x prompts x settings x seeds into batch rows before any model loads. `run` loads the judges, reads
each person's references once (and their same-person ceiling: how alike their own photos are), and makes the rows
through `batch.run` (one loaded pipeline, resumable through `results.jsonl`, rows shared between processes),
measuring each image as it is made; then it writes the table, the plot, the contact sheet and the settings files
of the best settings from everything in `results.jsonl` that belongs to this plan.

Rows go setting by setting: a setting's identity method, speed LoRA and ControlNets load once per run, on a small
picture made before its first row and timed apart (`loads.jsonl`), so seconds per image are the images' own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from instantid_colab import batch, engines
from instantid_colab.bench.grid import Configuration, parse_grid
from instantid_colab.bench.judges import NAMES, Judges, copy_paste, cosine, load_judges
from instantid_colab.bench.prompts import Prompt, load_prompts
from instantid_colab.bench.references import BenchPerson, find_people, slug
from instantid_colab.bench.report import BenchSummary, summarise
from instantid_colab.faces import NoFaceError, likeness_of
from instantid_colab.images import open_image
from instantid_colab.settings import SettingsError, check_arguments
from instantid_colab.smoke import write_sample_people

SMOKE_PEOPLE = "smoke-faces"  # under --out: the two drawn people of `bench --smoke` without --faces
LOADS = "loads.jsonl"  # under --out: each setting's load time, one line per load
CALIBRATION = "calibration.json"  # under --out: each person's held-out photo and same-person ceiling
FIRST_SEED = 42  # the official demo's seed; seed i is FIRST_SEED + i for every setting, so images pair up


@dataclass
class BenchPlan:
    people: list[BenchPerson]
    prompts: tuple[Prompt, ...]
    configurations: list[Configuration]
    seeds: list[int]
    rows: list[batch.Row]
    notices: list[str] = field(default_factory=list)  # settings of the grid left out, and why

    def describe(self) -> str:
        lines = [f"{len(self.rows)} images: {len(self.people)} people x {len(self.prompts)} prompts x "
                 f"{len(self.configurations)} settings x {len(self.seeds)} seeds"]
        lines += [f"  person {person.describe()}" for person in self.people]
        lines += [f"  setting {configuration.name}" for configuration in self.configurations]
        lines += [f"  notice: {notice}" for notice in self.notices]
        return "\n".join(lines)

    def held_out(self) -> list[str]:
        return [f"{person.name}: {person.held_out.name}" for person in self.people if person.held_out]


def plan(faces: str | Path, prompts: str = "builtin", grid: str | None = None, seeds: int = 1,
         smoke: bool = False) -> BenchPlan:
    """Every row checked and keyed; SettingsError (exit 2) names a grid value or the seeds outside what is allowed,
    ValueError (exit 1) a folder, photo or prompt file that cannot be used."""
    (seeds,) = check_arguments(seeds=(seeds, "bench_seeds"))
    configurations = parse_grid(grid)
    prompt_set = load_prompts(prompts)
    people = find_people(faces)
    opened = functools.lru_cache(maxsize=None)(open_image)  # each photo opened once, not once per row
    for person in people:
        if person.held_out:
            opened(str(person.held_out), "held-out photo")
    configurations, said = _check(configurations, people[0], smoke, opened)
    rows = []
    for number, configuration in enumerate(configurations, 1):
        for seed in range(FIRST_SEED, FIRST_SEED + seeds):
            for index, prompt in enumerate(prompt_set, 1):
                for person in people:
                    row = batch.prepare_row(len(rows) + 1, _raw(person, prompt.text, seed, configuration), Path("."),
                                            smoke, opened)
                    row.record = {"person": person.name, "prompt": index, "seed": seed,
                                  "configuration": configuration.name}
                    # named by content too: a folder used before with other prompts, photos or values keeps its
                    # pictures (a name alone would be the same for another prompt 1 or another setting 2)
                    row.name = (f"{number:02d}-{slug(configuration.name)}/{slug(person.name)}-p{index:02d}-s{seed}"
                                f"-{row.key[:8]}")
                    rows.append(row)
    return BenchPlan(people, prompt_set, configurations, list(range(FIRST_SEED, FIRST_SEED + seeds)), rows, said)


def plan_smoke_people(out: str | Path, prompts: str = "builtin", grid: str | None = None,
                      seeds: int = 1) -> BenchPlan:
    """`plan` over two drawn smoke people written under `out` (kept there, so a rerun finds the same photos); a plan
    that is refused removes the ones it drew, leaving `out` as it was."""
    folder = Path(out) / SMOKE_PEOPLE
    drawn = not folder.exists()
    write_sample_people(folder)
    try:
        return plan(folder, prompts, grid, seeds, smoke=True)
    except Exception:
        if drawn:
            shutil.rmtree(folder)
        raise


def _raw(person: BenchPerson, prompt: str, seed: int, configuration: Configuration) -> dict[str, Any]:
    """The manifest row of one image: the person's photos (all but the held-out one), the prompt as the setting's
    method reads it (`Method.prompt_for`: a trigger word where the method needs one), the seed."""
    method = engines.METHODS.get(configuration.values.get("identity") or engines.DEFAULT)
    return {"face": str(person.references[0]), "extra_faces": [str(path) for path in person.references[1:]],
            "prompt": method.prompt_for(prompt) if method else prompt, "seed": seed, **configuration.values}


def _check(configurations: list[Configuration], person: BenchPerson, smoke: bool,
           opened) -> tuple[list[Configuration], list[str]]:
    """Each setting as a manifest row of the first person: SettingsError lists every refusal by setting. Two settings
    that would make the same pictures (the same values, or values that differ only where the method or the guidance
    does not read them) are refused when both were named in a grid file; of a grid's combinations, the later is left
    out and said. Returns (the settings to make, what was said)."""
    problems, seen, kept, said = [], {}, [], []
    for configuration in configurations:
        try:
            row = batch.prepare_row(1, _raw(person, "x", FIRST_SEED, configuration), Path("."), smoke, opened)
        except SettingsError as error:
            problems += [f"grid setting {configuration.name!r}: {problem}" for problem in error.problems]
            continue
        if row.key not in seen:
            seen[row.key] = configuration
            kept.append(configuration)
        elif configuration.named:
            problems.append(_same_pictures(seen[row.key], configuration, row.values) + ": keep one, or vary "
                            "something the method reads")
        else:
            said.append(_same_pictures(seen[row.key], configuration, row.values) + f": {configuration.name!r} is "
                        "left out")
    if problems:
        raise SettingsError(problems)
    return kept, said


def _same_pictures(first: Configuration, second: Configuration, values: dict[str, Any]) -> str:
    """Why two settings make the same pictures, and what to do."""
    from instantid_colab.settings import unused

    differing = sorted(name for name in set(first.values) | set(second.values)
                       if first.values.get(name) != second.values.get(name))
    ignored = unused(values)
    why = ("they set the same values" if not differing else
           "; ".join(f"{name}: {ignored.get(name, 'the same once checked')}" for name in differing))
    return f"grid settings {first.name!r} and {second.name!r} make the same pictures ({why})"


RECOGNISERS = {"arcface": "ArcFace (antelopev2)", "auraface": "AuraFace", "sface": "SFace"}


@dataclass
class Reference:
    """What a person's pictures are scored against, per recogniser (RECOGNISERS): the embeddings of the photos
    given, and of the held-out photo (None without one); and the same-person ceiling, how alike the person's own
    photos are (each photo given against the held-out one, averaged; empty without a held-out photo)."""

    given: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray] | None
    ceiling: dict[str, float]


def references(session, judges: Judges, people: list[BenchPerson],
               open_photo: Callable[[Path, str], Any] = open_image) -> dict[str, Reference]:
    """Each person's reference embeddings, from their photos' faces; NoFaceError names the person and photo.
    `open_photo(path, what)`: how a photo is had (a Ray worker gets them from the object store, not from a path)."""
    found = {}
    for person in people:
        embedded = {}
        for path in (*person.references, *([person.held_out] if person.held_out else [])):
            image = open_photo(path, "face photo")
            try:
                face = session.faces.detect(image)
            except NoFaceError as error:
                raise NoFaceError(f"person {person.name}, photo {path}: {error}") from None
            embedded[path] = _embeddings(judges, image, face)
        given = {name: np.stack([embedded[path][name] for path in person.references]) for name in RECOGNISERS}
        held_out = embedded[person.held_out] if person.held_out else None
        ceiling = {} if held_out is None else {
            name: round(float(np.mean([cosine(embedded[path][name], held_out[name]) for path in person.references])), 4)
            for name in RECOGNISERS}
        found[person.name] = Reference(given, held_out, ceiling)
    return found


def _embeddings(judges: Judges, image, face) -> dict[str, np.ndarray]:
    return {"arcface": np.asarray(face.embedding), **{name: judge.embed(image, face)
                                                      for name, judge in judges.faces().items()}}


def measure(session, judges: Judges, reference: Reference, image, prompt: str) -> dict[str, Any]:
    """One picture's figures beside the ArcFace likeness `generate` gives (to the photos given): ArcFace's to the
    held-out photo, each judge's to the photos given and to the held-out photo, the copy-paste measure (AuraFace),
    the CLIP score against the prompt. A likeness is None where no face is found or there is nothing to compare."""
    try:
        face = session.faces.detect(image, retries=False)
    except NoFaceError:
        face = None
    seen = None if face is None else _embeddings(judges, image, face)
    held = reference.held_out if seen is not None else None
    figures: dict[str, Any] = {"heldout_likeness": None if held is None else
                               likeness_of(held["arcface"], face).similarity}  # as `generate` scores the photos given
    for name in judges.faces():
        figures[f"{name}_given"] = None if seen is None else cosine(seen[name], reference.given[name])
        figures[f"{name}_heldout"] = None if held is None else cosine(seen[name], held[name])
    figures["copy_paste"] = None if held is None else copy_paste(seen["auraface"], reference.given["auraface"],
                                                                  held["auraface"])
    figures["clip_score"] = judges.clip.score(image, prompt)
    return figures


def calibration(bench: BenchPlan, targets: dict[str, Reference]) -> dict[str, dict[str, Any]]:
    """Per person with a held-out photo: which photo, and the same-person ceiling per recogniser."""
    return {person.name: {"held_out": person.held_out.name, "ceiling": targets[person.name].ceiling}
            for person in bench.people if person.held_out}


def remaining(bench: BenchPlan, out: str | Path) -> int:
    """How many of the plan's images `out/results.jsonl` does not hold yet."""
    return len({row.key for row in bench.rows} - batch.done_keys(Path(out)))


class Scorer:
    """What a process making a benchmark's rows needs beside its pipeline: the judges, each person's references, the
    settings it has loaded (one process, one of accelerate's, or a Ray worker: `cluster`)."""

    def __init__(self, session, bench: BenchPlan, open_photo: Callable[[Path, str], Any] = open_image):
        self.session, self.bench, self.loaded = session, bench, set()
        self.judges = load_judges(session.weights, session.device, session.plan.placement == "gpu")
        self.targets = references(session, self.judges, bench.people, open_photo)

    def calibration(self) -> dict[str, dict[str, Any]]:
        return calibration(self.bench, self.targets)

    def measure(self, row: batch.Row, result) -> dict[str, Any]:
        """The figures of a row's picture; CLIP scores the bench's prompt, the same text for every method."""
        return measure(self.session, self.judges, self.targets[row.record["person"]], result.images[0],
                       self.bench.prompts[row.record["prompt"] - 1].text)

    def warm_up(self, row: batch.Row) -> float | None:
        """Before a setting's first row here: load what it needs (identity method, LoRAs, ControlNets) on a
        one-step 64 px picture; how long that took, apart from the images' seconds (None: loaded before)."""
        if row.record["configuration"] in self.loaded:
            return None
        self.loaded.add(row.record["configuration"])
        started = time.perf_counter()
        with contextlib.suppress(ValueError, MemoryError):  # the row itself fails with the reason, and says it
            batch.warm_up(self.session, row)
        return round(time.perf_counter() - started, 2)


def record_load(out: Path, configuration: str, seconds: float, process: int | str) -> None:
    """One line of `loads.jsonl`: how long loading a setting took in one process."""
    with batch.Claims(out).locked(), open(out / LOADS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"configuration": configuration, "seconds": seconds, "process": process}) + "\n")


def write_calibration(out: Path, found: dict[str, dict[str, Any]]) -> None:
    (out / CALIBRATION).write_text(json.dumps(found, indent=1) + "\n", encoding="utf-8")


def run(session, bench: BenchPlan, out: str | Path, process: int = 0, processes: int = 1,
        progress: bool = True) -> tuple[batch.BatchReport, BenchSummary, dict[str, Path]]:
    """Make what `out/results.jsonl` lacks, scoring each image as it is made, then `report`."""
    scorer = Scorer(session, bench)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_calibration(out, scorer.calibration())

    def first_of_its_setting(row: batch.Row) -> None:
        seconds = scorer.warm_up(row)
        if seconds is not None:
            record_load(out, row.record["configuration"], seconds, process)

    made = batch.run(session, bench.rows, out, process=process, processes=processes, progress=progress,
                     measure=scorer.measure, desc="bench", sheet=False, before_row=first_of_its_setting)
    return (made, *report(bench, out, session.label))


def report(bench: BenchPlan, out: str | Path, label: str | None = None) -> tuple[BenchSummary, dict[str, Path]]:
    """The table (Markdown, CSV), the plot and the contact sheet of everything `out/results.jsonl` holds for this
    plan, written into `out` (under the lock several processes share)."""
    out = Path(out)
    with batch.Claims(out).locked():
        lines = batch.results(out)
        summary = summarise(lines, bench.rows, [(c.name, c.values) for c in bench.configurations], NAMES, label,
                            bench.held_out(), loads=_loads(out), calibration=_calibration(out))
        return summary, summary.write(out, lines, bench.rows)


def _loads(out: Path) -> dict[str, float]:
    """Each setting's latest load time (`loads.jsonl`)."""
    found = {}
    path = out / LOADS
    for text in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
        with contextlib.suppress(json.JSONDecodeError, AttributeError, KeyError, TypeError):
            record = json.loads(text)
            found[record["configuration"]] = float(record["seconds"])
    return found


def _calibration(out: Path) -> dict[str, dict[str, Any]]:
    path = out / CALIBRATION
    if not path.is_file():
        return {}
    with contextlib.suppress(json.JSONDecodeError):
        found = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(found, dict):
            return found
    return {}
