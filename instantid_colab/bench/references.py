"""The people of an identity benchmark: a folder holding one photo per person, or one folder per person.

With two or more photos of a person, the last in name order (as a file browser sorts them: IMG_2 before IMG_10)
is held out: it is never given to the generator,
and likeness is measured against it too. Scoring only against the photo the picture was made from rewards
copying that photo; a held-out photo of the same person is the honest test (PuLID and UniPortrait measure
against other photos of the person for that reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".gif")


@dataclass(frozen=True)
class BenchPerson:
    """One person: the photos the generator gets, and the held-out one (None with a single photo)."""

    name: str
    references: tuple[Path, ...]
    held_out: Path | None = None

    def describe(self) -> str:
        given = ", ".join(path.name for path in self.references)
        held = f"held out: {self.held_out.name}" if self.held_out else "nothing held out (one photo)"
        return f"{self.name}: given {given}; {held}"


def natural_order(path: Path) -> tuple:
    """A name's sort key as file browsers sort: digit runs by their number, letters regardless of case."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.casefold())
                 for part in re.split(r"(\d+)", path.name))


def _photos(folder: Path) -> list[Path]:
    return sorted((path for path in folder.iterdir()
                   if path.is_file() and path.suffix.lower() in PHOTO_SUFFIXES and not path.name.startswith(".")),
                  key=natural_order)


def slug(name: str) -> str:
    """A file-name-safe form of a person's or a setting's name: letters and digits of any script kept (李 and 王 stay
    two people), the rest one underscore; a name of nothing but signs gets a short digest of itself."""
    import hashlib

    found = re.sub(r"[^\w.-]+", "_", name).strip("_.")
    return found or "x" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


def find_people(folder: str | Path) -> list[BenchPerson]:
    """The people under `folder`, in name order: each photo directly in it is a person (named by the file),
    each sub-folder is a person (named by the folder). ValueError when there is none, or a folder has no photo."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise ValueError(f"--faces {folder}: {what}; give a folder with one photo per person, or one folder of "
                         "photos per person")
    people, empty = [], []
    for entry in sorted(folder.iterdir(), key=natural_order):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            photos = _photos(entry)
            if not photos:
                empty.append(entry.name)
                continue
        elif entry.suffix.lower() in PHOTO_SUFFIXES:
            photos = [entry]
        else:
            continue
        held_out = photos[-1] if len(photos) > 1 else None
        people.append(BenchPerson(entry.stem if entry.is_file() else entry.name,
                                  tuple(photos[:-1] if held_out else photos), held_out))
    if empty:
        raise ValueError(f"--faces {folder}: these person folders hold no photo ({', '.join(PHOTO_SUFFIXES)}): "
                         f"{', '.join(empty)}; add photos or remove the folders")
    if not people:
        raise ValueError(f"--faces {folder} holds no photos ({', '.join(PHOTO_SUFFIXES)}), directly or one folder "
                         "per person")
    names = [slug(person.name) for person in people]
    if len(set(names)) < len(names):
        doubles = [person.name for person in people if names.count(slug(person.name)) > 1]
        raise ValueError(f"--faces {folder}: {', '.join(repr(name) for name in doubles)} would share one file name "
                         f"({', '.join(sorted({slug(name) for name in doubles}))}): a photo and a folder of the same "
                         "name, or names that differ only in signs; rename one")
    return people
