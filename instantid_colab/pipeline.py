"""InstantID on diffusers' StableDiffusionXLControlNetPipeline.

What InstantID adds to a plain SDXL + ControlNet pipeline, and where it lives here:
- the face embedding -> 16 tokens Resampler and the IP attention: diffusers' IP-Adapter-Plus route
  (`adapter.load_adapter`), fed with `ip_adapter_image_embeds` (SDPA processors, no score matrices);
- the IdentityNet ControlNet that sees ONLY the 16 face tokens as its text (`engines.instantid.IdentityNet`);
- "enhance non-face region": the face box on the IdentityNet residuals and on IP attention, resized
  as the official code resizes it (`engines.instantid.FaceRegion`);
- the other identity methods as engines on the same modules (`engines`): a call asks its method's engine for its
  conditioning, the same way for every method;
- a VAE decode that never returns NaN/black, and one automatic retry with a lighter memory plan
  after running out of memory.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from instantid_colab import engines, faces, library_messages, memory, styles
from instantid_colab.components import load as load_component, parameter_device, parameter_dtype
from instantid_colab.images import open_image
from instantid_colab.png_metadata import attach_metadata
from instantid_colab.schedulers import SCHEDULERS
from instantid_colab.settings import MULTIPLE, SettingsError, check as check_settings, check_arguments, unused
from instantid_colab.engines.common import ControlSlot, EngineCall, execution_device
from instantid_colab.engines.instantid import IdentityNet, InstantIDEngine, use_face_region_processors
from instantid_colab.controls import (
    ANNOTATOR_FILES, ANNOTATOR_REPOS, CONTROL_MODELS, Control, check_controls, image_digest, options as control_options,
    source_image,
)
from instantid_colab.controls import describe as describe_control
from instantid_colab.controlnets import Annotations, ControlNets, MultiControlNetModel, control_map
from instantid_colab import speed as speed_module
from instantid_colab.loras import Lora, LoraState, check_loras
from instantid_colab.people import AUTO_SIZE, Cast, Person, cast as cast_people, check_people
from instantid_colab.people import least_alike, likeness as people_likeness
from instantid_colab.weights import (
    SMOKE_LABEL, WeightPaths, ensure_annotator, ensure_controlnet, ensure_lora, ensure_taesd, lora_file, reading,
)

_SCHEDULE_LOGGERS = ("diffusers.schedulers.scheduling_lcm", "diffusers.schedulers.scheduling_tcd")
DEFAULT_PROMPT = "a person"  # the official demo's stand-in for an empty prompt
OFFICIAL_LONG_SIDE, OFFICIAL_SHORT_SIDE = 1280, 1024  # the official resize_img rule

_OOM_ERRORS = tuple({e for e in (getattr(torch, "OutOfMemoryError", None),
                                 getattr(torch.cuda, "OutOfMemoryError", None)) if e is not None})


@dataclass
class InstantIDSession:
    """A loaded pipeline plus what each call needs: face analyzer, memory plan, weights, and what a call
    loads on demand and keeps for the next (LoRAs, extra ControlNets, annotations, the img2img view)."""

    pipe: Any
    faces: Any
    plan: Any
    weights: WeightPaths
    smoke: bool
    scheduler_config: dict
    load_seconds: float = 0.0
    engines: dict = field(default_factory=dict)  # method name -> its loaded engine (InstantID's from the start)
    device: Any = None  # where the pipeline computes (engines.common.execution_device, asked once)
    loras: LoraState = field(default_factory=LoraState)
    controlnets: ControlNets = field(default_factory=ControlNets)
    annotations: Annotations = field(default_factory=Annotations)
    _views: dict = field(default_factory=dict)

    @property
    def label(self) -> str | None:
        return SMOKE_LABEL if self.smoke else None

    def taesd(self):
        """TAESDXL for previews, loaded the first time one is asked for, in the UNet's dtype beside it."""
        if "taesd" not in self._views:
            from diffusers import AutoencoderTiny

            folder = ensure_taesd(self.weights, speed_module.TAESD_REPO, speed_module.TAESD_FILES)
            self._views["taesd"] = load_component(AutoencoderTiny, folder, str(self.device),
                                                  parameter_dtype(self.pipe.unet)).eval()
        return self._views["taesd"]

    def view(self, name: str):
        """The same components as diffusers' SDXL ControlNet img2img or inpaint pipeline ("img2img" / "inpaint"),
        or its plain SDXL pipeline ("text2img", for an identity method without a ControlNet), built once, sharing
        every module, and given the pipeline's current ones each time it is asked for (a call sets its own
        scheduler on the pipeline: a view built by an earlier call must not keep that call's)."""
        if name in self._views:
            view = self._views[name]
            current = {key: module for key, module in self.pipe.components.items()
                       if key in view.components and view.components[key] is not module}
            if current:
                view.register_modules(**current)
        else:
            import inspect

            import diffusers

            kind = getattr(diffusers, {"img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
                                       "inpaint": "StableDiffusionXLControlNetInpaintPipeline",
                                       "text2img": "StableDiffusionXLPipeline"}[name])
            # Not `from_pipe`: it casts every shared module to one dtype (float32 unless told), which doubles the
            # fp16 UNet in memory on a T4 and puts float32 CPU text encoders in fp16.
            accepted = inspect.signature(kind.__init__).parameters
            view = kind(**{key: module for key, module in self.pipe.components.items() if key in accepted},
                        **({"add_watermarker": False} if "add_watermarker" in accepted else {}))
            view.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
            self._views[name] = view
        return self._views[name]

    def identity_engine(self, name: str):
        """An identity method's engine on this pipeline's UNet (`engines.METHODS`), loaded the first time asked for;
        other methods' engines are released first when host RAM would not hold it beside them."""
        if name not in self.engines:
            import importlib

            from instantid_colab.loras import activate

            method = engines.method(name)
            if self.plan.placement in memory.STREAMED_PLACEMENTS and not method.streamed:
                raise SettingsError([f"identity {name} is not available with the memory plan "
                                     f"'{self.plan.placement}' (the UNet streams in blocks, the method's layers would "
                                     f"not follow); use identity {engines.DEFAULT} on this machine"])
            self._make_room(method)
            module = importlib.import_module(method.module)
            self.engines[name] = module.load(self.pipe, module.ensure_files(self.weights), self.plan.face_device)
            activate(self.pipe, self.loras.active)  # diffusers switches a loaded method's LoRA on for everything
        return self.engines[name]

    def _make_room(self, method) -> None:
        """Release the loaded methods other than the default when host RAM would not hold `method` beside them
        (every method loaded under model offload holds more than a free Colab's 12.7 GiB)."""
        import psutil

        needed = method.encoders_gib + (method.layers_gib if self.plan.placement != "gpu" else 0.0)
        if psutil.virtual_memory().available / memory.GIB >= needed + memory.ADAPTER_LOAD_TRANSIENT:
            return
        for name in [name for name in self.engines if name != engines.DEFAULT]:
            self.release_engine(name)

    def release_engine(self, name: str) -> None:
        """Give a loaded method's memory back (it loads again, from disk, the next time it is asked for)."""
        engine = self.engines.pop(name)
        own = engine.lora_adapters or {}
        self.loras.active = {adapter: scale for adapter, scale in self.loras.active.items() if adapter not in own}
        engine.release(self.pipe)
        del engine
        memory.cleanup()

    def loaded_identity_engines(self) -> list:
        return [engine for name, engine in self.engines.items() if name != engines.DEFAULT]

    def identity_methods(self) -> list[str]:
        """One line per identity method: what is loaded, and where (the app's memory panel)."""
        return [self.engines[name].where() if name in self.engines else
                f"{name}: not loaded (loads, and downloads its files once, the first time it is asked for: "
                f"about {method.download_gb:g} GB)" for name, method in engines.METHODS.items()]

    def annotator_folder(self, kind: str) -> Path:
        return ensure_annotator(self.weights, ANNOTATOR_REPOS[kind], ANNOTATOR_FILES)

    def controlnet_folder(self, kind: str, variant: str) -> Path:
        model = CONTROL_MODELS[kind][variant]
        return ensure_controlnet(self.weights, model.repo, model.download)


@dataclass
class GenerationResult:
    images: list
    seed: int
    settings: dict
    kps_image: Any
    seconds: float
    plan: Any
    notices: list[str] = field(default_factory=list)
    label: str | None = None
    likeness: list = field(default_factory=list)  # faces.Likeness per image (with people: the least alike person's)
    control_maps: list = field(default_factory=list)  # what each extra ControlNet saw, in `settings["controls"]` order
    people_likeness: list = field(default_factory=list)  # with people: per image, faces.Likeness per person
    cast: Any = None  # people.Cast: the identities, places and regions the images were made with
    refined: list = field(default_factory=list)  # after refine.refine_faces: per image, what the refine pass did

    def best_first(self) -> list[int]:
        """Image indices by likeness, highest first; images without a face last, in their order."""
        return sorted(range(len(self.images)), key=lambda i: (self.likeness[i].similarity is None,
                                                              -(self.likeness[i].similarity or 0.0)))

    def image_metadata(self, index: int) -> dict:
        """What the PNG's `instantid` chunk holds for image `index`: the settings plus its likeness."""
        likeness = self.likeness[index]
        metadata = {**self.settings, "image_index": index, "identity_similarity": likeness.similarity,
                    "identity_similarity_note": likeness.note}
        if self.people_likeness:
            metadata["people"] = [{**person, "identity_similarity": score.similarity,
                                   "identity_similarity_note": score.note}
                                  for person, score in zip(self.settings["people"], self.people_likeness[index])]
        if self.refined:
            metadata["refine_face"] = self.refined[index]
        return metadata

    def score(self, analyzer: faces.FaceAnalyzer, index: int) -> None:
        """The likeness of image `index` to the identity it was made with: with people, each person's in their
        region and the weakest as the image's; else the largest face's."""
        image = self.images[index]
        if "people" in self.settings:
            self.people_likeness[index] = people_likeness(analyzer, self.cast, image)
            self.likeness[index] = least_alike(self.people_likeness[index])
        else:
            self.likeness[index] = analyzer.likeness(self.cast.embeddings[0], image)

    def attach_metadata(self) -> None:
        """Each image carries its metadata as PNG text (`png_metadata.save_png` writes it; the app's gallery keeps
        `info`)."""
        for index, image in enumerate(self.images):
            attach_metadata(image, self.image_metadata(index), self.label)


# ----------------------------------------------------------------------------------------------
# Loading


def _stage(recorder, name: str):
    return recorder.stage(name) if recorder is not None else contextlib.nullcontext()


def load_pipeline(weights: WeightPaths, plan=None, recorder=None, progress: bool = True) -> InstantIDSession:
    """Load every component one by one onto the plan's devices, attach the adapter, apply the plan.

    `plan=None` measures this machine (`memory.plan_for_this_machine()`). With a `recorder`, each
    component loads inside its own stage so the per-stage memory table shows where memory went.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLControlNetPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from instantid_colab import adapter

    started = time.perf_counter()
    plan = plan if plan is not None else memory.plan_for_this_machine()
    dtype = getattr(torch, plan.dtype)
    # Offload placements load to CPU and let memory.apply() add the hooks; "gpu" loads straight to the GPU.
    load_device = plan.device if plan.placement == "gpu" else "cpu"
    # Text encoders kept on the CPU run in float32 there (memory.apply's rule); hooked ones stay in plan dtype.
    text_device = plan.text_encoder_device if plan.placement in ("gpu", "group_offload", "cpu") else "cpu"
    text_dtype = torch.float32 if text_device == "cpu" and plan.placement != "model_offload" else dtype
    base = weights.base
    with _stage(recorder, "load tokenizers"), reading("the SDXL tokenizers", Path(base, "tokenizer"),
                                                      Path(base, "tokenizer_2")):
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2")
    with _stage(recorder, "load text encoders"):
        text_encoder = load_component(CLIPTextModel, base, text_device, text_dtype, subfolder="text_encoder")
        text_encoder_2 = load_component(CLIPTextModelWithProjection, base, text_device, text_dtype, subfolder="text_encoder_2")
    with _stage(recorder, "load vae"):
        if weights.vae is not None:
            vae = load_component(AutoencoderKL, weights.vae, load_device, dtype)
        else:
            vae = load_component(AutoencoderKL, base, load_device, dtype, subfolder="vae")
            if vae.config.force_upcast and dtype == torch.float16:  # the stock SDXL VAE overflows in fp16
                vae.to(torch.float32)
    with _stage(recorder, "load unet"):
        unet = load_component(UNet2DConditionModel, base, load_device, dtype, subfolder="unet")
    with _stage(recorder, "load identitynet"):
        identitynet = load_component(IdentityNet, weights.controlnet, load_device, dtype)
    scheduler_config = _scheduler_config(base)
    pipe = StableDiffusionXLControlNetPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, controlnet=identitynet,
        scheduler=_make_scheduler("Euler", scheduler_config), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=not progress)
    with _stage(recorder, "load adapter"):
        adapter.load_adapter(pipe, weights.adapter)
        ip_processors = use_face_region_processors(pipe.unet)
    with _stage(recorder, "apply memory plan"):
        memory.apply(plan, pipe)
    with _stage(recorder, "load face analysis"):
        index = torch.cuda.current_device() if plan.face_device == "cuda" else 0
        analyzer = faces.FaceAnalyzer(root=weights.face_root, name="antelopev2", device=plan.face_device,
                                      device_index=index)
    return InstantIDSession(pipe=pipe, faces=analyzer, plan=plan, weights=weights, smoke=weights.smoke,
                            scheduler_config=scheduler_config, load_seconds=time.perf_counter() - started,
                            engines={engines.DEFAULT: InstantIDEngine(identitynet, ip_processors)},
                            device=execution_device(pipe))


def _scheduler_config(base: str) -> dict:
    from diffusers import EulerDiscreteScheduler

    return dict(EulerDiscreteScheduler.load_config(base, subfolder="scheduler"))


def _make_scheduler(name: str, config: dict):
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


# ----------------------------------------------------------------------------------------------
# Sizes


def official_size(width: int, height: int) -> tuple[int, int]:
    """The official demo's resize_img: short side to 1024, then long side to 1280, floored to multiples of 64."""
    ratio = OFFICIAL_SHORT_SIDE / min(width, height)
    width, height = round(ratio * width), round(ratio * height)
    ratio = OFFICIAL_LONG_SIDE / max(width, height)
    return (round(ratio * width) // MULTIPLE) * MULTIPLE, (round(ratio * height) // MULTIPLE) * MULTIPLE


# ----------------------------------------------------------------------------------------------
# One call


def _scaled(points: np.ndarray, source: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    scale = np.array([target[0] / source[0], target[1] / source[1]], dtype=np.float32)
    return np.asarray(points, dtype=np.float32).reshape(-1, 2) * scale


def face_box_mask(bbox: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """1 inside the face box, 0 elsewhere, at output size (the official control_mask / 255)."""
    mask = np.zeros((size[1], size[0]), dtype=np.float32)
    x1, y1, x2, y2 = (int(v) for v in np.asarray(bbox).reshape(-1)[:4])
    mask[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = 1.0
    return mask


def _encode_prompt(pipe, device: torch.device, prompt: str, negative_prompt: str, do_cfg: bool) -> dict[str, torch.Tensor]:
    """Text embeddings in the UNet's dtype on the execution device.

    Encoded here rather than inside the pipeline call because a plan may keep the text encoders on
    the CPU in float32 while the UNet runs in float16 on the GPU; older diffusers would run them on
    the wrong device and every version hands their float32 output to the float16 UNet.
    """
    encoder = pipe.text_encoder_2
    encoder_device = parameter_device(encoder)
    on_cpu = not hasattr(encoder, "_hf_hook") and encoder_device.type == "cpu"
    encode_on = encoder_device if on_cpu else device
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt=prompt, device=encode_on, num_images_per_prompt=1,
                                    do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    dtype = parameter_dtype(pipe.unet)
    return {name: tensor.to(device, dtype) for name, tensor in zip(names, embeds) if tensor is not None}


@contextlib.contextmanager
def _text_encoders_detached(pipe):
    """Hide float32 CPU text encoders from the pipeline call (the embeddings are already made).

    diffusers casts given prompt embeddings to `text_encoder_2.dtype`; with float32 encoders on the
    CPU and a float16 UNet that cast would break the UNet. Without encoders it casts to the UNet's dtype.
    """
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    if pipe.text_encoder_2 is None or parameter_dtype(pipe.text_encoder_2) == parameter_dtype(pipe.unet):
        yield
        return
    pipe.register_modules(text_encoder=None, text_encoder_2=None)
    try:
        yield
    finally:
        pipe.register_modules(text_encoder=encoders[0], text_encoder_2=encoders[1])


class OutOfMemory(MemoryError):
    """Out of GPU memory even with the lightest memory plan; the message says what to lower. A MemoryError,
    so every boundary that tells a person "out of memory" (CLI, app, batch) catches it without importing this."""


def _oom_retry_plan(session: InstantIDSession, error: BaseException, identity: str = engines.DEFAULT) -> str:
    """Free memory, step the plan down and apply it; returns the notice (raises when there is no lighter plan,
    or none that `identity` runs under: a method whose layers sit beside the UNet needs it whole, not streamed)."""
    memory.cleanup()
    method = engines.method(identity)
    lighter = memory.step_down(session.plan)
    while lighter is not None and not method.streamed and lighter.placement in memory.STREAMED_PLACEMENTS:
        lighter = memory.step_down(lighter)
    if lighter is None:
        raise OutOfMemory(
            f"Out of GPU memory with the lightest memory plan {identity} runs under ({session.plan.placement}): "
            f"{error}. Try a smaller width/height or fewer images"
            f"{'' if method.streamed else f', or identity {engines.DEFAULT}'}.") from error
    memory.apply(lighter, session.pipe)
    if lighter.placement != "gpu":  # a loaded identity method's layers wait off the UNet: on the CPU
        for engine in session.loaded_identity_engines():
            engine.to("cpu")
    notice = (f"Ran out of GPU memory with plan '{session.plan.placement}'; switched to "
              f"'{lighter.placement}' ({lighter.why}) and ran again.")
    session.plan = lighter
    return notice


def _extra_controlnets(session: InstantIDSession, kinds: list[str], width: int, height: int, num: int):
    """Place (memory plan) and load the extra ControlNets; returns (placements, models)."""
    import psutil

    available = memory.vram_available_gib()
    if available is not None:  # plus what the nets already loaded would give back
        available = max(0.0, available + session.controlnets.gib_on_gpu())
    placements = memory.plan_controls(session.plan, control_options(kinds), available,
                                      psutil.virtual_memory().available / memory.GIB, width, height, num)
    models = session.controlnets.prepare(placements, session.controlnet_folder, str(session.device),
                                         parameter_dtype(session.pipe.unet))
    return placements, models


def _controlnet_for(slots: list[ControlSlot]) -> tuple[Any, dict]:
    """The call's ControlNet and its arguments: none; one ControlNet as itself; else diffusers' MultiControlNetModel,
    which gives each its own image, strength and step fraction and sums their residuals (the official order: the
    engine's, such as the IdentityNet of each person, first)."""
    from diffusers import ControlNetModel

    if not slots:
        return None, {}
    if len(slots) == 1 and isinstance(slots[0].model, ControlNetModel):
        (slot,) = slots
        return slot.model, dict(image=slot.image, controlnet_conditioning_scale=slot.scale,
                                control_guidance_start=slot.start, control_guidance_end=slot.end)
    return MultiControlNetModel([slot.model for slot in slots]), dict(
        image=[slot.image for slot in slots], controlnet_conditioning_scale=[slot.scale for slot in slots],
        control_guidance_start=[slot.start for slot in slots], control_guidance_end=[slot.end for slot in slots])


@contextlib.contextmanager
def _using_controlnet(pipe, controlnet):
    """`controlnet` (the IdentityNet, or it and the extra nets) as the pipeline's for one call."""
    own = pipe.controlnet
    pipe.register_modules(controlnet=controlnet)
    try:
        yield
    finally:
        pipe.register_modules(controlnet=own)


@contextlib.contextmanager
def _untiled_when_it_fits(vae, latents: torch.Tensor):
    """The plan's VAE tiling off for this decode when the VRAM free now holds the untiled one."""
    images = 1 if getattr(vae, "use_slicing", False) else latents.shape[0]
    pixels = latents.shape[-2] * latents.shape[-1] * 64
    if not getattr(vae, "use_tiling", False) or not memory.untiled_decode_fits(pixels, images,
                                                                               parameter_dtype(vae).itemsize):
        yield
        return
    vae.use_tiling = False  # the flag itself: enable_/disable_tiling changed signatures across diffusers versions
    try:
        yield
    finally:
        vae.use_tiling = True


def decode(pipe, latents: torch.Tensor, notices: list[str]) -> torch.Tensor:
    """Latents -> images in [-1, 1]; a NaN/inf decode is redone in float32 with tiling (and said so)."""
    vae = pipe.vae
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    with torch.no_grad(), _untiled_when_it_fits(vae, latents):
        image = vae.decode(latents.to(parameter_dtype(vae)), return_dict=False)[0]
    with torch.no_grad():
        if torch.isfinite(image).all():
            return image.float()
        dtype, tiling = parameter_dtype(vae), getattr(vae, "use_tiling", False)
        vae.to(dtype=torch.float32)
        vae.enable_tiling()
        try:
            image = vae.decode(latents.float(), return_dict=False)[0]
        finally:
            vae.to(dtype=dtype)
            if not tiling:
                vae.disable_tiling()
    notices.append(f"The VAE decode in {str(dtype).replace('torch.', '')} gave NaN/inf values; "
                   "it was redone in float32 with tiling.")
    return image.float()


def _one_face(analyzer, face_images: list, combine: str, layout_image, width: int | None, height: int | None,
              enhance_non_face: bool) -> Cast:
    """The official single face as a cast of one: its photos' identity, placed where the layout photo's face
    is (default: where it is in the first photo), gated by its face box when `enhance_non_face`."""
    opened = [open_image(image, "face photo") for image in face_images]
    embedding, face = analyzer.embed(opened, combine)
    layout_image = layout_image or opened[0]
    layout_face = analyzer.detect(layout_image) if layout_image is not opened[0] else face
    size = (width, height) if width is not None else official_size(*layout_image.size)
    kps = _scaled(layout_face.kps, layout_image.size, size)
    bbox = _scaled(np.asarray(layout_face.bbox).reshape(2, 2), layout_image.size, size).reshape(-1)
    masks = face_box_mask(bbox, size)[None] if enhance_non_face else None
    return Cast([embedding], bbox[None], kps[None], masks, size)


class GenerationStopped(Exception):
    """The caller's `should_stop` asked to stop; the pipeline is left ready for the next call."""


def generate(session: InstantIDSession, face_image=None, prompt: str = "", *, negative_prompt: str | None = None,
             style: str = "No style", identitynet_strength: float = 0.8, adapter_strength: float = 0.8,
             steps: int | None = None, guidance_scale: float | None = None, seed: int = 42, scheduler: str | None = None,
             width: int | None = None, height: int | None = None, num_images: int = 1, pose_image=None,
             enhance_non_face: bool = True, negative_noise: float = 0.0, combine: str = "average",
             lcm: bool = False, extra_face_images: Sequence = (), controls: Sequence[Control] = (),
             loras: Sequence[Lora] = (), init_image=None, init_strength: float = 0.8,
             init_mask=None, people: Sequence[Person] = (), order: Sequence[int] | None = None,
             speed: str = speed_module.DEFAULT_SPEED, guidance_interval=None, identity: str = engines.DEFAULT,
             s_scale: float = 1.0, preview: Callable[[int, int, Image.Image], None] | None = None,
             preview_every: int = speed_module.PREVIEW_EVERY,
             callback: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GenerationResult:
    """Generate `num_images` images of the person in `face_image`, or of several `people` in one picture.

    `people` (instead of `face_image`): each keeps their own face in their own region (`people.py`); they
    are placed on the faces of `pose_image` (left to right, or as `order` says) or side by side without one.
    `init_mask` (with `init_image`): repaint only its white part (diffusers' ControlNet inpaint pipeline).
    `speed`: a preset of `speed.SPEEDS` (scheduler, steps, guidance, distilled LoRA); `steps`, `guidance_scale`
    and `scheduler` given here win over it (`lcm=True` is the "lcm" preset). `guidance_interval` (start, end):
    CFG only on those fractions of the steps, the unconditional half not computed outside. `preview(step, total,
    image)` gets a TAESDXL picture every `preview_every` steps. `identity`: the method that keeps the face
    (`engines.METHODS`, which says what each can do); "faceid-plusv2" (IP-Adapter FaceID Plus V2, structure weight
    `s_scale`) and "pulid" (PuLID v1.1, ID scale `adapter_strength`) have no IdentityNet, so no keypoint layout,
    people or start photo.

    `controls`: extra ControlNets (pose/canny/depth, a photo to annotate or a ready map, each with a
    strength and a start/end fraction of the steps). `loras`: style LoRAs with scales. `init_image`:
    start from this photo (img2img); `init_strength` is how much of it is repainted (1: all).
    Every setting is checked first (`settings.check`: SettingsError names the value and its range).
    Raises images.ImageInputError for a picture that cannot be used, faces.NoFaceError when no face is
    found, loras.LoraError for a LoRA that does not fit, GenerationStopped when `should_stop()` turns
    true between steps. Out of memory once -> lighter plan and one retry (said in `notices`). The
    images carry their settings, seed and likeness as PNG text (`png_metadata.save_png`).
    """
    started = time.perf_counter()
    resolved = speed_module.with_preset(dict(speed=speed, lcm=lcm, steps=steps, guidance_scale=guidance_scale,
                                             scheduler=scheduler))
    steps, guidance_scale, scheduler = resolved["steps"], resolved["guidance_scale"], resolved["scheduler"]
    chosen = speed_module.preset(resolved["speed"])
    interval = speed_module.parse_interval(guidance_interval)
    (preview_every,) = check_arguments(preview_every=(preview_every, "preview_every"))
    checked = check_settings({
        "style": style, "identitynet_strength": identitynet_strength, "adapter_strength": adapter_strength,
        "steps": steps, "guidance_scale": guidance_scale, "seed": seed, "scheduler": scheduler, "width": width,
        "height": height, "num_images": num_images, "enhance_non_face": enhance_non_face,
        "negative_noise": negative_noise, "combine": combine, "lcm": lcm, "init_image": init_image,
        "init_strength": init_strength, "identity": identity, "s_scale": s_scale, "pose_image": pose_image,
        "several_people": bool(people), "prompt": prompt,
    })
    controls, loras = check_controls(controls), check_loras(loras)
    interval, notices = speed_module.usable_interval(interval, checked["guidance_scale"], resolved["speed"])
    notices += _unused_notices(checked, identity)
    if (face_image is None) == (not people):
        raise SettingsError(["give a face photo, or people (each with their photos), not both"])
    people = check_people(people, list(order) if order is not None else None, pose_image is not None) if people else []
    prompt = (prompt or "").strip() or DEFAULT_PROMPT
    styled_prompt, styled_negative = styles.apply_style(style, prompt, negative_prompt or "")
    layout_image = open_image(pose_image, "pose image") if pose_image is not None else None
    init = open_image(init_image, "start photo") if init_image is not None else None
    if init_mask is not None and init is None:
        raise SettingsError(["init_mask needs init_image: the mask says which part of the start photo is repainted"])
    mask = open_image(init_mask, "repaint mask").convert("L") if init_mask is not None else None
    sources = [source_image(control) for control in controls]
    if people:
        size = (width, height) if width else official_size(*layout_image.size) if layout_image else AUTO_SIZE
        cast = cast_people(session.faces, people, combine, size, layout_image, order)
        photos = [len(person.photos) for person in people]
    else:
        photos = [1 + len(extra_face_images)]
        cast = _one_face(session.faces, [face_image, *extra_face_images], combine, layout_image, width, height,
                         enhance_non_face)
    width, height = cast.size
    kps_images = cast.kps_images()
    kps_image = kps_images[0] if len(kps_images) == 1 else Image.fromarray(np.max(np.stack(kps_images), axis=0))
    maps = [control_map(control, source, (width, height), session.annotations, session.annotator_folder)
            for control, source in zip(controls, sources)]

    settings = {
        "prompt": styled_prompt, "negative_prompt": styled_negative, "user_prompt": prompt, "style": style,
        "seed": checked["seed"], "steps": checked["steps"], "guidance_scale": checked["guidance_scale"],
        "scheduler": scheduler, "width": width, "height": height, "num_images": checked["num_images"],
        "identitynet_strength": checked["identitynet_strength"], "adapter_strength": checked["adapter_strength"],
        "enhance_non_face": enhance_non_face, "negative_noise": checked["negative_noise"], "combine": combine,
        "reference_faces": sum(photos), "pose_image": pose_image is not None, "lcm": chosen.name == "lcm",
        "speed": chosen.describe(), "guidance_interval": list(interval) if interval else None,
        "controls": [describe_control(control, source) for control, source in zip(controls, sources)],
        "loras": [{"name": lora.name, "scale": lora.scale} for lora in loras],
        "init_image": None if init is None else {"strength": checked["init_strength"], "image_sha256": image_digest(init),
                                                 "mask": mask is not None},
    }
    if people:
        settings.update(people=cast.describe(photos), order=list(order) if order is not None else None)
    settings["identity_engine"] = identity
    engine = session.identity_engine(identity)
    face_photos = [] if people else [open_image(image, "face photo", max_side=engine.photo_side)
                                     for image in [face_image, *extra_face_images]]
    settings.update({name: None for name in engines.method(identity).unused() if name in settings})
    if engine.describe(checked):
        settings["identity_settings"] = engine.describe(checked)
    label = session.label
    if label:
        settings["label"] = label
    call = dict(prompt=styled_prompt, negative_prompt=styled_negative, cast=cast, as_people=bool(people),
                controls=controls, maps=maps, loras=loras, init=init, init_mask=mask, settings=settings,
                values=checked, chosen=chosen, interval=interval, preview=preview, preview_every=preview_every,
                callback=callback, should_stop=should_stop, face_photos=face_photos)
    try:
        images = _denoise_and_decode(session, notices, **call)
    except _OOM_ERRORS as error:
        notices.append(_oom_retry_plan(session, error, identity))
        images = _denoise_and_decode(session, notices, **call)

    result = GenerationResult(images=images, seed=checked["seed"], settings=settings, kps_image=kps_image, seconds=0.0,
                              plan=session.plan, notices=notices, label=label, control_maps=maps, cast=cast,
                              likeness=[None] * len(images), people_likeness=[None] * len(images) if people else [])
    for index in range(len(images)):
        result.score(session.faces, index)
    result.attach_metadata()
    result.seconds = time.perf_counter() - started
    return result


def _unused_notices(checked: dict, identity: str) -> list[str]:
    """A setting given another value than its default where the method does not read it: said, not dropped."""
    import inspect

    defaults = inspect.signature(generate).parameters
    return [f"{name} {checked[name]} was not used: {why}." for name, why in unused({**checked, "identity": identity}).items()
            if name in defaults and checked[name] != defaults[name].default]


def _denoise_and_decode(session: InstantIDSession, notices: list[str], *, prompt: str, negative_prompt: str,
                        cast: Cast, as_people: bool, controls: list[Control], maps: list, loras: list[Lora], init,
                        init_mask, settings: dict, values: dict, chosen, interval, preview, preview_every: int,
                        callback, should_stop, face_photos: list) -> list[Image.Image]:
    pipe = session.pipe
    engine = session.identity_engine(settings["identity_engine"])
    width, height, steps, seed = settings["width"], settings["height"], settings["steps"], settings["seed"]
    num = settings["num_images"]
    speed_lora = (ensure_lora(session.weights, "/".join(chosen.lora)), chosen.lora_scale) if chosen.lora else None
    session.loras.apply(pipe, [(lora_file(session.weights, lora.name), lora.scale) for lora in loras], speed_lora,
                        engine=engine.lora_adapters)
    placements, nets = _extra_controlnets(session, [control.kind for control in controls], width, height, num)
    for control, placement in zip(settings["controls"], placements):
        control["model"] = CONTROL_MODELS[placement.kind][placement.variant].repo
        if placement.place == "offload":
            notices.append(f"The {placement.render()}: the GPU had no room for it.")
    pipe.scheduler = _make_scheduler(settings["scheduler"], session.scheduler_config)

    generator = torch.Generator("cpu").manual_seed(seed)
    do_cfg = settings["guidance_scale"] > 1 and pipe.unet.config.time_cond_proj_dim is None
    text = _encode_prompt(pipe, session.device, prompt, negative_prompt, do_cfg)  # the pipeline repeats them per image
    conditioning = engine.conditioning(EngineCall(
        pipe=pipe, analyzer=session.faces, photos=face_photos, cast=cast, several_people=as_people, values=values,
        do_cfg=do_cfg, num=num, device=session.device, dtype=parameter_dtype(pipe.unet), generator=generator,
        text=text, prompt=prompt, negative_prompt=negative_prompt,
        encode=lambda positive, negative: _encode_prompt(pipe, session.device, positive, negative, do_cfg)))
    text = conditioning.text or text
    total = steps if init is None else min(int(steps * settings["init_image"]["strength"]), steps)

    shown = None if preview is None else (lambda step, latents: preview(step, total, speed_module.preview_image(
        session.taesd(), latents)))
    plan = speed_module.StepPlan(interval, total, do_cfg, shown, preview_every)
    settings["unconditional_steps"] = plan.unconditional_steps

    def on_step_end(_pipe, step, _timestep, tensors):
        if callback is not None:
            callback(step + 1, total)
        if should_stop is not None and should_stop():
            raise GenerationStopped(f"stopped after step {step + 1} of {total}")
        plan.after_step(step, tensors["latents"])
        return conditioning.after_step(step, tensors) if conditioning.after_step else tensors

    slots = [*conditioning.controlnets, *(ControlSlot(net, image, control.strength, control.start, control.end)
                                          for net, image, control in zip(nets, maps, controls))]
    controlnet, arguments = _controlnet_for(slots)
    caller = pipe if controlnet is not None else session.view("text2img")
    if init is not None:  # img2img, or inpaint where a mask says which part of the start photo is repainted
        caller = session.view("img2img" if init_mask is None else "inpaint")
        arguments.update(image=init.resize((width, height), Image.LANCZOS), control_image=arguments.pop("image"),
                         strength=settings["init_image"]["strength"])
        if init_mask is not None:
            arguments["mask_image"] = init_mask.resize((width, height), Image.LANCZOS)
    if chosen.timesteps and steps == len(chosen.timesteps) and init is None:  # the card's own schedule
        arguments["timesteps"] = list(chosen.timesteps)
    if chosen.eta is not None:
        arguments["eta"] = chosen.eta
    with contextlib.ExitStack() as stack:
        if controlnet is not None:
            stack.enter_context(_using_controlnet(caller, controlnet))
        stack.enter_context(conditioning.context)
        stack.enter_context(_text_encoders_detached(caller))
        if "timesteps" in arguments:  # the card's schedule is meant to be off the sampler's training grid
            stack.enter_context(library_messages.without(_SCHEDULE_LOGGERS, "The custom timestep schedule contains"))
        halved = [model for model in (pipe.unet, controlnet) if model is not None] if interval and do_cfg else []
        stack.enter_context(speed_module.conditional_half_only(halved, lambda: plan.skipping))
        latents = caller(  # the engine's tokens stand in for what the UNet would make of its embeddings
            **text, **arguments, **conditioning.arguments, width=width, height=height, num_inference_steps=steps,
            guidance_scale=settings["guidance_scale"], num_images_per_prompt=num, generator=generator,
            output_type="latent", callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents", *conditioning.tensor_inputs],
        ).images
    decoded = decode(pipe, latents, notices)
    pipe.maybe_free_model_hooks()
    return pipe.image_processor.postprocess(decoded, output_type="pil")
