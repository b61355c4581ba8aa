"""The samplers a user can choose, by name: diffusers' scheduler class and its settings.

Data only, on the ground floor of the package: `settings` checks a name against it before any model
loads, and `pipeline` builds the scheduler from it.
"""

from __future__ import annotations

from typing import Any

# name -> (diffusers scheduler class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    # The few-step LoRAs' samplers (speed.SPEEDS cites where each setting comes from).
    "Euler trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "DDIM trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "TCD": ("TCDScheduler", {}),
}
NEEDS_A_LORA = ("LCM", "TCD")  # consistency samplers: meaningful only with their distilled LoRA (a speed preset)
