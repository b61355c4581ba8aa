"""The gradio app: the page a Colab user opens through the share link.

The page collects inputs, validates them and shows results; every image comes from
`pipeline.generate`, so the app, the CLI and the notebooks give the same picture for the same
settings. Gradio keywords that changed between 4.x and 6.x are passed only where the installed
gradio accepts them (`_accepted`), so one file serves the versions Colab has shipped.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
from pathlib import Path
from typing import Any, Callable, NamedTuple

import gradio as gr
from PIL import Image

from instantid_colab import faces, images, memory, pipeline, settings, styles
from instantid_colab.smoke import SMOKE_LABEL
from instantid_colab.weights import MissingWeightsError

AUTO_SIZE = "Auto (from the face photo)"
SIZE_CHOICES = (AUTO_SIZE, *settings.SIZE_PRESETS)
# The fast-mode toggle of the official demo: LCM-LoRA needs few steps and little guidance.
LCM_STEPS, LCM_GUIDANCE = 5, 1.5
# LCM is fast mode's own scheduler (it needs the LoRA), so it is not offered on its own.
SCHEDULER_CHOICES = tuple(name for name in pipeline.SCHEDULERS if name != "LCM")
MAX_SEED = 2**32 - 1
MAX_UPLOAD_FILE = "25mb"
MEMORY_REFRESH_S = 3.0
logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A user input the app refuses, with the message shown on the page."""


class Launched(NamedTuple):
    """What `launch` started: print `share_url` (or `local_url`) in the notebook cell."""

    app: gr.Blocks
    local_url: str
    share_url: str | None


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


def check_image_file(path: str | Path, what: str) -> Image.Image:
    """The uploaded picture as upright 8-bit RGB (`images.open_image`), or InputError naming the file.

    Uploads arrive under a temporary folder, so the message names the file only.
    """
    try:
        return images.open_image(path, what)
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


def render_memory(plan: memory.MemoryPlan | None, smoke: bool = False) -> str:
    """Markdown for the live memory panel: RAM/VRAM now, and the memory plan with its why."""
    sections = [("Memory now", memory.snapshot().render())]
    if plan is not None:
        sections.append(("Memory plan", plan.render() + (f"\n{SMOKE_PLAN_NOTE}" if smoke else "")))
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


def _generate_handler(session: pipeline.InstantIDSession, stop_requested: threading.Event | None = None) -> Callable:
    """The click handler: validate, call `pipeline.generate`, turn its result into page outputs.

    `stop_requested` is the Stop button's flag: checked between denoising steps, cleared at each start.
    Every failure becomes a message on the page; the session stays loaded for the next click.
    """
    stop_requested = stop_requested or threading.Event()

    def run(
        face_path,
        extra_face_files,
        combine,
        pose_path,
        prompt,
        negative_prompt,
        style,
        identitynet_strength,
        adapter_strength,
        steps,
        guidance_scale,
        scheduler,
        seed,
        randomize_seed,
        enhance_non_face,
        negative_noise,
        lcm,
        size,
        num_images,
        progress=gr.Progress(),
    ):
        stop_requested.clear()
        try:
            if not face_path:
                raise InputError("upload a face photo first (a clear, front-facing photo works best)")
            face = check_image_file(face_path, "face photo")
            extra_faces = tuple(check_image_file(path, "extra face photo") for path in extra_face_files or ())
            pose = check_image_file(pose_path, "pose image") if pose_path else None
            width, height = parse_size(size) or (None, None)
            seed = random.randint(0, MAX_SEED) if randomize_seed else seed
            if lcm and not session.lcm_loaded:
                progress(0, desc="loading LCM-LoRA (first use of fast mode)")

            def report_step(step: int, total: int) -> None:
                progress((step, total), desc=f"denoising step {step}/{total}")

            result = pipeline.generate(
                session,
                face,
                prompt or "",
                negative_prompt=negative_prompt or None,
                style=style,
                identitynet_strength=identitynet_strength,
                adapter_strength=adapter_strength,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seed,
                scheduler=scheduler,
                width=width,
                height=height,
                num_images=num_images,
                pose_image=pose,
                enhance_non_face=enhance_non_face,
                negative_noise=negative_noise,
                combine=combine,
                lcm=lcm,
                extra_face_images=extra_faces,
                callback=report_step,
                should_stop=stop_requested.is_set,
            )
        except pipeline.GenerationStopped as stopped:
            message = f"Stopped ({stopped}); nothing was made. Press Generate to start again."
            return gr.update(), gr.update(), gr.update(), gr.update(), message
        except (ValueError, MissingWeightsError, pipeline.OutOfMemory) as error:  # inputs, faces, settings, memory
            raise gr.Error(str(error)) from error
        except Exception as error:  # our bug: say so on the page, keep the app usable, log the traceback
            logger.exception("generation failed")
            raise gr.Error(f"Internal error ({type(error).__name__}: {error}). The app is still usable; the "
                           "traceback is in the notebook/console output: please report it.") from error
        for notice in result.notices:
            gr.Warning(notice)
        caption = result.label or f"seed {result.seed}"
        gallery = [(result.images[index], f"{caption} · #{index + 1} · {result.likeness[index].render()}")
                   for index in result.best_first()]
        notices = "\n\n".join(f"⚠️ {notice}" for notice in result.notices)
        return (
            gallery,
            result.seed,
            render_settings(result.seed, result.settings, result.seconds, result.label),
            result.kps_image,
            notices,
        )

    return run


def _lcm_switch(lcm: bool) -> tuple[Any, Any]:
    """Ticking fast mode moves steps and guidance to LCM's values; unticking moves them back to the core's."""
    defaults = _core_defaults()
    steps, guidance = (LCM_STEPS, LCM_GUIDANCE) if lcm else (defaults["steps"], defaults["guidance_scale"])
    return gr.update(value=steps), gr.update(value=guidance)


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
                lcm = gr.Checkbox(
                    defaults["lcm"],
                    label="Fast mode (LCM-LoRA)",
                    info=f"{LCM_STEPS}-10 steps at guidance ~{LCM_GUIDANCE}; the LoRA loads the first time it is used",
                    elem_id="lcm",
                )
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
                    steps = gr.Slider(*_range("steps"), value=defaults["steps"], step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(
                        *_range("guidance_scale"), value=defaults["guidance_scale"], step=0.1, label="Guidance", elem_id="guidance"
                    )
                    scheduler = gr.Dropdown(list(SCHEDULER_CHOICES), value=defaults["scheduler"], label="Scheduler")
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
                        [(mode.replace("_", " "), mode) for mode in faces.COMBINE_MODES],
                        value=defaults["combine"],
                        label="Combine several faces",
                    )
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
                notices = gr.Markdown(elem_id="notices")
                settings_panel = gr.Markdown(elem_id="settings")
                kps = gr.Image(label="Face keypoints used", type="pil", interactive=False, elem_id="kps")
                memory_panel = gr.Markdown(render_memory(session.plan, session.smoke), elem_id="memory")

        inputs = [
            face, extra_faces, combine, pose, prompt, negative, style, identitynet, adapter, steps, guidance,
            scheduler, seed, randomize_seed, enhance, noise, lcm, size, num_images,
        ]  # fmt: skip
        stop_requested = threading.Event()
        generate.click(
            _generate_handler(session, stop_requested),
            inputs=inputs,
            outputs=[gallery, seed, settings_panel, kps, notices],
            **_accepted(generate.click, concurrency_limit=1, concurrency_id="gpu"),
        )
        # Not queued: it must run while the generation holds the queue's only slot.
        stop.click(stop_requested.set, queue=False)
        lcm.change(_lcm_switch, inputs=lcm, outputs=[steps, guidance], queue=False)

        def refresh() -> str:
            return render_memory(session.plan, session.smoke)  # the plan changes when an out-of-memory retry steps it down

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
) -> Launched:
    """Serve the app. `share=None` lets gradio decide: a public link on Colab, local elsewhere.

    Share links are public: pass `auth="user:password"` so strangers cannot use your GPU.
    """
    credentials = parse_auth(auth)
    app = build_app(session)
    app.queue(**_accepted(app.queue, default_concurrency_limit=1, max_size=32))
    _, local_url, share_url = app.launch(
        share=share,
        auth=credentials,
        server_port=port,
        prevent_thread_lock=True,
        show_error=True,
        **_accepted(app.launch, max_file_size=MAX_UPLOAD_FILE),
    )
    if share_url and credentials is None:
        print(
            "Note: anyone with this link can use the app and your GPU time. "
            "To require a login, launch with auth='user:password' (CLI: --auth user:password)."
        )
    if block:
        app.block_thread()
    return Launched(app, local_url, share_url)
