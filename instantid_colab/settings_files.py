"""Settings files: a setting `bench` found best (its `best_settings/` folder), read back by `generate --settings`,
`batch --settings` and the app's *Load settings*, so a chosen setting makes the next pictures.

A settings file is JSON: `{"settings": {COLUMN: VALUE, ...}, ...}`, each column a batch manifest column meaning what
it means there ("speed": "lightning-4", "guidance_interval": "0.17,0.9", "loras": "owner/name:0.8"); the rest of the
file says where it comes from (the setting's name, what bench measured). Ground floor: `generate`'s options are
checked against it before anything loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from instantid_colab import speed
from instantid_colab.settings import SettingsError
from instantid_colab.textfiles import read_text

# Manifest columns that are a repeatable option on the command line, and its name there.
REPEATED = {"controls": "control", "control_maps": "control_map", "loras": "lora", "extra_faces": "extra_face"}
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off", "")


def read(path: str | Path) -> dict[str, Any]:
    """The `settings` of a settings file; SettingsError (exit 2) naming the file when it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SettingsError([f"--settings {path}: no such file; give a settings file bench wrote (its "
                             "best_settings/ folder)"])
    text = read_text(path, "settings file", "save it as UTF-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SettingsError([f"--settings {path}: not JSON ({error.msg}, line {error.lineno}); give a settings file "
                             "bench wrote"]) from None
    values = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise SettingsError([f"--settings {path}: no \"settings\" object in it; a settings file is "
                             "{\"settings\": {\"speed\": \"lightning-4\", ...}} as bench writes it"])
    return values


def command_line_defaults(values: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> dict[str, Any]:
    """`values` (manifest columns) as defaults of `parser`'s options, converted as the command line converts text:
    what is typed on the command line still wins. SettingsError names each column the command has no option for."""
    actions = {action.dest: action for action in parser._actions}  # argparse keeps its options there
    defaults, problems = {}, []
    for column, value in values.items():
        action = actions.get(REPEATED.get(column, column))
        if action is None or column in ("face", "prompt", "seed", "name"):
            problems.append(f"--settings {source}: {column!r} is not a setting this command takes from a file")
            continue
        try:
            defaults[action.dest] = _converted(action, value)
        except (TypeError, ValueError):
            problems.append(f"--settings {source}: {column} {value!r} is not what --{action.dest.replace('_', '-')} "
                            "takes")
    if problems:
        raise SettingsError(problems)
    return defaults


def _converted(action: argparse.Action, value: Any) -> Any:
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [part for part in str(value).split(";") if part.strip()]
        return [str(item).strip() for item in items]
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        text = str(value).strip().lower()
        if text not in TRUE + FALSE:
            raise ValueError(value)
        return text in TRUE
    if value is None:
        return None
    if action.type is int:  # "4" or 4.0, never 0.6 cut to 0
        number = float(value)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    return action.type(value) if action.type is not None else str(value)


# Settings-file column -> the app's input of the same meaning (the rest are said to be set by hand).
PAGE_INPUTS = {name: name for name in (
    "style", "identitynet_strength", "adapter_strength", "identity", "s_scale", "negative_prompt", "steps",
    "guidance_scale", "scheduler", "num_images", "enhance_non_face", "negative_noise", "combine", "init_strength")}
PAGE_INPUTS["speed"] = "speed_mode"
PAGE_FIELDS = (*PAGE_INPUTS.values(), "guidance_from", "guidance_to", "lora_text", "refine_on", "refine_strength",
               "size")  # every input `page_values` may set


def page_values(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the app's inputs set from a settings file, the columns the page cannot take from a file: pictures,
    ControlNets). A speed mode brings its own steps and guidance unless the file gives them."""
    page, left = {}, []
    for column, value in values.items():
        if column in PAGE_INPUTS:
            page[PAGE_INPUTS[column]] = _page_value(value)
        elif column == "guidance_interval" and value:
            page["guidance_from"], page["guidance_to"] = (float(part) for part in str(value).split(","))
        elif column in ("width", "height"):
            continue
        elif column == "loras":
            page["lora_text"] = "\n".join(value if isinstance(value, list) else str(value).split(";"))
        elif column == "refine_face":
            page["refine_on"], page["refine_strength"] = value is not None, float(value) if value is not None else None
        else:
            left.append(column)
    if values.get("width") and values.get("height"):
        page["size"] = f"{int(float(values['width']))}x{int(float(values['height']))}"
    if "speed_mode" in page:
        preset = speed.preset(page["speed_mode"])
        page.setdefault("steps", preset.steps)
        page.setdefault("guidance_scale", preset.guidance_scale)
    return {name: value for name, value in page.items() if value is not None}, left


def _page_value(value: Any) -> Any:
    """Numbers written as text in a manifest become numbers; flags written as text become flags."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in TRUE[:2] + FALSE[:2]:
            return text.lower() in TRUE
        try:
            return float(text) if "." in text else int(text)
        except ValueError:
            return text
    return value
