"""Where generated pictures go: checked before any generation starts, never replacing a file unasked.

A run that fails after minutes of generation because its folder cannot be written, or that silently
overwrites yesterday's picture, loses the user's work; `plan_outputs` settles both before the work.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SUFFIX = ".png"  # the settings, seed and likeness live in PNG text chunks
DEFAULT_NAME = "instantid.png"


class OutputError(ValueError):
    """The destination cannot be used; the message says why and what to do."""


def _names(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{index}{out.suffix}") for index in range(count)]


def _check_folder(folder: Path) -> None:
    """Create the folder if needed and prove it takes a file; OutputError otherwise."""
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(f"cannot write into {folder}: {existing} is a file, not a folder. Choose another --out.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise OutputError(f"cannot write into {folder} ({error.strerror or error}). Choose a folder you can write to "
                          "with --out.") from None


def plan_outputs(out: str | Path, count: int, overwrite: bool = False) -> tuple[list[Path], str | None]:
    """The `count` files a run will write for `--out`, and a notice when the names had to change.

    `out` is a `.png` file, or a folder (existing, or written with a trailing slash) that gets
    `instantid.png`. Several images are `name-0.png`, `name-1.png`, ... Existing files are kept unless
    `overwrite`: the run then takes the first free `name_2`, `name_3`, ... for all of its files.
    """
    text = str(out)
    out = Path(out).expanduser()
    if text.endswith(("/", os.sep)) or out.is_dir():
        out = out / DEFAULT_NAME
    if out.suffix.lower() != SUFFIX:
        raise OutputError(f"--out {text} must end in {SUFFIX}: the settings, seed and likeness are stored as PNG text.")
    _check_folder(out.parent)
    names = _names(out, count)
    if overwrite or not any(path.exists() for path in names):
        return names, None
    kept_names, number = names, 2
    while any(path.exists() for path in names):
        names = _names(out.with_name(f"{out.stem}_{number}{out.suffix}"), count)
        number += 1
    kept = ", ".join(str(path) for path in kept_names if path.exists())
    return names, f"{kept} already exists: writing {', '.join(str(p) for p in names)} instead (--overwrite replaces)"
