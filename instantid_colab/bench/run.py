"""An identity benchmark from plan to report, on the batch machinery.

`plan` checks everything a person gave (the faces folder, the prompts, every setting of the grid, the seeds) and
turns people x prompts x settings x seeds into batch rows before any model loads. `run` loads the judges, reads
each person's references once, and makes the rows through `batch.run` (one loaded pipeline, resumable through
`results.jsonl`, rows shared between processes), measuring each image as it is made; then it writes the table,
the plot and the contact sheet from everything in `results.jsonl` that belongs to this plan.

Rows go seed by seed, and within a seed setting by setting: a speed mode's LoRA (0.4 to 0.8 GB) is loaded once
per setting and seed, not once per image, and a run stopped early holds whole seeds of every setting it reached.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instantid_colab import batch
from instantid_colab.bench.grid import Configuration, parse_grid
from instantid_colab.bench.judges import NAMES, Judges, cosine, load_judges
from instantid_colab.bench.prompts import Prompt, load_prompts
from instantid_colab.bench.references import BenchPerson, find_people, slug
from instantid_colab.bench.report import BenchSummary, summarise
from instantid_colab.faces import NoFaceError, likeness_of
from instantid_colab.images import open_image
from instantid_colab.settings import SettingsError, check_arguments
from instantid_colab.smoke import write_sample_people

SMOKE_PEOPLE = "smoke-faces"  # under --out: the two drawn people of `bench --smoke` without --faces
FIRST_SEED = 42  # the official demo's seed; seed i is FIRST_SEED + i for every setting, so images pair up


@dataclass
class BenchPlan:
    people: list[BenchPerson]
    prompts: tuple[Prompt, ...]
    configurations: list[Configuration]
    seeds: list[int]
    rows: list[batch.Row]

    def describe(self) -> str:
        lines = [f"{len(self.rows)} images: {len(self.people)} people x {len(self.prompts)} prompts x "
                 f"{len(self.configurations)} settings x {len(self.seeds)} seeds"]
        lines += [f"  person {person.describe()}" for person in self.people]
        lines += [f"  setting {configuration.name}" for configuration in self.configurations]
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
    _check(configurations, people[0], smoke, opened)
    rows = []
    for seed in range(FIRST_SEED, FIRST_SEED + seeds):
        for number, configuration in enumerate(configurations, 1):
            for index, prompt in enumerate(prompt_set, 1):
                for person in people:
                    row = batch.prepare_row(len(rows) + 1, _raw(person, prompt.text, seed, configuration), Path("."),
                                            smoke, opened)
                    row.record = {"person": person.name, "prompt": index, "seed": seed,
                                  "configuration": configuration.name}
                    row.name = f"{number:02d}-{slug(configuration.name)}/{slug(person.name)}-p{index:02d}-s{seed}"
                    rows.append(row)
    return BenchPlan(people, prompt_set, configurations, list(range(FIRST_SEED, FIRST_SEED + seeds)), rows)


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
    """The manifest row of one image: the person's photos (all but the held-out one), the prompt, the seed."""
    return {"face": str(person.references[0]), "extra_faces": [str(path) for path in person.references[1:]],
            "prompt": prompt, "seed": seed, **configuration.values}


def _check(configurations: list[Configuration], person: BenchPerson, smoke: bool, opened) -> None:
    """Each setting as a manifest row of the first person: SettingsError lists every refusal by setting."""
    problems = []
    for configuration in configurations:
        try:
            batch.prepare_row(1, _raw(person, "x", FIRST_SEED, configuration), Path("."), smoke, opened)
        except SettingsError as error:
            problems += [f"grid setting {configuration.name!r}: {problem}" for problem in error.problems]
    if problems:
        raise SettingsError(problems)


@dataclass
class Reference:
    """What a person's images are scored against besides the photos given: the held-out photo's ArcFace
    embedding (None without one), and the judge's target, the held-out photo's SFace embedding or, without one,
    those of the photos given."""

    held_out: np.ndarray | None
    judge_target: np.ndarray
    judged_against: str  # "held-out photo" or "photos given"


def references(session, judges: Judges, people: list[BenchPerson]) -> dict[str, Reference]:
    """Each person's reference embeddings, from their photos' faces; NoFaceError names the person and photo."""
    found = {}
    for person in people:
        photos = (*person.references, *([person.held_out] if person.held_out else []))
        judged = {}
        for path in photos:
            image = open_image(path, "face photo")
            try:
                face = session.faces.detect(image)
            except NoFaceError as error:
                raise NoFaceError(f"person {person.name}, photo {path}: {error}") from None
            judged[path] = (face, judges.face.embed(image, face))
        if person.held_out:
            face, embedding = judged[person.held_out]
            found[person.name] = Reference(face.embedding, embedding, "held-out photo")
        else:
            found[person.name] = Reference(None, np.stack([judged[path][1] for path in person.references]),
                                           "photos given")
    return found


def measure(session, judges: Judges, reference: Reference, image, prompt: str) -> dict[str, Any]:
    """One picture's figures beside the ArcFace likeness `generate` gives: ArcFace likeness to the held-out
    photo, the judge's likeness, the CLIP score against the prompt (None where no face is found)."""
    try:
        face = session.faces.detect(image, retries=False)
    except NoFaceError:
        face = None
    return {
        "heldout_likeness": None if face is None or reference.held_out is None else
        likeness_of(reference.held_out, face).similarity,
        "judge_likeness": None if face is None else cosine(judges.face.embed(image, face), reference.judge_target),
        "judged_against": reference.judged_against,
        "clip_score": judges.clip.score(image, prompt),
    }


def remaining(bench: BenchPlan, out: str | Path) -> int:
    """How many of the plan's images `out/results.jsonl` does not hold yet."""
    return len({row.key for row in bench.rows} - batch.done_keys(Path(out)))


def run(session, bench: BenchPlan, out: str | Path, process: int = 0, processes: int = 1,
        progress: bool = True) -> tuple[batch.BatchReport, BenchSummary, dict[str, Path]]:
    """Make what `out/results.jsonl` lacks, scoring each image as it is made, then `report`."""
    judges = load_judges(session.weights, session.device, session.plan.placement == "gpu")
    targets = references(session, judges, bench.people)

    def scored(row: batch.Row, result) -> dict[str, Any]:
        return measure(session, judges, targets[row.record["person"]], result.images[0],
                       result.settings["user_prompt"])

    made = batch.run(session, bench.rows, out, process=process, processes=processes, progress=progress,
                     measure=scored, desc="bench", sheet=False)
    return (made, *report(bench, out, session.label))


def report(bench: BenchPlan, out: str | Path, label: str | None = None) -> tuple[BenchSummary, dict[str, Path]]:
    """The table (Markdown, CSV), the plot and the contact sheet of everything `out/results.jsonl` holds for this
    plan, written into `out` (under the lock several processes share)."""
    out = Path(out)
    with batch.Claims(out).locked():
        lines = batch.results(out)
        summary = summarise(lines, bench.rows, [(c.name, c.values) for c in bench.configurations], NAMES, label,
                            bench.held_out())
        return summary, summary.write(out, lines, bench.rows)
