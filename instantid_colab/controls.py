"""Extra ControlNets next to the IdentityNet, as settings: which kinds and models exist, and what a user asked for.

The official multi-ControlNet rule (`pipeline_stable_diffusion_xl_instantid_full.py`,
`gradio_demo/app-multicontrolnet.py`): net 0 is the IdentityNet and sees the face tokens, every
other net sees the text, their residuals are summed, and the face box gates the IdentityNet only.
This module is data and parsing on the package's ground floor (standard library only), so the CLI,
`doctor` and a batch manifest check controls before anything heavy is imported; the annotators and
the loaded nets are `controlnets`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instantid_colab.settings import LIMITS, SettingsError, number

if TYPE_CHECKING:
    from PIL import Image

    from instantid_colab.images import ImageLike

KINDS = ("pose", "canny", "depth")
DEFAULT_STRENGTH = 0.4  # the official multi-ControlNet demo's sliders


@dataclass(frozen=True)
class ControlModel:
    """One ControlNet checkpoint on the hub; loaded as `diffusion_pytorch_model.fp16.safetensors`."""

    repo: str
    download: str  # the file fetched; a `.bin` is converted to fp16 safetensors once, then deleted
    gib: float  # fp16 weights


LOADED_NAME = "diffusion_pytorch_model.fp16.safetensors"
# Heaviest first. The official demo's models, plus diffusers' distilled canny for tight memory.
CONTROL_MODELS: dict[str, dict[str, ControlModel]] = {
    "pose": {"full": ControlModel("thibaud/controlnet-openpose-sdxl-1.0", "diffusion_pytorch_model.bin", 2.33)},
    "canny": {"full": ControlModel("diffusers/controlnet-canny-sdxl-1.0", LOADED_NAME, 2.33),
              "small": ControlModel("diffusers/controlnet-canny-sdxl-1.0-small", LOADED_NAME, 0.31)},
    "depth": {"small": ControlModel("diffusers/controlnet-depth-sdxl-1.0-small", LOADED_NAME, 0.31)},
}
ANNOTATOR_REPOS = {"pose": "usyd-community/vitpose-base-simple", "depth": "depth-anything/Depth-Anything-V2-Small-hf"}
ANNOTATOR_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@dataclass(frozen=True)
class Control:
    """One extra control: `image` is a photo to annotate, or (`is_map`) an already drawn skeleton/edge/depth map."""

    kind: str
    image: ImageLike
    strength: float = DEFAULT_STRENGTH
    start: float = 0.0
    end: float = 1.0
    is_map: bool = False


def check_controls(controls) -> list[Control]:
    """Known kinds, at most one of each, strength and start < end within `settings.LIMITS`; SettingsError otherwise."""
    problems, checked, seen = [], [], set()
    for control in controls:
        if control.kind not in KINDS:
            problems.append(f"control {control.kind!r} is not one of: {', '.join(KINDS)}")
            continue
        if control.kind in seen:
            problems.append(f"control {control.kind} is given twice; give each kind once")
        seen.add(control.kind)
        values = {}
        for field, limit in (("strength", "control_strength"), ("start", "control_start"), ("end", "control_end")):
            values[field], problem = number(f"{control.kind} {field}", getattr(control, field), LIMITS[limit])
            if problem:
                problems.append(problem)
        if None not in values.values() and values["start"] >= values["end"]:
            problems.append(f"{control.kind} range {values['start']}:{values['end']}: start must be before end")
        if not problems:
            checked.append(Control(control.kind, control.image, values["strength"], values["start"], values["end"],
                                   control.is_map))
    if problems:
        raise SettingsError(problems)
    return checked


def parse_control(text: str, is_map: bool = False) -> Control:
    """`KIND=IMAGE[:STRENGTH]` (the CLI's `--control` / `--control-map`, a batch row's `controls`)."""
    kind, sep, rest = text.partition("=")
    if not sep or not rest:
        raise SettingsError([f"control {text!r} is not KIND=IMAGE[:STRENGTH] (e.g. pose=dancer.jpg:0.6)"])
    path, strength = rest, DEFAULT_STRENGTH
    head, colon, tail = rest.rpartition(":")
    if colon and head and not Path(rest).exists():
        path, strength = head, tail
    return Control(kind.strip().lower(), path, strength, is_map=is_map)


def parse_range(text: str) -> tuple[str, float, float]:
    """`KIND=START:END` (the CLI's `--control-range`)."""
    kind, sep, rest = text.partition("=")
    start, colon, end = rest.partition(":")
    if not sep or not colon:
        raise SettingsError([f"control range {text!r} is not KIND=START:END (e.g. pose=0:0.6)"])
    return kind.strip().lower(), start, end


def with_ranges(controls: list[Control], ranges) -> list[Control]:
    """Apply `--control-range` values to the controls of those kinds."""
    ranges = {kind: (start, end) for kind, start, end in ranges}
    unknown = sorted(set(ranges) - {control.kind for control in controls})
    if unknown:
        raise SettingsError([f"--control-range {kind}: there is no {kind} control" for kind in unknown])
    return [Control(c.kind, c.image, c.strength, *ranges.get(c.kind, (c.start, c.end)), c.is_map) for c in controls]


def source_image(control: Control) -> Image.Image:
    """The picture given for a control (photo or map), opened once; ImageInputError names it."""
    from instantid_colab.images import open_image

    return open_image(control.image, f"{control.kind} image")


def describe(control: Control, source: Image.Image) -> dict[str, Any]:
    """What the PNG metadata records for a control (the model is added once the memory plan chose it)."""
    return {"kind": control.kind, "strength": control.strength, "start": control.start, "end": control.end,
            "source": "map" if control.is_map else "photo", "image_sha256": image_digest(source)}


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()[:16]


def options(kinds) -> dict[str, list[tuple[str, float]]]:
    """What `memory.plan_controls` chooses from: each kind's variants, heaviest first."""
    return {kind: [(variant, model.gib) for variant, model in CONTROL_MODELS[kind].items()] for kind in kinds}
