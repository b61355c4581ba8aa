"""The gradio app: the page a Colab user opens through the share link.

The page collects inputs, validates them and shows results; every image comes from
`pipeline.generate`, so the app, the CLI and the notebooks give the same picture for the same
settings. Gradio keywords that changed between 4.x and 6.x are passed only where the installed
gradio accepts them (`_accepted`), so one file serves the versions Colab has shipped.
"""

from __future__ import annotations

import inspect
import logging
import contextvars
import queue
import random
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple

import gradio as gr
from PIL import Image

from instantid_colab import (controls, environment, images, loras, memory, people, pipeline, refine, schedulers,
                             settings, speed, styles)
from instantid_colab.smoke import SMOKE_LABEL
from instantid_colab.weights import DamagedWeightsError, MissingWeightsError

AUTO_SIZE = "Auto (from the face photo)"
SIZE_CHOICES = (AUTO_SIZE, *settings.SIZE_PRESETS)
# "From the speed mode": the preset's own sampler. The consistency samplers need their LoRA (a speed mode), so they
# are not offered on their own.
SPEED_SCHEDULER = "from the speed mode"
SCHEDULER_CHOICES = (SPEED_SCHEDULER, *(name for name in schedulers.SCHEDULERS if name not in schedulers.NEEDS_A_LORA))
MAX_SEED = 2**32 - 1
MAX_UPLOAD_FILE = "25mb"
MEMORY_REFRESH_S = 3.0
PREVIEW_POLL_S = 0.2  # how often the page's generator looks for a new preview
logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A user input the app refuses, with the message shown on the page."""


class Launched(NamedTuple):
    """What `launch` started: print `share_url` (or `local_url`) in the notebook cell."""

    app: gr.Blocks
    local_url: str
    share_url: str | None
    login: tuple[str, str] | None = None  # what the share link asks for (None: a local address, or --no-auth)


def parse_size(text: str) -> tuple[int, int] | None:
    """A core preset name or a typed `"832x1216"` -> (width, height); Auto -> None (the official resize rule).

    Whether a size is allowed is the core's rule (`settings.check_size`); this only reads the text.
    """
    text = (text or "").strip()
    if not text or text == AUTO_SIZE:
        return None
    if text in settings.SIZE_PRESETS:
        return settings.SIZE_PRESETS[text]
    parts = text.lower().replace("×", "x").replace(" ", "").split("x")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise InputError(f"output size {text!r} is not WIDTHxHEIGHT (for example 832x1216) or a preset")
    width, height = int(parts[0]), int(parts[1])
    try:
        settings.check_size(width, height)
    except ValueError as error:
        raise InputError(f"output {error}") from None
    return width, height


def parse_auth(text: str | tuple[str, str] | None) -> tuple[str, str] | None:
    """`"user:password"` -> ("user", "password"); None or "" -> None (no login)."""
    if text is None or text == "":
        return None
    if isinstance(text, tuple):
        user, password = text
    else:
        user, sep, password = text.partition(":")
        if not sep:
            raise ValueError("auth must be USER:PASSWORD (for example alice:long-secret); no ':' was given")
    if not user or not password:
        raise ValueError("auth must be USER:PASSWORD with both parts non-empty (for example alice:long-secret)")
    return user, password


def check_image_file(path: str | Path, what: str, max_side: int | None = images.WORKING_SIDE) -> Image.Image:
    """The uploaded picture as upright 8-bit RGB (`images.open_image`), or InputError naming the file.

    Uploads arrive under a temporary folder, so the message names the file only.
    """
    try:
        return images.open_image(path, what, max_side)
    except images.ImageInputError as error:
        raise InputError(str(error).replace(str(Path(path)), Path(path).name)) from None


def render_settings(seed: int, settings: dict[str, Any], seconds: float, label: str | None) -> str:
    """Markdown for the settings panel: the seed first (to reproduce), then every setting used."""
    lines = []
    if label:
        lines.append(f"**{label}**\n")
    lines.append(f"**seed {seed}** · {seconds:.1f} s\n")
    lines.append("| setting | value |\n|---|---|")
    for key, value in settings.items():
        text = str(value).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines)


SMOKE_PLAN_NOTE = "(the plan's estimates are for the full-size models; this smoke session loaded tiny ones)"


def render_memory(plan: memory.MemoryPlan | None, smoke: bool = False, extra=()) -> str:
    """Markdown for the live memory panel: RAM/VRAM now, the memory plan with its why, and where the
    extra ControlNets of the last run live (`extra`: their memory.ControlPlacement)."""
    sections = [("Memory now", memory.snapshot().render())]
    if plan is not None:
        sections.append(("Memory plan", plan.render() + (f"\n{SMOKE_PLAN_NOTE}" if smoke else "")))
    if extra:
        sections.append(("Extra ControlNets", "\n".join(placement.render() for placement in extra)))
    return "\n\n".join(
        f"**{title}**\n" + "\n".join(f"- {line}" for line in text.splitlines()) for title, text in sections
    )


def _accepted(function: Callable, **kwargs: Any) -> dict[str, Any]:
    """Keep only the keywords `function` accepts: gradio renamed several between 4.x and 6.x."""
    parameters = inspect.signature(function).parameters
    return {key: value for key, value in kwargs.items() if key in parameters}


def _range(name: str) -> tuple[float, float]:
    """A slider's ends: the allowed range of `settings.LIMITS`, the one table every entry point checks."""
    return settings.LIMITS[name].low, settings.LIMITS[name].high


def _core_defaults() -> dict[str, Any]:
    """`pipeline.generate`'s keyword defaults: the page starts from the same values as the CLI and notebooks."""
    parameters = inspect.signature(pipeline.generate).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


CONTROL_FIELDS = ("image", "on", "is_map", "strength", "start", "end")  # per kind: `pose_image`, `pose_on`, ...


def page_controls(values: dict[str, Any], fallback) -> list[controls.Control]:
    """The ticked extra controls; a control without its own picture uses `fallback` (the pose photo, else
    the face photo: what the official multi-ControlNet demo annotates)."""
    chosen = []
    for kind in controls.KINDS:
        if not values.get(f"{kind}_on"):
            continue
        path = values.get(f"{kind}_image")
        image = check_image_file(path, f"{kind} image") if path else fallback
        chosen.append(controls.Control(kind, image, values[f"{kind}_strength"], values[f"{kind}_start"],
                                       values[f"{kind}_end"], bool(values.get(f"{kind}_is_map")) and bool(path)))
    return chosen


def page_loras(text: str, files, scale) -> list[loras.Lora]:
    """LoRAs typed one per line (`ID_OR_FILE[:SCALE]`) plus uploaded .safetensors files at `scale`."""
    typed = [loras.parse_lora(line.strip()) for line in (text or "").splitlines() if line.strip()]
    return typed + [loras.Lora(str(path), scale) for path in files or ()]


def page_people(paths: list, order: str) -> tuple[list[people.Person], list[int] | None]:
    """The People section: one photo per person, 2 to 4 of them, and the optional order; none given: ([], None)."""
    paths = [path for path in paths if path]
    if not paths:
        return [], None
    if len(paths) == 1:
        raise InputError("People: give photos of 2 to 4 people (for one person, use the face photo above)")
    chosen = [people.Person((check_image_file(path, f"photo of person {index}"),)) for index, path in enumerate(paths, 1)]
    ordered = people.parse_order(order, len(chosen))
    return people.check_people(chosen, ordered), ordered


def _captions(result: pipeline.GenerationResult, index: int) -> str:
    """Under each image: the label or seed, its number, and its likeness (one per person with several)."""
    caption = f"{result.label or f'seed {result.seed}'} · #{index + 1} · "
    if result.people_likeness:
        return caption + " · ".join(f"person {number}: {score.render()}"
                                    for number, score in enumerate(result.people_likeness[index], 1))
    return caption + result.likeness[index].render()


USER_ERRORS = (ValueError, MissingWeightsError, DamagedWeightsError, MemoryError)  # inputs, weights, memory: shown as they are


def _internal_error(error: Exception, what: str) -> gr.Error:
    """Our bug: said on the page, the traceback logged, the app still usable."""
    logger.exception(f"{what} failed")
    return gr.Error(f"Internal error ({type(error).__name__}: {error}). The app is still usable; the "
                    "traceback is in the notebook/console output: please report it.")


def _generate_handler(session: pipeline.InstantIDSession, stop_requested: threading.Event | None = None) -> Callable:
    """The click handler: validate, call `pipeline.generate`, turn its result into page outputs.

    `stop_requested` is the Stop button's flag: checked between denoising steps, cleared at each start.
    Every failure becomes a message on the page; the session stays loaded for the next click.
    """
    stop_requested = stop_requested or threading.Event()

    def run(face_path, extra_face_files, combine, pose_path, prompt, negative_prompt, style, identitynet_strength,
            adapter_strength, steps, guidance_scale, scheduler, seed, randomize_seed, enhance_non_face, negative_noise,
            speed_mode, size, num_images, lora_text="", lora_files=None, lora_scale=1.0, init_path=None,
            init_strength=0.8, person_1=None, person_2=None, person_3=None, person_4=None, order="", refine_on=False,
            refine_strength=refine.REFINE_STRENGTH, guidance_from=0.0, guidance_to=1.0, live_preview=False,
            progress=gr.Progress(), **control_values):
        """A generator: while the image is made, TAESDXL previews (live_preview); then the results."""
        stop_requested.clear()
        unchanged = (gr.update(),) * 6
        try:
            cast, order = page_people([person_1, person_2, person_3, person_4], order)
            if not face_path and not cast:
                raise InputError("upload a face photo first (a clear, front-facing photo works best), or photos of "
                                 "2 to 4 people under People")
            face = check_image_file(face_path, "face photo") if not cast else None
            extra_faces = tuple(check_image_file(path, "extra face photo") for path in extra_face_files or ()) if not cast else ()
            pose = check_image_file(pose_path, "pose image") if pose_path else None
            chosen = page_controls(control_values, pose if pose is not None else face or cast[0].photos[0])
            init = check_image_file(init_path, "start photo") if init_path else None
            width, height = parse_size(size) or (None, None)
            seed = random.randint(0, MAX_SEED) if randomize_seed else seed
            preset = speed.preset(speed_mode)
            if preset.lora:
                progress(0, desc=f"{preset.name}: its LoRA loads the first time it is used")
            frames: queue.Queue = queue.Queue()

            def report_step(step: int, total: int) -> None:
                progress((step, total), desc=f"denoising step {step}/{total}")

            def make() -> pipeline.GenerationResult:
                made = pipeline.generate(
                    session, face, prompt or "", negative_prompt=negative_prompt or None, style=style,
                    identitynet_strength=identitynet_strength, adapter_strength=adapter_strength, steps=steps,
                    guidance_scale=guidance_scale, seed=seed, width=width, height=height,
                    scheduler=None if scheduler == SPEED_SCHEDULER else scheduler, num_images=num_images,
                    pose_image=pose, enhance_non_face=enhance_non_face, negative_noise=negative_noise,
                    combine=combine, speed=speed_mode, extra_face_images=extra_faces, controls=chosen,
                    loras=page_loras(lora_text, lora_files, lora_scale), init_image=init,
                    init_strength=init_strength, people=cast, order=order,
                    guidance_interval=None if (guidance_from, guidance_to) == (0, 1) else (guidance_from, guidance_to),
                    preview=(lambda step, total, image: frames.put(image)) if live_preview else None,
                    callback=report_step, should_stop=stop_requested.is_set,
                )
                if refine_on:
                    progress(0, desc="refining faces")
                    refine.refine_faces(session, made, refine_strength, face_image=face,
                                        extra_face_images=extra_faces, people=cast)
                return made

            # The image is made beside this generator (in its context, so progress reaches the page), which
            # hands each preview to the page as it comes.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate") as worker:
                job = worker.submit(contextvars.copy_context().run, make)
                while not job.done() or not frames.empty():
                    try:
                        yield (*unchanged, frames.get(timeout=PREVIEW_POLL_S))
                    except queue.Empty:
                        continue
                result = job.result()
        except pipeline.GenerationStopped as stopped:
            message = f"Stopped ({stopped}); nothing was made. Press Generate to start again."
            yield gr.update(), gr.update(), gr.update(), gr.update(), message, gr.update(), gr.update()
            return
        except USER_ERRORS as error:
            raise gr.Error(str(error)) from error
        except Exception as error:
            raise _internal_error(error, "generation") from error
        for notice in result.notices:
            gr.Warning(notice)
        gallery = [(result.images[index], _captions(result, index)) for index in result.best_first()]
        maps = [(image, f"{control['kind']} ({control['source']}) → {control['model']}")
                for image, control in zip(result.control_maps, result.settings["controls"])]
        notices = "\n\n".join(f"⚠️ {notice}" for notice in result.notices)
        yield (gallery, result.seed, render_settings(result.seed, result.settings, result.seconds, result.label),
               result.kps_image, notices, maps, gr.update())

    return run


def _swap_handler(session: pipeline.InstantIDSession) -> Callable:
    """The Face swap tab's click: both photos checked, `refine.swap`, the photo and a caption back."""

    def run(target_path, face_path, which, strength, prompt, seed, progress=gr.Progress()):
        try:
            if not target_path or not face_path:
                raise InputError("Face swap: give the photo to change and a photo of the person")
            target = check_image_file(target_path, "target photo", max_side=None)
            face = check_image_file(face_path, "face photo")
            progress(0, desc="swapping the face")
            result = refine.swap(session, target, face, which=int(which) or None, strength=strength, prompt=prompt or "",
                                 seed=int(seed))
        except USER_ERRORS as error:
            raise gr.Error(str(error)) from error
        except Exception as error:
            raise _internal_error(error, "face swap") from error
        caption = (f"{result.label + ' · ' if result.label else ''}face at {result.face_box} · strength "
                   f"{result.strength} · seed {result.seed} · {result.likeness.render()}")
        return result.image, caption

    return run


def _swap_tab(session: pipeline.InstantIDSession) -> None:
    """Put a person into a photo: the photo stays, one face gets the person's identity."""
    gr.Markdown("The photo stays as it is; one of its faces (the largest, or the n-th from the left) is made again "
                "with the identity of the person in the face photo. Only the face's crop is generated, so a photo "
                "of any size works.")
    with gr.Row():
        with gr.Column():
            target = gr.Image(label="Photo to change", type="filepath", height=280, elem_id="swap-target",
                              **_accepted(gr.Image.__init__, image_mode=None))
            face = gr.Image(label="Face photo of the person", type="filepath", height=200, elem_id="swap-face",
                            **_accepted(gr.Image.__init__, image_mode=None))
            which = gr.Number(0, label="Which face, from the left (0: the largest)", precision=0, minimum=0,
                              maximum=settings.LIMITS["which_face"].high, elem_id="swap-which")
            strength = gr.Slider(*_range("init_strength"), value=refine.SWAP_STRENGTH, step=0.05,
                                 label="How much of the face is repainted", elem_id="swap-strength")
            prompt = gr.Textbox(label="Prompt (optional)", placeholder=pipeline.DEFAULT_PROMPT, elem_id="swap-prompt")
            seed = gr.Number(42, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="swap-seed")
            button = gr.Button("Swap", variant="primary", elem_id="swap")
        with gr.Column():
            result = gr.Image(label="Result", type="pil", interactive=False, elem_id="swap-result",
                              **_accepted(gr.Image.__init__, format="png"))
            caption = gr.Markdown(elem_id="swap-caption")
    button.click(_swap_handler(session), inputs=[target, face, which, strength, prompt, seed], outputs=[result, caption],
                 **_accepted(button.click, concurrency_limit=1, concurrency_id="gpu"))


def _by_name(handler: Callable, named: dict[str, Any]) -> Callable:
    """Gradio hands a set of inputs over as one {component: value} dict; the handler takes them by name."""

    def on_click(values: dict, progress=gr.Progress()):
        yield from handler(**{name: values[component] for name, component in named.items()}, progress=progress)

    return on_click


def _people_section() -> dict[str, Any]:
    """A collapsed section for 2 to 4 people, one photo each; returns its inputs by handler name."""
    named = {}
    with gr.Accordion("People: several in one picture", open=False):
        gr.Markdown("Give photos of 2 to 4 people (one each); each keeps their own face in their own part of the "
                    "picture, and the face photo above is not used. The pose image, if any, places them on its "
                    "faces, left to right (or in the order below); without one they stand side by side.")
        with gr.Row():
            for number in range(1, 5):
                named[f"person_{number}"] = gr.Image(label=f"Person {number}", type="filepath", height=140,
                                                     elem_id=f"person-{number}",
                                                     **_accepted(gr.Image.__init__, image_mode=None))
        named["order"] = gr.Textbox(label="Order (with a pose image): the person for each of its faces, left to right",
                                    placeholder="e.g. 2,1", elem_id="people-order")
    return named


def _control_sections() -> dict[str, Any]:
    """One collapsed section of pose / canny / depth controls; returns its inputs by handler name."""
    what = {"pose": "body pose (OpenPose skeleton)", "canny": "edges (canny)", "depth": "depth"}
    named = {}
    with gr.Accordion("Body pose, edges, depth (extra ControlNets)", open=False):
        gr.Markdown("Each ticked control steers the picture with its own ControlNet. Without its own picture it "
                    "uses the pose photo (else the face photo), annotated here; tick *already a map* to give a "
                    "drawn skeleton, edge or depth map instead.")
        for kind in controls.KINDS:
            with gr.Group():
                with gr.Row():
                    named[f"{kind}_on"] = gr.Checkbox(False, label=f"Use {what[kind]}", elem_id=f"{kind}-on")
                    named[f"{kind}_is_map"] = gr.Checkbox(False, label="already a map", elem_id=f"{kind}-is-map")
                named[f"{kind}_image"] = gr.Image(label=f"{kind} picture (optional)", type="filepath", height=160,
                                                  elem_id=f"{kind}-image", **_accepted(gr.Image.__init__, image_mode=None))
                named[f"{kind}_strength"] = gr.Slider(*_range("control_strength"), value=controls.DEFAULT_STRENGTH,
                                                      step=0.05, label=f"{kind} strength", elem_id=f"{kind}-strength")
                with gr.Row():
                    named[f"{kind}_start"] = gr.Slider(*_range("control_start"), value=0.0, step=0.05,
                                                       label="from (fraction of steps)", elem_id=f"{kind}-start")
                    named[f"{kind}_end"] = gr.Slider(*_range("control_end"), value=1.0, step=0.05, label="to",
                                                     elem_id=f"{kind}-end")
    return named


def _speed_switch(name: str) -> tuple[Any, Any]:
    """Choosing a speed mode moves steps and guidance to its model card's values (they stay editable)."""
    preset = speed.preset(name)
    return gr.update(value=preset.steps), gr.update(value=preset.guidance_scale)


LIKENESS_HELP = (
    "The likeness under each image is ArcFace's cosine similarity between your photo and the face in the picture. "
    "Published thresholds for \"same person\" with ArcFace-family models are about 0.3 to 0.5; strangers score near "
    "0; stylised pictures score lower than photos of the same likeness.\n\n"
    "One picture's likeness moves with the seed and the prompt, so two pictures 0.02 apart are a draw. A mean over "
    "n pictures is uncertain by about 2 x sd / sqrt(n): a standard deviation of 0.08 over 36 pictures gives "
    "+/-0.027. To compare settings, run the identity benchmark (`python -m instantid_colab bench`, notebook 05): it "
    "makes the same people, prompts and seeds with each setting, scores them with a second face recogniser and CLIP "
    "too, and gives each difference a 95 % interval; a difference means something when its interval leaves out 0."
)


def _likeness_help() -> None:
    """How to read the likeness figures, folded under the results."""
    with gr.Accordion("How to read the likeness", open=False, elem_id="likeness-help"):
        gr.Markdown(LIKENESS_HELP)


def build_app(session: pipeline.InstantIDSession) -> gr.Blocks:
    """The page: inputs on the left, results and the live memory panel on the right."""
    defaults = _core_defaults()
    with gr.Blocks(**_accepted(gr.Blocks.__init__, title="InstantID on Colab", analytics_enabled=False)) as app:
        if session.smoke:
            gr.HTML(
                '<div id="smoke-banner" style="background:#fde68a;color:#78350f;padding:10px;border-radius:6px;'
                f'font-weight:600">{SMOKE_LABEL}: this app runs tiny random models to test the page. '
                "Its images are noise, not portraits.</div>"
            )
        gr.Markdown(
            "## InstantID: a new picture of a person from one photo\n"
            "Upload a clear face photo, describe the picture, press **Generate**. "
            "Raise both strengths for more likeness; if colours look burnt, lower the adapter strength first."
        )
        with gr.Tab("Generate", elem_id="generate-tab"):
            with gr.Row():
                with gr.Column():
                    face = gr.Image(
                        label="Face photo",
                        type="filepath",
                        height=280,
                        elem_id="face-image",
                        **_accepted(gr.Image.__init__, image_mode=None, sources=["upload", "webcam", "clipboard"]),
                    )
                    pose = gr.Image(
                        label="Pose image (optional): the face position and picture size are taken from it",
                        type="filepath",
                        height=200,
                        elem_id="pose-image",
                        **_accepted(gr.Image.__init__, image_mode=None),
                    )
                    prompt = gr.Textbox(label="Prompt", placeholder=pipeline.DEFAULT_PROMPT, elem_id="prompt")
                    style = gr.Dropdown(list(styles.STYLES), value=defaults["style"], label="Style", elem_id="style")
                    identitynet = gr.Slider(
                        *_range("identitynet_strength"),
                        value=defaults["identitynet_strength"],
                        step=0.05,
                        label="IdentityNet strength (for fidelity)",
                        elem_id="identitynet",
                    )
                    adapter = gr.Slider(
                        *_range("adapter_strength"),
                        value=defaults["adapter_strength"],
                        step=0.05,
                        label="Image adapter strength (for detail)",
                        elem_id="adapter",
                    )
                    speed_mode = gr.Dropdown(
                        list(speed.SPEEDS), value=speed.DEFAULT_SPEED, label="Speed", elem_id="speed",
                        info="quality: 30 steps; lcm, lightning, hyper, dmd2 and tcd: 4-8 steps with a distilled "
                             "LoRA (loaded the first time it is used)")
                    live_preview = gr.Checkbox(False, label="Live preview", elem_id="live-preview",
                                               info=f"a quick picture of the image forming, every {speed.PREVIEW_EVERY} "
                                                    "steps (TAESDXL)")
                    with gr.Row():
                        refine_on = gr.Checkbox(False, label="Refine face", elem_id="refine-on",
                                                info="after the image, make each face again at full resolution "
                                                     "through a 1024 crop (at strength 0.4 about half the image's time)")
                        refine_strength = gr.Slider(*_range("refine_strength"), value=refine.REFINE_STRENGTH, step=0.05,
                                                    label="Refine strength", elem_id="refine-strength")
                    with gr.Row():
                        seed = gr.Number(
                            defaults["seed"], label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed"
                        )
                        randomize_seed = gr.Checkbox(True, label="Randomize seed", elem_id="randomize-seed")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                        stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                    with gr.Accordion("Advanced", open=False):
                        negative = gr.Textbox(label="Negative prompt", placeholder="the style adds its own negative")
                        steps = gr.Slider(*_range("steps"), value=speed.SPEEDS[speed.DEFAULT_SPEED].steps, step=1, label="Steps",
                                          elem_id="steps")
                        guidance = gr.Slider(*_range("guidance_scale"), value=speed.SPEEDS[speed.DEFAULT_SPEED].guidance_scale,
                                             step=0.1, label="Guidance", elem_id="guidance")
                        with gr.Row():
                            guidance_from = gr.Slider(*_range("guidance_interval"), value=0.0, step=0.01,
                                                      label="Guidance from (fraction of the steps)",
                                                      elem_id="guidance-from")
                            guidance_to = gr.Slider(*_range("guidance_interval"), value=1.0, step=0.01, label="to",
                                                    elem_id="guidance-to",
                                                    info="outside, the unconditional half is not computed (faster)")
                        scheduler = gr.Dropdown(list(SCHEDULER_CHOICES), value=SPEED_SCHEDULER, label="Scheduler")
                        size = gr.Dropdown(
                            list(SIZE_CHOICES),
                            value=AUTO_SIZE,
                            allow_custom_value=True,
                            label="Output size",
                            info="Auto follows the photo (the official rule: short side 1024, long side at most 1280). "
                            "Or type WIDTHxHEIGHT (multiples of 64).",
                            elem_id="size",
                        )
                        num_images = gr.Slider(1, 4, value=defaults["num_images"], step=1, label="Number of images")
                        enhance = gr.Checkbox(
                            defaults["enhance_non_face"],
                            label="Enhance non-face region",
                            info="IdentityNet and the adapter act only inside the face box; the prompt paints the rest",
                        )
                        noise = gr.Slider(
                            *_range("negative_noise"),
                            value=defaults["negative_noise"],
                            step=0.05,
                            label="Noise injection",
                            info="Noise in the negative face embedding against burnt colours; ComfyUI_InstantID uses 0.35",
                        )
                        extra_faces = gr.File(
                            label="More photos of the same person (optional)",
                            file_count="multiple",
                            file_types=["image"],
                        )
                        combine = gr.Dropdown(
                            [(mode.replace("_", " "), mode) for mode in settings.COMBINE_MODES],
                            value=defaults["combine"],
                            label="Combine several faces",
                        )
                    people_inputs = _people_section()
                    control_inputs = _control_sections()
                    with gr.Accordion("Style LoRAs", open=False):
                        lora_text = gr.Textbox(
                            label="LoRAs, one per line: a hub id (owner/name or owner/name/file.safetensors) or a file "
                                  "path, optionally :scale", lines=2, placeholder="owner/sdxl-style-lora:0.8", elem_id="lora-text")
                        lora_files = gr.File(label="or upload SDXL LoRA files", file_count="multiple",
                                             file_types=[".safetensors"], elem_id="lora-files")
                        lora_scale = gr.Slider(*_range("lora_scale"), value=1.0, step=0.05, label="Scale of uploaded LoRAs")
                    with gr.Accordion("Start from a photo (img2img)", open=False):
                        init = gr.Image(label="Start photo: its composition and colours are kept, the face comes from "
                                              "the face photo", type="filepath", height=200, elem_id="init-image",
                                        **_accepted(gr.Image.__init__, image_mode=None))
                        init_strength = gr.Slider(*_range("init_strength"), value=defaults["init_strength"], step=0.05,
                                                  label="How much of it is repainted (1: all of it)", elem_id="init-strength")
                with gr.Column():
                    gallery = gr.Gallery(
                        label="Images",
                        columns=2,
                        height=520,
                        elem_id="gallery",
                        **_accepted(
                            gr.Gallery.__init__,
                            format="png",  # PNG keeps the settings and seed the core writes into image.info
                            buttons=["download", "download_all", "fullscreen"],
                            show_download_button=True,
                            show_share_button=False,
                        ),
                    )
                    preview = gr.Image(label="Preview (TAESDXL, while the image forms)", type="pil", interactive=False,
                                       height=256, elem_id="preview")
                    notices = gr.Markdown(elem_id="notices")
                    settings_panel = gr.Markdown(elem_id="settings")
                    kps = gr.Image(label="Face keypoints used", type="pil", interactive=False, elem_id="kps")
                    maps = gr.Gallery(label="What the pose / canny / depth ControlNets saw", columns=3, height=200,
                                      elem_id="control-maps")
                    memory_panel = gr.Markdown(render_memory(session.plan, session.smoke), elem_id="memory")
                    _likeness_help()

        with gr.Tab("Face swap", elem_id="swap-tab"):
            _swap_tab(session)
        named = dict(
            face_path=face, extra_face_files=extra_faces, combine=combine, pose_path=pose, prompt=prompt,
            negative_prompt=negative, style=style, identitynet_strength=identitynet, adapter_strength=adapter,
            steps=steps, guidance_scale=guidance, scheduler=scheduler, seed=seed, randomize_seed=randomize_seed,
            enhance_non_face=enhance, negative_noise=noise, speed_mode=speed_mode, size=size, num_images=num_images,
            lora_text=lora_text, lora_files=lora_files, lora_scale=lora_scale, init_path=init,
            init_strength=init_strength, refine_on=refine_on, refine_strength=refine_strength,
            guidance_from=guidance_from, guidance_to=guidance_to, live_preview=live_preview, **people_inputs,
            **control_inputs,
        )  # fmt: skip
        stop_requested = threading.Event()
        generate.click(
            _by_name(_generate_handler(session, stop_requested), named),
            inputs=set(named.values()),
            outputs=[gallery, seed, settings_panel, kps, notices, maps, preview],
            **_accepted(generate.click, concurrency_limit=1, concurrency_id="gpu"),
        )
        # Not queued: it must run while the generation holds the queue's only slot.
        stop.click(stop_requested.set, queue=False)
        speed_mode.change(_speed_switch, inputs=speed_mode, outputs=[steps, guidance], queue=False)

        def refresh() -> str:
            placements = [placement for placement, _ in session.controlnets.loaded.values()]
            return render_memory(session.plan, session.smoke, placements)  # an OOM retry changes the plan

        if hasattr(gr, "Timer"):
            gr.Timer(MEMORY_REFRESH_S).tick(refresh, outputs=memory_panel, queue=False, show_progress="hidden")
        else:
            app.load(refresh, outputs=memory_panel, every=MEMORY_REFRESH_S)
    return app


def launch(
    session: pipeline.InstantIDSession,
    share: bool | None = None,
    auth: str | tuple[str, str] | None = None,
    port: int | None = None,
    block: bool = True,
    inline: bool | None = None,
    open_access: bool = False,
) -> Launched:
    """Serve the app. `share=None`: a public link inside Colab, local elsewhere (decided here and passed
    to gradio, so gradio never opens a link on its own). `inline=None` lets gradio show it in a notebook's
    output; False leaves the display to the caller.

    A share link is public, so it always asks for a login: `auth="user:password"`, or, without one, a
    random user and password made for this run and printed beside the link. `open_access=True` (CLI
    `--no-auth`) serves it without a login. A local address needs none.
    """
    credentials = parse_auth(auth)
    share = environment.in_colab() if share is None else share
    made_up = share and credentials is None and not open_access
    if made_up:
        credentials = (f"user-{secrets.token_hex(3)}", secrets.token_urlsafe(12))
    app = build_app(session)
    app.queue(**_accepted(app.queue, default_concurrency_limit=1, max_size=32))
    _, local_url, share_url = app.launch(
        share=share,
        auth=credentials if share else None,
        server_port=port,
        prevent_thread_lock=True,
        show_error=True,
        inline=inline,
        **_accepted(app.launch, max_file_size=MAX_UPLOAD_FILE),
    )
    if share_url and made_up:
        print(f"Share link {share_url}: log in as user {credentials[0]}, password {credentials[1]} (made for this "
              "run; choose your own with auth='user:password', CLI --auth USER:PASS, notebook APP_LOGIN).")
    elif share_url and credentials is None:
        print(f"Share link {share_url} has no login (--no-auth): anyone who sees it can use the app and your GPU time.")
    if block:
        app.block_thread()
    return Launched(app, local_url, share_url, credentials if share else None)
