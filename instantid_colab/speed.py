"""Less work per image: few-step LoRA presets, guidance only inside an interval of the schedule, live previews.

- Presets (`--speed NAME`): a scheduler, its timestep spacing, steps, guidance and a distilled LoRA at the scale
  its model card gives (cited beside each). The LoRA goes through the same adapter machinery as style LoRAs
  (`loras.LoraState`: fit-checked before loading, combinable, unloaded when no longer asked for); a user's own
  steps and guidance still win over the preset's.
- Guidance interval (Kynkäänniemi et al. 2024, arXiv 2404.07724): classifier-free guidance only on the steps
  inside [start, end) of the schedule. diffusers' classic pipelines choose CFG once per call, so for the steps
  outside, the UNet and the ControlNets are called with the conditional half of the batch only and their output
  is duplicated: CFG's `uncond + g (cond - uncond)` then gives `cond` exactly, and the unconditional half is
  never computed. Which steps are inside follows diffusers' `ClassifierFreeGuidance` guider (`start`/`stop`)
  where the installed version has one.
- Previews: TAESDXL (`AutoencoderTiny`, madebyollin/taesdxl, 10 MB) decodes the latents every k steps; the
  final image still comes from the full VAE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from instantid_colab.settings import SettingsError, check_arguments

TAESD_REPO = "madebyollin/taesdxl"
TAESD_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
PREVIEW_EVERY = 5  # steps between previews by default


@dataclass(frozen=True)
class SpeedPreset:
    """How one speed mode samples: scheduler (a `schedulers.SCHEDULERS` name), steps, guidance, and the
    distilled LoRA it needs (hub repo, file, scale), with the model card they come from."""

    name: str
    scheduler: str
    steps: int
    guidance_scale: float
    lora: tuple[str, str] | None = None
    lora_scale: float = 1.0
    timesteps: tuple[int, ...] | None = None  # a fixed schedule, where the card gives one
    eta: float | None = None  # the scheduler's stochasticity, where the card gives one
    source: str = ""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "scheduler": self.scheduler, "lora": "/".join(self.lora) if self.lora else None,
                "lora_scale": self.lora_scale if self.lora else None}


SPEEDS: dict[str, SpeedPreset] = {preset.name: preset for preset in (
    SpeedPreset("quality", "Euler", 30, 5.0, source="the official InstantID demo (gradio_demo/app.py)"),
    SpeedPreset("lcm", "LCM", 5, 1.5, ("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors"),
                source="the official InstantID demo's LCM toggle: 5 steps (5-10), guidance 1.5"),
    SpeedPreset("lightning-4", "Euler trailing", 4, 0.0,
                ("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_lora.safetensors"),
                source="ByteDance/SDXL-Lightning card: Euler with timestep_spacing 'trailing', guidance 0, the "
                       "N-step LoRA fused at 1.0 for N steps"),
    SpeedPreset("lightning-8", "Euler trailing", 8, 0.0,
                ("ByteDance/SDXL-Lightning", "sdxl_lightning_8step_lora.safetensors"),
                source="ByteDance/SDXL-Lightning card, as lightning-4"),
    SpeedPreset("hyper-8", "DDIM trailing", 8, 5.0, ("ByteDance/Hyper-SD", "Hyper-SDXL-8steps-CFG-lora.safetensors"),
                source="ByteDance/Hyper-SD card: the CFG-preserving 8-step SDXL LoRA (guidance 5 to 8), fused at 1.0, "
                       "DDIM with timestep_spacing 'trailing'"),
    SpeedPreset("dmd2-4", "LCM", 4, 0.0, ("tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors"),
                timesteps=(999, 749, 499, 249),
                source="tianweiy/DMD2 card: the 4-step LoRA fused at 1.0, LCMScheduler with the training timesteps "
                       "999, 749, 499, 249, guidance 0"),
    SpeedPreset("tcd", "TCD", 4, 0.0, ("h1t/TCD-SDXL-LoRA", "pytorch_lora_weights.safetensors"), eta=0.3,
                source="h1t/TCD-SDXL-LoRA card: TCDScheduler, 4 steps, guidance 0, eta (gamma) 0.3, fused at 1.0"),
)}
DEFAULT_SPEED = "quality"


def preset(name: str) -> SpeedPreset:
    if name not in SPEEDS:
        raise SettingsError([f"speed {name!r} is not one of: {', '.join(SPEEDS)}"])
    return SPEEDS[name]


def with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (pipeline.generate's keywords) with the speed preset's steps, guidance and scheduler where they
    are None or absent (the user's own win); `lcm` true is the "lcm" preset."""
    if values.get("lcm") and values.get("speed", DEFAULT_SPEED) not in (DEFAULT_SPEED, "lcm"):
        raise SettingsError([f"lcm and speed {values['speed']!r}: choose one speed (lcm is the 'lcm' preset)"])
    chosen = preset("lcm" if values.get("lcm") else values.get("speed", DEFAULT_SPEED))
    defaults = {"steps": chosen.steps, "guidance_scale": chosen.guidance_scale, "scheduler": chosen.scheduler}
    return {**values, **{name: value for name, value in defaults.items() if values.get(name) is None},
            "speed": chosen.name, "lcm": chosen.name == "lcm"}


def parse_interval(text: str | tuple | list | None) -> tuple[float, float] | None:
    """`START,END` (fractions of the schedule, START < END) or a pair; None or empty: CFG on every step."""
    if text is None or text == "" or text == ():
        return None
    if not isinstance(text, (str, list, tuple)):  # a JSON manifest's number or object where a pair belongs
        raise SettingsError([f"guidance interval {text!r} is not START,END (fractions of the steps, e.g. \"0.17,0.9\" "
                             "or [0.17, 0.9])"])
    parts = [part.strip() for part in text.split(",")] if isinstance(text, str) else list(text)
    if len(parts) != 2:
        raise SettingsError([f"guidance interval {text!r} is not START,END (fractions of the steps, e.g. 0.17,0.9)"])
    start, end = check_arguments(guidance_start=(parts[0], "guidance_interval"), guidance_end=(parts[1], "guidance_interval"))
    if start >= end:
        raise SettingsError([f"guidance interval {start},{end}: START must be before END"])
    return start, end


def usable_interval(interval: tuple[float, float] | None, guidance_scale: float,
                    speed: str) -> tuple[tuple[float, float] | None, list[str]]:
    """The interval a run uses, and what to tell the person: with guidance 1 or less there is no classifier-free
    guidance to limit, so an interval asked for is not used (said, and recorded as None), never silently ignored."""
    if interval is None or guidance_scale > 1:
        return interval, []
    return None, [f"The guidance interval {interval[0]},{interval[1]} was not used: guidance {guidance_scale} "
                  f"({speed}) runs no classifier-free guidance to limit."]


def guided_steps(interval: tuple[float, float] | None, steps: int) -> list[bool]:
    """For each step, whether it computes the unconditional half: diffusers' ClassifierFreeGuidance guider's
    rule (`int(start * n) <= step < int(stop * n)`), asked of the guider itself where diffusers has one."""
    if interval is None:
        return [True] * steps
    start, end = interval
    try:
        from diffusers import ClassifierFreeGuidance
    except ImportError:  # diffusers < 0.35 has no guiders: the same rule
        first, stop = int(start * steps), int(end * steps)
        return [first <= step < stop for step in range(steps)]
    guider = ClassifierFreeGuidance(guidance_scale=2.0, start=start, stop=end)
    inside = []
    for step in range(steps):
        guider.set_state(step=step, num_inference_steps=steps, timestep=None)
        inside.append(guider.num_conditions == 2)
    return inside


def _halves(value: Any, batch: int) -> Any:
    """Every tensor in `value` whose first dimension is `batch`, cut to its second (conditional) half."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[batch // 2:] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(_halves(item, batch) for item in value)
    if isinstance(value, dict):
        return {key: _halves(item, batch) for key, item in value.items()}
    return value


def _doubled(value: Any) -> Any:
    """The outputs of a conditional-half call, twice along the batch: CFG then gives the conditional result."""
    import torch

    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    if isinstance(value, (list, tuple)):
        return type(value)(_doubled(item) for item in value)
    if hasattr(value, "to_tuple"):  # a diffusers output dataclass
        return type(value)(*_doubled(value.to_tuple()))
    return value


@contextlib.contextmanager
def conditional_half_only(models: list, skipping: Callable[[], bool]) -> Iterator[None]:
    """While `skipping()` is true, each of `models` (the UNet, the pipeline's ControlNet) computes the
    conditional half of a CFG batch only; otherwise they run as they are. Each model's own `forward`
    attribute (accelerate's offload hooks set one) is put back afterwards, or none when it had none."""
    originals = [model.forward for model in models]
    own = [model.__dict__.get("forward") for model in models]

    def halved(original):
        def forward(*args, **kwargs):
            sample = args[0] if args else kwargs["sample"]
            if not skipping() or sample.shape[0] % 2:
                return original(*args, **kwargs)
            batch = sample.shape[0]
            return _doubled(original(*_halves(args, batch), **_halves(kwargs, batch)))
        return forward

    for model, original in zip(models, originals):
        model.forward = halved(original)
    try:
        yield
    finally:
        for model, before in zip(models, own):
            if before is None:
                del model.forward
            else:
                model.forward = before


class StepPlan:
    """Per call: which steps skip the unconditional half, and when to show a preview; `after_step(i)`
    prepares step i + 1 (diffusers' step-end callback)."""

    def __init__(self, interval: tuple[float, float] | None, steps: int, guided: bool,
                 preview: Callable[[int, Any], None] | None = None, preview_every: int = PREVIEW_EVERY):
        self.guided = guided
        self.inside = guided_steps(interval, steps) if guided else [True] * steps
        self.step = 0
        self.preview, self.preview_every = preview, preview_every

    @property
    def skipping(self) -> bool:
        return self.step < len(self.inside) and not self.inside[self.step]

    @property
    def unconditional_steps(self) -> int:
        """Steps that compute the unconditional half: none without CFG."""
        return sum(self.inside) if self.guided else 0

    def after_step(self, step: int, latents) -> None:
        self.step = step + 1
        if self.preview is not None and (step + 1) % self.preview_every == 0:
            self.preview(step + 1, latents)


def preview_image(taesd, latents):
    """The first image of `latents` as a PIL picture through TAESDXL (no gradients, on the latents' device)."""
    import torch
    from PIL import Image

    with torch.no_grad():
        image = taesd.decode(latents[:1].to(next(taesd.parameters()).dtype)).sample[0]
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
