"""Style LoRAs on top of the SDXL model: several at once, each with a scale, combinable with a speed preset's LoRA.

diffusers' adapter API (peft) loads, weights and deletes them; LoRA layers sit beside the base
weights, which stay bit-identical, so changing or removing a LoRA between calls reloads nothing.
This module adds what diffusers does not do for us: a check, before anything is loaded, that a file
fits this UNet (an SD 1.5 LoRA or a random file otherwise fails deep inside peft, or half-loads and
silently does nothing), and undoing a load that failed, so the pipeline stays as it was.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from instantid_colab import library_messages
from instantid_colab.settings import LIMITS, SettingsError, number

SPEED_PREFIX = "speed_"  # the adapter of a speed preset's distilled LoRA (`speed.SPEEDS`)
SMOKE_LORA = "smoke"  # `--lora smoke`: the tiny LoRA written for the smoke UNet
_DOWN = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight")
_UP = (".lora_B.weight", ".lora.up.weight", ".lora_up.weight")
# Where diffusers says a LoRA has no text-encoder keys (0.42 does, from these three modules; 0.31 does not): true of
# every speed preset's LoRA and most style LoRAs, "safe to ignore" in its own words, yet it ends "open an issue".
_NO_TEXT_ENCODER_KEYS = "No LoRA keys associated to"
_SEVERAL_ADAPTERS = "Already found a `peft_config` attribute"  # peft, on every LoRA beside another: several is our design
_LOADER_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline", "diffusers.loaders.peft")


class LoraError(ValueError):
    """A LoRA that cannot be used with this pipeline; the pipeline was left as it was."""


@dataclass(frozen=True)
class Lora:
    name: str  # a .safetensors file, a hub id owner/name[/file.safetensors], or "smoke"
    scale: float = 1.0


def parse_lora(text: str) -> Lora:
    """`ID_OR_FILE[:SCALE]` (the CLI's `--lora`, a batch row's `loras`)."""
    head, colon, tail = text.rpartition(":")
    if colon and head and not Path(text).exists():
        return Lora(head, tail)
    return Lora(text)


def check_loras(loras) -> list[Lora]:
    """Scales within `settings.LIMITS["lora_scale"]`, each LoRA once; SettingsError otherwise."""
    problems, checked, names = [], [], set()
    for lora in loras:
        scale, problem = number(f"LoRA {lora.name} scale", lora.scale, LIMITS["lora_scale"])
        if problem:
            problems.append(problem)
        if lora.name in names:
            problems.append(f"LoRA {lora.name} is given twice")
        names.add(lora.name)
        checked.append(Lora(lora.name, scale))
    if problems:
        raise SettingsError(problems)
    return checked


def adapter_name(path: Path) -> str:
    """A stable, unique adapter name for a file (peft names must be identifiers)."""
    stem = re.sub(r"\W", "_", path.stem)[:32]
    return f"{stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


def fit_problems(pipe, state_dict: dict) -> list[str]:
    """Why a LoRA state dict (diffusers' naming) does not fit this pipeline's UNet and text encoders."""
    targets = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    problems, layers = [], 0
    for key, down in state_dict.items():
        suffix = next((s for s in _DOWN if key.endswith(s)), None)
        if suffix is None:
            continue
        component, _, module_path = key[: -len(suffix)].partition(".")
        up = next((state_dict[key[: -len(suffix)] + u] for u in _UP if key[: -len(suffix)] + u in state_dict), None)
        model = targets.get(component)
        try:
            module = model.get_submodule(module_path) if model is not None else None
        except AttributeError:
            module = None
        if module is None:
            problems.append(f"{key}: this pipeline has no {component}.{module_path}")
            continue
        weight = getattr(module, "base_layer", module).weight
        if down.shape[1] != weight.shape[1] or (up is not None and up.shape[0] != weight.shape[0]):
            problems.append(f"{key}: LoRA {list(down.shape)} x {list(up.shape) if up is not None else '?'} "
                            f"for a layer of {list(weight.shape[:2])}")
            continue
        layers += 1
    if not layers and not problems:
        problems.append("no LoRA layers (lora_A/lora_B or lora_down/lora_up weights) in the file")
    return problems


def _likely_cause(problems: list[str]) -> str:
    if any("x 768" in p or ", 768]" in p or "[320, 768]" in p for p in problems):
        return "it looks like a Stable Diffusion 1.5 LoRA (768-wide text context); this pipeline is SDXL."
    return "it was trained for a different model than this SDXL pipeline, or it is not a LoRA."


def load(pipe, path: Path, name: str) -> str:
    """Load one LoRA file as adapter `name` after checking it fits; LoraError (pipeline unchanged) otherwise."""
    try:
        # Folder + weight_name, as for loading: diffusers 0.31 and 0.32 refuse a bare file path when the hub is offline.
        state_dict, _ = pipe.lora_state_dict(str(path.parent), weight_name=path.name)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same answer
        raise LoraError(f"LoRA {path}: cannot be read as an SDXL LoRA ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200] if str(error) else ''}). Give a .safetensors LoRA made "
                        "for SDXL.") from None
    problems = fit_problems(pipe, state_dict)
    if problems:
        shown = "\n".join(f"  - {problem}" for problem in problems[:6])
        more = f"\n  - ... and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise LoraError(f"LoRA {path} does not fit this pipeline:\n{shown}{more}\nLikely cause: {_likely_cause(problems)} "
                        "Next step: use a LoRA trained for SDXL (its model card says SDXL 1.0 or an SDXL fine-tune).")
    before = set(pipe.get_list_adapters().get("unet", []))
    try:
        with library_messages.without(_LOADER_LOGGERS, _NO_TEXT_ENCODER_KEYS), \
                library_messages.warnings_without(_SEVERAL_ADAPTERS):
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    except Exception as error:
        if name in set(pipe.get_list_adapters().get("unet", [])) - before:
            pipe.delete_adapters(name)
        raise LoraError(f"LoRA {path}: diffusers could not load it ({type(error).__name__}: {error}); the pipeline "
                        "was left as it was.") from None
    return name


def activate(pipe, loaded: dict[str, float]) -> None:
    """Make exactly these adapters active with these scales (none: LoRA off)."""
    if loaded:
        pipe.set_adapters(list(loaded), adapter_weights=list(loaded.values()))
        pipe.enable_lora()
    elif pipe.get_list_adapters():
        pipe.disable_lora()


class LoraState:
    """The adapters loaded into one pipeline (by adapter name) and the ones active now, with their scales."""

    def __init__(self):
        self.files: dict[str, Path] = {}
        self.active: dict[str, float] = {}

    def apply(self, pipe, wanted: list[tuple[Path, float]], speed: tuple[Path, float] | None = None,
              engine: dict[str, float] | None = None) -> None:
        """Load what is new (each checked first), delete what is no longer asked for, activate the rest. A speed
        preset's LoRA stays loaded (off) for the next fast run until another one is asked for: it is large.
        `engine`: adapters an identity method loaded itself (FaceID's `faceid_0`), on for this call only.
        A file that does not fit changes nothing."""
        requested = {adapter_name(path): (path, scale) for path, scale in wanted}
        if speed is not None:
            requested[SPEED_PREFIX + adapter_name(speed[0])] = speed
        engine = engine or {}
        if not requested and not self.active and not engine:
            return  # nothing asked, nothing on: asking diffusers would walk every module
        added = []
        try:
            for name, (path, _) in requested.items():
                if name not in self.files:
                    self.files[load(pipe, path, name)] = path
                    added.append(name)
        except LoraError:
            for name in added:
                pipe.delete_adapters(name)
                del self.files[name]
            activate(pipe, self.active)
            raise
        kept = speed is None  # with no speed LoRA asked for, the last one stays for the next fast run
        for name in [name for name in self.files if name not in requested and not (kept and name.startswith(SPEED_PREFIX))]:
            pipe.delete_adapters(name)
            del self.files[name]
        self.active = {**{name: scale for name, (_, scale) in requested.items()}, **engine}
        activate(pipe, self.active)
