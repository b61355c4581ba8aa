"""Many images with one loaded pipeline: a manifest (CSV or JSONL) in, PNGs, `results.jsonl` and a contact sheet out.

Resumable: a row is keyed by its content (the bytes of every picture it names and every setting), and
a row whose key is already done in `results.jsonl` is skipped, so running the same command again only
makes what is missing (failed rows are tried again), and an interruption loses at most the image in flight. Several processes
(`accelerate launch`, one per GPU) share one manifest: each takes the next row that nobody holds by
creating a claim file under a lock, so rows are split as fast as each GPU goes, none is made twice,
and when a process dies the others take over its row (its claim names a process that no longer runs).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from instantid_colab import controls, loras, people, settings, speed
from instantid_colab.images import open_image
from instantid_colab.textfiles import read_text

RESULTS = "results.jsonl"
CONTACT_SHEET = "contact_sheet.png"
THUMB = 256
CAPTION = 36  # room under a thumbnail for a caption of two lines
# Columns: pipeline.generate's keyword names, plus the pictures and the output name. Lists ("controls",
# "loras", "extra_faces") are `;`-separated in CSV and may be JSON lists in JSONL.
NUMBERS = ("steps", "guidance_scale", "identitynet_strength", "adapter_strength", "seed", "width", "height",
           "num_images", "negative_noise", "init_strength", "refine_face", "s_scale")
TEXTS = ("prompt", "negative_prompt", "style", "scheduler", "combine", "name", "order", "speed", "guidance_interval",
         "identity")
FLAGS = ("enhance_non_face", "lcm")
PICTURES = ("face", "pose", "init_image")
LISTS = ("extra_faces", "controls", "control_maps", "loras", "people", "person_masks")
COLUMNS = ("face", *TEXTS, *NUMBERS, *FLAGS, "pose", "init_image", *LISTS)


class ManifestError(ValueError):
    """Rows that cannot run; every problem is listed with its row number before anything loads."""


@dataclass
class Row:
    number: int  # 1-based, as a person counts the rows of the manifest
    values: dict[str, Any]  # pipeline.generate's keyword arguments (pictures opened)
    record: dict[str, Any]  # what the row asked for, as written, for results.jsonl
    key: str = ""
    name: str = ""


# ---------------------------------------------------------------------------------------------
# Reading and checking the manifest


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV (header row) or JSONL (one object per line) manifest, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    text = read_text(path, "manifest", 'save it as "CSV UTF-8" (Excel: File > Save As > CSV UTF-8) or as JSONL in '
                     "UTF-8", ManifestError)
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ManifestError(f"{path} line {number}: not JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise ManifestError(f"{path} line {number}: a JSON object per line is expected")
                rows.append(row)
        return rows
    if path.suffix.lower() != ".csv":
        raise ManifestError(f"manifest {path}: use a .csv (with a header row) or a .jsonl file")
    lines = text.splitlines()
    try:  # Excel writes ';' where the decimal comma is local, and tabs for "Unicode Text"
        dialect = csv.Sniffer().sniff(lines[0] if lines else "", delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(lines, dialect=dialect)
    rows = list(reader)
    header = len(reader.fieldnames or ())
    longer = [f"row {number} has {header + len(row[None])} fields, the header {header}" for number, row in
              enumerate(rows, 1) if None in row]
    if longer:  # an unquoted delimiter inside a value: the fields after it would shift or be dropped
        raise ManifestError(f"{path}: " + "; ".join(longer) + f". A value holding the separator "
                            f"({dialect.delimiter!r}) must be in double quotes, e.g. \"a portrait, at night\"")
    return [{key.strip(): value for key, value in row.items() if value not in ("", None)} for row in rows]


def items(value) -> list[str]:
    """A list column's values: a JSON list, or `;`-separated text."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(item) for item in value]
    return [item.strip() for item in str(value).split(";") if item.strip()]


def _as_in_a_csv(raw: dict[str, Any]) -> dict[str, Any]:
    """A JSONL row's values with the meaning the same text has in a CSV cell: a number is its text where text is
    expected, a JSON array is taken only where a column holds several values (or a pair), true/false only by the
    true/false columns. SettingsError names every value of another type (a number where a pair is expected)."""
    values, problems = {}, []
    for column, value in raw.items():
        if value is None:  # JSON null, what pandas writes for an empty cell: not given, as an empty CSV cell
            continue
        several = column in LISTS or column == "guidance_interval"
        plain_items = isinstance(value, list) and all(
            isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in value)
        if isinstance(value, (dict, list)) and not (several and plain_items) or (
                isinstance(value, bool) and column not in (*FLAGS, "refine_face")):
            problems.append(f"{column} {json.dumps(value)} is not what the column holds ("
                            f"{'a list or a text' if several else 'one value'}; see the README's 'Many images')")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and column in (*TEXTS, *PICTURES) \
                and column != "guidance_interval":
            values[column] = str(value)
        else:
            values[column] = value
    if problems:
        raise settings.SettingsError(problems)
    return values


def _relative(base: Path, text: str) -> str:
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else base / path)


def prepare_rows(manifest: str | Path, smoke: bool = False, speed: str | None = None,
                 defaults: dict[str, Any] | None = None) -> list[Row]:
    """Every row checked (settings, pictures, controls, LoRAs) and keyed; ManifestError lists all problems.

    Picture paths are relative to the manifest's folder. `speed`: the speed mode of rows without a speed
    column; `defaults` (a settings file's): the value of each column a row does not have. A row without a seed
    gets one derived from its content, so a re-run makes the same picture and finds it done.
    """
    manifest = Path(manifest)
    base = manifest.parent
    fallback = {**(defaults or {}), **({"speed": speed} if speed else {})}
    rows, problems = [], []
    for number, raw in enumerate(read_manifest(manifest), 1):
        try:
            rows.append(prepare_row(number, {**fallback, **raw}, base, smoke))
        except (ValueError, FileNotFoundError) as error:  # SettingsError, ImageInputError, ...
            problems.append(f"row {number}: {error}")
    names: dict[str, list[int]] = {}
    for row in rows:
        names.setdefault(row.name, []).append(row.number)
    problems += [f"rows {', '.join(map(str, numbers))} are all named {name!r}: their pictures would replace each other; "
                 "name each row once" for name, numbers in names.items() if len(numbers) > 1]
    if problems:
        raise ManifestError(f"{manifest}: {len(problems)} of the rows cannot run; nothing was made:\n"
                            + "\n".join(f"  - {problem}" for problem in problems))
    if not rows:
        raise ManifestError(f"{manifest} has no rows")
    return rows


def prepare_row(number: int, raw: dict[str, Any], base: Path, smoke: bool,
                open_picture: Callable[[str, str], Any] = open_image) -> Row:
    """One manifest row (`raw`: column -> value as written) checked and keyed; raises what `prepare_rows` lists.
    `open_picture(path, what)`: how its photos are opened (the identity benchmark remembers them across rows)."""
    unknown = sorted(set(raw) - set(COLUMNS))
    if unknown:
        raise settings.SettingsError([f"unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}"])
    raw = _as_in_a_csv(raw)
    values: dict[str, Any] = {name: raw[name] for name in (*TEXTS, *NUMBERS) if name in raw}
    values.update({name: settings.flag(name, raw[name]) for name in FLAGS if name in raw})
    digests: dict[str, Any] = {}
    if "people" in raw:  # several people: `A.jpg+A2.jpg;B.jpg`, optional person_masks and order
        if "face" in raw or "extra_faces" in raw:
            raise settings.SettingsError(["give face (one person) or people (2 to 4), not both"])
        values["people"], values["order"] = people.from_text(items(raw["people"]), items(raw.get("person_masks")),
                                                             values.pop("order", None), base, "pose" in raw)
        values["face_image"] = None
    elif "person_masks" in raw or "order" in raw:
        raise settings.SettingsError(["person_masks and order need a people column"])
    elif "face" not in raw and not smoke:
        raise settings.SettingsError(["no face: the face column names the photo of the person (or people, for 2 to 4)"])
    if smoke and "width" not in values and "height" not in values:
        from instantid_colab.smoke import SMOKE_SIZE  # tiny random models: seconds at 128 px, minutes at 1280

        values["width"] = values["height"] = SMOKE_SIZE
    if "face" in raw:
        values["face_image"] = open_picture(_relative(base, raw["face"]), "face photo")
    elif "people" not in raw:
        from instantid_colab.smoke import sample_face_image

        values["face_image"] = sample_face_image()
    values["extra_face_images"] = [open_picture(_relative(base, p), "extra face photo")
                                   for p in items(raw.get("extra_faces"))]
    for column, keyword, what in (("pose", "pose_image", "pose image"), ("init_image", "init_image", "start photo")):
        if column in raw:
            values[keyword] = open_picture(_relative(base, raw[column]), what)
    given = [controls.parse_control(text) for text in items(raw.get("controls"))]
    given += [controls.parse_control(text, is_map=True) for text in items(raw.get("control_maps"))]
    given = [controls.Control(c.kind, _relative(base, str(c.image)), c.strength, c.start, c.end, c.is_map) for c in given]
    checked = controls.check_controls(given)
    values["controls"] = [controls.Control(c.kind, controls.source_image(c), c.strength, c.start, c.end, c.is_map)
                          for c in checked]
    values["loras"] = loras.check_loras([loras.parse_lora(text) for text in items(raw.get("loras"))])
    name = values.pop("name", None)
    for keyword in ("face_image", "pose_image", "init_image"):
        if values.get(keyword) is not None:
            digests[keyword] = controls.image_digest(values[keyword])
    digests["extra_face_images"] = [controls.image_digest(image) for image in values["extra_face_images"]]
    digests["controls"] = [{**vars(c), "image": controls.image_digest(c.image)} for c in values["controls"]]
    digests["loras"] = [vars(lora) for lora in values["loras"]]
    digests["people"] = [{"photos": [controls.image_digest(photo) for photo in person.photos],
                          "mask": person.mask and controls.image_digest(person.mask)} for person in values.get("people", ())]
    plain = {key: value for key, value in values.items() if key not in (
        "face_image", "pose_image", "init_image", "extra_face_images", "controls", "loras", "people", "order")}
    digests["order"] = values.get("order")
    if "seed" not in plain:
        plain["seed"] = int(_digest({**plain, **digests})[:8], 16)  # stable per row content
    plain = speed.with_preset(plain)
    if "guidance_interval" in plain:
        plain["guidance_interval"] = speed.parse_interval(plain["guidance_interval"])
    if "refine_face" in plain:  # the refine pass's strength (true: the default), run after the row's images
        plain["refine_face"] = settings.refine_strength(plain["refine_face"])
    checked_plain = settings.check({**plain, "init_image": values.get("init_image"), "pose_image": values.get("pose_image"),
                                    "several_people": bool(values.get("people"))})
    for picture in ("init_image", "pose_image", "several_people"):
        del checked_plain[picture]
    values.update(checked_plain)
    ignored = settings.unused(checked_plain)  # not read: rows that differ only there make the same picture
    key = _digest({**{k: v for k, v in checked_plain.items() if k not in ignored}, **digests})
    return Row(number, values, {key: value for key, value in raw.items()}, key, name or f"{number:04d}-{key[:8]}")


def _digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Sharing the rows between processes


@dataclass
class Claims:
    """Who makes which row: claim files `DIR/claims/KEY` holding "run pid", read and written under one lock."""

    out: Path
    run: str = field(default_factory=lambda: os.environ.get("TORCHELASTIC_RUN_ID") or uuid.uuid4().hex)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        (self.out / "claims").mkdir(parents=True, exist_ok=True)
        with open(self.out / "claims" / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _held_by_someone_alive(self, key: str) -> bool:
        claim = self.out / "claims" / key
        if not claim.is_file():
            return False
        run, _, pid = claim.read_text().partition(" ")
        if run != self.run or not pid.isdigit():
            return False  # left by an earlier run
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False  # that process died: its row is free again
        except PermissionError:
            return True
        return True

    def take(self, rows: list[Row]) -> Row | None:
        """The first row that is neither done, nor failed in this run, nor held by a live process of this run
        (and mark it ours)."""
        with self.locked():
            done = done_keys(self.out) | {line["key"] for line in results(self.out) if line.get("run") == self.run}
            for row in rows:
                if row.key not in done and not self._held_by_someone_alive(row.key):
                    (self.out / "claims" / row.key).write_text(f"{self.run} {os.getpid()}")
                    return row
        return None

    def finish(self, row: Row, result: dict[str, Any]) -> None:
        """Append the row's result line and drop its claim, under the lock (one file, no duplicates). A last line
        cut off by a killed run is ended first, so this one starts a line of its own."""
        with self.locked():
            path = self.out / RESULTS
            with open(path, "a+b") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell():
                    handle.seek(-1, os.SEEK_END)
                    cut = handle.read(1) != b"\n"
                    handle.seek(0, os.SEEK_END)
                    if cut:
                        handle.write(b"\n")
                handle.write((json.dumps(result) + "\n").encode("utf-8"))
            (self.out / "claims" / row.key).unlink(missing_ok=True)


def results(out: Path) -> list[dict[str, Any]]:
    """Every record of `out/results.jsonl`, in order. A line cut off by a killed run is dropped; when an older
    version appended the next record to such a line, that record is recovered from its end."""
    path = Path(out) / RESULTS
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        record = _record(text)
        if record is not None:
            lines.append(record)
    return lines


def _record(text: str) -> dict[str, Any] | None:
    """The JSON object on a line, or the whole object that ends it (after a cut-off one); None for anything else."""
    start = 0
    while start >= 0:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(text[start:])
            return record if isinstance(record, dict) else None
        start = text.find("{", start + 1)
    return None


def latest(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each row's last record by key: a row that failed and was made on a later run counts as made."""
    return {line["key"]: line for line in lines if isinstance(line.get("key"), str)}


def pictures(out: Path, line: dict[str, Any]) -> list[Path | None]:
    """The record's pictures on disk (None for one that is gone). Files are named relative to the output folder;
    records of older versions named them relative to the folder the command ran in, so a folder that was moved,
    or a command run from elsewhere, finds them by the tail of that name under `out`."""
    found = []
    for file in line.get("files") or ():
        path = Path(file)
        tails = [path] if path.is_absolute() else [Path(*path.parts[start:]) for start in range(len(path.parts))]
        found.append(next((out / tail if not tail.is_absolute() else tail for tail in tails
                           if (out / tail).is_file()), None))
    return found


def done_keys(out: Path) -> set[str]:
    """The rows made and still on disk: a failed row (its reason in its line), or one whose picture was deleted,
    is made again by the next run."""
    out = Path(out)
    return {key for key, line in latest(results(out)).items()
            if line.get("status") == "done" and all(pictures(out, line))}


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class BatchReport:
    rows: int
    made: int
    skipped: int  # already in results.jsonl
    failed: int  # a face not found, a LoRA that does not fit, ...: recorded with the reason
    seconds: float
    out: Path
    sheet: Path | None = None  # the contact sheet, when one was written
    retried: int = 0  # rows given to another worker after theirs died (`cluster`)

    def render(self) -> str:
        rate = f", {self.made / self.seconds:.2f} rows/s" if self.made and self.seconds else ""
        sheet = f"; contact sheet: {self.sheet}" if self.sheet else ""
        retried = f", {self.retried} given to another worker after theirs died" if self.retried else ""
        return (f"{self.rows} rows: {self.made} made here, {self.skipped} already done, {self.failed} failed{retried}"
                f" ({self.seconds:.1f} s{rate}). Results: {self.out / RESULTS}{sheet}")


def run(session, rows: list[Row], out: str | Path, process: int = 0, processes: int = 1, progress: bool = True,
        on_row=None, measure: Callable[[Row, Any], dict[str, Any]] | None = None, desc: str = "batch",
        sheet: bool = True, before_row: Callable[[Row], None] | None = None) -> BatchReport:
    """Make every row not yet in `out/results.jsonl`, taking rows through `Claims` (safe with several processes).

    Each results line records the row's seconds and, on a GPU, its peak VRAM; `measure(row, result)` adds its
    own figures to the line before it is written (the identity benchmark's metrics), outside the seconds;
    `before_row(row)` runs once a row is taken, before its seconds start (the benchmark's load of a setting).
    `sheet`: write contact_sheet.png at the end.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    claims = Claims(out)
    taken = pictures_of_others(out, rows)
    already = len({row.key for row in rows} & done_keys(out))
    todo = len(rows) - already
    bar = tqdm(total=-(-todo // processes), desc=f"{desc} (GPU {process})" if processes > 1 else desc,
               unit="row", disable=not progress)
    made = failed = 0
    started = time.perf_counter()
    # PNG compression is host work: the previous row is written while the GPU makes the next one.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer") as writer:
        writing = None
        while (row := claims.take(rows)) is not None:
            if before_row is not None:
                before_row(row)
            line, result = make_row(session, row, run=claims.run, process=process, measure=measure)
            bar.update()
            if result is None:
                claims.finish(row, line)
                failed += 1
                continue
            if writing is not None:
                writing.result()  # at most one row waits to be written
            writing = writer.submit(write_row, claims, row, line, result.images, out, taken)
            made += 1
            if on_row is not None:
                on_row(row, result)
        if writing is not None:
            writing.result()
    bar.close()
    written = None
    if sheet:
        with claims.locked():
            written = contact_sheet(out, rows, session.label)
    return BatchReport(len(rows), made, already, failed, time.perf_counter() - started, out, written)


def pictures_of_others(out: Path, rows: list[Row]) -> set[str]:
    """The picture files of rows of another manifest in this folder: kept (a row of ours does not take their names)."""
    ours = {row.key for row in rows}
    return {file for key, line in latest(results(out)).items() if key not in ours and line.get("status") == "done"
            for file in line.get("files") or ()}


def make_row(session, row: Row, *, run: str, process: int = 0,
             measure: Callable[[Row, Any], dict[str, Any]] | None = None) -> tuple[dict[str, Any], Any]:
    """One row made: its results line (without its files) and the GenerationResult, or (the line with the reason,
    None) when the row fails for its input (a face not found, a LoRA that does not fit, ...). The same in one
    process, under accelerate and in a Ray worker (`cluster`)."""
    from instantid_colab import pipeline, refine

    row_started = time.perf_counter()
    peak = _PeakVram(session.device)
    line: dict[str, Any] = {"key": row.key, "row": row.number, "asked": row.record, "run": run, "process": process,
                            "pid": os.getpid(), "device": str(session.device)}
    try:
        result = pipeline.generate(session, row.values["face_image"], **_keywords(row.values))
        if row.values.get("refine_face"):
            refine.refine_faces(session, result, row.values["refine_face"], face_image=row.values["face_image"],
                                extra_face_images=row.values["extra_face_images"], people=row.values.get("people", ()))
    except (ValueError, MemoryError) as error:
        line.update(status="failed", error=str(error), seconds=round(time.perf_counter() - row_started, 2))
        return line, None
    line.update(status="done", seed=result.seed, seconds=round(time.perf_counter() - row_started, 2),
                **peak.measured(),
                identity_similarity=[likeness.similarity for likeness in result.likeness],
                people_similarity=[[score.similarity for score in scores] for scores in result.people_likeness],
                notices=result.notices,
                settings={k: v for k, v in result.settings.items() if k not in ("prompt", "negative_prompt")})
    if measure is not None:
        line.update(measure(row, result))
    return line, result


class _PeakVram:
    """The peak GPU memory allocated from now until `measured()` (nothing off a GPU)."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def measured(self) -> dict[str, float]:
        import torch

        if not self.cuda:
            return {}
        return {"peak_vram_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)}


def write_row(claims: Claims, row: Row, line: dict[str, Any], pictures: list, out: Path, taken: set[str]) -> None:
    """The row's PNGs (images, or PNG bytes a Ray worker made), then its results line (a row is done only once its
    pictures are on disk). A name that another row's picture already has in this folder (an earlier manifest's)
    gets the row's key: that picture stays."""
    from instantid_colab.png_metadata import save_png

    files = []
    for index, picture in enumerate(pictures):
        name = f"{row.name}{f'-{index}' if len(pictures) > 1 else ''}"
        if f"{name}.png" in taken:
            name = f"{name}-{row.key[:8]}"
        path = out / f"{name}.png"
        if isinstance(picture, bytes):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(picture)
        else:
            save_png(picture, path)
        files.append(str(path.relative_to(out)))  # relative to `out`: it may move
    line["files"] = files
    claims.finish(row, line)


def warm_up(session, row: Row) -> None:
    """One 64 px picture of one step with the row's settings: it loads what the row needs (its identity method,
    speed mode and style LoRAs, ControlNets, annotators) without making the row."""
    from instantid_colab import pipeline

    pipeline.generate(session, row.values["face_image"],
                      **{**_keywords(row.values), "width": 64, "height": 64, "steps": 1, "num_images": 1})


def _keywords(values: dict[str, Any]) -> dict[str, Any]:
    """pipeline.generate's keywords of a row (the face goes first; the refine pass comes after)."""
    return {key: value for key, value in values.items() if key not in ("face_image", "refine_face")}


def contact_sheet(out: Path, rows: list[Row], label: str | None = None, columns: int = 4) -> Path | None:
    """One picture of every image made so far, in manifest order, captioned with row, seed and likeness
    (under the smoke label when the images come from random weights)."""
    by_key = {key: line for key, line in latest(results(out)).items() if line.get("status") == "done"}
    tiles = []
    for row in rows:
        line = by_key.get(row.key)
        for index, (file, similarity) in enumerate(zip(pictures(out, line), line["identity_similarity"]) if line else ()):
            if file is not None:
                likeness = "n/a" if similarity is None else f"{similarity:.2f}"
                tiles.append((file, f"row {row.number}#{index + 1} · seed {line['seed']} · likeness {likeness}"))
    if not tiles:
        return None
    path = out / CONTACT_SHEET
    rows_of_tiles = [tiles[start:start + columns] for start in range(0, len(tiles), columns)]
    draw_sheet(rows_of_tiles, label, columns=columns).save(path)
    return path


def draw_sheet(grid: list[list[tuple[str | Path | None, str]]], label: str | None = None,
               titles: list[str] | None = None, columns: int | None = None, footer: list[str] = ()) -> Image.Image:
    """Thumbnails in rows and columns (`columns` wide, else as wide as the longest row), each (file or None for an
    empty place, caption: one or two lines, written right under the picture), with a title over each column when
    given, under `label` (the smoke label) when given, and `footer` lines under the grid."""
    import textwrap

    from PIL import ImageOps

    columns = columns or max(len(row) for row in grid)
    footer = [wrapped for line in footer for wrapped in textwrap.wrap(line, max(20, columns * THUMB // 6 - 2))]
    top = (24 if label else 0) + (20 if titles else 0)
    tile = THUMB + CAPTION
    sheet = Image.new("RGB", (columns * THUMB, top + len(grid) * tile + 16 * len(footer) + (8 if footer else 0)), "white")
    draw = ImageDraw.Draw(sheet)
    if label:
        draw.text((4, 6), _drawable(draw, label), fill="darkred")
    for column, title in enumerate(titles or ()):
        draw.text((column * THUMB + 4, top - 16), _drawable(draw, title), fill="black")
    for row_index, row in enumerate(grid):
        for column, (file, caption) in enumerate(row):
            x, y = column * THUMB, top + row_index * tile
            height = 0
            if file is not None:
                with Image.open(file) as picture:
                    fitted = ImageOps.contain(picture.convert("RGB"), (THUMB - 8, THUMB - 8))
                sheet.paste(fitted, (x + (THUMB - fitted.width) // 2, y))
                height = fitted.height
            draw.multiline_text((x + 4, y + height + 3), _drawable(draw, caption), fill="black", spacing=2)
    for number, line in enumerate(footer):
        draw.text((4, top + len(grid) * tile + 6 + 16 * number), _drawable(draw, line), fill="dimgrey")
    return sheet


def _drawable(draw, text: str) -> str:
    """`text` as the sheet's font can draw it: Pillow's default font before 10.1 (or without FreeType) is a bitmap
    font that knows Latin-1 only, and raises on anything else (a name in Chinese, an ellipsis); there such characters
    become "?" ("..." for the ellipsis). Pillow's FreeType default font takes any text."""
    from PIL import ImageFont

    if isinstance(draw.getfont(), ImageFont.FreeTypeFont):
        return text
    return text.replace("\u2026", "...").encode("latin-1", "replace").decode("latin-1")
