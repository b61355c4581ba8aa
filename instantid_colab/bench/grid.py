"""The settings an identity benchmark compares: a grid of dimensions, or a file of named configurations.

`speed=quality,lightning-4; identitynet_strength=0.6,0.8; guidance_interval=none,0.17:0.9` is every combination of
the values (the first dimension varies slowest); `none` is the setting's default, and a pair such as a guidance
interval is written with a colon. A CSV or JSONL file holds one configuration a row, named by its `name` column.
A value means what it means in a batch manifest: each configuration is checked as a manifest row before anything
loads (`run.plan`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instantid_colab import batch
from instantid_colab.settings import SettingsError

# What a row of the benchmark sets itself: the person, the prompt, the seed and one image per row.
SET_BY_THE_BENCHMARK = ("face", "extra_faces", "people", "person_masks", "order", "name", "prompt", "seed",
                        "num_images")
DIMENSIONS = tuple(column for column in batch.COLUMNS if column not in SET_BY_THE_BENCHMARK)
PAIRS = ("guidance_interval",)  # written START:END in a grid, START,END in a manifest
FILE_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class Configuration:
    """One setting of the grid: its name and the manifest columns it sets (the rest take their defaults); `named`:
    written one by one in a grid file (not a combination of a grid's values)."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)
    named: bool = False


def _dimension(part: str) -> tuple[str, list[Any]]:
    name, equals, text = part.partition("=")
    name = name.strip().replace("-", "_")
    if not equals or not name:
        raise SettingsError([f"grid: {part.strip()!r} is not NAME=VALUE,VALUE,..."])
    if name not in DIMENSIONS:
        raise SettingsError([f"grid: {name!r} is not a setting the grid can vary; use: {', '.join(DIMENSIONS)}"])
    values = [value.strip() for value in text.split(",")]
    if any(not value for value in values):
        raise SettingsError([f"grid: {name} has an empty value in {text.strip()!r}"])
    if len(set(values)) < len(values):
        raise SettingsError([f"grid: {name} lists a value twice in {text.strip()!r}"])
    return name, [None if value.lower() == "none" else value.replace(":", ",") if name in PAIRS else value
                  for value in values]


def parse_grid(spec: str | None) -> list[Configuration]:
    """The configurations `spec` names: a grid, a file, or (None/empty) one configuration with every default."""
    if spec is None or not spec.strip():
        return [Configuration("defaults")]
    if Path(spec).suffix.lower() in FILE_SUFFIXES and "=" not in spec:
        return read_grid_file(Path(spec).expanduser())
    dimensions = [_dimension(part) for part in spec.split(";") if part.strip()]
    names = [name for name, _ in dimensions]
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise SettingsError([f"grid: {', '.join(doubled)} given twice; list all its values in one place"])
    configurations = []
    for combination in itertools.product(*(values for _, values in dimensions)):
        chosen = dict(zip(names, combination))
        label = ", ".join(f"{name}={'none' if value is None else str(value).replace(',', ':')}"
                          for name, value in chosen.items())
        configurations.append(Configuration(label, {name: value for name, value in chosen.items() if value is not None}))
    return configurations


def _beside(folder: Path, values: dict[str, Any]) -> dict[str, Any]:
    """A grid file's pictures named as a manifest names them: a relative path is beside the file, not in the folder
    the command runs in (pose, start photo, ControlNet photos and maps, LoRA files that are there)."""
    from instantid_colab.controls import parse_control

    def placed(text: str) -> str:
        path = Path(text).expanduser()
        return text if path.is_absolute() or not (folder / path).exists() else str(folder / path)

    found = dict(values)
    for column in ("pose", "init_image"):
        if isinstance(found.get(column), str):
            found[column] = placed(found[column])
    for column in ("controls", "control_maps"):
        if column in found:
            controls = [parse_control(text) for text in batch.items(found[column])]
            found[column] = [f"{c.kind}={placed(str(c.image))}:{c.strength}" for c in controls]
    if "loras" in found:
        found["loras"] = [placed(name) if ":" not in name else f"{placed(name.rpartition(':')[0])}:{name.rpartition(':')[2]}"
                          for name in batch.items(found["loras"])]
    return found


def read_grid_file(path: Path) -> list[Configuration]:
    """Named configurations from a CSV (header row) or JSONL file, in the encodings spreadsheets write."""
    if not path.is_file():
        raise ValueError(f"--grid {path}: no such file; give a CSV or JSONL file of configurations, or a grid such "
                         "as \"speed=quality,lightning-4\"")
    configurations = []
    for number, row in enumerate(batch.read_manifest(path), 1):
        values = _beside(path.parent, {key: value for key, value in row.items() if key != "name" and value is not None})
        unknown = sorted(set(values) - set(DIMENSIONS))
        if unknown:
            raise SettingsError([f"--grid {path} row {number}: {', '.join(unknown)} cannot vary in a benchmark; "
                                 f"use: {', '.join(DIMENSIONS)}"])
        configurations.append(Configuration(str(row.get("name") or f"configuration {number}"), values, named=True))
    if not configurations:
        raise ValueError(f"--grid {path} holds no configuration")
    names = [configuration.name for configuration in configurations]
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise SettingsError([f"--grid {path}: two configurations are named {', '.join(doubled)}; name each once"])
    return configurations
