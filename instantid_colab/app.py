"""The gradio app: the page a Colab user opens through the share link.

The page collects inputs, validates them and shows results; every image comes from
`pipeline.generate`, so the app, the CLI and the notebooks give the same picture for the same
settings. Gradio keywords that changed between 4.x and 6.x are passed only where the installed
gradio accepts them (`_accepted`), so one file serves the versions Colab has shipped.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import inspect
import logging
import os
import queue
import random
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
import concurrent.futures
from pathlib import Path
from typing import Any, Callable, NamedTuple

import gradio as gr
from PIL import Image

from instantid_colab import (controls, engines, environment, images, loras, memory, people, pipeline, refine, schedulers,
                             settings, settings_files, speed, styles)
from instantid_colab.gpu_line import LINE_LIMIT, Busy, GpuLine, Turn
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
# Uploads and pictures gradio keeps for the page (its temporary files): swept every CACHE_SWEEP_S, each deleted once
# CACHE_AGE_S old, all of them when the app closes. Half an hour is long enough to download what was made.
CACHE_SWEEP_S, CACHE_AGE_S = 300, 1800
_OWN_CACHE: dict[str, Path] = {}  # the temporary folder launch() gave gradio, while one is in use
HEARTBEAT_S = 0.5  # a waiting or running handler yields at least this often: new previews, its place in line, and
# a chance for gradio to notice a closed page and close the handler (which gives its place up)
logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A user input the app refuses, with the message shown on the page."""


class PortInUse(ValueError):
    """The port asked for is taken; the message says what to do (exit 1, not our bug)."""

    def __init__(self, port: int):
        super().__init__(f"port {port} is in use (another app, or this one started earlier): choose another with "
                         "--port N, or leave --port out for the next free one")


def check_port_free(port: int) -> None:
    """PortInUse when nothing can listen on `port` here (gradio's own check, done before the models load)."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise PortInUse(port) from None


class Launched(NamedTuple):
    """What `launch` started: print `share_url` (or `local_url`) in the notebook cell."""

    app: gr.Blocks
    local_url: str
    share_url: str | None
    login: tuple[str, str] | None = None  # what the share link asks for (None: a local address, or --no-auth)
    cache: Path | None = None  # the app's own temporary folder (None: the GRADIO_TEMP_DIR you chose)


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
    if len(parts) != 2 or not all(part.isdecimal() for part in parts):  # "²" is a digit int() cannot read
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


def _uploads_refused_in_our_words(blocks: gr.Blocks) -> None:
    """An upload that is not a picture, given to any picture field (the page or the API), is refused with our
    sentence (`check_image_file`'s) instead of gradio's "Could not preprocess input component at index 0"."""
    for block in list(blocks.blocks.values()):
        if isinstance(block, gr.Image) and block.type == "filepath":
            what = re.split(r"[(:]", block.label or "picture", maxsplit=1)[0].strip().lower()
            block.preprocess = _refusing(block.preprocess, what)


def _refusing(preprocess: Callable, what: str) -> Callable:
    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as error:  # gradio's own reading of the upload failed: say why in our words
            path = getattr(payload, "path", None)
            if path:
                try:
                    check_image_file(path, what)
                except InputError as refused:
                    raise gr.Error(str(refused)) from None
            raise gr.Error(f"{what}: the upload cannot be read as a picture ({type(error).__name__}); "
                           f"{images.FORMATS_HINT}.") from None
    return checked


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


def render_memory(plan: memory.MemoryPlan | None, smoke: bool = False, extra=(), identity_methods=()) -> str:
    """Markdown for the live memory panel: RAM/VRAM now, the memory plan with its why, where the
    extra ControlNets of the last run live (`extra`: their memory.ControlPlacement) and what each identity
    method has loaded where (`InstantIDSession.identity_methods`)."""
    sections = [("Memory now", memory.snapshot().render())]
    if plan is not None:
        sections.append(("Memory plan", plan.render() + (f"\n{SMOKE_PLAN_NOTE}" if smoke else "")))
    if extra:
        sections.append(("Extra ControlNets", "\n".join(placement.render() for placement in extra)))
    if identity_methods:
        sections.append(("Identity methods", "\n".join(identity_methods)))
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


def page_people(paths: list, order: str, has_layout: bool) -> tuple[list[people.Person], list[int] | None]:
    """The People section: one photo per person, 2 to 4 of them, and the optional order; none given: ([], None)."""
    paths = [path for path in paths if path]
    if not paths:
        return [], None
    if len(paths) == 1:
        raise InputError("People: give photos of 2 to 4 people (for one person, use the face photo above)")
    chosen = [people.Person((check_image_file(path, f"photo of person {index}"),)) for index, path in enumerate(paths, 1)]
    ordered = people.parse_order(order, len(chosen))
    return people.check_people(chosen, ordered, has_layout), ordered


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


def _waiting(line: GpuLine, turn: Turn) -> Iterator[str]:
    """Until `turn` is first in line: a line for the page every HEARTBEAT_S (how many are ahead). Each yield lets
    gradio notice a closed page and close this generator, which gives the place up."""
    while not line.wait(turn, HEARTBEAT_S):
        if turn.stop.is_set():
            return
        yield f"Waiting for the GPU: {line.ahead(turn)} ahead of you."


def _beside(make: Callable[[], Any], line: GpuLine, turn: Turn, previews: queue.Queue,
            shown: Callable[[Any], tuple]) -> Iterator:
    """Run `make` on the line's worker thread (in this context, so gr.Progress reaches the page), yielding
    `shown(None)` as it starts (the page's "waiting" line goes at once), `shown(preview)` for each preview as it
    comes and `shown(None)` every HEARTBEAT_S; returns what `make` returned as soon as it is done (the job's end is
    a message in the same queue, after its last preview). Closed early (the page went away: gradio closes the
    generator at a yield), the run is stopped at its next step and waited for, so the next in line never overlaps
    it."""
    finished = object()
    job = line.worker.submit(contextvars.copy_context().run, make)
    job.add_done_callback(lambda _: previews.put(finished))
    try:
        yield shown(None)
        while True:
            try:
                preview = previews.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                yield shown(None)
                continue
            if preview is finished:
                break
            yield shown(preview)
    except GeneratorExit:
        turn.stop.set()
        concurrent.futures.wait([job])
        raise
    return job.result()


def _generate_handler(session: pipeline.InstantIDSession, line: GpuLine | None = None) -> Callable:
    """The click handler: validate, take a turn in the GPU line, call `pipeline.generate`, show the result.

    `line`: the GPU line every person of the app shares (a turn's Stop flag is what that person's Stop sets).
    Every failure becomes a message on the page; the session stays loaded for the next click.
    """
    line = GpuLine() if line is None else line  # (an empty line is falsy: it has a length)

    def run(face_path, extra_face_files, combine, pose_path, prompt, negative_prompt, style, identitynet_strength,
            adapter_strength, steps, guidance_scale, scheduler, seed, randomize_seed, enhance_non_face, negative_noise,
            speed_mode, size, num_images, lora_text="", lora_files=None, lora_scale=1.0, init_path=None,
            init_strength=0.8, person_1=None, person_2=None, person_3=None, person_4=None, order="", refine_on=False,
            refine_strength=settings.REFINE_STRENGTH, guidance_from=0.0, guidance_to=1.0, live_preview=False,
            identity=engines.DEFAULT, s_scale=1.0, progress=gr.Progress(), browser: str | None = None,
            **control_values):
        """A generator: its place in line while it waits, TAESDXL previews (live_preview), then the results."""
        unchanged = (gr.update(),) * 4
        try:
            said = [f"The order {order.strip()!r} was not used: it places the people under People, and there are "
                    "none."] if (order or "").strip() and not any((person_1, person_2, person_3, person_4)) else []
            cast, order = page_people([person_1, person_2, person_3, person_4], order, bool(pose_path))
            if not face_path and not cast:
                raise InputError("upload a face photo first (a clear, front-facing photo works best), or photos of "
                                 "2 to 4 people under People")
            unused = [what for what, given in (("face photo", face_path), ("extra face photos", extra_face_files))
                      if given] if cast else []
            face = check_image_file(face_path, "face photo") if not cast else None
            extra_faces = tuple(check_image_file(path, "extra face photo") for path in extra_face_files or ()) if not cast else ()
            pose = check_image_file(pose_path, "pose image") if pose_path else None
            chosen = page_controls(control_values, pose if pose is not None else face or cast[0].photos[0])
            init = check_image_file(init_path, "start photo") if init_path else None
            width, height = parse_size(size) or (None, None)
            seed = random.randint(0, MAX_SEED) if randomize_seed else seed
            preset = speed.preset(speed_mode)
            settings.check({"identity": identity, "s_scale": s_scale, "pose_image": pose, "init_image": init,
                            "several_people": bool(cast), "refine_face": refine_strength if refine_on else None,
                            "combine": combine, "steps": steps})
            turn = line.join(browser or secrets.token_hex(8))
        except Busy as error:
            raise gr.Error(str(error)) from None
        except USER_ERRORS as error:
            raise gr.Error(str(error)) from error
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
                identity=identity, s_scale=s_scale, preview=(lambda step, total, image: frames.put(image)) if live_preview else None,
                callback=report_step, should_stop=turn.stop.is_set,
            )
            if refine_on:
                progress(0, desc="refining faces")
                refine.refine_faces(session, made, refine_strength, face_image=face,
                                    extra_face_images=extra_faces, people=cast)
            if unused:
                made.notices.append(f"The {' and the '.join(unused)} above {'was' if len(unused) == 1 else 'were'} "
                                    "not used: the picture is of the people under People, each from their own photo.")
            made.notices += said
            return made

        try:
            for place in _waiting(line, turn):
                yield (*unchanged, place, gr.update(), gr.update())
            if turn.stop.is_set():
                yield (*unchanged, "Stopped before it started; nothing was made.", gr.update(), gr.update())
                return
            if preset.lora:
                progress(0, desc=f"{preset.name}: its LoRA loads the first time it is used")
            result = yield from _beside(make, line, turn, frames, lambda frame: (
                *unchanged, "", gr.update(), gr.update() if frame is None else frame))
        except pipeline.GenerationStopped as stopped:
            yield (*unchanged, f"Stopped ({stopped}); nothing was made. Press Generate to start again.", gr.update(),
                   gr.update())
            return
        except USER_ERRORS as error:
            raise gr.Error(str(error)) from error
        except Exception as error:
            raise _internal_error(error, "generation") from error
        finally:
            line.leave(turn)
        for notice in result.notices:
            gr.Warning(notice)
        gallery = [(result.images[index], _captions(result, index)) for index in result.best_first()]
        maps = [(image, f"{control['kind']} ({control['source']}) → {control['model']}")
                for image, control in zip(result.control_maps, result.settings["controls"])]
        notices = "\n\n".join(f"⚠️ {notice}" for notice in result.notices)
        yield (gallery, result.seed, render_settings(result.seed, result.settings, result.seconds, result.label),
               result.kps_image, notices, maps, gr.update())

    return run


def _swap_handler(session: pipeline.InstantIDSession, line: GpuLine | None = None) -> Callable:
    """The Face swap tab's click: both photos checked, a turn in the GPU line, `refine.swap`, the photo back."""
    line = GpuLine() if line is None else line  # (an empty line is falsy: it has a length)

    def run(target_path, face_path, which, strength, prompt, seed, steps=30, progress=gr.Progress(),
            browser: str | None = None):
        try:
            if not target_path or not face_path:
                raise InputError("Face swap: give the photo to change and a photo of the person")
            target = check_image_file(target_path, "target photo", max_side=None)
            face = check_image_file(face_path, "face photo")
            turn = line.join(browser or secrets.token_hex(8))
        except USER_ERRORS + (Busy,) as error:
            raise gr.Error(str(error)) from None
        try:
            for place in _waiting(line, turn):
                yield gr.update(), place
            if turn.stop.is_set():
                yield gr.update(), "Stopped before it started; nothing was made."
                return
            progress(0, desc="swapping the face")
            result = line.worker.submit(refine.swap, session, target, face, which=int(which) or None,
                                        strength=strength, prompt=prompt or "", seed=int(seed),
                                        steps=int(steps)).result()
        except USER_ERRORS as error:
            raise gr.Error(str(error)) from error
        except Exception as error:
            raise _internal_error(error, "face swap") from error
        finally:
            line.leave(turn)
        yield result.image, (f"{result.label + ' · ' if result.label else ''}face at {result.face_box} · strength "
                             f"{result.strength} · seed {result.seed} · {result.likeness.render()}")

    return run


def _swap_tab(session: pipeline.InstantIDSession, line: GpuLine) -> None:
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
            steps = gr.Slider(*_range("steps"), value=30, step=1, label="Steps (the repainted share of them runs)",
                              elem_id="swap-steps")
            button = gr.Button("Swap", variant="primary", elem_id="swap")
        with gr.Column():
            result = gr.Image(label="Result", type="pil", interactive=False, elem_id="swap-result",
                              **_accepted(gr.Image.__init__, format="png"))
            caption = gr.Markdown(elem_id="swap-caption")
    handler = _swap_handler(session, line)

    def on_swap(target, face, which, strength, prompt, seed, steps, request: gr.Request, progress=gr.Progress()):
        yield from handler(target, face, which, strength, prompt, seed, steps, progress=progress,
                           browser=_browser(request))

    button.click(on_swap, inputs=[target, face, which, strength, prompt, seed, steps], outputs=[result, caption],
                 **_accepted(button.click, concurrency_limit=None))


def _browser(request: gr.Request | None) -> str:
    """Whose click this is: gradio's session of one browser tab (or one client); a fresh one without a request."""
    return getattr(request, "session_hash", None) or secrets.token_hex(8)


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


# The method settings with a control of their own: greyed out while a method that does not read them is chosen (their
# values kept). What a method refuses (a pose image, people, a start photo, refine) stays editable, to be taken back.
METHOD_CONTROLS = ("identitynet_strength", "enhance_non_face", "s_scale", "combine")


def _identity_switch(name: str) -> tuple[Any, ...]:
    """Choosing an identity method greys out the METHOD_CONTROLS its registry line does not read."""
    reads = engines.method(name).reads
    return tuple(gr.update(interactive=control in reads) for control in METHOD_CONTROLS)


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


def _header(session: pipeline.InstantIDSession) -> None:
    """The smoke banner (tiny random models) and what the page does."""
    if session.smoke:
        gr.HTML(
            '<div id="smoke-banner" style="background:#fde68a;color:#78350f;padding:10px;border-radius:6px;'
            f'font-weight:600">{SMOKE_LABEL}: this app runs tiny random models to test the page. '
            "Its images are noise, not portraits.</div>"
        )
    gr.Markdown(
        "## InstantID: a new picture of a person from one photo\n"
        "Upload a clear face photo, describe the picture, press **Generate**. "
        "Raise both strengths for more likeness; if colours look burnt, lower the adapter strength first. "
        f"Everyone using this page shares one GPU: pictures are made one at a time, at most {LINE_LIMIT} in line."
    )


def _main_inputs(defaults: dict[str, Any]) -> dict[str, Any]:
    """The photos, prompt, style, strengths, speed and seed; returns them by handler name."""
    named = {}
    named["face_path"] = gr.Image(
        label="Face photo", type="filepath", height=280, elem_id="face-image",
        **_accepted(gr.Image.__init__, image_mode=None, sources=["upload", "webcam", "clipboard"]))
    named["pose_path"] = gr.Image(
        label="Pose image (optional): the face position and picture size are taken from it", type="filepath",
        height=200, elem_id="pose-image", **_accepted(gr.Image.__init__, image_mode=None))
    named["prompt"] = gr.Textbox(label="Prompt", placeholder=pipeline.DEFAULT_PROMPT, elem_id="prompt")
    named["style"] = gr.Dropdown(list(styles.STYLES), value=defaults["style"], label="Style", elem_id="style")
    named["identitynet_strength"] = gr.Slider(*_range("identitynet_strength"), value=defaults["identitynet_strength"],
                                              step=0.05, label="IdentityNet strength (for fidelity)",
                                              elem_id="identitynet")
    named["adapter_strength"] = gr.Slider(*_range("adapter_strength"), value=defaults["adapter_strength"], step=0.05,
                                          label="Image adapter strength (for detail)", elem_id="adapter")
    named["speed_mode"] = gr.Dropdown(
        list(speed.SPEEDS), value=speed.DEFAULT_SPEED, label="Speed", elem_id="speed",
        info="quality: 30 steps; lcm, lightning, hyper, dmd2 and tcd: 4-8 steps with a distilled LoRA (loaded the "
             "first time it is used)")
    with gr.Row():
        named["identity"] = gr.Dropdown(
            list(engines.METHODS), value=engines.DEFAULT, label="Identity method", elem_id="identity",
            info=engines.help_text())
        named["s_scale"] = gr.Slider(*_range("s_scale"), value=1.0, step=0.05, label="FaceID structure (s_scale)",
                                     elem_id="s-scale", interactive=False)
    named["live_preview"] = gr.Checkbox(False, label="Live preview", elem_id="live-preview",
                                        info=f"a quick picture of the image forming, every {speed.PREVIEW_EVERY} "
                                             "steps (TAESDXL)")
    with gr.Row():
        named["refine_on"] = gr.Checkbox(False, label="Refine face", elem_id="refine-on",
                                         info="after the image, make each face again at full resolution through a "
                                              "1024 crop (at strength 0.4 about half the image's time)")
        named["refine_strength"] = gr.Slider(*_range("refine_strength"), value=settings.REFINE_STRENGTH, step=0.05,
                                             label="Refine strength", elem_id="refine-strength")
    with gr.Row():
        named["seed"] = gr.Number(defaults["seed"], label="Seed", precision=0, minimum=0, maximum=MAX_SEED,
                                  elem_id="seed")
        named["randomize_seed"] = gr.Checkbox(True, label="Randomize seed", elem_id="randomize-seed")
    return named


def _advanced(defaults: dict[str, Any]) -> dict[str, Any]:
    """The collapsed Advanced section: negative prompt, steps, guidance and its interval, sampler, size, count,
    the face region, noise injection, more photos of the person and how they combine."""
    named = {}
    quality = speed.SPEEDS[speed.DEFAULT_SPEED]
    with gr.Accordion("Advanced", open=False):
        named["negative_prompt"] = gr.Textbox(label="Negative prompt", placeholder="the style adds its own negative")
        named["steps"] = gr.Slider(*_range("steps"), value=quality.steps, step=1, label="Steps", elem_id="steps")
        named["guidance_scale"] = gr.Slider(*_range("guidance_scale"), value=quality.guidance_scale, step=0.1,
                                            label="Guidance", elem_id="guidance")
        with gr.Row():
            named["guidance_from"] = gr.Slider(*_range("guidance_interval"), value=0.0, step=0.01,
                                               label="Guidance from (fraction of the steps)", elem_id="guidance-from")
            named["guidance_to"] = gr.Slider(*_range("guidance_interval"), value=1.0, step=0.01, label="to",
                                             elem_id="guidance-to",
                                             info="outside, the unconditional half is not computed (faster)")
        named["scheduler"] = gr.Dropdown(list(SCHEDULER_CHOICES), value=SPEED_SCHEDULER, label="Scheduler")
        named["size"] = gr.Dropdown(
            list(SIZE_CHOICES), value=AUTO_SIZE, allow_custom_value=True, label="Output size", elem_id="size",
            info="Auto follows the photo (the official rule: short side 1024, long side at most 1280). Or type "
                 "WIDTHxHEIGHT (multiples of 64).")
        named["num_images"] = gr.Slider(1, 4, value=defaults["num_images"], step=1, label="Number of images")
        named["enhance_non_face"] = gr.Checkbox(
            defaults["enhance_non_face"], label="Enhance non-face region",
            info="IdentityNet and the adapter act only inside the face box; the prompt paints the rest")
        named["negative_noise"] = gr.Slider(
            *_range("negative_noise"), value=defaults["negative_noise"], step=0.05, label="Noise injection",
            info="Noise in the negative face embedding against burnt colours; ComfyUI_InstantID uses 0.35")
        named["extra_face_files"] = gr.File(label="More photos of the same person (optional)", file_count="multiple",
                                            file_types=["image"])
        named["combine"] = gr.Dropdown([(mode.replace("_", " "), mode) for mode in settings.COMBINE_MODES],
                                       value=defaults["combine"], label="Combine several faces")
    return named


def _style_and_start_photo(defaults: dict[str, Any]) -> dict[str, Any]:
    """The collapsed Style LoRAs and Start-from-a-photo sections."""
    named = {}
    with gr.Accordion("Style LoRAs", open=False):
        named["lora_text"] = gr.Textbox(
            label="LoRAs, one per line: a hub id (owner/name or owner/name/file.safetensors) or a file path, "
                  "optionally :scale", lines=2, placeholder="owner/sdxl-style-lora:0.8", elem_id="lora-text")
        named["lora_files"] = gr.File(label="or upload SDXL LoRA files", file_count="multiple",
                                      file_types=[".safetensors"], elem_id="lora-files")
        named["lora_scale"] = gr.Slider(*_range("lora_scale"), value=1.0, step=0.05, label="Scale of uploaded LoRAs")
    with gr.Accordion("Start from a photo (img2img)", open=False):
        named["init_path"] = gr.Image(label="Start photo: its composition and colours are kept, the face comes from "
                                            "the face photo", type="filepath", height=200, elem_id="init-image",
                                      **_accepted(gr.Image.__init__, image_mode=None))
        named["init_strength"] = gr.Slider(*_range("init_strength"), value=defaults["init_strength"], step=0.05,
                                           label="How much of it is repainted (1: all of it)", elem_id="init-strength")
    return named


def _settings_loader() -> Any:
    """The collapsed Load settings section: a settings file the identity benchmark wrote (its best_settings/)."""
    with gr.Accordion("Load settings", open=False):
        return gr.File(label="A settings file from the identity benchmark (its best_settings/ folder): its settings "
                             "fill this page", file_types=[".json"], type="filepath", elem_id="settings-file")


def _load_settings(path: str | None) -> list[Any]:
    """The page's settings from the file (`settings_files.page_values`, in PAGE_FIELDS order), then a notice saying
    what was loaded and what is set by hand (pictures, ControlNets)."""
    if not path:
        return [gr.update() for _ in settings_files.PAGE_FIELDS] + [gr.update()]
    try:
        page, left = settings_files.page_values(settings_files.read(path))
    except ValueError as error:
        raise gr.Error(str(error)) from None
    notice = f"Loaded {len(page)} settings from {Path(path).name}." + (
        f" Set these by hand: {', '.join(left)}." if left else "")
    return [gr.update(value=page[name]) if name in page else gr.update() for name in settings_files.PAGE_FIELDS] + [notice]


def _results(session: pipeline.InstantIDSession) -> dict[str, Any]:
    """The right column: pictures, preview, notices (also the place in line), settings, keypoints, the maps the
    ControlNets saw, the memory panel and how to read the likeness."""
    named = {}
    named["gallery"] = gr.Gallery(
        label="Images", columns=2, height=520, elem_id="gallery",
        **_accepted(gr.Gallery.__init__, format="png",  # PNG keeps the settings and seed the core writes into info
                    buttons=["download", "download_all", "fullscreen"], show_download_button=True,
                    show_share_button=False))
    named["preview"] = gr.Image(label="Preview (TAESDXL, while the image forms)", type="pil", interactive=False,
                                height=256, elem_id="preview")
    named["notices"] = gr.Markdown(elem_id="notices")
    named["settings"] = gr.Markdown(elem_id="settings")
    named["kps"] = gr.Image(label="Face keypoints used", type="pil", interactive=False, elem_id="kps")
    named["maps"] = gr.Gallery(label="What the pose / canny / depth ControlNets saw", columns=3, height=200,
                               elem_id="control-maps")
    named["memory"] = gr.Markdown(render_memory(session.plan, session.smoke, identity_methods=session.identity_methods()),
                                  elem_id="memory")
    _likeness_help()
    return named


def _wire(app: gr.Blocks, session: pipeline.InstantIDSession, line: GpuLine, inputs: dict[str, Any],
          buttons: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Generate takes a turn in the GPU line (not gradio's queue, so each person sees their own place and Stop
    reaches only their own run); Stop, the speed switch and the memory panel run at once, outside any queue."""
    def on_generate(*values_and_request, progress=gr.Progress()):
        *values, request = values_and_request
        yield from handler(**dict(zip(inputs, values)), progress=progress, browser=_browser(request))

    # One named parameter per input, defaulting to the page's own value: the API that gradio_client sees (`/generate`,
    # call it with only what differs from the page). gradio finds the request by its type hint.
    on_generate.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=component.value)
         for name, component in inputs.items()]
        + [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
           inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress())])
    on_generate.__annotations__ = {"request": gr.Request}
    handler = _generate_handler(session, line)
    buttons["generate"].click(
        on_generate, inputs=list(inputs.values()), api_name="generate",
        outputs=[outputs[name] for name in ("gallery", "seed", "settings", "kps", "notices", "maps", "preview")],
        **_accepted(buttons["generate"].click, concurrency_limit=None))
    def on_stop(request: gr.Request) -> None:
        line.stop(_browser(request))

    buttons["stop"].click(on_stop, queue=False, api_name="stop")
    # `input`, not `change`: a person's choice moves steps and guidance; a loaded settings file brings its own
    inputs["speed_mode"].input(_speed_switch, inputs=inputs["speed_mode"],
                               outputs=[inputs["steps"], inputs["guidance_scale"]], queue=False)
    buttons["settings_file"].change(_load_settings, inputs=buttons["settings_file"],
                                    outputs=[*(inputs[name] for name in settings_files.PAGE_FIELDS), outputs["notices"]],
                                    queue=False)
    inputs["identity"].change(_identity_switch, inputs=inputs["identity"],
                              outputs=[inputs[name] for name in METHOD_CONTROLS], queue=False)

    def refresh() -> str:
        placements = [placement for placement, _ in session.controlnets.loaded.values()]
        return render_memory(session.plan, session.smoke, placements,  # an OOM retry changes the plan
                             session.identity_methods())

    if hasattr(gr, "Timer"):
        gr.Timer(MEMORY_REFRESH_S).tick(refresh, outputs=outputs["memory"], queue=False, show_progress="hidden")
    else:
        app.load(refresh, outputs=outputs["memory"], every=MEMORY_REFRESH_S)


def build_app(session: pipeline.InstantIDSession, line: GpuLine | None = None) -> gr.Blocks:
    """The page: inputs on the left, results and the live memory panel on the right, one GPU line for everyone."""
    line = GpuLine() if line is None else line  # (an empty line is falsy: it has a length)
    defaults = _core_defaults()
    with gr.Blocks(**_accepted(gr.Blocks.__init__, title="InstantID on Colab", analytics_enabled=False)) as app:
        _header(session)
        with gr.Tab("Generate", elem_id="generate-tab"):
            with gr.Row():
                with gr.Column():
                    inputs = _main_inputs(defaults)
                    with gr.Row():
                        buttons = {"generate": gr.Button("Generate", variant="primary", elem_id="generate", scale=3),
                                   "stop": gr.Button("Stop", variant="stop", elem_id="stop", scale=1)}
                    inputs |= _advanced(defaults) | _people_section() | _control_sections()
                    inputs |= _style_and_start_photo(defaults)
                    buttons["settings_file"] = _settings_loader()  # not an input of /generate
                with gr.Column():
                    outputs = _results(session)
        outputs["seed"] = inputs["seed"]
        with gr.Tab("Face swap", elem_id="swap-tab"):
            _swap_tab(session, line)
        _wire(app, session, line, inputs, buttons, outputs)
        _uploads_refused_in_our_words(app)
    return app

def _own_cache() -> Path | None:
    """A temporary folder of this app's own for gradio (GRADIO_TEMP_DIR), unless you chose one: gradio writes
    every upload and every picture it shows there and deletes only the uploads (gradio 6 does not track the
    pictures a handler returns), so the app sweeps its own folder (`_sweep`) and removes it when it closes, or when
    Python exits with the app still open (a notebook's kernel restarted)."""
    chosen = os.environ.get("GRADIO_TEMP_DIR")
    if chosen and Path(chosen) != _OWN_CACHE.get("folder"):
        return None
    folder = Path(tempfile.mkdtemp(prefix="instantid-app-"))
    atexit.register(_remove_cache, folder)
    _OWN_CACHE["folder"] = folder
    os.environ["GRADIO_TEMP_DIR"] = str(folder)  # read by gradio as it builds the page and as it serves files
    return folder


def _sweep(app: gr.Blocks, folder: Path) -> None:
    """While the app runs, delete its temporary files older than CACHE_AGE_S every CACHE_SWEEP_S (ticking each
    second to notice the close); once closed, the whole folder."""
    swept = time.monotonic()
    while app.is_running:
        time.sleep(1)
        if time.monotonic() - swept >= CACHE_SWEEP_S:
            cutoff, swept = time.time() - CACHE_AGE_S, time.monotonic()
            for path in folder.rglob("*"):
                with contextlib.suppress(FileNotFoundError):
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        path.unlink()
    _remove_cache(folder)


def _remove_cache(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if _OWN_CACHE.get("folder") == folder:
        del _OWN_CACHE["folder"]
        os.environ.pop("GRADIO_TEMP_DIR", None)


def launch(
    session: pipeline.InstantIDSession,
    share: bool | None = None,
    auth: str | tuple[str, str] | None = None,
    port: int | None = None,
    block: bool = True,
    inline: bool | None = None,
    open_access: bool = False,
    line: GpuLine | None = None,
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
    cache = _own_cache()
    made_up = share and credentials is None and not open_access
    if made_up:
        credentials = (f"user-{secrets.token_hex(3)}", secrets.token_urlsafe(12))
    app = build_app(session, line)
    if block and threading.current_thread() is threading.main_thread():  # `kill`, `timeout`: closed as Ctrl-C does
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    app.queue(**_accepted(app.queue, default_concurrency_limit=1, max_size=32))
    try:
        _, local_url, share_url = app.launch(
            share=share,
            auth=credentials if share else None,
            server_port=port,
            prevent_thread_lock=True,
            show_error=True,
            inline=inline,
            **_accepted(app.launch, max_file_size=MAX_UPLOAD_FILE),
        )
    except BaseException as error:
        if cache is not None:
            _remove_cache(cache)
        if isinstance(error, OSError) and port is not None and "port" in str(error):
            raise PortInUse(port) from None
        raise
    if share and share_url is None and credentials is not None:  # no tunnel: the local address still asks
        print(f"The share link could not be made (gradio's share server did not answer); the app is served at "
              f"{local_url} only, behind the login user {credentials[0]}, password {credentials[1]}.")
    if share_url and made_up:
        print(f"Share link {share_url}: log in as user {credentials[0]}, password {credentials[1]} (made for this "
              "run; choose your own with auth='user:password', CLI --auth USER:PASS, notebook APP_LOGIN).")
    elif share_url and credentials is None:
        print(f"Share link {share_url} has no login (--no-auth): anyone who sees it can use the app and your GPU time.")
    if cache is not None:
        threading.Thread(target=_sweep, args=(app, cache), name="app-cache-sweeper", daemon=True).start()
    if block:
        app.block_thread()  # until Ctrl-C (or SIGTERM, above), which closes the app
        if cache is not None:
            _remove_cache(cache)  # here, not only in the sweeper: a daemon thread may not run at exit
    return Launched(app, local_url, share_url, credentials if share else None, cache)
