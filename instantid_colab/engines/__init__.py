"""The identity methods on the one loaded SDXL, as a registry (timm's style: one line per method).

Each line says what the method can do and which of the method settings it reads, so the settings check, the CLI,
`batch`, the app's greyed-out controls, notebooks, PNG metadata and `bench` ask the method, never compare its name.
Ground floor: the settings check reads it on a fresh machine; a method's engine module (models floor) is imported
only when the method is first used, and implements one interface (`conditioning(call) -> Conditioning`, `describe`,
`where`, `to`, `release`, `lora_adapters`, `photo_side`; see `engines.common`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Settings that only some methods read; a method's `reads` names those it does. The others are said to be unused
# and two settings that differ only there make the same pictures (one row key, one picture).
METHOD_SETTINGS = ("identitynet_strength", "enhance_non_face", "s_scale", "combine")


@dataclass(frozen=True)
class Method:
    """One identity method: where its engine lives and what it supports."""

    name: str
    module: str  # its engine: `ensure_files(weights)` and `load(pipe, files, face_device)`, or `engine(session)`
    title: str  # how people know it
    download_gb: float  # what its first use fetches beyond the pipeline's files (0: loaded with the pipeline)
    reads: tuple[str, ...]  # of METHOD_SETTINGS
    several_people: bool = False  # several people in one picture, each in their region
    keypoint_layout: bool = False  # faces placed on a pose photo's keypoints
    start_photo: bool = False  # img2img / inpaint from a start photo (and the face swap built on it)
    refine: bool = False  # the refine pass that repaints each face
    negative_noise: bool = True  # a noise negative instead of its own
    concat: bool = True  # several photos' embeddings concatenated (combine=concat)
    prompt_word: str | None = None  # a word the prompt must hold once, after the class word ("a man img")
    streamed: bool = False  # runs while the UNet streams in blocks (sequential or group offload)
    layers_gib: float = 0.0  # its layers beside the UNet, fp16 (where the plan puts the UNet)
    encoders_gib: float = 0.0  # its encoders, fp16 (on the CPU, on the GPU only while they encode)
    encoders: str = ""  # what those encoders are
    note: str = ""  # how it reads the common settings, where that is not obvious

    def cannot(self, values) -> list[str]:
        """What in `values` (as for `settings.check`) this method cannot do, a sentence each."""
        instead = f"use identity {DEFAULT}"
        problems = []
        if values.get("several_people") and not self.several_people:
            problems.append(f"identity {self.name} makes one person: several people need InstantID's IdentityNet "
                            f"({instead})")
        if values.get("pose_image") is not None and not self.keypoint_layout:
            problems.append(f"identity {self.name} has no keypoint layout (the pose image drives InstantID's "
                            "IdentityNet); give the pose as a ControlNet instead (--control pose=PHOTO)")
        if values.get("init_image") is not None and not self.start_photo:
            problems.append(f"identity {self.name} does not start from a photo (img2img and inpaint run through "
                            f"InstantID's IdentityNet); {instead}")
        if values.get("combine") == "concat" and not self.concat and "combine" in self.reads:
            problems.append(f"identity {self.name} takes one face embedding: combine several photos with average or "
                            "norm_average, not concat")
        noise = values.get("negative_noise")
        if not self.negative_noise and isinstance(noise, (int, float)) and noise > 0:
            problems.append(f"identity {self.name} makes its own negative, as its official code does (no face "
                            "embedding to add noise to): negative_noise must be 0")
        if values.get("refine_face") and not self.refine:
            problems.append(self.no_refine())
        prompt = values.get("prompt")
        if self.prompt_word and isinstance(prompt, str) and prompt.count(self.prompt_word) != 1:
            problems.append(f"identity {self.name} needs its trigger word '{self.prompt_word}' once in the prompt, right "
                            f"after the class word (\"a man {self.prompt_word}\", \"a woman {self.prompt_word}\"); "
                            f"the prompt has it {prompt.count(self.prompt_word)} times")
        return problems

    def prompt_for(self, prompt: str) -> str:
        """A prompt written for every method (a benchmark's) as this method reads it: its trigger word after the
        first "person" (the class word the built-in prompts use), or "a person <word>, " before a prompt without
        one. Unchanged for a method without a trigger word, or a prompt that has it."""
        if not self.prompt_word or self.prompt_word in prompt:
            return prompt
        found = re.search(r"\bperson\b", prompt)
        if found is None:
            return f"a person {self.prompt_word}, {prompt}"
        return f"{prompt[:found.end()]} {self.prompt_word}{prompt[found.end():]}"

    def no_refine(self) -> str:
        return (f"refine_face repaints faces through InstantID's IdentityNet: it is not available with identity "
                f"{self.name} (use identity {DEFAULT}, or leave refine_face off)")

    def unused(self) -> tuple[str, ...]:
        return tuple(name for name in METHOD_SETTINGS if name not in self.reads)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("instantid", "instantid_colab.engines.instantid", "InstantID", 0,
                ("identitynet_strength", "enhance_non_face", "combine"), several_people=True, keypoint_layout=True,
                start_photo=True, refine=True, streamed=True))
register(Method("faceid-plusv2", "instantid_colab.engines.faceid", "IP-Adapter FaceID Plus V2", 4, ("s_scale", "combine"),
                concat=False, layers_gib=1.39, encoders_gib=1.18, encoders="CLIP ViT-H/14"))
register(Method("pulid", "instantid_colab.engines.pulid", "PuLID v1.1", 2, (), negative_noise=False,
                layers_gib=0.63, encoders_gib=1.01, encoders="EVA02-CLIP-L, IDFormer and parser",
                note="its ID scale is the adapter strength"))
register(Method("photomaker-v2", "instantid_colab.engines.photomaker", "PhotoMaker V2", 2, (), negative_noise=False,
                prompt_word="img", layers_gib=0.17, encoders_gib=1.01, encoders="CLIP ViT-L/14, Q-Former and fuse MLP",
                note="write the class word and 'img' in the prompt, e.g. 'a woman img'; the adapter strength is "
                     "1 - its style strength"))

DEFAULT = "instantid"
IDENTITIES = tuple(METHODS)  # the first is the default


def method(name: str | None) -> Method:
    """The registry line of `name` (None: the default)."""
    return METHODS[name or DEFAULT]


def help_text() -> str:
    """The methods for a person choosing one (the CLI's --identity, the app's dropdown), from the registry."""
    methods = "; ".join(f"{name}: {method.title}{f' ({method.note})' if method.note else ''}"
                        for name, method in METHODS.items())
    full = [name for name, method in METHODS.items() if method.keypoint_layout]
    return (f"{methods}. A pose image, people, a start photo and refine work with {' and '.join(full)} only; each "
            "other method loads, and downloads its files once, the first time it is used")
