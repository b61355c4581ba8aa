"""Which generation settings are allowed: one table and one check for every entry point.

The CLI, the app, the notebook form, the batch command and `pipeline.generate` itself all call
`check` before any model work, so a value is refused the same way everywhere, with its name, the
value and the allowed range. The ranges are the official InstantID demo's (`gradio_demo/app.py`,
`app-multicontrolnet.py`) where it has a control, and say where they come from otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from instantid_colab import engines
from instantid_colab.schedulers import SCHEDULERS
from instantid_colab.styles import STYLES

MAX_SIDE, MULTIPLE = 1280, 64  # SDXL and the IdentityNet were trained up to 1280 px, in steps of 64
SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square 1024": (1024, 1024), "portrait 896x1152": (896, 1152), "landscape 1152x896": (1152, 896),
    "portrait 768x1024": (768, 1024), "landscape 1024x768": (1024, 768), "square 768": (768, 768),
}


@dataclass(frozen=True)
class Bounds:
    """An allowed closed range; `integer` values must be whole numbers."""

    low: float
    high: float
    integer: bool = False
    source: str = ""

    def render(self) -> str:
        low, high = (int(v) if float(v).is_integer() else v for v in (self.low, self.high))
        return f"{low} to {high}" + (f" ({self.source})" if self.source else "")


LIMITS: dict[str, Bounds] = {
    "steps": Bounds(1, 100, True, "the official demo goes up to 100; fast mode (LCM) uses 4-10"),
    "guidance_scale": Bounds(0, 10, source="the official demo's range; 1 or less turns classifier-free guidance off"),
    "identitynet_strength": Bounds(0, 1.5, source="the official demo's range"),
    "adapter_strength": Bounds(0, 1.5, source="the official demo's range"),
    "negative_noise": Bounds(0, 1, source="ComfyUI_InstantID's noise injection; it uses 0.35"),
    "num_images": Bounds(1, 8, True, "per call; the batch command makes any number"),
    "seed": Bounds(0, 2**32 - 1, True),
    "init_strength": Bounds(0.01, 1, source="how much of the start photo is repainted; the official img2img demo"),
    "guidance_interval": Bounds(0, 1, source="fractions of the steps: classifier-free guidance only between them"),
    "preview_every": Bounds(1, 100, True, "steps between previews"),
    "refine_strength": Bounds(0.01, 1, source="how much of each face is repainted by the refine pass; 0.4 by default"),
    "which_face": Bounds(1, 64, True, "faces counted from the left, from 1"),
    "control_strength": Bounds(0, 1.5, source="the official multi-ControlNet demo's range"),
    "control_start": Bounds(0, 1, source="fraction of the steps"),
    "control_end": Bounds(0, 1, source="fraction of the steps"),
    "lora_scale": Bounds(-2, 2, source="negative scales push away from a LoRA's style"),
    "people": Bounds(1, 4, True, "people in one picture; the IdentityNet runs once per person per step"),
    "memory_gib": Bounds(0, 2**20, source="GiB of RAM or VRAM, as measured"),
    "gpus": Bounds(1, 64, True, "one process per GPU"),
    "ray_workers": Bounds(1, 4096, True, "Ray workers, each with its own loaded pipeline (default: one per GPU)"),
    "photo_side": Bounds(64, 65535, True, "pixels; a photo is decoded at most this large"),
    "det_size": Bounds(160, 1280, True, "insightface's detector input side; the official demo uses 640"),
    "port": Bounds(1, 65535, True, "a TCP port"),
    "pose_batch": Bounds(1, 4096, True, "images per forward pass when measuring throughput"),
    "s_scale": Bounds(0, 3, source="FaceID Plus V2's structure weight (the card's s_scale): 1 by default"),
    "bench_seeds": Bounds(1, 64, True, "images per person, prompt and setting; PuLID's protocol makes 4 per person"),
}
FLAGS = ("enhance_non_face", "lcm")
PAIRS = ("guidance_interval",)  # LIMITS rows for both ends of a pair, not a setting's own value
REFINE_STRENGTH = 0.4  # the refine pass's strength when it is only switched on (`--refine-face`, `true`)
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
COMBINE_MODES = ("average", "norm_average", "concat")  # several photos of one person: ComfyUI_InstantID's options


def unused(values: Mapping[str, Any]) -> dict[str, str]:
    """The settings in `values` (checked, a speed mode's applied) that this run does not read, each with why: the
    method's (what its registry line does not read), and a guidance interval where the guidance is 1 or less."""
    identity = engines.METHODS.get(values.get("identity") or engines.DEFAULT)  # an unknown name is check's to refuse
    found = {name: f"identity {identity.name} does not use it" for name in (identity.unused() if identity else ())
             if name in values}
    guidance = values.get("guidance_scale")
    if values.get("guidance_interval") is not None and isinstance(guidance, (int, float)) and guidance <= 1:
        found["guidance_interval"] = f"guidance {guidance} runs no classifier-free guidance to limit"
    return found


class SettingsError(ValueError):
    """Settings outside what is allowed; one line per problem, each naming the value and the range."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems) if len(problems) == 1 else
                         "these settings are not allowed:\n" + "\n".join(f"  - {p}" for p in problems))


def number(name: str, value: Any, bounds: Bounds | None = None) -> tuple[float | int | None, str | None]:
    """(the value as int/float, None) when allowed, else (None, the problem)."""
    bounds = bounds or LIMITS[name]
    if isinstance(value, bool):  # a JSON true is not the number 1
        return None, f"{name} {value!r} is not a number: use {bounds.render()}"
    if not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+,\d+\s*", value):  # Excel in many languages
                return None, (f"{name} {value!r} is not a number: write the decimal with a point "
                              f"({value.strip().replace(',', '.')}); use {bounds.render()}")
            return None, f"{name} {value!r} is not a number: use {bounds.render()}"
    if math.isnan(value) or math.isinf(value):
        return None, f"{name} {value} is not a number: use {bounds.render()}"
    if bounds.integer and not float(value).is_integer():
        return None, f"{name} {value} is not a whole number: use {bounds.render()}"
    value = int(value) if bounds.integer else float(value)
    if not bounds.low <= value <= bounds.high:
        return None, f"{name} {value} is out of range: use {bounds.render()}"
    return value, None


def flag(name: str, value: Any) -> bool:
    """A true/false setting as a command line, a CSV cell (true/yes/on/1, false/no/off/0) or JSON gives it."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    raise SettingsError([f"{name} {value!r} is not true or false"])


def refine_strength(value: Any) -> float | None:
    """The refine pass's strength as every entry point means it: None/false/"" off; true (or the bare option) the
    default REFINE_STRENGTH; a number its strength, checked against LIMITS. A JSON true is not the number 1."""
    if value is None or value == "" or value is False:
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in TRUE_WORDS[1:]):
        return REFINE_STRENGTH
    if isinstance(value, str) and value.strip().lower() in FALSE_WORDS[1:]:
        return None
    strength, problem = number("refine_face", value, LIMITS["refine_strength"])
    if problem:
        raise SettingsError([f"{problem}; or true for {REFINE_STRENGTH}, false for no refine pass"])
    return strength


def size_problems(width: Any, height: Any) -> list[str]:
    """Why an explicit output size cannot be made (empty when it can)."""
    return _size(width, height)[1]


def _size(width: Any, height: Any) -> tuple[tuple[int, int] | None, list[str]]:
    """((width, height) as whole numbers, []) for a size that can be made (a manifest writes them as text), else
    (None, why not)."""
    side = Bounds(MULTIPLE, MAX_SIDE, True)
    (width, width_problem), (height, height_problem) = number("width", width, side), number("height", height, side)
    problems = [problem for problem in (width_problem, height_problem) if problem]
    if problems:
        return None, problems
    if width % MULTIPLE or height % MULTIPLE:
        presets = ", ".join(f"{w}x{h}" for w, h in SIZE_PRESETS.values())
        return None, [f"size {width}x{height}: width and height must be multiples of {MULTIPLE} (e.g. {presets})"]
    return (width, height), []


def check_arguments(**arguments: tuple[Any, str]) -> list[Any]:
    """A public function's numeric arguments, each `name=(value, LIMITS row)`, as int/float in the order
    given; None passes (where the function allows it). SettingsError lists every problem, by argument name."""
    checked, problems = [], []
    for name, (value, row) in arguments.items():
        if value is not None:
            value, problem = number(name, value, LIMITS[row])
            if problem:
                problems.append(problem)
        checked.append(value)
    if problems:
        raise SettingsError(problems)
    return checked


def check_size(width: int, height: int) -> None:
    """Explicit sizes: multiples of 64, each side 64 to 1280 (what SDXL and the IdentityNet were trained at)."""
    problems = size_problems(width, height)
    if problems:
        raise SettingsError(problems)


def check(values: Mapping[str, Any]) -> dict[str, Any]:
    """A validated copy of `pipeline.generate`'s keyword arguments; SettingsError lists every problem.

    Keys it does not know (images, prompts, callbacks) pass through unchanged. Numbers come back as
    int/float (30.0 steps -> 30), so the CLI, the app's floats and a notebook's ints all agree.
    """
    checked, problems = dict(values), []
    for name in LIMITS:
        if name in PAIRS:  # START,END: each end checked by speed.parse_interval against this row
            continue
        if name in values and values[name] is not None:
            checked[name], problem = number(name, values[name])
            if problem:
                problems.append(problem)
    for name in FLAGS:
        if name in values and not isinstance(values[name], bool):
            problems.append(f"{name} {values[name]!r} must be true or false")
    choices = {"style": tuple(STYLES), "scheduler": tuple(SCHEDULERS), "combine": COMBINE_MODES,
               "identity": tuple(engines.METHODS)}
    for name, allowed in choices.items():  # None: the default (a speed mode's scheduler, say)
        if values.get(name) is not None and values[name] not in allowed:
            problems.append(f"{name} {values[name]!r} is not one of: {', '.join(allowed)}")
    width, height = values.get("width"), values.get("height")
    if (width is None) != (height is None):
        problems.append("give both width and height, or neither (then the official size rule follows the photo)")
    elif width is not None:
        size, size_problems_found = _size(width, height)
        problems += size_problems_found
        if size:
            checked["width"], checked["height"] = size
    if values.get("identity") in engines.METHODS:
        problems += engines.method(values["identity"]).cannot({**values, **checked})  # numbers as numbers
    if values.get("init_image") is not None and not problems:
        steps, strength = checked.get("steps") or 30, checked.get("init_strength", 0.8)
        if int(steps * strength) < 1:
            problems.append(f"init_strength {strength} x steps {steps} repaints less than one step: "
                            "raise the strength or the steps")
    refine = values.get("refine_face")
    if isinstance(refine, (int, float)) and not isinstance(refine, bool) and refine > 0 and not problems:
        steps = checked.get("steps") or 30
        if int(steps * refine) < 1:  # else the picture would be made, then its refine pass refused
            problems.append(f"refine_face {refine} x steps {steps} repaints less than one step of the refine pass: "
                            f"raise the refine strength to at least {1 / steps:.2f} or the steps")
    if problems:
        raise SettingsError(problems)
    return checked
